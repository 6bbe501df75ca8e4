"""PROXY protocol v1 (text) and v2 (binary) headers: encoder and strict, bounded decoder.

Spec: HAProxy's ``proxy-protocol.txt``.  The proxy sends a header as the first
bytes of an upstream connection so that the endpoint learns the real client
address; the cluster tunnel decodes one (with a TLV naming the target task).

Rules of the decoder (``decode``):

- It is fed the bytes received so far and returns ``None`` while they are a
  valid but incomplete prefix of a header ("need more"), or
  ``(ProxyHeader, consumed)`` once a whole header is there; the bytes after
  ``consumed`` belong to the application stream.
- Anything that cannot be the start of a valid header raises ``ProtocolError``
  at once, without waiting for more bytes: a wrong signature, an unknown
  version/command/family, a length that does not fit the family, a v1 line
  longer than 107 bytes, a v2 payload whose TLV area exceeds
  ``MAX_V2_TLV_BYTES``.  So a hostile peer can make the caller buffer at most
  ``16 + 216 + MAX_V2_TLV_BYTES`` bytes.
- v1 is parsed exactly: single spaces, dotted-quad / canonical IPv6 addresses
  (as ``ipaddress`` accepts them), ports 0-65535 without leading zeros, CRLF.

TLVs are first class: ``ProxyHeader.tlvs`` is a tuple of ``(type, value)`` in
wire order, and ``encode_v2(..., tlvs=...)`` writes them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.errors import ProtocolError

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_TLV_BYTES",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_MESH_TARGET",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "decode",
    "encode",
    "encode_v1",
    "encode_v2",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_LENGTH = 107  # "PROXY TCP6 <39> <39> 65535 65535\r\n", per the spec
MAX_V2_TLV_BYTES = 1024  # our bound on the TLV area of a v2 header

# TLV types from the spec.  0xE0-0xEF are reserved for private use ("custom").
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30
# Ours: the cluster tunnel names the task a forwarded connection is meant for.
PP2_TYPE_MESH_TARGET = 0xE0

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_FAM_UNSPEC = 0x0
_FAM_INET = 0x1
_FAM_INET6 = 0x2
_FAM_UNIX = 0x3
_ADDR_LEN = {_FAM_UNSPEC: 0, _FAM_INET: 12, _FAM_INET6: 36, _FAM_UNIX: 216}
_FAMILY_OF = {
    _FAM_UNSPEC: socket.AF_UNSPEC,
    _FAM_INET: socket.AF_INET,
    _FAM_INET6: socket.AF_INET6,
    _FAM_UNIX: socket.AF_UNIX,
}
_TRANSPORTS = {0x0: None, 0x1: "stream", 0x2: "dgram"}
_V2_FIXED = 16


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded (or to-be-encoded) PROXY header.

    ``command`` is "PROXY" (addresses are those of the real client/server) or
    "LOCAL" (v2 only: a health check by the proxy itself; addresses are unknown).
    ``family`` is a ``socket.AF_*`` constant (``AF_UNSPEC`` for v1 "UNKNOWN").
    ``src``/``dst`` are ``(address, port)`` (a path string and port 0 for AF_UNIX),
    or ``None`` when unknown.  ``transport`` is "stream", "dgram" or None.
    """

    version: int
    command: str = "PROXY"
    family: int = socket.AF_UNSPEC
    transport: str | None = "stream"
    src: tuple[str, int] | None = None
    dst: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of ``type_``, or None."""
        for t, v in self.tlvs:
            if t == type_:
                return v
        return None


# ---------------------------------------------------------------------------- encoding


def _normalise(src: tuple | None, dst: tuple | None) -> tuple[int, tuple[str, int], tuple[str, int]] | None:
    """Both socket addresses as (family, (ip, port), (ip, port)) of ONE family, or None if unknown.

    A dual-stack listener reports IPv4 clients as ``::ffff:a.b.c.d``; those are
    written as TCP4 when both sides are IPv4 (mapped or not).  A real mix of v4
    and v6 is written as TCP6 with the v4 address mapped.
    """
    if not src or not dst or not isinstance(src, tuple) or not isinstance(dst, tuple):
        return None
    try:
        s_ip = ipaddress.ip_address(str(src[0]).split("%", 1)[0])
        d_ip = ipaddress.ip_address(str(dst[0]).split("%", 1)[0])
        s_port, d_port = int(src[1]), int(dst[1])
    except (ValueError, IndexError, TypeError):
        return None
    if not (0 <= s_port <= 65535 and 0 <= d_port <= 65535):
        return None

    def as_v4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
        if isinstance(ip, ipaddress.IPv4Address):
            return ip
        return ip.ipv4_mapped

    s4, d4 = as_v4(s_ip), as_v4(d_ip)
    if s4 is not None and d4 is not None:
        return socket.AF_INET, (str(s4), s_port), (str(d4), d_port)
    s6 = s_ip if isinstance(s_ip, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{s_ip}")
    d6 = d_ip if isinstance(d_ip, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{d_ip}")
    return socket.AF_INET6, (_ntop6(s6.packed), s_port), (_ntop6(d6.packed), d_port)


def _ntop6(packed: bytes) -> str:
    # inet_ntop, not str(IPv6Address): it writes mapped addresses as ::ffff:a.b.c.d like HAProxy does.
    return socket.inet_ntop(socket.AF_INET6, packed)


def encode_v1(src: tuple | None, dst: tuple | None) -> bytes:
    """A v1 header for a TCP connection from ``src`` to ``dst`` (socket addresses as
    returned by getpeername()/getsockname()); "PROXY UNKNOWN" when either is unknown."""
    norm = _normalise(src, dst)
    if norm is None:
        return b"PROXY UNKNOWN\r\n"
    fam, (s, sp), (d, dp) = norm
    proto = "TCP4" if fam == socket.AF_INET else "TCP6"
    return f"PROXY {proto} {s} {d} {sp} {dp}\r\n".encode("ascii")


def _encode_tlvs(tlvs: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for t, v in tlvs:
        if not isinstance(t, int) or not 0 <= t <= 0xFF:
            raise ValueError(f"PROXY v2 TLV type must be 0..255, got {t!r}")
        v = bytes(v)
        out += struct.pack("!BH", t, len(v)) + v
    if len(out) > MAX_V2_TLV_BYTES:
        raise ValueError(f"PROXY v2 TLVs take {len(out)} bytes, more than the bound of {MAX_V2_TLV_BYTES}")
    return bytes(out)


def encode_v2(
    src: tuple | None, dst: tuple | None, tlvs: Iterable[tuple[int, bytes]] = (), *, local: bool = False
) -> bytes:
    """A v2 header for a TCP connection from ``src`` to ``dst``, followed by ``tlvs``.

    Unknown addresses give family UNSPEC (command PROXY, no address block);
    ``local=True`` gives the LOCAL command (a connection made by the proxy itself).
    Raises ValueError on a bad TLV or when TLVs exceed ``MAX_V2_TLV_BYTES``.
    """
    tlv_bytes = _encode_tlvs(tlvs)
    norm = None if local else _normalise(src, dst)
    if norm is None:
        fam_byte, addr = (_FAM_UNSPEC << 4) | 0x0, b""
    elif norm[0] == socket.AF_INET:
        (s, sp), (d, dp) = norm[1], norm[2]
        fam_byte = (_FAM_INET << 4) | 0x1
        addr = socket.inet_pton(socket.AF_INET, s) + socket.inet_pton(socket.AF_INET, d) + struct.pack("!HH", sp, dp)
    else:
        (s, sp), (d, dp) = norm[1], norm[2]
        fam_byte = (_FAM_INET6 << 4) | 0x1
        addr = socket.inet_pton(socket.AF_INET6, s) + socket.inet_pton(socket.AF_INET6, d) + struct.pack("!HH", sp, dp)
    ver_cmd = 0x20 | (_CMD_LOCAL if local else _CMD_PROXY)
    payload = addr + tlv_bytes
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam_byte, len(payload)) + payload


def encode(version: str | int, src: tuple | None, dst: tuple | None, tlvs: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """``encode_v1`` or ``encode_v2`` by ``version`` ("v1"/"v2" as in ServiceOptions, or 1/2).
    TLVs exist only in v2; passing them with v1 is an error."""
    if version in ("v1", 1):
        tlvs = tuple(tlvs)
        if tlvs:
            raise ValueError("PROXY v1 cannot carry TLVs; use v2")
        return encode_v1(src, dst)
    if version in ("v2", 2):
        return encode_v2(src, dst, tlvs)
    raise ValueError(f"PROXY protocol version must be 'v1' or 'v2', got {version!r}")


# ---------------------------------------------------------------------------- decoding


def decode(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Decode a v1 or v2 header at the start of ``data``.

    Returns ``(header, consumed)``, or ``None`` when ``data`` is a valid but
    incomplete prefix.  Raises ``ProtocolError`` as soon as ``data`` cannot start
    a valid header (see the module docstring for the bounds).
    """
    b = bytes(data[: _V2_FIXED + _ADDR_LEN[_FAM_UNIX] + MAX_V2_TLV_BYTES])
    if b[:1] == b"P":
        return _decode_v1(b)
    if b[:1] == b"\r":
        return _decode_v2(b)
    if not b:
        return None
    raise ProtocolError(f"not a PROXY protocol header: starts with {b[:8]!r}")


