"""Incoming PROXY headers (mesh/proxy/inbound.py): the reader table-driven, then the tcp, tls and http fronts
against real backends on 127.0.0.1.  The test client's peer is 127.0.0.1: "trusted" is 127.0.0.0/8,
"untrusted" 10.0.0.0/8."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import struct

import pytest
import trustme

from mesh.listener import Listener
from mesh.pool import Pool
from mesh.proxy import inbound
from mesh.proxy.inbound import (
    InboundProxy,
    InboundProxyError,
    TrustedNetworks,
    listener_networks,
    trusted_networks,
)
from mesh.proxyproto import MAX_V2_TLV_BYTES, V2_SIGNATURE, encode_v1, encode_v2
from mesh.routing import Endpoint, Route, ServiceOptions
from tests import backends
from tests.backends import Backend
from tests.httpbackend import Client, HttpBackend
from tests.util import wait_for

TRUSTED = ("127.0.0.0/8",)
UNTRUSTED = ("10.0.0.0/8",)
PEER = ("127.0.0.1", 50000)
CARRIED = ("203.0.113.7", 4242)
CARRIED6 = ("2001:db8::7", 4243)
DST = ("198.51.100.1", 443)


# -- the networks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidrs", "ip", "trusted"),
    [
        (("10.0.0.0/8",), "10.1.2.3", True),
        (("10.0.0.0/8",), "11.0.0.1", False),
        (("10.0.0.0/8",), "::ffff:10.1.2.3", True),  # a dual-stack listener's IPv4 peer
        (("10.0.0.0/8",), "::ffff:11.1.2.3", False),
        (("::ffff:10.0.0.0/104",), "10.9.9.9", True),  # a mapped network is the IPv4 one
        (("192.168.1.7",), "192.168.1.7", True),  # a host address is a /32
        (("192.168.1.7",), "192.168.1.8", False),
        (("2001:db8::/32",), "2001:db8:1::5", True),
        (("2001:db8::/32",), "2001:db9::5", False),
        (("2001:db8::/32",), "fe80::1%eth0", False),
        (("fe80::/10",), "fe80::1%eth0", True),  # a scope id is ignored
        (("10.0.0.0/8", "2001:db8::/32"), "2001:db8::1", True),
        (("0.0.0.0/0",), "1.2.3.4", True),
        (("0.0.0.0/0",), "2001:db8::1", False),  # IPv4 networks never match a real IPv6 peer
        (("10.0.0.0/8",), "not-an-ip", False),
        (("10.0.0.0/8",), None, False),
    ],
)
def test_trusted_networks(cidrs, ip, trusted):
    nets = TrustedNetworks(cidrs)
    assert nets.trusted(ip) is trusted
    assert nets.trusted(ip) is trusted  # the cached answer is the same


def test_networks_are_parsed_once_per_cidr_tuple_and_empty_is_off():
    a = trusted_networks(("10.0.0.0/8", "::1"))
    assert a is trusted_networks(("10.0.0.0/8", "::1"))
    assert [str(n) for n in a.networks] == ["10.0.0.0/8", "::1/128"]
    assert trusted_networks(()) is None
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not an IP network"):
        TrustedNetworks(("10.0.0.0/33",))


def test_peer_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(inbound, "PEER_CACHE", 4)
    nets = TrustedNetworks(("10.0.0.0/8",))
    for i in range(10):
        assert nets.trusted(f"10.0.0.{i}")
        assert len(nets._cache) <= 4


class _Bindings:
    def __init__(self, *cidr_sets):
        self.bindings = tuple(
            type("B", (), {"pool": type("P", (), {"options": ServiceOptions(accept_proxy=c)})()})() for c in cidr_sets
        )


def test_listener_networks_are_the_union_cached_per_bindings_tuple():
    lst = _Bindings(("10.0.0.0/8",), (), ("192.168.0.0/16", "10.0.0.0/8"))
    nets = listener_networks(lst)
    assert sorted(map(str, nets.networks)) == ["10.0.0.0/8", "192.168.0.0/16"]
    assert listener_networks(lst) is nets and lst.inbound_cache[0] is lst.bindings
    lst.bindings = _Bindings((), ()).bindings
    assert listener_networks(lst) is None


# -- the reader ------------------------------------------------------------------------------------


def feed(reader: InboundProxy, data: bytes, step: int | None):
    step = step or len(data) or 1
    res = None
    for i in range(0, len(data), step):
        assert res is None, f"a result before byte {i}"
        res = reader.feed(data[i : i + step])
    return res


STEPS = pytest.mark.parametrize("step", [None, 1, 7], ids=["whole", "bytewise", "7-byte-reads"])


@STEPS
@pytest.mark.parametrize(
    ("header", "client"),
    [
        (encode_v1(CARRIED, DST), CARRIED),
        (encode_v1(CARRIED6, ("2001:db8::1", 443)), CARRIED6),
        (encode_v1(("::ffff:203.0.113.7", 4242), DST), CARRIED),  # both IPv4 (one mapped): TCP4
        (b"PROXY UNKNOWN\r\n", PEER),  # v1 UNKNOWN: the peer's address is kept
        (b"PROXY UNKNOWN ff02::1 whatever\r\n", PEER),
        (encode_v2(CARRIED, DST), CARRIED),
        (encode_v2(CARRIED6, ("2001:db8::1", 443)), CARRIED6),
        (encode_v2(CARRIED, DST, [(0x05, b"id-42"), (0xE1, b"x" * 300)]), CARRIED),
        (encode_v2(CARRIED, DST, local=True), PEER),  # LOCAL: the balancer's own health check
        (encode_v2(None, None), PEER),  # UNSPEC
    ],
    ids=[
        "v1-tcp4",
        "v1-tcp6",
        "v1-mapped",
        "v1-unknown",
        "v1-unknown-junk",
        "v2-inet",
        "v2-inet6",
        "v2-tlvs",
        "v2-local",
        "v2-unspec",
    ],
)
def test_a_trusted_peers_header_names_the_client(header, client, step):
    # Whole: the application bytes after the header come with it; in pieces, see the next test.
    for tail in (b"", b"GET / HTTP/1.1\r\n\r\n") if step is None else (b"",):
        reader = InboundProxy(TrustedNetworks(TRUSTED), PEER)
        assert reader.peer_trusted
        assert feed(reader, header + tail, step) == (client, tail)
        assert reader.client == client and reader.header is not None


@pytest.mark.parametrize("step", [1, 5])
def test_bytes_after_the_header_are_returned_with_the_piece_that_completes_it(step):
    header = encode_v2(CARRIED, DST)
    data = header + b"application"
    reader = InboundProxy(TrustedNetworks(TRUSTED), PEER)
    got = None
    for i in range(0, len(data), step):
        got = reader.feed(data[i : i + step])
        if got is not None:
            end = i + step
            break
    assert got == (CARRIED, data[len(header) : end])


def test_v2_header_and_data_in_one_read():
    data = encode_v2(CARRIED, DST) + b"hello"
    reader = InboundProxy(TrustedNetworks(TRUSTED), PEER)
    assert reader.feed(data) == (CARRIED, b"hello")


@pytest.mark.parametrize(
    ("data", "reason", "fragment"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "missing_header", "no PROXY header"),
        (b"\x16\x03\x01\x02\x00", "missing_header", "no PROXY header"),  # a TLS ClientHello
        (b"PROXZ", "missing_header", "no PROXY header"),
        (b"\r\n\r\n\x01", "missing_header", "no PROXY header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "bad_header", "6 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad_header", "leading zeros"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad_header", "LF without CR"),
        (b"PROXY TCP4 " + b"1" * 120, "bad_header", "longer than 107"),
        (V2_SIGNATURE + b"\x31", "bad_header", "version must be 2"),
        (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12 + MAX_V2_TLV_BYTES + 1), "bad_header", "exceeds"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04", "bad_header", "too short"),
    ],
)
def test_a_trusted_peer_without_a_good_header_is_refused(data, reason, fragment):
    for step in (None, 1):
        reader = InboundProxy(TrustedNetworks(TRUSTED), PEER)
        with pytest.raises(InboundProxyError) as info:
            assert feed(reader, data, step) is None
        assert info.value.reason == reason and isinstance(info.value, ValueError)
        assert fragment in str(info.value)


@STEPS
@pytest.mark.parametrize("header", [encode_v1(CARRIED, DST), encode_v2(CARRIED, DST), b"PROXY ", V2_SIGNATURE])
def test_an_untrusted_peer_sending_a_signature_is_refused(header, step):
    reader = InboundProxy(TrustedNetworks(UNTRUSTED), PEER)
    assert not reader.peer_trusted
    with pytest.raises(InboundProxyError) as info:
        feed(reader, header, step)
    assert info.value.reason == "untrusted_header"


@pytest.mark.parametrize(
    ("pieces", "results"),
    [
        ([b"GET / HTTP/1.1\r\n"], [(PEER, b"GET / HTTP/1.1\r\n")]),
        ([b"P", b"R", b"O", b"Xy"], [None, None, None, (PEER, b"PROXy")]),  # held while it may be one
        ([b"PING\r\n"], [(PEER, b"PING\r\n")]),  # decided at the second byte
        ([b"\r\n", b"\r\n", b"Q"], [None, None, (PEER, b"\r\n\r\nQ")]),
        ([b"\x16\x03\x01"], [(PEER, b"\x16\x03\x01")]),
        ([b""], [None]),
    ],
)
def test_an_untrusted_peer_is_a_direct_client(pieces, results):
    reader = InboundProxy(TrustedNetworks(UNTRUSTED), PEER)
    assert [reader.feed(p) for p in pieces] == results


def test_no_peer_address_is_untrusted_and_held_bytes_are_visible():
    reader = InboundProxy(TRUSTED, None)  # CIDR strings are parsed (through the cache)
    assert not reader.peer_trusted and reader.trusted("127.0.0.9")
    assert [str(n) for n in reader.networks] == ["127.0.0.0/8"]
    assert reader.feed(b"PRO") is None and reader.buffered == b"PRO"
    assert reader.feed(b"ZZ") == (None, b"PROZZ") and reader.buffered == b""
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


@pytest.mark.parametrize("header", [encode_v1(CARRIED6, ("2001:db8::1", 443)), encode_v2(CARRIED, DST, [(5, b"x")])])
def test_bytewise_headers_are_decoded_a_bounded_number_of_times(header, monkeypatch):
    calls = []
    real = inbound.decode

    def counting(buf):
        calls.append(len(buf))
        return real(buf)

    monkeypatch.setattr(inbound, "decode", counting)
    reader = InboundProxy(TrustedNetworks(TRUSTED), PEER)
    assert feed(reader, header, 1) is not None
    assert len(calls) <= 6, calls  # v1: at its LF; v2: over its fixed part, then once complete


# -- real sockets: the tcp front ---------------------------------------------------------------------

_LISTENERS: list[Listener] = []


@pytest.fixture(autouse=True)
async def _cleanup():
    yield
    while _LISTENERS:
        lst = _LISTENERS.pop()
        lst.close()
        lst.registry.abort_all()
    while backends.LIVE:
        await backends.LIVE[-1].close()


def make_pool(ports, protocol="tcp", **opts) -> Pool:
    eps = tuple(Endpoint(id=f"e{i}", address="127.0.0.1", port=p) for i, p in enumerate(ports))
    route = Route(port=1, endpoints=eps, listen_host="127.0.0.1", protocol=protocol)
    return Pool("svc", route, ServiceOptions(**opts), rng=random.Random(7))


def start_listener(pool: Pool, protocol="tcp") -> Listener:
    lst = Listener("127.0.0.1", 0, pool, service=pool.service, protocol=protocol)
    lst.start()
    _LISTENERS.append(lst)
    return lst


async def closed_by_mesh(r: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True when the mesh closed the connection (EOF or reset) within ``timeout``."""
    try:
        return await asyncio.wait_for(r.read(), timeout) == b""
    except ConnectionResetError:
        return True


