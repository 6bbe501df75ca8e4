"""The data plane of one process: applies routing tables as diffs.

Rules of ``Mesh.apply(table)`` (a listener is keyed by (listen_host, port)):

- A key only in the new table gets a new ``Pool`` and ``Listener``.  If the port
  cannot be bound, that is logged (service, address, reason) and the key is
  skipped; the rest of the table still applies, and the next ``apply`` tries it
  again.
- A key no longer in the table stops accepting at once; its open connections
  continue (they are tracked in the mesh-wide ``ConnectionRegistry``).
- A key kept by the same service updates its pool in place
  (``pool.update(route, options)``): hosts keep active counts, health and
  ejections; new options apply to NEW connections (each connection read its
  options once when accepted).
- A key that moves to another service is treated as removed + added.
- Health checkers follow the options: started for services with
  ``health_check``, restarted when the check changes, stopped when it goes away
  or the key is removed.
- Removals happen before additions, so an address freed by this table can be
  bound by it.

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

from mesh.health import HealthChecker
from mesh.listener import Listener
from mesh.pool import Pool
from mesh.proxy import ConnectionRegistry, TunnelHeader, default_tunnel_header
from mesh.routing import Route, RoutingTable, Service, format_hostport

__all__ = ["Mesh"]

log = logging.getLogger(__name__)

Key = tuple[str, int]


class Mesh:
    """The listeners, pools and open connections of one process.  See the module docstring."""

    def __init__(
        self,
        *,
        local_node: str | None = None,
        rng: random.Random | None = None,
        reuse_port: bool = False,
        tunnel_header: TunnelHeader = default_tunnel_header,
        access_log: bool = False,
    ) -> None:
        self.local_node = local_node
        # Called with each new Pool right after it is created (the metrics reader tracks pools from birth,
        # so an endpoint that comes and goes before the first scrape is still counted).
        self.on_pool: list[Callable[[Pool], None]] = []
        self.reuse_port = reuse_port
        self.tunnel_header = tunnel_header
        self.access_log = access_log
        self.table: RoutingTable | None = None
        self.applied_at: float | None = None  # wall-clock time of the last apply()
        self.registry = ConnectionRegistry()
        self.by_address: dict[Key, Listener] = {}
        self.failed: dict[Key, str] = {}  # keys of the current table that could not be bound -> reason
        self._rng = rng if rng is not None else random.Random()
        self._checkers: dict[Key, HealthChecker] = {}
        self._lock: asyncio.Lock | None = None
        self._closed = False

    # -- views for the admin API and metrics --------------------------------------------------------
    def listeners(self) -> list[Listener]:
        """The listeners now accepting, sorted by (host, port)."""
        return [self.by_address[k] for k in sorted(self.by_address)]

    def listener(self, host: str, port: int) -> Listener | None:
        return self.by_address.get((host, port))

    def connections(self) -> int:
        """Open proxied connections (including those of removed listeners still draining)."""
        return len(self.registry)

    def ready(self) -> bool:
        """A table was applied and every one of its listeners is bound."""
        return self.table is not None and not self.failed and not self._closed

    def __iter__(self) -> Iterator[Listener]:
        return iter(self.listeners())

    # -- applying tables ---------------------------------------------------------------------------------
    async def apply(self, table: RoutingTable) -> None:
        """Apply ``table`` as a diff against the current state (see the module docstring)."""
        if self._closed:
            raise RuntimeError("Mesh.apply() after shutdown()")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            self._apply(table)

    def _apply(self, table: RoutingTable) -> None:
        wanted: dict[Key, tuple[Service, Route]] = {(r.listen_host, r.port): (svc, r) for svc, r in table.routes()}
        for key in [k for k, lst in self.by_address.items() if k not in wanted or wanted[k][0].name != lst.service]:
            self._remove(key)
        failed: dict[Key, str] = {}
        for key, (svc, route) in wanted.items():
            lst = self.by_address.get(key)
            if lst is not None:
                lst.pool.update(route, svc.options)
                self._sync_checker(key, lst.pool, svc)
                continue
            reason = self._add(key, svc, route)
            if reason is not None:
                failed[key] = reason
        self.failed = failed
        self.table = table
        self.applied_at = time.time()
        log.info(
            "applied table version %d: %d listener(s), %d open connection(s)%s",
            table.version,
            len(self.by_address),
            len(self.registry),
            f", {len(failed)} port(s) not bound" if failed else "",
        )

    def _add(self, key: Key, svc: Service, route: Route) -> str | None:
        pool = Pool(svc.name, route, svc.options, rng=self._rng, local_node=self.local_node)
        for hook in self.on_pool:
            hook(pool)
        lst = Listener(
            key[0],
            key[1],
            pool,
            service=svc.name,
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
                "service %s port %d: %s; skipping this port, the rest of the table applies", svc.name, key[1], reason
            )
            lst.close()
            return reason
        self.by_address[key] = lst
        self._sync_checker(key, pool, svc)
        log.info("service %s: listening on %s (%d endpoints)", svc.name, format_hostport(*key), len(route.endpoints))
        return None

    def _remove(self, key: Key) -> None:
        lst = self.by_address.pop(key)
        self._stop_checker(key)
        lst.close()
        log.info(
            "service %s: stopped listening on %s; its open connections continue", lst.service, format_hostport(*key)
        )

    def _sync_checker(self, key: Key, pool: Pool, svc: Service) -> None:
        check = svc.options.health_check
        current = self._checkers.get(key)
        if current is not None and (check is None or current.check != check or current.pool is not pool):
            self._stop_checker(key)
            current = None
        if check is not None and current is None:
            try:
                checker = HealthChecker(pool, check, rng=self._rng)
            except ValueError as exc:
                log.error("service %s port %d: health check not started: %s", svc.name, key[1], exc)
                return
            self._checkers[key] = checker
            checker.start()

    def _stop_checker(self, key: Key) -> None:
        checker = self._checkers.pop(key, None)
        if checker is not None:
            checker.stop()

    # -- shutdown ----------------------------------------------------------------------------------------
    async def shutdown(self, grace: float) -> None:
        """Stop accepting everywhere, wait up to ``grace`` seconds for open connections, abort the rest."""
        self._closed = True
        stops = [c.stop() for c in self._checkers.values()]
        self._checkers.clear()
        listeners = list(self.by_address.values())
        self.by_address.clear()
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
            f"<Mesh table={version} listeners={len(self.by_address)} failed={len(self.failed)} "
            f"connections={len(self.registry)} checkers={len(self._checkers)}{' closed' if self._closed else ''}>"
        )
