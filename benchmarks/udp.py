"""UDP benchmark: datagrams/s and added latency through the mesh vs direct vs nginx ``stream`` UDP, with 1 and
64 client flows, and the memory one idle UDP session costs at 10,000 sessions.

    python -m benchmarks.udp [--seconds 5] [--repeat 3] [--sessions 10000] [--out benchmarks/results/udp-....json]

How it measures (docs/benchmarks.md has the harness's general rules):

- One echo backend process (asyncio datagram endpoint on uvloop), one proxy process under test, one load
  generator process (this module's ``client`` subcommand), each pinned to CPUs (``--proxy-cpus``, default the
  last CPU; backend and load generator share the others).
- Load is closed loop and bounded: each flow is one connected UDP socket with one datagram in flight (64
  bytes); a reply (or a 200 ms loss timeout) sends the next.  Each measurement runs ``--seconds`` and at most
  ``--max-datagrams``.  Throughput = replies per second; latency = round-trip time percentiles, and the added
  latency is a peer's median minus the direct median of the same round.
- Peers run interleaved (direct, mesh, nginx, for 1 then 64 flows, repeated ``--repeat`` times); the JSON
  keeps every run and the medians with their spread (min..max).
- Memory per idle session: a fresh proxy, its RSS (process tree) before, then ``--sessions`` client sockets
  each send one datagram and get the reply (so the proxy holds one session, with its upstream socket, per
  client), RSS after; (after - before) / sessions.  Kernel socket buffers are not in RSS.

Never run two benchmarks at once on one machine (they share the CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers import NGINX_STREAM_MODULE
from benchmarks.proc import LOOPBACK, REPO, BenchError, Proc, python_env, raise_nofile, rss_bytes, tree_pids

PAYLOAD = b"x" * 64
LOSS_TIMEOUT = 0.2


# -- the backend and the load generator (child processes) -------------------------------------------------------


def _run_backend(port_file: str) -> None:
    import uvloop

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:
            self.t = transport

        def datagram_received(self, data, addr) -> None:
            self.t.sendto(data, addr)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)

    async def main() -> None:
        await asyncio.get_running_loop().create_datagram_endpoint(Echo, sock=sock)
        await asyncio.Event().wait()

    Path(port_file).write_text(str(sock.getsockname()[1]))
    uvloop.run(main())


def _run_client(target: str, flows: int, seconds: float, max_datagrams: int) -> None:
    import uvloop

    host, port = target.rsplit(":", 1)
    addr = (host, int(port))

    class Flow(asyncio.DatagramProtocol):
        def __init__(self, st: dict) -> None:
            self.st = st
            self.sent_at = 0.0
            self.timer = None

        def connection_made(self, transport) -> None:
            self.t = transport
            self.loop = asyncio.get_running_loop()
            self.send()

        def send(self) -> None:
            st = self.st
            if st["stop"] or st["sent"] >= max_datagrams:
                return
            st["sent"] += 1
            self.sent_at = time.perf_counter()
            self.t.sendto(PAYLOAD)
            self.timer = self.loop.call_later(LOSS_TIMEOUT, self.lost)

        def lost(self) -> None:
            self.st["lost"] += 1
            self.send()

        def datagram_received(self, data, _addr) -> None:
            if self.timer is not None:
                self.timer.cancel()
            self.st["rtts"].append(time.perf_counter() - self.sent_at)
            self.send()

        def error_received(self, exc) -> None:
            self.st["errors"] += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        st = {"sent": 0, "lost": 0, "errors": 0, "rtts": [], "stop": False}
        transports = []
        started = time.perf_counter()
        for _ in range(flows):
            t, _ = await loop.create_datagram_endpoint(lambda: Flow(st), remote_addr=addr)
            transports.append(t)
        await asyncio.sleep(seconds)
        st["stop"] = True
        elapsed = time.perf_counter() - started
        for t in transports:
            t.close()
        rtts = sorted(st["rtts"])
        n = len(rtts)
        out = {
            "flows": flows,
            "seconds": round(elapsed, 3),
            "sent": st["sent"],
            "replies": n,
            "lost": st["lost"],
            "errors": st["errors"],
            "datagrams_per_s": round(n / elapsed, 1),
            "rtt_us": {
                "p50": round(rtts[n // 2] * 1e6, 1) if n else None,
                "p90": round(rtts[int(n * 0.9)] * 1e6, 1) if n else None,
                "p99": round(rtts[min(n - 1, int(n * 0.99))] * 1e6, 1) if n else None,
            },
        }
        print(json.dumps(out), flush=True)

    uvloop.run(main())


# -- peers -----------------------------------------------------------------------------------------------------


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _wait_udp(port: int, proc: Proc | None, timeout: float = 15.0) -> None:
    """Until (LOOPBACK, port) echoes a datagram."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while True:
            if proc is not None and proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
            s.sendto(b"ping", (LOOPBACK, port))
            try:
                if s.recvfrom(100)[0] == b"ping":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"nothing echoes on udp {LOOPBACK}:{port} after {timeout}s")


