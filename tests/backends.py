"""Real TCP backends for proxy tests, all on 127.0.0.1 with port 0.

- ``Backend``: a server whose protocol is chosen by ``mode``:
  "echo" (echo back, half-close aware: EOF in -> EOF out), "ident" (write the
  backend's name, then echo), "sink" (accept, never read: pauses reading),
  "push" (write ``push_bytes`` of a pattern as fast as flow control allows, then EOF),
  "proxyhdr" (decode a PROXY header, record it, then echo the rest),
  "rst" (reset the connection after the first bytes arrive).
- ``blackhole()``: a listening socket whose tiny backlog is full and never
  accepted, so a further connect neither succeeds nor is refused (it times out).
- ``closed_port()``: a port that was just bound and closed (connect is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from mesh.errors import ProtocolError
from mesh.proxyproto import ProxyHeader, decode

CHUNK = 256 * 1024
LIVE: list[Backend] = []  # started and not yet closed: a test fixture closes leftovers after a failure


def pattern(n: int, offset: int = 0) -> bytes:
    """Deterministic bytes: position i holds (i * 7 + i // 251) & 0xFF -- no short period, cheap to build."""
    block = bytes(((i * 7) + (i // 251)) & 0xFF for i in range(65536 * 3))
    out = bytearray()
    while len(out) < n:
        out += block
    return bytes(out[offset : offset + n]) if offset else bytes(out[:n])


class _BackendProtocol(asyncio.Protocol):
    def __init__(self, backend: Backend) -> None:
        self.b = backend
        self.t: asyncio.Transport | None = None
        self.buf = bytearray()
        self.header_done = False
        self.push_left = 0
        self.paused = False
        self.received = 0

    def connection_made(self, transport):
        self.t = transport
        b = self.b
        b.connections += 1
        b.open += 1
        b.transports.append(transport)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if b.mode == "ident":
            transport.write(b.name.encode() + b"\n")
        elif b.mode == "sink":
            # Not inside connection_made: uvloop 0.23 ignores pause_reading() there.
            asyncio.get_running_loop().call_soon(transport.pause_reading)
        elif b.mode == "push":
            self.push_left = b.push_bytes
            transport.set_write_buffer_limits(high=CHUNK)
            self._push()

    def _push(self):
        block = self.b.push_block
        while self.push_left > 0 and not self.paused:
            n = min(len(block), self.push_left)
            self.t.write(block if n == len(block) else block[:n])
            self.push_left -= n
        if self.push_left == 0 and not self.t.is_closing():
            self.t.write_eof()

    def pause_writing(self):
        self.paused = True
        self.b.max_write_buffer = max(self.b.max_write_buffer, self.t.get_write_buffer_size())

    def resume_writing(self):
        self.paused = False
        if self.b.mode == "push":
            self._push()

    def data_received(self, data):
        b = self.b
        self.received += len(data)
        b.bytes_received += len(data)
        if b.hasher is not None:
            b.hasher.update(data)
        if b.mode == "rst":
            sock = self.t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.t.abort()
            return
        if b.mode == "proxyhdr" and not self.header_done:
            self.buf += data
            try:
                res = decode(self.buf)
            except ProtocolError as exc:
                b.headers.append(exc)
                self.t.close()
                return
            if res is None:
                return
            hdr, n = res
            b.headers.append(hdr)
            self.header_done = True
            data = bytes(self.buf[n:])
            self.buf.clear()
            if not data:
                return
        if b.mode in ("echo", "ident", "proxyhdr"):
            self.t.write(data)

    def eof_received(self):
        self.b.eofs += 1
        if self.b.mode in ("echo", "ident", "proxyhdr"):
            self.t.write_eof()  # echo's direction is done too; returning False then closes
        return False

    def connection_lost(self, exc):
        self.b.open -= 1
        self.b.lost.append(exc)
        with contextlib.suppress(ValueError):
            self.b.transports.remove(self.t)


class Backend:
    """A test backend server (see the module docstring for ``mode``)."""

    def __init__(self, name: str = "backend", mode: str = "echo", *, push_bytes: int = 0, hasher=None) -> None:
        self.name = name
        self.mode = mode
        self.push_bytes = push_bytes
        self.push_block = pattern(CHUNK) if mode == "push" else b""
        self.hasher = hasher
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.open = 0
        self.eofs = 0
        self.bytes_received = 0
        self.max_write_buffer = 0
        self.headers: list[ProxyHeader | Exception] = []
        self.transports: list[asyncio.Transport] = []
        self.lost: list[Exception | None] = []

    async def start(self) -> Backend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _BackendProtocol(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        LIVE.append(self)
        return self

    async def close(self) -> None:
        if self in LIVE:
            LIVE.remove(self)
        if self.server is not None:
            self.server.close()
            for t in list(self.transports):
                t.abort()
            await self.server.wait_closed()
            self.server = None

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.mode} :{self.port} conns={self.connections} open={self.open}>"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed): connects are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Blackhole:
    """A listener with a full backlog that never accepts: SYNs to it are dropped, so a
    connect hangs until the client's timeout (Linux drops SYNs when the accept queue is full)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []

    def fill(self, timeout: float = 0.2, limit: int = 16) -> None:
        """Connect until a connect no longer completes within ``timeout``."""
        for _ in range(limit):
            c = socket.socket()
            c.settimeout(timeout)
            try:
                c.connect(("127.0.0.1", self.port))
            except (TimeoutError, OSError):
                c.close()
                return
            self.fillers.append(c)
        raise AssertionError(f"backlog of port {self.port} never filled after {limit} connects")

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()
