"""``mesh demo``: see the mesh balance real traffic in under a minute, with no Docker and no configuration.

It starts three local HTTP backends ("replicas", in a child process), writes a config file with one service in
front of them, runs the real mesh (``mesh run --config ...``) on a free loopback port, drives a short, bounded
load through it (a fresh connection every few requests, so the balancer gets to choose often), shows live
progress, and ends with the distribution per replica, requests/s, latency percentiles, and the mesh's own
view of its endpoints from the admin API.  While it runs, the mesh's live dashboard (the admin API's /ui/)
shows the replicas and their traffic: the demo prints its URL, and ``--linger S`` keeps the mesh (and the
page) up S more seconds after the load.  Everything listens on 127.0.0.1 and is stopped at the end.

``--http`` shows the HTTP mode instead: the service has ``protocol: http``, the clients keep one keep-alive
connection each for the whole run and the mesh balances their requests one by one, so every connection reaches
every replica; each replica answers with its name and the ``X-Forwarded-For`` it received, and the summary shows
what each one saw.  Part way through, one replica is taken out as a rolling update would: it is marked draining
in the config file (SIGHUP), the demo waits until the mesh reports no request in flight to it, stops it, then
removes it from the table; the summary counts the requests that failed meanwhile (0 is the point).  The
clients send POSTs, which the mesh never retries, and a replica takes 1-3 ms per request, so requests are in
flight when it stops: ``--no-drain`` stops it without the drain, at a moment it holds a request, and shows
what the drain saves.

The load is bounded in time (``--duration``) and in count (``--max-requests``), whichever ends first.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main"]

LOOPBACK = "127.0.0.1"
MAX_DURATION = 600.0
MAX_CONNECTIONS = 1000
MAX_LINGER = 3600.0
MAX_REQUESTS = 1_000_000
MAX_REQUESTS_LIMIT = 100_000_000
WORK = (0.001, 0.003)  # seconds an --http replica works on a request (uniform)


# -- the replicas ---------------------------------------------------------------------------------------------


class _Replica(asyncio.Protocol):
    """A tiny keep-alive HTTP/1.1 server that names itself in every answer (header X-Replica and the body)."""

    __slots__ = ("buf", "conns", "keep", "last", "transport")

    def __init__(self, keep: bytes, last: bytes, conns: set) -> None:
        self.keep, self.last, self.conns = keep, last, conns
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head, buf = buf[:end], buf[end + 4 :]
            if b"onnection: close" in head:
                self.transport.write(self.last)
                self.transport.close()
                return
            self.transport.write(self.keep)
        if len(buf) > 16384:  # not a request we understand: bound what a client can make us hold
            self.transport.close()
        self.buf = buf


class _EchoReplica(_Replica):
    """``--http``: the answer also carries the X-Forwarded-For the replica received (header X-Seen-Forwarded-For
    and the body), and comes 1 to 3 ms (``WORK``) after the request (its body read): like an application, the replica
    has requests in flight, which is what stopping it without a drain cuts.  One request at a time per
    connection (the mesh sends no more; a pipelining client waits in ``buf``)."""

    __slots__ = ("busy", "name", "pending")

    def __init__(self, name: str, conns: set, busy: asyncio.Event) -> None:
        super().__init__(b"", b"", conns)
        self.name = name
        self.busy = busy  # set whenever a request of this replica starts its work
        self.pending: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.pending is None:
            self._next()

    def _next(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 16384:
                self.transport.close()
            return
        seen, length = _read_head(buf[:end])
        if len(buf) < end + 4 + length:
            return  # the body is not all here yet
        close = b"onnection: close" in buf[:end]
        self.buf = buf[end + 4 + length :]
        answer = _echo_answer(self.name, seen, close)
        work = random.uniform(*WORK)  # varied: clients that started together do not stay in lock step
        self.pending = asyncio.get_running_loop().call_later(work, self._answer, answer, close)
        self.busy.set()

    def _answer(self, answer: bytes, close: bool) -> None:
        self.pending = None
        self.transport.write(answer)
        if close:
            self.transport.close()
        else:
            self._next()

    def stop(self) -> None:
        """Stopped (``stop N``): like a process that exits, the requests it holds get no answer."""
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        self.transport.close()


def _replica_answers(name: str) -> tuple[bytes, bytes]:
    body = f"hello from {name}\n".encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Replica: {}\r\nConnection: {}\r\n\r\n"
    )
    return (
        head.format(len(body), name, "keep-alive").encode() + body,
        head.format(len(body), name, "close").encode() + body,
    )


def _read_head(head: bytes) -> tuple[str, int]:
    """The X-Forwarded-For ("-" when absent) and Content-Length (0 when absent) of a request head."""
    seen, length = "-", 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        key = key.strip().lower()
        if key == b"x-forwarded-for":
            seen = value.strip().decode("latin-1")
        elif key == b"content-length" and value.strip().isdigit():
            length = int(value)
    return seen, length


def _echo_answer(name: str, seen: str, close: bool) -> bytes:
    """The ``--http`` answer: the replica's name and the X-Forwarded-For it received."""
    body = f"hello from {name}, X-Forwarded-For: {seen}\n".encode()
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nX-Replica: {name}\r\n"
        f"X-Seen-Forwarded-For: {seen}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode() + body


