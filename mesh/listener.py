"""Listening sockets: ``Acceptor`` (bind + accept loop) and ``Listener`` (a published port's routes).

``Acceptor(host, port, factory)`` is the accept loop every TCP server of the
agent uses (published ports, the cluster tunnel): ``factory(peer)`` makes the
protocol for each accepted connection (``peer`` is the address ``accept()``
returned, so nobody needs a ``getpeername`` for it).

``Listener`` is one published (protocol, listen_host, port): it holds the routes
served there (``Binding``: service + route + pool; a tcp port has exactly one)
and takes its protocol factory from ``FRONTS[protocol]``.  The runtime swaps
routes in place; each new connection reads them once.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mesh.proxy.preamble import host_tunnel_header
from mesh.proxy.registry import ConnectionRegistry
from mesh.proxy.tcp import tcp_front
from mesh.routing import Route, format_hostport

if TYPE_CHECKING:
    from mesh.pool import Pool

__all__ = [
    "ACCEPT_BATCH",
    "BACKLOG",
    "EXHAUSTED_PAUSE",
    "FRONTS",
    "LOG_INTERVAL",
    "Acceptor",
    "Binding",
    "Listener",
    "bind_socket",
]

# What a listener of each protocol runs before the splice: ``FRONTS[protocol](listener)`` -> a
# protocol factory ``factory(peer)``.  A protocol missing here is not served by this data plane
# (the runtime reports its routes as not bound, naming the protocol).
FRONTS: dict[str, Callable[[Any], Callable[[tuple | None], asyncio.Protocol]]] = {"tcp": tcp_front}

# ``tunnel_header(host, client, local) -> bytes``: the first bytes towards a host with ``via`` set.
TunnelHeaderFn = Callable[[Any, "tuple | None", "tuple | None"], bytes]

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


class Acceptor:
    """Accepts connections on one (host, port) and hands each to ``factory(peer)``.

    ``name`` appears in logs ("service web", "tunnel").  See the module docstring
    for why accepting is done here and what happens when descriptors run out.
    """

    def __init__(
        self,
        host: str,
        port: int,
        factory: Callable[[tuple | None], asyncio.Protocol],
        *,
        name: str = "",
        reuse_port: bool = False,
        backlog: int = BACKLOG,
    ) -> None:
        self.host = host
        self.port = port
        self.factory = factory
        self.name = name
        self.reuse_port = reuse_port
        self.backlog = backlog
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
        factory = self.factory
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
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
                # Non-blocking mode and TCP_NODELAY come with the transport (asyncio and uvloop set
                # both on every socket they wrap); keep-alive is ours.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                conn.close()  # reset before we got to it
                continue
            self.accepted += 1
            task = loop.create_task(loop.connect_accepted_socket(lambda a=addr: factory(a), conn))
            self._pending.add(task)
            task.add_done_callback(self._accepted_done)

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
                "%s listener %s: accept failed %d time(s) since last report: %s; "
                "pausing accepts for %.2fs each time (raise the fd limit or reduce connections)",
                self.name or "-",
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

    @property
    def paused(self) -> bool:
        """Accepting is paused because descriptors (or memory) ran out."""
        return self._resume_handle is not None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("listening" if self._sock is not None else "new")
        if self._resume_handle is not None:
            state += "(paused: out of fds)"
        return (
            f"<Acceptor {self.name} {format_hostport(self.host, self.port)} {state} "
            f"accepted={self.accepted} fd_exhausted={self.fd_exhausted}>"
        )


class Binding:
    """One route of one service on a listener: what the listener's front picks from."""

    __slots__ = ("pool", "route", "service")

    def __init__(self, service: str, route: Route, pool: Pool) -> None:
        self.service = service
        self.route = route
        self.pool = pool

    def __repr__(self) -> str:
        return f"<Binding {self.service} {self.route.protocol} match={self.route.match} {self.pool!r}>"


class Listener:
    """One published (protocol, host, port) and the routes served there.

    ``Listener(host, port, pool, service=...)`` is the common tcp case (one route,
    ``pool.route``); ``bindings`` may hold several for protocols that share a port
    (``routing.SHARED_PROTOCOLS``).  The runtime replaces ``bindings`` (or updates
    the pools in place) when a table changes; each connection reads them once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        pool: Pool | None = None,
        *,
        service: str = "",
        protocol: str = "tcp",
        bindings: tuple[Binding, ...] | None = None,
        registry: ConnectionRegistry | None = None,
        reuse_port: bool = False,
        backlog: int = BACKLOG,
        tunnel_header: TunnelHeaderFn = host_tunnel_header,
        access_log: bool = False,
    ) -> None:
        if bindings is None:
            if pool is None:
                raise ValueError("Listener needs a pool or bindings")
            bindings = (Binding(service or pool.service, pool.route, pool),)
        if protocol not in FRONTS:
            raise ValueError(f"protocol {protocol!r} is not served by this data plane (serves {sorted(FRONTS)})")
        self.protocol = protocol
        self.host = host
        self.registry = registry if registry is not None else ConnectionRegistry()
        self.tunnel_header = tunnel_header
        self.access_log = access_log  # one mesh.access line per closed connection
        self.loop: asyncio.AbstractEventLoop | None = None
        self.bindings: tuple[Binding, ...] = ()
        self.pool: Pool = None  # type: ignore[assignment]
        self.service = ""
        self.set_bindings(bindings)
        self.acceptor = Acceptor(
            host, port, FRONTS[protocol](self), name=f"service {self.service}", reuse_port=reuse_port, backlog=backlog
        )

    def set_bindings(self, bindings: tuple[Binding, ...]) -> None:
        """Serve these routes from now on (new connections see them; open ones keep theirs)."""
        if not bindings:
            raise ValueError("a listener needs at least one route")
        self.bindings = tuple(bindings)
        # The tcp front reads ``pool`` (its only route); shared protocols match over ``bindings``.
        self.pool = bindings[0].pool
        self.service = ",".join(sorted({b.service for b in bindings}))

    # -- the accept loop ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.acceptor.port

    @property
    def name(self) -> str:
        return f"{self.service}:{self.port}"

    @property
    def sockname(self) -> tuple | None:
        return self.acceptor.sockname

    @property
    def listening(self) -> bool:
        return self.acceptor.listening

    @property
    def accepted(self) -> int:
        return self.acceptor.accepted

    @property
    def fd_exhausted(self) -> int:
        return self.acceptor.fd_exhausted

    @property
    def accept_errors(self) -> int:
        return self.acceptor.accept_errors

    def start(self) -> None:
        """Bind and start accepting (on the running loop).  Raises OSError when the port cannot be bound."""
        self.loop = asyncio.get_running_loop()
        self.acceptor.start()

    def close(self) -> None:
        """Stop accepting now; accepted connections continue."""
        self.acceptor.close()

    async def wait_accepting_done(self) -> None:
        await self.acceptor.wait_accepting_done()

    # -- what a splice asks of its site -------------------------------------------------------------
    def released(self, conn: Any) -> None:
        """A connection of this listener finished (``Splice._release``)."""
        if self.access_log:
            conn.log_access(self.service, self.port)

    def __repr__(self) -> str:
        state = "listening" if self.listening else "closed"
        if self.acceptor.paused:
            state += "(paused: out of fds)"
        return (
            f"<Listener {self.protocol} {self.service} {format_hostport(self.host, self.port)} {state} "
            f"accepted={self.accepted} fd_exhausted={self.fd_exhausted} pool={self.pool!r}>"
        )
