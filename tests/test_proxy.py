"""The proxy and listener against real backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mesh import limits
from mesh.listener import Listener
from mesh.pool import EJECTED, Pool
from mesh.proxy import PRECONNECT_LIMIT, PRECONNECT_PAUSE, WRITE_HIGH, TcpConnection, zerocopy
from mesh.proxy import splice as splice_mod
from mesh.routing import Endpoint, Route, ServiceOptions
from tests import backends
from tests.backends import CHUNK, Backend, Blackhole, closed_port, pattern
from tests.util import wait_for

_LISTENERS: list[Listener] = []


@pytest.fixture(autouse=True)
async def _cleanup():
    """After a failed test: abort what it left open, so the loop can close and the next test runs."""
    yield
    while _LISTENERS:
        lst = _LISTENERS.pop()
        lst.close()
        lst.registry.abort_all()
    while backends.LIVE:
        await backends.LIVE[-1].close()


def make_pool(ports, *, states=None, name="svc", **opts) -> Pool:
    eps = tuple(
        Endpoint(id=f"e{i}", address="127.0.0.1", port=p, state=(states or {}).get(i, "running"))
        for i, p in enumerate(ports)
    )
    return Pool(
        name, Route(port=1, endpoints=eps, listen_host="127.0.0.1"), ServiceOptions(**opts), rng=random.Random(7)
    )


def start_listener(pool: Pool) -> Listener:
    lst = Listener("127.0.0.1", 0, pool, service=pool.service)
    lst.start()
    _LISTENERS.append(lst)
    return lst


async def finish(lst: Listener, *backends: Backend) -> None:
    """Every connection closed, every host's active count back to 0, then tear down."""
    await wait_for(lambda: len(lst.registry) == 0, what=f"connections of {lst!r} to close: {list(lst.registry)}")
    for h in lst.pool.hosts:
        assert h.active == 0, h
    lst.close()
    for b in backends:
        await b.close()


async def echo_once(port: int, payload: bytes = b"hello") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    await w.drain()
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    await w.wait_closed()
    return data


async def test_echo_through_proxy_counts_bytes_and_releases_host():
    b = await Backend("a").start()
    pool = make_pool([b.port])
    lst = start_listener(pool)
    assert await echo_once(lst.port, b"x" * 1000) == b"x" * 1000
    await finish(lst, b)
    host = pool.hosts[0]
    assert (host.stats.connections, host.stats.bytes_in, host.stats.bytes_out) == (1, 1000, 1000)
    assert host.stats.duration.count == 1 and host.stats.connect_time.count == 1
    assert pool.stats.accepted == 1 and pool.stats.no_endpoint == 0


async def _echo_once(port: int, payload: bytes = b"ping") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(payload)
        return await asyncio.wait_for(r.readexactly(len(payload)), 5)
    finally:
        w.close()


@pytest.mark.uvloop_only
async def test_acceptor_accepts_in_c_and_goes_careful_while_the_fd_reserve_is_in_use(monkeypatch):
    """uvloop: accepting moves to uvloop's server; once the reserve line (soft limit - reserve) is an
    open descriptor, accepting goes back to the careful loop at once (no client lost); when the reserve
    is free again, the watchdog goes fast again."""
    from mesh import listener as listener_mod

    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port]))
    acc = lst.acceptor
    await wait_for(lambda: acc.fast, what="accepting in C")
    assert await _echo_once(lst.port) == b"ping"
    line = socket.socket()  # an open descriptor to put the reserve line on
    soft = listener_mod.resource.getrlimit(listener_mod.resource.RLIMIT_NOFILE)[0]
    monkeypatch.setattr(listener_mod, "FD_RESERVE", soft - line.fileno())
    try:
        assert not listener_mod._reserve_ok()
        changes = acc.mode_changes
        assert await _echo_once(lst.port) == b"ping"  # accepted in C, then the switch
        await wait_for(lambda: not acc.fast, what="careful accepting")
        assert acc.mode_changes == changes + 1
        for _ in range(3):
            assert await _echo_once(lst.port) == b"ping"  # served by the careful loop
        assert not acc.fast and acc.fd_exhausted == 0
    finally:
        line.close()
    monkeypatch.undo()
    await wait_for(lambda: acc.fast, timeout=3, what="fast again after the watchdog")
    assert await _echo_once(lst.port) == b"ping"
    assert lst.pool.stats.accepted == 6 and acc.accepted == 6
    await finish(lst, b)


@pytest.mark.uvloop_only
async def test_acceptor_watchdog_takes_over_when_the_fast_server_stops(caplog):
    """libuv closes its server on some accept errors; the watchdog notices within a second, counts it,
    and the careful loop serves the clients that waited in the backlog meanwhile."""
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port]))
    acc = lst.acceptor
    await wait_for(lambda: acc.fast, what="accepting in C")
    acc._fast.close()  # what uvloop does to itself on an accept error it passes on
    with caplog.at_level(logging.ERROR, logger="mesh.listener"):
        assert await _echo_once(lst.port) == b"ping"  # waits in the backlog until the watchdog
    assert acc.accept_errors == 1 and not acc.fast
    assert any("fast accept path stopped" in r.getMessage() for r in caplog.records)
    await finish(lst, b)


