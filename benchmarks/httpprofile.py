"""Where the HTTP front spends its CPU: the mesh in this process under cProfile, wrk against it.

    flock /tmp/mesh-bench.lock python -m benchmarks.httpprofile [--seconds 5] [--conns 64] [--size 100b]
                                                                  [--top 25] [--out FILE.prof] [--no-profile]

One ``protocol: http`` service with two replicas of the benchmark backend (nginx, 1 worker, or the uvloop
responder: ``benchmarks/backend.py``), every HTTP option at its default, uvloop; wrk ``-t1 -c<conns>`` for
``--seconds`` (bounded: wrk's own ``-d`` and a hard timeout).  Prints wrk's requests/s, the CPU this process used
per request, and the top functions by own time (tottime) and by cumulative time.  cProfile slows the loop down
(every Python call is counted), so compare its shares, not its rates, and rely on ``--no-profile`` (the same run
without the profiler) or the suite (``python -m benchmarks.run --suite http``) for the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from benchmarks.backend import SIZES, make_backend
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import Mesh

_REQS = re.compile(r"Requests/sec:\s+([\d.]+)")
_TOTAL = re.compile(r"(\d+) requests in")


def _cpu() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


async def _run(args: argparse.Namespace, replicas: list[tuple[str, int]], prof: cProfile.Profile | None) -> dict:
    mesh = Mesh()
    eps = tuple(Endpoint(f"r{i}", h, p) for i, (h, p) in enumerate(replicas))
    svc = Service("bench", (Route(0, eps, "127.0.0.1", protocol="http"),), ServiceOptions())
    await mesh.apply(RoutingTable(1, (svc,)))
    port = mesh.listeners()[0].port
    url = f"http://127.0.0.1:{port}/{args.size}"
    # A short warm-up (pools filled, code paths hot), then the measured run.
    warm = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{args.conns}", "-d1s", url, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    await asyncio.wait_for(warm.wait(), 30)
    cpu0 = _cpu()
    if prof is not None:
        prof.enable()
    wrk = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{args.conns}", f"-d{args.seconds}s", url, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(wrk.communicate(), args.seconds + 30)
    if prof is not None:
        prof.disable()
    user, system = (b - a for a, b in zip(cpu0, _cpu(), strict=True))
    await mesh.shutdown(1)
    text = out.decode()
    m, t = _REQS.search(text), _TOTAL.search(text)
    if m is None or t is None:
        raise SystemExit(f"wrk said:\n{text}")
    total = int(t.group(1))
    n = max(1, total)
    return {
        "req_s": float(m.group(1)),
        "requests": total,
        "cpu_s": user + system,
        "us_per_req": (user + system) / n * 1e6,
        "user_us": user / n * 1e6,
        "system_us": system / n * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--size", choices=sorted(SIZES), default="100b")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", help="write the raw profile here (pstats format)")
    ap.add_argument("--no-profile", action="store_true", help="the same run without cProfile")
    ap.add_argument("--backend", choices=["auto", "nginx", "uvloop"], default="auto")
    args = ap.parse_args(argv)
    if not 1 <= args.seconds <= 60:
        ap.error("--seconds: 1..60")
    if shutil.which("wrk") is None:
        ap.error("wrk is not installed (apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="mesh-httpprofile-"))
    backend = make_backend(args.backend, workdir, tags=["r0", "r1"])
    backend.start()
    prof = None if args.no_profile else cProfile.Profile()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            res = runner.run(_run(args, [backend.addrs["r0"], backend.addrs["r1"]], prof))
    finally:
        backend.stop()
    print(
        f"{'no profiler' if prof is None else 'under cProfile'}: {res['req_s']:.0f} req/s, "
        f"{res['requests']} requests, mesh CPU {res['cpu_s']:.2f} s = {res['us_per_req']:.1f} us/request "
        f"(user {res['user_us']:.1f}, system {res['system_us']:.1f})"
    )
    if prof is not None:
        if args.out:
            prof.dump_stats(args.out)
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf)
            st.strip_dirs().sort_stats(key).print_stats(args.top)
            body = buf.getvalue()
            print(f"--- top {args.top} by {key} ---")
            print(body[body.find("   ncalls") :].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
