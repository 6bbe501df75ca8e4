"""``mesh demo``: the real command, end to end (replicas, the mesh, load, summary), and its argument checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshagent import demo

REPO = Path(__file__).resolve().parent.parent


def _demo(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshagent", "demo", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(120)
def test_demo_balances_over_three_replicas():
    res = _demo("--duration", "1.5", "--connections", "6", "--requests-per-connection", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    rows = dict(re.findall(r"^(replica-\d)\s+(\d+)\s+[\d.]+%", out, re.M))
    assert sorted(rows) == ["replica-1", "replica-2", "replica-3"], out
    counts = [int(v) for v in rows.values()]
    assert min(counts) > 0, out
    total = int(re.search(r"^(\d+) requests in [\d.]+s = (\d+) requests/s, 0 errors$", out, re.M).group(1))
    assert total == sum(counts)
    # Round robin over fresh connections: no replica gets more than half of the requests.
    assert max(counts) < total / 2, out
    assert re.search(r"^latency: p50 [\d.]+ ms\s+p90 [\d.]+ ms\s+p99 [\d.]+ ms", out, re.M), out
    # The progress lines (not a tty: one per second) name every replica.
    assert re.search(r"requests\s+\d+ req/s\s+replica-1 \d+\s+replica-2 \d+\s+replica-3 \d+", out), out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "--duration must be within 0..600"),
        (["--duration", "601"], "--duration must be within 0..600"),
        (["--connections", "0"], "--connections must be within 1..1000"),
        (["--requests-per-connection", "0"], "--requests-per-connection must be >= 1"),
        (["--replicas", "21"], "--replicas must be within 1..20"),
        (["--balance", "random"], "--balance must be round-robin, least-conn, p2c or hash; got 'random'"),
        (["--workers", "0"], "--workers must be within 1..64"),
    ],
)
def test_demo_rejects_bad_arguments(args, message, capsys):
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mesh demo: " + message), err
