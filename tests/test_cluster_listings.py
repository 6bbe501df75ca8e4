"""The manager's task poll at scale: one GET /tasks (desired-state=running) for every mesh service that is not
converging, no per-service reads, and draining tasks it no longer lists kept until a listing of their service.
A scripted engine (tests/fakeengine.py) on a fake clock; the same watcher against a real dockerd with a few
hundred tasks is tests/test_cluster_listings_lab.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from discovery.cluster import ClusterWatcher
from discovery.engine import Engine, resolve_docker_host
from tests.fakeengine import FakeClock, FakeEngine, settle
from tests.util import wait_for


class FilteringEngine(FakeEngine):
    """The fake engine, plus Swarm's desired-state filter on GET /tasks, and a record of every task filter."""

    task_filters: list[dict]
    nodes: list[dict]

    async def _handle(self, request: web.Request):
        if request.path.endswith("/nodes"):
            self.requests.append(("GET", "/nodes"))
            return web.json_response(self.nodes)
        if request.path.endswith("/tasks"):
            filters = json.loads(request.query.get("filters", "{}"))
            self.task_filters.append(filters)
            want = set(filters.get("desired-state", []))
            if want:
                saved = self.tasks
                self.tasks = [t for t in saved if t["DesiredState"] in want]
                try:
                    return await super()._handle(request)
                finally:
                    self.tasks = saved
        return await super()._handle(request)


@pytest.fixture
async def fake(tmp_path):
    f = FilteringEngine(sock=str(tmp_path / "docker.sock"))
    f.task_filters = []
    await f.start()
    yield f
    await f.stop()


def _service(sid: str, replicas: int, port: int) -> dict:
    return {
        "ID": sid,
        "Version": {"Index": 10},
        "Spec": {"Name": f"svc-{sid}", "Labels": {"mesh.publish": f"{port}:80"},
                 "Mode": {"Replicated": {"Replicas": replicas}}},
    }  # fmt: skip


def _task(tid: str, sid: str, state: str = "running", desired: str = "running", node: str = "node-2") -> dict:
    return {
        "ID": tid,
        "ServiceID": sid,
        "NodeID": node,
        "Status": {"State": state, "ContainerStatus": {"ContainerID": f"c{tid}"}},
        "DesiredState": desired,
        "NetworksAttachments": [{"Addresses": [f"10.0.1.{len(tid)}/24"]}],
    }


def _node(nid: str, addr: str) -> dict:
    return {"ID": nid, "Description": {"Hostname": nid}, "Status": {"State": "ready", "Addr": addr},
            "Spec": {"Availability": "active"}}  # fmt: skip


def _endpoints(w: ClusterWatcher, port: int) -> dict[str, str]:
    assert w.state is not None
    return {e.id: e.state for _, r in w.state.table.routes() if r.port == port for e in r.endpoints}


async def test_one_task_listing_per_poll_for_every_service(fake) -> None:
    fake.swarm = {"LocalNodeState": "active", "NodeID": "node-1", "ControlAvailable": True}
    for i in range(12):
        fake.services[f"s{i}"] = _service(f"s{i}", 3, 9000 + i)
        fake.tasks += [_task(f"t{i}-{k}", f"s{i}") for k in range(3)]
        # Swarm's task history: dead tasks of every slot (desired shutdown), 5 per slot by default
        fake.tasks += [_task(f"old{i}-{k}", f"s{i}", state="shutdown", desired="shutdown") for k in range(6)]
    fake.nodes = [_node("node-1", "198.18.0.1"), _node("node-2", "198.18.0.2")]
    clock = FakeClock()
    engine = Engine(resolve_docker_host(f"unix://{fake.sock}", {}))
    states = []
    w = ClusterWatcher(engine, states.append, tunnel_port=7481, task_poll=1.0, backstop=600.0,
                       clock=clock, wall=clock.wall)  # fmt: skip
    run = asyncio.create_task(w.run())
    try:
        await wait_for(lambda: w.connected.is_set() and w.state is not None, what="first state")
        assert len(w.state.table.services) == 12
        fake.requests.clear()
        fake.task_filters.clear()

        async def poll() -> None:
            # a poll is due every task_poll; its listing runs a coalesce interval after
            await settle(w.follower, clock, 1.0)
            await settle(w.follower, clock, 0.05)

        for _ in range(5):
            await poll()
        assert fake.count("/tasks") == 5  # one per poll, not one per service
        assert sum(p.startswith("/services/") for _, p in fake.requests) == 0  # specs change only with events
        assert all(sorted(f["service"]) == sorted(fake.services) and f["desired-state"] == ["running"]
                   for f in fake.task_filters)  # fmt: skip
        published = len(states)
        # a task of another node is replaced without any event: the next poll sees it
        fake.tasks = [t for t in fake.tasks if t["ID"] != "t3-0"] + [_task("t3-new", "s3")]
        await poll()
        assert len(states) == published + 1
        assert set(_endpoints(w, 9003)) == {"t3-1", "t3-2", "t3-new"}
        # a rolling update: the service event makes it converge (all its tasks, one service); the old task
        # still running with desired state shutdown is draining and the poll keeps it
        fake.services["s5"]["Version"]["Index"] = 11
        fake.tasks = [dict(t, DesiredState="shutdown") if t["ID"] == "t5-0" else t for t in fake.tasks] + [
            _task("t5-new", "s5", state="starting")
        ]
        fake.emit("service", "update", "s5", name="svc-s5")
        await wait_for(lambda: w.stats.events.get(("service", "update")) == 1, what="service event")
        await settle(w.follower, clock, 0.1)
        assert _endpoints(w, 9005) == {"t5-0": "draining", "t5-1": "running", "t5-2": "running"}
        assert {"service": ["s5"]} in fake.task_filters  # the converging service: every task of it
        fake.task_filters.clear()
        await poll()
        # the poll skips the converging service, and keeps its draining task
        polls = [f for f in fake.task_filters if "desired-state" in f]
        assert polls and all("s5" not in f["service"] for f in polls)
        assert _endpoints(w, 9005)["t5-0"] == "draining"
    finally:
        w.stop()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await engine.close()