@pytest.mark.parametrize(
    ("idle_timeout", "upstream_keepalive"),
    [(0, 1), (splice_mod.KEEPALIVE_TIME + 1, 1), (3600.0 if splice_mod.KEEPALIVE_TIME > 3600 else 0.5, 0)],
)
async def test_both_sides_have_nodelay_and_keepalive_where_it_can_matter(idle_timeout, upstream_keepalive):
    """TCP_NODELAY on both sides; SO_KEEPALIVE on the client side always (inherited from the listening socket)
    and on the upstream side when the idle timeout would not close the pair before the kernel's first probe."""
    b = await Backend("a").start()
    pool = make_pool([b.port], idle_timeout=idle_timeout)
    lst = start_listener(pool)
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(b"ping")
    assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
    (conn,) = list(lst.registry)
    for transport, want in ((conn.transport, 1), (conn.up_transport, upstream_keepalive)):
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1, transport
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == want, transport
    w.close()
    await w.wait_closed()
    await finish(lst, b)


async def test_round_robin_over_three_backends():
    bs = [await Backend(n, "ident").start() for n in ("a", "b", "c")]
    pool = make_pool([b.port for b in bs])
    lst = start_listener(pool)
    seen = []
    for _ in range(9):
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        seen.append((await asyncio.wait_for(r.readline(), 5)).decode().strip())
        w.close()
        await w.wait_closed()
    assert sorted(seen) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    # Round robin: every window of three consecutive picks holds each backend once.
    assert all(len(set(seen[i : i + 3])) == 3 for i in range(0, 9, 3))
    await finish(lst, *bs)


async def test_retry_on_refused_endpoint_then_eject():
    a, b = await Backend("a").start(), await Backend("b").start()
    dead = closed_port()
    pool = make_pool([a.port, dead, b.port], retries=2, consecutive_failures=3, max_ejection_percent=50)
    lst = start_listener(pool)
    for i in range(12):
        assert await echo_once(lst.port, b"ping%d" % i) == b"ping%d" % i
    dead_host = next(h for h in pool.hosts if h.port == dead)
    failures = pool.stats.connect_failures.get("refused", 0)
    assert failures == 3  # three failures in a row eject it; then it is never chosen again
    assert pool.stats.retries == 3 and pool.stats.failed == {}
    assert dead_host.health & EJECTED and dead_host.stats.ejections == 1 and dead_host.stats.connections == 0
    assert a.connections + b.connections == 12
    await finish(lst, a, b)


async def test_connect_timeout_then_retry_elsewhere():
    hole = Blackhole()
    hole.fill()
    b = await Backend("b").start()
    try:
        pool = make_pool([hole.port], connect_timeout=0.3, retries=0)
        lst = start_listener(pool)
        t0 = time.monotonic()
        assert await echo_once(lst.port) == b""  # closed after the timeout, nothing else to try
        assert 0.25 <= time.monotonic() - t0 < 2.0
        assert pool.stats.connect_failures == {"timeout": 1}
        assert pool.stats.failed == {"timeout": 1}  # given up: the client got nothing
        await finish(lst)

        pool = make_pool([hole.port, b.port], connect_timeout=0.3, retries=1, balance="round-robin")
        lst = start_listener(pool)
        for _ in range(2):  # one of the two starts on the black hole
            assert await echo_once(lst.port) == b"hello"
        assert pool.stats.connect_failures == {"timeout": 1} and pool.stats.retries == 1
        assert pool.stats.failed == {}  # the retry saved it
        await finish(lst, b)
    finally:
        hole.close()


@pytest.mark.parametrize("case", ["empty", "all-draining"])
async def test_no_endpoint_closes_client_at_once(case):
    b = await Backend("b").start()
    pool = make_pool([] if case == "empty" else [b.port], states={0: "draining"})
    lst = start_listener(pool)
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    t0 = time.monotonic()
    assert await asyncio.wait_for(r.read(), 2) == b""
    assert time.monotonic() - t0 < 0.5
    w.close()
    await w.wait_closed()
    assert pool.stats.no_endpoint == 1 and b.connections == 0
    await finish(lst, b)


async def test_half_close_client_first():
    b = await Backend("a", "echo").start()
    lst = start_listener(make_pool([b.port]))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(b"abc")
    w.write_eof()  # client is done sending; must still receive everything
    assert await asyncio.wait_for(r.read(), 5) == b"abc"
    assert b.eofs == 1
    w.close()
    await w.wait_closed()
    await finish(lst, b)


async def test_half_close_backend_first():
    b = await Backend("a", "push", push_bytes=10_000).start()
    lst = start_listener(make_pool([b.port]))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    assert await asyncio.wait_for(r.read(), 5) == pattern(10_000)  # then EOF from the backend
    # The other direction is still open: the backend receives what we send after its EOF.
    w.write(b"late bytes")
    await w.drain()
    await wait_for(lambda: b.bytes_received == 10, what="backend to receive bytes after its own EOF")
    w.write_eof()
    await finish(lst, b)
    w.close()
    await w.wait_closed()


