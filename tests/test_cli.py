"""The ``mesh`` command end to end: a real ``python -m meshagent`` process, real echo backends on 127.0.0.1.

The agent's services listen on port 0 (any free port, chosen at bind) and the test reads the bound port from
the agent's admin API (``/v1/table``, ``runtime.listeners``), itself on port 0 (its address is logged).
``--workers N`` cannot share port 0 (each worker would bind its own), so those tests hold a fixed port
reserved for the whole test (``reserved_port``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from meshagent.cli import parse_args
from tests.dockerlab import IMAGE, docker_lab  # noqa: F401  (fixture)
from tests.util import reserved_port, wait_for

ROOT = Path(__file__).resolve().parent.parent

# The data plane (mesh/runtime.py) is written by another engineer in parallel: the end-to-end tests that
# carry traffic run as soon as it is importable.
needs_runtime = pytest.mark.skipif(
    importlib.util.find_spec("mesh.runtime") is None, reason="needs mesh/runtime.py (the data plane)"
)




def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_mesh_sync(*argv: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshagent", *argv],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        cwd=ROOT,
        timeout=timeout,
    )


# -- in-process: argument and environment parsing --------------------------------------------------------


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["run"], {}, {"config": None, "docker": None, "workers": 1, "grace": 10.0, "admin": "127.0.0.1:9901"}),
        (
            ["run"],
            {
                "MESH_CONFIG": "a.yaml",
                "MESH_WORKERS": "3",
                "MESH_GRACE": "500ms",
                "MESH_ADMIN": "off",
                "MESH_ACCESS_LOG": "yes",
                "MESH_LOG_FORMAT": "json",
                "MESH_LOG_LEVEL": "debug",
                "MESH_NODE": "n1",
                "MESH_MAX_FDS": "4096",
                "MESH_WATCH_INTERVAL": "2s",
            },
            {
                "config": "a.yaml",
                "workers": 3,
                "grace": 0.5,
                "admin": "off",
                "access_log": True,
                "log_format": "json",
                "log_level": "debug",
                "node": "n1",
                "max_fds": 4096,
                "watch_interval": 2.0,
            },
        ),
        (
            ["run", "--workers", "2", "--config", "b.yaml"],
            {"MESH_WORKERS": "3", "MESH_CONFIG": "a.yaml"},
            {"workers": 2, "config": "b.yaml"},
        ),
        (["run"], {"MESH_DOCKER": "1"}, {"docker": "", "config": None}),
        (["run"], {"MESH_DOCKER": "unix:///run/d.sock"}, {"docker": "unix:///run/d.sock"}),
        (["run"], {"MESH_DOCKER": "0"}, {"docker": None}),
        (["run", "--docker"], {"MESH_CONFIG": "a.yaml"}, {"docker": "", "config": None}),
        (["run", "--config", "b.yaml"], {"MESH_DOCKER": "1"}, {"docker": None, "config": "b.yaml"}),
        (["run"], {"MESH_ACCESS_LOG": "off"}, {"access_log": False}),
        (["check"], {"MESH_CONFIG": "c.toml"}, {"config": "c.toml"}),
    ],
)
def test_parse_args_with_environment(argv, env, expected):
    args = parse_args(argv, env)
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MESH_WORKERS": "two"}, "mesh: MESH_WORKERS: expected a whole number >= 1, got 'two'\n"),
        ({"MESH_WORKERS": "0"}, "mesh: MESH_WORKERS: expected a whole number >= 1, got '0'\n"),
        (
            {"MESH_GRACE": "soon"},
            "mesh: MESH_GRACE: expected a duration like 5, 0.5, '500ms', '5s' or '2m'; got 'soon'\n",
        ),
        ({"MESH_LOG_FORMAT": "xml"}, "mesh: MESH_LOG_FORMAT: expected one of text, json; got 'xml'\n"),
        (
            {"MESH_ACCESS_LOG": "maybe"},
            "mesh: MESH_ACCESS_LOG: expected one of 1, true, yes, on, 0, false, no, off; got 'maybe'\n",
        ),
    ],
)
def test_bad_environment_exits_2(env, message):
    res = run_mesh_sync("run", env=clean_env(**env))
    assert (res.returncode, res.stderr, res.stdout) == (2, message, "")


def test_version():
    res = run_mesh_sync("--version")
    from mesh import __version__

    assert (res.returncode, res.stdout) == (0, f"mesh {__version__}\n")


def test_usage_error_exits_2():
    res = run_mesh_sync("run", "--workers", "zero")
    assert res.returncode == 2
    assert "argument --workers: expected a whole number >= 1, got 'zero'" in res.stderr


def test_check_good_and_bad(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  web:\n    listen: 8080\n    endpoints: ['127.0.0.1:9001']\n")
    res = run_mesh_sync("check", "--config", str(good))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "web  0.0.0.0:8080  round-robin  -> 127.0.0.1:9001"
    assert res.stdout.splitlines()[1].startswith(f"{good}: OK, 1 services, 1 listeners, digest ")

    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  web:\n    listen: 8080\n    endpoints: ['127.0.0.1:9001']\n    balance: rr\n")
    res = run_mesh_sync("check", env=clean_env(MESH_CONFIG=str(bad)))
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (
        f"mesh: {bad}:5: services.web.balance: expected one of round-robin, least-conn, p2c, hash; got 'rr'\n"
    )


def test_bad_file_at_start_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[services.web]\nlisten = 8080\nendpoints = ["127.0.0.1:9001"]\nretries = "many"\n')
    res = run_mesh_sync("run", "--config", str(bad), "--admin", "off")
    assert res.returncode == 2
    assert res.stderr.endswith(f"mesh: {bad}:4: services.web.retries: expected a whole number 0..100, got 'many'\n")


@pytest.mark.uvloop_only
async def test_listen_port_0_with_several_workers_exits_2(tmp_path):
    """With --workers 2 every worker binds the listen address itself (SO_REUSEPORT): port 0 would give each
    a port of its own, so it is refused before anything starts, naming the file, line and service."""
    path = tmp_path / "mesh.yaml"
    write_atomic(path, "services:\n  web:\n    listen: '127.0.0.1:0'\n    endpoints: ['127.0.0.1:9']\n")
    agent = await Agent("--config", str(path), "--admin", "off", "--workers", "2").start()
    try:
        # exits at once, or (the bug) the workers bind and apply the table
        await wait_for(
            lambda: agent.proc.returncode is not None or agent.logged("applied table version 1"),
            timeout=20,
            what="the agent to exit or apply the table",
        )
        assert not agent.logged("applied table version 1"), agent.log
        assert await agent.wait(10) == 2, agent.log
        assert agent.lines[-1] == (
            f"mesh: {path}:3: services.web.listen: service 'web' listens on port 0 (any free port), which "
            "--workers 2 cannot share: each worker process would bind a port of its own; give the service a "
            "fixed port"
        )
    finally:
        await agent.stop()


def test_no_config_and_no_docker_exits_2(tmp_path):
    res = run_mesh_sync("run", "--admin", "off", env=clean_env(DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock"))
    assert res.returncode == 2
    assert res.stderr == (
        f"mesh: no --config given and no Docker engine answers at unix://{tmp_path}/no-docker.sock; "
        "pass --config FILE or start Docker (or point --docker / DOCKER_HOST at one)\n"
    )


# -- the config source (in process) -----------------------------------------------------------------------


async def test_config_source_versions_and_bad_reload(tmp_path):
    from meshagent.reload import ConfigSource

    path = tmp_path / "mesh.yaml"
    write_atomic(path, config_text({"a": (8080, [9001])}))
    published = []

    async def publish(table):
        published.append(table)

    src = ConfigSource(path, publish, interval=3600)
    first = src.load_initial()
    await src.start()
    assert [t.version for t in published] == [1]
    assert published[0] is first

    # unchanged content: nothing published, version stays
    assert await src.reload() is False
    # a bad file keeps the last good table and remembers the error
    write_atomic(path, "services:\n  a: {listen: 8080, endpoints: [], retries: -1}\n")
    assert await src.reload() is False
    assert str(src.last_error) == f"{path}:2: services.a.retries: expected a whole number 0..100, got -1"
    assert src.table is first
    # each applied change grows the version by one
    write_atomic(path, config_text({"a": (8080, [9001, 9002])}))
    assert await src.reload() is True
    write_atomic(path, config_text({"b": (8081, [9001])}))
    assert await src.reload() is True
    assert [t.version for t in published] == [1, 2, 3]
    assert [s.name for s in published[-1].services] == ["b"]
    assert src.last_error is None
    # a valid file without services (one caught mid-write) does not take every listener down
    write_atomic(path, "services: {}\n")
    assert await src.reload() is False
    assert src.table is published[-1] and "no services in the file" in str(src.last_error)


async def test_config_reload_parses_off_the_loop(tmp_path, monkeypatch):
    """A reload parses in a thread (5,000 endpoints take ~1 s): the loop keeps running meanwhile."""
    import threading

    import meshagent.reload as reload_mod
    from meshagent.reload import ConfigSource

    path = tmp_path / "mesh.yaml"
    write_atomic(path, config_text({"a": (8080, [9001])}))
    real = reload_mod.load_config
    seen = []

    def slow_load(*args, **kw):
        seen.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.3)
        return real(*args, **kw)

    async def publish(table):
        pass

    src = ConfigSource(path, publish, interval=3600)
    src.load_initial()
    await src.start()
    monkeypatch.setattr(reload_mod, "load_config", slow_load)
    write_atomic(path, config_text({"a": (8080, [9002])}))
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    assert await src.reload() is True
    ticker.cancel()
    assert seen == [False] and ticks >= 10  # parsed in a worker thread while the loop kept ticking


async def test_config_source_watches_file_and_poke(tmp_path):
    from meshagent.reload import ConfigSource

    path = tmp_path / "mesh.yaml"
    write_atomic(path, config_text({"a": (8080, [9001])}))
    published = []

    async def publish(table):
        published.append(table)

    src = ConfigSource(path, publish, interval=0.02)
    src.load_initial()
    await src.start()
    task = asyncio.create_task(src.run())
    try:
        write_atomic(path, config_text({"a": (8080, [9002])}))
        await wait_for(lambda: len(published) == 2, what="reload after file change")
        assert published[1].version == 2
        reloads = src.reloads
        src.poke()
        await wait_for(lambda: src.reloads == reloads + 1, what="reload after poke")
        assert len(published) == 2  # poke with unchanged content publishes nothing
    finally:
        src.stop()
        await asyncio.wait_for(task, 5)


def test_json_logs_have_one_object_per_line():
    import io
    import logging

    from mesh.logs import setup_logging

    buf = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    handler = setup_logging("info", "json", stream=buf)
    try:
        logging.getLogger("mesh.test").info("listening on %s", "0.0.0.0:80", extra={"service": "web"})
        logging.getLogger("mesh.test").debug("not shown")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert {k: rec[k] for k in ("level", "logger", "msg", "service")} == {
        "level": "info",
        "logger": "mesh.test",
        "msg": "listening on 0.0.0.0:80",
        "service": "web",
    }
    assert rec["ts"].endswith("Z") and len(rec["ts"]) == len("2026-01-01T00:00:00.000Z")


def test_text_logs_append_extra_fields():
    import io
    import logging

    from mesh.logs import setup_logging

    buf = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    handler = setup_logging("warning", "text", stream=buf)
    try:
        logging.getLogger("mesh.test").warning("port %d in use", 80, extra={"service": "web"})
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    line = buf.getvalue().rstrip("\n")
    assert line.endswith(" WARNING mesh.test: port 80 in use service=web")
    with pytest.raises(ValueError, match="log format must be one of text, json; got 'xml'"):
        setup_logging("info", "xml")


# -- a real agent process --------------------------------------------------------------------------------


class EchoBackend:
    """Echoes every byte; ``name`` identifies it in tests that care."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> EchoBackend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            # close_clients (3.13) is not in 3.11: the handlers end when the mesh closes its side


