"""Listening sockets: ``Acceptor`` (bind + accept loop) and ``Listener`` (a published port's routes).

``Acceptor(host, port, factory)`` is the accept loop every TCP server of the
agent uses (published ports, the cluster tunnel): ``factory(peer)`` makes the
protocol for each accepted connection (``peer`` is the address ``accept()``
returned, so nobody needs a ``getpeername`` for it).

``Listener`` is one published (protocol, listen_host, port): it holds the routes
served there (``Binding``: service + route + pool; a tcp port has exactly one)
and takes its protocol factory from ``FRONTS[protocol]``.  The runtime swaps
routes in place; each new connection reads them once.

Two ways of accepting on one socket.  Accepting in C (uvloop's server) costs
about 20 us of CPU less per connection than anything Python can do, but libuv
handles EMFILE by accepting with a reserved descriptor and dropping the
connection, uncounted, and closes its server on other accept errors.  So the
``Acceptor`` accepts in C only while the descriptor reserve is untouched
(``_reserve_ok``: the top ``FD_RESERVE`` descriptors of the limit are free), and
otherwise with its own careful loop (add_reader + accept +
connect_accepted_socket), where an EMFILE/ENFILE/ENOBUFS/ENOMEM on accept stops
accepting for ``EXHAUSTED_PAUSE`` seconds (the clients wait in the kernel
backlog instead of being dropped), counts ``fd_exhausted`` and logs at most once
per ``LOG_INTERVAL`` with the count since the last line.  asyncio's own server
would log every failed accept and pause ~1 s, so on the asyncio loop the careful
loop is the only one.

``close()`` stops accepting at once; connections already accepted continue.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mesh.proxy.http import http_front
from mesh.proxy.preamble import host_tunnel_header
from mesh.proxy.registry import ConnectionRegistry
from mesh.proxy.sni import tls_front
from mesh.proxy.tcp import tcp_front
from mesh.routing import Route, format_hostport

if TYPE_CHECKING:
    from mesh.pool import Pool

__all__ = [
    "ACCEPT_BATCH",
    "BACKLOG",
    "EXHAUSTED_PAUSE",
    "FRONTS",
    "INHERITED",
    "LOG_INTERVAL",
    "Acceptor",
    "Binding",
    "InheritedSockets",
    "Listener",
    "bind_socket",
]

# What a listener of each protocol runs before the splice: ``FRONTS[protocol](listener)`` -> a
# protocol factory ``factory(peer)``.  A protocol missing here is not served by this data plane
# (the runtime reports its routes as not bound, naming the protocol).
FRONTS: dict[str, Callable[[Any], Callable[[tuple | None], asyncio.Protocol]]] = {
    "tcp": tcp_front,
    "tls": tls_front,
    "http": http_front,
}

# ``tunnel_header(host, client, local) -> bytes``: the first bytes towards a host with ``via`` set.
TunnelHeaderFn = Callable[[Any, "tuple | None", "tuple | None"], bytes]

log = logging.getLogger(__name__)

BACKLOG = 4096
ACCEPT_BATCH = 64  # accepts per readiness callback, so one busy port cannot starve the loop
EXHAUSTED_PAUSE = 0.25
LOG_INTERVAL = 10.0
WATCHDOG_INTERVAL = 1.0  # how often an acceptor checks its fast server (and tries to go fast again)
RESERVE_CHECK = 0.1  # how often the reserve is checked while some acceptor is fast (one timer per process)
RESERVE_EVERY = 16  # ... and every this many accepts in C
FAST_RETRY = 5.0  # careful accepting for this long after the fast server failed
# The descriptor reserve: the top FD_RESERVE descriptors.  One wakeup of libuv's accept loop takes at
# most a backlog's worth of connections, and each of them dials one upstream socket soon after: with
# twice the backlog in reserve, a burst that starts just below the line cannot reach EMFILE in libuv.
FD_RESERVE = 2 * BACKLOG + 64
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN})


class InheritedSockets:
    """Bound sockets this process was handed (a previous agent's, ``meshagent/handover.py``; or the
    parent's, for a worker), keyed by ``(kind, host, port)``: kind "stream" (a listening TCP socket)
    or "dgram" (UDP), host and port as the owner was asked to bind them.  ``bind_socket`` takes from
    here before it binds: a socket taken keeps its kernel accept queue, so nothing queued on it is lost.

    ``strict`` (a worker of ``--workers N``): a port not handed over is not bound here either (the
    parent binds every port, one SO_REUSEPORT socket per worker, and keeps a copy); ``bind_socket``
    raises instead.
    """

    def __init__(self) -> None:
        # several per key: a ``--workers N`` agent hands over one SO_REUSEPORT socket per worker
        self._socks: dict[tuple[str, str, int], list[socket.socket]] = {}
        self.strict = False

    def add(self, kind: str, host: str, port: int, sock: socket.socket) -> None:
        """Offer ``sock`` for ``(kind, host, port)``."""
        sock.setblocking(False)
        self._socks.setdefault((kind, host, port), []).append(sock)

    def take(self, kind: str, host: str, port: int) -> socket.socket | None:
        """A socket offered for ``(kind, host, port)``, now owned by the caller; None if there is none."""
        socks = self._socks.get((kind, host, port))
        if not socks:
            return None
        sock = socks.pop(0)
        if not socks:
            del self._socks[(kind, host, port)]
        return sock

    def keys(self) -> list[tuple[str, str, int]]:
        return sorted(self._socks)

    def close_all(self) -> list[tuple[str, str, int]]:
        """Close every socket nobody took (the new table does not serve those ports); their keys."""
        keys = sorted(self._socks)
        for socks in self._socks.values():
            for sock in socks:
                sock.close()
        self._socks.clear()
        return keys

    def __len__(self) -> int:
        return sum(len(socks) for socks in self._socks.values())

    def __repr__(self) -> str:
        return f"<InheritedSockets {len(self)}{' strict' if self.strict else ''}>"


#: The sockets of this process handed over by another one (one per process, like its descriptor table).
INHERITED = InheritedSockets()


def bind_socket(
    host: str, port: int, *, reuse_port: bool = False, backlog: int = BACKLOG, udp: bool = False
) -> socket.socket:
    """A non-blocking socket bound to (host, port): listening TCP, or UDP with ``udp``.  "::" is dual-stack.

    A socket handed over for that address (``INHERITED``) is returned instead of binding a new one.
    Raises OSError (e.g. EADDRINUSE) with the address in the message.
    """
    if port:
        inherited = INHERITED.take("dgram" if udp else "stream", host, port)
        if inherited is not None:
            return inherited
        if INHERITED.strict:
            where = f"{'udp ' if udp else ''}{format_hostport(host, port)}"
            raise OSError(errno.EADDRNOTAVAIL, f"cannot bind {where}: the parent process has not handed it over")
    socktype = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(host, port, type=socktype, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve listen address {host!r}: {exc.strerror}") from exc
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not udp:
            # Accepted sockets inherit SO_KEEPALIVE from the listening one (Linux): no setsockopt per accept.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host in ("::", "") else 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            where = f"{'udp ' if udp else ''}{format_hostport(host, port)}"
            raise OSError(exc.errno, f"cannot bind {where}: {exc.strerror}") from exc
        if not udp:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Acceptor:
    """Accepts connections on one (host, port) and hands each to ``factory(peer)``.

    ``name`` appears in logs ("service web", "tunnel").  Two ways of accepting, one
    socket (see the module docstring):

    - *fast* (uvloop only): uvloop's server accepts in C on a ``dup`` of the listening
      socket and calls ``factory(None)``; no Python socket object, no task per accept.
      Every ``RESERVE_EVERY`` accepted connections the factory checks the descriptor
      reserve (``_reserve_ok``), and so does one process-wide timer every ``RESERVE_CHECK``
      (descriptors taken by others); once the reserve is in use, the server is closed
      (the dup only: the socket keeps listening and its backlog keeps filling) and
      accepting goes careful.  What is left: descriptors taken by others faster than
      ``RESERVE_CHECK`` until none is free would meet libuv's EMFILE handling.  A watchdog
      (once per ``WATCHDOG_INTERVAL``) notices a uvloop server that closed itself (libuv
      reports accept errors other than EMFILE by closing it) and goes careful too.
    - *careful*: our own accept loop (``add_reader`` + ``accept`` +
      ``connect_accepted_socket``), which counts and survives EMFILE/ENFILE/ENOBUFS/
      ENOMEM by pausing.  Used on the default asyncio loop, while the reserve is low,
      and for ``FAST_RETRY`` after the fast server failed.
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
        self.mode_changes = 0  # fast <-> careful switches
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._resume_handle: asyncio.TimerHandle | None = None
        self._last_log = -LOG_INTERVAL
        self._unlogged = 0
        self._pending: set[asyncio.Task] = set()
        self._closed = False
        self._uvloop = False
        self._fast: asyncio.AbstractServer | None = None  # uvloop's server on a dup of _sock
        self._fast_fd = -1  # that dup's descriptor number (for the watchdog)
        self._fast_starting = False
        self._fast_after = 0.0  # loop time before which careful mode stays (after a failure)
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def sockname(self) -> tuple | None:
        """The bound address (useful with port 0), or None when not listening."""
        return self._sock.getsockname() if self._sock is not None else None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    @property
    def listen_socket(self) -> socket.socket | None:
        """The listening socket (what a handover passes on), or None when not listening."""
        return self._sock

    @property
    def fast(self) -> bool:
        """Accepting in C (uvloop's server) right now."""
        return self._fast is not None

    def start(self) -> None:
        """Bind and start accepting (on the running loop).  Raises OSError when the port cannot be bound."""
        if self._sock is not None or self._closed:
            raise RuntimeError(f"{self!r} already started or closed")
        self._loop = loop = asyncio.get_running_loop()
        self._sock = bind_socket(self.host, self.port, reuse_port=self.reuse_port, backlog=self.backlog)
        if self.port == 0:
            self.port = self._sock.getsockname()[1]
        self._uvloop = type(loop).__module__.startswith("uvloop")
        self._start_reading()
        if self._uvloop:
            self._watchdog = loop.call_at(loop.time() + WATCHDOG_INTERVAL, self._watch)
            self._go_fast()

    def close(self) -> None:
        """Stop accepting now; accepted connections continue."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        self._stop_fast()
        for handle in (self._resume_handle, self._watchdog):
            if handle is not None:
                handle.cancel()
        self._resume_handle = self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def wait_accepting_done(self) -> None:
        """Wait for connections accepted but not yet handed to a protocol (after close())."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # -- fast: uvloop's server -------------------------------------------------------------------------
    def _go_fast(self) -> None:
        if self._fast is not None or self._fast_starting or self._closed or self._sock is None:
            return
        if self._loop.time() < self._fast_after or not _reserve_ok():
            return
        self._fast_starting = True
        task = self._loop.create_task(self._start_fast())
        self._pending.add(task)
        task.add_done_callback(self._accepted_done)

    async def _start_fast(self) -> None:
        try:
            if self._closed or self._sock is None or not _reserve_ok():
                return
            dup = self._sock.dup()
            try:
                server = await self._loop.create_server(self._fast_factory, sock=dup, backlog=self.backlog)
            except BaseException:
                dup.close()
                raise
            if self._closed:
                server.close()
                return
            self._fast = server
            self._fast_fd = dup.fileno()
            _RESERVE_WATCH.add(self)
            self._stop_reading()  # one accepting path at a time
            self.mode_changes += 1
        finally:
            self._fast_starting = False

    def _fast_factory(self) -> asyncio.Protocol:
        # Called by uvloop for every connection it accepted.  The reserve is checked every
        # RESERVE_EVERY accepts (two system calls each time) and by the process-wide timer.
        self.accepted += 1
        if not self.accepted % RESERVE_EVERY and not _reserve_ok():
            self._loop.call_soon(self._go_careful, "descriptor reserve in use")
        return self.factory(None)

    def _stop_fast(self) -> None:
        server = self._fast
        if server is not None:
            _RESERVE_WATCH.discard(self)
            self._fast = None
            self._fast_fd = -1
            server.close()  # closes the dup; the listening socket stays open, its backlog keeps filling

    def _go_careful(self, why: str, retry_after: float = 0.0) -> None:
        if self._fast is None or self._closed:
            return
        log.info(
            "%s listener %s: accepting in Python (%s)", self.name or "-", format_hostport(self.host, self.port), why
        )
        self._stop_fast()
        self.mode_changes += 1
        self._fast_after = self._loop.time() + retry_after
        if self._resume_handle is None:
            self._start_reading()

    def _watch(self) -> None:
        """Once per WATCHDOG_INTERVAL: is the fast server still serving our socket?  Can careful go fast?"""
        loop = self._loop
        self._watchdog = None
        if self._closed:
            return
        if self._fast is not None and not _same_socket(self._fast_fd, self._sock):
            # uvloop closed its server (an accept error libuv passed on): nothing accepts on it any more.
            self.accept_errors += 1
            log.error(
                "%s listener %s: the fast accept path stopped (an accept error); accepting in Python for %.0fs",
                self.name or "-",
                format_hostport(self.host, self.port),
                FAST_RETRY,
            )
            self._go_careful("fast accept path stopped", FAST_RETRY)
        elif self._fast is None and self._resume_handle is None:
            self._go_fast()
        self._watchdog = loop.call_at(loop.time() + WATCHDOG_INTERVAL, self._watch)

    # -- careful: our own accept loop -------------------------------------------------------------------
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
                break
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._exhausted(exc)
                    return
                if exc.errno in _TRANSIENT:
                    continue
                self.accept_errors += 1
                self._exhausted(exc)  # unknown: back off the same way rather than spin
                return
            # Non-blocking mode, TCP_NODELAY (the transports set both) and SO_KEEPALIVE (inherited
            # from the listening socket) need no system call here.
            self.accepted += 1
            task = loop.create_task(loop.connect_accepted_socket(lambda a=addr: factory(a), conn))
            self._pending.add(task)
            task.add_done_callback(self._accepted_done)
        if self._uvloop and self._fast is None and not self._fast_starting:
            self._go_fast()

    def _accepted_done(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("%r: setting up an accepted connection failed: %r", self, task.exception())

    def _exhausted(self, exc: OSError, what: str = "accept") -> None:
        self.fd_exhausted += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            log.error(
                "%s listener %s: %s failed %d time(s) since last report: %s; "
                "pausing accepts for %.2fs each time (raise the fd limit or reduce connections)",
                self.name or "-",
                format_hostport(self.host, self.port),
                what,
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

    def resources_exhausted(self, exc: OSError) -> None:
        """Descriptors (or kernel memory) ran out elsewhere in this process (a dial): pause accepting
        the same way, so new clients wait in the backlog instead of taking the last descriptors."""
        if self._closed or self._resume_handle is not None:
            return
        if self._fast is not None:
            self._go_careful("descriptors exhausted")
        self._exhausted(exc, "a connect to an endpoint")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("listening" if self._sock is not None else "new")
        if self._resume_handle is not None:
            state += "(paused: out of fds)"
        elif self._fast is not None:
            state += "(fast)"
        return (
            f"<Acceptor {self.name} {format_hostport(self.host, self.port)} {state} "
            f"accepted={self.accepted} fd_exhausted={self.fd_exhausted}>"
        )


def _reserve_ok() -> bool:
    """True while the descriptor reserve is untouched: descriptor number ``soft limit - FD_RESERVE``
    is not open.  Descriptors are handed out lowest first, so that number is in use only after
    every lower one was in use at once: accepting in C (where libuv would drop clients on
    EMFILE) stops there, with the reserve still free for careful accepting and for dials.
    Two system calls (getrlimit, fcntl), so a limit lowered at run time is seen at once."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return True
    probe = soft - FD_RESERVE
    if probe <= 0:
        return False
    try:
        fcntl.fcntl(probe, fcntl.F_GETFD)
    except OSError:
        return True  # not open: the reserve is free
    return False


class _ReserveWatch:
    """One timer per process, running while some acceptor accepts in C: every ``RESERVE_CHECK``
    seconds it checks the reserve and sends every fast acceptor to careful accepting once it is
    in use (descriptors taken by anything but those accepts: dials, checks, other servers)."""

    def __init__(self) -> None:
        self.fast: set[Acceptor] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, acc: Acceptor) -> None:
        self.fast.add(acc)
        if self._handle is None:
            self._arm(acc._loop)

    def discard(self, acc: Acceptor) -> None:
        self.fast.discard(acc)
        if not self.fast and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = loop.call_at(loop.time() + RESERVE_CHECK, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        if not _reserve_ok():
            for acc in list(self.fast):
                acc._go_careful("descriptor reserve in use")
        if self.fast:
            self._arm(loop)


_RESERVE_WATCH = _ReserveWatch()


def _same_socket(fd: int, sock: socket.socket | None) -> bool:
    """``fd`` still refers to the same open socket as ``sock``."""
    if fd < 0 or sock is None:
        return False
    try:
        a, b = os.fstat(fd), os.fstat(sock.fileno())
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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
    def listen_socket(self) -> socket.socket | None:
        return self.acceptor.listen_socket

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
        """Stop accepting now; accepted connections continue (an http listener's idle pooled
        upstream connections are closed: no new request will use them)."""
        self.acceptor.close()
        front = getattr(self, "http", None)
        if front is not None:
            front.close_idle()

    async def wait_accepting_done(self) -> None:
        await self.acceptor.wait_accepting_done()

    # -- what a splice asks of its site -------------------------------------------------------------
    def resources_exhausted(self, exc: OSError) -> None:
        """A dial of this listener ran out of our own descriptors: pause accepting (``Acceptor``)."""
        self.acceptor.resources_exhausted(exc)

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
