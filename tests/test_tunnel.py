"""The agent-to-agent tunnel: header encoding/decoding (pure) and the server over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct
from types import SimpleNamespace

import pytest

from cluster.tunnel import (
    MAX_HEADER_BODY,
    LocalTarget,
    TunnelAuth,
    TunnelRefused,
    TunnelServer,
    host_tunnel_header,
    parse_tunnel_header,
    proxy_header,
    tunnel_header,
)
from mesh import proxyproto
from mesh.pool import Pool
from mesh.proxy.preamble import TUNNEL_ACK
from mesh.proxy.splice import WRITE_HIGH, Splice
from mesh.proxyproto import PP2_TYPE_MESH_TARGET, V2_SIGNATURE
from mesh.routing import Endpoint, Route, ServiceOptions
from tests.backends import CHUNK
from tests.util import wait_for

CLIENT = ("203.0.113.7", 40000)
SMALL_BUF = 64 * 1024
BIG = bytes(range(256)) * (8 * 4096)  # 8 MiB: more than every buffer on the way can hold
PUBLISHED = ("10.0.0.1", 8080)

# ---------------------------------------------------------------------------------------------
# Pure: encoding


def test_tunnel_header_golden_bytes_ipv4() -> None:
    assert PP2_TYPE_MESH_TARGET == 0xE0  # documented wire value; never change it
    got = tunnel_header(CLIENT, PUBLISHED, "task1")
    want = (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        b"\x21"  # version 2, command PROXY
        b"\x11"  # TCP over IPv4
        b"\x00\x14"  # 12 address bytes + 3 TLV header + 5 value = 20
        b"\xcb\x00\x71\x07"  # 203.0.113.7
        b"\x0a\x00\x00\x01"  # 10.0.0.1
        b"\x9c\x40"  # 40000
        b"\x1f\x90"  # 8080
        b"\xe0\x00\x05task1"  # TLV 0xE0 target "task1"
    )
    assert got == want


@pytest.mark.parametrize(
    ("client", "dst", "want_src", "want_dst", "fam"),
    [
        (CLIENT, PUBLISHED, CLIENT, PUBLISHED, 0x11),
        (("2001:db8::1", 1), ("2001:db8::2", 2), ("2001:db8::1", 1), ("2001:db8::2", 2), 0x21),
        # A dual-stack listener reports v4 clients mapped; both v4 in the end -> TCP4.
        (("::ffff:192.0.2.1", 5), ("192.0.2.2", 6), ("192.0.2.1", 5), ("192.0.2.2", 6), 0x11),
        # A real mix is sent as TCP6 with the v4 side mapped.
        (("192.0.2.1", 5), ("2001:db8::2", 6), ("::ffff:192.0.2.1", 5), ("2001:db8::2", 6), 0x21),
    ],
)
def test_tunnel_header_round_trip(client, dst, want_src, want_dst, fam: int) -> None:
    raw = tunnel_header(client, dst, "xyz-ü")
    assert raw[13] == fam
    header, consumed = parse_tunnel_header(raw + b"payload")
    assert consumed == len(raw)
    assert header.source == want_src
    assert header.destination == want_dst
    assert header.target == "xyz-ü"


def test_parse_is_incremental_every_prefix_needs_more() -> None:
    raw = tunnel_header(CLIENT, PUBLISHED, "t" * 40)
    for i in range(len(raw)):
        assert parse_tunnel_header(raw[:i]) is None, i
    assert parse_tunnel_header(raw)[1] == len(raw)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((CLIENT, PUBLISHED, ""), "target id"),
        ((CLIENT, PUBLISHED, "x" * 256), "target id"),
        ((CLIENT, PUBLISHED, "a\nb"), "target id"),
        ((("not-an-ip", 1), PUBLISHED, "t"), "client_addr"),
        ((CLIENT, ("10.0.0.1", 70000), "t"), "dst_addr"),
    ],
)
def test_tunnel_header_rejects_bad_arguments(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tunnel_header(*args)


def test_host_tunnel_header_names_the_endpoint_id() -> None:
    """The adapter the data plane calls for a host with ``via``: target = task id and target port, not the address."""
    host = SimpleNamespace(endpoint=Endpoint("task9", "10.255.0.9", 80, node="n2", via="10.0.0.2:7481"))
    raw = host_tunnel_header(host, CLIENT, PUBLISHED)
    assert raw == tunnel_header(CLIENT, PUBLISHED, "task9:80")
    with pytest.raises(ValueError, match="needs the client and local addresses"):
        host_tunnel_header(host, None, PUBLISHED)


def test_proxy_header_for_the_replica_carries_the_original_client_and_no_tlv() -> None:
    assert proxy_header("v1", CLIENT, PUBLISHED) == b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 8080\r\n"
    v2 = proxy_header("v2", CLIENT, PUBLISHED)
    header, n = proxyproto.decode(v2)
    assert n == len(v2) == 16 + 12
    assert (header.src, header.dst, header.tlvs) == (CLIENT, PUBLISHED, ())
    with pytest.raises(ValueError, match="v1' or 'v2"):
        proxy_header("v3", CLIENT, PUBLISHED)


# ---------------------------------------------------------------------------------------------
# Pure: strict decoding, table-driven

GOOD = tunnel_header(CLIENT, PUBLISHED, "task1")
ADDR4 = GOOD[16:28]


def _v2(ver_cmd: int = 0x21, fam: int = 0x11, body: bytes = ADDR4 + b"\xe0\x00\x05task1", length: int | None = None):
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + struct.pack("!H", len(body) if length is None else length) + body


MALFORMED = [
    ("HTTP request", b"GET / HTTP/1.1\r\n", "signature"),
    ("first byte wrong is refused at once", b"X", "signature"),
    ("PROXY v1 text header", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature"),
    ("signature off by one byte", V2_SIGNATURE[:11] + b"X", "signature"),
    ("version 1 in the binary header", _v2(ver_cmd=0x11), "version"),
    ("LOCAL command", _v2(ver_cmd=0x20), "version"),
    ("version byte seen before the rest arrives", V2_SIGNATURE + b"\x31", "version"),
    ("UDP over IPv4", _v2(fam=0x12), "family"),
    ("UNIX stream", _v2(fam=0x31), "family"),
    ("UNSPEC", _v2(fam=0x00, body=b""), "family"),
    ("length leaves no room for a TLV", _v2(body=ADDR4), "length"),
    ("length too short for IPv6", _v2(fam=0x21, body=ADDR4 + b"\xe0\x00\x05task1"), "length"),
    ("length above the bound", _v2(length=MAX_HEADER_BODY + 1), "length"),
    ("length field 0xffff", _v2(length=0xFFFF), "length"),
    ("TLV area ends mid TLV header", _v2(body=ADDR4 + b"\xe0\x00\x05task1\x04\x00"), "tlv"),
    ("TLV value runs past the header", _v2(body=ADDR4 + b"\xe0\x00\x09task1"), "tlv"),
    # The dialer's data arrived inside the declared header length: parsed as TLVs, it cannot fit.
    ("data before the header completes", _v2(length=len(ADDR4) + 8 + 10) + b"0123456789", "tlv"),
    ("two target TLVs", _v2(body=ADDR4 + b"\xe0\x00\x01a\xe0\x00\x01b"), "tlv"),
    ("no target TLV", _v2(body=ADDR4 + b"\x04\x00\x02xx"), "target"),
    ("empty target", _v2(body=ADDR4 + b"\xe0\x00\x00"), "target"),
    ("target not UTF-8", _v2(body=ADDR4 + b"\xe0\x00\x02\xff\xfe"), "target"),
    ("target with a control character", _v2(body=ADDR4 + b"\xe0\x00\x03a\x00b"), "target"),
    ("target longer than 255 bytes", _v2(body=ADDR4 + b"\xe0\x01\x00" + b"a" * 256), "target"),
]


@pytest.mark.parametrize(("raw", "reason"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_parse_refuses_malformed_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(TunnelRefused) as info:
        parse_tunnel_header(raw)
    assert info.value.reason == reason


def test_parse_ignores_other_tlvs() -> None:
    raw = _v2(body=ADDR4 + b"\x04\x00\x02xx" + b"\xe0\x00\x05task1" + b"\xe5\x00\x00")
    header, n = parse_tunnel_header(raw + b"rest")
    assert (header.target, n) == ("task1", len(raw))


# ---------------------------------------------------------------------------------------------
# Server over real sockets


class Backend:
    """A replica: records what it receives, echoes it back, follows EOF with EOF."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.received = bytearray()
        self.connections = 0
        self.eof = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.reader_go = asyncio.Event()  # cleared by a test that wants a replica that does not read
        self.reader_go.set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self, rcvbuf: int | None = None) -> Backend:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # inherited by accepted sockets
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        await self.reader_go.wait()
        try:
            while data := await reader.read(65536):
                self.received += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
            self.eof.set()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            await _close(writer)

    async def stop(self) -> None:
        assert self.server is not None
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


