"""The admin API: an aiohttp server (default 127.0.0.1:9901) beside the data plane.

Endpoints:
  GET /          this list, as JSON
  GET /metrics   Prometheus text format; OpenMetrics 1.0 when the Accept header names
                 application/openmetrics-text (as Prometheus's own scrapes do)
  GET /healthz   200 while the process serves requests (liveness)
  GET /readyz    200 once a routing table is applied and its listeners are up, else 503 (readiness)
  GET /v1/table  the current routing table as JSON (``RoutingTable.to_dict()``), each route and endpoint
                 enriched with a "runtime" object: active connections, health bits, ejection, draining,
                 counters, the port the route's listener is bound to; a top-level "runtime" lists the
                 listeners (service, protocol, host, configured and bound port; http/tls: hosts and paths);
                 an http route's runtime has "http" (requests by status class and method, active, queued,
                 retries, generated responses, upstream reuse, mean times) and "runtime.http_ports" lists
                 each http port with the rules of the services sharing it and its requests answered before
                 routing (404 no_route ...); 503 before the first table
  GET /ui/       the live dashboard (page and its files ship in ``mesh.dashboard``; ``GET /`` from a
                 browser, i.e. with Accept: text/html, is redirected there)
  GET /v1/dashboard         the dashboard's view as JSON (docs/observability.md, "Dashboard")
  GET /v1/dashboard/stream  the same view pushed as Server-Sent Events, at most two a second, from one
                 sampler shared by every watcher (``mesh.dashboard.Feed``); nothing runs while nobody watches
  GET <view>     read-only JSON views the composition root adds (``views=``), e.g. the cluster agent's
                 /v1/cluster/status

Hostile clients (docs/reliability.md, "The admin API under hostile clients").  The admin API shares the
process -- its event loop and its descriptor limit -- with the data plane, so it is bounded:

- Each request head must be complete within ``head_timeout`` seconds of its first byte (for the first
  request: of the accept), a deadline, not an inactivity timer (slowloris); at most ``MAX_HEAD`` bytes.
  Between requests a connection may stay idle ``keepalive_timeout`` seconds (aiohttp's keep-alive timer).
- At most ``max_connections`` connections (and an eighth of the descriptor limit).  A new one beyond that
  evicts the oldest connection still waiting for its request head, else the one whose last request head
  ended longest ago if that was over ``head_timeout`` ago (an idle keep-alive connection, or a long stream,
  which reconnects), else it is closed at once: a request younger than that is never cut.
- Admin connections never take a descriptor from the data plane's reserve: an accepted admin socket whose
  descriptor number is in the reserve (``admin_fd_limits()``: ``mesh.listener.FD_RESERVE`` under the limit,
  or its top eighth for a small limit) is closed at once, and the connection a newcomer over the cap
  would evict goes too (its descriptor back to the data plane).
- Bad requests and handler errors log one line (no traceback), at most one per ``ERROR_LOG_INTERVAL``
  seconds with the count since the last line.
- Every refusal is counted (``AdminStats``) and exported as ``mesh_admin_*`` on /metrics.

The server reads everything through a small *state provider* (``AdminState``) so the same handlers serve
one process (``MeshState`` over a ``Mesh``) and the parent of ``--workers N`` (whose provider asks every
worker for a stats snapshot over its pipe).  Binding beyond loopback is an explicit choice: a bare port or
":port" means 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import ipaddress
import json
import logging
import re
import resource
import socket
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from mesh.dashboard import ASSETS, Dashboard, asset, find_discovery
from mesh.errors import ConfigError
from mesh.headguard import HeadGuard
from mesh.listener import FD_RESERVE
from mesh.metrics import (
    MetricsExporter,
    WorkerStats,
    encode_pieces,
    failed_by_reason,
    gc_paused,
    http_summary,
    make_registry,
    merge_snapshots,
    route_key,
    run_off_loop,
    snapshot_async,
)
from mesh.routing import RoutingTable, format_hostport

__all__ = [
    "DEFAULT_ADMIN_HOST",
    "DEFAULT_ADMIN_PORT",
    "AdminServer",
    "AdminState",
    "AdminStats",
    "CallbackState",
    "MeshState",
    "WorkerPoolState",
    "openmetrics_from_text",
    "parse_admin_address",
]

log = logging.getLogger(__name__)

DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 9901

_HEALTH_NAMES = ((1, "failed_health_check"), (2, "ejected"))

# Bounds of the admin server (module docstring, "Hostile clients").
HEAD_TIMEOUT = 10.0  # seconds for a whole request head
KEEPALIVE_TIMEOUT = 75.0  # idle seconds between requests (longer than common scrape intervals)
MAX_CONNECTIONS = 64
MAX_HEAD = 32 * 1024  # aiohttp's own limits are per line and per field; this is for the whole head
ERROR_LOG_INTERVAL = 10.0
CLOSE_REASONS = ("over_cap", "evicted", "fd_reserve", "head_timeout", "head_too_large")

OPENMETRICS = "application/openmetrics-text"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

ENDPOINTS = {
    "/": "this list",
    "/metrics": "Prometheus metrics (text format; OpenMetrics 1.0 on Accept: application/openmetrics-text)",
    "/healthz": "liveness: 200 while the process answers",
    "/readyz": "readiness: 200 once a routing table is applied and its listeners are up, else 503",
    "/v1/table": "the applied routing table as JSON, with runtime state per route and endpoint and the bound listeners",
    "/ui/": "the live dashboard (HTML)",
    "/v1/dashboard": "the dashboard's view as JSON: services x nodes, replicas with state, totals and rates",
    "/v1/dashboard/stream": "the dashboard's view as Server-Sent Events (event 'view', at most two a second)",
}


class AdminState(Protocol):
    """What the admin server needs from the data plane."""

    def table(self) -> RoutingTable | None:
        """The last applied routing table, or None before the first."""

    def ready(self) -> bool:
        """True once a table is applied and its listeners are up."""

    async def snapshots(self) -> list[dict[str, Any]]:
        """One ``mesh.metrics.snapshot()`` per data-plane process."""


class MeshState:
    """``AdminState`` of a single-process ``Mesh``."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh

    def table(self) -> RoutingTable | None:
        return self.mesh.table

    def ready(self) -> bool:
        if self.mesh.table is None:
            return False
        ready = getattr(self.mesh, "ready", None)
        return bool(ready()) if callable(ready) else True

    async def snapshots(self) -> list[dict[str, Any]]:
        # in slices, yielding to the loop between them: the data plane shares it (StatsReader)
        return [await snapshot_async(self.mesh)]