async def test_idle_timeout_closes_idle_pair_but_not_active_one():
    b = await Backend("a").start()
    pool = make_pool([b.port], idle_timeout=0.4)
    lst = start_listener(pool)
    # Active: a byte every 0.1 s for 1 s (2.5 x the timeout) keeps it open.
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    for i in range(10):
        w.write(bytes([65 + i]))
        assert await asyncio.wait_for(r.readexactly(1), 2) == bytes([65 + i])
        await asyncio.sleep(0.1)  # pacing, not synchronisation
    # Idle: closed after 1..1.25 x idle_timeout (plus scheduling slack), with a reset: a cut-off
    # connection must not look like one that ended normally.
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(r.read(), 3)
    assert 0.35 <= time.monotonic() - t0 < 1.2
    w.close()
    await finish(lst, b)


async def test_rst_from_backend_closes_client():
    b = await Backend("a", "rst").start()
    lst = start_listener(make_pool([b.port]))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(b"boom")
    try:
        assert await asyncio.wait_for(r.read(), 3) == b""
    except ConnectionResetError:
        pass
    w.close()
    await finish(lst, b)


async def test_a_backend_that_answers_then_resets_leaves_the_client_the_whole_answer():
    """A replica that answers and closes with request bytes unread resets (busybox nc reading one line of
    two): the client still gets every byte of the answer, then an end of stream."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.setblocking(False)
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        while True:
            c, _ = await loop.sock_accept(srv)
            await loop.sock_recv(c, 1)  # one byte read, the rest left unread: the close below is a reset
            await loop.sock_sendall(c, b"answer\n")
            c.close()

    task = asyncio.ensure_future(serve())
    lst = start_listener(make_pool([srv.getsockname()[1]]))
    try:
        for _ in range(20):
            r, w = await asyncio.open_connection("127.0.0.1", lst.port)
            w.write(b"PROXY line\nhello\n")
            assert await asyncio.wait_for(r.read(), 3) == b"answer\n"
            w.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        srv.close()
    await finish(lst)


async def test_a_backend_that_finishes_then_resets_leaves_the_client_a_complete_stream():
    """A replica that sent everything and its FIN, then resets (unread bytes at its close): the client keeps
    the whole response and a clean end of stream."""
    b = await Backend("a", "push", push_bytes=3 * CHUNK).start()
    lst = start_listener(make_pool([b.port]))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    got = b""
    while len(got) < 3 * CHUNK:
        chunk = await asyncio.wait_for(r.read(CHUNK), 5)
        assert chunk, "end of stream before the whole response"
        got += chunk
    assert got == pattern(CHUNK) * 3
    assert await asyncio.wait_for(r.read(), 5) == b""
    for t in list(b.transports):  # the replica closes with a reset now that it has finished
        t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        t.abort()
    w.close()
    await finish(lst, b)


async def test_a_client_that_resets_while_both_sides_are_stalled_frees_the_pair():
    """Client and replica both stop reading, each with bytes on its way to the other, then the client resets:
    the pair is closed at once (a graceful close would wait to flush the client's bytes to a replica that
    never reads, holding both sides until the idle timeout; the chaos runner's client-never-read fault)."""
    b = await Backend("a", "push", push_bytes=256 * 1024 * 1024).start()
    lst = start_listener(make_pool([b.port]))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", lst.port))
    s.setblocking(False)
    await wait_for(lambda: b.open == 1, what="the replica's connection")
    for t in b.transports:
        t.pause_reading()  # the replica never reads what the client sends
    block = b"x" * 65536
    sent, deadline = 0, time.monotonic() + 5
    while time.monotonic() < deadline:  # fill every buffer between the client and the replica
        try:
            sent += s.send(block)
        except BlockingIOError:
            await asyncio.sleep(0.05)
            try:
                sent += s.send(block)
            except BlockingIOError:
                break
    assert sent > 0
    await asyncio.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST, with the replica's bytes unread
    await wait_for(lambda: b.open == 0, timeout=3, what="the replica's side to close after the client's reset")
    await finish(lst, b)


async def test_client_reset_closes_backend():
    b = await Backend("a").start()
    lst = start_listener(make_pool([b.port]))
    s = socket.create_connection(("127.0.0.1", lst.port))
    s.sendall(b"x")
    await wait_for(lambda: b.bytes_received == 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST
    await wait_for(lambda: b.open == 0, what="backend side to close after client RST")
    await finish(lst, b)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_header_carries_client_address(version):
    b = await Backend("a", "proxyhdr").start()
    lst = start_listener(make_pool([b.port], proxy_protocol=version))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    client = w.get_extra_info("sockname")
    w.write(b"early bytes")  # sent before the upstream is connected: buffered, then after the header
    assert await asyncio.wait_for(r.readexactly(11), 5) == b"early bytes"
    w.close()
    await w.wait_closed()
    (hdr,) = b.headers
    assert hdr.version == int(version[1]) and hdr.command == "PROXY"
    assert hdr.src == ("127.0.0.1", client[1])
    assert hdr.dst == ("127.0.0.1", lst.port)
    await finish(lst, b)


async def test_preconnect_buffer_is_bounded_then_overflow_closes():
    """While the connect hangs, the proxy buffers at most ~PRECONNECT_PAUSE and stops reading the client;
    bytes delivered despite the pause (uvloop may do that) beyond PRECONNECT_LIMIT close the connection."""
    hole = Blackhole()
    hole.fill()
    try:
        pool = make_pool([hole.port], connect_timeout=10.0, retries=0)
        lst = start_listener(pool)
        s = socket.create_connection(("127.0.0.1", lst.port))
        s.setblocking(False)
        await wait_for(lambda: len(lst.registry) == 1)
        conn = _proxy_conn(lst)
        sent = 0
        block = b"z" * 65536
        deadline = time.monotonic() + 5
        # Write until the kernel buffers are full too (bounded by time and by 64 MiB).
        blocked = 0
        while blocked < 20 and time.monotonic() < deadline and sent < 64 * 1024 * 1024:
            try:
                sent += s.send(block)
                blocked = 0
            except BlockingIOError:
                blocked += 1
                await asyncio.sleep(0.01)
        assert conn._down_paused == 1 and conn.state == "connecting"
        assert PRECONNECT_PAUSE < len(conn._buf) <= PRECONNECT_PAUSE + CHUNK < sent
        assert pool.stats.overflow_closed == 0
        # Data that arrives although reading is paused (uvloop 0.23 right after accept) is bounded too.
        conn.data_received(b"y" * PRECONNECT_LIMIT)
        assert pool.stats.overflow_closed == 1
        await finish(lst)
        s.close()
        assert pool.stats.connect_failures == {}  # the connect was cancelled, not failed
    finally:
        hole.close()


# -- heavy: uvloop only -------------------------------------------------------------------------------


class _Reader(asyncio.Protocol):
    """Client that hashes what it reads; ``reading`` can be switched off to apply backpressure."""

    def __init__(self):
        self.t = None
        self.h = hashlib.blake2b()
        self.n = 0
        self.eof = asyncio.get_running_loop().create_future()

    def connection_made(self, t):
        self.t = t

    def data_received(self, data):
        self.h.update(data)
        self.n += len(data)

    def eof_received(self):
        if not self.eof.done():
            self.eof.set_result(self.n)

    def connection_lost(self, exc):
        if not self.eof.done():
            self.eof.set_result(self.n)


def _proxy_conn(lst: Listener) -> TcpConnection:
    (conn,) = list(lst.registry)
    return conn


async def _sample_buffers(conn: TcpConnection, stop: asyncio.Event, out: list[int]) -> None:
    """Record the largest write buffer the proxy holds on either side, every 5 ms."""
    while not stop.is_set():
        sizes = [conn.transport.get_write_buffer_size()]
        if conn.up_transport is not None:
            sizes.append(conn.up_transport.get_write_buffer_size())
        out.append(max(sizes))
        await asyncio.sleep(0.005)


BOUND = WRITE_HIGH + 2 * CHUNK  # high water mark plus what one read can add before pausing


@pytest.mark.uvloop_only
@pytest.mark.slow
async def test_backpressure_slow_client_1gib_from_backend_stays_bounded():
    total = 1 << 30
    b = await Backend("push", "push", push_bytes=total).start()
    lst = start_listener(make_pool([b.port]))
    loop = asyncio.get_running_loop()
    _, reader = await loop.create_connection(_Reader, "127.0.0.1", lst.port)
    reader.t.pause_reading()  # a client that stops reading
    await wait_for(lambda: len(lst.registry) == 1 and _proxy_conn(lst)._up_paused, what="proxy to pause upstream")
    conn = _proxy_conn(lst)
    await wait_for(lambda: b.max_write_buffer > 0, what="backend to feel backpressure")
    assert conn.transport.get_write_buffer_size() <= BOUND
    stop, samples = asyncio.Event(), []
    sampler = loop.create_task(_sample_buffers(conn, stop, samples))
    reader.t.resume_reading()
    t0 = time.monotonic()
    n = await asyncio.wait_for(reader.eof, 120)
    elapsed = time.monotonic() - t0
    stop.set()
    await sampler
    assert n == total
    assert max(samples) <= BOUND, max(samples)
    print(f"\n1 GiB backend->client through the proxy (one loop, all three parties): {total / elapsed / 1e6:.0f} MB/s")
    reader.t.close()
    await finish(lst, b)


@pytest.mark.uvloop_only
@pytest.mark.slow
async def test_backpressure_slow_backend_and_1gib_byte_identical():
    """Client -> backend: the backend stops reading for a while (the proxy must pause the client),
    then 1 GiB arrives byte-identical (hash on both ends)."""
    total = 1 << 30
    recv_hash = hashlib.blake2b()
    b = await Backend("sink", "sink", hasher=recv_hash).start()
    lst = start_listener(make_pool([b.port]))
    loop = asyncio.get_running_loop()
    block = pattern(CHUNK)
    sent_hash = hashlib.blake2b()

    class Writer(asyncio.Protocol):
        def __init__(self):
            self.can_write = asyncio.Event()
            self.can_write.set()

        def connection_made(self, t):
            self.t = t
            t.set_write_buffer_limits(high=CHUNK)

        def pause_writing(self):
            self.can_write.clear()

        def resume_writing(self):
            self.can_write.set()

    tr, w = await loop.create_connection(Writer, "127.0.0.1", lst.port)
    sent = 0
    # Phase 1: the backend does not read; the client must be stopped by the proxy.
    while w.can_write.is_set() and sent < 64 * 1024 * 1024:
        tr.write(block)
        sent_hash.update(block)
        sent += len(block)
        await asyncio.sleep(0)
    conn = _proxy_conn(lst)
    assert w.can_write.is_set() is False, f"client never felt backpressure after {sent} bytes"
    await wait_for(lambda: conn._down_paused, what="proxy to pause reading the client")
    assert conn.up_transport.get_write_buffer_size() <= BOUND
    stop, samples = asyncio.Event(), []
    sampler = loop.create_task(_sample_buffers(conn, stop, samples))
    # Phase 2: the backend reads; the client pushes the rest.
    b.transports[0].resume_reading()
    t0 = time.monotonic()
    while sent < total:
        await w.can_write.wait()
        n = min(CHUNK, total - sent)
        data = block if n == CHUNK else block[:n]
        tr.write(data)
        sent_hash.update(data)
        sent += n
    tr.write_eof()
    await wait_for(lambda: b.bytes_received == total, timeout=120, interval=0.05, what="backend to receive 1 GiB")
    elapsed = time.monotonic() - t0
    stop.set()
    await sampler
    assert recv_hash.hexdigest() == sent_hash.hexdigest()
    assert max(samples) <= BOUND, max(samples)
    print(f"\n1 GiB client->backend through the proxy (one loop, all three parties): {total / elapsed / 1e6:.0f} MB/s")
    tr.close()
    await finish(lst, b)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


ECHO_SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, uvloop

    class Echo(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t
        def data_received(self, data):
            self.t.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)

    uvloop.run(main())
    """
)


@pytest.mark.uvloop_only
@pytest.mark.slow
async def test_5000_concurrent_connections_no_fd_leak():
    # 5000 pairs take 15000 fds here (client, proxy client side, proxy upstream side); the
    # backend runs in a subprocess so the 20000 fd limit of this machine is enough.
    limits.raise_nofile()
    n = 5000
    backend = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ECHO_SERVER_SCRIPT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        bport = int(await asyncio.wait_for(backend.stdout.readline(), 10))
        await _many_connections(n, bport)
    finally:
        backend.stdin.close()
        await asyncio.wait_for(backend.wait(), 10)


async def _many_connections(n: int, bport: int) -> None:
    pool = make_pool([bport])
    lst = start_listener(pool)
    # uvloop: the acceptor goes fast (uvloop's server on a dup of the listening socket) a moment after start;
    # that dup is the listener's own descriptor, counted in ``before``.
    await wait_for(lambda: lst.acceptor.fast, what="accepting in C")
    before = _open_fds()
    loop = asyncio.get_running_loop()

    class Client(asyncio.Protocol):
        def __init__(self):
            self.got = loop.create_future()

        def connection_made(self, t):
            self.t = t
            t.write(b"hi")

        def data_received(self, data):
            if not self.got.done():
                self.got.set_result(data)

        def connection_lost(self, exc):
            if not self.got.done():
                self.got.set_exception(ConnectionError(f"lost before echo: {exc!r}"))

    clients = []
    try:
        for _ in range(0, n, 500):  # open in batches so the 4096 backlog never overflows
            clients += await asyncio.gather(
                *(loop.create_connection(Client, "127.0.0.1", lst.port) for _ in range(500))
            )
        got = await asyncio.wait_for(asyncio.gather(*(p.got for _, p in clients)), 60)
        assert got == [b"hi"] * n
        assert len(lst.registry) == n and pool.hosts[0].active == n
        # (the listener's own dup is closed while the reserve line is crossed: careful accepting)
        assert _open_fds() >= before - 1 + 3 * n
        assert not lst.acceptor.fast and lst.acceptor.fd_exhausted == 0
    finally:
        for t, _ in clients:
            t.close()
        clients.clear()
    await wait_for(lambda: len(lst.registry) == 0, timeout=30, what="5000 connections to close")
    await wait_for(lambda: _open_fds() <= before, timeout=10, what=f"fds back to {before}, now {_open_fds()}")
    assert pool.hosts[0].stats.connections == n and pool.hosts[0].active == 0
    await finish(lst)


EMFILE_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, resource, socket, sys, time, random
    import uvloop
    from mesh.listener import Listener
    from mesh.pool import Pool
    from mesh.routing import Endpoint, Route, ServiceOptions

    async def main():
        loop = asyncio.get_running_loop()
        backend = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        pool = Pool("svc", Route(port=1, endpoints=(Endpoint("e", "127.0.0.1", bport),)), ServiceOptions())
        lst = Listener("127.0.0.1", 0, pool, service="svc")
        lst.start()
        if sys.argv[1] == "uvloop":
            while not lst.acceptor.fast:  # accepting in C before the descriptors run out
                await asyncio.sleep(0.01)
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        hog = []
        try:
            while True:
                hog.append(socket.socket())
        except OSError:
            pass
        t0 = time.monotonic()
        while lst.acceptor.fast and time.monotonic() - t0 < 5:  # the reserve check notices (RESERVE_CHECK)
            await asyncio.sleep(0.01)
        print("PORT", lst.port, flush=True)
        sys.stdin.readline()  # the parent connected its clients
        cpu0 = time.process_time()
        t0 = time.monotonic()
        while lst.fd_exhausted < 3 and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # measure CPU over a second of exhaustion
        cpu = time.process_time() - cpu0
        print("EXHAUSTED", lst.fd_exhausted, "CPU", round(cpu, 3), flush=True)
        for s in hog:
            s.close()
        t0 = time.monotonic()
        while pool.stats.accepted < 3 and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.05)
        print("ACCEPTED", pool.stats.accepted, flush=True)
        sys.stdin.readline()

    (uvloop.run if sys.argv[1] == "uvloop" else asyncio.run)(main())
    """
)


@pytest.mark.parametrize(("loop_name", "fd_limit"), [("uvloop", 64), ("uvloop", 9000), ("asyncio", 64)])
def test_fd_exhaustion_counted_logged_no_busy_loop_then_recovers(loop_name, fd_limit):
    """Every descriptor taken (by others): accepts fail with EMFILE, are counted, paused, and the clients
    waiting in the backlog are served once descriptors are free.  With uvloop the acceptor was accepting
    in C when the descriptors ran out: the reserve check moves it to the careful loop first (at 9000 the
    reserve line is a real descriptor number, at 64 the limit is all reserve), so libuv never drops a client."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SCRIPT, loop_name, str(fd_limit)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    clients = []
    try:
        port = int(proc.stdout.readline().split()[1])
        for _ in range(3):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        words = proc.stdout.readline().split()
        assert words[0] == "EXHAUSTED", words
        exhausted, cpu = int(words[1]), float(words[3])
        assert exhausted >= 3  # counted, and retried (paused, not given up)
        assert cpu < 0.3, f"accept loop spun: {cpu}s CPU in ~1 s of fd exhaustion"
        words = proc.stdout.readline().split()
        assert words == ["ACCEPTED", "3"], words  # the waiting clients are served once fds are free
        for c in clients:
            c.settimeout(5)
            c.sendall(b"x")  # the connection is alive (proxied to the backend)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=10)
        assert err.count("accept failed") == 1, err  # logged once per interval, not per failure
        assert "service svc listener 127.0.0.1:" in err
    finally:
        for c in clients:
            c.close()
        _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    """Kill a helper process that is still running and close its pipes, so that a failed test leaves no
    unclosed file for the garbage collector to warn about in a later test."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


LIMITS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from mesh.limits import nofile, raise_nofile
    soft, hard = nofile()
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    print(raise_nofile(), nofile()[0] == hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    print(raise_nofile(300), nofile()[0] == hard)  # below the hard limit: still up to the hard limit
    try:
        raise_nofile(0)
    except ValueError as exc:
        print("ValueError", exc)
    # Beyond the hard limit: granted with CAP_SYS_RESOURCE, else the hard limit with a warning.
    got = raise_nofile(hard + 1000)
    print(got in (hard, hard + 1000), nofile()[0] == got)
    """
)


def test_raise_nofile_in_a_subprocess():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", LIMITS_SCRIPT], capture_output=True, text=True, cwd=root, timeout=30, check=True
    ).stdout.splitlines()
    hard = limits.nofile()[1]
    assert out == [
        f"{hard} True",
        f"{hard} True",
        "ValueError max_fds must be a positive integer, got 0",
        "True True",
    ]


LOOP_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if sys.argv[1] == "no-uvloop":
        sys.modules["uvloop"] = None  # import fails as if it were not installed
    from mesh.loop import run

    async def main():
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    print(run(main()), run(main()))
    """
)


@pytest.mark.parametrize(("mode", "loop_module", "warnings"), [("uvloop", "uvloop", 0), ("no-uvloop", "asyncio", 1)])
def test_loop_run_uses_uvloop_or_falls_back_with_one_warning(mode, loop_module, warnings):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", LOOP_SCRIPT, mode], capture_output=True, text=True, cwd=root, timeout=30, check=True
    )
    assert proc.stdout.split() == [loop_module, loop_module]
    assert proc.stderr.count("uvloop is not available") == warnings, proc.stderr


