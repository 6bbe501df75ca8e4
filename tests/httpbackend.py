"""A small real HTTP/1.1 backend for the HTTP front's tests: asyncio Protocols + httptools, on
127.0.0.1 with port 0, with raw control over what it sends.

Every request it reads is recorded (``HttpBackend.requests``: method, target, version, every
header field exactly as received -- name case, value and order --, body, trailers, and the
connection it came on); every connection keeps the raw bytes it received (``BackendConn.raw``),
so a test can check the framing the front used.  What it answers is chosen by the request path
(``HttpBackend.handler`` replaces that entirely):

- ``/echo...`` (and any path not below): 200, ``application/json``: the request as ``describe``
  makes it (method, url, version, headers, body, trailers, connection number, request number).
- ``/text...``: 200, ``text/plain``: the request body as it came.
- ``/chunked...``: 200 with ``Transfer-Encoding: chunked`` (the chunks of ``CHUNKED_PARTS``) and
  the trailer ``X-Checksum: done``.
- ``/status/NNN``: status NNN with a short body (502, 503, 400 ...).
- ``/close...``: 200 with ``Connection: close``, then the connection is closed.
- ``/stall...``: no answer at all (the request is still recorded).
- ``/big/N``: 200 with N bytes of ``b"x"``.
- ``/upgrade...`` with ``Upgrade``: 101 to the protocol asked for and ``server-first\n`` in the same
  write; from then on every byte received is echoed (EOF in -> close).

A HEAD request gets the head the GET would have had (with its Content-Length) and no body.
``Expect: 100-continue`` gets ``HTTP/1.1 100 Continue`` as soon as the head is read (unless
``send_continue`` is off).  Connection behaviours, set on the backend:

- ``idle_close``: seconds after which a keep-alive connection with no request in progress is
  closed (None: never).
- ``drop_reused``: a request arriving on a connection that already served one is not answered:
  the connection is closed at once (what a replica that closed an idle connection just as it was
  reused looks like from the front).  Such requests go to ``dropped``, not ``requests``.

The client side, for raw-byte tests: ``Client(port)`` (asyncio streams: ``send``, ``response``,
``closed``, ``quiet``) and ``read_response`` (Content-Length, chunked with trailers, until EOF;
``head=True`` for a HEAD; ``interim=True`` to get a 1xx).  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

__all__ = [
    "CHUNKED_PARTS",
    "BackendConn",
    "Client",
    "HttpBackend",
    "Request",
    "Response",
    "closed_after",
    "describe",
    "read_response",
    "response",
]

CHUNKED_PARTS = (b"first,", b"second,", b"third")
LIVE: list[HttpBackend] = []  # started and not yet closed (a fixture closes leftovers after a failure)


@dataclass
class Request:
    method: str
    url: str
    version: str
    headers: list[tuple[str, str]]  # exactly as received: (name, value), name case kept, in order
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    conn: int = 0  # 1-based number of the connection it came on
    n_on_conn: int = 0  # 1-based position of the request on its connection
    keep_alive: bool = True
    upgrade: bool = False

    def values(self, name: str) -> list[str]:
        """Every value of the field ``name`` (case-insensitive), in order."""
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def value(self, name: str) -> str | None:
        vs = self.values(name)
        assert len(vs) <= 1, f"{name} sent {len(vs)} times: {vs}"
        return vs[0] if vs else None


def describe(req: Request) -> dict:
    return {
        "method": req.method,
        "url": req.url,
        "version": req.version,
        "headers": [[k, v] for k, v in req.headers],
        "body": req.body.decode("latin-1"),
        "trailers": [[k, v] for k, v in req.trailers],
        "conn": req.conn,
        "n": req.n_on_conn,
    }


def response(status: int, body: bytes = b"", headers: list[tuple[str, str]] | tuple = (), *, reason: str = "") -> bytes:
    """A whole response with Content-Length (``headers`` added as they are)."""
    reason = reason or _REASONS.get(status, "Whatever")
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

Handler = Callable[["BackendConn", Request], "bytes | None"]


class BackendConn(asyncio.Protocol):
    """One connection to the backend."""

    def __init__(self, backend: HttpBackend) -> None:
        self.b = backend
        self.t: asyncio.Transport | None = None
        self.raw = bytearray()
        self.parser = httptools.HttpRequestParser(self)
        self.number = 0
        self.served = 0  # requests answered (or dropped) on this connection
        self.cur: Request | None = None
        self.in_head = False
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.closed = False
        self.upgraded = False
        self.switched = False  # answered 101: echo every byte from now on
        self._idle: asyncio.TimerHandle | None = None
        self.lost = asyncio.get_running_loop().create_future()

    # asyncio
    def connection_made(self, transport):
        self.t = transport
        b = self.b
        b.connections += 1
        self.number = b.connections
        b.conns.append(self)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self.raw += data
        if self.closed:
            return
        if self.upgraded:
            if self.switched:
                self.write(data)  # the raw echo protocol of /upgrade
            return
        self._disarm_idle()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The request was handled in on_message_complete; what follows it is the new protocol's.
            off = exc.args[0] if exc.args else len(data)
            self.upgraded = True
            if self.switched and data[off:]:
                self.write(data[off:])
        except httptools.HttpParserError as exc:
            self.b.errors.append(repr(exc))
            self.write(response(400, b"backend: bad request\n", [("Connection", "close")]))
            self.close()

    def eof_received(self):
        if self.switched:
            self.b.upgraded_eof += 1
        return False  # close

    def connection_lost(self, exc):
        self.closed = True
        self._disarm_idle()
        if not self.lost.done():
            self.lost.set_result(None)

    # llhttp
    def on_message_begin(self):
        self.in_head = True
        self.url = b""
        self.headers = []
        self.cur = None

    def on_url(self, url: bytes):
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        pair = (name.decode("latin-1"), value.decode("latin-1"))
        if self.in_head:
            self.headers.append(pair)
        elif self.cur is not None:
            self.cur.trailers.append(pair)

    def on_headers_complete(self):
        self.in_head = False
        p = self.parser
        self.served += 1
        self.cur = req = Request(
            method=p.get_method().decode(),
            url=self.url.decode("latin-1"),
            version=p.get_http_version(),
            headers=self.headers,
            conn=self.number,
            n_on_conn=self.served,
            keep_alive=p.should_keep_alive(),
            upgrade=p.should_upgrade(),
        )
        if self.b.drop_reused and self.served > 1:
            self.b.dropped.append(req)
            self.cur = None
            self.close()
            return
        self.b.received_heads += 1
        if self.b.send_continue and (req.value("Expect") or "").lower() == "100-continue":
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        if self.cur is not None:
            self.cur.body += body

    def on_message_complete(self):
        req = self.cur
        self.cur = None
        if req is None or self.closed:
            return
        b = self.b
        b.requests.append(req)
        b.changed()
        handler = b.handler or default_handler
        out = handler(self, req)
        if out is None:  # stall, or the handler wrote itself
            return
        self.write(out)
        if not req.keep_alive or b"\r\nconnection: close\r\n" in out.split(b"\r\n\r\n", 1)[0].lower() + b"\r\n":
            self.close()
        else:
            self._arm_idle()

    # helpers
    def write(self, data: bytes) -> None:
        if self.t is not None and not self.closed:
            self.t.write(data)

    def close(self) -> None:
        if self.t is not None and not self.closed:
            self.closed = True
            self.t.close()

    def abort(self) -> None:
        if self.t is not None and not self.closed:
            self.closed = True
            self.t.abort()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        if self.b.idle_close is not None and not self.closed:
            self._idle = asyncio.get_running_loop().call_later(self.b.idle_close, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_expired(self) -> None:
        self._idle = None
        self.b.idle_closed += 1
        self.close()


def default_handler(conn: BackendConn, req: Request) -> bytes | None:
    """The path-driven answers of the module docstring."""
    path = req.url.split("?", 1)[0]
    head_only = req.method == "HEAD"
    name = [("X-Backend", conn.b.name)]
    if path.startswith("/stall"):
        return None
    if path.startswith("/upgrade") and req.upgrade:
        conn.switched = True
        return (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\nserver-first\n"
            % (req.value("upgrade") or "").encode()
        )
    if path.startswith("/status/"):
        status = int(path.split("/")[2])
        body = f"backend {conn.b.name}: {status}\n".encode()
        out = response(status, body, [*name, ("Content-Type", "text/plain")])
    elif path.startswith("/chunked"):
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
            f"Trailer: X-Checksum\r\nX-Backend: {conn.b.name}\r\n\r\n"
        ).encode()
        if head_only:
            return head
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in CHUNKED_PARTS)
        return head + body + b"0\r\nX-Checksum: done\r\n\r\n"
    elif path.startswith("/close"):
        out = response(200, b"bye\n", [*name, ("Connection", "close")])
    elif path.startswith("/big/"):
        out = response(200, b"x" * int(path.split("/")[2]), name)
    elif path.startswith("/text"):
        out = response(200, req.body, [*name, ("Content-Type", "text/plain")])
    else:
        body = json.dumps(describe(req)).encode()
        out = response(200, body, [*name, ("Content-Type", "application/json")])
    if head_only:
        return out.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"  # the GET's Content-Length, no body
    return out


class HttpBackend:
    """See the module docstring.  ``await HttpBackend("a").start()``; ``port``; ``await close()``."""

    def __init__(
        self,
        name: str = "a",
        *,
        handler: Handler | None = None,
        idle_close: float | None = None,
        drop_reused: bool = False,
        send_continue: bool = True,
    ) -> None:
        self.name = name
        self.handler = handler
        self.idle_close = idle_close
        self.drop_reused = drop_reused
        self.send_continue = send_continue
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0
        self.conns: list[BackendConn] = []
        self.requests: list[Request] = []
        self.dropped: list[Request] = []
        self.received_heads = 0
        self.errors: list[str] = []
        self.idle_closed = 0
        self.upgraded_eof = 0
        self._event: asyncio.Event | None = None

    async def start(self) -> HttpBackend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: BackendConn(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        LIVE.append(self)
        return self

    @property
    def raw(self) -> bytes:
        """Every byte received, all connections, in connection order."""
        return b"".join(bytes(c.raw) for c in self.conns)

    @property
    def open(self) -> int:
        return sum(1 for c in self.conns if not c.closed)

    def changed(self) -> None:
        if self._event is not None:
            self._event.set()

    async def wait_requests(self, n: int, timeout: float = 5.0) -> list[Request]:
        """Wait until ``n`` requests were read (completely)."""
        async with asyncio.timeout(timeout):
            while len(self.requests) < n:
                self._event = asyncio.Event()
                await self._event.wait()
        return self.requests

    async def close(self) -> None:
        if self in LIVE:
            LIVE.remove(self)
        if self.server is not None:
            self.server.close()
        for c in self.conns:
            c.abort()
        if self.server is not None:
            try:
                async with asyncio.timeout(5):
                    await self.server.wait_closed()
            except TimeoutError:
                pass
            self.server = None

    def __repr__(self) -> str:
        return (
            f"<HttpBackend {self.name} :{self.port} connections={self.connections} requests={len(self.requests)} "
            f"dropped={len(self.dropped)}>"
        )


# -- the client side: raw requests over asyncio streams ----------------------------------------------------
@dataclass
class Response:
    """One response as it came over the wire (``raw``: every byte of it)."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes = b""
    chunked: bool = False

    @property
    def status_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def values(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def value(self, name: str) -> str | None:
        vs = self.values(name)
        assert len(vs) <= 1, f"{name} sent {len(vs)} times: {vs}"
        return vs[0] if vs else None

    def json(self) -> dict:
        return json.loads(self.body)


async def _line(r: asyncio.StreamReader, raw: bytearray) -> bytes:
    line = await r.readuntil(b"\r\n")
    raw += line
    return line[:-2]


async def _fields(r: asyncio.StreamReader, raw: bytearray) -> list[tuple[str, str]]:
    out = []
    for _ in range(1000):
        line = await _line(r, raw)
        if not line:
            return out
        name, colon, value = line.decode("latin-1").partition(":")
        assert colon and name == name.strip(), f"bad field line {line!r}"
        out.append((name, value.strip()))
    raise AssertionError("more than 1000 fields")


async def read_response(
    r: asyncio.StreamReader, *, head: bool = False, interim: bool = False, timeout: float = 5.0
) -> Response:
    """Read one response (a 1xx only with ``interim``; else 1xx are skipped).  ``head``: the request
    was HEAD (no body whatever the fields say).  Bodies: Content-Length, chunked, or until EOF."""
    async with asyncio.timeout(timeout):
        for _ in range(10):
            raw = bytearray()
            status_line = (await _line(r, raw)).decode("latin-1")
            version, _, rest = status_line.partition(" ")
            code, _, reason = rest.partition(" ")
            resp = Response(version, int(code), reason, await _fields(r, raw))
            if 100 <= resp.status < 200 and not interim and resp.status != 101:
                continue
            break
        if head or 100 <= resp.status < 200 or resp.status in (204, 304):
            pass
        elif any(v.lower() == "chunked" for v in resp.values("transfer-encoding")):
            resp.chunked = True
            body = bytearray()
            for _ in range(100000):
                size = int((await _line(r, raw)).split(b";")[0], 16)
                if size == 0:
                    resp.trailers = await _fields(r, raw)
                    break
                data = await r.readexactly(size + 2)
                raw += data
                assert data[-2:] == b"\r\n", f"chunk not followed by CRLF: {data[-10:]!r}"
                body += data[:-2]
            resp.body = bytes(body)
        elif resp.value("content-length") is not None:
            resp.body = await r.readexactly(int(resp.value("content-length")))
            raw += resp.body
        else:
            resp.body = await r.read()
            raw += resp.body
        resp.raw = bytes(raw)
        return resp


async def closed_after(r: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    """True when the peer closes (EOF or reset) within ``timeout`` with no further byte; False on
    timeout; AssertionError when more bytes come."""
    try:
        async with asyncio.timeout(timeout):
            data = await r.read(65536)
    except TimeoutError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    assert data == b"", f"bytes after the response: {data[:200]!r}"
    return True


class Client:
    """One raw client connection: ``async with Client(port) as c: c.send(b"...")``."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Client:
        async with asyncio.timeout(5):
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        try:
            async with asyncio.timeout(5):
                await self.w.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass

    async def response(self, **kw) -> Response:
        return await read_response(self.r, **kw)

    async def closed(self, timeout: float = 3.0) -> bool:
        return await closed_after(self.r, timeout)

    async def quiet(self, seconds: float = 0.2) -> bool:
        """Nothing arrives (and no EOF) for ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                data = await self.r.read(1)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected {'EOF' if not data else data!r}")

    async def close(self) -> None:
        if self.w is not None:
            self.w.close()
            try:
                async with asyncio.timeout(2):
                    await self.w.wait_closed()
            except (TimeoutError, OSError):
                pass
            self.w = None
