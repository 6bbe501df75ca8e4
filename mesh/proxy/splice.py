"""The splice: one downstream connection joined to one upstream connection.

Every stream protocol ends here.  A *front* (``mesh.proxy.tcp`` for plain TCP,
``cluster.tunnel`` for the node-to-node tunnel; later HTTP upgrades and TLS
passthrough) decides where a connection goes, then the ``Splice`` carries the
bytes.  ``Splice`` is the downstream side (the asyncio Protocol of the accepted
connection), ``Upstream`` the side towards the endpoint.

State rules:

- Start (``_start(host)``, called by the front with ``host.active += 1`` already
  done): the splice joins its site's registry and starts one dial task
  (``mesh.proxy.dial.dial``): connect with a ``call_at`` deadline, retry on
  another host before any byte went upstream, report to the pool.
- Before the upstream is connected, downstream bytes are buffered: reading pauses
  above ``PRECONNECT_PAUSE`` and the connection is closed (``overflow_closed``)
  above ``PRECONNECT_LIMIT`` (uvloop delivers data even after pause_reading(), so
  the hard bound is needed).  On connect the preamble (PROXY header or tunnel
  header, if any) and the buffer are written first, then bytes flow straight
  through: ``data_received`` is one ``write`` and one int add, on both sides.
- Flow control: when one side's transport says ``pause_writing``, reading on the
  other side pauses until ``resume_writing``.  Both transports have a
  ``WRITE_HIGH`` write-buffer limit, so at most about 2 x ``WRITE_HIGH`` plus one
  read chunk is held per connection.  Pause and resume are idempotent.
- Half-close: EOF from one side -> ``write_eof()`` on the other; when both
  directions saw EOF the pair closes (no ``write_eof`` on a side that is closed
  right after).  A transport lost (close, RST, error) on one side closes the
  other (pending bytes are still flushed; the idle timer and ``abort()`` bound
  how long that may take).
- Idle timeout: one lazy timer per connection.  It fires every quarter of
  ``idle_timeout`` and compares the byte counters with their values at the
  previous firing; four quiet quarters in a row close the pair.  So the per-chunk
  cost is the byte-count add the splice does anyway (no clock read, no timer
  re-arm); an idle pair is closed after between 1 and 1.25 x ``idle_timeout``.
- Large transfers: a read of at least ``zerocopy.SPLICE_MIN`` bytes moves that
  direction to the kernel (``os.splice`` through a pipe, ``mesh.proxy.zerocopy``)
  when the service allows it (``zero_copy``) and nothing is queued that it could
  overtake; the transport's reading of that side stays paused from then on.
  Byte counts, backpressure, half-close and the idle timer work the same.
- Through a tunnel (a host with ``via``), what the client sent is kept (up to
  ``REPLAY_LIMIT``) until the first byte comes back: the remote agent refuses a
  target it cannot serve with a reset before any byte, and that is retried on
  another host like a failed connect (``tunnel_refused``), the kept bytes sent again.
- Tunnel acknowledgement: the tunnel header asks for ``TUNNEL_ACK`` (TLV 0xE2), and a ``TunnelUpstream``
  (only tunnel hosts get one) strips those 8 bytes, whole, split across reads or glued to the replica's
  first bytes, before anything reaches the client.  From the connect on, a second ``call_at`` deadline of
  ``connect_timeout`` runs until they arrive; expiry is a failed connect (``timeout`` counted, the host
  reported, the kept bytes sent to another host), so a hung agent (the kernel accepts into its backlog,
  nothing comes back) is ejected like a dead one.  An agent whose first bytes back are not the ack, or
  an EOF (older than 0xE2), is remembered per node (its tunnel address) for ``NO_ACK_RECHECK`` seconds:
  towards it, no ack is asked and no deadline held (the behaviour before the ack), then it is asked again.
- Close: when the downstream transport, the dial task and the upstream transport
  are all gone, the host gets ``active -= 1`` and its stats (bytes, duration),
  the connection leaves the registry, the site hears ``released(splice)`` (access
  log, tunnel counters), and the splice/upstream reference cycle is broken so
  reference counting frees the pair at once.  ``abort()`` forces that.

Addresses: ``client`` is the address the connection is *for* (the accepted peer,
or the original client a tunnel header names), ``local`` the address it was
made to (read from the socket only when a preamble or the access log needs it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from mesh import logs
from mesh.proxy.dial import dial
from mesh.proxy.preamble import TUNNEL_ACK, replica_header
from mesh.proxy.zerocopy import AVAILABLE as ZERO_COPY_AVAILABLE
from mesh.proxy.zerocopy import SPLICE_MIN, KernelPipe, socket_fd
from mesh.routing import format_hostport

if TYPE_CHECKING:
    from mesh.host import Host
    from mesh.pool import Pool

__all__ = [
    "IDLE_CHECKS",
    "NO_ACK_RECHECK",
    "PRECONNECT_LIMIT",
    "PRECONNECT_PAUSE",
    "WRITE_HIGH",
    "Splice",
    "TunnelUpstream",
    "Upstream",
    "reset",
]

log = logging.getLogger(__name__)

WRITE_HIGH = 256 * 1024
PRECONNECT_PAUSE = 256 * 1024
PRECONNECT_LIMIT = 1024 * 1024
IDLE_CHECKS = 4

# Why downstream reading is paused (bits of Splice._down_paused).
_PAUSE_BUFFER = 1  # the pre-connect buffer is full
_PAUSE_UPSTREAM = 2  # the upstream's write buffer is full
_PAUSE_KERNEL = 4  # this direction moved to the kernel path (mesh.proxy.zerocopy): for good

# Through a tunnel, what the client sent is kept (up to this much) until the first byte comes back, so that a
# refusal by the remote agent (a reset before any byte) can be retried on another host like a failed connect.
REPLAY_LIMIT = 64 * 1024
# A node whose agent answered without TUNNEL_ACK (older than the ack TLV) is not asked for it, and held to no
# ack deadline, for this many seconds; then it is asked again (an upgraded agent is noticed).
NO_ACK_RECHECK = 60.0
_no_ack: dict[Any, float] = {}  # tunnel address (Host.via) -> time.monotonic() it answered without the ack
_ACK_LEN = len(TUNNEL_ACK)
_NEVER = 1 << 62  # a read size no socket delivers: this direction never moves to the kernel


_LINGER_ZERO = struct.pack("ii", 1, 0)


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Close ``transport`` with a reset (RST), not a FIN, even when every byte was read: a connection
    the mesh cuts (idle timeout, grace over, refused) must not look complete to the peer."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass  # already gone
    transport.abort()


def _keepalive_time() -> float:
    """The kernel's idle time before the first keep-alive probe (net.ipv4.tcp_keepalive_time)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_keepalive_time") as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return 7200.0


