"""The pure core: API dicts -> records -> build_table.  Table-driven, exact assertions.

The dicts below are trimmed copies of real Engine API 1.41 responses (dockerd 20.10,
recorded in the swarm lab); the builder is also exercised against a real engine in
test_discovery_engine.py.
"""

from __future__ import annotations

import pytest

from discovery.builder import Problem, build_table
from discovery.records import (
    ContainerRecord,
    NetworkAddress,
    NetworkRecord,
    NodeRecord,
    RecordError,
    ServiceRecord,
    TaskRecord,
    frozen_labels,
)
from mesh.routing import Endpoint, HealthCheck, Route, RoutingTable, Service, ServiceOptions

# -- records from real API shapes -------------------------------------------------------

SUMMARY = {
    "Id": "ca61355750516c1e9b554d14315c4645954a319b8aeb9518781abbea7667e773",
    "Names": ["/web.1.s4wbep76ubrdx6m0uq0qtj1pb"],
    "Created": 1795800849,
    "Labels": {
        "com.docker.swarm.node.id": "zn8ll0hnnw01wpun7y5rji8cd",
        "com.docker.swarm.service.id": "sh3lg8qaoslbjfqkj0lc4qqrb",
        "com.docker.swarm.task.id": "s4wbep76ubrdx6m0uq0qtj1pb",
    },
    "State": "running",
    "Status": "Up 21 seconds (healthy)",
    "HostConfig": {"NetworkMode": "default"},
    "NetworkSettings": {
        "Networks": {
            "meshnet": {"NetworkID": "ppmdu589goq5t6vgu7k0fu7n5", "IPAddress": "198.19.1.54", "IPPrefixLen": 24}
        }
    },
}

INSPECT = {
    "Id": "528360fb7bf93ce06ee5dacbf9d08d8e532815e76029cde729b137de7ab2a431",
    "Name": "/web.3.s7zhehzrqwo48uookskbrxe02",
    "Created": "2026-11-27T17:23:32.544829199Z",
    "State": {"Status": "running", "Running": True, "Paused": False, "Health": {"Status": "healthy"}},
    "Config": {"Labels": {"com.docker.swarm.service.id": "sh3lg8qaoslbjfqkj0lc4qqrb"}},
    "HostConfig": {"NetworkMode": "default"},
    "NetworkSettings": {"Networks": {"meshnet": {"NetworkID": "ppmdu589goq5t6vgu7k0fu7n5", "IPAddress": "198.19.1.4"}}},
}

SERVICE = {
    "ID": "sh3lg8qaoslbjfqkj0lc4qqrb",
    "Version": {"Index": 318},
    "CreatedAt": "2026-11-27T17:23:31.37421607Z",
    "Spec": {"Name": "web", "Labels": {"mesh.publish": "8080:80"}, "Mode": {"Replicated": {"Replicas": 6}}},
}

TASK = {
    "ID": "1pd5rjiydogz9ba7ff8m2dzvv",
    "ServiceID": "sh3lg8qaoslbjfqkj0lc4qqrb",
    "Slot": 4,
    "NodeID": "fbezlsw8mb2fq5jxbp81o8oa6",
    "Status": {
        "Timestamp": "2026-11-27T17:29:43.109200786Z",
        "State": "running",
        "ContainerStatus": {"ContainerID": "75cc933247afcb63dcfebc72a6d82d9c8fedcbc143e254b08df3a6a79b6561e4"},
    },
    "DesiredState": "running",
    "NetworksAttachments": [{"Network": {"Spec": {"Name": "meshnet"}}, "Addresses": ["198.19.1.49/24"]}],
}

