"""Discovery against a real dockerd (tests/dockerlab.py), with traffic through the data plane.

Node 1 runs with live-restore (containers survive a dockerd restart); node 2
is a single-node swarm (live-restore is incompatible with swarm mode).  Test
traffic goes from this process (root netns) to the mesh on 127.0.0.1 and from
the mesh to container addresses in 198.18.x.x, routed into the lab node.

Per-change lag (Docker event -> table applied) is printed, not asserted.

Labels publish port 0 (``mesh.publish=127.0.0.1:0:80``: any free port, chosen when the data plane binds it),
so no test races another process for a port; the test reads the bound port from ``plane.listeners()``.
A service keeps its listener, and so its port, while it stays in the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from discovery.engine import Engine, resolve_docker_host
from discovery.watcher import PublishInfo, Watcher
from mesh.routing import RoutingTable
from mesh.runtime import Mesh
from tests import dockerlab
from tests.util import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.uvloop_only, pytest.mark.timeout(240)]

docker_lab = dockerlab.docker_lab  # the session fixture

# httpd that answers with the container's hostname (its short id)
HTTPD = ["sh", "-c", "hostname > /www/index.html; exec httpd -f -p 80 -h /www"]
# the same, but on SIGTERM it keeps serving for 1.5 s before it exits (a graceful app)
GRACEFUL_HTTPD = [
    "sh",
    "-c",
    "hostname > /www/index.html; httpd -f -p 80 -h /www & trap 'sleep 1.5; kill $!; exit 0' TERM; wait; wait",
]


@pytest.fixture(scope="module")
def node1(docker_lab):
    return docker_lab.node(1, live_restore=True)


@pytest.fixture(scope="module")
def node2(docker_lab):
    n = docker_lab.node(2)
    docker_lab.swarm_init(2)
    return n


@pytest.fixture(autouse=True)
def _clean_containers(request):
    yield
    for name in ("node1", "node2"):
        if name in request.fixturenames:
            n = request.getfixturevalue(name)
            if name == "node2":
                ids = n.docker("service", "ls", "-q", check=False).split()
                if ids:
                    n.docker("service", "rm", *ids, check=False)
            ids = n.docker("ps", "-aq", check=False).split()
            if ids:
                n.docker("rm", "-f", *ids, check=False, timeout=120)


async def sh(node: dockerlab.Node, *args: str, timeout: float = 60) -> str:
    return await asyncio.to_thread(node.docker, *args, timeout=timeout)


@dataclass
class Harness:
    watcher: Watcher
    plane: Mesh
    published: list[tuple[RoutingTable, PublishInfo]] = field(default_factory=list)

    @property
    def table(self) -> RoutingTable | None:
        return self.published[-1][0] if self.published else None

    def endpoints(self, service: str) -> dict[str, str]:
        """Endpoint id -> state of ``service``'s route in the last published table."""
        svc = self.table.service(service) if self.table else None
        return {e.id: e.state for r in svc.routes for e in r.endpoints} if svc else {}

    async def port(self, service: str) -> int:
        """The port the data plane bound for ``service`` (its label publishes port 0), once it is bound."""
        found: list[int] = []

        def bound() -> bool:
            found[:] = [lst.port for lst in self.plane.listeners() if lst.service == service and lst.listening]
            return bool(found)

        await wait_for(bound, timeout=15, what=f"a listener for {service}")
        (port,) = found
        return port

    def dump(self) -> None:
        """The data plane's view, for a failing test's output."""
        print(f"    table {self.table and self.table.to_json()}")
        for listener in self.plane.listeners():
            print(f"    {listener!r}")
            for host in listener.pool.hosts:
                print(f"        {host!r} {host.stats!r}")

    def print_lags(self, title: str) -> None:
        lags = [(info.event_type, info.reason, time.time()) for _, info in self.published if info.event_time]
        samples = list(self.watcher.lag_samples)
        print(f"\n[{title}] event -> table applied, per change:")
        for (lag, etype), (_, reason, _) in zip(samples, lags, strict=False):
            print(f"    {etype:<28} {reason:<8} {lag * 1000:8.1f} ms")
        if samples:
            vals = sorted(s for s, _ in samples)
            print(f"    n={len(vals)} median={vals[len(vals) // 2] * 1000:.1f} ms max={vals[-1] * 1000:.1f} ms")


