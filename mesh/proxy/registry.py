"""The open connections of one data plane (or one tunnel server).

Each connection adds itself once when it starts and removes itself once when it
is finished, so a shutdown can wait for draining on an event instead of polling.
"""

from __future__ import annotations

import asyncio

__all__ = ["ConnectionRegistry"]


class ConnectionRegistry:
    """The open connections of one ``Mesh``: a set, with a wait for "all gone".

    Each connection adds itself once when accepted and removes itself once when
    finished, so ``shutdown()`` can wait for draining without polling.
    """

    __slots__ = ("_conns", "_empty")

    def __init__(self) -> None:
        self._conns: set = set()
        self._empty: asyncio.Event | None = None

    def add(self, conn) -> None:
        self._conns.add(conn)

    def remove(self, conn) -> None:
        self._conns.discard(conn)
        if not self._conns and self._empty is not None:
            self._empty.set()

    def __contains__(self, conn) -> bool:
        return conn in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self):
        return iter(list(self._conns))

    async def wait_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no connection is open; True if none is."""
        if not self._conns:
            return True
        if self._empty is None or self._empty.is_set():
            self._empty = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return not self._conns
        return True

    def abort_all(self) -> int:
        """Abort every open connection; returns how many there were."""
        conns = list(self._conns)
        for c in conns:
            c.abort()
        return len(conns)

    def __repr__(self) -> str:
        return f"<ConnectionRegistry open={len(self._conns)}>"