async def finish(lst: Listener) -> None:
    await wait_for(lambda: len(lst.registry) == 0, what=f"connections of {lst!r} to close: {list(lst.registry)}")
    for h in lst.pool.hosts:
        assert h.active == 0, h


def header_for(version: str, src=CARRIED) -> bytes:
    return encode_v1(src, DST) if version == "v1" else encode_v2(src, DST)


async def write_bytewise(w: asyncio.StreamWriter, data: bytes, *, may_close: bool = False) -> None:
    """One byte per segment (TCP_NODELAY, a short pause between them); with ``may_close``, stop
    quietly when the mesh closes the connection meanwhile."""
    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(data)):
        try:
            w.write(data[i : i + 1])
            await w.drain()
        except (ConnectionError, RuntimeError):  # (uvloop: RuntimeError on a closed transport)
            if may_close:
                return
            raise
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "bytewise"])
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_carried_address_is_what_the_replica_sees(version, split):
    b = await Backend("a", "proxyhdr").start()
    lst = start_listener(make_pool([b.port], accept_proxy=TRUSTED, proxy_protocol="v2"))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    if split:
        await write_bytewise(w, header_for(version) + b"after")
    else:
        w.write(header_for(version) + b"after")  # the header and data in one segment
    assert await asyncio.wait_for(r.readexactly(5), 5) == b"after"
    w.write(b" more")
    assert await asyncio.wait_for(r.readexactly(5), 5) == b" more"
    (conn,) = list(lst.registry)
    assert conn.client == CARRIED and conn.state == "open"
    w.close()
    (hdr,) = b.headers
    assert hdr.src == CARRIED and hdr.dst == ("127.0.0.1", lst.port)
    await finish(lst)
    assert lst.inbound_stats.headers == 1 and not any(lst.inbound_stats.closed.values())
    assert lst.pool.stats.accepted == 1 and lst.pool.hosts[0].stats.bytes_in == 10


