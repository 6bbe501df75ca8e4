"""The live dashboard of the admin API: a view of the data plane (JSON), its live stream (SSE) and the page.

    GET /ui/                    the page (HTML, JS and CSS shipped in this package; no external asset)
    GET /v1/dashboard           the current view as JSON (docs/observability.md, "Dashboard")
    GET /v1/dashboard/stream    the same view pushed as Server-Sent Events, one ``view`` event per sample

Rules:

- No cost on the hot path.  A view is built from the same ``mesh.metrics`` snapshots /metrics reads (plain
  ints the proxy keeps anyway); nothing is added per connection or per chunk.  Only the snapshot runs on
  the data plane's loop (in slices, ``StatsReader.snapshot_async``); merging, building the view, rates and
  JSON run in a thread, so a watched dashboard of thousands of replicas never holds the loop for long.
- One sampler for every watcher (``Feed``).  It runs only while at least one stream is open, takes one
  snapshot per ``interval`` (0.5 s: two updates a second at most), serialises the view once and hands the
  same bytes to every stream.  A watcher that reads slowly skips samples (latest wins); it never makes the
  sampler wait or buffer for it.  With nobody watching nothing runs.
- Rates (new connections/s, bytes/s, failures/s) are differences of the monotonic totals between two
  samples of the same feed, divided by the time between them; the totals themselves are in the view too, so
  a tool can compute its own rates over any window.  Bytes are counted when a connection closes (as in
  /metrics), so a long-lived connection shows its traffic at its end.
- One view format for a node and for a cluster: a ``collect`` callable returns the totals (``build_view``);
  the cluster agent on a manager passes one that adds every node's replicas (``meshagent.clusterview``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import Any

from mesh.metrics import failed_by_reason, gc_paused, http_summary, json_pieces, merge_snapshots, run_off_loop
from mesh.routing import RoutingTable

__all__ = [
    "ASSETS",
    "DEFAULT_INTERVAL",
    "VIEW_VERSION",
    "Dashboard",
    "Feed",
    "add_rates",
    "asset",
    "build_view",
    "discovery_summary",
    "rate_base",
    "replica_state",
]

log = logging.getLogger(__name__)

VIEW_VERSION = 1
DEFAULT_INTERVAL = 0.5  # seconds between samples while someone watches: two updates a second at most

# The page's files: name -> content type.  Only these are served (no path from the request reaches the disk).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

_HEALTH_FAILED_ACTIVE_HC = 1
_HEALTH_EJECTED = 2


def asset(name: str) -> bytes:
    """The bytes of one of the page's files (``ASSETS``), read from the installed package (or the source tree)."""
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__package__).joinpath(name).read_bytes()


# -- the view (pure) ------------------------------------------------------------------------------------------


def replica_state(host: Mapping[str, Any]) -> str:
    """The one word the page shows for a replica (merged snapshot row): draining (draining, or left the table
    while it still carries connections) > ejected > unhealthy (fails its active health check) > running.
    Whether it is reached through another node's tunnel is separate (``via``)."""
    if host.get("draining") or not host.get("listed", True):
        return "draining"
    if host["health"] & _HEALTH_EJECTED:
        return "ejected"
    if host["health"] & _HEALTH_FAILED_ACTIVE_HC:
        return "unhealthy"
    return "running"


def discovery_summary(metrics: Any) -> dict[str, Any] | None:
    """Discovery lag of a ``mesh.metrics.DiscoveryMetrics`` (docker mode): count, mean and the upper bounds of
    the buckets holding the median and the 99th percentile; None without discovery."""
    if metrics is None:
        return None
    h = metrics.lag_hist
    n = h.count
    out: dict[str, Any] = {
        "events": sum(metrics.events.values()),
        "reconnects": metrics.reconnects,
        "lag_count": n,
        "lag_sum_seconds": round(h.sum, 6),
        "lag_mean_seconds": round(h.sum / n, 6) if n else None,
        "lag_p50_le_seconds": _bucket_bound(h, 0.50),
        "lag_p99_le_seconds": _bucket_bound(h, 0.99),
    }
    return out


