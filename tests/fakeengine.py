"""A scripted Docker Engine API server on a unix socket, for the discovery and cluster-agent tests.

It is a real aiohttp HTTP server that speaks the subset of Engine API 1.41 the
client uses, with state the test changes and events it emits (``emit``), and it
cuts its event streams the way a restarting dockerd does (``cut_streams``).
It makes the timing-sensitive paths deterministic; test_discovery_engine.py
runs the same code against a real dockerd.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeClock", "FakeContainer", "FakeEngine", "running_fake_engine", "settle"]


class FakeClock:
    """A monotonic clock that moves only when told (``advance``).  ``wall()`` is unix time that moves with
    it, for the engine's event timestamps and a watcher's ``wall``, so lags come out exact."""

    def __init__(self, now: float = 1000.0, wall_offset: float = 1_800_000_000.0) -> None:
        self.now = now
        self.wall_offset = wall_offset

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall_offset + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def settle(follower: Any, clock: FakeClock | None = None, seconds: float = 0.0, timeout: float = 5.0) -> None:
    """Move ``clock`` by ``seconds``, make ``follower`` (a ``discovery.follow.Follower``) look at its timers,
    and return once it waits again with nothing due: whatever those seconds make it do has been done."""
    if clock is not None:
        clock.advance(seconds)
    follower.wake()
    await asyncio.wait_for(follower.idle.wait(), timeout)


@dataclass
class FakeContainer:
    id: str
    name: str
    labels: dict[str, str]
    ip: str
    state: str = "running"
    health: str | None = None
    created: int = 1_700_000_000
    network: str = "bridge"

    def summary(self) -> dict[str, Any]:
        status = "Up 5 seconds"
        if self.health:
            status += " (health: starting)" if self.health == "starting" else f" ({self.health})"
        return {
            "Id": self.id,
            "Names": [f"/{self.name}"],
            "Labels": self.labels,
            "State": self.state,
            "Status": status,
            "Created": self.created,
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {"Networks": {self.network: {"NetworkID": "net-" + self.network, "IPAddress": self.ip}}},
        }

    def inspect(self) -> dict[str, Any]:
        state: dict[str, Any] = {"Status": self.state, "Running": self.state == "running", "Paused": False}
        if self.health:
            state["Health"] = {"Status": self.health}
        return {
            "Id": self.id,
            "Name": f"/{self.name}",
            "Created": "2023-11-14T22:13:20.123456789Z",
            "State": state,
            "Config": {"Labels": self.labels},
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {"Networks": {self.network: {"NetworkID": "net-" + self.network, "IPAddress": self.ip}}},
        }


@dataclass
class FakeEngine:
    """State + a scripted Engine API over a unix socket."""

    sock: str
    api_version: str = "1.41"
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    services: dict[str, dict] = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)
    gwbridge: dict | None = None
    swarm: dict = field(default_factory=lambda: {"LocalNodeState": "inactive"})
    requests: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # path prefix -> HTTP status to answer with
    streams: list[asyncio.Queue] = field(default_factory=list)
    runner: web.AppRunner | None = None
    versions: set[str] = field(default_factory=set)
    wall: Any = time.time  # event timestamps (a FakeClock's wall() for exact lags)

    # -- control ----------------------------------------------------------------
    def add(self, c: FakeContainer) -> FakeContainer:
        self.containers[c.id] = c
        return c

    def emit(self, typ: str, action: str, actor_id: str, **attrs: str) -> float:
        """Send one event to every open stream; returns its timestamp."""
        now = self.wall()
        if actor_id in self.containers:
            attrs = {**self.containers[actor_id].labels, "name": self.containers[actor_id].name, **attrs}
        ev = {
            "Type": typ,
            "Action": action,
            "Actor": {"ID": actor_id, "Attributes": attrs},
            "scope": "local",
            "time": int(now),
            "timeNano": int(now * 1e9),
        }
        for q in self.streams:
            q.put_nowait(ev)
        return now

    def cut_streams(self) -> None:
        """What a dockerd restart does to open event streams: close them."""
        for q in self.streams:
            q.put_nowait(None)

    def count(self, prefix: str) -> int:
        return sum(1 for _, p in self.requests if p.startswith(prefix))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.UnixSite(self.runner, self.sock).start()

    async def stop(self) -> None:
        self.cut_streams()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- API --------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append((request.method, re.sub(r"^/v\d+\.\d+/", "/", path)))
        if request.method != "GET":
            return web.json_response({"message": "read-only"}, status=405)
        if path == "/_ping":
            return web.Response(text="OK")
        if path == "/version":
            return web.json_response({"ApiVersion": self.api_version, "Version": "fake"})
        m = re.match(r"^/v(\d+)\.(\d+)(/.*)$", path)
        if not m or (int(m[1]), int(m[2])) > tuple(int(p) for p in self.api_version.split(".")):
            return web.json_response({"message": f"unexpected path {path}"}, status=400)
        self.versions.add(f"{m[1]}.{m[2]}")
        path = m[3]
        for p, status in self.fail.items():
            if path.startswith(p):
                return web.json_response({"message": "injected failure"}, status=status)
        filters = json.loads(request.query.get("filters", "{}"))
        if path == "/info":
            return web.json_response({"Name": "fakehost", "Swarm": self.swarm})
        if path == "/events":
            return await self._events(request)
        if path == "/containers/json":
            return web.json_response([c.summary() for c in self.containers.values() if c.state == "running"])
        if path.startswith("/containers/") and path.endswith("/json"):
            c = self.containers.get(path.split("/")[2])
            if c is None:
                return web.json_response({"message": "No such container"}, status=404)
            return web.json_response(c.inspect())
        if path.startswith(("/services", "/tasks")) and self.swarm.get("ControlAvailable") is not True:
            return web.json_response({"message": "This node is not a swarm manager."}, status=503)
        if path == "/services":
            want = filters.get("label", [])
            return web.json_response(
                [s for s in self.services.values() if all(k in s["Spec"].get("Labels", {}) for k in want)]
            )
        if path.startswith("/services/"):
            s = self.services.get(path.split("/")[2])
            return web.json_response(s) if s else web.json_response({"message": "no such service"}, status=404)
        if path == "/tasks":
            want = set(filters.get("service", []))
            return web.json_response([t for t in self.tasks if not want or t["ServiceID"] in want])
        if path == "/networks/docker_gwbridge":
            if self.gwbridge is None:
                return web.json_response({"message": "network not found"}, status=404)
            return web.json_response(self.gwbridge)
        return web.json_response({"message": f"not implemented: {path}"}, status=404)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue()
        self.streams.append(q)
        try:
            while True:
                ev = await q.get()
                if ev is None:
                    break
                await resp.write(json.dumps(ev).encode() + b"\n")
        finally:
            self.streams.remove(q)
        # a restarting dockerd cuts the connection without the final chunk
        if request.transport is not None:
            request.transport.close()
        return resp


async def running_fake_engine(tmp_path):
    """A started FakeEngine on a socket in the test's tmp_path; a test module makes it its fixture with
    ``fake = pytest.fixture(running_fake_engine)``."""
    f = FakeEngine(sock=str(tmp_path / "docker.sock"))
    await f.start()
    yield f
    await f.stop()
