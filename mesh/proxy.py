"""The TCP proxy: one accepted client connection spliced to one upstream endpoint.

Two asyncio Protocols per connection: ``ProxyConnection`` (the client side, and
the object the registry tracks) and ``UpstreamProtocol`` (the endpoint side).

State rules:

- Accept: read the listener's pool (and its options) ONCE, choose a host with no
  await in between.  No host -> count ``no_endpoint`` and close the client now.
- Connect (one task per connection): ``host.active += 1`` from the moment a
  host is chosen; a failed attempt (refused / timeout / unreachable / other
  OSError) gives it back, reports the failure to the pool, counts it, and
  retries on a host not tried yet, at most ``options.retries`` times.  Nothing
  has been sent upstream before a connect succeeded, so a retry is always safe.
- Before the upstream is connected, client bytes are buffered: reading pauses
  above ``PRECONNECT_PAUSE`` and the connection is closed (``overflow_closed``)
  above ``PRECONNECT_LIMIT`` (uvloop delivers data even after pause_reading(),
  so the hard bound is needed).  On connect the PROXY header (if any) and the
  buffer are written first, then bytes flow straight through.
- Flow control: when one side's transport says ``pause_writing``, reading on the
  other side pauses until ``resume_writing``.  Both transports have a
  ``WRITE_HIGH`` write-buffer limit, so at most about 2 x ``WRITE_HIGH`` plus one
  read chunk is held per connection.
- Half-close: EOF from one side -> ``write_eof()`` on the other; the pair closes
  when both directions saw EOF.  A transport lost (close, RST, error) on one side
  closes the other (pending bytes are still flushed; the idle timer and
  ``abort()`` bound how long that may take).
- Idle timeout: one lazy timer per connection.  It fires every quarter of
  ``idle_timeout`` and compares the byte counters with their values at the
  previous firing; four quiet quarters in a row close the pair.  So the per-chunk
  cost is the byte-count add the proxy does anyway (no clock read, no timer
  re-arm); an idle pair is closed after between 1 and 1.25 x ``idle_timeout``.
- Close: when the client transport, the connect task and the upstream
  transport are all gone, the host gets ``active -= 1`` and its stats (bytes,
  duration), and the connection leaves the registry.  ``abort()`` forces that.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mesh.proxyproto import PP2_TYPE_MESH_TARGET, encode_v1, encode_v2
from mesh.routing import format_hostport

if TYPE_CHECKING:
    from mesh.pool import Host, Pool

__all__ = [
    "IDLE_CHECKS",
    "PRECONNECT_LIMIT",
    "PRECONNECT_PAUSE",
    "WRITE_HIGH",
    "ConnectionRegistry",
    "ProxyConnection",
    "UpstreamProtocol",
    "connect_failure_reason",
    "default_tunnel_header",
    "set_stream_options",
]

log = logging.getLogger(__name__)

WRITE_HIGH = 256 * 1024
PRECONNECT_PAUSE = 256 * 1024
PRECONNECT_LIMIT = 1024 * 1024
IDLE_CHECKS = 4

_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})

TunnelHeader = Callable[["Host", "tuple | None", "tuple | None"], bytes]


def default_tunnel_header(host: Host, client: tuple | None, local: tuple | None) -> bytes:
    """First bytes on a connection to another node's agent tunnel (``host.via``): a
    PROXY v2 header with the real client and a ``PP2_TYPE_MESH_TARGET`` TLV naming
    the endpoint as "address:port".  The cluster issue may replace this via
    ``Mesh(tunnel_header=...)``."""
    target = format_hostport(host.address, host.port).encode()
    return encode_v2(client, local, [(PP2_TYPE_MESH_TARGET, target)])


def connect_failure_reason(exc: BaseException) -> str:
    """The ``RouteStats.connect_failures`` key for a failed connect."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return "unreachable"
    return "error"