class Agent:
    """``python -m meshagent run ...`` with its stderr collected line by line."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = env or clean_env()
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Agent:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshagent",
            "run",
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    async def wait_log(self, text: str, timeout: float = 10.0) -> None:
        try:
            await wait_for(lambda: self.logged(text), timeout=timeout, what=f"log line containing {text!r}")
        except AssertionError:
            raise AssertionError(f"no log line containing {text!r}; log so far:\n{self.log}") from None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            # stderr ends when every holder is gone: with --workers, the workers too
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            except TimeoutError:
                raise AssertionError(f"stderr still open {timeout}s after exit; log:\n{self.log}") from None
        return rc

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader

    async def admin(self) -> str:
        """The admin API's base URL, from the log line of an agent started with ``--admin 127.0.0.1:0``."""
        marker = "admin API listening on http://"
        await self.wait_log(marker, timeout=20)
        line = next(ln for ln in self.lines if marker in ln)
        return "http://" + line.split(marker, 1)[1].split("/", 1)[0]

    async def listeners(self) -> list[dict]:
        """``runtime.listeners`` of /v1/table: service, protocol, listen_host, port, bound_port, listening."""
        async with aiohttp.ClientSession() as s, s.get(await self.admin() + "/v1/table") as r:
            if r.status != 200:
                return []
            return (await r.json())["runtime"]["listeners"]

    async def bound_port(self, service: str, timeout: float = 10.0) -> int:
        """The port ``service``'s listener is bound to, once it is (also the test that it is bound)."""
        found: list[int] = []

        async def bound() -> bool:
            assert self.proc is not None and self.proc.returncode is None, self.log
            found[:] = [x["bound_port"] for x in await self.listeners() if x["service"] == service and x["bound_port"]]
            return bool(found)

        try:
            await wait_for(bound, timeout=timeout, what=f"{service}'s listener bound")
        except AssertionError:
            raise AssertionError(f"{service} is not listening; log:\n{self.log}") from None
        (port,) = found
        return port


