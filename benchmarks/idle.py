"""Idle memory: open many connections through a proxy, one request each, then hold them idle and measure how much
the proxy's resident memory grew per connection.

Each connection completes one small request first, so both of the proxy's sockets (client side and upstream
side) exist and whatever the proxy allocates per connection has been allocated.  The figure is
(RSS after - RSS before) / connections summed over the proxy's process tree; kernel socket buffers are not in
RSS (they are the same for every proxy).  The caller starts a *fresh* proxy for each measurement: a process that
already served 512 x 1 MiB would hand freed memory back to new connections and look better than it is.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from benchmarks.proc import BenchError, nofile_limit, rss_bytes

REQUEST = b"GET /100b HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n"


def max_idle_connections() -> int:
    """The largest count the proxy can hold: two descriptors per connection under the inherited limit."""
    return max(0, (nofile_limit() - 200) // 2)


async def _one_request(loop: asyncio.AbstractEventLoop, addr: tuple[str, int], timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(s, addr)
            await loop.sock_sendall(s, REQUEST)
            buf = b""
            need = -1
            while need < 0 or len(buf) < need:
                chunk = await loop.sock_recv(s, 65536)
                if not chunk:
                    raise BenchError(f"{addr[0]}:{addr[1]} closed the connection before the response was complete")
                buf += chunk
                if need < 0:
                    end = buf.find(b"\r\n\r\n")
                    if end >= 0:
                        head = buf[:end].lower()
                        i = head.find(b"content-length:")
                        length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
                        need = end + 4 + length
    except BaseException:
        s.close()
        raise
    return s


async def _open_many(addr: tuple[str, int], n: int, concurrency: int, timeout: float) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    socks: list[socket.socket] = []
    failures: list[BaseException] = []

    async def one() -> None:
        async with sem:
            if failures:
                return
            try:
                socks.append(await _one_request(loop, addr, timeout))
            except (OSError, TimeoutError, BenchError) as exc:
                failures.append(exc)

    await asyncio.gather(*(one() for _ in range(n)))
    if failures:
        for s in socks:
            s.close()
        raise BenchError(
            f"opening {n} idle connections to {addr[0]}:{addr[1]} failed after {len(socks)}: {failures[0]!r}"
        )
    return socks


def measure_idle(
    addr: tuple[str, int],
    pids: Callable[[], list[int]],
    n: int,
    *,
    concurrency: int = 200,
    settle: float = 1.0,
    timeout: float = 10.0,
) -> dict[str, float | int]:
    """Hold ``n`` idle proxied connections to ``addr``; return RSS before/after and bytes per connection.

    ``pids`` returns the proxy's process tree (re-read after the connections are open: a worker pool may have
    grown).  ``settle`` lets the proxy finish its bookkeeping before RSS is read; it is a measurement delay,
    not synchronisation.
    """
    import uvloop

    limit = max_idle_connections()
    if n > limit:
        raise BenchError(
            f"{n} idle connections need {2 * n + 200} descriptors in the proxy; RLIMIT_NOFILE is "
            f"{nofile_limit()} (use at most {limit})"
        )

    async def run() -> dict[str, float | int]:
        # Warm-up: the first connections load code and grow pools that are not per-connection costs.
        warm = await _open_many(addr, min(100, n), concurrency, timeout)
        for s in warm:
            s.close()
        await asyncio.sleep(settle)
        before = rss_bytes(pids())
        t0 = time.monotonic()
        socks = await _open_many(addr, n, concurrency, timeout)
        open_s = time.monotonic() - t0
        try:
            await asyncio.sleep(settle)
            after = rss_bytes(pids())
        finally:
            for s in socks:
                s.close()
        return {
            "connections": len(socks),
            "rss_before": before,
            "rss_after": after,
            "bytes_per_conn": round((after - before) / len(socks), 1),
            "open_s": round(open_s, 3),
        }

    return uvloop.run(run())
