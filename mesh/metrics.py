"""Prometheus metrics of the data plane, exported at scrape time.

Rules:

- The hot path never touches prometheus objects.  The proxy adds plain ints to
  ``RouteStats`` (``Pool.stats``) and ``HostStats`` (``Host.stats``); this module
  reads them when /metrics is scraped.  Gauges that mirror state (active
  connections, endpoint up/healthy, table version) are read at the same moment.
- One code path for one process and for ``--workers N``: a data-plane process
  turns its stats into a JSON-able ``snapshot()``; /metrics merges a list of
  snapshots (one per process: counters and histograms summed, active summed,
  endpoint up/healthy = any process says so) and writes the text format of
  the merged result (``render_text``, the one renderer of the mesh series).
  A worker answers the parent's snapshot request with the same dict, so the
  parent serves one /metrics for all workers without prometheus_client's
  multiprocess mode (which needs a shared directory and cannot export
  collector-computed gauges).
- Counters never go backwards while a port is served.  ``RouteStats`` lives as
  long as the listener.  A ``Host`` dropped from its pool is kept (and exported
  under its endpoint id) while it still holds connections; once idle, its final
  counters are folded into a per-route accumulator exported as
  ``endpoint="_removed"``, so ``sum by (service, port)`` of every per-endpoint
  counter stays monotonic.  Removals are noticed on every ``Pool.on_change``
  (which fires on each table update) and at every scrape.
- Labels: service, port, endpoint (the endpoint id from the routing table),
  reason; never client addresses.  ``port`` is the port of the table's route, so
  a route's series keep their name whatever happens to its listener; a route on
  port 0 (any free port, tests) is labelled 0, and its bound port is in the
  snapshot (``bound_port``) and the admin API's /v1/table.
- Directions: "received" = bytes read from clients (``HostStats.bytes_in``,
  client -> endpoint), "sent" = bytes written to clients
  (``HostStats.bytes_out``, endpoint -> client).  Both are added once per
  connection, when it closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.utils import floatToGoString

# Temporary alias: mesh/proxy.py still imports log_access from here; it lives in mesh.logs.  Drop this
# line once nothing does.
from mesh.logs import log_access  # noqa: F401
from mesh.proxy.http import HTTP_BUCKETS
from mesh.stats import CONNECT_BUCKETS, DURATION_BUCKETS, Histogram, HostStats

__all__ = [
    "FAILURE_REASONS",
    "LAG_BUCKETS",
    "REMOVED_ENDPOINT",
    "SNAPSHOT_SLICE",
    "SNAPSHOT_VERSION",
    "DiscoveryMetrics",
    "MetricsExporter",
    "StatsReader",
    "WorkerStats",
    "encode_pieces",
    "failed_by_reason",
    "gc_paused",
    "http_summary",
    "json_bytes",
    "json_pieces",
    "make_registry",
    "merge_snapshots",
    "render_lines",
    "render_text",
    "run_off_loop",
    "snapshot",
    "snapshot_async",
    "stats_message",
]

SNAPSHOT_VERSION = 1
REMOVED_ENDPOINT = "_removed"
FAILURE_REASONS = ("no_endpoint", "refused", "timeout", "unreachable", "error", "overflow")
CONNECT_FAILURE_REASONS = ("refused", "timeout", "unreachable", "error")
# Seconds from a Docker event to the table that reflects it being applied.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Docker event actions carry free text after a colon ("exec_start: sh -c ..."); only the verb is a label, and
# the number of distinct (type, action) pairs is bounded so a noisy engine cannot blow up the series count.
_MAX_EVENT_LABELS = 200

log = logging.getLogger(__name__)

_HEALTH_FAILED_ACTIVE_HC = 1  # mirrors mesh.pool.FAILED_ACTIVE_HC (kept local: mesh.pool is not needed here)
_HEALTH_EJECTED = 2


# ---------------------------------------------------------------------------------------------------------
# Reading live stats into snapshots
# ---------------------------------------------------------------------------------------------------------
class _Ledger:
    """Per pool: the hosts seen so far, and the folded totals of hosts that left the pool.

    ``sync()`` runs on every ``Pool.on_change`` (table updates and health changes) and at every snapshot, so
    it is cheap when the pool's host tuple is the one it saw last: only the departed hosts still carrying
    connections are looked at.  The full comparison runs when the tuple changed (a table update)."""

    __slots__ = ("__weakref__", "departed", "last", "pool", "removed", "seen")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.seen: dict[int, Any] = {}  # id(host) -> host; strong refs, so ids are not reused meanwhile
        self.removed = HostStats()
        self.last: tuple[Any, ...] | None = None  # pool.hosts at the last sync
        self.departed: list[Any] = []  # hosts that left the pool and still carried connections then
        ref = weakref.WeakMethod(self.sync)

        def on_change(_pool: Any) -> None:
            method = ref()
            if method is not None:
                method()

        pool.on_change.append(on_change)
        self.sync()

    def sync(self) -> Sequence[Any]:
        """Fold idle departed hosts into ``removed``; return the hosts to export: the pool's current ones
        first, then the departed ones still carrying connections."""
        current = self.pool.hosts
        if current is self.last:
            if not self.departed:
                return current
            busy = []
            for host in self.departed:
                if host.active > 0:
                    busy.append(host)
                else:
                    _fold(self.removed, host.stats)
                    self.seen.pop(id(host), None)
            self.departed = busy
            return [*current, *busy]
        now_ids = {id(h) for h in current}
        busy = []
        for hid, host in list(self.seen.items()):
            if hid in now_ids:
                continue
            if host.active > 0:
                busy.append(host)  # left the table but still carries connections: keep exporting it
                continue
            _fold(self.removed, host.stats)
            del self.seen[hid]
        for host in current:
            self.seen[id(host)] = host
        self.last = current
        self.departed = busy
        return [*current, *busy] if busy else current


def _fold(acc: HostStats, stats: HostStats) -> None:
    acc.connections += stats.connections
    acc.bytes_in += stats.bytes_in
    acc.bytes_out += stats.bytes_out
    acc.ejections += stats.ejections
    acc.connect_time.merge(stats.connect_time)
    acc.duration.merge(stats.duration)


def _hist(h: Histogram) -> dict[str, Any]:
    return {"counts": list(h.counts), "sum": h.sum}


def _counters(stats: HostStats) -> dict[str, Any]:
    return {
        "connections": stats.connections,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "ejections": stats.ejections,
        "connect_time": _hist(stats.connect_time),
        "duration": _hist(stats.duration),
    }


# ---------------------------------------------------------------------------------------------------------
# Big documents without long pauses of the loop
# ---------------------------------------------------------------------------------------------------------
_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a snapshot, a render or an encoding runs (nestable, from
    any thread; the collector is enabled again when the last one ends, if it was enabled before).

    Why: a scrape of 5,000 endpoints builds hundreds of thousands of short-lived dicts and lists that are
    alive until it ends.  They survive the young collections, and the full collection they set off scans
    every object of the process with the GIL held: 45-85 ms here, a stall of the data plane's loop even
    when the scrape runs in a thread.  These documents are trees (no reference cycles): reference counting
    frees them when the scrape ends, so pausing the collector for that long loses nothing."""
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


_off_loop: concurrent.futures.ThreadPoolExecutor | None = None
_off_loop_lock = threading.Lock()