@contextlib.asynccontextmanager
async def running_mesh(node: dockerlab.Node, **watcher_options) -> AsyncIterator[Harness]:
    """A Watcher on ``node`` publishing into the data plane (mesh.runtime.Mesh) in this process."""
    plane = Mesh()
    engine = Engine(resolve_docker_host(node.host, {}))
    h: Harness

    async def publish(table: RoutingTable, info: PublishInfo) -> None:
        await plane.apply(table)
        h.published.append((table, info))

    watcher = Watcher(engine, publish, **watcher_options)
    h = Harness(watcher=watcher, plane=plane)
    task = asyncio.create_task(watcher.run())
    try:
        await wait_for(lambda: watcher.ready.is_set() or task.done(), timeout=15, what="first table")
        if task.done():
            task.result()
        yield h
    finally:
        watcher.stop()
        await asyncio.wait_for(task, 10)
        await engine.close()
        await plane.shutdown(0.5)


async def http_get(port: int, timeout: float = 3.0) -> str:
    """GET / through the mesh on 127.0.0.1:port; returns the body (the container's hostname)."""

    async def go() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: mesh\r\n\r\n")
            data = await reader.read()
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"bad response {data[:60]!r}")
        return body.decode().strip()

    return await asyncio.wait_for(go(), timeout)


@dataclass
class LoadResult:
    ok: int = 0
    failed: list[tuple[float, str]] = field(default_factory=list)  # (unix time started, error)
    seen: set[str] = field(default_factory=set)


async def load_loop(port: int, stop: asyncio.Event, *, max_requests: int = 3000, max_seconds: float = 60) -> LoadResult:
    """Sequential new connections until ``stop`` (bounded in count and time)."""
    res = LoadResult()
    deadline = time.monotonic() + max_seconds
    for _ in range(max_requests):
        if stop.is_set() or time.monotonic() > deadline:
            break
        started = time.time()
        try:
            res.seen.add(await http_get(port))
            res.ok += 1
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            res.failed.append((started, f"{type(exc).__name__}: {exc}"))
        await asyncio.sleep(0.005)
    return res


PUBLISH = "mesh.publish=127.0.0.1:0:80"  # any free port on 127.0.0.1 -> the container's port 80


def run_labels(project: str, service: str = "web", extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "--label", PUBLISH,
        "--label", f"com.docker.compose.project={project}",
        "--label", f"com.docker.compose.service={service}",
        *extra,
    ]  # fmt: skip


async def start_replicas(node, image, project, n, *, cmd=HTTPD, extra=()) -> list[str]:
    ids = []
    for _ in range(n):
        ids.append(await sh(node, "run", "-d", *run_labels(project, extra=extra), image, *cmd))
    return ids


# -- mode 1: containers -------------------------------------------------------------------------


async def test_three_replicas_then_scale_up_and_down(node1, docker_lab):
    ids = await start_replicas(node1, docker_lab.image_id, "t3", 3)
    async with running_mesh(node1) as h:
        assert set(h.endpoints("t3-web")) == set(ids)
        port = await h.port("t3-web")
        seen = {await http_get(port) for _ in range(30)}
        assert seen == {i[:12] for i in ids}
        # scale to five
        ids += await start_replicas(node1, docker_lab.image_id, "t3", 2)
        await wait_for(lambda: set(h.endpoints("t3-web")) == set(ids), timeout=10, what="five endpoints")
        assert all(s == "running" for s in h.endpoints("t3-web").values())
        seen = {await http_get(port) for _ in range(50)}
        assert seen == {i[:12] for i in ids}
        # down to two
        await sh(node1, "rm", "-f", *ids[2:])
        await wait_for(lambda: set(h.endpoints("t3-web")) == set(ids[:2]), timeout=10, what="two endpoints")
        assert await h.port("t3-web") == port  # the same listener throughout
        assert {await http_get(port) for _ in range(20)} == {i[:12] for i in ids[:2]}
        h.print_lags("scale 3 -> 5 -> 2")