def set_stream_options(transport: asyncio.BaseTransport) -> None:
    """SO_KEEPALIVE on a TCP transport's socket (no-op for others).

    TCP_NODELAY is not set here: asyncio's and uvloop's TCP transports already set it on
    every socket they wrap (tests/test_proxy.py checks both sides), and each extra
    setsockopt is a system call per connection."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass  # e.g. the peer already reset the connection; the transport will report it


class ConnectionRegistry:
    """The open connections of one ``Mesh``: a set, with a wait for "all gone".

    Each connection adds itself once when accepted and removes itself once when
    finished, so ``shutdown()`` can wait for draining without polling.
    """

    __slots__ = ("_conns", "_empty")

    def __init__(self) -> None:
        self._conns: set[ProxyConnection] = set()
        self._empty: asyncio.Event | None = None

    def add(self, conn: ProxyConnection) -> None:
        self._conns.add(conn)

    def remove(self, conn: ProxyConnection) -> None:
        self._conns.discard(conn)
        if not self._conns and self._empty is not None:
            self._empty.set()

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


class UpstreamProtocol(asyncio.Protocol):
    """The endpoint side of a ``ProxyConnection``."""

    __slots__ = ("conn", "host", "made", "nbytes", "peer", "transport")

    def __init__(self, conn: ProxyConnection, host: Host) -> None:
        self.conn = conn
        self.host = host
        self.peer = conn.transport  # the client transport
        self.transport: asyncio.Transport | None = None
        self.made = False
        self.nbytes = 0  # endpoint -> client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.transport = transport  # type: ignore[assignment]
        self.conn._upstream_made(self, transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)
        self.nbytes += len(data)

    def eof_received(self) -> bool:
        self.conn._upstream_eof()
        return True

    def pause_writing(self) -> None:
        self.conn._pause_client_reading(True)

    def resume_writing(self) -> None:
        self.conn._pause_client_reading(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._upstream_lost(self, exc)


class ProxyConnection(asyncio.Protocol):
    """The client side of one proxied connection, and its state (see the module docstring).

    ``listener`` provides ``pool`` (a ``mesh.pool.Pool``), ``registry`` (a
    ``ConnectionRegistry``), ``tunnel_header``, ``access_log`` (bool), ``service``
    and ``port``.
    """

    __slots__ = (
        "_buf",
        "_client_eof",
        "_client_lost",
        "_client_paused",
        "_connect_task",
        "_done",
        "_idle_handle",
        "_idle_mark",
        "_idle_quiet",
        "_loop",
        "_pending",
        "_up_eof",
        "_up_paused",
        "client",
        "host",
        "listener",
        "local",
        "nbytes",
        "options",
        "pool",
        "reason",
        "started",
        "transport",
        "up",
        "up_transport",
    )

    def __init__(self, listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.up: UpstreamProtocol | None = None
        self.up_transport: asyncio.Transport | None = None
        self.host: Host | None = None
        self.pool: Pool | None = None
        self.options = None
        self.client: tuple | None = None
        self.local: tuple | None = None
        self.nbytes = 0  # client -> endpoint
        self.started = 0.0
        self.reason: str | None = None  # why it closed, first cause wins (access log)
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._buf: bytearray | None = None
        self._client_eof = False
        self._up_eof = False
        self._client_lost = False
        self._client_paused = 0  # bit 1: pre-connect buffer full, bit 2: upstream write buffer full
        self._up_paused = False
        self._connect_task: asyncio.Task | None = None
        self._pending = 1  # client transport + connect task + upstream transport still alive
        self._done = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_mark = -1
        self._idle_quiet = 0

    # -- accept -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        listener = self.listener
        listener.registry.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        self.client = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        # Read the route once; no await between here and choose().
        self.pool = pool = listener.pool
        self.options = opts = pool.options
        stats = pool.stats
        stats.accepted += 1
        host = pool.choose(self.client)
        if host is None:
            stats.no_endpoint += 1
            self.reason = "no_endpoint"
            transport.close()
            return
        host.active += 1
        self._buf = bytearray()
        self._pending += 1
        self._connect_task = loop.create_task(self._connect(host))
        if opts.idle_timeout > 0:
            self._idle_handle = loop.call_at(loop.time() + opts.idle_timeout / IDLE_CHECKS, self._idle_check)

    async def _connect(self, host: Host) -> None:
        """Connect to ``host``, retrying on other hosts; ``_upstream_made`` takes over on success."""
        loop = self._loop
        pool = self.pool
        opts = self.options
        stats = pool.stats
        tried: list[Host] = []
        holding = True  # this task holds ``host.active += 1`` for ``host``
        try:
            while True:
                proto = UpstreamProtocol(self, host)
                t0 = loop.time()
                try:
                    addr, port = host.dial
                    async with asyncio.timeout(opts.connect_timeout):
                        await loop.create_connection(lambda p=proto: p, addr, port)
                except Exception as exc:
                    if proto.made:
                        holding = False  # connected, then lost at once: connection_lost handles it
                        return
                    holding = False
                    host.active -= 1
                    reason = connect_failure_reason(exc)
                    stats.connect_failed(reason)
                    pool.report_failure(host)
                    log.debug("%r: connect to %r failed: %s (%r)", self, host, reason, exc)
                    tried.append(host)
                    if self._client_lost:
                        self._close_client(reason)
                        return
                    if len(tried) > opts.retries or (host := pool.choose(self.client, tried)) is None:
                        stats.connection_failed(reason)
                        self._close_client(reason)
                        return
                    stats.retries += 1
                    host.active += 1
                    holding = True
                    continue
                if proto.made:
                    # _upstream_made took over the host (and its active count).
                    holding = False
                    host.stats.connect_time.observe(loop.time() - t0)
                return
        finally:
            if holding:
                host.active -= 1
            self._connect_task = None
            self._release()

    def _upstream_made(self, up: UpstreamProtocol, transport: asyncio.Transport) -> None:
        if self._client_lost or self._done:
            up.made = False  # not ours: the connect task gives back host.active
            transport.abort()
            return
        self._pending += 1
        self.up = up
        self.up_transport = transport
        self.host = host = up.host
        self.pool.report_success(host)
        host.stats.connections += 1
        set_stream_options(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        header = self._header(host)
        buf = self._buf
        self._buf = None
        if header:
            transport.write(header)
        if buf:
            transport.write(buf)
            self.nbytes += len(buf)
        if self._client_eof:
            self._write_eof(transport)
        self._pause_client_reading(False, 1)

    def _header(self, host: Host) -> bytes:
        if host.via is not None:
            return self.listener.tunnel_header(host, self.client, self.local)
        pp = self.options.proxy_protocol
        if pp is None:
            return b""
        if pp == "v1":
            return encode_v1(self.client, self.local)
        return encode_v2(self.client, self.local)

    # -- client -> upstream ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        up = self.up_transport
        if up is not None:
            up.write(data)
            self.nbytes += len(data)
            return
        buf = self._buf
        if buf is None:
            return  # no endpoint, or connect gave up: the client is being closed
        buf += data
        if len(buf) > PRECONNECT_PAUSE:
            if len(buf) > PRECONNECT_LIMIT:
                self.pool.stats.overflow_closed += 1
                self.abort("overflow")
                return
            self._pause_client_reading(True, 1)

    def eof_received(self) -> bool:
        self._client_eof = True
        up = self.up_transport
        if up is not None:
            self._write_eof(up)
            if self._up_eof:
                self._close_both()
        return True

    def pause_writing(self) -> None:
        # The client reads slower than the endpoint sends: stop reading the endpoint.
        up = self.up_transport
        if up is not None and not self._up_paused:
            self._up_paused = True
            up.pause_reading()

    def resume_writing(self) -> None:
        up = self.up_transport
        if up is not None and self._up_paused:
            self._up_paused = False
            up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reason is None:
            self.reason = "client_closed"
        self._client_lost = True
        self._client_eof = True
        self._buf = None
        task = self._connect_task
        if task is not None:
            task.cancel()
        up = self.up_transport
        if up is not None:
            up.close()
        self._release()

    # -- upstream callbacks ---------------------------------------------------------------------------
    def _upstream_eof(self) -> None:
        self._up_eof = True
        if not self._client_lost:
            self._write_eof(self.transport)
        if self._client_eof:
            self._close_both()

    def _upstream_lost(self, up: UpstreamProtocol, exc: Exception | None) -> None:
        if self.up is not up:
            return
        if self.reason is None:
            self.reason = "upstream_closed"
        self._up_eof = True
        if not self._client_lost:
            self.transport.close()
        self._release()

    def _pause_client_reading(self, pause: bool, reason: int = 2) -> None:
        """Pause/resume reading from the client; ``reason`` 1 = pre-connect buffer, 2 = upstream backpressure.
        Reading resumes only when no reason is left.  Idempotent."""
        before = self._client_paused
        after = (before | reason) if pause else (before & ~reason)
        if after == before or self._client_lost:
            self._client_paused = after
            return
        self._client_paused = after
        if before == 0:
            self.transport.pause_reading()
        elif after == 0:
            self.transport.resume_reading()

    # -- closing ---------------------------------------------------------------------------------------
    @staticmethod
    def _write_eof(transport: asyncio.Transport) -> None:
        try:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        except (OSError, RuntimeError):
            transport.close()

    def _close_both(self) -> None:
        self.transport.close()
        if self.up_transport is not None:
            self.up_transport.close()

    def _close_client(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._buf = None
        if not self._client_lost:
            self.transport.close()

    def abort(self, reason: str = "shutdown") -> None:
        """Abort both sides now (RST where possible); the connection then finishes as usual."""
        if self.reason is None:
            self.reason = reason
        self._buf = None
        task = self._connect_task
        if task is not None:
            task.cancel()
        if not self._client_lost and self.transport is not None:
            self.transport.abort()
        if self.up_transport is not None:
            self.up_transport.abort()

    def _idle_check(self) -> None:
        self._idle_handle = None
        if self._done:
            return
        total = self.nbytes + (self.up.nbytes if self.up is not None else 0)
        if total != self._idle_mark:
            self._idle_mark = total
            self._idle_quiet = 0
        else:
            self._idle_quiet += 1
            if self._idle_quiet >= IDLE_CHECKS:
                log.debug("%r: idle for %.1fs, closing", self, self.options.idle_timeout)
                self.abort("idle_timeout")
                return
        loop = self._loop
        self._idle_handle = loop.call_at(loop.time() + self.options.idle_timeout / IDLE_CHECKS, self._idle_check)

    def _release(self) -> None:
        self._pending -= 1
        if self._pending > 0 or self._done:
            return
        self._done = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        host = self.host
        duration = time.monotonic() - self.started
        sent = self.up.nbytes if self.up is not None else 0
        if host is not None:
            host.active -= 1
            st = host.stats
            st.bytes_in += self.nbytes
            st.bytes_out += sent
            st.duration.observe(duration)
        listener = self.listener
        listener.registry.remove(self)
        if listener.access_log:
            from mesh.metrics import log_access

            log_access(
                listener.service,
                listener.port,
                host.endpoint.id if host is not None else None,
                self.client,
                self.nbytes,
                sent,
                duration,
                self.reason or "client_closed",
            )

    # -- introspection -----------------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self._done:
            return "closed"
        if self.up_transport is None:
            return "connecting" if self._connect_task is not None else "closing"
        if self._client_eof and self._up_eof:
            return "closing"
        if self._client_eof:
            return "half-closed(client)"
        if self._up_eof:
            return "half-closed(upstream)"
        return "open"

    def __repr__(self) -> str:
        client = format_hostport(*self.client[:2]) if self.client else "?"
        svc = getattr(self.listener, "service", "?")
        host = self.host.endpoint.hostport if self.host is not None else "-"
        paused = []
        if self._client_paused:
            paused.append("client-read")
        if self._up_paused:
            paused.append("upstream-read")
        return (
            f"<ProxyConnection {svc} {client} -> {host} {self.state} in={self.nbytes} "
            f"out={self.up.nbytes if self.up else 0}{' paused=' + ','.join(paused) if paused else ''}>"
        )
