"""The cluster state a manager agent publishes, and how each agent localises it.

A manager builds ONE ``ClusterState`` for the whole swarm: a ``RoutingTable`` whose
endpoints all carry ``node`` (the swarm node id of the task) and a map of nodes
(address, state, availability, tunnel port of the agent there).  Every agent,
managers included, turns it into the table its own data plane applies with the
pure ``localize()``.

Localisation rules (see docs/cluster.md):
- An endpoint whose node is not in the node map, is not ``ready``, or is
  ``drain`` leaves the table (Swarm ``pause`` keeps running tasks, so it stays).
- An endpoint on this node becomes direct (``via=None``) with the address the
  local engine reports for that task (the port stays the route's target port,
  since one task may publish several); a task the local engine does not
  (yet) know is left out, because only the local engine knows whether it is
  still alive and where it can be reached; a local task the local engine saw
  killed is ``draining`` at once, before any manager noticed.
- An endpoint on another node keeps its id, address and port (they are only a
  stable identity there) and gets ``via`` = that node's "addr:tunnel"; a node
  that announces no tunnel port has no agent to forward to, so its endpoints
  leave the table.
- Services and routes are kept even when no endpoint is left: the port stays
  bound and refuses with "no endpoint" rather than disappearing.

``ClusterState.digest`` covers the content and not the table version, so managers
that see the same swarm publish states with equal digests.  It is built from one
hash per service (of its canonical JSON) and one of the nodes, so a state derived
from another by replacing a few services (``with_changes``, what a delta does)
costs only the changed parts: unchanged services keep their JSON and hashes.

``Localizer`` is ``localize`` with a memory: called again for the next state, it
reuses the localised services whose content, nodes and local tasks did not change
(the result is always equal to ``localize``'s).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mesh.routing import Route, RoutingTable, Service, TableError, format_hostport

__all__ = ["NODE_AVAILABILITIES", "NODE_STATES", "ClusterState", "Localizer", "NodeInfo", "ServicePart", "localize"]


def _trusted(cls: type, **values: Any) -> Any:
    """An instance of a frozen dataclass whose invariants the caller guarantees (built from parts of
    already-validated objects), without running ``__post_init__`` again: validating a 5,000-endpoint
    table once per subscriber per change is most of a delta's cost.  Falls back to the checked
    constructor if the class gained fields this module does not know."""
    if tuple(f.name for f in fields(cls)) != tuple(values):
        return cls(**values)
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj


@functools.lru_cache(maxsize=1 << 16)
def _node_piece(node: NodeInfo) -> bytes:
    return _canonical(node.id) + b":" + _canonical(node.to_dict())


def _listen_keys(svc: Service | None) -> tuple | None:
    if svc is None:
        return None
    return tuple((r.port, r.listen_host, r.protocol, r.match) for r in svc.routes)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ServicePart:
    """One service of a state in wire form: its canonical JSON and the hash of it."""

    json: bytes
    hash: str

    @classmethod
    def of(cls, service_dict: Mapping[str, Any]) -> ServicePart:
        body = _canonical(service_dict)
        return cls(body, _hash(body))


# Swarm's own vocabulary (NodeStatus.State, NodeSpec.Availability).
NODE_STATES = ("unknown", "down", "ready", "disconnected")
NODE_AVAILABILITIES = ("active", "pause", "drain")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise TableError(msg)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One swarm node as the manager sees it.

    ``addr``: the address other agents dial (Swarm's Status.Addr).  ``tunnel``:
    the tunnel port of the mesh agent on that node, or None when no agent there
    announced one.
    """

    id: str
    addr: str
    state: str = "ready"
    availability: str = "active"
    tunnel: int | None = None

    def __post_init__(self) -> None:
        _check(bool(self.id), "node id must not be empty")
        _check(bool(self.addr), f"node {self.id}: addr must not be empty")
        _check(self.state in NODE_STATES, f"node {self.id}: state must be one of {NODE_STATES}, got {self.state!r}")
        _check(
            self.availability in NODE_AVAILABILITIES,
            f"node {self.id}: availability must be one of {NODE_AVAILABILITIES}, got {self.availability!r}",
        )
        _check(
            self.tunnel is None or (isinstance(self.tunnel, int) and 0 < self.tunnel < 65536),
            f"node {self.id}: tunnel port out of range: {self.tunnel!r}",
        )

    @property
    def usable(self) -> bool:
        """True when tasks on this node may receive new connections."""
        return self.state == "ready" and self.availability != "drain"

    @property
    def tunnel_addr(self) -> str | None:
        """ "addr:port" of this node's tunnel, or None when it has none."""
        return None if self.tunnel is None else format_hostport(self.addr, self.tunnel)

    def to_dict(self) -> dict[str, Any]:
        return {"addr": self.addr, "state": self.state, "availability": self.availability, "tunnel": self.tunnel}


