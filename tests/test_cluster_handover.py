"""``mesh run --cluster --handover PATH``: a cluster agent (real processes) hands its published port, its
tunnel (TCP and UDP) and its admin API to a new agent under load, and nothing is refused or reset.

The node is a swarm worker as a fake Docker engine describes it (tests/fakeengine.py); its manager is a
real ``ControlServer`` in the test process publishing a cluster state with one service whose only task
runs on this node, at 127.0.0.1 (a real echo backend): the agent localises it and proxies to it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from cluster.control import ControlServer
from cluster.state import ClusterState, NodeInfo
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from tests.fakeengine import FakeContainer, running_fake_engine
from tests.test_cli import Agent, EchoBackend, clean_env
from tests.test_handover import Load, free_port, ready, until_progress
from tests.util import wait_for

pytestmark = pytest.mark.uvloop_only

TOKEN = "0123456789abcdef0123456789abcdef"
fake = pytest.fixture(running_fake_engine)


async def tunnel_accepts(port: int) -> bool:
    """A TCP connect to the tunnel port is accepted (the agent then resets an unknown peer: that is fine)."""
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except ConnectionRefusedError:
        return False
    w.close()
    try:
        await w.wait_closed()
    except OSError:
        pass
    return True


@pytest.mark.parametrize("workers", [1, 2])
async def test_cluster_agent_handover_under_load(fake, tmp_path: Path, workers: int) -> None:
    """With ``--workers 2`` the published port is served by two worker processes (one SO_REUSEPORT socket
    each, both handed over), the tunnel and control by the agent process."""
    backend = await EchoBackend("t1").start()
    control_port, tunnel_port, port, admin = free_port(), free_port(), free_port(), free_port()
    fake.swarm = {"LocalNodeState": "active", "NodeID": "n1", "ControlAvailable": False, "NodeAddr": "127.0.0.1",
                  "RemoteManagers": [{"NodeID": "m1", "Addr": "127.0.0.1:2377"}]}  # fmt: skip
    fake.add(FakeContainer(id="a" * 64, name="web.1.t1", labels={"com.docker.swarm.task.id": "t1"}, ip="127.0.0.1"))
    table = RoutingTable(
        version=1,
        services=(
            Service(
                name="web",
                routes=(Route(port=port, endpoints=(Endpoint("t1", "10.0.0.9", backend.port, node="n1"),)),),
                options=ServiceOptions(),
            ),
        ),
    )
    manager = ControlServer(TOKEN, "127.0.0.1", control_port)
    await manager.start()
    manager.publish(ClusterState(table=table, nodes=(NodeInfo("n1", "127.0.0.1", tunnel=tunnel_port),)))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    argv = ("--cluster", "--token-file", str(token), "--docker", f"unix://{fake.sock}",
            "--control-port", str(control_port), "--tunnel-port", str(tunnel_port), "--bind", "127.0.0.1",
            "--admin", f"127.0.0.1:{admin}", "--handover", str(tmp_path / "handover.sock"), "--grace", "5",
            "--workers", str(workers))  # fmt: skip
    agents = [await Agent(*argv, env=clean_env()).start()]
    load = None
    probes = {"accepted": 0, "refused": 0}
    stop_probe = asyncio.Event()

    async def probe() -> None:  # the tunnel port, bounded: until stopped or 2000 connects
        while not stop_probe.is_set() and sum(probes.values()) < 2000:
            probes["accepted" if await tunnel_accepts(tunnel_port) else "refused"] += 1
            await asyncio.sleep(0.01)

    prober = None
    try:
        await agents[0].wait_log("handover: serving", timeout=30)
        await wait_for(lambda: ready(admin), timeout=20, what="first agent ready")
        load = Load(port, keepalive=4, churn=2).start()
        prober = asyncio.create_task(probe())
        await until_progress(load)
        for i in range(2):
            old = agents[-1]
            new = await Agent(*argv, env=clean_env()).start()
            agents.append(new)
            # the published port, the tunnel over TCP and UDP, the admin API
            await new.wait_log(f"handover: received {3 + workers} socket(s)", timeout=30)
            for role in ("tcp 0.0.0.0:", "tunnel 127.0.0.1:", "udp-tunnel 127.0.0.1:", "admin 127.0.0.1:"):
                assert role in next(ln for ln in new.lines if "handover: received" in ln), new.log
            await old.wait_log("stopped accepting and drains", timeout=30)
            await until_progress(load)
            assert await old.wait(20) == 0, old.log
            assert await ready(admin), new.log
            assert not load.errors, (i, load, old.log, new.log)
        # one node, one table: the workers' counters are summed by the agent's admin API
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{admin}/v1/table") as r:
            doc = await r.json()
        assert doc["runtime"]["processes"] == workers, doc["runtime"]
        (route,) = [x for svc in doc["services"] for x in svc["routes"]]
        assert route["runtime"]["accepted"] > 0, route
        await load.stop()
        stop_probe.set()
        await prober
        assert not load.errors, load
        print(f"cluster handover, {workers} worker(s):", load, probes)
        assert probes["refused"] == 0 and probes["accepted"] > 0, probes
    finally:
        stop_probe.set()
        if prober is not None:
            await prober
        if load is not None:
            await load.stop()
        for a in agents:
            await a.stop()
        await manager.stop()
        await backend.close()
