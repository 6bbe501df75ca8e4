"""Run a benchmark suite in one sitting: ``python -m benchmarks.run [--suite tcp|http] [--quick] [--repeat N]
[--workloads ...] [--peers ...] [--compare [FILE]] [--out DIR]``.

Suite tcp (the default): the mesh's TCP forwarding against HAProxy mode tcp, nginx stream and pproxy.
Suite http (``--suite http``, benchmarks/httpsuite.py): the mesh's ``protocol: http`` services against HAProxy
mode http and nginx proxy_pass; workloads http-ka-<size>-c<N>, http-close-<size>-c<N>, http-hosts-<size>-c<N>
(group http).

Workloads (names; groups in brackets):
  ka-<size>-c<N>       keep-alive HTTP, responses of <size> (100b, 16k, 1m) over N connections  [keepalive]
  churn-<size>-c<N>    a new connection per request ("Connection: close")                          [churn]
  idle-<N>             N idle proxied connections: RSS growth per connection, fresh proxies        [idle]
  metrics-<size>-c<N>  mesh-1 with metrics on vs off (same load as ka-)                           [metrics]
  watchers-<size>-c<N> mesh-1 with 100 dashboard streams open vs none (benchmarks/watchers.py)    [watchers]
  convergence          Docker event -> table applied (p50/p99); needs a Docker engine           [convergence]
The latency a proxy adds at one connection is derived from ka-100b-c1 (p50 minus direct's p50).

Order: for each workload, the repeats are interleaved across peers (A B C A B C ...), so slow drifts of the
machine hit every peer alike.  Every load run is bounded (wrk -d plus a hard timeout), all on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.backend import NGINX_STREAM_MODULE, SIZES, Backend, make_backend
from benchmarks.idle import max_idle_connections, measure_idle
from benchmarks.load import have_wrk, run_load
from benchmarks.peers import Peer, make_peer
from benchmarks.proc import (
    REPO,
    BenchError,
    children_cpu_seconds,
    cpu_seconds,
    machine_busy_seconds,
    raise_nofile,
)

GROUPS = {
    "keepalive": [f"ka-{s}-c{c}" for s in ("100b", "16k", "1m") for c in (1, 64, 512)],
    "churn": ["churn-100b-c64"],
    "latency": ["ka-100b-c1"],
    "idle": ["idle-10000"],
    "metrics": ["metrics-100b-c64", "metrics-16k-c64"],
    "convergence": ["convergence"],
    "watchers": ["watchers-100b-c64"],
}
GROUPS["all"] = [w for g in ("keepalive", "churn", "idle", "metrics", "convergence") for w in GROUPS[g]]
QUICK = ["ka-100b-c64", "ka-16k-c64", "ka-1m-c64", "ka-100b-c1", "churn-100b-c64", "idle-1000", "metrics-100b-c64"]
_WL = re.compile(r"(ka|churn|metrics|watchers)-(100b|16k|1m)-c(\d+)|idle-(\d+)|convergence")


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # ka | churn | metrics | watchers | idle | convergence; the HTTP suite: http-ka | http-close | http-hosts
    size: str = "100b"
    connections: int = 0

    @property
    def path(self) -> str:
        return f"/{self.size}"


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
                f"unknown workload {name!r}: expected ka-<size>-c<N>, churn-<size>-c<N>, "
                f"metrics-<size>-c<N>, idle-<N>, convergence (size: {', '.join(SIZES)}) or a group "
                f"({', '.join(GROUPS)})"
            )
        if m.group(1):
            conns = int(m.group(3))
            if conns < 1:
                raise BenchError(f"workload {name!r}: at least 1 connection")
            out.append(Workload(name, m.group(1), m.group(2), conns))
        elif m.group(4):
            out.append(Workload(name, "idle", connections=int(m.group(4))))
        else:
            out.append(Workload(name, "convergence"))
    return out


# -- tools ----------------------------------------------------------------------------------------------------


def ensure_installed(peers: list[str], want_plot: bool, allow_install: bool, log, stream: bool = True) -> None:
    """Install missing peers and tools: Debian packages with apt-get (as root), Python ones with pip.
    ``stream``: the nginx peer is the stream module (TCP suite), not needed by the HTTP suite.

    Whatever cannot be installed stays missing; the peer is then skipped with its reason.
    """
    debs: list[str] = []
    if any(p.startswith("haproxy") for p in peers) and not shutil.which("haproxy"):
        debs.append("haproxy")
    if not shutil.which("nginx"):
        debs.append("nginx-light")
    if stream and "nginx" in peers and not NGINX_STREAM_MODULE.exists():
        debs.append("libnginx-mod-stream")
    if not shutil.which("wrk"):
        debs.append("wrk")
    pips: list[str] = []
    if "pproxy" in peers and importlib.util.find_spec("pproxy") is None:
        pips.append("pproxy")
    if want_plot and importlib.util.find_spec("matplotlib") is None:
        pips.append("matplotlib")
    if not debs and not pips:
        return
    if not allow_install:
        log(f"not installing {' '.join(debs + pips)} (--no-install): those peers/tools are skipped")
        return
    if debs:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log(f"installing Debian packages: {' '.join(debs)}")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            for argv in (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *debs],
            ):
                r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
                if r.returncode != 0:
                    log(f"{' '.join(argv[:2])} failed ({r.returncode}): {r.stderr.strip()[-300:]}")
                    break
        else:
            log(f"cannot install {' '.join(debs)} (needs root and apt-get): skipped where needed")
    if pips:
        log(f"installing Python packages: {' '.join(pips)}")
        r = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pips],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if r.returncode != 0:
            log(f"pip install {' '.join(pips)} failed: {r.stderr.strip()[-300:]}")
        importlib.invalidate_caches()


# -- the suite ------------------------------------------------------------------------------------------------


class Suite:
    peer_factory = staticmethod(make_peer)

    def __init__(self, args: argparse.Namespace, log) -> None:
        self.args = args
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="meshbench-"))
        self.backend: Backend | None = None
        self.target: Any = None  # what the peers forward to: (host, port); the HTTP suite's HttpTargets
        self.peers: dict[str, Peer] = {}
        self.running: dict[str, tuple[str, int]] = {}
        self.skipped: dict[str, str] = {}
        self.runs: list[dict[str, Any]] = []
        self.load_cpus, self.proxy_cpus, self.backend_cpus = args.pin_layout

    # peers
    def peer(self, name: str) -> Peer | None:
        if name in self.skipped:
            return None
        if name not in self.peers:
            p = self.peer_factory(name, self.workdir, proxy_cpus=self.proxy_cpus)
            why = p.unavailable()
            if why:
                self.skipped[name] = why
                self.log(f"skipping peer {name}: {why}")
                return None
            self.peers[name] = p
        return self.peers[name]

    def ensure_running(self, name: str) -> tuple[str, int] | None:
        if name in self.running:
            return self.running[name]
        p = self.peer(name)
        if p is None:
            return None
        assert self.target is not None
        try:
            self.running[name] = p.start(self.target)
        except BenchError as exc:
            self.skipped[name] = f"did not start: {exc}"
            self.log(f"skipping peer {name}: {exc}")
            p.stop()
            return None
        return self.running[name]

    def stop_peer(self, name: str) -> None:
        if name in self.peers:
            self.peers[name].stop()
        self.running.pop(name, None)

    # phases
    def start(self) -> None:
        self.backend = make_backend(self.args.backend, self.workdir, cpus=self.backend_cpus)
        self.target = self.backend.start()
        self.log(
            f"backend: {self.backend.kind} on {self.target[0]}:{self.target[1]}; load: {self.args.load}; "
            f"pinning load={self.load_cpus} proxy={self.proxy_cpus} backend={self.backend_cpus}"
        )

    def close(self) -> None:
        for name in list(self.peers):
            self.stop_peer(name)
        if self.backend is not None:
            self.backend.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def load_options(self, wl: Workload) -> dict[str, Any]:
        """Extra arguments of ``run_load`` for a workload (the HTTP suite adds host names)."""
        return {"close": wl.kind == "churn"}

    def address(self, name: str, wl: Workload, addr: tuple[str, int]) -> tuple[str, int]:
        """Where the load for ``wl`` goes on a running peer (the HTTP suite's host-routed port differs)."""
        return addr

    def load(self, addr: tuple[str, int], wl: Workload, duration: float, peer: str = "") -> dict[str, Any]:
        """One bounded load run; also records how much CPU the rest of the machine used meanwhile (other
        people's work on a shared machine is the main source of noise, and this makes it visible), and, where the
        backend counts them, how many connections it accepted (the proxy's upstream connections)."""
        proxy = self.peers[peer].pids() if peer in self.peers else []
        ours = [*(self.backend.pids() if self.backend else []), *proxy]
        accepts0 = self.backend.accepts() if self.backend else None
        busy0, kids0, t0 = machine_busy_seconds(), children_cpu_seconds(), time.monotonic()
        ours0, proxy0 = cpu_seconds(ours), cpu_seconds(proxy)
        res = run_load(
            self.args.load,
            addr[0],
            addr[1],
            wl.path,
            wl.connections,
            duration,
            cpus=self.load_cpus,
            workdir=self.workdir,
            procs=self.args.load_procs,
            **self.load_options(wl),
        )
        wall = time.monotonic() - t0
        proxy_s = cpu_seconds(proxy) - proxy0
        mine = children_cpu_seconds() - kids0 + cpu_seconds(ours) - ours0
        d = res.to_dict()
        accepts1 = self.backend.accepts() if accepts0 is not None and self.backend else None
        if accepts0 is not None and accepts1 is not None:
            # The second reading's own connection is counted in it: take it off.
            d["upstream_conns"] = max(0, accepts1 - accepts0 - 1)
            d["upstream_conns_per_req"] = round(d["upstream_conns"] / res.requests, 4) if res.requests else 0.0
        # The proxy's CPU per request is its efficiency whatever the bottleneck was (load generator, backend or
        # the proxy itself): two proxies that both keep up show the same req/s but not the same cost.
        d["proxy_cpu"] = round(proxy_s / wall, 3)
        d["proxy_us_per_req"] = round(proxy_s / res.requests * 1e6, 2) if proxy and res.requests else 0.0
        d["cpu_ours"] = round(mine / wall, 2)  # cores used by load generator + proxy + backend
        d["cpu_others"] = round(max(0.0, machine_busy_seconds() - busy0 - mine) / wall, 2)
        return d

    def warm_up(self, names: list[str]) -> None:
        wl = Workload("warmup", "ka", "16k", 64)
        for name in names:
            addr = self.ensure_running(name)
            if addr is not None:
                self.load(addr, wl, 1)

    def run_throughput(self, wl: Workload, names: list[str]) -> None:
        """Interleaved repeats.  A name "<peer>+scrape" is that peer while a scraper GETs its /metrics twice a
        second (ten times Prometheus' usual 1/15 s: the scrape cost made visible); "<peer>+watch" while 100
        dashboard streams are open on its admin API (benchmarks/watchers.py)."""
        for rep in range(self.args.repeat):
            for name in names:
                base, _, scrape = name.partition("+")
                addr = self.ensure_running(base)
                if addr is None:
                    continue
                addr = self.address(base, wl, addr)
                url = getattr(self.peers[base], "admin_url", None) if scrape else None
                if scrape and url is None:
                    self.skipped.setdefault(name, f"{base} has no admin API to scrape")
                    continue
                scraper = Scraper(f"{url}/metrics", 0.5) if url and scrape == "scrape" else None
                watchers = None
                if url and scrape == "watch":
                    from benchmarks.watchers import Watchers

                    watchers = Watchers(url, 100, cpus=self.load_cpus)
                try:
                    r = self.load(addr, wl, self.args.duration, base)
                finally:
                    if scraper is not None:
                        scraper.stop()
                    watched = watchers.stop() if watchers is not None else None
                if scraper is not None:
                    r["scrapes"], r["scrape_errors"] = scraper.count, scraper.errors
                if watched is not None:
                    r["watchers"], r["watch_events"], r["watch_errors"] = (
                        watched["watchers"], watched["events"], watched["errors"]
                    )  # fmt: skip
                r.update(workload=wl.name, peer=name, rep=rep)
                self.runs.append(r)
                self.log(
                    f"  {wl.name:<16} {name:<18} rep {rep + 1}/{self.args.repeat}: {r['rps']:>10.0f} req/s "
                    f"p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms  errors {r['errors']}  proxy cpu {r['proxy_cpu']:.2f} "
                    f"({r['proxy_us_per_req']:.1f} us/req)  others {r['cpu_others']:.2f}"
                )

    def run_idle(self, wl: Workload, names: list[str]) -> None:
        n = wl.connections
        limit = max_idle_connections()
        if n > limit:
            self.log(
                f"  {wl.name}: RLIMIT_NOFILE {limit * 2 + 200} allows {limit} proxied connections (two "
                f"descriptors each): measuring {limit}"
            )
            n = limit
        for rep in range(self.args.repeat):
            for name in names:
                if name == "direct" or self.peer(name) is None:
                    continue
                # A fresh process: one that served big responses before would reuse freed memory.
                self.stop_peer(name)
                addr = self.ensure_running(name)
                if addr is None:
                    continue
                try:
                    r = measure_idle(addr, self.peers[name].pids, n)
                except BenchError as exc:
                    self.log(f"  {wl.name:<16} {name:<18} failed: {exc}")
                    continue
                finally:
                    self.stop_peer(name)
                r.update(workload=wl.name, peer=name, rep=rep)
                self.runs.append(r)
                self.log(
                    f"  {wl.name:<16} {name:<18} rep {rep + 1}/{self.args.repeat}: "
                    f"{r['bytes_per_conn']:>8.0f} B/conn over {r['connections']} connections"
                )

    def run_convergence(self, wl: Workload) -> None:
        from benchmarks.convergence import lab_unavailable, measure_convergence

        why = lab_unavailable()
        if why is None and self.peer("mesh-1") is None:
            why = "the mesh is not runnable"
        if why is not None:
            self.skipped[wl.name] = f"no Docker engine can be started here: {why}"
            self.log(f"skipping {wl.name}: {self.skipped[wl.name]}")
            return
        samples = 5 if self.args.quick else 20
        try:
            res = measure_convergence(samples, self.log, self.workdir)
        except BenchError as exc:
            self.skipped[wl.name] = str(exc)
            self.log(f"skipping {wl.name}: {exc}")
            return
        import statistics

        for direction, vals in res.items():
            ordered = sorted(vals)
            p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
            self.runs.append(
                {
                    "workload": f"{wl.name}-{direction}",
                    "peer": "mesh-1",
                    "rep": 0,
                    "p50_ms": round(statistics.median(vals), 2),
                    "p99_ms": round(p99, 2),
                    "max_ms": round(max(vals), 2),
                    "samples": len(vals),
                }
            )


class Scraper:
    """GET ``url`` every ``interval`` seconds in a thread until ``stop()`` (bounded by the load run)."""

    def __init__(self, url: str, interval: float) -> None:
        import threading

        self.url, self.interval = url, interval
        self.count = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
                self.count += 1
            except OSError:
                self.errors += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _pin_layout(text: str) -> tuple[str | None, str | None, str | None]:
    """--pin: "auto", "none", or LOAD:PROXY:BACKEND CPU lists (empty = not pinned), e.g. "0:1:"."""
    if text == "none":
        return (None, None, None)
    if text == "auto":
        # Two cores (the reference machine): the proxy gets a core of its own and the load generator and the
        # backend share the other.  Measured here (3 repeats, 64 connections): spreads drop from 8-17% unpinned
        # to about 1%, and every proxy runs on the same dedicated core.  The price: direct (wrk + backend on
        # one core) is no longer the machine's maximum, so "ratio to direct" reads as "share of what the load
        # side can drive".  With more cores the scheduler does fine alone.
        return ("0", "1", "0") if os.cpu_count() == 2 else (None, None, None)
    parts = text.split(":")
    if len(parts) != 3:
        raise BenchError(f"--pin must be auto, none or LOAD:PROXY:BACKEND (e.g. 0:1:), got {text!r}")
    return tuple(p or None for p in parts)  # type: ignore[return-value]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    ncpu = os.cpu_count() or 2
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--suite",
        choices=("tcp", "http"),
        default="tcp",
        help="tcp: TCP forwarding (default); http: protocol: http services vs HAProxy mode http and nginx proxy_pass",
    )
    p.add_argument("--quick", action="store_true", help="short runs of a small workload set (2 s, 1 repeat)")
    p.add_argument("--repeat", type=int, default=None, help="repeats per workload and peer (default 3; quick 1)")
    p.add_argument("--duration", type=float, default=None, help="seconds per load run (default 5; quick 2)")
    p.add_argument("--workloads", nargs="+", default=None, help="names or groups (default: all; quick: a subset)")
    p.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated (default: direct,mesh-1,mesh-{ncpu},haproxy,haproxy-256k,nginx,pproxy; "
        "http suite: direct,mesh-1,haproxy,haproxy-always,nginx)",
    )
    p.add_argument("--backend", choices=("auto", "nginx", "uvloop"), default="auto")
    p.add_argument(
        "--replicas", type=int, default=2, help="http suite: backend replicas per service (default 2), one process"
    )
    p.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--load-procs", type=int, default=1, help="processes of the Python load client (default 1)")
    p.add_argument("--pin", default="auto", help="CPU pinning: auto, none, or LOAD:PROXY:BACKEND (e.g. 0:1:)")
    p.add_argument(
        "--compare",
        nargs="?",
        const="last",
        default=None,
        metavar="FILE",
        help="compare with FILE (default: the last committed result); exit 3 on a regression",
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the JSON and PNG go")
    p.add_argument("--no-install", action="store_true", help="do not apt-get/pip install missing peers and tools")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = args.t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:7.1f}s] {msg}", flush=True)

    # SIGTERM (and SIGINT, which background jobs ignore by default) unwind through the finally blocks, so the
    # peers and the backend are stopped instead of being left running.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupted)
    try:
        return _main(args, argv if argv is not None else sys.argv[1:], log)
    except KeyboardInterrupt:
        print("benchmarks: interrupted; peers stopped, no result written", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str], log) -> int:
    ncpu = os.cpu_count() or 2
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    args.duration = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    if args.repeat < 1 or args.duration <= 0:
        raise BenchError("--repeat must be >= 1 and --duration > 0")
    http = args.suite == "http"
    if http:
        from benchmarks import httpsuite

        if args.replicas < 1:
            raise BenchError("--replicas must be >= 1")
        workloads = httpsuite.parse_workloads(args.workloads or (httpsuite.QUICK if args.quick else ["http"]))
        peers = (args.peers or httpsuite.DEFAULT_PEERS).replace(" ", "")
        factory = httpsuite.make_http_peer
        suite_class: type[Suite] = httpsuite.HttpSuite
    else:
        workloads = parse_workloads(args.workloads or (QUICK if args.quick else ["all"]))
        peers = (args.peers or f"direct,mesh-1,mesh-{ncpu},haproxy,haproxy-256k,nginx,pproxy").replace(" ", "")
        factory = make_peer
        suite_class = Suite
    peer_names = [p for p in peers.split(",") if p]
    for name in peer_names:
        factory(name, Path(tempfile.gettempdir()))  # validates the name before anything starts
    args.pin_layout = _pin_layout(args.pin)

    ensure_installed(peer_names, not args.no_plot, not args.no_install, log, stream=not http)
    if args.load == "auto":
        args.load = "wrk" if have_wrk() else "python"
        if args.load == "python":
            log("wrk is not installed: using the multiprocess Python client (slower; ratios stay comparable)")
    nofile = raise_nofile()
    log(f"RLIMIT_NOFILE {nofile}; workloads: {' '.join(w.name for w in workloads)}; peers: {' '.join(peer_names)}")

    suite = suite_class(args, log)
    started = dt.datetime.now(dt.UTC)
    try:
        suite.start()
        for name in peer_names:
            suite.peer(name)
        suite.warm_up([n for n in peer_names if n != "direct"])
        for wl in workloads:
            log(f"workload {wl.name}")
            if wl.kind in ("ka", "churn") or wl.kind.startswith("http-"):
                suite.run_throughput(wl, peer_names)
            elif wl.kind == "metrics":
                # Metrics on vs off when the CLI can switch them off; always: unscraped vs scraped.
                names = ["mesh-1-nometrics", "mesh-1", "mesh-1+scrape"]
                suite.run_throughput(wl, [n for n in names if n == "mesh-1" or suite.peer(n.split("+")[0])])
                if "mesh-1-nometrics" not in peer_names:
                    suite.stop_peer("mesh-1-nometrics")
            elif wl.kind == "watchers":
                suite.run_throughput(wl, ["mesh-1", "mesh-1+watch"])
            elif wl.kind == "idle":
                suite.run_idle(wl, peer_names)
            else:
                suite.run_convergence(wl)
        versions = {name: p.version() for name, p in suite.peers.items()}
        backend_kind = suite.backend.kind if suite.backend else ""
    finally:
        suite.close()

    commit, dirty = report.git_commit()
    extra = ("mesh-1-nometrics", "mesh-1+scrape", "mesh-1+watch")
    all_peers = [*peer_names, *(n for n in extra if n not in peer_names and any(r["peer"] == n for r in suite.runs))]
    subjects = [p for p in all_peers if p.startswith("mesh-") and "nometrics" not in p and "+" not in p]
    summary = report.summarize(suite.runs)
    labels = {name: p.label for name, p in suite.peers.items()}
    doc: dict[str, Any] = {
        "schema": report.SCHEMA,
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "dirty": dirty,
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv),
        "machine": report.machine_facts({**versions, "backend": backend_kind}),
        "settings": {
            "suite": args.suite,
            "repeat": args.repeat,
            "duration_s": args.duration,
            "workloads": [w.name for w in workloads],
            "peers": all_peers,
            "labels": labels,
            "subjects": subjects,
            "backend": backend_kind,
            "load": args.load,
            "pin": {"load": args.pin_layout[0], "proxy": args.pin_layout[1], "backend": args.pin_layout[2]},
            "rlimit_nofile": nofile,
            **({"replicas_per_service": args.replicas} if http else {}),
            "elapsed_s": round(time.monotonic() - args.t_start, 1),
        },
        "skipped": suite.skipped,
        "runs": suite.runs,
        "summary": summary,
        "ratios": report.ratios(summary, subjects),
        "added_latency_ms": report.added_latency(summary),
        "targets": report.check_http_targets(summary) if http else report.check_targets(summary),
    }
    print()
    print(report.format_report(doc))
    out = Path(args.out)
    stem = f"{'http-' if http else ''}{started.strftime('%Y-%m-%d_%H%M%S')}_{commit}{'-dirty' if dirty else ''}"
    json_path = out / f"{stem}.json"
    report.write_json(doc, json_path)
    print(f"\nresults: {json_path}")
    if not args.no_plot:
        why = report.plot(doc, out / f"{stem}.png")
        print(f"plot: {why}" if why else f"plot: {out / f'{stem}.png'}")
    rc = 0
    if args.compare:
        old_path = (
            Path(args.compare)
            if args.compare != "last"
            else report.last_committed_result(out, json_path, prefix="http-" if http else "")
        )
        if old_path is None:
            print("compare: no committed result to compare with")
        else:
            import json

            lines, regressions = report.compare(doc, json.loads(old_path.read_text()))
            print("\n".join(lines))
            if regressions:
                print(f"{len(regressions)} regression(s) beyond the measured noise")
                rc = 3
            else:
                print("no regression beyond the measured noise")
    return rc


if __name__ == "__main__":
    sys.exit(main())