GWBRIDGE = {
    "Name": "docker_gwbridge",
    "Id": "093d9d4db7b76ee041d1aa66d587dc7c60e0ad6efcf9fa1e210d5b7c8e54b1fc",
    "Scope": "local",
    "Driver": "bridge",
    "Containers": {
        "4315c5971d2e5f770acd4e82eb99548eebc1f8031777d5233ac14153b3d0a08f": {"IPv4Address": "198.18.42.3/24"},
        "ingress-sbox": {"IPv4Address": "198.18.42.2/24"},
    },
}

NODE = {
    "ID": "fbezlsw8mb2fq5jxbp81o8oa6",
    "Spec": {"Role": "manager", "Availability": "active"},
    "Description": {"Hostname": "swlab-node1"},
    "Status": {"State": "ready", "Addr": "198.18.10.11"},
}


def test_container_from_summary():
    c = ContainerRecord.from_summary(SUMMARY)
    assert c.id == SUMMARY["Id"]
    assert c.name == "web.1.s4wbep76ubrdx6m0uq0qtj1pb"
    assert (c.state, c.health, c.created, c.network_mode) == ("running", "healthy", 1795800849.0, "default")
    assert c.networks == (NetworkAddress("meshnet", "ppmdu589goq5t6vgu7k0fu7n5", "198.19.1.54"),)
    assert c.swarm_task_id == "s4wbep76ubrdx6m0uq0qtj1pb"
    assert c.swarm_service_id == "sh3lg8qaoslbjfqkj0lc4qqrb"
    assert c.address_on("meshnet") == "198.19.1.54"
    assert c.address_on("ppmdu589goq5t6vgu7k0fu7n5") == "198.19.1.54"
    assert c.address_on("bridge") is None


@pytest.mark.parametrize(
    ("status", "state", "health"),
    [
        ("Up 3 seconds (health: starting)", "running", "starting"),
        ("Up 2 minutes (unhealthy)", "running", "unhealthy"),
        ("Up 2 minutes", "running", None),
        ("Up 1 hour (Paused)", "paused", None),
    ],
)
def test_summary_status_string(status, state, health):
    c = ContainerRecord.from_summary({**SUMMARY, "Status": status})
    assert (c.state, c.health) == (state, health)


def test_container_from_inspect():
    c = ContainerRecord.from_inspect(INSPECT)
    assert (c.name, c.state, c.health) == ("web.3.s7zhehzrqwo48uookskbrxe02", "running", "healthy")
    assert c.created == pytest.approx(1795800212.544829)
    paused = ContainerRecord.from_inspect({**INSPECT, "State": {"Status": "paused", "Running": True, "Paused": True}})
    assert (paused.state, paused.health) == ("paused", None)


def test_service_task_network_node_records():
    s = ServiceRecord.from_api(SERVICE)
    assert (s.id, s.name, s.mode, s.replicas, s.version) == ("sh3lg8qaoslbjfqkj0lc4qqrb", "web", "replicated", 6, 318)
    assert s.label("mesh.publish") == "8080:80"
    glob = ServiceRecord.from_api({**SERVICE, "Spec": {**SERVICE["Spec"], "Mode": {"Global": {}}}})
    assert (glob.mode, glob.replicas) == ("global", None)
    t = TaskRecord.from_api(TASK)
    assert (t.state, t.desired_state, t.slot, t.node_id) == ("running", "running", 4, "fbezlsw8mb2fq5jxbp81o8oa6")
    assert t.container_id.startswith("75cc9332")
    assert t.addresses == (("meshnet", "198.19.1.49"),)
    n = NetworkRecord.from_api(GWBRIDGE)
    assert n.address_of("4315c5971d2e5f770acd4e82eb99548eebc1f8031777d5233ac14153b3d0a08f") == "198.18.42.3"
    assert n.address_of("nope") is None
    node = NodeRecord.from_api(NODE)
    assert (node.hostname, node.addr, node.role, node.state) == ("swlab-node1", "198.18.10.11", "manager", "ready")