async def run_off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in the one thread that renders admin documents (/metrics, /v1/table, the
    dashboard).  One thread, not one per request: each CPU-bound thread competes with the event loop's
    thread for the GIL, and with several of them the loop waited 100-200 ms at a time for its turn (at a
    load of 8 on 2 cores) where one costs what any busy thread costs.  Concurrent requests queue here."""
    global _off_loop
    if _off_loop is None:
        with _off_loop_lock:
            if _off_loop is None:
                _off_loop = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mesh-render")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_off_loop, functools.partial(fn, *args, **kwargs))


_PIECE = 2000  # containers and items the C encoder gets in one call: well under a millisecond
_compact = json.JSONEncoder(separators=(",", ":"))
_compact_sorted = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def json_bytes(obj: Any, *, sort_keys: bool = False) -> bytes:
    """``json.dumps(obj, separators=(",", ":"), sort_keys=sort_keys).encode()``, the same bytes, for a big
    document in a thread: the C encoder holds the GIL for a whole call (26 ms for a 5,000-endpoint
    snapshot here), so the document is cut into pieces of about ``_PIECE`` items, each encoded in one call,
    and the event loop's thread gets the GIL between them.  Runs with the collector paused (``gc_paused``)."""
    return b"".join(json_pieces(obj, sort_keys=sort_keys))


def json_pieces(obj: Any, *, sort_keys: bool = False) -> list[bytes]:
    """``json_bytes`` as a list of pieces (their concatenation), none of them big."""
    enc = _compact_sorted if sort_keys else _compact
    out: list[str] = []
    with gc_paused():
        _encode_pieces(obj, enc, sort_keys, out)
        return encode_pieces(out, 256)


def _weight(o: Any, budget: int) -> int:
    """``budget`` less the items in ``o``'s containers, stopping below 0 (then ``o`` is split)."""
    t = type(o)
    if t is dict:
        budget -= len(o)
        items: Iterable[Any] = o.values()
    elif t is list or t is tuple:
        budget -= len(o)
        items = o
    else:
        return budget
    for v in items:
        if budget < 0:
            break
        tv = type(v)
        if tv is dict or tv is list or tv is tuple:
            budget = _weight(v, budget)
    return budget


def _encode_pieces(o: Any, enc: json.JSONEncoder, sort_keys: bool, out: list[str]) -> None:
    t = type(o)
    if _weight(o, _PIECE) >= 0 or (t is dict and not all(type(k) is str for k in o)):
        out.append(enc.encode(o))
        return
    if t is dict:
        out.append("{")
        first = True
        for k in sorted(o) if sort_keys else o:
            if not first:
                out.append(",")
            first = False
            out.append(enc.encode(k))
            out.append(":")
            _encode_pieces(o[k], enc, sort_keys, out)
        out.append("}")
        return
    out.append("[")
    for i, v in enumerate(o):
        if i:
            out.append(",")
        _encode_pieces(v, enc, sort_keys, out)
    out.append("]")


# Host rows a snapshot builds between two yields to the loop (``StatsReader.snapshot_async``): ~1 ms here.
SNAPSHOT_SLICE = 250


