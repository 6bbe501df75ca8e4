"""Cluster mode agent: one per swarm node (``mesh run --cluster ...``, meshagent/cli.py).

Wiring (docs/cluster.md, "The agent")::

    local engine ──/info──▶ role, own node id, Swarm.RemoteManagers
       │ container events ──▶ LocalTasks (discovery.localtasks): task id -> reachable address,
       │                      locally killed tasks
       │
    manager:  ClusterWatcher (discovery.cluster) ──ClusterState──▶ ControlServer (serves every agent)
                                                       └──────────▶ this agent (no HTTP hop)
    worker:   ControlClient (long-poll any manager, fail over) ──ClusterState──▶ this agent
       │
    agent: localize(state, node, LocalTasks) ──RoutingTable──▶ mesh.runtime.Mesh.apply
           TunnelServer: resolve(task) in the CURRENT localized table (local endpoints of mesh
           services only, draining ones included; a target not known here yet -- a task the
           state places here that the local listing has not seen, or one another agent's newer
           state places here -- is waited for, up to 1 s, unless its container went away here);
           allowed peers = the nodes' addresses
    admin API (mesh.admin.AdminServer): the data plane's /metrics, /v1/table ... and /v1/cluster/status;
    its dashboard (/ui/) on a manager shows every node (meshagent.clusterview: the manager asks each
    node's NodeReport through the tunnel, target "@dashboard", only while someone watches)

Rules:
- The cluster state and the local tasks are two inputs; a change of either
  re-localises.  Applies are serialised and coalesced (latest wins); a table with
  the same content as the applied one is not applied again.
- A local kill/stop/die drains that task at once (``LocalTasks.draining``)
  without waiting for a manager; the next listing drops it.
- While no manager answers, the last state stays applied (ControlClient rules);
  local events still refresh the local endpoints.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.control import DEFAULT_CONTROL_PORT, ControlClient, ControlServer, ControlTLS
from cluster.state import ClusterState, Localizer
from cluster.token import read_token
from cluster.tunnel import DEFAULT_TUNNEL_PORT, LocalTarget, TunnelAuth, TunnelServer
from cluster.udp_tunnel import UdpTunnelServer
from discovery.engine import Engine, EngineError, resolve_docker_host
from discovery.localtasks import LocalTasks
from mesh.dashboard import Dashboard
from mesh.errors import ConfigError
from mesh.pool import Pool
from mesh.proxy.preamble import endpoint_target
from mesh.routing import RoutingTable, format_hostport, parse_hostport
from meshagent.clusterview import DASHBOARD_TARGET, ClusterView, NodeReport

__all__ = ["STATUS_PATH", "ClusterAgent", "ClusterSettings", "agent_admin", "run_cluster_agent"]

log = logging.getLogger(__name__)

STATUS_PATH = "/v1/cluster/status"
# How long a sealed tunnel header naming a target this agent does not know yet waits for its local
# listing / cluster state to catch up before it is refused as unknown_target (``ClusterAgent._resolve``).
LATE_TARGET_WAIT = 1.0
# A tunnel or control port another process holds (an old agent without --handover during a start-first
# update) is tried again after BIND_RETRY_INITIAL seconds, doubling to BIND_RETRY_MAX: short, because
# the old agent goes away any moment (like mesh.runtime's REBIND_* for the data-plane ports).
BIND_RETRY_INITIAL = 0.25
BIND_RETRY_MAX = 2.0


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """The agent's settings, as ``mesh run --cluster`` takes them (flag names in the messages of ``check``)."""

    token_file: str
    docker: str | None = None  # the local engine (None: DOCKER_HOST / the local socket)
    control_port: int = DEFAULT_CONTROL_PORT
    tunnel_port: int = DEFAULT_TUNNEL_PORT
    advertise: str | None = None  # this node's address (None: Swarm.NodeAddr)
    bind: str = "0.0.0.0"  # address of the control and tunnel servers
    control_wait: float = 20.0  # long-poll wait, seconds
    grace: float = 10.0  # seconds open connections get on shutdown
    # --control-tls-*: TLS on the control channel (cluster.control.ControlTLS; off without a CA)
    control_tls_ca: str | None = None
    control_tls_cert: str | None = None
    control_tls_key: str | None = None
    control_tls_name: str | None = None
    control_tls_mutual: bool = False

    def check(self) -> None:
        """Raise ``ConfigError`` naming the first bad setting."""
        for name, port in (("--control-port", self.control_port), ("--tunnel-port", self.tunnel_port)):
            if not 0 < port < 65536:
                raise ConfigError(f"{name} must be 1-65535, got {port}")
        if not self.control_wait > 0:
            raise ConfigError(f"--control-wait must be > 0, got {self.control_wait}")
        if self.grace < 0:
            raise ConfigError(f"--grace must be >= 0, got {self.grace}")