async def test_stop_under_load_drains_at_kill(node1, docker_lab):
    # retries=0: a connection sent to a stopping replica would fail visibly
    ids = await start_replicas(
        node1, docker_lab.image_id, "stop", 3, cmd=GRACEFUL_HTTPD, extra=("--label", "mesh.retries=0")
    )
    async with running_mesh(node1) as h:
        port = await h.port("stop-web")
        stop = asyncio.Event()
        load = asyncio.create_task(load_loop(port, stop, max_requests=5000, max_seconds=40))
        await wait_for(lambda: len(h.published) >= 1 and h.watcher.stats.publishes >= 1, what="serving")
        await asyncio.sleep(0.5)
        victim = ids[1]
        await sh(node1, "stop", "-t", "5", victim)
        await wait_for(lambda: victim not in h.endpoints("stop-web"), timeout=15, what="victim removed")
        await asyncio.sleep(0.5)
        stop.set()
        res = await load
        kills = [info for _, info in h.published if info.event_type == "container/kill"]
        assert kills, "no table was published for the kill event"
        kill_time = kills[0].event_time
        drained = [t for t, info in h.published if info.reason == "drain"]
        assert drained and drained[0].service("stop-web").routes[0].endpoints  # drained, not emptied
        print(f"\n[stop under load] requests ok={res.ok} failed={len(res.failed)}")
        for t, err in res.failed[:10]:
            print(f"    failed {t - kill_time:+.3f}s after the kill event: {err}")
        h.print_lags("docker stop under load")
        assert res.ok > 50
        assert [f for f in res.failed if f[0] >= kill_time] == []
        assert res.failed == []


async def test_healthcheck_gates_membership(node1, docker_lab):
    health = (
        "--health-cmd", "test -f /tmp/ok", "--health-interval", "500ms", "--health-retries", "1",
        "--health-timeout", "2s",
    )  # fmt: skip
    cmd = ["sh", "-c", "hostname > /www/index.html; touch /tmp/ok; exec httpd -f -p 80 -h /www"]
    (cid,) = await start_replicas(node1, docker_lab.image_id, "hc", 1, cmd=cmd, extra=health)
    async with running_mesh(node1) as h:
        # joins only once healthy
        await wait_for(lambda: set(h.endpoints("hc-web")) == {cid}, timeout=15, what="healthy joins")
        port = await h.port("hc-web")
        assert await http_get(port) == cid[:12]
        await sh(node1, "exec", cid, "rm", "/tmp/ok")
        await wait_for(lambda: h.endpoints("hc-web") == {}, timeout=15, what="unhealthy removed")
        assert h.table.service("hc-web") is not None  # the port stays, without endpoints
        assert await h.port("hc-web") == port
        await sh(node1, "exec", cid, "touch", "/tmp/ok")
        await wait_for(lambda: set(h.endpoints("hc-web")) == {cid}, timeout=15, what="healthy again")
        h.print_lags("healthcheck")
        assert h.watcher.stats.events.get(("container", "health_status"), 0) >= 3


async def test_dockerd_restart_keeps_serving_and_resyncs(node1, docker_lab):
    # both services publish port 0: they never conflict, each gets a port of its own
    ids_a = await start_replicas(node1, docker_lab.image_id, "ra", 2)
    (id_b,) = await start_replicas(node1, docker_lab.image_id, "rb", 1)
    pid_b = int(await sh(node1, "inspect", "-f", "{{.State.Pid}}", id_b))
    async with running_mesh(node1) as h:
        assert set(h.endpoints("rb-web")) == {id_b}
        port_a, port_b = await h.port("ra-web"), await h.port("rb-web")
        assert port_a != port_b
        assert await http_get(port_b) == id_b[:12]
        version_before = h.table.version
        stop = asyncio.Event()
        load = asyncio.create_task(load_loop(port_a, stop, max_requests=5000, max_seconds=60))
        await asyncio.to_thread(node1.stop)
        await wait_for(lambda: not h.watcher.connected.is_set(), timeout=10, what="watcher noticed")
        # while the engine is away: the last table stays, traffic flows; a replica dies unseen
        assert h.table.version == version_before
        os.kill(pid_b, signal.SIGKILL)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(node1.start)
        returned = time.monotonic()
        await wait_for(lambda: h.endpoints("rb-web") == {}, timeout=10, what="resync removes the dead replica")
        resync = time.monotonic() - returned
        await wait_for(lambda: h.watcher.connected.is_set(), timeout=5, what="following again")
        # following events again after the restart
        ids_a.append((await start_replicas(node1, docker_lab.image_id, "ra", 1))[0])
        await wait_for(lambda: set(h.endpoints("ra-web")) == set(ids_a), timeout=10, what="new replica after restart")
        assert await h.port("ra-web") == port_a  # the listener the load ran on all along
        stop.set()
        res = await load
        print(
            f"\n[dockerd restart] resync {resync * 1000:.0f} ms after the engine answered again; "
            f"reconnects={h.watcher.stats.reconnects}; load ok={res.ok} failed={len(res.failed)}"
        )
        h.print_lags("dockerd restart")
        assert resync < 2.0
        assert res.ok > 20 and res.failed == []
        assert res.seen >= {i[:12] for i in ids_a[:2]}


