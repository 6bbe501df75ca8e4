"""The things being compared: each peer forwards 127.0.0.1:<its port> to the backend.

- ``direct``: no proxy; the load goes straight to the backend (the baseline).
- ``mesh-<N>``: this project, ``python -m meshagent run --config FILE --workers N``; ``mesh-1-nometrics`` is the
  same with metrics switched off (when the CLI has a switch for it); ``mesh-1-zerocopy`` with ``zero_copy: true``
  (large transfers through os.splice).
- ``haproxy`` / ``haproxy-256k``: HAProxy ``mode tcp``, ``nbthread 1``, default buffers / ``tune.bufsize 262144``;
  ``haproxy-256k-splice`` adds ``option splice-auto`` (the kernel's splice for large transfers).
- ``nginx``: nginx ``stream`` module, one worker.
- ``pproxy``: the pure-Python proxy from PyPI, in tunnel mode (a plain TCP forward).

Each peer runs as its own process tree with a generated config in the run's temp directory; ``pids()`` is that
tree, for RSS and CPU accounting.  A peer that is not installed is skipped with ``unavailable()`` saying why.

The HTTP suite's peers (``make_http_peer``: the same names, HTTP-aware configs) forward to ``HttpTargets``, a
service of several replicas on one port (keep-alive and close workloads) and ten host-routed services on a second
port (``Host: h0.bench`` ... ``h9.bench``, each with replicas of its own):

- ``direct``: straight to the first replica (of the first host's set on the second port: no routing).
- ``mesh-<N>``: ``protocol: http`` services (``hosts:`` on the second port), every HTTP option at its default.
- ``haproxy`` / ``haproxy-<K>k``: HAProxy ``mode http``, ``http-reuse safe``, ``option forwardfor``, ``nbthread
  1``; the host port routes with a map (``use_backend %[req.hdr(host),lower,map(FILE)]``).  ``-always``:
  ``http-reuse always`` (with ``safe`` a client's first request never reuses an idle server connection).
- ``nginx``: ``proxy_pass`` to an ``upstream`` with ``keepalive 64``, ``proxy_http_version 1.1``,
  ``proxy_set_header Connection ""``, ``X-Forwarded-For``, 1 worker; the host port routes with ``server_name``.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from benchmarks.backend import NGINX_STREAM_MODULE
from benchmarks.proc import (
    LOOPBACK,
    REPO,
    BenchError,
    Proc,
    free_port,
    nofile_limit,
    python_env,
    tree_pids,
    wait_port,
)


class Peer:
    """A proxy under test.  ``start(target)`` returns the (host, port) the load generator should hit."""

    name = ""
    label = ""

    def __init__(self, workdir: Path, cpus: str | None = None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.proc: Proc | None = None
        self.addr: tuple[str, int] | None = None

    def unavailable(self) -> str | None:
        """None when the peer can run here, else the reason it is skipped."""
        return None

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        self.addr = None

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid) if self.proc is not None else []

    def version(self) -> str:
        return ""

    def _dir(self) -> Path:
        d = self.workdir / self.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} addr={self.addr} proc={self.proc!r}>"


class Direct(Peer):
    name = "direct"
    label = "direct to the backend"

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        self.addr = target
        return target


class HAProxy(Peer):
    def __init__(
        self, workdir: Path, cpus: str | None = None, bufsize: int | None = None, splice: bool = False
    ) -> None:
        super().__init__(workdir, cpus)
        self.bufsize = bufsize
        self.splice = splice
        self.name = ("haproxy" if bufsize is None else f"haproxy-{bufsize // 1024}k") + ("-splice" if splice else "")
        self.label = (
            "HAProxy mode tcp, nbthread 1"
            + ("" if bufsize is None else f", tune.bufsize {bufsize}")
            + (", option splice-auto" if splice else "")
        )

    def unavailable(self) -> str | None:
        return None if shutil.which("haproxy") else "haproxy is not installed (apt-get install haproxy)"

    def version(self) -> str:
        return _first_line(["haproxy", "-v"])

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        d = self._dir()
        port = free_port()
        tune = f"    tune.bufsize {self.bufsize}\n" if self.bufsize else ""
        # Two sockets per proxied connection (and with splice-auto up to maxconn/4 pipes of two fds each);
        # HAProxy refuses to start if maxconn needs more fds than allowed.
        per_conn = 2.5 if self.splice else 2
        maxconn = max(256, int((nofile_limit() - 200) / per_conn))
        cfg = d / "haproxy.cfg"
        cfg.write_text(
            f"""global
    nbthread 1
    maxconn {maxconn}
{tune}
defaults
    mode tcp
{"    option splice-auto" + chr(10) if self.splice else ""}    timeout connect 3s
    timeout client 1h
    timeout server 1h