def _need_prefix(b: bytes, prefix: bytes, what: str) -> bool:
    """True when ``b`` is shorter than ``prefix`` and matches it so far (need more)."""
    n = min(len(b), len(prefix))
    if b[:n] != prefix[:n]:
        raise ProtocolError(f"bad PROXY {what}: {b[:n]!r}")
    return len(b) < len(prefix)


def _decode_v1(b: bytes) -> tuple[ProxyHeader, int] | None:
    if _need_prefix(b, V1_PREFIX, "v1 prefix"):
        return None
    end = b.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(b) >= MAX_V1_LENGTH:
            raise ProtocolError(f"PROXY v1 header longer than {MAX_V1_LENGTH} bytes")
        if b"\n" in b:
            raise ProtocolError("PROXY v1 header ends with LF without CR")
        return None
    line = b[:end]
    consumed = end + 2
    if any(c < 0x20 or c > 0x7E for c in line):
        raise ProtocolError("PROXY v1 header holds a non-printable byte")
    parts = line.decode("ascii").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # The spec: the receiver must ignore anything after UNKNOWN up to CRLF.
        return ProxyHeader(version=1, family=socket.AF_UNSPEC, transport=None), consumed
    if len(parts) != 6:
        raise ProtocolError(f"PROXY v1 header must have 6 fields, got {len(parts)}: {line!r}")
    _, proto, s_ip, d_ip, s_port, d_port = parts
    if proto == "TCP4":
        fam, cls = socket.AF_INET, ipaddress.IPv4Address
    elif proto == "TCP6":
        fam, cls = socket.AF_INET6, ipaddress.IPv6Address
    else:
        raise ProtocolError(f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, got {proto!r}")
    try:
        src_a, dst_a = cls(s_ip), cls(d_ip)
    except ValueError as exc:
        raise ProtocolError(f"PROXY v1 {proto} header has a bad address: {exc}") from exc
    return (
        ProxyHeader(
            version=1,
            family=fam,
            transport="stream",
            src=(socket.inet_ntop(fam, src_a.packed), _v1_port(s_port)),
            dst=(socket.inet_ntop(fam, dst_a.packed), _v1_port(d_port)),
        ),
        consumed,
    )


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProtocolError(f"PROXY v1 port must be 0-65535 without leading zeros, got {text!r}")
    return int(text)


def _decode_v2(b: bytes) -> tuple[ProxyHeader, int] | None:
    if _need_prefix(b, V2_SIGNATURE, "v2 signature"):
        return None
    if len(b) < _V2_FIXED:
        # Check what we have of the fixed part early, so garbage fails fast.
        if len(b) > 12:
            _v2_ver_cmd(b[12])
        if len(b) > 13:
            _v2_family(b[13])
        return None
    command = _v2_ver_cmd(b[12])
    fam, transport = _v2_family(b[13])
    (length,) = struct.unpack_from("!H", b, 14)
    addr_len = _ADDR_LEN[fam]
    if command == _CMD_PROXY and length < addr_len:
        raise ProtocolError(f"PROXY v2 length {length} is too short for the address family (needs {addr_len})")
    if length > addr_len + MAX_V2_TLV_BYTES:
        raise ProtocolError(f"PROXY v2 length {length} exceeds the bound of {addr_len + MAX_V2_TLV_BYTES}")
    total = _V2_FIXED + length
    if len(b) < total:
        return None
    payload = b[_V2_FIXED:total]
    src = dst = None
    if length < addr_len:
        # Only for LOCAL (checked above): no usable address block, nothing else to read.
        return ProxyHeader(version=2, command="LOCAL", family=_FAMILY_OF[fam], transport=transport), total
    if fam == _FAM_INET:
        src = (socket.inet_ntop(socket.AF_INET, payload[0:4]), struct.unpack_from("!H", payload, 8)[0])
        dst = (socket.inet_ntop(socket.AF_INET, payload[4:8]), struct.unpack_from("!H", payload, 10)[0])
    elif fam == _FAM_INET6:
        src = (socket.inet_ntop(socket.AF_INET6, payload[0:16]), struct.unpack_from("!H", payload, 32)[0])
        dst = (socket.inet_ntop(socket.AF_INET6, payload[16:32]), struct.unpack_from("!H", payload, 34)[0])
    elif fam == _FAM_UNIX:
        src = (_unix_path(payload[0:108]), 0)
        dst = (_unix_path(payload[108:216]), 0)
    tlvs = _decode_tlvs(payload[addr_len:])
    if command == _CMD_LOCAL:
        # The spec: a receiver must ignore the address block of a LOCAL header.
        src = dst = None
    return (
        ProxyHeader(
            version=2,
            command="LOCAL" if command == _CMD_LOCAL else "PROXY",
            family=_FAMILY_OF[fam],
            transport=transport,
            src=src,
            dst=dst,
            tlvs=tlvs,
        ),
        total,
    )


def _v2_ver_cmd(byte: int) -> int:
    if byte >> 4 != 0x2:
        raise ProtocolError(f"PROXY v2 version must be 2, got {byte >> 4} (byte 0x{byte:02x})")
    cmd = byte & 0x0F
    if cmd not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProtocolError(f"PROXY v2 command must be LOCAL (0) or PROXY (1), got {cmd}")
    return cmd


def _v2_family(byte: int) -> tuple[int, str | None]:
    fam, tr = byte >> 4, byte & 0x0F
    if fam not in _ADDR_LEN or tr not in _TRANSPORTS:
        raise ProtocolError(f"PROXY v2 unknown address family/transport byte 0x{byte:02x}")
    return fam, _TRANSPORTS[tr]


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _decode_tlvs(area: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    i, n = 0, len(area)
    while i < n:
        if n - i < 3:
            raise ProtocolError(f"PROXY v2 TLV truncated: {n - i} trailing byte(s)")
        t, ln = area[i], (area[i + 1] << 8) | area[i + 2]
        if i + 3 + ln > n:
            raise ProtocolError(f"PROXY v2 TLV type 0x{t:02x} length {ln} runs past the header")
        out.append((t, area[i + 3 : i + 3 + ln]))
        i += 3 + ln
    return tuple(out)
