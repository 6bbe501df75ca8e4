"""The agent stack's upgrade under load: stop-first (no handover) against start-first + handover, interleaved.

    flock /tmp/mesh-bench.lock python3 -m benchmarks.stack_upgrade [--rounds 2]

Deploys compose/stack.yml and compose/demo-stack.yml on the 3-node lab of the tests exactly as
tests/test_stack_lab.py does (tests/stacklab.py: offline images, lab copies), then alternates two agent
stacks, each round a ``docker service update --force mesh_agent`` under the same bounded HTTP load over the
three nodes' port 8080 (6 threads, a new connection per request):

- ``stop-first``: the copy with ``order: stop-first`` and without MESH_HANDOVER (the stack before the
  handover);
- ``handover``: the copy of compose/stack.yml as it is (start-first, MESH_HANDOVER on the mesh-run volume).

Switching to stop-first is a ``docker stack deploy`` of that copy, switching to the handover is docs/deploy.md's
migration (``migrate``); both roll the agents, unmeasured.
Per round: failed requests, each node's outage (longest run of failures, first failure to next success), the
update's duration.  Writes ``benchmarks/results/stack-upgrade-<time>-<commit>.json``.  Needs root; the agents,
replicas and load share the machine's 2 cores: compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

import yaml

from tests import dockerlab
from tests.stacklab import AGENT_TAG, DEMO_PORT, REDIS_TAG, WEB_TAG, HttpLoad, StackLab, build_images
from tests.swarmlab import ALL_NODES, SwarmLab, wait_for_other_labs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def stop_first_copy(handover_copy: Path) -> Path:
    """The lab copy of the agent stack with order stop-first and no handover."""
    doc = yaml.safe_load(handover_copy.read_text())
    agent = doc["services"]["agent"]
    agent["deploy"]["update_config"]["order"] = "stop-first"
    agent.pop("environment", None)
    agent["volumes"] = [v for v in agent["volumes"] if not (isinstance(v, dict) and v.get("target") == "/run/mesh")]
    doc.pop("volumes", None)
    out = handover_copy.with_name("stack-stop-first.yml")
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def roll(st: StackLab, timeout: float = 180) -> None:
    before = set(st.sl.running_tasks("mesh_agent"))
    st.wait(lambda: st.agents_replaced(before), timeout, "a new mesh_agent task on every node")


def migrate(st: StackLab) -> None:
    """docs/deploy.md's move of running agents without the handover to the handover stack: one stop-first roll
    that adds MESH_HANDOVER and the volume (the running agents serve no handover socket, and a new agent
    cannot bind the tunnel port beside them), then start-first for the next updates (no roll)."""
    before = set(st.sl.running_tasks("mesh_agent"))
    st.docker("service", "update", "--detach", "--update-order", "stop-first",
              "--env-add", "MESH_HANDOVER=/run/mesh/agent.sock",
              "--mount-add", "type=volume,source=mesh_mesh-run,target=/run/mesh", "mesh_agent")  # fmt: skip
    st.wait(lambda: st.agents_replaced(before), 180, "a new mesh_agent task on every node")
    st.docker("service", "update", "--detach", "--update-order", "start-first", "mesh_agent")


def measured_update(st: StackLab) -> dict:
    targets = [(i, st.sl.nodes[i].addr, DEMO_PORT) for i in ALL_NODES]
    load = HttpLoad(targets, threads=6, max_requests=80000, max_seconds=180).start()
    try:
        load.wait_requests(200)
        before = set(st.sl.running_tasks("mesh_agent"))
        t0 = time.monotonic()
        st.docker("service", "update", "--detach", "--force", "mesh_agent")
        st.wait(lambda: st.agents_replaced(before), 180, "a new mesh_agent task on every node")
        took = time.monotonic() - t0
        st.wait_demo(6, timeout=60)
        mark = load.requests()
        load.wait_requests(mark + 300)
    finally:
        rep = load.stop()
    return {
        "requests": rep.ok + rep.failed,
        "failed": rep.failed,
        "errors": dict(rep.errors),
        "outage_s": {str(i): round(s, 2) for i, s in rep.outage.items()},
        "update_s": round(took, 1),
        "load_s": round(rep.seconds, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds per variant (default 2)")
    args = ap.parse_args()
    images = build_images()
    wait_for_other_labs(os.getpid())
    lab = dockerlab.shared_lab()
    sl = SwarmLab(lab)
    st = StackLab(sl, images)
    rounds = []
    try:
        sl.setup()
        st.load_images()
        handover_copy, demo_copy = st.write_copies()
        stop_copy = stop_first_copy(handover_copy)
        st.create_token()
        env = {"MESH_IMAGE": images.ids[AGENT_TAG]}
        st.deploy("mesh", handover_copy, env)
        st.wait(lambda: all(st.status(i) for i in ALL_NODES), 90, "every agent's admin API")
        st.deploy("demo", demo_copy, {"DEMO_WEB_IMAGE": images.ids[WEB_TAG], "DEMO_REDIS_IMAGE": images.ids[REDIS_TAG]})
        st.wait_demo(6, timeout=150)
        current = "handover"
        for k in range(args.rounds):
            for variant, copy in (("stop-first", stop_copy), ("handover", handover_copy)):
                if variant != current:
                    if variant == "handover":
                        migrate(st)  # docs/deploy.md: from an agent stack without the handover
                    else:
                        st.docker("stack", "deploy", "-c", str(copy), "mesh", env=env, timeout=180)
                        roll(st)
                    st.wait(lambda: all(st.status(i) for i in ALL_NODES), 60, "every agent's admin API")
                    st.wait_demo(6, timeout=60)
                    current = variant
                result = {"round": k, "variant": variant, **measured_update(st)}
                print(json.dumps(result), flush=True)
                rounds.append(result)
    finally:
        st.close()
        sl.close()
        lab.close()
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "meshagent", "mesh", "cluster", "discovery",
                            "compose"], capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()  # fmt: skip
    name = f"stack-upgrade-{datetime.now():%Y%m%d-%H%M%S}-{commit}{'-dirty' if dirty else ''}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps({
        "command": "flock /tmp/mesh-bench.lock python3 -m benchmarks.stack_upgrade " + f"--rounds {args.rounds}",
        "commit": commit, "dirty": bool(dirty), "rounds": rounds,
        "load": "6 threads, HTTP/1.0 GET / over the 3 nodes' port 8080, a new connection per request",
    }, indent=1) + "\n")  # fmt: skip
    print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