@pytest.mark.parametrize(
    "header", [encode_v2(CARRIED, DST, local=True), b"PROXY UNKNOWN\r\n"], ids=["local", "unknown"]
)
async def test_local_and_unknown_keep_the_peer_address(header):
    b = await Backend("a", "proxyhdr").start()
    lst = start_listener(make_pool([b.port], accept_proxy=TRUSTED, proxy_protocol="v1"))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    me = w.get_extra_info("sockname")
    w.write(header + b"ping")
    assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
    w.close()
    assert b.headers[0].src == ("127.0.0.1", me[1])
    await finish(lst)


async def test_hash_balances_on_the_carried_address():
    bs = [await Backend(f"e{i}", "ident").start() for i in range(3)]
    pool = make_pool([b.port for b in bs], accept_proxy=TRUSTED, balance="hash")
    lst = start_listener(pool)

    async def landed(src) -> str:
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(encode_v2(src, DST))
        name = (await asyncio.wait_for(r.readline(), 5)).decode().strip()
        w.close()
        return name

    ips = [f"198.18.{i}.{i * 7 % 250 + 1}" for i in range(12)]
    got = {ip: await landed((ip, 1000 + i)) for i, ip in enumerate(ips)}
    assert got == {ip: pool.choose((ip, 0)).id for ip in ips}  # the ring's choice for the carried IP
    assert len(set(got.values())) > 1  # (and not the one peer 127.0.0.1 for all)
    assert {ip: await landed((ip, 9)) for ip in ips[:4]} == {ip: got[ip] for ip in ips[:4]}  # the port is ignored
    await finish(lst)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "missing_header"),
        (b"PROXY TCP4 1.2.3.4 nope 1 2\r\n", "bad_header"),
        (V2_SIGNATURE + b"\x22", "bad_header"),
    ],
)
async def test_a_trusted_peer_without_a_good_header_is_closed_and_counted(first, reason):
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port], accept_proxy=TRUSTED))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(first)
    assert await closed_by_mesh(r)
    w.close()
    await finish(lst)
    assert lst.inbound_stats.closed[reason] == 1 and lst.inbound_stats.headers == 0
    assert b.connections == 0 and lst.pool.stats.accepted == 0  # nothing reached a replica


