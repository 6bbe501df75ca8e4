"""Hitless upgrades: ``mesh run --handover PATH``, SIGUSR2 and ``--workers N`` hand their listening sockets
to a new process (meshagent/handover.py) under load, with real processes and real sockets on 127.0.0.1.

The load is bounded in count and time: keep-alive clients (several round trips per connection, then a
clean close) and new-connection clients (one round trip each), counting every refused, reset or timed-out
attempt.  A handover must cost none of them, and a connection opened on the old agent must keep working
while that agent drains.

The agents' ports are fixed (the new process takes over the same port): ``free_port()`` reads a free port
from the kernel (bind to port 0, close); ``--workers`` tests hold theirs with ``reserved_port()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from meshagent.handover import request_takeover
from tests.test_cli import (
    LISTEN,
    Agent,
    Conn,
    EchoBackend,
    _gone,
    _socket_inodes,
    _tcp_sockets,
    clean_env,
    echo_once,
    write_atomic,
)
from tests.util import reserved_port, wait_for

pytestmark = pytest.mark.uvloop_only  # real processes; the test's own loop only drives clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(port: int, backends: list[int]) -> str:
    eps = ", ".join(f"'127.0.0.1:{b}'" for b in backends)
    return f"services:\n  web:\n    listen: '127.0.0.1:{port}'\n    endpoints: [{eps}]\n    connect_timeout: 1s\n"


@dataclass
class Load:
    """Clients through the mesh until ``stop()`` (or ``limit`` seconds / ``max_ops`` round trips)."""

    port: int
    keepalive: int = 6  # concurrent keep-alive clients
    churn: int = 3  # concurrent new-connection clients
    per_conn: int = 20  # round trips per keep-alive connection
    limit: float = 60.0
    max_ops: int = 200_000
    ok: int = 0
    connections: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_span: list[float] = field(default_factory=list)  # monotonic times of the first and last error
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> Load:
        self._deadline = time.monotonic() + self.limit
        for i in range(self.keepalive):
            self._tasks.append(asyncio.create_task(self._client(i, self.per_conn)))
        for i in range(self.churn):
            self._tasks.append(asyncio.create_task(self._client(100 + i, 1)))
        return self

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline and self.ok < self.max_ops

    def _count(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionRefusedError):
            kind = "refused"
        elif isinstance(exc, (ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError)):
            kind = "reset"
        elif isinstance(exc, TimeoutError):
            kind = "timeout"
        else:
            kind = type(exc).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.error_span[1:] = [time.monotonic()]
        if len(self.error_span) == 1:
            self.error_span.insert(0, self.error_span[0])

    async def _client(self, ident: int, per_conn: int) -> None:
        n = 0
        while self._running():
            w = None
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
                self.connections += 1
                for _ in range(per_conn):
                    payload = b"%d:%d\n" % (ident, n)
                    n += 1
                    w.write(payload)
                    await w.drain()
                    got = await asyncio.wait_for(r.readexactly(len(payload)), 5)
                    assert got == payload, (got, payload)
                    self.ok += 1
                    if not self._running():
                        break
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self._count(exc)
            finally:
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError):
                        await w.wait_closed()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def __repr__(self) -> str:
        span = self.error_span[-1] - self.error_span[0] if self.error_span else 0.0
        return f"<Load ok={self.ok} connections={self.connections} errors={self.errors} over {span:.2f}s>"


@pytest.fixture
async def backends():
    bs = [await EchoBackend(f"b{i}").start() for i in range(2)]
    yield bs
    for b in bs:
        await b.close()


async def ready(admin_port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def until_progress(load: Load, ops: int = 200, timeout: float = 20.0) -> None:
    """Wait until the load made ``ops`` more round trips (it is really flowing)."""
    target = load.ok + ops
    await wait_for(lambda: load.ok >= target, timeout=timeout, what=f"{ops} round trips ({load!r})")


def agent_pid(agent: Agent) -> int:
    assert agent.proc is not None
    return agent.proc.pid


async def test_handover_restarts_under_load_refuse_and_reset_nothing(tmp_path, backends):
    """``mesh run --handover PATH`` restarted 3 times under keep-alive and new-connection load: 0 refused,
    0 reset; a connection opened on the old agent still works while it drains; each old agent exits 0."""
    path = tmp_path / "mesh.yaml"
    port, admin = free_port(), free_port()
    write_atomic(path, config(port, [b.port for b in backends]))
    sock = str(tmp_path / "run" / "handover.sock")
    argv = ("--config", str(path), "--admin", f"127.0.0.1:{admin}", "--handover", sock, "--grace", "10")
    agents = [await Agent(*argv).start()]
    load = None
    try:
        await agents[0].wait_log("handover: serving")
        assert agents[0].logged("no agent at")
        load = Load(port).start()
        await until_progress(load)
        for i in range(3):
            old = agents[-1]
            held = await Conn.open(port)  # an established connection, served by the old agent
            assert await held.echo(b"before\n") == b"before\n"
            new = await Agent(*argv).start()
            agents.append(new)
            try:
                await new.wait_log("handover: received 2 socket(s)")  # the web port and the admin API
            except AssertionError:
                raise AssertionError(old.log) from None
            await old.wait_log("stopped accepting and drains")
            await new.wait_log("handover: serving")
            assert await held.echo(b"during the drain\n") == b"during the drain\n"
            await until_progress(load)
            assert old.proc is not None and old.proc.returncode is None  # still draining: held is open
            await held.close()
            assert await old.wait(15) == 0, old.log
            assert await ready(admin), new.log
            assert not load.errors, (i, load, old.log, new.log)
        await until_progress(load)
        await load.stop()
        assert not load.errors, load
        print("handover:", load)
        assert load.connections > 50, load
        agents[-1].signal(signal.SIGTERM)
        assert await agents[-1].wait(15) == 0
        assert not Path(sock).exists()  # noqa: ASYNC240 (the last agent removed its socket)
    finally:
        if load is not None:
            await load.stop()
        for a in agents:
            await a.stop()


async def test_without_handover_a_restart_refuses_connections(tmp_path, backends):
    """The baseline the tests above are measured against (and proof that the load notices failures): a
    stop-first restart (SIGTERM, then a new agent) under the same load refuses connections."""
    path = tmp_path / "mesh.yaml"
    port = free_port()
    write_atomic(path, config(port, [b.port for b in backends]))
    argv = ("--config", str(path), "--admin", "off", "--grace", "10")
    agents = [await Agent(*argv).start()]
    load = None
    try:
        await agents[0].wait_log("applied table version 1")
        load = Load(port).start()
        await until_progress(load)
        agents[0].signal(signal.SIGTERM)
        assert await agents[0].wait(15) == 0
        agents.append(await Agent(*argv).start())
        await agents[1].wait_log("applied table version 1")
        await until_progress(load)
        await load.stop()
        print("stop-first:", load)
        assert load.errors.get("refused", 0) > 0, load
    finally:
        if load is not None:
            await load.stop()
        for a in agents:
            await a.stop()


MARKER = "SIGUSR2: started pid "


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigusr2_restarts_under_load_refuse_and_reset_nothing(tmp_path, backends, workers):
    """SIGUSR2 (no --handover) three times: each time a new process with a new PID takes the sockets over
    and the old one drains and exits 0 (with --workers 2, its workers too); the load sees nothing."""
    path = tmp_path / "mesh.yaml"
    held = contextlib.ExitStack()
    port = held.enter_context(reserved_port()) if workers > 1 else free_port()
    admin = free_port()
    write_atomic(path, config(port, [b.port for b in backends]))
    try:
        await _sigusr2_under_load(path, port, admin, workers)
    finally:
        held.close()


async def _sigusr2_under_load(path: Path, port: int, admin: int, workers: int) -> None:
    argv = ("--config", str(path), "--admin", f"127.0.0.1:{admin}", "--grace", "5", "--workers", str(workers))
    agent = await Agent(*argv).start()
    pids = [agent_pid(agent)]
    load = None
    try:
        await wait_for(lambda: ready(admin), timeout=20, what="agent ready")
        load = Load(port).start()
        await until_progress(load)
        for i in range(3):
            seen = sum(MARKER in ln for ln in agent.lines)
            os.kill(pids[-1], signal.SIGUSR2)
            await wait_for(lambda n=seen: sum(MARKER in ln for ln in agent.lines) > n, timeout=10, what="re-exec")
            line = [ln for ln in agent.lines if MARKER in ln][-1]
            new_pid = int(line.split(MARKER, 1)[1].split()[0])
            assert new_pid not in pids
            await wait_for(lambda: _gone(pids[-1]), timeout=15, what=f"old pid {pids[-1]} exits")
            pids.append(new_pid)
            await until_progress(load)
            assert await ready(admin)
            assert not load.errors, (i, load, agent.log)
        assert agent.proc is not None and agent.proc.returncode == 0  # the first one exited 0
        await load.stop()
        print(f"sigusr2, {workers} worker(s):", load)
        assert not load.errors, load
        os.kill(pids[-1], signal.SIGTERM)
        await wait_for(lambda: _gone(pids[-1]), timeout=15, what="last agent exits")
    finally:
        if load is not None:
            await load.stop()
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await agent.stop()


async def test_workers_handover_under_load(tmp_path, backends):
    """``--workers 2 --handover``: the new parent takes the workers' SO_REUSEPORT sockets (one per worker)
    and the admin API over; its workers accept from the same queues; the old workers drain and exit."""
    path = tmp_path / "mesh.yaml"
    with reserved_port() as port:
        admin = free_port()
        write_atomic(path, config(port, [b.port for b in backends]))
        sock = str(tmp_path / "handover.sock")
        argv = ("--config", str(path), "--admin", f"127.0.0.1:{admin}", "--handover", sock, "--grace", "10",
                "--workers", "2", "--log-format", "json")  # fmt: skip
        agents = [await Agent(*argv).start()]
        load = None
        try:
            await agents[0].wait_log("handover: serving", timeout=30)
            load = Load(port).start()
            await until_progress(load)
            for i in range(2):
                old = agents[-1]
                old_workers = worker_pids(old)
                assert len(old_workers) == 2
                new = await Agent(*argv).start()
                agents.append(new)
                await new.wait_log("handover: received 3 socket(s)", timeout=30)  # 2 workers' + admin
                await old.wait_log("stopped accepting and drains")
                await until_progress(load)
                assert await old.wait(20) == 0, old.log
                for pid in old_workers:
                    assert _gone(pid)
                assert await ready(admin)
                assert not load.errors, (i, load, old.log, new.log)
            await load.stop()
            print("workers handover:", load)
            assert not load.errors, load
        finally:
            if load is not None:
                await load.stop()
            for a in agents:
                await a.stop()


async def test_one_process_hands_over_to_two_workers_without_leaking_sockets(tmp_path, backends):
    """A one-process agent hands its port to ``--workers 2``: the new parent keeps that socket (now with
    SO_REUSEPORT) for worker 0 and binds a second for worker 1; each worker holds its own socket only
    (handed-over descriptors are close-on-exec: no worker inherits the parent's copy)."""
    path = tmp_path / "mesh.yaml"
    port = free_port()
    write_atomic(path, config(port, [b.port for b in backends]))
    sock = str(tmp_path / "handover.sock")
    base = ("--config", str(path), "--admin", "off", "--handover", sock, "--grace", "5")
    old = await Agent(*base).start()
    new = None
    try:
        await old.wait_log("handover: serving")
        inherited = {ino for st, ino in _tcp_sockets(port) if st == LISTEN}
        assert len(inherited) == 1
        new = await Agent(*base, "--workers", "2", "--log-format", "json").start()
        await new.wait_log("handover: serving", timeout=30)
        assert await old.wait(15) == 0, old.log
        listening = {ino for st, ino in _tcp_sockets(port) if st == LISTEN}
        assert inherited < listening and len(listening) == 2  # the same kernel socket, and one more
        workers = worker_pids(new)
        held = [_socket_inodes(pid) & listening for pid in workers]
        assert len(held) == 2 and all(len(h) == 1 for h in held) and held[0] != held[1], (held, inherited, new.log)
        for _ in range(20):
            assert await echo_once(port) == b"ping\n"
    finally:
        await old.stop()
        if new is not None:
            await new.stop()


def worker_pids(agent: Agent) -> list[int]:
    pids = {}
    for line in agent.lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("msg", "").startswith("worker ") and "running, pid" in rec["msg"]:
                pids[rec["worker"]] = rec["pid"]
    return list(pids.values())


async def test_a_stale_socket_file_is_replaced_and_the_agent_binds_normally(tmp_path, backends):
    path = tmp_path / "mesh.yaml"
    port = free_port()
    write_atomic(path, config(port, [backends[0].port]))
    sock = str(tmp_path / "handover.sock")
    with socket.socket(socket.AF_UNIX) as s:  # bound, never listening, then closed: a stale file
        s.bind(sock)
    assert Path(sock).exists()  # noqa: ASYNC240
    agent = await Agent("--config", str(path), "--admin", "off", "--handover", sock).start()
    try:
        await agent.wait_log("is stale (no agent serves it); binding normally")
        await agent.wait_log("handover: serving")
        assert await echo_once(port) == b"ping\n"
        # the file is now this agent's socket: a takeover from the test process works
        taken, why = await asyncio.to_thread(request_takeover, sock, 5.0)
        assert why == "ok" and taken is not None
        assert [(e["role"], e["port"]) for e, _ in taken.sockets] == [("tcp", port)]
        taken.abandon()  # never released: the agent keeps serving
        await agent.wait_log("went away before taking over; still serving")
        assert await echo_once(port) == b"ping\n"
    finally:
        await agent.stop()


async def test_a_hung_old_agent_keeps_its_ports_and_the_new_one_binds_once_it_is_gone(tmp_path, backends):
    """The old agent is SIGSTOPped: the new one gives up the handover after --handover-timeout, binds
    nothing it cannot (the ports are the old one's, without SO_REUSEPORT), reports not ready and retries
    every 2 s at most; once the old one is killed the new one binds and serves.  The old one was never
    told to stop, so nothing was ever both stopped by the handover."""
    path = tmp_path / "mesh.yaml"
    port, admin = free_port(), free_port()
    write_atomic(path, config(port, [backends[0].port]))
    sock = str(tmp_path / "handover.sock")
    argv = ("--config", str(path), "--admin", f"127.0.0.1:{admin}", "--handover", sock, "--handover-timeout", "1")
    old = await Agent(*argv).start()
    new = None
    try:
        await old.wait_log("handover: serving")
        assert await echo_once(port) == b"ping\n"
        old.signal(signal.SIGSTOP)
        new = await Agent(*argv).start()
        await new.wait_log("did not answer within 1.0s; binding normally")
        await new.wait_log("port(s) not bound")
        await new.wait_log("the admin port is held by the old agent; retrying")
        assert new.proc is not None and new.proc.returncode is None
        old.signal(signal.SIGKILL)  # what a supervisor does with a hung agent
        await old.wait(10)
        t0 = time.monotonic()
        await wait_for(lambda: ready(admin), timeout=10, what="the new agent ready after the old one is gone")
        assert await echo_once(port) == b"ping\n"
        assert time.monotonic() - t0 < 5.0, new.log
        await new.wait_log("bound on retry")
    finally:
        if old.proc is not None and old.proc.returncode is None:
            old.signal(signal.SIGCONT)
        await old.stop()
        if new is not None:
            await new.stop()


async def test_a_hung_old_parent_of_workers_shares_its_port_groups_until_it_is_gone(tmp_path, backends):
    """``--workers 2``: the old parent is SIGSTOPped (its workers still serve).  The new agent gives up the
    handover after the timeout; its SO_REUSEPORT sockets join the old workers' port groups, so both serve
    the port, while the admin API (no SO_REUSEPORT) waits for the old parent; once that one is killed its
    workers drain and exit (their control channel closed) and the new agent serves alone, ready."""
    path = tmp_path / "mesh.yaml"
    with reserved_port() as port:
        admin = free_port()
        write_atomic(path, config(port, [backends[0].port]))
        sock = str(tmp_path / "handover.sock")
        argv = ("--config", str(path), "--admin", f"127.0.0.1:{admin}", "--handover", sock,
                "--handover-timeout", "1", "--workers", "2", "--log-format", "json")  # fmt: skip
        old = await Agent(*argv).start()
        new = None
        try:
            await old.wait_log("handover: serving", timeout=30)
            old_workers = worker_pids(old)
            old.signal(signal.SIGSTOP)
            new = await Agent(*argv).start()
            await new.wait_log("did not answer within 1.0s; binding normally")
            await new.wait_log("the admin port is held by the old agent; retrying")
            await wait_for(lambda: len(worker_pids(new)) == 2, timeout=20, what="the new workers")
            new_workers = worker_pids(new)
            await wait_for(
                lambda: {p for p in new_workers if _socket_inodes(p) & {i for st, i in _tcp_sockets(port) if st == LISTEN}}
                == set(new_workers),
                timeout=20,
                what="the new workers listen beside the old ones",
            )  # fmt: skip
            for _ in range(10):
                assert await echo_once(port) == b"ping\n"
            old.signal(signal.SIGKILL)
            await old.wait(10)
            await wait_for(lambda: all(_gone(p) for p in old_workers), timeout=20, what="the old workers exit")
            await wait_for(lambda: ready(admin), timeout=10, what="the new agent ready after the old one is gone")
            for _ in range(10):
                assert await echo_once(port) == b"ping\n"
        finally:
            if old.proc is not None and old.proc.returncode is None:
                old.signal(signal.SIGCONT)
            await old.stop()
            if new is not None:
                await new.stop()


async def test_sigterm_while_a_successor_holds_the_sockets_waits_for_its_release(tmp_path, backends):
    """Swarm's start-first stops the old task as soon as the new one runs, possibly between the sockets
    being sent and the release: the old agent then waits (up to --handover-timeout) for the release, so the
    ports pass to the successor instead of closing.  The successor here is the test process itself."""
    path = tmp_path / "mesh.yaml"
    port = free_port()
    write_atomic(path, config(port, [backends[0].port]))
    sock = str(tmp_path / "handover.sock")
    old = await Agent("--config", str(path), "--admin", "off", "--handover", sock, "--handover-timeout", "20").start()
    taken = None
    try:
        await old.wait_log("handover: serving")
        taken, why = await asyncio.to_thread(request_takeover, sock, 5.0)
        assert why == "ok" and taken is not None
        await old.wait_log("serving until it has taken over")
        old.signal(signal.SIGTERM)
        await old.wait_log("a new agent is taking the sockets over; waiting up to 20.0s")
        assert old.proc is not None and old.proc.returncode is None
        (_, listener) = taken.sockets[0]
        assert await asyncio.to_thread(taken.release, 5.0)
        assert await old.wait(15) == 0, old.log
        # the port never closed: the kernel socket is the test's now, a connect waits in its queue
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            listener.setblocking(True)
            conn, _ = listener.accept()
            conn.close()
    finally:
        if taken is not None:
            for _, s in taken.sockets:
                s.close()
        await old.stop()


# -- the protocol against a misbehaving old side (in-process, real unix sockets) ------------------------


async def _fake_old(path: str, answer) -> asyncio.Task:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.setblocking(False)
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        try:
            conn, _ = await loop.sock_accept(srv)
            with conn:
                await loop.sock_recv(conn, 4096)  # the hello
                conn.setblocking(True)
                answer(conn)
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(4096)  # until the client hangs up
        finally:
            srv.close()

    return asyncio.create_task(serve())


def _fds_open() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_manifest_that_does_not_match_the_descriptors_is_refused(tmp_path):
    path = str(tmp_path / "h.sock")
    with socket.socket() as lst, socket.socket() as other:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        other.bind(("127.0.0.1", 0))  # bound, not listening
        p1, p2 = lst.getsockname()[1], other.getsockname()[1]

        def answer(conn: socket.socket) -> None:
            entries = [{"kind": "stream", "host": "127.0.0.1", "port": p1, "role": "tcp"},
                       {"kind": "stream", "host": "127.0.0.1", "port": p2, "role": "tcp"}]  # fmt: skip
            conn.sendall(json.dumps({"type": "sockets", "pid": 1, "sockets": entries}).encode() + b"\n")
            socket.send_fds(conn, [b"F"], [lst.fileno(), other.fileno()])

        before = _fds_open()
        task = await _fake_old(path, answer)
        taken, why = await asyncio.to_thread(request_takeover, path, 5.0)
        await task
        assert (taken, why) == (None, "mismatch")
        assert _fds_open() == before  # every received descriptor was closed


async def test_a_busy_or_silent_old_side_means_bind_normally(tmp_path):
    path = str(tmp_path / "busy.sock")
    task = await _fake_old(path, lambda conn: conn.sendall(b'{"type": "busy", "pid": 1}\n'))
    assert await asyncio.to_thread(request_takeover, path, 5.0) == (None, "busy")
    await task

    path2 = str(tmp_path / "silent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listening, never accepting: a stopped agent
    srv.bind(path2)
    srv.listen(1)
    try:
        t0 = time.monotonic()
        assert await asyncio.to_thread(request_takeover, path2, 0.5) == (None, "timeout")
        assert time.monotonic() - t0 < 3.0
    finally:
        srv.close()
    assert await asyncio.to_thread(request_takeover, str(tmp_path / "absent.sock"), 0.5) == (None, "absent")


def test_env_names_the_handover_path():
    from meshagent.cli import parse_args

    args = parse_args(["run"], {"MESH_HANDOVER": "/run/mesh/handover.sock", "MESH_HANDOVER_TIMEOUT": "2"})
    assert (args.handover, args.handover_timeout) == ("/run/mesh/handover.sock", 2.0)
    assert clean_env().get("MESH_HANDOVER") is None
    assert Path(__file__).name == "test_handover.py"
