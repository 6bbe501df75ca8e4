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
            "const e = document.querySelector('[data-service^=\"demo:\"] .svc [data-field=\"cps\"] .v');"
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
