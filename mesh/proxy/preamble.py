"""What a connection's first bytes say before the spliced stream starts.

Two preambles, both built on the PROXY protocol codec (``mesh.proxyproto``):

- **Towards a replica** (``replica_header``): a PROXY v1 or v2 header with the
  original client as source and the published address as destination, when the
  service asks for one (``ServiceOptions.proxy_protocol``).  No TLVs: the mesh's
  own TLV never reaches an application.
- **Towards another node's agent** (``tunnel_header``): a PROXY v2 header, command
  PROXY, family TCP4/TCP6, with the original client as source, the published
  address as destination and exactly one TLV of type ``PP2_TYPE_MESH_TARGET``
  (0xE0, from the custom range 0xE0-0xEF).  Its value is the ONE target format:

      "<endpoint id>:<target port>"   UTF-8, 1-255 bytes, printable

  where the endpoint id is the task (or container) id the routing table lists,
  and the target port the port the replica listens on (a task may serve several).
  ``endpoint_target(endpoint)`` makes it; the receiving agent resolves it
  against its own table.  Other TLV types may follow and are ignored, as the
  PROXY spec requires.

**Authentication** (``TunnelAuth``, cluster mode): a tunnel header also carries one TLV of type
``PP2_TYPE_MESH_AUTH`` (0xE1), last, of 48 bytes: an 8-byte timestamp (unix milliseconds, big
endian), an 8-byte random nonce and a 32-byte HMAC-SHA256 over the whole header with those 32 bytes
zero.  The key is derived from the cluster token (HMAC-SHA256(token, "mesh tunnel v1")), so any agent
of the cluster can seal and check, and nothing else can: a container on a node, whose traffic leaves
masqueraded to the node's address, cannot forge the client address a replica trusts.  A receiver with
a key refuses a header without the TLV, with a bad MAC ("auth"), with a timestamp more than
``AUTH_WINDOW`` seconds off its clock ("stale"), or whose (timestamp, nonce) it already accepted within
the window ("replay").  No extra round trip: the seal travels in the header.

**Acknowledgement** (opt-in per connection): a header may carry a TLV of type
``PP2_TYPE_MESH_ACK`` (0xE2, empty value; before the auth TLV, so the MAC covers it) asking the
receiving agent to send ``TUNNEL_ACK`` (8 bytes) back once it has connected to the replica, before
any byte of the replica.  A dialer can then tell a hung agent (the kernel accepts into its backlog,
nothing ever comes back) from a slow replica, and treat no ack within its connect timeout as a failed
connect.  The dialer sends the client's first bytes right after the header, as always: no extra round
trip.  Receivers older than this TLV ignore it (unknown TLVs are skipped; the MAC covers whatever
precedes the auth TLV) and send no ack.  The TCP splice asks (``host_tunnel_header(..., ack=True)``,
``TunnelAuth.host_header(..., ack=True)``) except towards a node it has recently seen answer without an
ack (``mesh.proxy.splice``); the HTTP front does not ask (docs/cluster.md, "Known limits").

The decoder for the tunnel (``parse_tunnel_header``) is strict and incremental:
the 12-byte signature is checked on every byte as it arrives; the version must
be 2 and the command PROXY; the family TCP over IPv4 or IPv6; the length at
least the address block and at most ``MAX_HEADER_BODY``; the TLVs must exactly
fill the rest, each within bounds; exactly one target TLV of 1-255 printable
UTF-8 bytes.  Each refusal names its reason (``TunnelRefused.reason``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh import proxyproto
from mesh.errors import ProtocolError
from mesh.proxyproto import PP2_TYPE_MESH_TARGET, V2_SIGNATURE, encode_v1, encode_v2

__all__ = [
    "AUTH_WINDOW",
    "MAX_HEADER_BODY",
    "MAX_TARGET_LENGTH",
    "PP2_TYPE_MESH_ACK",
    "PP2_TYPE_MESH_AUTH",
    "PP2_TYPE_MESH_TARGET",
    "TUNNEL_ACK",
    "TunnelAuth",
    "TunnelHeader",
    "TunnelRefused",
    "endpoint_target",
    "host_tunnel_header",
    "parse_tunnel_header",
    "proxy_header",
    "replica_header",
    "tunnel_header",
]

MAX_TARGET_LENGTH = 255
PP2_TYPE_MESH_AUTH = 0xE1  # timestamp (8) + nonce (8) + HMAC-SHA256 (32), the last TLV of a sealed header
_AUTH_LEN = 48
_AUTH_TLV_HEAD = bytes((PP2_TYPE_MESH_AUTH, 0, _AUTH_LEN))
PP2_TYPE_MESH_ACK = 0xE2  # empty: "acknowledge once the replica is connected" (module docstring)
TUNNEL_ACK = b"\x00MESH\x00OK"  # what a receiver sends back first when asked (8 bytes)
AUTH_WINDOW = 30.0  # seconds a sealed header's timestamp may differ from the receiver's clock
# Address block (36 bytes for IPv6) + one target TLV (3 + 255) + room for a few
# small TLVs a future dialer might add (e.g. a CRC32C or unique id).
MAX_HEADER_BODY = 512

_V2_PROXY = 0x21  # version 2, command PROXY
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
_ADDR_LEN = {_FAM_TCP4: 12, _FAM_TCP6: 36}


def replica_header(version: str | None, client: tuple | None, local: tuple | None) -> bytes:
    """The PROXY header a replica asked for (``version`` "v1"/"v2"), or b"" for None."""
    if version is None:
        return b""
    if version == "v1":
        return encode_v1(client, local)
    if version == "v2":
        return encode_v2(client, local)
    return proxyproto.encode(version, client, local)  # raises ValueError naming the version


def endpoint_target(endpoint: Any) -> str:
    """The tunnel target of an ``Endpoint``: "<endpoint id>:<target port>"."""
    return f"{endpoint.id}:{endpoint.port}"


class TunnelRefused(ProtocolError):
    """A tunnel connection is refused; ``reason`` is one of ``REFUSE_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TunnelHeader:
    source: tuple[str, int]  # the original client
    destination: tuple[str, int]  # the published address the client connected to
    target: str  # "<task id>:<target port>" of the replica
    auth: bytes | None = None  # the PP2_TYPE_MESH_AUTH value, when the header is sealed
    ack: bool = False  # the dialer asks for TUNNEL_ACK once the replica is connected (PP2_TYPE_MESH_ACK)


