"""The cluster dashboard in the real multi-node lab (tests/swarmlab.py): one page on the manager shows every
node's replicas and their traffic (meshagent/clusterview.py asks the other agents through their tunnels).

Load is bounded in count and time; traffic goes only to the lab's namespaces.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from tests.dockerlab import docker_lab  # noqa: F401  (fixture)
from tests.swarmlab import ADMIN_PORT, MANAGER, WORKERS, LoadLoop, SwarmLab, wait_for_other_labs
from tests.test_dashboard import browser  # noqa: F401  (fixture)

pytestmark = [pytest.mark.docker, pytest.mark.lab, pytest.mark.timeout(600)]

WEB, WEB_PORT = "dashweb", 18090
ALL = (1, 2, 3)


@pytest.fixture(scope="module")
def swarm(request):
    wait_for_other_labs(os.getpid())
    sl = SwarmLab(request.getfixturevalue("docker_lab"))
    try:
        sl.setup()
        for i in (MANAGER, *WORKERS):
            sl.start_agent(i)
        sl.create_service(WEB, 6, {"mesh.publish": f"{WEB_PORT}:80", "mesh.locality": "off"},
                          extra=("--placement-pref", "spread=node.id"))  # fmt: skip
        sl.wait_converged(WEB, 6, timeout=90)
        yield sl
    finally:
        sl.close()


def _view(sl: SwarmLab, i: int = MANAGER) -> dict:
    with urllib.request.urlopen(f"http://{sl.nodes[i].addr}:{ADMIN_PORT}/v1/dashboard", timeout=5) as r:
        return json.loads(r.read())


def _web(view: dict) -> dict:
    (svc,) = [s for s in view["services"] if s["name"] == WEB]
    return svc


def test_the_managers_page_shows_every_nodes_replicas_and_traffic(swarm: SwarmLab, browser, tmp_path) -> None:  # noqa: F811
    tasks = swarm.wait_converged(WEB, 6)
    node_ids = {swarm.status(i)["node"]: i for i in ALL}
    view = _view(swarm)
    assert view["scope"] == "cluster"
    assert {n["id"] for n in view["nodes"]} == set(node_ids)
    assert all(n["reachable"] for n in view["nodes"]), view["nodes"]
    web = _web(view)
    # every replica once, in its own node's column, as counted by that node (not through a tunnel)
    assert sorted((r["id"], r["node"]) for r in web["replicas"]) == sorted((t, n) for t, (n, _) in tasks.items())
    assert all(r["via"] is None and r["state"] == "running" for r in web["replicas"])

    before = {r["id"]: r["connections"] for r in web["replicas"]}
    accepted_before = web["accepted"]
    load = LoadLoop([(i, swarm.nodes[i].addr, WEB_PORT) for i in ALL], threads=6, max_requests=600, max_seconds=30)
    res = load.start().wait()
    print(f"\ndashboard lab: {res}")
    assert res.ok >= 300 and res.failed == 0, res

    def counted() -> bool:
        w = _web(_view(swarm))
        return w["accepted"] - accepted_before == res.ok and w["active"] == 0

    swarm.wait(counted, 10, "the manager's view counting the load")
    web = _web(_view(swarm))
    gained = {r["id"]: r["connections"] - before.get(r["id"], 0) for r in web["replicas"]}
    # locality off: every node's clients reached every replica; each connection counted once, by the
    # replica's own node
    assert all(n > 0 for n in gained.values()), gained
    assert sum(gained.values()) == res.ok, (gained, res)
    assert {node: ing["accepted"] > 0 for node, ing in web["ingress"].items()} == dict.fromkeys(node_ids, True)

    # the page on the manager: three node columns, six replicas, no console error
    browser.set_window_size(1280, 720)
    browser.get(f"http://{swarm.nodes[MANAGER].addr}:{ADMIN_PORT}/ui/")
    deadline = time.monotonic() + 10
    shown = []
    while time.monotonic() < deadline:
        shown = browser.execute_script(
            "return [...document.querySelectorAll('[data-replica]')].map(e => e.dataset.replica + ' ' + e.dataset.node)"
        )
        if len(shown) == 6:
            break
        time.sleep(0.1)
    assert sorted(shown) == sorted(f"{t} {n}" for t, (n, _) in tasks.items())
    heads = browser.execute_script("return [...document.querySelectorAll('.row.head [data-node]')].map(e => e.dataset.node)")
    assert sorted(heads) == sorted(node_ids)
    browser.save_screenshot(str(tmp_path / "cluster-dashboard.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