class CallbackState:
    """``AdminState`` from three callables, for the parent of ``--workers N`` (or tests)."""

    def __init__(
        self,
        table: Callable[[], RoutingTable | None],
        ready: Callable[[], bool],
        snapshots: Callable[[], Awaitable[list[dict[str, Any]]]],
    ) -> None:
        self._table = table
        self._ready = ready
        self._snapshots = snapshots

    def table(self) -> RoutingTable | None:
        return self._table()

    def ready(self) -> bool:
        return self._ready()

    async def snapshots(self) -> list[dict[str, Any]]:
        return await self._snapshots()


class WorkerPoolState:
    """``AdminState`` of the parent of ``--workers N`` over its worker pool (``meshagent.workers.WorkerPool``:
    ``table``, ``ready()``, ``async stats()``, ``pids()``).  Snapshots go through ``WorkerStats`` so the
    summed counters do not go down when a worker is restarted or misses one stats request."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._stats = WorkerStats()
        self._lock = asyncio.Lock()

    def table(self) -> RoutingTable | None:
        return self.pool.table

    def ready(self) -> bool:
        return bool(self.pool.ready())

    async def snapshots(self) -> list[dict[str, Any]]:
        answers = await self.pool.stats()
        pids = self.pool.pids()
        # In a thread (it walks every host of a retired worker's routes), one scrape at a time: WorkerStats
        # keeps state between calls.
        async with self._lock:
            return await run_off_loop(self._stats.combine, answers, pids)


def parse_admin_address(text: str) -> tuple[str, int]:
    """Parse ``--admin ADDR``: "host:port", "[v6]:port", ":port" or "port" (the last two mean 127.0.0.1).

    Port 0 binds an ephemeral port (the bound address is logged).  Raises ``ConfigError`` naming the input.
    """
    s = str(text).strip()
    host = DEFAULT_ADMIN_HOST
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1 : end + 2] != ":":
            raise ConfigError(f"--admin: expected '[address]:port', got {text!r}")
        host, port_s = s[1:end], s[end + 2 :]
    elif ":" in s:
        if s.count(":") != 1:
            raise ConfigError(f"--admin: expected 'host:port' (IPv6 as '[address]:port'), got {text!r}")
        h, port_s = s.split(":")
        host = h or DEFAULT_ADMIN_HOST
    else:
        port_s = s
    if not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise ConfigError(f"--admin: port must be a number within 0..65535, got {text!r}")
    if not host:
        raise ConfigError(f"--admin: missing host in {text!r}")
    return host, int(port_s)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


View = tuple[str, Callable[[], Any]]  # (description for the index, () -> JSON-able object, or an awaitable of one)


class AdminServer:
    """The admin HTTP server.  ``registry`` holds process and discovery metrics (``make_registry()`` when
    omitted); ``metrics=False`` (``--no-metrics``) turns /metrics off (404).  ``views``: more read-only JSON
    endpoints, path -> (description, callable), listed on the index; the cluster agent serves its
    /v1/cluster/status this way, so a node has one admin server."""

    def __init__(
        self,
        state: AdminState,
        host: str = DEFAULT_ADMIN_HOST,
        port: int = DEFAULT_ADMIN_PORT,
        *,
        registry: CollectorRegistry | None = None,
        metrics: bool = True,
        views: Mapping[str, View] | None = None,
        dashboard: Dashboard | None = None,
        discovery: Any = None,
        head_timeout: float = HEAD_TIMEOUT,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        sock: socket.socket | None = None,
    ) -> None:
        views = dict(views or {})
        if head_timeout <= 0 or keepalive_timeout <= 0 or max_connections < 1:
            raise ValueError("admin head_timeout and keepalive_timeout must be > 0 and max_connections >= 1")
        for path in views:
            if not path.startswith("/") or path in ENDPOINTS or path.startswith(("/ui", "/v1/dashboard")):
                raise ValueError(f"admin view path {path!r} must start with '/' and not be one of {sorted(ENDPOINTS)}")
        self.views = views
        self.state = state
        self.host = host
        self.port = port
        self.metrics = metrics
        registry = registry if registry is not None else make_registry()
        self._exporter = MetricsExporter(registry) if metrics else None
        # ``dashboard``: the cluster agent passes its own (a manager's view covers every node); else one
        # over ``state``, with the discovery lag of ``discovery`` or of the DiscoveryMetrics in ``registry``.
        self.dashboard = dashboard or Dashboard(state, discovery=discovery or find_discovery(registry))
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.sock = sock  # an already bound listening socket to serve on (e.g. inherited), else host:port
        self.stats = AdminStats()
        self._waiting: dict[_Guard, None] = {}  # connections waiting for a request head, oldest first
        self._served: dict[_Guard, float] = {}  # the others: when their last request head ended
        self._errors = _ErrorLog(self.stats)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/v1/table", self._table)
        app.router.add_get("/ui", self._ui_redirect)
        app.router.add_get("/ui/", self._ui_asset)
        app.router.add_get("/ui/{name}", self._ui_asset)
        app.router.add_get("/v1/dashboard", self._dashboard)
        app.router.add_get("/v1/dashboard/stream", self._dashboard_stream)
        for path, (_, provide) in self.views.items():
            app.router.add_get(path, self._view(provide))
        return app

    async def start(self) -> None:
        """Bind and serve.  Raises ``ConfigError`` when the address is in use or cannot be bound."""
        if self._runner is not None:
            raise RuntimeError("admin server already started")
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.keepalive_timeout,
            logger=self._errors,
        )
        await runner.setup()
        where = format_hostport(self.host, self.port)
        handlers = runner.server
        assert handlers is not None

        def factory() -> _Guard:
            return _Guard(self, handlers())

        loop = asyncio.get_running_loop()
        try:
            if self.sock is not None:
                server = await loop.create_server(factory, sock=self.sock, backlog=128)
            else:
                server = await loop.create_server(factory, self.host, self.port, backlog=128, reuse_address=True)
        except OSError as exc:
            await runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                msg = f"admin address {where} is in use (another mesh agent?); choose another with --admin ADDR"
            elif exc.errno == errno.EADDRNOTAVAIL:
                msg = f"admin address {where} is not an address of this machine; choose another with --admin ADDR"
            elif exc.errno == errno.EACCES:
                msg = f"admin address {where}: permission denied binding that port; choose another with --admin ADDR"
            else:
                msg = f"admin address {where} cannot be bound: {exc.strerror or exc}"
            raise ConfigError(msg) from exc
        self._runner = runner
        self._server = server
        bound = server.sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        log.info("admin API listening on http://%s/", format_hostport(*self.address))
        if not _is_loopback(self.host):
            log.warning(
                "admin API on %s is reachable beyond this machine (metrics and the routing table are not secret-free)",
                where,
            )

    async def stop(self) -> None:
        """Stop serving (idempotent); open dashboard streams end at once."""
        runner, self._runner = self._runner, None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if runner is not None:
            await self.dashboard.close()
            await runner.cleanup()

    def _victim(self) -> _Guard | None:
        """The connection to close for a newcomer: the oldest one still waiting for its request head
        (slowloris, idle since the accept), else the one whose last head ended longest ago if that was
        more than ``head_timeout`` ago (an idle keep-alive connection, or a long stream); None when every
        connection has a request younger than that."""
        if self._waiting:
            return next(iter(self._waiting))
        for guard, ended in self._served.items():
            return guard if time.monotonic() - ended > self.head_timeout else None
        return None

    # -- handlers -------------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        if "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPFound("/ui/")  # a browser: the dashboard; tools (curl, scripts) get the JSON list
        endpoints = {**ENDPOINTS, **{path: desc for path, (desc, _) in self.views.items()}}
        return web.json_response({"endpoints": endpoints, "metrics": self.metrics})

    def _view(self, provide: Callable[[], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            doc = provide()
            if inspect.isawaitable(doc):
                doc = await doc
            return web.json_response(doc, dumps=_dumps)

        return handle

    async def _ui_redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def _ui_asset(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in ASSETS:
            raise web.HTTPNotFound(text=f"no dashboard file {name!r}\n")
        body = await asyncio.to_thread(asset, name)
        # no-cache: after an upgrade the page and its script must not come from two versions
        return web.Response(body=body, headers={"Content-Type": ASSETS[name], "Cache-Control": "no-cache"})

    async def _dashboard(self, request: web.Request) -> web.Response:
        body = await self.dashboard.feed.current()
        return web.Response(body=body, headers={"Content-Type": "application/json", "Cache-Control": "no-store"})

    async def _dashboard_stream(self, request: web.Request) -> web.StreamResponse:
        feed = self.dashboard.feed
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await resp.prepare(request)
        seq = feed.start_seq()
        feed.subscribe()
        try:
            await resp.write(b"retry: 2000\n\n")  # the browser's EventSource reconnects after 2 s
            while (seq := await feed.next(seq)) >= 0:
                # one shared, already serialised event; a slow reader waits here and then gets the latest
                await resp.write(feed.event)
        except (ConnectionResetError, ConnectionError):
            pass  # the watcher went away (noticed at the next write, within one interval)
        finally:
            feed.unsubscribe()
        return resp

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        table = self.state.table()
        ready = self.state.ready()
        body = {"ready": ready, "table_version": None if table is None else table.version}
        if not ready:
            body["reason"] = "no routing table applied yet" if table is None else "listeners are not up yet"
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._exporter is None:
            raise web.HTTPNotFound(text="metrics are off (--no-metrics)\n")
        gz = "gzip" in request.headers.get("Accept-Encoding", "")
        om = OPENMETRICS in request.headers.get("Accept", "")
        # The snapshot yields to the loop every few hundred hosts; rendering thousands of series takes
        # tens of milliseconds and runs in a thread, so the data plane keeps moving.  The snapshots are
        # plain dicts, already detached from the live stats.  No cyclic GC meanwhile (``gc_paused``).
        with gc_paused():
            snaps = await self.state.snapshots()
            pieces, content_type = await run_off_loop(self._render, snaps, gz, om)
            del snaps  # freed before the collector is back, so its next young collection is small
        headers = {"Content-Type": content_type}
        if gz:
            headers["Content-Encoding"] = "gzip"
        return await _send_pieces(request, pieces, headers)

    def _render(self, snaps: list[dict[str, Any]], gz: bool, om: bool = False) -> tuple[list[bytes], str]:
        """The body as pieces of ~200 kB (runs in a thread): 5,000 endpoints make ~18 MB, and one join,
        encode or compress of that much holds the GIL -- and so the data plane's loop -- for tens of ms."""
        assert self._exporter is not None
        pieces, content_type = self._exporter.render_pieces(snaps)
        pieces.append(self.stats.render(len(self._waiting)).encode())
        if om:
            pieces, content_type = openmetrics_pieces(pieces), OPENMETRICS_CONTENT_TYPE
        if gz:
            # Prometheus asks for gzip; at level 1 the ~3.5 MB of 1,000 endpoints shrink ~25x in ~4 ms.
            z = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: the gzip container
            pieces = [c for c in (*(z.compress(p) for p in pieces), z.flush()) if c]
        return pieces, content_type

    async def _table(self, request: web.Request) -> web.Response:
        table = self.state.table()
        if table is None:
            return web.json_response({"error": "no routing table applied yet"}, status=503)
        # Off the loop, like /metrics: at thousands of endpoints merging, building and serialising the document
        # takes hundreds of milliseconds, and the data plane shares this loop.  The table is immutable and the
        # snapshots are plain dicts detached from the live stats.
        with gc_paused():
            snaps = await self.state.snapshots()
            pieces = await run_off_loop(_table_body, table, snaps)
            del snaps
        return await _send_pieces(request, pieces, {"Content-Type": "application/json; charset=utf-8"})