@pytest.mark.parametrize(
    ("parser", "data"),
    [
        (ContainerRecord.from_summary, {"Names": ["/x"]}),
        (ContainerRecord.from_inspect, {"Name": "/x"}),
        (ServiceRecord.from_api, {"Spec": {}}),
        (TaskRecord.from_api, {}),
        (NetworkRecord.from_api, {"Name": "x"}),
        (NodeRecord.from_api, {}),
    ],
)
def test_record_without_id(parser, data):
    with pytest.raises(RecordError):
        parser(data)


# -- build_table --------------------------------------------------------------------------


def ctr(cid, labels, *, ip="198.18.201.2", net="bridge", state="running", health=None, created=1.0, name=None):
    return ContainerRecord(
        id=cid,
        name=name or f"c{cid}",
        labels=frozen_labels(labels),
        state=state,
        health=health,
        created=created,
        networks=(NetworkAddress(net, "n-" + net, ip),) if ip else (),
    )


WEB = {"mesh.publish": "8080:80", "com.docker.compose.project": "shop", "com.docker.compose.service": "web"}


def ep(cid, ip, port=80, state="running", weight=1, node="n1"):
    return Endpoint(id=cid, address=ip, port=port, node=node, weight=weight, state=state)


def test_compose_replicas_make_one_service():
    cs = [ctr("a", WEB, ip="198.18.201.2"), ctr("b", WEB, ip="198.18.201.3"), ctr("c", WEB, ip="198.18.201.4")]
    table, problems = build_table(cs, local_node="n1", version=7)
    assert problems == ()
    assert table == RoutingTable(
        version=7,
        services=(
            Service(
                name="shop-web",
                routes=(
                    Route(
                        port=8080,
                        endpoints=(ep("a", "198.18.201.2"), ep("b", "198.18.201.3"), ep("c", "198.18.201.4")),
                    ),
                ),
            ),
        ),
    )


def test_deterministic_regardless_of_input_order():
    cs = [ctr(str(i), WEB, ip=f"198.18.201.{i + 2}") for i in range(6)]
    t1, _ = build_table(cs, local_node="n1")
    t2, _ = build_table(list(reversed(cs)), local_node="n1")
    assert t1 == t2 and t1.digest == t2.digest


@pytest.mark.parametrize(
    ("container", "joined"),
    [
        (ctr("a", WEB), True),
        (ctr("a", WEB, health="healthy"), True),
        (ctr("a", WEB, health="starting"), False),
        (ctr("a", WEB, health="unhealthy"), False),
        (ctr("a", WEB, state="paused"), False),
        (ctr("a", WEB, state="exited"), None),  # not even the service
        (ctr("a", WEB, state="created"), None),
    ],
)
def test_state_and_health_gate_membership(container, joined):
    table, problems = build_table([container], local_node="n1")
    assert problems == ()
    if joined is None:
        assert table.services == ()
    else:
        (route,) = table.services[0].routes
        assert (len(route.endpoints) == 1) is joined


def test_killed_container_drains():
    cs = [ctr("a", WEB, ip="198.18.201.2"), ctr("b", WEB, ip="198.18.201.3")]
    table, _ = build_table(cs, local_node="n1", killed={"b"})
    assert table.services[0].routes[0].endpoints == (
        ep("a", "198.18.201.2"),
        ep("b", "198.18.201.3", state="draining"),
    )


def test_service_name_precedence_and_options_from_newest():
    labels_old = {"mesh.publish": "9000:80", "mesh.balance": "p2c"}
    labels_new = {"mesh.publish": "9000:81", "mesh.balance": "least-conn", "mesh.weight": "3"}
    cs = [
        ctr("old", labels_old, name="api", created=1.0, ip="198.18.201.2"),
        ctr("new", {**labels_new, "mesh.service": "api"}, name="api-2", created=2.0, ip="198.18.201.3"),
    ]
    table, problems = build_table(cs, local_node="n1")
    assert problems == ()
    (svc,) = table.services
    assert svc.name == "api"
    assert svc.options == ServiceOptions(balance="least-conn", udp_balance="least-conn")
    assert svc.routes[0].endpoints == (ep("new", "198.18.201.3", port=81, weight=3), ep("old", "198.18.201.2"))