async def test_bad_labels_are_skipped_with_one_log_line(node1, docker_lab, caplog):
    caplog.set_level(logging.INFO, logger="discovery")
    (good,) = await start_replicas(node1, docker_lab.image_id, "bad", 1)
    await sh(node1, "run", "-d", "--name", "broken-weight", *run_labels("bad"),
             "--label", "mesh.weight=heavy", docker_lab.image_id, *HTTPD)  # fmt: skip
    await sh(node1, "run", "-d", "--name", "broken-port", "--label", "mesh.publish=80:http",
             docker_lab.image_id, *HTTPD)  # fmt: skip
    async with running_mesh(node1, backstop=0.2) as h:
        assert set(h.endpoints("bad-web")) == {good}
        await wait_for(lambda: h.watcher.stats.full_listings >= 4, timeout=10, what="several rebuilds")
        lines = [r.getMessage() for r in caplog.records if "broken-" in r.getMessage()]
        assert len(lines) == 2, lines
        weight = next(m for m in lines if "broken-weight" in m)
        port_line = next(m for m in lines if "broken-port" in m)
        assert "label mesh.weight='heavy': expected a whole number 1..1000 - skipped" in weight
        assert "label mesh.publish='80:http': port 'http' must be a number 1..65535 - skipped" in port_line
        assert await http_get(await h.port("bad-web")) == good[:12]


# -- mode 2: swarm services ---------------------------------------------------------------------


async def service_tasks(node, name: str) -> set[str]:
    out = await sh(node, "service", "ps", "-q", "--filter", "desired-state=running", name)
    return set(out.split())


async def running_tasks(node, name: str) -> set[str]:
    fmt = "{{.ID}} {{.CurrentState}}"
    out = await sh(node, "service", "ps", "--no-trunc", "--format", fmt, "--filter", "desired-state=running", name)
    return {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["Running"]}


async def test_swarm_service_routed_and_scaled(node2, docker_lab):
    await sh(
        node2, "service", "create", "--detach", "--name", "sweb", "--replicas", "3",
        "--label", PUBLISH, "--no-resolve-image", docker_lab.image_id, *HTTPD,
        timeout=120,
    )  # fmt: skip
    async with running_mesh(node2, converge_interval=0.2) as h:
        assert h.watcher.swarm_manager
        await wait_for(lambda: len(h.endpoints("sweb")) == 3, timeout=30, what="three tasks routed")
        assert set(h.endpoints("sweb")) == await running_tasks(node2, "sweb")
        port = await h.port("sweb")
        seen = {await http_get(port) for _ in range(30)}
        assert len(seen) == 3
        await sh(node2, "service", "scale", "--detach", "sweb=5")
        await wait_for(lambda: len(h.endpoints("sweb")) == 5, timeout=30, what="scaled to five")
        assert set(h.endpoints("sweb")) == await running_tasks(node2, "sweb")
        await sh(node2, "service", "scale", "--detach", "sweb=2")
        await wait_for(
            lambda: sum(s == "running" for s in h.endpoints("sweb").values()) == 2, timeout=30, what="down to two"
        )
        await wait_for(lambda: len(h.endpoints("sweb")) == 2, timeout=30, what="old tasks gone")
        assert len({await http_get(port) for _ in range(20)}) == 2
        h.print_lags("swarm scale 3 -> 5 -> 2")


