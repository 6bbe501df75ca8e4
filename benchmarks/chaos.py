"""The chaos runner: the real agent under one fault at a time, with a probe that never stops.

    python -m benchmarks.chaos [--quick] [--fault NAME ...] [--out FILE] [--keep]  # every fault (about 5 minutes)
    python -m benchmarks.chaos --soak SECONDS                                 # mixed traffic and reloads
    python -m benchmarks.chaos --list                                         # the faults, with what they do

What it runs (all on loopback):

- replicas: four ``python -m benchmarks.chaos --replica`` children (two behind the probed services, two behind
  the victim service, so the faults' bulk traffic does not slow the probe's replicas), each an echo server
  (backpressure both ways) and a small HTTP/1.1 keep-alive server that answers ``GET /<token>`` with ``<token>`` repeated; the faulty backends
  (reset, never-read, black hole, flapping) live in the runner itself;
- the agent: ``python -m meshagent run --config FILE`` (static config: ``probe`` and ``victim`` tcp services and
  a ``web`` http service, admin API on a free port); a second one under ``prlimit --nofile`` for fd exhaustion;
  a third with ``--workers 2`` for the worker faults;
- the probe: a ``python -m benchmarks.chaos --probe`` child (its own process, so the faults' own work in the
  runner does not delay it): every ``--interval`` (5 ms) a NEW connection to the ``probe`` tcp port (64 random
  bytes, echoed, compared) or the ``web`` http port (a request whose body names a random token, compared),
  alternately, at most 32 in flight, 5 s deadline each.  Each request belongs to the phase it started in; the
  runner names the phase (``phase NAME`` on the probe's stdin) before and after each fault.

Per fault the report gives the probe's requests, failures (by kind), p50/p99/max latency during the fault, the
bytes it verified, the agent's descriptors and RSS (its whole process tree) before, at peak and after, and
what the fault itself saw (``detail``).  ``must_pass`` says whether the data plane's probe must see 0 failures
under that fault; the faults that exhaust a shared resource by design say which (``by_design``).

The faults target every listening port the agent has: the published tcp port, the published http port and the
admin API of the static-config agent, and the tunnel and control ports of a fourth agent, ``mesh run --cluster``
with a cluster token on loopback.  That agent reads a swarm node's /info before it binds anything, so the runner
gives it a small fake Engine API (``--engine`` child, a unix socket): a one-node swarm whose manager is this
agent, one service publishing the probe's tcp port to an echo replica on 127.0.0.1.  Its probe goes through
that published port (tcp only).

Every loop is bounded in count and time; ``--quick`` scales counts and durations down (CI: tests/test_chaos.py).
Results: benchmarks/results/chaos-<date>-<commit>.json (``--out`` to choose), and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.proc import LOOPBACK, REPO, BenchError, free_port, nofile_limit, python_env, rss_bytes, tree_pids

PROBE_BYTES = 64
PROBE_TIMEOUT = 5.0
PROBE_INFLIGHT = 32
RESULTS = REPO / "benchmarks" / "results"

# ----------------------------------------------------------------------------------------------------------
# replica child: echo + HTTP


class _Echo(asyncio.Protocol):
    """Echo with backpressure: a client that does not read stops this replica reading from it."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.t.write(data)

    def eof_received(self) -> bool:
        self.t.write_eof()
        return True

    def pause_writing(self) -> None:
        self.t.pause_reading()

    def resume_writing(self) -> None:
        self.t.resume_reading()