async def _send_pieces(request: web.Request, pieces: list[bytes], headers: dict[str, str]) -> web.StreamResponse:
    """Answer with a body given as pieces, written one by one (with its Content-Length): a big body is
    never joined into one buffer, on the loop or off it."""
    resp = web.StreamResponse(headers=headers)
    resp.content_length = sum(len(p) for p in pieces)
    await resp.prepare(request)
    for p in pieces:
        await resp.write(p)
    await resp.write_eof()
    return resp


class AdminStats:
    """Counters of the admin server itself (exported as ``mesh_admin_*`` on /metrics)."""

    __slots__ = ("accepted", "closed", "errors", "open")

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        # requests aiohttp reports as errors (bad header fields, handler exceptions; a bad request line is
        # answered 400 without a report), logged at most once per ERROR_LOG_INTERVAL
        self.errors = 0

    def __repr__(self) -> str:
        return f"<AdminStats open={self.open} accepted={self.accepted} closed={self.closed} errors={self.errors}>"

    def render(self, waiting: int) -> str:
        lines = [
            "# HELP mesh_admin_connections_active Open connections to the admin API.\n",
            "# TYPE mesh_admin_connections_active gauge\n",
            f"mesh_admin_connections_active {self.open}\n",
            "# HELP mesh_admin_connections_waiting Admin connections waiting for a request head.\n",
            "# TYPE mesh_admin_connections_waiting gauge\n",
            f"mesh_admin_connections_waiting {waiting}\n",
            "# HELP mesh_admin_connections_total Connections accepted by the admin API (refused ones included).\n",
            "# TYPE mesh_admin_connections_total counter\n",
            f"mesh_admin_connections_total {self.accepted}\n",
            "# HELP mesh_admin_connections_closed_total Admin connections closed by the bounds, by reason: "
            "over_cap, evicted (the oldest waiting for its head, for a newcomer), fd_reserve, head_timeout, "
            "head_too_large.\n",
            "# TYPE mesh_admin_connections_closed_total counter\n",
        ]
        lines += [f'mesh_admin_connections_closed_total{{reason="{r}"}} {n}\n' for r, n in self.closed.items()]
        lines += [
            "# HELP mesh_admin_request_errors_total Bad requests and handler errors of the admin API.\n",
            "# TYPE mesh_admin_request_errors_total counter\n",
            f"mesh_admin_request_errors_total {self.errors}\n",
        ]
        return "".join(lines)


