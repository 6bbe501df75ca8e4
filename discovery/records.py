"""Small frozen records parsed from raw Engine API dicts, at the boundary.

Everything after this module works on these records only, never on API dicts,
so the builder is a pure function that tests can feed by hand.  Parsers are
lenient about missing optional fields (older/newer engines) and strict about
the few fields without which a record is meaningless (an id): those raise
``RecordError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "ContainerRecord",
    "NetworkAddress",
    "NetworkRecord",
    "NodeRecord",
    "RecordError",
    "ServiceRecord",
    "TaskRecord",
    "frozen_labels",
]

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
SWARM_SERVICE_ID = "com.docker.swarm.service.id"
SWARM_SERVICE_NAME = "com.docker.swarm.service.name"
SWARM_TASK_ID = "com.docker.swarm.task.id"
SWARM_NODE_ID = "com.docker.swarm.node.id"
# The bridge through which a node reaches its own swarm tasks (overlay addresses are not reachable from the host).
GWBRIDGE = "docker_gwbridge"

Labels = tuple[tuple[str, str], ...]


class RecordError(ValueError):
    """An API object lacks a field that identifies it."""


def frozen_labels(labels: Mapping[str, Any] | None) -> Labels:
    """Labels as a sorted tuple of (key, value) pairs (hashable, comparable)."""
    return tuple(sorted((str(k), "" if v is None else str(v)) for k, v in (labels or {}).items()))


def _label(labels: Labels, key: str) -> str | None:
    for k, v in labels:
        if k == key:
            return v
    return None


def _parse_time(value: Any) -> float:
    """Unix seconds from the engine's int (listings) or RFC 3339 string with ns (inspect)."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        # "2026-11-27T17:29:35.200971903Z": Python parses at most 6 fraction digits
        m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value)
        if m:
            frac = (m.group(2) or ".0")[:7]
            tz = "+00:00" if m.group(3) == "Z" else m.group(3)
            try:
                return datetime.fromisoformat(m.group(1) + frac + tz).timestamp()
            except ValueError:
                return 0.0
    return 0.0


def _strip_prefix(addr: str | None) -> str:
    """ "198.18.42.4/24" -> "198.18.42.4"; "" for empty."""
    return (addr or "").split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    """A container's endpoint on one network."""

    network: str  # network name as the container sees it (key of NetworkSettings.Networks)
    network_id: str
    ip: str  # IPv4 address, "" when none (e.g. network mode host)


# "Up 21 seconds (healthy)", "Up 3 seconds (health: starting)", "Up 2 minutes (unhealthy)", "Up 1 hour (Paused)"
_STATUS_HEALTH = re.compile(r"\((healthy|unhealthy|health: starting)\)")


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    """One container, from a listing item or an inspect.

    ``health`` is the Docker HEALTHCHECK status ("starting", "healthy",
    "unhealthy") or None when the container has no health check.
    """

    id: str
    name: str
    labels: Labels = ()
    state: str = "running"  # created, running, paused, restarting, removing, exited, dead
    health: str | None = None
    created: float = 0.0
    network_mode: str = "default"
    networks: tuple[NetworkAddress, ...] = ()

    @property
    def running(self) -> bool:
        return self.state == "running"

    def label(self, key: str) -> str | None:
        return _label(self.labels, key)

    @property
    def compose_service(self) -> tuple[str, str] | None:
        project, service = self.label(COMPOSE_PROJECT), self.label(COMPOSE_SERVICE)
        return (project, service) if project and service else None

    @property
    def swarm_task_id(self) -> str | None:
        return self.label(SWARM_TASK_ID) or None

    @property
    def swarm_service_id(self) -> str | None:
        return self.label(SWARM_SERVICE_ID) or None

    def address_on(self, network: str) -> str | None:
        for n in self.networks:
            if n.network == network or n.network_id == network:
                return n.ip or None
        return None

    @classmethod
    def from_summary(cls, d: Mapping[str, Any]) -> ContainerRecord:
        """From an item of GET /containers/json."""
        cid = d.get("Id")
        if not cid:
            raise RecordError("container listing item without Id")
        names = d.get("Names") or []
        name = (names[0] if names else cid[:12]).lstrip("/")
        state = str(d.get("State") or "")
        status = str(d.get("Status") or "")
        health = None
        m = _STATUS_HEALTH.search(status)
        if m:
            health = "starting" if m.group(1) == "health: starting" else m.group(1)
        if state == "running" and "(Paused)" in status:
            state = "paused"
        return cls(
            id=cid,
            name=name,
            labels=frozen_labels(d.get("Labels")),
            state=state,
            health=health,
            created=_parse_time(d.get("Created")),
            network_mode=str((d.get("HostConfig") or {}).get("NetworkMode") or "default"),
            networks=_networks((d.get("NetworkSettings") or {}).get("Networks")),
        )

    @classmethod
    def from_inspect(cls, d: Mapping[str, Any]) -> ContainerRecord:
        """From GET /containers/{id}/json."""
        cid = d.get("Id")
        if not cid:
            raise RecordError("container inspect without Id")
        st = d.get("State") or {}
        state = str(st.get("Status") or ("running" if st.get("Running") else "exited"))
        if st.get("Paused"):
            state = "paused"
        health_d = st.get("Health")
        health = str(health_d.get("Status")) if isinstance(health_d, dict) and health_d.get("Status") else None
        if health == "none":
            health = None
        return cls(
            id=cid,
            name=str(d.get("Name") or cid[:12]).lstrip("/"),
            labels=frozen_labels((d.get("Config") or {}).get("Labels")),
            state=state,
            health=health,
            created=_parse_time(d.get("Created")),
            network_mode=str((d.get("HostConfig") or {}).get("NetworkMode") or "default"),
            networks=_networks((d.get("NetworkSettings") or {}).get("Networks")),
        )


