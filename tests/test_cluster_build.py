"""Cluster mode, pure parts: the manager's cluster state from swarm records, node parsing,
the agent's local addresses and tunnel targets.  Table-driven, exact assertions."""

from __future__ import annotations

import pytest

from cluster.state import ClusterState, NodeInfo, localize
from cluster.tunnel import LocalTarget
from discovery.cluster import build_cluster_state, node_infos
from discovery.localtasks import task_address
from discovery.records import ContainerRecord, NetworkAddress, NetworkRecord, ServiceRecord, TaskRecord, frozen_labels
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from meshagent.cluster import _local_targets, _manager_addresses

WEB = ServiceRecord(
    id="svcweb", name="web", labels=frozen_labels({"mesh.publish": "8080:80,8443:443"}), replicas=4, created=1.0
)
DB = ServiceRecord(
    id="svcdb", name="db", labels=frozen_labels({"mesh.publish": "5432", "mesh.proxy-protocol": "v1"}), created=2.0
)
PLAIN = ServiceRecord(id="svcplain", name="plain", labels=frozen_labels({"other": "x"}), created=3.0)


def T(tid: str, svc: str, node: str, state: str = "running", desired: str = "running", addrs=()) -> TaskRecord:
    return TaskRecord(
        id=tid, service_id=svc, node_id=node, state=state, desired_state=desired, container_id=f"c-{tid}",
        addresses=tuple(addrs),
    )  # fmt: skip


NODES = (NodeInfo("n1", "10.0.0.1", tunnel=7481), NodeInfo("n2", "10.0.0.2", tunnel=7481))


def test_cluster_state_routes_running_tasks_of_every_node() -> None:
    tasks = [
        T("t1", "svcweb", "n1", addrs=[("meshnet", "198.19.1.5")]),
        T("t2", "svcweb", "n2"),
        T("t3", "svcweb", "n2", state="starting"),  # not running yet: left out
        T("t4", "svcweb", "n1", desired="shutdown"),  # being replaced: draining
        T("t5", "svcweb", "n2", state="shutdown", desired="shutdown"),  # gone
        T("d1", "svcdb", "n2"),
        T("p1", "svcplain", "n1"),
    ]
    state, problems = build_cluster_state([WEB, DB, PLAIN], tasks, NODES, killed={"c-t2"}, version=7)
    assert problems == ()
    assert state.version == 7
    assert state.nodes == NODES
    db, web = state.table.services
    assert web.name == "web"
    assert [r.port for r in web.routes] == [8080, 8443]
    assert web.routes[0].endpoints == (
        Endpoint("t1", "198.19.1.5", 80, node="n1"),
        Endpoint("t2", "0.0.0.0", 80, node="n2", state="draining"),
        Endpoint("t4", "0.0.0.0", 80, node="n1", state="draining"),
    )
    assert [e.port for e in web.routes[1].endpoints] == [443, 443, 443]
    assert (db.name, db.options.proxy_protocol) == ("db", "v1")
    assert db.routes[0].endpoints == (Endpoint("d1", "0.0.0.0", 5432, node="n2"),)


def test_cluster_state_is_equal_across_managers_and_reports_bad_labels() -> None:
    bad = ServiceRecord(id="svcbad", name="bad", labels=frozen_labels({"mesh.publish": "99999"}))
    a, pa = build_cluster_state([WEB, bad], [T("t1", "svcweb", "n1")], NODES, version=1)
    b, pb = build_cluster_state([bad, WEB], [T("t1", "svcweb", "n1")], reversed(NODES), version=9)
    assert a.digest == b.digest and a.version != b.version
    assert [p.subject for p in pa] == ["service bad"] and "mesh.publish" in pa[0].message
    assert pa == pb


def _node(nid: str, addr: str, state: str = "ready", avail: str = "active", mgr: str | None = None) -> dict:
    raw = {
        "ID": nid,
        "Description": {"Hostname": f"host-{nid}"},
        "Spec": {"Role": "manager" if mgr else "worker", "Availability": avail},
        "Status": {"State": state, "Addr": addr},
    }
    if mgr:
        raw["ManagerStatus"] = {"Leader": True, "Reachability": "reachable", "Addr": mgr}
    return raw


