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
that see the same swarm publish states with equal digests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from mesh.routing import Route, RoutingTable, Service, TableError, format_hostport

__all__ = ["NODE_AVAILABILITIES", "NODE_STATES", "ClusterState", "NodeInfo", "localize"]

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
        """Content hash (table without version + nodes): equal across managers."""
        body = json.dumps(
            {"services": self.table.to_dict()["services"], "nodes": self._nodes_dict()},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def _nodes_dict(self) -> dict[str, dict[str, Any]]:
        return {n.id: n.to_dict() for n in self.nodes}

    # -- JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table.to_dict(), "nodes": self._nodes_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> ClusterState:
        """Build from the wire shape; raises ``TableError`` naming what is malformed."""
        _check(isinstance(data, dict), "cluster state must be a JSON object")
        _check(isinstance(data.get("table"), dict), "cluster state: 'table' must be an object")
        raw_nodes = data.get("nodes", {})
        _check(isinstance(raw_nodes, dict), "cluster state: 'nodes' must be an object keyed by node id")
        table = RoutingTable.from_dict(data["table"])
        nodes = []
        for node_id, n in raw_nodes.items():
            _check(isinstance(n, dict), f"cluster state: node {node_id!r} must be an object")
            unknown = set(n) - {"addr", "state", "availability", "tunnel"}
            _check(not unknown, f"cluster state: node {node_id!r} has unknown fields {sorted(unknown)}")
            try:
                nodes.append(NodeInfo(id=node_id, **n))
            except TypeError as exc:
                raise TableError(f"cluster state: node {node_id!r}: {exc}") from exc
        return cls(table=table, nodes=tuple(nodes))

    @classmethod
    def from_json(cls, text: str | bytes) -> ClusterState:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TableError(f"cluster state is not JSON: {exc}") from exc
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return f"<ClusterState v{self.version} digest={self.digest} nodes={len(self.nodes)} services={len(self.table.services)}>"


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
    services = []
    for svc in state.table.services:
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
                    st = "draining" if ep.id in draining else ep.state
                    endpoints.append(replace(ep, address=address, via=None, state=st))
                else:
                    via = node.tunnel_addr
                    if via is None:
                        continue
                    endpoints.append(replace(ep, via=via))
            routes.append(
                Route(
                    port=route.port, endpoints=tuple(endpoints), listen_host=route.listen_host, protocol=route.protocol
                )
            )
        services.append(Service(name=svc.name, routes=tuple(routes), options=svc.options))
    return RoutingTable(version=state.table.version, services=tuple(services))
