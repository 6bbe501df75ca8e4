"""``mesh demo``: the real command, end to end (replicas, the mesh, load, summary), its live dashboard in a
real headless Chromium, and its argument checks."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshagent import demo
from tests.test_dashboard import REPLICAS, Page, browser  # noqa: F401  (browser: the fixture)

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


def _http_rows(out: str) -> dict[str, tuple[int, str]]:
    """replica -> (requests, the X-Forwarded-For column) from the --http summary."""
    rows = re.findall(r"^(replica-\d)\s+(\d+)\s+[\d.]+%  (\S.*?)\s+#*$", out, re.M)
    return {name: (int(n), seen) for name, n, seen in rows}


def _check_http_run(out: str, workers: int = 1) -> tuple[dict[str, int], int, dict[str, float]]:
    """What every --http run must show: 0 failed, every replica served and saw X-Forwarded-For 127.0.0.1 on
    every request, every keep-alive connection reached every replica, the rolling stop's steps in order and
    the stopped replica's last answer no later than its stop.  Returns (requests per replica, total, steps)."""
    assert re.search(r"^failed requests: 0$", out, re.M), out
    rows = _http_rows(out)
    assert sorted(rows) == ["replica-1", "replica-2", "replica-3"], out
    counts = {name: n for name, (n, _) in rows.items()}
    for n, seen in rows.values():
        assert n > 0 and seen == f"127.0.0.1 ({n})", out  # the client's address, on every request
    total = int(re.search(r"^(\d+) requests in [\d.]+s = \d+ requests/s$", out, re.M).group(1))
    assert total == sum(counts.values()), out
    conns = re.search(r"^(\d+) keep-alive client connections; each reached (.+?) of the 3 replicas", out, re.M)
    assert conns and conns.group(1) == "6" and conns.group(2) == "3", out  # one connection each, all replicas
    m = re.search(
        r"^rolling stop of replica-3: draining at ([\d.]+)s, drained at ([\d.]+)s, stopped at ([\d.]+)s, "
        r"removed from the table at ([\d.]+)s$",
        out,
        re.M,
    )
    assert m, out
    steps = dict(zip(("draining", "drained", "stopped", "removed"), map(float, m.groups()), strict=True))
    assert steps["draining"] <= steps["drained"] <= steps["stopped"] <= steps["removed"], out
    last = float(re.search(r"^replica-3 answered its last request at ([\d.]+)s$", out, re.M).group(1))
    assert last <= steps["stopped"], out
    # Round robin per request: replicas 1 and 2 take turns all along; each rebuild of the schedule (the
    # drain, the removal) may start it at a random place: at most one request apart per rebuild (and per
    # worker: each has its own schedule).
    assert abs(counts["replica-1"] - counts["replica-2"]) <= 2 * workers, out
    assert counts["replica-3"] < counts["replica-1"], out  # it left part way through
    return counts, total, steps


@pytest.mark.timeout(120)
def test_demo_http_balances_per_request_and_stops_a_replica_without_failures():
    res = _demo("--http", "--duration", "2.5", "--connections", "6")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "(http, round-robin, 1 worker)" in out and "protocol: http" in out, out
    _, _, steps = _check_http_run(out)
    # Time-bound: the stop came at 40 % of 2.5 s (after the mesh reloaded its file), the load ran its 2.5 s.
    assert 1.0 <= steps["draining"] < 2.5, out
    assert float(re.search(r"^\d+ requests in ([\d.]+)s", out, re.M).group(1)) >= 2.5, out
    # The progress lines and the steps of the rolling stop as they happened.
    for step in ("draining (the config file says so; SIGHUP)", "drained, no request in flight to it",
                 "stopped (its process closed its socket); it held 0 requests unanswered",
                 "removed from the table"):  # fmt: skip
        assert re.search(r"^\s*[\d.]+s  replica-3: " + re.escape(step) + "$", out, re.M), out


