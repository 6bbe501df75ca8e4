"""The one event classifier (discovery/events.py), table-driven over recorded Engine API 1.41 events.

tests/fixtures/docker-events/ holds one unmodified event of each kind, captured from a 3-node lab swarm
(see its NOTES.txt).  Every recorded event is in the table, and both followers of an engine (the discovery
watcher and the cluster agent's LocalTasks) read them through ``classify``, so a drain means one thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from discovery.events import CHANGE, CREATE, DRAIN, EXEC, HEALTH, KINDS, REMOVE, UNDRAIN, classify
from discovery.localtasks import LocalTasks

FIXTURES = Path(__file__).parent / "fixtures" / "docker-events"


def recorded(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


HEALTHCHECK = "/bin/sh -c wget -q -O /dev/null http://127.0.0.1/ || exit 1"

# (fixture, type, action, kind, detail, task id prefix, container prefix)
RECORDED = [
    ("container-attach-standalone", "container", "attach", CHANGE, "", "", "32d69c76141a"),
    ("container-create-standalone", "container", "create", CREATE, "", "", "067131a9931d"),
    ("container-create-task-with-container-label", "container", "create", CREATE, "", "pnaz8aue", "e0a5c2bd047c"),
    ("container-create-task", "container", "create", CREATE, "", "ngoq0kkv", "7b5b828f2e5b"),
    ("container-destroy-task", "container", "destroy", DRAIN, "", "okoh8wwx", "e4528057e367"),
    ("container-die-task", "container", "die", DRAIN, "", "pnaz8aue", "e0a5c2bd047c"),
    ("container-exec_create-healthcheck", "container", "exec_create", EXEC, HEALTHCHECK, "s7zhehzr", "528360fb7bf9"),
    ("container-exec_die-healthcheck", "container", "exec_die", EXEC, "", "s7zhehzr", "528360fb7bf9"),
    ("container-exec_start-healthcheck", "container", "exec_start", EXEC, HEALTHCHECK, "s7zhehzr", "528360fb7bf9"),
    ("container-health_status-healthy", "container", "health_status", HEALTH, "healthy", "s7zhehzr", "528360fb7bf9"),
    (
        "container-health_status-unhealthy",
        "container",
        "health_status",
        HEALTH,
        "unhealthy",
        "okoh8wwx",
        "e4528057e367",
    ),
    ("container-kill-task", "container", "kill", DRAIN, "", "pnaz8aue", "e0a5c2bd047c"),  # signal 9
    ("container-start-task", "container", "start", UNDRAIN, "", "s7zhehzr", "528360fb7bf9"),
    ("container-stop-task", "container", "stop", DRAIN, "", "pnaz8aue", "e0a5c2bd047c"),
    ("daemon-reload", "daemon", "reload", CHANGE, "", "", ""),
    ("image-import", "image", "import", CHANGE, "", "", ""),
    ("image-tag", "image", "tag", CHANGE, "", "", ""),
    ("network-connect-bridge", "network", "connect", CHANGE, "", "", "e4528057e367"),
    ("network-connect-task-overlay", "network", "connect", CHANGE, "", "", "7b5b828f2e5b"),
    ("network-create-overlay-on-worker", "network", "create", CREATE, "", "", ""),
    ("network-create-swarm-scope-manager", "network", "create", CREATE, "", "", ""),
    ("network-destroy-overlay-on-worker", "network", "destroy", REMOVE, "", "", ""),
    ("network-disconnect-bridge", "network", "disconnect", CHANGE, "", "", "e4528057e367"),
    ("network-disconnect-task-overlay", "network", "disconnect", CHANGE, "", "", "e0a5c2bd047c"),
    ("network-update-swarm-scope-manager", "network", "update", CHANGE, "", "", ""),
    ("node-create", "node", "create", CREATE, "", "", ""),
    ("node-remove", "node", "remove", REMOVE, "", "", ""),
    ("node-update-availability-drain", "node", "update", CHANGE, "", "", ""),
    ("node-update-noattrs", "node", "update", CHANGE, "", "", ""),
    ("node-update-state-down", "node", "update", CHANGE, "", "", ""),
    ("node-update-state-ready", "node", "update", CHANGE, "", "", ""),
    ("service-create", "service", "create", CREATE, "", "", ""),
    ("service-remove", "service", "remove", REMOVE, "", "", ""),
    ("service-update-image", "service", "update", CHANGE, "", "", ""),
    ("service-update-rolling-completed", "service", "update", CHANGE, "", "", ""),
    ("service-update-rolling-started", "service", "update", CHANGE, "", "", ""),
    ("service-update-scale", "service", "update", CHANGE, "", "", ""),
    ("service-update-spec-noattrs", "service", "update", CHANGE, "", "", ""),
]


def test_every_recorded_event_is_in_the_table() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(row[0] for row in RECORDED)


@pytest.mark.parametrize(
    ("name", "typ", "action", "kind", "detail", "task", "container"), RECORDED, ids=[r[0] for r in RECORDED]
)
def test_recorded_events(name, typ, action, kind, detail, task, container) -> None:
    raw = recorded(name)
    ev = classify(raw)
    assert (ev.type, ev.action, ev.kind, ev.detail) == (typ, action, kind, detail)
    assert ev.id == raw["Actor"]["ID"]
    assert ev.key == f"{typ}/{action}"
    assert ev.task_id[:8] == task and (len(ev.task_id) == 25 if task else ev.task_id == "")
    assert ev.container[:12] == container and (len(ev.container) == 64 if container else ev.container == "")
    # timeNano (above 2**53) divided, not the whole seconds of "time"
    assert ev.time == raw["timeNano"] / 1e9 and int(ev.time) == raw["time"]
    assert ev.attrs == raw["Actor"]["Attributes"]


def _container(action: str, **attrs: str) -> dict:
    return {"Type": "container", "Action": action, "Actor": {"ID": "c" * 64, "Attributes": attrs}}


SYNTHETIC = [
    # (name, raw event, kind, action, detail, time)
    ("kill 15 stops the process", _container("kill", signal="15"), DRAIN, "kill", "", None),
    ("kill 9", _container("kill", signal="9"), DRAIN, "kill", "", None),
    ("kill SIGTERM by name", _container("kill", signal="SIGTERM"), DRAIN, "kill", "", None),
    ("kill without a signal attribute", _container("kill"), DRAIN, "kill", "", None),
    ("kill 1 (HUP) is a reload", _container("kill", signal="1"), CHANGE, "kill", "", None),
    ("kill SIGHUP by name", _container("kill", signal="SIGHUP"), CHANGE, "kill", "", None),
    ("kill USR1 (log rotation)", _container("kill", signal="USR1"), CHANGE, "kill", "", None),
    ("kill 12 (USR2)", _container("kill", signal="12"), CHANGE, "kill", "", None),
    ("kill 28 (WINCH)", _container("kill", signal="28"), CHANGE, "kill", "", None),
    ("pause", _container("pause"), DRAIN, "pause", "", None),
    ("oom", _container("oom"), DRAIN, "oom", "", None),
    ("unpause", _container("unpause"), UNDRAIN, "unpause", "", None),
    ("restart", _container("restart"), UNDRAIN, "restart", "", None),
    ("rename", _container("rename", oldName="/a"), CHANGE, "rename", "", None),
    ("health starting", _container("health_status: starting"), HEALTH, "health_status", "starting", None),
    ("exec_detach", _container("exec_detach"), EXEC, "exec_detach", "", None),
    (
        "an old engine: status, id and time only",
        {"status": "die", "id": "d" * 64, "from": "img", "time": 1700000000},
        CHANGE,  # no Type: not known to be a container
        "die",
        "",
        1700000000.0,
    ),
    ("nothing at all", {}, CHANGE, "", "", None),
    ("attributes that are not a mapping", {"Type": "container", "Action": "start", "Actor": {"Attributes": 3}},
     UNDRAIN, "start", "", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "kind", "action", "detail", "time"), [r[1:] for r in SYNTHETIC], ids=[r[0] for r in SYNTHETIC]
)
def test_synthetic_events(raw, kind, action, detail, time) -> None:
    ev = classify(raw)
    assert (ev.kind, ev.action, ev.detail, ev.time) == (kind, action, detail, time)
    assert ev.kind in KINDS


def test_an_old_engine_event_keeps_its_id() -> None:
    ev = classify({"status": "die", "id": "d" * 64, "time": 1700000000})
    assert (ev.id, ev.type, ev.container) == ("d" * 64, "", "")


@pytest.mark.parametrize(
    ("name", "kind"), [(r[0], r[3]) for r in RECORDED if r[5]], ids=[r[0] for r in RECORDED if r[5]]
)
def test_local_tasks_drain_exactly_on_drain_events(name: str, kind: str) -> None:
    # the cluster agent's follower drains a listed task on exactly the events the classifier calls DRAIN
    raw = recorded(name)
    changes: list[int] = []
    lt = LocalTasks(None, lambda: changes.append(1))  # type: ignore[arg-type]
    task = raw["Actor"]["Attributes"]["com.docker.swarm.task.id"]
    lt.addresses = {task: "172.18.0.9"}
    lt._on_event(raw)
    assert (lt.draining == {task}) is (kind == DRAIN)
    assert changes == ([1] if kind == DRAIN else [])
