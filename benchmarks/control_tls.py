"""The control channel's cost with and without TLS, in one process on loopback (uvloop).

    flock /tmp/mesh-bench.lock python -m benchmarks.control_tls [--polls 2000] [--connects 200] [--rounds 3]

Per round, interleaved plain / TLS: ``polls`` answered long-polls (``wait=0`` at the current digest: 204)
on one kept-alive connection, and ``connects`` new connections each carrying one poll (for TLS: one
handshake each).  Client and server share the loop, so the figures are the CPU of both sides per poll.
Writes benchmarks/results/control-tls-<date>-<rev>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trustme
import uvloop

from cluster.control import ControlClient, ControlServer, ControlTLS
from cluster.state import ClusterState, NodeInfo
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions

TOKEN = "0123456789abcdef0123456789abcdef"
RESULTS = Path(__file__).resolve().parent / "results"


def _state() -> ClusterState:
    services = tuple(
        Service(name=f"s{i}", routes=(Route(port=8000 + i, endpoints=(Endpoint(f"t{i}", "172.18.0.2", 80, node="n1"),)),),
                options=ServiceOptions())
        for i in range(50)
    )  # fmt: skip
    return ClusterState(table=RoutingTable(version=1, services=services), nodes=(NodeInfo("n1", "10.0.0.1"),))


async def _round(tls: ControlTLS | None, polls: int, connects: int) -> dict[str, float]:
    srv = ControlServer(TOKEN, "127.0.0.1", 0, state=_state(), tls=tls.server_context() if tls else None)
    await srv.start()
    addr = srv.address
    cli = ControlClient([addr], TOKEN, lambda s: None, wait=0, tls=tls)
    try:
        assert await cli._poll(addr) is not None  # the snapshot; then every poll is a 204
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(polls):
            await cli._poll(addr)
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(connects):
            cli._disconnect()
            await cli._poll(addr)
        t2, c2 = time.perf_counter(), time.process_time()
    finally:
        cli._disconnect()
        await srv.stop()
    return {
        "poll_us": (t1 - t0) / polls * 1e6,
        "poll_cpu_us": (c1 - c0) / polls * 1e6,
        "connect_poll_us": (t2 - t1) / connects * 1e6,
        "connect_poll_cpu_us": (c2 - c1) / connects * 1e6,
    }


async def main(args: argparse.Namespace) -> dict:
    d = Path(tempfile.mkdtemp())
    ca = trustme.CA()
    leaf = ca.issue_cert("mesh-control")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    tls = ControlTLS(str(d / "ca.pem"), str(d / "cert.pem"), str(d / "key.pem"))
    rounds: dict[str, list[dict[str, float]]] = {"plain": [], "tls": []}
    for _ in range(args.rounds):
        rounds["plain"].append(await _round(None, args.polls, args.connects))
        rounds["tls"].append(await _round(tls, args.polls, args.connects))
    medians = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rounds.items()}
    return {"rounds": rounds, "medians": medians}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--polls", type=int, default=2000)
    p.add_argument("--connects", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    out = uvloop.run(main(a))
    rev = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "cluster"], capture_output=True, text=True).stdout
    out["command"] = f"python -m benchmarks.control_tls --polls {a.polls} --connects {a.connects} --rounds {a.rounds}"
    out["commit"] = rev + ("-dirty" if dirty.strip() else "")
    out["note"] = "one process, client and server on one uvloop, loopback; machine shared with other work (noisy)"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"control-tls-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{out['commit']}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["medians"], indent=1))
    print(path)
