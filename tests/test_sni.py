"""TLS passthrough by SNI (mesh/proxy/sni.py): the ClientHello reader table-driven, then real TLS
servers (certificates made here with trustme) behind one mesh port and the ``ssl`` module as client,
the certificate checked end to end."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time

import pytest
import trustme

from mesh.listener import Binding
from mesh.proxy import sni as sni_mod
from mesh.proxy.sni import MAX_RECORD, BadHello, HelloReader, SniTable, parse_client_hello
from mesh.routing import Endpoint, Match, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import Mesh
from tests import backends
from tests.backends import closed_port
from tests.util import wait_for

# -- ClientHellos made by the real ssl module --------------------------------------------------------


def client_hello(server_name: str | None, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> bytes:
    """The first flight of a real ``ssl`` client: the ClientHello record(s)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def records(handshake: bytes, sizes: list[int]) -> bytes:
    """``handshake`` (a whole handshake message) split over records of these fragment sizes."""
    out, p = b"", 0
    for n in [*sizes, len(handshake)]:
        if p >= len(handshake):
            break
        frag = handshake[p : p + n]
        out += bytes([22, 3, 1]) + struct.pack("!H", len(frag)) + frag
        p += len(frag)
    return out


def hello_message(extensions: list[tuple[int, bytes]], *, session_id: bytes = b"\x11" * 32) -> bytes:
    """A hand-made ClientHello handshake message with these extensions."""
    body = b"\x03\x03" + b"\x42" * 32 + bytes([len(session_id)]) + session_id
    body += struct.pack("!H", 4) + b"\x13\x01\x0a\x0a" + b"\x01\x00"
    if extensions is not None:
        ext = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in extensions)
        body += struct.pack("!H", len(ext)) + ext
    return b"\x01" + struct.pack("!I", len(body))[1:] + body


def sni_ext(*names: bytes, kind: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for n in names)
    return (0, struct.pack("!H", len(entries)) + entries)


GREASE = (0x0A0A, b"")
ECH = (0xFE0D, b"\x00\x00\x01\x00\x01\x42" + struct.pack("!H", 32) + b"\x01" * 32 + struct.pack("!H", 48) + b"\x02" * 48)


def feed_all(data: bytes, step: int | None = None) -> HelloReader:
    reader = HelloReader()
    step = step or len(data)
    done = False
    for i in range(0, len(data), step):
        assert not done, "complete before the last byte"
        done = reader.feed(data[i : i + step])
    assert done
    return reader


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("step", [None, 1, 7], ids=["whole", "bytewise", "7-byte-reads"])
def test_real_client_hellos(version, step):
    for name, want in [("a.example.com", "a.example.com"), ("Shop.Example.COM", "shop.example.com"), (None, None)]:
        data = client_hello(name, version)
        reader = feed_all(data, step)
        assert reader.server_name == want
        assert bytes(reader.data) == data  # every byte kept for the replica


def test_hello_split_over_records():
    msg = hello_message([GREASE, sni_ext(b"a.example.com"), ECH, (0x1A1A, b"\x00")])
    for sizes in ([1], [3, 1, 50], [len(msg) - 1], [10] * 100):
        data = records(msg, sizes)
        assert feed_all(data).server_name == "a.example.com"
        assert feed_all(data, 1).server_name == "a.example.com"


@pytest.mark.parametrize(
    ("extensions", "name"),
    [
        ([], None),
        (None, None),  # no extensions block at all (SSLv3-era client)
        ([GREASE, ECH], None),
        ([sni_ext(b"A.Example.com.")], "a.example.com"),
        ([ECH, sni_ext(b"public.example.com"), GREASE], "public.example.com"),  # ECH: the outer name
        ([sni_ext(b"x", kind=7)], None),  # an unknown name type only
    ],
)
def test_hand_made_hellos(extensions, name):
    assert feed_all(records(hello_message(extensions), [])).server_name == name