async def test_a_trusted_peer_that_closes_early_is_incomplete():
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port], accept_proxy=TRUSTED))
    for data in (b"", b"PROXY TCP4 1.2.3.4"):
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(data)
        w.write_eof()
        assert await closed_by_mesh(r)
        w.close()
    await finish(lst)
    assert lst.inbound_stats.closed["incomplete"] == 2 and b.connections == 0


@pytest.mark.parametrize("header", [encode_v1(CARRIED, DST), encode_v2(CARRIED, DST)], ids=["v1", "v2"])
async def test_an_untrusted_peer_with_a_header_is_closed_and_counted(header):
    b = await Backend("a", "proxyhdr").start()
    lst = start_listener(make_pool([b.port], accept_proxy=UNTRUSTED, proxy_protocol="v2"))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    await write_bytewise(w, header[:14], may_close=True)  # judged on as many bytes as have arrived
    assert await closed_by_mesh(r)
    w.close()
    await finish(lst)
    assert lst.inbound_stats.closed["untrusted_header"] == 1
    assert b.bytes_received <= 28  # at most the mesh's own header reached the replica, nothing of the client's


async def test_an_untrusted_peer_is_served_as_a_direct_client_even_when_the_server_speaks_first():
    b = await Backend("a", "ident").start()
    lst = start_listener(make_pool([b.port], accept_proxy=UNTRUSTED))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    assert await asyncio.wait_for(r.readline(), 5) == b"a\n"  # without a byte from the client
    (conn,) = list(lst.registry)
    assert conn.client[0] == "127.0.0.1"
    await write_bytewise(w, b"PRO")  # could still be "PROXY ": held...
    w.write(b"mpt\n")  # ...until it cannot
    assert await asyncio.wait_for(r.readline(), 5) == b"PROmpt\n"
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()
    await finish(lst)
    assert lst.inbound_stats.headers == 0 and not any(lst.inbound_stats.closed.values())
    assert lst.pool.stats.accepted == 1 and b.eofs == 1