NODE_CASES = [
    ("worker as reported", [_node("n2", "10.0.0.2")], 7481, [NodeInfo("n2", "10.0.0.2", tunnel=7481)]),
    (
        "a manager reporting 0.0.0.0 uses its ManagerStatus address",
        [_node("n1", "0.0.0.0", mgr="10.0.0.1:2377")],
        7481,
        [NodeInfo("n1", "10.0.0.1", tunnel=7481)],
    ),
    ("a node without any address is left out", [_node("n3", "")], 7481, []),
    (
        "down and drained stay listed",
        [_node("n4", "10.0.0.4", "down", "drain")],
        9000,
        [NodeInfo("n4", "10.0.0.4", "down", "drain", 9000)],
    ),
    (
        "words of a newer engine are read safely",
        [_node("n5", "10.0.0.5", "rebooting", "")],
        None,
        [NodeInfo("n5", "10.0.0.5", "unknown", "active", None)],
    ),
    ("a node without ID is skipped", [{"Status": {"Addr": "10.0.0.6"}}], 7481, []),
]


@pytest.mark.parametrize(("raw", "port", "expected"), [c[1:] for c in NODE_CASES], ids=[c[0] for c in NODE_CASES])
def test_node_infos(raw: list[dict], port: int | None, expected: list[NodeInfo]) -> None:
    assert list(node_infos(raw, port)) == expected


def _container(cid: str, nets: dict[str, str], state: str = "running") -> ContainerRecord:
    return ContainerRecord(
        id=cid,
        name=cid,
        labels=frozen_labels({"com.docker.swarm.task.id": f"task-{cid}"}),
        state=state,
        networks=tuple(NetworkAddress(n, f"id-{n}", ip) for n, ip in sorted(nets.items())),
    )


GW = NetworkRecord(id="gw", name="docker_gwbridge", containers=(("c1", "172.18.0.3"),))

ADDRESS_CASES = [
    ("overlay task: its docker_gwbridge address", _container("c1", {"meshnet": "198.19.1.5"}), GW, "172.18.0.3"),
    ("task without a network: its bridge address", _container("c2", {"bridge": "172.17.0.4"}), GW, "172.17.0.4"),
    ("overlay task not yet on gwbridge: no address", _container("c3", {"meshnet": "198.19.1.6"}), GW, None),
    ("no gwbridge network at all", _container("c4", {"bridge": "172.17.0.9"}), None, "172.17.0.9"),
]


@pytest.mark.parametrize(("c", "gw", "expected"), [c[1:] for c in ADDRESS_CASES], ids=[c[0] for c in ADDRESS_CASES])
def test_task_address(c: ContainerRecord, gw: NetworkRecord | None, expected: str | None) -> None:
    assert task_address(c, gw) == expected


def test_local_targets_are_local_endpoints_by_task_and_target_port() -> None:
    state = ClusterState(
        table=RoutingTable(
            version=3,
            services=(
                Service("db", (Route(5432, (Endpoint("d1", "x", 5432, node="n1"),)),), ServiceOptions(proxy_protocol="v2")),
                Service(
                    "web",
                    (
                        Route(8080, (Endpoint("w1", "x", 80, node="n1"), Endpoint("w2", "x", 80, node="n2"),
                                     Endpoint("w3", "x", 80, node="n1"))),
                        Route(8443, (Endpoint("w1", "x", 443, node="n1"),)),
                    ),
                ),
            ),
        ),
        nodes=NODES,
    )  # fmt: skip
    table = localize(state, "n1", {"d1": "172.17.0.2", "w1": "172.17.0.3", "w3": "172.17.0.4"}, draining={"w3"})
    # The one target format "<task id>:<target port>" (a bare task id is not a target).
    assert _local_targets(table) == {
        "d1:5432": LocalTarget("172.17.0.2", 5432, "v2"),
        "w1:80": LocalTarget("172.17.0.3", 80, None),
        "w1:443": LocalTarget("172.17.0.3", 443, None),
        "w3:80": LocalTarget("172.17.0.4", 80, None),
    }  # w2 is remote: not a tunnel target here; w3 is draining but still alive: it is


def test_manager_addresses_from_info() -> None:
    info = {
        "Swarm": {
            "RemoteManagers": [
                {"NodeID": "a", "Addr": "10.0.0.2:2377"},
                {"NodeID": "b", "Addr": "10.0.0.1:2377"},
                {"NodeID": "c", "Addr": "[fd00::3]:2377"},
                {"NodeID": "d", "Addr": "garbage"},
                {"NodeID": "e"},
            ]
        }
    }
    assert _manager_addresses(info, 7480) == [("10.0.0.1", 7480), ("10.0.0.2", 7480), ("fd00::3", 7480)]
    assert _manager_addresses({}, 7480) == []


