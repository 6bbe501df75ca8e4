"""mesh/admin.py over HTTP: /metrics after known traffic (exact counters), OpenMetrics on Accept, /readyz,
/v1/table, /healthz, /, extra JSON views, a taken admin port, address parsing.

Everything is real: backends and listeners on 127.0.0.1 port 0, the proxy carrying the traffic, the admin
server scraped with an aiohttp client and the exposition parsed with prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.admin import AdminServer, MeshState, openmetrics_from_text, parse_admin_address, table_with_runtime
from mesh.dashboard import add_rates, build_view
from mesh.errors import ConfigError
from mesh.listener import Listener
from mesh.metrics import REMOVED_ENDPOINT, DiscoveryMetrics, StatsReader, make_registry, merge_snapshots
from mesh.pool import Pool
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import Mesh
from tests.backends import Backend, closed_port
from tests.util import reserved_port, wait_for


class Plane:
    """The real single-process data plane (``mesh.runtime.Mesh``) and its admin state."""

    def __init__(self) -> None:
        self.mesh = Mesh()

    @property
    def table(self) -> RoutingTable | None:
        return self.mesh.table

    async def apply(self, table: RoutingTable) -> None:
        await self.mesh.apply(table)

    def state(self) -> MeshState:
        return MeshState(self.mesh)

    async def drained(self) -> None:
        """Every proxied connection closed (their bytes are flushed to the stats at close)."""
        await wait_for(lambda: self.mesh.connections() == 0, what=f"connections of {self.mesh!r} to close")

    async def close(self) -> None:
        await self.drained()
        await self.mesh.shutdown(1.0)

    def bound_port(self, service: str) -> int:
        """The port ``service``'s listener is bound to (the tests' routes listen on port 0: any free port)."""
        (lst,) = [lst for lst in self.mesh.listeners() if lst.service == service]
        assert lst.listening and lst.port != 0
        return lst.port


def table_for(version: int, ports: dict[str, tuple[int, list[int]]], **opts) -> RoutingTable:
    """{service: (listen port, [backend ports])} -> a table on 127.0.0.1."""
    return RoutingTable(
        version=version,
        services=tuple(
            Service(
                name,
                (
                    Route(
                        port=lp,
                        listen_host="127.0.0.1",
                        endpoints=tuple(
                            Endpoint(id=f"{name}-{i}", address="127.0.0.1", port=bp, node="n1")
                            for i, bp in enumerate(bports)
                        ),
                    ),
                ),
                ServiceOptions(**opts),
            )
            for name, (lp, bports) in ports.items()
        ),
    )


async def get(server: AdminServer, path: str) -> tuple[int, str, str]:
    host, port = server.address
    async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}{path}") as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


def parse(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def L(**kw) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in kw.items()))


async def echo(port: int, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    await w.drain()
    got = await asyncio.wait_for(r.readexactly(len(payload)), 5)
    w.close()
    await w.wait_closed()
    return got


async def test_metrics_after_known_traffic_exact():
    b1, b2 = await Backend("a").start(), await Backend("b").start()
    plane = Plane()
    dead = closed_port()
    # round-robin over two live backends; a third service whose only endpoint refuses
    await plane.apply(table_for(3, {"web": (0, [b1.port, b2.port]), "down": (0, [dead])}, retries=0))
    lp, down_port = plane.bound_port("web"), plane.bound_port("down")
    disc = DiscoveryMetrics()
    disc.event("container", "start")
    disc.lag(0.2)
    server = AdminServer(plane.state(), port=0, registry=make_registry(discovery=disc))
    await server.start()
    try:
        payload = bytes(range(256)) * 4  # 1024 bytes each way
        for _ in range(5):
            assert await echo(lp, payload) == payload
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", down_port)
            assert await asyncio.wait_for(r.read(), 5) == b""  # closed: the connect was refused
            w.close()
        await plane.drained()
        status, ctype, body = await get(server, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        m = parse(body)
        # The port label is the route's port in the table (0 here, any free port), not the bound one.
        web = {"service": "web", "port": 0}
        assert m["mesh_connections_accepted_total"][L(**web)] == 5
        per_ep = m["mesh_upstream_connections_total"]
        assert per_ep[L(**web, endpoint="web-0")] + per_ep[L(**web, endpoint="web-1")] == 5
        assert {per_ep[L(**web, endpoint="web-0")], per_ep[L(**web, endpoint="web-1")]} == {2, 3}
        for name in ("mesh_received_bytes_total", "mesh_sent_bytes_total"):
            assert m[name][L(**web, endpoint="web-0")] == 1024 * per_ep[L(**web, endpoint="web-0")]
            assert m[name][L(**web, endpoint="web-1")] == 1024 * per_ep[L(**web, endpoint="web-1")]
        assert sum(v for k, v in m["mesh_upstream_connect_seconds_count"].items() if ("service", "web") in k) == 5
        assert sum(v for k, v in m["mesh_connection_duration_seconds_count"].items() if ("service", "web") in k) == 5
        assert m["mesh_connections_active"][L(**web, endpoint="web-0")] == 0
        assert m["mesh_endpoint_up"][L(**web, endpoint="web-1")] == 1
        assert m["mesh_healthy_endpoints"][L(**web)] == 2
        assert m["mesh_listener_up"][L(**web)] == 1
        down = {"service": "down", "port": 0}
        assert m["mesh_connections_accepted_total"][L(**down)] == 2
        assert m["mesh_upstream_connect_failures_total"][L(**down, reason="refused")] == 2
        assert m["mesh_upstream_connections_total"][L(**down, endpoint="down-0")] == 0
        assert m["mesh_connections_failed_total"][L(**web, reason="no_endpoint")] == 0
        assert m["mesh_table_version"] == {(): 3}
        assert m["mesh_discovery_events_total"] == {L(type="container", action="start"): 1}
        assert m["mesh_discovery_lag_seconds_count"] == {(): 1}
        assert "process_open_fds" in m
    finally:
        await server.stop()
        await plane.close()
        await b1.close()
        await b2.close()


async def test_readyz_flips_when_the_first_table_is_applied():
    b = await Backend().start()
    plane = Plane()
    server = AdminServer(plane.state(), port=0)
    await server.start()
    try:
        status, _, body = await get(server, "/readyz")
        assert status == 503 and "no routing table" in body
        status, _, _ = await get(server, "/v1/table")
        assert status == 503
        assert (await get(server, "/healthz"))[0] == 200
        await plane.apply(table_for(1, {"web": (0, [b.port])}))
        status, _, body = await get(server, "/readyz")
        assert status == 200 and '"table_version": 1' in body
    finally:
        await server.stop()
        await plane.close()
        await b.close()


async def test_v1_table_matches_the_applied_table_with_runtime():
    import json

    b = await Backend().start()
    plane = Plane()
    table = table_for(9, {"web": (0, [b.port, closed_port()])}, balance="least-conn")
    await plane.apply(table)
    lp = plane.bound_port("web")
    server = AdminServer(plane.state(), port=0)
    await server.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", lp)  # one connection held open
        w.write(b"ping")
        await asyncio.wait_for(r.readexactly(4), 5)
        status, ctype, body = await get(server, "/v1/table")
        assert status == 200 and ctype.startswith("application/json")
        doc = json.loads(body)
        runtime = doc.pop("runtime")
        assert runtime["applied_version"] == 9 and runtime["processes"] == 1
        # the port each listener is bound to: configured 0 (any free port), bound lp
        assert runtime["listeners"] == [
            {"service": "web", "protocol": "tcp", "listen_host": "127.0.0.1", "port": 0, "bound_port": lp,
             "listening": True}
        ]  # fmt: skip
        ep_rt = {}
        for svc in doc["services"]:
            for route in svc["routes"]:
                route_rt = route.pop("runtime")
                assert route_rt["listening"] is True and route_rt["accepted"] == 1
                assert route_rt["bound_port"] == lp
                for ep in route["endpoints"]:
                    ep_rt[ep["id"]] = ep.pop("runtime")
        assert doc == table.to_dict()  # what remains is exactly the configured table
        live = ep_rt["web-0"] if ep_rt["web-0"]["active_connections"] else ep_rt["web-1"]
        assert live["active_connections"] == 1 and live["up"] is True and live["health"] == []
        w.close()
        await w.wait_closed()
    finally:
        await server.stop()
        await plane.close()
        await b.close()


async def test_index_lists_endpoints_and_metrics_can_be_off():
    plane = Plane()
    server = AdminServer(plane.state(), port=0, metrics=False)
    await server.start()
    try:
        status, _, body = await get(server, "/")
        assert status == 200
        for path in ("/metrics", "/healthz", "/readyz", "/v1/table"):
            assert f'"{path}"' in body
        status, _, body = await get(server, "/metrics")
        assert status == 404 and "--no-metrics" in body
    finally:
        await server.stop()


async def test_taken_admin_port_is_a_clear_config_error():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        server = AdminServer(Plane().state(), port=port)
        with pytest.raises(ConfigError, match=rf"admin address 127\.0\.0\.1:{port} is in use .*--admin"):
            await server.start()
        await server.stop()  # nothing to stop: harmless
    finally:
        holder.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9901", ("127.0.0.1", 9901)),
        ("9901", ("127.0.0.1", 9901)),
        (":9901", ("127.0.0.1", 9901)),
        ("0.0.0.0:9901", ("0.0.0.0", 9901)),
        ("[::1]:9901", ("::1", 9901)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_admin_address(text, expected):
    assert parse_admin_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:http", "port must be a number"),
        ("127.0.0.1:70000", "port must be a number within 0..65535"),
        ("::1:9901", "IPv6 as '\\[address\\]:port'"),
        ("[::1]9901", "expected '\\[address\\]:port'"),
        ("", "port must be a number"),
    ],
)
def test_parse_admin_address_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_admin_address(text)


def test_table_with_runtime_marks_unknown_routes_and_departed_hosts():
    pool = Pool(
        "web",
        Route(port=80, endpoints=(Endpoint("a", "10.0.0.1", 80), Endpoint("b", "10.0.0.2", 80))),
        ServiceOptions(),
    )
    listeners = [Listener("127.0.0.1", 80, pool, service="web")]
    reader = StatsReader(lambda: listeners)
    reader.snapshot()
    gone = pool.hosts[1]
    gone.active = 2
    pool.update(Route(port=80, endpoints=(Endpoint("a", "10.0.0.1", 80),)), ServiceOptions())
    table = RoutingTable(
        version=2,
        services=(
            Service("web", (Route(port=80, endpoints=(Endpoint("a", "10.0.0.1", 80),)),)),
            Service("new", (Route(port=81, endpoints=(Endpoint("c", "10.0.0.3", 80),)),)),
        ),
    )
    doc = table_with_runtime(table, merge_snapshots([reader.snapshot()]), now=5.0)
    new_route = doc["services"][0]["routes"][0]
    assert new_route["runtime"] is None and new_route["endpoints"][0]["runtime"] is None
    web_rt = doc["services"][1]["routes"][0]["runtime"]
    assert web_rt["listening"] is False
    assert [(d["id"], d["runtime"]["active_connections"], d["runtime"]["up"]) for d in web_rt["departed"]] == [
        ("b", 2, False)
    ]
    assert doc["runtime"]["generated_at"] == 5.0


def _cli_env() -> dict:
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_exits_2_with_a_clear_message_when_the_admin_port_is_taken(tmp_path, workers):
    import subprocess
    import sys

    if workers == 1:
        pytest.importorskip("mesh.runtime", reason="the CLI's single-process path needs mesh/runtime.py")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    listen = contextlib.ExitStack()
    # one process: any free port; --workers 2 cannot share port 0, so a held fixed one
    lp = 0 if workers == 1 else listen.enter_context(reserved_port())
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(f"services:\n  web:\n    listen: 127.0.0.1:{lp}\n    endpoints: ['127.0.0.1:{closed_port()}']\n")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "meshagent", "run", "--config", str(cfg), "--admin", f"127.0.0.1:{port}"]
            + (["--workers", str(workers)] if workers > 1 else []),
            capture_output=True,
            text=True,
            timeout=60,
            env=_cli_env(),
        )
    finally:
        holder.close()
        listen.close()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"admin address 127.0.0.1:{port} is in use" in proc.stderr
    assert "Traceback" not in proc.stderr


class Agent:
    """``mesh run`` as a subprocess with its admin API on an ephemeral port (read from its log)."""

    def __init__(self, tmp_path, config: str, *args: str) -> None:
        self.cfg = tmp_path / "mesh.yaml"
        self.cfg.write_text(config)
        self.log = tmp_path / "agent.log"
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.admin: tuple[str, int] | None = None
        self._log_file = open(self.log, "wb")  # the agent's stderr; closed in stop()

    async def start(self) -> Agent:
        import re
        import sys

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshagent",
            "run",
            "--config",
            str(self.cfg),
            "--admin",
            "127.0.0.1:0",
            *self.args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log_file,
            env=_cli_env(),
        )

        def listening() -> bool:
            m = re.search(r"admin API listening on http://127\.0\.0\.1:(\d+)/", self.log.read_text())
            if m:
                self.admin = ("127.0.0.1", int(m.group(1)))
            assert self.proc.returncode is None, self.log.read_text()[-3000:]
            return m is not None

        await wait_for(listening, timeout=20, what="the agent's admin API")
        return self

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(f"http://{self.admin[0]}:{self.admin[1]}{path}") as r:
            return r.status, await r.text()

    async def bound_port(self, service: str) -> int:
        """The port ``service`` listens on, from /v1/table's listener list (waits until it is bound)."""
        found: list[int] = []

        async def bound() -> bool:
            status, body = await self.get("/v1/table")
            if status != 200:
                return False
            found[:] = [
                lst["bound_port"]
                for lst in json.loads(body)["runtime"]["listeners"]
                if lst["service"] == service and lst["bound_port"]
            ]
            return bool(found)

        await wait_for(bound, timeout=20, what=f"{service}'s listener bound")
        (port,) = found
        return port

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            rc = await asyncio.wait_for(self.proc.wait(), 30)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            self._log_file.close()
        return rc


