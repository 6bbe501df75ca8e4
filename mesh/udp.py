"""UDP: a published port's datagrams, relayed per client session (Envoy's udp_proxy, nginx's
``proxy_responses``).  No splice: datagrams have no stream.

State rules (``UdpSite``: the session table both the published port, ``UdpListener``, and the
agents' UDP tunnel, ``cluster.udp_tunnel``, are built on):

- A session per key (a client's (address, port); in the tunnel the sending agent's socket),
  created by its first datagram.  It is bound to one host and owns one *connected* upstream
  datagram socket, so the kernel only delivers that host's replies to it, and the replies go
  back to the client from the published socket (``sendto`` on the listening socket).
- The table is ordered by last activity (a datagram either way moves a session to the end), so
  the oldest idle session is always first: one sweep timer per site ends sessions idle for
  ``udp_idle_timeout`` (at most a quarter of it late, one second at most), and beyond
  ``udp_max_sessions`` the oldest idle session is evicted (``sessions_evicted``).  A session
  holds no queue: memory per session is one socket, one reader registration and a few ints.
- ``udp_responses`` N > 0: once the host has sent N datagrams for each client datagram of the
  session, the session ends (DNS: 1); the client's next datagram starts a new one.
- Choosing: a new session asks the pool (``udp_balance``: by default ``hash`` of the client IP,
  so a client keeps its replica); draining, ejected and unhealthy hosts get no new sessions.
  The first reply of a session is a success for outlier detection; ECONNREFUSED on the
  connected socket (the replica's ICMP port unreachable) is a failure: it is counted, reported
  to the pool (which may eject the host) and the session moves to another host (or ends).  A
  session whose host leaves the table moves at once (checked on every pool change); one whose
  host drains keeps it, as an open TCP connection would.
- Datagrams are dropped, never queued, when they cannot go on at once; each drop is counted by
  reason (``UdpStats.dropped``): no_endpoint, upstream_busy / client_busy (socket buffer full),
  local_resources (no descriptor for a new session), resolving (an endpoint named by a DNS
  name, resolved once in the background), send_error; the tunnel adds peer, malformed,
  unknown_target.
- Towards a host with ``via`` (a replica on another node) each datagram carries the UDP tunnel
  header (below) naming the client and the target; towards a local replica of a service with
  ``proxy_protocol`` each datagram starts with a PROXY v2 header (transport DGRAM: v1 has no
  UDP, so ``v1`` sends v2 too) naming the client.
- ``close()`` ends every session at once: replies must come from the published socket, which
  is gone.

The UDP tunnel header (version 1), in front of every datagram from one agent to another::

    0      2 bytes  magic "MU" (0x4d 0x55)
    2      1 byte   version, 1
    3      1 byte   family of the client address: 4 or 6
    4      4 | 16   client IP address (network order)
    8|20   2 bytes  client port (network order)
    10|22  1 byte   N, length of the target, 1..255
    11|23  N bytes  target: "<endpoint id>:<target port>" (mesh.proxy.preamble.endpoint_target),
                    printable UTF-8
    ...             the client's datagram, unchanged

Replies come back without a header: the sending agent's socket is connected and serves one
client.  The receiver checks every datagram (it keeps no state a lost datagram could break).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mesh.listener import bind_socket
from mesh.proxy.preamble import endpoint_target
from mesh.proxy.registry import ConnectionRegistry
from mesh.proxyproto import encode_v2
from mesh.routing import format_hostport

if TYPE_CHECKING:
    from mesh.host import Host
    from mesh.listener import Binding
    from mesh.pool import Pool

__all__ = [
    "DROP_REASONS",
    "MAX_DATAGRAM",
    "TUNNEL_MAGIC",
    "TUNNEL_MAGIC_SEALED",
    "Session",
    "UdpHostStats",
    "UdpListener",
    "UdpSite",
    "UdpStats",
    "bind_udp",
    "dgram_proxy_header",
    "parse_tunnel_datagram",
    "udp_tunnel_header",
]

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
BATCH = 64  # datagrams per readiness callback, so one busy socket cannot starve the loop
SWEEP_MAX = 1.0  # the sweep runs every quarter of the idle timeout, at least once a second
SWEEP_MIN = 0.02
TUNNEL_MAGIC = b"MU\x01"  # version 1: unsealed
TUNNEL_MAGIC_SEALED = b"MU\x02"  # version 2: the same fields, then a timestamp (8) and an HMAC (32)
_INF = float("inf")
RESEAL_AFTER = 10.0  # seconds a sender uses one sealed header (well inside TunnelAuth's 30 s window)
DROP_REASONS = ("no_endpoint", "upstream_busy", "client_busy", "local_resources", "resolving", "send_error")
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class UdpStats:
    """Per site (a published udp port, or the tunnel): sessions and drops.  Plain ints."""

    __slots__ = ("dropped", "sessions_created", "sessions_ended", "sessions_evicted", "sessions_moved")

    def __init__(self, reasons: tuple[str, ...] = DROP_REASONS) -> None:
        self.sessions_created = 0
        self.sessions_evicted = 0  # beyond udp_max_sessions: the oldest idle one
        self.sessions_moved = 0  # their host refused or left the table
        # why sessions ended: idle, responses, evicted, refused, removed, closed, error
        self.sessions_ended: dict[str, int] = {}
        self.dropped: dict[str, int] = dict.fromkeys(reasons, 0)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def __repr__(self) -> str:
        return f"<UdpStats created={self.sessions_created} evicted={self.sessions_evicted} dropped={self.dropped}>"


class UdpHostStats:
    """Per host of a udp route: datagrams and bytes each way (of ended sessions; live sessions are
    added at snapshot time), sessions, refusals."""

    __slots__ = ("bytes_in", "bytes_out", "datagrams_in", "datagrams_out", "refused", "sessions")

    def __init__(self) -> None:
        self.datagrams_in = 0  # client -> endpoint
        self.datagrams_out = 0  # endpoint -> client
        self.bytes_in = 0
        self.bytes_out = 0
        self.sessions = 0
        self.refused = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


def udp_tunnel_header(client: tuple, target: str, auth: Any = None) -> bytes:
    """The UDP tunnel header (module docstring) naming ``client`` (ip, port, ...) and ``target``; sealed
    (version 2) with ``auth`` (a ``mesh.proxy.preamble.TunnelAuth`` of the cluster token)."""
    ip = ipaddress.ip_address(str(client[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    raw = target.encode("utf-8")
    if not 0 < len(raw) <= 255:
        raise ValueError(f"tunnel target must be 1..255 bytes, got {len(raw)}")
    fam = 4 if ip.version == 4 else 6
    fields = bytes([fam]) + ip.packed + struct.pack("!HB", int(client[1]), len(raw)) + raw
    if auth is None:
        return TUNNEL_MAGIC + fields
    return auth.seal_datagram_header(TUNNEL_MAGIC_SEALED + fields)


def parse_tunnel_datagram(data: bytes) -> tuple[tuple[str, int], str, int]:
    """(client, target, header length) of a tunnel datagram, version 1 or 2 (for 2 the length includes the
    timestamp and the MAC: check them with ``TunnelAuth.check_datagram_header(data[:n])``).  Raises
    ValueError naming what is wrong."""
    sealed = data[:3] == TUNNEL_MAGIC_SEALED
    if data[:3] != TUNNEL_MAGIC and not sealed:
        raise ValueError("not a mesh UDP tunnel datagram (magic/version)")
    if len(data) < 4 or data[3] not in (4, 6):
        raise ValueError("bad address family")
    alen = 4 if data[3] == 4 else 16
    p = 4 + alen
    if len(data) < p + 3:
        raise ValueError("truncated header")
    ip = socket.inet_ntop(socket.AF_INET if alen == 4 else socket.AF_INET6, data[4:p])
    port, n = struct.unpack_from("!HB", data, p)
    p += 3
    if n == 0 or len(data) < p + n:
        raise ValueError("bad target length")
    try:
        target = data[p : p + n].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("target is not UTF-8") from None
    if not target.isprintable():
        raise ValueError("target is not printable")
    n = p + n
    if sealed:
        if len(data) < n + 40:
            raise ValueError("truncated seal")
        n += 40
    return (ip, port), target, n


def dgram_proxy_header(client: tuple | None, local: tuple | None) -> bytes:
    """A PROXY v2 header for a datagram from ``client`` to ``local`` (transport DGRAM)."""
    header = bytearray(encode_v2(client, local))
    if header[13] & 0xF0:  # a known family: transport STREAM (1) -> DGRAM (2)
        header[13] = (header[13] & 0xF0) | 0x2
    return bytes(header)


def bind_udp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port); "::" is dual-stack.  OSError names the address."""
    return bind_socket(host, port, reuse_port=reuse_port, udp=True)