def tunnel_header(
    client_addr: tuple[str, int],
    dst_addr: tuple[str, int],
    target_id: str,
    auth: TunnelAuth | None = None,
    *,
    ack: bool = False,
) -> bytes:
    """The bytes a dialer sends first on a tunnel connection.

    ``client_addr``: the original client (ip, port); ``dst_addr``: the address the
    client connected to; ``target_id``: "<task id>:<target port>" of the chosen replica;
    ``auth``: seal it (cluster mode); ``ack``: ask for ``TUNNEL_ACK``.  Raises ``ValueError``
    naming the bad argument.
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
    if auth is None:
        tlvs = ((PP2_TYPE_MESH_TARGET, target), (PP2_TYPE_MESH_ACK, b"")) if ack else ((PP2_TYPE_MESH_TARGET, target),)
        return proxyproto.encode_v2(client_addr, dst_addr, tlvs)
    return auth.seal(client_addr, dst_addr, target, ack=ack)


def host_tunnel_header(host: Any, client: tuple | None, local: tuple | None, *, ack: bool = False) -> bytes:
    """The first bytes of a connection to ``host.via`` (another node's agent): ``tunnel_header``
    with the target ``endpoint_target(host.endpoint)`` (asking for ``TUNNEL_ACK`` with ``ack``)."""
    if client is None or local is None:
        raise ValueError(f"tunnel header for {host!r} needs the client and local addresses, got {client!r}, {local!r}")
    return tunnel_header(client, local, endpoint_target(host.endpoint), ack=ack)


def proxy_header(version: str, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """PROXY header ``version`` ("v1" or "v2") for a replica: the client's address as
    source.  No TLVs: the mesh's own target TLV never leaks to applications."""
    return proxyproto.encode(version, src, dst)


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
    auths = [v for t, v in header.tlvs if t == PP2_TYPE_MESH_AUTH]
    if len(auths) > 1:
        raise TunnelRefused("tlv", "more than one auth TLV")
    auth = auths[0] if auths else None
    ack = any(t == PP2_TYPE_MESH_ACK for t, _ in header.tlvs)
    return TunnelHeader(header.src, header.dst, _decode_target(targets[0]), auth, ack), consumed


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


class TunnelAuth:
    """Seals tunnel headers and checks them (see the module docstring): HMAC-SHA256 with a key derived
    from the cluster token, a timestamp window and a replay cache of the (timestamp, nonce) pairs
    accepted within it (at most ``max_seen``; beyond that the oldest are forgotten first).

    ``clock`` (seconds, ``time.time``) and ``nonce`` (8 bytes, ``os.urandom``) are injectable for tests.
    """

    def __init__(
        self,
        token: str | bytes,
        *,
        window: float = AUTH_WINDOW,
        max_seen: int = 1 << 16,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[int], bytes] = os.urandom,
    ) -> None:
        raw = token.encode() if isinstance(token, str) else bytes(token)
        if not raw:
            raise ValueError("tunnel authentication needs a non-empty cluster token")
        self._key = hmac.new(raw, b"mesh tunnel v1", hashlib.sha256).digest()
        self.window = window
        self.max_seen = max_seen
        self._clock = clock
        self._nonce = nonce
        self._seen: set[bytes] = set()
        self._order: deque[tuple[int, bytes]] = deque()

    def _mac(self, unsealed: bytes) -> bytes:
        return hmac.new(self._key, unsealed, hashlib.sha256).digest()

    def seal(self, client: tuple[str, int], dst: tuple[str, int], target: bytes, *, ack: bool = False) -> bytes:
        """A tunnel header for ``target`` (asking for an ack with ``ack``) with the auth TLV last and its
        MAC filled in."""
        stamp = int(self._clock() * 1000).to_bytes(8, "big") + self._nonce(8)
        auth = (PP2_TYPE_MESH_AUTH, stamp + bytes(32))
        tlvs = (
            ((PP2_TYPE_MESH_TARGET, target), (PP2_TYPE_MESH_ACK, b""), auth)
            if ack
            else ((PP2_TYPE_MESH_TARGET, target), auth)
        )
        unsealed = proxyproto.encode_v2(client, dst, tlvs)
        return unsealed[:-32] + self._mac(unsealed)

    def host_header(self, host: Any, client: tuple | None, local: tuple | None, *, ack: bool = False) -> bytes:
        """``host_tunnel_header``, sealed: what ``Mesh(tunnel_header=...)`` sends to another node."""
        if client is None or local is None:
            raise ValueError(f"tunnel header for {host!r} needs the client and local addresses")
        return tunnel_header(client, local, endpoint_target(host.endpoint), auth=self, ack=ack)

    def seal_datagram_header(self, unsealed: bytes) -> bytes:
        """The UDP tunnel's sealed header (``mesh.udp``): ``unsealed`` + timestamp (8) + HMAC (32) over both."""
        head = unsealed + int(self._clock() * 1000).to_bytes(8, "big")
        return head + self._mac(head)

    def check_datagram_header(self, sealed: bytes) -> None:
        """Raise ``TunnelRefused`` ("auth" or "stale") unless ``sealed`` (a UDP tunnel header whose last 40
        bytes are the timestamp and the MAC) is sealed with this cluster's token, recently.  No replay cache:
        a UDP service copes with duplicate datagrams, and a sender reseals its header every few seconds."""
        if len(sealed) < 41 or not hmac.compare_digest(sealed[-32:], self._mac(sealed[:-32])):
            raise TunnelRefused("auth", "UDP tunnel header not sealed with this cluster's token")
        stamp_ms = int.from_bytes(sealed[-40:-32], "big")
        if abs(int(self._clock() * 1000) - stamp_ms) > int(self.window * 1000):
            raise TunnelRefused("stale", "UDP tunnel header timestamp outside the window")

    def check(self, raw: bytes, header: TunnelHeader) -> None:
        """Raise ``TunnelRefused`` ("auth", "stale" or "replay") unless ``raw`` (the whole header as
        received) is sealed by a holder of the cluster token, recently, and not seen before."""
        value = header.auth
        if value is None:
            raise TunnelRefused("auth", "header is not sealed (no auth TLV)")
        if len(value) != _AUTH_LEN or raw[-(_AUTH_LEN + 3) : -_AUTH_LEN] != _AUTH_TLV_HEAD:
            raise TunnelRefused("auth", "the auth TLV must be the last TLV, 48 bytes")
        mac = raw[-32:]
        if not hmac.compare_digest(mac, self._mac(raw[:-32] + bytes(32))):
            raise TunnelRefused("auth", "bad MAC (not sealed with this cluster's token)")
        stamp_ms = int.from_bytes(value[:8], "big")
        now_ms = int(self._clock() * 1000)
        window_ms = int(self.window * 1000)
        if abs(now_ms - stamp_ms) > window_ms:
            raise TunnelRefused("stale", f"timestamp {(stamp_ms - now_ms) / 1000:+.1f}s off this node's clock")
        key = value[:16]
        order = self._order
        while order and (order[0][0] < now_ms - window_ms or len(order) >= self.max_seen):
            self._seen.discard(order.popleft()[1])
        if key in self._seen:
            raise TunnelRefused("replay", "this sealed header was already accepted")
        self._seen.add(key)
        order.append((stamp_ms, key))
