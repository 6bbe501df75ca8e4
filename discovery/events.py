"""What one Docker Engine API event means (pure).

Every follower of an engine (the discovery ``Watcher``, the cluster agent's
``LocalTasks``) reads events through ``classify``, so a kill, a health change
or a healthcheck probe means the same thing to all of them.

Rules (Engine API 1.41, recorded events in tests/fixtures/docker-events/):

- ``action`` is ``Action`` (older engines: ``status``) up to the first ":":
  "health_status: healthy" -> "health_status" with detail "healthy",
  "exec_start: sh -c ..." -> "exec_start".
- container events, by ``kind``:

  =========  ==================================================================
  DRAIN      stop, die, pause, destroy, oom, and kill with a signal that stops
             the process: no new connections to it from now on
  CHANGE     kill with a signal that does not stop it (HUP, USR1, USR2, WINCH:
             reload, log rotation), rename, update, attach, ...: re-read it
  UNDRAIN    start, restart, unpause: it serves again (docker restart is kill,
             die, start)
  CREATE     create: not routed before its start event
  HEALTH     health_status (sent only when the status changes)
  EXEC       exec_create / exec_start / exec_die: every healthcheck probe makes
             all three; nothing about the container changed
  =========  ==================================================================

- any other type (service, network, node, ...): create -> CREATE, remove and
  destroy -> REMOVE, anything else (update, connect, disconnect) -> CHANGE.
- ``container`` names the container an event is about: the actor of a
  container event, ``Attributes.container`` of a network connect/disconnect.
- ``time`` is unix seconds from ``timeNano`` (exact; it is above 2**53, so it
  is divided, never parsed as a float), else ``time``; None when neither is there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .records import SWARM_SERVICE_ID, SWARM_TASK_ID

__all__ = [
    "CHANGE",
    "CREATE",
    "DRAIN",
    "DRAIN_ACTIONS",
    "EXEC",
    "HEALTH",
    "KINDS",
    "NON_FATAL_SIGNALS",
    "REMOVE",
    "UNDRAIN",
    "UNDRAIN_ACTIONS",
    "EngineEvent",
    "classify",
]

DRAIN = "drain"
UNDRAIN = "undrain"
CREATE = "create"
HEALTH = "health"
EXEC = "exec"
REMOVE = "remove"
CHANGE = "change"
KINDS = (DRAIN, UNDRAIN, CREATE, HEALTH, EXEC, REMOVE, CHANGE)

# Container actions after which the container gets no new connections at once.
DRAIN_ACTIONS = frozenset({"kill", "stop", "die", "pause", "destroy", "oom"})
# Actions that undo a drain (docker restart: kill, die, start).
UNDRAIN_ACTIONS = frozenset({"start", "restart", "unpause"})
# Signals that do not stop a process (reload, log rotation): a kill with one of them does not drain.
NON_FATAL_SIGNALS = frozenset(
    {"1", "10", "12", "28", "HUP", "SIGHUP", "USR1", "SIGUSR1", "USR2", "SIGUSR2", "WINCH", "SIGWINCH"}
)
_EXEC_ACTIONS = frozenset({"exec_create", "exec_start", "exec_die", "exec_detach"})


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """One event, read: ``type`` ("container", "service", "network", "node", ...),
    ``action`` (without its ":" detail), ``kind`` (one of ``KINDS``), the actor ``id``,
    ``container`` (see the module docstring), ``time`` (unix seconds or None),
    ``detail`` (after the ":", e.g. "healthy") and the actor's ``attrs``."""

    type: str
    action: str
    kind: str
    id: str
    container: str = ""
    time: float | None = None
    detail: str = ""
    attrs: Mapping[str, str] | None = None

    @property
    def key(self) -> str:
        """ "container/kill": how log lines and ``PublishInfo.event_type`` name it."""
        return f"{self.type}/{self.action}"

    def attr(self, name: str) -> str:
        return (self.attrs or {}).get(name, "")

    @property
    def task_id(self) -> str:
        """The swarm task of a container event ("" for a container that is not a task)."""
        return self.attr(SWARM_TASK_ID) if self.type == "container" else ""

    @property
    def service_id(self) -> str:
        """The swarm service of a task container's event ("" otherwise)."""
        return self.attr(SWARM_SERVICE_ID) if self.type == "container" else ""


def _time(raw: Mapping[str, Any]) -> float | None:
    nano = raw.get("timeNano")
    if isinstance(nano, int) and nano > 0:
        return nano / 1e9
    t = raw.get("time")
    if isinstance(t, int | float) and t > 0:
        return float(t)
    return None


def _container_kind(action: str, attrs: Mapping[str, str]) -> str:
    if action in DRAIN_ACTIONS:
        if action == "kill" and str(attrs.get("signal", "")) in NON_FATAL_SIGNALS:
            return CHANGE
        return DRAIN
    if action in UNDRAIN_ACTIONS:
        return UNDRAIN
    if action == "create":
        return CREATE
    if action == "health_status":
        return HEALTH
    if action in _EXEC_ACTIONS:
        return EXEC
    return CHANGE


def classify(raw: Mapping[str, Any]) -> EngineEvent:
    """Read one decoded event of GET /events.  Never raises: a malformed event is a CHANGE of type ""."""
    typ = str(raw.get("Type") or "")
    full = str(raw.get("Action") or raw.get("status") or "")
    action, _, detail = full.partition(":")
    action, detail = action.strip(), detail.strip()
    actor = raw.get("Actor")
    actor = actor if isinstance(actor, Mapping) else {}
    attrs_raw = actor.get("Attributes")
    attrs = (
        {str(k): "" if v is None else str(v) for k, v in attrs_raw.items()} if isinstance(attrs_raw, Mapping) else {}
    )
    obj_id = str(actor.get("ID") or raw.get("id") or "")
    if typ == "container":
        kind = _container_kind(action, attrs)
        container = obj_id
    else:
        kind = CREATE if action == "create" else REMOVE if action in ("remove", "destroy") else CHANGE
        container = attrs.get("container", "") if typ == "network" else ""
    return EngineEvent(
        type=typ, action=action, kind=kind, id=obj_id, container=container, time=_time(raw), detail=detail,
        attrs=attrs,
    )  # fmt: skip