# -- zero-copy: large transfers through the kernel (mesh.proxy.zerocopy) ---------------------------------


def _pattern_hash(block: bytes, total: int):
    h = hashlib.blake2b()
    left = total
    while left:
        n = min(len(block), left)
        h.update(block[:n])
        left -= n
    return h


@pytest.mark.skipif(not zerocopy.AVAILABLE, reason="os.splice needs Linux")
async def test_large_download_moves_to_the_kernel_byte_identical_with_exact_counts():
    total = 64 << 20
    b = await Backend("push", "push", push_bytes=total).start()
    lst = start_listener(make_pool([b.port], zero_copy=True))
    loop = asyncio.get_running_loop()
    before = _open_fds()
    _, reader = await loop.create_connection(_Reader, "127.0.0.1", lst.port)
    await wait_for(lambda: len(lst.registry) == 1, what="accepted")
    conn = _proxy_conn(lst)
    await wait_for(lambda: conn._zc_up is not None or reader.eof.done(), what="the kernel path")
    assert conn._zc_up is not None and conn._zc_down is None  # only the direction that carries the bulk
    assert await asyncio.wait_for(reader.eof, 60) == total  # EOF passed on after the pipe drained
    assert reader.h.hexdigest() == _pattern_hash(b.push_block, total).hexdigest()
    reader.t.close()
    await finish(lst, b)
    host = lst.pool.hosts[0]
    assert (host.stats.bytes_out, host.stats.bytes_in) == (total, 0)  # every spliced byte counted once
    await wait_for(lambda: _open_fds() <= before, what="the dups and the pipe closed")


