"""The tunnel between agents: how a connection reaches a replica on another node.

The agent that accepted a client connection (the "dialer") picks a replica on
another node, connects to that node's tunnel port and sends, as its very first
bytes, a PROXY protocol v2 header (``tunnel_header()``): the PROXY command, the
client's address as source, the published address as destination, and one TLV of
type ``PP2_TYPE_MESH_TARGET`` (0xE0, in the custom range 0xE0-0xEF) whose value
is the target task id in UTF-8.  Everything after the header is the client's
byte stream, both ways.

Connection state machine of the receiving side (``TunnelServer``), one per
accepted connection::

    accept ── peer not a cluster node ──────────────────────────▶ refused "peer"
      │
    HEADER ── bytes that cannot start/continue a valid header ──▶ refused (reason)
      │   ── no complete header within header_timeout ─────────▶ refused "timeout"
      │   ── peer closes first ────────────────────────────────▶ refused "incomplete"
      │ complete header
      ├── resolve(target) is None (not a local mesh endpoint) ──▶ refused "unknown_target"
    CONNECTING (reading paused; bytes after the header kept, bounded)
      │   ── connect to the local endpoint fails / times out ──▶ refused "connect"
      │ connected: send PROXY v1/v2 with the ORIGINAL client address if the
      │ service asks for it, then the kept bytes
    SPLICE: bytes both ways, backpressure both ways, half-close passed on
      │
    CLOSED

A refused connection is aborted (RST) without a byte sent back, so the dialer
sees a reset before any response byte and may retry another replica.

Strict header rules (the whole header must arrive before anything is forwarded):
the 12-byte signature is checked on every byte as it arrives; version must be 2
and the command PROXY; the family TCP over IPv4 or IPv6; the length at least the
address block and at most ``MAX_HEADER_BODY``; the TLVs must exactly fill the
rest, each within bounds; exactly one target TLV, 1-255 bytes of UTF-8 without
control characters.  Other TLV types are ignored, as the PROXY spec requires.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, NamedTuple

from mesh import proxyproto
from mesh.errors import ProtocolError
from mesh.proxyproto import PP2_TYPE_MESH_TARGET, V2_SIGNATURE
from mesh.routing import format_hostport

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_TUNNEL_PORT",
    "MAX_HEADER_BODY",
    "PP2_TYPE_MESH_TARGET",
    "REFUSE_REASONS",
    "LocalTarget",
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
MAX_TARGET_LENGTH = 255
# Address block (36 bytes for IPv6) + one target TLV (3 + 255) + room for a few
# small TLVs a future dialer might add (e.g. a CRC32C or unique id).
MAX_HEADER_BODY = 512
# Bytes a dialer may send after the header before the local connect finishes
# (reading is paused at once, so only what was already in flight arrives).
MAX_PENDING = 256 * 1024

_V2_PROXY = 0x21  # version 2, command PROXY
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
_ADDR_LEN = {_FAM_TCP4: 12, _FAM_TCP6: 36}

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
    "unknown_target",  # resolve() found no local mesh endpoint for the target
    "overflow",  # too many bytes after the header before the local connect finished
    "connect",  # the local endpoint refused / timed out
    "error",  # resolve() raised (a bug; logged)
)


class TunnelRefused(ProtocolError):
    """A tunnel connection is refused; ``reason`` is one of ``REFUSE_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LocalTarget(NamedTuple):
    """What ``resolve(target_id)`` returns: where the local replica listens and
    whether its service wants a PROXY header (None, "v1" or "v2")."""

    address: str
    port: int
    proxy_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class TunnelHeader:
    source: tuple[str, int]  # the original client
    destination: tuple[str, int]  # the published address the client connected to
    target: str  # task id of the replica


# ---------------------------------------------------------------------------------------------
# Encoding (pure; the bytes come from mesh.proxyproto)


def tunnel_header(client_addr: tuple[str, int], dst_addr: tuple[str, int], target_id: str) -> bytes:
    """The bytes a dialer sends first on a tunnel connection.

    ``client_addr``: the original client (ip, port); ``dst_addr``: the address the
    client connected to; ``target_id``: the task id of the chosen replica.
    Raises ``ValueError`` naming the bad argument.
    """
    target = target_id.encode("utf-8")
    if not 0 < len(target) <= MAX_TARGET_LENGTH or not target_id.isprintable():
        raise ValueError(f"tunnel target id must be 1-{MAX_TARGET_LENGTH} printable UTF-8 bytes, got {target_id!r}")
    for what, addr in (("client_addr", client_addr), ("dst_addr", dst_addr)):
        try:
            ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
            ok = 0 <= int(addr[1]) < 65536
        except (ValueError, TypeError, IndexError):
            ok = False
        if not ok:
            raise ValueError(f"tunnel header {what} must be (ip, port 0-65535), got {addr!r}")
    return proxyproto.encode_v2(client_addr, dst_addr, ((PP2_TYPE_MESH_TARGET, target),))


