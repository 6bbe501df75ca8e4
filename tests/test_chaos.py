"""The chaos runner's fast version (``python -m benchmarks.chaos --quick``) against the real agent.

Every fault runs with small counts under the runner's probe (a new connection every 5 ms through the published
tcp and http ports, replies compared byte for byte).  The faults that must not disturb the data plane must show
0 probe failures during the fault and after it; those that exhaust a shared resource by design (fd exhaustion,
worker kill/stop) must leave an agent that serves again without failures once the fault is over.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.chaos import FAULTS
from benchmarks.proc import REPO, python_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the runner reads /proc and uses prlimit")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("chaos") / "chaos.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.chaos", "--quick", "--out", str(out)],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    doc["_took"] = took
    doc["_stdout"] = proc.stdout
    return doc


def _faults(doc: dict) -> dict[str, dict]:
    return {f["name"]: f for f in doc["faults"]}


def test_every_quick_fault_ran(quick_report: dict) -> None:
    ran = _faults(quick_report)
    assert set(ran) == {n for n, f in FAULTS.items() if f.quick}
    for name, f in ran.items():
        assert "error" not in f, (name, f["error"])
        assert f["agent_alive"], name


@pytest.mark.parametrize("name", [n for n, f in FAULTS.items() if f.quick and f.must_pass])
def test_the_data_plane_probe_sees_no_failure(quick_report: dict, name: str) -> None:
    f = _faults(quick_report)[name]
    during, after = f["probe"], f["probe_after"]
    assert during["requests"] > 0, (name, during)
    assert during["failures"] == 0, (name, during, quick_report["_stdout"])
    assert after["failures"] == 0, (name, after)
    assert during["bytes_verified"] > 0


@pytest.mark.parametrize("name", [n for n, f in FAULTS.items() if f.quick and not f.must_pass])
def test_faults_by_design_leave_an_agent_that_serves_again(quick_report: dict, name: str) -> None:
    f = _faults(quick_report)[name]
    assert f["by_design"]
    assert f["probe_after"]["requests"] > 0 and f["probe_after"]["failures"] == 0, (name, f["probe_after"])


def test_replaced_workers(quick_report: dict) -> None:
    faults = _faults(quick_report)
    assert faults["worker-kill"]["detail"]["replaced_after_s"] is not None
    # the parent's liveness check: silent for 3 s -> killed and replaced
    assert faults["worker-stop"]["detail"]["replaced_after_s"] is not None


def test_config_faults_keep_the_last_table(quick_report: dict) -> None:
    faults = _faults(quick_report)
    for name in ("config-bad-file", "config-empty-services", "config-mid-write"):
        assert faults[name]["detail"]["last_table_kept_and_ready"], (name, faults[name]["detail"])


def test_the_quick_run_is_quick(quick_report: dict) -> None:
    assert quick_report["_took"] < 120, quick_report["_took"]  # about 55 s here; a bound, not a benchmark


def test_results_name_the_commit_and_command(quick_report: dict) -> None:
    assert quick_report["kind"] == "chaos" and quick_report["quick"] is True
    assert quick_report["commit"] and "--quick" in quick_report["command"]
    assert Path(REPO / "benchmarks" / "chaos.py").exists()


def test_a_client_that_resets_frees_its_pair(quick_report: dict) -> None:
    # clients that never read and then close (a reset, with unread bytes) leave no pair behind
    detail = _faults(quick_report)["client-never-read"]["detail"]
    assert detail["victim_active_3s_after_close"] == 0, detail
