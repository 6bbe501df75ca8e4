"""The tunnel between agents: how a connection reaches a replica on another node.

The agent that accepted a client connection (the "dialer") picks a replica on
another node, connects to that node's tunnel port and sends, as its very first
bytes, a PROXY protocol v2 header (``tunnel_header()``): the PROXY command, the
client's address as source, the published address as destination, and one TLV of
type ``PP2_TYPE_MESH_TARGET`` (0xE0, in the custom range 0xE0-0xEF) whose value
is the target "<task id>:<target port>" in UTF-8 (the one format, defined and
parsed in ``mesh.proxy.preamble``).  Everything after the header is the client's
byte stream, both ways.

The receiving side is a front of the data plane's one splice
(``mesh.proxy.splice``): an ``Acceptor`` (the same accept loop as published
ports, with its EMFILE handling), a header phase here, then a ``Splice`` that
dials the local replica exactly as the TCP proxy dials an endpoint (connect
deadline, retry on another local replica of the same service, write-buffer
limits, backpressure, half-close, idle timeout, counts at close).

Connection state machine of the receiving side (``TunnelServer``), one per
accepted connection::

    accept ── peer not a cluster node ──────────────────────────▶ refused "peer"
      │
    HEADER ── bytes that cannot start/continue a valid header ──▶ refused (reason)
      │   ── no complete header within header_timeout ─────────▶ refused "timeout"
      │   ── peer closes first ────────────────────────────────▶ refused "incomplete"
      │ complete header
      ├── resolve(target) is None (not a local mesh endpoint) ──▶ refused "unknown_target"
    CONNECTING (the Splice's pre-connect buffer, bounded; reading paused)
      │   ── every local replica tried refuses / times out ────▶ refused "connect"
      │ connected: send PROXY v1/v2 with the ORIGINAL client address if the
      │ service asks for it, then the kept bytes
    SPLICE: bytes both ways, backpressure both ways, half-close passed on,
            idle timeout of the target's service
      │
    CLOSED

A refused connection is aborted (RST) without a byte sent back, so the dialer
sees a reset before any response byte and may retry another replica.

Strict header rules: see ``mesh.proxy.preamble.parse_tunnel_header`` (the whole
header must arrive before anything is forwarded).

``resolve(target)`` returns a ``LocalTarget``.  With ``pool`` and ``host`` set
(the agent's own pool and host for that replica: ``Mesh.local_host``), the
tunnel shares the data plane's state for it: its active count, outlier ejection
and stats, and a refused connect is retried on another *local* host of the same
pool (never on another node: a tunnel does not tunnel again).  With only an
address, that one address is dialled.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, NamedTuple

from mesh.host import Host
from mesh.listener import Acceptor
from mesh.proxy.preamble import (
    MAX_HEADER_BODY,
    PP2_TYPE_MESH_TARGET,
    TUNNEL_ACK,
    TunnelAuth,
    TunnelHeader,
    TunnelRefused,
    host_tunnel_header,
    parse_tunnel_header,
    proxy_header,
    tunnel_header,
)
from mesh.proxy.registry import ConnectionRegistry
from mesh.proxy.splice import _PAUSE_BUFFER, WRITE_HIGH, Splice, reset
from mesh.routing import Endpoint, ServiceOptions, format_hostport
from mesh.stats import RouteStats

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_TUNNEL_PORT",
    "MAX_HEADER_BODY",
    "PP2_TYPE_MESH_TARGET",
    "REFUSE_REASONS",
    "LocalTarget",
    "TunnelAuth",
    "TunnelHeader",
    "TunnelRefused",
    "TunnelServer",
    "TunnelStats",
    "host_tunnel_header",
    "parse_tunnel_header",
    "proxy_header",
    "tunnel_header",
]

log = logging.getLogger(__name__)

DEFAULT_TUNNEL_PORT = 7481
DEFAULT_HEADER_TIMEOUT = 5.0

REFUSE_REASONS = (
    "peer",  # source address is not a cluster node
    "signature",  # not a PROXY v2 header
    "version",  # not version 2 / not the PROXY command
    "family",  # not TCP over IPv4/IPv6
    "length",  # header length out of bounds
    "tlv",  # TLVs do not exactly fill the header, or a duplicate target TLV
    "target",  # target TLV missing or not a valid id
    "timeout",  # header incomplete after header_timeout
    "incomplete",  # peer closed before the header was complete
    "auth",  # the header is not sealed with this cluster's token (TunnelAuth), or badly
    "stale",  # the seal's timestamp is outside the window
    "replay",  # the sealed header was already accepted
    "unknown_target",  # resolve() found no local mesh endpoint for the target
    "overflow",  # too many bytes after the header before the local connect finished
    "connect",  # every local endpoint tried refused / timed out
    "error",  # resolve() raised (a bug; logged)
)


class LocalTarget(NamedTuple):
    """What ``resolve(target)`` returns: where the local replica listens and whether its
    service wants a PROXY header (None, "v1" or "v2").  ``pool``/``host``: the data
    plane's own pool and host for it (``Mesh.local_host``), so the tunnel shares their
    state and may retry on another local host of that pool; None = dial the address."""

    address: str
    port: int
    proxy_protocol: str | None = None
    pool: Any = None
    host: Any = None


class TunnelStats:
    """Plain counters for metrics.  ``refused`` maps a reason in ``REFUSE_REASONS`` to a count."""

    __slots__ = ("accepted", "acked", "active", "bytes_in", "bytes_out", "forwarded", "refused")

    def __init__(self) -> None:
        self.accepted = 0  # TCP connections accepted (before any check)
        self.forwarded = 0  # connections spliced to a local endpoint
        self.acked = 0  # of those, acknowledged to a dialer that asked (PP2_TYPE_MESH_ACK)
        self.active = 0  # open tunnel connections
        self.bytes_in = 0  # dialer -> endpoint, added at close
        self.bytes_out = 0  # endpoint -> dialer, added at close
        self.refused: dict[str, int] = {}

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def __repr__(self) -> str:
        return (
            f"<TunnelStats accepted={self.accepted} forwarded={self.forwarded} active={self.active} "
            f"refused={self.refused}>"
        )


Resolve = Callable[[str], "LocalTarget | Awaitable[LocalTarget | None] | None"]
AllowedPeers = Callable[[str], bool] | Collection[str]


def _peer_ip(peername: object) -> str:
    if not isinstance(peername, tuple) or not peername:
        return ""
    ip = str(peername[0])
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """A refused dialer must see "reset before any response byte", not an orderly close, so that it may
    retry (``mesh.proxy.splice.reset``)."""
    reset(transport)


class _Direct:
    """The pool-shaped stand-in for a target given only as an address: one host, no retry,
    nothing to eject.  Counts go to the server's ``route_stats``."""

    __slots__ = ("options", "stats")

    def __init__(self, options: ServiceOptions, stats: RouteStats) -> None:
        self.options = options
        self.stats = stats

    def choose(self, client: Any = None, exclude: Any = ()) -> None:
        return None

    def report_success(self, host: Host) -> None:
        pass

    def report_failure(self, host: Host) -> None:
        pass


