"""Dashboard watchers for the harness: N open ``/v1/dashboard/stream`` connections to a mesh's admin API.

``python -m benchmarks.run --workloads watchers-100b-c64 --peers mesh-1`` runs ka-100b-c64 through mesh-1 with
nobody watching and with 100 watchers (peer ``mesh-1+watch``), interleaved, so the data plane's req/s and
latency with and without the dashboard's streams come from the same sitting.

The watchers live in their own process (``python -m benchmarks.watchers URL N``, pinned to the load
generator's CPUs when the harness pins), read every event like a browser would, and report how many they got.
Bounded: the process exits when its parent stops it, when its stdin closes, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from benchmarks.proc import REPO, BenchError

__all__ = ["Watchers"]

STREAM_PATH = "/v1/dashboard/stream"


class Watchers:
    """``n`` streams on ``admin_url`` in a child process; ``stop()`` returns {"watchers", "events", "errors"}."""

    def __init__(self, admin_url: str, n: int = 100, *, cpus: str | None = None, max_seconds: float = 600) -> None:
        argv = [sys.executable, "-m", "benchmarks.watchers", admin_url, str(n), "--max-seconds", str(max_seconds)]
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()  # "ready <n>" once every stream got its first event
        if not line.startswith("ready "):
            self.proc.kill()
            err = self.proc.communicate(timeout=10)[1].decode(errors="replace")[-500:]
            raise BenchError(f"dashboard watchers did not start ({line!r}): {err}")
        self.n = int(line.split()[1])

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"watchers": self.n, "events": 0, "errors": -1}


class _Stream(asyncio.Protocol):
    """One watcher: a raw HTTP/1.1 GET of the stream, then counts the events (cheap: no HTTP client library,
    so the watchers' own CPU stays small next to the load generator they share a core with)."""

    def __init__(self, request: bytes, counts: dict[str, Any], first: asyncio.Future[None]) -> None:
        self.request, self.counts, self.first = request, counts, first
        self.tail = b""

    def connection_made(self, transport: Any) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.counts["bytes"] += len(data)
        buf = self.tail + data
        got = buf.count(b"event: view\n")
        self.tail = buf[-16:]  # an event line split across two reads is counted once
        got -= self.tail.count(b"event: view\n")
        self.counts["events"] += got
        if got and not self.first.done():
            self.first.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.counts["closed"] += 1
        if not self.first.done():
            self.first.set_result(None)


async def _watch(url: str, n: int, max_seconds: float) -> dict[str, Any]:
    from urllib.parse import urlsplit

    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {STREAM_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    counts: dict[str, Any] = {"watchers": n, "events": 0, "errors": 0, "closed": 0, "bytes": 0}
    first = [loop.create_future() for _ in range(n)]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 1) else None)
    transports = []
    for i in range(n):
        try:
            t, _ = await asyncio.wait_for(
                loop.create_connection(lambda i=i: _Stream(request, counts, first[i]), host, port), 5
            )
            transports.append(t)
        except (OSError, TimeoutError):
            counts["errors"] += 1
            first[i].set_result(None)
    await asyncio.wait_for(asyncio.gather(*first), 30)
    print(f"ready {n - counts['errors']}", flush=True)
    counts["events"] = 0  # count from here: what arrived during the measured run
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        pass
    counts["seconds"] = round(time.monotonic() - t0, 2)
    for t in transports:
        t.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.watchers", description=__doc__)
    p.add_argument("admin_url", help="the admin API, e.g. http://127.0.0.1:9901")
    p.add_argument("n", type=int, help="streams to keep open")
    p.add_argument("--max-seconds", type=float, default=600.0)
    args = p.parse_args(argv)
    if not 1 <= args.n <= 10000:
        print("benchmarks.watchers: n must be within 1..10000", file=sys.stderr)
        return 2
    import uvloop

    counts = uvloop.run(_watch(args.admin_url.rstrip("/"), args.n, args.max_seconds))
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