@dataclass(frozen=True, slots=True)
class ClusterState:
    """What the control plane carries: the cluster table and the nodes.  Immutable;
    ``nodes`` is a tuple sorted by node id (use ``node_map()`` to look nodes up)."""

    table: RoutingTable
    nodes: tuple[NodeInfo, ...] = ()
    # caches (never part of equality): per-service wire form, aligned with table.services; the nodes' JSON + hash
    _parts: tuple[ServicePart, ...] | None = field(default=None, init=False, repr=False, compare=False)
    _nodes_part: tuple[bytes, str] | None = field(default=None, init=False, repr=False, compare=False)
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nodes = tuple(sorted(self.nodes, key=lambda n: n.id))
        ids = [n.id for n in nodes]
        _check(len(ids) == len(set(ids)), "duplicate node ids in cluster state")
        object.__setattr__(self, "nodes", nodes)

    @property
    def version(self) -> int:
        return self.table.version

    def node_map(self) -> dict[str, NodeInfo]:
        return {n.id: n for n in self.nodes}

    @property
    def digest(self) -> str:
        """Content hash (table without version + nodes): equal across managers.  It hashes the
        per-service hashes and the nodes' hash, so it is cheap for a state derived with
        ``with_changes`` or primed with ``reuse``."""
        if self._digest is None:
            h = hashlib.sha256()
            for svc, part in zip(self.table.services, self.parts(), strict=True):
                h.update(f"{svc.name}={part.hash};".encode())
            h.update(b"nodes=" + self.nodes_part()[1].encode())
            object.__setattr__(self, "_digest", h.hexdigest()[:16])
        assert self._digest is not None
        return self._digest

    def parts(self) -> tuple[ServicePart, ...]:
        """Each service's canonical JSON and hash, aligned with ``table.services`` (computed once)."""
        if self._parts is None:
            object.__setattr__(self, "_parts", tuple(ServicePart.of(d) for d in self.table.to_dict()["services"]))
        assert self._parts is not None
        return self._parts

    def nodes_part(self) -> tuple[bytes, str]:
        """The nodes' canonical JSON (an object keyed by node id) and its hash (computed once)."""
        if self._nodes_part is None:
            # the canonical JSON of _nodes_dict(), from one cached piece per node (a node change re-serialises one)
            body = b"{%s}" % b",".join(_node_piece(n) for n in self.nodes)
            object.__setattr__(self, "_nodes_part", (body, _hash(body)))
        assert self._nodes_part is not None
        return self._nodes_part

    def reuse(self, previous: ClusterState | None) -> ClusterState:
        """Take the wire form of services (and nodes) that are unchanged since ``previous`` from it
        instead of serialising them again (equal content: the same bytes).  Returns self."""
        if previous is None or self._parts is not None:
            return self
        old = {s.name: (s, p) for s, p in zip(previous.table.services, previous.parts(), strict=True)}
        parts = []
        for svc in self.table.services:
            hit = old.get(svc.name)
            if hit is not None and (hit[0] is svc or hit[0] == svc):
                parts.append(hit[1])
            else:
                parts.append(ServicePart.of(RoutingTable(services=(svc,)).to_dict()["services"][0]))
        object.__setattr__(self, "_parts", tuple(parts))
        if self._nodes_part is None and (previous.nodes is self.nodes or previous.nodes == self.nodes):
            object.__setattr__(self, "_nodes_part", previous.nodes_part())
        return self

    def with_changes(
        self,
        version: int,
        services: Mapping[str, tuple[Service, ServicePart] | None],
        nodes: Mapping[str, NodeInfo | None] | None = None,
    ) -> ClusterState:
        """A new state: this one with ``services`` replaced (None removes one) and ``nodes`` changed
        (None removes a node), at ``version``.  Unchanged services keep their objects and wire form."""
        kept = [(s, p) for s, p in zip(self.table.services, self.parts(), strict=True) if s.name not in services]
        kept += [v for v in services.values() if v is not None]
        kept.sort(key=lambda sp: sp[0].name)
        svcs = tuple(s for s, _ in kept)
        old = {s.name: s for s in self.table.services}
        # Changes of endpoints only (scale, update, node down) cannot make two routes conflict: the table is
        # checked again only when a changed or added service listens differently from before.
        if all(v is None or _listen_keys(old.get(name)) == _listen_keys(v[0]) for name, v in services.items()):
            table = _trusted(RoutingTable, version=version, services=svcs)
        else:
            table = RoutingTable(version=version, services=svcs)
        if nodes:
            merged = self.node_map()
            for nid, info in nodes.items():
                if info is None:
                    merged.pop(nid, None)
                else:
                    merged[nid] = info
            new = ClusterState(table=table, nodes=tuple(merged.values()))
        else:
            new = _trusted(ClusterState, table=table, nodes=self.nodes, _parts=None, _nodes_part=self.nodes_part(),
                           _digest=None)  # fmt: skip
        object.__setattr__(new, "_parts", tuple(p for _, p in kept))
        return new

    def _nodes_dict(self) -> dict[str, dict[str, Any]]:
        return {n.id: n.to_dict() for n in self.nodes}

    # -- JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table.to_dict(), "nodes": self._nodes_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def wire(self, digest: str | None = None) -> bytes:
        """The canonical JSON of ``to_dict()`` plus ``digest`` (the control server's full answer), assembled
        from the cached per-service parts: equal to ``json.dumps(..., sort_keys=True)`` of the same dict."""
        d = _canonical(digest if digest is not None else self.digest)
        services = b",".join(p.json for p in self.parts())
        return b'{"digest":%s,"nodes":%s,"table":{"services":[%s],"version":%d}}' % (
            d, self.nodes_part()[0], services, self.table.version)  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> ClusterState:
        """Build from the wire shape; raises ``TableError`` naming what is malformed."""
        _check(isinstance(data, dict), "cluster state must be a JSON object")
        _check(isinstance(data.get("table"), dict), "cluster state: 'table' must be an object")
        raw_nodes = data.get("nodes", {})
        _check(isinstance(raw_nodes, dict), "cluster state: 'nodes' must be an object keyed by node id")
        table = RoutingTable.from_dict(data["table"])
        return cls(table=table, nodes=parse_nodes(raw_nodes))

    @classmethod
    def from_json(cls, text: str | bytes) -> ClusterState:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TableError(f"cluster state is not JSON: {exc}") from exc
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return f"<ClusterState v{self.version} digest={self.digest} nodes={len(self.nodes)} services={len(self.table.services)}>"