async def test_an_untrusted_peers_eof_while_its_bytes_are_held_is_passed_on():
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port], accept_proxy=UNTRUSTED))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(b"\r\n")  # a prefix of the v2 signature
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 5) == b"\r\n"  # echoed: the held bytes, then EOF both ways
    w.close()
    await finish(lst)


async def test_the_header_deadline_is_from_accept_not_an_inactivity_timer(monkeypatch):
    monkeypatch.setattr(inbound, "HEADER_TIMEOUT", 0.3)
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port], accept_proxy=TRUSTED))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    slow = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443"  # no CRLF: one byte every 50 ms
    closed = False
    for i in range(len(slow)):
        try:
            w.write(slow[i : i + 1])
            await w.drain()
        except ConnectionError:
            closed = True
            break
        if r.at_eof() or w.is_closing():
            closed = True
            break
        await asyncio.sleep(0.05)
        if lst.inbound_stats.closed["timeout"]:
            closed = True
            break
    assert closed, "kept open while bytes kept coming"
    assert await closed_by_mesh(r)
    assert loop.time() - start < 2.0
    w.close()
    await finish(lst)
    assert lst.inbound_stats.closed["timeout"] == 1 and b.connections == 0


async def test_the_access_log_has_the_carried_client_and_the_refusal_reason(caplog):
    b = await Backend("a").start()
    pool = make_pool([b.port], accept_proxy=TRUSTED)
    lst = Listener("127.0.0.1", 0, pool, service="svc", access_log=True)
    lst.start()
    _LISTENERS.append(lst)
    with caplog.at_level(logging.INFO, logger="mesh.access"):
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(encode_v1(CARRIED, DST) + b"x")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b"x"
        w.close()
        await finish(lst)
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(b"no header")
        assert await closed_by_mesh(r)
        w.close()
        await finish(lst)
    lines = [(rec.client, rec.endpoint, rec.reason) for rec in caplog.records if rec.name == "mesh.access"]
    assert lines[0] == ("203.0.113.7:4242", "e0", lines[0][2]) and lines[0][2] != "missing_header"
    assert lines[1][1:] == ("-", "missing_header") and lines[1][0].startswith("127.0.0.1:")


async def test_without_accept_proxy_a_header_is_data():
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port]))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(encode_v1(CARRIED, DST))
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 5) == encode_v1(CARRIED, DST)
    w.close()
    await finish(lst)
    assert lst.inbound_stats.headers == 0


async def test_shutdown_during_the_header_phase_closes_the_connection():
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port], accept_proxy=TRUSTED))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(b"PROXY TCP4")
    await wait_for(lambda: len(lst.registry) == 1)
    assert lst.registry.abort_all() == 1
    assert await closed_by_mesh(r)
    w.close()
    await finish(lst)
    assert not any(lst.inbound_stats.closed.values())  # a shutdown is not the client's fault


