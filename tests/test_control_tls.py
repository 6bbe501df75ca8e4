"""The control channel over TLS: real sockets, real certificates (trustme), both loops.

What is checked: states and deltas over TLS; a client that cannot verify the manager (another CA, another
name) is refused before it sends anything (the server saw no request); plain against TLS and TLS against
plain fail with messages that say so; mutual TLS; fail-over between TLS managers; a TLS control socket
handed over to a new server (meshagent/handover.py) keeps serving TLS; misconfigurations name the file.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import subprocess
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest
import trustme

from cluster.control import DEFAULT_TLS_NAME, ControlClient, ControlServer, ControlTLS, ControlTLSError
from cluster.state import ClusterState
from mesh.errors import ConfigError, ProtocolError
from mesh.listener import INHERITED
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from meshagent.handover import HandoverServer, Offer, close_listeners, request_takeover, server_sockets
from tests.fakeengine import running_fake_engine
from tests.test_cli import ROOT, Agent, clean_env, run_mesh_sync
from tests.test_control import NODES, S1, S2, TOKEN
from tests.test_handover import free_port
from tests.util import wait_for


class Files(NamedTuple):
    ca: str
    cert: str
    key: str


def _write(ca: trustme.CA, directory: Path, name: str = DEFAULT_TLS_NAME, tag: str = "") -> Files:
    leaf = ca.issue_cert(name)
    files = Files(str(directory / f"ca{tag}.pem"), str(directory / f"cert{tag}.pem"), str(directory / f"key{tag}.pem"))
    ca.cert_pem.write_to_path(files.ca)
    leaf.private_key_pem.write_to_path(files.key)
    with open(files.cert, "wb") as f:
        for pem in leaf.cert_chain_pems:
            f.write(pem.bytes())
    return files


@pytest.fixture(scope="module")
def cluster_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(cluster_ca: trustme.CA, tmp_path: Path) -> Files:
    return _write(cluster_ca, tmp_path)


async def _server(tls: ControlTLS | None, state: ClusterState | None = S1, port: int = 0) -> ControlServer:
    srv = ControlServer(TOKEN, "127.0.0.1", port, state=state, tls=tls.server_context() if tls else None)
    await srv.start()
    return srv


def _client(managers, applied: list, tls: ControlTLS | None, **kw) -> ControlClient:
    kw.setdefault("wait", 10.0)
    kw.setdefault("backoff_base", 0.02)
    kw.setdefault("backoff_cap", 0.2)
    return ControlClient(managers, TOKEN, applied.append, rng=random.Random(3), tls=tls, **kw)


def _big(version: int, changed_port: int) -> ClusterState:
    """20 services; the first one's endpoint port differs with ``changed_port`` (a delta is one service)."""
    services = tuple(
        Service(
            name=f"svc{i:02d}",
            routes=(Route(port=8000 + i, endpoints=(Endpoint(f"t{i}", f"172.18.0.{i + 2}", changed_port if i == 0 else 80,
                                                            node="n1"),)),),
            options=ServiceOptions(),
        )
        for i in range(20)
    )  # fmt: skip
    return ClusterState(table=RoutingTable(version=version, services=services), nodes=NODES)


async def test_tls_server_and_client_exchange_states_and_deltas(pki: Files) -> None:
    tls = ControlTLS(pki.ca, pki.cert, pki.key)
    srv = await _server(tls, state=None)
    applied: list[ClusterState] = []
    cli = _client([srv.address], applied, tls)
    await cli.start()
    b1, b2 = _big(1, 80), _big(2, 81)
    try:
        await wait_for(lambda: srv.stats.waiting == 1, what="first long-poll waiting")
        srv.publish(b1)
        await wait_for(lambda: len(applied) == 1, what="v1 over TLS")
        srv.publish(b2)
        await wait_for(lambda: len(applied) == 2, what="v2 over TLS")
        assert applied == [b1, b2]
        assert cli.stats.snapshots == 1 and cli.stats.deltas == 1  # the second came as a delta
        assert cli.stats.failures == 0 and cli.stats.tls_failures == 0
        assert srv.stats.unauthorized == 0
        await wait_for(lambda: srv.stats.waiting == 1, what="waiting again")
        assert srv.stats.requests == 3  # one kept-alive TLS connection carried all three polls
    finally:
        await cli.stop()
        await srv.stop()


