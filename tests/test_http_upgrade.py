"""Upgrades through the HTTP/1.1 front (mesh/proxy/http.py rule 9): a real WebSocket echo backend
(the ``websockets`` library) and a ``websockets`` client through the mesh on 127.0.0.1; after the
101 the two connections are a ``Splice`` (idle timeout, table changes, drain)."""

from __future__ import annotations

import asyncio
import http
import os
import struct
import time

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from mesh.listener import Binding, Listener
from mesh.pool import Pool
from mesh.routing import Endpoint, Match, Route, ServiceOptions
from tests import httpbackend
from tests.httpbackend import Client, HttpBackend
from tests.util import wait_for

HOST = "shop.example.com"
_LISTENERS: list[Listener] = []
_SERVERS: list = []


@pytest.fixture(autouse=True)
async def _cleanup():
    yield
    while _LISTENERS:
        lst = _LISTENERS.pop()
        lst.close()
        lst.registry.abort_all()
    while _SERVERS:
        await _SERVERS.pop().close()
    while httpbackend.LIVE:
        await httpbackend.LIVE[-1].close()


class WsBackend:
    """A WebSocket echo server: each message comes back prefixed with "<name>:" (text) or as it is
    (binary).  ``refuse``: answer the handshake with 400.  ``requests``: the handshake requests."""

    def __init__(self, name: str, refuse: bool = False) -> None:
        self.name = name
        self.refuse = refuse
        self.requests: list = []
        self.server = None
        self.port = 0
        self.open = 0

    async def start(self) -> WsBackend:
        self.server = await serve(
            self._handler, "127.0.0.1", 0, process_request=self._process_request, ping_interval=None, close_timeout=1
        )
        self.port = self.server.sockets[0].getsockname()[1]
        _SERVERS.append(self)
        return self

    def _process_request(self, connection, request):
        self.requests.append(request)
        if self.refuse:
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "no upgrade for you\n")
        return None

    async def _handler(self, ws) -> None:
        self.open += 1
        try:
            async for msg in ws:
                await ws.send(f"{self.name}:{msg}" if isinstance(msg, str) else msg)
        except ConnectionClosed:
            pass
        finally:
            self.open -= 1

    async def close(self) -> None:
        if self in _SERVERS:
            _SERVERS.remove(self)
        self.server.close()
        async with asyncio.timeout(5):
            await self.server.wait_closed()


def route(*backends: WsBackend) -> Route:
    eps = tuple(Endpoint(b.name, "127.0.0.1", b.port) for b in backends)
    return Route(port=0, protocol="http", match=Match(hosts=(HOST,)), endpoints=eps)


def start_front(*backends: WsBackend, **opts) -> tuple[Listener, Pool]:
    pool = Pool("shop", route(*backends), ServiceOptions(**opts))
    lst = Listener("127.0.0.1", 0, protocol="http", bindings=(Binding("shop", pool.route, pool),))
    lst.start()
    _LISTENERS.append(lst)
    return lst, pool


def ws_connect(lst: Listener, path: str = "/chat"):
    return connect(
        f"ws://{HOST}:{lst.port}{path}",
        host="127.0.0.1",
        port=lst.port,
        proxy=None,
        ping_interval=None,
        open_timeout=5,
        close_timeout=1,
    )


async def finish(lst: Listener, pool: Pool, hosts=None) -> None:
    await wait_for(lambda: len(lst.registry) == 0, what=f"connections of {lst!r} to close: {list(lst.registry)}")
    for h in hosts or pool.hosts:
        assert h.active == 0, h
    st = getattr(pool, "http", None)
    assert st is None or st.active == 0
    lst.close()
    _LISTENERS.remove(lst)


async def roundtrip(ws, msg):
    await ws.send(msg)
    async with asyncio.timeout(5):
        return await ws.recv()


