"""The benchmark harness: its pure parts table-driven, and one tiny real run (quick mode, 1 repeat, 1 s loads)
that must produce a result JSON with the expected fields."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.proc import BenchError, parse_cpus
from benchmarks.run import Workload, _pin_layout, parse_workloads

REPO = Path(__file__).resolve().parent.parent


# -- pure parts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["ka-100b-c64"], [Workload("ka-100b-c64", "ka", "100b", 64)]),
        (
            ["churn-16k-c8,idle-300"],
            [Workload("churn-16k-c8", "churn", "16k", 8), Workload("idle-300", "idle", "100b", 300)],
        ),
        (
            ["metrics-1m-c2", "convergence"],
            [Workload("metrics-1m-c2", "metrics", "1m", 2), Workload("convergence", "convergence")],
        ),
        (["latency", "ka-100b-c1"], [Workload("ka-100b-c1", "ka", "100b", 1)]),  # duplicates collapse
        (["churn"], [Workload("churn-100b-c64", "churn", "100b", 64)]),
    ],
)
def test_parse_workloads(items, expected):
    assert parse_workloads(items) == expected


def test_workload_groups_cover_the_issue():
    names = [w.name for w in parse_workloads(["all"])]
    assert names[:9] == [f"ka-{s}-c{c}" for s in ("100b", "16k", "1m") for c in (1, 64, 512)]
    assert names[9:] == ["churn-100b-c64", "idle-10000", "metrics-100b-c64", "metrics-16k-c64", "convergence"]


@pytest.mark.parametrize("bad", ["ka-2k-c64", "ka-100b-c0", "idle-x", "nope", "ka-100b"])
def test_parse_workloads_rejects(bad):
    with pytest.raises(BenchError, match=repr(bad)):
        parse_workloads([bad])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("none", (None, None, None)), ("0:1:", ("0", "1", None)), ("::0-1", (None, None, "0-1"))],
)
def test_pin_layout(text, expected):
    assert _pin_layout(text) == expected


def test_pin_layout_rejects():
    with pytest.raises(BenchError, match="LOAD:PROXY:BACKEND"):
        _pin_layout("0:1")


@pytest.mark.parametrize(("text", "expected"), [("0", {0}), ("0,2", {0, 2}), ("1-3", {1, 2, 3}), ("0,2-3", {0, 2, 3})])
def test_parse_cpus(text, expected):
    assert parse_cpus(text) == expected


def test_parse_cpus_rejects():
    with pytest.raises(BenchError, match="'a-b'"):
        parse_cpus("a-b")


def _run(wl: str, peer: str, rep: int, rps: float, p50: float = 1.0, p99: float = 2.0) -> dict:
    return {"workload": wl, "peer": peer, "rep": rep, "rps": rps, "p50_ms": p50, "p99_ms": p99, "tool": "wrk"}


RUNS = [
    _run("ka-100b-c64", "direct", 0, 100.0),
    _run("ka-100b-c64", "direct", 1, 120.0),
    _run("ka-100b-c64", "direct", 2, 110.0),
    _run("ka-100b-c64", "mesh-1", 0, 60.0, p99=3.0),
    _run("ka-100b-c64", "mesh-1", 1, 66.0, p99=5.0),
    _run("ka-100b-c64", "mesh-1", 2, 63.0, p99=4.0),
    _run("ka-100b-c64", "haproxy-256k", 0, 55.0),
    _run("ka-100b-c64", "haproxy-256k", 1, 60.0),
    _run("ka-100b-c64", "haproxy-256k", 2, 50.0),
    _run("ka-100b-c1", "direct", 0, 10.0, p50=0.020),
    _run("ka-100b-c1", "haproxy", 0, 8.0, p50=0.070),
    _run("ka-100b-c1", "mesh-1", 0, 7.0, p50=0.100),
]


def test_summarize_medians_and_spreads():
    s = report.summarize(RUNS)
    assert s["ka-100b-c64"]["direct"]["rps"] == {"median": 110.0, "min": 100.0, "max": 120.0, "n": 3}
    assert s["ka-100b-c64"]["mesh-1"]["p99_ms"] == {"median": 4.0, "min": 3.0, "max": 5.0, "n": 3}
    assert "rep" not in s["ka-100b-c64"]["mesh-1"] and "tool" not in s["ka-100b-c64"]["mesh-1"]


def test_ratios_and_added_latency():
    s = report.summarize(RUNS)
    r = report.ratios(s, ["mesh-1"])
    assert r["ka-100b-c64"]["mesh-1"] == {"direct": round(63 / 110, 3), "haproxy-256k": round(63 / 55, 3)}
    assert report.added_latency(s) == {"haproxy": 0.05, "mesh-1": 0.08}


def test_targets():
    t = {x["name"]: x for x in report.check_targets(report.summarize(RUNS))}
    hp = t["mesh-1 / haproxy-256k req/s, ka-100b-c64"]
    assert (hp["value"], hp["ok"]) == (round(63 / 55, 4), True)
    lat = t["mesh-1 p50 - haproxy p50 at 1 connection (ms)"]
    assert (lat["value"], lat["ok"]) == (0.03, False)
    assert not any("pproxy" in name for name in t)  # no data, no verdict


def test_compare_flags_only_beyond_noise():
    old = {"commit": "a", "date": "d", "settings": {"peers": ["direct", "mesh-1"]}, "summary": report.summarize(RUNS)}
    # mesh-1 median 63 -> 50 (-21%) while its spread is 6/63 = 9.5%: a regression.  direct 110 -> 105 (-4.5%)
    # is inside its 18% spread.
    worse = [
        dict(r, rps=r["rps"] - 13) if r["peer"] == "mesh-1" and r["workload"] == "ka-100b-c64" else r for r in RUNS
    ]
    worse = [
        dict(r, rps=r["rps"] - 5) if r["peer"] == "direct" and r["workload"] == "ka-100b-c64" else r for r in worse
    ]
    new = {"commit": "b", "settings": {"peers": ["direct", "mesh-1"]}, "summary": report.summarize(worse)}
    _lines, regressions = report.compare(new, old)
    assert len(regressions) == 1
    assert regressions[0].startswith("ka-100b-c64      mesh-1             rps")
    same = {"commit": "c", "settings": {"peers": ["direct", "mesh-1"]}, "summary": report.summarize(RUNS)}
    assert report.compare(same, old)[1] == []


# -- a real run -----------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_quick_run_writes_result_json(tmp_path):
    """direct, the mesh and (when installed) HAProxy; one keep-alive workload and a small idle one."""
    peers = ["direct", "mesh-1"] + (["haproxy"] if shutil.which("haproxy") else [])
    argv = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--repeat",
        "1",
        "--duration",
        "1",
        "--workloads",
        "ka-100b-c8",
        "idle-200",
        "--peers",
        ",".join(peers),
        "--out",
        str(tmp_path),
        "--no-install",
        "--no-plot",
    ]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, res.stdout
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == report.SCHEMA
    assert set(doc) >= {
        "date",
        "commit",
        "dirty",
        "command",
        "machine",
        "settings",
        "skipped",
        "runs",
        "summary",
        "ratios",
        "added_latency_ms",
        "targets",
    }
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["versions"]["python"]
    assert doc["skipped"] == {}
    ka = doc["summary"]["ka-100b-c8"]
    assert set(ka) == set(peers)
    for peer in peers:
        assert ka[peer]["rps"]["median"] > 0
        assert ka[peer]["errors"]["median"] == 0
        assert 0 < ka[peer]["p50_ms"]["median"] <= ka[peer]["p99_ms"]["median"]
    assert doc["ratios"]["ka-100b-c8"]["mesh-1"]["direct"] > 0
    idle = doc["summary"]["idle-200"]
    assert set(idle) == set(peers) - {"direct"}
    for m in idle.values():
        assert m["connections"]["median"] == 200
    assert "requests/s: median" in res.stdout