@pytest.mark.parametrize(
    ("data", "reason", "fragment"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not_tls", "not a TLS handshake record"),
        (b"\x80\x2e\x01\x03\x01", "not_tls", "not a TLS handshake record"),  # SSLv2 hello
        (b"\x16\x02\x00", "not_tls", "record version 2.x"),
        (b"\x16\x03\x01\x40\x01", "bad_hello", f"outside 1..{MAX_RECORD}"),
        (b"\x16\x03\x01\x00\x00", "bad_hello", "outside"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "bad_hello", "not a ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\x02\x00\x00", "bad_hello", "exceeds"),
        (records(hello_message([]), [10])[:15] + b"\x15\x03\x03\x00\x02\x02\x28", "bad_hello", "record type 21"),
        (records(hello_message([sni_ext(b"a", b"b")]), []), "bad_hello", "two host names"),
        (records(hello_message([sni_ext(b"a b")]), []), "bad_hello", "not a DNS name"),
        (records(hello_message([sni_ext(b"")]), []), "bad_hello", "not a DNS name"),
        (records(hello_message([GREASE, GREASE]), []), "bad_hello", "appears twice"),
        (records(hello_message([], session_id=b"\x00" * 33), []), "bad_hello", "session id of 33"),
        (records(hello_message([(0, b"\x00\x09\x00")]), []), "bad_hello", "malformed server_name"),
    ],
)
def test_bad_first_bytes(data, reason, fragment):
    reader = HelloReader()
    with pytest.raises(BadHello) as info:
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
    assert info.value.reason == reason
    assert fragment in str(info.value)


def test_truncated_extensions_are_bad():
    msg = hello_message([sni_ext(b"a.example.com")])
    body = msg[4:]
    for cut in (len(body) - 1, len(body) - 5):
        with pytest.raises(BadHello):
            parse_client_hello(body[:cut])


def test_lookup_exact_then_longest_wildcard_then_default():
    def b(name, *hosts):
        return Binding(name, Route(443, protocol="tls", match=Match(hosts=hosts)), None)  # type: ignore[arg-type]

    table = SniTable((b("a", "a.example.com"), b("w", "*.example.com"), b("wb", "*.b.example.com"), b("d")))
    got = {n: table.lookup(n).service for n in
           ["a.example.com", "x.example.com", "x.b.example.com", "y.x.b.example.com", "b.example.com",
            "example.com", "other.org", None]}  # fmt: skip
    assert got == {
        "a.example.com": "a", "x.example.com": "w", "x.b.example.com": "wb", "y.x.b.example.com": "wb",
        "b.example.com": "w", "example.com": "d", "other.org": "d", None: "d",
    }  # fmt: skip
    assert SniTable((b("a", "a.example.com"),)).lookup("b.example.com") is None


# -- real TLS servers behind one mesh port -------------------------------------------------------------


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


