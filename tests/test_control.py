"""Cluster state, localisation, token file, and the control plane over real sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import random

import aiohttp
import pytest
from aiohttp import web

from cluster.control import ControlClient, ControlServer, backoff_delay
from cluster.state import ClusterState, NodeInfo, localize
from cluster.token import read_token
from mesh.errors import ConfigError
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions, TableError
from tests.util import wait_for

TOKEN = "0123456789abcdef-test-token"


def _table(version: int, *endpoints: Endpoint, port: int = 8080) -> RoutingTable:
    return RoutingTable(
        version=version,
        services=(Service(name="web", routes=(Route(port=port, endpoints=endpoints),), options=ServiceOptions()),),
    )


NODES = (
    NodeInfo("n1", "10.0.0.1", tunnel=7481),
    NodeInfo("n2", "10.0.0.2", tunnel=7481),
    NodeInfo("n3", "10.0.0.3", state="down", tunnel=7481),
    NodeInfo("n4", "10.0.0.4", availability="drain", tunnel=7481),
    NodeInfo("n5", "10.0.0.5", availability="pause", tunnel=7482),
    NodeInfo("n6", "10.0.0.6"),  # no agent announced a tunnel
    NodeInfo("n7", "fd00::7", tunnel=7481),
)


def _state(version: int = 1, *endpoints: Endpoint, nodes: tuple[NodeInfo, ...] = NODES) -> ClusterState:
    return ClusterState(table=_table(version, *endpoints), nodes=nodes)


# ---------------------------------------------------------------------------------------------
# ClusterState


def test_cluster_state_json_round_trip() -> None:
    st = _state(3, Endpoint("t1", "172.18.0.5", 80, node="n1"), Endpoint("t2", "172.18.0.6", 80, node="n2"))
    back = ClusterState.from_json(st.to_json())
    assert back == st
    assert back.digest == st.digest
    assert back.version == 3
    assert st.to_dict()["nodes"]["n1"] == {
        "addr": "10.0.0.1",
        "state": "ready",
        "availability": "active",
        "tunnel": 7481,
    }


def test_cluster_state_digest_ignores_version_and_node_order() -> None:
    a = _state(1, Endpoint("t1", "172.18.0.5", 80, node="n1"))
    b = ClusterState(table=a.table.with_version(99), nodes=tuple(reversed(NODES)))
    assert a.digest == b.digest
    c = ClusterState(table=a.table, nodes=(*NODES[:-1], NodeInfo("n7", "fd00::7", tunnel=9999)))
    assert c.digest != a.digest


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"nodes": {}}, "'table' must be an object"),
        ({"table": {}, "nodes": []}, "'nodes' must be an object"),
        ({"table": {}, "nodes": {"n1": "x"}}, "node 'n1' must be an object"),
        ({"table": {}, "nodes": {"n1": {"addr": "a", "bogus": 1}}}, "unknown fields ['bogus']"),
        ({"table": {}, "nodes": {"n1": {}}}, "node 'n1'"),
        ({"table": {}, "nodes": {"n1": {"addr": "a", "state": "sleepy"}}}, "state must be one of"),
        ({"table": {}, "nodes": {"n1": {"addr": "a", "availability": "x"}}}, "availability must be one of"),
        ({"table": {}, "nodes": {"n1": {"addr": "a", "tunnel": 70000}}}, "tunnel port out of range"),
        ({"table": {"services": [{"name": ""}]}, "nodes": {}}, "malformed routing table"),
    ],
)
def test_cluster_state_rejects_malformed(data: object, message: str) -> None:
    with pytest.raises(TableError) as info:
        ClusterState.from_dict(data)
    assert message in str(info.value)


def test_cluster_state_rejects_non_json() -> None:
    with pytest.raises(TableError, match="not JSON"):
        ClusterState.from_json(b"{nope")


# ---------------------------------------------------------------------------------------------
# localize: table-driven

E = Endpoint
LOCAL = {"a1": "172.17.0.9"}

LOCALIZE_CASES = [
    # (name, endpoints in the cluster table, self node, local addresses, expected endpoints)
    (
        "local task known to the engine becomes direct with the local address",
        [E("a1", "10.255.0.9", 80, node="n1")],
        "n1",
        LOCAL,
        [E("a1", "172.17.0.9", 80, node="n1")],
    ),
    ("local task unknown to the engine is left out", [E("a2", "10.255.0.9", 80, node="n1")], "n1", LOCAL, []),
    (
        "remote task on a ready node goes through that node's tunnel",
        [E("b1", "10.255.0.3", 80, node="n2", weight=3)],
        "n1",
        LOCAL,
        [E("b1", "10.255.0.3", 80, node="n2", weight=3, via="10.0.0.2:7481")],
    ),
    ("remote task on a down node is dropped", [E("c1", "10.255.0.4", 80, node="n3")], "n1", LOCAL, []),
    ("remote task on a drained node is dropped", [E("d1", "10.255.0.5", 80, node="n4")], "n1", LOCAL, []),
    (
        "a paused node keeps its running tasks",
        [E("e1", "10.255.0.6", 80, node="n5")],
        "n1",
        LOCAL,
        [E("e1", "10.255.0.6", 80, node="n5", via="10.0.0.5:7482")],
    ),
    ("a node without an agent tunnel is dropped", [E("f1", "10.255.0.7", 80, node="n6")], "n1", LOCAL, []),
    ("a node missing from the node map is dropped", [E("g1", "10.255.0.8", 80, node="n9")], "n1", LOCAL, []),
    ("an endpoint without a node is dropped", [E("h1", "10.255.0.8", 80)], "n1", LOCAL, []),
    (
        "IPv6 node address is bracketed in via",
        [E("i1", "10.255.0.9", 80, node="n7")],
        "n1",
        LOCAL,
        [E("i1", "10.255.0.9", 80, node="n7", via="[fd00::7]:7481")],
    ),
    (
        "draining state survives localisation, both local and remote",
        [E("a1", "10.255.0.9", 80, node="n1", state="draining"), E("b1", "x", 80, node="n2", state="draining")],
        "n1",
        LOCAL,
        [
            E("a1", "172.17.0.9", 80, node="n1", state="draining"),
            E("b1", "x", 80, node="n2", state="draining", via="10.0.0.2:7481"),
        ],
    ),
    (
        "seen from n2 the same table flips: n1's task is remote, n2's local one unknown there",
        [E("a1", "10.255.0.9", 80, node="n1"), E("b1", "10.255.0.3", 80, node="n2")],
        "n2",
        {"b1": "172.17.0.4"},
        [E("a1", "10.255.0.9", 80, node="n1", via="10.0.0.1:7481"), E("b1", "172.17.0.4", 80, node="n2")],
    ),
    (
        "a drained self node drops its own tasks too",
        [E("d1", "10.255.0.5", 80, node="n4")],
        "n4",
        {"d1": "172.17.0.5"},
        [],
    ),
]


@pytest.mark.parametrize(
    ("endpoints", "self_node", "local", "expected"),
    [c[1:] for c in LOCALIZE_CASES],
    ids=[c[0] for c in LOCALIZE_CASES],
)
def test_localize(endpoints: list[Endpoint], self_node: str, local: dict, expected: list[Endpoint]) -> None:
    st = _state(5, *endpoints)
    out = localize(st, self_node, local)
    assert out.version == 5
    [svc] = out.services
    assert svc.options == st.table.services[0].options
    [route] = svc.routes
    assert route.port == 8080
    assert list(route.endpoints) == expected


def test_localize_task_with_two_ports_keeps_each_routes_port() -> None:
    # one task publishes 80 and 443: the local engine gives one address, each route keeps its target port
    table = RoutingTable(
        version=4,
        services=(
            Service(
                "web",
                (
                    Route(8080, (E("a1", "10.255.0.9", 80, node="n1"),)),
                    Route(8443, (E("a1", "10.255.0.9", 443, node="n1"),)),
                ),
            ),
        ),
    )
    out = localize(ClusterState(table=table, nodes=NODES), "n1", {"a1": "172.17.0.9"})
    [svc] = out.services
    assert [r.endpoints for r in svc.routes] == [
        (E("a1", "172.17.0.9", 80, node="n1"),),
        (E("a1", "172.17.0.9", 443, node="n1"),),
    ]


def test_localize_drains_locally_killed_tasks_only_on_this_node() -> None:
    st = _state(6, E("a1", "10.255.0.9", 80, node="n1"), E("b1", "10.255.0.3", 80, node="n2"))
    # "b1" in draining is ignored: only the engine of n2 may drain it before the manager does
    out = localize(st, "n1", {"a1": "172.17.0.9"}, draining={"a1", "b1"})
    assert out.services[0].routes[0].endpoints == (
        E("a1", "172.17.0.9", 80, node="n1", state="draining"),
        E("b1", "10.255.0.3", 80, node="n2", via="10.0.0.2:7481"),
    )


def test_localize_keeps_empty_routes_and_other_services() -> None:
    table = RoutingTable(
        version=2,
        services=(
            Service("db", (Route(5432, (E("x", "1.1.1.1", 5432, node="n3"),), listen_host="127.0.0.1"),)),
            Service("web", (Route(80, (E("y", "1.1.1.2", 80, node="n2"),)),), ServiceOptions(locality="off")),
        ),
    )
    out = localize(ClusterState(table=table, nodes=NODES), "n1", {})
    assert [s.name for s in out.services] == ["db", "web"]
    assert out.services[0].routes[0].endpoints == ()
    assert out.services[0].routes[0].listen_host == "127.0.0.1"
    assert out.services[1].options.locality == "off"
    assert out.services[1].routes[0].endpoints == (E("y", "1.1.1.2", 80, node="n2", via="10.0.0.2:7481"),)


# ---------------------------------------------------------------------------------------------
# token file


def _write(tmp_path, text: str | bytes, mode: int = 0o600):
    p = tmp_path / "token"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(p, mode)
    return p


def test_read_token_strips_and_accepts_docker_secret_mode(tmp_path) -> None:
    p = _write(tmp_path, f"  {TOKEN}\n", 0o444)
    assert read_token(p) == TOKEN


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        ("", 0o600, "token is empty"),
        (" \n\t", 0o600, "token is empty"),
        ("short", 0o600, "too short (5 characters"),
        ("x" * 2000, 0o600, "too large"),
        ("abcdefgh ijklmnopq", 0o600, "printable ASCII without spaces"),
        ("abcdefghijklmnopqé".encode(), 0o600, "printable ASCII without spaces"),
        (TOKEN, 0o666, "world-writable (mode 666)"),
        (TOKEN, 0o620, "group- or world-writable"),
    ],
)
def test_read_token_rejects(tmp_path, content, mode: int, message: str) -> None:
    p = _write(tmp_path, content, mode)
    with pytest.raises(ConfigError) as info:
        read_token(p)
    assert message in str(info.value)
    assert str(p) in str(info.value)


def test_read_token_missing_file_and_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_token(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token(tmp_path)


# ---------------------------------------------------------------------------------------------
# backoff


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [(0, 0.0, 0.0), (1, 0.0, 0.1), (2, 0.0, 0.2), (3, 0.0, 0.4), (8, 0.0, 10.0), (50, 0.0, 10.0)],
)
def test_backoff_delay_bounds(failures: int, low: float, high: float) -> None:
    rng = random.Random(7)
    delays = [backoff_delay(failures, rng, base=0.1, cap=10.0) for _ in range(400)]
    assert all(low <= d < high or d == high == 0.0 for d in delays)
    if high:
        # full jitter: a herd that failed together is spread over the whole window, not bunched at its end
        assert min(delays) < 0.1 * high and max(delays) > 0.9 * high
        assert 0.4 * high < sum(delays) / len(delays) < 0.6 * high


def test_backoff_delay_is_jittered_deterministically() -> None:
    a = [backoff_delay(4, random.Random(1)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(1)
    seq = [backoff_delay(4, rng) for _ in range(5)]
    assert len(set(seq)) == 5


# ---------------------------------------------------------------------------------------------
# control plane over real sockets


async def _server(state: ClusterState | None = None, token: str = TOKEN, max_wait: float = 25.0) -> ControlServer:
    srv = ControlServer(token, "127.0.0.1", 0, state=state, max_wait=max_wait)
    await srv.start()
    return srv


def _client(managers, applied: list, token: str = TOKEN, **kw) -> ControlClient:
    kw.setdefault("wait", 10.0)
    kw.setdefault("backoff_base", 0.02)
    kw.setdefault("backoff_cap", 0.2)
    return ControlClient(managers, token, applied.append, rng=random.Random(3), **kw)


S1 = _state(1, Endpoint("t1", "172.18.0.5", 80, node="n1"))
S2 = _state(2, Endpoint("t1", "172.18.0.5", 80, node="n1"), Endpoint("t2", "172.18.0.6", 80, node="n2"))


async def test_subscribe_receives_each_published_version() -> None:
    srv = await _server()
    applied: list[ClusterState] = []
    cli = _client([srv.address], applied)
    await cli.start()
    try:
        # Nothing is published yet: the subscriber waits, and applies nothing.
        await wait_for(lambda: srv.stats.requests >= 1, what="first poll")
        assert applied == []
        srv.publish(S1)
        await wait_for(lambda: len(applied) == 1, what="v1 applied")
        assert applied[0] == S1
        assert cli.state == S1
        srv.publish(S2)
        await wait_for(lambda: len(applied) == 2, what="v2 applied")
        assert applied[1] == S2
        # Republishing equal content (another version number) wakes nobody.
        assert srv.publish(S2.__class__(table=S2.table.with_version(3), nodes=S2.nodes)) is False
        assert srv.stats.unauthorized == 0
        assert cli.manager == srv.address
    finally:
        await cli.stop()
        await srv.stop()
    assert len(applied) == 2
    assert cli.stats.failures == 0


async def test_async_on_state_is_awaited_and_errors_do_not_stop_the_client(caplog) -> None:
    srv = await _server(S1)
    seen: list[int] = []

    async def on_state(st: ClusterState) -> None:
        await asyncio.sleep(0)
        seen.append(st.version)
        if st.version == 1:
            raise RuntimeError("apply failed")

    cli = ControlClient([srv.address], TOKEN, on_state, wait=10.0, rng=random.Random(1))
    await cli.start()
    try:
        await wait_for(lambda: seen == [1], what="v1 seen")
        srv.publish(S2)
        await wait_for(lambda: seen == [1, 2], what="v2 seen")
    finally:
        await cli.stop()
        await srv.stop()
    assert "applying cluster state" in caplog.text


async def test_wrong_token_is_401_and_nothing_is_applied(caplog) -> None:
    srv = await _server(S1)
    applied: list[ClusterState] = []
    cli = _client([srv.address], applied, token="wrong-token-0123456789")
    caplog.set_level(logging.ERROR, logger="cluster.control")
    await cli.start()
    try:
        await wait_for(lambda: cli.stats.unauthorized >= 2, what="two 401s")
    finally:
        await cli.stop()
        await srv.stop()
    assert applied == []
    assert cli.state is None
    assert srv.stats.unauthorized >= 2
    assert srv.stats.changed == 0
    assert "rejected our token" in caplog.text


@pytest.mark.parametrize(
    ("headers", "query", "status"),
    [
        ({}, "", 401),
        ({"Authorization": TOKEN}, "", 401),
        ({"Authorization": f"Basic {TOKEN}"}, "", 401),
        ({"Authorization": f"Bearer {TOKEN}x"}, "", 401),
        ({"Authorization": f"Bearer {TOKEN}"}, "?wait=abc", 400),
        ({"Authorization": f"Bearer {TOKEN}"}, "?wait=-1", 400),
        ({"Authorization": f"Bearer {TOKEN}"}, "?wait=inf", 400),
        ({"Authorization": f"Bearer {TOKEN}"}, "?after=" + "a" * 200, 400),
        ({"Authorization": f"bearer {TOKEN}"}, "", 200),
        ({"Authorization": f"Bearer {TOKEN}"}, f"?after={S1.digest}&wait=0", 204),
        ({"Authorization": f"Bearer {TOKEN}"}, "?after=other&wait=0", 200),
    ],
)
async def test_server_request_checks(headers: dict, query: str, status: int) -> None:
    srv = await _server(S1)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{srv.port}/v1/cluster{query}", headers=headers) as r,
        ):
            assert r.status == status
            if status == 200:
                body = await r.json()
                assert body["digest"] == S1.digest
                assert ClusterState.from_dict(body) == S1
            if status == 401:
                assert r.headers["WWW-Authenticate"] == "Bearer"
    finally:
        await srv.stop()


async def test_server_rejects_oversized_headers() -> None:
    srv = await _server(S1)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://127.0.0.1:{srv.port}/v1/cluster",
                headers={"Authorization": f"Bearer {TOKEN}", "X-Big": "y" * 10000},
            ) as r,
        ):
            assert r.status in (400, 431)
        assert srv.stats.changed == 0
    finally:
        await srv.stop()


async def test_long_poll_times_out_with_204_and_stop_answers_waiters_with_503() -> None:
    srv = await _server(S1, max_wait=0.2)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
            # wait above max_wait is capped by the server.
            async with s.get(f"http://127.0.0.1:{srv.port}/v1/cluster?after={S1.digest}&wait=60") as r:
                assert r.status == 204
            assert srv.stats.unchanged == 1
            srv.max_wait = 30.0
            req = asyncio.ensure_future(s.get(f"http://127.0.0.1:{srv.port}/v1/cluster?after={S1.digest}"))
            await wait_for(lambda: srv.stats.requests == 2, what="second request waiting")
            await srv.stop()
            r = await asyncio.wait_for(req, 5)
            assert r.status == 503
            r.release()
    finally:
        await srv.stop()


async def test_failover_keeps_last_state_and_dedupes_equal_states() -> None:
    # Both managers see the same swarm: equal content, different version numbers.
    srv1 = await _server(S1)
    srv2 = await _server(ClusterState(table=S1.table.with_version(7), nodes=S1.nodes))
    applied: list[ClusterState] = []
    cli = _client([srv1.address, srv2.address], applied)
    await cli.start()
    try:
        await wait_for(lambda: len(applied) == 1, what="first state")
        assert cli.manager == srv1.address
        await srv1.stop()
        # Manager 2 is asked next; it holds an equal state, so it waits instead of answering.
        await wait_for(lambda: srv2.stats.requests >= 1, what="failover to manager 2")
        assert applied == [S1]
        assert cli.state == S1
        assert cli.stats.failovers >= 1
        srv2.publish(S2.__class__(table=S2.table.with_version(8), nodes=S2.nodes))
        await wait_for(lambda: len(applied) == 2, what="v2 from manager 2")
        assert applied[1].digest == S2.digest
        assert cli.manager == srv2.address
        assert srv2.stats.changed == 1
    finally:
        await cli.stop()
        await srv2.stop()


async def test_no_manager_answers_keeps_last_state_then_recovers() -> None:
    srv = await _server(S1)
    port = srv.port
    applied: list[ClusterState] = []
    cli = _client([("127.0.0.1", port)], applied)
    await cli.start()
    try:
        await wait_for(lambda: len(applied) == 1, what="first state")
        await srv.stop()
        await wait_for(lambda: cli.stats.failures >= 3, what="repeated failures")
        assert cli.state == S1
        assert applied == [S1]
        # A manager comes back on the same address with a new state.
        srv = ControlServer(TOKEN, "127.0.0.1", port, state=S2)
        await srv.start()
        await wait_for(lambda: len(applied) == 2, timeout=10, what="recovered")
        assert applied[1] == S2
    finally:
        await cli.stop()
        await srv.stop()


async def test_manager_provider_is_asked_each_attempt_and_bad_state_fails_over(caplog) -> None:
    srv = await _server(S2)
    managers: list[tuple[str, int]] = []
    applied: list[ClusterState] = []

    # A "manager" that answers 200 with garbage: the client must not apply it and must move on.
    async def bad(request: web.Request) -> web.Response:
        return web.json_response({"digest": "zzz", "table": {"services": [{"name": ""}]}, "nodes": {}})

    app = web.Application()
    app.router.add_get("/v1/cluster", bad)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bad_port = site._server.sockets[0].getsockname()[1]

    calls = 0

    def provider() -> list[tuple[str, int]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("engine socket is away")
        return managers

    cli = _client(provider, applied)
    await cli.start()
    try:
        await wait_for(lambda: cli.stats.failures >= 2, what="provider failed, then no managers yet")
        managers.append(("127.0.0.1", bad_port))
        # the bad manager's answer is logged and skipped (the list is [bad] until then: the client starts at a
        # random manager of its list)
        await wait_for(lambda: "malformed routing table" in caplog.text, what="bad state refused")
        assert applied == []
        managers.append(srv.address)
        await wait_for(lambda: len(applied) == 1, what="state from the good manager")
        assert applied == [S2]
        assert cli.manager == srv.address
        assert "listing managers failed" in caplog.text
        assert "malformed routing table" in caplog.text  # the bad manager's answer, logged and skipped
    finally:
        await cli.stop()
        await srv.stop()
        await runner.cleanup()