@pytest.mark.uvloop_only
@pytest.mark.parametrize("workers", [1, 2])
async def test_agent_metrics_after_known_traffic(tmp_path, workers):
    pytest.importorskip("mesh.runtime", reason="the agent needs mesh/runtime.py")
    b = await Backend().start()
    listen = contextlib.ExitStack()
    # the configured port (the metrics' port label): any free port for one process; --workers 2 cannot
    # share port 0, so a fixed one held until the end
    cfg_port = 0 if workers == 1 else listen.enter_context(reserved_port())
    agent = Agent(
        tmp_path,
        f"services:\n  web:\n    listen: 127.0.0.1:{cfg_port}\n    endpoints: ['127.0.0.1:{b.port}']\n",
        *(["--workers", str(workers)] if workers > 1 else []),
    )
    await agent.start()
    try:

        async def ready() -> bool:
            return (await agent.get("/readyz"))[0] == 200

        await wait_for(ready, timeout=20, what="/readyz 200")
        lp = await agent.bound_port("web")
        assert lp == cfg_port or cfg_port == 0
        payload = bytes(range(250)) * 4  # 1000 bytes each way
        for _ in range(6):
            assert await echo(lp, payload) == payload
        web = {"service": "web", "port": cfg_port, "endpoint": f"127.0.0.1:{b.port}"}
        last: dict = {}

        async def flushed() -> bool:
            status, body = await agent.get("/metrics")
            assert status == 200
            last.update(parse(body))
            return last["mesh_connection_duration_seconds_count"].get(L(**web)) == 6

        await wait_for(flushed, timeout=10, what="6 closed connections in /metrics")
        m = last
        assert m["mesh_connections_accepted_total"] == {L(service="web", port=cfg_port): 6}
        assert m["mesh_upstream_connections_total"] == {L(**web): 6}
        assert m["mesh_received_bytes_total"] == {L(**web): 6000}
        assert m["mesh_sent_bytes_total"] == {L(**web): 6000}
        assert m["mesh_connections_active"] == {L(**web): 0}
        assert m["mesh_upstream_connect_seconds_count"] == {L(**web): 6}
        assert m["mesh_endpoint_up"] == {L(**web): 1}
        assert m["mesh_listener_up"] == {L(service="web", port=cfg_port): 1}
        assert m["mesh_data_plane_processes"] == {(): workers}
        status, body = await agent.get("/v1/table")
        assert status == 200
        import json

        doc = json.loads(body)
        ep = doc["services"][0]["routes"][0]["endpoints"][0]
        assert (ep["port"], ep["runtime"]["connections"], ep["runtime"]["sent_bytes"]) == (b.port, 6, 6000)
        assert doc["runtime"]["processes"] == workers
    finally:
        rc = await agent.stop()
        await b.close()
        listen.close()
    assert rc == 0, agent.log.read_text()[-3000:]