async def try_connect(port: int) -> bool:
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return True


async def echo_once(port: int, payload: bytes = b"ping\n") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(payload)
        await w.drain()
        return await asyncio.wait_for(r.readexactly(len(payload)), 5)
    finally:
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()


class Conn:
    """A client connection through the mesh kept open across reloads and signals."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def echo(self, payload: bytes) -> bytes:
        self.writer.write(payload)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(payload)), 5)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def config_text(services: dict[str, tuple[int, list[int]]]) -> str:
    out = ["services:"]
    for name, (port, backends) in services.items():
        eps = ", ".join(f"'127.0.0.1:{b}'" for b in backends)
        out += [f"  {name}:", f"    listen: '127.0.0.1:{port}'", f"    endpoints: [{eps}]", "    connect_timeout: 1s"]
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def start_agent(
    path: Path, services: dict[str, tuple[int, list[int]]], *extra: str
) -> tuple[Agent, dict[str, int]]:
    """Write a config for ``services`` and start an agent (admin API on port 0); return it and the port
    each service's listener is bound to, read from the admin API once bound."""
    write_atomic(path, config_text(services))
    agent = await Agent("--config", str(path), "--admin", "127.0.0.1:0", *extra).start()
    try:
        ports = {name: await agent.bound_port(name) for name in services}
    except BaseException:
        await agent.stop()
        raise
    for name, (configured, _) in services.items():
        assert configured in (0, ports[name])
    return agent, ports


