"""resolve_docker_host: the docker CLI's rules, table-driven; TLS contexts from real files."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

from discovery.engine import DockerHost, HostError, resolve_docker_host


@pytest.mark.parametrize(
    ("arg", "env", "url", "base"),
    [
        (None, {}, "unix:///var/run/docker.sock", "http://docker"),
        (None, {"DOCKER_HOST": "unix:///run/x/docker.sock"}, "unix:///run/x/docker.sock", "http://docker"),
        ("unix:///tmp/a.sock", {"DOCKER_HOST": "tcp://ignored:1"}, "unix:///tmp/a.sock", "http://docker"),
        ("/tmp/b.sock", {}, "unix:///tmp/b.sock", "http://docker"),
        ("tcp://10.0.0.5", {}, "tcp://10.0.0.5:2375", "http://10.0.0.5:2375"),
        ("tcp://engine.example:4243", {}, "tcp://engine.example:4243", "http://engine.example:4243"),
        ("http://engine.example", {}, "tcp://engine.example:2375", "http://engine.example:2375"),
        ("tcp://[fd00::1]:2375", {}, "tcp://[fd00::1]:2375", "http://[fd00::1]:2375"),
        ("tcp://h", {"DOCKER_TLS": "1"}, "tcp://h:2376", "https://h:2376"),
        ("tcp://h", {"DOCKER_TLS_VERIFY": "0"}, "tcp://h:2375", "http://h:2375"),
        ("  tcp://h:1  ", {}, "tcp://h:1", "http://h:1"),
    ],
)
def test_resolve(arg, env, url, base, tmp_path):
    env = {"DOCKER_CERT_PATH": str(tmp_path), **env}
    host = resolve_docker_host(arg, env)
    assert (host.url, host.base_url) == (url, base)
    assert (host.ssl is not None) == base.startswith("https")


@pytest.mark.parametrize(
    ("arg", "env", "fragment"),
    [
        ("ssh://user@host", {}, "ssh:// is not supported"),
        ("npipe:////./pipe/docker_engine", {}, "npipe:// is not supported"),
        ("ftp://h", {}, "expected unix:///path or tcp://host:port"),
        ("unix://relative.sock", {}, "needs an absolute path"),
        ("tcp://", {}, "missing host name"),
        ("tcp://h:notaport", {}, "bad port"),
        ("tcp://h:2375/prefix", {}, "a path prefix is not supported"),
        ("http://h", {"DOCKER_TLS_VERIFY": "1"}, "http:// with DOCKER_TLS_VERIFY set"),
        ("tcp://h", {"DOCKER_TLS_VERIFY": "1"}, "ca.pem does not exist"),
    ],
)
def test_resolve_errors(arg, env, fragment, tmp_path):
    env = {"DOCKER_CERT_PATH": str(tmp_path / "none"), **env}
    with pytest.raises(HostError) as ei:
        resolve_docker_host(arg, env)
    assert fragment in str(ei.value)
    assert repr(arg.strip()) in str(ei.value) or "ca.pem" in fragment


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, and a server + client certificate signed by it (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=test-ca")  # fmt: skip
    for name, cn in (("server", "localhost"), ("cert", "client")):
        key = "key.pem" if name == "cert" else f"{name}-key.pem"
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return d


def test_tls_verify_context_loads_ca_and_client_cert(certs):
    host = resolve_docker_host("tcp://localhost:2376", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)})
    assert isinstance(host, DockerHost)
    assert host.ssl is not None
    assert host.ssl.verify_mode == ssl.CERT_REQUIRED and host.ssl.check_hostname
    assert host.base_url == "https://localhost:2376"


def test_tls_verify_missing_client_cert(certs, tmp_path):
    (tmp_path / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
    with pytest.raises(HostError, match="cert.pem"):
        resolve_docker_host("tcp://h", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(tmp_path)})


def test_tls_garbage_files(tmp_path):
    for n in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / n).write_text("not a pem\n")
    with pytest.raises(HostError, match="cannot load TLS files"):
        resolve_docker_host("tcp://h", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(tmp_path)})


async def _tls_engine_server(certs, require_client_cert: bool):
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/_ping":
            return web.Response(text="OK")
        if request.path == "/version":
            return web.json_response({"ApiVersion": "1.41"})
        return web.json_response({"Name": "tls-engine", "Swarm": {}})

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "server.pem", certs / "server-key.pem")
    if require_client_cert:
        ctx.load_verify_locations(certs / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def test_engine_over_tls_with_client_certificate(certs, tmp_path):
    from discovery.engine import Engine, EngineUnavailable

    runner, port = await _tls_engine_server(certs, require_client_cert=True)
    try:
        env = {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)}
        async with Engine(resolve_docker_host(f"tcp://localhost:{port}", env)) as e:
            assert await e.ping() is True
            assert (await e.info())["Name"] == "tls-engine"
        # without a client certificate the server refuses the handshake
        (tmp_path / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
        with pytest.raises(HostError):
            resolve_docker_host(
                f"tcp://localhost:{port}", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(tmp_path)}
            )
        # plain TCP to a TLS port fails as "unavailable", not with an aiohttp exception
        async with Engine(resolve_docker_host(f"tcp://localhost:{port}", {}), timeout=2) as e:
            with pytest.raises(EngineUnavailable):
                await e.ping()
        # verification on: a server certificate from another CA is rejected
        other = tmp_path / "other"
        other.mkdir()
        for n in ("cert.pem", "key.pem"):
            (other / n).write_bytes((certs / n).read_bytes())
        (other / "ca.pem").write_bytes((certs / "server.pem").read_bytes())  # not the CA
        async with Engine(resolve_docker_host(f"tcp://localhost:{port}",
                                              {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(other)})) as e:  # fmt: skip
            with pytest.raises(EngineUnavailable):
                await e.ping()
    finally:
        await runner.cleanup()
