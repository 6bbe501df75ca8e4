"""The control plane's scale features: per-service wire form and digest, deltas with a full snapshot for a
subscriber that missed versions, gzip, coalesced wake-ups, managers sharing subscribers, and the Localizer
(always equal to ``localize``).  Pure parts table-driven; the protocol over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from cluster.control import ControlClient, ControlServer, _Answer, _Connection, _delta_body, _gunzip, _split_compact
from cluster.state import ClusterState, Localizer, NodeInfo, ServicePart, localize, parse_service
from mesh.errors import ProtocolError
from mesh.routing import Endpoint, Match, Route, RoutingTable, Service, ServiceOptions, TableError
from tests.util import wait_for

TOKEN = "0123456789abcdef-scale-token"
E = Endpoint
NODES = (
    NodeInfo("n1", "10.0.0.1", tunnel=7481),
    NodeInfo("n2", "10.0.0.2", tunnel=7481),
    NodeInfo("n3", "10.0.0.3", tunnel=7481),
)


def _svc(name: str, port: int, *endpoints: Endpoint, **route) -> Service:
    return Service(name, (Route(port=port, endpoints=endpoints, **route),), ServiceOptions())


def _st(version: int, *services: Service, nodes: tuple[NodeInfo, ...] = NODES) -> ClusterState:
    return ClusterState(RoutingTable(version=version, services=services), nodes)


A1 = _svc("a", 8080, E("a1", "10.1.0.1", 80, node="n1"), E("a2", "10.1.0.2", 80, node="n2"))
A2 = _svc("a", 8080, E("a1", "10.1.0.1", 80, node="n1"), E("a3", "10.1.0.3", 80, node="n3"))
B1 = _svc("b", 8081, E("b1", "10.2.0.1", 81, node="n2"))
C1 = _svc("c", 8082, E("c1", "10.3.0.1", 82, node="n3"))
BIG = _svc(
    "big", 9000, *(E(f"t{i:04d}", f"10.9.{i // 250}.{i % 250 + 1}", 80, node=f"n{i % 3 + 1}") for i in range(400))
)


def _canonical(state: ClusterState) -> bytes:
    return json.dumps(state.to_dict() | {"digest": state.digest}, sort_keys=True, separators=(",", ":")).encode()


# -- the wire form and digest (pure) ------------------------------------------------------------------------------

DERIVE_CASES = [
    # (name, base, services changed (None removes), node changes, expected state)
    ("a service changes", _st(1, A1, B1), {"a": A2}, None, _st(2, A2, B1)),
    ("a service is added", _st(1, A1), {"c": C1}, None, _st(2, A1, C1)),
    ("a service is removed", _st(1, A1, B1), {"b": None}, None, _st(2, A1)),
    (
        "a node goes down, nothing else",
        _st(1, A1, B1),
        {},
        {"n2": NodeInfo("n2", "10.0.0.2", state="down", tunnel=7481)},
        _st(2, A1, B1, nodes=(NODES[0], NodeInfo("n2", "10.0.0.2", state="down", tunnel=7481), NODES[2])),
    ),
    ("a node leaves", _st(1, A1), {}, {"n3": None}, _st(2, A1, nodes=NODES[:2])),
]


@pytest.mark.parametrize(
    ("base", "services", "nodes", "expected"), [c[1:] for c in DERIVE_CASES], ids=[c[0] for c in DERIVE_CASES]
)
def test_with_changes_equals_a_fresh_state(base, services, nodes, expected) -> None:
    changes = {
        name: None if s is None else (s, ServicePart.of(RoutingTable(services=(s,)).to_dict()["services"][0]))
        for name, s in services.items()
    }
    derived = base.with_changes(2, changes, nodes)
    assert derived == expected
    fresh = ClusterState(expected.table, expected.nodes)  # no caches
    assert derived.digest == fresh.digest
    assert derived.wire() == _canonical(fresh)
    # unchanged services keep their objects (and so their wire form and localisation)
    for svc in base.table.services:
        if svc.name not in services and svc.name in {s.name for s in derived.table.services}:
            assert derived.table.service(svc.name) is svc


def test_digest_covers_content_not_version_and_reuse_gives_the_same_bytes() -> None:
    s1, s2 = _st(1, A1, B1), _st(9, A1, B1)
    assert s1.digest == s2.digest
    assert _st(1, A2, B1).digest != s1.digest
    assert _st(1, A1, B1, nodes=NODES[:2]).digest != s1.digest
    primed = _st(2, A2, B1).reuse(s1)
    assert primed.parts()[1] is s1.parts()[1]  # b unchanged: its serialised form is shared
    assert primed.wire() == _canonical(_st(2, A2, B1))
    assert json.loads(primed.wire())["digest"] == primed.digest


def test_localize_keeps_route_match_rules() -> None:
    svc = Service("web", (Route(port=80, protocol="http", match=Match(hosts=("shop.example.com",)),
                                endpoints=(E("w1", "10.1.0.1", 80, node="n2"),)),))  # fmt: skip
    out = localize(_st(1, svc), "n1", {})
    assert out.services[0].routes[0].match == Match(hosts=("shop.example.com",))
    assert out.services[0].routes[0].protocol == "http"


def test_localizer_equals_localize_over_a_sequence_and_reuses_unchanged_services() -> None:
    rng = random.Random(5)
    loc = Localizer()
    services = {"a": A1, "b": B1, "c": C1, "big": BIG}
    nodes = {n.id: n for n in NODES}
    local: dict[str, str] = {"a1": "172.17.0.2"}
    draining: set[str] = set()
    for step in range(60):
        what = rng.choice(["service", "node", "local", "drain", "nothing"])
        if what == "service":
            name = rng.choice(sorted(services))
            svc = services[name]
            eps = list(svc.routes[0].endpoints)
            eps[rng.randrange(len(eps))] = E(f"x{step}", "10.5.0.1", 80, node=rng.choice(sorted(nodes)))
            services[name] = Service(name, (Route(port=svc.routes[0].port, endpoints=tuple(eps)),))
        elif what == "node":
            nid = rng.choice(sorted(nodes))
            n = nodes[nid]
            nodes[nid] = NodeInfo(nid, n.addr, state="down" if n.state == "ready" else "ready", tunnel=n.tunnel)
        elif what == "local":
            local = {**local, f"t{rng.randrange(400):04d}": "172.17.0.9"}
        elif what == "drain" and local:
            draining = {rng.choice(sorted(local))}
        st = _st(step, *services.values(), nodes=tuple(nodes.values()))
        assert loc(st, "n1", local, draining) == localize(st, "n1", local, draining), f"step {step}: {what}"
    assert loc.reused > loc.localized  # most steps touch one service or none


# -- random sequences of deltas against full snapshots (pure) -----------------------------------------------------


def _random_step(rng: random.Random, services: dict[str, Service], nodes: dict[str, NodeInfo], step: int):
    """One random change of a cluster: returns (changed services (None = removed), changed nodes (None = removed))
    and applies it to ``services`` / ``nodes``."""
    svc_changes: dict[str, Service | None] = {}
    node_changes: dict[str, NodeInfo | None] = {}
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        what = rng.choice(("endpoint", "endpoint", "endpoint", "add-service", "remove-service", "relisten",
                           "node-state", "node-state", "add-node", "remove-node"))  # fmt: skip
        node_ids = sorted(nodes)
        if what == "endpoint" and services:
            name = rng.choice(sorted(services))
            svc = services[name]
            eps = list(svc.routes[0].endpoints)
            if eps and rng.random() < 0.5:
                eps.pop(rng.randrange(len(eps)))
            eps.append(E(f"x{step}-{rng.randrange(1000)}", "10.5.0.1", 80, node=rng.choice(node_ids)))
            eps.sort(key=lambda e: e.id)
            services[name] = svc_changes[name] = _svc(name, svc.routes[0].port, *dict.fromkeys(eps))
        elif what == "add-service":
            name = f"s{step}-{len(svc_changes)}"
            port = 10000 + step * 8 + len(svc_changes)
            services[name] = svc_changes[name] = _svc(name, port, E(f"{name}-1", "10.6.0.1", 80, node=node_ids[0]))
        elif what == "remove-service" and len(services) > 1:
            name = rng.choice(sorted(services))
            del services[name]
            svc_changes[name] = None
        elif what == "relisten" and services:
            name = rng.choice(sorted(services))
            svc = services[name]
            services[name] = svc_changes[name] = _svc(
                name, 20000 + step * 8 + len(svc_changes), *svc.routes[0].endpoints
            )
        elif what == "node-state":
            nid = rng.choice(node_ids)
            n = nodes[nid]
            nodes[nid] = node_changes[nid] = NodeInfo(nid, n.addr, state="down" if n.state == "ready" else "ready",
                                                      tunnel=n.tunnel)  # fmt: skip
        elif what == "add-node":
            nid = f"n{100 + step}"
            nodes[nid] = node_changes[nid] = NodeInfo(nid, f"10.0.1.{step % 250 + 1}", tunnel=7481)
        elif what == "remove-node" and len(nodes) > 2:
            nid = rng.choice(node_ids[1:])
            del nodes[nid]
            node_changes[nid] = None
    return svc_changes, node_changes


def _part(svc: Service) -> tuple[Service, ServicePart]:
    return svc, ServicePart.of(RoutingTable(services=(svc,)).to_dict()["services"][0])


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_random_deltas_give_the_state_digest_and_bytes_of_full_snapshots(seed: int) -> None:
    rng = random.Random(seed)
    services = {s.name: s for s in (A1, B1, C1, BIG)}
    nodes = {n.id: n for n in NODES}
    state = _st(1, *services.values(), nodes=tuple(nodes.values()))
    for step in range(2, 60):
        svc_changes, node_changes = _random_step(rng, services, nodes, step)
        derived = state.with_changes(step, {k: None if v is None else _part(v) for k, v in svc_changes.items()},
                                     node_changes)  # fmt: skip
        fresh = ClusterState(RoutingTable(version=step, services=tuple(sorted(services.values(),
                                                                               key=lambda s: s.name))),
                             tuple(nodes.values()))  # fmt: skip
        assert derived == fresh, f"step {step}"
        assert derived.digest == fresh.digest, f"step {step}"
        assert derived.wire() == fresh.wire() == _canonical(fresh), f"step {step}"
        assert derived.node_map() == fresh.node_map() and derived.nodes == fresh.nodes
        assert ClusterState.from_json(derived.wire()) == fresh
        state = derived


@pytest.mark.parametrize("received", ["bytes", "parsed"])
@pytest.mark.parametrize("seed", [7, 8, 9, 10])
def test_random_deltas_over_the_wire_body_apply_to_the_servers_state(seed: int, received: str) -> None:
    """What the server sends (``_delta_body``) and what the subscriber makes of it (``_apply_delta``): the same
    state and digest as the server's, for states the server built from scratch each time (as the watcher does).
    "bytes": the whole answer path (services hashed from the bytes received, endpoints reused from the base);
    "parsed": the delta as a parsed object only (services hashed from their canonical form)."""
    rng = random.Random(seed)
    services = {s.name: s for s in (A1, B1, C1, BIG)}
    nodes = {n.id: n for n in NODES}
    server_state = _st(1, *services.values(), nodes=tuple(nodes.values()))
    cli = ControlClient([("127.0.0.1", 1)], TOKEN, lambda st: None)
    held = ClusterState.from_json(server_state.wire())
    loc = Localizer()
    local = {"a1": "172.17.0.2", "t0000": "172.17.0.3"}
    for step in range(2, 50):
        _random_step(rng, services, nodes, step)
        new = ClusterState(RoutingTable(version=step, services=tuple(sorted(services.values(),
                                                                             key=lambda s: s.name))),
                           tuple(nodes.values())).reuse(server_state)  # fmt: skip
        body = _delta_body(server_state, new, new.digest, server_state.digest)
        cli._after, cli._received = server_state.digest, held
        if received == "bytes" and new.digest != server_state.digest:  # (a server answers 200 on a change only)
            got = cli._receive(_Answer(200, {}, body))
        else:
            got = cli._apply_delta(json.loads(body), new.digest)
        assert got == new and got.digest == new.digest and got.wire() == new.wire(), f"step {step}"
        for svc in got.table.services:  # an endpoint the base held, unchanged, is the object the base held
            before = {e.id: e for r in held.table.services[held._service_index()[svc.name]].routes
                      for e in r.endpoints} if svc.name in held._service_index() else {}  # fmt: skip
            for e in (e for r in svc.routes for e in r.endpoints):
                assert before.get(e.id) != e or before[e.id] is e, f"step {step}"
        # the Localizer follows the delta's lineage and still equals localize()
        assert loc(got, "n1", local) == localize(got, "n1", local), f"step {step}"
        server_state, held = new, got
    assert loc.reused > loc.localized


def test_split_compact_gives_json_loads_and_each_services_bytes() -> None:
    s1, s2 = _st(1, A1, B1), _st(2, A2, C1, BIG)
    body = _delta_body(s1, s2, s2.digest, s1.digest)
    data, raw = _split_compact(body)
    assert data == json.loads(body)
    parts = {s.name: p.json for s, p in zip(s2.table.services, s2.parts(), strict=True)}
    assert raw == {"a": parts["a"], "big": parts["big"], "c": parts["c"], "b": b"null"}
    snap = s2.wire()  # a snapshot: no top-level "services"
    assert _split_compact(snap) == (json.loads(snap), {})
    for bad in (b" " + body, body + b" ", body[:-1], body + b"}", b'{"a":1,}', b'{"a":1 }', b"[1]", b"{}x",
                '{"a":"\u00e9"}'.encode(), b'{"services":{"a":1,}}'):  # fmt: skip
        got = _split_compact(bad)
        assert got is None or got[0] == json.loads(bad), bad


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda d: json.dumps(d).encode(), id="whitespace"),
        pytest.param(
            lambda d: json.dumps(
                {
                    **d,
                    "services": {k: None if v is None else dict(reversed(v.items())) for k, v in d["services"].items()},
                },
                separators=(",", ":"),
            ).encode(),
            id="compact-unsorted",
        ),
    ],
)
def test_a_delta_not_in_canonical_form_applies_by_its_content(mangle) -> None:
    """A server that formats its JSON otherwise: the bytes do not hash to the digest, the content does."""
    s1 = _st(1, A1, B1, BIG)
    s2 = _st(2, A2, _svc("big", 9000, *BIG.routes[0].endpoints[1:]), C1).reuse(s1)
    body = mangle(json.loads(_delta_body(s1, s2, s2.digest, s1.digest)))
    cli = ControlClient([("127.0.0.1", 1)], TOKEN, lambda st: None)
    cli._after, cli._received = s1.digest, ClusterState.from_json(s1.wire())
    got = cli._receive(_Answer(200, {}, body))
    assert got == s2 and got.digest == s2.digest and got.wire() == s2.wire()


PARSE_ERRORS = [
    ({"name": "a", "routes": [{"port": 70000, "endpoints": []}]}, "listen port out of range"),
    ({"name": "a", "routes": [{"port": 80, "endpoints": [{"id": "x", "address": "1.2.3.4", "port": 0}]}]},
     "port out of range"),
    ({"name": "a", "routes": [{"port": 80, "endpoints": [{"id": "a1", "address": "10.1.0.1", "port": 80,
                                                            "node": "n1", "bogus": 1}]}]}, "malformed"),
    ({"name": "a", "routes": [{"port": 80, "endpoints": [dict(id="a1", address="10.1.0.1", port=80, node="n1")] * 2}]},
     "duplicate endpoint ids"),
    ({"name": "a", "routes": [{"port": 80, "endpoints": []}], "options": {"retries": -1}}, "retries"),
    ({"name": "a", "routes": "x"}, "malformed"),
    ({"name": "a", "routes": [{"endpoints": []}]}, "malformed"),
    # as many fields as an endpoint of the previous service has, all others equal to its: still refused
    ({"name": "a", "routes": [{"port": 8080, "endpoints": [{"address": "10.1.0.1", "id": "a1", "node": "n1",
                                                              "port": 80, "state": "running", "bogus": None,
                                                              "weight": 1}]}]}, "malformed"),
]  # fmt: skip


@pytest.mark.parametrize(("d", "message"), PARSE_ERRORS)
def test_parse_service_refuses_what_routing_table_refuses(d: dict, message: str) -> None:
    with pytest.raises(TableError, match=message):
        RoutingTable.from_dict({"services": [d]})
    with pytest.raises(TableError, match=message):
        parse_service(d, A1)


def test_parse_service_options_remembered_only_for_the_same_json() -> None:
    """Options are parsed once per distinct wire form; 3, 3.0 and true are distinct (they may not parse alike)."""
    forms = [{"retries": 3}, {"retries": 3.0}, {"retries": True}, {"retries": 3}, {"balance": "least-conn"},
             {"balance": "bogus"}, {"retries": 3}, {"health_check": {"path": "/h", "expect_status": [200]}}, {}]  # fmt: skip
    for opts in forms * 2:
        d = {"name": "a", "options": opts, "routes": [{"port": 80, "endpoints": []}]}
        try:
            want: object = RoutingTable.from_dict({"services": [d]}).services[0]
        except TableError as exc:
            want = type(exc)
        try:
            got: object = parse_service(d, None)
        except TableError as exc:
            got = type(exc)
        assert got == want, opts
        if isinstance(want, Service):
            assert got.options == want.options


def test_parse_service_reuses_equal_endpoints_of_the_previous_service_only() -> None:
    d = json.loads(ServicePart.of(RoutingTable(services=(A2,)).to_dict()["services"][0]).json)
    got = parse_service(d, A1)
    assert got == A2
    a1 = A1.routes[0].endpoints[0]
    assert got.routes[0].endpoints[0] is a1  # unchanged: the object held
    assert got.routes[0].endpoints[1] is not A2.routes[0].endpoints[1]  # new: built (and checked)
    d["routes"][0]["endpoints"][0]["weight"] = 2  # one field differs: built again
    assert parse_service(d, A1).routes[0].endpoints[0] == replace(a1, weight=2)
    d["routes"][0]["endpoints"][0]["weight"] = True  # equal to 1 in Python, not the same JSON: not reused
    assert parse_service(d, A1).routes[0].endpoints[0] is not a1


def test_a_tampered_delta_is_refused_and_the_next_poll_asks_for_everything() -> None:
    s1 = _st(1, A1, B1)
    s2 = _st(2, A2, B1).reuse(s1)
    cli = ControlClient([("127.0.0.1", 1)], TOKEN, lambda st: None)
    cli._after, cli._received = s1.digest, ClusterState.from_json(s1.wire())
    data = json.loads(_delta_body(s1, s2, s2.digest, s1.digest))
    data["services"]["a"]["routes"][0]["endpoints"][0]["port"] = 81  # not what the digest covers
    with pytest.raises(ProtocolError, match="delta gives digest"):
        cli._apply_delta(data, s2.digest)
    assert cli._after == ""


def test_localizer_on_deltas_looks_only_at_what_changed() -> None:
    """A state derived with ``with_changes`` names what changed: the Localizer localises those services, the ones
    on changed nodes and the ones whose local tasks changed, and reuses the rest without looking at them."""
    s1 = _st(1, A1, B1, C1, BIG)
    loc = Localizer()
    local = {"a1": "172.17.0.2"}
    assert loc(s1, "n1", local) == localize(s1, "n1", local)
    n = loc.localized
    cases = [
        # (what, services changed, node changes, local addresses, expected services localised)
        ("one service", {"c": _svc("c", 8082, E("c2", "10.3.0.2", 82, node="n3"))}, None, local, 1),
        ("nothing of ours", {}, None, local, 0),
        ("a node of b and big", {}, {"n2": NodeInfo("n2", "10.0.0.2", state="down", tunnel=7481)}, local, 3),
        ("a local task's address", {}, None, {"a1": "172.17.0.9"}, 1),  # big's tasks on n1 are still unknown
        ("a service removed", {"b": None}, None, {"a1": "172.17.0.9"}, 0),
    ]
    state = s1
    for what, svcs, node_changes, addrs, expected in cases:
        state = state.with_changes(state.version + 1, {k: None if v is None else _part(v) for k, v in svcs.items()},
                                   node_changes)  # fmt: skip
        assert loc(state, "n1", addrs) == localize(state, "n1", addrs), what
        assert loc.localized - n == expected, what
        n = loc.localized


# -- the subscriber's HTTP connection (pure: a fake transport) ------------------------------------------------------


class _FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


GZ = gzip.compress(b'{"x":1}')
ANSWERS = [
    # (name, bytes the server sends, closes after, expected (status, body) or error, connection reusable)
    ("content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False, (200, b"hello"), True),
    ("204 has no body", b"HTTP/1.1 204 No Content\r\n\r\n", False, (204, b""), True),
    (
        "chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;x=y\r\n!\r\n0\r\n\r\n",
        False,
        (200, b"hello!"),
        True,
    ),
    (
        "chunked with trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX: y\r\n\r\n",
        False,
        (200, b"ok"),
        True,
    ),
    ("until close", b"HTTP/1.1 200 OK\r\n\r\nall of it", True, (200, b"all of it"), False),
    (
        "connection: close",
        b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        False,
        (401, b""),
        False,
    ),
    ("HTTP/1.0", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False, (200, b"ok"), False),
    ("too large", b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n", False, "state too large", False),
    ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n", False, "not an HTTP answer", False),
    ("bad header", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", False, "malformed header", False),
    ("bad length", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", False, "bad Content-Length", False),
    ("bad chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, "bad chunk size", False),
    ("closed midway", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhal", True, "in the middle", False),
    ("two answers", b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", False, (204, b""), False),
]


@pytest.mark.parametrize(
    ("raw", "close", "expected", "reusable"), [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS]
)
async def test_connection_reads_one_answer(raw: bytes, close: bool, expected, reusable: bool) -> None:
    for step in (len(raw), 1, 7):  # all at once, byte by byte, in odd pieces
        conn = _Connection(max_body=1000)
        transport = _FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        task = asyncio.ensure_future(conn.request(b"GET / HTTP/1.1\r\n\r\n", 5.0))
        await asyncio.sleep(0)
        for i in range(0, len(raw), step):
            conn.data_received(raw[i : i + step])
        if close:
            conn.connection_lost(None)
        if isinstance(expected, str):
            with pytest.raises(ProtocolError, match=expected):
                await task
        else:
            answer = await task
            assert (answer.status, answer.body) == expected
        assert (not conn.closed and not transport.closed and conn.keep) == reusable
        assert transport.written == b"GET / HTTP/1.1\r\n\r\n"


async def test_connection_closed_before_any_answer_may_be_retried_and_a_silent_one_times_out() -> None:
    conn = _Connection(max_body=1000)
    conn.connection_made(_FakeTransport())  # type: ignore[arg-type]
    task = asyncio.ensure_future(conn.request(b"GET / HTTP/1.1\r\n\r\n", 5.0))
    await asyncio.sleep(0)
    conn.connection_lost(None)
    with pytest.raises(ConnectionResetError):  # _Closed: the client sends the request again on a new connection
        await task
    conn = _Connection(max_body=1000)
    transport = _FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await conn.request(b"GET / HTTP/1.1\r\n\r\n", 0.01)
    assert transport.closed


@pytest.mark.parametrize(
    ("body", "limit", "expected"),
    [
        (GZ, 100, b'{"x":1}'),
        (gzip.compress(b"0" * 100_000), 1000, "larger than 1000"),  # a small body must not inflate without bound
        (GZ[:-4], 100, "truncated"),
        (b"not gzip", 100, "bad gzip"),
    ],
)
def test_gunzip_is_bounded(body: bytes, limit: int, expected) -> None:
    if isinstance(expected, bytes):
        assert _gunzip(body, limit) == expected
    else:
        with pytest.raises(ProtocolError, match=expected):
            _gunzip(body, limit)


# -- the protocol over real sockets -------------------------------------------------------------------------------


async def _server(state: ClusterState | None = None, **kw) -> ControlServer:
    srv = ControlServer(TOKEN, "127.0.0.1", 0, state=state, **kw)
    await srv.start()
    return srv


def _client(managers, applied: list, seed: int = 3, **kw) -> ControlClient:
    kw.setdefault("wait", 10.0)
    kw.setdefault("backoff_base", 0.02)
    kw.setdefault("backoff_cap", 0.2)
    return ControlClient(managers, TOKEN, applied.append, rng=random.Random(seed), **kw)


async def test_subscriber_gets_deltas_and_applies_what_the_server_holds() -> None:
    s1 = _st(1, A1, B1, BIG)
    srv = await _server(s1)
    applied: list[ClusterState] = []
    cli = _client([srv.address], applied)
    await cli.start()
    try:
        await wait_for(lambda: len(applied) == 1, what="first state")
        assert srv.stats.snapshots == 1 and srv.stats.deltas == 0
        await wait_for(lambda: srv.stats.waiting == 1, what="subscriber waiting")
        s2 = _st(2, A2, B1, BIG)
        srv.publish(s2)
        await wait_for(lambda: len(applied) == 2, what="second state")
        assert applied[1] == s2 and applied[1].digest == s2.digest
        assert srv.stats.deltas == 1 and cli.stats.deltas == 1
        # unchanged services are the very objects the subscriber already held
        assert applied[1].table.service("big") is applied[0].table.service("big")
        await wait_for(lambda: srv.stats.waiting == 1, what="subscriber waiting again")
        s3 = _st(3, A2, B1, BIG, nodes=NODES[:2])  # a node leaves
        srv.publish(s3)
        await wait_for(lambda: len(applied) == 3, what="third state")
        assert applied[2] == s3 and srv.stats.deltas == 2
        # a delta carries the changed parts only
        assert cli.stats.bytes_received < 3 * len(s1.wire())
    finally:
        await cli.stop()
        await srv.stop()


async def _get(port: int, query: str, **headers) -> tuple[int, dict, bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.get(
            f"http://127.0.0.1:{port}/v1/cluster{query}", headers={"Authorization": f"Bearer {TOKEN}", **headers}
        ) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def test_missed_versions_beyond_history_get_a_snapshot_and_gzip_where_it_pays() -> None:
    s1 = _st(1, A1, B1, BIG)
    srv = await _server(s1, history=3)
    try:
        for v in range(2, 6):
            srv.publish(_st(v, _svc("a", 8080, E(f"a{v}", "10.1.0.9", 80, node="n1")), B1, BIG))
        cur = srv.state
        assert cur is not None
        # s1 left the 3-state history: a full snapshot, compressed, that parses to the current state
        status, headers, body = await _get(
            srv.port, f"?after={s1.digest}&wait=0&delta=1", **{"Accept-Encoding": "gzip"}
        )
        assert status == 200 and headers["Content-Encoding"] == "gzip"
        assert len(body) < len(cur.wire()) / 3
        data = json.loads(gzip.decompress(body))
        assert "base" not in data and ClusterState.from_dict(data) == cur and data["digest"] == cur.digest
        # a base still held: a delta with only service a, small enough to go as it is
        prev = list(srv._past)[-2]
        status, headers, body = await _get(srv.port, f"?after={prev}&wait=0&delta=1", **{"Accept-Encoding": "gzip"})
        data = json.loads(body)
        assert status == 200 and "Content-Encoding" not in headers and len(body) < 1024
        assert data["base"] == prev and list(data["services"]) == ["a"] and data["nodes"] == {}
        # an older subscriber (no delta=1) always gets the whole state
        status, headers, body = await _get(srv.port, f"?after={prev}&wait=0", **{"Accept-Encoding": "identity"})
        assert status == 200 and "Content-Encoding" not in headers and "base" not in json.loads(body)
        assert srv.stats.deltas == 1 and srv.stats.snapshots == 2
    finally:
        await srv.stop()


async def test_a_burst_of_publishes_is_one_wake_up() -> None:
    srv = await _server(_st(1, A1), coalesce=0.05)
    try:
        first = srv.state.digest  # type: ignore[union-attr]
        waiting = [asyncio.ensure_future(_get(srv.port, f"?after={first}&wait=5&delta=1")) for _ in range(5)]
        await wait_for(lambda: srv.stats.waiting == 5, what="5 subscribers waiting")
        for v in range(2, 5):
            srv.publish(_st(v, _svc("a", 8080, E(f"a{v}", "10.1.0.9", 80, node="n1"))))
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert srv.stats.wakeups == 1
        last = srv.state.digest  # type: ignore[union-attr]
        assert {json.loads(body)["digest"] for _, _, body in answers} == {last}
        assert srv.stats.publishes == 4  # the first state and the burst
    finally:
        await srv.stop()


async def test_a_delta_that_does_not_give_the_announced_digest_is_refused_then_a_snapshot_is_asked() -> None:
    good = _st(1, A1, B1)
    seen: list[str] = []

    async def lying(request: web.Request) -> web.Response:
        seen.append(request.query.get("after", ""))
        if request.query.get("after"):
            # a "delta" that changes service a but announces another digest
            body = {"base": request.query["after"], "digest": "0" * 16, "version": 2, "nodes": {},
                    "services": {"a": RoutingTable(services=(A2,)).to_dict()["services"][0]}}  # fmt: skip
            return web.json_response(body)
        return web.Response(body=good.wire(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/cluster", lying)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    applied: list[ClusterState] = []
    cli = _client([("127.0.0.1", port)], applied)
    await cli.start()
    try:
        await wait_for(lambda: len(seen) >= 4, what="a few polls")
        assert applied == [good]  # the bad delta was never applied
        assert cli.stats.failures >= 1 and cli.stats.deltas == 0
        # after the refused delta the subscriber asks for everything again
        assert seen[0] == "" and seen[1] == good.digest and "" in seen[2:]
    finally:
        await cli.stop()
        await runner.cleanup()


async def test_subscribers_spread_over_managers_and_a_failed_one_is_left() -> None:
    state = _st(1, A1, B1)
    servers = [await _server(state) for _ in range(3)]
    applied: list[ClusterState] = []
    clients = [_client([s.address for s in servers], applied, seed=i) for i in range(24)]
    for c in clients:
        await c.start()
    try:
        await wait_for(lambda: sum(s.stats.waiting for s in servers) == 24, what="everybody subscribed")
        per = [s.stats.waiting for s in servers]
        assert all(n >= 3 for n in per), per  # a random first manager each: no manager takes them all
        assert len({id(c.state) for c in clients}) == 24 and all(c.state == state for c in clients)
        await servers[0].stop()
        await wait_for(lambda: servers[1].stats.waiting + servers[2].stats.waiting == 24, what="moved over")
    finally:
        for c in clients:
            await c.stop()
        for s in servers:
            await s.stop()
