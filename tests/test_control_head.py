"""The control port's request-head deadline (issue #14): real sockets, both loops, plain and TLS (trustme).

Every node of a cluster can reach a manager's control port; a connection that never finishes its request
head (slowloris) must not hold a descriptor for ever.  Checked: trickling heads are answered 408 and closed
within the deadline (a deadline, not an inactivity timer), while a subscriber's long-poll, which waits AFTER
its head for longer than the deadline, is never cut and receives the next published state; an oversized head
is closed; a control socket handed over (meshagent/handover.py) has the deadline too, and stays one the
handover helpers list and close.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
import trustme

from cluster.control import DEFAULT_TLS_NAME, MAX_HEAD, ControlClient, ControlServer, ControlTLS
from cluster.state import ClusterState
from mesh.listener import INHERITED
from meshagent.handover import HandoverServer, Offer, close_listeners, request_takeover, server_sockets
from tests.test_control import S1, S2, TOKEN
from tests.test_control_tls import Files, _write
from tests.util import wait_for

HEAD_TIMEOUT = 0.5
SLOW = 20  # slowloris connections per test
HEAD = b"GET /v1/cluster?after=&wait=1 HTTP/1.1\r\nHost: mesh-control\r\n"


@pytest.fixture(scope="module")
def cluster_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(cluster_ca: trustme.CA, tmp_path: Path) -> Files:
    return _write(cluster_ca, tmp_path)


async def _slowloris(port: int, tls: ControlTLS | None) -> tuple[float, bytes]:
    """Start a request head and add one byte every 50 ms (at most 200 of them, 10 s): how long until the
    server closed the connection, and what it answered."""
    kw = {} if tls is None else {"ssl": tls.client, "server_hostname": tls.name}
    reader, writer = await asyncio.open_connection("127.0.0.1", port, **kw)
    began = time.monotonic()
    writer.write(HEAD)
    read = asyncio.ensure_future(reader.read())
    try:
        for _ in range(200):
            done, _ = await asyncio.wait([read], timeout=0.05)
            if done:
                break
            writer.write(b"X")
        answer = await asyncio.wait_for(read, 5)
        return time.monotonic() - began, answer
    finally:
        read.cancel()
        writer.close()


def _tls(pki: Files | None) -> ControlTLS | None:
    return None if pki is None else ControlTLS(pki.ca, pki.cert, pki.key)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
async def test_slowloris_is_closed_within_the_deadline_while_a_long_poll_is_not_cut(
    secure: bool, request: pytest.FixtureRequest
) -> None:
    tls = _tls(request.getfixturevalue("pki")) if secure else None
    srv = ControlServer(
        TOKEN, "127.0.0.1", 0, state=S1, head_timeout=HEAD_TIMEOUT, tls=tls.server_context() if tls else None
    )
    await srv.start()
    applied: list[ClusterState] = []
    # each long-poll waits 3 head deadlines after its head
    cli = ControlClient([srv.address], TOKEN, applied.append, rng=random.Random(3), tls=tls, wait=1.5,
                        backoff_base=0.02, backoff_cap=0.2)  # fmt: skip
    await cli.start()
    try:
        await wait_for(lambda: len(applied) == 1 and srv.stats.waiting == 1, what="S1, then a waiting long-poll")
        results = await asyncio.gather(*(_slowloris(srv.port, tls) for _ in range(SLOW)))
        for took, answer in results:
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            # a deadline from the accept, not an inactivity timer: bytes kept coming every 50 ms
            assert HEAD_TIMEOUT * 0.9 <= took < HEAD_TIMEOUT + 2.0, took
        assert srv.stats.head_timeouts == SLOW
        # the long-poll outlived the deadline several times over, answered 204, not cut
        await wait_for(lambda: srv.stats.unchanged >= 1, timeout=5, what="a long-poll answered 204")
        await wait_for(lambda: srv.stats.waiting == 1, what="the next long-poll waiting")
        srv.publish(S2)
        await wait_for(lambda: len(applied) == 2, what="S2 by long-poll")
        assert applied[1] == S2
        assert cli.stats.failures == 0 and srv.stats.head_timeouts == SLOW
        # no request was cut or refused: each was answered 200/204, or is the one waiting now
        assert srv.stats.requests == srv.stats.changed + srv.stats.unchanged + srv.stats.waiting
    finally:
        await cli.stop()
        await srv.stop()


async def test_a_kept_alive_connection_gets_a_new_deadline_for_each_head() -> None:
    """A head may come any time after the previous answer (keep-alive); its deadline starts at its first byte."""
    srv = ControlServer(TOKEN, "127.0.0.1", 0, state=S1, head_timeout=HEAD_TIMEOUT)
    await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        ask = f"GET /v1/cluster?after={S1.digest}&wait=0.8 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        for _ in range(2):
            began = time.monotonic()
            writer.write(ask.encode() + b"\r\n")
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line.startswith(b"HTTP/1.1 204 "), line
            assert time.monotonic() - began >= 0.75  # the long-poll outlasted the head deadline
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert srv.stats.head_timeouts == 0 and srv.stats.unchanged == 2
        # idle after an answer for longer than the deadline: the next head starts its own
        writer.write(ask.encode())  # ... and never ends
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 408 ")
        assert srv.stats.head_timeouts == 1
    finally:
        writer.close()
        await srv.stop()


async def test_a_head_over_the_cap_is_closed() -> None:
    srv = ControlServer(TOKEN, "127.0.0.1", 0, state=S1)
    await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        field = b"X-Pad: " + b"a" * 4000 + b"\r\n"  # under aiohttp's per-field limit
        writer.write(HEAD + field * (MAX_HEAD // len(field) + 1))
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            answer = b""
        assert answer == b""
        assert srv.stats.heads_too_large == 1 and srv.stats.requests == 0
    finally:
        writer.close()
        await srv.stop()


async def test_a_handed_over_control_socket_has_the_head_deadline(pki: Files, tmp_path: Path) -> None:
    """The new server's site on the inherited socket (TLS) guards heads, and the handover helpers still list
    and close its listening socket."""
    tls = ControlTLS(pki.ca, pki.cert, pki.key)
    old = ControlServer(TOKEN, "127.0.0.1", 0, state=S1, tls=tls.server_context())
    await old.start()
    port = old.port
    path = str(tmp_path / "handover.sock")

    async def release() -> None:
        close_listeners(old._runner)

    offers = [Offer("stream", "127.0.0.1", port, "control", s) for s in server_sockets(old._runner)]
    assert len(offers) == 1
    handover = HandoverServer(path, lambda: offers, release)
    await handover.start()
    new = None
    try:
        taken, why = await asyncio.to_thread(request_takeover, path, 5.0)
        assert why == "ok" and taken is not None
        taken.offer(INHERITED)
        new = ControlServer(TOKEN, "127.0.0.1", port, state=S2, tls=tls.server_context(), head_timeout=HEAD_TIMEOUT)
        await new.start()
        assert INHERITED.keys() == []
        assert await asyncio.to_thread(taken.release, 5.0)
        await old.stop()
        took, answer = await _slowloris(port, tls)
        assert answer.startswith(b"HTTP/1.1 408 ") and took < HEAD_TIMEOUT + 2.0
        assert new.stats.head_timeouts == 1
        listening = server_sockets(new._runner)
        assert [s.getsockname()[1] for s in listening] == [port]
        close_listeners(new._runner)  # stops accepting: a new connection is refused
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port, ssl=tls.client, server_hostname=DEFAULT_TLS_NAME)
    finally:
        await handover.close()
        await old.stop()
        if new is not None:
            await new.stop()


def test_head_timeout_must_be_positive() -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="head_timeout"):
            ControlServer(TOKEN, "127.0.0.1", 0, head_timeout=bad)