def test_several_ports_and_listen_address():
    cs = [ctr("a", {"mesh.publish": "127.0.0.1:8080:80,8443:443"}, name="front")]
    table, _ = build_table(cs, local_node="n1")
    assert table.services[0].routes == (
        Route(port=8080, listen_host="127.0.0.1", endpoints=(ep("a", "198.18.201.2"),)),
        Route(port=8443, endpoints=(ep("a", "198.18.201.2", port=443),)),
    )


def test_network_choice():
    two = ContainerRecord(
        id="a",
        name="multi",
        labels=frozen_labels({"mesh.publish": "80"}),
        networks=(NetworkAddress("back", "n-b", "198.18.202.2"), NetworkAddress("front", "n-f", "198.18.203.2")),
    )
    table, problems = build_table([two], local_node="n1")
    assert table.services[0].routes[0].endpoints[0].address == "198.18.202.2"
    assert problems == (
        Problem(
            "container multi (a)",
            "is on several networks (back, front); using 'back': set mesh.network to choose",
            "mesh.network",
            skipped=False,
        ),
    )
    chosen = ContainerRecord(
        id="a",
        name="multi",
        labels=frozen_labels({"mesh.publish": "80", "mesh.network": "front"}),
        networks=two.networks,
    )
    table, problems = build_table([chosen], local_node="n1")
    assert (table.services[0].routes[0].endpoints[0].address, problems) == ("198.18.203.2", ())
    host = ContainerRecord(id="h", name="h", labels=frozen_labels({"mesh.publish": "80"}), network_mode="host")
    table, _ = build_table([host], local_node="n1")
    assert table.services[0].routes[0].endpoints[0].address == "127.0.0.1"


def test_bad_labels_skip_only_that_container():
    cs = [
        ctr("a", WEB, ip="198.18.201.2", name="shop-web-1"),
        ctr("b", {**WEB, "mesh.weight": "lots"}, ip="198.18.201.3", name="shop-web-2"),
        ctr("c", {"mesh.publish": "8080:80/sctp"}, name="dns"),
        ctr("d", {"mesh.publish": "81", "mesh.network": "nope"}, name="lost"),
        ctr("e", {"mesh.publish": "82", "mesh.typo": "1"}, name="typo", ip="198.18.201.9"),
    ]
    table, problems = build_table(cs, local_node="n1")
    assert [str(p) for p in problems] == [
        "container dns (c): label mesh.publish='8080:80/sctp': expected /tcp, /udp, /tls or /http, got /sctp in '8080:80/sctp'"
        " - skipped",
        "container lost (d): has no address on network 'nope' (its networks: bridge) - skipped",
        "container shop-web-2 (b): label mesh.weight='lots': expected a whole number 1..1000 - skipped",
        "container typo (e): unknown label mesh.typo (ignored)",
    ]
    assert [(s.name, [e.id for _, r in [(s, r) for r in s.routes] for e in r.endpoints]) for s in table.services] == [
        ("lost", []),
        ("shop-web", ["a"]),
        ("typo", ["e"]),
    ]


def test_port_conflict_older_service_keeps_port():
    cs = [
        ctr("a", {"mesh.publish": "8080:80"}, name="zeta", created=1.0),
        ctr("b", {"mesh.publish": "8080:80,9090:90"}, name="alpha", created=5.0, ip="198.18.201.3"),
    ]
    table, problems = build_table(cs, local_node="n1")
    assert [(s.name, [r.port for r in s.routes]) for s in table.services] == [("alpha", [9090]), ("zeta", [8080])]
    assert problems == (
        Problem(
            "service alpha (containers)", "port 0.0.0.0:8080 is already published by service 'zeta'", "mesh.publish"
        ),
    )
    # a wildcard listener overlaps a specific address on the same port
    cs2 = [
        ctr("a", {"mesh.publish": "127.0.0.1:8080:80"}, name="one", created=1.0),
        ctr("b", {"mesh.publish": "8080:80"}, name="two", created=2.0),
    ]
    table, problems = build_table(cs2, local_node="n1")
    assert [s.name for s in table.services] == ["one"]
    assert len(problems) == 1


