"""Cluster mode end to end in the real multi-node lab (tests/swarmlab.py).

3 swarm nodes (node 2 manager, nodes 1 and 3 workers), one agent per node, the
test process on 198.18.200.1 (not a node).  Every load loop is bounded in count
and time; failures are counted and printed (run with -s to see the numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.dockerlab import docker_lab  # noqa: F401  (fixture)
from tests.swarmlab import (
    CLIENT_ADDR,
    MANAGER,
    TUNNEL_PORT,
    WORKERS,
    LoadLoop,
    SwarmLab,
    parse_answer,
    wait_for_other_labs,
)
from tests.swarmlab import request as ask

pytestmark = [pytest.mark.docker, pytest.mark.lab, pytest.mark.timeout(600)]

WEB, WEB_PORT = "cweb", 18080
SPILL, SPILL_PORT = "cspill", 18081
ALL = (1, 2, 3)


@pytest.fixture(scope="module")
def swarm(request):
    # another process's lab uses the same 198.18.200.0/24: wait before ours adds its bridge
    wait_for_other_labs(os.getpid())
    sl = SwarmLab(request.getfixturevalue("docker_lab"))
    try:
        sl.setup()
        # Swarm notices a dead node after a few missed heartbeats (5 s each by default)
        sl.manager.docker("swarm", "update", "--dispatcher-heartbeat", "1s")
        for i in (MANAGER, *WORKERS):
            sl.start_agent(i)
        sl.create_service(WEB, 6, {"mesh.publish": f"{WEB_PORT}:80", "mesh.proxy-protocol": "v1",
                                   "mesh.locality": "off"}, extra=("--placement-pref", "spread=node.id"))  # fmt: skip
        sl.create_service(SPILL, 1, {"mesh.publish": f"{SPILL_PORT}:80"}, extra=("--constraint", "node.role==manager"))
        sl.wait_converged(WEB, 6, timeout=90)
        sl.wait_converged(SPILL, 1, timeout=60)
        yield sl
    finally:
        sl.close()
        sl.manager.docker("swarm", "update", "--dispatcher-heartbeat", "5s", check=False)


def _targets(sl: SwarmLab, nodes=ALL, port: int = WEB_PORT) -> list[tuple[int, str, int]]:
    return [(i, sl.nodes[i].addr, port) for i in nodes]


def _answers(sl: SwarmLab, i: int, n: int, port: int = WEB_PORT) -> list[tuple[str, list[str]]]:
    return [parse_answer(ask(sl.nodes[i].addr, port)) for _ in range(n)]


def _set_label(sl: SwarmLab, service: str, key: str, value: str, want) -> None:
    sl.manager.docker("service", "update", "--detach", "--label-add", f"{key}={value}", service)

    def applied() -> bool:
        for i in ALL:
            st = sl.status(i)
            svc = [s for s in (st or {}).get("table", {}).get("services", []) if s["name"] == service]
            if not svc or not want(svc[0]["options"]):
                return False
        return True

    sl.wait(applied, 30, f"{key}={value} on every agent")


def test_every_node_reaches_all_six_replicas_and_they_see_the_client(swarm: SwarmLab) -> None:
    tasks = swarm.wait_converged(WEB, 6)
    hostnames = {h for _, h in tasks.values()}
    assert len({n for n, _ in tasks.values()}) == 3, f"replicas not spread over 3 nodes: {tasks}"
    for i in ALL:
        answers = _answers(swarm, i, 60)
        seen = {h for h, _ in answers}
        assert seen == hostnames, f"node {i} reached {sorted(seen)}, replicas are {sorted(hostnames)}"
        for host, proxy in answers:
            # PROXY TCP4 <client> <published address> <client port> <published port>
            assert proxy[:4] == ["PROXY", "TCP4", CLIENT_ADDR, swarm.nodes[i].addr], (host, proxy)
            assert proxy[5] == str(WEB_PORT)
    # the cross-node share went through the tunnels of the other agents
    for i in ALL:
        assert swarm.status(i)["tunnel"]["forwarded"] > 0
    # every agent's admin API counts the connections it accepted on the published port
    for i in ALL:
        accepted = [
            line
            for line in swarm.metrics(i).splitlines()
            if line.startswith("mesh_connections_accepted_total{") and f'port="{WEB_PORT}"' in line
        ]
        assert len(accepted) == 1 and float(accepted[0].rsplit(" ", 1)[1]) >= 60, accepted


def test_locality_prefer_stays_local_and_spills_when_no_local_replica(swarm: SwarmLab) -> None:
    tasks = swarm.wait_converged(WEB, 6)
    by_node: dict[str, set[str]] = {}
    for node, host in tasks.values():
        by_node.setdefault(node, set()).add(host)
    _set_label(swarm, WEB, "mesh.locality", "prefer", lambda o: o["locality"] == "prefer")
    try:
        for i in ALL:
            seen = {h for h, _ in _answers(swarm, i, 20)}
            assert seen == by_node[swarm.node_ids[i]], f"node {i} left its node with locality=prefer"
    finally:
        _set_label(swarm, WEB, "mesh.locality", "off", lambda o: o["locality"] == "off")
    # cspill has one replica, on the manager: the workers have no local one and spill to it
    [(node, host)] = swarm.wait_converged(SPILL, 1).values()
    assert node == swarm.node_ids[MANAGER]
    for i in ALL:
        answers = _answers(swarm, i, 5, SPILL_PORT)
        assert answers == [(host, ["hello"])] * 5


def test_scale_and_update_force_under_load_on_every_node(swarm: SwarmLab) -> None:
    swarm.wait_converged(WEB, 6)
    load = LoadLoop(_targets(swarm), threads=6, max_requests=60000, max_seconds=150).start()
    steps = []
    try:
        for action, replicas in (("scale", 9), ("scale", 4), ("update", 4), ("scale", 6)):
            t0 = time.monotonic()
            if action == "scale":
                swarm.manager.docker("service", "scale", "--detach", f"{WEB}={replicas}")
            else:
                swarm.manager.docker("service", "update", "--detach", "--force", WEB)
                swarm.wait(lambda: _update_state(swarm, WEB) == "completed", 90, "the rolling update")
            swarm.wait_converged(WEB, replicas, timeout=90)
            steps.append(f"{action} {replicas}: {time.monotonic() - t0:.1f}s, {load.requests()} requests so far")
    finally:
        res = load.stop()
    refused = {i: (swarm.status(i) or {}).get("tunnel", {}).get("refused") for i in ALL}
    print(f"\nscale/update under load: {res}\n  " + "\n  ".join(steps) + f"\n  tunnel refusals by node: {refused}")
    assert res.ok > 500, res
    assert all(res.by_target[i] > 100 for i in ALL), res
    # target 0; a connection that races a SIGKILL of its replica may still fail
    assert res.failed <= max(3, res.ok // 1000), res


def _update_state(sl: SwarmLab, service: str) -> str:
    return sl.manager.docker("service", "inspect", "--format", "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
                             service, check=False)  # fmt: skip


def test_tunnel_refuses_strangers_bad_headers_and_foreign_tasks(swarm: SwarmLab) -> None:
    tasks = swarm.wait_converged(WEB, 6)
    node1 = swarm.node_ids[1]
    local1 = next(t for t, (n, _) in tasks.items() if n == node1)
    foreign = next(t for t, (n, _) in tasks.items() if n != node1)
    before = swarm.status(1)["tunnel"]
    # targets in the one format "<task id>:<target port>" (mesh.proxy.preamble.endpoint_target)
    # 1. from the test process (198.18.200.1: not a swarm node) a valid header is refused at accept
    got = _tunnel_probe_here(swarm, swarm.nodes[1].addr, f"{local1}:80")
    assert got == "reset", got
    # 2.-6. from node 3 (a cluster node): malformed header, a task that is not on node 1, a local one, a local
    # one named by its bare task id (not the target format: refused as unknown), and a local one with a header
    # that is not sealed with the cluster token: what a container on node 3 could send, with a forged client
    probes = {"garbage": "", "foreign": f"{foreign}:80", "local": f"{local1}:80", "bare": local1,
              "unsealed": f"{local1}:80"}  # fmt: skip
    out = _tunnel_probes_from(swarm, 3, swarm.nodes[1].addr, probes)
    assert out["garbage"] == "reset", out
    assert out["foreign"] == "reset", out
    assert out["bare"] == "reset", out
    assert out["unsealed"] == "reset", out
    host, proxy = parse_answer(out["local"])
    assert host == tasks[local1][1] and proxy[:3] == ["PROXY", "TCP4", "203.0.113.9"], out
    after = swarm.status(1)["tunnel"]
    refused = {k: after["refused"].get(k, 0) - before["refused"].get(k, 0) for k in after["refused"]}
    assert {k: v for k, v in refused.items() if v} == {"peer": 1, "signature": 1, "unknown_target": 2, "auth": 1}
    assert after["forwarded"] > before["forwarded"]
    # the agent keeps serving
    assert len(_answers(swarm, 1, 10)) == 10


def _tunnel_probe_here(sl: SwarmLab, addr: str, target: str) -> str:
    argv = [sys.executable, "-c", PROBE, addr, str(TUNNEL_PORT), json.dumps({"x": target}), str(sl.token_file)]
    return _probe_script_result(argv)["x"]


def _tunnel_probes_from(sl: SwarmLab, i: int, addr: str, probes: dict[str, str]) -> dict[str, str]:
    """Probes from node i's network namespace: the node's address, as traffic from any container on that node
    arrives (masqueraded).  Headers are sealed with the cluster token, except probes named "unsealed*"."""
    cmd = ["nsenter", f"--net=/run/netns/{sl.nodes[i].netns}", "--",
           sys.executable, "-c", PROBE, addr, str(TUNNEL_PORT), json.dumps(probes), str(sl.token_file)]  # fmt: skip
    return _probe_script_result(cmd)


def _probe_script_result(cmd: list[str]) -> dict[str, str]:
    from tests.swarmlab import ROOT

    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=60, check=False,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return json.loads(res.stdout)


# Runs in a node's netns (or here): for each probe, connect to the tunnel, send a header
# naming the target (or garbage when the target is ""), and report the answer or "reset".
PROBE = """
import json, socket, sys
from cluster.tunnel import TunnelAuth, tunnel_header
addr, port, probes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
auth = TunnelAuth(open(sys.argv[4]).read().strip()) if len(sys.argv) > 4 else None
out = {}
for name, target in probes.items():
    s = None
    try:
        # a refusal at accept may already reset the connect itself
        s = socket.create_connection((addr, port), timeout=10)
        s.settimeout(10)
        if target:
            sealed = auth if not name.startswith("unsealed") else None
            s.sendall(tunnel_header(("203.0.113.9", 40000), (addr, 18080), target, auth=sealed) + b"hi\\n")
        else:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        out[name] = data.decode().strip() or "closed"
    except ConnectionResetError:
        out[name] = "reset"
    finally:
        if s is not None:
            s.close()
