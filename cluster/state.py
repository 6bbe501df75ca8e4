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

import copy
import functools
import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mesh.routing import Endpoint, Match, Route, RoutingTable, Service, ServiceOptions, TableError, format_hostport

__all__ = [
    "NODE_AVAILABILITIES", "NODE_STATES", "ClusterState", "Localizer", "NodeInfo", "ServicePart", "localize",
    "parse_service",
]  # fmt: skip


_FIELDS: dict[type, tuple[str, ...]] = {}


def _trusted(cls: type, **values: Any) -> Any:
    """An instance of a frozen dataclass whose invariants the caller guarantees (built from parts of
    already-validated objects), without running ``__post_init__`` again: validating a 5,000-endpoint
    table once per subscriber per change is most of a delta's cost.  Falls back to the checked
    constructor if the class gained fields this module does not know."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in fields(cls))
    if names != tuple(values):
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
    """One service of a state in wire form: its canonical JSON and the hash of it.  ``piece`` is what the
    state digest hashes for it (``name=hash;``), kept so that a digest joins bytes instead of formatting."""

    json: bytes
    hash: str
    piece: bytes = b""

    @classmethod
    def of(cls, service_dict: Mapping[str, Any]) -> ServicePart:
        body = _canonical(service_dict)
        h = _hash(body)
        return cls(body, h, f"{service_dict['name']}={h};".encode())

    @classmethod
    def raw(cls, name: str, body: bytes) -> ServicePart:
        """The part of service ``name`` from its JSON as received (the sender's canonical form)."""
        h = _hash(body)
        return cls(body, h, f"{name}={h};".encode())


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
    # service name -> position; node id -> NodeInfo (shared read-only between derived states); node id ->
    # position; each node's canonical JSON piece, aligned with nodes
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)
    _by_id: dict[str, NodeInfo] | None = field(default=None, init=False, repr=False, compare=False)
    _node_index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)
    _node_pieces: tuple[bytes, ...] | None = field(default=None, init=False, repr=False, compare=False)
    # set by with_changes: (digest of the state it was derived from, names of the services it replaced or
    # removed, ids of the nodes it changed), so that Localizer looks at those only
    _lineage: tuple[str, frozenset[str], frozenset[str]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        nodes = tuple(sorted(self.nodes, key=lambda n: n.id))
        ids = [n.id for n in nodes]
        _check(len(ids) == len(set(ids)), "duplicate node ids in cluster state")
        object.__setattr__(self, "nodes", nodes)

    @property
    def version(self) -> int:
        return self.table.version

    def node_map(self) -> dict[str, NodeInfo]:
        return dict(self._nodes_by_id())

    def _nodes_by_id(self) -> dict[str, NodeInfo]:
        """Nodes by id, computed once and shared with derived states: never mutate it."""
        if self._by_id is None:
            object.__setattr__(self, "_by_id", {n.id: n for n in self.nodes})
        assert self._by_id is not None
        return self._by_id

    def _service_index(self) -> dict[str, int]:
        if self._index is None:
            object.__setattr__(self, "_index", {s.name: i for i, s in enumerate(self.table.services)})
        assert self._index is not None
        return self._index

    def _pieces(self) -> tuple[bytes, ...]:
        if self._node_pieces is None:
            object.__setattr__(self, "_node_pieces", tuple(_node_piece(n) for n in self.nodes))
        assert self._node_pieces is not None
        return self._node_pieces

    @property
    def digest(self) -> str:
        """Content hash (table without version + nodes): equal across managers.  It hashes the
        per-service hashes and the nodes' hash, so it is cheap for a state derived with
        ``with_changes`` or primed with ``reuse``."""
        if self._digest is None:
            pieces = [p.piece or f"{s.name}={p.hash};".encode() for s, p in zip(self.table.services, self.parts(),
                                                                                 strict=True)]  # fmt: skip
            pieces.append(b"nodes=" + self.nodes_part()[1].encode())
            object.__setattr__(self, "_digest", hashlib.sha256(b"".join(pieces)).hexdigest()[:16])
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
            body = b"{%s}" % b",".join(self._pieces())
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
        (None removes a node), at ``version``.  Unchanged services keep their objects and wire form.

        What a delta does, so its cost follows the change: replacing services and nodes that exist is done
        in place (positions, indexes and the other nodes' JSON pieces are shared); adding or removing some
        rebuilds the lists (still without serialising or validating the unchanged services again)."""
        old_svcs, old_parts, index = self.table.services, self.parts(), self._service_index()
        svcs, parts = list(old_svcs), list(old_parts)
        in_place = True
        relisten = False  # a changed or added service listens differently: the table is checked again
        for name, v in services.items():
            i = index.get(name)
            if v is None or i is None:
                in_place = False
                relisten = relisten or v is not None
                continue
            svcs[i], parts[i] = v
            relisten = relisten or _listen_keys(old_svcs[i]) != _listen_keys(v[0])
        new_index: dict[str, int] | None = index
        if not in_place:
            kept = [(s, p) for s, p in zip(old_svcs, old_parts, strict=True) if s.name not in services]
            kept += [v for v in services.values() if v is not None]
            kept.sort(key=lambda sp: sp[0].name)
            svcs, parts = [s for s, _ in kept], [p for _, p in kept]
            new_index = None
        # Changes of endpoints only (scale, update, node down) cannot make two routes conflict.
        if relisten:
            table = RoutingTable(version=version, services=tuple(svcs))
        else:
            table = _trusted(RoutingTable, version=version, services=tuple(svcs))
        caches: dict[str, Any] = {"_nodes_part": self._nodes_part, "_by_id": self._by_id,
                                  "_node_index": self._node_index, "_node_pieces": self._node_pieces}  # fmt: skip
        new_nodes = self.nodes
        if nodes:
            by_id = self._nodes_by_id()
            if all(info is not None and info.id == nid and nid in by_id for nid, info in nodes.items()):
                # the same node ids, so the same order: replace them where they are
                nidx = self._node_index
                if nidx is None:
                    nidx = {n.id: i for i, n in enumerate(self.nodes)}
                    object.__setattr__(self, "_node_index", nidx)
                listed, pieces, merged = list(self.nodes), list(self._pieces()), dict(by_id)
                for nid, info in nodes.items():
                    assert info is not None
                    i = nidx[nid]
                    listed[i], pieces[i], merged[nid] = info, _node_piece(info), info
                new_nodes = tuple(listed)
                caches = {"_nodes_part": None, "_by_id": merged, "_node_index": nidx, "_node_pieces": tuple(pieces)}
            else:
                merged = dict(by_id)
                for nid, info in nodes.items():
                    if info is None:
                        merged.pop(nid, None)
                    else:
                        merged[nid] = info
                new_nodes = ClusterState(table=table, nodes=tuple(merged.values())).nodes  # sorted and checked
                caches = {"_nodes_part": None, "_by_id": None, "_node_index": None, "_node_pieces": None}
        lineage = (self.digest, frozenset(services), frozenset(nodes or ()))
        return _trusted(ClusterState, table=table, nodes=new_nodes, _parts=tuple(parts), _nodes_part=caches["_nodes_part"],
                        _digest=None, _index=new_index, _by_id=caches["_by_id"], _node_index=caches["_node_index"],
                        _node_pieces=caches["_node_pieces"], _lineage=lineage)  # fmt: skip

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


_ROUTE_KEYS = frozenset({"port", "listen_host", "protocol", "endpoints", "match"})
_ENDPOINT_KEYS = frozenset({"address", "id", "node", "port", "state", "via", "weight"})


def parse_service(d: Any, previous: Service | None = None, options: ServiceOptions | None = None) -> Service:
    """A service from its wire form (``RoutingTable.from_dict``'s rules and errors), reusing the Endpoint
    objects of ``previous`` (the same service in the state a delta is based on) that equal the ones ``d``
    lists, and ``options`` when the caller knows ``d``'s options are the ones it was parsed from.

    What a delta costs follows what changed: a rolling update of one task in a 50-task service builds and
    validates one new Endpoint, and the 49 others are the objects the subscriber already holds (validated
    when they arrived; the Localizer recognises them by identity).  Route and Service are still built by
    their checked constructors.  Anything unusual (a field this parser does not know) takes the general
    path, so errors are the same as ``RoutingTable.from_dict``'s."""
    if not isinstance(d, dict) or not isinstance(d.get("routes"), list) or not isinstance(d.get("name"), str):
        return _parse_service_slow(d)
    if options is None:
        options = _options(d.get("options"))
    old: dict[str, Endpoint] = {}
    if previous is not None:
        for r in previous.routes:
            for e in r.endpoints:
                old[e.id] = e
    try:
        routes = []
        for r in d["routes"]:
            if not isinstance(r, dict) or not r.keys() <= _ROUTE_KEYS or not isinstance(r.get("endpoints", []), list):
                return _parse_service_slow(d)
            eps = []
            for e in r.get("endpoints", ()):
                if type(e) is dict and e.keys() == _ENDPOINT_KEYS:
                    o = old.get(e["id"])
                    if (o is not None and e["address"] == o.address and e["node"] == o.node and e["port"] == o.port
                            and e["state"] == o.state and e["via"] == o.via and e["weight"] == o.weight
                            and type(e["port"]) is int and type(e["weight"]) is int):  # fmt: skip
                        eps.append(o)
                        continue
                eps.append(Endpoint(**e))
            routes.append(Route(port=r["port"], listen_host=r.get("listen_host", "0.0.0.0"),
                                protocol=r.get("protocol", "tcp"), match=Match(**(r.get("match") or {})),
                                endpoints=tuple(eps)))  # fmt: skip
        return Service(name=d["name"], routes=tuple(routes), options=options)
    except TableError:
        raise
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise TableError(f"malformed routing table: {exc!r}") from exc


_OPTIONS: list[tuple[Any, ServiceOptions]] = []  # the last options parsed (most services share a few)


def _options(raw: Any) -> ServiceOptions:
    """``ServiceOptions`` of a service's wire form, remembered: equal wire forms parse to equal options."""
    for known, opts in _OPTIONS:
        if _same_json(known, raw):
            return opts
    opts = _parse_service_slow({"name": "-", "options": raw, "routes": []}).options
    _OPTIONS.insert(0, (copy.deepcopy(raw), opts))
    del _OPTIONS[8:]
    return opts


def _same_json(a: Any, b: Any) -> bool:
    """Equal JSON values, types included (``1``, ``1.0`` and ``true`` differ: they may not parse alike)."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same_json(v, b[k]) for k, v in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _parse_service_slow(d: Any) -> Service:
    return RoutingTable.from_dict({"services": [d]}).services[0]


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
    vias: dict[str, str | None] | None = None,
    used: set[str] | None = None,
    local_ids: set[str] | None = None,
) -> Service:
    """One service of ``localize``.

    ``memo`` (from the last call for this service) maps an endpoint id to (endpoint, address, via, state,
    localised endpoint) as made then; ``seen`` collects this call's for the next.  A memo entry is used only
    for an endpoint equal to the one it was made from (the same object when the client reused it), so it
    never changes the result.  ``vias``: node id -> that node's tunnel "addr:port", or None when its tasks
    take nothing from here; a caller may keep it across calls as long as it drops the nodes that changed.
    ``used`` and ``local_ids`` collect the node ids the service's endpoints are on and its task ids on this
    node (what the Localizer watches)."""
    if vias is None:
        vias = {}
    routes = []
    for route in svc.routes:
        endpoints = []
        for ep in route.endpoints:
            nid = ep.node
            if used is not None:
                used.add(nid)
            if nid == self_node_id:
                if local_ids is not None:
                    local_ids.add(ep.id)
                node = nodes.get(nid)
                if node is None or not node.usable:
                    continue
                address = local_addresses.get(ep.id)
                if address is None:
                    continue
                via = None
                state = "draining" if ep.id in draining else ep.state
            else:
                try:
                    via = vias[nid]
                except KeyError:
                    node = nodes.get(nid)
                    via = vias[nid] = node.tunnel_addr if node is not None and node.usable else None
                if via is None:
                    continue
                address, state = ep.address, ep.state
            m = memo.get(ep.id) if memo is not None else None
            if m is not None and (m[0] is ep or m[0] == ep) and m[1] == address and m[2] == via and m[3] == state:
                out = m[4]
            else:
                out = replace(ep, address=address, via=via, state=state)
                m = (ep, address, via, state, out)
            if seen is not None:
                seen[ep.id] = m
            endpoints.append(out)
        # the endpoints are a subset of a validated route's, already sorted: no need to check them again
        routes.append(_trusted(Route, port=route.port, endpoints=tuple(endpoints), listen_host=route.listen_host,
                               protocol=route.protocol, match=route.match))  # fmt: skip
    return _trusted(Service, name=svc.name, routes=tuple(routes), options=svc.options)


class Localizer:
    """``localize`` for a sequence of states of one node, reusing what did not change.

    A service is localised again only when its content (its hash), a node one of its
    endpoints is on, or the local address / draining mark of one of its tasks on this
    node changed; the result is always equal to ``localize(state, ...)``.  A state that
    ``with_changes`` derived from the last one localised (what a delta gives) names what
    it changed, so only those services, the services on changed nodes and the services
    with tasks on this node are looked at: the cost follows the change, not the cluster.
    One per node (it remembers that node's last answers); not thread-safe.
    """

    __slots__ = ("_cache", "_digest", "_local", "_memo", "_nodes", "_self", "_vias", "localized", "reused")

    def __init__(self) -> None:
        # service name -> (service hash, node ids it uses, local task ids, local key, localised service)
        self._cache: dict[str, tuple[str, frozenset[str], tuple[str, ...], tuple, Service]] = {}
        self._memo: dict[str, dict] = {}  # service name -> its localised endpoints (see _localize_service)
        self._nodes: dict[str, NodeInfo] = {}
        self._vias: dict[str, str | None] = {}  # node id -> its tunnel, or None (see _localize_service)
        self._local: set[str] = set()  # services with tasks on this node (they depend on local_addresses)
        self._digest = ""  # of the last state localised
        self._self = ""
        self.localized = 0  # services localised (counters, for tests and the benchmark)
        self.reused = 0

    def __call__(
        self,
        state: ClusterState,
        self_node_id: str,
        local_addresses: Mapping[str, str],
        draining: Collection[str] = (),
    ) -> RoutingTable:
        nodes = state._nodes_by_id()
        lineage = state._lineage
        if lineage is not None and lineage[0] == self._digest and self_node_id == self._self and self._digest:
            out = self._follow(state, lineage[1], lineage[2], nodes, local_addresses, draining)
        else:
            out = self._all(state, nodes, self_node_id, local_addresses, draining)
        self._nodes = nodes
        self._digest = state.digest
        self._self = self_node_id
        # the services of a validated table, localised: same names, order and listeners
        return _trusted(RoutingTable, version=state.table.version, services=out)

    def _localize(self, svc: Service, part: ServicePart, nodes: Mapping[str, NodeInfo], self_node_id: str,
                  local_addresses: Mapping[str, str], draining: Collection[str]) -> Service:  # fmt: skip
        used: set[str] = set()
        local_set: set[str] = set()
        seen: dict = {}
        loc = _localize_service(svc, nodes, self_node_id, local_addresses, draining, self._memo.get(svc.name), seen,
                                self._vias, used, local_set)  # fmt: skip
        local_ids = tuple(sorted(local_set))
        key = tuple((local_addresses.get(i), i in draining) for i in local_ids)
        self._memo[svc.name] = seen
        self.localized += 1
        self._cache[svc.name] = (part.hash, used, local_ids, key, loc)
        if local_ids:
            self._local.add(svc.name)
        else:
            self._local.discard(svc.name)
        return loc

    def _follow(self, state: ClusterState, changed: frozenset[str], changed_nodes: frozenset[str],
                nodes: Mapping[str, NodeInfo], local_addresses: Mapping[str, str],
                draining: Collection[str]) -> tuple[Service, ...]:  # fmt: skip
        """The next state of the one localised last: look at what it says changed, and at local tasks."""
        cache = self._cache
        again = set(changed)
        if changed_nodes:
            for nid in changed_nodes:
                self._vias.pop(nid, None)
            again.update(name for name, hit in cache.items() if hit[1] & changed_nodes)
        for name in self._local:
            hit = cache[name]
            if tuple((local_addresses.get(i), i in draining) for i in hit[2]) != hit[3]:
                again.add(name)
        index = state._service_index()
        services, parts = state.table.services, state.parts()
        for name in again:
            i = index.get(name)
            if i is None:  # removed
                cache.pop(name, None)
                self._memo.pop(name, None)
                self._local.discard(name)
            else:
                self._localize(services[i], parts[i], nodes, self._self, local_addresses, draining)
        self.reused += len(services) - len(again & index.keys())
        return tuple(cache[s.name][4] for s in services)

    def _all(self, state: ClusterState, nodes: Mapping[str, NodeInfo], self_node_id: str,
             local_addresses: Mapping[str, str], draining: Collection[str]) -> tuple[Service, ...]:  # fmt: skip
        old = self._nodes
        changed_nodes = (
            {k for k in nodes.keys() | old.keys() if nodes.get(k) != old.get(k)}
            if nodes is not old and nodes != old
            else set()
        )
        previous, self._cache = self._cache, {}
        if self_node_id != self._self:
            previous, self._memo, self._vias = {}, {}, {}
        for nid in changed_nodes:
            self._vias.pop(nid, None)
        self._local = set()
        out = []
        for svc, part in zip(state.table.services, state.parts(), strict=True):
            hit = previous.get(svc.name)
            if hit is not None and hit[0] == part.hash and not (hit[1] & changed_nodes):
                if tuple((local_addresses.get(i), i in draining) for i in hit[2]) == hit[3]:
                    self._cache[svc.name] = hit
                    if hit[2]:
                        self._local.add(svc.name)
                    out.append(hit[4])
                    self.reused += 1
                    continue
            out.append(self._localize(svc, part, nodes, self_node_id, local_addresses, draining))
        for name in self._memo.keys() - self._cache.keys():
            del self._memo[name]
        return tuple(out)
