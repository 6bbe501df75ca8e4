"""HTTP mode (``mesh.publish=...:80/http``) against real engines: a rolling update of a swarm service
under keep-alive load in the engine lab (tests/dockerlab.py), and the 3-node swarm lab
(tests/swarmlab.py), where requests cross the agents' tunnel on pooled connections and every replica
sees the test client's address in X-Forwarded-For.

The replica is tests/fixtures/httpecho.c, built static here with gcc and bind mounted into the lab's
busybox image: busybox httpd answers HTTP/1.1 but closes every connection (no keep-alive, not even
for static files), so it cannot show upstream pooling.  httpecho keeps connections alive, answers
every request with one line naming itself, its connection and the forwarding fields it received, and
on SIGTERM behaves like a graceful server (Go's Shutdown, nginx's quit): it stops accepting at once,
closes its idle keep-alive connections at once and finishes the requests in progress.

The clients are raw keep-alive connections (one each, never reopened by the client: a connection the
mesh closes is counted, and fails the test), sending GETs back to back, bounded in count and time.
Run with -s to see the figures.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.dockerlab import docker_lab  # noqa: F401  (fixture)
from tests.httpbackend import read_response
from tests.swarmlab import CLIENT_ADDR, SwarmLab, wait_for_other_labs

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

HTTPECHO_C = Path(__file__).parent / "fixtures" / "httpecho.c"
GRACE_MS = 3000  # httpecho's longest wait for requests in progress after SIGTERM


@pytest.fixture(scope="module")
def httpecho(docker_lab) -> Path:  # noqa: F811
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the HTTP replica (scripts/test installs it)")
    d = docker_lab.run_root / "httpecho"
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "httpecho"), str(HTTPECHO_C)], check=True, timeout=120)
    return d / "httpecho"


def replica_cmd() -> list[str]:
    return ["/httpecho", "80", str(GRACE_MS)]


def mount(binary: Path) -> tuple[str, str]:
    return ("--mount", f"type=bind,source={binary},target=/httpecho,readonly")


# -- the client side ------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One 200 answer of httpecho: who served it, on which of its connections, and what it received."""

    replica: str  # the container's hostname (its short id)
    conn: str  # the replica's connection (its process id)
    n: int  # the request's number on that connection (> 1: the connection was reused)
    fields: dict[str, str]  # xff, fwd, host, path as received ("-": absent)


def parse(body: bytes) -> Answer:
    replica, *rest = body.decode().split()
    kv = dict(item.partition("=")[::2] for item in rest)
    return Answer(replica, kv.pop("conn"), int(kv.pop("n")), kv)


@dataclass
class ClientRun:
    """What one keep-alive client saw."""

    name: str
    answers: list[tuple[float, Answer]] = field(default_factory=list)  # (monotonic time, answer)
    failures: list[str] = field(default_factory=list)
    connections: int = 0  # connections opened: 1 unless the mesh closed one

    def replicas(self, since: float = 0.0) -> set[str]:
        return {a.replica for t, a in self.answers if t >= since}


