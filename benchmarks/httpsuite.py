"""The HTTP suite: ``python -m benchmarks.run --suite http [--quick]`` (docs/benchmarks.md, "HTTP mode").

The mesh's ``protocol: http`` services against HAProxy ``mode http`` and nginx ``proxy_pass``, with the direct
baseline, in one sitting and interleaved like the TCP suite (``benchmarks/run.py`` drives both).

Workloads (group ``http``):
  http-ka-<size>-c<N>     keep-alive HTTP/1.1, responses of <size> (100b, 16k, 1m) over N connections
  http-close-<size>-c<N>  the client closes after each request (``Connection: close``); the proxies keep their
                          upstream connections pooled (``upstream_conns_per_req`` shows whether they do)
  http-hosts-<size>-c<N>  ten services on one port routed by ``Host:`` (h0.bench ... h9.bench, each its own
                          replicas); successive requests take the host names in turn

The backend is one process (nginx, 1 worker, or the uvloop responder) listening on one port per replica: the
first port's service and every host-routed one get ``--replicas`` each (default 2).  Every response names the
replica that sent it (``X-Bench-Backend``), so each peer is checked to route every host to its own replicas
before it is measured; a peer that misroutes is skipped with the reason.  The mesh rows run once the data plane
serves ``protocol: http`` (``'http' in mesh.listener.FRONTS``); until then they are skipped, saying so.

Before/after in one sitting: ``mesh-1@<rev>`` (e.g. ``--peers mesh-1,mesh-1@HEAD~2,haproxy``) is the mesh as it
was at git revision ``<rev>`` of this checkout (``git archive`` into the work directory; run from there),
interleaved with the others like any peer.  One worker only (workers are spawned with ``python -m meshagent``
from the working directory, which would be this checkout's code).
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import tarfile
import time
from collections import Counter
from typing import Any

from benchmarks.backend import SIZES, TAG_HEADER, make_backend
from benchmarks.peers import HttpPeer, HttpTargets, MeshHttpPeer
from benchmarks.peers import make_http_peer as _peer_by_name
from benchmarks.proc import REPO, BenchError
from benchmarks.run import Suite, Workload

__all__ = ["DEFAULT_PEERS", "GROUPS", "HOSTS", "QUICK", "HttpSuite", "make_http_peer", "parse_workloads"]

HOSTS = [f"h{i}.bench" for i in range(10)]
DEFAULT_PEERS = "direct,mesh-1,haproxy,haproxy-always,nginx"
GROUPS = {
    "http-keepalive": ["http-ka-100b-c64", "http-ka-16k-c64", "http-ka-1m-c64", "http-ka-100b-c512"],
    "http-close": ["http-close-100b-c64"],
    "http-hosts": ["http-hosts-100b-c64"],
}
GROUPS["http"] = [*GROUPS["http-keepalive"], *GROUPS["http-close"], *GROUPS["http-hosts"]]
GROUPS["all"] = GROUPS["http"]
QUICK = GROUPS["http"]  # 6 workloads x 5 peers x 2 s: about a minute
_WL = re.compile(r"http-(ka|close|hosts)-(100b|16k|1m)-c(\d+)")
_AT = re.compile(r"mesh-(\d+)(-nometrics)?@([\w.~^/-]+)")


class MeshHttpPeerAt(MeshHttpPeer):
    """``mesh-<N>@<rev>``: the mesh of git revision ``rev`` (module docstring), same config and options."""

    def __init__(self, workdir, cpus: str | None, workers: int, metrics: bool, rev: str) -> None:
        super().__init__(workdir, cpus, workers=workers, metrics=metrics)
        self.rev = rev
        self.name = f"{self.name}@{rev}"
        self.label += f", at {rev}"
        self.tree: str | None = None

    def unavailable(self) -> str | None:
        why = super().unavailable()
        if why:
            return why
        try:
            commit = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--verify", f"{self.rev}^{{commit}}"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()  # fmt: skip
            tree = self.workdir / f"src-{commit[:12]}"
            if not tree.exists():
                tar = tree.with_suffix(".tar")
                subprocess.run(
                    ["git", "-C", str(REPO), "archive", "-o", str(tar), commit], timeout=60, check=True,
                    capture_output=True,
                )  # fmt: skip
                with tarfile.open(tar) as t:
                    t.extractall(tree, filter="data")
                tar.unlink()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"revision {self.rev!r} could not be extracted: {exc}"
        self.tree = str(tree)
        self.label += f" ({commit[:10]})"
        return None

    def _listen(self, argv, cfg_dir, ports, timeout=10.0, env=None):  # type: ignore[override]
        # ``python -m meshagent`` would import this checkout's packages (the working directory comes first on
        # sys.path): run the module with the extracted tree first instead.
        assert self.tree is not None and argv[1:3] == ["-m", "meshagent"], argv
        boot = (
            f"import runpy, sys; sys.path[0] = {self.tree!r}; sys.argv[0] = 'meshagent'; "
            "runpy.run_module('meshagent', run_name='__main__', alter_sys=True)"
        )
        env = dict(env or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.tree, env.get("PYTHONPATH", "")) if p)
        return super()._listen([argv[0], "-c", boot, *argv[3:]], cfg_dir, ports, timeout=timeout, env=env)


def make_http_peer(name: str, workdir, *, proxy_cpus: str | None = None):
    """``benchmarks.peers.make_http_peer`` plus ``mesh-<N>[-nometrics]@<rev>``."""
    m = _AT.fullmatch(name)
    if m is None:
        return _peer_by_name(name, workdir, proxy_cpus=proxy_cpus)
    workers = int(m.group(1))
    if workers != 1:
        # Workers are spawned as ``python -m meshagent`` from the working directory: this checkout's code.
        raise BenchError(f"peer {name!r}: a revision runs with 1 worker only (mesh-1@<rev>)")
    return MeshHttpPeerAt(workdir, proxy_cpus if workers == 1 else None, workers, not m.group(2), m.group(3))


def parse_workloads(items: list[str]) -> list[Workload]:
    """Names and group names, comma or space separated, in order, without duplicates."""
    names: list[str] = []
    for item in items:
        for part in item.replace(",", " ").split():
            for name in GROUPS.get(part, [part]):
                if name not in names:
                    names.append(name)
    out = []
    for name in names:
        m = _WL.fullmatch(name)
        if not m:
            raise BenchError(
                f"unknown HTTP suite workload {name!r}: expected http-ka-<size>-c<N>, http-close-<size>-c<N>, "
                f"http-hosts-<size>-c<N> (size: {', '.join(SIZES)}) or a group ({', '.join(GROUPS)})"
            )
        conns = int(m.group(3))
        if conns < 1:
            raise BenchError(f"workload {name!r}: at least 1 connection")
        out.append(Workload(name, f"http-{m.group(1)}", m.group(2), conns))
    return out


def replica_tags(replicas: int) -> tuple[list[str], dict[str, list[str]]]:
    """Backend tags: ``bench-r<i>`` for the first port's service, ``h<n>-r<i>`` for host ``h<n>.bench``."""
    default = [f"bench-r{i}" for i in range(replicas)]
    hosts = {h: [f"{h.split('.')[0]}-r{i}" for i in range(replicas)] for h in HOSTS}
    return default, hosts