@pytest.fixture
async def backends():
    bs = [await EchoBackend(f"b{i}").start() for i in range(2)]
    yield bs
    for b in bs:
        await b.close()


@needs_runtime
@pytest.mark.uvloop_only
async def test_traffic_and_reload_on_file_change(tmp_path, backends):
    path = tmp_path / "mesh.yaml"
    b0, b1 = backends
    agent, ports = await start_agent(path, {"a": (0, [b0.port, b1.port])}, "--watch-interval", "0.05")
    try:
        assert await echo_once(ports["a"], b"hello\n") == b"hello\n"
        kept = await Conn.open(ports["a"])
        assert await kept.echo(b"before\n") == b"before\n"

        # Replace service a (port A) by service b (port B): B starts listening, A stops accepting, and the
        # connection opened through A before the reload stays open and keeps echoing.
        write_atomic(path, config_text({"b": (0, [b1.port])}))
        await agent.wait_log("applied table version 2")
        new_port = await agent.bound_port("b", timeout=5)
        assert await echo_once(new_port, b"new\n") == b"new\n"
        assert [x["service"] for x in await agent.listeners()] == ["b"]
        # A's listener closes before B's binds, so the kernel may (rarely) hand B the port A just freed
        if new_port != ports["a"]:
            await wait_for(lambda: _refused(ports["a"]), timeout=5, what="removed listener closed")
        assert await kept.echo(b"after\n") == b"after\n"
        await kept.close()

        # Same content again (a rewrite with a new mtime): nothing is applied, the version stays 2.
        write_atomic(path, config_text({"b": (0, [b1.port])}))
        await agent.wait_log("config reload (file changed): no change")
        assert not agent.logged("applied table version 3")

        agent.signal(signal.SIGTERM)
        assert await agent.wait(15) == 0
    finally:
        await agent.stop()