frontend fe
    bind {LOOPBACK}:{port}
    default_backend be

backend be
    server s1 {target[0]}:{target[1]}
"""
        )
        self.proc = Proc(self.name, ["haproxy", "-db", "-f", str(cfg)], d / "stderr.log", cpus=self.cpus)
        wait_port(LOOPBACK, port, self.proc)
        self.addr = (LOOPBACK, port)
        return self.addr


class NginxStream(Peer):
    name = "nginx"
    label = "nginx stream, 1 worker"

    def unavailable(self) -> str | None:
        if not shutil.which("nginx"):
            return "nginx is not installed (apt-get install nginx-light libnginx-mod-stream)"
        if not NGINX_STREAM_MODULE.exists():
            return f"nginx stream module missing ({NGINX_STREAM_MODULE}; apt-get install libnginx-mod-stream)"
        return None

    def version(self) -> str:
        return _first_line(["nginx", "-v"])

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        d = self._dir()
        port = free_port()
        cfg = d / "nginx.conf"
        cfg.write_text(
            f"""load_module {NGINX_STREAM_MODULE};
user root;
worker_processes 1;
worker_rlimit_nofile {nofile_limit()};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {nofile_limit() - 100}; multi_accept on; }}
stream {{
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        proxy_pass {target[0]}:{target[1]};
        proxy_connect_timeout 3s;
        proxy_timeout 1h;
        tcp_nodelay on;
    }}
}}
"""
        )
        self.proc = Proc(
            self.name, ["nginx", "-p", str(d), "-c", str(cfg), "-g", "daemon off;"], d / "stderr.log", cpus=self.cpus
        )
        wait_port(LOOPBACK, port, self.proc)
        self.addr = (LOOPBACK, port)
        return self.addr


class Pproxy(Peer):
    name = "pproxy"
    label = "pproxy (Python, asyncio streams on uvloop), tunnel mode"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("pproxy") is None:
            return "pproxy is not installed (pip install pproxy)"
        return None

    def version(self) -> str:
        from importlib.metadata import version

        return f"pproxy {version('pproxy')}"

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        d = self._dir()
        port = free_port()
        uri = f"tunnel{{{target[0]}:{target[1]}}}://{LOOPBACK}:{port}"
        self.proc = Proc(
            self.name,
            [sys.executable, "-m", "benchmarks.pproxy_shim", "-l", uri],
            d / "stderr.log",
            cpus=self.cpus,
            env=python_env(),
        )
        wait_port(LOOPBACK, port, self.proc)
        self.addr = (LOOPBACK, port)
        return self.addr


class MeshPeer(Peer):
    """The product: ``python -m meshagent run --config FILE --workers N`` with one service in front of the backend.

    The service uses the product's defaults (round-robin balancing, outlier detection, timeouts) plus a TCP
    health check, so the measured path is the one users get.
    """

    def __init__(
        self,
        workdir: Path,
        cpus: str | None = None,
        workers: int = 1,
        metrics: bool = True,
        zero_copy: bool = False,
    ) -> None:
        super().__init__(workdir, cpus)
        self.workers = workers
        self.metrics = metrics
        self.zero_copy = zero_copy
        self.admin_url: str | None = None  # the admin API (GET /metrics) of the running instance
        self.name = f"mesh-{workers}" + ("" if metrics else "-nometrics") + ("-zerocopy" if zero_copy else "")
        self.label = (
            f"this mesh, {workers} worker{'s' if workers > 1 else ''}"
            + ("" if metrics else ", metrics off")
            + (", zero_copy on" if zero_copy else "")
        )

    def unavailable(self) -> str | None:
        missing = [m for m in ("meshagent.cli", "mesh.config", "mesh.runtime") if _find(m) is None]
        if missing:
            return f"the mesh is not runnable yet (missing {', '.join(missing)})"
        if not self.metrics and metrics_off_flag() is None:
            return "`mesh run` has no switch to turn metrics off yet (--no-metrics / --metrics off)"
        return None

    def version(self) -> str:
        try:
            import mesh

            return f"mesh {getattr(mesh, '__version__', '?')}"
        except ImportError:
            return ""

    def config_text(self, port: int, target: tuple[str, int]) -> str:
        """The service as a user would write it (mesh/config.py format); every option keeps its default."""
        return f"""# generated by benchmarks/peers.py