# -- real sockets: the tls front ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


async def tls_server(ca: trustme.CA) -> asyncio.AbstractServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("a.example.com").configure_cert(ctx)

    async def handle(r, w):
        try:
            line = await r.readline()
            w.write(b"tls " + line)
            await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


def tls_client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_tls_passthrough_after_a_header(ca, version):
    server = await tls_server(ca)
    try:
        port = server.sockets[0].getsockname()[1]
        lst = start_listener(make_pool([port], protocol="tls", accept_proxy=TRUSTED), protocol="tls")
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(header_for(version))
        await w.drain()
        await w.start_tls(tls_client(ca), server_hostname="a.example.com")
        (conn,) = list(lst.registry)
        assert conn.client == CARRIED  # balancing, replica header and access log use it
        w.write(b"hello\n")
        assert await asyncio.wait_for(r.readline(), 5) == b"tls hello\n"
        w.close()
        await finish(lst)
        assert lst.inbound_stats.headers == 1 and lst.sni_stats.routed == 1
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("cidrs", "first", "reason"),
    [
        (TRUSTED, b"\x16\x03\x01\x00\x05hello", "missing_header"),
        (TRUSTED, b"PROXY TCP5 x\r\n", "bad_header"),
        (UNTRUSTED, encode_v2(CARRIED, DST), "untrusted_header"),
    ],
)
async def test_tls_first_bytes_refused(cidrs, first, reason):
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port], protocol="tls", accept_proxy=cidrs), protocol="tls")
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(first)
    assert await closed_by_mesh(r)
    w.close()
    await finish(lst)
    assert lst.inbound_stats.closed[reason] == 1 and b.connections == 0
    assert not any(lst.sni_stats.closed.values())


async def test_tls_header_deadline(monkeypatch):
    monkeypatch.setattr(inbound, "HEADER_TIMEOUT", 0.2)
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port], protocol="tls", accept_proxy=TRUSTED), protocol="tls")
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(b"PROXY TCP4 ")
    assert await closed_by_mesh(r, 3)
    w.close()
    await finish(lst)
    assert lst.inbound_stats.closed["timeout"] == 1 and lst.sni_stats.closed["timeout"] == 0


async def test_tls_untrusted_peer_is_a_direct_client(ca):
    server = await tls_server(ca)
    try:
        port = server.sockets[0].getsockname()[1]
        lst = start_listener(make_pool([port], protocol="tls", accept_proxy=UNTRUSTED), protocol="tls")
        r, w = await asyncio.open_connection("127.0.0.1", lst.port, ssl=tls_client(ca), server_hostname="a.example.com")
        w.write(b"direct\n")
        assert await asyncio.wait_for(r.readline(), 5) == b"tls direct\n"
        w.close()
        await finish(lst)
        assert lst.inbound_stats.headers == 0 and lst.sni_stats.routed == 1
    finally:
        server.close()
        await server.wait_closed()


# -- real sockets: the http front --------------------------------------------------------------------


@pytest.fixture
async def http_backends():
    made: list[HttpBackend] = []

    async def make(*names: str) -> list[HttpBackend]:
        out = [await HttpBackend(n).start() for n in names]
        made.extend(out)
        return out

    yield make
    for b in made:
        await b.close()


def http_listener(backends_: list[HttpBackend], access_log: bool = False, **opts) -> Listener:
    pool = make_pool([b.port for b in backends_], protocol="http", **opts)
    lst = Listener("127.0.0.1", 0, pool, service="svc", protocol="http", access_log=access_log)
    lst.start()
    _LISTENERS.append(lst)
    return lst


