"""Manager side of cluster mode: swarm services, tasks and nodes -> ``cluster.state.ClusterState``.

Only managers can list services, tasks and nodes, so the agent on a manager
builds the one cluster state that every agent localises (``cluster.state.localize``).

- ``build_cluster_state`` is pure: it reuses ``build_table`` (label parsing,
  conflicts, draining rules) in its "every node" form and adds the node map.
  An endpoint is a running task on ANY node: ``id`` = task id, ``node`` = its
  node id, ``port`` = the target port; ``address`` is only a stable placeholder
  (the task's first network attachment address, else ``0.0.0.0``), because each
  node finds the reachable address of its own tasks from its own engine and
  reaches other nodes' tasks through their tunnels.
- ``ClusterWatcher`` is the discovery ``Watcher`` (events, coalescing, re-list
  until tasks converge, backstop, reconnect, drain of local kills) in swarm mode
  with four additions: tasks of every node are routed, the nodes are listed
  (on every full listing and on each ``node`` event), a change of the nodes
  alone publishes a new state too, and the tasks of the mesh services are
  re-listed every ``task_poll`` seconds (Swarm has no task events, and a task on
  another node has no container event on this manager: a rolling update moves
  from slot to slot without a service event).

Listings as the cluster grows (what Swarm's API allows: ``GET /tasks`` filters by
``service``, ``node``, ``desired-state``, ``id``, ``name``, ``label``; there are no
task events and no "changed since" filter, so polling is the only way to see a
task of another node change):
- The task poll is ONE ``GET /tasks`` for every mesh service that is not
  converging, filtered to ``desired-state=running`` (Swarm keeps up to
  ``task-history-limit`` dead tasks per slot, 5 by default: the filter leaves
  them out), instead of a ``GET /services/<id>`` plus ``GET /tasks`` per service.
  A service's spec only changes with a service event, which re-reads it.
- Services that are converging (after a service event or a local task event)
  keep the watcher's per-service re-listing of all their tasks every
  ``converge_interval``: that is where old tasks still running with desired
  state ``shutdown`` (draining) are seen.  A draining task the poll no longer
  lists is kept until a listing of its service (converge or the backstop) says
  it is gone.

The subclass extends ``Watcher.event_filters`` with node events and hooks into
a few of ``Watcher``'s internals (``_apply_info``, ``_event``, ``_next_due``,
``_full_listing``, ``_get_gwbridge``, ``_build_and_publish``, ``_mark``);
docs/cluster.md lists the public hooks that would replace them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from cluster.state import NODE_AVAILABILITIES, NODE_STATES, ClusterState, NodeInfo
from mesh.routing import RoutingTable

from .builder import Problem, build_table
from .engine import Engine
from .events import EngineEvent
from .records import NodeRecord, RecordError, ServiceRecord, TaskRecord
from .watcher import EVENT_FILTERS, PublishInfo, Watcher

__all__ = ["ClusterWatcher", "build_cluster_state", "node_infos"]

log = logging.getLogger(__name__)

PLACEHOLDER_ADDRESS = "0.0.0.0"
OnState = Callable[[ClusterState], Awaitable[None] | None]


class _TaskAddresses:
    """Duck-types the ``gwbridge`` NetworkRecord that ``build_table`` asks for a task's
    address: every task (by container id) gets its placeholder address."""

    __slots__ = ("_by_container",)

    def __init__(self, tasks: Iterable[TaskRecord]) -> None:
        self._by_container = {
            t.container_id: (t.addresses[0][1] if t.addresses and t.addresses[0][1] else PLACEHOLDER_ADDRESS)
            for t in tasks
            if t.container_id
        }

    def address_of(self, container_id: str) -> str | None:
        return self._by_container.get(container_id)


def _node_addr(raw: Mapping[str, Any], rec: NodeRecord) -> str:
    # A manager may report Status.Addr 0.0.0.0 (moby#37417-style setups); its
    # ManagerStatus.Addr "ip:2377" then names the address it really advertises.
    addr = rec.addr
    if not addr or addr == "0.0.0.0":
        mgr = str((raw.get("ManagerStatus") or {}).get("Addr") or "")
        addr = mgr.rsplit(":", 1)[0].strip("[]") if mgr else addr
    return addr


def node_infos(raw_nodes: Iterable[Mapping[str, Any]], tunnel_port: int | None) -> tuple[NodeInfo, ...]:
    """NodeInfo for each node of GET /nodes.  A node without a usable address is
    left out (nobody could dial its tunnel).  Unknown state/availability words from
    a newer engine become "unknown" / "active" with a log line."""
    out = []
    for raw in raw_nodes:
        try:
            rec = NodeRecord.from_api(raw)
        except RecordError as exc:
            log.warning("swarm node skipped: %s", exc)
            continue
        addr = _node_addr(raw, rec)
        if not addr or addr == "0.0.0.0":
            log.warning("swarm node %s (%s) has no address; its tasks are not routed", rec.id, rec.hostname)
            continue
        state = rec.state if rec.state in NODE_STATES else "unknown"
        availability = rec.availability if rec.availability in NODE_AVAILABILITIES else "active"
        if (state, availability) != (rec.state, rec.availability):
            log.info("swarm node %s: state %r / availability %r read as %s/%s", rec.id, rec.state,
                     rec.availability, state, availability)  # fmt: skip
        out.append(NodeInfo(id=rec.id, addr=addr, state=state, availability=availability, tunnel=tunnel_port))
    return tuple(out)


def build_cluster_state(
    services: Iterable[ServiceRecord],
    tasks: Iterable[TaskRecord],
    nodes: Iterable[NodeInfo],
    *,
    killed: Collection[str] = (),
    version: int = 0,
) -> tuple[ClusterState, tuple[Problem, ...]]:
    """The cluster state from swarm records (pure).  ``killed``: task/container ids
    with a kill/stop event (from the manager's own engine): they are ``draining``.
    Returns (state, problems) like ``build_table``."""
    tasks, services = tuple(tasks), tuple(services)
    table, problems = build_table(
        services=services, tasks=tasks, gwbridge=_TaskAddresses(tasks), local_node="", killed=killed, version=version
    )  # type: ignore[arg-type]
    return ClusterState(table=table, nodes=tuple(nodes)), tuple(problems)


class ClusterWatcher(Watcher):
    """Follows a manager's engine and calls ``on_state(ClusterState)`` whenever the
    cluster state's content (routes, tasks of every node, nodes) changes.

    ``tunnel_port``: the agents' tunnel port (a cluster-wide setting), written to
    every node.  Other keyword arguments go to ``Watcher`` (coalesce, backstop,
    converge_interval, ...).  ``state`` is the last published state.
    """

    # the watcher's subscription plus node events (managers only)
    event_filters = {
        "type": [*EVENT_FILTERS["type"], "node"],
        "event": sorted({*EVENT_FILTERS["event"], "create", "update", "remove"}),
    }

    def __init__(
        self, engine: Engine, on_state: OnState, *, tunnel_port: int | None, task_poll: float = 1.0, **options: Any
    ) -> None:
        options.setdefault("mode", "swarm")
        if options["mode"] != "swarm":
            raise ValueError(f"ClusterWatcher mode must be 'swarm', got {options['mode']!r}")
        if not task_poll > 0:
            raise ValueError(f"task_poll must be > 0, got {task_poll!r}")
        super().__init__(engine, self._on_table, **options)
        self.task_poll = task_poll
        self._next_poll = 0.0
        self._poll_due = False
        self.task_listings = 0  # GET /tasks calls (counters for the benchmark and tests)
        self.service_reads = 0  # GET /services/<id> calls
        self.tunnel_port = tunnel_port
        self.on_state = on_state
        self.node_id = ""  # this manager's own node id
        self.nodes: tuple[NodeInfo, ...] = ()
        self.state: ClusterState | None = None
        self._nodes_dirty = False
        self.state_publishes = 0

    # -- Watcher hooks --------------------------------------------------------------
    def _next_due(self) -> float:
        # Swarm has no task events, and a task on another node has no container event
        # here either: between service events (a rolling update moves on slot by slot
        # without one) the tasks of every mesh service are re-listed every task_poll.
        # One listing covers every mesh service (see the module docstring).
        now = self._clock()
        if now >= self._next_poll:
            self._next_poll = now + self.task_poll
            if self._services:
                self._poll_due = True
                # a dirty gwbridge makes the watcher sync without a request (our _get_gwbridge lists nothing)
                self._dirty_gwbridge = True
                if self._dirty_since is None:
                    self._dirty_since = now
        return min(super()._next_due(), self._next_poll)

    async def _refresh(self, dirty_c: set[str], dirty_s: set[str], dirty_gw: bool) -> None:
        if self._poll_due:
            self._poll_due = False
            await self._poll_tasks(set(self._services) - dirty_s - set(self._converge))
        self.task_listings += len(dirty_s)
        self.service_reads += len(dirty_s)
        await super()._refresh(dirty_c, dirty_s, dirty_gw)

    async def _full_listing(self) -> None:
        self.task_listings += 1
        await super()._full_listing()
        await self._list_nodes()

    async def _poll_tasks(self, service_ids: set[str]) -> None:
        """One GET /tasks for these services, running ones only; draining tasks we hold are kept."""
        if not service_ids:
            return
        self.task_listings += 1
        listed: dict[str, list[TaskRecord]] = {sid: [] for sid in service_ids}
        for d in await self.engine.tasks({"service": sorted(service_ids), "desired-state": ["running"]}):
            t = TaskRecord.from_api(d)
            if t.service_id in listed:
                listed[t.service_id].append(t)
        for sid, tasks in listed.items():
            if sid not in self._services:
                continue
            ids = {t.id for t in tasks}
            # still running with desired state shutdown: draining, not in this listing
            tasks += [t for t in self._tasks.get(sid, ()) if t.desired_state != "running" and t.id not in ids
                      and t.state == "running"]  # fmt: skip
            self._tasks[sid] = tuple(tasks)

    def _apply_info(self, info: Mapping[str, Any]) -> None:
        super()._apply_info(info)
        # the cluster table routes tasks of every node: no local-node filter
        self.node_id, self.local_node = self.local_node, ""

    def _event(self, ev: EngineEvent) -> None:
        if ev.type == "node":
            self._nodes_dirty = True
            # a dirty gwbridge makes the watcher sync; our _get_gwbridge re-lists the nodes
            self._dirty_gwbridge = True
            key = ("node", ev.action)
            self.stats.events[key] = self.stats.events.get(key, 0) + 1
            self._mark(ev.time if ev.time is not None else self._wall(), ev.key)
            return
        super()._event(ev)

    async def _get_gwbridge(self) -> Any:
        if self._nodes_dirty:
            await self._list_nodes()
        return None

    async def _list_nodes(self) -> None:
        self._nodes_dirty = False
        self.nodes = node_infos(await self.engine.nodes(), self.tunnel_port)

    async def _build_and_publish(self, reason: str, pending: Any, *, full_listing: bool = False) -> bool:
        self._gwbridge = _TaskAddresses(t for ts in self._tasks.values() for t in ts)  # type: ignore[assignment]
        published = await super()._build_and_publish(reason, pending, full_listing=full_listing)
        if not published and self.table is not None and self.state is not None:
            # the routes did not change, but the nodes may have (a node went down or was
            # drained): _emit publishes only a new digest
            await self._emit(self.table)
        return published

    # -- publishing -----------------------------------------------------------------
    async def _on_table(self, table: Any, info: PublishInfo) -> None:
        await self._emit(table)

    async def _emit(self, table: RoutingTable) -> None:
        state = ClusterState(table=table, nodes=self.nodes)
        if self.state is not None and state.digest == self.state.digest:
            return
        res = self.on_state(state)
        if inspect.isawaitable(res):
            await res
        self.state = state
        self.state_publishes += 1
        usable = sum(n.usable for n in state.nodes)
        log.info("cluster state %s (table v%d): %d nodes (%d usable)", state.digest, state.version,
                 len(state.nodes), usable)  # fmt: skip