async def test_unbound_port_shows_in_metrics_and_readyz():
    b = await Backend().start()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    plane = Plane()
    await plane.apply(table_for(1, {"web": (0, [b.port]), "blocked": (taken, [b.port])}))
    server = AdminServer(plane.state(), port=0)
    await server.start()
    try:
        status, _, body = await get(server, "/readyz")
        assert status == 503 and "listeners are not up" in body
        m = parse((await get(server, "/metrics"))[2])
        assert m["mesh_listener_up"] == {L(service="web", port=0): 1, L(service="blocked", port=taken): 0}
        doc = json.loads((await get(server, "/v1/table"))[2])
        assert [(x["service"], x["port"], x["bound_port"], x["listening"]) for x in doc["runtime"]["listeners"]] == [
            ("blocked", taken, None, False),
            ("web", 0, plane.bound_port("web"), True),
        ]
        assert m["mesh_connections_accepted_total"][L(service="blocked", port=taken)] == 0
    finally:
        holder.close()
        await server.stop()
        await plane.close()
        await b.close()


async def test_endpoint_leaving_the_table_keeps_route_totals_monotonic():
    b1, b2 = await Backend("a").start(), await Backend("b").start()
    plane = Plane()
    await plane.apply(table_for(1, {"web": (0, [b1.port, b2.port])}))
    lp = plane.bound_port("web")
    server = AdminServer(plane.state(), port=0)
    await server.start()
    web = {"service": "web", "port": 0}  # the route's port in the table (any free port), bound to lp
    try:
        m0 = parse((await get(server, "/metrics"))[2])
        assert m0["mesh_upstream_connections_total"] == {L(**web, endpoint="web-0"): 0, L(**web, endpoint="web-1"): 0}
        for _ in range(4):
            await echo(lp, b"x" * 100)
        # hold one connection open to each endpoint, then drop web-1 from the table
        held = []
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", lp)
            w.write(b"hold")
            await asyncio.wait_for(r.readexactly(4), 5)
            held.append(w)
        await wait_for(lambda: plane.mesh.connections() == 2, what="only the two held connections open")
        await plane.apply(table_for(2, {"web": (0, [b1.port])}))
        assert plane.bound_port("web") == lp  # the same listener
        m1 = parse((await get(server, "/metrics"))[2])
        assert m1["mesh_table_version"] == {(): 2}
        # web-1 left the table but still carries a connection: still exported, not up
        assert m1["mesh_connections_active"] == {L(**web, endpoint="web-0"): 1, L(**web, endpoint="web-1"): 1}
        assert m1["mesh_endpoint_up"][L(**web, endpoint="web-1")] == 0
        assert m1["mesh_endpoints"] == {L(**web): 1}
        doc = __import__("json").loads((await get(server, "/v1/table"))[2])
        departed = doc["services"][0]["routes"][0]["runtime"]["departed"]
        assert [(d["id"], d["runtime"]["active_connections"]) for d in departed] == [("web-1", 1)]
        for w in held:
            w.close()
            await w.wait_closed()
        await plane.drained()
        m2 = parse((await get(server, "/metrics"))[2])
        assert m2["mesh_upstream_connections_total"] == {
            L(**web, endpoint="web-0"): 3,
            L(**web, endpoint=REMOVED_ENDPOINT): 3,  # web-1's 2 echoes + 1 held connection, folded
        }
        assert m2["mesh_received_bytes_total"] == {
            L(**web, endpoint="web-0"): 204,
            L(**web, endpoint=REMOVED_ENDPOINT): 204,
        }
        assert L(**web, endpoint="web-1") not in m2["mesh_connections_active"]
        for name in ("mesh_upstream_connections_total", "mesh_received_bytes_total", "mesh_sent_bytes_total"):
            sums = [sum(v for k, v in m[name].items() if ("service", "web") in k) for m in (m0, m1, m2)]
            assert sums == sorted(sums) and sums[-1] > 0, (name, sums)
    finally:
        await server.stop()
        await plane.close()
        await b1.close()
        await b2.close()