def parse_node(node_id: str, n: Any) -> NodeInfo:
    _check(isinstance(n, dict), f"cluster state: node {node_id!r} must be an object")
    unknown = set(n) - {"addr", "state", "availability", "tunnel"}
    _check(not unknown, f"cluster state: node {node_id!r} has unknown fields {sorted(unknown)}")
    try:
        return NodeInfo(id=node_id, **n)
    except TypeError as exc:
        raise TableError(f"cluster state: node {node_id!r}: {exc}") from exc


def parse_nodes(raw_nodes: Mapping[str, Any]) -> tuple[NodeInfo, ...]:
    return tuple(parse_node(node_id, n) for node_id, n in raw_nodes.items())


def localize(
    state: ClusterState,
    self_node_id: str,
    local_addresses: Mapping[str, str],
    draining: Collection[str] = (),
) -> RoutingTable:
    """The table this node's data plane applies (rules in the module docstring).

    ``local_addresses`` maps task id -> the address at which the local engine
    reports that task reachable from this node (docker_gwbridge or bridge).  The
    port stays each route's endpoint port: a task that publishes several ports is
    one address and several routes.  ``draining``: local task ids that got a kill
    or stop event and must get no new connections before the manager has noticed.
    Pure: same inputs, same table.
    """
    nodes = state.node_map()
    services = tuple(
        _localize_service(svc, nodes, self_node_id, local_addresses, draining) for svc in state.table.services
    )
    return RoutingTable(version=state.table.version, services=services)