async def test_websocket_messages_echo_through_the_mesh():
    a = await WsBackend("a").start()
    lst, pool = start_front(a)
    async with ws_connect(lst) as ws:
        assert await roundtrip(ws, "hello") == "a:hello"
        assert await roundtrip(ws, "é" * 1000) == "a:" + "é" * 1000
        blob = os.urandom(300_000)
        assert await roundtrip(ws, blob) == blob
        for i in range(50):
            assert await roundtrip(ws, f"m{i}") == f"a:m{i}"
        assert pool.hosts[0].active == 1 and pool.http.upgrades == 1
    (req,) = a.requests
    assert req.path == "/chat"
    assert req.headers["Host"] == f"{HOST}:{lst.port}"
    assert req.headers["Upgrade"].lower() == "websocket"
    assert req.headers["Connection"].lower() == "upgrade"
    assert req.headers["X-Forwarded-For"] == "127.0.0.1"
    assert pool.http.requests == {("GET", "1xx"): 1}
    await finish(lst, pool)
    await a.close()


async def test_many_websockets_at_once():
    a = await WsBackend("a").start()
    lst, pool = start_front(a)
    n = 20
    clients = [await ws_connect(lst) for _ in range(n)]
    try:
        got = await asyncio.gather(*(roundtrip(ws, f"c{i}") for i, ws in enumerate(clients)))
        assert got == [f"a:c{i}" for i in range(n)]
        assert pool.hosts[0].active == n
    finally:
        for ws in clients:
            await ws.close()
    await finish(lst, pool)
    await a.close()


async def test_upgraded_connection_survives_a_table_change():
    """The route moves from a to b: the open WebSocket to a keeps going (a is draining), a new one
    goes to b."""
    a = await WsBackend("a").start()
    b = await WsBackend("b").start()
    opts = ServiceOptions()
    lst, pool = start_front(a)
    host_a = pool.hosts[0]
    async with ws_connect(lst) as old:
        assert await roundtrip(old, "before") == "a:before"
        pool.update(route(b), opts)
        assert host_a.draining and host_a.active == 1
        for i in range(10):
            assert await roundtrip(old, f"after{i}") == f"a:after{i}"
            await asyncio.sleep(0.01)
        async with ws_connect(lst) as new:
            assert await roundtrip(new, "hi") == "b:hi"
            assert await roundtrip(old, "still") == "a:still"
        assert len(b.requests) == 1 and len(a.requests) == 1
    await wait_for(lambda: host_a.active == 0, what="the old upgraded connection to release its host")
    await finish(lst, pool, hosts=[host_a, *pool.hosts])
    await a.close()
    await b.close()


async def test_idle_timeout_closes_an_idle_upgraded_connection():
    a = await WsBackend("a").start()
    lst, pool = start_front(a, idle_timeout=0.5)
    async with ws_connect(lst) as busy, ws_connect(lst) as idle:
        assert await roundtrip(idle, "once") == "a:once"
        t0 = time.monotonic()
        # the busy one talks every 100 ms for 1.2 s: more than the idle timeout, and it stays open
        for i in range(12):
            assert await roundtrip(busy, f"b{i}") == f"a:b{i}"
            await asyncio.sleep(0.1)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(3):
                await idle.recv()
        closed_after = time.monotonic() - t0
        assert 0.45 <= closed_after <= 1.5, f"idle upgraded connection closed after {closed_after:.2f}s"
        assert await roundtrip(busy, "still") == "a:still"
    await finish(lst, pool)
    await a.close()


