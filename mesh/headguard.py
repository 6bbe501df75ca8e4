"""A request-head deadline in front of an aiohttp server's per-connection handler (slowloris).

``HeadGuard`` wraps aiohttp's ``RequestHandler`` protocol and watches the bytes for the end of each request
head (CRLF CRLF).  Rules:

- From the first byte of a head (for a connection's first request: from the accept) the head must end within
  ``timeout`` seconds: a deadline, not an inactivity timer, so trickling bytes does not extend it.  Past it
  the connection gets a 408 and is closed.
- A head of more than ``max_head`` bytes closes the connection (aiohttp's own limits are per line and field).
- Once a head has ended, the request belongs to the handler (a long-poll, a dashboard stream) until more bytes
  start the next head; between requests aiohttp's keep-alive timer closes an idle connection.
- Everything else is delegated to the handler.

Servers add their bookkeeping through the hooks (``_head_started``, ``_head_ended``, ``_timed_out``,
``_too_large``, ``_lost``): the admin API its connection cap and eviction (mesh/admin.py), the cluster control
port its counters (cluster/control.py).
"""

from __future__ import annotations

import asyncio

__all__ = ["RESPONSE_408", "HeadGuard"]

RESPONSE_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class HeadGuard(asyncio.Protocol):
    """One connection of a guarded server (module docstring)."""

    __slots__ = ("head_bytes", "in_head", "inner", "tail", "timeout", "timer", "transport")

    max_head = 32 * 1024

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self.inner: asyncio.Protocol | None = inner
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.in_head = True
        self.head_bytes = 0
        self.tail = b""

    # -- hooks ---------------------------------------------------------------------------------------
    def _head_started(self) -> None:
        """A head starts (the accept, or the first byte after a finished head)."""

    def _head_ended(self) -> None:
        """A head ended within its deadline."""

    def _timed_out(self) -> None:
        """The deadline passed with the head unfinished (the 408 and the close follow)."""

    def _too_large(self) -> None:
        """The head grew over ``max_head``: count it, then close (this default aborts)."""
        if self.transport is not None:
            self.transport.abort()

    def _lost(self) -> None:
        """The connection is gone (before the handler hears it)."""

    # -- the deadline ------------------------------------------------------------------------------
    def _start_head(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.tail = b""
        self._head_started()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + self.timeout, self._head_timeout)

    def _end_head(self) -> None:
        self.in_head = False
        self._head_ended()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _head_timeout(self) -> None:
        self.timer = None
        transport = self.transport
        if not self.in_head or transport is None or transport.is_closing():
            return
        self._timed_out()
        transport.write(RESPONSE_408)
        transport.close()

    # -- asyncio callbacks -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        inner = self.inner
        if inner is None:
            return
        if not self.in_head:
            self._start_head()
        buf = self.tail + data
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                break
            self._end_head()
            start = end + 4
            if start < len(buf):
                self._start_head()  # more bytes: a pipelined request
        if self.in_head:
            self.head_bytes += len(buf) - max(start, len(self.tail))
            self.tail = buf[-3:]
            if self.head_bytes > self.max_head:
                self._too_large()
                return
        inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._lost()
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)
        self.transport = None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