# -- swarm services -----------------------------------------------------------------------

SVC = ServiceRecord(id="s1", name="web", labels=frozen_labels({"mesh.publish": "8080:80"}), replicas=3, created=1.0)


def task(tid, *, node="n1", state="running", desired="running", cid=None, addrs=(("meshnet", "198.19.1.9"),)):
    return TaskRecord(
        id=tid, service_id="s1", node_id=node, state=state, desired_state=desired, container_id=cid or f"c-{tid}",
        addresses=addrs,
    )  # fmt: skip


GW = NetworkRecord(
    id="gw",
    name="docker_gwbridge",
    containers=(("c-t1", "198.18.42.3"), ("c-t2", "198.18.42.4"), ("c-t4", "198.18.42.6")),
)


def test_swarm_tasks_local_node_gwbridge_addresses():
    tasks = [
        task("t1"),
        task("t2", desired="shutdown"),  # still running, being replaced: drains
        task("t3", node="n2"),  # another node: the cluster issue
        task("t4", state="starting"),
        task("t5", state="shutdown", desired="shutdown"),
    ]
    table, problems = build_table(services=[SVC], tasks=tasks, gwbridge=GW, local_node="n1")
    assert problems == ()
    assert table.services == (
        Service(
            name="web",
            routes=(
                Route(
                    port=8080,
                    endpoints=(ep("t1", "198.18.42.3"), ep("t2", "198.18.42.4", state="draining")),
                ),
            ),
        ),
    )


def test_swarm_task_without_network_uses_bridge_and_killed_task_drains():
    c = ContainerRecord(
        id="c-t7",
        name="web.1.t7",
        labels=frozen_labels({"com.docker.swarm.service.id": "s1", "com.docker.swarm.task.id": "t7"}),
        networks=(NetworkAddress("bridge", "n-b", "198.18.201.5"),),
    )
    tasks = [task("t7", addrs=())]
    table, _ = build_table([c], services=[SVC], tasks=tasks, gwbridge=None, local_node="n1")
    assert table.services[0].routes[0].endpoints == (ep("t7", "198.18.201.5"),)
    table, _ = build_table([c], services=[SVC], tasks=tasks, local_node="n1", killed={"c-t7"})
    assert table.services[0].routes[0].endpoints == (ep("t7", "198.18.201.5", state="draining"),)
    # the task's own container is a swarm task: never a mode-1 service of its own
    assert [s.name for s in table.services] == ["web"]


def test_swarm_task_on_overlay_only_waits_for_gwbridge():
    c = ContainerRecord(
        id="c-t8",
        name="web.2.t8",
        labels=frozen_labels({"com.docker.swarm.service.id": "s1"}),
        networks=(NetworkAddress("meshnet", "n-m", "198.19.1.9"),),
    )
    table, _ = build_table([c], services=[SVC], tasks=[task("t8")], local_node="n1")
    assert table.services[0].routes[0].endpoints == ()


def test_swarm_bad_service_label_and_job_mode():
    bad = ServiceRecord(id="s2", name="api", labels=frozen_labels({"mesh.publish": "x"}))
    job = ServiceRecord(id="s3", name="batch", labels=frozen_labels({"mesh.publish": "7000"}), mode="replicated-job")
    table, problems = build_table(services=[SVC, bad, job], tasks=[task("t1")], gwbridge=GW, local_node="n1")
    assert [s.name for s in table.services] == ["web"]
    assert [str(p) for p in problems] == [
        "service api: label mesh.publish='x': port 'x' must be a number 1..65535 - skipped",
        "service batch: is a replicated-job service; only replicated and global services are routed - skipped",
    ]


