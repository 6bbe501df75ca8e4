"""The pure core of discovery: records in, RoutingTable out.

``build_table`` does no I/O and reads no clock: equal inputs give equal tables
(every collection is sorted), so the watcher can compare the result with the
last published table and publish only real changes.

Rules (docs/discovery.md has the user-facing version):
- Mode 1, containers: a running container with a valid ``mesh.publish`` label
  that is not a swarm task.  Service name: ``mesh.service``, else compose
  ``<project>-<service>``, else the container name.  The service exists while at
  least one such container runs; its endpoints are the containers that are
  running, not paused, and healthy when they have a Docker HEALTHCHECK.
  Service options come from the most recently created container.
- Mode 2, swarm services: a service with ``mesh.publish`` in its *service*
  labels.  Endpoints are its tasks in state running on ``local_node`` (the
  cluster issue lifts that), reached at the task container's docker_gwbridge
  address, else at its bridge address.
- ``killed`` ids (container or task ids) and tasks whose desired state is no
  longer "running" become ``state="draining"`` while they still run.
- Routes: one per (protocol, listen address, published port) of ``mesh.publish``
  (``/tcp``, ``/udp``, ``/tls``, ``/http``); a ``/tls`` route matches the
  ``mesh.tls.sni`` names (none: the port's default service), an ``/http`` route
  the ``mesh.http.hosts`` names and ``mesh.http.paths`` prefixes (none: any).
- Conflicts: two services with one name, or routes that cannot share a listen
  address (``mesh.routing.route_conflict``: per transport, so 53/tcp and 53/udp
  never clash; tls routes of several services share a port when their SNI names
  differ, http routes when no (host, path prefix) pair is claimed by both; a tcp
  route shares its port with nothing, tls and http never share one): the older
  service keeps it (then the name decides); the other is reported and skipped
  (only the conflicting route, for ports), naming the label to change:
  ``mesh.tls.sni``; ``mesh.http.paths`` when the newcomer set paths, else
  ``mesh.http.hosts``; ``mesh.publish`` for a clash of protocols or addresses.
  Published port 0 (any free port, chosen when the data plane binds it) never
  conflicts.
- A bad object is reported as a ``Problem`` and skipped; the others are built.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from mesh.routing import (
    Endpoint,
    Match,
    Route,
    RoutingTable,
    Service,
    ServiceOptions,
    format_hostport,
    route_conflict,
)

from .labels import LabelError, MeshLabels, PublishSpec, parse_labels
from .records import ContainerRecord, NetworkRecord, ServiceRecord, TaskRecord

__all__ = ["Problem", "build_table"]


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """Something wrong with one container or service.  ``skipped``: it was left out
    (False for warnings such as an unknown label)."""

    subject: str  # "container web-1 (3f2a1b4c5d6e)" / "service web"
    message: str
    label: str | None = None
    skipped: bool = True

    def __str__(self) -> str:
        tail = " - skipped" if self.skipped else ""
        return f"{self.subject}: {self.message}{tail}"


@dataclass(slots=True)
class _Candidate:
    name: str
    age: tuple[float, str]  # (created, id): smaller = older, wins conflicts
    options: ServiceOptions
    routes: dict[RouteKey, list[Endpoint]]
    subject: str
    sni: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def match(self, protocol: str) -> Match:
        if protocol == "tls":
            return Match(hosts=self.sni)
        if protocol == "http":
            return Match(hosts=self.hosts, paths=self.paths)
        return Match()


RouteKey = tuple[str, str, int]  # (protocol, listen host, published port)


def _key(p: PublishSpec) -> RouteKey:
    return (p.protocol, p.listen_host, p.published)


def _container_subject(c: ContainerRecord) -> str:
    return f"container {c.name} ({c.id[:12]})"


def _container_address(c: ContainerRecord, ml: MeshLabels, problems: list[Problem]) -> str | None:
    subject = _container_subject(c)
    if ml.network is not None:
        addr = c.address_on(ml.network)
        if addr is None:
            nets = ", ".join(n.network for n in c.networks) or "none"
            problems.append(
                Problem(subject, f"has no address on network {ml.network!r} (its networks: {nets})", "mesh.network")
            )
        return addr
    if c.network_mode == "host":
        return "127.0.0.1"
    usable = [n for n in c.networks if n.ip]
    if not usable:
        problems.append(Problem(subject, f"has no IP address (network mode {c.network_mode!r})", "mesh.network"))
        return None
    if len(usable) > 1:
        names = ", ".join(n.network for n in usable)
        problems.append(
            Problem(
                subject,
                f"is on several networks ({names}); using {usable[0].network!r}: set mesh.network to choose",
                "mesh.network",
                skipped=False,
            )
        )
    return usable[0].ip


def _service_name(c: ContainerRecord, ml: MeshLabels) -> str:
    if ml.service:
        return ml.service
    compose = c.compose_service
    if compose:
        return f"{compose[0]}-{compose[1]}"
    return c.name


def _parse(labels, subject: str, problems: list[Problem]) -> MeshLabels | None:
    try:
        ml = parse_labels(labels)
    except LabelError as exc:
        problems.append(Problem(subject, str(exc), exc.label))
        return None
    if ml is not None:
        problems.extend(Problem(subject, w, None, skipped=False) for w in ml.warnings)
    return ml


def _containers_mode(
    containers: Iterable[ContainerRecord], local_node: str, killed: Collection[str], problems: list[Problem]
) -> list[_Candidate]:
    groups: dict[str, list[tuple[ContainerRecord, MeshLabels]]] = {}
    for c in sorted(containers, key=lambda c: c.id):
        if c.swarm_service_id or c.state not in ("running", "paused"):
            continue
        ml = _parse(c.labels, _container_subject(c), problems)
        if ml is None:
            continue
        groups.setdefault(_service_name(c, ml), []).append((c, ml))

    out = []
    for name, members in groups.items():
        _, newest_ml = max(members, key=lambda m: (m[0].created, m[0].id))
        routes: dict[RouteKey, list[Endpoint]] = {}
        for c, ml in members:
            for p in ml.publish:
                routes.setdefault(_key(p), [])
            if c.state != "running" or c.health not in (None, "healthy"):
                continue
            addr = _container_address(c, ml, problems)
            if addr is None:
                continue
            state = "draining" if c.id in killed else "running"
            for p in ml.publish:
                routes[_key(p)].append(
                    Endpoint(id=c.id, address=addr, port=p.target, node=local_node, weight=ml.weight, state=state)
                )
        oldest = min(members, key=lambda m: (m[0].created, m[0].id))[0]
        out.append(
            _Candidate(
                name=name,
                age=(oldest.created, oldest.id),
                options=newest_ml.options,
                routes=routes,
                subject=f"service {name} (containers)",
                sni=newest_ml.sni,
                hosts=newest_ml.hosts,
                paths=newest_ml.paths,
            )
        )
    return out


def _task_address(
    t: TaskRecord, gwbridge: NetworkRecord | None, by_id: dict[str, ContainerRecord]
) -> tuple[str | None, ContainerRecord | None]:
    c = by_id.get(t.container_id)
    if gwbridge is not None and t.container_id:
        addr = gwbridge.address_of(t.container_id)
        if addr:
            return addr, c
    if c is not None:
        # a task without networks sits on the node's default bridge; its overlay
        # addresses (the task's attachments) are not reachable from the host
        overlay = {ip for _, ip in t.addresses}
        for n in sorted(c.networks, key=lambda n: n.network != "bridge"):
            if n.ip and n.ip not in overlay and n.network != "docker_gwbridge":
                return n.ip, c
    return None, c


def _swarm_mode(
    services: Iterable[ServiceRecord],
    tasks: Iterable[TaskRecord],
    gwbridge: NetworkRecord | None,
    containers: dict[str, ContainerRecord],
    local_node: str,
    killed: Collection[str],
    problems: list[Problem],
) -> list[_Candidate]:
    by_service: dict[str, list[TaskRecord]] = {}
    for t in tasks:
        by_service.setdefault(t.service_id, []).append(t)
    out = []
    for s in sorted(services, key=lambda s: (s.name, s.id)):
        subject = f"service {s.name}"
        ml = _parse(s.labels, subject, problems)
        if ml is None:
            continue
        if s.mode not in ("replicated", "global"):
            problems.append(Problem(subject, f"is a {s.mode} service; only replicated and global services are routed"))
            continue
        routes: dict[RouteKey, list[Endpoint]] = {_key(p): [] for p in ml.publish}
        for t in sorted(by_service.get(s.id, ()), key=lambda t: t.id):
            if t.state != "running" or (local_node and t.node_id != local_node):
                continue
            addr, c = _task_address(t, gwbridge, containers)
            if addr is None or (c is not None and (c.state != "running" or c.health == "unhealthy")):
                continue  # not reachable yet: the converge loop lists it again
            draining = t.desired_state != "running" or t.id in killed or (t.container_id and t.container_id in killed)
            for p in ml.publish:
                routes[_key(p)].append(
                    Endpoint(
                        id=t.id,
                        address=addr,
                        port=p.target,
                        node=t.node_id,
                        weight=ml.weight,
                        state="draining" if draining else "running",
                    )
                )
        out.append(
            _Candidate(
                name=ml.service or s.name, age=(s.created, s.id), options=ml.options, routes=routes, subject=subject,
                sni=ml.sni, hosts=ml.hosts, paths=ml.paths,
            )
        )  # fmt: skip
    return out


def build_table(
    containers: Iterable[ContainerRecord] = (),
    *,
    services: Iterable[ServiceRecord] = (),
    tasks: Iterable[TaskRecord] = (),
    gwbridge: NetworkRecord | None = None,
    local_node: str = "",
    killed: Collection[str] = (),
    version: int = 0,
) -> tuple[RoutingTable, tuple[Problem, ...]]:
    """Build the routing table from records.  Returns (table, problems); problems are sorted.

    ``containers``: local containers (mode 1 candidates and the containers of local
    swarm tasks, used for their bridge address and state).  ``services``/``tasks``:
    swarm objects (empty when the engine is not a manager).  ``local_node``: the
    swarm node id (or engine name) written to ``Endpoint.node``; swarm tasks on
    other nodes are left out when it is set.  ``killed``: container/task ids that
    got a kill/stop event and must drain at once.
    """
    problems: list[Problem] = []
    containers = tuple(containers)
    by_id = {c.id: c for c in containers}
    candidates = _containers_mode(containers, local_node, killed, problems)
    candidates += _swarm_mode(services, tasks, gwbridge, by_id, local_node, killed, problems)

    # oldest first: an existing service keeps its name and ports when a newcomer collides
    candidates.sort(key=lambda c: (c.age, c.name))
    names: dict[str, _Candidate] = {}
    claimed: list[tuple[Route, str]] = []
    built: list[Service] = []
    for cand in candidates:
        if cand.name in names:
            problems.append(
                Problem(cand.subject, f"service name {cand.name!r} is already used by {names[cand.name].subject}")
            )
            continue
        routes = []
        for (protocol, host, port), endpoints in sorted(cand.routes.items(), key=lambda kv: (kv[0][2], kv[0][1:])):
            match = cand.match(protocol)
            route = Route(port=port, listen_host=host, protocol=protocol, match=match, endpoints=tuple(endpoints))
            # port 0 (any free port, chosen at bind) never clashes: route_conflict says so
            clash = next(
                ((other, o, why) for other, o in claimed if (why := route_conflict(other, o, route, cand.name))), None
            )
            if clash is not None:
                other, owner, why = clash
                if other.protocol == protocol == "tls":  # the same SNI name (or two defaults) on one port
                    problems.append(Problem(cand.subject, why, "mesh.tls.sni"))
                    continue
                if other.protocol == protocol == "http" and other.listen_host == host:
                    # the same (host, path prefix) on one port: the label to change is the rule the newcomer set
                    label = "mesh.http.paths" if cand.paths else "mesh.http.hosts"
                    problems.append(Problem(cand.subject, why, label))
                    continue
                where = format_hostport(host, port)
                if protocol == other.protocol == "tcp":
                    msg = f"port {where} is already published by service {owner!r}"
                else:
                    msg = f"port {where} ({protocol}) is already published by service {owner!r} ({other.protocol})"
                problems.append(Problem(cand.subject, msg, "mesh.publish"))
                continue
            routes.append(route)
            claimed.append((route, cand.name))
        if not routes:
            continue
        names[cand.name] = cand
        built.append(Service(name=cand.name, routes=tuple(routes), options=cand.options))
    return RoutingTable(version=version, services=tuple(built)), tuple(sorted(set(problems)))