async def _tunnel(targets: dict[str, LocalTarget], allowed=("127.0.0.1",), **kw) -> TunnelServer:
    srv = TunnelServer(targets.get, set(allowed), "127.0.0.1", 0, **kw)
    await srv.start()
    return srv


async def _dial(srv: TunnelServer, local: str = "127.0.0.1", rcvbuf: int | None = None):
    if rcvbuf is None:
        return await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(local, 0))
    # A fixed small receive buffer turns off autotuning (tcp_rmem max is 32 MiB here),
    # so a dialer that does not read pushes back after a few kB.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)
    sock.bind((local, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
    return await asyncio.open_connection(sock=sock)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server closed or reset the connection without sending a byte."""
    try:
        data = await asyncio.wait_for(reader.read(1), 5)
    except ConnectionResetError:
        return True
    return data == b""


async def _roundtrip_ok(srv: TunnelServer, target: str = "task1") -> None:
    reader, writer = await _dial(srv)
    writer.write(tunnel_header(CLIENT, PUBLISHED, target) + b"still serving")
    assert await asyncio.wait_for(reader.readexactly(13), 5) == b"still serving"
    await _close(writer)


async def test_forwards_both_ways_and_passes_half_close_on() -> None:
    backend = await Backend().start()
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", backend.port)})
    try:
        reader, writer = await _dial(srv)
        # Header and first data in one segment, as a dialer sends them.
        writer.write(tunnel_header(CLIENT, PUBLISHED, "task1") + b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        writer.write(b"second")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"second"
        writer.write_eof()
        await asyncio.wait_for(backend.eof.wait(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the backend's EOF came back
        await _close(writer)
        await wait_for(lambda: srv.connections() == 0, what="tunnel connection closed")
        assert bytes(backend.received) == b"pingsecond"  # no header leaked to the replica
        assert srv.stats.forwarded == 1
        assert srv.stats.refused == {}
        assert (srv.stats.bytes_in, srv.stats.bytes_out, srv.stats.active) == (10, 10, 0)
    finally:
        await srv.stop()
        await backend.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_replica_gets_proxy_header_with_the_original_client(version: str) -> None:
    backend = await Backend(echo=False).start()
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", backend.port, version)})
    try:
        _reader, writer = await _dial(srv)
        writer.write(tunnel_header(CLIENT, PUBLISHED, "task1") + b"hello")
        writer.write_eof()
        await asyncio.wait_for(backend.eof.wait(), 5)
        header, n = proxyproto.decode(bytes(backend.received))
        assert header.version == int(version[1])
        assert (header.src, header.dst, header.tlvs) == (CLIENT, PUBLISHED, ())
        assert bytes(backend.received[n:]) == b"hello"
        await _close(writer)
    finally:
        await srv.stop()
        await backend.stop()


async def test_refuses_peer_that_is_not_a_cluster_node_then_admits_it_when_allowed() -> None:
    backend = await Backend().start()
    allowed = {"127.0.0.1"}
    srv = TunnelServer({"task1": LocalTarget("127.0.0.1", backend.port)}.get, allowed, "127.0.0.1", 0)
    await srv.start()
    try:
        reader, writer = await _dial(srv, local="127.0.0.2")
        writer.write(tunnel_header(CLIENT, PUBLISHED, "task1") + b"x")
        assert await _closed_by_server(reader)
        await _close(writer)
        assert srv.stats.refused == {"peer": 1}
        assert backend.connections == 0
        await _roundtrip_ok(srv)
        # The node list changed: 127.0.0.2 is now a cluster node.
        allowed.add("127.0.0.2")
        reader, writer = await _dial(srv, local="127.0.0.2")
        writer.write(tunnel_header(CLIENT, PUBLISHED, "task1") + b"ok")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
        await _close(writer)
        # A predicate works as well.
        srv.allowed_peers = lambda ip: ip == "127.0.0.1"
        reader, writer = await _dial(srv, local="127.0.0.2")
        assert await _closed_by_server(reader)
        await _close(writer)
        assert srv.stats.refused == {"peer": 2}
    finally:
        await srv.stop()
        await backend.stop()


SOCKET_CASES = [
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "signature"),
    ("v1 header", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature"),
    ("LOCAL command", _v2(ver_cmd=0x20), "version"),
    ("data before the header completes", _v2(length=len(ADDR4) + 8 + 10) + b"0123456789", "tlv"),
    ("no target", _v2(body=ADDR4 + b"\x04\x00\x02xx"), "target"),
    ("unknown target", tunnel_header(CLIENT, PUBLISHED, "not-local") + b"data", "unknown_target"),
]


@pytest.mark.parametrize(("raw", "reason"), [c[1:] for c in SOCKET_CASES], ids=[c[0] for c in SOCKET_CASES])
async def test_refuses_bad_headers_and_keeps_serving(raw: bytes, reason: str) -> None:
    backend = await Backend().start()
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", backend.port)})
    try:
        reader, writer = await _dial(srv)
        writer.write(raw)
        assert await _closed_by_server(reader)
        await _close(writer)
        assert srv.stats.refused == {reason: 1}
        assert backend.connections == 0
        await _roundtrip_ok(srv)
        assert srv.stats.forwarded == 1
    finally:
        await srv.stop()
        await backend.stop()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (tunnel_header(CLIENT, PUBLISHED, "not-local"), "unknown_target"),
        (b"GET / HTTP/1.0\r\n\r\n", "signature"),
    ],
    ids=["whole header, nothing after it", "garbage read in full"],
)
async def test_a_refusal_is_a_reset_even_when_every_byte_was_read(raw: bytes, reason: str) -> None:
    # Without SO_LINGER 0 a socket whose bytes were all read closes with FIN, and the
    # dialer cannot tell a refusal from a replica that answered nothing.
    srv = await _tunnel({})
    try:
        reader, writer = await _dial(srv)
        writer.write(raw)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        await _close(writer)
        assert srv.stats.refused == {reason: 1}
    finally:
        await srv.stop()


async def test_truncated_header_times_out() -> None:
    backend = await Backend().start()
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", backend.port)}, header_timeout=0.2)
    try:
        reader, writer = await _dial(srv)
        writer.write(GOOD[:20])
        assert await _closed_by_server(reader)
        await _close(writer)
        assert srv.stats.refused == {"timeout": 1}
        # A header that completes in time is not affected by the timer.
        reader, writer = await _dial(srv)
        writer.write(GOOD[:20])
        await wait_for(lambda: srv.stats.accepted == 2, what="second connection accepted")
        writer.write(GOOD[20:] + b"late")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"late"
        await _close(writer)
        assert srv.stats.refused == {"timeout": 1}
    finally:
        await srv.stop()
        await backend.stop()


async def test_peer_closing_mid_header_counts_incomplete() -> None:
    srv = await _tunnel({})
    try:
        reader, writer = await _dial(srv)
        writer.write(GOOD[:10])
        writer.write_eof()
        assert await _closed_by_server(reader)
        await _close(writer)
        await wait_for(lambda: srv.stats.refused == {"incomplete": 1}, what="incomplete counted")
        assert srv.connections() == 0
    finally:
        await srv.stop()


async def test_endpoint_that_refuses_is_counted_and_the_dialer_is_reset() -> None:
    # Bound but not listening: connects are refused, and nobody else can take the port meanwhile.
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", dead.getsockname()[1])})
    try:
        reader, writer = await _dial(srv)
        writer.write(GOOD + b"x")
        assert await _closed_by_server(reader)
        await _close(writer)
        assert srv.stats.refused == {"connect": 1}
        assert srv.stats.forwarded == 0
    finally:
        await srv.stop()
        dead.close()


async def test_backpressure_towards_a_slow_replica_and_integrity() -> None:
    """The replica reads nothing at first: the tunnel must stop reading from the dialer
    instead of buffering everything, then deliver every byte in order once it reads."""
    backend = Backend(echo=False)
    backend.reader_go.clear()
    await backend.start(rcvbuf=SMALL_BUF)
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", backend.port)})
    payload = BIG
    try:
        _reader, writer = await _dial(srv)
        writer.write(GOOD)
        writer.write(payload)  # lands in the dialer's buffer; no drain, so we are not blocked
        await wait_for(lambda: srv.stats.forwarded == 1, what="spliced")
        [conn] = list(srv.registry)
        await wait_for(lambda: not conn.transport.is_reading(), what="tunnel paused reading from the dialer")
        buffered = conn.up_transport.get_write_buffer_size()
        assert buffered < 1024 * 1024, buffered
        backend.reader_go.set()
        writer.write_eof()
        await asyncio.wait_for(backend.eof.wait(), 10)
        assert hashlib.sha256(backend.received).digest() == hashlib.sha256(payload).digest()
        await _close(writer)
    finally:
        await srv.stop()
        await backend.stop()


async def test_backpressure_towards_a_slow_dialer() -> None:
    """The dialer reads nothing: the tunnel must stop reading from the replica."""
    payload = BIG
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(payload)
            writer.write_eof()
            await writer.drain()
            await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()
            done.set()

    replica = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = replica.sockets[0].getsockname()[1]
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", port)})
    try:
        reader, writer = await _dial(srv, rcvbuf=SMALL_BUF)
        writer.write(GOOD)
        await wait_for(lambda: srv.stats.forwarded == 1, what="spliced")
        [conn] = list(srv.registry)
        await wait_for(lambda: not conn.up_transport.is_reading(), what="tunnel paused reading the replica")
        assert conn.transport.get_write_buffer_size() < 1024 * 1024
        got = await asyncio.wait_for(reader.read(), 10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        await _close(writer)
        await asyncio.wait_for(done.wait(), 5)  # the dialer's close reached the replica
    finally:
        await srv.stop()
        replica.close()
        await replica.wait_closed()


async def test_stop_aborts_open_connections_and_stops_accepting() -> None:
    backend = await Backend().start()
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", backend.port)})
    reader, writer = await _dial(srv)
    writer.write(GOOD + b"a")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
    port = srv.port
    await srv.stop(grace=0.05)
    assert await _closed_by_server(reader)
    await _close(writer)
    assert srv.connections() == 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await backend.stop()


def test_constructor_rejects_bad_timeouts() -> None:
    with pytest.raises(ValueError, match="header_timeout"):
        TunnelServer(dict().get, set(), header_timeout=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        TunnelServer(dict().get, set(), connect_timeout=-1)


async def test_resolve_may_answer_later_and_bytes_wait_for_it() -> None:
    """An agent that is about to list a new local task answers resolve() a moment later."""
    backend = await Backend().start()
    answer: asyncio.Future = asyncio.get_running_loop().create_future()
    asked: list[str] = []

    def resolve(target: str):
        asked.append(target)
        return answer

    srv = TunnelServer(resolve, {"127.0.0.1"}, "127.0.0.1", 0)
    await srv.start()
    try:
        reader, writer = await _dial(srv)
        writer.write(tunnel_header(CLIENT, PUBLISHED, "new-task:80") + b"early")
        await wait_for(lambda: asked == ["new-task:80"], what="resolve asked")
        writer.write(b" and later")
        assert backend.connections == 0
        answer.set_result(LocalTarget("127.0.0.1", backend.port))
        assert await asyncio.wait_for(reader.readexactly(15), 5) == b"early and later"
        assert srv.stats.forwarded == 1 and srv.stats.refused == {}
        await _close(writer)
    finally:
        await srv.stop()
        await backend.stop()


@pytest.mark.parametrize(("outcome", "reason"), [(None, "unknown_target"), (RuntimeError("bug"), "error")])
async def test_a_late_resolve_that_finds_nothing_or_fails_refuses(outcome, reason: str, caplog) -> None:
    async def resolve_later() -> LocalTarget | None:
        await asyncio.sleep(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    srv = TunnelServer(lambda t: resolve_later(), {"127.0.0.1"}, "127.0.0.1", 0)
    await srv.start()
    try:
        reader, writer = await _dial(srv)
        writer.write(tunnel_header(CLIENT, PUBLISHED, "ghost"))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        await _close(writer)
        assert srv.stats.refused == {reason: 1}
    finally:
        await srv.stop()


# -- the tunnel on the shared splice: what it gained ------------------------------------------------


def _local_pool(ports: list[int], **opts) -> Pool:
    eps = tuple(Endpoint(f"task{i}", "127.0.0.1", p) for i, p in enumerate(ports, 1))
    return Pool("svc", Route(port=8080, endpoints=eps), ServiceOptions(**opts), rng=random.Random(3))


def _pool_resolve(pool: Pool):
    """What the agent does (Mesh.local_host): the data plane's own pool and host for the target."""

    def resolve(target: str) -> LocalTarget | None:
        for h in pool.hosts:
            if f"{h.endpoint.id}:{h.port}" == target:
                return LocalTarget(h.address, h.port, pool.options.proxy_protocol, pool=pool, host=h)
        return None

    return resolve


async def test_a_refused_local_replica_is_retried_on_another_local_replica() -> None:
    """The target refuses (it died a moment ago): the tunnel dials another local replica of the same
    service, counts the failure on the refusing host, and the dialer never notices."""
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))  # bound, not listening: refused
    backend = await Backend().start()
    pool = _local_pool([dead.getsockname()[1], backend.port])
    srv = TunnelServer(_pool_resolve(pool), {"127.0.0.1"}, "127.0.0.1", 0)
    await srv.start()
    try:
        target = f"task1:{dead.getsockname()[1]}"
        reader, writer = await _dial(srv)
        writer.write(tunnel_header(CLIENT, PUBLISHED, target) + b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        first, second = pool.hosts
        assert first.consecutive_failures == 1 and first.stats.connections == 0
        assert second.stats.connections == 1 and second.active == 1  # shared with the data plane
        assert pool.stats.retries == 1 and pool.stats.connect_failures == {"refused": 1}
        assert srv.stats.forwarded == 1 and srv.stats.refused == {}
        await _close(writer)
        await wait_for(lambda: srv.connections() == 0 and second.active == 0, what="tunnel connection closed")
        assert (second.stats.bytes_in, second.stats.bytes_out) == (4, 4)
    finally:
        await srv.stop()
        await backend.stop()
        dead.close()


async def test_every_local_replica_refusing_resets_the_dialer() -> None:
    deads = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    for d in deads:
        d.bind(("127.0.0.1", 0))
    pool = _local_pool([d.getsockname()[1] for d in deads])
    srv = TunnelServer(_pool_resolve(pool), {"127.0.0.1"}, "127.0.0.1", 0)
    await srv.start()
    try:
        reader, writer = await _dial(srv)
        writer.write(tunnel_header(CLIENT, PUBLISHED, f"task1:{deads[0].getsockname()[1]}") + b"x")
        assert await _closed_by_server(reader)
        await _close(writer)
        assert srv.stats.refused == {"connect": 1} and srv.stats.forwarded == 0
        assert pool.stats.connect_failures == {"refused": 2} and pool.stats.failed == {"refused": 1}
        assert [h.active for h in pool.hosts] == [0, 0]
    finally:
        await srv.stop()
        for d in deads:
            d.close()


async def test_tunnel_idle_timeout_of_the_target_service_closes_an_idle_pair() -> None:
    backend = await Backend().start()
    pool = _local_pool([backend.port], idle_timeout=0.2)
    srv = TunnelServer(_pool_resolve(pool), {"127.0.0.1"}, "127.0.0.1", 0)
    await srv.start()
    try:
        reader, writer = await _dial(srv)
        writer.write(tunnel_header(CLIENT, PUBLISHED, f"task1:{backend.port}") + b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
        t0 = asyncio.get_running_loop().time()
        assert await _closed_by_server(reader)  # then nothing for 0.2 s: closed
        assert asyncio.get_running_loop().time() - t0 < 2
        await _close(writer)
        await wait_for(lambda: srv.connections() == 0, what="idle pair gone")
    finally:
        await srv.stop()
        await backend.stop()


@pytest.mark.uvloop_only
@pytest.mark.slow
async def test_tunnel_write_buffer_towards_a_stalled_replica_stays_bounded() -> None:
    """64 MiB into a replica that stops reading for a while: the tunnel's buffers stay within the
    splice's write limit (sampled every 5 ms, as the TCP proxy's test does), then every byte arrives."""
    total = 64 << 20
    backend = Backend(echo=False)
    backend.reader_go.clear()
    await backend.start(rcvbuf=SMALL_BUF)
    srv = await _tunnel({"task1": LocalTarget("127.0.0.1", backend.port)})
    loop = asyncio.get_running_loop()
    samples: list[int] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            for conn in list(srv.registry):
                if isinstance(conn, Splice):
                    sizes = [conn.transport.get_write_buffer_size()]
                    if conn.up_transport is not None:
                        sizes.append(conn.up_transport.get_write_buffer_size())
                    samples.append(max(sizes))
            await asyncio.sleep(0.005)

    sampler = loop.create_task(sample())
    sending: asyncio.Task | None = None
    try:
        _reader, writer = await _dial(srv)
        writer.write(GOOD)
        block = bytes(range(256)) * 256  # 64 KiB
        sent = hashlib.sha256()

        async def send() -> None:
            for _ in range(total // len(block)):
                writer.write(block)
                sent.update(block)
                await writer.drain()
            writer.write_eof()

        sending = loop.create_task(send())
        await wait_for(lambda: srv.stats.forwarded == 1, what="spliced")
        [conn] = list(srv.registry)
        await wait_for(lambda: not conn.transport.is_reading(), what="tunnel paused reading the dialer")
        await asyncio.sleep(0.3)  # stalled for a while, with the dialer pushing
        assert not sending.done()
        backend.reader_go.set()
        await asyncio.wait_for(sending, 60)
        await asyncio.wait_for(backend.eof.wait(), 60)
        assert len(backend.received) == total
        assert hashlib.sha256(backend.received).digest() == sent.digest()
        # the write limit plus what one read can add before pausing (uvloop reads up to 256 KiB), as in
        # tests/test_proxy.py's BOUND
        assert samples and max(samples) <= WRITE_HIGH + 2 * CHUNK, max(samples)
        await _close(writer)
    finally:
        stop.set()
        await sampler
        if sending is not None and not sending.done():
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        await srv.stop()
        await backend.stop()


async def test_mesh_local_host_gives_the_tunnel_the_data_planes_own_pool() -> None:
    """What the cluster agent wires (ClusterAgent._with_pool): a target "<task id>:<port>" resolves to the
    Mesh's own pool and host for that local replica, never to a remote (tunnelled) one."""
    from mesh.routing import RoutingTable, Service
    from mesh.runtime import Mesh

    backend = await Backend().start()
    mesh = Mesh(local_node="n1")
    eps = (
        Endpoint("t1", "127.0.0.1", backend.port, node="n1"),
        Endpoint("t2", "10.255.0.9", backend.port, node="n2", via="127.0.0.1:1"),
    )
    await mesh.apply(RoutingTable(1, (Service("web", (Route(0, eps, listen_host="127.0.0.1"),)),)))
    try:
        assert mesh.local_host("t2", backend.port) is None  # remote: a tunnel never tunnels again
        assert mesh.local_host("t1", backend.port + 1) is None  # same task, another port
        pool, host = mesh.local_host("t1", backend.port)
        assert host.endpoint.id == "t1" and host in pool.hosts

        def resolve(target: str) -> LocalTarget | None:
            ep_id, _, port = target.rpartition(":")
            hit = mesh.local_host(ep_id, int(port))
            return None if hit is None else LocalTarget(hit[1].address, hit[1].port, pool=hit[0], host=hit[1])

        srv = TunnelServer(resolve, {"127.0.0.1"}, "127.0.0.1", 0)
        await srv.start()
        try:
            reader, writer = await _dial(srv)
            writer.write(tunnel_header(CLIENT, PUBLISHED, f"t1:{backend.port}") + b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            assert host.active == 1 and host.stats.connections == 1  # counted where the data plane balances
            await _close(writer)
            await wait_for(lambda: host.active == 0, what="tunnel connection released")
        finally:
            await srv.stop()
    finally:
        await mesh.shutdown(0)
        await backend.stop()


async def test_dialer_retries_a_tunnel_the_remote_agent_refuses_replaying_the_first_bytes() -> None:
    """The dialling side: a remote agent that resets the tunnel before any byte came back (here: it does not
    know the target) is treated like a failed connect: the connection goes to another host, and the bytes the
    client already sent are sent again, so the client sees nothing (the sidecar issue's scale-up errors)."""
    from mesh.listener import Listener

    backend = await Backend().start()
    refusing = TunnelServer(lambda target: None, {"127.0.0.1"}, "127.0.0.1", 0)
    serving = TunnelServer(
        {f"t2:{backend.port}": LocalTarget("127.0.0.1", backend.port)}.get, {"127.0.0.1"}, "127.0.0.1", 0
    )
    await refusing.start()
    await serving.start()
    eps = (
        Endpoint("t1", "127.0.0.1", backend.port, node="n1", via=f"127.0.0.1:{refusing.port}"),
        Endpoint("t2", "127.0.0.1", backend.port, node="n2", via=f"127.0.0.1:{serving.port}"),
    )
    pool = Pool("svc", Route(port=0, endpoints=eps, listen_host="127.0.0.1"), ServiceOptions(), rng=random.Random(1))
    lst = Listener("127.0.0.1", 0, pool, service="svc")
    lst.start()
    try:
        for i in range(4):  # some of them go to the refusing node first
            reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
            msg = f"hello {i} ".encode() * 100
            writer.write(msg)  # sent before (and while) the first tunnel is refused
            assert await asyncio.wait_for(reader.readexactly(len(msg)), 5) == msg
            await _close(writer)
        await wait_for(lambda: len(lst.registry) == 0, what="connections closed")
        n = refusing.stats.refused.get("unknown_target", 0)
        assert n >= 1 and refusing.stats.refused == {"unknown_target": n} and serving.stats.forwarded == 4
        assert pool.stats.connect_failures == {"tunnel_refused": n} and pool.stats.retries == n
        assert pool.stats.failed == {}
        refused, served = pool.hosts
        # counted on the dialling node like connect failures: three in a row eject the refusing host
        assert refused.stats.ejections == (1 if n >= 3 else 0) and refused.active == 0 and served.active == 0
        assert served.stats.bytes_in == sum(len(f"hello {i} ".encode() * 100) for i in range(4))
    finally:
        lst.close()
        await refusing.stop()
        await serving.stop()
        await backend.stop()


async def test_a_refusal_after_the_first_byte_came_back_is_not_retried() -> None:
    """Once a byte came back from the replica, a reset is the replica's answer: never replayed elsewhere."""
    from mesh.listener import Listener

    class ResetAfterHello(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t

        def data_received(self, data):
            self.t.write(b"hi")
            asyncio.get_running_loop().call_later(0.05, self.t.abort)

    loop = asyncio.get_running_loop()
    replica = await loop.create_server(ResetAfterHello, "127.0.0.1", 0)
    rport = replica.sockets[0].getsockname()[1]
    srv = TunnelServer({f"t1:{rport}": LocalTarget("127.0.0.1", rport)}.get, {"127.0.0.1"}, "127.0.0.1", 0)
    await srv.start()
    other = await Backend().start()
    eps = (
        Endpoint("t1", "127.0.0.1", rport, node="n1", via=f"127.0.0.1:{srv.port}"),
        Endpoint("t9", "127.0.0.1", other.port, node="n9"),
    )
    pool = Pool(
        "svc", Route(port=0, endpoints=eps, listen_host="127.0.0.1"), ServiceOptions(locality="off"),
        rng=random.Random(1),
    )  # fmt: skip
    lst = Listener("127.0.0.1", 0, pool, service="svc")
    lst.start()
    try:
        got = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
            writer.write(b"x")
            got.append(await asyncio.wait_for(reader.read(100), 5))
            await _close(writer)
        assert sorted(got) == [b"hi", b"x"]  # one to the replica that answered and then reset, one echoed
        assert pool.stats.connect_failures == {} and pool.stats.retries == 0
    finally:
        lst.close()
        await srv.stop()
        await other.stop()
        replica.close()


# -- authentication: headers sealed with the cluster token -----------------------------------------------


def _auth(token: str = "cluster-token", now: list[float] | None = None, nonces=None) -> TunnelAuth:
    clock = now if now is not None else [1_000_000.0]
    seq = iter(nonces) if nonces is not None else None
    return TunnelAuth(
        token,
        clock=lambda: clock[0],
        nonce=(lambda n: next(seq)) if seq is not None else (lambda n: b"\x01" * n),
    )


def _check(auth: TunnelAuth, raw: bytes) -> None:
    header, n = parse_tunnel_header(raw)
    auth.check(raw[:n], header)


def test_a_sealed_header_checks_and_carries_the_same_addresses_and_target() -> None:
    sender, receiver = _auth(), _auth(nonces=[])
    raw = tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=sender)
    header, n = parse_tunnel_header(raw)
    assert (header.source, header.destination, header.target, n) == (CLIENT, PUBLISHED, "task1:80", len(raw))
    assert header.auth is not None and len(header.auth) == 48
    receiver.check(raw, header)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        ("unsealed", "auth"),
        ("other token", "auth"),
        ("client address changed", "auth"),
        ("target changed", "auth"),
        ("mac flipped", "auth"),
        ("31 s early", "stale"),
        ("31 s late", "stale"),
    ],
)
def test_a_header_that_is_not_sealed_right_is_refused(make: str, reason: str) -> None:
    now = [1_000_000.0]
    receiver = _auth(now=now)
    if make == "unsealed":
        raw = tunnel_header(CLIENT, PUBLISHED, "task1:80")
    elif make == "other token":
        raw = tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=_auth("another-cluster"))
    else:
        sealed = bytearray(tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=_auth(now=[now[0]])))
        if make == "client address changed":
            sealed[16] ^= 0x01  # first byte of the source address (a forged client)
        elif make == "target changed":
            i = bytes(sealed).index(b"task1:80")
            sealed[i + 4] = ord("9")
        elif make == "mac flipped":
            sealed[-1] ^= 0xFF
        raw = bytes(sealed)
        if make == "31 s early":
            raw = tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=_auth(now=[now[0] + 31]))
        elif make == "31 s late":
            raw = tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=_auth(now=[now[0] - 31]))
    with pytest.raises(TunnelRefused) as info:
        _check(receiver, raw)
    assert info.value.reason == reason


