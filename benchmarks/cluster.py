"""Cluster mode: convergence on every node after ``docker service scale``, and a cross-node hop vs a local one.

Runs the 3-node swarm lab of the tests (tests/swarmlab.py: node 2 manager, nodes 1 and 3 workers, one agent per
node, needs root) and writes ``benchmarks/results/cluster-<time>.json``.

Convergence, per ``docker service scale`` step and per node:
- ``command``: from just before the scale command to the moment that node's agent applied a table listing exactly
  the new set of running replicas (the agent's ``applied_at``, read from its status endpoint);
- ``swarm``: from the moment the last changed task reached its new state in swarm (the task's
  ``Status.Timestamp``, the manager's clock = this machine's) to that same apply: the mesh's own lag, without
  Swarm's scheduling and container start-up.
On a scale-down the agents drain the removed replicas as soon as the manager lists them with desired state
"shutdown", before their containers stop, so both numbers are then measured to that (draining) apply.
Polling the status every ~20 ms bounds nothing (the agent stamps the apply itself), but a step whose apply is
seen only after the next step started would be mis-attributed, so each step waits until every node converged.

Throughput: one replica on the manager (node 2), ``mesh.locality=prefer``.  From the test process, the same load
goes to node 2's published port (a local hop: agent -> replica) and to node 1's (cross-node: agent -> node 2's
tunnel -> replica), interleaved; plus the replica directly as the baseline.  Two shapes: small requests
(connection per request, busybox ``nc`` answering one line: connections/s) and a bulk download (64 MiB from
busybox ``httpd``: MB/s).  On this 2-core machine the agents, replicas and load share the CPUs: compare only
within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WEB, WEB_PORT = "bweb", 18090
ONE, ONE_PORT = "bone", 18091
BULK, BULK_PORT = "bbulk", 18092
BULK_MB = 64
BULK_CMD = ["sh", "-c", f"dd if=/dev/zero of=/www/big bs=1M count={BULK_MB} 2>/dev/null; exec httpd -f -p 80 -h /www"]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 4),
        "p99": round(percentile(values, 99), 4),
        "max": round(max(values), 4),
    }


def _task_times(sl: Any, service: str) -> dict[str, tuple[str, float]]:
    """task id -> (state, Status.Timestamp as unix seconds) of every task of ``service``."""
    from discovery.records import _parse_time

    ids = sl.manager.docker("service", "ps", "-q", service, check=False).split()
    if not ids:
        return {}
    return {t["ID"]: (t["Status"]["State"], _parse_time(t["Status"].get("Timestamp"))) for t in
            sl.inspect(ids)}  # fmt: skip


def convergence(sl: Any, rounds: int) -> dict[str, Any]:
    from tests.swarmlab import ALL_NODES

    samples_cmd: list[float] = []
    samples_swarm: list[float] = []
    steps = []
    replicas = 6
    before = _task_times(sl, WEB)
    for r in range(rounds):
        for target in (9, 6) if r % 2 == 0 else (3, 6):
            t_cmd = time.time()
            sl.manager.docker("service", "scale", "--detach", f"{WEB}={target}")
            tasks = sl.wait_converged(WEB, target, timeout=120)
            after = _task_times(sl, WEB)
            changed = [ts for tid, (state, ts) in after.items() if before.get(tid, (None,))[0] != state]
            t_swarm = max(changed) if changed else t_cmd
            row = {"from": replicas, "to": target, "nodes": {}}
            for i in ALL_NODES:
                applied = sl.status(i)["applied_at"]
                samples_cmd.append(applied - t_cmd)
                samples_swarm.append(max(0.0, applied - t_swarm))
                row["nodes"][i] = {"command": round(applied - t_cmd, 4), "swarm": round(applied - t_swarm, 4)}
            steps.append(row)
            print(f"scale {replicas}->{target}: " + ", ".join(
                f"node{i} {v['command']:.3f}s ({v['swarm']:.3f}s after swarm)" for i, v in row["nodes"].items()),
                flush=True)  # fmt: skip
            replicas, before = target, after
            assert len(tasks) == target
    return {"command": _summary(samples_cmd), "swarm": _summary(samples_swarm), "steps": steps}


def _small(addr: str, port: int, seconds: float, threads: int) -> dict[str, float]:
    from tests.swarmlab import LoadLoop

    res = LoadLoop([(0, addr, port)], threads=threads, max_requests=10**6, max_seconds=seconds).start().wait()
    return {"ok": res.ok, "failed": res.failed, "per_s": round(res.ok / res.seconds, 1)}


def _bulk(addr: str, port: int) -> float:
    """MB/s of one GET /big."""
    t0 = time.perf_counter()
    n = 0
    with socket.create_connection((addr, port), timeout=10) as s:
        s.settimeout(30)
        s.sendall(b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n")
        while chunk := s.recv(1 << 20):
            n += len(chunk)
    dt = time.perf_counter() - t0
    if n < BULK_MB * 1024 * 1024:
        raise RuntimeError(f"short download from {addr}:{port}: {n} bytes")
    return n / dt / 1e6


def throughput(sl: Any, repeats: int, seconds: float, threads: int) -> dict[str, Any]:
    tasks = sl.wait_converged(ONE, 1)
    [(task_id, (_, _))] = tasks.items()
    direct = sl.status(2)["local_tasks"][task_id]
    paths = {"local": (sl.nodes[2].addr, ONE_PORT), "cross_node": (sl.nodes[1].addr, ONE_PORT), "direct": (direct, 80)}
    small: dict[str, list[float]] = {k: [] for k in paths}
    failed = dict.fromkeys(paths, 0)
    for _ in range(repeats):
        for name, (addr, port) in paths.items():
            r = _small(addr, port, seconds, threads)
            small[name].append(r["per_s"])
            failed[name] += r["failed"]
    [(bulk_task, _)] = sl.wait_converged(BULK, 1).items()
    bulk_direct = sl.status(2)["local_tasks"][bulk_task]
    bpaths = {"local": (sl.nodes[2].addr, BULK_PORT), "cross_node": (sl.nodes[1].addr, BULK_PORT),
              "direct": (bulk_direct, 80)}  # fmt: skip
    bulk: dict[str, list[float]] = {k: [] for k in bpaths}
    for _ in range(repeats):
        for name, (addr, port) in bpaths.items():
            bulk[name].append(_bulk(addr, port))
    out = {
        "small_connections_per_s": {k: {"median": round(statistics.median(v), 1), "runs": v} for k, v in small.items()},
        "small_failed": failed,
        "bulk_MBps": {
            k: {"median": round(statistics.median(v), 1), "runs": [round(x, 1) for x in v]} for k, v in bulk.items()
        },
    }
    for shape, key in (("small", "small_connections_per_s"), ("bulk", "bulk_MBps")):
        m = {k: v["median"] for k, v in out[key].items()}
        print(f"{shape}: " + ", ".join(f"{k} {v}" for k, v in m.items())
              + f"; cross-node/local = {m['cross_node'] / m['local']:.2f}", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="scale rounds (2 steps each)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved throughput repeats")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per small-request run")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.dockerlab import DockerLab
    from tests.swarmlab import MANAGER, WORKERS, SwarmLab

    lab = DockerLab()
    sl = SwarmLab(lab)
    result: dict[str, Any] = {"benchmark": "cluster", "started": datetime.now().isoformat(timespec="seconds")}
    try:
        sl.setup()
        for i in (MANAGER, *WORKERS):
            sl.start_agent(i)
        sl.create_service(WEB, 6, {"mesh.publish": f"{WEB_PORT}:80", "mesh.locality": "off"})
        sl.create_service(ONE, 1, {"mesh.publish": f"{ONE_PORT}:80"}, extra=("--constraint", "node.role==manager"))
        sl.create_service(BULK, 1, {"mesh.publish": f"{BULK_PORT}:80"}, cmd=BULK_CMD,
                          extra=("--constraint", "node.role==manager"))  # fmt: skip
        sl.wait_converged(WEB, 6, timeout=120)
        result["convergence_seconds"] = convergence(sl, args.rounds)
        result["throughput"] = throughput(sl, args.repeats, args.seconds, args.threads)
    finally:
        sl.close()
        lab.close()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, check=False)
        result["commit"] = commit.stdout.decode().strip()
    except OSError:
        pass
    out = args.out or RESULTS / f"cluster-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