@pytest.mark.uvloop_only
async def test_worker_pool_metrics_survive_a_worker_restart(monkeypatch):
    """The parent's /metrics over real worker processes: sums of all workers, and no counter goes down
    when a worker is killed and restarted (its last counters are kept)."""
    import os
    import signal

    from mesh.admin import WorkerPoolState
    from meshagent.workers import WorkerPool

    monkeypatch.setenv("PYTHONPATH", _cli_env()["PYTHONPATH"])
    b = await Backend().start()
    listen = contextlib.ExitStack()
    lp = listen.enter_context(reserved_port())  # two workers bind the route's own port: not port 0
    pool = WorkerPool(2, ["--grace", "1", "--log-level", "warning"], backoff_initial=0.05)
    await pool.start()
    server = AdminServer(WorkerPoolState(pool), port=0)
    web = {"service": "web", "port": lp, "endpoint": "web-0"}
    try:
        await pool.publish(table_for(1, {"web": (lp, [b.port])}))
        await wait_for(pool.ready, timeout=20, what="both workers applied the table")
        await server.start()
        for _ in range(20):  # SO_REUSEPORT spreads these over both workers
            await echo(lp, b"y" * 50)
        last: dict = {}

        async def counted(n: int) -> bool:
            last.clear()
            last.update(parse((await get(server, "/metrics"))[2]))
            return last["mesh_connection_duration_seconds_count"].get(L(**web)) == n

        await wait_for(lambda: counted(20), timeout=10, what="20 closed connections in /metrics")
        assert last["mesh_data_plane_processes"] == {(): 2}
        assert last["mesh_received_bytes_total"] == {L(**web): 1000}
        before = pool.pids()
        os.kill(before[0], signal.SIGKILL)
        await wait_for(
            lambda: pool.pids()[0] not in (None, before[0]) and pool.ready(), timeout=20, what="worker 0 restarted"
        )
        await wait_for(lambda: counted(20), timeout=10, what="the same 20 connections after the restart")
        assert last["mesh_received_bytes_total"] == {L(**web): 1000}
        assert last["mesh_upstream_connections_total"] == {L(**web): 20}
        assert last["mesh_connections_accepted_total"] == {L(service="web", port=lp): 20}
        assert last["mesh_data_plane_processes"] == {(): 2}
        for _ in range(4):
            await echo(lp, b"y" * 50)
        await wait_for(lambda: counted(24), timeout=10, what="24 closed connections")
        assert last["mesh_received_bytes_total"] == {L(**web): 1200}
    finally:
        await server.stop()
        await pool.shutdown(2.0)
        await b.close()
        listen.close()