services:
  bench:
    listen: "{LOOPBACK}:{port}"
    health_check: {{kind: tcp, interval: 5s}}
{"    zero_copy: true" + chr(10) if self.zero_copy else ""}    endpoints: ["{target[0]}:{target[1]}"]
"""

    def start(self, target: tuple[str, int]) -> tuple[str, int]:
        d = self._dir()
        port = free_port()
        cfg = d / "mesh.yaml"
        cfg.write_text(self.config_text(port, target))
        argv = [sys.executable, "-m", "meshagent", "run", "--config", str(cfg), "--workers", str(self.workers)]
        admin = admin_args()
        self.admin_url = f"http://{admin[1]}" if admin else None
        argv += ["--max-fds", str(nofile_limit()), "--log-level", "warning", *admin]
        if not self.metrics:
            argv += metrics_off_flag() or []
        self.proc = Proc(self.name, argv, d / "stderr.log", cpus=self.cpus, env=python_env())
        wait_port(LOOPBACK, port, self.proc, timeout=20)
        self.addr = (LOOPBACK, port)
        return self.addr


# -- the HTTP suite's peers --------------------------------------------------------------------------------------

Addr = tuple[str, int]


@dataclass
class HttpTargets:
    """What the HTTP peers forward to: the replicas of the service on the first port, and of each host-routed
    service on the second port (host name -> replicas)."""

    default: list[Addr]
    hosts: dict[str, list[Addr]] = field(default_factory=dict)


class HttpPeer(Peer):
    """``start(targets)`` returns the first port's address; ``hosts_addr`` is the host-routed port."""

    def __init__(self, workdir: Path, cpus: str | None = None) -> None:
        super().__init__(workdir, cpus)
        self.hosts_addr: Addr | None = None

    def stop(self) -> None:
        super().stop()
        self.hosts_addr = None

    def _listen(self, argv: list[str], cfg_dir: Path, ports: tuple[int, int], timeout: float = 10.0, env=None) -> Addr:
        self.proc = Proc(self.name, argv, cfg_dir / "stderr.log", cpus=self.cpus, env=env)
        for port in ports:
            wait_port(LOOPBACK, port, self.proc, timeout=timeout)
        self.addr, self.hosts_addr = (LOOPBACK, ports[0]), (LOOPBACK, ports[1])
        return self.addr


class HttpDirect(HttpPeer):
    name = "direct"
    label = "direct to a backend replica"

    def start(self, target: HttpTargets) -> Addr:  # type: ignore[override]
        self.addr = target.default[0]
        self.hosts_addr = next(iter(target.hosts.values()))[0] if target.hosts else target.default[0]
        return self.addr