def _bucket_bound(h: Any, q: float) -> float | None:
    """Upper bound of the bucket that holds quantile ``q`` (None: no observation; inf: above the last bound)."""
    if not h.count:
        return None
    rank, acc = q * h.count, 0
    for bound, n in zip((*h.buckets, float("inf")), h.counts, strict=True):
        acc += n
        if acc >= rank:
            return bound if bound != float("inf") else None
    return None


def build_view(
    table: RoutingTable | None,
    merged: Mapping[str, Any],
    *,
    node: str,
    now: float,
    discovery: Mapping[str, Any] | None = None,
    cluster: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dashboard's totals (no rates yet) from a ``merge_snapshots`` result and the applied table.

    ``node``: the id shown for this process's own replicas (endpoints reached directly whose table entry
    names no node).  One ``services`` entry per route of a service (a service publishing two ports has two),
    sorted by (name, port), each with its replicas; departed replicas (left the table, still carrying
    connections) are listed with ``listed: false`` and state draining.
    """
    endpoints: dict[tuple[str, int], dict[str, Any]] = {}
    matches: dict[tuple[str, int], Any] = {}
    if table is not None:
        for svc, route in table.routes():
            matches[(svc.name, route.port)] = route.match
            for ep in route.endpoints:
                endpoints[(svc.name, route.port, ep.id)] = {"node": ep.node, "state": ep.state}
    services = []
    listeners = []
    for r in merged["routes"]:
        bound = r.get("bound_ports") or []
        bound_port = bound[0] if len(bound) == 1 else None
        listeners.append(
            {
                "service": r["service"],
                "protocol": r.get("protocol") or "tcp",
                "listen_host": r["listen_host"],
                "port": r["port"],
                "bound_port": bound_port,
                "listening": bool(r["listening"]),
            }
        )
        failed = dict(failed_by_reason(r))
        replicas = []
        removed = r["removed"]
        conns, b_in, b_out = removed["connections"], removed["bytes_in"], removed["bytes_out"]
        active = 0
        for h in r["hosts"]:
            known = endpoints.get((r["service"], r["port"], h["id"]), {})
            ep_node = h.get("node") or known.get("node")
            via = h.get("via")
            replicas.append(
                {
                    "id": h["id"],
                    "node": ep_node if ep_node else node,
                    "address": h["address"],
                    "via": via,
                    "state": replica_state(h),
                    "listed": bool(h["listed"]),
                    "weight": h["weight"],
                    "active": h["active"],
                    "connections": h["connections"],
                    "bytes_in": h["bytes_in"],
                    "bytes_out": h["bytes_out"],
                    "ejections": h["ejections"],
                    "ejected_seconds_left": round(h["ejected_seconds_left"], 3),
                }
            )
            active += h["active"]
            conns += h["connections"]
            b_in += h["bytes_in"]
            b_out += h["bytes_out"]
        http = None
        if "http" in r:
            http = http_summary(r["http"])
            match = matches.get((r["service"], r["port"]))
            http["hosts"] = list(match.hosts) if match is not None else []
            http["paths"] = list(match.paths) if match is not None else []
        services.append(
            {
                "name": r["service"],
                "port": r["port"],
                "protocol": r.get("protocol") or "tcp",
                "listen_host": r["listen_host"],
                "bound_port": bound_port,
                "listening": bool(r["listening"]),
                "accepted": r["accepted"],
                "active": active,
                "connections": conns,
                "bytes_in": b_in,
                "bytes_out": b_out,
                "retries": r["retries"],
                "failed": failed,
                "connect_failures": dict(sorted(r["connect_failures"].items())),
                "healthy": sum(1 for h in r["hosts"] if h["up"]),
                "endpoints": sum(1 for h in r["hosts"] if h["listed"]),
                # where the connections were accepted: this node (a cluster view adds the others)
                "ingress": {node: {"accepted": r["accepted"], "failed": sum(failed.values())}},
                "replicas": replicas,
                # http routes: requests (total, by status class), active, retries, and the host/path rules
                "http": http,
            }
        )
    services.sort(key=lambda s: (s["name"], s["port"]))
    listeners.sort(key=lambda s: (s["port"], s["protocol"], s["service"]))
    applied = merged.get("table_applied")
    version = merged.get("table_version")
    nodes = {node} | {rep["node"] for s in services for rep in s["replicas"]}
    return {
        "v": VIEW_VERSION,
        "scope": "node",
        "generated_at": now,
        "node": node,
        "nodes": [{"id": n, "self": n == node} for n in sorted(nodes, key=lambda n: (n != node, n))],
        "table": None
        if version is None
        else {
            "version": version,
            "applied_at": applied,
            "age_seconds": None if applied is None else round(max(0.0, now - applied), 3),
        },
        "processes": merged.get("processes", 1),
        "fd_exhausted": merged.get("fd_exhausted", 0),
        "discovery": None if discovery is None else dict(discovery),
        "cluster": None if cluster is None else dict(cluster),
        "listeners": listeners,
        "services": services,
    }


def _rate(cur: int, prev: int | None, dt: float) -> float | None:
    if prev is None or dt <= 0:
        return None
    return round(max(0, cur - prev) / dt, 3)


def add_rates(view: dict[str, Any], prev: Mapping[str, Any] | None) -> dict[str, Any]:
    """``view`` with per-second rates against an earlier view ``prev`` of the same feed (in place; returned).

    Services get ``rates``: ``accepted`` (new connections/s), ``bytes`` (both directions), ``failed`` (all
    reasons) and ``failed_by_reason``, and for http routes ``requests`` (requests/s) and ``by_class``; replicas get ``rates``: ``connections`` and ``bytes``.  A rate is null
    on the first sample and for what ``prev`` did not have.  Counters that went down (a process restarted
    without its totals) count as 0, never as a negative rate.  ``prev`` may also be the ``rate_base`` of
    the earlier view (what ``Feed`` keeps between samples).
    """
    base = None if prev is None else (prev if _BASE_TIME in prev else rate_base(prev))
    dt = 0.0 if base is None else view["generated_at"] - base[_BASE_TIME]
    view["interval_seconds"] = round(dt, 3) if base is not None else None
    old = base or {}
    for s in view["services"]:
        k = f"s\0{s['name']}\0{s['port']}\0"
        known = base is not None and k + "accepted" in old
        failed_now = sum(s["failed"].values())
        s["rates"] = {
            "accepted": _rate(s["accepted"], old.get(k + "accepted"), dt),
            "bytes": _rate(s["bytes_in"] + s["bytes_out"], old.get(k + "bytes"), dt),
            "failed": _rate(failed_now, old.get(k + "failed"), dt),
            "failed_by_reason": {
                reason: _rate(n, old.get(k + "failed\0" + reason, 0) if known else None, dt)
                for reason, n in s["failed"].items()
            },
        }
        h = s.get("http")
        if h is not None:
            had_http = k + "requests" in old
            s["rates"]["requests"] = _rate(h["requests"], old.get(k + "requests"), dt)
            s["rates"]["by_class"] = {
                cls: _rate(n, old.get(k + "class\0" + cls, 0) if had_http else None, dt)
                for cls, n in h["by_class"].items()
            }
        for node, ing in s["ingress"].items():
            ing["rate"] = _rate(ing["accepted"], old.get(k + "ingress\0" + node), dt)
        rk = f"r\0{s['name']}\0{s['port']}\0"
        for rep in s["replicas"]:
            r = f"{rk}{rep['node']}\0{rep['id']}\0"
            rep["rates"] = {
                "connections": _rate(rep["connections"], old.get(r + "c"), dt),
                "bytes": _rate(rep["bytes_in"] + rep["bytes_out"], old.get(r + "b"), dt),
            }
    return view


_BASE_TIME = "\0t"


def rate_base(view: Mapping[str, Any]) -> dict[str, float]:
    """What ``add_rates`` needs of a view, as one flat dict of str -> number.  Such a dict holds no object
    the cyclic garbage collector tracks, so a feed keeping it between samples adds nothing to the young
    collections (the view itself is ~10 objects per replica: a 5,000-replica view kept alive cost a 10-60
    ms collection after each sample here, with the GIL held)."""
    base: dict[str, float] = {_BASE_TIME: view["generated_at"]}
    for s in view["services"]:
        k = f"s\0{s['name']}\0{s['port']}\0"
        base[k + "accepted"] = s["accepted"]
        base[k + "bytes"] = s["bytes_in"] + s["bytes_out"]
        base[k + "failed"] = sum(s["failed"].values())
        for reason, n in s["failed"].items():
            base[k + "failed\0" + reason] = n
        h = s.get("http")
        if h is not None:
            base[k + "requests"] = h["requests"]
            for cls, n in h["by_class"].items():
                base[k + "class\0" + cls] = n
        for node, ing in s["ingress"].items():
            base[k + "ingress\0" + node] = ing["accepted"]
        rk = f"r\0{s['name']}\0{s['port']}\0"
        for rep in s["replicas"]:
            r = f"{rk}{rep['node']}\0{rep['id']}\0"
            base[r + "c"] = rep["connections"]
            base[r + "b"] = rep["bytes_in"] + rep["bytes_out"]
    return base


# -- the shared sampler ---------------------------------------------------------------------------------------


class Feed:
    """One sampler shared by every watcher: ``collect()`` (an awaitable of a totals view) every ``interval``
    seconds while at least one watcher is subscribed; each sample gets rates against the previous one and is
    serialised once, as JSON (``body``) and as an SSE event (``event``).

    Watchers call ``next(seq)``: it returns the first sample newer than ``seq`` (at once when there is one),
    so a watcher that fell behind gets the latest and skips the rest.  Waiting watchers share one future per
    sample (no task or queue per watcher)."""

    def __init__(
        self,
        collect: Callable[[], Awaitable[dict[str, Any]]],
        interval: float = DEFAULT_INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"dashboard interval must be > 0, got {interval!r}")
        self._collect = collect
        self.interval = interval
        self._clock = clock
        self.watchers = 0
        self.samples = 0  # samples taken (tests and the benchmark read it)
        self.seq = 0
        self._base: dict[str, float] | None = None  # rate_base of the last sample (not the view: GC)
        self.body = b""
        self.event = b""
        self._taken_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Feed watchers={self.watchers} samples={self.samples} seq={self.seq} running={self.running}>"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def sample(self) -> dict[str, Any]:
        """Take one sample now (rates against the previous one) and publish it to the watchers."""
        async with self._lock, _gc_paused():
            view = await self._collect()
            # Rates and JSON in a thread: thousands of replicas take tens of milliseconds, and the data plane
            # shares this loop.  ``view`` is this sample's own; the previous one is only read.
            body, event, base = await run_off_loop(self._finish, view, self._base, self.seq + 1)
            self.body, self.event, self._base = body, event, base
            self.seq += 1
            self.samples += 1
            self._taken_at = self._clock()
            fut, self._next = self._next, None
            if fut is not None and not fut.done():
                fut.set_result(None)
            return view

    def _finish(
        self, view: dict[str, Any], prev: dict[str, float] | None, seq: int
    ) -> tuple[bytes, bytes, dict[str, float]]:
        with gc_paused():
            add_rates(view, prev)
            view["interval_target_seconds"] = self.interval
            pieces = json_pieces(view, sort_keys=True)  # in pieces: the loop's thread gets the GIL between them
            body = b"".join(pieces)
            event = b"".join([b"event: view\nid: %d\ndata: " % seq, *pieces, b"\n\n"])
            return body, event, rate_base(view)

    async def current(self) -> bytes:
        """The JSON of a fresh view: the running sampler's latest when it is younger than one interval,
        else a new sample (so ``GET /v1/dashboard`` without a stream open gives current totals)."""
        if not (self.running and self._base is not None and self._clock() - self._taken_at < self.interval):
            await self.sample()
        return self.body

    def subscribe(self) -> None:
        self.watchers += 1
        if not self.running and not self.closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dashboard-feed")

    def unsubscribe(self) -> None:
        self.watchers -= 1
        if self.watchers <= 0:
            self.watchers = 0
            task, self._task = self._task, None
            if task is not None:
                task.cancel()

    async def next(self, seq: int) -> int:
        """Wait for a sample newer than ``seq``; return the feed's ``seq``, or -1 once the feed is closed.

        A cancelled waiter (its client went away) does not cancel the future the others wait on."""
        while self.seq <= seq and not self.closed:
            if self._next is None or self._next.done():
                self._next = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._next)
        return -1 if self.closed else self.seq

    def start_seq(self) -> int:
        """Where a new watcher starts: the latest sample if the sampler is running (it gets that at once),
        else the next one (a stopped feed's last sample is stale)."""
        return self.seq - 1 if self.running and self.seq > 0 else self.seq

    async def close(self) -> None:
        """Stop sampling and release every waiting watcher (``next`` returns -1)."""
        self.closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        fut, self._next = self._next, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dashboard: taking a sample failed; retrying in %.1fs", self.interval)
            # a fixed cadence (not interval after the sample ended), but never catching up with a burst
            next_at = max(next_at + self.interval, loop.time() + self.interval / 4)
            await asyncio.sleep(next_at - loop.time())


# -- the node's dashboard -------------------------------------------------------------------------------------


class Dashboard:
    """The dashboard of one admin server: builds views of ``state`` (a ``mesh.admin.AdminState``) and owns
    the shared ``Feed``.

    ``node``: this node's id on the page (default: the data plane's ``local_node``, else the host name).
    ``discovery``: a ``mesh.metrics.DiscoveryMetrics`` (docker mode) for the discovery lag.  ``info()``:
    extra facts of the agent (the cluster agent: role, managers, state version), shown as ``cluster``.
    ``collect``: replaces how a totals view is made (a manager's cluster view wraps ``node_view``).
    """

    def __init__(
        self,
        state: Any,
        *,
        node: str | None = None,
        discovery: Any = None,
        info: Callable[[], Mapping[str, Any] | None] | None = None,
        collect: Callable[[Dashboard], Awaitable[dict[str, Any]]] | None = None,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.node = node or _local_node(state) or socket.gethostname()
        self.discovery = discovery
        self.info = info
        self._collect = collect
        self._clock = clock
        self.feed = Feed(self._make, interval)

    def __repr__(self) -> str:
        return f"<Dashboard node={self.node} {self.feed!r}>"

    async def node_view(self) -> dict[str, Any]:
        """The totals view of this node's data plane (no rates)."""
        with gc_paused():
            snaps = await self.state.snapshots()
            info = self.info() if self.info is not None else None
            # Merged and built in a thread (off the data plane's loop, like /metrics): the snapshots are plain
            # dicts detached from the live stats, the table is immutable, the discovery summary a copy.
            return await run_off_loop(
                _node_view,
                self.state.table(),
                snaps,
                node=self.node,
                now=self._clock(),
                discovery=discovery_summary(self.discovery),
                cluster=None if info is None else dict(info),
            )

    async def _make(self) -> dict[str, Any]:
        if self._collect is not None:
            return await self._collect(self)
        return await self.node_view()

    async def close(self) -> None:
        await self.feed.close()


@contextlib.asynccontextmanager
async def _gc_paused() -> Any:
    # the whole sample (its view is ~10 objects per replica) without cyclic GC: see mesh.metrics.gc_paused
    with gc_paused():
        yield


def _node_view(table: RoutingTable | None, snaps: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return build_view(table, merge_snapshots(snaps), **kw)


def _local_node(state: Any) -> str | None:
    mesh = getattr(state, "mesh", None)
    node = getattr(mesh, "local_node", None)
    return str(node) if node else None


def find_discovery(registry: Any, collectors: Iterable[Any] | None = None) -> Any:
    """The ``DiscoveryMetrics`` registered in a prometheus ``registry`` (``make_registry(discovery=...)``),
    or None.  The composition root may pass it to ``AdminServer(discovery=...)`` directly instead."""
    from mesh.metrics import DiscoveryMetrics

    if collectors is None:
        collectors = list(getattr(registry, "_collector_to_names", {}) or ())
    for c in collectors:
        if isinstance(c, DiscoveryMetrics):
            return c
    return None