GET = b"GET /echo HTTP/1.1\r\nHost: shop.example.com\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\r\n"


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "bytewise"])
@pytest.mark.parametrize(("version", "src"), [("v1", CARRIED), ("v2", CARRIED), ("v2", CARRIED6)])
async def test_http_the_carried_address_is_the_client_of_every_request(http_backends, caplog, version, src, split):
    (b,) = await http_backends("a")
    lst = http_listener([b], access_log=True, accept_proxy=TRUSTED)
    with caplog.at_level(logging.INFO, logger="mesh.access"):
        async with Client(lst.port) as c:
            hdr = encode_v1(src, DST) if version == "v1" else encode_v2(src, DST)
            if split:
                await write_bytewise(c.w, hdr + GET)
            else:
                await c.send(hdr + GET)  # the header and the first request in one segment
            assert (await c.response()).status == 200
            await c.send(GET)  # the next request on the connection: the same client
            assert (await c.response()).status == 200
    ip = src[0]
    node = f'"[{ip}]"' if ":" in ip else ip
    for req in b.requests:
        assert req.values("x-forwarded-for") == [ip]  # the direct client's XFF is replaced, by the carried one
        assert req.value("forwarded") == f'for={node};proto=http;host="shop.example.com"'
    assert len(b.requests) == 2
    await finish(lst)
    assert lst.inbound_stats.headers == 1 and not any(lst.inbound_stats.closed.values())
    clients = [rec.client for rec in caplog.records if rec.name == "mesh.access"]
    assert clients == [f"{ip}:{src[1]}"] * 2


@pytest.mark.parametrize(
    ("carried", "kept"), [("203.0.113.7", True), ("198.51.100.9", False)], ids=["forwarder", "not-a-forwarder"]
)
async def test_http_trusted_forwarders_are_decided_on_the_carried_address(http_backends, carried, kept):
    (b,) = await http_backends("a")
    # The balancer (127.0.0.1, the peer) is trusted for PROXY headers only; forwarders are 203.0.113.0/24.
    lst = http_listener([b], accept_proxy=TRUSTED, http_trusted=("203.0.113.0/24",))
    async with Client(lst.port) as c:
        await c.send(encode_v2((carried, 1234), DST) + GET)
        assert (await c.response()).status == 200
    (req,) = b.requests
    if kept:
        assert req.value("x-forwarded-for") == f"6.6.6.6, {carried}"
        assert req.value("forwarded").startswith(f"for=6.6.6.6, for={carried};")
    else:
        assert req.value("x-forwarded-for") == carried
        assert req.value("forwarded").startswith(f"for={carried};")
    await finish(lst)


async def test_http_a_peer_in_http_trusted_is_not_a_forwarder_once_it_sent_a_proxy_header(http_backends):
    (b,) = await http_backends("a")
    lst = http_listener([b], accept_proxy=TRUSTED, http_trusted=TRUSTED)  # the peer is in both
    async with Client(lst.port) as c:
        await c.send(encode_v1(CARRIED, DST) + GET)  # the header names a client outside http_trusted
        assert (await c.response()).status == 200
        await c.send(encode_v2(None, None) + GET)  # (not a header any more: a bad request, closed)
        assert (await c.response()).status == 400
    async with Client(lst.port) as c:
        await c.send(encode_v2(CARRIED, DST, local=True) + GET)  # LOCAL: the peer stays the client
        assert (await c.response()).status == 200
    first, local = b.requests
    assert first.value("x-forwarded-for") == CARRIED[0]
    assert local.value("x-forwarded-for") == "6.6.6.6, 127.0.0.1"  # the peer itself is a trusted forwarder
    await finish(lst)


async def test_http_hash_balances_every_request_on_the_carried_address(http_backends):
    bs = await http_backends("e0", "e1", "e2")
    lst = http_listener(bs, accept_proxy=TRUSTED, balance="hash")
    by_port = {b.port: f"e{i}" for i, b in enumerate(bs)}

    async def landed(src) -> list[str]:
        async with Client(lst.port) as c:
            await c.send(encode_v2(src, DST))
            names = []
            for _ in range(2):
                await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                names.append((await c.response()).value("x-backend"))
        return names

    ips = [f"198.18.{i}.{i * 7 % 250 + 1}" for i in range(10)]
    got = {ip: await landed((ip, 1000 + i)) for i, ip in enumerate(ips)}
    pool = lst.pool
    want = {ip: [by_port[pool.choose((ip, 0)).endpoint.port]] * 2 for ip in ips}
    assert got == want
    assert len({v[0] for v in got.values()}) > 1  # not the one peer 127.0.0.1 for all
    await finish(lst)