def _manager_addresses(info: dict[str, Any], control_port: int) -> list[tuple[str, int]]:
    out = []
    for m in (info.get("Swarm") or {}).get("RemoteManagers") or ():
        addr = str((m or {}).get("Addr") or "")
        if not addr:
            continue
        try:
            host, _ = parse_hostport(addr)
        except ValueError:
            continue
        out.append((host, control_port))
    return sorted(set(out))


class TunnelPools:
    """``--workers N``: this process has no data plane, yet its tunnel servers dial the node's local
    replicas through pools as a one-process agent's Mesh does (``local_host``): a refused replica is
    retried on another local one of the service, and UDP sessions re-choose.  Pools are kept by
    (service, protocol, port, match) across tables, so ejections survive; no health checks run here
    (the workers run them for their own pools)."""

    def __init__(self, local_node: str) -> None:
        self.local_node = local_node
        self.pools: dict[tuple[Any, ...], Pool] = {}
        self._index: dict[tuple[str, int, str], tuple[Pool, Any]] | None = None

    def apply(self, table: RoutingTable) -> None:
        pools: dict[tuple[Any, ...], Pool] = {}
        for svc, route in table.routes():
            if not any(e.via is None for e in route.endpoints):
                continue  # no local replica: nothing a tunnel could dial
            key = (svc.name, route.protocol, route.listen_host, route.port, route.match)
            options = svc.options.for_protocol(route.protocol)
            pool = self.pools.get(key)
            if pool is None:
                pool = Pool(svc.name, route, options, local_node=self.local_node)
            else:
                pool.update(route, options)
            pools[key] = pool
        self.pools = pools
        self._index = None

    def local_host(self, endpoint_id: str, port: int, transport: str = "stream") -> tuple[Pool, Any] | None:
        index = self._index
        if index is None:
            index = {}
            for (_, protocol, _, _, _), pool in self.pools.items():
                kind = "udp" if protocol == "udp" else "stream"
                for host in pool.hosts:
                    if host.via is None:
                        index.setdefault((host.endpoint.id, host.port, kind), (pool, host))
            self._index = index
        return index.get((endpoint_id, port, "udp" if transport == "udp" else "stream"))