async def _serve_replicas(count: int, echo: bool) -> None:
    """The replicas' child process.  Prints ``PORTS p1 p2 ...``; then reads commands on stdin: ``stop N``
    closes replica N's listening socket and connections and prints ``STOPPED N``; EOF stops them all."""
    loop = asyncio.get_running_loop()
    servers = []
    conns: list[set] = []
    busy_flags: list[asyncio.Event] = []
    for i in range(1, count + 1):
        name = f"replica-{i}"
        keep, last = _replica_answers(name)
        mine: set = set()
        conns.append(mine)
        busy_flags.append(flag := asyncio.Event())

        def factory(
            k: bytes = keep, c: bytes = last, n: str = name, m: set = mine, b: asyncio.Event = flag
        ) -> _Replica:
            return _EchoReplica(n, m, b) if echo else _Replica(k, c, m)

        servers.append(await loop.create_server(factory, LOOPBACK, 0, backlog=1024))
    ports = " ".join(str(s.sockets[0].getsockname()[1]) for s in servers)
    print(f"PORTS {ports}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    pending = bytearray()

    def command() -> None:
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:  # the parent is gone (even after kill -9): the replicas go too
            stop.set()
            return
        pending.extend(data)
        while (nl := pending.find(b"\n")) >= 0:
            words = pending[:nl].decode(errors="replace").split()
            del pending[: nl + 1]
            if 2 <= len(words) <= 3 and words[0] == "stop" and words[1].isdigit() and 1 <= int(words[1]) <= count:
                i = int(words[1])
                tasks.add(task := loop.create_task(stop_one(i, busy=words[2:] == ["busy"])))
                task.add_done_callback(tasks.discard)

    async def stop_one(i: int, busy: bool) -> None:
        """Stop replica ``i``; with ``busy``, at a moment when it holds a request (waiting at most 2 s)."""
        if busy and not any(getattr(c, "pending", None) for c in conns[i - 1]):
            flag = busy_flags[i - 1]
            flag.clear()
            try:
                await asyncio.wait_for(flag.wait(), 2.0)
            except TimeoutError:
                pass
        servers[i - 1].close()
        held = 0
        for conn in list(conns[i - 1]):
            if isinstance(conn, _EchoReplica):
                held += conn.pending is not None
                conn.stop()
            else:
                conn.transport.close()
        print(f"STOPPED {i} held={held}", flush=True)

    tasks: set[asyncio.Task[None]] = set()
    loop.add_reader(sys.stdin.fileno(), command)
    await stop.wait()
    for s in servers:
        s.close()


# -- the load -------------------------------------------------------------------------------------------------


class _Tally:
    def __init__(self, replicas: Sequence[str], budget: int) -> None:
        self.requests: dict[str, int] = dict.fromkeys(replicas, 0)
        self.connections: dict[str, int] = dict.fromkeys(replicas, 0)
        self.forwarded: dict[str, dict[str, int]] = {r: {} for r in replicas}  # X-Forwarded-For seen, counted
        self.last_answer: dict[str, float] = {}  # replica -> time.monotonic() of its last answer
        self.reached: list[int] = []  # per finished connection: how many replicas answered on it
        self.latencies: list[float] = []
        self.errors = 0
        self.total = 0
        self.budget = budget  # requests not yet sent (--max-requests)
        self.start = 0.0  # time.monotonic() when the load began
        self.mark = 0  # set when ``total`` reaches it (0: never)
        self.reached_mark = asyncio.Event()


def _requests(method: str, body: bytes) -> tuple[bytes, bytes]:
    """(keep-alive request, last request) of a client."""
    head = f"{method} / HTTP/1.1\r\nHost: demo\r\n" + (f"Content-Length: {len(body)}\r\n" if body else "")
    return (
        (head + "Connection: keep-alive\r\n\r\n").encode() + body,
        (head + "Connection: close\r\n\r\n").encode() + body,
    )


_GET = _requests("GET", b"")
# --http sends POSTs: the mesh retries an idempotent request that a stopped replica dropped, never a POST,
# so 0 failed requests is the drain's doing, not the retries'.
_POST = _requests("POST", b"visit\n")


class _Client(asyncio.Protocol):
    """One connection: sends up to ``per_conn`` GETs one after another (the last with Connection: close).

    A request is failed when its answer does not name a replica (a 5xx from the mesh, anything else) or when
    the connection ends while it waits for one."""

    def __init__(
        self, tally: _Tally, per_conn: int, deadline: float, done: asyncio.Future[None], post: bool = False
    ) -> None:
        self.tally, self.per_conn, self.deadline, self.done = tally, per_conn, deadline, done
        self.keep, self.last = _POST if post else _GET
        self.transport: Any = None
        self.buf = b""
        self.sent_at = 0.0
        self.count = 0
        self.waiting = False
        self.replica: str | None = None
        self.seen: set[str] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.tally.budget > 0:
            self._send()
        else:
            transport.close()

    def _send(self) -> None:
        self.count += 1
        t = self.tally
        t.budget -= 1
        last = self.count >= self.per_conn or t.budget <= 0 or time.monotonic() >= self.deadline
        self.sent_at = time.perf_counter()
        self.waiting = True
        self.transport.write(self.last if last else self.keep)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1")
        length = replica = forwarded = None
        lines = head.split("\r\n")
        for line in lines[1:]:
            key, _, value = line.partition(":")
            key = key.lower()
            if key == "content-length":
                length = int(value)
            elif key == "x-replica":
                replica = value.strip()
            elif key == "x-seen-forwarded-for":
                forwarded = value.strip()
        if length is None or len(self.buf) < end + 4 + length:
            return
        self.buf = self.buf[end + 4 + length :]
        self.waiting = False
        t = self.tally
        t.latencies.append(time.perf_counter() - self.sent_at)
        t.total += 1
        if t.total == t.mark:
            t.reached_mark.set()
        if replica in t.requests and lines[0].startswith("HTTP/1.1 200 "):
            t.requests[replica] += 1
            t.last_answer[replica] = time.monotonic()
            self.seen.add(replica)
            if forwarded is not None:
                seen = t.forwarded[replica]
                seen[forwarded] = seen.get(forwarded, 0) + 1
            if self.replica is None:
                self.replica = replica
                t.connections[replica] += 1
        else:
            t.errors += 1
        if self.count < self.per_conn and t.budget > 0 and time.monotonic() < self.deadline:
            self._send()
        else:
            self.transport.close()  # the replica may keep it open (the last request said keep-alive)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting:  # cut while a request waited for its answer
            self.waiting = False
            t = self.tally
            t.errors += 1
            t.total += 1
            if t.total == t.mark:
                t.reached_mark.set()
        if self.seen:
            self.tally.reached.append(len(self.seen))
        if not self.done.done():
            self.done.set_result(None)


async def _drive(
    port: int,
    tally: _Tally,
    connections: int,
    per_conn: int,
    duration: float,
    progress: TextIO | None,
    during: Callable[[float], Awaitable[None]] | None = None,
    post: bool = False,
) -> float:
    """Run the bounded load (``duration`` seconds, ``tally.budget`` requests); return its wall time in seconds.
    ``during(start)`` runs beside it (the rolling stop) and is awaited before returning."""
    loop = asyncio.get_running_loop()
    start = tally.start = time.monotonic()
    deadline = start + duration

    async def worker() -> None:
        while time.monotonic() < deadline and tally.budget > 0:
            done: asyncio.Future[None] = loop.create_future()
            try:
                factory = functools.partial(_Client, tally, per_conn, deadline, done, post)
                transport, _ = await asyncio.wait_for(loop.create_connection(factory, LOOPBACK, port), 5)
            except (OSError, TimeoutError):
                tally.errors += 1
                tally.total += 1
                await asyncio.sleep(0.05)
                continue
            try:
                await asyncio.wait_for(done, max(1.0, deadline - time.monotonic() + 5))
            except TimeoutError:
                pass  # closing it below counts the request it waited for (connection_lost)
            transport.close()

    async def show() -> None:
        last_total, last_t = 0, start
        tty = progress is not None and progress.isatty()
        while True:
            await asyncio.sleep(0.25 if tty else 1.0)
            now = time.monotonic()
            rate = (tally.total - last_total) / (now - last_t)
            last_total, last_t = tally.total, now
            shares = "  ".join(f"{name} {n}" for name, n in tally.requests.items())
            line = f"{min(now, deadline) - start:5.1f}s  {tally.total:>8} requests  {rate:>8.0f} req/s  {shares}"
            if progress is not None:
                progress.write(("\r" + line) if tty else (line + "\n"))
                progress.flush()

    shower = asyncio.create_task(show())
    beside = asyncio.create_task(during(start)) if during is not None else None
    try:
        await asyncio.gather(*(worker() for _ in range(connections)))
        wall = time.monotonic() - start
        if beside is not None:
            await beside
    finally:
        shower.cancel()
        if beside is not None and not beside.done():
            beside.cancel()
        if progress is not None and progress.isatty():
            progress.write("\n")
    return wall


# -- helpers --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_ready(admin: str, mesh: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mesh.poll() is not None:
            raise RuntimeError(f"the mesh exited with code {mesh.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{admin}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the mesh was not ready after {timeout}s:\n{log.read_text(errors='replace')}")


def _percentile(sorted_vals: list[float], p: float) -> float:
    i = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[i]


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10, at most 600)")
    p.add_argument(
        "--max-requests",
        type=int,
        default=MAX_REQUESTS,
        help=f"requests at most: the load ends at this count or at --duration (default {MAX_REQUESTS:,})",
    )
    p.add_argument("--connections", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument(
        "--requests-per-connection",
        type=int,
        default=None,
        help="requests on one connection before the client opens a new one (default 10; with --http the whole run)",
    )
    p.add_argument("--replicas", type=int, default=3, help="local backends (default 3)")
    p.add_argument("--balance", default="round-robin", help="round-robin, least-conn, p2c or hash")
    p.add_argument("--workers", type=int, default=1, help="mesh worker processes (default 1)")
    p.add_argument(
        "--http",
        action="store_true",
        help="HTTP mode: keep-alive clients balanced per request, X-Forwarded-For, one replica drained and "
        "stopped mid-run",
    )
    p.add_argument(
        "--no-drain",
        action="store_true",
        help="with --http: stop the replica without draining it first (to see what draining saves)",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="seconds the mesh and its dashboard stay up after the load (default 0, at most 3600; Ctrl-C ends it)",
    )
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    if not 0 < args.duration <= MAX_DURATION:
        return f"--duration must be within 0..{MAX_DURATION:.0f} seconds, got {args.duration}"
    if not 1 <= args.max_requests <= MAX_REQUESTS_LIMIT:
        return f"--max-requests must be within 1..{MAX_REQUESTS_LIMIT}, got {args.max_requests}"
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        return f"--connections must be within 1..{MAX_CONNECTIONS}, got {args.connections}"
    if args.requests_per_connection is not None and args.requests_per_connection < 1:
        return f"--requests-per-connection must be >= 1, got {args.requests_per_connection}"
    if not 1 <= args.replicas <= 20:
        return f"--replicas must be within 1..20, got {args.replicas}"
    if args.no_drain and not args.http:
        return "--no-drain goes with --http"
    if args.http and args.replicas < 2:
        return f"--http needs --replicas >= 2 (one of them is stopped mid-run), got {args.replicas}"
    if args.balance not in ("round-robin", "least-conn", "p2c", "hash"):
        return f"--balance must be round-robin, least-conn, p2c or hash; got {args.balance!r}"
    if not 1 <= args.workers <= 64:
        return f"--workers must be within 1..64, got {args.workers}"
    if not 0 <= args.linger <= MAX_LINGER:
        return f"--linger must be within 0..{MAX_LINGER:.0f} seconds, got {args.linger}"
    return None


# -- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``mesh demo [--http] [--duration S] [--connections N] ...``; returns the exit code (0: every replica
    served, and with --http no request failed)."""
    if argv[:1] == ["_replicas"]:  # internal: the child process that hosts the replicas
        import uvloop

        uvloop.run(_serve_replicas(int(argv[1]), "--http" in argv[2:]))
        return 0
    args = _build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"mesh demo: {problem}", file=sys.stderr)
        return 2
    if args.requests_per_connection is None:
        args.requests_per_connection = MAX_REQUESTS_LIMIT if args.http else 10
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as tmp:
        return _demo(args, Path(tmp), out)


def _write_config(path: Path, args: argparse.Namespace, listen: int, endpoints: Sequence[tuple[str, int, str]]) -> None:
    """Write the demo's config file at once (a temporary file renamed over it: the mesh never reads half of it).
    ``endpoints``: (id, port, state)."""
    rows = "\n".join(
        f"      - {{id: {n}, address: {LOOPBACK}, port: {p}" + (f", state: {st}" if st != "running" else "") + "}"
        for n, p, st in endpoints
    )
    protocol = "    protocol: http\n" if args.http else ""
    text = (
        f"# written by `mesh demo`: one service, {len(endpoints)} local replicas\n"
        "services:\n"
        "  demo:\n"
        f'    listen: "{LOOPBACK}:{listen}"\n'
        f"{protocol}"
        f"    balance: {args.balance}\n"
        "    health_check: {kind: tcp, interval: 1s}\n"
        "    endpoints:\n"
        f"{rows}\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _RollingStop:
    """``--http``: take the last replica out as a rolling update does, while the load runs.

    At 40 % of the run (of its duration or of --max-requests, whichever comes first) the replica is marked
    ``draining`` in the config file and the mesh reloads it (SIGHUP); once the admin API reports it draining with
    no request in flight, the replica process closes it (socket and connections); then it is removed from the
    table.  Each step's time (seconds from the start of the load) is kept for the summary."""

    def __init__(
        self,
        args: argparse.Namespace,
        config: Path,
        listen: int,
        endpoints: list[tuple[str, int]],
        mesh: subprocess.Popen[bytes],
        replicas: subprocess.Popen[bytes],
        admin: str,
        tally: _Tally,
        say: Callable[[str], None],
    ) -> None:
        self.args, self.config, self.listen, self.endpoints = args, config, listen, endpoints
        self.mesh, self.replicas, self.admin, self.tally, self.say = mesh, replicas, admin, tally, say
        self.victim = endpoints[-1][0]
        self.steps: dict[str, float] = {}
        self.held = 0  # requests the replica had read and not answered when it stopped
        self.problem: str | None = None

    async def __call__(self, start: float) -> None:
        try:
            await self._run(start)
        except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
            self.problem = f"the rolling stop of {self.victim} failed: {exc}"
            self.say(self.problem)

    async def _run(self, start: float) -> None:
        args, tally = self.args, self.tally
        try:  # 40 % of the run: of its time or of its requests, whichever comes first
            await asyncio.wait_for(tally.reached_mark.wait(), start + 0.4 * args.duration - time.monotonic())
        except TimeoutError:
            pass
        victim = self.victim
        if not args.no_drain:
            rows = [(n, p, "draining" if n == victim else "running") for n, p in self.endpoints]
            await asyncio.to_thread(_write_config, self.config, args, self.listen, rows)
            self.mesh.send_signal(signal.SIGHUP)
            self.steps["draining"] = time.monotonic() - start
            self.say(f"{self.steps['draining']:5.1f}s  {victim}: draining (the config file says so; SIGHUP)")
            await self._until(lambda ep: ep is not None and ep["draining"] and ep["active"] == 0, "drained")
            self.steps["drained"] = time.monotonic() - start
            self.say(f"{self.steps['drained']:5.1f}s  {victim}: drained, no request in flight to it")
        index = [n for n, _ in self.endpoints].index(victim) + 1
        assert self.replicas.stdin is not None and self.replicas.stdout is not None
        # Without a drain, stop it while it holds a request, as a replica killed under load would be.
        order = f"stop {index}" + (" busy" if args.no_drain else "")
        self.replicas.stdin.write(f"{order}\n".encode())
        self.replicas.stdin.flush()
        line = (await asyncio.wait_for(asyncio.to_thread(self.replicas.stdout.readline), 10)).decode()
        m = re.fullmatch(rf"STOPPED {index} held=(\d+)\n", line)
        if m is None:
            raise RuntimeError(f"the replicas answered {line!r} to {order!r}")
        self.held = int(m.group(1))
        self.steps["stopped"] = time.monotonic() - start
        how = "" if "drained" in self.steps else ", NOT drained first"
        self.say(
            f"{self.steps['stopped']:5.1f}s  {victim}: stopped (its process closed its socket{how}); "
            f"it held {self.held} request{'' if self.held == 1 else 's'} unanswered"
        )
        rows = [(n, p, "running") for n, p in self.endpoints if n != victim]
        await asyncio.to_thread(_write_config, self.config, args, self.listen, rows)
        self.mesh.send_signal(signal.SIGHUP)
        await self._until(lambda ep: ep is None, "removed from the table")
        self.steps["removed"] = time.monotonic() - start
        self.say(f"{self.steps['removed']:5.1f}s  {victim}: removed from the table")

    async def _until(self, cond: Callable[[dict[str, Any] | None], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            table = await asyncio.to_thread(_http_json, f"{self.admin}/v1/table")
            if cond(_endpoint_runtime(table, self.victim)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {what} after {timeout:g}s")
            await asyncio.sleep(0.02)


def _endpoint_runtime(table: Any, ep_id: str) -> dict[str, Any] | None:
    """``{"draining": bool, "active": int}`` for endpoint ``ep_id`` in an admin /v1/table answer, None if absent
    or if some process of the mesh (``--workers N``) has not applied that table yet: only then is the view the
    whole mesh's (the runtime's applied version is the lowest of the workers')."""
    if table.get("version") != (table.get("runtime") or {}).get("applied_version"):
        return {"draining": False, "active": -1}  # not settled: neither drained nor gone
    for svc in table["services"]:
        for route in svc["routes"]:
            for ep in route["endpoints"]:
                if ep["id"] == ep_id:
                    rt = ep.get("runtime") or {}
                    return {"draining": bool(rt.get("draining")), "active": int(rt.get("active_connections", 0))}
    return None


def _demo(args: argparse.Namespace, tmp: Path, out: TextIO) -> int:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    replicas = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshagent",
            "demo",
            "_replicas",
            str(args.replicas),
            *(["--http"] if args.http else []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    mesh: subprocess.Popen[bytes] | None = None
    try:
        assert replicas.stdout is not None
        line = replicas.stdout.readline().decode()
        if not line.startswith("PORTS "):
            print("mesh demo: the replicas did not start", file=sys.stderr)
            return 1
        ports = [int(p) for p in line.split()[1:]]
        names = [f"replica-{i}" for i in range(1, len(ports) + 1)]
        listen, admin_port = _free_port(), _free_port()
        config = tmp / "mesh.yaml"
        _write_config(config, args, listen, [(n, p, "running") for n, p in zip(names, ports, strict=True)])
        log = tmp / "mesh.log"
        admin = f"http://{LOOPBACK}:{admin_port}"
        with open(log, "wb") as logf:
            mesh = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshagent",
                    "run",
                    "--config",
                    str(config),
                    "--workers",
                    str(args.workers),
                    "--admin",
                    f"{LOOPBACK}:{admin_port}",
                    "--log-level",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
            )
        out.write(f"mesh demo: {len(ports)} replicas on {', '.join(f'{LOOPBACK}:{p}' for p in ports)}\n")
        out.write(
            f"           the mesh on {LOOPBACK}:{listen} ({'http, ' if args.http else ''}{args.balance}, "
            f"{args.workers} worker{'s' if args.workers > 1 else ''}), admin API {admin}\n"
        )
        out.write(f"           config:\n{_indent(config.read_text(), 14)}")
        out.flush()
        _wait_ready(admin, mesh, log, timeout=20)
        out.write(f"\ndashboard: {admin}/ui/  (live while the demo runs; --linger S keeps it up after the load)\n")
        out.flush()

        if args.http:
            out.write(
                f"\ndriving {args.connections} keep-alive clients for {args.duration:g}s (at most "
                f"{args.max_requests:,} requests), balanced per request; {names[-1]} is drained and stopped "
                "mid-run ...\n"
            )
        else:
            out.write(
                f"\ndriving {args.connections} clients for {args.duration:g}s (at most {args.max_requests:,} "
                f"requests), a new connection every {args.requests_per_connection} requests ...\n"
            )
        out.flush()
        import uvloop

        progress = None if args.quiet else out

        def say(text: str) -> None:
            tty = out.isatty()
            out.write(("\r\033[K" if tty else "") + text + "\n")
            out.flush()

        tally = _Tally(names, args.max_requests)
        tally.mark = max(1, int(0.4 * args.max_requests)) if args.http else 0
        rolling = (
            _RollingStop(args, config, listen, list(zip(names, ports, strict=True)), mesh, replicas, admin, tally, say)
            if args.http
            else None
        )
        wall = uvloop.run(
            _drive(
                listen,
                tally,
                args.connections,
                args.requests_per_connection,
                args.duration,
                progress,
                rolling,
                post=args.http,
            )
        )
        try:
            table = _http_json(f"{admin}/v1/table")
        except (OSError, ValueError):
            table = None
        if rolling is not None:
            _summary_http(out, tally, wall, rolling)
            ok = (
                tally.total > 0
                and (tally.errors == 0 or args.no_drain)
                and all(tally.requests[n] > 0 for n in names)
                and rolling.problem is None
                and "removed" in rolling.steps
            )
        else:
            _summary(out, tally, wall, table)
            ok = tally.total > 0 and all(tally.requests[n] > 0 for n in names)
        if not ok:
            out.write("some replica got no traffic or requests failed: see the mesh's log below\n")
            out.write(log.read_text(errors="replace"))
        if args.linger > 0 and mesh.poll() is None:
            out.write(f"\nthe dashboard stays live at {admin}/ui/ for {args.linger:g}s (Ctrl-C ends it)\n")
            out.flush()
            try:
                mesh.wait(args.linger)
            except subprocess.TimeoutExpired:
                pass
        return 0 if ok else 1
    except RuntimeError as exc:
        print(f"mesh demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in (mesh, replicas):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if replicas.stdin is not None:
            replicas.stdin.close()
        if replicas.stdout is not None:
            replicas.stdout.close()


def _indent(text: str, n: int) -> str:
    return "".join(" " * n + line + "\n" for line in text.splitlines())


def _summary(out: TextIO, tally: _Tally, wall: float, table: Any) -> None:
    total = tally.total
    out.write(f"\n{total} requests in {wall:.1f}s = {total / wall:.0f} requests/s, {tally.errors} errors\n\n")
    served = _served_by_mesh(table)
    mesh_col = f"{'mesh counted':>14}" if served else ""
    out.write(f"{'replica':<12}{'requests':>10}{'share':>8}{'connections':>13}{mesh_col}\n")
    for name, n in tally.requests.items():
        share = n / total * 100 if total else 0.0
        mesh_n = f"{served.get(name, '-'):>14}" if served else ""
        bar = "#" * round(share / 2)
        out.write(f"{name:<12}{n:>10}{share:>7.1f}%{tally.connections[name]:>13}{mesh_n}  {bar}\n")
    if tally.latencies:
        lat = sorted(tally.latencies)
        p = {q: _percentile(lat, q) * 1000 for q in (50, 90, 99)}
        out.write(
            f"\nlatency: p50 {p[50]:.2f} ms   p90 {p[90]:.2f} ms   p99 {p[99]:.2f} ms   max {lat[-1] * 1000:.2f} ms\n"
        )
    if served:
        out.write("(connections: as the clients saw them; mesh counted: as the mesh's admin API reports them)\n")
    out.flush()


def _served_by_mesh(table: Any) -> dict[str, int]:
    """Connections per endpoint id as the mesh counted them (admin API), or {} when not available."""
    out: dict[str, int] = {}
    try:
        for svc in table["services"]:
            for route in svc["routes"]:
                for ep in route["endpoints"]:
                    rt = ep.get("runtime") or {}
                    if "connections" in rt:
                        out[ep["id"]] = int(rt["connections"])
    except (TypeError, KeyError, ValueError):
        return {}
    return out


def _summary_http(out: TextIO, tally: _Tally, wall: float, rolling: _RollingStop) -> None:
    total = tally.total
    out.write(f"\n{total} requests in {wall:.1f}s = {total / wall:.0f} requests/s\n\n")
    out.write(f"{'replica':<12}{'requests':>10}{'share':>8}  X-Forwarded-For it saw\n")
    for name, n in tally.requests.items():
        share = n / total * 100 if total else 0.0
        seen = ", ".join(f"{v} ({c})" for v, c in sorted(tally.forwarded[name].items())) or "-"
        bar = "#" * round(share / 2)
        out.write(f"{name:<12}{n:>10}{share:>7.1f}%  {seen:<24}{bar}\n")
    reached = tally.reached
    n_rep = len(tally.requests)
    if reached:
        low, high = min(reached), max(reached)
        span = f"{low}" if low == high else f"{low} to {high}"
        out.write(
            f"\n{len(reached)} keep-alive client connections; each reached {span} of the {n_rep} replicas "
            "(balanced per request, not per connection)\n"
        )
    steps = rolling.steps
    if "removed" in steps:
        drain = (
            f"draining at {steps['draining']:.2f}s, drained at {steps['drained']:.2f}s, "
            if "drained" in steps
            else "NOT drained, "
        )
        out.write(
            f"rolling stop of {rolling.victim}: {drain}stopped at {steps['stopped']:.2f}s, removed from the table "
            f"at {steps['removed']:.2f}s\n"
        )
        last = tally.last_answer.get(rolling.victim)
        if last is not None:
            out.write(f"{rolling.victim} answered its last request at {last - tally.start:.2f}s\n")
    elif rolling.problem:
        out.write(rolling.problem + "\n")
    if tally.latencies:
        lat = sorted(tally.latencies)
        p = {q: _percentile(lat, q) * 1000 for q in (50, 90, 99)}
        out.write(
            f"latency: p50 {p[50]:.2f} ms   p90 {p[90]:.2f} ms   p99 {p[99]:.2f} ms   max {lat[-1] * 1000:.2f} ms\n"
        )
    out.write(f"failed requests: {tally.errors}\n")
    if rolling.args.no_drain and "stopped" in steps:
        out.write(
            f"({rolling.victim} was stopped without a drain, holding {rolling.held} request"
            f"{'' if rolling.held == 1 else 's'}: POSTs, which the mesh does not retry; without --no-drain the "
            "mesh drains it first)\n"
        )
    out.flush()