class HAProxyHttp(HttpPeer):
    """``reuse``: ``safe`` (HAProxy's default: the first request of a client connection never takes an idle server
    connection, so a client that closes after each request gets a new server connection each time) or
    ``always`` (every request may take one: the pooled HAProxy of the close workload)."""

    def __init__(self, workdir: Path, cpus: str | None = None, bufsize: int | None = None, reuse: str = "safe") -> None:
        super().__init__(workdir, cpus)
        self.bufsize = bufsize
        self.reuse = reuse
        self.name = ("haproxy" if bufsize is None else f"haproxy-{bufsize // 1024}k") + (
            "" if reuse == "safe" else f"-{reuse}"
        )
        self.label = f"HAProxy mode http, nbthread 1, http-reuse {reuse}, option forwardfor" + (
            "" if bufsize is None else f", tune.bufsize {bufsize}"
        )

    unavailable = HAProxy.unavailable
    version = HAProxy.version

    def config_text(self, ports: tuple[int, int], target: HttpTargets, mapfile: Path) -> str:
        tune = f"    tune.bufsize {self.bufsize}\n" if self.bufsize else ""
        maxconn = max(256, int((nofile_limit() - 200) / 2))

        def backend(name: str, replicas: list[Addr]) -> str:
            servers = "".join(f"    server r{i} {a[0]}:{a[1]}\n" for i, a in enumerate(replicas))
            return f"backend {name}\n    balance roundrobin\n{servers}"

        backends = [backend("be", target.default)]
        backends += [backend(f"be_{i}", replicas) for i, replicas in enumerate(target.hosts.values())]
        return f"""global
    nbthread 1
    maxconn {maxconn}
{tune}
defaults
    mode http
    option forwardfor
    http-reuse {self.reuse}
    timeout connect 3s
    timeout client 1h
    timeout server 1h

frontend fe
    bind {LOOPBACK}:{ports[0]}
    default_backend be

frontend fe_hosts
    bind {LOOPBACK}:{ports[1]}
    use_backend %[req.hdr(host),lower,map({mapfile})]

""" + "\n".join(backends)

    def start(self, target: HttpTargets) -> Addr:  # type: ignore[override]
        d = self._dir()
        ports = (free_port(), free_port())
        mapfile = d / "hosts.map"
        mapfile.write_text("".join(f"{h} be_{i}\n" for i, h in enumerate(target.hosts)))
        cfg = d / "haproxy.cfg"
        cfg.write_text(self.config_text(ports, target, mapfile))
        return self._listen(["haproxy", "-db", "-f", str(cfg)], d, ports)


class NginxHttp(HttpPeer):
    name = "nginx"
    label = "nginx proxy_pass, upstream keepalive 64, HTTP/1.1 upstream, 1 worker"

    def unavailable(self) -> str | None:
        return None if shutil.which("nginx") else "nginx is not installed (apt-get install nginx-light)"

    version = NginxStream.version

    def config_text(self, d: Path, ports: tuple[int, int], target: HttpTargets) -> str:
        def upstream(name: str, replicas: list[Addr]) -> str:
            servers = "".join(f"        server {a[0]}:{a[1]};\n" for a in replicas)
            # keepalive_requests/timeout: nginx >= 1.19.10 recycles an upstream connection after 1000 requests
            # (and 60 s idle); HAProxy and the mesh do not, so neither does this peer.
            return (
                f"    upstream {name} {{\n{servers}        keepalive 64;\n"
                f"        keepalive_requests 1000000000;\n        keepalive_timeout 600s;\n    }}\n"
            )

        def server(listen: str, upstream_name: str | None, server_name: str = "") -> str:
            names = f"        server_name {server_name};\n" if server_name else ""
            body = f"location / {{ proxy_pass http://{upstream_name}; }}" if upstream_name else "return 404;"
            return f"    server {{\n        listen {listen};\n{names}        {body}\n    }}\n"

        hosts = list(target.hosts)
        upstreams = upstream("bench", target.default) + "".join(
            upstream(f"h{i}", target.hosts[h]) for i, h in enumerate(hosts)
        )
        servers = server(f"{LOOPBACK}:{ports[0]} backlog=4096", "bench")
        # An unknown Host on the routed port is a 404 (an error for the load generator), not the first server.
        servers += server(f"{LOOPBACK}:{ports[1]} backlog=4096 default_server", None)
        servers += "".join(server(f"{LOOPBACK}:{ports[1]}", f"h{i}", h) for i, h in enumerate(hosts))
        return f"""user root;
worker_processes 1;
worker_rlimit_nofile {nofile_limit()};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {nofile_limit() - 100}; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    # Client side: no recycling of keep-alive connections (nginx's default closes one after 1000 requests).
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
{upstreams}{servers}}}
"""

    def start(self, target: HttpTargets) -> Addr:  # type: ignore[override]
        d = self._dir()
        ports = (free_port(), free_port())
        cfg = d / "nginx.conf"
        cfg.write_text(self.config_text(d, ports, target))
        return self._listen(["nginx", "-p", str(d), "-c", str(cfg), "-g", "daemon off;"], d, ports)


