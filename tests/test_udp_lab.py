"""UDP through real engines: a stopped container drained in the engine lab (tests/dockerlab.py), and a
replica on another node of the swarm lab (tests/swarmlab.py) reached through the agents' UDP tunnel with
the client address preserved; malformed and non-node tunnel datagrams dropped and counted.

The replica is a 40-line static C program compiled here (the lab image is busybox, whose nc has no UDP):
it answers each datagram with "<hostname> <client from a PROXY v2 header, or -> <payload>", and is bind
mounted into the containers (the lab's engines share this machine's file system).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.dockerlab import docker_lab  # noqa: F401  (fixture)
from tests.swarmlab import CLIENT_ADDR, TUNNEL_PORT, SwarmLab, wait_for_other_labs

pytestmark = [pytest.mark.docker, pytest.mark.lab, pytest.mark.timeout(600)]

UDPECHO_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    static const unsigned char sig[12] = {13, 10, 13, 10, 0, 13, 10, 'Q', 'U', 'I', 'T', 10};
    static unsigned char buf[65536], out[66000];
    char host[64] = "?", client[64];
    int port = argc > 1 ? atoi(argv[1]) : 53;
    gethostname(host, sizeof host - 1);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    for (;;) {
        struct sockaddr_in peer;
        socklen_t pl = sizeof peer;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&peer, &pl);
        if (n < 0) continue;
        unsigned char *p = buf;
        ssize_t len = n;
        strcpy(client, "-");
        if (n >= 16 && memcmp(buf, sig, 12) == 0) {
            ssize_t hl = 16 + ((buf[14] << 8) | buf[15]);
            if ((buf[13] >> 4) == 1 && n >= 28) {
                char ip[32];
                inet_ntop(AF_INET, buf + 16, ip, sizeof ip);
                snprintf(client, sizeof client, "%s:%d", ip, (buf[24] << 8) | buf[25]);
            }
            if (hl <= n) { p = buf + hl; len = n - hl; }
        }
        int m = snprintf((char *)out, sizeof out, "%s %s ", host, client);
        memcpy(out + m, p, len);
        sendto(s, out, m + len, 0, (struct sockaddr *)&peer, pl);
    }
}
"""


@pytest.fixture(scope="module")
def udpecho(docker_lab) -> Path:  # noqa: F811
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the UDP replica")
    d = docker_lab.run_root / "udpecho"
    d.mkdir(parents=True, exist_ok=True)
    (d / "udpecho.c").write_text(UDPECHO_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "udpecho"), str(d / "udpecho.c")], check=True)
    return d / "udpecho"


def ask(addr: str, port: int, payload: bytes, *, sock: socket.socket | None = None, timeout: float = 2.0,
        tries: int = 3) -> str:  # fmt: skip
    """One datagram and its answer (bounded retries: UDP); the answer must come from (addr, port)."""
    own = sock is None
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        for attempt in range(tries):
            s.sendto(payload, (addr, port))
            try:
                data, src = s.recvfrom(65535)
            except TimeoutError:
                if attempt == tries - 1:
                    raise
                continue
            assert src == (addr, port)
            return data.decode()
        raise AssertionError("unreachable")
    finally:
        if own:
            s.close()


# -- the engine lab: a stopped container drained --------------------------------------------------


async def test_stopped_container_drained_sessions_move(docker_lab, udpecho):  # noqa: F811
    from tests.test_discovery_engine import running_mesh, sh

    node = docker_lab.node(1, live_restore=True)
    mount = f"type=bind,source={udpecho},target=/udpecho,readonly"
    labels = ["--label", "mesh.publish=127.0.0.1:0:53/udp", "--label", "mesh.service=dns",
              "--label", "mesh.udp.balance=round-robin", "--label", "mesh.udp.idle-timeout=20s"]  # fmt: skip
    ids = []
    try:
        for i in range(2):
            out = await sh(node, "run", "-d", "--name", f"udp-{i}", "--mount", mount, *labels, docker_lab.image_id,
                           "/udpecho", "53")  # fmt: skip
            ids.append(out.strip())
        async with running_mesh(node) as h:
            port = await h.port("dns")
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
            try:
                for s in socks:
                    s.bind(("127.0.0.1", 0))
                first = {s.getsockname(): (await asyncio.to_thread(ask, "127.0.0.1", port, b"q", sock=s)).split()[0]
                         for s in socks}  # fmt: skip
                assert len(set(first.values())) == 2, first  # both replicas serve
                victim = ids[0]
                victim_host = victim[:12]
                await sh(node, "stop", "-t", "1", victim)
                await wait_gone(h, victim)
                # every session that was on the stopped replica moved to the other one at once
                for s in socks:
                    answer = (await asyncio.to_thread(ask, "127.0.0.1", port, b"again", sock=s)).split()
                    assert answer[0] != victim_host and answer[-1] == "again", answer
                lst = next(lst for lst in h.plane.listeners() if lst.protocol == "udp")
                moved = sum(1 for v in first.values() if v == victim_host)
                print(f"\n[udp engine lab] sessions {lst.stats!r}; moved {lst.stats.sessions_moved} of {moved}")
                assert lst.stats.sessions_moved == moved
                assert len(lst.sessions) == 6
            finally:
                for s in socks:
                    s.close()
    finally:
        for i in range(2):
            await sh(node, "rm", "-f", f"udp-{i}")


