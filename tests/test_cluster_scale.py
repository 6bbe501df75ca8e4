"""benchmarks.cluster_scale: its pure parts, and one real ``--quick`` run that must write the JSON other tools read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.cluster_scale import Case, SyntheticCluster, _latencies, _pct

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("apply_p99_s", "apply_max_s", "bytes_per_change", "resubscribe_s")


def test_latencies_take_the_first_apply_at_or_after_each_change() -> None:
    published = [(2, 10.0, "scale"), (3, 11.0, "scale"), (4, 11.005, "scale")]
    records = [
        [(1, 9.0), (2, 10.2), (4, 11.1)],  # skipped 3 (coalesced): 4 covers both
        [(2, 10.5)],  # never got 3 or 4
    ]
    samples, last, missing = _latencies(published, records)
    assert [round(s, 3) for s in samples] == [0.2, 0.1, 0.095, 0.5]
    assert [round(x, 3) for x in last] == [0.5, 0.1, 0.095]
    assert missing == 2
    assert _pct([1.0, 2.0, 3.0, 4.0], 0.5) in (2.0, 3.0) and _pct([5.0], 0.99) == 5.0


def test_synthetic_cluster_changes_like_a_swarm() -> None:
    case = Case(subscribers=20, tasks=200, seed=4).resolved()
    sim = SyntheticCluster(case, {"node00000": 4000})
    first = sim.state()
    assert sum(len(r.endpoints) for _, r in first.table.routes()) == 200 + 1  # + the probe replica
    assert len(first.nodes) == 20 and first.table.service("probe") is not None
    kinds = {sim.change() for _ in range(200)}
    assert {"scale", "rolling-update", "node-down"} <= kinds
    last = sim.state()
    assert last.version == first.version + 200 and last.digest != first.digest
    # the probe node never goes down: its data plane must keep its replica
    assert last.node_map()["node00000"].state == "ready"


def test_quick_run_writes_the_result_fields(tmp_path) -> None:
    out = tmp_path / "quick.json"
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster_scale", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout.decode()[-2000:] + r.stderr.decode()[-2000:]
    doc = json.loads(out.read_text())
    for f in FIELDS:
        assert isinstance(doc[f], (int, float)) and doc[f] >= 0, f
    assert doc["benchmark"] == "cluster_scale" and doc["quick"] is True
    assert doc["settled"] is True and doc["missing_applies"] == 0
    assert doc["dataplane_failed"] == 0 and doc["dataplane_requests"] > 0
    assert doc["apply_max_s"] >= doc["apply_p99_s"] > 0
    # deltas: a change costs a subscriber far less than the whole state
    assert doc["bytes_per_change"] < doc["state_bytes"] / 4
    assert "apply p99" not in r.stderr.decode()  # the table goes to stdout
    assert "resub s" in r.stdout.decode()