@cache
def mesh_http_missing() -> str | None:
    """None when the mesh's data plane serves ``protocol: http`` (``'http' in mesh.listener.FRONTS`` once the
    runtime, which registers the fronts, is imported), else why not.  Checked in a child process: the harness
    itself does not import the product."""
    code = "import mesh.runtime\nfrom mesh.listener import FRONTS\nassert 'http' in FRONTS, sorted(FRONTS)\n"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=python_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not ask the mesh which protocols it serves: {exc}"
    if out.returncode == 0:
        return None
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    return f"the mesh has no HTTP front yet ('http' not in mesh.listener.FRONTS: {last})"


class MeshHttpPeer(HttpPeer, MeshPeer):
    """The mesh with ``protocol: http`` services: one on the first port, ``h0`` ... ``h9`` with ``hosts:`` on the
    second; every HTTP option at its default (upstream pool, keep-alive, timeouts), plus a TCP health check as
    the TCP peer has."""

    def __init__(self, workdir: Path, cpus: str | None = None, workers: int = 1, metrics: bool = True) -> None:
        MeshPeer.__init__(self, workdir, cpus, workers=workers, metrics=metrics)
        self.hosts_addr = None
        self.label += ", protocol http"

    def unavailable(self) -> str | None:
        return MeshPeer.unavailable(self) or mesh_http_missing()

    def config_text(self, ports: tuple[int, int], target: HttpTargets) -> str:  # type: ignore[override]
        def service(name: str, port: int, replicas: list[Addr], host: str | None) -> str:
            eps = ", ".join(f'"{a[0]}:{a[1]}"' for a in replicas)
            hosts = f'    hosts: ["{host}"]\n' if host else ""
            return (
                f'  {name}:\n    listen: "{LOOPBACK}:{port}"\n    protocol: http\n{hosts}'
                f"    health_check: {{kind: tcp, interval: 5s}}\n    endpoints: [{eps}]\n"
            )

        text = "# generated by benchmarks/peers.py (HTTP suite)\nservices:\n"
        text += service("bench", ports[0], target.default, None)
        for i, (host, replicas) in enumerate(target.hosts.items()):
            text += service(f"h{i}", ports[1], replicas, host)
        return text

    def start(self, target: HttpTargets) -> Addr:  # type: ignore[override]
        d = self._dir()
        ports = (free_port(), free_port())
        cfg = d / "mesh.yaml"
        cfg.write_text(self.config_text(ports, target))
        argv = [sys.executable, "-m", "meshagent", "run", "--config", str(cfg), "--workers", str(self.workers)]
        admin = admin_args()
        self.admin_url = f"http://{admin[1]}" if admin else None
        argv += ["--max-fds", str(nofile_limit()), "--log-level", "warning", *admin]
        if not self.metrics:
            argv += metrics_off_flag() or []
        return self._listen(argv, d, ports, timeout=20, env=python_env())