def test_swarm_health_label_and_name_collision_with_container_service():
    svc = ServiceRecord(
        id="s1",
        name="web",
        labels=frozen_labels({"mesh.publish": "8080:80", "mesh.health": "http", "mesh.health.path": "/up"}),
        created=10.0,
    )
    other = ctr("x", {"mesh.publish": "9000:80", "mesh.service": "web"}, created=1.0)
    table, problems = build_table([other], services=[svc], tasks=[task("t1")], gwbridge=GW, local_node="n1")
    assert [(s.name, s.routes[0].port) for s in table.services] == [("web", 9000)]
    assert problems == (Problem("service web", "service name 'web' is already used by service web (containers)"),)
    alone, _ = build_table(services=[svc], tasks=[task("t1")], gwbridge=GW, local_node="n1")
    assert alone.services[0].options.health_check == HealthCheck(kind="http", path="/up")


def test_empty_input_gives_empty_table():
    assert build_table() == (RoutingTable(version=0, services=()), ())


def test_overlapping_ports_within_one_service():
    cs = [
        ctr("a", {"mesh.publish": "127.0.0.1:8080:80", "mesh.service": "s"}, created=1.0),
        ctr("b", {"mesh.publish": "8080:80", "mesh.service": "s"}, created=2.0, ip="198.18.201.3"),
    ]
    table, problems = build_table(cs, local_node="n1")
    assert [(r.listen_host, r.port) for r in table.services[0].routes] == [("0.0.0.0", 8080)]
    assert [str(p) for p in problems] == [
        "service s (containers): port 127.0.0.1:8080 is already published by service 's' - skipped"
    ]


# -- udp and tls passthrough ------------------------------------------------------------


def test_one_port_for_tcp_and_udp_of_one_service():
    c = ctr("a", {"mesh.publish": "53:5353/tcp,53:5353/udp", "mesh.service": "dns"})
    table, problems = build_table([c], local_node="n1")
    assert problems == ()
    assert [(r.protocol, r.port, [e.port for e in r.endpoints]) for r in table.services[0].routes] == [
        ("tcp", 53, [5353]),
        ("udp", 53, [5353]),
    ]


def test_tls_routes_of_several_services_share_a_port_by_sni():
    cs = [
        ctr("a", {"mesh.publish": "443:8443/tls", "mesh.tls.sni": "a.example.com", "mesh.service": "a"}),
        ctr(
            "b",
            {"mesh.publish": "443:8443/tls", "mesh.tls.sni": "b.example.com,*.b.example.com", "mesh.service": "b"},
            ip="198.18.201.3",
            created=2.0,
        ),
        ctr("d", {"mesh.publish": "443:9443/tls", "mesh.service": "fallback"}, ip="198.18.201.4", created=3.0),
        ctr("u", {"mesh.publish": "443:443/udp", "mesh.service": "quic"}, ip="198.18.201.5", created=4.0),
    ]
    table, problems = build_table(cs, local_node="n1")
    assert problems == ()
    assert [(s.name, r.protocol, r.port, r.match.hosts) for s, r in table.routes()] == [
        ("a", "tls", 443, ("a.example.com",)),
        ("b", "tls", 443, ("*.b.example.com", "b.example.com")),
        ("fallback", "tls", 443, ()),
        ("quic", "udp", 443, ()),
    ]