async def test_swarm_update_force_under_load(node2, docker_lab):
    await sh(node2, "network", "create", "--driver", "overlay", "--attachable", "meshnet", timeout=60)
    try:
        await sh(
            node2, "service", "create", "--detach", "--name", "supd", "--replicas", "3", "--network", "meshnet",
            "--update-parallelism", "1", "--update-delay", "0s", "--stop-grace-period", "5s",
            "--label", PUBLISH, "--no-resolve-image", docker_lab.image_id,
            *GRACEFUL_HTTPD, timeout=120,
        )  # fmt: skip
        async with running_mesh(node2, converge_interval=0.2) as h:
            await wait_for(lambda: len(h.endpoints("supd")) == 3, timeout=30, what="three tasks routed")
            port = await h.port("supd")
            # overlay tasks are reached at their docker_gwbridge address
            gw = await sh(
                node2, "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}}{{end}}", "docker_gwbridge"
            )
            prefix = gw.rsplit(".", 1)[0] + "."
            addrs = [e.address for _, r in h.table.routes() for e in r.endpoints]
            assert all(a.startswith(prefix) for a in addrs), (addrs, gw)
            before = set(h.endpoints("supd"))
            stop = asyncio.Event()
            load = asyncio.create_task(load_loop(port, stop, max_requests=20000, max_seconds=90))
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            await sh(node2, "service", "update", "--force", "--detach", "supd", timeout=60)

            async def replaced() -> bool:
                eps = h.endpoints("supd")
                return len(eps) == 3 and not (set(eps) & before) and all(s == "running" for s in eps.values())

            await wait_for(replaced, timeout=90, interval=0.1, what="all tasks replaced")
            took = time.monotonic() - t0
            await asyncio.sleep(0.5)
            stop.set()
            res = await load
            print(
                f"\n[swarm update --force, 3 replicas, parallelism 1] {took:.1f}s; requests ok={res.ok} "
                f"failed={len(res.failed)} (target 0); replicas seen={len(res.seen)}"
            )
            for t, err in res.failed[:10]:
                print(f"    failed at {t:.3f}: {err}")
            if res.failed:
                h.dump()
            h.print_lags("swarm update --force")
            assert res.ok > 50
            assert res.failed == []
    finally:
        await sh(node2, "service", "rm", "supd", timeout=60)
        await wait_for(
            lambda: asyncio.to_thread(
                lambda: node2.docker("network", "rm", "meshnet", check=False, timeout=30) == "meshnet"
            ),
            timeout=30,
            interval=0.5,
            what="network removed",
        )


# -- the compose showcase -------------------------------------------------------------------------

COMPOSE_FILE = os.path.join(os.path.dirname(__file__), "..", "compose", "compose-scale.yaml")


def _compose_cli() -> list[str] | None:
    """``docker-compose`` (v1, Debian) or ``docker compose`` (v2 plugin); installs v1 via apt when neither exists."""
    import shutil
    import subprocess

    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return ["docker", "compose"]
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-compose"],
                       env=env, capture_output=True, timeout=600, check=False)  # fmt: skip
        if shutil.which("docker-compose"):
            return ["docker-compose"]
    return None