@pytest.mark.skipif(not zerocopy.AVAILABLE, reason="os.splice needs Linux")
async def test_large_upload_moves_to_the_kernel_with_backpressure_and_half_close():
    total = 64 << 20
    recv_hash = hashlib.blake2b()
    b = await Backend("sink", "sink", hasher=recv_hash).start()
    lst = start_listener(make_pool([b.port], zero_copy=True))
    block = pattern(CHUNK)
    _r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    await wait_for(lambda: len(lst.registry) == 1 and _proxy_conn(lst).up_transport is not None, what="connected")
    conn = _proxy_conn(lst)
    sent_hash = hashlib.blake2b()
    sent = 0
    for _ in range(64):  # an upload in 256 KiB writes: soon one read is large enough
        w.write(block)
        sent_hash.update(block)
        sent += len(block)
        await asyncio.sleep(0.01)
        if conn._zc_down is not None:
            break
    assert conn._zc_down is not None and conn._zc_up is None
    # The backend reads nothing yet: the pipe fills, then the client's socket; the writer must block.
    stalled = False
    while sent < total:
        w.write(block)
        sent_hash.update(block)
        sent += len(block)
        try:
            await asyncio.wait_for(w.drain(), 0.2)
        except TimeoutError:
            stalled = True
            break
    assert stalled, "the client never felt backpressure"
    assert conn.up_transport.get_write_buffer_size() == 0 and conn.transport.get_write_buffer_size() == 0
    b.transports[0].resume_reading()
    while sent < total:
        w.write(block)
        sent_hash.update(block)
        sent += len(block)
        await w.drain()
    w.write_eof()
    await wait_for(lambda: b.bytes_received == sent, timeout=60, interval=0.05, what="every byte at the backend")
    assert recv_hash.hexdigest() == sent_hash.hexdigest()
    await wait_for(lambda: b.eofs == 1, what="EOF passed on to the backend")
    w.close()
    await finish(lst, b)
    assert lst.pool.hosts[0].stats.bytes_in == sent