def test_tls_conflicts_name_both_services_and_the_newer_is_skipped():
    cs = [
        ctr("a", {"mesh.publish": "443:8443/tls", "mesh.tls.sni": "a.example.com", "mesh.service": "a"}),
        ctr(
            "b",
            {"mesh.publish": "443:8443/tls", "mesh.tls.sni": "A.example.com", "mesh.service": "b"},
            ip="198.18.201.3",
            created=2.0,
        ),
        ctr("t", {"mesh.publish": "443:8443", "mesh.service": "plain"}, ip="198.18.201.4", created=3.0),
        ctr("x", {"mesh.publish": "8443:8443", "mesh.service": "old-tcp"}, ip="198.18.201.6", created=0.5),
        ctr("y", {"mesh.publish": "8443:8443/tls", "mesh.service": "new-tls"}, ip="198.18.201.7", created=5.0),
    ]
    table, problems = build_table(cs, local_node="n1")
    assert [str(p) for p in problems] == [
        "service b (containers): services 'a' and 'b' both claim SNI name 'a.example.com' on 0.0.0.0:443 (tls)"
        " - skipped",
        "service new-tls (containers): port 0.0.0.0:8443 (tls) is already published by service 'old-tcp' (tcp)"
        " - skipped",
        "service plain (containers): port 0.0.0.0:443 (tcp) is already published by service 'a' (tls) - skipped",
    ]
    assert [p.label for p in problems] == ["mesh.tls.sni", "mesh.publish", "mesh.publish"]
    assert [s.name for s in table.services] == ["a", "old-tcp"]


# -- http routes ------------------------------------------------------------------------------


def test_http_routes_of_several_services_share_a_port_by_host_and_path():
    cs = [
        ctr("s", {"mesh.publish": "8080:9001/http", "mesh.http.hosts": "shop.example.com,*.shop.example.com",
                  "mesh.http.paths": "/", "mesh.service": "shop"}),
        ctr("a", {"mesh.publish": "8080:9101/http", "mesh.http.hosts": "shop.example.com", "mesh.http.paths": "/api",
                  "mesh.service": "api"}, ip="198.18.201.3", created=2.0),
        ctr("d", {"mesh.publish": "8080:80/http", "mesh.service": "fallback"}, ip="198.18.201.4", created=3.0),
        ctr("u", {"mesh.publish": "8080:80/udp", "mesh.service": "udp"}, ip="198.18.201.5", created=4.0),
    ]  # fmt: skip
    table, problems = build_table(cs, local_node="n1")
    assert problems == ()
    assert [(s.name, r.protocol, r.port, r.match.hosts, r.match.paths, [e.port for e in r.endpoints])
            for s, r in table.routes()] == [
        ("api", "http", 8080, ("shop.example.com",), ("/api",), [9101]),
        ("fallback", "http", 8080, (), (), [80]),
        ("shop", "http", 8080, ("*.shop.example.com", "shop.example.com"), ("/",), [9001]),
        ("udp", "udp", 8080, (), (), [80]),
    ]  # fmt: skip


