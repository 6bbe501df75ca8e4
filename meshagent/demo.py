"""``mesh demo``: see the mesh balance real traffic in under a minute, with no Docker and no configuration.

It starts three local HTTP backends ("replicas", in a child process), writes a config file with one service in
front of them, runs the real mesh (``mesh run --config ...``) on a free loopback port, drives a short, bounded
load through it (a fresh connection every few requests, so the balancer gets to choose often), shows live
progress, and ends with the distribution per replica, requests/s, latency percentiles, and the mesh's own
view of its endpoints from the admin API.  While it runs, the mesh's live dashboard (the admin API's /ui/)
shows the replicas and their traffic: the demo prints its URL, and ``--linger S`` keeps the mesh (and the
page) up S more seconds after the load.  Everything listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main"]

LOOPBACK = "127.0.0.1"
MAX_DURATION = 600.0
MAX_CONNECTIONS = 1000
MAX_LINGER = 3600.0


# -- the replicas ---------------------------------------------------------------------------------------------


class _Replica(asyncio.Protocol):
    """A tiny keep-alive HTTP/1.1 server that names itself in every answer (header X-Replica and the body)."""

    __slots__ = ("buf", "keep", "last", "transport")

    def __init__(self, keep: bytes, last: bytes) -> None:
        self.keep, self.last = keep, last
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

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


def _replica_answers(name: str) -> tuple[bytes, bytes]:
    body = f"hello from {name}\n".encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Replica: {}\r\nConnection: {}\r\n\r\n"
    )
    return (
        head.format(len(body), name, "keep-alive").encode() + body,
        head.format(len(body), name, "close").encode() + body,
    )


async def _serve_replicas(count: int) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for i in range(1, count + 1):
        keep, last = _replica_answers(f"replica-{i}")
        servers.append(await loop.create_server(lambda k=keep, c=last: _Replica(k, c), LOOPBACK, 0, backlog=1024))
    ports = " ".join(str(s.sockets[0].getsockname()[1]) for s in servers)
    print(f"PORTS {ports}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # The parent may die without a signal (kill -9): then stdin closes, and the replicas go too.
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 1) else None)
    await stop.wait()
    for s in servers:
        s.close()


# -- the load -------------------------------------------------------------------------------------------------


class _Tally:
    def __init__(self, replicas: Sequence[str]) -> None:
        self.requests: dict[str, int] = dict.fromkeys(replicas, 0)
        self.connections: dict[str, int] = dict.fromkeys(replicas, 0)
        self.latencies: list[float] = []
        self.errors = 0
        self.total = 0


class _Client(asyncio.Protocol):
    """One connection: sends up to ``per_conn`` GETs one after another (the last with Connection: close)."""

    def __init__(self, tally: _Tally, per_conn: int, deadline: float, done: asyncio.Future[None]) -> None:
        self.tally, self.per_conn, self.deadline, self.done = tally, per_conn, deadline, done
        self.transport: Any = None
        self.buf = b""
        self.sent_at = 0.0
        self.count = 0
        self.replica: str | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.count += 1
        last = self.count >= self.per_conn or time.monotonic() >= self.deadline
        self.sent_at = time.perf_counter()
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: " + (b"close" if last else b"keep-alive") + b"\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1")
        length = replica = None
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.lower() == "content-length":
                length = int(value)
            elif key.lower() == "x-replica":
                replica = value.strip()
        if length is None or len(self.buf) < end + 4 + length:
            return
        self.buf = self.buf[end + 4 + length :]
        t = self.tally
        t.latencies.append(time.perf_counter() - self.sent_at)
        t.total += 1
        if replica in t.requests:
            t.requests[replica] += 1
            if self.replica is None:
                self.replica = replica
                t.connections[replica] += 1
        else:
            t.errors += 1
        if self.count < self.per_conn and time.monotonic() < self.deadline:
            self._send()
        else:
            self.transport.close()  # the replica may keep it open (the last request said keep-alive)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _drive(
    port: int, tally: _Tally, connections: int, per_conn: int, duration: float, progress: TextIO | None
) -> float:
    """Run the bounded load; return its wall time in seconds."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    deadline = start + duration

    async def worker() -> None:
        while time.monotonic() < deadline:
            done: asyncio.Future[None] = loop.create_future()
            try:
                factory = functools.partial(_Client, tally, per_conn, deadline, done)
                transport, _ = await asyncio.wait_for(loop.create_connection(factory, LOOPBACK, port), 5)
            except (OSError, TimeoutError):
                tally.errors += 1
                await asyncio.sleep(0.05)
                continue
            try:
                await asyncio.wait_for(done, max(1.0, deadline - time.monotonic() + 5))
            except TimeoutError:
                tally.errors += 1
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
    try:
        await asyncio.gather(*(worker() for _ in range(connections)))
    finally:
        shower.cancel()
        if progress is not None and progress.isatty():
            progress.write("\n")
    return time.monotonic() - start


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
    p.add_argument("--connections", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument(
        "--requests-per-connection",
        type=int,
        default=10,
        help="requests on one connection before the client opens a new one (default 10)",
    )
    p.add_argument("--replicas", type=int, default=3, help="local backends (default 3)")
    p.add_argument("--balance", default="round-robin", help="round-robin, least-conn, p2c or hash")
    p.add_argument("--workers", type=int, default=1, help="mesh worker processes (default 1)")
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
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        return f"--connections must be within 1..{MAX_CONNECTIONS}, got {args.connections}"
    if args.requests_per_connection < 1:
        return f"--requests-per-connection must be >= 1, got {args.requests_per_connection}"
    if not 1 <= args.replicas <= 20:
        return f"--replicas must be within 1..20, got {args.replicas}"
    if args.balance not in ("round-robin", "least-conn", "p2c", "hash"):
        return f"--balance must be round-robin, least-conn, p2c or hash; got {args.balance!r}"
    if not 1 <= args.workers <= 64:
        return f"--workers must be within 1..64, got {args.workers}"
    if not 0 <= args.linger <= MAX_LINGER:
        return f"--linger must be within 0..{MAX_LINGER:.0f} seconds, got {args.linger}"
    return None


# -- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``mesh demo [--duration S] [--connections N] ...``; returns the exit code (0: every replica served)."""
    if argv[:1] == ["_replicas"]:  # internal: the child process that hosts the replicas
        import uvloop

        uvloop.run(_serve_replicas(int(argv[1])))
        return 0
    args = _build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"mesh demo: {problem}", file=sys.stderr)
        return 2
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as tmp:
        return _demo(args, Path(tmp), out)