@pytest.mark.parametrize("wrong", ["ca", "name"])
async def test_a_client_that_cannot_verify_the_manager_never_sends_its_token(
    pki: Files, tmp_path: Path, caplog, wrong: str
) -> None:
    if wrong == "ca":  # the manager's certificate is from another CA than the client trusts
        server_files = _write(trustme.CA(), tmp_path, tag="-other")
        expect = "did not verify against --control-tls-ca"
    else:  # the cluster's CA, but a certificate for another name
        server_files = _write(trustme.CA(), tmp_path, name="not-the-control", tag="-name")
        pki = Files(server_files.ca, pki.cert, pki.key)  # the client trusts that CA
        expect = "for the name 'mesh-control'"
    srv = await _server(ControlTLS(server_files.ca, server_files.cert, server_files.key))
    applied: list[ClusterState] = []
    cli = _client([srv.address], applied, ControlTLS(pki.ca))
    with caplog.at_level(logging.ERROR, logger="cluster.control"):
        await cli.start()
        try:
            await wait_for(lambda: cli.stats.tls_failures >= 2, what="handshakes refused")
        finally:
            await cli.stop()
            await srv.stop()
    assert srv.stats.requests == 0  # no request (so no token) reached the server
    assert applied == [] and cli.state is None
    msg = caplog.records[0].getMessage()
    assert expect in msg and "the token was not sent" in msg and pki.ca in msg


async def test_the_token_is_never_written_to_an_unverified_peer(pki: Files, tmp_path: Path) -> None:
    """Below the HTTP layer: a TLS listener with another CA's certificate records every decrypted byte."""
    other = _write(trustme.CA(), tmp_path, tag="-rogue")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(other.cert, other.key)
    received = bytearray()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.extend(await r.read(65536))
        w.close()

    rogue = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = rogue.sockets[0].getsockname()[1]
    cli = _client([("127.0.0.1", port)], [], ControlTLS(pki.ca))
    await cli.start()
    try:
        await wait_for(lambda: cli.stats.tls_failures >= 3, what="three refused handshakes")
    finally:
        await cli.stop()
        rogue.close()
        await rogue.wait_closed()
    assert bytes(received) == b""
    assert TOKEN.encode() not in bytes(received)


async def test_plain_client_against_tls_manager_and_tls_client_against_plain_manager(pki: Files, caplog) -> None:
    tls = ControlTLS(pki.ca, pki.cert, pki.key)
    tls_srv = await _server(tls)
    plain_srv = await _server(None)
    try:
        plain_cli = _client([tls_srv.address], [], None)
        with pytest.raises(ProtocolError, match="closed a new connection without answering: if it serves the "
                           "control port over TLS, give this node --control-tls-ca"):  # fmt: skip
            await plain_cli._poll(tls_srv.address)
        plain_cli._disconnect()
        tls_cli = _client([plain_srv.address], [], tls)
        with pytest.raises(ControlTLSError, match=r"answered the TLS handshake without TLS: it serves the control "
                           r"port in plain HTTP .*the token was not sent"):  # fmt: skip
            await tls_cli._poll(plain_srv.address)
        tls_cli._disconnect()
        assert tls_srv.stats.requests == 0
        assert plain_srv.stats.requests == 0  # the ClientHello was no request
        # the subscription loop reports the TLS mismatch as an error naming the manager
        applied: list[ClusterState] = []
        sub = _client([plain_srv.address], applied, tls)
        with caplog.at_level(logging.ERROR, logger="cluster.control"):
            await sub.start()
            try:
                await wait_for(lambda: sub.stats.tls_failures >= 1, what="refused")
            finally:
                await sub.stop()
        assert applied == []
        assert f"manager 127.0.0.1:{plain_srv.port} answered the TLS handshake without TLS" in caplog.text
    finally:
        await tls_srv.stop()
        await plain_srv.stop()


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Files, tmp_path: Path) -> None:
    srv = await _server(ControlTLS(pki.ca, pki.cert, pki.key, mutual=True))
    try:
        # with the cluster's certificate (the same one the managers serve): admitted
        applied: list[ClusterState] = []
        cli = _client([srv.address], applied, ControlTLS(pki.ca, pki.cert, pki.key))
        await cli.start()
        try:
            await wait_for(lambda: len(applied) == 1, what="state over mutual TLS")
        finally:
            await cli.stop()
        served = srv.stats.requests
        assert served >= 1
        # without a certificate, or with one from another CA: no request is served
        stranger = _write(trustme.CA(), tmp_path, tag="-stranger")
        for tls in (ControlTLS(pki.ca), ControlTLS(pki.ca, stranger.cert, stranger.key)):
            c = _client([srv.address], [], tls)
            # TLS 1.3: the manager refuses the certificate after the client's side of the handshake
            with pytest.raises(ProtocolError, match="requires client certificates .*give this node --control-tls-c"):
                await c._poll(srv.address)
            c._disconnect()
        assert srv.stats.requests == served and srv.stats.changed == 1
    finally:
        await srv.stop()


