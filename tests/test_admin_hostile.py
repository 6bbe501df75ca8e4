"""The admin API under hostile clients (issue 14, item 1): slowloris and idle connections are closed by the
head deadline, the connection cap holds, admin connections cannot take the data plane's descriptors, and a
flood of malformed requests logs a line or two, not a traceback each.

Real sockets on 127.0.0.1; the descriptor test runs a real agent under ``prlimit --nofile=256:256``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import socket
import sys
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.admin import AdminServer, MeshState
from mesh.runtime import Mesh
from tests.backends import Backend
from tests.test_admin import _cli_env
from tests.util import wait_for

SLOW_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # a head that never ends


async def admin(**kw) -> tuple[AdminServer, Mesh]:
    mesh = Mesh()
    server = AdminServer(MeshState(mesh), "127.0.0.1", 0, **kw)
    await server.start()
    return server, mesh


async def get(server: AdminServer, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{server.address[1]}{path}") as r:
        return r.status, await r.text()


def admin_metrics(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.startswith("mesh_admin_"):
                out[(smp.name, *sorted(smp.labels.values()))] = smp.value
    return out


async def closed_within(conns, timeout: float) -> int:
    """How many of ``conns`` (reader, writer) saw EOF or a reset within ``timeout`` seconds (all waited at once)."""

    async def one(r: asyncio.StreamReader) -> bool:
        try:
            while await r.read(4096):
                pass
        except (ConnectionResetError, OSError):
            pass
        return True

    done, pending = await asyncio.wait([asyncio.ensure_future(one(r)) for r, _ in conns], timeout=timeout)
    for t in pending:
        t.cancel()
    return len(done)


async def test_slowloris_connections_are_closed_within_the_head_timeout_and_admin_keeps_answering():
    server, mesh = await admin(head_timeout=1.0, max_connections=64)
    conns = []
    try:
        t0 = time.monotonic()
        for _ in range(500):
            r, w = await asyncio.open_connection("127.0.0.1", server.address[1])
            w.write(SLOW_HEAD)
            conns.append((r, w))
        # while the flood is held, the API still answers (a newcomer evicts the oldest unfinished head)
        assert (await get(server, "/healthz")) == (200, "ok\n")
        assert server.stats.open <= 64
        n = await closed_within(conns, timeout=1.0 + 3.0)
        elapsed = time.monotonic() - t0
        assert n == 500, f"{n} of 500 slowloris connections closed in {elapsed:.1f}s"
        st = server.stats
        assert st.closed["head_timeout"] + st.closed["evicted"] + st.closed["over_cap"] == 500, st
        assert st.closed["head_timeout"] >= 1 and st.open == 0
        m = admin_metrics((await get(server, "/metrics"))[1])
        assert m[("mesh_admin_connections_closed_total", "head_timeout")] == st.closed["head_timeout"]
        assert m[("mesh_admin_connections_total",)] == st.accepted >= 501
    finally:
        for _, w in conns:
            w.close()
        await server.stop()
        await mesh.shutdown(1)


async def test_idle_and_keepalive_connections_are_closed():
    server, mesh = await admin(head_timeout=0.5, keepalive_timeout=0.5)
    try:
        # connected, nothing sent: closed at the head deadline, with a 408
        r, w = await asyncio.open_connection("127.0.0.1", server.address[1])
        t0 = time.monotonic()
        async with asyncio.timeout(3):
            data = await r.read()
        assert data.startswith(b"HTTP/1.1 408 ") and 0.4 < time.monotonic() - t0 < 2.5
        w.close()
        # a kept-alive connection after its response: closed after keepalive_timeout idle
        r, w = await asyncio.open_connection("127.0.0.1", server.address[1])
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(3):
            head = await r.readuntil(b"ok\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        t0 = time.monotonic()
        async with asyncio.timeout(3):
            assert await r.read() == b""
        assert time.monotonic() - t0 < 2.5
        w.close()
        # a long-lived response (the dashboard stream) is not cut by the head deadline
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{server.address[1]}/v1/dashboard/stream") as resp:
                t0 = time.monotonic()
                events = 0
                while time.monotonic() - t0 < 1.5:
                    line = await asyncio.wait_for(resp.content.readline(), 2)
                    events += line.startswith(b"event: view")
                assert events >= 2
        assert server.stats.closed["head_timeout"] == 1
    finally:
        await server.stop()
        await mesh.shutdown(1)


async def test_connection_cap_closes_newcomers_when_every_connection_is_busy():
    server, mesh = await admin(max_connections=4)
    streams = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        for _ in range(4):  # four busy connections: dashboard streams (their heads are done)
            resp = await session.get(f"http://127.0.0.1:{server.address[1]}/v1/dashboard/stream")
            assert resp.status == 200
            streams.append(resp)
        await wait_for(lambda: server.stats.open == 4 and not server._waiting, what="4 streams")
        r, w = await asyncio.open_connection("127.0.0.1", server.address[1])
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(3):
            with contextlib.suppress(ConnectionResetError):
                assert await r.read() == b""  # closed at once, nothing answered
        w.close()
        assert server.stats.closed["over_cap"] == 1 and server.stats.open == 4
        # one stream ends: room again
        streams.pop().close()
        await wait_for(lambda: server.stats.open == 3, what="the stream's connection closed")
        assert (await get(server, "/healthz"))[0] == 200
    finally:
        for resp in streams:
            resp.close()
        await session.close()
        await server.stop()
        await mesh.shutdown(1)


async def test_idle_keepalive_connections_give_way_to_newcomers_after_the_head_timeout():
    server, mesh = await admin(max_connections=4, head_timeout=0.3)
    conns = []
    try:
        for _ in range(4):  # four kept-alive connections, each after one answered request
            r, w = await asyncio.open_connection("127.0.0.1", server.address[1])
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(3):
                await r.readuntil(b"ok\n")
            conns.append((r, w))
        # at once: their requests are younger than the head timeout, so the newcomer is refused
        r, w = await asyncio.open_connection("127.0.0.1", server.address[1])
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(3):
            with contextlib.suppress(ConnectionResetError):
                assert await r.read() == b""
        w.close()
        assert server.stats.closed["over_cap"] == 1
        # later: the oldest idle one is evicted for the newcomer, which is answered
        await asyncio.sleep(0.4)
        assert (await get(server, "/healthz"))[0] == 200
        assert server.stats.closed["evicted"] == 1
        assert await closed_within(conns[:1], timeout=2) == 1
    finally:
        for _, w in conns:
            w.close()
        await server.stop()
        await mesh.shutdown(1)


async def test_a_thousand_malformed_requests_log_a_few_lines():
    server, mesh = await admin()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(keep)
    root.setLevel(logging.INFO)
    try:
        bad = (
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            b"GARBAGE\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\r\n\r\n",
        )

        async def one(i: int) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", server.address[1])
            w.write(bad[i % 3])
            async with asyncio.timeout(5):
                data = await r.read()
            w.close()
            return data

        answers = []
        for start in range(0, 1000, 50):
            answers += await asyncio.gather(*(one(i) for i in range(start, start + 50)))
        assert all(a.startswith(b"HTTP/1.") and b" 400 " in a[:20] for a in answers)
        assert server.stats.errors == 334  # the bad header fields (aiohttp answers a bad request line silently)
        lines = [r for r in records if r.name.startswith(("aiohttp", "mesh.admin"))]
        assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]
        assert all(r.exc_info is None for r in lines)
        assert "Error handling request" in lines[0].getMessage() and "at most one line per" in lines[0].getMessage()
        m = admin_metrics((await get(server, "/metrics"))[1])
        assert m[("mesh_admin_request_errors_total",)] == 334
    finally:
        root.removeHandler(keep)
        root.setLevel(old_level)
        await server.stop()
        await mesh.shutdown(1)


@pytest.mark.uvloop_only
@pytest.mark.timeout(120)
async def test_idle_admin_connections_do_not_starve_the_data_plane_at_256_descriptors(tmp_path):
    """``mesh run`` with RLIMIT_NOFILE 256: 400 idle connections to the admin port, then 40 proxied
    connections held open at once: every one is proxied, and the admin API still answers."""
    if not shutil.which("prlimit"):
        pytest.skip("prlimit (util-linux) is not installed")
    b = await Backend().start()
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(f"services:\n  web:\n    listen: 127.0.0.1:0\n    endpoints: ['127.0.0.1:{b.port}']\n")
    log = tmp_path / "agent.log"
    log_file = await asyncio.to_thread(open, log, "wb")
    with log_file:
        proc = await asyncio.create_subprocess_exec(
            "prlimit", "--nofile=256:256", "--", sys.executable, "-m", "meshagent", "run", "--config", str(cfg),
            "--admin", "127.0.0.1:0", stdout=asyncio.subprocess.DEVNULL, stderr=log_file, env=_cli_env(),
        )  # fmt: skip
    idle: list[socket.socket] = []
    try:
        found: list[int] = []

        def listening() -> bool:
            m = re.search(r"admin API listening on http://127\.0\.0\.1:(\d+)/", log.read_text())
            assert proc.returncode is None, log.read_text()[-3000:]
            if m:
                found[:] = [int(m.group(1))]
            return bool(m)

        await wait_for(listening, timeout=20, what="the agent's admin API")
        admin_port = found[0]
        async with aiohttp.ClientSession() as s:

            async def table() -> bool:
                async with s.get(f"http://127.0.0.1:{admin_port}/v1/table") as r:
                    if r.status != 200:
                        return False
                    doc = await r.json()
                found[:] = [x["bound_port"] for x in doc["runtime"]["listeners"] if x["bound_port"]]
                return bool(found)

            await wait_for(table, timeout=20, what="web's listener bound")
        lp = found[0]
        for _ in range(400):
            c = socket.create_connection(("127.0.0.1", admin_port), timeout=5)
            idle.append(c)
        held = []
        for i in range(40):
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", lp), 5)
            w.write(b"ping %d\n" % i)
            try:
                got = await asyncio.wait_for(r.readexactly(len(b"ping %d\n" % i)), 5)
            except (asyncio.IncompleteReadError, ConnectionResetError, TimeoutError) as exc:
                raise AssertionError(f"proxied connection {i} failed with 400 idle admin connections: {exc!r}") from exc
            assert got == b"ping %d\n" % i
            held.append(w)  # held open: 40 client + 40 upstream descriptors in the agent at once
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin_port}/healthz") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
                m = admin_metrics(await r.text())
        assert m[("mesh_admin_connections_active",)] <= 256 // 8
        refused = sum(v for k, v in m.items() if k[0] == "mesh_admin_connections_closed_total")
        assert refused >= 400 - 256 // 8, m
        for w in held:
            w.close()
    finally:
        for c in idle:
            c.close()
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await b.close()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
