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


def test_sigterm_tears_the_lab_down():
    proc, name, dockerd = _start_child()
    assert dockerlab.leftovers(name) != []
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert _gone(dockerd)
    assert dockerlab.leftovers(name) == []
    assert not dockerlab.guard_route_present() or dockerlab.guard_route_needed()


def test_sigkill_leftovers_are_removed_by_the_next_lab():
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
    assert not dockerlab.guard_route_present() or dockerlab.guard_route_needed()