async def _refused(port: int) -> bool:
    return not await try_connect(port)


@needs_runtime
@pytest.mark.uvloop_only
async def test_sighup_reload_and_bad_file_keeps_serving(tmp_path, backends):
    path = tmp_path / "mesh.yaml"
    b0, _ = backends
    # A long watch interval: only SIGHUP can trigger these reloads.
    agent, ports = await start_agent(path, {"a": (0, [b0.port])}, "--watch-interval", "1h")
    try:
        bad = config_text({"a": (0, [b0.port])}) + "    balance: fastest\n"
        write_atomic(path, bad)
        agent.signal(signal.SIGHUP)
        await agent.wait_log(
            f"config reload (SIGHUP) failed, keeping table version 1: {path}:6: services.a.balance: "
            "expected one of round-robin, least-conn, p2c, hash; got 'fastest'"
        )
        assert await echo_once(ports["a"]) == b"ping\n"

        write_atomic(path, config_text({"a": (0, [b0.port]), "c": (0, [b0.port])}))
        agent.signal(signal.SIGHUP)
        await agent.wait_log("config reload (SIGHUP): applied table version 2 (2 services)")
        p2 = await agent.bound_port("c", timeout=5)  # the listener added by SIGHUP
        assert await echo_once(p2) == b"ping\n"
        assert await agent.bound_port("a") == ports["a"]  # a's listener was kept
        assert await echo_once(ports["a"]) == b"ping\n"
        agent.signal(signal.SIGTERM)
        assert await agent.wait(15) == 0
    finally:
        await agent.stop()


@needs_runtime
@pytest.mark.uvloop_only
async def test_sigterm_drains_open_connection_then_exits_0(tmp_path, backends):
    path = tmp_path / "mesh.yaml"
    b0, _ = backends
    agent, ports = await start_agent(path, {"a": (0, [b0.port])}, "--grace", "30", "--access-log")
    try:
        conn = await Conn.open(ports["a"])
        client = f"127.0.0.1:{conn.writer.get_extra_info('sockname')[1]}"
        assert await conn.echo(b"one\n") == b"one\n"
        t0 = time.monotonic()
        agent.signal(signal.SIGTERM)
        await agent.wait_log("SIGTERM: stop accepting, draining open connections for up to 30.0s")
        await wait_for(lambda: _refused(ports["a"]), timeout=5, what="listener closed after SIGTERM")
        assert await conn.echo(b"still here\n") == b"still here\n"
        assert agent.proc.returncode is None
        await conn.close()
        assert await agent.wait(15) == 0
        assert time.monotonic() - t0 < 15  # it did not wait for the 30 s grace once the connection ended
        # --access-log: one line for the connection, written when it closed
        access = [ln for ln in agent.lines if "mesh.access: connection closed" in ln and f"client={client}" in ln]
        assert len(access) == 1, agent.log
        assert f"service=a port={ports['a']} " in access[0]
        assert "received_bytes=15 sent_bytes=15 " in access[0]
    finally:
        await agent.stop()


@needs_runtime
@pytest.mark.uvloop_only
async def test_sigterm_cuts_connections_after_grace(tmp_path, backends):
    path = tmp_path / "mesh.yaml"
    b0, _ = backends
    agent, ports = await start_agent(path, {"a": (0, [b0.port])}, "--grace", "0.5")
    try:
        conn = await Conn.open(ports["a"])
        assert await conn.echo(b"one\n") == b"one\n"
        t0 = time.monotonic()
        agent.signal(signal.SIGINT)
        assert await agent.wait(10) == 0
        elapsed = time.monotonic() - t0
        assert 0.5 <= elapsed < 8, elapsed
        # the mesh closed its side: the client sees EOF (or a reset)
        try:
            data = await asyncio.wait_for(conn.reader.read(100), 5)
        except ConnectionError:
            data = b""
        assert data == b""
        await conn.close()
    finally:
        await agent.stop()