@pytest.mark.timeout(120)
def test_demo_http_load_is_bounded_by_count():
    # --workers 2: the drain is waited for until every worker applied it (the admin API's applied version)
    res = _demo("--http", "--duration", "60", "--max-requests", "3000", "--connections", "6", "--workers", "2",
                "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "(http, round-robin, 2 workers)" in out, out
    counts, total, steps = _check_http_run(out, workers=2)
    assert total == 3000, out  # exactly the budget: every request sent was answered
    # the stop began at 40 % of the requests (1200), long before 40 % of the 60 s
    assert counts["replica-3"] >= 1200 // 3 and steps["draining"] < 24, out
    assert float(re.search(r"^\d+ requests in ([\d.]+)s", out, re.M).group(1)) < 60, out


@pytest.mark.timeout(120)
def test_demo_http_without_a_drain_fails_the_requests_the_replica_held():
    """The contrast that makes the drain the reason for 0 failures: the same stop without one, at a moment the
    replica holds requests (POSTs, never retried by the mesh), fails at least those."""
    res = _demo("--http", "--no-drain", "--duration", "2", "--connections", "6", "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    held = int(
        re.search(
            r"replica-3: stopped \(its process closed its socket, NOT drained first\); it held (\d+) ", out
        ).group(1)
    )
    failed = int(re.search(r"^failed requests: (\d+)$", out, re.M).group(1))
    assert held >= 1 and failed >= held, out
    assert re.search(r"^rolling stop of replica-3: NOT drained, stopped at [\d.]+s, removed from the table", out, re.M)


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
        (["--linger", "-1"], "--linger must be within 0..3600"),
        (["--max-requests", "0"], "--max-requests must be within 1..100000000"),
        (["--http", "--replicas", "1"], "--http needs --replicas >= 2 (one of them is stopped mid-run), got 1"),
        (["--no-drain"], "--no-drain goes with --http"),
    ],
)
def test_demo_rejects_bad_arguments(args, message, capsys):
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mesh demo: " + message), err


@pytest.mark.uvloop_only
@pytest.mark.timeout(120)
async def test_demo_prints_its_dashboard_and_keeps_it_live(tmp_path, browser):  # noqa: F811
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshagent", "demo", "--duration", "8", "--connections", "8", "--linger", "1",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    page = Page(browser)
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))).decode()
            assert line, "the demo ended before printing its dashboard: " + "".join(lines)
            lines.append(line)
            m = re.match(r"^dashboard: (http://127\.0\.0\.1:\d+/ui/) ", line)
            url = m and m.group(1)
        await page.run(browser.set_window_size, 1280, 720)
        await page.run(browser.get, url)
        shown = await page.wait(
            "const r = [...document.querySelectorAll('[data-replica]')].map(e => e.dataset.replica + ' ' + e.dataset.state);"
            " return r.length === 3 && r",
            what="the demo's three replicas",
        )
        assert sorted(shown) == [f"{r} running" for r in REPLICAS]
        # the load runs: the demo service's new connections/s is above 0 on the page
        await page.wait(
            'const e = document.querySelector(\'[data-service^="demo:"] .svc [data-field="cps"] .v\');'
            " return e && !['0', '\\u2013'].includes(e.textContent)",
            timeout=6,
            what="the demo's traffic on the page",
        )
        await asyncio.sleep(1.5)  # two more samples: rates over a full interval in the picture
        shot = tmp_path / "demo-dashboard.png"
        await page.run(browser.save_screenshot, str(shot))
        assert shot.stat().st_size > 10_000
        keep = os.environ.get("MESH_DEMO_SCREENSHOT")  # the README's picture: docs/img/dashboard.png
        if keep:
            shutil.copyfile(shot, keep)
        assert await page.errors() == []
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        text = "".join(lines) + out.decode()
        assert proc.returncode == 0, text + err.decode()
        assert "the dashboard stays live at " + url + " for 1s" in text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