def host_tunnel_header(host: Any, client: tuple | None, local: tuple | None) -> bytes:
    """``tunnel_header`` in the shape ``mesh.proxy`` calls for a host with ``via`` set
    (``Listener(tunnel_header=...)`` / ``Mesh(tunnel_header=...)``): the target is
    "<endpoint id>:<endpoint port>" (task id and target port: one task may publish
    several ports), which is what the receiving agent resolves.  Duck-typed on
    ``host.endpoint`` so that this package does not import the data plane."""
    if client is None or local is None:
        raise ValueError(f"tunnel header for {host!r} needs the client and local addresses, got {client!r}, {local!r}")
    ep = host.endpoint
    return tunnel_header(client, local, f"{ep.id}:{ep.port}")


def proxy_header(version: str, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """PROXY header ``version`` ("v1" or "v2") for a replica: the client's address as
    source.  No TLVs: the mesh's own target TLV never leaks to applications."""
    return proxyproto.encode(version, src, dst)


# ---------------------------------------------------------------------------------------------
# Decoding (pure, incremental)


def parse_tunnel_header(buf: bytes | bytearray) -> tuple[TunnelHeader, int] | None:
    """Parse a tunnel header from the start of ``buf``.

    Returns (header, bytes consumed) when complete, None when more bytes are needed
    (every byte seen so far is valid), and raises ``TunnelRefused`` as soon as the
    bytes cannot be a valid tunnel header.  The fixed 16 bytes are checked here
    (so that each refusal has a precise reason and only what a tunnel accepts
    passes: v2, PROXY, TCP4/TCP6); ``mesh.proxyproto.decode`` does the rest.
    """
    n = len(buf)
    head = bytes(buf[:12])
    if head != V2_SIGNATURE[: len(head)]:
        raise TunnelRefused("signature", "not a PROXY v2 signature")
    if n > 12 and buf[12] != _V2_PROXY:
        raise TunnelRefused("version", f"version/command byte {buf[12]:#04x}, expected 0x21 (v2 PROXY)")
    if n > 13 and buf[13] not in _ADDR_LEN:
        raise TunnelRefused("family", f"family byte {buf[13]:#04x}, expected TCP4 0x11 or TCP6 0x21")
    if n < 16:
        return None
    addr_len = _ADDR_LEN[buf[13]]
    (length,) = struct.unpack_from("!H", buf, 14)
    if not addr_len < length <= MAX_HEADER_BODY:
        raise TunnelRefused("length", f"header length {length} outside {addr_len + 1}..{MAX_HEADER_BODY}")
    if n < 16 + length:
        return None
    try:
        res = proxyproto.decode(buf)
    except ProtocolError as exc:
        # The fixed part is valid, so what is left to break is the TLV area.
        raise TunnelRefused("tlv", str(exc)) from exc
    assert res is not None and res[0].src is not None and res[0].dst is not None
    header, consumed = res
    targets = [v for t, v in header.tlvs if t == PP2_TYPE_MESH_TARGET]
    if not targets:
        raise TunnelRefused("target", f"no target TLV (type {PP2_TYPE_MESH_TARGET:#04x})")
    if len(targets) > 1:
        raise TunnelRefused("tlv", "more than one target TLV")
    return TunnelHeader(header.src, header.dst, _decode_target(targets[0])), consumed


def _decode_target(raw: bytes) -> str:
    if not 0 < len(raw) <= MAX_TARGET_LENGTH:
        raise TunnelRefused("target", f"target id of {len(raw)} bytes, expected 1-{MAX_TARGET_LENGTH}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TunnelRefused("target", "target id is not UTF-8") from exc
    if not text.isprintable():
        raise TunnelRefused("target", "target id has control characters")
    return text


# ---------------------------------------------------------------------------------------------
# Server


class TunnelStats:
    """Plain counters for metrics.  ``refused`` maps a reason in ``REFUSE_REASONS`` to a count."""

    __slots__ = ("accepted", "active", "bytes_in", "bytes_out", "forwarded", "refused")

    def __init__(self) -> None:
        self.accepted = 0  # TCP connections accepted (before any check)
        self.forwarded = 0  # connections spliced to a local endpoint
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

_HEADER, _CONNECTING, _SPLICE, _CLOSED = range(4)


def _peer_ip(peername: object) -> str:
    if not isinstance(peername, tuple) or not peername:
        return ""
    ip = str(peername[0])
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


_LINGER_ZERO = struct.pack("ii", 1, 0)


def _linger_zero(transport: asyncio.BaseTransport | None) -> None:
    """Make the coming close a reset (RST) even when every byte was read: a refused
    dialer must see "reset before any response byte", not an orderly close."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass


class _Downstream(asyncio.Protocol):
    """The tunnel connection from the dialing agent."""

    __slots__ = (
        "_buf",
        "_eof",
        "_paused",
        "_pending",
        "_server",
        "_timer",
        "header",
        "nbytes_in",
        "peer",
        "phase",
        "transport",
        "upstream",
    )

    def __init__(self, server: TunnelServer) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.phase = _HEADER
        self.peer = ""
        self.header: TunnelHeader | None = None
        self._buf = bytearray()
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False  # our reading paused because upstream's buffer is full
        self._eof = False
        self.nbytes_in = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        srv = self._server
        srv.stats.accepted += 1
        self.peer = _peer_ip(transport.get_extra_info("peername"))
        if not srv.peer_allowed(self.peer):
            self._refuse("peer", f"{self.peer} is not a cluster node")
            return
        srv._conns.add(self)
        srv.stats.active += 1
        _nodelay(transport)
        self._timer = asyncio.get_running_loop().call_later(srv.header_timeout, self._header_timeout)

    def _header_timeout(self) -> None:
        self._timer = None
        if self.phase == _HEADER:
            self._refuse("timeout", f"no complete header within {self._server.header_timeout}s")

    def _refuse(self, reason: str, detail: str) -> None:
        srv = self._server
        srv.stats.refuse(reason)
        log.debug("tunnel: refused %s (%s): %s", self.peer or "?", reason, detail)
        _linger_zero(self.transport)
        self._close(abort=True)

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == _SPLICE:
            self.nbytes_in += len(data)
            self.upstream.transport.write(data)  # type: ignore[union-attr]
            return
        if phase == _HEADER:
            self._buf += data
            try:
                res = parse_tunnel_header(self._buf)
            except TunnelRefused as exc:
                self._refuse(exc.reason, str(exc))
                return
            if res is not None:
                self._header_done(*res)
            return
        if phase == _CONNECTING:
            # Reading was paused; this is what was already in flight (uvloop may deliver a little more).
            self._pending.append(data)
            if sum(map(len, self._pending)) > MAX_PENDING:
                self._refuse("overflow", f"more than {MAX_PENDING} bytes before the endpoint connected")

    def _header_done(self, header: TunnelHeader, consumed: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.header = header
        rest = bytes(self._buf[consumed:])
        self._buf = bytearray()
        try:
            target = self._server.resolve(header.target)
        except Exception:
            log.exception("tunnel: resolve(%r) failed", header.target)
            self._refuse("error", "resolve raised")
            return
        if target is None:
            self._refuse("unknown_target", f"{header.target!r} is not a local mesh endpoint")
            return
        self.phase = _CONNECTING
        if rest:
            self._pending.append(rest)
        self.transport.pause_reading()  # type: ignore[union-attr]
        if inspect.isawaitable(target):
            self._server._spawn(self._resolve_later(target))
        else:
            self._server._spawn(self._connect(target))

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
            if self.phase == _CONNECTING:
                self._refuse("error", "resolve raised")
            return
        if self.phase != _CONNECTING:
            return
        if target is None:
            self._refuse("unknown_target", f"{self.header.target!r} is not a local mesh endpoint")
            return
        await self._connect(target)

    async def _connect(self, target: LocalTarget) -> None:
        srv = self._server
        loop = asyncio.get_running_loop()
        up = _Upstream(self)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: up, target.address, target.port), srv.connect_timeout)
        except (OSError, TimeoutError) as exc:
            if self.phase == _CONNECTING:
                self._refuse("connect", f"{format_hostport(target.address, target.port)}: {exc!r}")
            return
        if self.phase != _CONNECTING:  # the dialer went away meanwhile
            up.transport.close()  # type: ignore[union-attr]
            return
        assert self.header is not None
        self.upstream = up
        self.phase = _SPLICE
        srv.stats.forwarded += 1
        if target.proxy_protocol:
            up.transport.write(proxy_header(target.proxy_protocol, self.header.source, self.header.destination))  # type: ignore[union-attr]
        for chunk in self._pending:
            self.nbytes_in += len(chunk)
            up.transport.write(chunk)  # type: ignore[union-attr]
        self._pending = []
        if up._eof and self.transport.can_write_eof():  # type: ignore[union-attr]
            # The endpoint closed its side while we were still connecting.
            self.transport.write_eof()  # type: ignore[union-attr]
        if self._eof:
            up.transport.write_eof()  # type: ignore[union-attr]
            if up._eof:
                self._close()
        elif not self._paused:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if self.phase == _HEADER:
            self._refuse("incomplete", "peer closed before the header was complete")
            return False
        self._eof = True
        if self.phase == _SPLICE:
            up = self.upstream.transport  # type: ignore[union-attr]
            if up.can_write_eof():
                up.write_eof()
            if self.upstream._eof:  # type: ignore[union-attr]
                self._close()
        return True  # keep the write side open: the endpoint may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == _HEADER:  # reset by the peer mid-header (a refusal already moved us to CLOSED)
            self._server.stats.refuse("incomplete")
        self._close()

    # Flow control: the dialer cannot take more, so stop reading from the endpoint.
    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream._eof:
            self.upstream.transport.resume_reading()  # type: ignore[union-attr]

    def _close(self, abort: bool = False) -> None:
        if self.phase == _CLOSED:
            return
        self.phase = _CLOSED
        srv = self._server
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self in srv._conns:
            srv._conns.discard(self)
            srv.stats.active -= 1
            if not srv._conns and srv._drained is not None:
                srv._drained.set()
            srv.stats.bytes_in += self.nbytes_in
            if self.upstream is not None:
                srv.stats.bytes_out += self.upstream.nbytes
        t = self.transport
        if t is not None:
            if abort:
                t.abort()
            else:
                t.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def __repr__(self) -> str:
        phase = ("header", "connecting", "splice", "closed")[self.phase]
        target = self.header.target if self.header else None
        return f"<TunnelConnection peer={self.peer} {phase} target={target} in={self.nbytes_in}>"


class _Upstream(asyncio.Protocol):
    """The connection to the local endpoint."""

    __slots__ = ("_eof", "down", "nbytes", "transport")

    def __init__(self, down: _Downstream) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None
        self.nbytes = 0
        self._eof = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.down.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self._eof = True
        down = self.down
        if down.phase == _SPLICE and down.transport is not None:
            if down.transport.can_write_eof():
                down.transport.write_eof()
            if down._eof:
                down._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        # close() flushes what is buffered towards the dialer first.
        self.down._close()

    # Flow control: the endpoint cannot take more, so stop reading from the dialer.
    def pause_writing(self) -> None:
        d = self.down
        d._paused = True
        if d.phase == _SPLICE:
            d.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        d = self.down
        d._paused = False
        if d.phase == _SPLICE and not d._eof:
            d.transport.resume_reading()  # type: ignore[union-attr]


class TunnelServer:
    """Accepts tunnel connections from other agents and forwards them to local replicas.

    ``resolve(target_id)`` -> ``LocalTarget`` or None: the local endpoint of a mesh
    service with that task id (None when the task is not local or not a mesh
    endpoint); or an awaitable of one, when the answer needs a moment (reading
    stays paused until it comes; the caller bounds how long).  ``allowed_peers``: a predicate on the peer IP, or a collection of
    IPs (a set may be updated in place, or ``allowed_peers`` reassigned, as nodes
    come and go).  ``header_timeout``: seconds for the whole header to arrive.
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
        self.stats = TunnelStats()
        self._server: asyncio.Server | None = None
        self._conns: set[_Downstream] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._drained: asyncio.Event | None = None  # set when the last connection closes during stop()

    def peer_allowed(self, ip: str) -> bool:
        allowed = self.allowed_peers
        if callable(allowed):
            return bool(allowed(ip))
        return ip in allowed

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def connections(self) -> int:
        return len(self._conns)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Downstream(self), self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("tunnel listening on %s", format_hostport(self.host, self.port))

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; wait up to ``grace`` seconds for open connections, then abort them."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._conns and grace > 0:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                pass
        for conn in list(self._conns):
            conn._close(abort=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<TunnelServer {format_hostport(self.host, self.port)} {self.stats!r}>"
