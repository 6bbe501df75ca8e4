"""resolve_docker_host: the docker CLI's rules, table-driven; TLS contexts from real files; docker contexts
written by the real docker CLI in a temporary HOME (precedence checked against ``docker context show``, TLS
material against a real TLS server, a unix context against the scripted engine); ssh:// through a real sshd on
loopback when openssh-server is installed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from discovery import probe
from discovery.engine import DockerHost, Engine, EngineUnavailable, HostError, SshTarget, resolve_docker_host
from tests.fakeengine import running_fake_engine

fake = pytest.fixture(running_fake_engine)


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
    env = {"DOCKER_CERT_PATH": str(tmp_path), "HOME": str(tmp_path), **env}
    host = resolve_docker_host(arg, env)
    assert (host.url, host.base_url) == (url, base)
    assert (host.ssl is not None) == base.startswith("https")


@pytest.mark.parametrize(
    ("arg", "env", "fragment"),
    [
        ("npipe:////./pipe/docker_engine", {}, "npipe:// is not supported"),
        ("ftp://h", {}, "expected unix:///path, tcp://host:port or ssh://[user@]host[:port]"),
        ("ssh://user:secret@host", {}, "a password in the address is not supported"),
        ("ssh://", {}, "missing host name (ssh://[user@]host[:port])"),
        ("ssh://-oProxyCommand=x", {}, "may not start with '-'"),
        ("ssh://h:port", {}, "bad port"),
        ("ssh://h/var/run/docker.sock", {}, "nothing may follow the host"),
        ("unix://relative.sock", {}, "needs an absolute path"),
        ("tcp://", {}, "missing host name"),
        ("tcp://h:notaport", {}, "bad port"),
        ("tcp://h:2375/prefix", {}, "a path prefix is not supported"),
        ("http://h", {"DOCKER_TLS_VERIFY": "1"}, "http:// with DOCKER_TLS_VERIFY set"),
        ("tcp://h", {"DOCKER_TLS_VERIFY": "1"}, "ca.pem does not exist"),
    ],
)
def test_resolve_errors(arg, env, fragment, tmp_path):
    env = {"DOCKER_CERT_PATH": str(tmp_path / "none"), "HOME": str(tmp_path), **env}
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


# -- docker contexts, written by the real docker CLI -----------------------------------------------------------


class Store:
    """A temporary HOME with a docker config dir; ``cli(...)`` runs the real docker CLI against it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.config = home / ".docker"
        self.config.mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        return {"HOME": str(self.home), **extra}

    def cli(self, *args: str, env: dict[str, str] | None = None) -> str:
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env if env is not None else self.env())}
        res = subprocess.run(["docker", *args], env=run_env, capture_output=True, text=True, timeout=30, check=False)
        assert res.returncode == 0, f"docker {' '.join(args)}: {res.stderr}"
        return res.stdout.strip()

    def meta(self, name: str) -> Path:
        return self.config / "contexts" / "meta" / hashlib.sha256(name.encode()).hexdigest() / "meta.json"


@pytest.fixture
def store(tmp_path):
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed (scripts/test installs docker.io)")
    s = Store(tmp_path / "home")
    s.cli("context", "create", "alpha", "--docker", "host=tcp://alpha.example:2375")
    s.cli("context", "create", "beta", "--docker", "host=unix:///run/beta/docker.sock")
    s.cli("context", "create", "gamma", "--docker", "host=ssh://deploy@gamma.example:2222")
    s.cli("context", "use", "alpha")  # config.json: currentContext
    return s


