"""The swarm task containers running on this node, from its own engine (cluster mode).

Every node's agent needs two things only its own engine knows: where it
reaches each of its local tasks, and which of them were just killed.

Rules:
- ``addresses``: task id -> reachable address, for every running task
  container that is not unhealthy and has one (``task_address``).
- A fatal kill/stop/die/pause/destroy/oom of a listed task drains it at once
  (``draining``, ``on_change()``) without waiting for a listing; start,
  restart or unpause undo that (``discovery.events.classify`` decides which
  is which, as for the discovery watcher).  The next listing drops a task that
  is gone and keeps a draining one that still runs.
- Events mark the listing dirty; it re-lists ``coalesce`` seconds after the
  first event of a burst, and ``backstop`` seconds after the last listing
  when nothing happens.  The first listing always counts as a change (the
  agent waits for it before applying anything), later ones only when
  ``addresses`` or ``draining`` changed.
- The session loop (subscribe before listing, stream-end detection, capped
  backoff reset after a working session) is ``discovery.follow.Follower``;
  while the engine is away the last view stays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from .engine import Engine, NotFound
from .events import DRAIN, DRAIN_ACTIONS, UNDRAIN, UNDRAIN_ACTIONS, classify
from .follow import Follower
from .records import GWBRIDGE, SWARM_TASK_ID, ContainerRecord, NetworkRecord, RecordError

__all__ = ["LOCAL_TASK_FILTERS", "LocalTasks", "task_address"]

log = logging.getLogger(__name__)

LOCAL_TASK_FILTERS = {
    "type": ["container", "network"],
    "event": sorted({*DRAIN_ACTIONS, *UNDRAIN_ACTIONS, "health_status", "connect", "disconnect"}),
}
GONE_KEPT = 256  # task ids remembered in ``gone`` (diagnostics)


def task_address(c: ContainerRecord, gwbridge: NetworkRecord | None) -> str | None:
    """Where this node reaches a local task container: its docker_gwbridge address
    (a task on an overlay network), else its default bridge address (a task with no
    network).  Overlay addresses are not reachable from the host namespace."""
    if gwbridge is not None:
        addr = gwbridge.address_of(c.id)
        if addr:
            return addr
    return c.address_on("bridge")


class LocalTasks:
    """The swarm task containers running on this node (see the module docstring).

    ``addresses``: task id -> reachable address; ``draining``: task ids that got a
    fatal event and still show up; ``gone``: task id -> ``clock()`` when it left the
    listing (the last ``GONE_KEPT``, for log lines).  ``on_change()`` is called (sync)
    after ``addresses`` or ``draining`` changed.  ``ready`` is set after the first listing.
    """

    def __init__(
        self,
        engine: Engine,
        on_change: Callable[[], None],
        *,
        coalesce: float = 0.05,
        backstop: float = 30.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.on_change = on_change
        self.coalesce = coalesce
        self.backstop = backstop
        self.addresses: dict[str, str] = {}
        self.draining: set[str] = set()
        self.gone: dict[str, float] = {}
        self.ready = asyncio.Event()
        self.listings = 0
        self._clock = clock
        self._dirty_since: float | None = None
        self._listed_at = 0.0
        # the session loop; tests on a fake clock move it with follower.wake() and wait for follower.idle
        self.follower = Follower(
            engine,
            LOCAL_TASK_FILTERS,
            on_event=self._on_event,
            resync=self._resync,
            step=self._resync,
            next_due=self._next_due,
            errors=(RecordError, OSError),
            holding=lambda: f"keeping {len(self.addresses)} local tasks",
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            clock=clock,
            log=log,
        )
        self.connected = self.follower.connected  # set while a session is synced

    def __repr__(self) -> str:
        return (
            f"<LocalTasks {len(self.addresses)} tasks draining={sorted(self.draining)} listings={self.listings} "
            f"connected={self.connected.is_set()}>"
        )

    async def run(self) -> None:
        """Follow the local engine until ``stop()`` or cancellation."""
        await self.follower.run()

    def stop(self) -> None:
        self.follower.stop()

    def poke(self) -> None:
        """Re-list soon (something suggests a local task is missing)."""
        self._mark()

    # -- events -------------------------------------------------------------------
    def _mark(self) -> None:
        if self._dirty_since is None:
            self._dirty_since = self._clock()
        self.follower.wake()

    def _on_event(self, raw: Mapping[str, Any]) -> None:
        ev = classify(raw)
        if ev.type == "network":
            if ev.attr("name") in (GWBRIDGE, "bridge"):
                self._mark()
            return
        task_id = ev.task_id
        if not task_id:
            return
        if ev.kind == DRAIN:
            if task_id in self.addresses and task_id not in self.draining:
                self.draining.add(task_id)
                log.info("local task %s: %s -> draining at once", task_id, ev.action)
                self.on_change()
        elif ev.kind == UNDRAIN and task_id in self.draining:
            self.draining.discard(task_id)
            self.on_change()
        self._mark()

    # -- listing ------------------------------------------------------------------
    def _next_due(self) -> float:
        if self._dirty_since is not None:
            return self._dirty_since + self.coalesce
        return self._listed_at + self.backstop

    async def _resync(self) -> None:
        self._dirty_since = None  # events from here on mark the next listing
        await self._list()

    async def _list(self) -> None:
        raw = await self.engine.containers({"label": [SWARM_TASK_ID]})
        try:
            gwbridge = NetworkRecord.from_api(await self.engine.network(GWBRIDGE))
        except NotFound:
            gwbridge = None
        addresses = {}
        for d in raw:
            c = ContainerRecord.from_summary(d)
            tid = c.swarm_task_id
            if not tid or c.state != "running" or c.health == "unhealthy":
                continue
            addr = task_address(c, gwbridge)
            if addr:
                addresses[tid] = addr
        self.listings += 1
        now = self._listed_at = self._clock()
        for tid in self.addresses.keys() - addresses.keys():
            self.gone[tid] = now
        if len(self.gone) > GONE_KEPT:
            for tid, _ in sorted(self.gone.items(), key=lambda kv: kv[1])[: len(self.gone) - GONE_KEPT]:
                del self.gone[tid]
        draining = self.draining & set(addresses)
        # the first listing always counts: the agent waits for it before applying anything
        changed = addresses != self.addresses or draining != self.draining or not self.ready.is_set()
        self.addresses, self.draining = addresses, draining
        self.ready.set()
        if changed:
            self.on_change()