def make_http_peer(name: str, workdir: Path, *, proxy_cpus: str | None = None) -> HttpPeer:
    """The HTTP suite's peer by name: direct, mesh-<N>[-nometrics], haproxy[-<K>k][-always], nginx."""
    if name == "direct":
        return HttpDirect(workdir)
    m = re.fullmatch(r"haproxy(?:-(\d+)k)?(-always)?", name)
    if m:
        bufsize = int(m.group(1)) * 1024 if m.group(1) else None
        return HAProxyHttp(workdir, proxy_cpus, bufsize=bufsize, reuse="always" if m.group(2) else "safe")
    if name == "nginx":
        return NginxHttp(workdir, proxy_cpus)
    m = re.fullmatch(r"mesh-(\d+)(-nometrics)?", name)
    if m:
        workers = int(m.group(1))
        if workers < 1:
            raise BenchError(f"peer {name!r}: the mesh needs at least 1 worker")
        return MeshHttpPeer(workdir, proxy_cpus if workers == 1 else None, workers=workers, metrics=not m.group(2))
    why = " (pproxy has no reverse-proxy HTTP mode: it is a peer of the TCP suite only)" if name == "pproxy" else ""
    raise BenchError(
        f"unknown HTTP suite peer {name!r}{why}: expected direct, mesh-<N>[-nometrics], haproxy[-<K>k][-always] or nginx"
    )


def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None


@cache
def _mesh_help() -> str:
    try:
        out = subprocess.run(
            [sys.executable, "-m", "meshagent", "run", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def metrics_off_flag() -> list[str] | None:
    """The CLI's switch for metrics off, found in ``mesh run --help`` (the observability issue adds it)."""
    h = _mesh_help()
    if "--no-metrics" in h:
        return ["--no-metrics"]
    if re.search(r"--metrics\b", h):
        return ["--metrics", "off"]
    return None


def admin_args() -> list[str]:
    """Keep the admin/metrics listener of each mesh instance on its own free loopback port."""
    if "--admin" in _mesh_help():
        return ["--admin", f"{LOOPBACK}:{free_port()}"]
    return []


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""


def make_peer(name: str, workdir: Path, *, proxy_cpus: str | None = None) -> Peer:
    """Peer by name: direct, mesh-<N>[-nometrics][-zerocopy], haproxy, haproxy-<K>k[-splice], nginx, pproxy."""
    if name == "direct":
        return Direct(workdir)
    if name == "haproxy":
        return HAProxy(workdir, proxy_cpus)
    m = re.fullmatch(r"haproxy-(\d+)k(-splice)?", name)
    if m:
        return HAProxy(workdir, proxy_cpus, bufsize=int(m.group(1)) * 1024, splice=bool(m.group(2)))
    if name == "nginx":
        return NginxStream(workdir, proxy_cpus)
    if name == "pproxy":
        return Pproxy(workdir, proxy_cpus)
    m = re.fullmatch(r"mesh-(\d+)(-nometrics)?(-zerocopy)?", name)
    if m:
        workers = int(m.group(1))
        if workers < 1:
            raise BenchError(f"peer {name!r}: the mesh needs at least 1 worker")
        # A multi-worker mesh is meant to use every core: pinning it to the proxy CPU would defeat it.
        return MeshPeer(
            workdir,
            proxy_cpus if workers == 1 else None,
            workers=workers,
            metrics=not m.group(2),
            zero_copy=bool(m.group(3)),
        )
    raise BenchError(
        f"unknown peer {name!r}: expected direct, mesh-<N>[-nometrics][-zerocopy], haproxy, haproxy-<K>k[-splice], nginx "
        "or pproxy"
    )