@pytest.mark.skipif(not zerocopy.AVAILABLE, reason="os.splice needs Linux")
@pytest.mark.parametrize("opts", [{}, {"zero_copy": False}], ids=["default", "off"])
async def test_zero_copy_off_keeps_every_byte_in_user_space(opts):
    total = 16 << 20
    b = await Backend("push", "push", push_bytes=total).start()
    lst = start_listener(make_pool([b.port], **opts))
    loop = asyncio.get_running_loop()
    _, reader = await loop.create_connection(_Reader, "127.0.0.1", lst.port)
    await wait_for(lambda: len(lst.registry) == 1, what="accepted")
    conn = _proxy_conn(lst)
    seen = []

    async def watch():
        while not reader.eof.done():
            seen.append(conn._zc_up)
            await asyncio.sleep(0.001)

    watcher = loop.create_task(watch())
    assert await asyncio.wait_for(reader.eof, 60) == total
    await watcher
    assert set(seen) == {None}
    reader.t.close()
    await finish(lst, b)


@pytest.mark.skipif(not zerocopy.AVAILABLE, reason="os.splice needs Linux")
async def test_client_reset_during_a_kernel_transfer_closes_everything():
    b = await Backend("push", "push", push_bytes=1 << 30).start()
    lst = start_listener(make_pool([b.port], zero_copy=True))
    loop = asyncio.get_running_loop()
    before = _open_fds()
    _, reader = await loop.create_connection(_Reader, "127.0.0.1", lst.port)
    await wait_for(lambda: len(lst.registry) == 1 and _proxy_conn(lst)._zc_up is not None, what="the kernel path")
    await wait_for(lambda: reader.n > 4 << 20, what="some bytes through the kernel")
    reader.t.abort()  # RST while the kernel path moves bytes
    await finish(lst, b)
    await wait_for(lambda: _open_fds() <= before, what="the dups and the pipe closed")