class Session:
    """One client's flow through a site: its host, its connected socket, its counters."""

    __slots__ = (
        "b_in", "b_out", "client", "dg_in", "dg_out", "host", "idle", "key", "last", "pool", "prefix",
        "replies", "reply_to", "requests", "reseal_at", "sock", "started", "tag",
    )  # fmt: skip

    def __init__(self, key: Any, client: tuple, reply_to: tuple, pool: Pool, now: float) -> None:
        self.key = key
        self.client = client
        self.reply_to = reply_to
        self.pool = pool
        self.host: Host = None  # type: ignore[assignment]
        self.sock: socket.socket = None  # type: ignore[assignment]
        self.prefix = b""  # what each datagram towards the host starts with (tunnel or PROXY header)
        self.reseal_at = _INF  # when a sealed tunnel prefix is made again (RESEAL_AFTER)
        self.tag = b""  # the tunnel: the header each datagram from the sending agent starts with
        self.idle = pool.options.udp_idle_timeout
        self.started = self.last = now
        self.requests = self.replies = 0
        self.dg_in = self.dg_out = self.b_in = self.b_out = 0

    def __repr__(self) -> str:
        host = self.host.endpoint.id if self.host is not None else "-"
        return (
            f"<Session {self.client} -> {host} in={self.dg_in}/{self.b_in}B out={self.dg_out}/{self.b_out}B "
            f"requests={self.requests} replies={self.replies}>"
        )