def _demo(args: argparse.Namespace, tmp: Path, out: TextIO) -> int:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    replicas = subprocess.Popen(
        [sys.executable, "-m", "meshagent", "demo", "_replicas", str(args.replicas)],
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
        endpoints = "\n".join(
            f"      - {{id: {n}, address: {LOOPBACK}, port: {p}}}" for n, p in zip(names, ports, strict=True)
        )
        config.write_text(
            "# written by `mesh demo`: one service, three local replicas\n"
            "services:\n"
            "  demo:\n"
            f'    listen: "{LOOPBACK}:{listen}"\n'
            f"    balance: {args.balance}\n"
            "    health_check: {kind: tcp, interval: 1s}\n"
            "    endpoints:\n"
            f"{endpoints}\n"
        )
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
            f"           the mesh on {LOOPBACK}:{listen} ({args.balance}, {args.workers} worker"
            f"{'s' if args.workers > 1 else ''}), admin API {admin}\n"
        )
        out.write(f"           config:\n{_indent(config.read_text(), 14)}")
        out.flush()
        _wait_ready(admin, mesh, log, timeout=20)
        out.write(f"\ndashboard: {admin}/ui/  (live while the demo runs; --linger S keeps it up after the load)\n")
        out.flush()

        out.write(
            f"\ndriving {args.connections} clients for {args.duration:g}s, a new connection every "
            f"{args.requests_per_connection} requests ...\n"
        )
        out.flush()
        import uvloop

        tally = _Tally(names)
        wall = uvloop.run(
            _drive(
                listen,
                tally,
                args.connections,
                args.requests_per_connection,
                args.duration,
                None if args.quiet else out,
            )
        )
        try:
            table = _http_json(f"{admin}/v1/table")
        except (OSError, ValueError):
            table = None
        _summary(out, tally, wall, table)
        ok = tally.total > 0 and all(tally.requests[n] > 0 for n in names)
        if not ok:
            out.write("some replica got no traffic: see the mesh's log above\n")
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