async def test_when_the_only_usable_endpoint_fails_the_last_resort_is_an_ejected_one():
    """Two flapping replicas (the reliability issue): one ejected, the other refusing right now.  Rather than
    refuse the client, the retry goes to the ejected one, which answers."""
    b = await Backend("b").start()
    pool = make_pool([closed_port(), b.port])
    refusing, ejected = pool.hosts
    for _ in range(pool.options.consecutive_failures):
        pool.report_failure(ejected)
    assert ejected.health & EJECTED and pool.usable == (refusing,)
    lst = start_listener(pool)
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(b"ping")
    assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
    assert pool.stats.connect_failures == {"refused": 1} and pool.stats.retries == 1 and pool.stats.failed == {}
    assert ejected.stats.connections == 1
    w.close()
    await finish(lst, b)


async def test_no_last_resort_when_panic_is_off():
    b = await Backend("b").start()
    pool = make_pool([closed_port(), b.port], panic_threshold=0)
    _refusing, ejected = pool.hosts
    for _ in range(pool.options.consecutive_failures):
        pool.report_failure(ejected)
    lst = start_listener(pool)
    r, w = await asyncio.open_connection("127.0.0.1", lst.port)
    w.write(b"ping")
    assert await asyncio.wait_for(r.read(), 5) == b""  # refused: panic off means "refuse rather than risk it"
    assert pool.stats.failed == {"refused": 1} and ejected.stats.connections == 0
    w.close()
    await finish(lst, b)


