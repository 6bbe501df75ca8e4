"""The Engine client and the Watcher against a scripted Engine API server (tests/fakeengine.py).

The server makes the timing-sensitive paths (coalescing, drains, stream cuts,
failed listings, empty listings, swarm convergence) deterministic; where a test
asserts that nothing more happens, the watcher runs on a fake clock and the test
waits until it is idle, so "nothing" is exact.  test_discovery_engine.py runs
the same watcher against a real dockerd.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from discovery import probe, watch
from discovery.engine import (
    Engine,
    EngineAPIError,
    EngineError,
    EngineUnavailable,
    NotFound,
    NotSwarmManager,
    StreamEnded,
    resolve_docker_host,
)
from discovery.watcher import PublishInfo, Watcher
from mesh.routing import RoutingTable
from tests.fakeengine import FakeClock, FakeContainer, FakeEngine, running_fake_engine, settle
from tests.util import wait_for

fake = pytest.fixture(running_fake_engine)

WEB = {"mesh.publish": "8080:80", "com.docker.compose.project": "p", "com.docker.compose.service": "web"}


def web_container(i: int, **kw: Any) -> FakeContainer:
    return FakeContainer(id=f"{i:064x}", name=f"p-web-{i}", labels=dict(WEB), ip=f"198.18.201.{i + 1}", **kw)


class Published:
    """Collects what the watcher publishes."""

    def __init__(self) -> None:
        self.tables: list[tuple[RoutingTable, PublishInfo]] = []

    def __call__(self, table: RoutingTable, info: PublishInfo) -> None:
        assert info.version == table.version
        self.tables.append((table, info))

    @property
    def last(self) -> RoutingTable:
        return self.tables[-1][0]

    def endpoints(self, port: int = 8080) -> dict[str, str]:
        """Endpoint id (first 4 hex digits stripped of zeros) -> state, for the route on ``port``."""
        for _, r in self.last.routes():
            if r.port == port:
                return {e.id.lstrip("0") or "0": e.state for e in r.endpoints}
        return {}


@pytest.fixture
async def run_watcher(fake):
    started: list[tuple[Watcher, asyncio.Task, Engine]] = []

    async def start(**kw: Any) -> tuple[Watcher, Published]:
        pub = Published()
        engine = Engine(resolve_docker_host(f"unix://{fake.sock}", {}))
        kw.setdefault("backstop", 60.0)
        w = Watcher(engine, pub, **kw)
        task = asyncio.create_task(w.run())
        started.append((w, task, engine))
        await wait_for(lambda: w.connected.is_set(), what="watcher connected")
        return w, pub

    yield start
    for w, task, engine in started:
        w.stop()
        await asyncio.wait_for(task, 5)
        await engine.close()


# -- Engine client --------------------------------------------------------------------------


async def test_engine_client_calls_and_error_mapping(fake):
    fake.add(web_container(1))
    async with Engine(resolve_docker_host(f"unix://{fake.sock}", {})) as e:
        assert await e.ping() is True
        assert (await e.info())["Name"] == "fakehost"
        assert e.api_version == "1.41"
        assert [c["Id"] for c in await e.containers({"label": "mesh.publish"})] == [f"{1:064x}"]
        assert (await e.container(f"{1:064x}"))["Name"] == "/p-web-1"
        with pytest.raises(NotFound) as ei:
            await e.container("nope")
        assert ei.value.status == 404 and "No such container" in str(ei.value)
        with pytest.raises(NotSwarmManager):
            await e.services()
        fake.fail["/info"] = 500
        with pytest.raises(EngineAPIError) as ei2:
            await e.info()
        assert ei2.value.status == 500 and not isinstance(ei2.value, EngineUnavailable)
    assert {m for m, _ in fake.requests} == {"GET"}


@pytest.mark.parametrize(("server", "chosen"), [("1.43", "1.41"), ("1.40", "1.40")])
async def test_engine_negotiates_version(tmp_path, server, chosen):
    f = FakeEngine(sock=str(tmp_path / "d.sock"), api_version=server)
    await f.start()
    try:
        async with Engine(resolve_docker_host(f.sock, {})) as e:
            await e.info()
            assert e.api_version == chosen
        assert f.versions == {chosen}
    finally:
        await f.stop()


async def test_engine_too_old_and_unreachable(tmp_path):
    f = FakeEngine(sock=str(tmp_path / "d.sock"), api_version="1.24")
    await f.start()
    try:
        async with Engine(resolve_docker_host(f.sock, {})) as e:
            with pytest.raises(EngineError, match="older than the minimum 1.30"):
                await e.info()
    finally:
        await f.stop()
    async with Engine(resolve_docker_host(str(tmp_path / "missing.sock"), {}), api_version="1.41") as e:
        with pytest.raises(EngineUnavailable, match="missing.sock"):
            await e.info()
        with pytest.raises(EngineUnavailable):
            async with e.events():
                pass


async def test_events_stream_end_is_detected(fake):
    async with Engine(resolve_docker_host(fake.sock, {})) as e:
        async with e.events({"type": ["container"]}) as stream:
            await wait_for(lambda: len(fake.streams) == 1, what="subscribed")
            fake.emit("container", "start", "abc", name="x")
            it = aiter(stream)
            ev = await anext(it)
            assert (ev["Type"], ev["Action"], ev["Actor"]["ID"]) == ("container", "start", "abc")
            fake.cut_streams()
            with pytest.raises(StreamEnded):
                await anext(it)


async def test_probe(fake, tmp_path):
    assert (await probe(f"unix://{fake.sock}")).url == f"unix://{fake.sock}"
    assert await probe(f"unix://{tmp_path}/absent.sock") is None
    assert await probe("ssh://nope") is None


# -- Watcher ----------------------------------------------------------------------------


async def test_initial_listing_then_backstop_publishes_nothing_new(fake, run_watcher):
    for i in (1, 2, 3):
        fake.add(web_container(i))
    fake.add(FakeContainer(id="f" * 64, name="other", labels={}, ip="198.18.201.99"))
    w, pub = await run_watcher(backstop=0.1)
    assert len(pub.tables) == 1
    table, info = pub.tables[0]
    assert (table.version, info.reason, info.event_time) == (1, "initial", None)
    assert pub.endpoints() == {"1": "running", "2": "running", "3": "running"}
    assert w.local_node == "fakehost"
    before = w.stats.full_listings
    await wait_for(lambda: w.stats.full_listings >= before + 3, what="backstop listings")
    assert len(pub.tables) == 1
    assert {m for m, _ in fake.requests} == {"GET"}


async def test_burst_of_events_is_coalesced_into_one_table(fake, run_watcher):
    clock = FakeClock()
    fake.wall = clock.wall
    fake.add(web_container(1))
    lags: list[tuple[float, str]] = []
    # coalesce and clock steps are binary fractions: the fake times add up exactly
    w, pub = await run_watcher(coalesce=0.25, on_lag=lambda s, t: lags.append((s, t)), clock=clock, wall=clock.wall)
    refreshes = w.stats.refreshes
    first_event = None
    for i in range(2, 7):
        fake.add(web_container(i))
        t = fake.emit("container", "start", f"{i:064x}")
        first_event = first_event or t
    await wait_for(lambda: w.stats.events.get(("container", "start")) == 5, what="five events received")
    await settle(w.follower, clock, 0.125)
    assert len(pub.tables) == 1  # the burst's coalescing window is still open
    await settle(w.follower, clock, 0.125)
    await wait_for(lambda: len(pub.tables) == 2, what="second table")
    table, info = pub.tables[1]
    assert pub.endpoints() == {str(i): "running" for i in range(1, 7)}
    assert (table.version, info.reason, info.event_type) == (2, "event", "container/start")
    assert info.event_time == pytest.approx(first_event, abs=1e-6)
    assert [t for _, t in lags] == ["container/start"]
    assert lags[0][0] >= 0.2 - 0.01  # waited for the burst to end
    assert lags[0][0] == pytest.approx(0.25, abs=1e-6)
    assert w.stats.events[("container", "start")] == 5
    # five starts -> one sync; none of it is published again
    await settle(w.follower, clock, 1.0)
    assert w.stats.refreshes == refreshes + 1
    assert w.stats.publishes == 2


async def test_kill_drains_at_once_without_a_listing(fake, run_watcher):
    clock = FakeClock()
    for i in (1, 2, 3):
        fake.add(web_container(i))
    w, pub = await run_watcher(coalesce=0.5, clock=clock)
    inspects = fake.count("/containers/")
    # right after kill the engine still lists the container as running
    fake.emit("container", "kill", f"{2:064x}", signal="15")
    await wait_for(lambda: len(pub.tables) == 2, what="drain table")
    assert fake.count("/containers/") == inspects
    assert pub.tables[1][1].reason == "drain"
    assert pub.tables[1][1].event_type == "container/kill"
    assert pub.endpoints() == {"1": "running", "2": "draining", "3": "running"}
    # the coalesced re-inspect still sees it running: it stays draining
    await settle(w.follower, clock, 0.5)
    await wait_for(lambda: fake.count("/containers/") > inspects, what="re-inspect")
    assert fake.count("/containers/") == inspects + 1
    assert pub.endpoints() == {"1": "running", "2": "draining", "3": "running"}
    assert len(pub.tables) == 2  # the re-inspect published nothing
    # then it dies and is removed
    fake.containers[f"{2:064x}"].state = "exited"
    fake.emit("container", "die", f"{2:064x}", exitCode="143")
    await wait_for(lambda: w.stats.events.get(("container", "die")) == 1, what="die received")
    await settle(w.follower, clock, 0.5)
    await wait_for(lambda: pub.endpoints() == {"1": "running", "3": "running"}, what="removed")
    assert w._killed == {}


async def test_kill_with_reload_signal_does_not_drain_and_restart_undrains(fake, run_watcher):
    fake.add(web_container(1))
    w, pub = await run_watcher(coalesce=0.05)
    fake.emit("container", "kill", f"{1:064x}", signal="1")
    await wait_for(lambda: w.stats.refreshes >= 1, what="refresh")
    assert len(pub.tables) == 1
    fake.emit("container", "kill", f"{1:064x}", signal="9")
    await wait_for(lambda: pub.endpoints() == {"1": "draining"}, what="drained")
    fake.emit("container", "start", f"{1:064x}")
    await wait_for(lambda: pub.endpoints() == {"1": "running"}, what="undrained")


async def test_health_status_gates_membership(fake, run_watcher):
    fake.add(web_container(1, health="healthy"))
    fake.add(web_container(2, health="starting"))
    w, pub = await run_watcher()
    assert pub.endpoints() == {"1": "running"}
    fake.containers[f"{2:064x}"].health = "healthy"
    fake.emit("container", "health_status: healthy", f"{2:064x}")
    await wait_for(lambda: pub.endpoints() == {"1": "running", "2": "running"}, what="healthy joins")
    fake.containers[f"{1:064x}"].health = "unhealthy"
    fake.emit("container", "health_status: unhealthy", f"{1:064x}")
    await wait_for(lambda: pub.endpoints() == {"2": "running"}, what="unhealthy leaves")
    assert w.stats.events[("container", "health_status")] == 2


async def test_stream_cut_reconnects_and_resyncs(fake, run_watcher):
    fake.add(web_container(1))
    w, pub = await run_watcher(backoff_initial=0.01, backoff_max=0.05)
    # changes while the stream is gone (no events reach the watcher for them)
    fake.cut_streams()
    fake.add(web_container(2))
    await wait_for(lambda: w.stats.reconnects >= 1 and w.connected.is_set(), what="reconnected")
    await wait_for(lambda: pub.endpoints() == {"1": "running", "2": "running"}, what="resync")
    assert pub.tables[-1][1].reason == "resync"


async def test_engine_down_keeps_last_table_then_resyncs(fake, run_watcher):
    fake.add(web_container(1))
    w, pub = await run_watcher(backoff_initial=0.01, backoff_max=0.1)
    await fake.stop()
    await wait_for(lambda: not w.connected.is_set(), what="disconnected")
    failures = w.stats.reconnects
    await wait_for(lambda: w.stats.reconnects >= failures + 3, what="retries with backoff")
    assert pub.last.version == 1 and pub.endpoints() == {"1": "running"}
    fake.add(web_container(2))
    t0 = time.monotonic()
    await fake.start()
    await wait_for(lambda: pub.endpoints() == {"1": "running", "2": "running"}, timeout=5, what="resync")
    assert time.monotonic() - t0 < 2.0


async def test_failed_listing_keeps_good_table(fake, run_watcher, caplog):
    fake.add(web_container(1))
    w, pub = await run_watcher(coalesce=0.02, backoff_max=0.1)
    fake.fail["/containers/"] = 500
    fake.add(web_container(2))
    fake.emit("container", "start", f"{2:064x}")
    await wait_for(lambda: w.stats.listing_failures >= 2, what="failed listings retried")
    assert len(pub.tables) == 1 and pub.endpoints() == {"1": "running"}
    assert "docker listing failed" in caplog.text and "keeping table version 1" in caplog.text
    del fake.fail["/containers/"]
    await wait_for(lambda: pub.endpoints() == {"1": "running", "2": "running"}, what="recovered")
    assert pub.tables[-1][1].event_type == "container/start"


async def test_empty_full_listing_needs_confirmation(fake, run_watcher):
    fake.add(web_container(1))
    clock = FakeClock()
    w, pub = await run_watcher(backoff_initial=0.01, backoff_max=0.02, empty_confirm=0.3, clock=clock)
    fake.containers.clear()
    fake.cut_streams()
    await wait_for(lambda: w.stats.reconnects >= 1 and w.connected.is_set(), what="reconnected")
    assert w._empty_since is not None
    assert len(pub.tables) == 1
    t0 = clock()
    await settle(w.follower, clock, 0.25)
    assert len(pub.tables) == 1  # not before empty_confirm
    await settle(w.follower, clock, 0.0625)
    await wait_for(lambda: len(pub.tables) == 2, what="confirmed empty")
    assert clock() - t0 >= 0.2
    assert pub.last.services == ()


async def test_event_driven_removal_of_last_container_is_immediate(fake, run_watcher):
    fake.add(web_container(1))
    _, pub = await run_watcher(empty_confirm=60)
    del fake.containers[f"{1:064x}"]
    fake.emit("container", "destroy", f"{1:064x}")
    await wait_for(lambda: len(pub.tables) >= 2 and pub.last.services == (), what="empty table")


async def test_bad_label_logged_once(fake, run_watcher, caplog):
    caplog.set_level(logging.INFO, logger="discovery")
    fake.add(web_container(1))
    bad = fake.add(FakeContainer(id="b" * 64, name="broken", labels={"mesh.publish": "80:eighty"}, ip="198.18.201.50"))
    w, pub = await run_watcher(backstop=0.05)
    await wait_for(lambda: w.stats.full_listings >= 4, what="several rebuilds")
    lines = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert lines == [
        "docker discovery: container broken (bbbbbbbbbbbb): label mesh.publish='80:eighty': "
        "port 'eighty' must be a number 1..65535 - skipped"
    ]
    assert pub.endpoints() == {"1": "running"}
    # fixed and broken again: logged again
    bad.labels = {"mesh.publish": "8080:80", "mesh.service": "p-web"}
    await wait_for(lambda: len(pub.endpoints()) == 2, what="fixed container joins")
    bad.labels = {"mesh.publish": "80:eighty"}
    await wait_for(lambda: len([r for r in caplog.records if "broken" in r.getMessage()]) == 2, what="relogged")


async def test_watch_entry_point(fake):
    fake.add(web_container(1))
    got: list[RoutingTable] = []
    watchers: list[Watcher] = []

    async def publish(table: RoutingTable, info: PublishInfo) -> None:
        await asyncio.sleep(0)
        got.append(table)

    task = asyncio.create_task(watch(f"unix://{fake.sock}", publish, on_watcher=watchers.append, coalesce=0.01))
    await wait_for(lambda: len(got) == 1, what="first table")
    assert got[0].services[0].name == "p-web"
    watchers[0].stop()
    await asyncio.wait_for(task, 5)


# -- swarm ------------------------------------------------------------------------------


def _service(sid: str, name: str, replicas: int, labels: dict[str, str]) -> dict:
    return {
        "ID": sid,
        "Version": {"Index": 10},
        "CreatedAt": "2026-11-27T17:23:31.37421607Z",
        "Spec": {"Name": name, "Labels": labels, "Mode": {"Replicated": {"Replicas": replicas}}},
    }


def _task(tid: str, sid: str, state: str, desired: str = "running", node: str = "node-1") -> dict:
    return {
        "ID": tid,
        "ServiceID": sid,
        "NodeID": node,
        "Status": {"State": state, "ContainerStatus": {"ContainerID": f"c{tid}"}},
        "DesiredState": desired,
        "NetworksAttachments": [],
    }


def _gw(*tids: str) -> dict:
    return {
        "Id": "gw",
        "Name": "docker_gwbridge",
        "Containers": {f"c{t}": {"IPv4Address": f"198.18.205.{10 + i}/24"} for i, t in enumerate(tids)},
    }


async def test_swarm_service_converges_after_service_event(fake, run_watcher):
    fake.swarm = {"LocalNodeState": "active", "NodeID": "node-1", "ControlAvailable": True}
    fake.services["s1"] = _service("s1", "api", 2, {"mesh.publish": "9000:80"})
    fake.tasks = [_task("t1", "s1", "running"), _task("t2", "s1", "running")]
    fake.gwbridge = _gw("t1", "t2")
    clock = FakeClock()
    w, pub = await run_watcher(converge_interval=0.05, converge_timeout=5, clock=clock)
    assert w.swarm_manager and w.local_node == "node-1"
    assert pub.endpoints(9000) == {"t1": "running", "t2": "running"}

    async def until(cond, what: str) -> None:
        # converge_interval steps of the fake clock, each acted on, until cond() (or 20 steps)
        for _ in range(20):
            if cond():
                return
            await settle(w.follower, clock, 0.05)
        raise AssertionError(f"not within 20 converge intervals: {what}")

    # scale to 3: the service event comes first, the task only later (no task events)
    fake.services["s1"] = _service("s1", "api", 3, {"mesh.publish": "9000:80"})
    fake.emit("service", "update", "s1", name="api", **{"replicas.old": "2", "replicas.new": "3"})
    fake.tasks.append(_task("t3", "s1", "preparing"))
    await wait_for(lambda: w.stats.events.get(("service", "update")) == 1, what="service event received")
    await until(lambda: fake.count("/tasks") >= 3, what="converge polling")
    assert pub.endpoints(9000) == {"t1": "running", "t2": "running"}
    fake.tasks[-1] = _task("t3", "s1", "running")
    fake.gwbridge = _gw("t1", "t2", "t3")
    await until(lambda: pub.endpoints(9000) == {"t1": "running", "t2": "running", "t3": "running"}, what="t3")
    await until(lambda: not w._converge, what="converged")
    polls = fake.count("/tasks")
    for _ in range(10):
        await settle(w.follower, clock, 0.05)
    assert fake.count("/tasks") == polls  # converged: no more polling
    # rolling update: old task desired shutdown -> drains while it still runs; task on another node is ignored
    fake.tasks[0] = _task("t1", "s1", "running", desired="shutdown")
    fake.tasks.append(_task("t9", "s1", "running", node="node-2"))
    fake.emit("service", "update", "s1", name="api", **{"updatestate.new": "updating"})
    await wait_for(lambda: w.stats.events.get(("service", "update")) == 2, what="second service event received")
    await until(lambda: pub.endpoints(9000).get("t1") == "draining", what="t1 draining")
    assert "t9" not in pub.endpoints(9000)
    # the local task container's kill event drains at once too
    fake.emit("container", "kill", "ct2", signal="15", **{"com.docker.swarm.service.id": "s1",
              "com.docker.swarm.task.id": "t2"})  # fmt: skip
    await wait_for(lambda: pub.endpoints(9000).get("t2") == "draining", what="t2 draining")
    # service removed
    del fake.services["s1"]
    fake.emit("service", "remove", "s1", name="api")
    await wait_for(lambda: w.stats.events.get(("service", "remove")) == 1, what="remove received")
    await until(lambda: pub.last.services == (), what="service gone")


async def test_worker_engine_routes_containers_only(fake, run_watcher):
    fake.swarm = {"LocalNodeState": "active", "NodeID": "node-2", "ControlAvailable": False}
    fake.add(web_container(1))
    w, pub = await run_watcher()
    assert (w.swarm_manager, w.local_node) == (False, "node-2")
    assert pub.endpoints() == {"1": "running"}
    assert fake.count("/services") == 0


async def test_publish_failure_is_retried(fake, caplog):
    fake.add(web_container(1))
    calls: list[int] = []

    def publish(table: RoutingTable, info: PublishInfo) -> None:
        calls.append(table.version)
        if len(calls) == 1:
            raise RuntimeError("data plane hiccup")

    engine = Engine(resolve_docker_host(fake.sock, {}))
    w = Watcher(engine, publish, backoff_max=0.05)
    task = asyncio.create_task(w.run())
    try:
        await wait_for(lambda: w.ready.is_set(), what="published after a retry")
        assert calls == [1, 1]  # the failed version is not used up
        assert w.table is not None and w.table.version == 1
        assert "publishing routing table version 1 failed; will retry" in caplog.text
    finally:
        w.stop()
        await asyncio.wait_for(task, 5)
        await engine.close()


async def test_swarm_mode_ignores_containers(fake, run_watcher):
    fake.swarm = {"LocalNodeState": "active", "NodeID": "node-1", "ControlAvailable": True}
    fake.add(web_container(1))
    fake.services["s1"] = _service("s1", "api", 1, {"mesh.publish": "9000:80"})
    fake.tasks = [_task("t1", "s1", "running")]
    fake.gwbridge = _gw("t1")
    _, pub = await run_watcher(mode="swarm")
    assert [s.name for s in pub.last.services] == ["api"]
    _, pub2 = await run_watcher(mode="containers")
    assert [s.name for s in pub2.last.services] == ["p-web"]
    assert fake.count("/services") == 1  # only the swarm-mode watcher asked


def test_watcher_rejects_bad_options():
    engine = Engine(resolve_docker_host("/nonexistent.sock", {}))
    with pytest.raises(ValueError, match="mode must be one of auto, containers, swarm"):
        Watcher(engine, print, mode="all")
    with pytest.raises(ValueError, match="coalesce must be > 0"):
        Watcher(engine, print, coalesce=0)


async def test_repeated_engine_failure_is_logged_once(fake, run_watcher, caplog):
    fake.add(web_container(1))
    w, pub = await run_watcher(backoff_initial=0.01, backoff_max=0.02)
    fake.fail["/events"] = 403
    fake.cut_streams()
    await wait_for(lambda: w.stats.reconnects >= 5, what="several failed reconnects")
    lines = [r for r in caplog.records if "HTTP 403" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert "GET /events: HTTP 403: injected failure" in lines[0].getMessage()
    assert pub.last.version == 1  # still serving the last table
    del fake.fail["/events"]
    await wait_for(lambda: w.connected.is_set(), what="reconnected")


async def test_network_connect_event_reinspects_container(fake, run_watcher):
    c = fake.add(web_container(1))
    _, pub = await run_watcher()
    assert pub.last.services[0].routes[0].endpoints[0].address == "198.18.201.2"
    c.network, c.ip = "front", "198.18.202.7"
    fake.emit("network", "connect", "net-front", container=c.id, name="front", type="bridge")
    await wait_for(lambda: pub.last.services[0].routes[0].endpoints[0].address == "198.18.202.7", what="new address")
    assert pub.tables[-1][1].event_type == "network/connect"


async def test_kills_during_a_slow_apply_are_drained_right_after_it(fake):
    for i in (1, 2, 3):
        fake.add(web_container(i))
    applied: list[tuple[dict[str, str], str]] = []
    gate = asyncio.Event()

    async def publish(table: RoutingTable, info: PublishInfo) -> None:
        if info.reason == "drain" and not gate.is_set():
            await gate.wait()  # the data plane is slow to apply the first drain
        eps = {e.id.lstrip("0"): e.state for _, r in table.routes() for e in r.endpoints}
        applied.append((eps, info.reason))

    engine = Engine(resolve_docker_host(fake.sock, {}))
    w = Watcher(engine, publish, coalesce=5.0)  # no listing gets in the way
    task = asyncio.create_task(w.run())
    try:
        await wait_for(lambda: w.connected.is_set(), what="connected")
        fake.emit("container", "kill", f"{1:064x}", signal="15")
        await wait_for(lambda: w._drain_task is not None and not w._drain_task.done(), what="first drain applying")
        fake.emit("container", "kill", f"{2:064x}", signal="15")
        await wait_for(lambda: len(w._drain_requests) == 1, what="second kill queued")
        gate.set()
        await wait_for(lambda: len(applied) == 3, what="two drains")
        assert applied[1:] == [
            ({"1": "draining", "2": "running", "3": "running"}, "drain"),
            ({"1": "draining", "2": "draining", "3": "running"}, "drain"),
        ]
        assert w.stats.drains == 2
    finally:
        w.stop()
        await asyncio.wait_for(task, 5)
        await engine.close()
