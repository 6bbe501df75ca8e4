"""The cluster agent: ``mesh run --cluster`` (the one CLI) exits 2 with a message naming a bad setting, and
the node's one admin server serves /v1/cluster/status beside the data plane's API."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from cluster.control import ControlServer
from cluster.state import ClusterState, NodeInfo
from mesh.errors import ConfigError
from mesh.proxy.preamble import TunnelAuth, tunnel_header
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from meshagent.cli import UsageError, _status_as_admin
from meshagent.cluster import STATUS_PATH, ClusterAgent, ClusterSettings, agent_admin
from tests.fakeengine import FakeContainer, running_fake_engine
from tests.test_cli import EchoBackend
from tests.test_handover import free_port
from tests.util import wait_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef0123456789abcdef"

fake = pytest.fixture(running_fake_engine)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshagent", "run", "--cluster", "--admin", "off", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o600)
    return p


def test_missing_token_file_exits_2_naming_it(tmp_path: Path) -> None:
    res = _run("--token-file", str(tmp_path / "nope"))
    assert res.returncode == 2
    assert f"{tmp_path / 'nope'}: cluster token file does not exist" in res.stderr


def test_world_writable_token_file_is_refused(token_file: Path) -> None:
    token_file.chmod(0o666)
    res = _run("--token-file", str(token_file))
    assert res.returncode == 2
    assert "group- or world-writable" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tunnel-port", "0"), "--tunnel-port must be 1-65535, got 0"),
        (("--control-port", "70000"), "--control-port must be 1-65535, got 70000"),
        (("--status", "nohost"), "--status: expected 'host:port', got 'nohost'"),
        (("--control-wait", "0"), "--control-wait must be > 0, got 0.0"),
    ],
)
def test_bad_settings_exit_2(token_file: Path, args: tuple[str, ...], message: str) -> None:
    res = _run("--token-file", str(token_file), *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr


def test_an_engine_that_is_not_a_swarm_node_is_a_clear_error(token_file: Path, tmp_path: Path) -> None:
    # an engine that answers /info but is not in a swarm: a tiny fake over a unix socket
    sock = tmp_path / "docker.sock"
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_ENGINE, str(sock)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert fake.stdout.readline().strip() == "ready"
        res = _run("--token-file", str(token_file), "--docker", f"unix://{sock}")
        assert res.returncode == 2, res.stderr
        assert "is not part of an active swarm" in res.stderr
    finally:
        fake.kill()
        fake.wait(10)
        fake.stdout.close()


def test_the_cluster_module_has_no_command_line_of_its_own() -> None:
    import meshagent.cluster

    assert not hasattr(meshagent.cluster, "main") and not hasattr(meshagent.cluster, "build_parser")
    res = subprocess.run(
        [sys.executable, "-m", "meshagent", "run", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert res.returncode == 0
    # every option the agent's own parser had is an option of mesh run
    for flag in ("--cluster", "--docker", "--token-file", "--control-port", "--tunnel-port", "--advertise", "--bind",
                 "--status", "--control-wait", "--grace", "--log-level"):  # fmt: skip
        assert flag in res.stdout, flag


def test_settings_check_names_the_flag() -> None:
    ClusterSettings(token_file="t").check()
    with pytest.raises(ConfigError, match="--tunnel-port must be 1-65535, got 65536"):
        ClusterSettings(token_file="t", tunnel_port=65536).check()
    with pytest.raises(ConfigError, match="--grace must be >= 0, got -1"):
        ClusterSettings(token_file="t", grace=-1).check()


STATUS_CASES = [
    # (name, --status, --admin, parsed --admin, admin address or error)
    ("the default --admin moves to --status", "127.0.0.1:9911", "127.0.0.1:9901", ("127.0.0.1", 9901),
     ("127.0.0.1", 9911)),
    ("--admin off: --status still serves the admin API", "127.0.0.1:9911", "off", None, ("127.0.0.1", 9911)),
    ("the same address twice is fine", "10.0.0.5:9911", "10.0.0.5:9911", ("10.0.0.5", 9911), ("10.0.0.5", 9911)),
    ("two addresses conflict", "127.0.0.1:9911", "127.0.0.1:9000", ("127.0.0.1", 9000),
     "--status 127.0.0.1:9911 and --admin 127.0.0.1:9000: the admin API serves /v1/cluster/status now"),
    ("a bad --status", "9911", "127.0.0.1:9901", ("127.0.0.1", 9901), "--status: expected 'host:port', got '9911'"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "admin", "admin_addr", "expected"), [c[1:] for c in STATUS_CASES],
                         ids=[c[0] for c in STATUS_CASES])  # fmt: skip
def test_status_flag_names_the_admin_address(status, admin, admin_addr, expected) -> None:
    if isinstance(expected, str):
        with pytest.raises(UsageError) as ei:
            _status_as_admin(status, admin, admin_addr)
        assert expected in str(ei.value)
    else:
        assert _status_as_admin(status, admin, admin_addr) == expected


async def _get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


@pytest.mark.uvloop_only
async def test_the_admin_server_serves_cluster_status(fake) -> None:
    # a swarm worker whose manager is not reachable: the agent follows its local tasks and serves its status
    fake.swarm = {"LocalNodeState": "active", "NodeID": "nodew1", "ControlAvailable": False, "NodeAddr": "127.0.0.1"}
    fake.add(FakeContainer(id="a" * 64, name="web.1.t1", labels={"com.docker.swarm.task.id": "t1"}, ip="172.17.0.5"))
    agent = ClusterAgent(f"unix://{fake.sock}", TOKEN, tunnel_port=0, bind="127.0.0.1", control_wait=1.0)
    await agent.start(info_timeout=5)
    admin = agent_admin(agent, "127.0.0.1", 0)
    try:
        await admin.start()
        base = "http://{}:{}".format(*admin.address)
        await wait_for(lambda: agent.local.ready.is_set(), what="local tasks listed")
        status, doc = await _get(base + STATUS_PATH)
        assert status == 200
        assert (doc["node"], doc["role"], doc["advertise"]) == ("nodew1", "worker", "127.0.0.1")
        assert doc["local_tasks"] == {"t1": "172.17.0.5"} and doc["state"] is None and doc["table"] is None
        assert set(doc["tunnel"]) >= {"accepted", "forwarded", "refused"}
        assert doc["control_client"]["manager"] is None
        # one server: the data plane's own endpoints answer on the same address
        status, index = await _get(base + "/")
        assert status == 200 and STATUS_PATH in index["endpoints"] and "/v1/table" in index["endpoints"]
        status, table = await _get(base + "/v1/table")
        assert (status, table) == (503, {"error": "no routing table applied yet"})  # no cluster state yet
    finally:
        await admin.stop()
        await agent.stop(0.1)


async def _tunnel(port: int, target: str, payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(tunnel_header(("192.0.2.7", 40000), ("127.0.0.1", 80), target, TunnelAuth(TOKEN)) + payload)
    return r, w


@pytest.mark.uvloop_only
async def test_a_tunnel_target_this_agent_learns_a_moment_later_is_waited_for(fake) -> None:
    """The lab's rolling update: another agent applied a cluster state placing a new task on this node ~20 ms
    before this agent got it.  A sealed header naming that task waits (bounded) for this agent's state and is
    then forwarded instead of refused as unknown_target; a target that never turns up is refused after the
    wait; every wait is counted in /v1/cluster/status."""
    backend = await EchoBackend("t1").start()
    control = ControlServer(TOKEN, "127.0.0.1", 0)
    await control.start()
    fake.swarm = {"LocalNodeState": "active", "NodeID": "n1", "ControlAvailable": False, "NodeAddr": "127.0.0.1",
                  "RemoteManagers": [{"NodeID": "m1", "Addr": "127.0.0.1:2377"}]}  # fmt: skip
    fake.add(FakeContainer(id="a" * 64, name="web.1.t1", labels={"com.docker.swarm.task.id": "t1"}, ip="127.0.0.1"))
    nodes = (NodeInfo("n1", "127.0.0.1", tunnel=7481),)
    control.publish(ClusterState(table=RoutingTable(version=1, services=()), nodes=nodes))
    agent = ClusterAgent(f"unix://{fake.sock}", TOKEN, tunnel_port=0, control_port=control.port, bind="127.0.0.1")
    agent.late_target_wait = 2.0
    await agent.start(info_timeout=5)
    writers = []
    try:
        await asyncio.wait_for(agent.wait_applied(), 10)
        port = agent.tunnel.port
        r, w = await _tunnel(port, f"t1:{backend.port}", b"ping")
        writers.append(w)
        await wait_for(lambda: agent.late_targets["waited"] == 1, what="the header waiting")
        route = Route(port=free_port(), endpoints=(Endpoint("t1", "10.0.0.9", backend.port, node="n1"),))
        table = RoutingTable(version=2, services=(Service(name="web", routes=(route,), options=ServiceOptions()),))
        control.publish(ClusterState(table=table, nodes=nodes))
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        assert agent.late_targets == {"waited": 1, "found": 1, "refused": 0}
        # a target that never turns up here: refused (reset, no byte back) once the wait is over
        agent.late_target_wait = 0.2
        r, w = await _tunnel(port, "t9:80", b"ping")
        writers.append(w)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        assert agent.late_targets == {"waited": 2, "found": 1, "refused": 1}
        assert agent.status()["tunnel"]["late_targets"] == agent.late_targets
        assert agent.tunnel.stats.refused == {"unknown_target": 1}
    finally:
        for w in writers:
            w.close()
        await agent.stop(0.1)
        await control.stop()
        await backend.close()


@pytest.mark.uvloop_only
async def test_a_tunnel_port_held_by_another_process_is_retried_and_the_agent_is_not_ready_meanwhile(fake) -> None:
    """A start-first update from agents without --handover: the old agent holds the tunnel port (TCP and UDP).
    The new agent starts anyway (it used to exit 2), answers /readyz 503 naming nothing bound on it yet, and
    binds both once the old one lets go."""
    control = ControlServer(TOKEN, "127.0.0.1", 0)
    await control.start()
    fake.swarm = {"LocalNodeState": "active", "NodeID": "n1", "ControlAvailable": False, "NodeAddr": "127.0.0.1",
                  "RemoteManagers": [{"NodeID": "m1", "Addr": "127.0.0.1:2377"}]}  # fmt: skip
    control.publish(ClusterState(table=RoutingTable(version=1, services=()), nodes=()))
    old_tcp = socket.create_server(("127.0.0.1", 0))
    port = old_tcp.getsockname()[1]
    old_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    old_udp.bind(("127.0.0.1", port))
    agent = ClusterAgent(f"unix://{fake.sock}", TOKEN, tunnel_port=port, control_port=control.port, bind="127.0.0.1")
    admin = None
    try:
        await agent.start(info_timeout=5)
        admin = agent_admin(agent, "127.0.0.1", 0)
        await admin.start()
        readyz = "http://{}:{}/readyz".format(*admin.address)
        await asyncio.wait_for(agent.wait_applied(), 10)
        assert set(agent.unbound) == {"tunnel"} and "in use" in agent.unbound["tunnel"]
        assert agent.status()["unbound"] == agent.unbound
        assert (await _get(readyz))[0] == 503
        old_tcp.close()
        await wait_for(lambda: set(agent.unbound) == {"udp-tunnel"}, 5, what="the TCP tunnel bound")
        assert (await _get(readyz))[0] == 503
        old_udp.close()
        await wait_for(lambda: not agent.unbound, 5, what="the UDP tunnel bound")
        assert (await _get(readyz))[0] == 200
        _, w = await asyncio.open_connection("127.0.0.1", port)  # the new agent accepts on it
        w.close()
    finally:
        old_tcp.close()
        old_udp.close()
        if admin is not None:
            await admin.stop()
        await agent.stop(0.1)
        await control.stop()


FAKE_ENGINE = """
import asyncio, sys
from aiohttp import web

async def main():
    app = web.Application()
    app.router.add_get("/_ping", lambda r: web.Response(text="OK"))
    app.router.add_get("/version", lambda r: web.json_response({"ApiVersion": "1.41"}))
    app.router.add_get("/v1.41/info", lambda r: web.json_response({"Name": "x", "Swarm": {"LocalNodeState": "inactive"}}))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, sys.argv[1]).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
