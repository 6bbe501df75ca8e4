"""Convergence: how long from a Docker event until the mesh serves the new routing table.

A real dockerd runs in its own network namespace (tests/dockerlab.py, needs root); the mesh follows it with
``mesh run --docker``.  One container keeps the service alive; then, per sample, a new replica starts (the
engine's ``State.StartedAt`` is the event time) and the admin API's ``/v1/table`` is polled until the data plane
reports runtime state for the new endpoint ("up"); the replica is killed (``State.FinishedAt``) and polled until
its endpoint is gone or draining ("down").  Polling every ~2 ms bounds the resolution; both clocks are this
machine's wall clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.proc import LOOPBACK, BenchError, Proc, free_port, python_env

POLL = 0.002


def lab_unavailable() -> str | None:
    """None when a Docker lab can start here, else why not."""
    try:
        from tests.dockerlab import lab_unavailable_reason
    except ImportError as exc:
        return f"tests/dockerlab.py cannot be imported ({exc})"
    import shutil

    for tool in ("dockerd", "docker", "nsenter", "ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test installs docker.io, iproute2, iptables)"
    return lab_unavailable_reason()


def _ns(rfc3339: str) -> int:
    """Docker's "2026-11-27T21:20:00.123456789Z" -> ns since the epoch (datetime keeps only microseconds)."""
    main, _, frac = rfc3339.rstrip("Z").partition(".")
    base = datetime.fromisoformat(main + "+00:00")
    return int(base.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


def _table(admin: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{admin}/v1/table", timeout=2) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _endpoints(doc: dict[str, Any] | None, port: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for svc in (doc or {}).get("services", []):
        for route in svc.get("routes", []):
            if route.get("port") == port:
                for ep in route.get("endpoints", []):
                    out[ep["id"]] = ep
    return out


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.time_ns()
        time.sleep(POLL)
    raise BenchError(f"convergence: timed out after {timeout}s waiting for {what}")


def measure_convergence(samples: int, log: Callable[[str], None], workdir: Path) -> dict[str, list[float]]:
    """Start a lab engine and the mesh, measure ``samples`` up and down convergences (ms)."""
    from tests.dockerlab import IMAGE, DockerLab, LabError

    lab = DockerLab()
    mesh: Proc | None = None
    try:
        t0 = time.monotonic()
        node = lab.node(1)
        log(f"  convergence: lab engine up in {time.monotonic() - t0:.1f}s ({node.host})")
        port, admin_port = free_port(), free_port()
        admin = f"http://{LOOPBACK}:{admin_port}"
        labels = ["--label", f"mesh.publish={port}:8080", "--label", "mesh.service=conv"]
        run = ["run", "-d", *labels, IMAGE, "httpd", "-f", "-p", "8080", "-h", "/"]
        base = node.docker(*run)
        mesh = Proc(
            "mesh-1 (docker)",
            [
                sys.executable,
                "-m",
                "meshagent",
                "run",
                "--docker",
                node.host,
                "--admin",
                f"{LOOPBACK}:{admin_port}",
                "--log-level",
                "warning",
            ],
            workdir / "mesh-convergence.log",
            env=python_env(),
        )
        _wait(lambda: base in _endpoints(_table(admin), port), 60, "the first replica in the mesh's table")
        up: list[float] = []
        down: list[float] = []
        for i in range(samples):
            cid = node.docker(*run)
            t_up = _wait(
                lambda cid=cid: (_endpoints(_table(admin), port).get(cid) or {}).get("runtime") is not None,
                30,
                f"replica {i + 1} in the table",
            )
            started = _ns(node.docker("inspect", "-f", "{{.State.StartedAt}}", cid))
            up.append((t_up - started) / 1e6)
            node.docker("kill", cid)

            def gone(cid: str = cid) -> bool:
                ep = _endpoints(_table(admin), port).get(cid)
                return ep is None or ep.get("state") == "draining" or bool((ep.get("runtime") or {}).get("draining"))

            t_down = _wait(gone, 30, f"replica {i + 1} to leave the table")
            finished = _ns(node.docker("inspect", "-f", "{{.State.FinishedAt}}", cid))
            down.append((t_down - finished) / 1e6)
            node.docker("rm", "-f", cid, check=False)
            log(f"  convergence sample {i + 1}/{samples}: up {up[-1]:.1f} ms, down {down[-1]:.1f} ms")
        return {"up": up, "down": down}
    except (LabError, subprocess.SubprocessError) as exc:
        raise BenchError(f"convergence: {exc}") from exc
    finally:
        if mesh is not None:
            mesh.stop()
        lab.close()