class ClusterAgent:
    """The cluster-mode agent of one node (see the module docstring).

    ``docker_host``: the local engine ("unix:///var/run/docker.sock", ...).
    ``bind``: address for the control and tunnel servers (all interfaces by default).
    ``status()`` is what the admin API serves at /v1/cluster/status (``agent_admin``).
    ``mesh_factory(local_node, tunnel_header)`` builds the data plane (tests may pass
    their own); by default ``mesh.runtime.Mesh``.
    """

    def __init__(
        self,
        docker_host: str | None,
        token: str,
        *,
        control_port: int = DEFAULT_CONTROL_PORT,
        tunnel_port: int = DEFAULT_TUNNEL_PORT,
        advertise: str | None = None,
        bind: str = "0.0.0.0",
        control_wait: float = 20.0,
        mesh_factory: Callable[..., Any] | None = None,
        workers: int = 1,
        worker_args: Sequence[str] = (),
        token_file: str | None = None,
        control_tls: ControlTLS | None = None,
    ) -> None:
        self.host = resolve_docker_host(docker_host, os.environ)
        self.control_tls = control_tls  # None: the control channel is plain HTTP
        self.token = token
        self.control_port = control_port
        self.tunnel_port = tunnel_port
        self.advertise = advertise
        self.bind = bind
        self.control_wait = control_wait
        self._mesh_factory = mesh_factory
        # --workers N: the data plane runs in N worker processes (meshagent/workers.py) fed with the
        # localized table; this process keeps the cluster state, the tunnel and control servers.
        # ``mesh`` is then the WorkerPool, and the tunnels dial through ``tunnel_pools``.
        self.workers = workers
        self.worker_args = list(worker_args)
        self.token_file = token_file
        self.tunnel_pools: TunnelPools | None = None
        self.engine = Engine(self.host)
        self.node_id = ""
        self.manager = False
        self.managers: list[tuple[str, int]] = []
        self.state: ClusterState | None = None
        self.table: RoutingTable | None = None  # last applied (localized)
        self.applied_at = 0.0
        self.applies = 0
        self.mesh: Any = None
        self.local = LocalTasks(self.engine, self._changed)
        # Every tunnel header is sealed with the cluster token and checked (mesh.proxy.preamble.TunnelAuth):
        # the node-address check alone cannot tell an agent from a container on that node.
        self.tunnel_auth = TunnelAuth(token)
        self.tunnel = TunnelServer(
            self._resolve, self._peer_allowed, host=bind, port=tunnel_port, auth=self.tunnel_auth
        )
        self.udp_tunnel: UdpTunnelServer | None = None  # the same port number over UDP, bound at start()
        self.control_server: ControlServer | None = None
        self.control_client: ControlClient | None = None
        self.watcher: Any = None
        self._peers: frozenset[str] = frozenset()
        self._targets: dict[str, LocalTarget] = {}
        self._state_local: frozenset[str] = frozenset()  # task ids the cluster state places on this node
        self._applied = asyncio.Event()  # set (and replaced) after each apply
        self._version = 0
        self._dirty = asyncio.Event()
        self._localize = Localizer()  # localize() that re-localises only the services that changed
        self._tasks: list[asyncio.Task[Any]] = []
        # Ports that could not be bound yet ("tunnel", "udp-tunnel", "control" -> the error): retried
        # with backoff (``_rebind_loop``), not ready meanwhile.
        self.unbound: dict[str, str] = {}
        self._control_bound = False
        self._admin_inner: Any = None
        # Tunnel targets not known here when their header arrived (``_resolve``): how many waited for this
        # agent's listing / cluster state to catch up, were then found, or were refused after the wait.
        self.late_target_wait = LATE_TARGET_WAIT
        self.late_targets = {"waited": 0, "found": 0, "refused": 0}
        self.report = NodeReport(self._node_view, token)  # this node's dashboard view, for the managers
        self.dashboard: Dashboard | None = None  # set in start(); agent_admin serves it

    def __repr__(self) -> str:
        role = "manager" if self.manager else "worker"
        digest = self.state.digest if self.state else None
        return f"<ClusterAgent node={self.node_id} {role} state={digest} table={self.table and self.table.version}>"

    # -- lifecycle ------------------------------------------------------------------
    async def start(self, info_timeout: float = 60.0) -> None:
        """Read the engine's role, bind the tunnel and control ports, start following."""
        info = await self._first_info(info_timeout)
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("NodeID"):
            raise ConfigError(f"the docker engine at {self.host.url} is not part of an active swarm")
        self.node_id = str(swarm["NodeID"])
        self.manager = bool(swarm.get("ControlAvailable"))
        self.advertise = self.advertise or str(swarm.get("NodeAddr") or "") or None
        self.managers = _manager_addresses(info, self.control_port)
        self.mesh = self._make_mesh()
        if self.workers > 1:
            self.tunnel_pools = TunnelPools(self.node_id)
            await self.mesh.start()
        self.dashboard = Dashboard(
            self.admin_state(), node=self.node_id, info=self.dashboard_info, collect=ClusterView(self)
        )
        await self.report.start()
        if self.manager:
            tls = self.control_tls.server_context() if self.control_tls is not None else None
            self.control_server = ControlServer(self.token, self.bind, self.control_port, tls=tls)
        if not await self._bind_servers():
            # Another process holds a port (an old agent without --handover during a start-first
            # update): keep trying with backoff, not ready meanwhile, rather than exit.
            self._spawn(self._rebind_loop(), "cluster-rebind")
        if self.manager:
            from discovery.cluster import ClusterWatcher

            self.watcher = ClusterWatcher(self.engine, self._manager_state, tunnel_port=self.tunnel_port)
            self._spawn(self.watcher.run(), "cluster-watcher")
        else:
            # backoff capped at 2 s (not the client's 10 s): a returning manager is picked up
            # quickly, and one request per worker every 2 s is nothing for a manager
            self.control_client = ControlClient(
                lambda: self.managers, self.token, self._on_state, wait=self.control_wait, backoff_cap=2.0,
                tls=self.control_tls,
            )  # fmt: skip
            await self.control_client.start()
        self._spawn(self.local.run(), "local-tasks")
        self._spawn(self._apply_loop(), "cluster-apply")
        self._spawn(self._info_loop(), "engine-info")
        log.info(
            "cluster agent on node %s (%s, advertise %s): tunnel %s, control %s, managers %s",
            self.node_id, "manager" if self.manager else "worker", self.advertise,
            format_hostport(self.bind, self.tunnel.port),
            format_hostport(self.bind, self.control_server.port) if self.control_server else "-",
            ", ".join(format_hostport(*m) for m in self.managers) or "-",
        )  # fmt: skip

    async def _bind_servers(self) -> bool:
        """Bind what is not bound yet: the tunnel (TCP, then UDP on the same port number) and, on a
        manager, the control server.  True when all are bound; the failures are in ``unbound``."""
        unbound: dict[str, str] = {}
        if self.tunnel._acceptor is None:
            try:
                await self.tunnel.start()
            except OSError as exc:
                unbound["tunnel"] = str(exc)
        if self.udp_tunnel is None and self.tunnel._acceptor is not None:
            udp = UdpTunnelServer(
                self._resolve_udp, self._peer_allowed, host=self.bind, port=self.tunnel.port, auth=self.tunnel_auth
            )
            try:
                udp.start()
                self.udp_tunnel = udp
            except OSError as exc:
                unbound["udp-tunnel"] = str(exc)
        server = self.control_server
        if server is not None and not self._control_bound:
            try:
                await server.start()
                self._control_bound = True
            except OSError as exc:
                unbound["control"] = str(exc)
                if server._runner is not None:
                    await server._runner.cleanup()  # its next start() sets up a new one
        if unbound and unbound != self.unbound:
            log.warning("not ready: %s; retrying", "; ".join(f"{k}: {v}" for k, v in unbound.items()))
        elif self.unbound and not unbound:
            log.info("tunnel and control ports bound on retry: ready")
        self.unbound = unbound
        return not unbound

    async def _rebind_loop(self) -> None:
        delay = BIND_RETRY_INITIAL
        while True:
            await asyncio.sleep(delay)
            if await self._bind_servers():
                return
            delay = min(delay * 2, BIND_RETRY_MAX)

    def ready(self) -> bool:
        """The data plane is ready and the tunnel (and, on a manager, the control port) is bound."""
        return not self.unbound and self._admin_inner is not None and self._admin_inner.ready()

    async def stop(self, grace: float = 5.0) -> None:
        if self.control_server is not None and self._control_bound:
            await self.control_server.stop()
        if self.control_client is not None:
            await self.control_client.stop()
        if self.watcher is not None:
            self.watcher.stop()
        self.local.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.udp_tunnel is not None:
            self.udp_tunnel.close()
        await self.tunnel.stop(grace)
        await self.report.stop()
        if self.dashboard is not None:
            await self.dashboard.close()
        if self.mesh is not None:
            await self.mesh.shutdown(grace)
        await self.engine.close()

    def admin_state(self) -> Any:
        """The admin API's view of the data plane: the Mesh, or the worker pool (counters summed);
        ready (/readyz) only while the tunnel and control ports are bound too (``ready``)."""
        from mesh.admin import CallbackState, MeshState, WorkerPoolState

        inner = WorkerPoolState(self.mesh) if self.workers > 1 else MeshState(self.mesh)
        self._admin_inner = inner
        return CallbackState(inner.table, self.ready, inner.snapshots)

    # -- handover (meshagent/handover.py) --------------------------------------------
    def offers(self) -> list[Any]:
        """Every listening socket of this agent, for a successor: the data plane's, the tunnel (TCP and
        UDP) and, on a manager, the control server."""
        from meshagent.handover import Offer, server_sockets

        out = []
        if self.mesh is not None:
            out += [Offer(k, h, p, role, sock) for k, h, p, role, sock in self.mesh.listening_sockets()]
        acceptor = self.tunnel._acceptor
        if acceptor is not None and acceptor.listen_socket is not None:
            out.append(Offer("stream", self.bind, self.tunnel_port, "tunnel", acceptor.listen_socket))
        if self.udp_tunnel is not None and self.udp_tunnel.listen_socket is not None:
            out.append(Offer("dgram", self.bind, self.tunnel_port, "udp-tunnel", self.udp_tunnel.listen_socket))
        if self.control_server is not None and self._control_bound:
            out += [Offer("stream", self.bind, self.control_port, "control", s)
                    for s in server_sockets(self.control_server._runner)]  # fmt: skip
        return out

    def stop_accepting(self) -> None:
        """A successor serves this agent's sockets: stop every accept loop (this process's descriptors
        only; the kernel sockets stay open in the successor).  Open connections drain in ``stop``."""
        from meshagent.handover import close_listeners

        if self.mesh is not None:
            self.mesh.stop_accepting()
        if self.tunnel._acceptor is not None:
            self.tunnel._acceptor.close()
        if self.udp_tunnel is not None:
            self.udp_tunnel.close()
        if self.control_server is not None and self._control_bound:
            close_listeners(self.control_server._runner)

    async def wait_applied(self) -> None:
        """Until the first table is applied."""
        while not self.applies:
            await self._applied.wait()

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster agent: %s stopped: %r", task.get_name(), task.exception())

    def _make_mesh(self) -> Any:
        if self.workers > 1:
            from meshagent.workers import WorkerPool

            if not self.token_file:
                raise ConfigError("--cluster --workers N needs --token-file (the workers seal tunnel headers)")
            args = [*self.worker_args, "--node", self.node_id, "--token-file", self.token_file]
            return WorkerPool(self.workers, args)
        if self._mesh_factory is not None:
            return self._mesh_factory(local_node=self.node_id, tunnel_header=self.tunnel_auth.host_header)
        from mesh.runtime import Mesh

        params = inspect.signature(Mesh).parameters
        if "tunnel_header" not in params:
            raise ConfigError("mesh.runtime.Mesh has no tunnel_header parameter: cluster mode cannot dial tunnels")
        return Mesh(local_node=self.node_id, tunnel_header=self.tunnel_auth.host_header, tunnel_auth=self.tunnel_auth)

    async def _first_info(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.engine.info()
            except EngineError as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(f"no docker engine answers at {self.host.url}: {exc}") from exc
                log.warning("docker engine %s: %s; retrying", self.host.url, exc)
                await asyncio.sleep(1.0)

    async def _info_loop(self, interval: float = 5.0) -> None:
        """Follow Swarm.RemoteManagers (a worker's failover list) and notice role changes."""
        while True:
            await asyncio.sleep(interval)
            try:
                info = await self.engine.info()
            except EngineError:
                continue  # the local engine is away: keep the last list
            managers = _manager_addresses(info, self.control_port)
            if managers and managers != self.managers:
                log.info("managers now %s", ", ".join(format_hostport(*m) for m in managers))
                self.managers = managers
            if bool((info.get("Swarm") or {}).get("ControlAvailable")) != self.manager:
                log.warning("this node's swarm role changed; restart the agent to switch roles")

    # -- state in -------------------------------------------------------------------
    def _manager_state(self, state: ClusterState) -> None:
        assert self.control_server is not None
        self.control_server.publish(state)
        self._on_state(state)

    def _on_state(self, state: ClusterState) -> None:
        self.state = state
        self._state_local = frozenset(
            e.id for _, r in state.table.routes() for e in r.endpoints if e.node == self.node_id
        )
        self._peers = frozenset({n.addr for n in state.nodes} | ({self.advertise} if self.advertise else set()))
        self._changed()

    def _changed(self) -> None:
        self._dirty.set()

    async def _apply_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self.state is None or not self.local.ready.is_set():
                continue  # nothing to localise yet (the first state or listing sets _dirty again)
            table = self._localize(self.state, self.node_id, self.local.addresses, self.local.draining)
            if self.table is not None and table.same_content(self.table):
                continue
            self._version += 1
            table = RoutingTable(version=self._version, services=table.services)
            try:
                if self.tunnel_pools is not None:
                    self.tunnel_pools.apply(table)
                    await self.mesh.publish(table)
                else:
                    await self.mesh.apply(table)
            except Exception:
                log.exception("applying table version %d failed; keeping the previous one", table.version)
                continue
            self.table = table
            self._targets = _local_targets(table)
            self.applied_at = time.time()
            self.applies += 1
            applied, self._applied = self._applied, asyncio.Event()
            applied.set()
            log.info("table v%d applied (cluster state %s): %s", table.version, self.state.digest,
                     ", ".join(f"{s.name}:{r.port}->{sum(e.via is None for e in r.endpoints)} local/"
                               f"{len(r.endpoints)}" for s, r in table.routes()) or "no services")  # fmt: skip

    # -- tunnel ---------------------------------------------------------------------
    def _peer_allowed(self, ip: str) -> bool:
        return ip in self._peers

    def _resolve_udp(self, target: str) -> tuple[Any, Any] | None:
        """A UDP tunnel target: a local udp endpoint of a mesh service, as the data plane's own (pool, host)."""
        ep_id, _, port = target.rpartition(":")
        local_host = getattr(self.tunnel_pools or self.mesh, "local_host", None)
        if local_host is None or not port.isdigit():
            return None
        return local_host(ep_id, int(port), "udp")

    def _resolve(self, target: str) -> LocalTarget | Awaitable[LocalTarget | None] | None:
        if target == DASHBOARD_TARGET:  # a manager asks for this node's dashboard view (clusterview)
            return LocalTarget("127.0.0.1", self.report.port) if self.report.port else None
        found = self._targets.get(target)
        if found is not None:
            return self._with_pool(target, found)
        task = target.rsplit(":", 1)[0]
        if task in self.local.gone:
            self._log_unknown(target)  # its container went away here: refuse at once (the dialer retries)
            return None
        # Another node chose a task this agent does not know yet: the manager lists it on this node
        # and our own listing is behind, or another agent applied a cluster state this one has not
        # received yet (the manager's agent is ~20 ms ahead of the others).  The header is sealed with
        # the cluster token, so it is a peer agent's word: list now and wait a bounded moment for this
        # agent to catch up rather than refuse a healthy new replica (each refusal counts against it
        # on the dialling node).
        return self._resolve_soon(target)

    async def _resolve_soon(self, target: str, timeout: float | None = None) -> LocalTarget | None:
        waits = self.late_targets
        waits["waited"] += 1
        self.local.poke()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.late_target_wait if timeout is None else timeout)
        task = target.rsplit(":", 1)[0]
        while (found := self._targets.get(target)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0 or task in self.local.gone:
                waits["refused"] += 1
                self._log_unknown(target)
                return None
            try:
                await asyncio.wait_for(self._applied.wait(), remaining)
            except TimeoutError:
                pass
        waits["found"] += 1
        return self._with_pool(target, found)

    def _with_pool(self, target: str, found: LocalTarget) -> LocalTarget:
        """The data plane's own pool and host for the target, so that the tunnel shares their health,
        ejections and counts and can retry on another local replica of the service."""
        local_host = getattr(self.tunnel_pools or self.mesh, "local_host", None)
        ep_id, _, port = target.rpartition(":")
        if local_host is None or not port.isdigit():
            return found
        hit = local_host(ep_id, int(port))
        if hit is None:
            return found
        pool, host = hit
        return found._replace(pool=pool, host=host)

    def _log_unknown(self, target: str) -> None:
        task = target.rsplit(":", 1)[0]
        gone = self.local.gone.get(task)
        log.info(
            "tunnel: target %s is not a local endpoint here (%s; listed on this node by the cluster state: %s)",
            target,
            f"its container went away {time.monotonic() - gone:.2f}s ago" if gone else "never seen running here",
            task in self._state_local,
        )

    # -- dashboard ------------------------------------------------------------------
    def dashboard_info(self) -> dict[str, Any]:
        """The agent's facts on its dashboard: role, the managers it follows (and the one it polls now)."""
        following = self.control_client.manager if self.control_client is not None else None
        return {
            "role": "manager" if self.manager else "worker",
            "advertise": self.advertise,
            "managers": [format_hostport(*m) for m in self.managers],
            "following": format_hostport(*following) if following else None,
            "state": None if self.state is None else {"digest": self.state.digest, "version": self.state.version},
        }

    async def _node_view(self) -> dict[str, Any]:
        if self.dashboard is None:
            raise RuntimeError("the agent has not started")
        return await self.dashboard.node_view()

    # -- status ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What the admin API serves at /v1/cluster/status (JSON-able)."""
        t = self.tunnel.stats
        out: dict[str, Any] = {
            "node": self.node_id,
            "role": "manager" if self.manager else "worker",
            "advertise": self.advertise,
            "managers": [format_hostport(*m) for m in self.managers],
            "state": None if self.state is None else {"digest": self.state.digest, "version": self.state.version},
            "table": None if self.table is None else self.table.to_dict(),
            "applied_at": self.applied_at,
            "applies": self.applies,
            "local_tasks": dict(sorted(self.local.addresses.items())),
            "draining": sorted(self.local.draining),
            "tunnel": {
                "accepted": t.accepted,
                "forwarded": t.forwarded,
                "active": t.active,
                "bytes_in": t.bytes_in,
                "bytes_out": t.bytes_out,
                "refused": dict(t.refused),
                "late_targets": dict(self.late_targets),
            },
            "udp_tunnel": None if self.udp_tunnel is None else self.udp_tunnel.status(),
            "unbound": dict(self.unbound),
        }
        if self.control_client is not None:
            s = self.control_client.stats
            out["control_client"] = {
                "manager": format_hostport(*self.control_client.manager) if self.control_client.manager else None,
                "polls": s.polls, "applied": s.applied, "failures": s.failures,
                "unauthorized": s.unauthorized, "failovers": s.failovers,
            }  # fmt: skip
        if self.control_server is not None:
            s = self.control_server.stats
            out["control_server"] = {"requests": s.requests, "changed": s.changed, "unchanged": s.unchanged,
                                     "unauthorized": s.unauthorized, "bad_requests": s.bad_requests}  # fmt: skip
        return out


def _local_targets(table: RoutingTable) -> dict[str, LocalTarget]:
    """Tunnel targets this node accepts: its own endpoints of mesh services, by the one target
    format "<task id>:<target port>" (``mesh.proxy.preamble``; a task may publish several ports).

    Draining ones are included: another node may have chosen the task a moment before
    it learnt of the drain, and the replica still serves during its stop grace period;
    a dead one has already left the table (the local listing drops it)."""
    out: dict[str, LocalTarget] = {}
    for svc, route in table.routes():
        for ep in route.endpoints:
            if ep.via is not None:
                continue
            out[endpoint_target(ep)] = LocalTarget(ep.address, ep.port, svc.options.proxy_protocol)
    return out


# -- running ------------------------------------------------------------------------------------


def agent_admin(agent: ClusterAgent, host: str, port: int, *, metrics: bool = True) -> Any:
    """The node's one admin server: the admin API (``/metrics``, ``/v1/table`` ...) of the agent's data
    plane, as on a single-node agent, plus ``/v1/cluster/status`` (``ClusterAgent.status()``)."""
    from mesh.admin import AdminServer

    views = {STATUS_PATH: ("cluster agent: node, role, managers, cluster state, applied table, tunnel", agent.status)}
    return AdminServer(agent.admin_state(), host, port, metrics=metrics, views=views, dashboard=agent.dashboard)


async def run_cluster_agent(
    settings: ClusterSettings,
    *,
    admin: tuple[str, int] | None = None,
    metrics: bool = True,
    handover: str | None = None,
    handover_timeout: float = 5.0,
    workers: int = 1,
    worker_args: Sequence[str] = (),
) -> int:
    """Run the agent until SIGTERM/SIGINT; returns the exit code.  Raises ``ConfigError`` for bad
    settings, an unusable token file or an engine that is not a swarm node (the CLI exits 2).

    ``admin``: where the node's admin server (``agent_admin``) listens; None: no admin API.
    ``handover``: the unix socket path of ``--handover`` (meshagent/handover.py): the tunnel, control,
    admin and data-plane sockets are taken over from the agent serving it, which then drains and exits;
    this agent serves it for the next upgrade, and exits 0 after draining once a successor took over.
    """
    from mesh.listener import INHERITED
    from meshagent.handover import Upgrades, close_listeners, server_sockets, start_admin

    settings.check()
    token = read_token(settings.token_file)
    control_tls = ControlTLS.from_files(
        settings.control_tls_ca, settings.control_tls_cert, settings.control_tls_key,
        name=settings.control_tls_name, mutual=settings.control_tls_mutual,
    )  # fmt: skip
    agent = ClusterAgent(
        settings.docker,
        token,
        control_port=settings.control_port,
        tunnel_port=settings.tunnel_port,
        advertise=settings.advertise,
        bind=settings.bind,
        control_wait=settings.control_wait,
        workers=workers,
        worker_args=worker_args,
        token_file=settings.token_file,
        control_tls=control_tls,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        if stop.is_set():
            from meshagent.cli import force_exit

            force_exit(sig)  # a second signal while draining: now
        log.info("%s: stopping, draining open connections for up to %.1fs", sig.name, settings.grace)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    admin_server = None

    def offers() -> list[Any]:
        from meshagent.handover import Offer

        out = agent.offers()
        if admin_server is not None and admin is not None and admin[1]:
            out += [Offer("stream", admin[0], admin[1], "admin", s) for s in server_sockets(admin_server)]
        return out

    async def stop_accepting() -> None:
        agent.stop_accepting()
        close_listeners(admin_server)

    upgrades = None
    rc = 0
    tasks: list[asyncio.Task[Any]] = []
    if handover:
        upgrades = Upgrades(handover, offers, stop_accepting, timeout=handover_timeout)
        await upgrades.takeover()
    try:
        await agent.start()  # the tunnel and control servers take handed-over sockets (INHERITED) first
        if upgrades is not None and upgrades.contested:
            agent.mesh.rebind_max = 2.0
        if admin is not None:
            admin_server = agent_admin(agent, *admin, metrics=metrics)
            sock = INHERITED.take("stream", *admin) if admin[1] else None
            retry = await start_admin(admin_server, sock, upgrades)
            if retry is not None:
                tasks.append(retry)
        waiters = [asyncio.create_task(stop.wait())]
        if upgrades is not None:

            async def complete() -> None:
                await agent.wait_applied()
                if workers > 1:
                    await agent.mesh.wait_ready()  # every worker accepts on the sockets
                await upgrades.complete()

            tasks.append(asyncio.create_task(complete(), name="handover-complete"))
            waiters.append(asyncio.create_task(upgrades.finished.wait()))
        if workers > 1:
            waiters.append(asyncio.create_task(agent.mesh.failed.wait()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if upgrades is not None and stop.is_set():
            await upgrades.wait_pending()
        if upgrades is not None and upgrades.finished.is_set():
            log.info("the listening sockets were handed over: draining for up to %.1fs, then exiting", settings.grace)
        if workers > 1 and agent.mesh.failed.is_set() and not stop.is_set():
            log.error("a worker keeps crashing; exiting")
            rc = 1
    finally:
        for t in tasks:
            t.cancel()
        if upgrades is not None:
            await upgrades.close()
        if admin_server is not None:
            await admin_server.stop()
        await agent.stop(settings.grace)
        INHERITED.close_all()
    if upgrades is not None and upgrades.finished.is_set() and not stop.is_set():
        await _linger(stop)
    return rc


async def _linger(stop: asyncio.Event) -> None:
    """After handing the sockets over and draining: wait up to MESH_HANDOVER_LINGER seconds (0 by default;
    the agent image sets it) for the SIGTERM that ends this task.  Under Swarm's ``start-first`` with a
    HEALTHCHECK the new task counts as running only once it is healthy: an old task that exited on its
    own before that would be restarted by Swarm, and take the sockets back from the new agent."""
    raw = os.environ.get("MESH_HANDOVER_LINGER", "0")
    try:
        linger = float(raw)
    except ValueError:
        log.warning("MESH_HANDOVER_LINGER=%r is not a number of seconds; not lingering", raw)
        return
    if linger <= 0:
        return
    log.info("handed over and drained: waiting up to %.0fs for SIGTERM (MESH_HANDOVER_LINGER)", linger)
    try:
        await asyncio.wait_for(stop.wait(), linger)
    except TimeoutError:
        pass
