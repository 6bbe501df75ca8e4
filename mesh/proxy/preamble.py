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

The decoder for the tunnel (``parse_tunnel_header``) is strict and incremental:
the 12-byte signature is checked on every byte as it arrives; the version must
be 2 and the command PROXY; the family TCP over IPv4 or IPv6; the length at
least the address block and at most ``MAX_HEADER_BODY``; the TLVs must exactly
fill the rest, each within bounds; exactly one target TLV of 1-255 printable
UTF-8 bytes.  Each refusal names its reason (``TunnelRefused.reason``).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from mesh import proxyproto
from mesh.errors import ProtocolError
from mesh.proxyproto import PP2_TYPE_MESH_TARGET, V2_SIGNATURE, encode_v1, encode_v2

__all__ = [
    "MAX_HEADER_BODY",
    "MAX_TARGET_LENGTH",
    "PP2_TYPE_MESH_TARGET",
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
    target: str  # task id of the replica


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
    """The first bytes of a connection to ``host.via`` (another node's agent): ``tunnel_header``
    with the target ``endpoint_target(host.endpoint)``."""
    if client is None or local is None:
        raise ValueError(f"tunnel header for {host!r} needs the client and local addresses, got {client!r}, {local!r}")
    return tunnel_header(client, local, endpoint_target(host.endpoint))


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