def _networks(nets: Mapping[str, Any] | None) -> tuple[NetworkAddress, ...]:
    out = []
    for name, n in (nets or {}).items():
        n = n or {}
        out.append(
            NetworkAddress(network=str(name), network_id=str(n.get("NetworkID") or ""), ip=n.get("IPAddress") or "")
        )
    return tuple(sorted(out, key=lambda a: a.network))


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """A swarm service (GET /services).  ``labels`` are the service labels (Spec.Labels)."""

    id: str
    name: str
    labels: Labels = ()
    mode: str = "replicated"  # replicated, global (and *-job, which the mesh ignores)
    replicas: int | None = None
    version: int = 0
    created: float = 0.0

    def label(self, key: str) -> str | None:
        return _label(self.labels, key)

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> ServiceRecord:
        sid = d.get("ID")
        if not sid:
            raise RecordError("service without ID")
        spec = d.get("Spec") or {}
        mode_d = spec.get("Mode") or {}
        replicas = None
        if "Replicated" in mode_d:
            mode = "replicated"
            replicas = int((mode_d.get("Replicated") or {}).get("Replicas") or 0)
        elif "Global" in mode_d:
            mode = "global"
        else:
            mode = next(iter(mode_d), "replicated").lower()
        return cls(
            id=sid,
            name=str(spec.get("Name") or sid),
            labels=frozen_labels(spec.get("Labels")),
            mode=mode,
            replicas=replicas,
            version=int((d.get("Version") or {}).get("Index") or 0),
            created=_parse_time(d.get("CreatedAt")),
        )


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A swarm task (GET /tasks).  ``addresses``: (network name, IP) of its network attachments."""

    id: str
    service_id: str
    node_id: str
    state: str
    desired_state: str
    container_id: str = ""
    slot: int = 0
    timestamp: float = 0.0
    addresses: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> TaskRecord:
        tid = d.get("ID")
        if not tid:
            raise RecordError("task without ID")
        status = d.get("Status") or {}
        addrs = []
        for att in d.get("NetworksAttachments") or ():
            net = ((att.get("Network") or {}).get("Spec") or {}).get("Name") or ""
            for a in att.get("Addresses") or ():
                addrs.append((str(net), _strip_prefix(a)))
        return cls(
            id=tid,
            service_id=str(d.get("ServiceID") or ""),
            node_id=str(d.get("NodeID") or ""),
            state=str(status.get("State") or ""),
            desired_state=str(d.get("DesiredState") or ""),
            container_id=str((status.get("ContainerStatus") or {}).get("ContainerID") or ""),
            slot=int(d.get("Slot") or 0),
            timestamp=_parse_time(status.get("Timestamp")),
            addresses=tuple(sorted(addrs)),
        )


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A swarm node (GET /nodes), or the local engine (GET /info) when not in a swarm."""

    id: str
    hostname: str
    addr: str = ""
    role: str = ""
    availability: str = ""
    state: str = ""

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> NodeRecord:
        nid = d.get("ID")
        if not nid:
            raise RecordError("node without ID")
        spec = d.get("Spec") or {}
        status = d.get("Status") or {}
        return cls(
            id=nid,
            hostname=str((d.get("Description") or {}).get("Hostname") or ""),
            addr=str(status.get("Addr") or ""),
            role=str(spec.get("Role") or ""),
            availability=str(spec.get("Availability") or ""),
            state=str(status.get("State") or ""),
        )


@dataclass(frozen=True, slots=True)
class NetworkRecord:
    """A network (GET /networks/{id}); ``containers`` maps container id -> IPv4 address.

    On docker_gwbridge the keys include swarm task containers, whose gwbridge
    address is absent from their own inspect.
    """

    id: str
    name: str
    driver: str = ""
    scope: str = ""
    containers: tuple[tuple[str, str], ...] = ()

    def address_of(self, container_id: str) -> str | None:
        for cid, ip in self.containers:
            if cid == container_id:
                return ip or None
        return None

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> NetworkRecord:
        nid = d.get("Id")
        if not nid:
            raise RecordError("network without Id")
        conts = tuple(
            sorted(
                (str(cid), _strip_prefix((c or {}).get("IPv4Address")))
                for cid, c in (d.get("Containers") or {}).items()
            )
        )
        return cls(
            id=nid,
            name=str(d.get("Name") or nid),
            driver=str(d.get("Driver") or ""),
            scope=str(d.get("Scope") or ""),
            containers=conts,
        )