DIAL_EMFILE_SCRIPT = textwrap.dedent(
    """
    import asyncio, resource, socket, sys, time
    import uvloop
    from mesh.listener import Listener
    from mesh.pool import Pool
    from mesh.routing import Endpoint, Route, ServiceOptions

    class Echo(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t
        def data_received(self, d):
            self.t.write(d)

    async def main():
        loop = asyncio.get_running_loop()
        backend = await loop.create_server(Echo, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        pool = Pool("svc", Route(port=1, endpoints=(Endpoint("e", "127.0.0.1", bport),)), ServiceOptions())
        lst = Listener("127.0.0.1", 0, pool, service="svc")
        lst.start()
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        hog = []
        try:
            while True:
                hog.append(socket.socket())
        except OSError:
            pass
        hog.pop().close()  # one descriptor left: the accept takes it, the dial to the endpoint finds none
        print("PORT", lst.port, flush=True)
        t0 = time.monotonic()
        while not pool.stats.connect_failures.get("local_resources") and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        print("STARVED", pool.stats.connect_failures, pool.hosts[0].consecutive_failures, lst.fd_exhausted,
              lst.acceptor.paused, flush=True)
        await asyncio.sleep(0.6)  # a few more retries while still starved
        for s in hog[:8]:
            s.close()
        t0 = time.monotonic()
        while pool.hosts[0].stats.connections < 1 and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        print("CONNECTED", pool.hosts[0].stats.connections, pool.stats.failed, flush=True)
        # Wait for the parent off the loop: the dial task (and the echo backend, on this same loop) may
        # still have a step to run after connection_made counted the connection.
        await loop.run_in_executor(None, sys.stdin.readline)

    (uvloop.run if sys.argv[1] == "uvloop" else asyncio.run)(main())
    """
)


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_our_own_fd_exhaustion_at_dial_is_not_the_endpoints_fault_and_the_client_waits(loop_name):
    """EMFILE on the upstream socket (the reliability issue, item 2): counted as local_resources, never as
    the endpoint's failure (no ejection), accepting pauses, and the accepted client is kept and served
    once descriptors are free again, instead of being closed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", DIAL_EMFILE_SCRIPT, loop_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    client = None
    try:
        port = int(proc.stdout.readline().split()[1])
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"hello")
        starved = proc.stdout.readline()
        assert starved.startswith("STARVED {'local_resources':"), starved
        words = starved.split()
        assert words[-3:] == ["0", words[-2], "True"] and int(words[-2]) >= 1, starved  # no ejection, paused
        connected = proc.stdout.readline().split()
        assert connected == ["CONNECTED", "1", "{}"], connected
        client.settimeout(5)
        assert client.recv(5) == b"hello"  # the same client, served once descriptors were free
        client.close()
        proc.stdin.write("done\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=10)
        # logged (once per interval: the accept or the dial, whichever met the exhaustion first)
        assert err.count("Too many open files") == 1 and "pausing accepts" in err, err
    finally:
        if client is not None:
            client.close()
        _reap(proc)