def test_http_conflicts_name_both_services_and_the_newer_is_skipped():
    cs = [
        ctr("s", {"mesh.publish": "80/http", "mesh.http.hosts": "shop.example.com", "mesh.http.paths": "/,/api",
                  "mesh.service": "shop"}),
        ctr("a", {"mesh.publish": "80/http", "mesh.http.hosts": "SHOP.example.com", "mesh.http.paths": "/api",
                  "mesh.service": "api"}, ip="198.18.201.3", created=2.0),
        ctr("w", {"mesh.publish": "80/http", "mesh.http.hosts": "www.example.com", "mesh.service": "www"},
            ip="198.18.201.4", created=2.5),
        ctr("h", {"mesh.publish": "80/http", "mesh.http.hosts": "www.example.com", "mesh.service": "www2"},
            ip="198.18.201.11", created=3.0),
        ctr("d", {"mesh.publish": "80/http", "mesh.service": "any"}, ip="198.18.201.5", created=4.0),
        ctr("d2", {"mesh.publish": "80/http", "mesh.service": "any2"}, ip="198.18.201.6", created=5.0),
        ctr("t", {"mesh.publish": "80", "mesh.service": "plain"}, ip="198.18.201.7", created=6.0),
        ctr("x", {"mesh.publish": "8443:8443/tls", "mesh.service": "old-tls"}, ip="198.18.201.8", created=0.5),
        ctr("y", {"mesh.publish": "8443:8443/http,9000/http", "mesh.service": "new-http"}, ip="198.18.201.9",
            created=7.0),
        ctr("z", {"mesh.publish": "127.0.0.1:80:80/http", "mesh.http.paths": "/z", "mesh.service": "local"},
            ip="198.18.201.10", created=8.0),
    ]  # fmt: skip
    table, problems = build_table(cs, local_node="n1")
    assert [(str(p), p.label) for p in problems] == [
        ("service any2 (containers): services 'any' and 'any2' both claim host '*' path '/' on 0.0.0.0:80 (http)"
         " - skipped", "mesh.http.hosts"),
        ("service api (containers): services 'shop' and 'api' both claim host 'shop.example.com' path '/api' on"
         " 0.0.0.0:80 (http) - skipped", "mesh.http.paths"),
        ("service local (containers): port 127.0.0.1:80 (http) is already published by service 'shop' (http)"
         " - skipped", "mesh.publish"),
        ("service new-http (containers): port 0.0.0.0:8443 (http) is already published by service 'old-tls' (tls)"
         " - skipped", "mesh.publish"),
        ("service plain (containers): port 0.0.0.0:80 (tcp) is already published by service 'shop' (http)"
         " - skipped", "mesh.publish"),
        ("service www2 (containers): services 'www' and 'www2' both claim host 'www.example.com' path '/' on"
         " 0.0.0.0:80 (http) - skipped", "mesh.http.hosts"),
    ]  # fmt: skip
    # the newcomer keeps its other routes; a service left without routes is not in the table
    assert [(s.name, r.protocol, r.port) for s, r in table.routes()] == [
        ("any", "http", 80), ("new-http", "http", 9000), ("old-tls", "tls", 8443), ("shop", "http", 80),
        ("www", "http", 80),
    ]  # fmt: skip


def test_http_labels_of_a_swarm_service():
    svc = ServiceRecord(id="s1", name="api", labels=frozen_labels(
        {"mesh.publish": "80:8000/http", "mesh.http.hosts": "api.example.com", "mesh.http.paths": "/v1,/v2",
         "mesh.http.max-inflight": "8"}))  # fmt: skip
    task = TaskRecord(id="t1", service_id="s1", node_id="n1", state="running", desired_state="running",
                      container_id="c-t1")  # fmt: skip
    gw = NetworkRecord(id="gw", name="docker_gwbridge", containers=(("c-t1", "198.18.42.3"),))
    table, problems = build_table(services=[svc], tasks=[task], gwbridge=gw, local_node="n1")
    assert problems == ()
    (route,) = table.services[0].routes
    assert (route.protocol, route.port, route.match.hosts, route.match.paths, route.endpoints[0].port) == (
        "http",
        80,
        ("api.example.com",),
        ("/v1", "/v2"),
        8000,
    )
    assert table.services[0].options.http_max_inflight == 8


def test_swarm_service_publishes_udp():
    svc = ServiceRecord(id="s1", name="dns", labels=frozen_labels({"mesh.publish": "53:53/udp"}))
    task = TaskRecord(id="t1", service_id="s1", node_id="n1", state="running", desired_state="running",
                      container_id="c-t1")  # fmt: skip
    gw = NetworkRecord(id="gw", name="docker_gwbridge", containers=(("c-t1", "198.18.42.3"),))
    table, problems = build_table(services=[svc], tasks=[task], gwbridge=gw, local_node="n1")
    assert problems == ()
    (route,) = table.services[0].routes
    assert (route.protocol, route.port, route.endpoints[0].address) == ("udp", 53, "198.18.42.3")
    assert table.services[0].options.udp_balance == "hash"
