"""Agent upgrades in the real multi-node lab (tests/swarmlab.py): every node's agent runs with
``--handover``; a new agent on a node takes the old one's published ports, tunnel (TCP and UDP), control
port (on the manager) and admin API over while the test process loads every node's published port.

3 swarm nodes (node 2 manager, nodes 1 and 3 workers), agents as host processes in each node's network
namespace; one 6-replica echo service spread over the nodes, so every node also tunnels to the others.
The load is bounded in count and time; run with -s to see the numbers.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.dockerlab import docker_lab  # noqa: F401  (fixture)
from tests.swarmlab import LOG_DIR, MANAGER, WORKERS, LoadLoop, SwarmLab, wait_for_other_labs

pytestmark = [pytest.mark.docker, pytest.mark.lab, pytest.mark.timeout(600)]

WEB, WEB_PORT = "hweb", 18090
ALL = (1, 2, 3)


def handover_path(sl: SwarmLab, i: int) -> str:
    return str(LOG_DIR / f"{sl.lab.name}-handover{i}.sock")


@pytest.fixture(scope="module")
def swarm(request):
    wait_for_other_labs(os.getpid())
    sl = SwarmLab(request.getfixturevalue("docker_lab"))
    try:
        sl.setup()
        for i in (MANAGER, *WORKERS):
            sl.start_agent(i, "--handover", handover_path(sl, i), "--grace", "5")
        sl.create_service(WEB, 6, {"mesh.publish": f"{WEB_PORT}:80", "mesh.locality": "off"},
                          extra=("--placement-pref", "spread=node.id"))  # fmt: skip
        sl.wait_converged(WEB, 6, timeout=90)
        yield sl
    finally:
        sl.close()


def _targets(sl: SwarmLab) -> list[tuple[int, str, int]]:
    return [(i, sl.nodes[i].addr, WEB_PORT) for i in ALL]


def test_agent_upgrades_under_load_from_every_node_fail_nothing(swarm: SwarmLab) -> None:
    """A worker's agent and the manager's agent are each replaced twice (``--handover``; the second time
    by an agent with ``--workers 2``) under load on all three nodes' published port: 0 failed requests;
    each old agent exits 0."""
    sl = swarm
    # every node serves all six replicas before the load starts
    sl.wait(lambda: all(len(sl.endpoints(i, WEB) or ()) == 6 for i in ALL), 60, "every agent routes 6 replicas")
    load = LoadLoop(_targets(sl), threads=6, max_requests=40000, max_seconds=120).start()
    steps = []
    try:
        # the second round moves both agents to --workers 2: the published port served by two worker
        # processes, the tunnel (which the other nodes dial) and control by the agent process
        for i, workers in ((WORKERS[0], 1), (MANAGER, 1), (WORKERS[0], 2), (MANAGER, 2)):
            before = load.requests()
            old = sl.agents[i]
            t0 = time.monotonic()
            sl.start_agent(i, "--handover", handover_path(sl, i), "--grace", "5", "--workers", str(workers))
            new = sl.agents[i]
            rc = old.proc.wait(30)
            assert rc == 0, old.log_tail()
            log = new.log_tail(20000)
            assert "handover: received" in log and "the old agent" in log, log
            sl.wait(lambda b=before: load.requests() > b + 200, 30, "load flowing after the upgrade")
            steps.append(f"node {i} (new agent with {workers} worker(s)): old agent exited "
                         f"{time.monotonic() - t0:.1f}s after the new one started")  # fmt: skip
    finally:
        res = load.stop()
    print(f"\nagent upgrades under load: {res}\n  " + "\n  ".join(steps))
    assert res.ok > 1000, res
    assert all(res.by_target[i] > 100 for i in ALL), res
    assert res.failed == 0, res