async def test_metrics_gzip_when_asked():
    import gzip

    plane = Plane()
    await plane.apply(table_for(4, {"web": (0, [closed_port()])}))
    server = AdminServer(plane.state(), port=0)
    await server.start()
    try:
        host, port = server.address
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.get(f"http://{host}:{port}/metrics", headers={"Accept-Encoding": "gzip"}) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                body = gzip.decompress(await r.read()).decode()
            async with s.get(f"http://{host}:{port}/metrics", headers={"Accept-Encoding": "identity"}) as r:
                assert "Content-Encoding" not in r.headers
                plain = (await r.read()).decode()
        assert parse(body)["mesh_table_version"] == {(): 4}
        assert parse(plain)["mesh_table_version"] == {(): 4}
    finally:
        await server.stop()
        await plane.close()


@pytest.mark.uvloop_only
async def test_agent_no_metrics_flag_and_failed_connections_by_reason(tmp_path):
    """--no-metrics removes /metrics only; without it, a connection whose every connect is refused is counted
    once under mesh_connections_failed_total{reason="refused"} and each attempt under the connect failures."""
    config = (
        "services:\n  web:\n    listen: 127.0.0.1:0\n    retries: 1\n    consecutive_failures: 100\n"
        f"    endpoints: ['127.0.0.1:{closed_port()}', '127.0.0.1:{closed_port()}']\n"
    )
    off = await Agent(tmp_path, config, "--no-metrics").start()
    try:
        assert (await off.get("/metrics"))[0] == 404
        assert (await off.get("/healthz"))[0] == 200
    finally:
        assert await off.stop() == 0
    on_dir = tmp_path / "on"
    on_dir.mkdir()
    agent = await Agent(on_dir, config).start()
    try:
        await wait_for(lambda: _ready(agent), timeout=20, what="/readyz 200")
        r, w = await asyncio.open_connection("127.0.0.1", await agent.bound_port("web"))
        assert await asyncio.wait_for(r.read(), 10) == b""  # both endpoints refuse: the client is closed
        w.close()
        await w.wait_closed()
        status, body = await agent.get("/metrics")
        assert status == 200
        m = parse(body)
        assert m["mesh_connections_failed_total"][L(service="web", port=0, reason="refused")] == 1
        assert m["mesh_upstream_connect_failures_total"][L(service="web", port=0, reason="refused")] == 2
        assert m["mesh_retries_total"] == {L(service="web", port=0): 1}
    finally:
        assert await agent.stop() == 0