KEEPALIVE_TIME = _keepalive_time()


def keepalive_useful(idle_timeout: float) -> bool:
    """SO_KEEPALIVE on an upstream socket can notice a vanished endpoint only when the idle timeout
    would not close the pair first: the timeout is off, or longer than the kernel's first probe."""
    return idle_timeout <= 0 or idle_timeout > KEEPALIVE_TIME


def keepalive(transport: asyncio.BaseTransport) -> None:
    """SO_KEEPALIVE on a TCP transport's socket, so a peer that vanished is noticed on an idle
    connection.  TCP_NODELAY is not set here: asyncio's and uvloop's TCP transports set it on
    every socket they wrap (tests/test_proxy.py checks both sides), and each extra setsockopt
    is a system call per connection.  (Accepted sockets inherit SO_KEEPALIVE from the
    listening socket; upstream sockets get it here, when ``keepalive_useful``: through uvloop
    that costs a socket object, a getsockname and a setsockopt, ~4 us.)"""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass  # e.g. the peer already reset the connection; the transport will report it


class Upstream(asyncio.Protocol):
    """The endpoint side of a ``Splice``."""

    __slots__ = ("host", "made", "nbytes", "peer", "splice", "transport", "zc_min")

    def __init__(self, splice: Splice, host: Host) -> None:
        self.splice = splice
        self.host = host
        self.peer = splice.transport  # the downstream transport
        self.zc_min = splice._zc_min  # a read this large moves this direction to the kernel
        self.transport: asyncio.Transport | None = None
        self.made = False
        self.nbytes = 0  # endpoint -> downstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.transport = transport  # type: ignore[assignment]
        self.splice._upstream_made(self, transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)
        n = len(data)
        if not self.nbytes:
            self.splice._first_byte(self.host)
        self.nbytes += n
        if n >= self.zc_min:
            self.splice._kernel_up()

    def eof_received(self) -> bool:
        self.splice._upstream_eof()
        return True

    def pause_writing(self) -> None:
        self.splice._pause_down(True, _PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        self.splice._pause_down(False, _PAUSE_UPSTREAM)

    def connection_lost(self, exc: Exception | None) -> None:
        splice = self.splice
        if splice is not None:
            splice._upstream_lost(self, exc)


class TunnelUpstream(Upstream):
    """The endpoint side towards another node's agent: strips ``TUNNEL_ACK`` when the header asked for it
    (``Splice._ack_held`` is not None) and passes everything after it on as ``Upstream`` does."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        splice = self.splice
        held = splice._ack_held
        if held is None:
            Upstream.data_received(self, data)
            return
        if held:
            data = held + data
        if len(data) < _ACK_LEN and TUNNEL_ACK.startswith(data):
            splice._ack_held = data  # part of the ack: wait for the rest (the deadline still runs)
            return
        acked = data.startswith(TUNNEL_ACK)
        splice._ack_result(self, acked)
        if acked:
            data = data[_ACK_LEN:]
        if data:
            Upstream.data_received(self, data)

    def eof_received(self) -> bool:
        splice = self.splice
        held = splice._ack_held
        if held is not None:
            # EOF before the ack: an agent that does not ack (one that acks sends it before any replica byte
            # or EOF, and refuses with a reset), whose replica closed at once.
            splice._ack_result(self, False)
            if held:
                Upstream.data_received(self, held)
        return Upstream.eof_received(self)


def _asks_ack(host: Host) -> bool:
    """Whether to ask ``host``'s agent for TUNNEL_ACK (and hold it to the ack deadline)."""
    since = _no_ack.get(host.via)
    if since is None:
        return True
    if time.monotonic() - since < NO_ACK_RECHECK:
        return False
    _no_ack.pop(host.via, None)
    return True


class Splice(asyncio.Protocol):
    """The downstream side of one spliced connection pair, and its state (see the module docstring).

    ``site`` is what the connection belongs to: it provides ``loop``, ``registry``
    (a ``ConnectionRegistry``), ``tunnel_header(host, client, local)`` and
    ``released(splice)``; a front sets ``pool``/``options`` before ``_start``.
    """

    upstream_protocol = Upstream  # what the dialer connects with
    tunnel_protocol = TunnelUpstream  # ... to a host with ``via`` (another node's agent)

    __slots__ = (
        "_ack_handle",
        "_ack_held",
        "_buf",
        "_dial_expired",
        "_dial_task",
        "_done",
        "_down_eof",
        "_down_lost",
        "_down_paused",
        "_idle_handle",
        "_idle_mark",
        "_idle_quiet",
        "_pending",
        "_replay",
        "_tried",
        "_up_eof",
        "_up_paused",
        "_zc_down",
        "_zc_min",
        "_zc_up",
        "client",
        "host",
        "local",
        "loop",
        "nbytes",
        "options",
        "pool",
        "reason",
        "site",
        "started",
        "transport",
        "up",
        "up_transport",
    )

    def __init__(self, site: Any, client: tuple | None = None) -> None:
        self.site = site
        self.loop: asyncio.AbstractEventLoop = site.loop
        self.client = client
        self.local: tuple | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.up: Upstream | None = None
        self.up_transport: asyncio.Transport | None = None
        self.host: Host | None = None
        self.pool: Pool | None = None
        self.options: Any = None
        self.nbytes = 0  # downstream -> endpoint
        self.started = time.monotonic()
        self.reason: str | None = None  # why it closed, first cause wins (access log)
        self._buf: bytearray | None = None
        self._down_eof = False
        self._up_eof = False
        self._down_lost = False
        self._down_paused = 0  # _PAUSE_* bits
        self._up_paused = False
        self._dial_task: asyncio.Task | None = None
        self._dial_expired = False
        self._pending = 1  # downstream transport + dial task + upstream transport still alive
        self._done = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_mark = -1
        self._idle_quiet = 0
        self._zc_min = _NEVER  # a read this large moves its direction to the kernel (set by _start)
        self._zc_up: KernelPipe | None = None  # upstream -> downstream through the kernel
        self._zc_down: KernelPipe | None = None  # downstream -> upstream through the kernel
        self._replay: bytearray | None = None  # through a tunnel: sent, no byte back yet (REPLAY_LIMIT)
        self._tried: list[Host] | None = None  # hosts whose tunnel refused this connection
        self._ack_held: bytes | None = None  # through a tunnel that was asked for TUNNEL_ACK: what of it came
        self._ack_handle: asyncio.TimerHandle | None = None  # the ack deadline

    # -- start (called by a front) -------------------------------------------------------------
    def _start(self, host: Host, buffered: bytes = b"") -> None:
        """Dial ``host`` (its ``active`` already counted) and splice once connected.
        ``buffered``: downstream bytes a front already read (they go first)."""
        self._buf = bytearray(buffered)
        self._pending += 1
        self._dial_task = self.loop.create_task(dial(self, host))
        self._per_connection()

    def _per_connection(self) -> None:
        """What ``_start`` and ``adopt`` both decide once per connection: whether a direction may move to
        the kernel (so a service without zero_copy pays one int compare per chunk), and the idle timer."""
        self._zc_min = SPLICE_MIN if self.options.zero_copy and ZERO_COPY_AVAILABLE else _NEVER
        idle = self.options.idle_timeout
        if idle > 0:
            loop = self.loop
            self._idle_handle = loop.call_at(loop.time() + idle / IDLE_CHECKS, self._idle_check)

    def adopt(self, host: Host, up_transport: asyncio.Transport, to_up: bytes = b"", to_down: bytes = b"") -> None:
        """Join an already connected pair (an HTTP upgrade after its 101): ``host.active`` was counted
        for the request and is now this splice's.  ``to_up``/``to_down``: bytes either side sent
        before the hand-over, written first."""
        self._per_connection()
        up = self.upstream_protocol(self, host)
        up.made = True
        up.transport = up_transport
        up_transport.set_protocol(up)
        self._pending += 1
        self.up = up
        self.up_transport = up_transport
        self.host = host
        self._buf = None
        if to_up:
            up_transport.write(to_up)
            self.nbytes += len(to_up)
        if to_down:
            self.transport.write(to_down)
            up.nbytes += len(to_down)

    def _next_host(self, tried: list[Host]) -> Host | None:
        """The host to retry on after ``tried`` failed (the dialer calls it; fronts may narrow it): the
        balancer's choice among the usable hosts left, else the pool's last resort (an ejected one)."""
        pool = self.pool
        host = pool.choose(self.client, tried)  # type: ignore[union-attr]
        if host is None:
            host = pool.last_resort(tried)  # type: ignore[union-attr]
        return host

    def _dial_failed(self, reason: str) -> None:
        """Every attempt failed (or none was allowed): close the downstream side."""
        self._close_down(reason)

    def _upstream_made(self, up: Upstream, transport: asyncio.Transport) -> None:
        if self._down_lost or self._done:
            up.made = False  # not ours: the dial task gives back host.active
            transport.abort()
            return
        self._pending += 1
        self.up = up
        self.up_transport = transport
        self.host = host = up.host
        if host.via is None:
            self.pool.report_success(host)  # type: ignore[union-attr]
        # else: a tunnel's connect proves only that the remote agent listens; success is its first byte
        host.stats.connections += 1
        if keepalive_useful(self.options.idle_timeout):
            keepalive(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        if host.via is not None and _asks_ack(host):
            header = self.site.tunnel_header(host, self.client, self._local(), ack=True)
            self._ack_held = b""
            loop = self.loop
            self._ack_handle = loop.call_at(loop.time() + self.options.connect_timeout, self._ack_expired, up)
        else:
            header = self._preamble(host)
        buf = self._buf
        self._buf = None
        if header:
            transport.write(header)
        if buf:
            transport.write(buf)
            self.nbytes += len(buf)
        if host.via is not None and (buf is None or len(buf) <= REPLAY_LIMIT):
            self._replay = bytearray(buf) if buf else bytearray()
        if self._down_eof:
            self._write_eof(transport)
        self._pause_down(False, _PAUSE_BUFFER)

    def _preamble(self, host: Host) -> bytes:
        """The first bytes towards ``host``: the tunnel header for another node's agent, else
        the PROXY header the service asked for (or nothing)."""
        if host.via is not None:
            return self.site.tunnel_header(host, self.client, self._local())
        pp = self.options.proxy_protocol
        if pp is None:
            return b""
        return replica_header(pp, self.client, self._local())

    def _local(self) -> tuple | None:
        local = self.local
        if local is None and self.transport is not None:
            local = self.local = self.transport.get_extra_info("sockname")
        return local

    # -- downstream -> upstream ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        up = self.up_transport
        if up is not None:
            up.write(data)
            n = len(data)
            self.nbytes += n
            if self._replay is not None:
                self._keep(data)
            elif n >= self._zc_min:
                self._kernel_down()
            return
        buf = self._buf
        if buf is None:
            return  # no endpoint, or the dial gave up: the downstream side is being closed
        buf += data
        if len(buf) > PRECONNECT_PAUSE:
            if len(buf) > PRECONNECT_LIMIT:
                self.pool.stats.overflow_closed += 1  # type: ignore[union-attr]
                self.abort("overflow")
                return
            self._pause_down(True, _PAUSE_BUFFER)

    def eof_received(self) -> bool:
        self._down_eof = True
        up = self.up_transport
        if up is not None:
            if self._up_eof:
                self._close_both()
            else:
                self._write_eof(up)
        return True

    def pause_writing(self) -> None:
        # The downstream peer reads slower than the endpoint sends: stop reading the endpoint.
        up = self.up_transport
        if up is not None and not self._up_paused:
            self._up_paused = True
            up.pause_reading()

    def resume_writing(self) -> None:
        up = self.up_transport
        if up is not None and self._up_paused and self._zc_up is None:
            self._up_paused = False
            up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reason is None:
            self.reason = "client_closed"
        self._kernel_close()
        self._down_lost = True
        self._down_eof = True
        self._buf = None
        task = self._dial_task
        if task is not None:
            task.cancel()
        up = self.up_transport
        if up is not None:
            if exc is not None:
                # The client reset: pass it on.  A graceful close would wait to flush the client's bytes
                # to a replica that may never read them (its own writes are blocked on this dead client),
                # holding the pair until the idle timeout.
                reset(up)
            else:
                up.close()
        self._release()

    # -- upstream callbacks ------------------------------------------------------------------------
    def _upstream_eof(self) -> None:
        self._up_eof = True
        if self._down_eof:
            self._close_both()
        elif not self._down_lost:
            self._write_eof(self.transport)

    def _upstream_lost(self, up: Upstream, exc: Exception | None) -> None:
        if self.up is not up:
            return
        if self._replay is not None and isinstance(exc, ConnectionResetError) and not self._down_lost:
            if self._redial(up, "tunnel_refused"):
                return
        if self.reason is None:
            self.reason = "upstream_closed"
        self._kernel_close()
        self._up_eof = True
        if not self._down_lost:
            # Every byte the replica sent is passed on, then a FIN, also after a reset (HAProxy, nginx and
            # Envoy do the same): a replica that answers and closes with request bytes unread resets, and
            # passing that reset on would destroy an answer the client would otherwise get.
            self.transport.close()
        self._release()

    def _first_byte(self, host: Host) -> None:
        """The first byte came back from upstream: no retry from here on; through a tunnel, this is
        the success the dialer reports (the remote agent accepted the target; reported already at its ack
        when it sent one)."""
        if host.via is not None and self._replay is not None and _no_ack.get(host.via) is not None:
            self.pool.report_success(host)  # type: ignore[union-attr]
        self._replay = None

    def _keep(self, data: bytes) -> None:
        replay = self._replay
        if len(replay) + len(data) > REPLAY_LIMIT:  # type: ignore[arg-type]
            self._replay = None  # too much to replay: a refusal now fails this connection
        else:
            replay += data  # type: ignore[operator]

    def _ack_result(self, up: Upstream, acked: bool) -> None:
        """The first bytes came back through a tunnel that was asked for the ack: they are ``TUNNEL_ACK``
        (``acked``: the remote agent connected the replica, which is the success the dialer reports) or
        not (an agent older than the ack TLV: remembered, see ``NO_ACK_RECHECK``)."""
        self._ack_held = None
        self._cancel_ack()
        if acked:
            _no_ack.pop(up.host.via, None)
            # The remote agent reached the replica: a success for balancing and ejection.  The client's bytes
            # stay kept until a replica byte comes back, so a reset before that (the agent killed) is still
            # retried elsewhere, as it was before the ack existed.
            self.pool.report_success(up.host)  # type: ignore[union-attr]
        else:
            _no_ack[up.host.via] = time.monotonic()

    def _cancel_ack(self) -> None:
        handle = self._ack_handle
        if handle is not None:
            handle.cancel()
            self._ack_handle = None

    def _ack_expired(self, up: Upstream) -> None:
        """No TUNNEL_ACK within the connect timeout (a hung agent): a failed connect."""
        self._ack_handle = None
        if self._done or self.up is not up or self._ack_held is None or self._down_lost:
            return
        self._ack_held = None
        transport = self.up_transport
        log.debug("%r: no tunnel ack from %r within %ss", self, up.host, self.options.connect_timeout)
        if self._replay is not None:
            if self._redial(up, "timeout"):
                reset(transport)  # its connection_lost finds another upstream: nothing more to release
                return
        else:  # the client sent more than REPLAY_LIMIT: nothing to retry with
            stats = self.pool.stats  # type: ignore[union-attr]
            stats.connect_failed("timeout")
            self.pool.report_failure(up.host)  # type: ignore[union-attr]
            stats.connection_failed("timeout")
        self.abort("timeout")

    def _redial(self, up: Upstream, reason: str) -> bool:
        """The agent on the replica's node reset the tunnel before any byte came back (it refuses by
        reset: unknown target, no local replica answered; ``reason`` "tunnel_refused") or sent no ack in
        time ("timeout"): retry on another host like a failed connect, replaying what the client sent.
        False when no host is left to try."""
        host = up.host
        pool = self.pool
        stats = pool.stats  # type: ignore[union-attr]
        self._ack_held = None
        self._cancel_ack()
        stats.connect_failed(reason)
        pool.report_failure(host)  # type: ignore[union-attr]
        tried = self._tried if self._tried is not None else []
        tried.append(host)
        self._tried = tried
        nxt = self._next_host(tried) if len(tried) <= self.options.retries else None
        replay = self._replay
        self._replay = None
        if nxt is None:
            stats.connection_failed(reason)
            if self.reason is None:
                self.reason = reason
            return False
        log.debug("%r: tunnel to %r failed (%s); retrying on %r", self, host, reason, nxt)
        stats.retries += 1
        self.nbytes -= len(replay)  # type: ignore[arg-type]  (counted again when they are sent again)
        host.active -= 1
        self.host = self.up = self.up_transport = None
        self._up_eof = self._up_paused = False
        self._buf = replay
        nxt.active += 1
        self._pending += 1  # the new dial task (the refused transport's share is released below)
        self._dial_task = self.loop.create_task(dial(self, nxt))
        self._release()
        return True

    def _pause_down(self, pause: bool, reason: int) -> None:
        """Pause/resume reading downstream for ``reason`` (a ``_PAUSE_*`` bit); reading resumes
        only when no reason is left.  Idempotent."""
        before = self._down_paused
        after = (before | reason) if pause else (before & ~reason)
        self._down_paused = after
        if after == before or self._down_lost:
            return
        if before == 0:
            self.transport.pause_reading()
        elif after == 0:
            self.transport.resume_reading()

    # -- the kernel path (mesh.proxy.zerocopy) -------------------------------------------------------------
    def _kernel_up(self) -> None:
        """A large read from upstream: move upstream -> downstream to the kernel, if it can be done now."""
        if self._zc_up is not None or not self.options.zero_copy or not ZERO_COPY_AVAILABLE:
            return
        down, up = self.transport, self.up_transport
        if self._done or self._down_lost or self._up_eof or self._up_paused or up is None:
            return
        if down.get_write_buffer_size():
            return  # bytes already queued would be overtaken; try again on a later read
        src, dst = socket_fd(up), socket_fd(down)
        if src < 0 or dst < 0:
            return
        self._up_paused = True  # for good: resume_writing leaves it alone
        up.pause_reading()
        try:
            self._zc_up = KernelPipe(
                self.loop, src, dst, count=self._count_up, on_eof=self._upstream_eof,
                src_gone=self._abort_up, dst_gone=self._abort_down,
            )  # fmt: skip
        except OSError as exc:
            log.debug("%r: zero-copy not started: %r", self, exc)
            self._up_paused = False
            up.resume_reading()

    def _kernel_down(self) -> None:
        """A large read from downstream: move downstream -> upstream to the kernel, if it can be done now."""
        if self._zc_down is not None or not self.options.zero_copy or not ZERO_COPY_AVAILABLE:
            return
        down, up = self.transport, self.up_transport
        if self._done or self._down_lost or self._down_eof or self._down_paused or up is None:
            return
        if up.get_write_buffer_size():
            return
        src, dst = socket_fd(down), socket_fd(up)
        if src < 0 or dst < 0:
            return
        self._pause_down(True, _PAUSE_KERNEL)  # for good: the other bits no longer resume it
        try:
            self._zc_down = KernelPipe(
                self.loop, src, dst, count=self._count_down, on_eof=self._kernel_down_eof,
                src_gone=self._abort_down, dst_gone=self._abort_up,
            )  # fmt: skip
        except OSError as exc:
            log.debug("%r: zero-copy not started: %r", self, exc)
            self._pause_down(False, _PAUSE_KERNEL)

    def _count_up(self, n: int) -> None:
        self.up.nbytes += n  # type: ignore[union-attr]

    def _count_down(self, n: int) -> None:
        self.nbytes += n

    def _kernel_down_eof(self) -> None:
        self.eof_received()

    def _abort_up(self) -> None:
        if self.up_transport is not None:
            self.up_transport.abort()

    def _abort_down(self) -> None:
        if not self._down_lost:
            self.transport.abort()

    def _kernel_close(self) -> None:
        """Close the kernel paths (their dups would keep the sockets open after the transports closed)."""
        if self._zc_up is not None:
            self._zc_up.close()
        if self._zc_down is not None:
            self._zc_down.close()

    # -- closing -----------------------------------------------------------------------------------
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
        self._kernel_close()
        self.transport.close()
        if self.up_transport is not None:
            self.up_transport.close()

    def _close_down(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._buf = None
        if not self._down_lost:
            self.transport.close()

    def abort(self, reason: str = "shutdown") -> None:
        """Cut both sides now, with a reset (``reset``): a transfer cut off by the idle timeout or the
        end of a shutdown grace must not look complete.  The connection then finishes as usual."""
        if self.reason is None:
            self.reason = reason
        self._buf = None
        self._kernel_close()
        task = self._dial_task
        if task is not None:
            task.cancel()
        if not self._down_lost and self.transport is not None:
            reset(self.transport)
        if self.up_transport is not None:
            reset(self.up_transport)

    def _dial_timeout(self) -> None:
        """The connect deadline passed (a ``call_at`` handle of the dialer)."""
        task = self._dial_task
        if task is not None:
            self._dial_expired = True
            task.cancel()

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
        loop = self.loop
        self._idle_handle = loop.call_at(loop.time() + self.options.idle_timeout / IDLE_CHECKS, self._idle_check)

    def _release(self) -> None:
        self._pending -= 1
        if self._pending > 0 or self._done:
            return
        self._done = True
        self._cancel_ack()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        host = self.host
        up = self.up
        if host is not None:
            host.active -= 1
            st = host.stats
            st.bytes_in += self.nbytes
            st.bytes_out += up.nbytes if up is not None else 0
            st.duration.observe(time.monotonic() - self.started)
        self._kernel_close()
        self._zc_up = self._zc_down = None  # (their callbacks are bound methods of this splice)
        if up is not None:
            up.splice = None  # break the cycle: the pair is freed by reference counting
            up.peer = None
        site = self.site
        site.registry.remove(self)
        site.released(self)

    @property
    def sent(self) -> int:
        """Bytes the endpoint sent towards downstream."""
        return self.up.nbytes if self.up is not None else 0

    def log_access(self, service: str, port: int) -> None:
        """One ``mesh.access`` line for this (closed) connection."""
        logs.log_access(
            service,
            port,
            self.host.endpoint.id if self.host is not None else None,
            self.client,
            self.nbytes,
            self.sent,
            time.monotonic() - self.started,
            self.reason or "client_closed",
        )

    # -- introspection -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self._done:
            return "closed"
        if self.up_transport is None:
            return "connecting" if self._dial_task is not None else "closing"
        if self._down_eof and self._up_eof:
            return "closing"
        if self._down_eof:
            return "half-closed(client)"
        if self._up_eof:
            return "half-closed(upstream)"
        return "open"

    def __repr__(self) -> str:
        client = format_hostport(*self.client[:2]) if self.client else "?"
        where = getattr(self.site, "name", "?")
        host = self.host.endpoint.hostport if self.host is not None else "-"
        paused = []
        if self._down_paused:
            paused.append("client-read")
        if self._up_paused:
            paused.append("upstream-read")
        return (
            f"<{type(self).__name__} {where} {client} -> {host} {self.state} in={self.nbytes} "
            f"out={self.sent}{' paused=' + ','.join(paused) if paused else ''}>"
        )