@pytest.mark.parametrize(
    ("arg", "env", "url", "context"),
    [
        (None, {}, "tcp://alpha.example:2375", "alpha"),  # currentContext of config.json
        (None, {"DOCKER_CONTEXT": "beta"}, "unix:///run/beta/docker.sock", "beta"),  # DOCKER_CONTEXT wins over it
        (None, {"DOCKER_CONTEXT": "gamma"}, "ssh://deploy@gamma.example:2222", "gamma"),
        (None, {"DOCKER_CONTEXT": "default"}, "unix:///var/run/docker.sock", None),  # the reserved name
        (None, {"DOCKER_HOST": "tcp://h:1", "DOCKER_CONTEXT": "beta"}, "tcp://h:1", None),  # DOCKER_HOST wins
        ("unix:///x.sock", {"DOCKER_HOST": "tcp://h:1", "DOCKER_CONTEXT": "beta"}, "unix:///x.sock", None),
        (None, {"DOCKER_CONFIG": "/nonexistent"}, "unix:///var/run/docker.sock", None),  # another config dir
    ],
)
def test_context_precedence_is_the_docker_clis(store, arg, env, url, context):
    env = store.env(**env)
    host = resolve_docker_host(arg, env)
    assert (host.url, host.context) == (url, context)
    if arg is None:  # the CLI, asked which context it would use, agrees
        assert store.cli("context", "show", env=env) == (context or "default")
    if context is not None:
        assert store.cli("context", "inspect", context, "--format", "{{.Endpoints.docker.Host}}") == url


def test_ssh_context_runs_ssh_dial_stdio(store):
    host = resolve_docker_host(None, store.env(DOCKER_CONTEXT="gamma"))
    assert host.ssh == SshTarget("gamma.example", "deploy", 2222) and host.base_url == "http://docker"
    assert host.ssh.command(5) == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-T", "-l", "deploy", "-p", "2222",
        "--", "gamma.example", "docker", "system", "dial-stdio",
    ]  # fmt: skip
    assert resolve_docker_host("ssh://h").ssh.command(5)[-6:] == ["-T", "--", "h", "docker", "system", "dial-stdio"]


def test_context_errors_name_the_context_and_file(store):
    with pytest.raises(HostError, match=r"docker context 'nope' does not exist \(no .*/meta/[0-9a-f]{64}/meta.json"):
        resolve_docker_host(None, store.env(DOCKER_CONTEXT="nope"))
    meta = store.meta("alpha")
    doc = json.loads(meta.read_text())
    doc["Endpoints"]["docker"]["SkipTLSVerify"] = "yes"
    meta.write_text(json.dumps(doc))
    with pytest.raises(HostError, match=r"docker context 'alpha' \(.*meta.json\): Endpoints.docker.SkipTLSVerify"):
        resolve_docker_host(None, store.env())
    meta.write_text("{\n  broken")
    with pytest.raises(HostError, match=r"meta.json\):2: not valid JSON"):
        resolve_docker_host(None, store.env())
    (store.config / "config.json").write_text('{"currentContext": 3}')
    with pytest.raises(HostError, match=r"config.json: currentContext: expected a context name, got 3"):
        resolve_docker_host(None, store.env())
    (store.config / "config.json").write_text("{\n\n nope")
    with pytest.raises(HostError, match=r"config.json:3: not valid JSON"):
        resolve_docker_host(None, store.env())
    # DOCKER_HOST (or the flag) does not read the store at all, broken or not
    assert resolve_docker_host(None, store.env(DOCKER_HOST="tcp://h:1")).url == "tcp://h:1"


async def test_unix_context_reaches_the_engine(store, fake):
    store.cli("context", "create", "local", "--docker", f"host=unix://{fake.sock}")
    env = store.env(DOCKER_CONTEXT="local")
    host = await probe(None, env=env)
    assert host is not None and host.url == f"unix://{fake.sock}" and host.context == "local"
    async with Engine(host) as e:
        assert (await e.info())["Name"] == "fakehost"
    assert await probe(None, env=store.env(DOCKER_CONTEXT="beta"), timeout=1) is None  # no engine there