def start_mesh(workdir: Path, target: int, cpus: str | None, max_sessions: int = 20000) -> tuple[Proc, int]:
    port = _udp_port()
    cfg = workdir / "mesh-udp.yaml"
    cfg.write_text(
        "services:\n"
        "  echo:\n"
        f"    listen: '{LOOPBACK}:{port}'\n"
        "    protocol: udp\n"
        f"    endpoints: ['{LOOPBACK}:{target}']\n"
        f"    udp_max_sessions: {max_sessions}\n"
    )
    proc = Proc("mesh", [sys.executable, "-m", "meshagent", "run", "--config", str(cfg)], workdir / "mesh.log",
                cpus=cpus, env=python_env())  # fmt: skip
    _wait_udp(port, proc)
    return proc, port


def start_nginx(workdir: Path, target: int, cpus: str | None) -> tuple[Proc, int]:
    port = _udp_port()
    d = workdir / "nginx"
    d.mkdir(exist_ok=True)
    cfg = d / "nginx.conf"
    cfg.write_text(
        f"""load_module {NGINX_STREAM_MODULE};
user root;
worker_processes 1;
worker_rlimit_nofile 60000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 50000; }}
stream {{
    server {{
        listen {LOOPBACK}:{port} udp;
        proxy_pass {LOOPBACK}:{target};
        proxy_timeout 30s;
    }}
}}
"""
    )
    proc = Proc("nginx", ["nginx", "-p", str(d), "-c", str(cfg), "-g", "daemon off;"], d / "stderr.log", cpus=cpus)
    _wait_udp(port, proc)
    return proc, port


def run_client(port: int, flows: int, seconds: float, max_datagrams: int, cpus: str | None) -> dict:
    argv = [sys.executable, "-m", "benchmarks.udp", "client", "--target", f"{LOOPBACK}:{port}", "--flows", str(flows),
            "--seconds", str(seconds), "--max-datagrams", str(max_datagrams)]  # fmt: skip
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, env=python_env(), cwd=REPO, timeout=seconds + 60)
    if out.returncode != 0:
        raise BenchError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def idle_session_memory(proc: Proc, port: int, sessions: int) -> dict:
    """RSS growth per idle session: ``sessions`` clients, one datagram and its reply each."""
    time.sleep(0.5)
    pids = tree_pids(proc.pid)
    before = rss_bytes(pids)
    socks = []
    answered = 0
    try:
        for _ in range(sessions):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        for i in range(0, sessions, 200):  # bounded bursts: the echo path is UDP, a burst too large drops
            batch = socks[i : i + 200]
            for s in batch:
                s.sendto(PAYLOAD, (LOOPBACK, port))
            deadline = time.monotonic() + 2.0
            pending = set(batch)
            while pending and time.monotonic() < deadline:
                for s in list(pending):
                    try:
                        s.recvfrom(100)
                        pending.discard(s)
                        answered += 1
                    except BlockingIOError:
                        pass
                if pending:
                    time.sleep(0.001)
        time.sleep(1.0)
        after = rss_bytes(tree_pids(proc.pid))
    finally:
        for s in socks:
            s.close()
    return {
        "sessions": sessions,
        "answered": answered,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_session": round((after - before) / max(answered, 1)),
    }