async def test_failover_between_tls_managers_keeps_state(pki: Files) -> None:
    tls = ControlTLS(pki.ca, pki.cert, pki.key)
    srv1 = await _server(tls, S1)
    srv2 = await _server(tls, ClusterState(table=S1.table.with_version(7), nodes=S1.nodes))
    applied: list[ClusterState] = []
    cli = _client([srv1.address, srv2.address], applied, tls)
    await cli.start()
    try:
        await wait_for(lambda: len(applied) == 1, what="first state")
        assert cli.manager == srv1.address
        await srv1.stop()
        await wait_for(lambda: srv2.stats.requests >= 1, what="failover to manager 2")
        assert applied == [S1]  # equal content from manager 2 is not applied again
        srv2.publish(ClusterState(table=S2.table.with_version(8), nodes=S2.nodes))
        await wait_for(lambda: len(applied) == 2, what="v2 from manager 2")
        assert applied[1].digest == S2.digest and cli.manager == srv2.address
        assert cli.stats.tls_failures == 0
    finally:
        await cli.stop()
        await srv2.stop()


async def test_a_handed_over_control_socket_keeps_serving_tls(pki: Files, tmp_path: Path) -> None:
    """The old server's listening socket goes to a new server through meshagent/handover.py (SCM_RIGHTS):
    the new one serves TLS on it; a subscriber of the old one moves over and gets the new one's states."""
    tls = ControlTLS(pki.ca, pki.cert, pki.key)
    old = await _server(tls, S1)
    port = old.port
    applied: list[ClusterState] = []
    cli = _client([("127.0.0.1", port)], applied, tls)
    await cli.start()
    path = str(tmp_path / "handover.sock")

    async def release() -> None:
        close_listeners(old._runner)

    offers = [Offer("stream", "127.0.0.1", port, "control", s) for s in server_sockets(old._runner)]
    handover = HandoverServer(path, lambda: offers, release)
    await handover.start()
    new = None
    try:
        await wait_for(lambda: len(applied) == 1, what="state from the old server")
        taken, why = await asyncio.to_thread(request_takeover, path, 5.0)
        assert why == "ok" and taken is not None
        taken.offer(INHERITED)
        new = ControlServer(TOKEN, "127.0.0.1", port, state=S2, tls=tls.server_context())
        await new.start()  # takes the inherited socket (binding the port would fail: the old one holds it)
        assert INHERITED.keys() == []
        assert await asyncio.to_thread(taken.release, 5.0)
        await old.stop()  # its waiting subscriber gets a 503, and reconnects: to the new server, over TLS
        await wait_for(lambda: len(applied) == 2, what="state from the new server")
        assert applied[1] == S2
        assert new.stats.requests >= 1 and cli.stats.tls_failures == 0
        # and a plain connection to the handed-over port is still not served
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /v1/cluster HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed unanswered
        w.close()
    finally:
        await cli.stop()
        await handover.close()
        await old.stop()
        if new is not None:
            await new.stop()