class UdpSite:
    """A bound UDP socket and its session table (module docstring).  Subclasses decide what a
    datagram means (``_datagram``) and which host a session gets."""

    #: True when every session has the same idle timeout (the sweep may stop at the first live one).
    uniform_idle = True

    def __init__(self, host: str, port: int, *, reuse_port: bool = False, name: str = "", drops=DROP_REASONS) -> None:
        self.host = host
        self._port = port
        self.reuse_port = reuse_port
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: OrderedDict[Any, Session] = OrderedDict()
        self.stats = UdpStats(drops)
        self.host_stats: dict[Host, UdpHostStats] = {}
        self.fd_exhausted = 0
        self.datagrams = 0  # datagrams read from the socket
        self._sock: socket.socket | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._resolved: dict[tuple[str, int], tuple[int, tuple]] = {}
        self._resolving: set[tuple[str, int]] = set()
        self._closed = False

    # -- what the runtime, metrics and admin read ------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def sockname(self) -> tuple | None:
        return self._sock.getsockname() if self._sock is not None else None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    @property
    def listen_socket(self) -> socket.socket | None:
        """The bound socket (what a handover passes on), or None."""
        return self._sock

    @property
    def accepted(self) -> int:
        return self.stats.sessions_created

    async def wait_accepting_done(self) -> None:
        return None

    def start(self) -> None:
        """Bind and start reading (on the running loop).  Raises OSError when the port cannot be bound."""
        if self._sock is not None or self._closed:
            raise RuntimeError(f"{self!r} already started or closed")
        self.loop = loop = asyncio.get_running_loop()
        self._sock = bind_udp(self.host, self._port, reuse_port=self.reuse_port)
        if self._port == 0:
            self._port = self._sock.getsockname()[1]
        loop.add_reader(self._sock.fileno(), self._on_readable)
        self._arm_sweep()

    def close(self) -> None:
        """Stop now: every session ends (replies could no longer leave from this socket)."""
        if self._closed:
            return
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for s in list(self.sessions.values()):
            self._end(s, "closed")
        if self._sock is not None:
            if self.loop is not None:
                self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    # -- the hot path ------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        now = self.loop.time()  # type: ignore[union-attr]
        for _ in range(BATCH):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # an unconnected socket may report an ICMP error of an earlier sendto: nothing to undo
                continue
            self.datagrams += 1
            self._datagram(addr, data, now)

    def _datagram(self, addr: tuple, data: bytes, now: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, s: Session, payload: bytes, now: float) -> None:
        """A datagram of the client's: on to the session's host."""
        s.last = now
        s.requests += 1
        self.sessions.move_to_end(s.key)
        if now >= s.reseal_at:
            s.prefix = self._prefix(s.host, s.client)
            s.reseal_at = now + RESEAL_AFTER
        try:
            s.sock.send(s.prefix + payload if s.prefix else payload)
        except (BlockingIOError, InterruptedError):
            self.stats.drop("upstream_busy")
            return
        except ConnectionRefusedError:
            self._refused(s)
            return
        except OSError:
            self.stats.drop("send_error")
            return
        s.dg_in += 1
        s.b_in += len(payload)

    def _on_upstream(self, s: Session) -> None:
        """The session's socket is readable: replies of its host, back to the client."""
        sock = s.sock
        out = self._sock
        if out is None or sock is None:
            return
        responses = s.pool.options.udp_responses
        got = False
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self._refused(s)
                return
            except OSError:
                self._end(s, "error")
                return
            if not s.replies and not s.dg_out:
                s.pool.report_success(s.host)
            got = True
            s.replies += 1
            try:
                out.sendto(data, s.reply_to)
            except (BlockingIOError, InterruptedError):
                self.stats.drop("client_busy")
                continue
            except OSError:
                self.stats.drop("send_error")
                continue
            s.dg_out += 1
            s.b_out += len(data)
            if responses and s.replies >= responses * s.requests:
                self._end(s, "responses")
                return
        if got:
            s.last = self.loop.time()  # type: ignore[union-attr]
            self.sessions.move_to_end(s.key)

    # -- sessions ------------------------------------------------------------------------------------
    def _make_room(self, cap: int) -> None:
        while len(self.sessions) >= cap:
            _, oldest = next(iter(self.sessions.items()))
            self.stats.sessions_evicted += 1
            self._end(oldest, "evicted")

    def _open(self, s: Session, host: Host, prefix: bytes) -> bool:
        """Connect a socket of ``s`` to ``host`` (where its datagrams go: ``host.dial``)."""
        target = self._sockaddr(host.dial)
        if target is None:
            return False
        family, sockaddr = target
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                self.fd_exhausted += 1
            self.stats.drop("local_resources")
            return False
        try:
            sock.setblocking(False)
            sock.connect(sockaddr)
        except OSError:
            sock.close()
            self.stats.drop("send_error")
            return False
        s.sock = sock
        s.host = host
        s.prefix = prefix
        sealed = host.via is not None and getattr(self, "auth", None) is not None
        s.reseal_at = s.last + RESEAL_AFTER if sealed else _INF
        host.active += 1
        host.stats.connections += 1
        self.loop.add_reader(sock.fileno(), self._on_upstream, s)  # type: ignore[union-attr]
        return True

    def _sockaddr(self, dial: tuple[str, int]) -> tuple[int, tuple] | None:
        hit = self._resolved.get(dial)
        if hit is not None:
            return hit
        try:
            info = socket.getaddrinfo(dial[0], dial[1], type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            self._resolve_later(dial)
            self.stats.drop("resolving")
            return None
        hit = self._resolved[dial] = (info[0][0], info[0][4])
        return hit

    def _resolve_later(self, dial: tuple[str, int]) -> None:
        if dial in self._resolving or self.loop is None:
            return
        self._resolving.add(dial)

        async def resolve() -> None:
            try:
                info = await self.loop.getaddrinfo(dial[0], dial[1], type=socket.SOCK_DGRAM)  # type: ignore[union-attr]
                self._resolved[dial] = (info[0][0], info[0][4])
            except OSError as exc:
                log.warning("udp %s: cannot resolve endpoint %s: %s", self.name, format_hostport(*dial), exc)
            finally:
                self._resolving.discard(dial)

        self.loop.create_task(resolve())

    def _release(self, s: Session) -> None:
        """Give back the session's socket and fold its counters into its host."""
        host, sock = s.host, s.sock
        if sock is not None:
            if self.loop is not None:
                self.loop.remove_reader(sock.fileno())
            sock.close()
            s.sock = None  # type: ignore[assignment]
        if host is not None:
            host.active -= 1
            hs = self._host_stats(host)
            hs.sessions += 1
            hs.datagrams_in += s.dg_in
            hs.datagrams_out += s.dg_out
            hs.bytes_in += s.b_in
            hs.bytes_out += s.b_out
            st = host.stats
            st.bytes_in += s.b_in
            st.bytes_out += s.b_out
            if self.loop is not None:
                st.duration.observe(self.loop.time() - s.started)
            s.dg_in = s.dg_out = s.b_in = s.b_out = 0
            s.requests = s.replies = 0

    def _end(self, s: Session, why: str) -> None:
        if self.sessions.get(s.key) is s:
            del self.sessions[s.key]
        self._release(s)
        ended = self.stats.sessions_ended
        ended[why] = ended.get(why, 0) + 1

    def _host_stats(self, host: Host) -> UdpHostStats:
        hs = self.host_stats.get(host)
        if hs is None:
            hs = self.host_stats[host] = UdpHostStats()
        return hs

    def _refused(self, s: Session) -> None:
        """ECONNREFUSED on the session's socket: the host sent ICMP port unreachable."""
        host = s.host
        self._host_stats(host).refused += 1
        s.pool.stats.connect_failed("refused")
        s.pool.report_failure(host)
        self._move(s, "refused", exclude=(host,))

    def _move(self, s: Session, why: str, exclude: tuple = ()) -> None:
        """Rebind ``s`` to another host (``_rechoose``), or end it."""
        self._release(s)
        nxt = self._rechoose(s, exclude)
        if nxt is not None and self.sessions.get(s.key) is s and self._open(s, *nxt):
            self.stats.sessions_moved += 1
            return
        self._end(s, why)

    def _rechoose(self, s: Session, exclude: tuple) -> tuple[Host, bytes] | None:
        return None

    def live(self, host: Host) -> tuple[int, int, int, int, int]:
        """(sessions, datagrams in, datagrams out, bytes in, bytes out) of the open sessions on ``host``."""
        n = di = do = bi = bo = 0
        for s in self.sessions.values():
            if s.host is host:
                n += 1
                di += s.dg_in
                do += s.dg_out
                bi += s.b_in
                bo += s.b_out
        return n, di, do, bi, bo

    # -- the sweep ----------------------------------------------------------------------------------
    def _sweep_interval(self) -> float:
        return SWEEP_MAX

    def _arm_sweep(self) -> None:
        loop = self.loop
        self._sweep = loop.call_at(loop.time() + self._sweep_interval(), self._run_sweep)  # type: ignore[union-attr]

    def _run_sweep(self) -> None:
        self._sweep = None
        if self._closed:
            return
        now = self.loop.time()  # type: ignore[union-attr]
        expired = []
        for s in self.sessions.values():
            if now - s.last >= s.idle:
                expired.append(s)
            elif self.uniform_idle:
                break  # ordered by last activity: the rest are younger
        for s in expired:
            self._end(s, "idle")
        self._arm_sweep()


class UdpListener(UdpSite):
    """One published udp (host, port) and its route: what the runtime creates for protocol "udp".

    The same surface the runtime, metrics and admin read from a ``mesh.listener.Listener``:
    host, port, protocol, bindings/pool/service, start/close, listening, sockname, accepted,
    fd_exhausted, registry, wait_accepting_done.
    """

    protocol = "udp"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        bindings: tuple[Binding, ...],
        registry: ConnectionRegistry | None = None,
        reuse_port: bool = False,
        tunnel_header: Callable | None = None,
        access_log: bool = False,
        auth: Any = None,
    ) -> None:
        super().__init__(host, port, reuse_port=reuse_port)
        self.auth = auth  # seals the UDP tunnel header towards other nodes (cluster mode)
        self.registry = registry if registry is not None else ConnectionRegistry()
        self.access_log = access_log
        self.bindings: tuple[Binding, ...] = ()
        self.pool: Pool = None  # type: ignore[assignment]
        self.service = ""
        self._hooked: set[int] = set()
        self.removed_stats = UdpHostStats()  # datagram counters of hosts that left the table
        self.set_bindings(bindings)

    def set_bindings(self, bindings: tuple[Binding, ...]) -> None:
        """Serve this route from now on; a session whose host left the table moves at once."""
        if len(bindings) != 1:
            raise ValueError("a udp listener serves exactly one route")
        self.bindings = tuple(bindings)
        self.pool = pool = bindings[0].pool
        self.service = bindings[0].service
        self.name = f"{self.service}:{self._port}"
        if id(pool) not in self._hooked:
            self._hooked.add(id(pool))
            pool.on_change.append(self._pool_changed)
        self._pool_changed(pool)

    def _pool_changed(self, pool: Pool) -> None:
        if pool is not self.pool:
            return
        current = set(pool.hosts)
        for s in [s for s in self.sessions.values() if s.host is not None and s.host not in current]:
            self._move(s, "removed", exclude=(s.host,))
        # per-host counters of hosts that are gone and idle: folded into the route's "_removed" by the
        # metrics reader through HostStats; the datagram counts of such hosts go to one bucket here
        for host in [h for h in self.host_stats if h not in current and h.active == 0]:
            gone = self.host_stats.pop(host)
            acc = self.removed_stats
            for k in UdpHostStats.__slots__:
                setattr(acc, k, getattr(acc, k) + getattr(gone, k))

    def _sweep_interval(self) -> float:
        return min(SWEEP_MAX, max(SWEEP_MIN, self.pool.options.udp_idle_timeout / 4))

    def _datagram(self, addr: tuple, data: bytes, now: float) -> None:
        s = self.sessions.get(addr)
        if s is None:
            s = self._new_session(addr, now)
            if s is None:
                return
        self._forward(s, data, now)

    def _new_session(self, addr: tuple, now: float) -> Session | None:
        pool = self.pool
        stats = pool.stats
        stats.accepted += 1
        host = pool.choose(addr)
        if host is None:
            stats.no_endpoint += 1
            self.stats.drop("no_endpoint")
            return None
        self._make_room(pool.options.udp_max_sessions)
        s = Session(addr, addr, addr, pool, now)
        if not self._open(s, host, self._prefix(host, addr)):
            return None
        self.sessions[addr] = s
        self.stats.sessions_created += 1
        return s

    def _prefix(self, host: Host, client: tuple) -> bytes:
        if host.via is not None:
            return udp_tunnel_header(client, endpoint_target(host.endpoint), self.auth)
        if self.pool.options.proxy_protocol is not None:
            return dgram_proxy_header(client, self.sockname)
        return b""

    def _rechoose(self, s: Session, exclude: tuple) -> tuple[Host, bytes] | None:
        host = self.pool.choose(s.client, exclude)
        if host is None:
            return None
        return host, self._prefix(host, s.client)

    def __repr__(self) -> str:
        state = "listening" if self.listening else "closed"
        return (
            f"<UdpListener {self.service} {format_hostport(self.host, self.port)} {state} "
            f"sessions={len(self.sessions)} created={self.stats.sessions_created} pool={self.pool!r}>"
        )
