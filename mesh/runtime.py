"""The data plane of one process: applies routing tables as diffs.

Rules of ``Mesh.apply(table)``:

- A listener is keyed by ``ListenKey(protocol, listen_host, port)``; it holds the
  routes of every service on that key (``Binding``s; exactly one for tcp).  A
  route on port 0 (any free port, for tests) gets a key of its own per service.
- A key only in the new table gets a new ``Listener`` (and a ``Pool`` per route).
  If the port cannot be bound, or no front serves the protocol
  (``mesh.listener.FRONTS``), that is logged (service, address, reason) and the
  key is skipped; the rest of the table still applies, and it is tried again
  after 0.5 s, doubling to 30 s (``REBIND_*``), and by the next ``apply``: a port
  another process held comes back without a new table.
- A key no longer in the table stops accepting at once; its open connections
  continue (they are tracked in the mesh-wide ``ConnectionRegistry``).
- A key kept with the same services updates its pools in place
  (``pool.update(route, options)``), matched by (service, match rules): hosts keep
  active counts, health and ejections; new options apply to NEW connections (each
  connection read its options once when accepted).  A route that is new on a
  kept key gets a new pool; one that is gone stops getting connections.
- A tcp or udp key that moves to another service is treated as removed + added.
- Protocol "udp" has no front (datagrams are not spliced): its key gets a
  ``mesh.udp.UdpListener`` (a session table) with the same surface.  Its pool
  balances with ``udp_balance`` (``ServiceOptions.for_protocol``).
- Health checkers follow the options: started for services with
  ``health_check``, restarted when the check changes, stopped when it goes away
  or the key is removed.
- Removals happen before additions, so an address freed by this table can be
  bound by it; a key re-bound for another service is added first of all.
- The apply runs in slices: after each listener removed, updated or added, once
  ``apply_slice`` seconds (2 ms) of work have passed since the loop last ran, it
  yields to the loop (``asyncio.sleep(0)``), holding its lock, so connections are
  served meanwhile (5,000 endpoints held the loop 46 ms in one piece).  What a
  reader sees in between: each listener is in its old or its new state, never
  half of one (its pools are updated, its routes set, in one slice); ``listeners()``
  and ``pools()`` list the ones applied so far; ``table``, ``failed``,
  ``applied_at`` (so ``ready()``, the admin API's table and the metrics' version)
  switch at the end, in one step; ``local_host`` answers from the listeners as
  they were before the apply until it ends.  Applies queue on the lock in order;
  bind retries wait for the apply.  ``shutdown()`` or ``stop_accepting()`` during
  an apply ends it at its next slice (nothing more is bound; the table is not
  taken); a cancelled apply finishes without yielding, then raises.

``shutdown(grace)``: stop accepting everywhere and stop health checks; wait (on
an event, not by polling) up to ``grace`` seconds for open connections to
finish; abort the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from mesh.health import HealthChecker
from mesh.host import Host
from mesh.listener import FRONTS, Binding, Listener, TunnelHeaderFn
from mesh.pool import Pool
from mesh.proxy.preamble import host_tunnel_header
from mesh.proxy.registry import ConnectionRegistry
from mesh.routing import Match, Route, RoutingTable, Service, format_hostport
from mesh.udp import UdpListener

__all__ = ["ListenKey", "Mesh"]

log = logging.getLogger(__name__)

REBIND_INITIAL = 0.5  # seconds before a port that could not be bound is tried again (doubling)
REBIND_MAX = 30.0
APPLY_SLICE = 0.002  # seconds of work Mesh.apply does before it yields to the loop (the data plane shares it)


class ListenKey(NamedTuple):
    """What a listener is keyed by.  ``tag`` tells apart port-0 routes (the service name), else ""."""

    protocol: str
    host: str
    port: int
    tag: str = ""

    def __str__(self) -> str:
        return f"{self.protocol}://{format_hostport(self.host, self.port)}"


Key = ListenKey
RouteKey = tuple[str, Match]  # (service name, match rules): what a pool is kept by on a listener


def listen_key(svc: Service, route: Route) -> ListenKey:
    return ListenKey(route.protocol, route.listen_host, route.port, svc.name if route.port == 0 else "")


class _Slices:
    """Where ``Mesh._apply`` yields to the loop: once ``mesh.apply_slice`` seconds of work have passed."""

    __slots__ = ("cancelled", "count", "mesh", "since")

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.since = time.perf_counter()
        self.cancelled: asyncio.CancelledError | None = None
        self.count = 0  # yields so far

    async def step(self) -> bool:
        """After one listener's work: yield if the slice is spent.  False: stop, the mesh was shut down
        or handed its sockets over meanwhile."""
        mesh = self.mesh
        if self.cancelled is not None or time.perf_counter() - self.since < mesh.apply_slice:
            return True
        mesh.apply_yields += 1
        self.count += 1
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError as exc:
            # a half-applied table would stay: finish without yielding, then raise
            self.cancelled = exc
        self.since = time.perf_counter()
        if mesh._closed or mesh._released:
            log.info("an apply stopped part way: the mesh was %s", "shut down" if mesh._closed else "handed over")
            return False
        return True


class Mesh:
    """The listeners, pools and open connections of one process.  See the module docstring."""

    def __init__(
        self,
        *,
        local_node: str | None = None,
        rng: random.Random | None = None,
        reuse_port: bool = False,
        tunnel_header: TunnelHeaderFn = host_tunnel_header,
        access_log: bool = False,
        tunnel_auth: Any = None,
    ) -> None:
        self.local_node = local_node
        # cluster mode: the cluster token's TunnelAuth, which seals the UDP tunnel's headers (the TCP tunnel's
        # are sealed by ``tunnel_header``, e.g. ``TunnelAuth.host_header``)
        self.tunnel_auth = tunnel_auth
        # Called with each new Pool right after it is created (the metrics reader tracks pools from birth,
        # so an endpoint that comes and goes before the first scrape is still counted).
        self.on_pool: list[Callable[[Pool], None]] = []
        self.reuse_port = reuse_port
        self.tunnel_header = tunnel_header
        self.access_log = access_log
        self.table: RoutingTable | None = None
        self.applied_at: float | None = None  # wall-clock time of the last apply()
        self.registry = ConnectionRegistry()
        self.by_key: dict[ListenKey, Listener | UdpListener] = {}
        self._local_index: dict[tuple[str, int, str], tuple[Pool, Host]] | None = None
        # while an apply runs: the listeners as they were before it (what local_host answers from)
        self._before: list[Listener | UdpListener] | None = None
        self.apply_slice = APPLY_SLICE
        self.apply_yields = 0  # times an apply yielded to the loop (tests, benchmarks)
        self._rebind_handle: asyncio.TimerHandle | None = None
        self._rebind_delay = REBIND_INITIAL
        # the longest wait between bind retries (REBIND_MAX); an agent that could not take the ports
        # over from a previous one (meshagent/handover.py) retries every 2 s, so it binds soon after that
        # one exits
        self.rebind_max = REBIND_MAX
        self.failed: dict[ListenKey, str] = {}  # keys of the current table that could not be bound -> reason
        self._rng = rng if rng is not None else random.Random()
        self._checkers: dict[Pool, HealthChecker] = {}
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self._released = False  # stop_accepting(): the sockets belong to a new process now

    # -- views for the admin API and metrics --------------------------------------------------------
    def listeners(self) -> list[Listener]:
        """The listeners now accepting, sorted by (host, port, protocol)."""
        return sorted(self.by_key.values(), key=lambda lst: (lst.host, lst.port, lst.protocol))

    def listener(self, host: str, port: int, protocol: str | None = None) -> Listener | None:
        """The listener bound to (host, port) -- the bound port, also for port-0 routes."""
        for lst in self.by_key.values():
            if lst.host == host and lst.port == port and (protocol is None or lst.protocol == protocol):
                return lst
        return None

    def pools(self) -> Iterator[Pool]:
        """Every route's pool on every listener."""
        for lst in self.by_key.values():
            for b in lst.bindings:
                yield b.pool

    def local_host(self, endpoint_id: str, port: int, transport: str = "stream") -> tuple[Pool, Host] | None:
        """The pool and host of a local (not tunnelled) endpoint with this id and target port: what
        the cluster tunnel dials for a target "<endpoint id>:<port>", sharing its health and counts.
        ``transport``: "stream" (the TCP tunnel: tcp/tls routes) or "udp" (the UDP tunnel) -- a task
        may publish one port for both.  O(1): an index built on the first look-up after each apply."""
        index = self._local_index
        if index is None:
            index = {}
            for lst in self.by_key.values() if self._before is None else self._before:
                kind = "udp" if lst.protocol == "udp" else "stream"
                for pool in (b.pool for b in lst.bindings):
                    for host in pool.hosts:
                        if host.via is None:
                            index.setdefault((host.endpoint.id, host.port, kind), (pool, host))
            self._local_index = index
        return index.get((endpoint_id, port, "udp" if transport == "udp" else "stream"))

    def connections(self) -> int:
        """Open proxied connections (including those of removed listeners still draining)."""
        return len(self.registry)

    def ready(self) -> bool:
        """A table was applied and every one of its listeners is bound."""
        return self.table is not None and not self.failed and not self._closed and not self._released

    def __iter__(self) -> Iterator[Listener]:
        return iter(self.listeners())

    # -- applying tables ---------------------------------------------------------------------------------
    async def apply(self, table: RoutingTable) -> None:
        """Apply ``table`` as a diff against the current state, in slices (see the module docstring)."""
        if self._closed:
            raise RuntimeError("Mesh.apply() after shutdown()")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed or self._released:  # meanwhile, while an earlier apply ran
                why = "shut down" if self._closed else "the listening sockets were handed over"
                log.info("table version %d not applied: %s", table.version, why)
                return
            await self._apply(table)

    async def _apply(self, table: RoutingTable) -> None:
        wanted: dict[ListenKey, list[tuple[Service, Route]]] = {}
        for svc, route in table.routes():
            wanted.setdefault(listen_key(svc, route), []).append((svc, route))
        self._before = list(self.by_key.values())
        if self._rebind_handle is not None:  # rescheduled at the end, for this table's failures
            self._rebind_handle.cancel()
            self._rebind_handle = None
        slices = _Slices(self)
        failed: dict[ListenKey, str] = {}
        try:
            gone = [k for k, lst in self.by_key.items() if k not in wanted or not self._keeps(lst, wanted[k])]
            moved = [k for k in gone if k in wanted]  # another service now: refused until bound again, so first
            first = set(moved)
            todo = moved + [k for k in wanted if k not in first]
            stopped = False
            for key in gone:
                self._remove(key)
                if not await slices.step():
                    stopped = True
                    break
            for key in [] if stopped else todo:
                routes = wanted[key]
                lst = self.by_key.get(key)
                if lst is not None:
                    self._update(lst, routes)
                else:
                    reason = self._add(key, routes)
                    if reason is not None:
                        failed[key] = reason
                if not await slices.step():
                    stopped = True
                    break
            if not stopped:
                self.failed = failed
                self.table = table
                self.applied_at = time.time()
        finally:
            self._before = None
            self._local_index = None  # Mesh.local_host rebuilds it on its next look-up
        if not stopped:
            self._schedule_rebind(reset=True)
            log.info(
                "applied table version %d: %d listener(s), %d open connection(s)%s%s",
                table.version,
                len(self.by_key),
                len(self.registry),
                f", {len(failed)} port(s) not bound" if failed else "",
                f", in {slices.count + 1} slices" if slices.count else "",
            )
        if slices.cancelled is not None:
            raise slices.cancelled

    # -- ports that could not be bound: retried with backoff -----------------------------------------
    def _schedule_rebind(self, reset: bool = False) -> None:
        """While some port of the current table is not bound, try again after REBIND_INITIAL seconds,
        doubling to REBIND_MAX (a port freed by another process comes back without a new table)."""
        if reset:
            self._rebind_delay = REBIND_INITIAL
            if self._rebind_handle is not None:
                self._rebind_handle.cancel()
                self._rebind_handle = None
        if not self.failed or self._closed or self._rebind_handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._rebind_handle = loop.call_later(self._rebind_delay, self._rebind)
        self._rebind_delay = min(self._rebind_delay * 2, self.rebind_max)

    def _rebind(self) -> None:
        self._rebind_handle = None
        table = self.table
        if self._closed or self._released or self._before is not None or table is None or not self.failed:
            return
        wanted: dict[ListenKey, list[tuple[Service, Route]]] = {}
        for svc, route in table.routes():
            wanted.setdefault(listen_key(svc, route), []).append((svc, route))
        for key in list(self.failed):
            if key in self.by_key or key not in wanted:
                self.failed.pop(key, None)
                continue
            reason = self._add(key, wanted[key])
            if reason is None:
                self.failed.pop(key, None)
                self._local_index = None
                log.info("%s: bound on retry; the table is fully applied again", key)
            else:
                self.failed[key] = reason
        self._schedule_rebind()

    @staticmethod
    def _keeps(lst: Listener | UdpListener, routes: list[tuple[Service, Route]]) -> bool:
        """A tcp or udp listener is kept only by the same service; a shared one by any routes."""
        if lst.protocol not in ("tcp", "udp"):
            return True
        return {svc.name for svc, _ in routes} == {b.service for b in lst.bindings}

    def _update(self, lst: Listener, routes: list[tuple[Service, Route]]) -> None:
        old: dict[RouteKey, Binding] = {(b.service, b.route.match): b for b in lst.bindings}
        bindings = []
        for svc, route in routes:
            b = old.pop((svc.name, route.match), None)
            if b is None:
                b = Binding(svc.name, route, self._new_pool(svc, route))
            else:
                b.pool.update(route, svc.options.for_protocol(route.protocol))
                b.route = route
            self._sync_checker(b.pool, svc)
            bindings.append(b)
        for gone in old.values():
            self._stop_checker(gone.pool)
        lst.set_bindings(tuple(bindings))

    def _new_pool(self, svc: Service, route: Route) -> Pool:
        options = svc.options.for_protocol(route.protocol)
        pool = Pool(svc.name, route, options, rng=self._rng, local_node=self.local_node)
        for hook in self.on_pool:
            hook(pool)
        return pool

    def _add(self, key: ListenKey, routes: list[tuple[Service, Route]]) -> str | None:
        names = ", ".join(svc.name for svc, _ in routes)
        if key.protocol not in FRONTS and key.protocol != "udp":
            reason = f"protocol {key.protocol} is not served by this data plane (serves {', '.join(sorted(FRONTS))})"
            log.error("service %s %s: %s; skipping this port, the rest of the table applies", names, key, reason)
            return reason
        if key.port == 0 and self.reuse_port:
            # Each worker binds every port itself (SO_REUSEPORT): port 0 would give each its own port.
            reason = "port 0 (any free port) cannot be shared by several workers; name a port"
            log.error("service %s %s: %s; skipping this port, the rest of the table applies", names, key, reason)
            return reason
        bindings = tuple(Binding(svc.name, route, self._new_pool(svc, route)) for svc, route in routes)
        kind = UdpListener if key.protocol == "udp" else Listener
        lst = kind(
            key.host,
            key.port,
            **({"auth": self.tunnel_auth} if kind is UdpListener else {"protocol": key.protocol}),
            bindings=bindings,
            registry=self.registry,
            reuse_port=self.reuse_port,
            tunnel_header=self.tunnel_header,
            access_log=self.access_log,
        )
        try:
            lst.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            log.error(
                "service %s port %d: %s; skipping this port, the rest of the table applies", names, key.port, reason
            )
            lst.close()
            return reason
        self.by_key[key] = lst
        for (svc, _), b in zip(routes, bindings, strict=True):
            self._sync_checker(b.pool, svc)
        log.info(
            "service %s: listening on %s %s (%d endpoints)",
            names,
            key.protocol,
            format_hostport(key.host, lst.port),
            sum(len(route.endpoints) for _, route in routes),
        )
        return None

    def _remove(self, key: ListenKey) -> None:
        lst = self.by_key.pop(key)
        for b in lst.bindings:
            self._stop_checker(b.pool)
        lst.close()
        log.info(
            "service %s: stopped listening on %s %s; its open connections continue",
            lst.service,
            key.protocol,
            format_hostport(key.host, lst.port),
        )

    def _sync_checker(self, pool: Pool, svc: Service) -> None:
        check = svc.options.health_check
        current = self._checkers.get(pool)
        if current is not None and (check is None or current.check != check):
            self._stop_checker(pool)
            current = None
        if check is not None and current is None:
            try:
                checker = HealthChecker(pool, check, rng=self._rng)
            except ValueError as exc:
                log.error("service %s port %d: health check not started: %s", svc.name, pool.port, exc)
                return
            self._checkers[pool] = checker
            checker.start()

    def _stop_checker(self, pool: Pool) -> None:
        checker = self._checkers.pop(pool, None)
        if checker is not None:
            checker.stop()

    # -- handover (meshagent/handover.py) ---------------------------------------------------------------
    def listening_sockets(self) -> list[tuple[str, str, int, str, Any]]:
        """``(kind, host, port, role, socket)`` of every bound listener: what a handover passes on.
        kind is "stream" or "dgram"; role the listener's protocol ("tcp", "tls", "http", "udp")."""
        out = []
        for lst in self.by_key.values():
            sock = lst.listen_socket
            if sock is not None:
                out.append(("dgram" if lst.protocol == "udp" else "stream", lst.host, lst.port, lst.protocol, sock))
        return out

    def stop_accepting(self) -> None:
        """Stop accepting now, everywhere, and apply no more tables: a new process serves these ports.
        Only this process's descriptors are closed; the kernel sockets (and whatever waits in their
        accept queues) stay open in the process they were handed to.  Open connections continue;
        ``shutdown(grace)`` drains them."""
        self._released = True
        if self._rebind_handle is not None:
            self._rebind_handle.cancel()
            self._rebind_handle = None
        for lst in self.by_key.values():
            lst.close()

    # -- shutdown ----------------------------------------------------------------------------------------
    async def shutdown(self, grace: float) -> None:
        """Stop accepting everywhere, wait up to ``grace`` seconds for open connections, abort the rest."""
        self._closed = True
        if self._rebind_handle is not None:
            self._rebind_handle.cancel()
            self._rebind_handle = None
        stops = [c.stop() for c in self._checkers.values()]
        self._checkers.clear()
        listeners = list(self.by_key.values())
        self.by_key.clear()
        for lst in listeners:
            lst.close()
        for lst in listeners:
            await lst.wait_accepting_done()
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        open_before = len(self.registry)
        if open_before:
            log.info("shutdown: waiting up to %.1fs for %d open connection(s)", grace, open_before)
        if not await self.registry.wait_empty(max(grace, 0.0)):
            n = self.registry.abort_all()
            log.warning("shutdown: aborted %d connection(s) still open after %.1fs", n, grace)
            # Aborted transports report connection_lost on the next loop iterations.
            await self.registry.wait_empty(5.0)

    def __repr__(self) -> str:
        version = None if self.table is None else self.table.version
        return (
            f"<Mesh table={version} listeners={len(self.by_key)} failed={len(self.failed)} "
            f"connections={len(self.registry)} checkers={len(self._checkers)}{' closed' if self._closed else ''}>"
        )