def test_misconfigurations_name_the_file(pki: Files, tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.pem")
    with pytest.raises(ConfigError, match=f"{missing}: --control-tls-ca: cannot read the file"):
        ControlTLS(missing)
    with pytest.raises(ConfigError, match=f"{missing}: --control-tls-cert: cannot read the file"):
        ControlTLS(pki.ca, missing, pki.key)
    with pytest.raises(ConfigError, match=f"{missing}: --control-tls-key: cannot read the file"):
        ControlTLS(pki.ca, pki.cert, missing)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"{junk}: --control-tls-ca: not a PEM file"):
        ControlTLS(str(junk))
    other = _write(trustme.CA(), tmp_path, tag="-x")
    with pytest.raises(ConfigError, match=f"{pki.cert}: --control-tls-key {other.key} is not the key of this"):
        ControlTLS(pki.ca, pki.cert, other.key)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", pki.key, "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
                   check=True, capture_output=True)  # fmt: skip
    with pytest.raises(ConfigError, match=f"{encrypted}: --control-tls-key: the key is encrypted"):
        ControlTLS(pki.ca, pki.cert, str(encrypted))
    with pytest.raises(ConfigError, match="--control-tls-cert and --control-tls-key go together"):
        ControlTLS(pki.ca, pki.cert)
    with pytest.raises(ConfigError, match="--control-tls-mutual needs --control-tls-cert"):
        ControlTLS(pki.ca, mutual=True)
    with pytest.raises(ConfigError, match="need --control-tls-ca"):
        ControlTLS.from_files(None, pki.cert, pki.key)
    assert ControlTLS.from_files(None) is None  # off by default
    with pytest.raises(ConfigError, match="--control-tls-name must not be empty"):
        ControlTLS.from_files(pki.ca, name="")
    with pytest.raises(ConfigError, match="this node is a manager: .* needs --control-tls-cert"):
        ControlTLS(pki.ca).server_context()
    tls = ControlTLS.from_files(pki.ca, pki.cert, pki.key)
    assert tls is not None and tls.name == DEFAULT_TLS_NAME and tls.server is not None


# ---------------------------------------------------------------------------------------------
# mesh run --cluster --control-tls-* (real agent processes, a fake engine)

fake = pytest.fixture(running_fake_engine)


def _token(tmp_path: Path) -> str:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o600)
    return str(p)


def test_the_agent_exits_2_naming_a_bad_tls_file(pki: Files, tmp_path: Path) -> None:
    missing = str(tmp_path / "absent-ca.pem")
    base = ("run", "--cluster", "--admin", "off", "--token-file", _token(tmp_path))
    res = run_mesh_sync(*base, "--control-tls-ca", missing)
    assert res.returncode == 2 and f"{missing}: --control-tls-ca: cannot read the file" in res.stderr, res.stderr
    res = run_mesh_sync(*base, "--control-tls-cert", pki.cert, "--control-tls-key", pki.key)
    assert res.returncode == 2 and "need --control-tls-ca" in res.stderr, res.stderr
    other = _write(trustme.CA(), tmp_path, tag="-cli")
    res = run_mesh_sync(*base, env=clean_env(MESH_CONTROL_TLS_CA=pki.ca, MESH_CONTROL_TLS_CERT=pki.cert,
                                             MESH_CONTROL_TLS_KEY=other.key))  # fmt: skip
    assert res.returncode == 2 and f"--control-tls-key {other.key} is not the key" in res.stderr, res.stderr