@needs_runtime
@pytest.mark.uvloop_only
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_sigterm_exits_at_once(tmp_path, backends, workers):
    """Draining with a long grace, a second SIGTERM means "now" (the reliability issue): exit 128+15 at
    once, the open connection cut, and with --workers no worker left behind."""
    path = tmp_path / "mesh.yaml"
    b0, _ = backends
    with reserved_port() as fixed:
        if workers == 1:
            agent, ports = await start_agent(path, {"a": (0, [b0.port])}, "--grace", "60")
            port = ports["a"]
        else:
            port = fixed
            write_atomic(
                path, f"services:\n  a:\n    listen: '127.0.0.1:{port}'\n    endpoints: ['127.0.0.1:{b0.port}']\n"
            )
            agent = await Agent("--config", str(path), "--admin", "off", "--grace", "60", "--workers", "2").start()
        try:
            await wait_for(lambda: try_connect(port), timeout=10, what="listening")
            conn = await Conn.open(port)
            assert await conn.echo(b"one\n") == b"one\n"
            children = _children(agent.proc.pid)
            assert len(children) == (2 if workers == 2 else 0)
            agent.signal(signal.SIGTERM)
            await agent.wait_log("SIGTERM: stop accepting")
            t0 = time.monotonic()
            agent.signal(signal.SIGTERM)
            assert await agent.wait(5) == 128 + signal.SIGTERM
            assert time.monotonic() - t0 < 3
            assert "SIGTERM again: exiting now" in agent.log
            try:
                data = await asyncio.wait_for(conn.reader.read(100), 5)
            except ConnectionError:
                data = b""
            assert data == b""
            await conn.close()
            await wait_for(lambda: not any(_alive(pid) for pid in children), timeout=5, what="workers gone")
        finally:
            await agent.stop()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                out.add(int(target[8:-1]))
    return out


def _tcp_sockets(port: int) -> list[tuple[str, int]]:
    """(state, inode) of every IPv4 TCP socket whose local port is ``port``."""
    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            if local_port == port:
                out.append((parts[3], int(parts[9])))
    return out


LISTEN, ESTABLISHED = "0A", "01"


def _pids_with(port: int, state: str, pids: list[int]) -> set[int]:
    inodes = {ino for st, ino in _tcp_sockets(port) if st == state}
    return {pid for pid in pids if _socket_inodes(pid) & inodes}


@needs_runtime
@pytest.mark.uvloop_only
async def test_workers_share_listeners_and_restart(tmp_path, backends):
    path = tmp_path / "mesh.yaml"
    b0, b1 = backends
    held = contextlib.ExitStack()
    fixed, fixed2 = held.enter_context(reserved_port()), held.enter_context(reserved_port())
    try:
        agent, ports = await start_agent(
            path, {"a": (fixed, [b0.port, b1.port])}, "--workers", "2", "--log-format", "json"
        )
    except BaseException:
        held.close()
        raise
    port = ports["a"]
    try:

        def worker_pids() -> dict[int, int]:
            pids = {}
            for line in agent.lines:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("msg", "").startswith("worker ") and "running, pid" in rec["msg"]:
                        pids[rec["worker"]] = rec["pid"]
            return pids

        await wait_for(lambda: len(worker_pids()) == 2, timeout=10, what="two workers")
        pids = worker_pids()
        await wait_for(lambda: _pids_with(port, LISTEN, list(pids.values())) == set(pids.values()), timeout=10)

        # Both workers accept: hold many connections open and look at which process owns each one.
        conns = [await Conn.open(port) for _ in range(32)]
        for i, c in enumerate(conns):
            assert await c.echo(b"%d\n" % i) == b"%d\n" % i
        assert _pids_with(port, ESTABLISHED, list(pids.values())) == set(pids.values())
        for c in conns:
            await c.close()

        # A killed worker is restarted, gets the current table and listens again.
        os.kill(pids[0], signal.SIGKILL)
        await agent.wait_log(f"worker 0 (pid {pids[0]}) exited with signal 9; restarting")
        await wait_for(lambda: worker_pids()[0] != pids[0], timeout=10, what="worker 0 restarted")
        new_pid = worker_pids()[0]
        await wait_for(
            lambda: new_pid in _pids_with(port, LISTEN, [new_pid]), timeout=10, what="restarted worker listens"
        )
        for _ in range(8):
            assert await echo_once(port) == b"ping\n"

        # A reload reaches every worker.
        p2 = fixed2
        write_atomic(path, config_text({"a": (port, [b0.port, b1.port]), "c": (p2, [b0.port])}))
        await agent.wait_log("applied table version 2")
        await wait_for(lambda: _pids_with(p2, LISTEN, [pids[1], new_pid]) == {pids[1], new_pid}, timeout=10)

        assert await agent.bound_port("c") == p2  # every worker bound the configured port

        agent.signal(signal.SIGTERM)
        assert await agent.wait(20) == 0
        for pid in (pids[1], new_pid):
            assert _gone(pid)
    finally:
        await agent.stop()
        held.close()