class HttpSuite(Suite):
    """The TCP suite's machinery (interleaving, CPU and noise accounting) with the HTTP peers and backend."""

    peer_factory = staticmethod(make_http_peer)

    def __init__(self, args, log) -> None:
        super().__init__(args, log)
        self.default_tags, self.host_tags = replica_tags(args.replicas)

    def start(self) -> None:
        tags = [*self.default_tags, *(t for ts in self.host_tags.values() for t in ts)]
        self.backend = make_backend(self.args.backend, self.workdir, cpus=self.backend_cpus, tags=tags)
        self.backend.start()
        a = self.backend.addrs
        self.target = HttpTargets(
            default=[a[t] for t in self.default_tags], hosts={h: [a[t] for t in ts] for h, ts in self.host_tags.items()}
        )
        self.log(
            f"backend: {self.backend.kind}, one process, {len(tags)} replicas ({self.args.replicas} per service: "
            f"1 + {len(HOSTS)} services); load: {self.args.load}; pinning load={self.load_cpus} "
            f"proxy={self.proxy_cpus} backend={self.backend_cpus}"
        )

    def ensure_running(self, name: str) -> tuple[str, int] | None:
        fresh = name not in self.running
        addr = super().ensure_running(name)
        if addr is None or not fresh or name == "direct":
            return addr
        why = self.check_routes(self.peers[name])  # type: ignore[arg-type]
        if why is not None:
            self.skipped[name] = f"routing check failed: {why}"
            self.log(f"skipping peer {name}: routing check failed: {why}")
            self.stop_peer(name)
            return None
        return addr

    def check_routes(self, peer: HttpPeer) -> str | None:
        """GET /100b a few times on each service (first port: no Host of ours; host port: each hN.bench) and
        check the status, the body and that the answer came from that service's replicas.  None = all good."""
        assert peer.addr is not None and peer.hosts_addr is not None
        cases: list[tuple[tuple[str, int], str | None, list[str]]] = [(peer.addr, None, self.default_tags)]
        cases += [(peer.hosts_addr, h, tags) for h, tags in self.host_tags.items()]
        seen: Counter[str] = Counter()
        for addr, host, tags in cases:
            conn = http.client.HTTPConnection(*addr, timeout=5)
            try:
                for i in range(2 * len(tags)):
                    deadline = time.monotonic() + (10 if i == 0 else 0)  # the first answer may wait for readiness
                    while True:
                        try:
                            conn.request("GET", "/100b", headers={"Host": host} if host else {})
                            resp = conn.getresponse()
                            body = resp.read()
                        except (OSError, http.client.HTTPException) as exc:
                            status, body, tag, err = 0, b"", None, f"{type(exc).__name__}: {exc}"
                            conn.close()
                        else:
                            status, tag, err = resp.status, resp.getheader(TAG_HEADER), ""
                        if status == 200 or time.monotonic() >= deadline:
                            break
                        time.sleep(0.2)
                    what = f"Host {host}" if host else "the first port"
                    if status != 200 or len(body) != 100:
                        return f"{what}: status {status}, {len(body)} body bytes {err}".rstrip()
                    if tag not in tags:
                        return f"{what}: answered by replica {tag!r}, expected one of {', '.join(tags)}"
                    seen[tag] += 1
            finally:
                conn.close()
        spread = sum(1 for t in seen if seen[t]) / (len(self.default_tags) * (1 + len(self.host_tags)))
        self.log(
            f"  {peer.name}: routing ok ({1 + len(self.host_tags)} services, every answer from its own replicas; "
            f"{spread:.0%} of the replicas answered)"
        )
        return None

    def address(self, name: str, wl: Workload, addr: tuple[str, int]) -> tuple[str, int]:
        if wl.kind == "http-hosts":
            hosts_addr = getattr(self.peers.get(name), "hosts_addr", None)
            return hosts_addr or addr
        return addr

    def load_options(self, wl: Workload) -> dict[str, Any]:
        return {"close": wl.kind == "http-close", "hosts": HOSTS if wl.kind == "http-hosts" else None}