@pytest.mark.uvloop_only
async def test_a_worker_agent_subscribes_over_tls(fake, pki: Files, tmp_path: Path) -> None:
    control_port, admin = free_port(), free_port()
    fake.swarm = {"LocalNodeState": "active", "NodeID": "n1", "ControlAvailable": False, "NodeAddr": "127.0.0.1",
                  "RemoteManagers": [{"NodeID": "m1", "Addr": "127.0.0.1:2377"}]}  # fmt: skip
    manager = await _server(ControlTLS(pki.ca, pki.cert, pki.key, mutual=True), S1, port=control_port)
    agent = Agent("--cluster", "--token-file", _token(tmp_path), "--docker", f"unix://{fake.sock}",
                  "--control-port", str(control_port), "--tunnel-port", str(free_port()), "--bind", "127.0.0.1",
                  "--admin", f"127.0.0.1:{admin}", "--grace", "1", "--control-tls-mutual",
                  env=clean_env(MESH_CONTROL_TLS_CA=pki.ca, MESH_CONTROL_TLS_CERT=pki.cert,
                                MESH_CONTROL_TLS_KEY=pki.key))  # fmt: skip
    await agent.start()
    try:
        await agent.wait_log("control: subscribed to manager 127.0.0.1", timeout=30)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{admin}/v1/cluster/status") as r:
            doc = await r.json()
        assert doc["state"]["digest"] == S1.digest, doc
        assert manager.stats.changed == 1 and manager.stats.unauthorized == 0
    finally:
        await agent.stop()
        await manager.stop()


@pytest.mark.uvloop_only
async def test_a_manager_agent_serves_the_control_port_over_tls(fake, pki: Files, tmp_path: Path) -> None:
    control_port = free_port()
    fake.swarm = {"LocalNodeState": "active", "NodeID": "m1", "ControlAvailable": True, "NodeAddr": "127.0.0.1",
                  "RemoteManagers": [{"NodeID": "m1", "Addr": "127.0.0.1:2377"}]}  # fmt: skip
    argv = ("--cluster", "--token-file", _token(tmp_path), "--docker", f"unix://{fake.sock}", "--control-port",
            str(control_port), "--tunnel-port", str(free_port()), "--bind", "127.0.0.1", "--admin", "off",
            "--grace", "1", "--control-tls-ca", pki.ca)  # fmt: skip
    # a manager without a certificate to serve: a clear error at start
    res = await asyncio.to_thread(run_mesh_sync, "run", *argv)
    assert res.returncode == 2 and "this node is a manager" in res.stderr, res.stderr
    agent = Agent(*argv, "--control-tls-cert", pki.cert, "--control-tls-key", pki.key)
    await agent.start()
    try:
        await agent.wait_log(f"control server listening on 127.0.0.1:{control_port} (TLS)", timeout=30)
        address = ("127.0.0.1", control_port)
        assert await _client([address], [], ControlTLS(pki.ca), wait=0)._poll(address) is None  # 204 over TLS
        plain = _client([address], [], None, wait=0)
        with pytest.raises(ProtocolError, match="closed a new connection without answering"):
            await plain._poll(address)
        plain._disconnect()
    finally:
        await agent.stop()


async def test_the_certificate_recipe_of_deploy_md_works(tmp_path: Path) -> None:
    """The openssl commands of docs/deploy.md ("TLS on the control port") make files a manager serves and a
    worker verifies, with mutual TLS (the same certificate as client certificate)."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    block = next(b for b in doc.split("```sh\n")[1:] if "DNS:mesh-control" in b).split("```")[0]
    script = "\n".join(ln for ln in block.replace("\\\n", " ").splitlines() if not ln.startswith("docker "))
    res = await asyncio.to_thread(
        subprocess.run, ["sh", "-ec", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "docker secret create mesh_control_key control.key" in block
    files = Files(str(tmp_path / "ca.pem"), str(tmp_path / "control.pem"), str(tmp_path / "control.key"))
    srv = await _server(ControlTLS(*files, mutual=True))
    try:
        cli = _client([srv.address], [], ControlTLS(*files))
        assert await cli._poll(srv.address) == S1
        cli._disconnect()
    finally:
        await srv.stop()