def _gone(pid: int) -> bool:
    """The process has exited (no longer in /proc, or a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def http_get(port: int, path: str = "/") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        await w.drain()
        return await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()


@needs_runtime
@pytest.mark.docker
@pytest.mark.uvloop_only
async def test_docker_engine_is_used_without_config(docker_lab):  # noqa: F811 (pytest fixture)
    """No --config and no --docker: the engine named by DOCKER_HOST answers, so the agent follows it."""
    node = await asyncio.to_thread(docker_lab.node, 1)
    cid = await asyncio.to_thread(
        node.docker,
        "run",
        "-d",
        "--label",
        "mesh.publish=127.0.0.1:0:8080",  # any free port: the test reads it from the admin API
        "--label",
        "mesh.service=cliweb",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    )
    agent = await Agent("--admin", "127.0.0.1:0", env=clean_env(DOCKER_HOST=node.host)).start()
    try:
        await agent.wait_log(f"following the Docker engine at {node.host}")
        port = await agent.bound_port("cliweb", timeout=20)  # the listener from Docker labels
        reply = b""

        async def served() -> bool:
            nonlocal reply
            reply = await http_get(port)
            return reply.startswith(b"HTTP/1.") and b"hello from meshtest/busybox" in reply

        await wait_for(served, timeout=20, what="HTTP through the mesh to the container")
        agent.signal(signal.SIGTERM)
        assert await agent.wait(20) == 0
    finally:
        await agent.stop()
        await asyncio.to_thread(node.docker, "rm", "-f", cid, check=False)


def test_demo_dispatch():
    res = run_mesh_sync("demo", "--help")
    try:
        import meshagent.demo  # noqa: F401
    except ImportError:
        assert res.returncode == 1
        assert res.stderr.startswith("mesh demo is not available in this installation")
    else:
        assert res.returncode == 0, res.stderr


@needs_runtime
@pytest.mark.uvloop_only
async def test_admin_address_in_use_exits_2(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    path = tmp_path / "mesh.yaml"
    write_atomic(path, config_text({"a": (0, [9])}))
    try:
        agent = await Agent("--config", str(path), "--admin", f"127.0.0.1:{port}").start()
        assert await agent.wait(20) == 2
        assert agent.lines[-1] == (
            f"mesh: admin address 127.0.0.1:{port} is in use (another mesh agent?); choose another with --admin ADDR"
        )
    finally:
        taken.close()


async def test_worker_pool_gives_up_on_a_crash_loop():
    from meshagent.workers import WorkerPool

    # /bin/false stands in for the interpreter: every "worker" exits with code 1 at once.
    pool = WorkerPool(1, max_restarts=2, restart_window=60, backoff_initial=0.01, python="/bin/false")
    await pool.start()
    try:
        await asyncio.wait_for(pool.failed.wait(), 10)
        assert pool.workers[0].starts == 3  # the first start and two restarts
        assert not pool.ready()
    finally:
        await pool.shutdown(1.0)


@needs_runtime
@pytest.mark.uvloop_only
async def test_worker_pool_tables_and_stats(tmp_path, backends):
    from mesh.config import parse_config
    from meshagent.workers import WorkerPool

    held = contextlib.ExitStack()
    port = held.enter_context(reserved_port())  # two workers: the route's own port, not port 0
    table = parse_config(config_text({"a": (port, [backends[0].port])}), version=4, workers=2)
    pool = WorkerPool(2, ["--grace", "1", "--log-level", "warning"])
    await pool.start()
    try:
        await pool.publish(table)
        await wait_for(pool.ready, timeout=20, what="both workers applied the table")
        assert await echo_once(port) == b"ping\n"
        snaps = await pool.stats()
        assert len(snaps) == 2
        assert {s.get("pid") for s in snaps} == set(pool.pids())
        assert [r["bound_port"] for s in snaps for r in s["routes"]] == [port, port]
    finally:
        await pool.shutdown(5.0)
        held.close()
    assert all(w.proc.returncode == 0 for w in pool.workers)


@needs_runtime
@pytest.mark.uvloop_only
async def test_a_stopped_worker_is_killed_and_replaced_so_new_connections_do_not_stall(tmp_path, backends, caplog):
    """The reliability issue, item 4: a SIGSTOPped worker kept its share of new connections (43% of probes
    timed out) and /readyz stayed 200.  The parent notices the silence, is not ready meanwhile, kills it
    (its listening sockets close, the kernel stops sending it connections) and starts a new one."""
    from mesh.config import parse_config
    from meshagent.workers import WorkerPool

    held = contextlib.ExitStack()
    port = held.enter_context(reserved_port())
    table = parse_config(config_text({"a": (port, [backends[0].port])}), version=1, workers=2)
    pool = WorkerPool(2, ["--grace", "1", "--log-level", "warning"], heartbeat=0.2, hang_timeout=1.0)
    await pool.start()
    try:
        await pool.publish(table)
        await wait_for(pool.ready, timeout=20, what="both workers applied the table")
        victim = pool.workers[0]
        old_pid = victim.pid
        os.kill(old_pid, signal.SIGSTOP)
        await wait_for(lambda: not pool.ready(), timeout=3, what="not ready while a worker is silent")
        with caplog.at_level(logging.ERROR, logger="meshagent.workers"):
            await wait_for(lambda: victim.pid != old_pid, timeout=10, what="the silent worker replaced")
        assert victim.hangs == 1 and any("silent for" in r.getMessage() for r in caplog.records)
        await wait_for(pool.ready, timeout=20, what="the new worker applied the table")
        for _ in range(40):  # every new connection is served (none hashed to a stopped worker)
            assert await asyncio.wait_for(echo_once(port), 2) == b"ping\n"
    finally:
        await pool.shutdown(5.0)
        held.close()


@needs_runtime
@pytest.mark.uvloop_only
async def test_workers_exit_when_the_parent_dies(tmp_path, backends):
    path = tmp_path / "mesh.yaml"
    held = contextlib.ExitStack()
    fixed = held.enter_context(reserved_port())
    try:
        agent, _ = await start_agent(path, {"a": (fixed, [backends[0].port])}, "--workers", "2", "--grace", "1")
    except BaseException:
        held.close()
        raise
    try:
        await wait_for(lambda: sum("running, pid" in ln for ln in agent.lines) == 2, timeout=10, what="workers")
        pids = [int(ln.rsplit("pid ", 1)[1].split()[0]) for ln in agent.lines if "running, pid" in ln]
        agent.proc.kill()  # no chance to forward anything: the workers see their control channel close
        await agent.wait(10)
        await wait_for(lambda: all(_gone(p) for p in pids), timeout=10, what="orphaned workers exit")
        assert sum("control channel closed (parent gone); draining" in ln for ln in agent.lines) == 2, agent.log
    finally:
        await agent.stop()
        held.close()


@pytest.mark.parametrize("access_log, shown", [(True, 1), (False, 0)])
def test_access_log_switch(access_log, shown):
    import io
    import logging

    from mesh.logs import setup_logging

    buf = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    handler = setup_logging("warning", "text", stream=buf, access_log=access_log)
    try:
        logging.getLogger("mesh.access").info("connection closed", extra={"service": "web"})
        logging.getLogger("mesh.proxy").info("not shown at warning level")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.getLogger("mesh.access").setLevel(logging.NOTSET)
    assert len(buf.getvalue().splitlines()) == shown