async def test_backend_refusing_the_upgrade_with_400():
    a = await WsBackend("a", refuse=True).start()
    lst, pool = start_front(a)
    with pytest.raises(InvalidStatus) as err:
        async with ws_connect(lst):
            pass
    assert err.value.response.status_code == 400
    # raw: the 400 passes through and the client connection is closed
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    async with Client(lst.port) as c:
        await c.send(
            f"GET /chat HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        resp = await c.response()
        assert resp.status_line == "HTTP/1.1 400 Bad Request"
        assert resp.body == b"no upgrade for you\n"
        assert resp.value("connection") == "close"
        assert await c.closed()
    assert pool.http.upgrades == 0 and len(a.requests) == 2
    await finish(lst, pool)
    await a.close()


def _masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(p ^ mask[i % 4] for i, p in enumerate(payload))


async def test_frames_sent_with_the_upgrade_request_reach_the_backend():
    """A client that writes its first frame in the same write as the handshake: those bytes are the
    new protocol's and go upstream once the 101 came back."""
    a = await WsBackend("a").start()
    lst, pool = start_front(a)
    async with Client(lst.port) as c:
        await c.send(
            f"GET /chat HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            + _masked_text_frame("early")
        )
        resp = await c.response()
        assert resp.status_line == "HTTP/1.1 101 Switching Protocols"
        assert resp.value("upgrade").lower() == "websocket"
        assert resp.value("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
        async with asyncio.timeout(5):
            head = await c.r.readexactly(2)
            assert head[0] == 0x81
            data = await c.r.readexactly(head[1] & 0x7F)
        assert data == b"a:early"
        # a close frame (masked, code 1000): the server answers it and closes
        await c.send(bytes([0x88, 0x82]) + b"\0\0\0\0" + struct.pack("!H", 1000))
        async with asyncio.timeout(5):
            rest = await c.r.read()
        assert rest[:1] == b"\x88"
    await finish(lst, pool)
    await a.close()


# -- other upgrades, with the raw backend of tests/httpbackend.py ---------------------------------------------
def raw_front(backend: HttpBackend, **opts) -> tuple[Listener, Pool]:
    eps = (Endpoint(backend.name, "127.0.0.1", backend.port),)
    pool = Pool(
        "shop", Route(port=0, protocol="http", match=Match(hosts=(HOST,)), endpoints=eps), ServiceOptions(**opts)
    )
    lst = Listener("127.0.0.1", 0, protocol="http", bindings=(Binding("shop", pool.route, pool),))
    lst.start()
    _LISTENERS.append(lst)
    return lst, pool


def upgrade_request(path: str = "/upgrade", proto: str = "raw-echo") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: {proto}\r\nConnection: keep-alive, Upgrade\r\n\r\n".encode()
    )


async def test_other_protocol_upgrade_with_bytes_both_ways_before_the_101_and_half_close():
    """The replica's bytes in the same write as its 101 reach the client; the client's bytes sent
    with the request reach the replica; a half-close goes through the splice."""
    b = await HttpBackend().start()
    lst, pool = raw_front(b)
    async with Client(lst.port) as c:
        await c.send(upgrade_request() + b"client-first\n")
        resp = await c.response()
        assert resp.status_line == "HTTP/1.1 101 Switching Protocols"
        assert resp.value("upgrade") == "raw-echo"
        async with asyncio.timeout(5):
            assert await c.r.readexactly(len(b"server-first\n")) == b"server-first\n"
            assert await c.r.readexactly(len(b"client-first\n")) == b"client-first\n"
            for i in range(5):
                await c.send(b"line %d\n" % i)
                assert await c.r.readexactly(7) == b"line %d\n" % i
        c.w.write_eof()
        assert await c.closed()
    (req,) = b.requests
    assert req.value("upgrade") == "raw-echo" and req.value("connection").lower() == "upgrade"
    assert b.upgraded_eof == 1
    assert pool.http.upgrades == 1
    await finish(lst, pool)
    await b.close()


async def test_upgrade_ignored_by_the_replica_gets_its_response_and_close():
    """The replica answers the Upgrade request with a plain 200: the client gets it and the
    connection is closed (the request's framing after it is unknown)."""
    b = await HttpBackend().start()
    lst, pool = raw_front(b)
    async with Client(lst.port) as c:
        await c.send(upgrade_request("/echo"))
        resp = await c.response()
        assert resp.status == 200 and resp.json()["url"] == "/echo"
        assert resp.value("connection") == "close"
        assert await c.closed()
    assert pool.http.upgrades == 0
    await finish(lst, pool)
    await b.close()


async def test_101_not_asked_for_is_a_bad_gateway():
    def handler(conn, req):
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"

    b = await HttpBackend(handler=handler).start()
    lst, pool = raw_front(b)
    async with Client(lst.port) as c:
        await c.send(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        resp = await c.response()
        assert resp.status_line == "HTTP/1.1 502 Bad Gateway"
    assert pool.http.upgrades == 0 and pool.http.generated == {(502, "upstream_failed"): 1}
    await finish(lst, pool)
    await b.close()
