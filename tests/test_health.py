"""Active health checks against real servers on 127.0.0.1 (asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import random
import socket
import time

import pytest

from mesh.health import MAX_STATUS_LINE, HealthChecker, ProbeFailed, probe
from mesh.pool import FAILED_ACTIVE_HC, Pool
from mesh.routing import Endpoint, HealthCheck, Route, ServiceOptions
from tests.util import wait_for


class Backend:
    """A tiny server on 127.0.0.1: counts connections; in HTTP mode answers with ``self.status``.

    ``mode``: "tcp" (accept, wait for the peer to close), "http" (one response per
    connection), "silent" (read, never answer), or "raw" (read the request, send ``self.raw``, close).
    """

    def __init__(self, mode: str = "http", status: int = 200) -> None:
        self.mode = mode
        self.status = status
        self.raw = b""
        self.connections = 0
        self.requests: list[bytes] = []
        self.responses: dict[int, int] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> Backend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        self.connections += 1
        try:
            if self.mode == "raw":
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(self.raw)
                await writer.drain()
                return
            if self.mode in ("http", "silent"):
                request = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(request)
                if self.mode == "http":
                    status = self.status
                    # counted before the prober can see the answer
                    self.responses[status] = self.responses.get(status, 0) + 1
                    writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                    await writer.drain()
            await reader.read()  # until the prober closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_pool(ports, *, via=(), draining=()) -> Pool:
    eps = tuple(
        Endpoint(
            f"e{i}",
            "127.0.0.1",
            port,
            via="127.0.0.1:1" if i in via else None,
            state="draining" if i in draining else "running",
        )
        for i, port in enumerate(ports)
    )
    return Pool("web", Route(8080, eps), ServiceOptions(), rng=random.Random(1))


def hc(**kw) -> HealthCheck:
    base = dict(kind="http", interval=0.05, timeout=1.0, rise=2, fall=2, jitter=0.0, path="/healthz")
    base.update(kw)
    return HealthCheck(**base)


# -- single probes ------------------------------------------------------------------------------------


async def test_probe_tcp_pass_and_refused():
    async with Backend("tcp") as b:
        await probe("127.0.0.1", b.port, hc(kind="tcp"))
        await wait_for(lambda: b.connections == 1, what="one connection")
    with pytest.raises(ProbeFailed, match="^connection refused$"):
        await probe("127.0.0.1", closed_port(), hc(kind="tcp"))


async def test_probe_http_sends_a_proper_request():
    async with Backend("http", 200) as b:
        await probe("127.0.0.1", b.port, hc())
        await probe("127.0.0.1", b.port, hc(host="web.example", path="/a?b=c"))
    assert (
        b.requests[0]
        == (
            f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{b.port}\r\nUser-Agent: mesh-health-check\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    assert b.requests[1].startswith(b"GET /a?b=c HTTP/1.1\r\nHost: web.example\r\n")


@pytest.mark.parametrize(
    "status, expect, error",
    [
        (200, (200,), None),
        (204, (200, 204), None),
        (503, (200,), "^HTTP status 503, expected 200$"),
        (200, (204, 301), "^HTTP status 200, expected 204/301$"),
    ],
)
async def test_probe_http_status(status, expect, error):
    async with Backend("http", status) as b:
        if error is None:
            await probe("127.0.0.1", b.port, hc(expect_status=expect))
        else:
            with pytest.raises(ProbeFailed, match=error):
                await probe("127.0.0.1", b.port, hc(expect_status=expect))


@pytest.mark.parametrize(
    "raw, error",
    [
        (b"", r"connection closed before a status line \(0 bytes\)"),
        (b"HTTP/1.1 20", r"connection closed before a status line \(11 bytes\)"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "bad status line"),
        (b"HTTP/1.1 2000 OK\r\n", "bad status line"),
        (b"HTTP/1.1 OK\r\n", "bad status line"),
        (b"HTTP/1.1 " + b"2" * (MAX_STATUS_LINE + 10), f"longer than {MAX_STATUS_LINE} bytes"),
    ],
)
async def test_probe_http_bad_answers(raw, error):
    async with Backend("raw") as b:
        b.raw = raw
        with pytest.raises(ProbeFailed, match=error):
            await probe("127.0.0.1", b.port, hc())


async def test_probe_http_timeout_is_respected():
    async with Backend("silent") as b:
        started = time.monotonic()
        with pytest.raises(ProbeFailed, match=r"^timed out after 0.2s$"):
            await probe("127.0.0.1", b.port, hc(timeout=0.2))
        elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 1.0


def test_bad_path_is_refused():
    pool = make_pool([1])
    with pytest.raises(ValueError, match=r"service web: health check path .*'/a b'"):
        HealthChecker(pool, hc(path="/a b"))
    with pytest.raises(ValueError, match=r"health check host .*'x\\r\\ny'"):
        HealthChecker(pool, hc(host="x\r\ny"))


# -- the checker ------------------------------------------------------------------------------------------


async def test_http_checker_flips_after_fall_and_rise():
    async with Backend("http", 200) as good, Backend("http", 200) as flappy:
        pool = make_pool([good.port, flappy.port])
        g, f = pool.hosts
        flips = []
        pool.on_change.append(lambda p: flips.append((bool(f.health), dict(flappy.responses))))
        checker = HealthChecker(pool, hc(rise=2, fall=3), rng=random.Random(1))
        checker.start()
        try:
            await wait_for(lambda: flappy.responses.get(200, 0) >= 2, what="two passing probes")
            assert f.health == 0 and flips == []
            flappy.status = 503
            await wait_for(lambda: f.health == FAILED_ACTIVE_HC, what="fall")
            # flipped right after the third 503 in a row, not before
            assert flips[0][0] is True and flips[0][1][503] == 3
            assert pool.choose() is g
            flappy.status = 200
            await wait_for(lambda: f.health == 0, what="rise")
            # back right after the second 200 in a row
            assert flips[1][0] is False and flips[1][1][200] - flips[0][1][200] == 2
            assert g.health == 0 and len(flips) == 2
        finally:
            await checker.stop()
    assert not checker.running


async def test_tcp_checker_closed_port_is_unhealthy():
    async with Backend("tcp") as up:
        pool = make_pool([up.port, closed_port()])
        up_host, down_host = pool.hosts
        checker = HealthChecker(pool, hc(kind="tcp", fall=2), rng=random.Random(1))
        streak_at_flip = []
        pool.on_change.append(lambda p: streak_at_flip.append(list(checker._streaks[down_host])))
        checker.start()
        try:
            await wait_for(lambda: down_host.health == FAILED_ACTIVE_HC, what="closed port unhealthy")
            assert streak_at_flip == [[0, 2]]  # (passes, failures) in a row when it flipped
            await wait_for(lambda: up.connections >= 3, what="more rounds")
            assert up_host.health == 0
            assert pool.usable == (up_host,)
        finally:
            await checker.stop()


async def test_checker_timeout_marks_silent_backend_unhealthy():
    async with Backend("silent") as silent:
        pool = make_pool([silent.port])
        checker = HealthChecker(pool, hc(timeout=0.05, fall=1), rng=random.Random(1))
        checker.start()
        try:
            await wait_for(lambda: pool.hosts[0].health == FAILED_ACTIVE_HC, timeout=2.0, what="timeout fail")
        finally:
            await checker.stop()


async def test_checker_skips_remote_and_draining_hosts():
    async with Backend("http") as local, Backend("http") as remote, Backend("http") as draining:
        pool = make_pool([local.port, remote.port, draining.port], via=(1,), draining=(2,))
        checker = HealthChecker(pool, hc(), rng=random.Random(1))
        checker.start()
        try:
            await wait_for(lambda: checker.rounds >= 3, what="three rounds")
        finally:
            await checker.stop()
        assert local.connections >= 3
        assert remote.connections == 0 and draining.connections == 0


async def test_checker_picks_up_pool_updates():
    async with Backend("http") as first, Backend("http", 503) as second:
        pool = make_pool([first.port])
        checker = HealthChecker(pool, hc(fall=1), rng=random.Random(1))
        checker.start()
        try:
            await wait_for(lambda: checker.rounds >= 1, what="a round")
            assert second.connections == 0
            e0 = pool.hosts[0]
            pool.update(Route(8080, (e0.endpoint, Endpoint("e1", "127.0.0.1", second.port))), pool.options)
            e1 = pool.hosts[1]
            await wait_for(lambda: e1.health == FAILED_ACTIVE_HC, what="new host checked")
            pool.update(Route(8080, (e0.endpoint,)), pool.options)
            rounds = checker.rounds
            await wait_for(lambda: checker.rounds >= rounds + 1, what="the round in flight to end")
            seen = second.connections
            rounds = checker.rounds
            await wait_for(lambda: checker.rounds >= rounds + 2, what="two more rounds")
            assert second.connections == seen  # removed host no longer probed
            assert e1 not in checker._streaks
        finally:
            await checker.stop()


async def test_stop_cancels_cleanly_and_clears_failed_bits():
    port = closed_port()
    pool = make_pool([port])
    checker = HealthChecker(pool, hc(kind="tcp", fall=1, interval=10.0), rng=random.Random(1))
    checker.start()
    checker.start()  # idempotent
    await wait_for(lambda: pool.hosts[0].health == FAILED_ACTIVE_HC, what="fail")
    assert "running" in repr(checker) and "failed=1" in repr(checker)
    await checker.stop()
    assert pool.hosts[0].health == 0
    assert not checker.running and "stopped" in repr(checker)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await checker.stop()  # stopping twice is harmless


async def test_stop_without_awaiting_still_finishes():
    async with Backend("silent") as silent:
        pool = make_pool([silent.port])
        checker = HealthChecker(pool, hc(timeout=5.0), rng=random.Random(1))
        checker.start()
        await wait_for(lambda: silent.connections == 1, what="a probe in flight")
        done = checker.stop()
        await wait_for(done.done, what="task finished")
        assert asyncio.all_tasks() == {asyncio.current_task()} | silent._handlers


class MaxRandom(random.Random):
    """uniform() returns its upper bound: the longest jitter."""

    def uniform(self, a, b):
        self.calls.append((a, b))
        return b

    calls: list


async def test_jitter_delays_each_probe():
    async with Backend("http") as b:
        pool = make_pool([b.port, closed_port()])
        rng = MaxRandom(1)
        rng.calls = []
        checker = HealthChecker(pool, hc(interval=0.3, jitter=0.5, timeout=0.5), rng=rng)
        started = time.monotonic()
        checker.start()
        try:
            await wait_for(lambda: b.connections >= 1, what="first probe")
            assert time.monotonic() - started >= 0.15
            assert rng.calls[:2] == [(0, 0.15), (0, 0.15)]
        finally:
            await checker.stop()


async def test_unexpected_probe_error_counts_as_a_failure(monkeypatch, caplog):
    import mesh.health

    async def broken(address, port, check):
        raise ValueError("odd address")

    monkeypatch.setattr(mesh.health, "probe", broken)
    pool = make_pool([closed_port()])
    checker = HealthChecker(pool, hc(fall=1), rng=random.Random(1))
    checker.start()
    try:
        await wait_for(lambda: pool.hosts[0].health == FAILED_ACTIVE_HC, what="failure recorded")
        await wait_for(lambda: checker.rounds >= 2, what="the checker keeps going")
    finally:
        await checker.stop()
    assert "is now unhealthy by health check: 1 failures in a row, last: ValueError: odd address" in caplog.text