async def _ready(agent: Agent) -> bool:
    return (await agent.get("/readyz"))[0] == 200


# A Prometheus 2.x/3.x scrape asks for OpenMetrics first and accepts the text format as a fallback.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


def _samples(families, prefix: str = "mesh_") -> dict[tuple[str, str], list[tuple]]:
    return {
        (f.name.removesuffix("_total"), f.type): sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples
        )
        for f in families
        if f.name.startswith(prefix)
    }


@pytest.mark.parametrize(
    "accept, openmetrics",
    [(PROMETHEUS_ACCEPT, True), ("application/openmetrics-text", True), ("text/plain", False), (None, False)],
)
async def test_metrics_serves_openmetrics_on_accept(accept, openmetrics):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    b = await Backend().start()
    plane = Plane()
    await plane.apply(table_for(6, {"web": (0, [b.port]), "down": (0, [closed_port()])}))
    lp = plane.bound_port("web")
    disc = DiscoveryMetrics()
    disc.event("container", "start")
    disc.reconnect()
    disc.lag(0.2)
    server = AdminServer(plane.state(), port=0, registry=make_registry(discovery=disc))
    await server.start()
    try:
        assert await echo(lp, b"hello") == b"hello"
        await plane.drained()
        host, port = server.address
        headers = {"Accept": accept} if accept else {}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{host}:{port}/metrics", headers=headers) as r:
                ctype, body = r.headers["Content-Type"], await r.text()
            async with s.get(f"http://{host}:{port}/metrics", headers={"Accept": "text/plain"}) as r:
                text = await r.text()
        if not openmetrics:
            assert ctype.startswith("text/plain; version=0.0.4") and "# EOF" not in body
            return
        assert ctype == "application/openmetrics-text; version=1.0.0; charset=utf-8"
        assert body.endswith("\n# EOF\n")
        # prometheus_client's OpenMetrics parser is strict: it rejects a counter family named ..._total,
        # a missing # EOF, 'untyped' and samples out of their family
        om = list(openmetrics_families(body))
        assert "# TYPE mesh_connections_accepted counter" in body
        assert "mesh_connections_accepted_total{" in body
        # the same mesh and discovery series as the text format, value for value
        assert _samples(om) == _samples(text_string_to_metric_families(text))
        by_name = {f.name: f for f in om}
        assert by_name["mesh_discovery_events"].type == "counter"
        assert by_name["mesh_upstream_connect_seconds"].type == "histogram"
        assert {f.name for f in om if f.name.startswith("process_")} >= {"process_cpu_seconds", "process_open_fds"}
    finally:
        await server.stop()
        await plane.close()
        await b.close()