class _Http(asyncio.Protocol):
    """A tiny HTTP/1.1 server: ``GET /<token>`` -> 200 with ``token`` x 4 as the body, keep-alive."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.t.close()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            line = head.split(b"\r\n", 1)[0].split(b" ")
            token = line[1][1:] if len(line) > 1 else b""
            body = token * 4
            close = b"connection: close" in head.lower()
            self.t.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(body), b"Connection: close\r\n" if close else b"", body)
            )
            if close:
                self.t.close()
                return


async def _replica_main() -> None:
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(_Echo, LOOPBACK, int(os.environ.get("CHAOS_ECHO_PORT", "0")), backlog=4096)
    http = await loop.create_server(_Http, LOOPBACK, int(os.environ.get("CHAOS_HTTP_PORT", "0")), backlog=4096)
    print(f"PORTS {echo.sockets[0].getsockname()[1]} {http.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


# ----------------------------------------------------------------------------------------------------------
# fake engine child: a one-node swarm manager, so that `mesh run --cluster` opens its tunnel and control ports


def _engine_state(publish: str, echo: int) -> dict[str, Any]:
    """One manager node (127.0.0.1), one service publishing ``publish`` to the echo replica on this host."""
    node = {
        "ID": "chaosnode",
        "Description": {"Hostname": "chaos"},
        "Status": {"State": "ready", "Addr": LOOPBACK},
        "Spec": {"Availability": "active", "Role": "manager"},
        "ManagerStatus": {"Addr": f"{LOOPBACK}:2377", "Leader": True},
    }
    service = {
        "ID": "chaossvc",
        "Version": {"Index": 1},
        "Spec": {
            "Name": "chaos",
            "Labels": {"mesh.publish": f"{publish}:{echo}"},
            "Mode": {"Replicated": {"Replicas": 1}},
        },
    }
    task = {
        "ID": "chaostask",
        "ServiceID": "chaossvc",
        "NodeID": "chaosnode",
        "Slot": 1,
        "Status": {"State": "running", "ContainerStatus": {"ContainerID": "c" * 64}},
        "DesiredState": "running",
        "NetworksAttachments": [],
    }
    net = {"bridge": {"NetworkID": "net-bridge", "IPAddress": LOOPBACK}}
    container = {
        "Id": "c" * 64,
        "Names": ["/chaos.1.chaostask"],
        "Labels": {"com.docker.swarm.task.id": "chaostask", "com.docker.swarm.service.id": "chaossvc"},
        "State": "running",
        "Status": "Up 5 seconds",
        "Created": 1_700_000_000,
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {"Networks": net},
    }
    inspect = {
        "Id": container["Id"],
        "Name": "/chaos.1.chaostask",
        "Created": "2023-11-14T22:13:20.123456789Z",
        "State": {"Status": "running", "Running": True, "Paused": False},
        "Config": {"Labels": container["Labels"]},
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {"Networks": net},
    }
    info = {
        "Name": "chaos",
        "Swarm": {
            "LocalNodeState": "active",
            "NodeID": "chaosnode",
            "ControlAvailable": True,
            "NodeAddr": LOOPBACK,
            "RemoteManagers": [{"NodeID": "chaosnode", "Addr": f"{LOOPBACK}:2377"}],
        },
    }
    return {"node": node, "service": service, "task": task, "container": container, "inspect": inspect, "info": info}


async def _engine_main(sock: str, state: dict[str, Any]) -> None:
    import re

    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        path = re.sub(r"^/v\d+\.\d+", "", request.path)
        if path == "/_ping":
            return web.Response(text="OK")
        if path == "/version":
            return web.json_response({"ApiVersion": "1.41", "Version": "chaos"})
        if path == "/info":
            return web.json_response(state["info"])
        if path == "/events":
            resp = web.StreamResponse()
            resp.content_type = "application/json"
            await resp.prepare(request)
            await asyncio.Event().wait()  # nothing happens in this swarm
        if path == "/containers/json":
            return web.json_response([state["container"]])
        if path.startswith("/containers/"):
            return web.json_response(state["inspect"])
        if path == "/services":
            return web.json_response([state["service"]])
        if path.startswith("/services/"):
            return web.json_response(state["service"])
        if path == "/tasks":
            return web.json_response([state["task"]])
        if path == "/nodes":
            return web.json_response([state["node"]])
        return web.json_response({"message": f"not here: {path}"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, sock).start()
    print("ENGINE", flush=True)
    await asyncio.Event().wait()


# ----------------------------------------------------------------------------------------------------------
# probe child


@dataclass
class _Phase:
    lat: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    verified: int = 0
    skipped: int = 0

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.lat)
        n = len(lat)

        def pct(p: float) -> float | None:
            return round(lat[min(n - 1, int(p * n))] * 1000, 2) if n else None

        return {
            "requests": n + sum(self.failures.values()),
            "failures": sum(self.failures.values()),
            "failure_kinds": dict(self.failures),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 2) if n else None,
            "bytes_verified": self.verified,
            "skipped_at_cap": self.skipped,
        }


def _kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "eof"
    if isinstance(exc, ValueError):
        return "mismatch"
    return type(exc).__name__


async def _probe_tcp(addr: tuple[str, int]) -> int:
    payload = os.urandom(PROBE_BYTES)
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(payload)
        got = await r.readexactly(len(payload))
        if got != payload:
            raise ValueError("echo differs")
        return len(got)
    finally:
        w.close()


async def _probe_http(addr: tuple[str, int]) -> int:
    token = os.urandom(8).hex().encode()
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(b"GET /%s HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n" % token)
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ValueError(f"status {head[:12]!r}")
        i = head.lower().find(b"content-length:")
        n = int(head[i + 15 :].split(b"\r\n", 1)[0])
        body = await r.readexactly(n)
        if body != token * 4:
            raise ValueError("body differs")
        return len(body)
    finally:
        w.close()


async def _probe_main(targets: list[tuple[str, tuple[str, int]]], interval: float) -> None:
    """Probe ``targets`` round-robin every ``interval``; stdin: ``phase NAME`` | ``report`` | ``quit``."""
    loop = asyncio.get_running_loop()
    phases: dict[str, _Phase] = {}
    current = ["setup"]
    phases["setup"] = _Phase()
    inflight = [0]
    stop = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def one(kind: str, addr: tuple[str, int], ph: _Phase) -> None:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                n = await (_probe_tcp(addr) if kind == "tcp" else _probe_http(addr))
            ph.lat.append(time.perf_counter() - t0)
            ph.verified += n
        except Exception as exc:  # every failure is a data point
            ph.fail(_kind(exc))
        finally:
            inflight[0] -= 1

    async def ticker() -> None:
        i = 0
        nxt = loop.time()
        while not stop.is_set():
            ph = phases[current[0]]
            if inflight[0] >= PROBE_INFLIGHT:
                ph.skipped += 1
            else:
                kind, addr = targets[i % len(targets)]
                i += 1
                inflight[0] += 1
                t = asyncio.ensure_future(one(kind, addr, ph))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            nxt += interval
            delay = nxt - loop.time()
            if delay < 0:
                nxt = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tick = asyncio.ensure_future(ticker())
    print("PROBING", flush=True)
    try:
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                break
            cmd, _, arg = line.partition(" ")
            if cmd == "phase":
                current[0] = arg
                phases.setdefault(arg, _Phase())
            elif cmd == "report":
                # wait for the requests started so far (bounded by their deadline)
                pending = [t for t in tasks if not t.done()]
                if pending:
                    await asyncio.wait(pending, timeout=PROBE_TIMEOUT + 1)
                print("REPORT " + json.dumps({k: v.summary() for k, v in phases.items()}), flush=True)
    finally:
        stop.set()
        await tick
        if tasks:
            await asyncio.wait(list(tasks), timeout=PROBE_TIMEOUT + 1)


# ----------------------------------------------------------------------------------------------------------
# runner side: children


class Child:
    """A child process whose stdout lines are read on the runner's loop."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
        logf = open(log, "ab")  # noqa: ASYNC230 (a local log file, opened once per child)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=logf,
                env=env or python_env(),
                start_new_session=True,
                limit=16 * 1024 * 1024,
            )
        finally:
            logf.close()
        return cls(name, proc, log)

    async def line(self, prefix: str, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise BenchError(f"{self.name} exited (code {self.proc.returncode}):\n{self.tail()}")
                text = raw.decode(errors="replace")
                if text.startswith(prefix):
                    return text[len(prefix) :].strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("  | " + x for x in lines[-n:])

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


class Replica:
    def __init__(self, child: Child, echo: int, http: int) -> None:
        self.child, self.echo, self.http = child, echo, http

    @classmethod
    async def start(cls, name: str, workdir: Path, echo: int = 0, http: int = 0) -> Replica:
        env = python_env()
        env["CHAOS_ECHO_PORT"], env["CHAOS_HTTP_PORT"] = str(echo), str(http)
        child = await Child.start(
            name, [sys.executable, "-m", "benchmarks.chaos", "--replica"], workdir / f"{name}.log", env
        )
        e, h = (await child.line("PORTS ")).split()
        return cls(child, int(e), int(h))


class Probe:
    def __init__(self, child: Child) -> None:
        self.child = child

    @classmethod
    async def start(cls, name: str, workdir: Path, targets: list[str], interval: float) -> Probe:
        argv = [sys.executable, "-m", "benchmarks.chaos", "--probe", ",".join(targets), "--interval", str(interval)]
        child = await Child.start(name, argv, workdir / f"{name}.log")
        await child.line("PROBING")
        return cls(child)

    def phase(self, name: str) -> None:
        self.child.send(f"phase {name}")

    async def report(self) -> dict[str, Any]:
        self.child.send("report")
        return json.loads(await self.child.line("REPORT ", timeout=PROBE_TIMEOUT + 10))

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.child.send("quit")
        await self.child.stop(signal.SIGTERM, timeout=PROBE_TIMEOUT + 5)


def _fds(pids: list[int]) -> int:
    n = 0
    for p in pids:
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{p}/fd"))
    return n


class Agent:
    """``mesh run`` with a generated config: services probe (tcp), victim (tcp), web (http)."""

    def __init__(self, name: str, workdir: Path, *, workers: int = 1, nofile: int | None = None) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "mesh.yaml"
        self.workers = workers
        self.nofile = nofile
        self.ports = {"probe": free_port(), "victim": free_port(), "web": free_port(), "admin": free_port()}
        self.probe_eps: list[str] = []
        self.victim_eps: list[str] = []
        self.web_eps: list[str] = []
        self.victim_options: dict[str, str] = {}
        self.child: Child | None = None
        self.version = 0

    def config_text(self) -> str:
        def eps(xs: list[str]) -> str:
            return "[" + ", ".join(f'"{x}"' for x in xs) + "]"

        vopts = "".join(f"    {k}: {v}\n" for k, v in self.victim_options.items())
        return (
            "# generated by benchmarks/chaos.py\nservices:\n"
            f'  probe:\n    listen: "{LOOPBACK}:{self.ports["probe"]}"\n    connect_timeout: 1s\n'
            f"    endpoints: {eps(self.probe_eps)}\n"
            f'  victim:\n    listen: "{LOOPBACK}:{self.ports["victim"]}"\n    connect_timeout: 1s\n{vopts}'
            f"    endpoints: {eps(self.victim_eps)}\n"
            f'  web:\n    listen: "{LOOPBACK}:{self.ports["web"]}"\n    protocol: http\n'
            f"    endpoints: {eps(self.web_eps)}\n"
        )

    def write_config(self, text: str | None = None) -> None:
        tmp = self.cfg.with_suffix(".tmp")
        tmp.write_text(self.config_text() if text is None else text)
        os.replace(tmp, self.cfg)

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.proc.pid

    def pids(self) -> list[int]:
        return tree_pids(self.pid)

    def worker_pids(self) -> list[int]:
        return [p for p in self.pids() if p != self.pid]

    def fds(self) -> int:
        return _fds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    async def start(self) -> None:
        self.write_config()
        argv = [sys.executable, "-m", "meshagent", "run", "--config", str(self.cfg), "--workers", str(self.workers)]
        argv += ["--admin", f"{LOOPBACK}:{self.ports['admin']}", "--log-level", "warning", "--grace", "2"]
        if self.nofile:
            argv = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", *argv]
        self.child = await Child.start(self.name, argv, self.dir / "agent.log")
        deadline = time.monotonic() + 30
        while True:
            if self.child.proc.returncode is not None:
                raise BenchError(f"agent {self.name} exited:\n{self.child.tail()}")
            doc = await self.admin_json("/readyz", timeout=1.0)
            if doc and doc.get("ready"):
                self.version = int(doc.get("table_version", 0))
                return
            if time.monotonic() > deadline:
                raise BenchError(f"agent {self.name} not ready in 30 s:\n{self.child.tail()}")
            await asyncio.sleep(0.1)

    async def admin_json(self, path: str, timeout: float = 3.0) -> dict[str, Any] | None:
        url = f"http://{LOOPBACK}:{self.ports['admin']}{path}"

        def get() -> dict[str, Any] | None:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as exc:
                try:
                    return json.loads(exc.read())
                except ValueError:
                    return None
            except (OSError, ValueError):
                return None

        return await asyncio.to_thread(get)

    async def reload(self, timeout: float = 10.0) -> bool:
        """Write the config, SIGHUP, wait until /readyz reports a newer table version."""
        self.write_config()
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = await self.admin_json("/readyz", timeout=1.0)
            if doc and int(doc.get("table_version", 0)) > self.version:
                self.version = int(doc["table_version"])
                return True
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(signal.SIGTERM, timeout=10)


class ClusterAgentRun(Agent):
    """``mesh run --cluster`` on loopback against the fake engine child (a one-node swarm whose manager is this
    agent): it opens the tunnel and control ports, and publishes the ``probe`` port to the first echo replica."""

    def __init__(self, name: str, workdir: Path) -> None:
        super().__init__(name, workdir)
        self.ports.update(tunnel=free_port(), control=free_port())
        self.engine: Child | None = None

    async def start(self) -> None:
        sock = self.dir / "docker.sock"
        state = _engine_state(f"{LOOPBACK}:{self.ports['probe']}", int(self.probe_eps[0].rsplit(":", 1)[1]))
        (self.dir / "engine.json").write_text(json.dumps(state))
        argv = [sys.executable, "-m", "benchmarks.chaos", "--engine", str(sock), str(self.dir / "engine.json")]
        self.engine = await Child.start(f"{self.name}-engine", argv, self.dir / "engine.log")
        await self.engine.line("ENGINE")
        token = self.dir / "token"
        token.write_text(os.urandom(24).hex())
        token.chmod(0o600)
        argv = [sys.executable, "-m", "meshagent", "run", "--cluster", "--token-file", str(token)]
        argv += ["--docker", f"unix://{sock}", "--bind", LOOPBACK, "--advertise", LOOPBACK]
        argv += ["--tunnel-port", str(self.ports["tunnel"]), "--control-port", str(self.ports["control"])]
        argv += ["--admin", f"{LOOPBACK}:{self.ports['admin']}", "--log-level", "warning", "--grace", "2"]
        self.child = await Child.start(self.name, argv, self.dir / "agent.log")
        deadline = time.monotonic() + 30
        while True:
            if self.child.proc.returncode is not None:
                raise BenchError(f"agent {self.name} exited:\n{self.child.tail()}")
            doc = await self.admin_json("/readyz", timeout=1.0)
            if doc and doc.get("ready"):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"agent {self.name} not ready in 30 s:\n{self.child.tail()}")
            await asyncio.sleep(0.1)
        try:
            (await _connect(self.ports["probe"], 5.0)).close()
        except OSError as exc:
            raise BenchError(f"cluster agent {self.name} does not serve its published port: {exc}") from None

    async def reload(self, timeout: float = 10.0) -> bool:
        raise BenchError("the cluster agent follows its (fake) swarm, not a file")

    async def stop(self) -> None:
        await super().stop()
        if self.engine is not None:
            await self.engine.stop()


