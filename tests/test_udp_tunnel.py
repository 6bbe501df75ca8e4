"""The UDP tunnel between agents (cluster/udp_tunnel.py) on loopback: two data planes in one process,
"node A" reaching a replica of "node B" through B's tunnel; refusals counted.  The swarm lab runs the
same through real agents (tests/test_udp_lab.py)."""

from __future__ import annotations

import pytest

from cluster.udp_tunnel import UdpTunnelServer
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import Mesh
from mesh.udp import udp_tunnel_header
from tests.test_udp import _MESHES, _cleanup, client, echo, exchange, recv, send  # noqa: F401  (fixture)
from tests.util import wait_for

_SERVERS: list[UdpTunnelServer] = []


@pytest.fixture(autouse=True)
async def _close_servers():
    yield
    while _SERVERS:
        _SERVERS.pop().close()


async def two_nodes(*, proxy: str | None = None, allowed=("127.0.0.1",), auth=None):
    """B: a data plane with the local replica (task t1, port P) and its UDP tunnel; A: a data plane whose
    endpoint for t1 is via B's tunnel.  Returns (replica, A's published port, tunnel, B's mesh)."""
    replica, rport = await echo("R", proxy=proxy is not None)
    opts = ServiceOptions(proxy_protocol=proxy)
    b = Mesh(local_node="nB")
    _MESHES.append(b)
    await b.apply(RoutingTable(1, (Service("dns", (Route(0, (Endpoint("t1", "127.0.0.1", rport, node="nB"),),
                                                         "127.0.0.1", protocol="udp"),), opts),)))  # fmt: skip
    tunnel = UdpTunnelServer(lambda target: _resolve(b, target), lambda ip: ip in allowed, host="127.0.0.1", auth=auth)
    _SERVERS.append(tunnel)
    tunnel.start()
    a = Mesh(local_node="nA", tunnel_auth=auth)
    _MESHES.append(a)
    ep = Endpoint("t1", "198.18.0.9", rport, node="nB", via=f"127.0.0.1:{tunnel.port}")
    await a.apply(RoutingTable(1, (Service("dns", (Route(0, (ep,), "127.0.0.1", protocol="udp"),), opts),)))
    return replica, a.listeners()[0].port, tunnel, b


def _resolve(mesh: Mesh, target: str):
    ep_id, _, port = target.rpartition(":")
    return mesh.local_host(ep_id, int(port), "udp") if port.isdigit() else None


async def test_a_replica_on_another_node_through_the_tunnel_with_the_client_address():
    replica, port, tunnel, b = await two_nodes(proxy="v2")
    c = client("127.0.0.7")
    assert await exchange(c, port, b"q1") == b"R q1"
    assert await exchange(c, port, b"q2") == b"R q2"
    assert replica.clients == [c.getsockname()] * 2  # the original client, carried by the tunnel header
    assert tunnel.stats.sessions_created == 1 and len(tunnel.sessions) == 1
    b_host = b.listeners()[0].pool.hosts[0]
    assert b_host.active == 1  # the tunnel's session counts on the data plane's own host


async def test_malformed_and_non_node_datagrams_are_dropped_and_counted():
    replica, _port, tunnel, b = await two_nodes(allowed=("127.0.0.1",))
    rport = b.listeners()[0].pool.hosts[0].port
    good = client("127.0.0.1")
    stranger = client("127.0.0.9")
    send(good, b"hello, not a header", tunnel.port)
    send(good, b"MU\x01\x04\x01\x02", tunnel.port)
    send(good, udp_tunnel_header(("198.18.0.1", 5), "nope:53") + b"x", tunnel.port)
    send(stranger, udp_tunnel_header(("198.18.0.1", 5), f"t1:{rport}") + b"x", tunnel.port)
    await wait_for(lambda: sum(tunnel.stats.dropped.values()) == 4)
    assert {k: v for k, v in tunnel.stats.dropped.items() if v} == {"malformed": 2, "unknown_target": 1, "peer": 1}
    assert replica.senders == [] and not tunnel.sessions
    # a node's well-formed datagram for the local target goes through, the reply comes back without a header
    send(good, udp_tunnel_header(("198.18.0.1", 5), f"t1:{rport}") + b"x", tunnel.port)
    data, addr = await recv(good)
    assert data == b"R x" and addr == ("127.0.0.1", tunnel.port)


async def test_with_the_cluster_token_headers_are_sealed_checked_and_resealed_on_one_session(monkeypatch):
    """Cluster mode: A seals every session's header with the cluster token; B drops unsealed and foreign
    ones (counted "auth": what a container on a node could send, masqueraded to the node's address) and
    serves sealed ones; A reseals its header every RESEAL_AFTER and B keeps the same session (and socket)."""
    import mesh.udp as udp_mod
    from mesh.proxy.preamble import TunnelAuth

    ticks = iter(range(10**6))
    auth = TunnelAuth("the-cluster-token", clock=lambda: 1_000_000.0 + next(ticks) / 1000)  # 1 ms per call
    seals = []
    real_seal = auth.seal_datagram_header
    monkeypatch.setattr(auth, "seal_datagram_header", lambda h: seals.append(real_seal(h)) or seals[-1])
    replica, port, tunnel, b = await two_nodes(auth=auth)
    rport = b.listeners()[0].pool.hosts[0].port
    node = client("127.0.0.1")
    send(node, udp_tunnel_header(("198.18.0.1", 5), f"t1:{rport}") + b"x", tunnel.port)  # unsealed
    send(node, udp_tunnel_header(("198.18.0.1", 5), f"t1:{rport}", TunnelAuth("guess")) + b"x", tunnel.port)
    await wait_for(lambda: tunnel.stats.dropped.get("auth", 0) == 2, what="two drops")
    assert replica.senders == [] and not tunnel.sessions
    monkeypatch.setattr(udp_mod, "RESEAL_AFTER", 0.0)  # reseal before every datagram
    c = client("127.0.0.7")
    for i in range(3):
        assert await exchange(c, port, f"q{i}".encode()) == f"R q{i}".encode()
    assert len(set(seals)) >= 3  # a new seal for each datagram (each one differs)
    assert tunnel.stats.sessions_created == 1 and len(tunnel.sessions) == 1  # resealed: the same session
    assert len(set(replica.senders)) == 1  # and the same socket towards the replica