def test_a_replayed_header_is_refused_and_the_replay_cache_is_bounded() -> None:
    now = [1_000_000.0]
    receiver = _auth(now=now)
    sender = _auth(now=now, nonces=[bytes([i]) * 8 for i in range(10)])
    first = tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=sender)
    _check(receiver, first)
    with pytest.raises(TunnelRefused) as info:
        _check(receiver, first)  # the same bytes again: a replay
    assert info.value.reason == "replay"
    _check(receiver, tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=sender))  # a new nonce: fine
    now[0] += 40  # the window passed: the old entries are forgotten, and the old header is stale anyway
    with pytest.raises(TunnelRefused) as info:
        _check(receiver, first)
    assert info.value.reason == "stale"
    _check(receiver, tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=sender))
    assert len(receiver._seen) == 1  # only what is still inside the window is kept
    with pytest.raises(ValueError):
        TunnelAuth("")


async def test_a_server_with_auth_refuses_unsealed_and_foreign_headers_by_reset_and_serves_sealed() -> None:
    backend = await Backend().start()
    auth = TunnelAuth("the-cluster-token")
    srv = TunnelServer(
        {"task1:80": LocalTarget("127.0.0.1", backend.port)}.get, {"127.0.0.1"}, "127.0.0.1", 0, auth=auth
    )
    await srv.start()
    try:
        for raw in (
            tunnel_header(CLIENT, PUBLISHED, "task1:80"),  # unsealed: what a container on a node could send
            tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=TunnelAuth("guessed-token")),
        ):
            reader, writer = await _dial(srv)
            writer.write(raw + b"forged")
            assert await _closed_by_server(reader)
            await _close(writer)
        assert srv.stats.refused == {"auth": 2} and backend.connections == 0
        reader, writer = await _dial(srv)
        writer.write(tunnel_header(CLIENT, PUBLISHED, "task1:80", auth=TunnelAuth("the-cluster-token")) + b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        await _close(writer)
        assert srv.stats.forwarded == 1
    finally:
        await srv.stop()
        await backend.stop()


# ---------------------------------------------------------------------------------------------
# Acknowledgement (PP2_TYPE_MESH_ACK): a dialer can tell a hung agent from a slow replica


def test_the_ack_tlv_is_parsed_sealed_and_ignored_when_unknown() -> None:
    from mesh.proxy.preamble import PP2_TYPE_MESH_ACK

    raw = tunnel_header(CLIENT, PUBLISHED, "t1:80", ack=True)
    header, n = parse_tunnel_header(raw)
    assert n == len(raw) and header.ack and header.target == "t1:80"
    assert not parse_tunnel_header(tunnel_header(CLIENT, PUBLISHED, "t1:80"))[0].ack
    auth = _auth()
    sealed = tunnel_header(CLIENT, PUBLISHED, "t1:80", auth, ack=True)
    header, _ = parse_tunnel_header(sealed)
    assert header.ack
    _check(_auth(), sealed)  # the MAC covers the ack TLV (it precedes the auth TLV)
    forged = sealed.replace(bytes((PP2_TYPE_MESH_ACK, 0, 0)), bytes((0xE3, 0, 0)))
    with pytest.raises(TunnelRefused, match="bad MAC"):
        _check(_auth(), forged)
    # what an agent older than the ack TLV does: an unknown TLV is skipped, the header accepted
    other = proxyproto.encode_v2(CLIENT, PUBLISHED, ((PP2_TYPE_MESH_TARGET, b"t1:80"), (0xE3, b"later")))
    assert parse_tunnel_header(other)[0].target == "t1:80"


async def test_a_receiver_acknowledges_once_the_replica_is_connected_and_only_when_asked() -> None:
    backend = await Backend().start()
    srv = TunnelServer(
        {f"t1:{backend.port}": LocalTarget("127.0.0.1", backend.port), "t2:1": LocalTarget("127.0.0.1", 1)}.get,
        {"127.0.0.1"}, "127.0.0.1", 0,
    )  # fmt: skip
    await srv.start()
    try:
        reader, writer = await _dial(srv)
        writer.write(tunnel_header(CLIENT, PUBLISHED, f"t1:{backend.port}", ack=True) + b"ping")
        assert await asyncio.wait_for(reader.readexactly(len(TUNNEL_ACK) + 4), 5) == TUNNEL_ACK + b"ping"
        await _close(writer)
        reader, writer = await _dial(srv)  # not asked: the replica's bytes only (what older dialers expect)
        writer.write(tunnel_header(CLIENT, PUBLISHED, f"t1:{backend.port}") + b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        await _close(writer)
        reader, writer = await _dial(srv)  # the replica refuses: no ack, a reset
        writer.write(tunnel_header(CLIENT, PUBLISHED, "t2:1", ack=True) + b"ping")
        assert await _closed_by_server(reader)
        await _close(writer)
        assert (srv.stats.forwarded, srv.stats.acked, srv.stats.refused) == (2, 1, {"connect": 1})
    finally:
        await srv.stop()
        await backend.stop()


async def test_a_dialer_treats_a_hung_agent_like_a_failed_connect() -> None:
    """A remote agent that is SIGSTOPped looks like a socket that never accept()s: the connect succeeds, the
    header goes out, nothing comes back.  The client should be answered through another node within about
    the connect timeout."""
    from mesh.listener import Listener

    backend = await Backend().start()
    hung = socket.create_server(("127.0.0.1", 0), backlog=16)  # listens, never accepts, never answers
    serving = TunnelServer(
        {f"t2:{backend.port}": LocalTarget("127.0.0.1", backend.port)}.get, {"127.0.0.1"}, "127.0.0.1", 0
    )
    await serving.start()
    eps = (
        Endpoint("t1", "127.0.0.1", backend.port, node="n1", via=f"127.0.0.1:{hung.getsockname()[1]}"),
        Endpoint("t2", "127.0.0.1", backend.port, node="n2", via=f"127.0.0.1:{serving.port}"),
    )
    opts = ServiceOptions(connect_timeout=0.3, balance="round-robin")
    pool = Pool("svc", Route(port=0, endpoints=eps, listen_host="127.0.0.1"), opts, rng=random.Random(1))
    lst = Listener("127.0.0.1", 0, pool, service="svc")
    lst.start()
    writers = []
    try:
        for i in range(2):  # round robin: one of them is sent to the hung agent first
            reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
            writers.append(writer)
            writer.write(b"hello %d" % i)
            assert await asyncio.wait_for(reader.readexactly(7), 2) == b"hello %d" % i
        assert pool.stats.connect_failures.get("timeout", 0) >= 1
    finally:
        for w in writers:
            w.close()
        lst.close()
        lst.registry.abort_all()  # the one held by the hung agent (a half-closed client keeps it open)
        await lst.registry.wait_empty(5.0)
        hung.close()
        await serving.stop()
        await backend.stop()


class _FakeAgent:
    """A receiving agent that answers a tunnel header the way a test says: ``ack`` = a list of the pieces
    of TUNNEL_ACK to send (each after the dialer has read the one before: ``held`` is awaited), then
    ``greeting`` (the replica's first bytes; glued to the last piece when ``glue``), then an echo.
    ``ack=None`` is an agent older than the ack TLV.  ``asked`` records whether each header asked."""

    def __init__(self, ack: list[bytes] | None, greeting: bytes, glue: bool = False, held=None) -> None:
        self.ack, self.greeting, self.glue, self.held = ack, greeting, glue, held
        self.asked: list[bool] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> _FakeAgent:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while (res := parse_tunnel_header(buf)) is None:
            buf += await reader.read(1)
        header, consumed = res
        self.asked.append(header.ack)
        rest = buf[consumed:]
        try:
            pieces = list(self.ack) if (self.ack is not None and header.ack) else []
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                writer.write(piece + (self.greeting if last and self.glue else b""))
                await writer.drain()
                if not last and self.held is not None:
                    sent = b"".join(pieces[: i + 1])
                    await wait_for(lambda sent=sent: self.held(sent), what="ack piece read")
            if not (pieces and self.glue):
                writer.write(self.greeting)
            if rest:
                writer.write(rest)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            await _close(writer)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _through_fake_agent(agent: _FakeAgent, connections: int = 1) -> Pool:
    """Connections through a listener whose only host is reached through ``agent``: each gets exactly the
    greeting and its own bytes back."""
    from mesh.listener import Listener

    ep = Endpoint("t1", "127.0.0.1", 9, node="n1", via=f"127.0.0.1:{agent.port}")
    pool = Pool("svc", Route(port=0, endpoints=(ep,), listen_host="127.0.0.1"), ServiceOptions(connect_timeout=2.0))
    lst = Listener("127.0.0.1", 0, pool, service="svc")
    lst.start()
    agent.held = lambda piece: any(s._ack_held == piece for s in lst.registry)
    try:
        for i in range(connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
            writer.write(b"ping %d" % i)
            want = agent.greeting + b"ping %d" % i
            assert await asyncio.wait_for(reader.readexactly(len(want)), 5) == want
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # nothing else (no ack byte)
            await _close(writer)
        await lst.registry.wait_empty(5.0)
    finally:
        lst.close()
        lst.registry.abort_all()
    return pool


@pytest.mark.parametrize(
    ("pieces", "glue"),
    [
        ([TUNNEL_ACK], False),
        ([TUNNEL_ACK], True),
        ([TUNNEL_ACK[:1], TUNNEL_ACK[1:5], TUNNEL_ACK[5:]], False),
        ([TUNNEL_ACK[:3], TUNNEL_ACK[3:]], True),
    ],
    ids=["whole", "glued", "split-3", "split-glued"],
)
async def test_the_dialer_asks_for_the_ack_and_strips_it(pieces: list[bytes], glue: bool) -> None:
    """The ack whole, glued to the replica's first bytes, or split across reads: the client never sees it,
    and the host's success is reported."""
    agent = await _FakeAgent(pieces, b"220 hi\r\n", glue=glue).start()
    try:
        pool = await _through_fake_agent(agent, connections=2)
    finally:
        await agent.stop()
    assert agent.asked == [True, True]
    assert pool.stats.connect_failures == {}
    assert next(iter(pool.hosts)).connected


async def test_an_agent_older_than_the_ack_keeps_working_and_is_not_asked_again() -> None:
    """A receiver that ignores TLV 0xE2: its replica's bytes come first; they reach the client untouched,
    the node is remembered as not acking (no header asks it, no deadline) until NO_ACK_RECHECK."""
    from mesh.proxy import splice as splice_mod

    agent = await _FakeAgent(None, b"\x00MESH\x00 not an ack").start()  # starts like the ack, then differs
    try:
        pool = await _through_fake_agent(agent, connections=3)
        assert agent.asked == [True, False, False]
        splice_mod._no_ack[f"127.0.0.1:{agent.port}"] -= splice_mod.NO_ACK_RECHECK  # time to ask again
        await _through_fake_agent(agent, connections=1)
        assert agent.asked == [True, False, False, True]
    finally:
        splice_mod._no_ack.pop(f"127.0.0.1:{agent.port}", None)
        await agent.stop()
    assert pool.stats.connect_failures == {}


async def test_a_hung_agent_among_two_is_ejected_and_every_client_is_served() -> None:
    """Two nodes' tunnels, one hung (listens, never accepts): every client connection is answered through
    the other within the connect timeout, and the hung node's host is ejected."""
    from mesh.host import EJECTED
    from mesh.listener import Listener

    backend = await Backend().start()
    hung = socket.create_server(("127.0.0.1", 0), backlog=16)
    serving = TunnelServer(
        {f"t2:{backend.port}": LocalTarget("127.0.0.1", backend.port)}.get, {"127.0.0.1"}, "127.0.0.1", 0
    )
    await serving.start()
    eps = (
        Endpoint("t1", "127.0.0.1", backend.port, node="n1", via=f"127.0.0.1:{hung.getsockname()[1]}"),
        Endpoint("t2", "127.0.0.1", backend.port, node="n2", via=f"127.0.0.1:{serving.port}"),
    )
    opts = ServiceOptions(connect_timeout=0.3, balance="round-robin", consecutive_failures=2)
    pool = Pool("svc", Route(port=0, endpoints=eps, listen_host="127.0.0.1"), opts, rng=random.Random(1))
    hung_host = next(h for h in pool.hosts if h.endpoint.id == "t1")
    lst = Listener("127.0.0.1", 0, pool, service="svc")
    lst.start()
    try:
        for i in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
            writer.write(b"hello %d" % i)
            assert await asyncio.wait_for(reader.readexactly(7), 2) == b"hello %d" % i
            await _close(writer)
        assert hung_host.health & EJECTED
        assert pool.stats.connect_failures.get("timeout") == 2  # then ejected: no client goes there
        assert hung_host.stats.ejections == 1
    finally:
        lst.close()
        lst.registry.abort_all()
        await lst.registry.wait_empty(5.0)
        hung.close()
        await serving.stop()
        await backend.stop()


async def test_an_eof_before_the_ack_is_an_older_agent_not_a_hung_one() -> None:
    """An agent older than the ack whose replica closes at once sends EOF first: the client gets the EOF, and
    no ack deadline is left running (it would retry a connection the client already saw end)."""
    from mesh.listener import Listener
    from mesh.proxy import splice as splice_mod

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while parse_tunnel_header(buf) is None:
            buf += await reader.read(1)
        writer.write_eof()
        await reader.read()
        await _close(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    via = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    ep = Endpoint("t1", "127.0.0.1", 9, node="n1", via=via)
    pool = Pool("svc", Route(port=0, endpoints=(ep,), listen_host="127.0.0.1"), ServiceOptions(connect_timeout=2.0))
    lst = Listener("127.0.0.1", 0, pool, service="svc")
    lst.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        (conn,) = list(lst.registry)  # the client has not closed its side yet
        assert conn._ack_handle is None and conn._ack_held is None
        assert via in splice_mod._no_ack
        await _close(writer)
        await lst.registry.wait_empty(5.0)
        assert pool.stats.connect_failures == {}
    finally:
        splice_mod._no_ack.pop(via, None)
        lst.close()
        lst.registry.abort_all()
        server.close()
        await server.wait_closed()


async def test_a_reset_after_the_ack_but_before_any_replica_byte_is_retried_elsewhere() -> None:
    """The remote agent acknowledged (it reached the replica) and then died before a replica byte came back:
    the client's kept bytes are sent through another node, as for any reset before the first byte (the ack
    must not end the retry window: a manager agent SIGKILLed in the lab failed a request that way)."""
    from mesh.listener import Listener

    backend = await Backend().start()

    async def ack_then_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the header and the client's first bytes
        writer.write(TUNNEL_ACK)
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    dying = await asyncio.start_server(ack_then_die, "127.0.0.1", 0)
    serving = TunnelServer(
        {f"t2:{backend.port}": LocalTarget("127.0.0.1", backend.port)}.get, {"127.0.0.1"}, "127.0.0.1", 0
    )
    await serving.start()
    eps = (
        Endpoint("t1", "127.0.0.1", backend.port, node="n1", via=f"127.0.0.1:{dying.sockets[0].getsockname()[1]}"),
        Endpoint("t2", "127.0.0.1", backend.port, node="n2", via=f"127.0.0.1:{serving.port}"),
    )
    opts = ServiceOptions(connect_timeout=1.0, balance="round-robin", consecutive_failures=100)
    pool = Pool("svc", Route(port=0, endpoints=eps, listen_host="127.0.0.1"), opts, rng=random.Random(1))
    lst = Listener("127.0.0.1", 0, pool, service="svc")
    lst.start()
    try:
        for i in range(6):
            reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
            writer.write(b"hello %d" % i)
            assert await asyncio.wait_for(reader.readexactly(7), 3) == b"hello %d" % i
            await _close(writer)
        assert pool.stats.connect_failures.get("tunnel_refused", 0) >= 2  # half the picks went to the dying one
    finally:
        lst.close()
        lst.registry.abort_all()
        await lst.registry.wait_empty(5.0)
        dying.close()
        await serving.stop()
        await backend.stop()
