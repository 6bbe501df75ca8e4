"""A listening socket for one (listen_host, port) of a service.

Why this accepts connections itself (add_reader + accept + connect_accepted_socket)
instead of ``loop.create_server``: running out of file descriptors must be
counted and logged, and must neither crash nor busy-loop.  asyncio's server logs
every failed accept and pauses ~1 s; uvloop (libuv) hides EMFILE entirely: it
accepts with a reserved descriptor and drops the connection, so nothing could be
counted.  Here an EMFILE/ENFILE/ENOBUFS/ENOMEM on accept stops accepting for
``EXHAUSTED_PAUSE`` seconds (the clients wait in the kernel backlog instead of
being dropped), counts ``fd_exhausted`` and logs at most once per
``LOG_INTERVAL`` with the count since the last line.

``close()`` stops accepting at once; connections already accepted continue.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from typing import TYPE_CHECKING

from mesh.proxy import ConnectionRegistry, ProxyConnection, TunnelHeader, default_tunnel_header
from mesh.routing import format_hostport

if TYPE_CHECKING:
    from mesh.pool import Pool

__all__ = ["ACCEPT_BATCH", "BACKLOG", "EXHAUSTED_PAUSE", "LOG_INTERVAL", "Listener", "bind_socket"]

log = logging.getLogger(__name__)

BACKLOG = 4096
ACCEPT_BATCH = 64  # accepts per readiness callback, so one busy port cannot starve the loop
EXHAUSTED_PAUSE = 0.25
LOG_INTERVAL = 10.0
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN})


def bind_socket(host: str, port: int, *, reuse_port: bool = False, backlog: int = BACKLOG) -> socket.socket:
    """A non-blocking listening TCP socket on (host, port).  "::" listens dual-stack.

    Raises OSError (e.g. EADDRINUSE) with the address in the message.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve listen address {host!r}: {exc.strerror}") from exc
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host in ("::", "") else 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot bind {format_hostport(host, port)}: {exc.strerror}") from exc
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts connections on one (host, port) and hands each to a ``ProxyConnection``.

    ``pool`` is the route's ``Pool``; the runtime updates it in place (or swaps
    it) and each new connection reads it once.  ``service`` names the service
    for logs and the admin API.
    """

    def __init__(
        self,
        host: str,
        port: int,
        pool: Pool,
        *,
        service: str,
        registry: ConnectionRegistry | None = None,
        reuse_port: bool = False,
        backlog: int = BACKLOG,
        tunnel_header: TunnelHeader = default_tunnel_header,
        access_log: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.pool = pool
        self.service = service
        self.registry = registry if registry is not None else ConnectionRegistry()
        self.reuse_port = reuse_port
        self.backlog = backlog
        self.tunnel_header = tunnel_header
        self.access_log = access_log  # one mesh.access line per closed connection
        self.accepted = 0
        self.fd_exhausted = 0  # accepts that failed for lack of descriptors/memory
        self.accept_errors = 0  # other accept errors
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._resume_handle: asyncio.TimerHandle | None = None
        self._last_log = -LOG_INTERVAL
        self._unlogged = 0
        self._pending: set[asyncio.Task] = set()
        self._closed = False

    @property
    def sockname(self) -> tuple | None:
        """The bound address (useful with port 0), or None when not listening."""
        return self._sock.getsockname() if self._sock is not None else None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def start(self) -> None:
        """Bind and start accepting (on the running loop).  Raises OSError when the port cannot be bound."""
        if self._sock is not None or self._closed:
            raise RuntimeError(f"{self!r} already started or closed")
        self._loop = asyncio.get_running_loop()
        self._sock = bind_socket(self.host, self.port, reuse_port=self.reuse_port, backlog=self.backlog)
        if self.port == 0:
            self.port = self._sock.getsockname()[1]
        self._start_reading()

    def close(self) -> None:
        """Stop accepting now; accepted connections continue."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def wait_accepting_done(self) -> None:
        """Wait for connections accepted but not yet handed to a protocol (after close())."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # -- accepting -------------------------------------------------------------------------------------
    def _start_reading(self) -> None:
        if not self._reading and self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = False

    def _on_readable(self) -> None:
        sock = self._sock
        loop = self._loop
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._exhausted(exc)
                    return
                if exc.errno in _TRANSIENT:
                    continue
                self.accept_errors += 1
                self._exhausted(exc)  # unknown: back off the same way rather than spin
                return
            try:
                conn.setblocking(False)
                # TCP_NODELAY comes with the transport (asyncio and uvloop set it themselves).
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                conn.close()  # reset before we got to it
                continue
            self.accepted += 1
            task = loop.create_task(loop.connect_accepted_socket(self._protocol, conn))
            self._pending.add(task)
            task.add_done_callback(self._accepted_done)

    def _protocol(self) -> ProxyConnection:
        return ProxyConnection(self)

    def _accepted_done(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("%r: setting up an accepted connection failed: %r", self, task.exception())

    def _exhausted(self, exc: OSError) -> None:
        self.fd_exhausted += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            log.error(
                "service %s listener %s: accept failed %d time(s) since last report: %s; "
                "pausing accepts for %.2fs each time (raise the fd limit or reduce connections)",
                self.service,
                format_hostport(self.host, self.port),
                self._unlogged,
                exc.strerror or exc,
                EXHAUSTED_PAUSE,
            )
            self._last_log = now
            self._unlogged = 0
        self._stop_reading()
        self._resume_handle = self._loop.call_later(EXHAUSTED_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume_handle = None
        if not self._closed:
            self._start_reading()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("listening" if self._sock is not None else "new")
        if self._resume_handle is not None:
            state += "(paused: out of fds)"
        return (
            f"<Listener {self.service} {format_hostport(self.host, self.port)} {state} "
            f"accepted={self.accepted} fd_exhausted={self.fd_exhausted} pool={self.pool!r}>"
        )