print(json.dumps(out))
"""


def test_workers_keep_their_table_while_the_manager_agent_is_down(swarm: SwarmLab) -> None:
    swarm.wait_converged(WEB, 6)
    before = {i: swarm.endpoints(i, WEB) for i in WORKERS}
    swarm.stop_agent(MANAGER)
    try:
        swarm.wait(
            lambda: all(swarm.status(i)["control_client"]["failures"] > 0 for i in WORKERS),
            30, "the workers to notice the manager agent is gone",
        )  # fmt: skip
        swarm.manager.docker("service", "scale", "--detach", f"{WEB}=8")
        swarm.wait(lambda: len(swarm.running_tasks(WEB)) == 8, 60, "swarm to run 8 replicas")
        # no manager agent answers: the workers serve their last table, unchanged
        res = LoadLoop(_targets(swarm, WORKERS), threads=4, max_requests=400, max_seconds=30).start().wait()
        print(f"\nmanager agent down, workers only: {res}")
        assert res.failed == 0 and res.ok > 50, res
        for i in WORKERS:
            assert swarm.endpoints(i, WEB) == before[i]
        # a local replica that dies is drained by its own node at once, with no manager agent to tell it
        node1_ids = {e["id"] for e in before[1] if e["via"] is None}
        victim, (_, cid) = next((t, v) for t, v in swarm.running_tasks(WEB).items() if t in node1_ids)
        swarm.nodes[1].docker("kill", cid)
        drained = swarm.wait(
            lambda: victim not in {e["id"] for e in swarm.endpoints(1, WEB) or () if e["state"] == "running"},
            5, "node 1 to drain its killed replica",
        )  # fmt: skip
        res = LoadLoop(_targets(swarm, (1,)), threads=2, max_requests=200, max_seconds=20).start().wait()
        print(f"node 1 drained its killed replica {drained:.2f}s after docker kill, with no manager agent; then {res}")
        assert res.failed == 0 and res.ok == 200, res
    finally:
        swarm.start_agent(MANAGER)

    def caught_up() -> bool:
        want = sorted(swarm.running_tasks(WEB))
        return len(want) >= 7 and all(
            sorted(e["id"] for e in swarm.endpoints(i, WEB) or () if e["state"] == "running") == want for i in WORKERS
        )

    # caught up = the workers' tables list the tasks swarm runs now (its replacement of the killed
    # replica may still be in its 5 s restart delay)
    took = swarm.wait(caught_up, 30, "the workers to catch up")
    print(f"workers caught up {took:.2f}s after the manager agent answered again")
    swarm.manager.docker("service", "scale", "--detach", f"{WEB}=6")
    swarm.wait_converged(WEB, 6)


def test_killing_a_nodes_dockerd_keeps_the_others_serving(swarm: SwarmLab) -> None:
    tasks = swarm.wait_converged(WEB, 6)
    dead = 3
    dead_id = swarm.node_ids[dead]
    assert any(n == dead_id for n, _ in tasks.values())
    load = LoadLoop(_targets(swarm, (1, 2)), threads=4, max_requests=50000, max_seconds=90).start()
    took = None
    try:
        swarm.kill_dockerd(dead)  # its containers and its agent keep running, as after a crash
        took = swarm.wait(
            lambda: all(not any(e["node"] == dead_id for e in swarm.endpoints(i, WEB) or ()) for i in (1, 2)),
            60, "node 3's replicas to leave the choice of nodes 1 and 2",
        )  # fmt: skip
        # swarm reschedules the lost replicas on the live nodes; the live agents follow
        swarm.wait(
            lambda: sorted(e["id"] for e in swarm.endpoints(1, WEB) or () if e["state"] == "running")
            == sorted(t for t, (n, _) in swarm.running_tasks(WEB).items() if n != dead_id)
            and len(swarm.endpoints(1, WEB) or ()) == 6,
            60, "6 replicas on nodes 1 and 2",
        )  # fmt: skip
    finally:
        res = load.stop()
        refused = {i: (swarm.status(i) or {}).get("tunnel", {}).get("refused") for i in ALL}
        print(f"\nnode 3 dockerd killed: its replicas left the choice after {took}s; load on nodes 1, 2: {res}; "
              f"tunnel refusals by node: {refused}")  # fmt: skip
        # bring node 3 back for whoever uses the lab next
        swarm.stop_agent(dead)
        swarm.revive(dead)
    # A request already on its way to a replica of node 3 when its dockerd (and the replicas) died can
    # fail, with or without a mesh: at most a couple of the ~10,000 in this window.  Every later one must
    # succeed, which the answers below check.  (Seen: 0 in most runs, 1 in some.)
    assert res.failed <= 2, res
    assert res.by_target[1] > 100 and res.by_target[2] > 100, res
    for i in (1, 2):
        assert len(_answers(swarm, i, 10)) == 10