class TlsServer:
    """A TLS echo-ish server: answers each connection with its name, the SNI it saw and what it read."""

    def __init__(self, name: str, ca: trustme.CA, *hosts: str) -> None:
        self.name = name
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*hosts).configure_cert(self.ctx)
        self.seen: list[str | None] = []
        self.ctx.sni_callback = lambda obj, server_name, _ctx: self.seen.append(server_name)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> TlsServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = await r.readline()
            w.write(f"{self.name} {w.get_extra_info('ssl_object').version()} ".encode() + line)
            await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def client_ctx(ca: trustme.CA, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ca.configure_trust(ctx)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


async def ask(port: int, ctx: ssl.SSLContext, name: str | None, line: bytes = b"hello\n") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
    try:
        w.write(line)
        return await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()


def tls_service(name: str, ports: list[int], sni: tuple[str, ...] = (), **opts) -> Service:
    eps = tuple(Endpoint(f"{name}-{i}", "127.0.0.1", p) for i, p in enumerate(ports))
    route = Route(0, eps, "127.0.0.1", protocol="tls", match=Match(hosts=sni))
    return Service(name, (route,), ServiceOptions(**opts))


@pytest.fixture
async def servers(ca):
    made = [
        await TlsServer("A", ca, "a.example.com").start(),
        await TlsServer("B", ca, "b.example.com", "*.b.example.com").start(),
        await TlsServer("D", ca, "default.example.org", "unknown.example.org").start(),
    ]
    yield made
    for s in made:
        await s.close()
    while backends.LIVE:
        await backends.LIVE[-1].close()


async def one_port(mesh: Mesh, services: list[Service]) -> int:
    """Apply ``services`` (tls routes on port 0) so that they share ONE listener: port 0 gives each service
    its own, so bind one first and re-apply with the bound port."""
    await mesh.apply(RoutingTable(1, (services[0],)))
    port = mesh.listeners()[0].port
    fixed = [
        Service(s.name, tuple(Route(port, r.endpoints, r.listen_host, r.protocol, r.match) for r in s.routes),
                s.options)
        for s in services
    ]  # fmt: skip
    await mesh.apply(RoutingTable(2, tuple(fixed)))
    (lst,) = mesh.listeners()
    assert lst.protocol == "tls" and len(lst.bindings) == len(services)
    return port


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
async def test_sni_routes_to_the_right_server(ca, servers, version):
    a, b, d = servers
    mesh = Mesh()
    try:
        port = await one_port(mesh, [
            tls_service("site-a", [a.port], ("a.example.com",)),
            tls_service("site-b", [b.port], ("b.example.com", "*.b.example.com")),
            tls_service("fallback", [d.port]),
        ])  # fmt: skip
        ctx = client_ctx(ca, version)
        want_v = "TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
        assert await ask(port, ctx, "a.example.com") == f"A {want_v} hello\n".encode()
        assert await ask(port, ctx, "b.example.com") == f"B {want_v} hello\n".encode()
        assert await ask(port, ctx, "x.b.example.com") == f"B {want_v} hello\n".encode()
        assert await ask(port, ctx, "unknown.example.org") == f"D {want_v} hello\n".encode()
        # the certificate is the replica's, checked by the client: a name the replica has no certificate
        # for fails verification end to end (the mesh never terminates TLS)
        with pytest.raises(ssl.SSLCertVerificationError):
            await ask(port, ctx, "zzz.example.net")
        assert a.seen == ["a.example.com"] and b.seen == ["b.example.com", "x.b.example.com"]
        lst = mesh.listeners()[0]
        assert lst.sni_stats.routed == 5
        accepted = {bd.service: bd.pool.stats.accepted for bd in lst.bindings}
        assert accepted == {"site-a": 1, "site-b": 2, "fallback": 2}
        hosts = {bd.service: bd.pool.hosts[0].stats.connections for bd in lst.bindings}
        assert hosts == {"site-a": 1, "site-b": 2, "fallback": 2}
    finally:
        await mesh.shutdown(1)


async def test_no_default_closes_and_counts(ca, servers):
    a, _, _ = servers
    mesh = Mesh()
    try:
        await mesh.apply(RoutingTable(1, (tls_service("site-a", [a.port], ("a.example.com",)),)))
        port = mesh.listeners()[0].port
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await ask(port, client_ctx(ca), "b.example.com")
        lst = mesh.listeners()[0]
        await wait_for(lambda: lst.sni_stats.closed["no_route"] == 1)
        assert await ask(port, client_ctx(ca), "a.example.com") == b"A TLSv1.3 hello\n"
    finally:
        await mesh.shutdown(1)


async def test_retry_before_the_first_byte_and_balancing(ca, servers):
    """A refused replica is retried on the next one with the ClientHello sent again (the splice's
    pre-connect buffer); round robin spreads connections of one SNI route."""
    a, _, _ = servers
    a2 = await TlsServer("A2", ca, "a.example.com").start()
    mesh = Mesh()
    try:
        svc = tls_service("site-a", [closed_port(), a.port, a2.port], ("a.example.com",), balance="round-robin",
                          retries=2, consecutive_failures=100)  # fmt: skip
        await mesh.apply(RoutingTable(1, (svc,)))
        port = mesh.listeners()[0].port
        got = [(await ask(port, client_ctx(ca), "a.example.com")).split()[0] for _ in range(6)]
        assert sorted(set(got)) == [b"A", b"A2"] and len(got) == 6
        pool = mesh.listeners()[0].bindings[0].pool
        assert pool.stats.connect_failures.get("refused", 0) >= 1 and pool.stats.retries >= 1
    finally:
        await mesh.shutdown(1)
        await a2.close()


def _split_handshake(port: int, ctx: ssl.SSLContext, name: str, pieces: int) -> bytes:
    """A blocking client that sends its ClientHello in ``pieces`` TCP segments (TCP_NODELAY, a pause
    between them), then completes the handshake and one request through a MemoryBIO."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    first = True
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            data = out.read()
            if first:
                step = max(1, len(data) // pieces)
                for i in range(0, len(data), step):
                    sock.sendall(data[i : i + step])
                    time.sleep(0.02)
                first = False
            elif data:
                sock.sendall(data)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            inc.write(chunk)
        obj.write(b"split\n")
        sock.sendall(out.read())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            inc.write(chunk)
            try:
                reply += obj.read()
            except ssl.SSLWantReadError:
                continue
        return reply
    finally:
        sock.close()


async def test_client_hello_split_over_tcp_segments(ca, servers):
    a, b, _ = servers
    mesh = Mesh()
    try:
        port = await one_port(mesh, [
            tls_service("site-a", [a.port], ("a.example.com",)),
            tls_service("site-b", [b.port], ("*.b.example.com",)),
        ])  # fmt: skip
        reply = await asyncio.to_thread(_split_handshake, port, client_ctx(ca), "deep.b.example.com", 12)
        assert reply == b"B TLSv1.3 split\n"
    finally:
        await mesh.shutdown(1)


async def test_garbage_and_slow_hellos_are_closed_while_others_are_served(ca, servers, monkeypatch):
    a, _, d = servers
    monkeypatch.setattr(sni_mod, "HELLO_TIMEOUT", 0.5)
    mesh = Mesh()
    try:
        port = await one_port(mesh, [tls_service("site-a", [a.port], ("a.example.com",)),
                                     tls_service("fallback", [d.port])])  # fmt: skip
        lst = mesh.listeners()[0]
        # garbage: closed at once, the replica never sees it
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        assert await asyncio.wait_for(r.read(), 2) == b""
        w.close()
        # slow: half a ClientHello, then nothing; closed after the deadline
        hello = client_hello("a.example.com")
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", port)
        slow_w.write(hello[: len(hello) // 2])
        started = time.monotonic()
        # meanwhile others are served
        for _ in range(3):
            assert await ask(port, client_ctx(ca), "a.example.com") == b"A TLSv1.3 hello\n"
        assert await asyncio.wait_for(slow_r.read(), 3) == b""
        assert 0.4 <= time.monotonic() - started < 2.5
        slow_w.close()
        # a client that gives up half way
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(hello[:20])
        await w.drain()
        w.close()
        await wait_for(lambda: lst.sni_stats.closed["incomplete"] == 1)
        assert lst.sni_stats.closed["not_tls"] == 1 and lst.sni_stats.closed["timeout"] == 1
        assert lst.sni_stats.routed == 3
        assert a.seen == ["a.example.com"] * 3
        assert len(mesh.registry) == 0
    finally:
        await mesh.shutdown(1)


def test_tls_and_tcp_on_one_port_are_refused_by_the_table():
    from mesh.routing import TableError

    with pytest.raises(TableError, match=r"service 'site' listens on 0.0.0.0:8443 \(tls\), already used by service 'plain' \(tcp\)"):
        RoutingTable(1, (Service("site", (Route(8443, protocol="tls"),)), Service("plain", (Route(8443),))))



async def test_sni_metrics(ca, servers):
    from prometheus_client.parser import text_string_to_metric_families

    from mesh.metrics import merge_snapshots, render_text, snapshot

    a, _, d = servers
    mesh = Mesh()
    try:
        port = await one_port(mesh, [tls_service("site-a", [a.port], ("a.example.com",)),
                                     tls_service("fallback", [d.port])])  # fmt: skip
        await ask(port, client_ctx(ca), "a.example.com")
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"SSH-2.0-x\r\n")
        await r.read()
        w.close()
        merged = merge_snapshots([snapshot(mesh)])
        text = render_text(merged)
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
        tl = (("listen_host", "127.0.0.1"), ("port", str(port)))
        assert got[("mesh_tls_routed_total", tl)] == 1
        assert got[("mesh_tls_closed_total", (*tl, ("reason", "not_tls")))] == 1
        assert got[("mesh_connections_accepted_total", (("port", str(port)), ("service", "site-a")))] == 1
        assert got[("mesh_connections_accepted_total", (("port", str(port)), ("service", "fallback")))] == 0
    finally:
        await mesh.shutdown(1)