class StatsReader:
    """Turns the live stats of a process's listeners into snapshots; keeps, between calls, the ledgers that
    make counters monotonic (hosts removed from a pool, listeners removed from the process).

    ``listeners()`` yields the ``mesh.listener.Listener`` objects this process serves (each with ``.pool``,
    ``.listening``, ``.fd_exhausted``, ``.port``: the bound port).  ``unbound()`` yields (service,
    listen_host, port[, protocol]) of the table's routes whose port could not be bound.  ``info()`` returns ``table_version`` and ``table_applied``
    (wall-clock seconds), either may be missing.  ``clock`` must be the pools' clock (``time.monotonic``
    unless injected) so an ejection's expiry can be turned into seconds left.

    Two ways to take a snapshot, giving the same document: ``snapshot()`` at once, and ``snapshot_async()``
    (what the admin API and the workers use), which yields to the event loop every ``SNAPSHOT_SLICE`` host
    rows so a scrape of thousands of endpoints never holds the data plane's loop for more than about a
    millisecond at a time.  What keeps the counters exact while the loop runs between slices:

    - Per pool, the list of hosts to export and the copy of the ledger's ``removed`` totals are taken in
      the same slice (``_Ledger.sync``), so a host folded into ``removed`` later (it left the table and went
      idle meanwhile) is counted once: as its own row, whose counters are read later.  A host added later
      waits for the next snapshot.  Rows are read after that, so counters are as of their slice or later.
    - Snapshots of one reader never overlap: ``snapshot_async`` holds a lock, so each starts after the
      previous one ended and every counter it reads is at least what the previous one read (two scrapes at
      once are served one after the other).  Do not mix ``snapshot()`` into a reader that another task is
      reading with ``snapshot_async()``.
    - A pool whose ledger appeared while the snapshot ran (a table applied between two slices) keeps it:
      only ledgers of pools known at the start and no longer served are dropped.
    - The table version and unbound routes are read at the start, so the version is never newer than the
      rows (at worst older, for one scrape).
    """

    def __init__(
        self,
        listeners: Callable[[], Iterable[Any]],
        info: Callable[[], dict[str, Any]] = dict,
        *,
        unbound: Callable[[], Iterable[tuple[str, str, int] | tuple[str, str, int, str]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listeners_of = listeners
        self._info = info
        self._unbound = unbound
        self._clock = clock
        self._ledgers: dict[int, _Ledger] = {}
        self._listeners: dict[int, Any] = {}  # id -> listener seen at the last snapshot (strong refs)
        self._fd_retired = 0  # fd_exhausted of listeners that are gone
        self._lock: asyncio.Lock | None = None
        self.slices = 0  # yields to the loop by snapshot_async, in total (tests read it)

    def _ledger(self, pool: Any) -> _Ledger:
        led = self._ledgers.get(id(pool))
        if led is None or led.pool is not pool:
            led = self._ledgers[id(pool)] = _Ledger(pool)
        return led

    def watch(self, pool: Any) -> None:
        """Start tracking ``pool`` now (call when a pool is created) rather than at the next snapshot, so
        hosts it gains and loses before then are counted too."""
        self._ledger(pool)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able dict of every counter, histogram and state gauge of this process (see module doc)."""
        steps = self._steps(None)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    async def snapshot_async(self, slice_hosts: int = SNAPSHOT_SLICE) -> dict[str, Any]:
        """``snapshot()``, yielding to the event loop every ``slice_hosts`` host rows (class doc)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock, _gc_paused_async():
            steps = self._steps(max(1, slice_hosts))
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    return done.value
                self.slices += 1
                await asyncio.sleep(0)

    def _steps(self, slice_hosts: int | None) -> Generator[None, None, dict[str, Any]]:
        """The snapshot, as a generator that yields between slices of about ``slice_hosts`` host rows (never
        when None) and returns the document."""
        info = self._info()
        unbound = list(self._unbound()) if self._unbound is not None else []
        known_pools = set(self._ledgers)
        routes = []
        live_pools: set[int] = set()
        listeners = {id(lst): lst for lst in self._listeners_of()}
        for lid, gone in self._listeners.items():
            if lid not in listeners:
                self._fd_retired += gone.fd_exhausted
        self._listeners = listeners
        fd_exhausted = self._fd_retired
        budget = slice_hosts
        for listener in listeners.values():
            fd_exhausted += listener.fd_exhausted
            # every route served on the listener (a tcp port has one; http/tls ports may have several)
            bindings = getattr(listener, "bindings", None)
            pools = [b.pool for b in bindings] if bindings else [listener.pool]
            protocol = getattr(listener, "protocol", "tcp")
            udp_site = listener if protocol == "udp" else None
            http_front = getattr(listener, "http", None)  # mesh.proxy.http.HttpFront of an http listener
            for pool in pools:
                if budget is not None and budget <= 0:  # between two routes (many small or empty ones)
                    yield
                    budget = slice_hosts
                # The export list and the removed totals in one slice (class doc), with the route's counters.
                led = self._ledger(pool)
                live_pools.add(id(pool))
                exported = led.sync()
                n_current = len(pool.hosts)
                rs = pool.stats
                hosts: list[dict[str, Any]] = []
                route_row = {
                    "service": pool.service,
                    "port": pool.route.port,
                    "listen_host": pool.route.listen_host,
                    "protocol": protocol,
                    # what the listener is bound to: the route's port, or the one chosen for port 0
                    "bound_port": listener.port if listener.listening else None,
                    "listening": bool(listener.listening),
                    "accepted": rs.accepted,
                    "no_endpoint": rs.no_endpoint,
                    "retries": rs.retries,
                    "overflow": rs.overflow_closed,
                    "connect_failures": dict(rs.connect_failures),
                    # client connections given up after the last connect attempt, by its reason (needs
                    # RouteStats.failed; absent until the proxy counts it)
                    "failed": dict(getattr(rs, "failed", None) or {}),
                    "hosts": hosts,
                    "removed": _counters(led.removed),
                }
                if udp_site is not None:
                    route_row["udp"] = _udp_route(udp_site)
                if http_front is not None:
                    route_row["http"] = _http_route(getattr(pool, "http", None))
                    if pool is pools[0]:  # listener-wide: on its first route only
                        route_row["http_listener"] = _http_listener(http_front.stats)
                inbound = getattr(listener, "inbound_stats", None)  # incoming PROXY headers (accept_proxy)
                if inbound is not None and pool is pools[0] and _inbound_used(inbound, pools):
                    route_row["inbound"] = {"headers": inbound.headers, "closed": dict(inbound.closed)}
                sni = getattr(listener, "sni_stats", None)
                if sni is not None and pool is pools[0]:  # listener-wide: on its first route only
                    route_row["tls"] = {"routed": sni.routed, "closed": dict(sni.closed)}
                routes.append(route_row)
                start = 0
                total = len(exported)
                while start < total:
                    if budget is not None and budget <= 0:
                        yield
                        budget = slice_hosts
                    end = total if budget is None else min(total, start + budget)
                    _host_rows(hosts, exported, start, end, n_current, pool, udp_site, self._clock)
                    if budget is not None:
                        budget -= end - start
                    start = end
                if budget is not None:
                    budget -= 1  # a route row costs about one host row
        for service, listen_host, port, *protocol in unbound:
            routes.append(_unbound_route(service, listen_host, port, *protocol))
        for pid in known_pools - live_pools:
            # not served at the start: the port is no longer served, its counters end with it (a ledger
            # made while this snapshot ran, for a pool of a table applied meanwhile, is kept)
            self._ledgers.pop(pid, None)
        return {
            "v": SNAPSHOT_VERSION,
            "pid": os.getpid(),
            "buckets": _BUCKETS,
            "table_version": info.get("table_version"),
            "table_applied": info.get("table_applied"),
            "fd_exhausted": fd_exhausted,
            "routes": routes,
        }


@contextlib.asynccontextmanager
async def _gc_paused_async() -> Any:
    with gc_paused():
        yield


def _host_rows(
    out: list[dict[str, Any]],
    exported: Sequence[Any],
    start: int,
    end: int,
    n_current: int,
    pool: Any,
    udp_site: Any,
    clock: Callable[[], float],
) -> None:
    """Append the rows of ``exported[start:end]`` to ``out``: one dict per host, its two histograms as
    dicts of a copied counts list (the shape ``merge_snapshots`` and the worker protocol read)."""
    pool_now = pool.clock() if hasattr(pool, "clock") else clock()
    for i in range(start, end):
        h = exported[i]
        ep = h.endpoint
        st = h.stats
        ct = st.connect_time
        du = st.duration
        health = h.health
        ejected_left = h.ejected_until - pool_now if health & _HEALTH_EJECTED else 0.0
        row = {
            "id": ep.id,
            "address": ep.hostport,
            "via": h.via,
            "node": ep.node,
            "weight": h.weight,
            "active": h.active,
            "health": health,
            "draining": h.draining,
            "listed": i < n_current,  # departed hosts still carrying connections come last
            "ejected_seconds_left": ejected_left if ejected_left > 0.0 else 0.0,
            "connections": st.connections,
            "bytes_in": st.bytes_in,
            "bytes_out": st.bytes_out,
            "ejections": st.ejections,
            "connect_time": {"counts": ct.counts.copy(), "sum": ct.sum},
            "duration": {"counts": du.counts.copy(), "sum": du.sum},
        }
        if udp_site is not None:
            row["udp"] = _udp_host(udp_site, h)
        out.append(row)


_BUCKETS = {"connect_time": list(CONNECT_BUCKETS), "duration": list(DURATION_BUCKETS), "http": list(HTTP_BUCKETS)}
_HTTP_HISTOGRAMS = ("duration", "upstream_time")
_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _inbound_used(inbound: Any, pools: list[Any]) -> bool:
    """Export a listener's incoming-PROXY counters once some route on it accepts the header, or once they
    counted anything (a route that stopped accepting keeps its series)."""
    if inbound.headers or any(inbound.closed.values()):
        return True
    return any(getattr(getattr(p, "options", None), "accept_proxy", None) for p in pools)


def _http_route(hs: Any) -> dict[str, Any]:
    """An http route's counters (``mesh.proxy.http.HttpStats``, made on the route's first request; None
    before it: all zero).  Tuple keys become nested dicts so the row stays JSON and sums with ``_sum_into``:
    ``requests[method][class]``, ``generated[status][reason]``."""
    if hs is None:
        empty = {"counts": [0] * (len(HTTP_BUCKETS) + 1), "sum": 0.0}
        return {"requests": {}, "generated": {}, "retries": {}, "active": 0, "queued": 0, "pool_new": 0,
                "pool_reused": 0, "upgrades": 0, "duration": empty, "upstream_time": dict(empty, counts=list(empty["counts"]))}  # fmt: skip
    requests: dict[str, dict[str, int]] = {}
    for (method, cls), n in hs.requests.items():
        requests.setdefault(method, {})[cls] = n
    generated: dict[str, dict[str, int]] = {}
    for (status, reason), n in hs.generated.items():
        generated.setdefault(str(status), {})[reason] = n
    return {
        "requests": requests,
        "generated": generated,
        "retries": dict(hs.retries),
        "active": hs.active,
        "queued": hs.queued,
        "pool_new": hs.pool_new,
        "pool_reused": hs.pool_reused,
        "upgrades": hs.upgrades,
        "duration": _hist(hs.duration),
        "upstream_time": _hist(hs.upstream_time),
    }


def _http_listener(ls: Any) -> dict[str, Any]:
    """An http listener's own counters (``ListenerHttpStats``): request heads read, and requests answered
    or connections closed before any route took them, ``closed[status][reason]``."""
    closed: dict[str, dict[str, int]] = {}
    for (status, reason), n in ls.closed.items():
        closed.setdefault(str(status), {})[reason] = n
    return {"requests": ls.requests, "closed": closed}


def _copy_http(h: dict[str, Any]) -> dict[str, Any]:
    out = _copy_nested({k: v for k, v in h.items() if k not in _HTTP_HISTOGRAMS})
    for k in _HTTP_HISTOGRAMS:
        out[k] = {"counts": list(h[k]["counts"]), "sum": h[k]["sum"]}
    return out


def _add_http(into: dict[str, Any], other: dict[str, Any]) -> None:
    _sum_into(into, {k: v for k, v in other.items() if k not in _HTTP_HISTOGRAMS})
    for k in _HTTP_HISTOGRAMS:
        _add_hist(into[k], other[k])


def http_summary(h: dict[str, Any]) -> dict[str, Any]:
    """The short form of a merged http row the admin API and the dashboard show: requests in total and by
    status class (all five classes present) and by method, active, queued, retries (total and by reason),
    generated responses ("503 no_endpoint": n), pooled upstream connections reused / new, upgrades, and
    the mean request and upstream response times (None before the first request)."""
    by_class = dict.fromkeys(_STATUS_CLASSES, 0)
    by_method: dict[str, int] = {}
    for method, classes in h["requests"].items():
        for cls, n in classes.items():
            by_class[cls] = by_class.get(cls, 0) + n
            by_method[method] = by_method.get(method, 0) + n
    d, u = h["duration"], h["upstream_time"]
    nd, nu = sum(d["counts"]), sum(u["counts"])
    return {
        "requests": sum(by_class.values()),
        "by_class": by_class,
        "by_method": dict(sorted(by_method.items())),
        "active": h["active"],
        "queued": h["queued"],
        "retries": sum(h["retries"].values()),
        "retries_by_reason": dict(sorted(h["retries"].items())),
        "generated": {f"{st} {reason}": n for st, reasons in sorted(h["generated"].items()) for reason, n in sorted(reasons.items())},
        "upstream_reused": h["pool_reused"],
        "upstream_new": h["pool_new"],
        "upgrades": h["upgrades"],
        "duration_mean_seconds": round(d["sum"] / nd, 6) if nd else None,
        "upstream_mean_seconds": round(u["sum"] / nu, 6) if nu else None,
    }  # fmt: skip


def _udp_host(site: Any, host: Any) -> dict[str, int]:
    """A udp route's counters of one host: ended sessions (``site.host_stats``) plus the open ones."""
    hs = site.host_stats.get(host)
    out = hs.as_dict() if hs is not None else dict.fromkeys(_UDP_HOST_KEYS, 0)
    n, di, do, bi, bo = site.live(host)
    out["sessions_active"] = n
    out["sessions"] += n
    out["datagrams_in"] += di
    out["datagrams_out"] += do
    out["bytes_in"] += bi
    out["bytes_out"] += bo
    return out


_UDP_HOST_KEYS = ("bytes_in", "bytes_out", "datagrams_in", "datagrams_out", "refused", "sessions")


def _udp_route(site: Any) -> dict[str, Any]:
    st = site.stats
    removed = site.removed_stats.as_dict() if hasattr(site, "removed_stats") else dict.fromkeys(_UDP_HOST_KEYS, 0)
    return {
        "sessions_active": len(site.sessions),
        "sessions_created": st.sessions_created,
        "sessions_evicted": st.sessions_evicted,
        "sessions_moved": st.sessions_moved,
        "sessions_ended": dict(st.sessions_ended),
        "dropped": dict(st.dropped),
        "removed": removed,
    }


def _sum_into(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add the ints (and dicts of ints) of ``other`` to ``into``."""
    for k, v in other.items():
        if isinstance(v, dict):
            _sum_into(into.setdefault(k, {}), v)
        elif isinstance(v, int) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v


def _copy_nested(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy_nested(v) if isinstance(v, dict) else v for k, v in d.items()}


def route_key(r: dict[str, Any]) -> tuple[str, int, str]:
    """What routes of snapshots merge by: (service, port, transport) -- one service may publish a
    port for tcp and for udp."""
    return (r["service"], r["port"], "udp" if r.get("protocol") == "udp" else "stream")


def _unbound_route(service: str, listen_host: str, port: int, protocol: str = "tcp") -> dict[str, Any]:
    """A route of the table whose port could not be bound: exported with ``mesh_listener_up`` 0."""
    return {
        "service": service,
        "port": port,
        "listen_host": listen_host,
        "protocol": protocol,
        "bound_port": None,
        "listening": False,
        "accepted": 0,
        "no_endpoint": 0,
        "retries": 0,
        "overflow": 0,
        "connect_failures": {},
        "failed": {},
        "hosts": [],
        "removed": _counters(HostStats()),
    }


def _mesh_unbound(mesh: Any) -> list[tuple[str, str, int, str]]:
    table, failed = mesh.table, getattr(mesh, "failed", None)
    if table is None or not failed:
        return []
    from mesh.runtime import listen_key  # not at import: metrics is imported by the runtime's users

    return [(svc.name, r.listen_host, r.port, r.protocol) for svc, r in table.routes() if listen_key(svc, r) in failed]


def _mesh_info(mesh: Any) -> dict[str, Any]:
    table = mesh.table
    return {
        "table_version": None if table is None else table.version,
        "table_applied": getattr(mesh, "applied_at", None),
    }


_readers: weakref.WeakKeyDictionary[Any, StatsReader] = weakref.WeakKeyDictionary()


def reader_for(mesh: Any) -> StatsReader:
    """The (cached) ``StatsReader`` of a ``Mesh``: one per mesh, so removed-host ledgers persist."""
    reader = _readers.get(mesh)
    if reader is None:
        ref = weakref.ref(mesh)  # the cached reader must not keep its mesh alive

        def listeners() -> list[Any]:
            m = ref()
            return [] if m is None else m.listeners()

        def info() -> dict[str, Any]:
            m = ref()
            return {} if m is None else _mesh_info(m)

        def unbound() -> list[tuple[str, str, int, str]]:
            m = ref()
            return [] if m is None else _mesh_unbound(m)

        reader = _readers[mesh] = StatsReader(listeners, info, unbound=unbound)
        hooks = getattr(mesh, "on_pool", None)
        if hooks is not None:
            hooks.append(reader.watch)
    return reader


def snapshot(mesh: Any) -> dict[str, Any]:
    """The JSON-able stats snapshot of one ``Mesh``, taken at once (tests, tools)."""
    return reader_for(mesh).snapshot()


async def stats_message(mesh: Any, request_id: Any) -> bytes:
    """A worker's answer to the parent's stats request, as the control channel's JSON line
    (``{"type": "stats", "id": ..., "snapshot": ...}``): the snapshot taken in slices, encoded in pieces
    in a thread (``json_bytes``; one ``json.dumps`` of 5,000 endpoints held the GIL 26 ms), with the cyclic
    collector paused until the document is freed."""
    with gc_paused():
        snap = await snapshot_async(mesh)
        msg = {"type": "stats", "id": request_id, "snapshot": snap}
        del snap
        line = await asyncio.to_thread(_json_line, msg)
        del msg
    return line


def _json_line(msg: dict[str, Any]) -> bytes:
    return json_bytes(msg) + b"\n"


async def snapshot_async(mesh: Any, slice_hosts: int = SNAPSHOT_SLICE) -> dict[str, Any]:
    """The same snapshot, yielding to the loop every ``slice_hosts`` host rows (``StatsReader``): what the
    admin API and a worker answering the parent's stats request use on the data plane's loop."""
    return await reader_for(mesh).snapshot_async(slice_hosts)


# ---------------------------------------------------------------------------------------------------------
# Merging snapshots (workers)
# ---------------------------------------------------------------------------------------------------------
def _add_hist(into: dict[str, Any], other: dict[str, Any]) -> None:
    counts = into["counts"]
    for i, n in enumerate(other["counts"]):
        counts[i] += n
    into["sum"] += other["sum"]


def _add_counters(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k in ("connections", "bytes_in", "bytes_out", "ejections"):
        into[k] += other[k]
    _add_hist(into["connect_time"], other["connect_time"])
    _add_hist(into["duration"], other["duration"])


def _copy_counters(c: dict[str, Any]) -> dict[str, Any]:
    out = dict(c)
    out["connect_time"] = {"counts": list(c["connect_time"]["counts"]), "sum": c["connect_time"]["sum"]}
    out["duration"] = {"counts": list(c["duration"]["counts"]), "sum": c["duration"]["sum"]}
    return out


def merge_snapshots(snaps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge snapshots of several processes (or of one, to fold routes sharing (service, port)).

    Routes merge by (service, port), hosts by endpoint id.  Counters and histograms are summed, ``active``
    summed, ``health`` bits OR-ed, ``draining`` / ``listed`` / ``listening`` any, ``ejected_seconds_left``
    max; ``bound_ports`` lists the distinct ports the processes' listeners are bound to (one, as every
    worker binds the route's own port; none when no process listens).  The table version is the lowest any process runs (the one every process has applied) and the
    applied time the latest among processes on that version.  ``processes`` counts the inputs.
    Raises ``ValueError`` for a snapshot of another format version or other histogram buckets.
    """
    routes: dict[tuple[str, int, str], dict[str, Any]] = {}
    hosts_of: dict[tuple[str, int, str], dict[str, dict[str, Any]]] = {}
    buckets = None
    versions: list[tuple[int, float]] = []
    fd_exhausted = 0
    for snap in snaps:
        if snap.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"stats snapshot format {snap.get('v')!r} is not {SNAPSHOT_VERSION}")
        if buckets is None:
            buckets = dict(snap["buckets"])
        else:
            theirs = snap["buckets"]
            if any(theirs[k] != buckets[k] for k in theirs.keys() & buckets.keys()):
                raise ValueError("stats snapshots use different histogram buckets; cannot merge them")
            for k in theirs.keys() - buckets.keys():
                buckets[k] = theirs[k]
        if snap.get("table_version") is not None:
            versions.append((snap["table_version"], snap.get("table_applied") or 0.0))
        fd_exhausted += snap.get("fd_exhausted", 0)
        for r in snap["routes"]:
            key = route_key(r)
            into = routes.get(key)
            if into is None:
                into = routes[key] = {
                    "service": r["service"],
                    "port": r["port"],
                    "listen_host": r["listen_host"],
                    "protocol": r.get("protocol"),
                    "bound_ports": _bound_ports(r),
                    "listening": r["listening"],
                    "accepted": r["accepted"],
                    "no_endpoint": r["no_endpoint"],
                    "retries": r["retries"],
                    "overflow": r["overflow"],
                    "connect_failures": dict(r["connect_failures"]),
                    "failed": dict(r["failed"]),
                    "removed": _copy_counters(r["removed"]),
                }
                for extra in ("udp", "tls", "http_listener", "inbound"):
                    if extra in r:
                        into[extra] = _copy_nested(r[extra])
                if "http" in r:
                    into["http"] = _copy_http(r["http"])
                hosts_of[key] = {}
            else:
                for extra in ("udp", "tls", "http_listener", "inbound"):
                    if extra in r:
                        _sum_into(into.setdefault(extra, {}), r[extra])
                if "http" in r:
                    if "http" in into:
                        _add_http(into["http"], r["http"])
                    else:
                        into["http"] = _copy_http(r["http"])
                if into["listen_host"] != r["listen_host"]:
                    into["listen_host"] = ",".join(sorted({*into["listen_host"].split(","), r["listen_host"]}))
                into["listening"] = into["listening"] or r["listening"]
                into["bound_ports"] = sorted({*into["bound_ports"], *_bound_ports(r)})
                for k in ("accepted", "no_endpoint", "retries", "overflow"):
                    into[k] += r[k]
                for field in ("connect_failures", "failed"):
                    counts = into[field]
                    for reason, n in r[field].items():
                        counts[reason] = counts.get(reason, 0) + n
                _add_counters(into["removed"], r["removed"])
            hosts = hosts_of[key]
            for h in r["hosts"]:
                mine = hosts.get(h["id"])
                if mine is None:
                    mine = hosts[h["id"]] = _copy_counters(h)
                    if "udp" in h:
                        mine["udp"] = dict(h["udp"])
                    mine["up"] = _up(h)
                    mine["healthy"] = _healthy(h)
                    continue
                _add_counters(mine, h)
                if "udp" in h:
                    _sum_into(mine.setdefault("udp", {}), h["udp"])
                mine["active"] += h["active"]
                mine["health"] |= h["health"]
                mine["draining"] = mine["draining"] or h["draining"]
                mine["listed"] = mine["listed"] or h["listed"]
                mine["ejected_seconds_left"] = max(mine["ejected_seconds_left"], h["ejected_seconds_left"])
                mine["up"] = mine["up"] or _up(h)
                mine["healthy"] = mine["healthy"] or _healthy(h)
    out_routes = []
    for key, r in routes.items():
        r["hosts"] = sorted(hosts_of[key].values(), key=lambda h: h["id"])
        out_routes.append(r)
    out_routes.sort(key=lambda r: (r["service"], r["port"], r.get("protocol") or ""))
    version = applied = None
    if versions:
        version = min(v for v, _ in versions)
        applied = max(t for v, t in versions if v == version) or None
    return {
        "v": SNAPSHOT_VERSION,
        "processes": sum(1 for s in snaps if not s.get("retired")),
        "buckets": buckets or dict(_BUCKETS),
        "table_version": version,
        "table_applied": applied,
        "fd_exhausted": fd_exhausted,
        "routes": out_routes,
    }


def _bound_ports(r: dict[str, Any]) -> list[int]:
    """The bound ports of a route row: of one process (``bound_port``) or already merged (``bound_ports``)."""
    if "bound_ports" in r:
        return list(r["bound_ports"])
    return [] if r.get("bound_port") is None else [r["bound_port"]]


def _up(h: dict[str, Any]) -> bool:
    """Usable for new connections outside panic mode: listed, not draining, healthy and not ejected."""
    if "up" in h:  # already merged (e.g. the retired-workers snapshot)
        return h["up"]
    return h["listed"] and not h["draining"] and h["health"] == 0


def _healthy(h: dict[str, Any]) -> bool:
    """Passes its active health check (always true without one); ejection is reported separately."""
    if "healthy" in h:
        return h["healthy"]
    return not h["health"] & _HEALTH_FAILED_ACTIVE_HC


def failed_by_reason(r: dict[str, Any]) -> list[tuple[str, int]]:
    """Client connections closed without being proxied, by reason (FAILURE_REASONS always present)."""
    fails = dict(r["failed"])
    fails["no_endpoint"] = fails.get("no_endpoint", 0) + r["no_endpoint"]
    fails["overflow"] = fails.get("overflow", 0) + r["overflow"]
    return [(reason, fails.get(reason, 0)) for reason in sorted(set(FAILURE_REASONS) | fails.keys())]


def _cumulative(bounds: list[str], hist: dict[str, Any]) -> list[tuple[str, float]]:
    acc = 0
    out = []
    for bound, n in zip(bounds, hist["counts"], strict=True):
        acc += n
        out.append((bound, acc))
    return out


_HELP = {
    "mesh_connections_accepted_total": ("counter", "Client connections accepted."),
    "mesh_connections_active": ("gauge", "Open proxied connections."),
    "mesh_connections_failed_total": (
        "counter",
        "Client connections closed without being proxied, by reason: no_endpoint (none usable), "
        "refused / timeout / unreachable / error (last connect attempt), overflow (bound exceeded).",
    ),
    "mesh_upstream_connections_total": ("counter", "Connections established to the endpoint."),
    "mesh_received_bytes_total": ("counter", "Bytes received from clients (client -> endpoint), counted at close."),
    "mesh_sent_bytes_total": ("counter", "Bytes sent to clients (endpoint -> client), counted at close."),
    "mesh_upstream_connect_seconds": ("histogram", "Time to connect to the endpoint."),
    "mesh_connection_duration_seconds": ("histogram", "Lifetime of proxied connections, from accept to close."),
    "mesh_upstream_connect_failures_total": (
        "counter",
        "Failed connect attempts to endpoints (each retry counts), by reason.",
    ),
    "mesh_retries_total": ("counter", "Connect attempts retried on another endpoint."),
    "mesh_ejections_total": ("counter", "Outlier ejections of the endpoint."),
    "mesh_endpoint_up": ("gauge", "1 when the endpoint may get new connections."),
    "mesh_endpoint_healthy": ("gauge", "1 when the endpoint passes its health check."),
    "mesh_endpoint_ejected": ("gauge", "1 while the endpoint is ejected."),
    "mesh_healthy_endpoints": ("gauge", "Endpoints up (listed, healthy, not ejected)."),
    "mesh_endpoints": ("gauge", "Endpoints listed in the table (draining included)."),
    "mesh_listener_up": ("gauge", "1 when the route's port is bound and accepting."),
    "mesh_table_version": ("gauge", "Version of the routing table applied (lowest of workers)."),
    "mesh_table_applied_timestamp_seconds": ("gauge", "When that table was applied (Unix time)."),
    "mesh_fd_exhausted_total": ("counter", "Accepts that failed for lack of file descriptors."),
    "mesh_data_plane_processes": ("gauge", "Data-plane processes that answered this scrape."),
    # udp routes (their series are apart: one service may publish a port for tcp and for udp)
    "mesh_udp_listener_up": ("gauge", "1 when the udp route's port is bound."),
    "mesh_udp_new_sessions_total": ("counter", "UDP sessions created (a client's first datagram)."),
    "mesh_udp_sessions_evicted_total": ("counter", "UDP sessions evicted beyond udp_max_sessions (oldest idle)."),
    "mesh_udp_sessions_moved_total": ("counter", "UDP sessions moved to another endpoint (refused, or removed)."),
    "mesh_udp_sessions_ended_total": (
        "counter",
        "UDP sessions ended, by reason: idle, responses, evicted, refused, removed, closed, error.",
    ),
    "mesh_udp_dropped_total": ("counter", "UDP datagrams dropped, by reason."),
    "mesh_udp_sessions_active": ("gauge", "Open UDP sessions on the endpoint."),
    "mesh_udp_endpoint_up": ("gauge", "1 when the endpoint may get new UDP sessions."),
    "mesh_udp_endpoint_sessions_total": ("counter", "UDP sessions the endpoint got."),
    "mesh_udp_received_datagrams_total": ("counter", "Datagrams from clients sent on to the endpoint."),
    "mesh_udp_sent_datagrams_total": ("counter", "Datagrams from the endpoint sent back to clients."),
    "mesh_udp_received_bytes_total": ("counter", "Payload bytes from clients sent on to the endpoint."),
    "mesh_udp_sent_bytes_total": ("counter", "Payload bytes from the endpoint sent back to clients."),
    "mesh_udp_refused_total": ("counter", "ICMP port unreachable (ECONNREFUSED) from the endpoint."),
    # tls passthrough: the hello phase of a shared port (per-SNI-route series are the connection series)
    "mesh_tls_routed_total": ("counter", "TLS connections routed by their ClientHello, per listener."),
    "mesh_tls_closed_total": (
        "counter",
        "TLS connections closed before routing, by reason: not_tls, bad_hello, timeout, incomplete, no_route.",
    ),
    # http routes (protocol: http): per request, on top of the connection series above (module doc)
    "mesh_http_requests_total": (
        "counter",
        "HTTP requests finished, by method family (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, other) and "
        "status class; generated responses included.",
    ),
    "mesh_http_request_duration_seconds": ("histogram", "HTTP request time, from its head read to the response's end."),
    "mesh_http_upstream_response_seconds": (
        "histogram",
        "Time from a request sent to its replica to the response head (each attempt).",
    ),
    "mesh_http_requests_active": ("gauge", "HTTP requests in progress (routed, not finished)."),
    "mesh_http_requests_queued": ("gauge", "HTTP requests waiting for a replica under http_max_inflight."),
    "mesh_http_retries_total": (
        "counter",
        "HTTP request attempts retried, by reason: connect, reused_closed, status_NNN, tunnel_refused; "
        "*_over_budget: a retry refused by the retry budget.",
    ),
    "mesh_http_upstream_requests_total": (
        "counter",
        "Requests sent upstream on a new connection or on a reused keep-alive one.",
    ),
    "mesh_http_generated_responses_total": ("counter", "Responses the mesh made itself, by status and reason."),
    "mesh_http_upgrades_total": ("counter", "Requests upgraded (101: WebSocket and the like), then spliced."),
    "mesh_http_listener_requests_total": ("counter", "HTTP request heads read on the port, routed or not."),
    "mesh_http_unrouted_total": (
        "counter",
        "HTTP requests answered before any route took them (404 no_route, 400/408/414/431/501 ...: the "
        "connection is then closed), by status and reason.",
    ),
    # incoming PROXY headers (accept_proxy), per listener
    "mesh_inbound_proxy_headers_total": ("counter", "Connections whose incoming PROXY header was accepted."),
    "mesh_inbound_proxy_closed_total": (
        "counter",
        "Connections closed in the incoming PROXY header phase, by reason: timeout, bad_header, "
        "untrusted_header, missing_header, incomplete.",
    ),
}


_ONLY_WHEN_USED = ("mesh_udp_", "mesh_tls_", "mesh_http_", "mesh_inbound_")


def _esc(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def render_text(merged: dict[str, Any]) -> str:
    """The Prometheus text format (0.0.4) of a merged snapshot, written directly (``render_lines`` joined)."""
    return "".join(render_lines(merged))


def render_lines(merged: dict[str, Any]) -> list[str]:
    """The lines of ``render_text``: a big exposition is then encoded in pieces (``encode_pieces``), never as
    one string of tens of megabytes (one such join or encode holds the GIL for tens of milliseconds here,
    page faults included, and the data plane's loop waits for it).

    Written directly rather than as metric families through ``generate_latest``: 1000 endpoints make
    ~45,000 samples, mostly histogram buckets, and prometheus_client's encoder over families took ~20x as
    long (265 ms against 12 ms).  Tests read this output back with prometheus_client's own parser.
    """
    ct_bounds = [*(floatToGoString(b) for b in merged["buckets"]["connect_time"]), "+Inf"]
    du_bounds = [*(floatToGoString(b) for b in merged["buckets"]["duration"]), "+Inf"]
    http_bounds = [*(floatToGoString(b) for b in merged["buckets"].get("http", HTTP_BUCKETS)), "+Inf"]
    lines: dict[str, list[str]] = {name: [] for name in _HELP}
    accepted = lines["mesh_connections_accepted_total"]
    failed = lines["mesh_connections_failed_total"]
    retries = lines["mesh_retries_total"]
    connect_failed = lines["mesh_upstream_connect_failures_total"]
    healthy_n = lines["mesh_healthy_endpoints"]
    listed_n = lines["mesh_endpoints"]
    listening = lines["mesh_listener_up"]
    active = lines["mesh_connections_active"]
    up = lines["mesh_endpoint_up"]
    healthy = lines["mesh_endpoint_healthy"]
    ejected = lines["mesh_endpoint_ejected"]
    for r in merged["routes"]:
        rl = f'service="{_esc(r["service"])}",port="{r["port"]}"'
        if r.get("protocol") == "udp":
            _render_udp(lines, rl, r)
            continue
        if "tls" in r:
            tl = f'port="{r["port"]}",listen_host="{_esc(r["listen_host"])}"'
            lines["mesh_tls_routed_total"].append(f"mesh_tls_routed_total{{{tl}}} {r['tls']['routed']}\n")
            for reason, n in sorted(r["tls"]["closed"].items()):
                lines["mesh_tls_closed_total"].append(f'mesh_tls_closed_total{{{tl},reason="{reason}"}} {n}\n')
        if "inbound" in r:
            il = f'port="{r["port"]}",listen_host="{_esc(r["listen_host"])}"'
            lines["mesh_inbound_proxy_headers_total"].append(
                f"mesh_inbound_proxy_headers_total{{{il}}} {r['inbound']['headers']}\n"
            )
            for reason, n in sorted(r["inbound"]["closed"].items()):
                lines["mesh_inbound_proxy_closed_total"].append(
                    f'mesh_inbound_proxy_closed_total{{{il},reason="{_esc(reason)}"}} {n}\n'
                )
        if "http" in r:
            _render_http(lines, rl, r["http"], http_bounds)
        if "http_listener" in r:
            _render_http_listener(lines, r)
        accepted.append(f"mesh_connections_accepted_total{{{rl}}} {r['accepted']}\n")
        retries.append(f"mesh_retries_total{{{rl}}} {r['retries']}\n")
        listening.append(f"mesh_listener_up{{{rl}}} {1 if r['listening'] else 0}\n")
        for reason, n in failed_by_reason(r):
            failed.append(f'mesh_connections_failed_total{{{rl},reason="{_esc(reason)}"}} {n}\n')
        cf = r["connect_failures"]
        for reason in sorted(set(CONNECT_FAILURE_REASONS) | cf.keys()):
            connect_failed.append(
                f'mesh_upstream_connect_failures_total{{{rl},reason="{_esc(reason)}"}} {cf.get(reason, 0)}\n'
            )
        n_up = n_listed = 0
        for h in r["hosts"]:
            hl = f'{rl},endpoint="{_esc(h["id"])}"'
            is_up = h["up"]
            n_up += is_up
            n_listed += h["listed"]
            active.append(f"mesh_connections_active{{{hl}}} {h['active']}\n")
            up.append(f"mesh_endpoint_up{{{hl}}} {1 if is_up else 0}\n")
            healthy.append(f"mesh_endpoint_healthy{{{hl}}} {1 if h['healthy'] else 0}\n")
            ejected.append(f"mesh_endpoint_ejected{{{hl}}} {1 if h['health'] & _HEALTH_EJECTED else 0}\n")
            _render_endpoint_counters(lines, hl, h, ct_bounds, du_bounds)
        rm = r["removed"]
        if rm["connections"] or rm["ejections"] or rm["bytes_in"] or rm["bytes_out"]:
            _render_endpoint_counters(lines, f'{rl},endpoint="{REMOVED_ENDPOINT}"', rm, ct_bounds, du_bounds)
        healthy_n.append(f"mesh_healthy_endpoints{{{rl}}} {n_up}\n")
        listed_n.append(f"mesh_endpoints{{{rl}}} {n_listed}\n")
    if merged["table_version"] is not None:
        lines["mesh_table_version"].append(f"mesh_table_version {merged['table_version']}\n")
    if merged["table_applied"] is not None:
        lines["mesh_table_applied_timestamp_seconds"].append(
            f"mesh_table_applied_timestamp_seconds {merged['table_applied']!r}\n"
        )
    lines["mesh_fd_exhausted_total"].append(f"mesh_fd_exhausted_total {merged['fd_exhausted']}\n")
    lines["mesh_data_plane_processes"].append(f"mesh_data_plane_processes {merged.get('processes', 1)}\n")
    out = []
    for name, (kind, doc) in _HELP.items():
        if not lines[name] and name.startswith(_ONLY_WHEN_USED):
            continue  # udp and tls families appear once such a route exists
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        out.extend(lines[name])
    return out


def encode_pieces(chunks: Iterable[str], lines: int = 2048) -> list[bytes]:
    """``chunks`` (lines, or JSON tokens) as UTF-8 pieces of about ``lines`` chunks each: no single big
    string or bytes is built, and each join/encode is short (the GIL changes hands between them)."""
    out: list[bytes] = []
    batch: list[str] = []
    for c in chunks:
        batch.append(c)
        if len(batch) >= lines:
            out.append("".join(batch).encode())
            batch.clear()
    if batch:
        out.append("".join(batch).encode())
    return out


def _render_udp(lines: dict[str, list[str]], rl: str, r: dict[str, Any]) -> None:
    u = r.get("udp") or {}
    lines["mesh_udp_listener_up"].append(f"mesh_udp_listener_up{{{rl}}} {1 if r['listening'] else 0}\n")
    for key, name in (("sessions_created", "mesh_udp_new_sessions_total"),
                      ("sessions_evicted", "mesh_udp_sessions_evicted_total"),
                      ("sessions_moved", "mesh_udp_sessions_moved_total")):  # fmt: skip
        lines[name].append(f"{name}{{{rl}}} {u.get(key, 0)}\n")
    for reason, n in sorted((u.get("sessions_ended") or {}).items()):
        lines["mesh_udp_sessions_ended_total"].append(f'mesh_udp_sessions_ended_total{{{rl},reason="{reason}"}} {n}\n')
    for reason, n in sorted((u.get("dropped") or {}).items()):
        lines["mesh_udp_dropped_total"].append(f'mesh_udp_dropped_total{{{rl},reason="{reason}"}} {n}\n')
    rows = [(h["id"], h.get("udp") or {}, h) for h in r["hosts"]]
    removed = u.get("removed") or {}
    if any(removed.values()):
        rows.append((REMOVED_ENDPOINT, removed, None))
    for ep_id, c, h in rows:
        hl = f'{rl},endpoint="{_esc(ep_id)}"'
        if h is not None:
            lines["mesh_udp_sessions_active"].append(
                f"mesh_udp_sessions_active{{{hl}}} {c.get('sessions_active', 0)}\n"
            )
            lines["mesh_udp_endpoint_up"].append(f"mesh_udp_endpoint_up{{{hl}}} {1 if h['up'] else 0}\n")
        for key, name in (("sessions", "mesh_udp_endpoint_sessions_total"), ("datagrams_in", "mesh_udp_received_datagrams_total"),
                          ("datagrams_out", "mesh_udp_sent_datagrams_total"), ("bytes_in", "mesh_udp_received_bytes_total"),
                          ("bytes_out", "mesh_udp_sent_bytes_total"), ("refused", "mesh_udp_refused_total")):  # fmt: skip
            lines[name].append(f"{name}{{{hl}}} {c.get(key, 0)}\n")


def _render_http(lines: dict[str, list[str]], rl: str, h: dict[str, Any], bounds: list[str]) -> None:
    out = lines["mesh_http_requests_total"]
    for method, classes in sorted(h["requests"].items()):
        for cls, n in sorted(classes.items()):
            out.append(f'mesh_http_requests_total{{{rl},method="{_esc(method)}",code_class="{cls}"}} {n}\n')
    lines["mesh_http_requests_active"].append(f"mesh_http_requests_active{{{rl}}} {h['active']}\n")
    lines["mesh_http_requests_queued"].append(f"mesh_http_requests_queued{{{rl}}} {h['queued']}\n")
    for reason, n in sorted(h["retries"].items()):
        lines["mesh_http_retries_total"].append(f'mesh_http_retries_total{{{rl},reason="{_esc(reason)}"}} {n}\n')
    out = lines["mesh_http_upstream_requests_total"]
    out.append(f'mesh_http_upstream_requests_total{{{rl},connection="new"}} {h["pool_new"]}\n')
    out.append(f'mesh_http_upstream_requests_total{{{rl},connection="reused"}} {h["pool_reused"]}\n')
    out = lines["mesh_http_generated_responses_total"]
    for status, reasons in sorted(h["generated"].items()):
        for reason, n in sorted(reasons.items()):
            out.append(f'mesh_http_generated_responses_total{{{rl},status="{status}",reason="{_esc(reason)}"}} {n}\n')
    lines["mesh_http_upgrades_total"].append(f"mesh_http_upgrades_total{{{rl}}} {h['upgrades']}\n")
    for name, key in (("mesh_http_request_duration_seconds", "duration"),
                      ("mesh_http_upstream_response_seconds", "upstream_time")):  # fmt: skip
        out = lines[name]
        hist = h[key]
        acc = 0
        for bound, n in zip(bounds, hist["counts"], strict=True):
            acc += n
            out.append(f'{name}_bucket{{{rl},le="{bound}"}} {acc}\n')
        out.append(f"{name}_count{{{rl}}} {acc}\n")
        out.append(f"{name}_sum{{{rl}}} {float(hist['sum'])!r}\n")


def _render_http_listener(lines: dict[str, list[str]], r: dict[str, Any]) -> None:
    hl = r["http_listener"]
    ll = f'port="{r["port"]}",listen_host="{_esc(r["listen_host"])}"'
    lines["mesh_http_listener_requests_total"].append(f"mesh_http_listener_requests_total{{{ll}}} {hl['requests']}\n")
    out = lines["mesh_http_unrouted_total"]
    for status, reasons in sorted(hl["closed"].items()):
        for reason, n in sorted(reasons.items()):
            out.append(f'mesh_http_unrouted_total{{{ll},status="{status}",reason="{_esc(reason)}"}} {n}\n')


def _render_endpoint_counters(lines, hl, c, ct_bounds, du_bounds) -> None:
    lines["mesh_upstream_connections_total"].append(f"mesh_upstream_connections_total{{{hl}}} {c['connections']}\n")
    lines["mesh_received_bytes_total"].append(f"mesh_received_bytes_total{{{hl}}} {c['bytes_in']}\n")
    lines["mesh_sent_bytes_total"].append(f"mesh_sent_bytes_total{{{hl}}} {c['bytes_out']}\n")
    lines["mesh_ejections_total"].append(f"mesh_ejections_total{{{hl}}} {c['ejections']}\n")
    for name, bounds, hist in (
        ("mesh_upstream_connect_seconds", ct_bounds, c["connect_time"]),
        ("mesh_connection_duration_seconds", du_bounds, c["duration"]),
    ):
        out = lines[name]
        acc = 0
        for bound, n in zip(bounds, hist["counts"], strict=True):
            acc += n
            out.append(f'{name}_bucket{{{hl},le="{bound}"}} {acc}\n')
        out.append(f"{name}_count{{{hl}}} {acc}\n")
        out.append(f"{name}_sum{{{hl}}} {float(hist['sum'])!r}\n")


class WorkerStats:
    """The parent's view of its workers' snapshots, kept monotonic across worker restarts.

    ``combine(snapshots, live_pids)`` returns the list to merge for one scrape: the fresh snapshots, the
    last snapshot of a live worker that did not answer in time (its counters must not vanish for one
    scrape), and one "retired" snapshot holding the final counters of workers that exited (so a restart
    does not make the summed counters go down).  Retired state gauges are zeroed: a dead worker has no
    active connections and no say on endpoint health.  Retired routes no live worker serves are dropped.
    """

    def __init__(self) -> None:
        self._last: dict[int, dict[str, Any]] = {}
        self._retired: dict[str, Any] | None = None
        self._retired_hosts: dict[tuple[str, int, str], list[dict[str, Any]]] = {}

    def combine(self, snapshots: Sequence[dict[str, Any]], live_pids: Iterable[int | None]) -> list[dict[str, Any]]:
        live = {p for p in live_pids if p is not None}
        for snap in snapshots:
            if not isinstance(snap, dict) or snap.get("v") != SNAPSHOT_VERSION or "pid" not in snap:
                log.warning("ignoring a malformed stats snapshot from a worker: %.200r", snap)
                continue
            self._last[snap["pid"]] = snap
        dead = [pid for pid in self._last if pid not in live]
        if dead:
            parts = [self._last.pop(pid) for pid in dead]
            if self._retired is not None:
                parts.append(self._retired)
            self._retired = _retire(merge_snapshots(parts))
            self._retired_hosts = {route_key(r): r["hosts"] for r in self._retired["routes"]}
        out = list(self._last.values())
        if self._retired is not None:
            out.append(self._retired_view(out))
        return out

    def _retired_view(self, live: list[dict[str, Any]]) -> dict[str, Any]:
        # Hosts no live worker knows any more go to the route's "removed" totals, like in a StatsReader.
        served: dict[tuple[str, int, str], set[str]] = {}
        for snap in live:
            for r in snap["routes"]:
                served.setdefault(route_key(r), set()).update(h["id"] for h in r["hosts"])
        routes = []
        for r in self._retired["routes"]:  # type: ignore[index]
            ids = served.get(route_key(r))
            if ids is None:
                continue
            r = dict(r, removed=_copy_counters(r["removed"]), hosts=[])
            for h in self._retired_hosts[route_key(r)]:
                if h["id"] in ids:
                    r["hosts"].append(h)
                else:
                    _add_counters(r["removed"], h)
            routes.append(r)
        return dict(self._retired, routes=routes)


def _retire(merged: dict[str, Any]) -> dict[str, Any]:
    merged["retired"] = True
    merged["table_version"] = merged["table_applied"] = None
    merged["pid"] = -1
    for r in merged["routes"]:
        r["listening"] = False
        r["bound_ports"] = []
        for h in r["hosts"]:
            h.update(active=0, health=0, draining=False, listed=False, ejected_seconds_left=0.0, up=False)
            h["healthy"] = False
            if "udp" in h:
                h["udp"]["sessions_active"] = 0
        if "udp" in r:
            r["udp"]["sessions_active"] = 0
        if "http" in r:
            r["http"]["active"] = r["http"]["queued"] = 0
    return merged


# ---------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------
class DiscoveryMetrics:
    """Counters of the discovery watcher, as plain methods the composition root wires to its hooks.

    Also a prometheus collector (``make_registry(discovery=...)`` registers it).  Not on the hot path, but
    kept as ints anyway so it can live in any process without a registry.
    """

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], int] = {}
        self.reconnects = 0
        self.lag_hist = Histogram(LAG_BUCKETS)

    def event(self, type: str, action: str) -> None:
        """One Docker event of ``type`` (container, service, ...) and ``action`` (start, die, ...)."""
        verb = action.split(":", 1)[0].strip() or "unknown"
        key = (type or "unknown", verb)
        if key not in self.events and len(self.events) >= _MAX_EVENT_LABELS:
            key = ("other", "other")
        self.events[key] = self.events.get(key, 0) + 1

    def reconnect(self) -> None:
        """The event stream was re-opened (after an error, an end of stream or a dockerd restart)."""
        self.reconnects += 1

    def lag(self, seconds: float, event_type: str | None = None) -> None:
        """Seconds from a Docker event's time to the table that reflects it being applied (``event_type``
        is accepted for the watcher's ``on_lag(seconds, type)`` hook and not used as a label)."""
        self.lag_hist.observe(max(0.0, seconds))

    def hooks(self) -> dict[str, Callable[..., None]]:
        """Keyword arguments for ``discovery.watcher.Watcher``: ``Watcher(engine, publish, **dm.hooks())``."""
        return {"on_event": self.event, "on_reconnect": self.reconnect, "on_lag": self.lag}

    def collect(self) -> Iterator[Metric]:
        ev = CounterMetricFamily("mesh_discovery_events", "Docker events seen.", labels=["type", "action"])
        for (t, a), n in sorted(self.events.items()):
            ev.add_metric([t, a], n)
        yield ev
        yield CounterMetricFamily(
            "mesh_discovery_reconnects", "Times the Docker event stream was re-opened.", value=self.reconnects
        )
        h = self.lag_hist
        lag = HistogramMetricFamily(
            "mesh_discovery_lag_seconds", "Docker event time to the table that reflects it being applied."
        )
        bounds = [*(floatToGoString(b) for b in h.buckets), "+Inf"]
        lag.add_metric([], _cumulative(bounds, {"counts": h.counts}), h.sum)
        yield lag


# ---------------------------------------------------------------------------------------------------------
# Registry and rendering
# ---------------------------------------------------------------------------------------------------------
def make_registry(*, discovery: DiscoveryMetrics | None = None, process: bool = True) -> CollectorRegistry:
    """A dedicated registry (never the global one) with the process/platform/GC collectors and ``discovery``.

    Mesh families are not registered here: ``MetricsExporter`` adds them per scrape from snapshots.
    """
    registry = CollectorRegistry(auto_describe=False)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    if discovery is not None:
        registry.register(discovery)
    return registry


class MetricsExporter:
    """Renders /metrics: the static ``registry`` (process, discovery) plus the mesh families of ``snapshots``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry

    def render(self, snapshots: Sequence[dict[str, Any]]) -> tuple[bytes, str]:
        """Return (body, content type) in the Prometheus text format 0.0.4.

        Always the text format, even when the scraper prefers OpenMetrics: every Prometheus accepts it, and
        the mesh part is written by ``render_text`` (fast) rather than through prometheus_client's encoders.
        """
        pieces, content_type = self.render_pieces(snapshots)
        return b"".join(pieces), content_type

    def render_pieces(self, snapshots: Sequence[dict[str, Any]]) -> tuple[list[bytes], str]:
        """``render``'s body as a list of pieces of about 200 kB (what /metrics writes out one by one)."""
        head = generate_latest(self.registry) if self.registry is not None else b""
        return [head, *encode_pieces(render_lines(merge_snapshots(snapshots)))], CONTENT_TYPE_PLAIN_0_0_4