OPENMETRICS_CASES = [
    # (name, text format 0.0.4, OpenMetrics)
    ("a counter family loses _total, its samples keep it",
     "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n",
     "# HELP a A.\n# TYPE a counter\na_total 1\n# EOF\n"),
    ("a gauge named ..._total is left alone",
     "# HELP g_total G.\n# TYPE g_total gauge\ng_total 2\n",
     "# HELP g_total G.\n# TYPE g_total gauge\ng_total 2\n# EOF\n"),
    ("untyped is unknown",
     "# HELP u U.\n# TYPE u untyped\nu 3\n",
     "# HELP u U.\n# TYPE u unknown\nu 3\n# EOF\n"),
    ("histograms and label values pass through",
     '# HELP h H.\n# TYPE h histogram\nh_bucket{s="a\\"b",le="+Inf"} 1\nh_sum{s="a\\"b"} 0.5\nh_count{s="a\\"b"} 1\n',
     '# HELP h H.\n# TYPE h histogram\nh_bucket{s="a\\"b",le="+Inf"} 1\nh_sum{s="a\\"b"} 0.5\nh_count{s="a\\"b"} 1\n# EOF\n'),
    ("a sample line starting like a comment is not one",
     "# HELP c_total C.\n# TYPE c_total counter\nc_total{x=\"# TYPE c_total counter\"} 1\n",
     "# HELP c C.\n# TYPE c counter\nc_total{x=\"# TYPE c_total counter\"} 1\n# EOF\n"),
    ("nothing at all", "", "# EOF\n"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in OPENMETRICS_CASES], ids=[c[0] for c in OPENMETRICS_CASES]
)
def test_openmetrics_from_text(text: str, expected: str) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    out = openmetrics_from_text(text.encode()).decode()
    assert out == expected
    list(openmetrics_families(out))  # valid OpenMetrics


async def test_views_are_served_and_listed():
    plane = Plane()
    calls: list[int] = []

    def status() -> dict:
        calls.append(1)
        return {"node": "n1", "calls": len(calls)}

    async def slow() -> list:
        await asyncio.sleep(0)
        return [1, 2]

    views = {"/v1/cluster/status": ("the cluster agent", status), "/v1/other": ("async view", slow)}
    server = AdminServer(plane.state(), port=0, views=views)
    await server.start()
    try:
        status_code, ctype, body = await get(server, "/v1/cluster/status")
        assert (status_code, ctype.split(";")[0], json.loads(body)) == (
            200,
            "application/json",
            {"node": "n1", "calls": 1},
        )
        assert json.loads((await get(server, "/v1/other"))[2]) == [1, 2]
        index = json.loads((await get(server, "/"))[2])
        assert index["endpoints"]["/v1/cluster/status"] == "the cluster agent"
        assert index["endpoints"]["/v1/other"] == "async view"
        assert "/v1/table" in index["endpoints"]
    finally:
        await server.stop()
    with pytest.raises(ValueError, match="must start with '/' and not be one of"):
        AdminServer(plane.state(), port=0, views={"/metrics": ("no", status)})
    with pytest.raises(ValueError, match="must start with '/'"):
        AdminServer(plane.state(), port=0, views={"v1/x": ("no", status)})


async def test_a_large_v1_table_is_complete():
    """/v1/table of 500 services x 10 endpoints (5,000), built in a thread off the data plane's loop."""
    plane = Plane()
    table = table_for(3, {f"svc{i:03d}": (0, [closed_port()] * 10) for i in range(500)})
    await plane.apply(table)
    server = AdminServer(plane.state(), port=0)
    await server.start()
    try:
        status, ctype, body = await get(server, "/v1/table")
        assert status == 200 and ctype.startswith("application/json")
        doc = json.loads(body)
        assert doc["runtime"]["applied_version"] == 3 and len(doc["services"]) == 500
        eps = [ep for s in doc["services"] for ep in s["routes"][0]["endpoints"]]
        assert len(eps) == 5000 and all(ep["runtime"]["up"] is True for ep in eps)
    finally:
        await server.stop()
        await plane.close()