async def test_tls_contexts_against_a_tls_engine(store, certs, tmp_path):
    runner, port = await _tls_engine_server(certs, require_client_cert=True)
    url = f"tcp://localhost:{port}"
    c = {n: str(certs / f"{n}.pem") for n in ("ca", "cert", "key")}
    try:
        # CA + client certificate: verified both ways
        store.cli("context", "create", "tls", "--docker", f"host={url},ca={c['ca']},cert={c['cert']},key={c['key']}")
        host = resolve_docker_host(None, store.env(DOCKER_CONTEXT="tls"))
        assert host.base_url == f"https://localhost:{port}" and host.ssl.verify_mode == ssl.CERT_REQUIRED
        async with Engine(host) as e:
            assert (await e.info())["Name"] == "tls-engine"
        # skip-tls-verify and no CA: TLS without verifying the engine, still with the client certificate
        store.cli("context", "create", "skip", "--docker", f"host={url},skip-tls-verify=true,cert={c['cert']},key={c['key']}")  # fmt: skip
        host = resolve_docker_host(None, store.env(DOCKER_CONTEXT="skip"))
        assert host.ssl.verify_mode == ssl.CERT_NONE and not host.ssl.check_hostname
        async with Engine(host) as e:
            assert await e.ping() is True
        # a CA that did not sign the engine's certificate: refused
        store.cli("context", "create", "wrongca", "--docker", f"host={url},ca={certs / 'server.pem'},cert={c['cert']},key={c['key']}")  # fmt: skip
        async with Engine(resolve_docker_host(None, store.env(DOCKER_CONTEXT="wrongca")), timeout=3) as e:
            with pytest.raises(EngineUnavailable):
                await e.ping()
        # no client certificate: the engine refuses the handshake
        store.cli("context", "create", "nocert", "--docker", f"host={url},ca={c['ca']}")
        host = resolve_docker_host(None, store.env(DOCKER_CONTEXT="nocert"))
        assert host.ssl is not None
        async with Engine(host, timeout=3) as e:
            with pytest.raises(EngineUnavailable):
                await e.ping()
        # no TLS material and no skip-tls-verify: plain TCP, as the CLI does
        store.cli("context", "create", "plain", "--docker", f"host={url}")
        host = resolve_docker_host(None, store.env(DOCKER_CONTEXT="plain"))
        assert host.ssl is None and host.base_url == f"http://localhost:{port}"
        # only one of cert.pem / key.pem in the context's tls folder
        tls_dir = store.config / "contexts" / "tls" / hashlib.sha256(b"tls").hexdigest() / "docker"
        (tls_dir / "key.pem").unlink()
        with pytest.raises(HostError, match=r"docker context 'tls': .* has only one of cert.pem and key.pem"):
            resolve_docker_host(None, store.env(DOCKER_CONTEXT="tls"))
    finally:
        await runner.cleanup()


# -- ssh://, through a real sshd on loopback ---------------------------------------------------------------


SSHD = "/usr/sbin/sshd"
SSH = shutil.which("ssh")  # the real client, looked up before any test puts its wrapper first on PATH
HAVE_SSH = os.path.exists(SSHD) and SSH is not None and shutil.which("docker") is not None


class Sshd:
    """A real OpenSSH server on 127.0.0.1, port 0: the test accepts each connection and hands it to its own
    ``sshd -i`` (inetd mode), so no fixed port is needed.  Key login for the current user only; every session
    gets DOCKER_HOST pointing at the scripted engine, so ``docker system dial-stdio`` reaches it."""

    def __init__(self, d: Path, docker_host: str) -> None:
        self.d = d
        self.procs: list[subprocess.Popen] = []
        self.sessions = 0
        for name in ("host", "client", "stranger"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True, timeout=30)
        (d / "authorized_keys").write_text((d / "client.pub").read_text())
        (d / "sshd_config").write_text(
            f"HostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            f"SetEnv DOCKER_HOST={docker_host}\nPidFile none\nLogLevel ERROR\n"
        )
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def client_bin(self, key: str = "client") -> Path:
        """A directory with an ``ssh`` that is the real one with this test's key and known_hosts."""
        d = self.d
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {(d / 'host.pub').read_text()}")
        (d / f"ssh_config_{key}").write_text(
            f"Host *\n  IdentityFile {d / key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n"
            "  StrictHostKeyChecking yes\n  GlobalKnownHostsFile /dev/null\n"
        )
        bin_dir = d / f"bin_{key}"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {SSH} -F {d / f"ssh_config_{key}"} "$@"\n')
        wrapper.chmod(0o755)
        return bin_dir

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)  # accepted, never read: sshd reads the client's banner
            await asyncio.to_thread(self._spawn, conn)
            self.sessions += 1

    def _spawn(self, conn) -> None:
        with conn, open(self.d / "sshd.log", "ab") as log:
            conn.setblocking(True)
            cmd = [SSHD, "-i", "-e", "-f", str(self.d / "sshd_config")]
            self.procs.append(subprocess.Popen(cmd, stdin=conn, stdout=conn, stderr=log))

    def close(self) -> None:
        self.sock.close()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
