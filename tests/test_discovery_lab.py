"""The engine harness cleans up after itself: after SIGTERM, and after SIGKILL (next run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import dockerlab

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent

# Starts a lab with one node and a running container, prints its name, then waits to be killed.
CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from tests.dockerlab import DockerLab
lab = DockerLab()
node = lab.node(1)
node.docker("run", "-d", lab.image_id, "sleep", "600")
print(lab.name, node.pid(), flush=True)
time.sleep(600)
"""


def _start_child() -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"child lab did not start: {err[-2000:]}")
    return proc, line[0], int(line[1])


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(autouse=True)
def _needs_lab():
    reason = dockerlab.lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # the children run labs of their own: this process's lab (if any) steps aside
    dockerlab.close_shared_lab()


def test_sigterm_tears_the_lab_down():
    guard_before = dockerlab.guard_route_present()
    proc, name, dockerd = _start_child()
    assert dockerlab.leftovers(name) != []
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert _gone(dockerd)
    assert dockerlab.leftovers(name) == []
    # the guard route goes away with the lab that added it (one that was there before stays)
    assert dockerlab.guard_route_present() == (guard_before or dockerlab.guard_route_needed())


def test_a_second_lab_waits_for_the_first():
    proc, name, _ = _start_child()
    try:
        t0 = time.monotonic()
        waiter = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
             "from tests.dockerlab import DockerLab\nlab = DockerLab(); print('got it', flush=True); lab.close()"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.5)
        assert waiter.poll() is None  # still waiting for the first lab
        proc.send_signal(signal.SIGTERM)
        out, err = waiter.communicate(timeout=60)
        assert out.strip() == "got it"
        assert "waiting for the Docker lab of pid" in err
        assert time.monotonic() - t0 >= 1.5
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert dockerlab.leftovers(name) == []


def test_sigkill_leftovers_are_removed_by_the_next_lab():
    guard_before = dockerlab.guard_route_present()
    proc, name, dockerd = _start_child()
    proc.kill()
    proc.communicate(timeout=10)
    # dockerd runs in its own session: it survives its parent
    assert os.path.exists(f"/proc/{dockerd}")
    assert dockerlab.leftovers(name) != []
    removed = dockerlab.cleanup_stale_labs()
    assert name in removed
    assert _gone(dockerd)
    assert dockerlab.leftovers(name) == []
    # the guard route goes away with the lab that added it (one that was there before stays)
    assert dockerlab.guard_route_present() == (guard_before or dockerlab.guard_route_needed())