def _least_loaded_local(pool: Any, exclude: Collection[Host]) -> Host | None:
    """The usable local (not tunnelled) host of ``pool`` with the fewest open connections per
    weight, not in ``exclude``: a tunnel retries on this node only, never on another node."""
    best = None
    for h in getattr(pool, "usable", ()):
        if h.via is None and h not in exclude and (best is None or h.active * best.weight < best.active * h.weight):
            best = h
    return best


class TunnelSplice(Splice):
    """The splice of one tunnel connection, towards a local replica.  Retries stay local.
    ``ack``: the dialer asked for ``TUNNEL_ACK``, sent once a local replica is connected."""

    __slots__ = ("ack",)

    def _next_host(self, tried: list[Host]) -> Host | None:
        return _least_loaded_local(self.pool, tried)

    def _upstream_made(self, up: Any, transport: asyncio.Transport) -> None:
        super()._upstream_made(up, transport)
        if self.up is up:
            self.site.stats.forwarded += 1
            if self.ack and not self._down_lost:
                # before any byte of the replica (those arrive in later data_received calls)
                self.transport.write(TUNNEL_ACK)
                self.site.stats.acked += 1

    def _dial_failed(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._buf = None
        if not self._down_lost:
            self.site._refuse(self, "connect", f"no local replica answered ({reason})")


class _HeaderPhase(asyncio.Protocol):
    """A tunnel connection until its header is complete and resolved; then it hands the
    transport to a ``TunnelSplice`` (``transport.set_protocol``)."""

    __slots__ = ("_buf", "_server", "_timer", "done", "header", "peer", "transport")

    def __init__(self, server: TunnelServer, peer: tuple | None) -> None:
        self._server = server
        self.peer = _peer_ip(peer) if peer is not None else ""
        self.transport: asyncio.Transport | None = None
        self.header: TunnelHeader | None = None
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self.done = False  # refused, closed or handed to a splice

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self._server
        srv.stats.accepted += 1
        if not self.peer:
            self.peer = _peer_ip(transport.get_extra_info("peername"))
        if not srv.peer_allowed(self.peer):
            self._refuse("peer", f"{self.peer} is not a cluster node")
            return
        srv.registry.add(self)
        srv.stats.active += 1
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        self._timer = srv.loop.call_at(srv.loop.time() + srv.header_timeout, self._header_timeout)

    def _header_timeout(self) -> None:
        self._timer = None
        if not self.done and self.header is None:
            self._refuse("timeout", f"no complete header within {self._server.header_timeout}s")

    def _refuse(self, reason: str, detail: str) -> None:
        if self.done:
            return
        self._finish()
        self._server._refuse(None, reason, detail, self.peer)
        _reset(self.transport)

    def _finish(self) -> None:
        """Leave the header phase (refused, lost or handed over)."""
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        srv = self._server
        if self in srv.registry:
            srv.registry.remove(self)
            srv.stats.active -= 1

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.header is not None:
            # Waiting for a late resolve with reading paused: what was already in flight.
            self._buf += data
            if len(self._buf) > self._server.max_pending:
                self._refuse("overflow", f"more than {self._server.max_pending} bytes before the endpoint connected")
            return
        self._buf += data
        try:
            res = parse_tunnel_header(self._buf)
        except TunnelRefused as exc:
            self._refuse(exc.reason, str(exc))
            return
        if res is not None:
            self._header_done(*res)

    def _header_done(self, header: TunnelHeader, consumed: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        auth = self._server.auth
        if auth is not None:
            try:
                auth.check(bytes(self._buf[:consumed]), header)
            except TunnelRefused as exc:
                self._refuse(exc.reason, str(exc))
                return
        self.header = header
        del self._buf[:consumed]
        try:
            target = self._server.resolve(header.target)
        except Exception:
            log.exception("tunnel: resolve(%r) failed", header.target)
            self._refuse("error", "resolve raised")
            return
        if inspect.isawaitable(target):
            self.transport.pause_reading()  # type: ignore[union-attr]
            self._server._spawn(self._resolve_later(target))
            return
        self._target(target)

    async def _resolve_later(self, pending: Awaitable[LocalTarget | None]) -> None:
        """``resolve`` may answer later (a task this node is about to list); reading
        stays paused meanwhile, and the peer may go away."""
        assert self.header is not None
        try:
            target = await pending
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("tunnel: resolve(%r) failed", self.header.target)
            self._refuse("error", "resolve raised")
            return
        if not self.done:
            self._target(target)
            if not self.done:
                return
        # handed over (or refused): reading resumes in the splice, if at all

    def _target(self, target: LocalTarget | None) -> None:
        header = self.header
        assert header is not None
        if target is None:
            self._refuse("unknown_target", f"{header.target!r} is not a local mesh endpoint")
            return
        srv = self._server
        splice = srv._splice(target, header)
        if splice is None:
            self._refuse("unknown_target", f"{header.target!r}: no local replica to dial")
            return
        pool, host = splice
        transport = self.transport
        assert transport is not None
        conn = TunnelSplice(srv, header.source)
        conn.ack = header.ack
        conn.local = header.destination
        conn.transport = transport
        conn.pool = pool
        conn.options = pool.options
        srv.registry.add(conn)
        srv.stats.active += 1
        self._finish()
        transport.set_protocol(conn)
        # Reading stays paused until the replica is connected (the splice resumes it then): only
        # what is already in flight is buffered meanwhile.
        conn._pause_down(True, _PAUSE_BUFFER)
        host.active += 1
        conn._start(host, bytes(self._buf))
        self._buf = bytearray()

    def eof_received(self) -> bool:
        if not self.done:
            self._refuse("incomplete", "peer closed before the header was complete")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:  # reset by the peer mid-header (a refusal already finished us)
            self._finish()
            self._server.stats.refuse("incomplete")

    def abort(self, reason: str = "shutdown") -> None:
        if not self.done:
            self._finish()
            _reset(self.transport)

    def __repr__(self) -> str:
        phase = "closed" if self.done else ("resolving" if self.header else "header")
        target = self.header.target if self.header else None
        return f"<TunnelConnection peer={self.peer} {phase} target={target}>"


class TunnelServer:
    """Accepts tunnel connections from other agents and forwards them to local replicas.

    ``resolve(target)`` -> ``LocalTarget`` or None: the local endpoint of a mesh
    service for the target "<task id>:<port>" (None when the task is not local or not
    a mesh endpoint); or an awaitable of one, when the answer needs a moment (reading
    stays paused until it comes; the caller bounds how long).  ``allowed_peers``: a
    predicate on the peer IP, or a collection of IPs (a set may be updated in place, or
    ``allowed_peers`` reassigned, as nodes come and go).  ``header_timeout``: seconds
    for the whole header to arrive.  ``auth``: a ``TunnelAuth`` of the cluster token; every header must
    then be sealed with it (the node-address check alone cannot tell an agent from a container on that
    node, whose traffic leaves masqueraded to the node's address).  ``connect_timeout`` / ``idle_timeout``: for a
    target given as an address only (a target with a pool uses its service's options).
    """

    def __init__(
        self,
        resolve: Resolve,
        allowed_peers: AllowedPeers,
        host: str = "0.0.0.0",
        port: int = DEFAULT_TUNNEL_PORT,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        *,
        connect_timeout: float = 3.0,
        idle_timeout: float = 3600.0,
        max_pending: int = 256 * 1024,
        auth: TunnelAuth | None = None,
    ) -> None:
        if header_timeout <= 0:
            raise ValueError(f"header_timeout must be > 0, got {header_timeout!r}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0, got {connect_timeout!r}")
        self.resolve = resolve
        self.allowed_peers = allowed_peers
        self.host = host
        self.port = port
        self.header_timeout = header_timeout
        self.connect_timeout = connect_timeout
        self.max_pending = max_pending
        self.auth = auth  # cluster mode: every header must be sealed with the cluster token
        self.stats = TunnelStats()
        self.route_stats = RouteStats()  # connect failures of address-only targets
        self.registry = ConnectionRegistry()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.name = "tunnel"
        self._direct_options = ServiceOptions(connect_timeout=connect_timeout, idle_timeout=idle_timeout, retries=0)
        self._acceptor: Acceptor | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def peer_allowed(self, ip: str) -> bool:
        allowed = self.allowed_peers
        if callable(allowed):
            return bool(allowed(ip))
        return ip in allowed

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def connections(self) -> int:
        return len(self.registry)

    @property
    def accept_stats(self) -> Acceptor | None:
        """The accept loop (accepted, fd_exhausted, accept_errors), while listening."""
        return self._acceptor

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what the header phase and the splice ask --------------------------------------------------
    def _splice(self, target: LocalTarget, header: TunnelHeader) -> tuple[Any, Host] | None:
        """The pool and first host for ``target``."""
        if target.pool is not None and target.host is not None:
            host = target.host
            if host.draining or host.health:
                # Chosen by the dialling node a moment before this node learnt of the drain or the
                # failure: another local replica of the service if there is one, else this one (it
                # may still serve during its stop grace period).
                alt = _least_loaded_local(target.pool, (host,))
                if alt is not None:
                    host = alt
            return target.pool, host
        ep = Endpoint(header.target, target.address, target.port)
        options = self._direct_options
        if target.proxy_protocol != options.proxy_protocol:
            options = ServiceOptions(
                connect_timeout=options.connect_timeout,
                idle_timeout=options.idle_timeout,
                retries=0,
                proxy_protocol=target.proxy_protocol,
            )
        return _Direct(options, self.route_stats), Host(ep)

    def _refuse(self, conn: Splice | None, reason: str, detail: str, peer: str = "") -> None:
        self.stats.refuse(reason)
        log.debug("tunnel: refused %s (%s): %s", peer or (conn.client if conn else "?"), reason, detail)
        if conn is not None:
            _reset(conn.transport)

    def tunnel_header(self, host: Host, client: tuple | None, local: tuple | None) -> bytes:
        raise AssertionError("a tunnel never dials another tunnel")  # TunnelSplice._next_host keeps it local

    def resources_exhausted(self, exc: OSError) -> None:
        """A dial towards a local replica ran out of our own descriptors: pause accepting tunnels."""
        if self._acceptor is not None:
            self._acceptor.resources_exhausted(exc)

    def released(self, conn: Splice) -> None:
        st = self.stats
        st.active -= 1
        st.bytes_in += conn.nbytes
        st.bytes_out += conn.sent

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        acceptor = Acceptor(self.host, self.port, self._protocol, name="tunnel", backlog=1024)
        acceptor.start()
        self._acceptor = acceptor
        self.port = acceptor.port
        log.info("tunnel listening on %s", format_hostport(self.host, self.port))

    def _protocol(self, peer: tuple | None) -> _HeaderPhase:
        return _HeaderPhase(self, peer)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; wait up to ``grace`` seconds for open connections, then abort them."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_accepting_done()
            self._acceptor = None
        if len(self.registry) and grace > 0:
            await self.registry.wait_empty(grace)
        self.registry.abort_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.registry.wait_empty(5.0)

    def __repr__(self) -> str:
        return f"<TunnelServer {format_hostport(self.host, self.port)} {self.stats!r}>"