def _fetch(url: str) -> tuple[int, bytes]:
    """GET ``url`` with curl, a process of its own started from a thread: reading and decoding the body
    costs the measured process nothing (the body is decoded after the measurement)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile() as out:
        done = subprocess.run(
            ["curl", "-s", "-o", out.name, "-w", "%{http_code}", "--max-time", "60", url],
            capture_output=True,
            check=True,
        )
        return int(done.stdout), Path(out.name).read_bytes()


class _Ticker:
    """Wakes every millisecond on the running loop and records the longest gap between two wake-ups: how
    long the loop -- which the data plane shares with the admin API -- was held by anything else."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.001)
            now = loop.time()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    async def __aenter__(self) -> _Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0.01)
        self.max_gap = 0.0
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.sleep(0.003)  # one more wake-up: a stall that just ended is recorded
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.uvloop_only
@pytest.mark.skipif(
    not os.environ.get("MESH_TIMING_TESTS"),
    reason="a timing measurement, flaky inside the full suite on 2 shared cores (benchmarks/admin_stall.py records "
    "it: benchmarks/results/admin-stall-20261206.json); run with MESH_TIMING_TESTS=1",
)
async def test_scrapes_of_5000_endpoints_never_hold_the_loop_long():
    """GET /metrics (two at once), /v1/table and /v1/dashboard of 500 services x 10 endpoints while a ticker
    on the loop records its longest gap.  Before, the stats snapshot (and for the dashboard the merge, view,
    rates and JSON) ran on the loop in one piece; now the snapshot yields every SNAPSHOT_SLICE hosts and the
    rest runs in a thread, in pieces, without cyclic GC.

    The bounds are relative, measured in this test so a loaded machine moves both sides.  ``floor``: the
    longest gap while a thread of pure Python runs as long (the GIL changing hands: 2-6 ms on an idle
    machine, 15-60 ms at a load of 8 on 2 cores).  Before this change the loop was held at once for the
    dashboard's whole sample (``old_dash``: snapshot, merge, view, rates, JSON; ~100 ms) and for each
    snapshot (``old``: 15-45 ms), on top of that floor.  The longest gap (best of up to six rounds) must stay
    under ``floor + old_dash / 2`` and under ``floor + old``, with ``floor`` the worst of the rounds."""
    import statistics

    from mesh.metrics import reader_for

    plane = Plane()
    table = table_for(3, {f"svc{i:03d}": (0, [closed_port()] * 10) for i in range(500)})
    await plane.apply(table)
    server = AdminServer(plane.state(), port=0)
    await server.start()
    host, port = server.address
    paths = ["/metrics", "/metrics", "/v1/table", "/v1/dashboard"]
    try:
        for path in set(paths):  # warm: imports, the thread pool, the first ledgers
            await asyncio.to_thread(_fetch, f"http://{host}:{port}{path}")
        reader = reader_for(plane.mesh)
        old, old_dash = [], []
        for _ in range(3):
            # what these requests used to run on the loop in one piece: the snapshot, and for the dashboard
            # also the merge, the view, the rates and the JSON
            t0 = time.perf_counter()
            snap = reader.snapshot()
            old.append(time.perf_counter() - t0)
            view = add_rates(build_view(plane.mesh.table, merge_snapshots([snap]), node="n1", now=time.time()), None)
            json.dumps(view, separators=(",", ":"), sort_keys=True)
            old_dash.append(time.perf_counter() - t0)
            del snap, view
        old_cost, old_dash_cost = statistics.median(old), statistics.median(old_dash)
        gaps, floors = [], []
        for _ in range(6):  # the best of up to six rounds: a preempted process is not a stalled loop
            slices = reader.slices
            t0 = time.perf_counter()
            async with _Ticker() as ticker:
                answers = await asyncio.gather(
                    *(asyncio.to_thread(_fetch, f"http://{host}:{port}{path}") for path in paths)
                )
            took = time.perf_counter() - t0
            gaps.append(ticker.max_gap)
            assert reader.slices - slices >= 4 * (5000 // 250 - 1)  # every request's snapshot went in slices
            async with _Ticker() as ticker:
                await asyncio.to_thread(_busy, took)
            floors.append(ticker.max_gap)
            if min(gaps) < max(floors) + min(old_cost, old_dash_cost / 2):  # both bounds below hold
                break
        floor = max(floors)  # the worst the GIL alone did in these rounds: a loaded machine (CI, other tests) moves it
        report = (
            f"longest loop gaps {[round(g * 1000, 1) for g in gaps]} ms; a busy thread's gaps "
            f"{[round(g * 1000, 1) for g in floors]} ms; before, on the loop at once: {old_cost * 1000:.1f} ms "
            f"(the snapshot), {old_dash_cost * 1000:.1f} ms (the dashboard's sample)"
        )
        print("\n" + report)
        assert min(gaps) < floor + old_dash_cost / 2, report  # the old dashboard sample alone held it longer
        assert min(gaps) < floor + old_cost, report  # and no more than one whole snapshot beyond the floor
        for (status, _body), path in zip(answers, paths, strict=True):
            assert status == 200, path
        metrics, table_doc, dash = answers[0][1], json.loads(answers[2][1]), json.loads(answers[3][1])
        assert metrics.count(b"mesh_endpoint_up{") == 5000 and metrics.endswith(b"\n")
        assert sum(len(s["routes"][0]["endpoints"]) for s in table_doc["services"]) == 5000
        assert sum(len(s["replicas"]) for s in dash["services"]) == 5000
    finally:
        await server.stop()
        await plane.close()
