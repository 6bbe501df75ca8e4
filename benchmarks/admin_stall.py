"""How long admin requests hold the data plane's event loop: ``python -m benchmarks.admin_stall``.

One process per side (this checkout, and with ``--old DIR`` an extracted older tree, e.g. ``git archive REV | tar
-x -C DIR``), run in turns (old, new, old, new ...): each builds the real ``mesh.runtime.Mesh`` with S services x E
endpoints (listeners on 127.0.0.1 port 0), its ``AdminServer``, and a ticker on the loop that wakes every
millisecond and records the longest gap between two wake-ups while curl (separate processes) fetches:
/metrics, /v1/table, /v1/dashboard, and all of them at once (/metrics twice).  The same ticker measures, as a
floor, the loop idle and the loop beside a thread of pure Python (the GIL changing hands).  Also ticked:
``Mesh.apply`` of the whole table on a fresh mesh (``apply_new``: every listener new), of a table whose every
endpoint changed (``apply``: 500 pools updated), and of one service of S x E endpoints replaced (``apply_one_pool``:
one ``Pool.update`` of them all), each with the longest pause of the cyclic collector during it.

    python -m benchmarks.admin_stall --old /tmp/old --rounds 5 --json benchmarks/results/admin-stall.json
    python -m benchmarks.admin_stall --old /tmp/old --apply-only --rounds 5 --turns 3 --json ...

Numbers on a shared machine are noisy: compare old and new of one run only (they are interleaved).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"metrics": ["/metrics"], "table": ["/v1/table"], "dashboard": ["/v1/dashboard"],
         "all": ["/metrics", "/metrics", "/v1/table", "/v1/dashboard"]}  # fmt: skip


def _curl(url: str) -> int:
    with tempfile.NamedTemporaryFile() as out:
        done = subprocess.run(["curl", "-s", "-o", out.name, "-w", "%{http_code}", "--max-time", "120", url],
                              capture_output=True, check=True)  # fmt: skip
        return int(done.stdout)


class Ticker:
    def __init__(self) -> None:
        self.max_gap = 0.0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.001)
            now = loop.time()
            self.max_gap = max(self.max_gap, now - last)
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0.01)
        self.max_gap = 0.0
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.003)  # one more wake-up: a stall that just ended is recorded
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _CollectorPauses:
    """The longest pause of the cyclic garbage collector while in the block (gc.callbacks)."""

    def __enter__(self) -> _CollectorPauses:
        self.longest, self._t0 = 0.0, 0.0
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._t0)


async def child(services: int, endpoints: int, rounds: int, apply_only: bool = False) -> dict:
    from mesh.admin import AdminServer, MeshState
    from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
    from mesh.runtime import Mesh

    def table(version: int, base: int) -> RoutingTable:
        return RoutingTable(version=version, services=tuple(
            Service(f"svc{i:04d}", (Route(port=0, listen_host="127.0.0.1", endpoints=tuple(
                Endpoint(id=f"svc{i:04d}-{j}", address="127.0.0.1", port=base + j, node="n1")
                for j in range(endpoints))),), ServiceOptions())
            for i in range(services)))  # fmt: skip

    def one_pool(version: int, base: int) -> RoutingTable:
        return RoutingTable(version=version, services=(Service("big", (Route(port=0, listen_host="127.0.0.1",
            endpoints=tuple(Endpoint(id=f"big-{j}", address="127.0.0.1", port=base + j, node="n1")
                            for j in range(services * endpoints))),), ServiceOptions()),))  # fmt: skip

    async def ticked(mesh: Mesh, t: RoutingTable) -> dict:
        yields = getattr(mesh, "apply_yields", 0)
        with _CollectorPauses() as gcp:
            async with Ticker() as tk:
                t0 = time.perf_counter()
                await mesh.apply(t)
                took = time.perf_counter() - t0
        return {"took": took, "gap": tk.max_gap, "collector": gcp.longest,
                "yields": getattr(mesh, "apply_yields", 0) - yields}  # fmt: skip

    applies, applies_new, applies_pool = [], [], []
    for k in range(rounds):  # a fresh mesh: every listener new (the first table of a process)
        fresh = Mesh()
        applies_new.append(await ticked(fresh, table(1, 20000 + 1000 * (k % 2))))
        await fresh.shutdown(0)
        fresh = Mesh()  # one service of S x E endpoints: one Pool of them all, then every endpoint replaced
        await fresh.apply(one_pool(1, 30000))
        applies_pool.append(await ticked(fresh, one_pool(2, 40000 + 1000 * (k % 2))))
        await fresh.shutdown(0)
    mesh = Mesh()
    await mesh.apply(table(1, 20000))
    for k in range(rounds):
        applies.append(await ticked(mesh, table(2 + k, 21000 + 1000 * (k % 2))))  # every endpoint new
    if apply_only:
        await mesh.shutdown(1.0)
        return {"services": services, "endpoints": services * endpoints, "apply": applies,
                "apply_new": applies_new, "apply_one_pool": applies_pool, "source": sys.modules[Mesh.__module__].__file__,
                "sliced_apply": hasattr(mesh, "apply_slice")}  # fmt: skip
    server = AdminServer(MeshState(mesh), port=0)
    await server.start()
    host, port = server.address
    from mesh import metrics

    out: dict = {"services": services, "endpoints": services * endpoints, "apply": applies,
                 "apply_new": applies_new, "apply_one_pool": applies_pool,
                 "source": metrics.__file__, "sliced_snapshot": hasattr(metrics, "snapshot_async")}  # fmt: skip
    try:
        for paths in PATHS.values():  # warm
            await asyncio.gather(*(asyncio.to_thread(_curl, f"http://{host}:{port}{p}") for p in paths))
        for name, paths in PATHS.items():
            gaps, took = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                async with Ticker() as t:
                    codes = await asyncio.gather(*(asyncio.to_thread(_curl, f"http://{host}:{port}{p}") for p in paths))
                assert codes == [200] * len(paths), codes
                gaps.append(t.max_gap)
                took.append(time.perf_counter() - t0)
            out[name] = {"gaps": gaps, "took": took}
        idle, busy = [], []
        for _ in range(rounds):
            async with Ticker() as t:
                await asyncio.sleep(0.3)
            idle.append(t.max_gap)
            async with Ticker() as t:
                await asyncio.to_thread(_busy, 0.3)
            busy.append(t.max_gap)
        out["idle"], out["busy_thread"] = {"gaps": idle}, {"gaps": busy}
    finally:
        await server.stop()
        await mesh.shutdown(1.0)
    return out


APPLIES = ("apply", "apply_new", "apply_one_pool")


def _summary(side: list[dict]) -> dict:
    out = {}
    for key in ("metrics", "table", "dashboard", "all", "idle", "busy_thread", *APPLIES):
        if key not in side[0]:
            continue
        if key in APPLIES:
            gaps = [a["gap"] for run in side for a in run[key]]
        else:
            gaps = [g for run in side for g in run[key]["gaps"]]
        out[key] = {"median_ms": round(statistics.median(gaps) * 1000, 1), "max_ms": round(max(gaps) * 1000, 1),
                    "min_ms": round(min(gaps) * 1000, 1), "n": len(gaps)}  # fmt: skip
        if key in APPLIES:
            for field in ("took", "collector"):
                xs = [a[field] for run in side for a in run[key]]
                out[key][f"{field}_median_ms"] = round(statistics.median(xs) * 1000, 1)
            out[key]["yields_median"] = statistics.median(a["yields"] for run in side for a in run[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=500)
    ap.add_argument("--endpoints", type=int, default=10, help="per service")
    ap.add_argument("--rounds", type=int, default=3, help="requests of each kind per process")
    ap.add_argument("--turns", type=int, default=2, help="processes per side, interleaved")
    ap.add_argument("--old", type=Path, help="an older source tree to compare with")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--apply-only", action="store_true", help="only the Mesh.apply measurements")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        sys.path.insert(0, str(args.child))
        import uvloop

        print(json.dumps(uvloop.run(child(args.services, args.endpoints, args.rounds, args.apply_only))))
        return
    sides = {"new": ROOT} | ({"old": args.old.resolve()} if args.old else {})
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for turn in range(args.turns):
        for name in sorted(sides, reverse=True):  # old first
            cmd = [sys.executable, "-m", "benchmarks.admin_stall", "--child", str(sides[name]),
                   "--services", str(args.services), "--endpoints", str(args.endpoints), "--rounds", str(args.rounds),
                   *(["--apply-only"] if args.apply_only else [])]  # fmt: skip
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": str(sides[name])})  # fmt: skip
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"turn {turn} {name}: done", file=sys.stderr)
    rev = subprocess.run(
        ["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "benchmark": "admin_stall",
        "commit": rev,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:],
        "load_average": os.getloadavg(),
        "threads": threading.active_count(),
        "summary": {name: _summary(side) for name, side in runs.items()},
        "runs": runs,
    }
    for name, side in runs.items():
        print(name, [r["source"] for r in side], [r.get("sliced_snapshot", r.get("sliced_apply")) for r in side])
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
