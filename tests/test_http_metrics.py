"""Observability of the HTTP front: /metrics (mesh_http_* series), /v1/table and the dashboard view of http
routes, and the per-request access log, after known real traffic through a real ``Mesh`` on loopback.

Replicas are ``tests.httpbackend.HttpBackend`` (real sockets, raw HTTP/1.1); clients send raw bytes
(``httpbackend.Client``) so every request, connection and retry is known and the counts are exact.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from mesh.admin import AdminServer, MeshState, openmetrics_from_text
from mesh.logs import setup_logging
from mesh.metrics import merge_snapshots, render_text, snapshot
from mesh.proxy.http import HTTP_BUCKETS
from mesh.routing import Endpoint, Match, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import Mesh
from tests.httpbackend import LIVE, Client, HttpBackend
from tests.test_admin import Agent
from tests.util import reserved_port, wait_for


@pytest.fixture(autouse=True)
async def _close_backends():
    yield
    for b in list(LIVE):
        await b.close()


def parse(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def L(**kw) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in kw.items()))


def service(name: str, port: int, backends, hosts=(), paths=(), **opts) -> Service:
    eps = tuple(Endpoint(f"{name}-{b.name}", "127.0.0.1", b.port) for b in backends)
    return Service(
        name,
        (Route(port, eps, "127.0.0.1", protocol="http", match=Match(hosts=tuple(hosts), paths=tuple(paths))),),
        ServiceOptions(**opts),
    )


async def serve(mesh: Mesh, make) -> int:
    """Apply the services ``make(port)`` returns on one http port (port 0 first, then the bound one)."""
    first = make(0)
    await mesh.apply(RoutingTable(1, (first[0],)))
    port = mesh.listeners()[0].port
    await mesh.apply(RoutingTable(2, tuple(make(port))))
    return port


def req(method: str, path: str, host: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def exchange(c: Client, method: str, path: str, host: str) -> int:
    await c.send(req(method, path, host))
    resp = await c.response(head=method == "HEAD")
    return resp.status


class Traffic:
    """One port with three http services and a known sequence of requests (the numbers tests check):

    - ``shop`` (shop.example.com, replica ``a``): GET /echo x5, GET /status/404 x2, POST /echo x1,
      HEAD /echo x1 on one client connection: one upstream connection opened, reused 8 times.
    - ``flaky`` (flaky.example.com, replica ``b`` that drops every reused connection): GET x2; the second
      goes out on the pooled connection, which the replica closes, so it is retried once (reused_closed)
      on a new connection.
    - ``empty`` (empty.example.com, no endpoint): GET x1 -> 503 no_endpoint, made by the mesh.
    - other.example.com: GET x1 -> 404 no_route, before any route (the listener's counter).
    """

    SHOP, FLAKY, EMPTY, UNROUTED = 9, 2, 1, 1

    def __init__(self, **mesh_opts) -> None:
        self.mesh = Mesh(**mesh_opts)
        self.port = 0

    async def start(self) -> Traffic:
        self.a = await HttpBackend("a").start()
        self.b = await HttpBackend("b", drop_reused=True).start()
        self.port = await serve(
            self.mesh,
            lambda p: [
                service("empty", p, [], hosts=["empty.example.com"]),
                service("flaky", p, [self.b], hosts=["flaky.example.com"], retries=0),
                service("shop", p, [self.a], hosts=["shop.example.com"]),
            ],
        )
        return self

    async def run(self) -> None:
        async with Client(self.port) as c:
            got = [await exchange(c, "GET", "/echo", "shop.example.com") for _ in range(5)]
            got += [await exchange(c, "GET", "/status/404", "shop.example.com") for _ in range(2)]
            await c.send(b"POST /echo HTTP/1.1\r\nHost: shop.example.com\r\nContent-Length: 3\r\n\r\nabc")
            got.append((await c.response()).status)
            got.append(await exchange(c, "HEAD", "/echo", "shop.example.com"))
            got += [await exchange(c, "GET", "/echo", "flaky.example.com") for _ in range(2)]
            got.append(await exchange(c, "GET", "/", "empty.example.com"))
            got.append(await exchange(c, "GET", "/", "other.example.com"))
        assert got == [200] * 5 + [404, 404, 200, 200, 200, 200, 503, 404]
        assert len(self.b.dropped) == 1 and len(self.b.requests) == 2

    async def close(self) -> None:
        await self.mesh.shutdown(1)


async def test_http_metrics_exact_after_known_traffic():
    t = await Traffic().start()
    try:
        await t.run()
        snap = snapshot(t.mesh)
        json.dumps(snap)  # what a worker sends over its pipe
        text = render_text(merge_snapshots([snap]))
        m = parse(text)
    finally:
        await t.close()
    # the OpenMetrics form (what Prometheus asks for first) passes prometheus_client's strict parser
    om = {f.name: f.type for f in openmetrics_families(openmetrics_from_text(text.encode()).decode())}
    assert om["mesh_http_requests"] == "counter" and om["mesh_http_request_duration_seconds"] == "histogram"
    shop, flaky, empty = (dict(service=s, port=t.port) for s in ("shop", "flaky", "empty"))
    assert m["mesh_http_requests_total"] == {
        L(**shop, method="GET", code_class="2xx"): 5,
        L(**shop, method="GET", code_class="4xx"): 2,
        L(**shop, method="POST", code_class="2xx"): 1,
        L(**shop, method="HEAD", code_class="2xx"): 1,
        L(**flaky, method="GET", code_class="2xx"): 2,
        L(**empty, method="GET", code_class="5xx"): 1,
    }
    assert m["mesh_http_requests_active"] == {L(**shop): 0, L(**flaky): 0, L(**empty): 0}
    assert m["mesh_http_requests_queued"] == {L(**shop): 0, L(**flaky): 0, L(**empty): 0}
    assert m["mesh_http_retries_total"] == {L(**flaky, reason="reused_closed"): 1}
    assert m["mesh_http_upstream_requests_total"] == {
        L(**shop, connection="new"): 1,
        L(**shop, connection="reused"): 8,
        L(**flaky, connection="new"): 2,
        L(**flaky, connection="reused"): 1,
        L(**empty, connection="new"): 0,
        L(**empty, connection="reused"): 0,
    }
    assert m["mesh_http_generated_responses_total"] == {L(**empty, status=503, reason="no_endpoint"): 1}
    assert m["mesh_http_upgrades_total"] == {L(**shop): 0, L(**flaky): 0, L(**empty): 0}
    lst = dict(port=t.port, listen_host="127.0.0.1")
    assert m["mesh_http_listener_requests_total"] == {L(**lst): 13}
    assert m["mesh_http_unrouted_total"] == {L(**lst, status=404, reason="no_route"): 1}
    # histograms: one duration per finished request, one upstream time per response head received
    assert m["mesh_http_request_duration_seconds_count"] == {L(**shop): 9, L(**flaky): 2, L(**empty): 1}
    assert m["mesh_http_upstream_response_seconds_count"] == {L(**shop): 9, L(**flaky): 2, L(**empty): 0}
    buckets = {k for k in m["mesh_http_request_duration_seconds_bucket"] if dict(k)["service"] == "shop"}
    assert len(buckets) == len(HTTP_BUCKETS) + 1
    assert m["mesh_http_request_duration_seconds_bucket"][L(**shop, le="+Inf")] == 9
    assert m["mesh_http_request_duration_seconds_bucket"][L(**shop, le="0.0001")] <= 9
    assert 0 < m["mesh_http_request_duration_seconds_sum"][L(**shop)] < 5
    # the connection series of http routes: requests routed, upstream connections opened
    assert m["mesh_connections_accepted_total"] == {L(**shop): 9, L(**flaky): 2, L(**empty): 1}
    ep_a = dict(**shop, endpoint="shop-a")
    assert m["mesh_upstream_connections_total"][L(**ep_a)] == 1
    # no path, host or client label anywhere in the http families
    labels = {k for name, rows in m.items() if name.startswith("mesh_http_") for row in rows for k, _ in row}
    assert labels <= {"service", "port", "method", "code_class", "reason", "status", "connection", "le", "listen_host"}


async def test_http_metrics_merge_across_processes():
    """Two processes' snapshots (here the same process twice, as the parent of --workers N merges them):
    counters, histograms and gauges add up; the listener counters too."""
    t = await Traffic().start()
    try:
        await t.run()
        snap = json.loads(json.dumps(snapshot(t.mesh)))
    finally:
        await t.close()
    one = parse(render_text(merge_snapshots([snap])))
    two = parse(render_text(merge_snapshots([snap, json.loads(json.dumps(snap))])))
    for name in (
        "mesh_http_requests_total",
        "mesh_http_retries_total",
        "mesh_http_upstream_requests_total",
        "mesh_http_generated_responses_total",
        "mesh_http_listener_requests_total",
        "mesh_http_unrouted_total",
        "mesh_http_request_duration_seconds_bucket",
        "mesh_http_request_duration_seconds_count",
        "mesh_http_upstream_response_seconds_count",
    ):
        assert two[name] == {k: 2 * v for k, v in one[name].items()}, name


async def test_v1_table_and_dashboard_show_http_routes_with_rules_and_stats():
    t = await Traffic().start()
    server = AdminServer(MeshState(t.mesh), "127.0.0.1", 0)
    await server.start()
    try:
        await t.run()
        base = f"http://127.0.0.1:{server.address[1]}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/v1/table") as r:
                doc = await r.json()
            async with s.get(base + "/v1/dashboard") as r:
                view = await r.json()
    finally:
        await server.stop()
        await t.close()
    routes = {svc["name"]: svc["routes"][0] for svc in doc["services"]}
    shop = routes["shop"]
    assert shop["protocol"] == "http"
    assert shop["match"] == {"hosts": ["shop.example.com"], "paths": []}
    h = shop["runtime"]["http"]
    assert h["requests"] == 9
    assert h["by_class"] == {"1xx": 0, "2xx": 7, "3xx": 0, "4xx": 2, "5xx": 0}
    assert h["by_method"] == {"GET": 7, "HEAD": 1, "POST": 1}
    assert (h["active"], h["queued"], h["upstream_reused"], h["upstream_new"]) == (0, 0, 8, 1)
    assert h["duration_mean_seconds"] > 0
    assert routes["flaky"]["runtime"]["http"]["retries_by_reason"] == {"reused_closed": 1}
    assert routes["empty"]["runtime"]["http"]["generated"] == {"503 no_endpoint": 1}
    listeners = {x["service"]: x for x in doc["runtime"]["listeners"]}
    assert listeners["shop"]["hosts"] == ["shop.example.com"] and listeners["shop"]["paths"] == []
    (hp,) = doc["runtime"]["http_ports"]
    assert (hp["port"], hp["bound_port"], hp["requests"], hp["unrouted"]) == (t.port, t.port, 13, {"404 no_route": 1})
    assert hp["routes"] == [
        {"service": "empty", "hosts": ["empty.example.com"], "paths": []},
        {"service": "flaky", "hosts": ["flaky.example.com"], "paths": []},
        {"service": "shop", "hosts": ["shop.example.com"], "paths": []},
    ]

    svcs = {s["name"]: s for s in view["services"]}
    sh = svcs["shop"]["http"]
    assert sh["requests"] == 9 and sh["by_class"]["4xx"] == 2 and sh["active"] == 0
    assert sh["hosts"] == ["shop.example.com"] and sh["paths"] == []
    assert svcs["empty"]["http"]["by_class"]["5xx"] == 1
    assert "http" not in svcs["shop"]["replicas"][0]


async def test_access_log_one_line_per_request_text_and_json():
    for fmt in ("text", "json"):
        buf = io.StringIO()
        handler = setup_logging("warning", fmt, buf, access_log=True)
        t = await Traffic(access_log=True).start()
        try:
            await t.run()
        finally:
            await t.close()
            logging.getLogger().removeHandler(handler)
            setup_logging("warning", "text", io.StringIO())
        lines = [x for x in buf.getvalue().splitlines() if "mesh.access" in x]
        assert len(lines) == 13, buf.getvalue()
        if fmt == "json":
            rows = [json.loads(x) for x in lines]
            for r in rows:
                assert {"ts", "client", "host", "method", "path", "status", "sent_bytes", "duration_seconds",
                        "endpoint", "retries", "service", "port"} <= r.keys(), r  # fmt: skip
                assert r["client"].startswith("127.0.0.1:") and r["port"] == t.port
            flaky = [r for r in rows if r["service"] == "flaky"]
            assert [(r["status"], r["retries"], r["endpoint"]) for r in flaky] == [
                (200, 0, "flaky-b"),
                (200, 1, "flaky-b"),
            ]
            unrouted = [r for r in rows if r["host"] == "other.example.com"]
            assert [(r["service"], r["status"], r["endpoint"]) for r in unrouted] == [("-", 404, "-")]
            post = next(r for r in rows if r["method"] == "POST")
            assert (post["path"], post["status"], post["host"]) == ("/echo", 200, "shop.example.com")
            assert post["sent_bytes"] > 0 and post["duration_seconds"] > 0
        else:
            empty = next(x for x in lines if "host=empty.example.com" in x)
            for field in ("method=GET", "path=/", "status=503", "service=empty", "endpoint=-", "retries=0",
                          "client=127.0.0.1:", "sent_bytes=", "duration_seconds="):  # fmt: skip
                assert field in empty, empty
            assert empty[:4].isdigit() and "Z " in empty[:30]  # UTC time first


@pytest.mark.uvloop_only
async def test_agent_with_two_workers_merges_http_series(tmp_path):
    """``mesh run --workers 2`` with an http service: the parent's /metrics sums both workers' requests."""
    a = await HttpBackend("a").start()
    listen = contextlib.ExitStack()
    port = listen.enter_context(reserved_port())
    agent = Agent(
        tmp_path,
        f"services:\n  shop:\n    listen: 127.0.0.1:{port}\n    protocol: http\n"
        f"    endpoints: ['127.0.0.1:{a.port}']\n",
        "--workers",
        "2",
    )
    await agent.start()
    try:

        async def ready() -> bool:
            return (await agent.get("/readyz"))[0] == 200

        await wait_for(ready, timeout=20, what="/readyz 200")
        n = 40
        for _ in range(n):  # a connection each: SO_REUSEPORT spreads them over the workers
            async with Client(port) as c:
                assert await exchange(c, "GET", "/echo", "x.example.com") == 200
        last: dict = {}

        async def counted() -> bool:
            status, body = await agent.get("/metrics")
            assert status == 200
            last.clear()
            last.update(parse(body))
            return last.get("mesh_http_requests_total", {}).get(
                L(service="shop", port=port, method="GET", code_class="2xx")) == n  # fmt: skip

        await wait_for(counted, timeout=10, what=f"{n} requests in /metrics")
        assert last["mesh_data_plane_processes"] == {(): 2}
        assert last["mesh_http_listener_requests_total"] == {L(port=port, listen_host="127.0.0.1"): n}
        assert last["mesh_http_request_duration_seconds_count"] == {L(service="shop", port=port): n}
    finally:
        rc = await agent.stop()
        listen.close()
    assert rc == 0, agent.log.read_text()[-3000:]


async def test_incoming_proxy_header_counters_are_exported_per_listener():
    """``accept_proxy`` on an http port: accepted headers and refusals (missing, bad) are exported per
    listener (mesh_inbound_proxy_*); a port without accept_proxy exports nothing of the kind."""
    from mesh.proxyproto import encode_v1

    a = await HttpBackend("a").start()
    mesh = Mesh()
    try:
        port = await serve(mesh, lambda p: [service("shop", p, [a], accept_proxy=("127.0.0.0/8",))])
        plain = await serve_more(mesh, service("plain", 0, [a]))
        header = encode_v1(("203.0.113.7", 40000), ("127.0.0.1", port))
        for first in (header + req("GET", "/echo", "x"), req("GET", "/echo", "x"), b"PROXY TCP4 1.2.3.4 nope 1 2\r\n"):
            async with Client(port) as c:
                await c.send(first)
                if first.startswith(header):
                    assert (await c.response()).status == 200
                else:
                    assert await c.closed()
        async with Client(plain) as c:
            assert await exchange(c, "GET", "/echo", "x") == 200
        (site,) = [x for x in mesh.listeners() if x.port == port]
        await wait_for(lambda: sum(site.inbound_stats.closed.values()) == 2, what="two refusals")
        m = parse(render_text(merge_snapshots([snapshot(mesh)])))
    finally:
        await mesh.shutdown(1)
    lst = dict(port=port, listen_host="127.0.0.1")
    assert m["mesh_inbound_proxy_headers_total"] == {L(**lst): 1}
    assert m["mesh_inbound_proxy_closed_total"] == {
        L(**lst, reason="missing_header"): 1,
        L(**lst, reason="bad_header"): 1,
        L(**lst, reason="timeout"): 0,
        L(**lst, reason="untrusted_header"): 0,
        L(**lst, reason="incomplete"): 0,
    }


async def serve_more(mesh: Mesh, svc: Service) -> int:
    """Add ``svc`` (port 0) to the mesh's table; return the port its new listener got."""
    before = set(id(x) for x in mesh.listeners())
    await mesh.apply(RoutingTable(mesh.table.version + 1, (*mesh.table.services, svc)))
    (new,) = [x for x in mesh.listeners() if id(x) not in before]
    return new.port
