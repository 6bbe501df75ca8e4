"""UDP services (mesh/udp.py) through the real runtime: echo replicas and clients on loopback.

Loopback has the whole of 127.0.0.0/8, so clients bind distinct source addresses where a test needs
several client IPs (the default ``hash`` balancer hashes the client IP)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from mesh import proxyproto
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import Mesh
from mesh.udp import dgram_proxy_header, parse_tunnel_datagram, udp_tunnel_header
from tests.util import wait_for

# -- the tunnel header and the PROXY header, on their own ------------------------------------------


@pytest.mark.parametrize(
    ("client", "target"),
    [(("198.18.0.7", 40000), "t1:53"), (("2001:db8::1", 1), "x" * 250 + ":1"), (("::ffff:10.0.0.1", 5), "é:9")],
)
def test_tunnel_header_round_trip(client, target):
    header = udp_tunnel_header(client, target)
    got_client, got_target, n = parse_tunnel_datagram(header + b"payload")
    want_ip = client[0].removeprefix("::ffff:")
    assert (got_client, got_target, n) == ((want_ip, client[1]), target, len(header))
    assert len(header) <= 4 + 16 + 3 + 255


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "magic"),
        (b"MU\x03\x04" + b"\x00" * 10, "magic"),  # version 3 does not exist (1: unsealed, 2: sealed)
        (b"MU\x02\x04\x01\x02\x03\x04\x00\x35\x04t1:5" + b"\x00" * 39, "truncated seal"),
        (b"XX\x01\x04", "magic"),
        (b"MU\x01\x05" + b"\x00" * 10, "family"),
        (b"MU\x01\x04\x01\x02\x03\x04\x00", "truncated"),
        (b"MU\x01\x04\x01\x02\x03\x04\x00\x35\x00", "target length"),
        (b"MU\x01\x04\x01\x02\x03\x04\x00\x35\x05t1:5", "target length"),
        (b"MU\x01\x04\x01\x02\x03\x04\x00\x35\x02\xff\xfe", "UTF-8"),
        (b"MU\x01\x04\x01\x02\x03\x04\x00\x35\x02a\n", "printable"),
    ],
)
def test_malformed_tunnel_datagrams(data, why):
    with pytest.raises(ValueError, match=why):
        parse_tunnel_datagram(data)


def test_dgram_proxy_header():
    header = dgram_proxy_header(("198.18.0.7", 40000), ("127.0.0.1", 53))
    parsed, n = proxyproto.decode(header + b"query")
    assert (parsed.transport, parsed.src, parsed.dst, n) == ("dgram", ("198.18.0.7", 40000), ("127.0.0.1", 53), 28)


# -- replicas and clients --------------------------------------------------------------------------


class Echo(asyncio.DatagramProtocol):
    """A UDP replica: answers b"<name> <payload>" to each datagram (``copies`` times), records senders."""

    def __init__(self, name: str, copies: int = 1, proxy: bool = False) -> None:
        self.name = name.encode()
        self.copies = copies
        self.proxy = proxy
        self.senders: list[tuple] = []
        self.clients: list[tuple] = []  # from PROXY headers
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.senders.append(addr)
        if self.proxy:
            header, n = proxyproto.decode(data)
            self.clients.append(header.src)
            data = data[n:]
        for _ in range(self.copies):
            self.transport.sendto(self.name + b" " + data, addr)


async def echo(name: str, **kw) -> tuple[Echo, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: Echo(name, **kw), local_addr=("127.0.0.1", 0))
    _ECHOES.append(transport)
    return proto, transport.get_extra_info("sockname")[1]


_ECHOES: list[asyncio.DatagramTransport] = []
_MESHES: list[Mesh] = []
_SOCKS: list[socket.socket] = []


@pytest.fixture(autouse=True)
async def _cleanup():
    yield
    while _MESHES:
        await _MESHES.pop().shutdown(0)
    while _ECHOES:
        _ECHOES.pop().close()
    while _SOCKS:
        _SOCKS.pop().close()


def client(ip: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind((ip, 0))
    _SOCKS.append(s)
    return s


def send(sock: socket.socket, payload: bytes, port: int) -> None:
    sock.sendto(payload, ("127.0.0.1", port))  # a non-blocking UDP send on loopback does not block


async def recv(sock: socket.socket, timeout: float = 2.0) -> tuple[bytes, tuple]:
    """One datagram (uvloop has no sock_recvfrom: a reader and a future)."""
    loop = asyncio.get_running_loop()
    try:
        return sock.recvfrom(65535)
    except BlockingIOError:
        pass
    fut = loop.create_future()

    def readable() -> None:
        if fut.done():
            return  # leave the next datagram for the next recv()
        try:
            got = sock.recvfrom(65535)
        except BlockingIOError:
            return
        except OSError as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(got)

    loop.add_reader(sock.fileno(), readable)
    try:
        return await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(sock.fileno())


async def exchange(sock: socket.socket, port: int, payload: bytes, *, timeout: float = 2.0) -> bytes:
    send(sock, payload, port)
    data, addr = await recv(sock, timeout)
    assert addr == ("127.0.0.1", port)  # replies come from the published port
    return data


def udp_service(name: str, ports: list[int], *, states=None, port: int = 0, **opts) -> Service:
    eps = tuple(
        Endpoint(f"{name}-{i}", "127.0.0.1", p, state=(states or {}).get(i, "running")) for i, p in enumerate(ports)
    )
    return Service(name, (Route(port, eps, "127.0.0.1", protocol="udp"),), ServiceOptions(**opts))


async def serve(*services: Service) -> tuple[Mesh, int]:
    mesh = Mesh()
    _MESHES.append(mesh)
    await mesh.apply(RoutingTable(1, services))
    assert mesh.ready(), mesh.failed
    lst = next(lst for lst in mesh.listeners() if lst.protocol == "udp")
    return mesh, lst.port


def udp_listener(mesh: Mesh):
    (lst,) = [lst for lst in mesh.listeners() if lst.protocol == "udp"]
    return lst


# -- behaviour ----------------------------------------------------------------------------------------


async def test_datagrams_through_and_back_from_the_published_port():
    a, pa = await echo("A")
    mesh, port = await serve(udp_service("dns", [pa]))
    c = client()
    assert await exchange(c, port, b"q1") == b"A q1"
    assert await exchange(c, port, b"q2") == b"A q2"
    lst = udp_listener(mesh)
    assert len(lst.sessions) == 1 and lst.stats.sessions_created == 1
    assert len(set(a.senders)) == 1  # one session: one upstream socket


@pytest.mark.parametrize("balance", ["round-robin", "least-conn", "p2c"])
async def test_distribution_per_algorithm(balance):
    replicas = [await echo(n) for n in ("A", "B")]
    mesh, port = await serve(udp_service("svc", [p for _, p in replicas], udp_balance=balance))
    got = []
    for i in range(20):
        got.append((await exchange(client(), port, b"x%d" % i)).split()[0])
    counts = {n: got.count(n) for n in (b"A", b"B")}
    if balance in ("round-robin", "least-conn"):
        assert counts == {b"A": 10, b"B": 10}
    else:
        assert counts[b"A"] > 0 and counts[b"B"] > 0
    pool = udp_listener(mesh).pool
    assert pool.options.balance == balance and sum(h.active for h in pool.hosts) == 20


async def test_default_hash_keeps_a_client_ip_on_its_replica():
    replicas = [await echo(n) for n in ("A", "B", "C")]
    mesh, port = await serve(udp_service("svc", [p for _, p in replicas], udp_idle_timeout=0.1))
    assert udp_listener(mesh).pool.options.balance == "hash"
    first = {}
    for i in range(24):
        ip = f"127.0.9.{i + 1}"
        first[ip] = (await exchange(client(ip), port, b"q")).split()[0]
    assert len(set(first.values())) >= 2  # spread over client IPs
    await wait_for(lambda: not udp_listener(mesh).sessions, what="sessions expired")
    for ip, name in first.items():  # new sessions (new source ports), the same replica
        assert (await exchange(client(ip), port, b"again")).split()[0] == name


async def test_a_client_keeps_its_replica_within_a_session():
    replicas = [await echo(n) for n in ("A", "B")]
    _mesh, port = await serve(udp_service("svc", [p for _, p in replicas], udp_balance="round-robin"))
    c1, c2 = client(), client()
    names = {await exchange(c1, port, b"1"), await exchange(c2, port, b"1")}
    assert {n.split()[0] for n in names} == {b"A", b"B"}
    one = (await exchange(c1, port, b"2")).split()[0]
    for i in range(10):
        assert (await exchange(c1, port, b"%d" % i)).split()[0] == one


@pytest.mark.uvloop_only
async def test_replies_reach_the_right_client_among_1000_flows():
    replicas = [await echo(n) for n in ("A", "B", "C", "D")]
    mesh, port = await serve(udp_service("svc", [p for _, p in replicas], udp_balance="round-robin"))

    socks = [client() for _ in range(1000)]
    got: dict[int, bytes] = {}

    async def flow(i: int, s: socket.socket) -> None:
        for attempt in range(5):  # UDP on loopback may drop under a burst: bounded retries
            send(s, b"flow-%d" % i, port)
            try:
                data, _ = await recv(s, 1.0 + attempt)
            except TimeoutError:
                continue
            got[i] = data
            return

    started = time.monotonic()
    sem = asyncio.Semaphore(200)

    async def bounded(i, s):
        async with sem:
            await flow(i, s)

    await asyncio.wait_for(asyncio.gather(*(bounded(i, s) for i, s in enumerate(socks))), 60)
    assert len(got) == 1000, f"{1000 - len(got)} flows got no answer"
    for i, data in got.items():
        assert data.split()[1] == b"flow-%d" % i
    assert udp_listener(mesh).stats.sessions_created == 1000
    assert {d.split()[0] for d in got.values()} == {b"A", b"B", b"C", b"D"}
    assert time.monotonic() - started < 60


async def test_idle_sessions_expire():
    _a, pa = await echo("A")
    mesh, port = await serve(udp_service("svc", [pa], udp_idle_timeout=0.2))
    lst = udp_listener(mesh)
    c = client()
    await exchange(c, port, b"1")
    host = lst.pool.hosts[0]
    assert host.active == 1
    started = time.monotonic()
    await wait_for(lambda: not lst.sessions, timeout=3, what="expiry")
    assert 0.15 <= time.monotonic() - started < 1.0
    assert lst.stats.sessions_ended == {"idle": 1} and host.active == 0
    assert await exchange(c, port, b"2") == b"A 2"
    assert lst.stats.sessions_created == 2
    assert lst.host_stats[host].datagrams_in == 1 and lst.host_stats[host].datagrams_out == 1


async def test_session_cap_evicts_the_oldest_idle():
    _a, pa = await echo("A")
    mesh, port = await serve(udp_service("svc", [pa], udp_max_sessions=3))
    lst = udp_listener(mesh)
    cs = [client() for _ in range(5)]
    for c in cs[:3]:
        await exchange(c, port, b"x")
    await exchange(cs[0], port, b"y")  # cs[0] active again: cs[1] is now the oldest idle
    await exchange(cs[3], port, b"x")
    await exchange(cs[4], port, b"x")
    assert lst.stats.sessions_evicted == 2
    assert set(lst.sessions) == {cs[0].getsockname(), cs[3].getsockname(), cs[4].getsockname()}
    assert lst.pool.hosts[0].active == 3


async def test_responses_expected_ends_the_session():
    _a, pa = await echo("A", copies=2)
    mesh, port = await serve(udp_service("dns", [pa], udp_responses=2))
    lst = udp_listener(mesh)
    c = client()

    send(c, b"q", port)
    assert [await recv(c) for _ in range(2)] == [
        (b"A q", ("127.0.0.1", port)),
        (b"A q", ("127.0.0.1", port)),
    ]
    await wait_for(lambda: lst.stats.sessions_ended.get("responses") == 1)
    assert not lst.sessions and lst.pool.hosts[0].active == 0


async def test_replica_removed_moves_at_once_on_the_same_listener():
    (_a, pa), (_b, pb) = await echo("A"), await echo("B")
    svc = udp_service("svc", [pa, pb], udp_balance="round-robin")
    mesh, port = await serve(svc)
    lst = udp_listener(mesh)
    cs = [client(), client()]
    owners = [(await exchange(c, port, b"1")).split()[0] for c in cs]
    assert sorted(owners) == [b"A", b"B"]
    # (port 0 again: the same listen key, so the same listener, updated in place)
    fixed = Service("svc", (Route(0, svc.routes[0].endpoints[1:], "127.0.0.1", protocol="udp"),), svc.options)
    await mesh.apply(RoutingTable(2, (fixed,)))
    assert udp_listener(mesh) is lst
    assert lst.stats.sessions_moved == 1
    assert all(s.host.endpoint.id == "svc-1" for s in lst.sessions.values())
    for c in cs:
        assert (await exchange(c, port, b"2")).split()[0] == b"B"


async def test_draining_replica_keeps_its_sessions_and_gets_no_new_ones():
    (_a, pa), (_b, pb) = await echo("A"), await echo("B")
    svc = udp_service("svc", [pa, pb], udp_balance="round-robin")
    mesh, port = await serve(svc)
    udp_listener(mesh)
    c1, c2 = client(), client()
    o1, o2 = (await exchange(c1, port, b"1")).split()[0], (await exchange(c2, port, b"1")).split()[0]
    drained = 0 if o1 == b"A" else 1
    draining = udp_service("svc", [pa, pb], states={drained: "draining"}, udp_balance="round-robin")
    await mesh.apply(RoutingTable(2, (draining,)))
    assert (await exchange(c1, port, b"2")).split()[0] == o1  # its session stays
    for _ in range(4):
        assert (await exchange(client(), port, b"n")).split()[0] == o2


async def test_port_unreachable_counts_as_a_failure_and_moves():
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.1", 0))
    dead = hole.getsockname()[1]
    hole.close()  # nothing listens: the kernel answers ICMP port unreachable
    _b, pb = await echo("B")
    mesh, port = await serve(udp_service("svc", [dead, pb], udp_balance="round-robin", consecutive_failures=2))
    lst = udp_listener(mesh)
    pool = lst.pool
    dead_host = next(h for h in pool.hosts if h.port == dead)

    answered = 0
    for _i in range(6):
        c = client()
        send(c, b"q", port)
        try:
            await recv(c, 0.5)
            answered += 1
        except TimeoutError:
            # the datagram that met the closed port is lost; the session moved: the next one answers
            await wait_for(lambda c=c: lst.sessions[c.getsockname()].host is not dead_host, timeout=2)
            assert (await exchange(c, port, b"again")) == b"B again"
    assert lst.host_stats[dead_host].refused >= 1
    assert pool.stats.connect_failures["refused"] == lst.host_stats[dead_host].refused
    assert dead_host.health & 2  # ejected after consecutive_failures refusals
    assert answered >= 3
    assert lst.stats.sessions_moved == lst.host_stats[dead_host].refused


async def test_proxy_v2_header_on_every_datagram():
    a, pa = await echo("A", proxy=True)
    _mesh, port = await serve(udp_service("svc", [pa], proxy_protocol="v2"))
    c = client("127.0.0.3")
    assert await exchange(c, port, b"one") == b"A one"
    assert await exchange(c, port, b"two") == b"A two"
    assert a.clients == [c.getsockname(), c.getsockname()]


async def test_one_service_publishes_a_port_for_tcp_and_udp():
    from tests.backends import Backend

    _a, pa = await echo("A")
    tcp_backend = await Backend().start()
    mesh = Mesh()
    _MESHES.append(mesh)
    await mesh.apply(RoutingTable(1, (Service("dns", (Route(0, (Endpoint("t", "127.0.0.1", tcp_backend.port),),
                                                            "127.0.0.1"),)),)))  # fmt: skip
    port = mesh.listeners()[0].port
    routes = (
        Route(port, (Endpoint("t", "127.0.0.1", tcp_backend.port),), "127.0.0.1"),
        Route(port, (Endpoint("u", "127.0.0.1", pa),), "127.0.0.1", protocol="udp"),
    )
    await mesh.apply(RoutingTable(2, (Service("dns", routes),)))
    assert mesh.ready() and sorted(lst.protocol for lst in mesh.listeners()) == ["tcp", "udp"]
    assert await exchange(client(), port, b"q") == b"A q"
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"ping")
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(4), 2) == b"ping"
    w.close()
    assert mesh.local_host("u", pa, "udp")[1].endpoint.id == "u"
    assert mesh.local_host("u", pa) is None and mesh.local_host("t", tcp_backend.port)[1].endpoint.id == "t"
    await tcp_backend.close()


async def test_no_endpoint_drops_and_counts():
    mesh, port = await serve(udp_service("svc", []))
    lst = udp_listener(mesh)
    c = client()
    send(c, b"q", port)
    await wait_for(lambda: lst.stats.dropped["no_endpoint"] == 1)
    assert lst.pool.stats.no_endpoint == 1 and not lst.sessions


async def test_removed_listener_ends_its_sessions():
    _a, pa = await echo("A")
    mesh, port = await serve(udp_service("svc", [pa]))
    lst = udp_listener(mesh)
    await exchange(client(), port, b"q")
    host = lst.pool.hosts[0]
    await mesh.apply(RoutingTable(2, ()))
    assert not lst.listening and not lst.sessions and host.active == 0
    assert lst.stats.sessions_ended == {"closed": 1}


async def test_metrics_and_admin_table_show_udp_listeners_and_sessions():
    from prometheus_client.parser import text_string_to_metric_families

    from mesh.admin import table_with_runtime
    from mesh.metrics import merge_snapshots, render_text, snapshot

    (_a, pa), (_b, pb) = await echo("A"), await echo("B")
    mesh, port = await serve(udp_service("dns", [pa, pb], udp_balance="round-robin", udp_max_sessions=2))
    c1, c2, c3 = client(), client(), client()
    for c in (c1, c2, c1):
        await exchange(c, port, b"12345")
    await exchange(c3, port, b"xy")  # evicts c2's session (the oldest idle)
    merged = merge_snapshots([snapshot(mesh)])
    (row,) = merged["routes"]
    assert row["protocol"] == "udp" and row["bound_ports"] == [port]
    u = row["udp"]
    assert (u["sessions_active"], u["sessions_created"], u["sessions_evicted"]) == (2, 3, 1)
    assert u["sessions_ended"] == {"evicted": 1}
    hosts = {h["id"]: h["udp"] for h in row["hosts"]}
    total_in = sum(h["datagrams_in"] for h in hosts.values())
    assert total_in == 4 and sum(h["datagrams_out"] for h in hosts.values()) == 4
    assert sum(h["bytes_in"] for h in hosts.values()) == 17 and sum(h["sessions"] for h in hosts.values()) == 3
    assert sum(h["sessions_active"] for h in hosts.values()) == 2

    text = render_text(merged)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    rl = (("port", "0"), ("service", "dns"))
    assert got[("mesh_udp_new_sessions_total", rl)] == 3
    assert got[("mesh_udp_sessions_evicted_total", rl)] == 1
    assert got[("mesh_udp_listener_up", rl)] == 1
    assert sum(v for (n, _), v in got.items() if n == "mesh_udp_received_datagrams_total") == 4
    assert sum(v for (n, _), v in got.items() if n == "mesh_udp_sessions_active") == 2
    assert got[("mesh_udp_dropped_total", tuple(sorted((*rl, ("reason", "no_endpoint")))))] == 0
    assert "mesh_connections_accepted_total" not in {n for n, _ in got}  # tcp series stay apart

    doc = table_with_runtime(mesh.table, merged)
    (listener,) = doc["runtime"]["listeners"]
    assert (listener["protocol"], listener["bound_port"], listener["listening"]) == ("udp", port, True)
    runtime = doc["services"][0]["routes"][0]["runtime"]
    assert runtime["udp"]["sessions_active"] == 2 and runtime["bound_port"] == port


def test_a_sealed_tunnel_header_round_trips_and_checks() -> None:
    from mesh.proxy.preamble import TunnelAuth, TunnelRefused

    now = [1_000_000.0]
    auth = TunnelAuth("cluster-token", clock=lambda: now[0])
    header = udp_tunnel_header(("203.0.113.7", 5353), "t1:53", auth)
    assert header[:3] == b"MU\x02"
    client, target, n = parse_tunnel_datagram(header + b"query")
    assert (client, target, n) == (("203.0.113.7", 5353), "t1:53", len(header))
    auth.check_datagram_header(header)  # sealed with the token, now
    for bad in (
        udp_tunnel_header(("203.0.113.7", 5353), "t1:53", TunnelAuth("another-token", clock=lambda: now[0])),
        header[:4] + bytes([header[4] ^ 1]) + header[5:],  # a forged client address
    ):
        with pytest.raises(TunnelRefused) as info:
            auth.check_datagram_header(bad)
        assert info.value.reason == "auth"
    now[0] += 31
    with pytest.raises(TunnelRefused) as info:
        auth.check_datagram_header(header)
    assert info.value.reason == "stale"
