"""What the manager agent's ClusterWatcher asks of a real dockerd with a few hundred swarm tasks.

A single-node swarm in the test harness's own dockerd (tests/dockerlab.py), 6 services x 50 replicas (300 tasks,
plus the task history one forced update leaves), the watcher followed for ``SECONDS`` while nothing changes:
requests per second by kind, bytes read, and the engine time spent listing.  ``-s`` prints the numbers; with
``MESH_LISTINGS_OUT=FILE`` they are written as JSON, and with ``MESH_BEFORE_CLUSTER_PY=path/to/old/cluster.py``
the old watcher is measured in the same run (loaded as ``discovery._cluster_before``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from discovery.engine import Engine, resolve_docker_host
from tests import dockerlab
from tests.util import wait_for

# A measurement (300 containers take minutes on this 2-core machine), not a check CI needs on every run:
# it runs when asked for, e.g. `MESH_LISTINGS_LAB=1 pytest -m docker -s tests/test_cluster_listings_lab.py`.
pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not os.environ.get("MESH_LISTINGS_LAB"),
        reason="a measurement with 300 swarm tasks (minutes): set MESH_LISTINGS_LAB=1 to run it",
    ),
]
docker_lab = dockerlab.docker_lab  # the session fixture

SERVICES = 6
REPLICAS = 50
SECONDS = 8.0


class CountingEngine(Engine):
    """The real engine client, counting each call and the bytes of its JSON answer."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.busy = 0.0

    async def _count(self, kind: str, coro) -> Any:
        t = time.perf_counter()
        out = await coro
        self.busy += time.perf_counter() - t
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + len(json.dumps(out))
        return out

    async def tasks(self, filters=None):
        return await self._count("tasks", super().tasks(filters))

    async def service(self, service_id):
        return await self._count("service", super().service(service_id))

    async def services(self, filters=None):
        return await self._count("services", super().services(filters))

    async def nodes(self, filters=None):
        return await self._count("nodes", super().nodes(filters))

    async def containers(self, filters=None, *, all=False):
        return await self._count("containers", super().containers(filters, all=all))


def _watcher_classes() -> dict[str, type]:
    from discovery.cluster import ClusterWatcher

    out: dict[str, type] = {"after": ClusterWatcher}
    before = os.environ.get("MESH_BEFORE_CLUSTER_PY")
    if before:
        spec = importlib.util.spec_from_file_location("discovery._cluster_before", before)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out = {"before": mod.ClusterWatcher, **out}
    return out


async def _measure(node, cls: type) -> dict[str, Any]:
    engine = CountingEngine(resolve_docker_host(f"unix://{node.sock}", {}))
    states: list[Any] = []
    w = cls(engine, states.append, tunnel_port=7481)
    run = asyncio.create_task(w.run())
    try:
        await wait_for(lambda: w.state is not None, timeout=60, what="first state")
        routed = sum(len(r.endpoints) for _, r in w.state.table.routes())
        engine.calls.clear()
        engine.bytes.clear()
        engine.busy = 0.0
        t0 = time.monotonic()
        await asyncio.sleep(SECONDS)
        elapsed = time.monotonic() - t0
    finally:
        w.stop()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await engine.close()
    return {
        "routed_endpoints": routed,
        "seconds": round(elapsed, 2),
        "requests_per_s": {k: round(v / elapsed, 2) for k, v in sorted(engine.calls.items())},
        "bytes_per_s": round(sum(engine.bytes.values()) / elapsed),
        "engine_busy_share": round(engine.busy / elapsed, 4),
        "publishes": len(states) - 1,
    }


async def test_task_poll_against_a_real_dockerd_with_hundreds_of_tasks(docker_lab) -> None:
    node = docker_lab.node(2)
    docker_lab.swarm_init(2)
    names = [f"lst{i}" for i in range(SERVICES)]
    try:
        for i, name in enumerate(names):
            await asyncio.to_thread(
                node.docker, "service", "create", "--detach", "--name", name, "--replicas", str(REPLICAS),
                "--label", f"mesh.publish={9100 + i}:80", "--no-resolve-image", "--stop-grace-period", "1s",
                docker_lab.image_id, "sleep", "3600", timeout=120,
            )  # fmt: skip

        def running() -> int:
            out = node.docker("service", "ls", "--format", "{{.Replicas}}", timeout=60)
            return sum(int(line.split("/")[0]) for line in out.split())

        deadline = time.monotonic() + 400
        while (n := await asyncio.to_thread(running)) < SERVICES * REPLICAS:
            assert time.monotonic() < deadline, f"only {n} tasks running"
            await asyncio.sleep(3)
        # task history, as a cluster that has seen updates has: every slot of one service replaced once
        await asyncio.to_thread(node.docker, "service", "update", "--detach", "--force", "--update-parallelism",
                                "0", names[0], timeout=120)  # fmt: skip
        deadline = time.monotonic() + 300
        while (n := await asyncio.to_thread(running)) < SERVICES * REPLICAS:
            assert time.monotonic() < deadline, f"only {n} tasks running after the update"
            await asyncio.sleep(3)
        await asyncio.sleep(3)  # the old tasks have stopped
        async with Engine(resolve_docker_host(f"unix://{node.sock}", {})) as e:
            all_tasks = len(await e.tasks())  # running ones and the history
        results = {}
        for label, cls in _watcher_classes().items():
            results[label] = await _measure(node, cls)
        results["tasks_in_swarm"] = all_tasks
        print(json.dumps(results, indent=2))
        after = results["after"]
        assert after["routed_endpoints"] == SERVICES * REPLICAS
        assert after["requests_per_s"].get("service", 0) == 0
        assert after["requests_per_s"]["tasks"] <= 1.3  # one listing per task_poll (1 s)
        if "before" in results:
            assert after["bytes_per_s"] < results["before"]["bytes_per_s"]
        out = os.environ.get("MESH_LISTINGS_OUT")
        if out:
            meta = {"benchmark": "cluster_scale_listings", "services": SERVICES, "replicas": REPLICAS,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
            text = json.dumps({**meta, **results}, indent=2) + "\n"
            await asyncio.to_thread(Path(out).write_text, text)
    finally:
        ids = node.docker("service", "ls", "-q", check=False).split()
        if ids:
            node.docker("service", "rm", *ids, check=False, timeout=120)