def _median_spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.udp", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--flows", type=int, default=1)
    c.add_argument("--seconds", type=float, default=5.0)
    c.add_argument("--max-datagrams", type=int, default=2_000_000)
    b = sub.add_parser("backend")
    b.add_argument("--port-file", required=True)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--flows", default="1,64")
    ap.add_argument("--max-datagrams", type=int, default=2_000_000)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--peers", default="direct,mesh,nginx")
    ncpu = os.cpu_count() or 1
    ap.add_argument("--proxy-cpus", default=str(ncpu - 1) if ncpu > 1 else None)
    ap.add_argument("--load-cpus", default=",".join(str(i) for i in range(max(1, ncpu - 1))) if ncpu > 1 else None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "client":
        _run_client(args.target, args.flows, args.seconds, args.max_datagrams)
        return 0
    if args.cmd == "backend":
        _run_backend(args.port_file)
        return 0

    raise_nofile(200_000)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if "nginx" in peers and not NGINX_STREAM_MODULE.exists():
        print(f"nginx stream module missing ({NGINX_STREAM_MODULE}): skipping nginx", file=sys.stderr)
        peers.remove("nginx")
    flows_list = [int(f) for f in args.flows.split(",")]
    workdir = Path(f"/tmp/bench-udp-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "backend.port"
    backend = Proc("backend", [sys.executable, "-m", "benchmarks.udp", "backend", "--port-file", str(port_file)],
                   workdir / "backend.log", cpus=args.load_cpus, env=python_env())  # fmt: skip
    runs: list[dict] = []
    memory: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline:
                raise BenchError(f"backend did not start:\n{backend.log_tail()}")
            time.sleep(0.05)
        target = int(port_file.read_text())
        _wait_udp(target, backend)
        procs: dict[str, tuple[Proc | None, int]] = {}
        for p in peers:
            if p == "direct":
                procs[p] = (None, target)
            elif p == "mesh":
                procs[p] = start_mesh(workdir, target, args.proxy_cpus)
            elif p == "nginx":
                procs[p] = start_nginx(workdir, target, args.proxy_cpus)
            else:
                raise BenchError(f"unknown peer {p!r}: expected direct, mesh, nginx")
        for r in range(args.repeat):
            for flows in flows_list:
                for p in peers:
                    res = run_client(procs[p][1], flows, args.seconds, args.max_datagrams, args.load_cpus)
                    res.update(peer=p, round=r)
                    runs.append(res)
                    print(f"round {r} {p:<6} flows={flows:<3} {res['datagrams_per_s']:>10.0f} dgram/s "
                          f"rtt p50 {res['rtt_us']['p50']} us p99 {res['rtt_us']['p99']} us lost {res['lost']}",
                          flush=True)  # fmt: skip
        for proc, _ in procs.values():
            if proc is not None:
                proc.stop()
        # memory per idle session: a fresh proxy each
        for p in peers:
            if p == "direct":
                continue
            proc, port = (start_mesh if p == "mesh" else start_nginx)(workdir, target, args.proxy_cpus)
            try:
                memory[p] = idle_session_memory(proc, port, args.sessions)
                print(f"{p}: {memory[p]['bytes_per_session']} bytes per idle session "
                      f"({memory[p]['answered']} of {args.sessions} answered)", flush=True)  # fmt: skip
            finally:
                proc.stop()
    finally:
        backend.stop()

    summary: dict[str, dict] = {}
    for flows in flows_list:
        direct_p50 = [x["rtt_us"]["p50"] for x in runs if x["peer"] == "direct" and x["flows"] == flows]
        for p in peers:
            mine = [x for x in runs if x["peer"] == p and x["flows"] == flows]
            entry = {
                "datagrams_per_s": _median_spread([x["datagrams_per_s"] for x in mine]),
                "rtt_p50_us": _median_spread([x["rtt_us"]["p50"] for x in mine]),
                "rtt_p99_us": _median_spread([x["rtt_us"]["p99"] for x in mine]),
                "lost": sum(x["lost"] for x in mine),
            }
            if direct_p50 and p != "direct":
                entry["added_latency_p50_us"] = round(
                    statistics.median(x["rtt_us"]["p50"] for x in mine) - statistics.median(direct_p50), 1
                )
            summary[f"{p}/flows={flows}"] = entry
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "mesh", "benchmarks/udp.py"],
                                capture_output=True, text=True, cwd=REPO).stdout.strip())  # fmt: skip
    settings = {
        "seconds": args.seconds, "repeat": args.repeat, "payload_bytes": len(PAYLOAD), "loss_timeout_s": LOSS_TIMEOUT,
        "proxy_cpus": args.proxy_cpus, "load_cpus": args.load_cpus, "peers": peers,
        "mesh": "one process, uvloop, default options (udp_balance hash)",
        "nginx": "stream, 1 worker, proxy_timeout 30s",
    }  # fmt: skip
    doc = {
        "benchmark": "udp",
        "commit": commit,
        "dirty": dirty,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": settings,
        "summary": summary,
        "idle_session_memory": memory,
        "runs": runs,
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"udp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