async def test_compose_showcase_scale_five_behind_one_port(node1, docker_lab):
    compose = await asyncio.to_thread(_compose_cli)
    if compose is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is available")
    env = {
        **os.environ,
        "DOCKER_HOST": node1.host,
        "WEB_IMAGE": docker_lab.image_id,
        "MESH_LISTEN": "127.0.0.1",
        "MESH_PORT": "0",  # any free port: read back from the data plane
    }
    base = [*compose, "-f", COMPOSE_FILE, "-p", "showcase"]

    async def run(*args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *base, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, out.decode(errors="replace")

    def replicas() -> set[str]:
        out = node1.docker("ps", "-q", "--no-trunc", "--filter", "label=com.docker.compose.project=showcase")
        return set(out.split())

    try:
        await run("up", "-d", "--scale", "web=5")
        async with running_mesh(node1) as h:
            # joins as the replicas turn healthy (Docker HEALTHCHECK every 2 s)
            await wait_for(lambda: len(h.endpoints("showcase-web")) == 5, timeout=30, interval=0.1, what="five healthy")
            assert set(h.endpoints("showcase-web")) == await asyncio.to_thread(replicas)
            port = await h.port("showcase-web")
            seen = {await http_get(port) for _ in range(40)}
            assert seen == {c[:12] for c in h.endpoints("showcase-web")}
            await run("up", "-d", "--scale", "web=2")
            await wait_for(lambda: len(h.endpoints("showcase-web")) == 2, timeout=30, interval=0.1, what="two left")
            assert set(h.endpoints("showcase-web")) == await asyncio.to_thread(replicas)
            assert len({await http_get(port) for _ in range(20)}) == 2
            h.print_lags("compose --scale web=5 -> 2")
    finally:
        await run("down", "-t", "1")


async def test_swarm_agent_routes_only_to_its_own_nodes_tasks(node2, docker_lab):
    """Two-node swarm (node 3 joins node 2): a global service has a task on each node; the agent on
    the manager routes to the manager's task only (cross-node forwarding is the cluster issue)."""
    worker_id = await asyncio.to_thread(docker_lab.swarm_join, 3, 2)
    try:
        manager_id = await sh(node2, "info", "--format", "{{.Swarm.NodeID}}")
        await sh(
            node2, "service", "create", "--detach", "--name", "sglobal", "--mode", "global",
            "--label", PUBLISH, "--no-resolve-image", docker_lab.image_id, *HTTPD,
            timeout=120,
        )  # fmt: skip

        async def both_running() -> bool:
            out = await sh(node2, "service", "ps", "--format", "{{.Node}} {{.CurrentState}}", "sglobal")
            return sum(line.split()[1:2] == ["Running"] for line in out.splitlines()) == 2

        await wait_for(both_running, timeout=60, interval=0.3, what="a task on each node")
        async with running_mesh(node2) as h:
            await wait_for(lambda: len(h.endpoints("sglobal")) == 1, timeout=30, what="the local task")
            (route,) = h.table.service("sglobal").routes
            assert [e.node for e in route.endpoints] == [manager_id]
            assert h.watcher.local_node == manager_id != worker_id
            assert (await http_get(await h.port("sglobal"))) != ""
    finally:
        await sh(node2, "service", "rm", "sglobal", timeout=60)
        await asyncio.to_thread(docker_lab.swarm_leave, 3, 2)


# -- finding the engine like the docker CLI: a context, and ssh:// -------------------------------------------


async def test_context_and_ssh_reach_the_real_engine(node1, docker_lab, tmp_path, monkeypatch):
    """``watch(None, ...)`` (what ``mesh run --docker`` runs) with no DOCKER_HOST finds the engine through the
    current docker context of a temporary HOME (made by the real docker CLI), then through an ssh:// context
    served by a real sshd on loopback whose sessions reach this dockerd with ``docker system dial-stdio``;
    both times the first table holds the labelled container."""
    import getpass

    from discovery import watch
    from tests.test_discovery_host import HAVE_SSH, Sshd, Store

    if not HAVE_SSH or os.geteuid() != 0:
        pytest.skip("needs openssh-server, openssh-client and the docker CLI, as root")
    (cid,) = await start_replicas(node1, docker_lab.image_id, "ctx", 1)
    store = Store(tmp_path / "home")
    await asyncio.to_thread(store.cli, "context", "create", "lab", "--docker", f"host={node1.host}")
    await asyncio.to_thread(store.cli, "context", "use", "lab")

    async def first_table(env: dict[str, str]) -> tuple[RoutingTable, Watcher]:
        got: asyncio.Future[RoutingTable] = asyncio.get_running_loop().create_future()
        watchers: list[Watcher] = []

        async def publish(table: RoutingTable, info: PublishInfo) -> None:
            if not got.done():
                got.set_result(table)

        task = asyncio.create_task(watch(None, publish, env=env, on_watcher=watchers.append))
        try:
            return await asyncio.wait_for(got, 30), watchers[0]
        finally:
            watchers[0].stop()
            await asyncio.wait_for(task, 10)

    table, _ = await first_table(store.env())  # config.json's currentContext: lab
    assert {e.id for r in table.service("ctx-web").routes for e in r.endpoints} == {cid}

    await asyncio.to_thread(os.makedirs, "/run/sshd", mode=0o755, exist_ok=True)
    d = tmp_path / "ssh"
    d.mkdir()
    sshd = Sshd(d, node1.host)
    server = asyncio.create_task(sshd.serve())
    monkeypatch.setenv("PATH", f"{sshd.client_bin()}:{os.environ['PATH']}")
    try:
        url = f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}"
        await asyncio.to_thread(store.cli, "context", "create", "viassh", "--docker", f"host={url}")
        table, watcher = await first_table(store.env(DOCKER_CONTEXT="viassh"))
        assert {e.id for r in table.service("ctx-web").routes for e in r.endpoints} == {cid}
        assert watcher.engine.host.url == url and sshd.sessions >= 1
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        sshd.close()
