"""What one subscriber's apply of a delta costs, in-process: ``python -m benchmarks.cluster_apply``.

The same synthetic cluster as ``benchmarks.cluster_scale`` (N nodes, T tasks in T/50 services, the same change mix);
the answers are the control server's own bodies (``ControlServer._answer``: deltas, gzip), and each subscriber is
the real ``ControlClient`` answer handling (``_receive``: gunzip, JSON, delta, digest check) plus ``_apply`` and the
agent's ``Localizer``, without sockets.  ``--heap K`` runs K subscribers (K nodes' states in one heap, as a
simulation process holds 250) that each apply every delta in turn, to show what a crowded heap costs per apply.

    python -m benchmarks.cluster_apply --nodes 1000 --tasks 5000 --heap 1 --changes 200
    python -m benchmarks.cluster_apply --heap 250 --changes 40
    python -m benchmarks.cluster_apply --profile 30          # cProfile, the 30 costliest functions

Prints CPU per applied delta (``time.process_time``) and, with ``--json``, writes it as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import pstats
import sys
import time
from pathlib import Path


def _answer(server, after: str):
    from cluster.control import _Answer

    body, _ = server._answer(after, True, True)
    headers = {"content-encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {}
    return _Answer(200, headers, body)


async def run(nodes: int, tasks: int, heap: int, changes: int, seed: int, profile: int, gc_on: bool) -> dict:
    from benchmarks.cluster_scale import Case, SyntheticCluster, _EveryTaskLocal
    from cluster.control import ControlClient, ControlServer
    from cluster.state import Localizer

    case = Case(subscribers=nodes, tasks=tasks, seed=seed).resolved()
    sim = SyntheticCluster(case, {"node00000": 9})
    server = ControlServer("t", "127.0.0.1", 0)
    local = _EveryTaskLocal()
    clients = []
    applied = [0]
    for i in range(heap):
        node = f"node{(i * max(1, nodes // heap)) % nodes:05d}"
        loc = Localizer()

        def on_state(state, node=node, loc=loc) -> None:
            loc(state, node, local, ())
            applied[0] += 1

        clients.append(ControlClient([("127.0.0.1", 1)], "t", on_state))
    state = sim.state()
    server.publish(state)
    snap = _answer(server, "")
    for c in clients:
        await c._apply(c._receive(snap))
    gc.collect()
    gc.freeze()
    if not gc_on:
        gc.disable()
    answers = []
    for _ in range(changes):
        after = server._digest
        sim.change()
        server.publish(sim.state())
        answers.append(_answer(server, after))
    applied[0] = 0
    prof = cProfile.Profile(time.process_time) if profile else None
    cpu0 = time.process_time()
    if prof is not None:
        prof.enable()
    for ans in answers:
        for c in clients:
            await c._apply(c._receive(ans))
    if prof is not None:
        prof.disable()
    cpu = time.process_time() - cpu0
    gc.enable()
    out = {"nodes": nodes, "tasks": tasks, "heap": heap, "changes": changes, "applied": applied[0],
           "gc": gc_on, "cpu_per_apply_s": round(cpu / max(1, applied[0]), 7),
           "bytes_per_answer": round(sum(len(a.body) for a in answers) / max(1, len(answers)))}  # fmt: skip
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(profile)
        out["profile"] = s.getvalue()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cluster_apply", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--heap", type=int, default=1, help="subscribers in this process (each applies every delta)")
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="print the N costliest functions (cProfile, tottime)")
    ap.add_argument("--no-gc", action="store_true", help="collector disabled while measuring")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    if min(args.nodes, args.tasks, args.heap, args.changes) < 1:
        ap.error("--nodes, --tasks, --heap and --changes must be >= 1")
    res = asyncio.run(run(args.nodes, args.tasks, args.heap, args.changes, args.seed, args.profile, not args.no_gc))
    prof = res.pop("profile", None)
    print(json.dumps(res))
    if prof:
        print(prof)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