async def test_http_the_proxy_header_to_replicas_names_the_carried_client(http_backends):
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await r.readuntil(b"\r\n\r\n"))
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        await r.read()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        pool = make_pool([srv.sockets[0].getsockname()[1]], protocol="http", accept_proxy=TRUSTED, proxy_protocol="v1")
        lst = Listener("127.0.0.1", 0, pool, service="svc", protocol="http")
        lst.start()
        _LISTENERS.append(lst)
        async with Client(lst.port) as c:
            await c.send(encode_v2(CARRIED, DST))
            for _ in range(2):
                await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await c.response()).status == 200
        assert len(got) == 2
        assert all(g.startswith(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 %d\r\n" % lst.port) for g in got)
        await finish(lst)
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("cidrs", "first", "reason"),
    [
        (TRUSTED, GET, "missing_header"),
        (TRUSTED, b"PROXY TCP4 1.2.3.4 nope 1 2\r\n" + GET, "bad_header"),
        (TRUSTED, V2_SIGNATURE + b"\x22", "bad_header"),
        (UNTRUSTED, encode_v1(CARRIED, DST) + GET, "untrusted_header"),
        (UNTRUSTED, encode_v2(CARRIED, DST) + GET, "untrusted_header"),
    ],
)
async def test_http_first_bytes_refused_without_a_response(http_backends, cidrs, first, reason):
    (b,) = await http_backends("a")
    lst = http_listener([b], accept_proxy=cidrs)
    async with Client(lst.port) as c:
        await c.send(first)
        assert await c.closed()  # no HTTP response: the connection never was HTTP
    await finish(lst)
    assert lst.inbound_stats.closed[reason] == 1 and lst.inbound_stats.headers == 0
    assert b.connections == 0 and lst.http.stats.requests == 0


async def test_http_a_trusted_peer_that_closes_early_is_incomplete(http_backends):
    (b,) = await http_backends("a")
    lst = http_listener([b], accept_proxy=TRUSTED)
    for data in (b"", b"PROXY TCP4 1.2.3.4"):
        async with Client(lst.port) as c:
            await c.send(data)
            c.w.write_eof()
            assert await c.closed()
    await finish(lst)
    assert lst.inbound_stats.closed["incomplete"] == 2 and b.connections == 0


async def test_http_the_header_deadline_is_from_accept(http_backends, monkeypatch):
    monkeypatch.setattr(inbound, "HEADER_TIMEOUT", 0.3)
    (b,) = await http_backends("a")
    lst = http_listener([b], accept_proxy=TRUSTED)
    loop = asyncio.get_running_loop()
    start = loop.time()
    slow = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443"  # no CRLF: one byte every 50 ms
    async with Client(lst.port) as c:
        for i in range(len(slow)):
            if lst.inbound_stats.closed["timeout"] or c.r.at_eof():
                break
            try:
                c.w.write(slow[i : i + 1])
                await c.w.drain()
            except (ConnectionError, RuntimeError):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("kept open while bytes kept coming")
        assert await c.closed()
    assert loop.time() - start < 2.0
    await finish(lst)
    assert lst.inbound_stats.closed["timeout"] == 1 and b.connections == 0


async def test_http_an_untrusted_peer_is_a_direct_client_and_its_held_bytes_are_its_request(http_backends):
    (b,) = await http_backends("a")
    lst = http_listener([b], accept_proxy=UNTRUSTED)
    async with Client(lst.port) as c:
        # "PRO" could still be "PROXY ": held until the next byte says otherwise.
        await write_bytewise(c.w, b"PRO")
        await c.send(b"PFIND /echo HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        assert (await c.response()).status == 200
    (req,) = b.requests
    assert req.method == "PROPFIND" and req.value("x-forwarded-for") == "127.0.0.1"
    await finish(lst)
    assert lst.inbound_stats.headers == 0 and not any(lst.inbound_stats.closed.values())


async def test_http_without_accept_proxy_a_header_is_a_bad_request(http_backends):
    (b,) = await http_backends("a")
    lst = http_listener([b])
    async with Client(lst.port) as c:
        await c.send(encode_v1(CARRIED, DST) + GET)
        assert (await c.response()).status == 400
    await finish(lst)
    assert b.connections == 0 and lst.inbound_stats.headers == 0
