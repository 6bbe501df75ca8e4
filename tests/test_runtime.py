"""Mesh.apply() as a diff, draining, shutdown and bind failures, with real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from mesh.pool import EJECTED, FAILED_ACTIVE_HC
from mesh.routing import Endpoint, HealthCheck, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import ListenKey, Mesh
from tests import backends
from tests.backends import Backend, closed_port
from tests.util import wait_for

_MESHES: list[Mesh] = []


@pytest.fixture(autouse=True)
async def _cleanup():
    yield
    while _MESHES:
        await _MESHES.pop().shutdown(0)
    while backends.LIVE:
        await backends.LIVE[-1].close()


def new_mesh(**kw) -> Mesh:
    m = Mesh(**kw)
    _MESHES.append(m)
    return m


def bound_port(mesh: Mesh, service: str) -> int:
    """The port the listener of ``service`` is bound to (its routes listen on port 0: any free port)."""
    (lst,) = [lst for lst in mesh.listeners() if lst.service == service]
    assert lst.sockname is not None and lst.sockname[1] == lst.port != 0
    return lst.port


def svc(name, port, *ports, states=None, **opts) -> Service:
    eps = tuple(
        Endpoint(id=f"{name}-{i}", address="127.0.0.1", port=p, state=(states or {}).get(i, "running"))
        for i, p in enumerate(ports)
    )
    return Service(name, (Route(port=port, endpoints=eps, listen_host="127.0.0.1"),), ServiceOptions(**opts))


class Client:
    """A client connection through the mesh (streams are fine on the test side)."""

    def __init__(self, r, w):
        self.r, self.w = r, w

    @classmethod
    async def open(cls, port: int) -> Client:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def echo(self, data: bytes) -> bytes:
        self.w.write(data)
        await self.w.drain()
        return await asyncio.wait_for(self.r.readexactly(len(data)), 5)

    async def line(self) -> str:
        return (await asyncio.wait_for(self.r.readline(), 5)).decode().strip()

    async def close(self) -> None:
        self.w.close()
        try:
            await self.w.wait_closed()
        except ConnectionError:
            pass


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_listener_added_and_removed_while_a_connection_stays_open():
    a, b = await Backend("a").start(), await Backend("b").start()
    mesh = new_mesh()
    await mesh.apply(RoutingTable(1, (svc("A", 0, a.port),)))
    pa = bound_port(mesh, "A")
    (listener_a,) = mesh.listeners()
    assert mesh.ready() and [(lst.service, lst.port) for lst in mesh.listeners()] == [("A", pa)]
    c = await Client.open(pa)
    assert await c.echo(b"one") == b"one"

    await mesh.apply(RoutingTable(2, (svc("B", 0, b.port),)))
    pb = bound_port(mesh, "B")
    assert [(lst.service, lst.port) for lst in mesh.listeners()] == [("B", pb)]
    assert not listener_a.listening  # stopped accepting at once
    # A's listener closes before B's binds, so the kernel may (rarely) hand B the port A just freed
    if pb != pa:
        assert refused(pa)
    assert await c.echo(b"two") == b"two"  # ... while the open connection continues
    c2 = await Client.open(pb)
    assert await c2.echo(b"new") == b"new"
    assert mesh.connections() == 2
    await c.close()
    await c2.close()
    await wait_for(lambda: mesh.connections() == 0)
    assert mesh.table.version == 2


async def test_pool_state_survives_a_table_with_the_same_endpoints():
    a = await Backend("a").start()
    dead = closed_port()
    mesh = new_mesh()
    t1 = RoutingTable(1, (svc("A", 0, a.port, dead, consecutive_failures=1, max_ejection_percent=50),))
    await mesh.apply(t1)
    port = bound_port(mesh, "A")
    lst = mesh.listener("127.0.0.1", port)
    pool = lst.pool
    dead_host = next(h for h in pool.hosts if h.port == dead)
    c = await Client.open(port)  # may hit the dead one first, then retries onto a
    assert await c.echo(b"x") == b"x"
    pool.report_failure(dead_host)  # make sure it is ejected whichever host the client got
    assert dead_host.health & EJECTED
    live_host = next(h for h in pool.hosts if h.port == a.port)
    assert live_host.active == 1

    await mesh.apply(t1.with_version(2))
    assert mesh.listener("127.0.0.1", port) is lst and lst.pool is pool
    assert next(h for h in pool.hosts if h.port == dead) is dead_host and dead_host.health & EJECTED
    assert live_host.active == 1 and live_host.stats.connections == 1
    assert await c.echo(b"y") == b"y"
    await c.close()
    await wait_for(lambda: live_host.active == 0)


async def test_changed_options_apply_to_new_connections_only():
    e = await Backend("e").start()
    mesh = new_mesh()
    await mesh.apply(RoutingTable(1, (svc("A", 0, e.port, idle_timeout=0),)))
    port = bound_port(mesh, "A")
    pool = mesh.listener("127.0.0.1", port).pool
    old = await Client.open(port)
    assert await old.echo(b"old") == b"old"
    await mesh.apply(RoutingTable(2, (svc("A", 0, e.port, idle_timeout=0.3),)))
    assert mesh.listener("127.0.0.1", port).pool is pool and pool.options.idle_timeout == 0.3
    new = await Client.open(port)
    assert await new.echo(b"new") == b"new"
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):  # the new connection has the idle timeout (a cut: a reset)
        await asyncio.wait_for(new.r.read(), 3)
    assert 0.25 <= time.monotonic() - t0 < 1.5
    assert await old.echo(b"still") == b"still"  # the old one kept "no idle timeout"
    assert pool.hosts[0].stats.connections == 2
    await old.close()
    await new.close()


async def test_draining_endpoint_gets_no_new_connections_but_keeps_its_open_one():
    a, b = await Backend("a", "ident").start(), await Backend("b", "ident").start()
    mesh = new_mesh()
    await mesh.apply(RoutingTable(1, (svc("A", 0, a.port, b.port),)))
    port = bound_port(mesh, "A")
    c = await Client.open(port)
    first = await c.line()
    drain_index = 0 if first == "a" else 1
    await mesh.apply(RoutingTable(2, (svc("A", 0, a.port, b.port, states={drain_index: "draining"}),)))
    assert bound_port(mesh, "A") == port  # the same listener: a port-0 route is kept by its service
    others = []
    for _ in range(4):
        c2 = await Client.open(port)
        others.append(await c2.line())
        await c2.close()
    assert others == ["b" if first == "a" else "a"] * 4
    assert await c.echo(b"still here") == b"still here"
    host = next(h for h in mesh.listener("127.0.0.1", port).pool.hosts if h.id.endswith(str(drain_index)))
    assert host.draining and host.active == 1
    await c.close()
    await wait_for(lambda: host.active == 0)


async def test_shutdown_waits_for_connections_that_finish_within_grace():
    a = await Backend("a").start()
    mesh = new_mesh()
    await mesh.apply(RoutingTable(1, (svc("A", 0, a.port),)))
    port = bound_port(mesh, "A")
    c = await Client.open(port)
    assert await c.echo(b"x") == b"x"

    async def finish_soon():
        await asyncio.sleep(0.2)  # the client's own pace, not synchronisation
        await c.close()

    closer = asyncio.get_running_loop().create_task(finish_soon())
    t0 = time.monotonic()
    await mesh.shutdown(5.0)
    elapsed = time.monotonic() - t0
    await closer
    assert 0.15 <= elapsed < 2.0, elapsed  # returned when the connection ended, well before the grace
    assert mesh.connections() == 0 and mesh.listeners() == [] and refused(port)
    assert a.bytes_received == 1


async def test_shutdown_aborts_connections_still_open_after_grace():
    a = await Backend("a").start()
    mesh = new_mesh()
    await mesh.apply(RoutingTable(1, (svc("A", 0, a.port),)))
    port = bound_port(mesh, "A")
    c = await Client.open(port)
    assert await c.echo(b"x") == b"x"
    t0 = time.monotonic()
    await mesh.shutdown(0.3)
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert mesh.connections() == 0
    with pytest.raises(ConnectionResetError):  # cut off at the end of the grace: a reset, not a clean end
        await asyncio.wait_for(c.r.read(), 2)
    await wait_for(lambda: a.open == 0, what="backend side closed by the abort")
    assert a.lost and isinstance(a.lost[-1], ConnectionResetError)  # the backend sees the reset too
    await c.close()


async def test_port_taken_is_skipped_with_a_log_and_others_serve(caplog):
    a, b = await Backend("a").start(), await Backend("b").start()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    pt = taken.getsockname()[1]  # a fixed number that must stay taken: the test holds the socket
    mesh = new_mesh()
    table = RoutingTable(1, (svc("blocked", pt, a.port), svc("fine", 0, b.port)))
    with caplog.at_level(logging.ERROR, logger="mesh.runtime"):
        await mesh.apply(table)
    pb = bound_port(mesh, "fine")
    msgs = [r.getMessage() for r in caplog.records if r.name == "mesh.runtime"]
    assert any(
        f"service blocked port {pt}" in m and f"cannot bind 127.0.0.1:{pt}: Address already in use" in m for m in msgs
    ), msgs
    assert not mesh.ready() and list(mesh.failed) == [ListenKey("tcp", "127.0.0.1", pt)]
    c = await Client.open(pb)
    assert await c.echo(b"ok") == b"ok"
    await c.close()
    # Once the port is free, the next apply binds it.  (Between this close and the apply another process
    # could take the port; the window is one call long and the test needs that very number back.)
    taken.close()
    await mesh.apply(table.with_version(2))
    assert mesh.ready() and sorted(lst.service for lst in mesh.listeners()) == ["blocked", "fine"]
    c = await Client.open(pt)
    assert await c.echo(b"now") == b"now"
    await c.close()


async def test_health_checker_follows_the_options():
    a = await Backend("a").start()
    dead = closed_port()
    hc = HealthCheck(kind="tcp", interval=0.05, timeout=0.5, rise=1, fall=1, jitter=0)
    mesh = new_mesh()
    await mesh.apply(RoutingTable(1, (svc("A", 0, a.port, dead, health_check=hc, panic_threshold=0),)))
    port = bound_port(mesh, "A")
    pool = mesh.listener("127.0.0.1", port).pool
    dead_host = next(h for h in pool.hosts if h.port == dead)
    await wait_for(lambda: dead_host.health & FAILED_ACTIVE_HC, what="health check to fail the dead endpoint")
    for _ in range(3):
        c = await Client.open(port)
        assert await c.echo(b"x") == b"x"  # never tried the failed one: no connect failures
        await c.close()
    assert pool.stats.connect_failures == {}
    await mesh.apply(RoutingTable(2, (svc("A", 0, a.port, dead, panic_threshold=0),)))
    assert not dead_host.health & FAILED_ACTIVE_HC  # check removed: its verdict no longer holds


async def test_port_0_is_refused_where_workers_share_ports(caplog):
    """A Mesh of a --workers process (reuse_port=True) cannot serve port 0: every worker would get another
    port.  The route is reported as not bound, naming the service; the rest of the table applies."""
    b = await Backend("b").start()
    mesh = new_mesh(reuse_port=True)
    with caplog.at_level(logging.ERROR, logger="mesh.runtime"):
        await mesh.apply(RoutingTable(1, (svc("anyport", 0, b.port),)))
    assert not mesh.ready() and mesh.listeners() == []
    assert list(mesh.failed.values()) == ["port 0 (any free port) cannot be shared by several workers; name a port"]
    assert any("service anyport" in r.getMessage() for r in caplog.records)


async def test_a_port_that_could_not_be_bound_is_retried_without_a_new_table(monkeypatch, caplog):
    """The reliability issue, item 5: a failed bind was retried only when the table changed, so the port
    stayed refused after the other process let it go.  Now it is retried with backoff."""
    import mesh.runtime as runtime_mod

    monkeypatch.setattr(runtime_mod, "REBIND_INITIAL", 0.05)
    b = await Backend("b").start()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    mesh = new_mesh()
    await mesh.apply(RoutingTable(1, (svc("late", port, b.port),)))
    assert not mesh.ready() and list(mesh.failed) == [ListenKey("tcp", "127.0.0.1", port)]
    await asyncio.sleep(0.2)  # a few retries while the port is still taken: still failed, still serving others
    assert not mesh.ready()
    holder.close()
    with caplog.at_level(logging.INFO, logger="mesh.runtime"):
        await wait_for(mesh.ready, timeout=5, what="the port bound on a retry")
    assert any("bound on retry" in r.getMessage() for r in caplog.records)
    c = await Client.open(port)
    assert await c.echo(b"x") == b"x"
    await c.close()