# ----------------------------------------------------------------------------------------------------------
# fault toolbox


def _addr(port: int) -> tuple[str, int]:
    return (LOOPBACK, port)


async def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(s, _addr(port))
    except BaseException:
        s.close()
        raise
    return s


def _rst(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


async def _bounded(n: int, concurrency: int, fn: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Run ``fn(i)`` for i < n, ``concurrency`` at a time; exceptions are returned, not raised."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with sem:
            try:
                return await fn(i)
            except Exception as exc:
                return exc

    return await asyncio.gather(*(one(i) for i in range(n)))


def _tally(results: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        k = "ok" if not isinstance(r, BaseException) else _kind(r)
        if isinstance(r, str):
            k = r
        out[k] = out.get(k, 0) + 1
    return out


async def _open_many(port: int, n: int, concurrency: int = 200) -> tuple[list[socket.socket], dict[str, int]]:
    socks: list[socket.socket] = []

    async def one(i: int) -> None:
        socks.append(await _connect(port))

    res = await _bounded(n, concurrency, one)
    return socks, _tally(res)


async def _watch_closed(socks: list[socket.socket], seconds: float) -> int:
    """How many of ``socks`` the peer closed (EOF or reset) within ``seconds``."""
    loop = asyncio.get_running_loop()
    closed = 0

    async def one(s: socket.socket) -> None:
        nonlocal closed
        try:
            while True:
                if not await loop.sock_recv(s, 65536):
                    break
        except OSError:
            pass
        closed += 1

    tasks = [asyncio.ensure_future(one(s)) for s in socks]
    await asyncio.wait(tasks, timeout=seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return closed


@dataclass
class Ctx:
    workdir: Path
    quick: bool
    agent: Agent
    replicas: list[Replica]
    probe: Probe
    scale: float  # counts x scale
    seconds: float  # a fault's hold time

    def n(self, full: int, minimum: int = 1) -> int:
        return max(minimum, int(full * self.scale))


@dataclass
class Fault:
    name: str
    fn: Callable[[Ctx], Awaitable[dict[str, Any]]]
    doc: str
    must_pass: bool = True
    by_design: str = ""
    agent: str = "main"  # main | fdlimit | workers
    quick: bool = True


FAULTS: dict[str, Fault] = {}


def fault(
    name: str, doc: str, *, must_pass: bool = True, by_design: str = "", agent: str = "main", quick: bool = True
) -> Callable:
    def deco(fn: Callable[[Ctx], Awaitable[dict[str, Any]]]) -> Callable:
        FAULTS[name] = Fault(name, fn, doc, must_pass, by_design, agent, quick)
        return fn

    return deco


# ----------------------------------------------------------------------------------------------------------
# faults: hostile clients on every port


def _port_of(ctx: Ctx, which: str) -> int:
    return ctx.agent.ports[which]


async def _garbage(ctx: Ctx, which: str) -> dict[str, Any]:
    port = _port_of(ctx, which)
    n = ctx.n(400, 20)
    loop = asyncio.get_running_loop()
    sent = 0
    wait = 0.5 if ctx.quick else 2.0  # how long a connection waits to be closed after its garbage

    async def one(i: int) -> str:
        nonlocal sent
        s = await _connect(port)
        try:
            blob = os.urandom(random.choice((1, 64, 4096, 65536)))
            if i % 3 == 0:
                blob = b"\x16\x03\x01" + blob  # a TLS-looking start
            elif i % 3 == 1:
                blob = b"GET / HTTP/1.1\r\n" + blob.replace(b"\n", b"x")
            await loop.sock_sendall(s, blob)
            sent += len(blob)
            try:
                async with asyncio.timeout(wait):
                    while await loop.sock_recv(s, 65536):
                        pass
                return "closed_by_agent"
            except TimeoutError:
                return "still_open"
            except OSError:
                return "reset_by_agent"
        finally:
            _rst(s) if i % 2 else s.close()

    res = await _bounded(n, 32, one)
    return {"connections": n, "bytes_sent": sent, "close_wait_s": wait, "outcomes": _tally(res)}


async def _slowloris(ctx: Ctx, which: str) -> dict[str, Any]:
    port = _port_of(ctx, which)
    n = ctx.n(600, 50)
    seconds = 2.0 if ctx.quick else 12.0  # beyond the http head deadline (10 s)
    socks, opened = await _open_many(port, n, 100)
    loop = asyncio.get_running_loop()
    closed_at: list[float] = []
    t0 = loop.time()
    # what each port's server reads first, left unfinished: an HTTP head, a PROXY v2 signature (the tunnel)
    if which == "tunnel":
        head = b"\r\n\r\n\x00\r\nQUIT\n"
    elif which in ("web", "admin", "control"):
        head = b"GET / HTTP/1.1\r\nHost: chaos\r\nX-a: "
    else:
        head = b"S"

    async def drip(s: socket.socket) -> None:
        try:
            await loop.sock_sendall(s, head)
            while loop.time() - t0 < seconds:
                await asyncio.sleep(1.0)
                await loop.sock_sendall(s, b"a")
                # the agent may have closed it: a recv that does not block tells
                with contextlib.suppress(BlockingIOError):
                    if s.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                        break
            else:
                return
        except OSError:
            pass
        closed_at.append(loop.time() - t0)

    await asyncio.gather(*(drip(s) for s in socks))
    for s in socks:
        s.close()
    return {
        "connections": len(socks),
        "open_outcomes": opened,
        "seconds": seconds,
        "closed_by_agent": len(closed_at),
        "first_close_s": round(min(closed_at), 2) if closed_at else None,
    }


for _which, _label in (("probe", "published tcp"), ("web", "published http"), ("admin", "admin API")):
    fault(
        f"garbage-{_which}",
        f"{_label} port: connections sending random bytes (TLS-like, HTTP-like, raw), half reset",
    )(lambda ctx, w=_which: _garbage(ctx, w))
    fault(
        f"slowloris-{_which}",
        f"{_label} port: many connections sending a byte a second (an HTTP head never finished)",
        quick=_which != "probe",
    )(lambda ctx, w=_which: _slowloris(ctx, w))


for _which in ("tunnel", "control"):
    fault(
        f"garbage-{_which}",
        f"cluster mode's {_which} port: connections sending random bytes (TLS-like, HTTP-like, raw), half reset",
        agent="cluster",
    )(lambda ctx, w=_which: _garbage(ctx, w))
    fault(
        f"slowloris-{_which}",
        f"cluster mode's {_which} port: many connections sending a byte a second",
        agent="cluster",
    )(lambda ctx, w=_which: _slowloris(ctx, w))


@fault("idle-15000", "15,000 idle client connections: 12,000 on the http port, 3,000 on the tcp port (proxied)")
async def _idle(ctx: Ctx) -> dict[str, Any]:
    total = ctx.n(15000, 200)
    tcp_n = total // 5
    http_n = total - tcp_n
    t0 = time.monotonic()
    a, ao = await _open_many(ctx.agent.ports["web"], http_n, 200)
    b, bo = await _open_many(ctx.agent.ports["probe"], tcp_n, 200)
    opened_s = time.monotonic() - t0
    fds_held = ctx.agent.fds()
    await asyncio.sleep(ctx.seconds)
    closed = await _watch_closed(a + b, 0.01)
    for s in a + b:
        s.close()
    return {
        "http_connections": len(a),
        "tcp_connections": len(b),
        "open_outcomes": {"http": ao, "tcp": bo},
        "open_seconds": round(opened_s, 2),
        "agent_fds_while_held": fds_held,
        "closed_by_agent_while_held": closed,
    }


# -- backends that fail --------------------------------------------------------------------------------------


class _Server:
    """An in-runner listening socket with a behaviour: reset, never-read, black hole."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(_addr(0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        self.task: asyncio.Task | None = None

    async def start(self) -> _Server:
        if self.mode == "blackhole":
            # backlog 0 with one connection never accepted: the kernel drops further SYNs, connect hangs
            self.sock.listen(0)
            self.filler = []
            for _ in range(4):  # non-blocking: once the queue is full a connect hangs
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                c.setblocking(False)
                c.connect_ex(_addr(self.port))
                self.filler.append(c)
            await asyncio.sleep(0.2)
            return self
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.task = asyncio.ensure_future(self._accept())
        return self

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            c, _ = await loop.sock_accept(self.sock)
            self.accepted += 1
            if self.mode == "reset":
                _rst(c)
            else:  # never-read: hold it, read nothing
                self.held.append(c)

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for c in self.held + getattr(self, "filler", []):
            c.close()
        self.sock.close()


async def _stream(port: int, nbytes: int, timeout: float, read: bool = True) -> str:
    """Send ``nbytes`` through an echo and read them back; the outcome names how it ended."""
    loop = asyncio.get_running_loop()
    s = await _connect(port, timeout)
    chunk = os.urandom(65536)
    got = 0
    sent = 0
    try:
        async with asyncio.timeout(timeout):

            async def writer() -> None:
                nonlocal sent
                while sent < nbytes:
                    await loop.sock_sendall(s, chunk)
                    sent += len(chunk)
                s.shutdown(socket.SHUT_WR)

            w = asyncio.ensure_future(writer())
            if not read:
                await w  # blocks once every buffer on the way is full: ends in "timeout"
            try:
                while read:
                    data = await loop.sock_recv(s, 262144)
                    if not data:
                        break
                    got += len(data)
            finally:
                w.cancel()
                (wrote,) = await asyncio.gather(w, return_exceptions=True)
        if got >= nbytes:
            return "complete"
        if isinstance(wrote, ConnectionResetError | BrokenPipeError):
            # The kernel reports a reset once, to the first call that asks: when the writer's send got it,
            # the reader's next recv sees a plain 0 -- it was a reset all the same.
            return "cut_as_reset"
        return "cut_as_eof" if read else "absorbed"
    except TimeoutError:
        return "timeout"
    except ConnectionResetError:
        return "cut_as_reset"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()


async def _victim_backend(ctx: Ctx, mode: str, traffic: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    srv = await _Server(mode).start()
    agent = ctx.agent
    saved = list(agent.victim_eps)
    agent.victim_eps = [f"{LOOPBACK}:{srv.port}"]
    try:
        applied = await agent.reload()
        detail = await traffic()
        detail["backend_accepted"] = srv.accepted
        detail["reload_applied"] = applied
        return detail
    finally:
        agent.victim_eps = saved
        await agent.reload()
        await srv.close()


def _eof_finding(res: list[Any], cause: str) -> list[str]:
    """No finding: the mesh passes every byte a replica sent, then a FIN, also after the replica's reset (as
    HAProxy, nginx and Envoy do): a replica that answers and closes with request bytes unread resets, and
    passing that on would destroy its answer.  The tally still shows how the clients saw the end."""
    return []


@fault("backend-reset", "victim service's only replica accepts then resets; its clients fail, the probe must not")
async def _backend_reset(ctx: Ctx) -> dict[str, Any]:
    async def traffic() -> dict[str, Any]:
        res = await _bounded(ctx.n(300, 30), 16, lambda i: _stream(ctx.agent.ports["victim"], 4096, 5.0))
        return {"victim_clients": _tally(res), "findings": _eof_finding(res, "the replica's reset")}

    return await _victim_backend(ctx, "reset", traffic)


@fault("backend-never-read", "victim's replica accepts and never reads: clients push data until blocked, then leave")
async def _backend_never_read(ctx: Ctx) -> dict[str, Any]:
    async def traffic() -> dict[str, Any]:
        res = await _bounded(ctx.n(64, 8), 64, lambda i: _stream(ctx.agent.ports["victim"], 64 << 20, ctx.seconds))
        return {"victim_clients": {"blocked" if k == "timeout" else k: v for k, v in _tally(res).items()}}

    return await _victim_backend(ctx, "never-read", traffic)


@fault("backend-blackhole", "a replica whose SYNs are dropped joins the probed service: connect timeout, retry")
async def _backend_blackhole(ctx: Ctx) -> dict[str, Any]:
    srv = await _Server("blackhole").start()
    agent = ctx.agent
    saved = list(agent.probe_eps)
    agent.probe_eps = [*saved, f"{LOOPBACK}:{srv.port}"]
    try:
        applied = await agent.reload()
        await asyncio.sleep(ctx.seconds * 2 if not ctx.quick else 1.0)
        table = await agent.admin_json("/v1/table")
        return {"reload_applied": applied, "blackhole_endpoint": _endpoint_runtime(table, "probe", srv.port)}
    finally:
        agent.probe_eps = saved
        await agent.reload()
        await srv.close()


def _endpoint_runtime(table: dict[str, Any] | None, service: str, port: int) -> dict[str, Any] | None:
    for s in (table or {}).get("services", ()):
        if s.get("name") != service:
            continue
        for r in s.get("routes", ()):
            for e in r.get("endpoints", ()):
                if str(e.get("address", "")).endswith(f":{port}") or e.get("port") == port:
                    rt = e.get("runtime", {})
                    return {k: rt.get(k) for k in ("healthy", "ejections", "ejected_seconds_left", "up")}
    return None


@fault("backend-flapping", "a replica of the probed service listens and stops listening every 150 ms")
async def _backend_flapping(ctx: Ctx) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    port = free_port()
    agent = ctx.agent
    saved = list(agent.probe_eps)
    agent.probe_eps = [*saved, f"{LOOPBACK}:{port}"]
    applied = await agent.reload()
    flips = 0
    server = None
    t_end = loop.time() + (1.5 if ctx.quick else ctx.seconds * 3)
    try:
        while loop.time() < t_end:
            if server is None:
                try:
                    server = await loop.create_server(_Echo, LOOPBACK, port, reuse_address=True)
                except OSError:
                    server = None
            else:
                server.close()
                server = None
            flips += 1
            await asyncio.sleep(0.15)
    finally:
        if server is not None:
            server.close()
        agent.probe_eps = saved
        await agent.reload()
    return {"reload_applied": applied, "flips": flips}


@fault(
    "backend-kill9-midstream",
    "the victim's replica is SIGKILLed while its clients stream through it; then its dead address joins the "
    "probed service",
)
async def _backend_kill9(ctx: Ctx) -> dict[str, Any]:
    agent = ctx.agent
    r = await Replica.start("replica-k", ctx.workdir)
    saved_p, saved_v = list(agent.probe_eps), list(agent.victim_eps)
    agent.victim_eps = [f"{LOOPBACK}:{r.echo}"]
    try:
        applied = await agent.reload()
        streams = [
            asyncio.ensure_future(_stream(agent.ports["victim"], 1 << 30, ctx.seconds * 4)) for _ in range(ctx.n(16, 4))
        ]
        await asyncio.sleep(ctx.seconds / 2)
        r.child.proc.kill()
        await r.child.proc.wait()
        res = await asyncio.gather(*streams, return_exceptions=True)
        # the dead replica's address joins the probed service: its connects are refused and retried
        agent.probe_eps = [*saved_p, f"{LOOPBACK}:{r.echo}"]
        applied = await agent.reload() and applied
        await asyncio.sleep(ctx.seconds)
        return {
            "reload_applied": applied,
            "victim_streams": _tally(res),
            "findings": _eof_finding(res, "the replica's death (SIGKILL)"),
        }
    finally:
        agent.probe_eps, agent.victim_eps = saved_p, saved_v
        await agent.reload()
        await r.child.stop()


# -- clients that misbehave ------------------------------------------------------------------------------------


@fault("client-half-close", "clients send, shut down their writing side, and must still get every byte back")
async def _client_half_close(ctx: Ctx) -> dict[str, Any]:
    res = await _bounded(ctx.n(200, 20), 16, lambda i: _stream(ctx.agent.ports["victim"], 256 << 10, 10.0))
    return {"clients": _tally(res)}


@fault("client-reset", "clients send and reset (SO_LINGER 0) mid-transfer")
async def _client_reset(ctx: Ctx) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    blob = os.urandom(128 << 10)

    async def one(i: int) -> None:
        s = await _connect(ctx.agent.ports["victim"])
        try:
            await loop.sock_sendall(s, blob)
            if i % 2:
                await loop.sock_recv(s, 1024)
        finally:
            _rst(s)

    res = await _bounded(ctx.n(500, 50), 32, one)
    return {"clients": _tally(res)}


@fault(
    "client-never-read",
    "clients push up to 64 MiB each into the echo and never read: they block; the agent's memory stays bounded",
)
async def _client_never_read(ctx: Ctx) -> dict[str, Any]:
    res = await _bounded(
        ctx.n(64, 8), 64, lambda i: _stream(ctx.agent.ports["victim"], 64 << 20, ctx.seconds, read=False)
    )
    # the clients closed with unread bytes (the kernel resets such a close): their pairs should be gone
    left = await _active_after(ctx.agent, "victim", 3.0)
    out: dict[str, Any] = {"clients": {"blocked" if k == "timeout" else k: v for k, v in _tally(res).items()}}
    out["victim_active_3s_after_close"] = left
    if left:
        out["findings"] = [
            f"{left} of {len(res)} pairs still open 3 s after their clients reset: the client's reset closes the "
            "upstream gracefully (Splice.connection_lost: up.close()), which waits to flush bytes to a replica "
            "that is not reading because its own writes to the mesh are blocked (the mesh stopped reading "
            "upstream while the client did not read); only the idle timeout (1 h) frees the pair, its "
            "descriptor and its buffers"
        ]
    return out


def _active(table: dict[str, Any] | None, service: str) -> int:
    n = 0
    for s in (table or {}).get("services", ()):
        if s.get("name") == service:
            for r in s.get("routes", ()):
                for e in r.get("endpoints", ()):
                    n += int((e.get("runtime") or {}).get("active_connections", 0))
    return n


async def _active_after(agent: Agent, service: str, seconds: float) -> int:
    """Active connections of ``service`` once they had ``seconds`` to go (returns early at 0)."""
    deadline = time.monotonic() + seconds
    while True:
        n = _active(await agent.admin_json("/v1/table"), service)
        if n == 0 or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.2)


# -- configuration faults --------------------------------------------------------------------------------------


async def _bad_config(ctx: Ctx, text: str) -> dict[str, Any]:
    agent = ctx.agent
    v0 = agent.version
    agent.write_config(text)
    os.kill(agent.pid, signal.SIGHUP)
    await asyncio.sleep(1.2 if ctx.quick else 2.0)  # the watcher (1 s) sees it too
    doc = await agent.admin_json("/readyz")
    kept = bool(doc) and int(doc.get("table_version", -1)) == v0 and bool(doc.get("ready"))
    agent.write_config()
    os.kill(agent.pid, signal.SIGHUP)
    await asyncio.sleep(0.5)
    return {"last_table_kept_and_ready": kept, "readyz": doc}


@fault("config-bad-file", "the file becomes invalid YAML with a bad value; SIGHUP")
async def _config_bad(ctx: Ctx) -> dict[str, Any]:
    return await _bad_config(ctx, ctx.agent.config_text().replace("connect_timeout: 1s", "connect_timeout: [", 1))


@fault("config-empty-services", "the file becomes `services: {}` (a valid file caught mid-write); SIGHUP")
async def _config_empty(ctx: Ctx) -> dict[str, Any]:
    return await _bad_config(ctx, "services: {}\n")


@fault("config-mid-write", "the file is cut in the middle of a service; SIGHUP")
async def _config_mid_write(ctx: Ctx) -> dict[str, Any]:
    text = ctx.agent.config_text()
    return await _bad_config(ctx, text[: len(text) * 2 // 3])


@fault("sighup-storm", "SIGHUPs every 5 ms with an unchanged file, then 20 changing reloads")
async def _sighup_storm(ctx: Ctx) -> dict[str, Any]:
    agent = ctx.agent
    n = ctx.n(400, 40)
    for _ in range(n):
        os.kill(agent.pid, signal.SIGHUP)
        await asyncio.sleep(0.005)
    applied = 0
    for i in range(ctx.n(20, 4)):
        agent.victim_options = {"idle_timeout": f"{600 + i}s"}
        applied += await agent.reload()
    agent.victim_options = {}
    await agent.reload()
    return {
        "unchanged_sighups": n,
        "changing_reloads_applied": applied,
        "agent_alive": agent.child.proc.returncode is None,
    }


# -- resource exhaustion (its own agent under prlimit) ---------------------------------------------------------

FD_LIMIT = 1024


@fault(
    "fd-exhaustion",
    f"the agent runs under prlimit --nofile={FD_LIMIT}; idle proxied connections take every descriptor, then leave",
    must_pass=False,
    by_design="the process's descriptor limit (RLIMIT_NOFILE) is shared by every connection: while it is "
    "exhausted new connections wait in the backlog (accepting pauses) and time out if it lasts",
    agent="fdlimit",
)
async def _fd_exhaustion(ctx: Ctx) -> dict[str, Any]:
    n = FD_LIMIT  # 2 descriptors each: twice the limit
    socks, opened = await _open_many(ctx.agent.ports["victim"], n, 100)
    fds_held = ctx.agent.fds()
    await asyncio.sleep(ctx.seconds)
    table = await ctx.agent.admin_json("/v1/table")
    for s in socks:
        s.close()
    # recovery: the probe's next phase ("<name>:after") shows whether it serves again
    ejected = []
    for s in (table or {}).get("services", ()):
        for r in s.get("routes", ()):
            for e in r.get("endpoints", ()):
                rt = e.get("runtime", {})
                if rt.get("ejections"):
                    ejected.append(e.get("id"))
    return {
        "connections_attempted": n,
        "open_outcomes": opened,
        "agent_fds_while_held": fds_held,
        "endpoints_ejected": ejected,
    }


# -- workers --------------------------------------------------------------------------------------------------


@fault(
    "worker-kill",
    "--workers 2: one worker is SIGKILLed; the parent restarts it",
    must_pass=False,
    by_design="connections the killed process held, and those still in its SO_REUSEPORT accept queue, die with it "
    "(the kernel resets them; net.ipv4.tcp_migrate_req=1 would hand the queued ones to the other worker)",
    agent="workers",
)
async def _worker_kill(ctx: Ctx) -> dict[str, Any]:
    before = ctx.agent.worker_pids()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    replaced = None
    while time.monotonic() - t0 < 10:
        now = ctx.agent.worker_pids()
        if victim not in now and len(now) == len(before):
            replaced = round(time.monotonic() - t0, 2)
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(ctx.seconds)
    return {"workers_before": len(before), "replaced_after_s": replaced}


@fault(
    "worker-stop",
    "--workers 2: one worker is SIGSTOPped; the parent must notice (3 s) and replace it",
    must_pass=False,
    by_design="until the parent's liveness check (3 s) kills the stopped worker, its share of new connections "
    "waits in its accept queue; the kill then resets those still queued (see worker-kill)",
    agent="workers",
)
async def _worker_stop(ctx: Ctx) -> dict[str, Any]:
    before = ctx.agent.worker_pids()
    victim = before[0]
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    replaced = None
    while time.monotonic() - t0 < 10:
        now = ctx.agent.worker_pids()
        if victim not in now and len(now) == len(before):
            replaced = round(time.monotonic() - t0, 2)
            break
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim, signal.SIGCONT)
    await asyncio.sleep(ctx.seconds)
    return {"workers_before": len(before), "replaced_after_s": replaced}


# ----------------------------------------------------------------------------------------------------------
# the run


async def _settle_fds(agent: Agent, baseline: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = agent.fds()
        if n <= baseline + 4 or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.1)


async def _sample(agent: Agent, peak: dict[str, int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            peak["fds"] = max(peak["fds"], agent.fds())
            peak["rss"] = max(peak["rss"], agent.rss())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def run_fault(ctx: Ctx, f: Fault) -> dict[str, Any]:
    agent = ctx.agent
    fds0, rss0 = agent.fds(), agent.rss()
    peak = {"fds": fds0, "rss": rss0}
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(_sample(agent, peak, stop))
    ctx.probe.phase(f.name)
    t0 = time.monotonic()
    error = None
    try:
        async with asyncio.timeout(120):
            detail = await f.fn(ctx)
    except Exception as exc:
        detail, error = {}, f"{type(exc).__name__}: {exc}"
    took = time.monotonic() - t0
    ctx.probe.phase(f"{f.name}:after")
    stop.set()
    await sampler
    await asyncio.sleep(0.3 if ctx.quick else 2.0)
    fds1 = await _settle_fds(agent, fds0, 5.0)
    rss1 = agent.rss()
    ctx.probe.phase("between")
    alive = agent.child is not None and agent.child.proc.returncode is None
    out = {
        "name": f.name,
        "doc": f.doc,
        "agent": f.agent,
        "must_pass": f.must_pass,
        "by_design": f.by_design or None,
        "seconds": round(took, 2),
        "agent_alive": alive,
        "fds_before": fds0,
        "fds_peak": peak["fds"],
        "fds_after": fds1,
        "rss_before": rss0,
        "rss_peak": peak["rss"],
        "rss_after": rss1,
        "detail": detail,
    }
    if error:
        out["error"] = error
    out["findings"] = detail.pop("findings", [])
    # a replica that died would fail the probe for reasons outside the agent: say so
    for r in ctx.replicas:
        if r.child.proc.returncode is not None:
            out["findings"].append(
                f"replica {r.child.name} exited (code {r.child.proc.returncode}): not the agent's doing"
            )
    if "skipped" in detail:
        out["skipped"] = detail["skipped"]
    return out


async def _start_env(workdir: Path, agent: Agent, interval: float, replicas: list[Replica]) -> Probe:
    """With 4 replicas the probe's services (probe, web) get the first two and the victim the others, so that
    the victim's bulk traffic does not slow the probe's replicas (single-threaded Python echo servers)."""
    probed, victim = (replicas[:2], replicas[2:]) if len(replicas) >= 4 else (replicas, replicas)
    agent.probe_eps = [f"{LOOPBACK}:{r.echo}" for r in probed]
    agent.victim_eps = [f"{LOOPBACK}:{r.echo}" for r in victim]
    agent.web_eps = [f"{LOOPBACK}:{r.http}" for r in probed]
    await agent.start()
    targets = [f"tcp:{LOOPBACK}:{agent.ports['probe']}"]
    if not isinstance(agent, ClusterAgentRun):
        targets.append(f"http:{LOOPBACK}:{agent.ports['web']}")
    return await Probe.start(f"probe-{agent.name}", workdir, targets, interval)


async def run_faults(names: list[str], quick: bool, interval: float, workdir: Path) -> list[dict[str, Any]]:
    groups: dict[str, list[Fault]] = {}
    for n in names:
        groups.setdefault(FAULTS[n].agent, []).append(FAULTS[n])
    results: dict[str, dict[str, Any]] = {}
    replicas = [await Replica.start(f"replica-{i}", workdir) for i in range(4)]
    scale = 0.12 if quick else 1.0
    seconds = 1.0 if quick else 2.0
    try:
        for group, faults in groups.items():
            if group == "workers":
                agent = Agent("agent-workers", workdir, workers=2)
            elif group == "fdlimit":
                agent = Agent("agent-fdlimit", workdir, nofile=FD_LIMIT)
            elif group == "cluster":
                agent = ClusterAgentRun("agent-cluster", workdir)
            else:
                agent = Agent("agent", workdir)
            probe = await _start_env(workdir, agent, interval, replicas)
            ctx = Ctx(workdir, quick, agent, replicas, probe, scale, seconds)
            try:
                probe.phase("baseline")
                await asyncio.sleep(0.5 if quick else 2.0)
                for f in faults:
                    print(f"chaos: {f.name} ...", file=sys.stderr, flush=True)
                    results[f.name] = await run_fault(ctx, f)
                    if not results[f.name]["agent_alive"]:
                        break
                report = await probe.report()
            finally:
                await probe.stop()
                await agent.stop()
            for f in faults:
                if f.name not in results:
                    continue
                results[f.name]["probe"] = report.get(f.name)
                results[f.name]["probe_after"] = report.get(f"{f.name}:after")
                results[f.name]["probe_baseline"] = report.get("baseline")
    finally:
        for r in replicas:
            await r.child.stop()
    return [results[n] for n in names if n in results]


# -- soak -----------------------------------------------------------------------------------------------------


def _slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y), per minute."""
    if len(samples) < 3:
        return 0.0
    ts = [t for t, _ in samples]
    ys = [y for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in samples) / den if den else 0.0


async def run_soak(seconds: float, interval: float, workdir: Path) -> dict[str, Any]:
    replicas = [await Replica.start(f"replica-{i}", workdir) for i in range(2)]
    agent = Agent("agent-soak", workdir)
    probe = await _start_env(workdir, agent, interval, replicas)
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, int, int]] = []
    counts = {"reloads": 0, "reloads_applied": 0, "replica_joins": 0, "replica_leaves": 0}
    traffic: dict[str, int] = {}
    stop = asyncio.Event()
    extra: Replica | None = None

    async def mixed() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            kind = i % 4
            if kind == 0:
                out = await _stream(agent.ports["victim"], 4 << 20, 20.0)
            elif kind == 1:
                out = await _stream(agent.ports["victim"], 4096, 5.0)
            elif kind == 2:
                s = await _connect(agent.ports["victim"])
                _rst(s)
                out = "reset_by_client"
            else:
                s = await _connect(agent.ports["web"])
                await asyncio.sleep(0.05)
                s.close()
                out = "idle_http"
            traffic[out] = traffic.get(out, 0) + 1
            await asyncio.sleep(0.02)

    try:
        # warm-up: the first minutes of a Python process grow its heap; samples start after it
        probe.phase("soak")
        workers = [asyncio.ensure_future(mixed()) for _ in range(4)]
        t0 = loop.time()
        next_reload = t0 + 3
        next_sample = t0
        while loop.time() - t0 < seconds:
            now = loop.time()
            if now >= next_sample:
                samples.append((now - t0, agent.fds(), agent.rss()))
                next_sample += 5
            if now >= next_reload:
                next_reload += 3
                counts["reloads"] += 1
                if extra is None and counts["reloads"] % 2:
                    extra = await Replica.start(f"replica-soak-{counts['reloads']}", workdir)
                    agent.probe_eps.append(f"{LOOPBACK}:{extra.echo}")
                    agent.victim_eps.append(f"{LOOPBACK}:{extra.echo}")
                    counts["replica_joins"] += 1
                elif extra is not None:
                    agent.probe_eps.remove(f"{LOOPBACK}:{extra.echo}")
                    agent.victim_eps.remove(f"{LOOPBACK}:{extra.echo}")
                    counts["reloads_applied"] += await agent.reload()
                    await extra.child.stop()  # after the table dropped it: open connections are cut
                    extra = None
                    counts["replica_leaves"] += 1
                    continue
                counts["reloads_applied"] += await agent.reload()
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        report = await probe.report()
    finally:
        stop.set()
        await probe.stop()
        await agent.stop()
        if extra is not None:
            await extra.child.stop()
        for r in replicas:
            await r.child.stop()
    steady = [s for s in samples if s[0] >= min(60.0, seconds / 4)]
    return {
        "seconds": seconds,
        "probe": report.get("soak"),
        "counts": counts,
        "traffic": traffic,
        "samples": [{"t": round(t, 1), "fds": f, "rss": r} for t, f, r in samples],
        "fds_slope_per_min": round(_slope([(t, f) for t, f, _ in steady]), 2),
        "rss_slope_bytes_per_min": round(_slope([(t, r) for t, _, r in steady])),
        "slope_from_s": steady[0][0] if steady else None,
    }


# -- report ---------------------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        (
            "fault",
            "probe req",
            "fail",
            "p99 ms",
            "verified KB",
            "after fail",
            "fds b/peak/a",
            "RSS MB b/peak/a",
            "verdict",
        )
    ]
    for r in results:
        p = r.get("probe") or {}
        a = r.get("probe_after") or {}
        fails = p.get("failures", 0)
        if r.get("skipped"):
            verdict = "skipped"
        elif r.get("error"):
            verdict = "error"
        elif not r.get("agent_alive"):
            verdict = "AGENT DIED"
        elif r["must_pass"]:
            verdict = "ok" if fails == 0 and a.get("failures", 0) == 0 else "FAIL"
        else:
            verdict = "by design" if a.get("failures", 0) == 0 else "NOT RECOVERED"
        rows.append(
            (
                r["name"],
                str(p.get("requests", "-")),
                str(fails),
                str(p.get("p99_ms", "-")),
                str(round(p.get("bytes_verified", 0) / 1000)) if p else "-",
                str(a.get("failures", "-")),
                f"{r['fds_before']}/{r['fds_peak']}/{r['fds_after']}",
                f"{_mb(r['rss_before'])}/{_mb(r['rss_peak'])}/{_mb(r['rss_after'])}",
                verdict,
            )
        )
        r["verdict"] = verdict
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def _doc(command: str, quick: bool) -> dict[str, Any]:
    from benchmarks import report

    commit, dirty = report.git_commit()
    return {
        "schema": 1,
        "kind": "chaos",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "dirty": dirty,
        "command": command,
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "nofile": nofile_limit()},
        "probe": {"interval_s": None, "timeout_s": PROBE_TIMEOUT, "bytes": PROBE_BYTES, "inflight_cap": PROBE_INFLIGHT},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts, short holds (CI)")
    ap.add_argument("--fault", action="append", default=None, metavar="NAME", help="run only this fault (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the faults")
    ap.add_argument("--soak", type=float, default=None, metavar="SECONDS", help="run the soak for SECONDS instead")
    ap.add_argument("--interval", type=float, default=0.005, help="probe interval in seconds (default 0.005)")
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/chaos-<date>-<commit>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (agent logs, configs)")
    ap.add_argument("--replica", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine", nargs=2, default=None, metavar=("SOCK", "STATE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.engine:
        sock, state = args.engine
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_engine_main(sock, json.loads(Path(state).read_text())))
        return 0
    if args.replica:
        # the default loop: uvloop 0.23 aborted (SIGABRT) a replica whose echo clients reset mid-write
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_replica_main())
        return 0
    if args.probe:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner, contextlib.suppress(KeyboardInterrupt):
            targets = []
            for t in args.probe.split(","):
                kind, host, port = t.split(":")
                targets.append((kind, (host, int(port))))
            runner.run(_probe_main(targets, args.interval))
        return 0

    if args.list:
        for f in FAULTS.values():
            extra = "" if f.must_pass else f"  [may fail by design: {f.by_design or 'not run here'}]"
            print(f"{f.name:26} {f.doc}{extra}")
        return 0

    names = args.fault or [n for n, f in FAULTS.items() if f.quick or not args.quick]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        print(f"unknown fault(s): {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    command = "python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = _doc(command, args.quick)
    doc["probe"]["interval_s"] = args.interval
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(tempfile.mkdtemp(prefix="mesh-chaos-"))
            print(f"chaos: logs and configs kept in {workdir}", file=sys.stderr)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-chaos-")))
        try:
            if args.soak:
                doc["soak"] = asyncio.run(run_soak(args.soak, args.interval, workdir))
            else:
                doc["faults"] = asyncio.run(run_faults(names, args.quick, args.interval, workdir))
        except BenchError as exc:
            print(f"chaos: {exc}", file=sys.stderr)
            return 1
    if "faults" in doc:
        print(table(doc["faults"]))
        for r in doc["faults"]:
            for f in r["findings"]:
                print(f"finding ({r['name']}): {f}")
    else:
        s = doc["soak"]
        print(json.dumps({k: v for k, v in s.items() if k != "samples"}, indent=1))
    out = Path(args.out) if args.out else None
    if out is None:
        kind = "chaos-soak" if args.soak else "chaos"
        out = RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{doc['commit']}.json"
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"chaos: results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
