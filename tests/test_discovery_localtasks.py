"""The cluster agent's local task follower (discovery/localtasks.py) against the scripted Engine API server.

It runs on a fake clock: coalescing and the backstop listing happen exactly when the clock says, and
"nothing more happens" is checked by waiting until the follower is idle (tests/fakeengine.py: settle).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from discovery.engine import Engine, resolve_docker_host
from discovery.localtasks import LocalTasks
from tests.fakeengine import FakeClock, FakeContainer, running_fake_engine, settle
from tests.util import wait_for

fake = pytest.fixture(running_fake_engine)

TASK = "com.docker.swarm.task.id"
FIXTURES = Path(__file__).parent / "fixtures" / "docker-events"


def task_container(i: int, **kw) -> FakeContainer:
    labels = {TASK: f"task{i}", "com.docker.swarm.service.id": "svc1"}
    return FakeContainer(id=f"{i:064x}", name=f"web.{i}.task{i}", labels=labels, ip=f"172.17.0.{i + 1}", **kw)


@pytest.fixture
async def follow(fake):
    started: list[tuple[LocalTasks, asyncio.Task, Engine]] = []

    async def start(**kw) -> tuple[LocalTasks, list[int], FakeClock]:
        clock = kw.pop("clock", FakeClock())
        changes: list[int] = []
        engine = Engine(resolve_docker_host(f"unix://{fake.sock}", {}))
        lt = LocalTasks(engine, lambda: changes.append(len(changes) + 1), clock=clock, **kw)
        task = asyncio.create_task(lt.run())
        started.append((lt, task, engine))
        await wait_for(lambda: lt.connected.is_set(), what="local tasks connected")
        await settle(lt.follower)
        return lt, changes, clock

    yield start
    for lt, task, engine in started:
        lt.stop()
        await asyncio.wait_for(task, 5)
        await engine.close()


async def test_first_listing_then_kill_drains_at_once_and_a_listing_drops_the_dead(fake, follow):
    fake.add(task_container(1))
    fake.add(task_container(2))
    fake.add(FakeContainer(id="f" * 64, name="not-a-task", labels={}, ip="172.17.0.99"))
    fake.add(task_container(3, health="unhealthy"))
    lt, changes, clock = await follow(coalesce=0.25)
    assert lt.addresses == {"task1": "172.17.0.2", "task2": "172.17.0.3"}
    assert (changes, lt.ready.is_set(), lt.listings) == ([1], True, 1)
    listed = fake.count("/containers/json")
    # a fatal kill drains at once, before any listing
    fake.emit("container", "kill", f"{2:064x}", signal="15")
    await wait_for(lambda: lt.draining == {"task2"}, what="drained")
    assert (changes, fake.count("/containers/json")) == ([1, 2], listed)
    # the coalesced listing still sees it running: it stays draining, nothing changed
    await settle(lt.follower, clock, 0.125)
    assert fake.count("/containers/json") == listed
    await settle(lt.follower, clock, 0.125)
    assert fake.count("/containers/json") == listed + 1
    assert (lt.draining, changes) == ({"task2"}, [1, 2])
    # then it dies: the next listing drops it and remembers when it went
    fake.containers[f"{2:064x}"].state = "exited"
    fake.emit("container", "die", f"{2:064x}", exitCode="143")
    await wait_for(lambda: lt.follower.events == 2, what="die received")
    await settle(lt.follower, clock, 0.25)
    assert lt.addresses == {"task1": "172.17.0.2"}
    assert (lt.draining, changes, set(lt.gone)) == (set(), [1, 2, 3], {"task2"})
    assert lt.gone["task2"] == clock()


async def test_reload_signal_does_not_drain_and_start_undrains(fake, follow):
    fake.add(task_container(1))
    lt, changes, _ = await follow()
    fake.emit("container", "kill", f"{1:064x}", signal="SIGHUP")
    fake.emit("container", "kill", f"{1:064x}", signal="9")
    await wait_for(lambda: lt.draining == {"task1"}, what="drained by the second kill")
    assert changes == [1, 2]  # the HUP changed nothing
    fake.emit("container", "start", f"{1:064x}")
    await wait_for(lambda: lt.draining == set(), what="undrained")
    assert changes == [1, 2, 3]


async def test_backstop_listing_exactly_when_due_and_poke(fake, follow):
    fake.add(task_container(1))
    lt, changes, clock = await follow(coalesce=0.25, backstop=8.0)
    listed = fake.count("/containers/json")
    await settle(lt.follower, clock, 7.5)
    assert fake.count("/containers/json") == listed  # nothing happened: no listing before the backstop
    fake.add(task_container(2))  # no event for it: only a listing finds it
    await settle(lt.follower, clock, 0.5)
    assert fake.count("/containers/json") == listed + 1
    assert set(lt.addresses) == {"task1", "task2"} and changes == [1, 2]
    # poke: re-list one coalescing window later (the agent pokes when a tunnel target is unknown)
    lt.poke()
    await settle(lt.follower)
    assert fake.count("/containers/json") == listed + 1
    await settle(lt.follower, clock, 0.25)
    assert fake.count("/containers/json") == listed + 2


async def test_gwbridge_network_event_relists(fake, follow):
    fake.add(task_container(1))
    lt, _, clock = await follow(coalesce=0.25)
    listed = fake.count("/containers/json")
    fake.emit("network", "connect", "net-gw", container=f"{1:064x}", name="docker_gwbridge", type="bridge")
    await wait_for(lambda: lt.follower.events == 1, what="gwbridge event received")
    await settle(lt.follower, clock, 0.25)
    assert fake.count("/containers/json") == listed + 1


@pytest.mark.parametrize(
    ("fixture", "marks"),
    [
        ("network-connect-bridge", True),  # the default bridge: tasks without a network are reached there
        ("network-disconnect-bridge", True),
        ("network-connect-task-overlay", False),  # overlay addresses are not reachable from the host
        ("network-disconnect-task-overlay", False),
        ("network-create-overlay-on-worker", False),
    ],
)
def test_which_network_events_mark_a_listing(fixture: str, marks: bool) -> None:
    raw = json.loads((FIXTURES / f"{fixture}.json").read_text())
    lt = LocalTasks(None, lambda: None, clock=FakeClock())  # type: ignore[arg-type]
    lt._on_event(raw)
    assert (lt._dirty_since is not None) is marks


async def test_stream_cut_reconnects_and_relists(fake, follow, caplog):
    caplog.set_level(logging.WARNING, logger="discovery")
    fake.add(task_container(1))
    lt, _, _ = await follow(backoff_initial=0.01, backoff_max=0.05)
    sessions = lt.follower.sessions
    fake.cut_streams()
    fake.add(task_container(2))  # while the stream is gone: no event reaches the follower
    await wait_for(lambda: lt.follower.sessions > sessions and lt.connected.is_set(), what="reconnected")
    await wait_for(lambda: set(lt.addresses) == {"task1", "task2"}, what="re-listed")
    assert "events stream cut" in caplog.text and "; keeping 1 local tasks" in caplog.text


async def test_engine_away_keeps_the_last_view(fake, follow):
    fake.add(task_container(1))
    lt, changes, _ = await follow(backoff_initial=0.01, backoff_max=0.05)
    fake.fail["/containers/"] = 500
    fake.cut_streams()
    await wait_for(lambda: lt.follower.sessions >= 3, what="failed sessions retried")
    assert (lt.addresses, changes) == ({"task1": "172.17.0.2"}, [1])
    assert not lt.connected.is_set()
    del fake.fail["/containers/"]
    await wait_for(lambda: lt.connected.is_set(), what="connected again")
    assert (lt.addresses, changes) == ({"task1": "172.17.0.2"}, [1])