@pytest.mark.parametrize(("value", "locality"), [("off", "off"), ("Prefer", "prefer"), ("nearest", None)])
def test_mesh_locality_label(value: str, locality: str | None) -> None:
    svc = ServiceRecord(
        id="s", name="web", labels=frozen_labels({"mesh.publish": "8080:80", "mesh.locality": value}), created=1.0
    )
    state, problems = build_cluster_state([svc], [T("t1", "s", "n1")], NODES)
    if locality is not None:
        assert state.table.services[0].options.locality == locality
        assert problems == ()
    else:  # a bad value skips the service, like every other mesh.* label
        assert state.table.services == ()
        assert [(p.subject, p.label, p.skipped) for p in problems] == [("service web", "mesh.locality", True)]
        assert "expected prefer or off" in problems[0].message


def _event(action: str, task: str | None = "t1", **attrs: str) -> dict:
    a = dict(attrs)
    if task:
        a["com.docker.swarm.task.id"] = task
    return {"Type": "container", "Action": action, "Actor": {"ID": "c1", "Attributes": a}}


LOCAL_EVENT_CASES = [
    # (name, events, draining after, on_change calls)
    ("kill 15 drains at once", [_event("kill", signal="15")], {"t1"}, 1),
    ("die drains at once", [_event("die", exitCode="137")], {"t1"}, 1),
    ("a reload signal does not drain", [_event("kill", signal="SIGHUP")], set(), 0),
    ("a container that is not a task is ignored", [_event("kill", task=None, signal="9")], set(), 0),
    ("an unknown task is not drained (not routed here)", [_event("kill", task="t9", signal="9")], set(), 0),
    ("kill, then start again: routed again", [_event("kill", signal="15"), _event("start")], set(), 2),
    ("kill then die: one change", [_event("kill", signal="15"), _event("die")], {"t1"}, 1),
]


@pytest.mark.parametrize(
    ("events", "draining", "changes"), [c[1:] for c in LOCAL_EVENT_CASES], ids=[c[0] for c in LOCAL_EVENT_CASES]
)
def test_local_tasks_drain_on_fatal_events(events: list[dict], draining: set[str], changes: int) -> None:
    from discovery.localtasks import LocalTasks

    calls = []
    lt = LocalTasks(None, lambda: calls.append(1))  # type: ignore[arg-type]
    lt.addresses = {"t1": "172.17.0.2"}
    for e in events:
        lt._on_event(e)
    assert lt.draining == draining
    assert len(calls) == changes


class _FakeListingEngine:
    """Just the two listing calls LocalTasks makes, answering from memory."""

    def __init__(self, containers: list[dict]) -> None:
        self.containers_json = containers

    async def containers(self, filters=None) -> list[dict]:
        return self.containers_json

    async def network(self, name: str) -> dict:
        from discovery.engine import NotFound

        raise NotFound(404, f"network {name} not found")


async def test_local_tasks_first_listing_counts_as_a_change_even_when_empty() -> None:
    # a node without local tasks must still apply the cluster state: the agent waits for this call
    from discovery.localtasks import LocalTasks

    calls = []
    lt = LocalTasks(_FakeListingEngine([]), lambda: calls.append(1))  # type: ignore[arg-type]
    await lt._list()
    await lt._list()
    assert (calls, lt.addresses, lt.ready.is_set()) == ([1], {}, True)


async def test_local_tasks_listing_keeps_running_reachable_tasks() -> None:
    from discovery.localtasks import LocalTasks

    def c(cid: str, state: str, status: str, ip: str) -> dict:
        return {
            "Id": cid, "Names": [f"/web.{cid}"], "State": state, "Status": status,
            "Labels": {"com.docker.swarm.task.id": f"task-{cid}"},
            "NetworkSettings": {"Networks": {"bridge": {"IPAddress": ip}}},
        }  # fmt: skip

    engine = _FakeListingEngine([
        c("a", "running", "Up 3 seconds", "172.17.0.2"),
        c("b", "running", "Up 9 seconds (unhealthy)", "172.17.0.3"),
        c("d", "exited", "Exited (137)", ""),
        c("e", "running", "Up 1 second", ""),
    ])  # fmt: skip
    lt = LocalTasks(engine, lambda: None)  # type: ignore[arg-type]
    lt.addresses, lt.draining = {"task-a": "172.17.0.2", "task-d": "172.17.0.9"}, {"task-a", "task-d"}
    await lt._list()
    assert lt.addresses == {"task-a": "172.17.0.2"}
    assert lt.draining == {"task-a"}  # still running: stays draining; d is gone
    assert set(lt.gone) == {"task-d"}