def _localize_service(
    svc: Service,
    nodes: Mapping[str, NodeInfo],
    self_node_id: str,
    local_addresses: Mapping[str, str],
    draining: Collection[str],
    memo: dict | None = None,
    seen: dict | None = None,
) -> Service:
    """One service of ``localize``.  ``memo`` (from the last call for this service) maps (endpoint,
    address, via, state) to the localised endpoint made then; ``seen`` collects this call's for the next."""
    routes = []
    for route in svc.routes:
        endpoints = []
        for ep in route.endpoints:
            node = nodes.get(ep.node)
            if node is None or not node.usable:
                continue
            if ep.node == self_node_id:
                address = local_addresses.get(ep.id)
                if address is None:
                    continue
                key = (ep, address, None, "draining" if ep.id in draining else ep.state)
            else:
                via = node.tunnel_addr
                if via is None:
                    continue
                key = (ep, ep.address, via, ep.state)
            out = memo.get(key) if memo is not None else None
            if out is None:
                out = replace(ep, address=key[1], via=key[2], state=key[3])
            if seen is not None:
                seen[key] = out
            endpoints.append(out)
        # the endpoints are a subset of a validated route's, already sorted: no need to check them again
        routes.append(_trusted(Route, port=route.port, endpoints=tuple(endpoints), listen_host=route.listen_host,
                               protocol=route.protocol, match=route.match))  # fmt: skip
    return _trusted(Service, name=svc.name, routes=tuple(routes), options=svc.options)


class Localizer:
    """``localize`` for a sequence of states of one node, reusing what did not change.

    A service is localised again only when its content (its hash), a node one of its
    endpoints is on, or the local address / draining mark of one of its tasks on this
    node changed; the result is always equal to ``localize(state, ...)``.  One per node
    (it remembers that node's last answers); not thread-safe.
    """

    __slots__ = ("_cache", "_memo", "_nodes", "localized", "reused")

    def __init__(self) -> None:
        # service name -> (service hash, node ids it uses, local task ids, local key, localised service)
        self._cache: dict[str, tuple[str, frozenset[str], tuple[str, ...], tuple, Service]] = {}
        self._memo: dict[str, dict] = {}  # service name -> its localised endpoints (see _localize_service)
        self._nodes: dict[str, NodeInfo] = {}
        self.localized = 0  # services localised (counters, for tests and the benchmark)
        self.reused = 0

    def __call__(
        self,
        state: ClusterState,
        self_node_id: str,
        local_addresses: Mapping[str, str],
        draining: Collection[str] = (),
    ) -> RoutingTable:
        nodes = state.node_map()
        old = self._nodes
        changed_nodes = {k for k in nodes.keys() | old.keys() if nodes.get(k) != old.get(k)} if nodes != old else set()
        self._nodes = nodes
        cache: dict[str, tuple[str, frozenset[str], tuple[str, ...], tuple, Service]] = {}
        out = []
        for svc, part in zip(state.table.services, state.parts(), strict=True):
            hit = self._cache.get(svc.name)
            if hit is not None and hit[0] == part.hash and not (hit[1] & changed_nodes):
                local_ids = hit[2]
                key = tuple((local_addresses.get(i), i in draining) for i in local_ids)
                if key == hit[3]:
                    cache[svc.name] = hit
                    out.append(hit[4])
                    self.reused += 1
                    continue
            used = frozenset(ep.node for r in svc.routes for ep in r.endpoints)
            local_ids = tuple(sorted({ep.id for r in svc.routes for ep in r.endpoints if ep.node == self_node_id}))
            key = tuple((local_addresses.get(i), i in draining) for i in local_ids)
            seen: dict = {}
            loc = _localize_service(svc, nodes, self_node_id, local_addresses, draining, self._memo.get(svc.name), seen)
            self._memo[svc.name] = seen
            self.localized += 1
            cache[svc.name] = (part.hash, used, local_ids, key, loc)
            out.append(loc)
        self._cache = cache
        for name in self._memo.keys() - cache.keys():
            del self._memo[name]
        # the services of a validated table, localised: same names, order and listeners
        return _trusted(RoutingTable, version=state.table.version, services=tuple(out))
