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

The server reads everything through a small *state provider* (``AdminState``) so the same handlers serve
one process (``MeshState`` over a ``Mesh``) and the parent of ``--workers N`` (whose provider asks every
worker for a stats snapshot over its pipe).  Binding beyond loopback is an explicit choice: a bare port or
":port" means 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import inspect
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from mesh.dashboard import ASSETS, Dashboard, asset, find_discovery
from mesh.errors import ConfigError
from mesh.metrics import (
    MetricsExporter,
    WorkerStats,
    failed_by_reason,
    http_summary,
    make_registry,
    merge_snapshots,
    route_key,
    snapshot,
)
from mesh.routing import RoutingTable, format_hostport

__all__ = [
    "DEFAULT_ADMIN_HOST",
    "DEFAULT_ADMIN_PORT",
    "AdminServer",
    "AdminState",
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
        return [snapshot(self.mesh)]


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

    def table(self) -> RoutingTable | None:
        return self.pool.table

    def ready(self) -> bool:
        return bool(self.pool.ready())

    async def snapshots(self) -> list[dict[str, Any]]:
        return self._stats.combine(await self.pool.stats(), self.pool.pids())


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
    ) -> None:
        views = dict(views or {})
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
        self.address: tuple[str, int] | None = None

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
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        where = format_hostport(self.host, self.port)
        try:
            await site.start()
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
        bound = runner.addresses[0]
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
        if runner is not None:
            await self.dashboard.close()
            await runner.cleanup()

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
        snaps = await self.state.snapshots()
        # Rendering thousands of series takes milliseconds: do it off the loop so the data plane keeps
        # moving.  The snapshots are plain dicts, already detached from the live stats.
        gz = "gzip" in request.headers.get("Accept-Encoding", "")
        om = OPENMETRICS in request.headers.get("Accept", "")
        body, content_type = await asyncio.to_thread(self._render, snaps, gz, om)
        headers = {"Content-Type": content_type}
        if gz:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    def _render(self, snaps: list[dict[str, Any]], gz: bool, om: bool = False) -> tuple[bytes, str]:
        assert self._exporter is not None
        body, content_type = self._exporter.render(snaps)
        if om:
            body, content_type = openmetrics_from_text(body), OPENMETRICS_CONTENT_TYPE
        # Prometheus asks for gzip; at level 1 the ~3.5 MB of 1,000 endpoints shrink ~25x in ~4 ms.
        return (gzip.compress(body, 1) if gz else body), content_type

    async def _table(self, request: web.Request) -> web.Response:
        table = self.state.table()
        if table is None:
            return web.json_response({"error": "no routing table applied yet"}, status=503)
        merged = merge_snapshots(await self.state.snapshots())
        return web.json_response(table_with_runtime(table, merged), dumps=_dumps)


_COMMENT = re.compile(rb"^# (HELP|TYPE) (\S+)(.*)$", re.MULTILINE)
_COUNTER = re.compile(rb"^# TYPE (\S+)_total counter$", re.MULTILINE)


def openmetrics_from_text(text: bytes) -> bytes:
    """The Prometheus text exposition (format 0.0.4) ``text`` in the OpenMetrics 1.0 text format.

    For what the mesh exports (no timestamps, exemplars or ``_created`` series) the two formats differ in
    three things: a counter family is named without its ``_total`` suffix (its samples keep it),
    ``untyped`` is called ``unknown``, and the exposition ends with ``# EOF``.  So only the HELP/TYPE lines
    are rewritten and the samples pass through as they are: parsing and re-encoding 1,000 endpoints with
    prometheus_client would take about a second per scrape, and Prometheus asks for OpenMetrics first.
    tests/test_admin.py reads the result with prometheus_client's OpenMetrics parser.
    """
    counters = set(_COUNTER.findall(text))

    def rewrite(m: re.Match[bytes]) -> bytes:
        kind, name, rest = m.group(1), m.group(2), m.group(3)
        if name.endswith(b"_total") and name[:-6] in counters:
            name = name[:-6]
        if kind == b"TYPE" and rest == b" untyped":
            rest = b" unknown"
        return b"# " + kind + b" " + name + rest

    body = _COMMENT.sub(rewrite, text)
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return body + b"# EOF\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


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