def admin_fd_limits() -> tuple[int, int]:
    """(line, cap) from the soft descriptor limit: an admin connection may not hold descriptor number
    ``line`` or above -- the data plane's reserve, ``mesh.listener.FD_RESERVE`` descriptors under the limit,
    or the top eighth of a limit too small for that reserve to fit in half of it -- and the admin API holds
    at most ``cap`` connections, an eighth of the limit (with ``max_connections`` also applying)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return sys.maxsize, sys.maxsize
    reserve = FD_RESERVE if FD_RESERVE <= soft // 2 else soft // 8
    return soft - reserve, max(1, soft // 8)


class _Guard(HeadGuard):
    """An admin connection: ``HeadGuard``'s head deadline (mesh/headguard.py) plus the connection cap of the
    module docstring -- connections waiting for a head and those served are tracked oldest first, so a
    newcomer over the cap can evict one -- and the descriptor reserve."""

    __slots__ = ("counted", "server")

    max_head = MAX_HEAD

    def __init__(self, server: AdminServer, inner: asyncio.Protocol) -> None:
        super().__init__(inner, server.head_timeout)
        self.server = server
        self.counted = False

    def __repr__(self) -> str:
        return f"<admin connection in_head={self.in_head} head_bytes={self.head_bytes} open={self.counted}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        srv = self.server
        st = srv.stats
        self.transport = transport  # type: ignore[assignment]
        st.accepted += 1
        reason = None
        line, cap = admin_fd_limits()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= line:
            reason = "fd_reserve"
        elif st.open >= min(srv.max_connections, cap):
            reason = "over_cap"
        if reason is not None:
            victim = srv._victim()
            if victim is not None:
                # over the cap, the newcomer takes its place; in the reserve, the descriptor goes back to
                # the data plane
                st.closed["evicted"] += 1
                victim._drop()
                if reason == "over_cap":
                    reason = None
        if reason is not None:
            st.closed[reason] += 1
            self.inner = None
            transport.abort()  # the descriptor goes back at once; nothing was read
            return
        st.open += 1
        self.counted = True
        self._start_head()
        self.inner.connection_made(transport)  # type: ignore[union-attr]

    def _head_started(self) -> None:
        srv = self.server
        srv._served.pop(self, None)
        srv._waiting[self] = None

    def _head_ended(self) -> None:
        srv = self.server
        srv._waiting.pop(self, None)
        srv._served.pop(self, None)
        srv._served[self] = time.monotonic()  # re-inserted: the dict stays oldest first

    def _timed_out(self) -> None:
        self.server.stats.closed["head_timeout"] += 1
        self.server._waiting.pop(self, None)

    def _too_large(self) -> None:
        self.server.stats.closed["head_too_large"] += 1
        self._drop()

    def _drop(self) -> None:
        self.server._waiting.pop(self, None)
        self.server._served.pop(self, None)
        if self.transport is not None:
            self.transport.abort()

    def _lost(self) -> None:
        self.server._waiting.pop(self, None)
        self.server._served.pop(self, None)
        if self.counted:
            self.counted = False
            self.server.stats.open -= 1


class _ErrorLog:
    """The logger aiohttp's request handlers get: bad requests and handler errors become one line without a
    traceback, at most one per ``ERROR_LOG_INTERVAL`` seconds (with how many there were since the last
    line), and are counted in ``AdminStats.errors``; a flood of malformed requests cannot flood the log."""

    def __init__(self, stats: AdminStats, interval: float = ERROR_LOG_INTERVAL) -> None:
        self.stats = stats
        self.interval = interval
        self._last = -interval
        self._since = 0

    def _note(self, msg: object, args: tuple) -> None:
        self.stats.errors += 1
        self._since += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        exc = sys.exc_info()[1]
        what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}" if exc else ""
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            text = str(msg)
        log.warning("admin API: %s %s (%d such since the last line; at most one line per %.0fs)",
                    text, what, self._since, self.interval)  # fmt: skip
        self._last = now
        self._since = 0

    def exception(self, msg: object, *args: Any, **kw: Any) -> None:
        self._note(msg, args)

    def error(self, msg: object, *args: Any, **kw: Any) -> None:
        self._note(msg, args)

    def warning(self, msg: object, *args: Any, **kw: Any) -> None:
        kw.pop("exc_info", None)
        log.warning(msg, *args, **kw)

    def info(self, msg: object, *args: Any, **kw: Any) -> None:
        kw.pop("exc_info", None)
        log.info(msg, *args, **kw)

    def debug(self, msg: object, *args: Any, **kw: Any) -> None:
        kw.pop("exc_info", None)
        log.debug(msg, *args, **kw)

    def isEnabledFor(self, level: int) -> bool:
        return log.isEnabledFor(level)


_COMMENT = re.compile(rb"^# (HELP|TYPE) (\S+)(.*)$", re.MULTILINE)
_COUNTER = re.compile(rb"^# TYPE (\S+)_total counter$", re.MULTILINE)


def openmetrics_pieces(pieces: list[bytes]) -> list[bytes]:
    """``openmetrics_from_text`` of pieces split at line ends (the concatenation of the result is that of
    the whole text), converted piece by piece."""
    counters: set[bytes] = set()
    for p in pieces:
        counters.update(_COUNTER.findall(p))
    out = [_COMMENT.sub(_om_rewrite(counters), p) for p in pieces]
    if out and out[-1] and not out[-1].endswith(b"\n"):
        out.append(b"\n")
    out.append(b"# EOF\n")
    return out


def _om_rewrite(counters: set[bytes]) -> Callable[[re.Match[bytes]], bytes]:
    def rewrite(m: re.Match[bytes]) -> bytes:
        kind, name, rest = m.group(1), m.group(2), m.group(3)
        if name.endswith(b"_total") and name[:-6] in counters:
            name = name[:-6]
        if kind == b"TYPE" and rest == b" untyped":
            rest = b" unknown"
        return b"# " + kind + b" " + name + rest

    return rewrite


def openmetrics_from_text(text: bytes) -> bytes:
    """The Prometheus text exposition (format 0.0.4) ``text`` in the OpenMetrics 1.0 text format.

    For what the mesh exports (no timestamps, exemplars or ``_created`` series) the two formats differ in
    three things: a counter family is named without its ``_total`` suffix (its samples keep it),
    ``untyped`` is called ``unknown``, and the exposition ends with ``# EOF``.  So only the HELP/TYPE lines
    are rewritten and the samples pass through as they are: parsing and re-encoding 1,000 endpoints with
    prometheus_client would take about a second per scrape, and Prometheus asks for OpenMetrics first.
    tests/test_admin.py reads the result with prometheus_client's OpenMetrics parser.
    """
    body = _COMMENT.sub(_om_rewrite(set(_COUNTER.findall(text))), text)
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return body + b"# EOF\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def _table_body(table: RoutingTable, snaps: list[dict[str, Any]]) -> list[bytes]:
    """The /v1/table document, serialised in pieces (runs in a thread; the bytes of ``_dumps``)."""
    doc = table_with_runtime(table, merge_snapshots(snaps))
    return encode_pieces(json.JSONEncoder(indent=1, sort_keys=True).iterencode(doc), 16384)


def table_with_runtime(table: RoutingTable, merged: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """``table.to_dict()`` with a "runtime" object on each route and endpoint, from a merged snapshot.

    Endpoints that left the table but still carry connections are listed under the route's
    ``runtime.departed``.  A route or endpoint the data plane does not (yet) know has ``runtime: null``.
    ``runtime.bound_port`` of a route, and ``runtime.listeners`` at the top (one entry per route the data
    plane knows: service, protocol, listen_host, the configured ``port`` and the ``bound_port``), give the
    port actually listened on: the configured one, or the one chosen for port 0 (any free port).  It is
    null while the port is not bound, or if processes disagree (they cannot: ``--workers`` refuses port 0).
    """
    now = time.time() if now is None else now
    doc = table.to_dict()
    by_route = {route_key(r): r for r in merged["routes"]}  # (service, port, transport): tcp and udp apart
    rules: dict[tuple[str, int], dict[str, list[str]]] = {}
    for svc in doc["services"]:
        for route in svc["routes"]:
            if route["protocol"] in ("http", "tls"):
                # the rules of a shared port, also when empty (= any host, any path)
                route.setdefault("match", {"hosts": [], "paths": []})
                rules[(svc["name"], route["port"])] = route["match"]
            r = by_route.get(route_key({"service": svc["name"], **route}))
            if r is None:
                route["runtime"] = None
                for ep in route["endpoints"]:
                    ep["runtime"] = None
                continue
            hosts = {h["id"]: h for h in r["hosts"]}
            listed_ids = {ep["id"] for ep in route["endpoints"]}
            route["runtime"] = {
                "listening": r["listening"],
                "bound_port": _bound_port(r),
                "accepted": r["accepted"],
                "retries": r["retries"],
                "no_endpoint": r["no_endpoint"],
                "failed": dict(failed_by_reason(r)),
                "connect_failures": r["connect_failures"],
                "healthy_endpoints": sum(1 for h in r["hosts"] if h["up"]),
                "udp": r.get("udp"),  # udp routes: sessions active/created/evicted, drops by reason
                # http routes: requests by class and method, active, queued, retries, generated, pool reuse
                "http": http_summary(r["http"]) if "http" in r else None,
                "departed": [
                    {"id": h["id"], "address": h["address"], "runtime": _host_runtime(h)}
                    for h in r["hosts"]
                    if h["id"] not in listed_ids
                ],
            }
            for ep in route["endpoints"]:
                h = hosts.get(ep["id"])
                ep["runtime"] = None if h is None else _host_runtime(h)
    listeners = []
    http_ports: dict[tuple[int, str], dict[str, Any]] = {}
    for r in merged["routes"]:
        entry = {
            "service": r["service"],
            "protocol": r.get("protocol"),
            "listen_host": r["listen_host"],
            "port": r["port"],
            "bound_port": _bound_port(r),
            "listening": r["listening"],
        }
        rule = rules.get((r["service"], r["port"]))
        if rule is not None:
            entry["hosts"], entry["paths"] = rule["hosts"], rule["paths"]
        listeners.append(entry)
        if r.get("protocol") == "http":
            port = http_ports.setdefault(
                (r["port"], r["listen_host"]),
                {"port": r["port"], "listen_host": r["listen_host"], "bound_port": _bound_port(r),
                 "requests": 0, "unrouted": {}, "routes": []},
            )  # fmt: skip
            port["routes"].append({"service": r["service"], **(rule or {"hosts": [], "paths": []})})
            lst = r.get("http_listener")
            if lst is not None:
                port["requests"] += lst["requests"]
                for status, reasons in sorted(lst["closed"].items()):
                    for reason, n in sorted(reasons.items()):
                        port["unrouted"][f"{status} {reason}"] = n
    doc["runtime"] = {
        "processes": merged.get("processes", 1),
        "applied_version": merged["table_version"],
        "applied_at": merged["table_applied"],
        "generated_at": now,
        "listeners": listeners,
        # each http port: the rules of the services sharing it, request heads read, answers before routing
        "http_ports": sorted(http_ports.values(), key=lambda p: (p["port"], p["listen_host"])),
    }
    return doc


def _bound_port(r: dict[str, Any]) -> int | None:
    ports = r.get("bound_ports") or ()
    return ports[0] if len(ports) == 1 else None


def _host_runtime(h: dict[str, Any]) -> dict[str, Any]:
    return {
        "up": h["up"],
        "healthy": h["healthy"],
        "health": [name for bit, name in _HEALTH_NAMES if h["health"] & bit],
        "ejected": bool(h["health"] & 2),
        "ejected_seconds_left": round(h["ejected_seconds_left"], 3),
        "ejections": h["ejections"],
        "draining": h["draining"],
        "active_connections": h["active"],
        "connections": h["connections"],
        "received_bytes": h["bytes_in"],
        "sent_bytes": h["bytes_out"],
    }
