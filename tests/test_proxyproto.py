"""PROXY protocol: golden bytes written by hand from HAProxy's proxy-protocol.txt, and the decoder's bounds."""

from __future__ import annotations

import socket

import pytest

from mesh.errors import ProtocolError
from mesh.proxyproto import (
    MAX_V1_LENGTH,
    MAX_V2_TLV_BYTES,
    PP2_TYPE_MESH_TARGET,
    PP2_TYPE_NOOP,
    ProxyHeader,
    decode,
    encode,
    encode_v1,
    encode_v2,
)

SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
V4_SRC, V4_DST = ("192.0.2.1", 56324), ("198.51.100.7", 443)
V6_SRC, V6_DST = ("2001:db8::1", 1234, 0, 0), ("2001:db8::2", 80, 0, 0)

V4_ADDR = bytes([192, 0, 2, 1, 198, 51, 100, 7, 0xDC, 0x04, 0x01, 0xBB])
V6_ADDR = (
    bytes([0x20, 0x01, 0x0D, 0xB8] + [0] * 11 + [1])
    + bytes([0x20, 0x01, 0x0D, 0xB8] + [0] * 11 + [2])
    + bytes([0x04, 0xD2, 0x00, 0x50])
)

GOLDEN_V1 = [
    ("ipv4", V4_SRC, V4_DST, b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"),
    ("ipv6", V6_SRC, V6_DST, b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n"),
    (
        "v4-mapped",
        ("::ffff:192.0.2.1", 56324, 0, 0),
        ("::ffff:198.51.100.7", 443, 0, 0),
        b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n",
    ),
    ("unknown", None, V4_DST, b"PROXY UNKNOWN\r\n"),
    ("mixed", ("192.0.2.1", 1), ("2001:db8::2", 2, 0, 0), b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2\r\n"),
]

GOLDEN_V2 = [
    ("ipv4", V4_SRC, V4_DST, (), SIG + bytes([0x21, 0x11, 0x00, 0x0C]) + V4_ADDR),
    ("ipv6", V6_SRC, V6_DST, (), SIG + bytes([0x21, 0x21, 0x00, 0x24]) + V6_ADDR),
    (
        "ipv4+tlvs",
        V4_SRC,
        V4_DST,
        ((PP2_TYPE_MESH_TARGET, b"task1"), (PP2_TYPE_NOOP, b"")),
        SIG + bytes([0x21, 0x11, 0x00, 0x17]) + V4_ADDR + b"\xe0\x00\x05task1" + b"\x04\x00\x00",
    ),
    ("unknown", None, None, (), SIG + bytes([0x21, 0x00, 0x00, 0x00])),
    ("unknown+tlv", None, None, ((0xE1, b"x"),), SIG + bytes([0x21, 0x00, 0x00, 0x04, 0xE1, 0x00, 0x01]) + b"x"),
]


@pytest.mark.parametrize(("name", "src", "dst", "wire"), GOLDEN_V1, ids=[g[0] for g in GOLDEN_V1])
def test_v1_golden_bytes(name, src, dst, wire):
    assert encode_v1(src, dst) == wire
    assert encode("v1", src, dst) == wire
    assert len(wire) <= MAX_V1_LENGTH


@pytest.mark.parametrize(("name", "src", "dst", "tlvs", "wire"), GOLDEN_V2, ids=[g[0] for g in GOLDEN_V2])
def test_v2_golden_bytes(name, src, dst, tlvs, wire):
    assert encode_v2(src, dst, tlvs) == wire
    assert encode("v2", src, dst, tlvs) == wire


def test_v2_local_command_bytes():
    assert encode_v2(V4_SRC, V4_DST, local=True) == SIG + bytes([0x20, 0x00, 0x00, 0x00])


DECODED = [
    (
        GOLDEN_V1[0][3],
        ProxyHeader(1, "PROXY", socket.AF_INET, "stream", ("192.0.2.1", 56324), ("198.51.100.7", 443)),
    ),
    (GOLDEN_V1[1][3], ProxyHeader(1, "PROXY", socket.AF_INET6, "stream", ("2001:db8::1", 1234), ("2001:db8::2", 80))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", socket.AF_UNSPEC, None)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(1, "PROXY", socket.AF_UNSPEC, None)),
    (
        GOLDEN_V2[0][4],
        ProxyHeader(2, "PROXY", socket.AF_INET, "stream", ("192.0.2.1", 56324), ("198.51.100.7", 443)),
    ),
    (
        GOLDEN_V2[1][4],
        ProxyHeader(2, "PROXY", socket.AF_INET6, "stream", ("2001:db8::1", 1234), ("2001:db8::2", 80)),
    ),
    (
        GOLDEN_V2[2][4],
        ProxyHeader(
            2,
            "PROXY",
            socket.AF_INET,
            "stream",
            ("192.0.2.1", 56324),
            ("198.51.100.7", 443),
            ((0xE0, b"task1"), (0x04, b"")),
        ),
    ),
    (GOLDEN_V2[3][4], ProxyHeader(2, "PROXY", socket.AF_UNSPEC, None)),
    (SIG + bytes([0x20, 0x00, 0x00, 0x00]), ProxyHeader(2, "LOCAL", socket.AF_UNSPEC, None)),
    # LOCAL with an address block: the addresses are ignored, TLVs still parsed.
    (
        SIG + bytes([0x20, 0x11, 0x00, 0x0F]) + V4_ADDR + b"\xe0\x00\x00",
        ProxyHeader(2, "LOCAL", socket.AF_INET, "stream", None, None, ((0xE0, b""),)),
    ),
    (
        SIG + bytes([0x21, 0x31, 0x00, 216]) + b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0"),
        ProxyHeader(2, "PROXY", socket.AF_UNIX, "stream", ("/a", 0), ("/b", 0)),
    ),
]


@pytest.mark.parametrize(("wire", "header"), DECODED)
def test_decode_exact_and_leaves_payload(wire, header):
    assert decode(wire) == (header, len(wire))
    # Application bytes after the header are not consumed.
    assert decode(wire + b"GET / HTTP/1.1\r\n") == (header, len(wire))
    assert decode(bytearray(wire)) == (header, len(wire))
    assert decode(memoryview(wire + b"x")) == (header, len(wire))


@pytest.mark.parametrize(("wire", "header"), DECODED)
def test_decode_every_prefix_needs_more(wire, header):
    for n in range(len(wire)):
        assert decode(wire[:n]) is None, n


def test_decoder_accepts_what_the_encoder_makes():
    addrs = [
        (("10.0.0.1", 0), ("10.0.0.2", 65535)),
        (("::1", 1, 0, 0), ("fe80::1", 2, 0, 0)),
        (("127.0.0.1", 40000), ("127.0.0.1", 8080)),
    ]
    for src, dst in addrs:
        for version in (1, 2):
            wire = encode(version, src, dst)
            hdr, n = decode(wire)
            assert n == len(wire)
            assert hdr.version == version and hdr.command == "PROXY"
            assert hdr.src == (src[0], src[1]) and hdr.dst == (dst[0], dst[1])
    tlvs = ((PP2_TYPE_MESH_TARGET, b"svc.1.abcdef"), (0x02, b"example.com"), (0xEF, bytes(range(256))))
    hdr, _ = decode(encode_v2(V4_SRC, V4_DST, tlvs))
    assert hdr.tlvs == tlvs
    assert hdr.tlv(PP2_TYPE_MESH_TARGET) == b"svc.1.abcdef"
    assert hdr.tlv(0x30) is None


def test_v1_longest_headers_decode():
    ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    wire = f"PROXY TCP6 {ip} {ip} 65535 65535\r\n".encode()
    assert len(wire) == 104
    hdr, n = decode(wire)
    assert n == 104 and hdr.src == (ip, 65535)
    # The spec's bound: the longest UNKNOWN line with full addresses.
    wire = f"PROXY UNKNOWN {ip} {ip} 65535 65535\r\n".encode()
    assert len(wire) == MAX_V1_LENGTH
    assert decode(wire) == (ProxyHeader(1, "PROXY", socket.AF_UNSPEC, None), MAX_V1_LENGTH)


def test_v2_largest_allowed_tlv_area_decodes():
    value = b"v" * (MAX_V2_TLV_BYTES - 3)
    wire = encode_v2(V6_SRC, V6_DST, [(0xE0, value)])
    assert decode(wire)[0].tlv(0xE0) == value


REJECTED = [
    ("not a header", b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    ("v1 bad prefix", b"PROXZ", "bad PROXY v1 prefix"),
    ("v1 lowercase", b"proxy TCP4", "not a PROXY protocol header"),
    ("v1 bad proto", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "must be TCP4, TCP6 or UNKNOWN"),
    ("v1 too few fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields"),
    ("v1 double space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "6 fields"),
    ("v1 v6 in TCP4", b"PROXY TCP4 ::1 ::2 1 2\r\n", "bad address"),
    ("v1 v4 in TCP6", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad address"),
    ("v1 leading zero ip", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad address"),
    ("v1 port too big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port must be"),
    ("v1 port leading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port must be"),
    ("v1 port sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port must be"),
    ("v1 LF only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF without CR"),
    ("v1 control byte", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "non-printable"),
    ("v1 too long", b"PROXY UNKNOWN " + b"x" * 100, "longer than 107"),
    ("v2 bad signature", SIG[:7] + b"X", "bad PROXY v2 signature"),
    ("v2 version 1", SIG + b"\x11", "version must be 2"),
    ("v2 version 3", SIG + b"\x31\x11\x00\x0c", "version must be 2"),
    ("v2 command 2", SIG + b"\x22", "command must be LOCAL"),
    ("v2 family 4", SIG + b"\x21\x41", "unknown address family"),
    ("v2 transport 3", SIG + b"\x21\x13", "unknown address family"),
    ("v2 short for inet", SIG + b"\x21\x11\x00\x0b" + V4_ADDR[:11], "too short"),
    ("v2 short for inet6", SIG + b"\x21\x21\x00\x0c" + V4_ADDR, "too short"),
    ("v2 too long", SIG + b"\x21\x11" + (12 + MAX_V2_TLV_BYTES + 1).to_bytes(2, "big"), "exceeds the bound"),
    ("v2 huge length", SIG + b"\x21\x00\xff\xff", "exceeds the bound"),
    ("v2 tlv truncated", SIG + b"\x21\x11\x00\x0e" + V4_ADDR + b"\xe0\x00", "TLV truncated"),
    ("v2 tlv overruns", SIG + b"\x21\x11\x00\x10" + V4_ADDR + b"\xe0\x00\x05ab", "runs past the header"),
]


@pytest.mark.parametrize(("name", "wire", "message"), REJECTED, ids=[r[0] for r in REJECTED])
def test_decode_rejects(name, wire, message):
    with pytest.raises(ProtocolError, match=message):
        decode(wire)


def test_decode_empty_needs_more():
    assert decode(b"") is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_v2(V4_SRC, V4_DST, [(256, b"")]), "TLV type must be 0..255"),
        (lambda: encode_v2(V4_SRC, V4_DST, [(0xE0, b"x" * MAX_V2_TLV_BYTES)]), "more than the bound"),
        (lambda: encode("v1", V4_SRC, V4_DST, [(0xE0, b"x")]), "v1 cannot carry TLVs"),
        (lambda: encode("v3", V4_SRC, V4_DST), "must be 'v1' or 'v2'"),
    ],
)
def test_encoder_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