async def wait_gone(h, cid: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while cid in h.endpoints("dns"):
        assert time.monotonic() < deadline, "the stopped container stayed in the table"
        await asyncio.sleep(0.05)


# -- the swarm lab: the UDP tunnel --------------------------------------------------------------------

DNS, DNS_PORT = "udns", 15353


@pytest.fixture(scope="module")
def swarm(request, udpecho):
    wait_for_other_labs(os.getpid())
    sl = SwarmLab(request.getfixturevalue("docker_lab"))
    try:
        sl.setup()
        for i in (2, 1, 3):
            sl.start_agent(i)
        mount = f"type=bind,source={udpecho},target=/udpecho,readonly"
        # two replicas, both on node 1: datagrams to nodes 2 and 3 must cross the UDP tunnel
        sl.create_service(DNS, 2, {"mesh.publish": f"{DNS_PORT}:53/udp", "mesh.proxy-protocol": "v2"},
                          cmd=["/udpecho", "53"],
                          extra=("--mount", mount, "--constraint", f"node.id=={sl.node_ids[1]}"))  # fmt: skip
        sl.wait_converged(DNS, 2, timeout=90)
        yield sl
    finally:
        sl.close()


def _udp_tunnel(sl: SwarmLab, i: int) -> dict:
    return (sl.status(i) or {}).get("udp_tunnel") or {}


def test_replica_on_another_node_through_the_udp_tunnel_with_the_client_address(swarm):
    sl = swarm
    tasks = sl.wait_converged(DNS, 2, timeout=30)
    replicas = {cid for _, cid in tasks.values()}
    for i in (1, 2, 3):
        sl.wait(lambda i=i: len(sl.endpoints(i, DNS) or []) == 2, 30, f"agent {i} lists both replicas")
    got: dict[int, set[str]] = {}
    for i in (1, 2, 3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((CLIENT_ADDR, 0))
        try:
            for k in range(4):
                host, client, payload = ask(sl.nodes[i].addr, DNS_PORT, b"q%d" % k, sock=s).split()
                # the replica saw the original client (test process address and port), whichever node it came in on
                assert client == f"{CLIENT_ADDR}:{s.getsockname()[1]}", (i, host, client)
                assert payload == f"q{k}"
                got.setdefault(i, set()).add(host)
        finally:
            s.close()
    print(f"\n[udp tunnel] replicas per entry node {got}; tunnel of node 1: {_udp_tunnel(sl, 1)}")
    assert set().union(*got.values()) <= replicas
    t1 = _udp_tunnel(sl, 1)
    assert t1["sessions_created"] >= 2  # one per entry node 2 and 3 (node 1 serves locally)
    assert t1["dropped"]["peer"] == 0 and t1["dropped"]["malformed"] == 0


def test_malformed_and_non_node_tunnel_datagrams_are_dropped_and_counted(swarm):
    from mesh.udp import udp_tunnel_header

    sl = swarm
    before = _udp_tunnel(sl, 1)["dropped"]
    eps = [e for e in sl.endpoints(1, DNS) if e.get("via") is None]
    target = f"{eps[0]['id']}:{eps[0]['port']}"
    # from the test process: not a cluster node, even with a well-formed header
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((CLIENT_ADDR, 0))
    s.sendto(udp_tunnel_header((CLIENT_ADDR, 1), target) + b"x", (sl.nodes[1].addr, TUNNEL_PORT))
    s.close()
    # from node 3 (a cluster node, as a container there would be): garbage, a header for a local endpoint that is
    # not sealed with the cluster token (a forged client), and a sealed one whose target is not local to node 1
    n3 = sl.nodes[3]
    root, dst = str(Path(__file__).resolve().parent.parent), (sl.nodes[1].addr, TUNNEL_PORT)
    script = (
        f"import socket, sys; sys.path.insert(0, {root!r})\n"
        "from mesh.udp import udp_tunnel_header\n"
        "from mesh.proxy.preamble import TunnelAuth\n"
        f"auth = TunnelAuth(open({str(sl.token_file)!r}).read().strip())\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"dst = {dst!r}\n"
        "s.sendto(b'not a tunnel datagram', dst)\n"
        "s.sendto(b'MU\\x01\\x04\\x01', dst)\n"
        f"s.sendto(udp_tunnel_header(('198.18.0.1', 5), {target!r}) + b'x', dst)\n"
        "s.sendto(udp_tunnel_header(('198.18.0.1', 5), 'nosuchtask:53', auth) + b'x', dst)\n"
    )
    subprocess.run(["nsenter", f"--net=/run/netns/{n3.netns}", "--", "python3", "-c", script], check=True, timeout=30)

    def counted() -> bool:
        d = _udp_tunnel(sl, 1).get("dropped") or {}
        return (d.get("peer", 0) - before["peer"], d.get("malformed", 0) - before["malformed"],
                d.get("auth", 0) - before.get("auth", 0),
                d.get("unknown_target", 0) - before["unknown_target"]) == (1, 2, 1, 1)  # fmt: skip

    sl.wait(counted, 10, "drops counted on node 1's udp tunnel")
    # and the service still answers
    _, client, payload = ask(sl.nodes[3].addr, DNS_PORT, b"still").split()
    assert payload == "still" and client.startswith(f"{CLIENT_ADDR}:")