async def sshd(tmp_path, fake, monkeypatch):
    if not HAVE_SSH:
        pytest.skip("needs openssh-server, openssh-client and the docker CLI (scripts/test installs them)")
    if os.geteuid() != 0:
        pytest.skip("sshd -i needs root here")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    d = tmp_path / "ssh"
    d.mkdir()
    server = Sshd(d, f"unix://{fake.sock}")
    task = asyncio.create_task(server.serve())
    monkeypatch.setenv("PATH", f"{server.client_bin()}:{os.environ['PATH']}")
    try:
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()


async def test_ssh_host_through_a_real_sshd(sshd, fake, store):
    import getpass

    user = getpass.getuser()
    url = f"ssh://{user}@127.0.0.1:{sshd.port}"
    store.cli("context", "create", "remote", "--docker", f"host={url}")
    host = resolve_docker_host(None, store.env(DOCKER_CONTEXT="remote"))
    assert host.url == url and host.context == "remote"
    async with Engine(host, timeout=20) as e:
        assert await e.ping() is True
        assert (await e.info())["Name"] == "fakehost"
        async with e.events({"type": ["container"]}) as stream:  # a long-lived stream over ssh
            fake.emit("container", "start", "abc", name="x")
            ev = await asyncio.wait_for(anext(aiter(stream)), 20)
            assert (ev["Type"], ev["Action"], ev["Actor"]["ID"]) == ("container", "start", "abc")
        assert (await e.info())["Name"] == "fakehost"
        bridge = e.bridge
        assert bridge is not None and 1 <= bridge.started == sshd.sessions <= 3, (bridge, sshd.sessions)
        path = bridge.path
    assert not await asyncio.to_thread(os.path.exists, path)  # closed: the socket and its private directory are gone
    assert await probe(url, timeout=20) is not None


async def test_ssh_refused_key_is_an_error_with_sshs_words(sshd, monkeypatch):
    import getpass

    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", f"{sshd.client_bin('stranger')}:{path}")
    async with Engine(resolve_docker_host(f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}", {}), timeout=20) as e:
        with pytest.raises(EngineUnavailable, match=r"\(ssh: ssh://.*Permission denied \(publickey\)"):
            await e.ping()
        # the key is fixed: the next connection works, and the old failure is forgotten
        monkeypatch.setenv("PATH", f"{sshd.client_bin()}:{path}")
        assert await e.ping() is True
        assert e.bridge.last_error is None


# -- mesh run: the same resolution at start-up -------------------------------------------------------------


def _mesh_run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(root), **env}
    return subprocess.run(
        [sys.executable, "-m", "meshagent", "run", *argv],
        capture_output=True, text=True, env=run_env, cwd=root, timeout=60, check=False,
    )  # fmt: skip


def test_mesh_run_docker_uses_the_current_context(store):
    meta = store.meta("nope")
    res = _mesh_run("--docker", "--admin", "off", env=store.env(DOCKER_CONTEXT="nope"))
    assert res.returncode == 2
    assert res.stderr == (
        f"mesh: --docker: docker context 'nope' does not exist (no {meta}; `docker context ls` lists them)\n"
    )
    store.cli("context", "use", "beta")
    res = _mesh_run("--admin", "off", env=store.env())  # no --config, no --docker: the engine if one answers
    assert res.returncode == 2
    assert res.stderr.startswith(
        "mesh: no --config given and no Docker engine answers at unix:///run/beta/docker.sock;"
    )
