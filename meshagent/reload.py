"""Table sources for ``mesh run``: the static config file (reloaded on change and on SIGHUP) and Docker.

A source calls ``publish(table)`` (an async callable: ``Mesh.apply`` in one process, or the worker pool's
broadcast with ``--workers N``) for its first table and for every change, never concurrently.

Config file rules:
- Changes are detected by polling ``os.stat`` every ``interval`` seconds (default 1 s) and comparing
  (inode, device, size, mtime_ns).  Polling was chosen over inotify: it costs one stat per second, needs no
  ctypes, and also sees editors that replace the file (new inode) and bind-mounted files (ConfigMap-style
  symlink swaps), which inotify on the old inode would miss.
- SIGHUP (``poke()``) reloads at once, whether or not the stat changed.
- A bad file at reload keeps the last good table and logs "file:line: what is wrong"; a later good edit is
  applied as usual.
- A reload whose content equals the applied table (``RoutingTable.same_content``) publishes nothing;
  otherwise the version grows by exactly one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from mesh.config import load_config
from mesh.errors import ConfigError
from mesh.routing import RoutingTable

__all__ = ["ConfigSource", "FileStamp", "Publish", "summarize"]

log = logging.getLogger(__name__)

Publish = Callable[[RoutingTable], Awaitable[None]]
FileStamp = tuple[int, int, int, int] | None


def _stamp(path: str) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def summarize(table: RoutingTable) -> str:
    """One line per route: ``web  0.0.0.0:8080  round-robin  -> endpoints`` (with the protocol and the
    match rules when not plain tcp)."""
    lines = []
    for svc, route in table.routes():
        host = f"[{route.listen_host}]" if ":" in route.listen_host else route.listen_host
        eps = ", ".join(e.hostport + ("" if e.state == "running" else f" ({e.state})") for e in route.endpoints)
        balance = svc.options.udp_balance if route.protocol == "udp" else svc.options.balance
        proto = "" if route.protocol == "tcp" else f"/{route.protocol}"
        rules = f"  sni={','.join(route.match.hosts)}" if route.protocol == "tls" and route.match.hosts else ""
        lines.append(f"{svc.name}  {host}:{route.port}{proto}{rules}  {balance}  -> {eps or '(no endpoints)'}")
    for svc in table.services:
        if not svc.routes:
            lines.append(f"{svc.name}  (no listen address)")
    return "\n".join(lines)


class ConfigSource:
    """The static config file as a table source."""

    def __init__(
        self, path: str | Path, publish: Publish | None = None, *, interval: float = 1.0, workers: int = 1
    ) -> None:
        if not interval > 0:
            raise ValueError(f"config watch interval must be > 0, got {interval!r}")
        self.path = str(path)
        self.workers = workers  # --workers: above 1, a listen on port 0 is a configuration error
        self.interval = interval
        self.publish = publish  # set by the composition root before start()
        self.table: RoutingTable | None = None  # last published
        self.last_error: ConfigError | None = None
        self.reloads = 0  # reload attempts (change or SIGHUP)
        self._stamp: FileStamp = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._lock = asyncio.Lock()
        self._force = False
        self._pending: RoutingTable | None = None

    def __repr__(self) -> str:
        v = self.table.version if self.table else None
        return f"<ConfigSource {self.path} version={v} reloads={self.reloads} error={self.last_error!s}>"

    def load_initial(self) -> RoutingTable:
        """Read the file for start-up (raises ``ConfigError``); publish it with ``start()``."""
        self._stamp = _stamp(self.path)
        table = load_config(self.path, version=1, workers=self.workers)
        self._pending = table
        return table

    async def start(self) -> None:
        """Publish the table read by ``load_initial()``."""
        table = self._pending
        if table is None:
            raise RuntimeError("ConfigSource.start() before load_initial()")
        await self._send(table)
        self.table = table

    async def _send(self, table: RoutingTable) -> None:
        if self.publish is None:
            raise RuntimeError("ConfigSource has no publish callback")
        await self.publish(table)

    def poke(self) -> None:
        """Reload now (SIGHUP)."""
        self._force = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Watch the file until ``stop()``."""
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            forced, self._force = self._force, False
            stamp = _stamp(self.path)
            if forced or stamp != self._stamp:
                self._stamp = stamp
                try:
                    await self.reload("SIGHUP" if forced else "file changed")
                except Exception:  # the data plane failed to apply: keep watching, the next change may fix it
                    log.exception("config reload failed while applying the table", extra={"config": self.path})

    async def reload(self, reason: str = "reload") -> bool:
        """Read the file again; publish if it is valid and differs.  Returns True when a table was published."""
        async with self._lock:
            self.reloads += 1
            current = self.table
            next_version = (current.version if current else 0) + 1
            try:
                # Parsing a large file takes a while (5,000 endpoints: ~1 s): never on the data plane's loop.
                table = await asyncio.to_thread(load_config, self.path, version=next_version, workers=self.workers)
                if not table.services and current is not None and current.services:
                    raise ConfigError(
                        f"{self.path}: no services in the file (caught while being written?); to stop serving "
                        "every service, stop the mesh"
                    )
            except ConfigError as exc:
                self.last_error = exc
                log.error(
                    "config reload (%s) failed, keeping table version %s: %s",
                    reason,
                    current.version if current else None,
                    exc,
                    extra={"config": self.path},
                )
                return False
            self.last_error = None
            if table.same_content(current):
                log.info("config reload (%s): no change", reason, extra={"config": self.path})
                return False
            await self._send(table)
            self.table = table
            log.info(
                "config reload (%s): applied table version %d (%d services)",
                reason,
                table.version,
                len(table.services),
                extra={"config": self.path},
            )
            return True
