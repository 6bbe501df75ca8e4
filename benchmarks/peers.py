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
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
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