async def keepalive_client(
    run: ClientRun,
    addr: str,
    port: int,
    host: str,
    stop: asyncio.Event,
    *,
    max_requests: int,
    max_seconds: float,
    timeout: float = 5.0,
) -> ClientRun:
    """GETs back to back on one connection until ``stop`` (bounded in count and time), recorded in
    ``run`` as they come.  A failed request (error, status other than 200, or the connection closed
    under it) is recorded and the connection replaced; a ``Connection: close`` from the mesh is not a
    failure but counts a new connection."""
    name = run.name
    deadline = time.monotonic() + max_seconds
    reader = writer = None
    try:
        for k in range(max_requests):
            if stop.is_set() or time.monotonic() > deadline:
                break
            try:
                if writer is None:
                    async with asyncio.timeout(timeout):
                        reader, writer = await asyncio.open_connection(addr, port)
                    run.connections += 1
                writer.write(f"GET /{name}/{k} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                resp = await read_response(reader, timeout=timeout)
                if resp.status != 200:
                    run.failures.append(f"{time.monotonic():.3f} status {resp.status}: {resp.body[:100]!r}")
                else:
                    run.answers.append((time.monotonic(), parse(resp.body)))
                if (resp.value("connection") or "").lower() == "close":
                    writer.close()
                    writer = None
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                run.failures.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()
    return run


def upstream_reuse(answers: list[Answer]) -> tuple[int, int]:
    """(requests, distinct replica connections they came on)."""
    return len(answers), len({(a.replica, a.conn) for a in answers})


class Load:
    """``n`` keep-alive clients through the mesh at once, bounded in count and time."""

    def __init__(self, addr: str, port: int, host: str, n: int, *, max_requests: int, max_seconds: float) -> None:
        self.stop = asyncio.Event()
        self.runs = [ClientRun(f"c{k}") for k in range(n)]
        self.tasks = [
            asyncio.create_task(
                keepalive_client(r, addr, port, host, self.stop, max_requests=max_requests, max_seconds=max_seconds)
            )
            for r in self.runs
        ]

    def answered(self) -> int:
        return sum(len(r.answers) for r in self.runs)

    def replicas(self) -> set[str]:
        return set().union(*(r.replicas() for r in self.runs))

    def serving(self, n: int, replicas: int = 0) -> bool:
        """``n`` requests answered so far, by at least ``replicas`` replicas (fails if the clients ended)."""
        if all(t.done() for t in self.tasks):
            raise AssertionError(f"the clients ended early: {[r.failures[:3] for r in self.runs]}")
        return self.answered() >= n and len(self.replicas()) >= replicas

    async def finish(self) -> list[ClientRun]:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        return self.runs

    def failures(self) -> list[str]:
        return [f for r in self.runs for f in r.failures]

    def answers(self) -> list[Answer]:
        return [a for r in self.runs for _, a in r.answers]


async def wait_until(cond, timeout: float, what: str) -> None:
    from tests.util import wait_for

    await wait_for(cond, timeout=timeout, interval=0.05, what=what)


async def create_service(node, name: str, image: str, binary: Path, *args: str) -> None:
    from tests.test_discovery_engine import sh

    await sh(
        node, "service", "create", "--detach", "--name", name, "--replicas", "3",
        "--label", "mesh.publish=127.0.0.1:0:80/http", *mount(binary), *args,
        "--no-resolve-image", image, *replica_cmd(), timeout=120,
    )  # fmt: skip


def http_pool_stats(h, name: str):
    """The route's HttpStats in the in-process mesh (requests, retries by reason, pool reuse)."""
    pool = next(b.pool for lst in h.plane.listeners() for b in lst.bindings if b.service == name)
    return getattr(pool, "http", None)


# -- the engine lab: a rolling update of a swarm service in HTTP mode ------------------------------------


@pytest.mark.uvloop_only
async def test_rolling_update_under_keepalive_load_fails_no_request(docker_lab, httpecho):  # noqa: F811
    """3 replicas, `docker service update --force` (parallelism 1, stop-first) while 5 keep-alive
    clients send requests back to back through the mesh: no request fails, no client connection is
    closed, and every client's one connection reaches old and new replicas (balanced per request)."""
    from tests.test_discovery_engine import running_mesh, sh

    node = docker_lab.node(2)
    await asyncio.to_thread(docker_lab.swarm_init, 2)
    name = "hroll"
    await create_service(node, name, docker_lab.image_id, httpecho, "--update-parallelism", "1",
                         "--update-delay", "0s", "--stop-grace-period", "5s")  # fmt: skip
    try:
        async with running_mesh(node, converge_interval=0.2) as h:

            def running() -> set[str]:
                return {t for t, s in h.endpoints(name).items() if s == "running"}

            await wait_until(lambda: len(running()) == 3, 60, "three tasks routed")
            before = running()
            # 5 clients (prime to 3 replicas): lockstepped clients on round robin would each keep one replica
            load = Load("127.0.0.1", await h.port(name), "roll.test", 5, max_requests=30000, max_seconds=90)
            try:
                # the keep-alive clients are on all three old replicas before the update starts
                await wait_until(lambda: load.serving(300, replicas=3), 30, "load on three replicas")
                t0 = time.monotonic()
                await sh(node, "service", "update", "--force", "--detach", name, timeout=60)
                await wait_until(
                    lambda: len(running()) == 3 and not running() & before and len(h.endpoints(name)) == 3,
                    90, "all three tasks replaced",
                )  # fmt: skip
                took = time.monotonic() - t0
                # a few hundred more requests on the new replicas
                mark = load.answered()
                await wait_until(lambda: load.serving(mark + 300), 30, "load on the new replicas")
            finally:
                runs = await load.finish()
            answers, failures = load.answers(), load.failures()
            by_replica = Counter(a.replica for a in answers)
            old = {a.replica for r in runs for t, a in r.answers if t < t0}
            new = set(by_replica) - old
            requests, upstream = upstream_reuse(answers)
            print(
                f"\n[http rolling update, 3 replicas, parallelism 1] {took:.1f}s; {len(runs)} keep-alive clients: "
                f"{requests} requests, {len(failures)} failed, client connections "
                f"{[r.connections for r in runs]}; per replica (old {sorted(old)}) {dict(by_replica)}; "
                f"{upstream} upstream connections ({requests / max(upstream, 1):.1f} requests each)\n"
                f"    mesh: {http_pool_stats(h, name)!r}"
            )
            for f in failures[:10]:
                print(f"    failed: {f}")
            if failures:
                h.dump()
            assert failures == []
            assert [r.connections for r in runs] == [1] * len(runs)  # the mesh closed no client connection
            assert len(old) == 3 and len(new) == 3, (old, new)
            for r in runs:
                # balanced per request: each client's one connection reached old and new replicas
                assert len(r.replicas() & old) >= 2 and len(r.replicas() & new) >= 2, (r.name, r.replicas())
            assert all(a.fields["xff"] == "127.0.0.1" and a.fields["host"] == "roll.test" for a in answers)
            assert upstream < requests / 10  # upstream connections were kept alive and reused
    finally:
        await sh(node, "service", "rm", name, timeout=60)


@pytest.mark.uvloop_only
async def test_replica_shutting_down_unannounced_fails_no_request(docker_lab, httpecho):  # noqa: F811
    """SIGTERM sent inside a replica (``docker exec ... kill -TERM 1``: no engine event until it has
    exited) while 5 keep-alive clients load the service: the replica refuses new connections and
    closes its idle pooled connections while the mesh still routes to it -- the race of a pooled
    connection closed by the replica just as it is reused (traefik#3237).  The mesh retries those
    GETs (reused connection closed before any byte: once on a new connection; refused connect: on
    another replica): no request fails."""
    from tests.test_discovery_engine import running_mesh, sh

    node = docker_lab.node(2)
    await asyncio.to_thread(docker_lab.swarm_init, 2)
    name = "hsig"
    await create_service(node, name, docker_lab.image_id, httpecho, "--restart-delay", "0s")
    try:
        async with running_mesh(node, converge_interval=0.2) as h:
            await wait_until(lambda: len(h.endpoints(name)) == 3, 60, "three tasks routed")
            load = Load("127.0.0.1", await h.port(name), "sig.test", 5, max_requests=30000, max_seconds=60)
            try:
                await wait_until(lambda: load.serving(300, replicas=3), 30, "load on three replicas")
                cid = (await sh(node, "ps", "-q", "--no-trunc", "--filter",
                                f"label=com.docker.swarm.service.name={name}")).split()[0]  # fmt: skip
                task = await sh(node, "inspect", "-f", '{{index .Config.Labels "com.docker.swarm.task.id"}}', cid)
                await sh(node, "exec", cid, "kill", "-TERM", "1")
                await wait_until(lambda: task not in h.endpoints(name), 30, "the stopped replica gone")
                mark = load.answered()
                await wait_until(lambda: load.serving(mark + 300), 30, "load on the other replicas")
            finally:
                runs = await load.finish()
            failures = load.failures()
            stats = http_pool_stats(h, name)
            print(
                f"\n[http replica SIGTERM unannounced] {load.answered()} requests, {len(failures)} failed, "
                f"client connections {[r.connections for r in runs]}; "
                f"per replica {dict(Counter(a.replica for a in load.answers()))}\n    mesh: {stats!r}"
            )
            for f in failures[:10]:
                print(f"    failed: {f}")
            assert failures == []
            assert [r.connections for r in runs] == [1] * len(runs)
            assert cid[:12] in load.replicas()
    finally:
        await sh(node, "service", "rm", name, timeout=60)


# -- the 3-node swarm lab: requests through the tunnel on pooled connections ----------------------------

HTTP_PORT = 18090  # one http port, two services told apart by Host
SPREAD, SPREAD_HOST = "hspread", "spread.test"  # one replica per node, locality off
ONE, ONE_HOST = "hone", "one.test"  # two replicas, both on node 1: nodes 2 and 3 have none
ALL = (1, 2, 3)


@pytest.fixture(scope="module")
def swarm(request, httpecho):
    # another process's lab uses the same 198.18.200.0/24: wait before ours adds its bridge
    wait_for_other_labs(os.getpid())
    sl = SwarmLab(request.getfixturevalue("docker_lab"))
    try:
        sl.setup()
        for i in (2, 1, 3):
            sl.start_agent(i)
        publish = f"{HTTP_PORT}:80/http"
        sl.create_service(SPREAD, 3, {"mesh.publish": publish, "mesh.http.hosts": SPREAD_HOST, "mesh.locality": "off"},
                          cmd=replica_cmd(), extra=(*mount(httpecho), "--replicas-max-per-node", "1"))  # fmt: skip
        sl.create_service(ONE, 2, {"mesh.publish": publish, "mesh.http.hosts": ONE_HOST}, cmd=replica_cmd(),
                          extra=(*mount(httpecho), "--constraint", f"node.id=={sl.node_ids[1]}"))  # fmt: skip
        sl.wait_converged(SPREAD, 3, timeout=90)
        sl.wait_converged(ONE, 2, timeout=90)
        yield sl
    finally:
        sl.close()


def load_every_node(sl: SwarmLab, host: str, *, clients: int, requests: int) -> dict[int, list[ClientRun]]:
    """``clients`` keep-alive clients per node, all at once, each sending ``requests`` GETs with Host ``host``
    to the node's published port (from this process: 198.18.200.1, not a node)."""

    async def go() -> dict[int, list[ClientRun]]:
        stop = asyncio.Event()
        runs = {i: [ClientRun(f"n{i}c{k}") for k in range(clients)] for i in ALL}
        await asyncio.gather(*(
            keepalive_client(r, sl.nodes[i].addr, HTTP_PORT, host, stop, max_requests=requests, max_seconds=30)
            for i in ALL for r in runs[i]
        ))  # fmt: skip
        return runs

    return asyncio.run(go())


def tunnel_forwarded(sl: SwarmLab) -> int:
    return sum(sl.status(i)["tunnel"]["forwarded"] for i in ALL)


def check_answers(sl: SwarmLab, i: int, runs: list[ClientRun], host: str, node_of: dict[str, str]) -> list[Answer]:
    """Every request entering node i answered, on the client's one connection, with the client's address
    in the forwarding fields; returns the answers of replicas on other nodes (they crossed the tunnel)."""
    for r in runs:
        assert r.failures == [], (r.name, r.failures[:5])
        assert r.connections == 1, (r.name, r.connections)
    answers = [a for r in runs for _, a in r.answers]
    for a in answers:
        assert a.fields["xff"] == CLIENT_ADDR, (i, a)
        assert a.fields["fwd"] == f'for={CLIENT_ADDR};proto=http;host="{host}"', (i, a)
        assert a.fields["host"] == host, (i, a)
    return [a for a in answers if node_of[a.replica] != sl.node_ids[i]]


@pytest.mark.lab
def test_every_node_reaches_replicas_on_every_node_with_the_client_address(swarm):
    """Host spread.test on any node's port: the requests of each keep-alive client spread over the
    replicas of all three nodes; the other nodes' share crosses the tunnel on pooled connections, and
    every replica sees 198.18.200.1 in X-Forwarded-For and Forwarded."""
    sl = swarm
    tasks = sl.wait_converged(SPREAD, 3)
    node_of = {cid: node for node, cid in tasks.values()}
    assert len(set(node_of.values())) == 3, f"replicas not one per node: {tasks}"
    forwarded = tunnel_forwarded(sl)
    runs = load_every_node(sl, SPREAD_HOST, clients=2, requests=60)
    forwarded = tunnel_forwarded(sl) - forwarded
    crossed: list[Answer] = []
    for i in ALL:
        cross = check_answers(sl, i, runs[i], SPREAD_HOST, node_of)
        for r in runs[i]:
            # balanced per request: one client connection reaches the replicas of every node
            assert r.replicas() == set(node_of), f"{r.name} reached {sorted(r.replicas())} of {sorted(node_of)}"
        crossed += cross
    requests, upstream = upstream_reuse(crossed)
    print(
        f"\n[http spread over 3 nodes] {sum(len(r.answers) for rs in runs.values() for r in rs)} requests from "
        f"{sum(map(len, runs.values()))} keep-alive clients; {requests} crossed the tunnel on {upstream} tunnel "
        f"connections ({requests / max(upstream, 1):.1f} requests each; agents counted {forwarded} forwarded)"
    )
    assert requests >= 150  # about 2/3 of the 360
    # pooled: each tunnel connection (one replica connection each) carried many requests
    assert upstream <= requests / 5, (requests, upstream)
    assert forwarded == upstream


@pytest.mark.lab
def test_a_node_without_a_local_replica_forwards_every_request(swarm):
    """Host one.test: both replicas run on node 1; requests entering nodes 2 and 3 all cross the tunnel
    (on pooled connections) and reach both, with the client's address."""
    sl = swarm
    tasks = sl.wait_converged(ONE, 2)
    node_of = {cid: node for node, cid in tasks.values()}
    assert set(node_of.values()) == {sl.node_ids[1]}
    runs = load_every_node(sl, ONE_HOST, clients=1, requests=40)
    assert check_answers(sl, 1, runs[1], ONE_HOST, node_of) == []  # node 1 serves locally
    for i in (2, 3):
        cross = check_answers(sl, i, runs[i], ONE_HOST, node_of)
        assert len(cross) == 40 and {a.replica for a in cross} == set(node_of), (i, Counter(a.replica for a in cross))
        requests, upstream = upstream_reuse(cross)
        assert upstream <= 4, f"node {i}: {requests} requests on {upstream} tunnel connections"
