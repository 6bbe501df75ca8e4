"""Following one engine: subscribe, list, follow events, reconnect.

The one session loop every follower of an engine shares (the discovery
``Watcher``, the cluster agent's ``LocalTasks``).  The follower supplies what
a listing is and when its next one is due; this module owns the rules:

- A session runs ``prepare()``, opens GET /events, and only then runs
  ``resync()`` (the full listing): the engine has subscribed us before the
  listing starts, so nothing that happens between the two is lost.  After the
  first ``resync()`` of a session returns, ``connected`` is set.
- While the session lasts, every event goes to ``on_event(raw)`` as it arrives
  (synchronously, on the loop), and ``step()`` runs each time ``next_due()``
  (on ``clock``) has come; ``wake()`` makes the loop look at ``next_due()``
  again at once (call it after marking something dirty).  ``idle`` is set while
  the loop waits with nothing due.
- The session ends when the events stream ends (dockerd restart: EOF without
  an error), when reading it fails, or when a request raises ``EngineError``
  (or one of ``errors``); ``connected`` is cleared and ``on_reconnect()``
  called.  The next session starts after a backoff that doubles from
  ``backoff_initial`` to ``backoff_max`` and falls back to ``backoff_initial``
  after a session that got as far as its listing.  The same failure every
  time while the engine is away is logged once (then at DEBUG).
- ``stop()`` ends ``run()`` at the next await (a listing in flight is cut).
  Other exceptions (a follower's bug) propagate out of ``run()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .engine import Engine, EngineError, EngineUnavailable

__all__ = ["Follower"]


class Follower:
    """Follows ``engine``'s events with ``filters`` (see the module docstring).

    ``holding()`` says what is served while the engine is away, for the log
    line ("serving the last table").  ``log`` is the follower's logger, so the
    lines carry its name.
    """

    def __init__(
        self,
        engine: Engine,
        filters: Mapping[str, list[str]],
        *,
        on_event: Callable[[Mapping[str, Any]], None],
        resync: Callable[[], Awaitable[None]],
        step: Callable[[], Awaitable[None]],
        next_due: Callable[[], float],
        prepare: Callable[[], Awaitable[None]] | None = None,
        on_reconnect: Callable[[], None] | None = None,
        errors: tuple[type[BaseException], ...] = (),
        holding: Callable[[], str] = lambda: "",
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger | None = None,
    ) -> None:
        self.engine = engine
        self.filters = filters
        self._on_event = on_event
        self._resync = resync
        self._step = step
        self._next_due = next_due
        self._prepare = prepare
        self._on_reconnect = on_reconnect
        self._errors = (EngineError, *errors)
        self._holding = holding
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self._clock = clock
        self._log = log or logging.getLogger(__name__)
        self.connected = asyncio.Event()  # set while a session is synced
        self.idle = asyncio.Event()  # set while a synced session waits with nothing due
        self.sessions = 0  # sessions started
        self.events = 0  # events received (all sessions)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    def __repr__(self) -> str:
        url = getattr(getattr(self.engine, "host", None), "url", "?")
        return (
            f"<Follower {url} sessions={self.sessions} events={self.events} connected={self.connected.is_set()} "
            f"idle={self.idle.is_set()} stopping={self._stop.is_set()}>"
        )

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wake(self) -> None:
        """Look at ``next_due()`` again now (something was marked dirty)."""
        self.idle.clear()
        self._wake.set()

    def stop(self) -> None:
        """Ask ``run()`` to return."""
        self._stop.set()
        self.wake()

    async def run(self) -> None:
        """Follow until ``stop()`` or cancellation; reconnects on its own."""
        backoff = self.backoff_initial
        last_error = ""
        url = getattr(getattr(self.engine, "host", None), "url", "?")
        while not self._stop.is_set():
            synced = False
            try:
                synced = await self._session()
            except self._errors as exc:
                # the same failure every second while the engine is away: log it once
                msg = str(exc)
                level = logging.DEBUG if msg == last_error else logging.WARNING
                last_error = msg
                holding = self._holding()
                tail = f"; {holding}" if holding else ""
                if isinstance(exc, EngineUnavailable):
                    self._log.log(level, "docker engine %s unavailable: %s%s", url, exc, tail)
                else:
                    self._log.log(level, "docker engine %s: %s%s", url, exc, tail)
            finally:
                self.connected.clear()
                self.idle.clear()
            if self._stop.is_set():
                break
            if self._on_reconnect is not None:
                try:
                    self._on_reconnect()
                except Exception:
                    self._log.exception("on_reconnect hook failed")
            if synced:
                backoff = self.backoff_initial  # the session worked for a while: reconnect quickly
                last_error = ""
            try:
                await asyncio.wait_for(self._stop.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, self.backoff_max)

    async def _session(self) -> bool:
        """One connection to the engine.  Returns True if it got as far as its listing."""
        self.sessions += 1
        if self._prepare is not None:
            await self._prepare()
        synced = False
        async with self.engine.events(self.filters) as stream:
            failed: list[BaseException] = []
            reader = asyncio.create_task(self._read(stream, failed))
            try:
                await self._resync()
                synced = True
                self.connected.set()
                while not self._stop.is_set():
                    if reader.done():
                        if failed:
                            raise failed[0]
                        raise EngineUnavailable(f"{self.engine.host.url}: events reader stopped")
                    now = self._clock()
                    due = self._next_due()
                    if due > now:
                        self._wake.clear()
                        self.idle.set()
                        try:
                            await asyncio.wait_for(self._wake.wait(), due - now)
                        except TimeoutError:
                            pass
                        continue
                    self.idle.clear()
                    await self._step()
            finally:
                reader.cancel()
                try:
                    await reader
                except (asyncio.CancelledError, Exception):
                    pass
        return synced

    async def _read(self, stream: Any, failed: list[BaseException]) -> None:
        try:
            async for event in stream:
                self.events += 1
                self._on_event(event)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            failed.append(exc)
        finally:
            self.wake()
