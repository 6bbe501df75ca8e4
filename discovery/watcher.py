"""The watcher: Docker events in, published RoutingTables out.

State machine (one engine session at a time)::

    connect: GET /info, open GET /events (subscribed before listing, so nothing
             between the listing and the stream is lost), full listing, publish
      |
    follow:  events only mark things dirty ("something changed"); a sync runs
             `coalesce` seconds after the first event of a burst and re-lists
             exactly what is dirty (inspect a container, re-read a service and
             its tasks), then builds the table and publishes it if its content
             changed.
             kill/stop/die/pause/destroy drain at once: the container (task) is
             remembered as killed and a table is built from the records already
             held and published without waiting for the engine (right after a
             kill, a listing still shows the container running).
             swarm: there are no task events, so after a service event or an
             event of a local task container that service's tasks are re-listed
             every `converge_interval` until they converge (bounded by
             `converge_timeout`).
             every `backstop` seconds: full listing (publishes nothing when
             nothing changed).
      |
    the stream ends (dockerd restart: EOF without error) or a request fails
    with EngineUnavailable -> reconnect with capped exponential backoff and start
    over with a full listing.  While the engine is away the last good table
    stays published.  A failed listing never replaces a good table; a full
    listing that suddenly finds nothing is applied only if a second listing
    `empty_confirm` seconds later agrees.

The session loop (subscribe before listing, step when due, stream-end detection,
capped backoff reset after a working session) is ``discovery.follow.Follower``,
and what an event means (drain, undrain, health, exec probe...) is
``discovery.events.classify``: both are shared with the cluster agent's
``discovery.localtasks.LocalTasks``.

Versions grow by one per publish.  Each publish carries a ``PublishInfo`` with the
time of the earliest Docker event behind the change, so the caller (and
``on_lag``) can record event -> applied lag.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.routing import RoutingTable, TableError

from .builder import Problem, build_table
from .engine import Engine, EngineAPIError, EngineUnavailable, NotFound, NotSwarmManager
from .events import CREATE, DRAIN, EXEC, REMOVE, UNDRAIN, EngineEvent, classify
from .follow import Follower
from .records import (
    GWBRIDGE,
    ContainerRecord,
    NetworkRecord,
    RecordError,
    ServiceRecord,
    TaskRecord,
)

__all__ = ["PublishInfo", "Watcher", "WatcherStats"]

log = logging.getLogger(__name__)

MODES = ("auto", "containers", "swarm")
CONTAINER_ACTIONS = (
    "create", "start", "restart", "die", "kill", "stop", "pause", "unpause", "destroy",
    "health_status", "rename", "update", "oom",
)  # fmt: skip
EVENT_FILTERS = {
    "type": ["container", "service", "network"],
    "event": sorted({*CONTAINER_ACTIONS, "remove", "connect", "disconnect"}),
}
PublishFn = Callable[[RoutingTable, "PublishInfo"], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class PublishInfo:
    """What a published table came from.

    ``reason``: "initial" (first listing), "resync" (listing after a reconnect),
    "event", "drain" (kill/stop, published without a listing), "converge" (swarm
    tasks re-listed), "backstop" (periodic full listing).  ``event_time``: unix time
    (engine clock) of the earliest Docker event behind this change, None for
    listings not caused by an event; ``event_type``: e.g. "container/kill".
    """

    version: int
    reason: str
    event_time: float | None = None
    event_type: str | None = None
    digest: str = ""


@dataclass(slots=True)
class WatcherStats:
    """Counters for the metrics exporter (read them, do not write)."""

    events: dict[tuple[str, str], int] = field(default_factory=dict)  # (type, action) -> count
    reconnects: int = 0  # sessions that ended and were retried
    full_listings: int = 0
    refreshes: int = 0  # partial listings (inspect / service + tasks)
    listing_failures: int = 0
    publishes: int = 0
    drains: int = 0  # publishes caused by kill/stop without a listing
    problems: int = 0  # distinct problems logged


@dataclass(slots=True)
class _Pending:
    time: float
    type: str


class Watcher:
    """Follows one engine and publishes a RoutingTable whenever its content changes.

    ``publish(table, info)`` may be a plain function or a coroutine function; it
    is never called concurrently with itself.  ``on_lag(seconds, event_type)`` is
    called after a publish caused by an event, with the time from the Docker event
    to the return of ``publish`` (the table applied).  ``on_event(type, action)``
    is called for every Docker event received and ``on_reconnect()`` each time
    the engine session is re-opened (metrics hooks; ``stats`` has the same counts).
    ``mode``: "containers"
    (labels on containers, any engine), "swarm" (service labels, manager only) or
    "auto" (containers, plus services when the engine is a swarm manager).
    ``clock`` is monotonic (timers), ``wall`` is unix time (event timestamps).
    """

    event_filters: Mapping[str, list[str]] = EVENT_FILTERS  # what GET /events subscribes to

    def __init__(
        self,
        engine: Engine,
        publish: PublishFn,
        *,
        mode: str = "auto",
        coalesce: float = 0.05,
        backstop: float = 30.0,
        converge_interval: float = 0.2,
        converge_timeout: float = 60.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        empty_confirm: float = 3.0,
        drain_ttl: float = 600.0,
        on_lag: Callable[[float, str], None] | None = None,
        on_event: Callable[[str, str], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
        first_version: int = 1,
        lag_history: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"watcher mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, value in (
            ("coalesce", coalesce),
            ("backstop", backstop),
            ("converge_interval", converge_interval),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
        ):
            if not value > 0:
                raise ValueError(f"watcher {name} must be > 0, got {value!r}")
        self.engine = engine
        self._publish_cb = publish
        self.mode = mode
        self.coalesce = coalesce
        self.backstop = backstop
        self.converge_interval = converge_interval
        self.converge_timeout = converge_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self.empty_confirm = empty_confirm
        self.drain_ttl = drain_ttl
        self.on_lag = on_lag
        self.on_event = on_event
        self.on_reconnect = on_reconnect
        self._clock = clock
        self._wall = wall

        self.table: RoutingTable | None = None  # last published
        self.problems: tuple[Problem, ...] = ()
        self.stats = WatcherStats()
        self.lag_samples: deque[tuple[float, str]] = deque(maxlen=lag_history)
        self.local_node = ""
        self.swarm_manager = False
        self.ready = asyncio.Event()  # set after the first publish

        self._version = first_version
        self._containers: dict[str, ContainerRecord] = {}
        self._services: dict[str, ServiceRecord] = {}
        self._tasks: dict[str, tuple[TaskRecord, ...]] = {}
        self._gwbridge: NetworkRecord | None = None
        self._killed: dict[str, float] = {}  # container/task id -> clock() when marked
        self._logged_problems: set[Problem] = set()

        self._full = True
        self._dirty_containers: set[str] = set()
        self._dirty_services: set[str] = set()
        self._dirty_gwbridge = False
        self._dirty_since: float | None = None
        self._pending: _Pending | None = None
        self._converge: dict[str, float] = {}  # service id -> deadline
        self._next_converge = 0.0
        self._next_backstop = 0.0
        self._retry_at: float | None = None
        self._empty_since: float | None = None
        self._publish_lock = asyncio.Lock()
        self._drain_task: asyncio.Task[None] | None = None
        self._drain_requests: list[_Pending] = []
        # the session loop; tests on a fake clock move it with follower.wake() and wait for follower.idle
        self.follower = Follower(
            engine,
            self.event_filters,
            prepare=self._prepare,
            on_event=self._on_event,
            resync=self._resync,
            step=self._step,
            next_due=self._next_due,
            on_reconnect=self._reconnected,
            holding=lambda: "serving the last table",
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            clock=clock,
            log=log,
        )
        self.connected = self.follower.connected  # set while a session is synced

    def __repr__(self) -> str:
        v = self.table.version if self.table else None
        return (
            f"<Watcher {self.engine.host.url} mode={self.mode} node={self.local_node!r} manager={self.swarm_manager} "
            f"version={v} containers={len(self._containers)} services={len(self._services)} "
            f"killed={len(self._killed)} connected={self.connected.is_set()}>"
        )

    # -- public -------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run()`` to return (the last table stays published)."""
        self.follower.stop()

    async def run(self) -> None:
        """Follow the engine until ``stop()`` or cancellation; reconnects on its own."""
        try:
            await self.follower.run()
        finally:
            # a drain publish in flight is not cut off halfway through the data plane's apply
            drain = self._drain_task
            if drain is not None and not drain.done():
                try:
                    await asyncio.wait_for(asyncio.shield(drain), 5.0)
                except TimeoutError:
                    drain.cancel()
                except asyncio.CancelledError:
                    drain.cancel()
                    raise

    # -- session (discovery.follow runs it: prepare, subscribe, resync, then step whenever due) ---------
    async def _prepare(self) -> None:
        self.engine.reset_version()
        self._apply_info(await self.engine.info())

    async def _resync(self) -> None:
        self._full = True
        await self._sync("initial" if self.table is None else "resync")
        log.info("docker engine %s: synced (%s), following events", self.engine.host.url, self._summary())

    async def _step(self) -> None:
        await self._sync(None)

    def _reconnected(self) -> None:
        self.stats.reconnects += 1
        if self.on_reconnect is not None:
            try:
                self.on_reconnect()
            except Exception:
                log.exception("on_reconnect hook failed")

    def _summary(self) -> str:
        t = self.table
        n = len(t.services) if t else 0
        return f"node {self.local_node or '?'}, manager={self.swarm_manager}, {n} services"

    def _apply_info(self, info: Mapping[str, Any]) -> None:
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") == "active" and swarm.get("NodeID"):
            self.local_node = str(swarm["NodeID"])
            self.swarm_manager = bool(swarm.get("ControlAvailable"))
        else:
            self.local_node = str(info.get("Name") or "")
            self.swarm_manager = False
        if self.mode == "swarm" and not self.swarm_manager:
            log.warning("docker engine %s is not a swarm manager: no swarm services to route", self.engine.host.url)

    @property
    def _use_swarm(self) -> bool:
        return self.mode in ("auto", "swarm") and self.swarm_manager

    @property
    def _use_containers(self) -> bool:
        return self.mode in ("auto", "containers")

    def _next_due(self) -> float:
        due = [self._next_backstop]
        if self._retry_at is not None:
            due.append(self._retry_at)
        elif self._full or self._dirty_containers or self._dirty_services or self._dirty_gwbridge:
            due.append((self._dirty_since or 0.0) + self.coalesce)
        if self._converge:
            due.append(self._next_converge)
        if self._empty_since is not None:
            due.append(self._empty_since + self.empty_confirm)
        return min(due)

    # -- events -------------------------------------------------------------------
    def _mark(self, when: float, etype: str) -> None:
        if self._dirty_since is None:
            self._dirty_since = self._clock()
        if self._pending is None or when < self._pending.time:
            self._pending = _Pending(when, etype)
        self.follower.wake()

    def _on_event(self, raw: Mapping[str, Any]) -> None:
        self._event(classify(raw))

    def _count(self, ev: EngineEvent) -> None:
        key = (ev.type, ev.action)
        self.stats.events[key] = self.stats.events.get(key, 0) + 1
        if self.on_event is not None:
            try:
                self.on_event(ev.type, ev.action)
            except Exception:
                log.exception("on_event hook failed")

    def _event(self, ev: EngineEvent) -> None:
        """Turn one Docker event into dirty marks (and, for kill/stop, an immediate drain)."""
        self._count(ev)
        when = ev.time if ev.time is not None else self._wall()
        if ev.type == "container" and ev.id:
            svc_id = ev.service_id
            is_task_of_mesh = bool(svc_id) and svc_id in self._services
            if not (ev.id in self._containers or "mesh.publish" in (ev.attrs or {}) or is_task_of_mesh):
                return
            if ev.kind in (CREATE, EXEC):
                # a created container is not routed yet (its start event follows); exec_*: a healthcheck probe
                return
            task_id = ev.task_id
            if ev.kind == DRAIN:
                now = self._clock()
                self._killed.setdefault(ev.id, now)
                if task_id:
                    self._killed.setdefault(task_id, now)
                self._schedule_drain(when, ev.key)
            elif ev.kind == UNDRAIN:
                self._killed.pop(ev.id, None)
                if task_id:
                    self._killed.pop(task_id, None)
            self._dirty_containers.add(ev.id)
            if is_task_of_mesh:
                self._start_converge(svc_id)
            self._mark(when, ev.key)
        elif ev.type == "service" and ev.id:
            if not self._use_swarm:
                return
            self._dirty_services.add(ev.id)
            if ev.kind != REMOVE:
                self._start_converge(ev.id)
            self._mark(when, ev.key)
        elif ev.type == "network":
            cid = ev.container
            if ev.attr("name") == GWBRIDGE and self._use_swarm:
                self._dirty_gwbridge = True
                self._mark(when, ev.key)
            if cid and cid in self._containers:
                self._dirty_containers.add(cid)
                self._mark(when, ev.key)

    def _start_converge(self, service_id: str) -> None:
        if not self._converge:
            self._next_converge = self._clock() + self.converge_interval
        self._converge[service_id] = self._clock() + self.converge_timeout

    def _schedule_drain(self, when: float, etype: str) -> None:
        self._drain_requests.append(_Pending(when, etype))
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        # kills that arrive while a drain is being applied are drained right after it
        while self._drain_requests:
            requests, self._drain_requests = self._drain_requests, []
            first = min(requests, key=lambda p: p.time)
            if await self._build_and_publish("drain", first):
                self.stats.drains += 1

    # -- listings -----------------------------------------------------------------
    async def _sync(self, reason: str | None) -> None:
        """Re-list what is dirty (everything when ``_full``), then build and publish."""
        now = self._clock()
        if now >= self._next_backstop and reason is None:
            self._full = True
            reason = "backstop"
        full = self._full
        confirm_empty = self._empty_since is not None and now >= self._empty_since + self.empty_confirm
        if confirm_empty:
            full = True
        converging = bool(self._converge) and now >= self._next_converge
        if converging:
            self._dirty_services.update(self._converge)
            self._next_converge = now + self.converge_interval
        dirty_c, dirty_s, dirty_gw = self._dirty_containers, self._dirty_services, self._dirty_gwbridge
        pending = self._pending
        self._dirty_containers, self._dirty_services, self._dirty_gwbridge = set(), set(), False
        self._pending = None
        self._dirty_since = None
        self._full = False
        self._retry_at = None
        try:
            if full:
                await self._full_listing()
                self._next_backstop = self._clock() + self.backstop
            else:
                await self._refresh(dirty_c, dirty_s, dirty_gw)
        except EngineUnavailable:
            self.stats.listing_failures += 1
            raise
        except (EngineAPIError, RecordError) as exc:
            # keep the good table; retry what was dirty after a short pause
            self.stats.listing_failures += 1
            log.warning("docker listing failed (%s); keeping table version %s", exc, self.table and self.table.version)
            self._full = self._full or full
            self._dirty_containers |= dirty_c
            self._dirty_services |= dirty_s
            self._dirty_gwbridge = self._dirty_gwbridge or dirty_gw
            if pending is not None and (self._pending is None or pending.time < self._pending.time):
                self._pending = pending
            self._dirty_since = self._dirty_since or self._clock()
            self._retry_at = self._clock() + self.backoff_max
            return
        if converging or dirty_s:
            self._check_converged()
        if reason is None:
            reason = "event" if pending is not None else ("converge" if converging else "event")
        if full and reason == "event":
            reason = "backstop" if not confirm_empty else "resync"
        await self._build_and_publish(reason, pending, full_listing=full)

    def _relevant_container(self, c: ContainerRecord) -> bool:
        if c.swarm_service_id:
            return self._use_swarm and c.swarm_service_id in self._services
        return self._use_containers and c.label("mesh.publish") is not None

    async def _full_listing(self) -> None:
        self.stats.full_listings += 1
        self._apply_info(await self.engine.info())
        services: dict[str, ServiceRecord] = {}
        tasks: dict[str, tuple[TaskRecord, ...]] = {}
        gwbridge = None
        if self._use_swarm:
            try:
                for d in await self.engine.services({"label": ["mesh.publish"]}):
                    s = ServiceRecord.from_api(d)
                    services[s.id] = s
                if services:
                    grouped: dict[str, list[TaskRecord]] = {sid: [] for sid in services}
                    for d in await self.engine.tasks({"service": sorted(services)}):
                        t = TaskRecord.from_api(d)
                        if t.service_id in grouped:
                            grouped[t.service_id].append(t)
                    tasks = {sid: tuple(ts) for sid, ts in grouped.items()}
                    gwbridge = await self._get_gwbridge()
            except NotSwarmManager:
                self.swarm_manager = False
                services, tasks, gwbridge = {}, {}, None
        self._services, self._tasks, self._gwbridge = services, tasks, gwbridge
        containers = {}
        for d in await self.engine.containers():
            c = ContainerRecord.from_summary(d)
            if self._relevant_container(c):
                containers[c.id] = c
        self._containers = containers
        self._expire_killed()

    async def _get_gwbridge(self) -> NetworkRecord | None:
        try:
            return NetworkRecord.from_api(await self.engine.network(GWBRIDGE))
        except NotFound:
            return None

    async def _inspect(self, cid: str) -> None:
        try:
            c = ContainerRecord.from_inspect(await self.engine.container(cid))
        except NotFound:
            self._containers.pop(cid, None)
            return
        if self._relevant_container(c):
            self._containers[cid] = c
        else:
            self._containers.pop(cid, None)

    async def _refresh(self, dirty_c: set[str], dirty_s: set[str], dirty_gw: bool) -> None:
        self.stats.refreshes += 1
        if self._use_swarm:
            for sid in sorted(dirty_s):
                try:
                    s = ServiceRecord.from_api(await self.engine.service(sid))
                except NotFound:
                    self._services.pop(sid, None)
                    self._tasks.pop(sid, None)
                    self._converge.pop(sid, None)
                    continue
                if s.label("mesh.publish") is None:
                    self._services.pop(sid, None)
                    self._tasks.pop(sid, None)
                    self._converge.pop(sid, None)
                    continue
                self._services[sid] = s
                self._tasks[sid] = tuple(TaskRecord.from_api(d) for d in await self.engine.tasks({"service": [sid]}))
            need_gw = dirty_gw
            for sid in dirty_s:
                for t in self._tasks.get(sid, ()):
                    if t.state == "running" and t.node_id == self.local_node and t.container_id:
                        if t.container_id not in self._containers:
                            dirty_c.add(t.container_id)
                        if self._gwbridge is None or self._gwbridge.address_of(t.container_id) is None:
                            need_gw = True
            if need_gw:
                self._gwbridge = await self._get_gwbridge()
        for cid in sorted(dirty_c):
            await self._inspect(cid)
        self._expire_killed()

    def _expire_killed(self) -> None:
        """Forget kill marks of things that are gone or no longer running (or too old)."""
        if not self._killed:
            return
        alive = {cid for cid, c in self._containers.items() if c.state in ("running", "paused")}
        for ts in self._tasks.values():
            alive.update(t.id for t in ts if t.state == "running")
        now = self._clock()
        for key, since in list(self._killed.items()):
            if key not in alive:
                del self._killed[key]
            elif now - since > self.drain_ttl:
                log.info(
                    "container/task %s still running %.0fs after its kill event: no longer draining", key, now - since
                )
                del self._killed[key]

    def _check_converged(self) -> None:
        now = self._clock()
        for sid, deadline in list(self._converge.items()):
            if self._converged(sid):
                del self._converge[sid]
            elif now >= deadline:
                log.info("swarm service %s did not converge within %.0fs; the backstop listing takes over",
                         self._services[sid].name if sid in self._services else sid, self.converge_timeout)  # fmt: skip
                del self._converge[sid]

    def _converged(self, sid: str) -> bool:
        s = self._services.get(sid)
        if s is None:
            return True
        tasks = self._tasks.get(sid, ())
        want = [t for t in tasks if t.desired_state == "running"]
        if any(t.state != "running" for t in want):
            return False
        if any(t.state == "running" and t.desired_state != "running" for t in tasks):
            return False  # old tasks still shutting down
        if s.mode == "replicated" and s.replicas is not None and len(want) != s.replicas:
            return False
        for t in want:
            if t.node_id == self.local_node:
                c = self._containers.get(t.container_id)
                gw = self._gwbridge.address_of(t.container_id) if self._gwbridge else None
                if c is None and gw is None:
                    return False
        return True

    # -- publishing ---------------------------------------------------------------
    async def _build_and_publish(self, reason: str, pending: _Pending | None, *, full_listing: bool = False) -> bool:
        async with self._publish_lock:
            try:
                table, problems = build_table(
                    self._containers.values(),
                    services=self._services.values(),
                    tasks=[t for ts in self._tasks.values() for t in ts],
                    gwbridge=self._gwbridge,
                    local_node=self.local_node,
                    killed=self._killed.keys(),
                    version=self._version,
                )
            except TableError as exc:  # a builder bug must not stop the watcher: keep the last table
                log.error("cannot build a routing table from the docker listing: %s; keeping the last one", exc)
                return False
            self._log_problems(problems)
            current = self.table
            if current is not None and table.same_content(current):
                self._empty_since = None
                return False
            if full_listing and not table.services and current is not None and current.services:
                now = self._clock()
                if self._empty_since is None or now < self._empty_since + self.empty_confirm:
                    if self._empty_since is None:
                        self._empty_since = now
                        log.warning(
                            "docker listing found no mesh services (table version %d has %d); "
                            "publishing the empty table only if a listing in %.1fs agrees",
                            current.version, len(current.services), self.empty_confirm,
                        )  # fmt: skip
                    return False
            self._empty_since = None
            info = PublishInfo(
                version=table.version,
                reason=reason,
                event_time=pending.time if pending else None,
                event_type=pending.type if pending else None,
                digest=table.digest,
            )
            try:
                res = self._publish_cb(table, info)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                log.exception("publishing routing table version %d failed; will retry", table.version)
                self._full = True
                self._dirty_since = self._dirty_since or self._clock()
                self._retry_at = self._clock() + self.backoff_max
                return False
            self.table = table
            self._version += 1
            self.stats.publishes += 1
            self.ready.set()
            if pending is not None:
                lag = max(0.0, self._wall() - pending.time)
                self.lag_samples.append((lag, pending.type))
                if self.on_lag is not None:
                    try:
                        self.on_lag(lag, pending.type)
                    except Exception:
                        log.exception("on_lag hook failed")
            log.info(
                "routing table version %d published (%s%s): %s",
                table.version,
                reason,
                f", {pending.type} {self._wall() - pending.time:.3f}s ago" if pending else "",
                ", ".join(
                    f"{s.name}:{r.port}->{sum(e.state == 'running' for e in r.endpoints)}/{len(r.endpoints)}"
                    for s, r in table.routes()
                )
                or "no services",
            )
            return True

    def _log_problems(self, problems: tuple[Problem, ...]) -> None:
        """Log each distinct problem once (not on every rebuild); forget fixed ones."""
        current = set(problems)
        for p in problems:
            if p not in self._logged_problems:
                self.stats.problems += 1
                (log.warning if p.skipped else log.info)("docker discovery: %s", p)
        self._logged_problems = current
        self.problems = problems
