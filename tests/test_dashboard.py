"""The live dashboard (mesh/dashboard, served by mesh/admin.py): the pure view and rates, the shared sampler,
the JSON and SSE endpoints after known traffic, and the page in a real headless Chromium over a real agent.

Browser tests drive the system ``chromium`` with ``chromedriver`` through selenium (scripts/test installs
them); they skip, naming what is missing, only when the browser cannot run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import time

import aiohttp
import pytest

from mesh.admin import AdminServer, MeshState
from mesh.dashboard import ASSETS, Feed, add_rates, asset, build_view, replica_state
from mesh.listener import Listener
from mesh.metrics import DiscoveryMetrics, StatsReader, make_registry, merge_snapshots
from mesh.pool import Pool
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import Mesh
from tests.backends import Backend, closed_port
from tests.test_admin import Agent, echo, table_for
from tests.util import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


# -- the pure parts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "state"),
    [
        ({"draining": False, "listed": True, "health": 0}, "running"),
        ({"draining": True, "listed": True, "health": 0}, "draining"),
        ({"draining": False, "listed": False, "health": 0}, "draining"),  # left the table, still busy
        ({"draining": False, "listed": True, "health": 2}, "ejected"),
        ({"draining": False, "listed": True, "health": 3}, "ejected"),
        ({"draining": False, "listed": True, "health": 1}, "unhealthy"),
        ({"draining": True, "listed": True, "health": 3}, "draining"),
    ],
)
def test_replica_state(row, state):
    assert replica_state(row) == state


def _view(t: float, accepted: int, rep_conns: dict[str, int], byts: int = 0, refused: int = 0) -> dict:
    return {
        "generated_at": t,
        "services": [
            {
                "name": "web",
                "port": 80,
                "accepted": accepted,
                "bytes_in": byts,
                "bytes_out": byts,
                "failed": {"no_endpoint": 0, "refused": refused},
                "ingress": {"n1": {"accepted": accepted, "failed": refused}},
                "replicas": [
                    {"id": rid, "node": "n1", "connections": n, "bytes_in": n * 10, "bytes_out": n * 100}
                    for rid, n in rep_conns.items()
                ],
            }
        ],
    }


def test_add_rates_exact_and_never_negative():
    first = add_rates(_view(10.0, 5, {"a": 2, "b": 3}), None)
    s = first["services"][0]
    assert first["interval_seconds"] is None
    assert s["rates"] == {"accepted": None, "bytes": None, "failed": None,
                          "failed_by_reason": {"no_endpoint": None, "refused": None}}  # fmt: skip
    assert s["replicas"][0]["rates"] == {"connections": None, "bytes": None}
    second = add_rates(_view(10.5, 25, {"a": 12, "b": 3, "c": 1}, byts=1000, refused=4), first)
    s = second["services"][0]
    assert second["interval_seconds"] == 0.5
    assert s["rates"] == {"accepted": 40.0, "bytes": 4000.0, "failed": 8.0,
                          "failed_by_reason": {"no_endpoint": 0.0, "refused": 8.0}}  # fmt: skip
    assert s["ingress"]["n1"]["rate"] == 40.0
    reps = {r["id"]: r["rates"] for r in s["replicas"]}
    assert reps == {
        "a": {"connections": 20.0, "bytes": 2200.0},
        "b": {"connections": 0.0, "bytes": 0.0},
        "c": {"connections": None, "bytes": None},
    }  # fmt: skip  (c is new: no rate yet)
    # a process restarted without its totals: counters went down -> 0, not a negative rate
    third = add_rates(_view(11.5, 3, {"a": 1}), second)
    assert third["services"][0]["rates"]["accepted"] == 0.0
    assert third["services"][0]["replicas"][0]["rates"]["connections"] == 0.0


def test_build_view_from_a_snapshot_marks_departed_and_remote_replicas():
    route = Route(
        port=80,
        endpoints=(
            Endpoint("a", "10.0.0.1", 80),
            Endpoint("b", "10.0.0.2", 80),
            Endpoint("r", "10.0.1.5", 80, node="n2", via="10.0.1.1:7481"),
        ),
    )
    pool = Pool("web", route, ServiceOptions())
    listeners = [Listener("127.0.0.1", 80, pool, service="web")]
    reader = StatsReader(lambda: listeners, lambda: {"table_version": 4, "table_applied": 100.0})
    reader.snapshot()
    a, b, _ = pool.hosts
    a.stats.connections, a.stats.bytes_in, a.stats.bytes_out = 7, 70, 700
    b.active = 2
    b.stats.connections = 3
    pool.stats.accepted = 11
    pool.stats.connect_failures["refused"] = 1
    kept = Route(port=80, endpoints=(route.endpoints[0], route.endpoints[2]))
    pool.update(kept, ServiceOptions())
    table = RoutingTable(version=4, services=(Service("web", (kept,)),))
    view = build_view(table, merge_snapshots([reader.snapshot()]), node="n1", now=103.5)
    assert view["table"] == {"version": 4, "applied_at": 100.0, "age_seconds": 3.5}
    assert view["nodes"] == [{"id": "n1", "self": True}, {"id": "n2", "self": False}]
    (svc,) = view["services"]
    assert (svc["name"], svc["port"], svc["accepted"], svc["active"], svc["connections"]) == ("web", 80, 11, 2, 10)
    assert (svc["bytes_in"], svc["bytes_out"], svc["healthy"], svc["endpoints"]) == (70, 700, 2, 2)
    assert svc["connect_failures"] == {"refused": 1}
    reps = {r["id"]: (r["node"], r["state"], r["listed"], r["via"], r["active"]) for r in svc["replicas"]}
    assert reps == {
        "a": ("n1", "running", True, None, 0),
        "r": ("n2", "running", True, "10.0.1.1:7481", 0),
        "b": ("n1", "draining", False, None, 2),  # left the table, still carries two connections
    }
    assert view["listeners"] == [
        {
            "service": "web",
            "protocol": "tcp",
            "listen_host": "0.0.0.0",
            "port": 80,
            "bound_port": None,
            "listening": False,
        }
    ]  # fmt: skip  (never started here)


# -- the shared sampler ---------------------------------------------------------------------------------------


class Counting:
    """A collect() that counts its calls and returns a tiny view."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> dict:
        self.calls += 1
        return {"generated_at": time.time(), "services": [], "n": self.calls}


async def test_feed_samples_only_while_watched_and_once_for_all_watchers():
    collect = Counting()
    feed = Feed(collect, interval=0.05)
    await asyncio.sleep(0.2)
    assert collect.calls == 0 and not feed.running  # nobody watches: nothing runs
    for _ in range(100):
        feed.subscribe()
    got: list[list[int]] = [[] for _ in range(100)]

    async def watch(i: int) -> None:
        seq = feed.start_seq()
        for _ in range(4):
            seq = await feed.next(seq)
            got[i].append(json.loads(feed.body)["n"])

    await asyncio.wait_for(asyncio.gather(*(watch(i) for i in range(100))), 5)
    # one sample per interval for the hundred of them, each watcher saw increasing samples
    assert all(g == sorted(set(g)) and len(g) == 4 for g in got)
    assert collect.calls <= max(g[-1] for g in got) + 1
    assert feed.event.startswith(b"event: view\nid: ") and feed.event.endswith(b"\n\n")
    for _ in range(100):
        feed.unsubscribe()
    assert not feed.running
    calls = collect.calls
    await asyncio.sleep(0.2)
    assert collect.calls == calls  # stopped with the last watcher
    await feed.close()
    assert await feed.next(feed.seq) == -1  # a closed feed releases its watchers


async def test_feed_slow_watcher_gets_the_latest_sample():
    collect = Counting()
    feed = Feed(collect, interval=0.02)
    feed.subscribe()
    try:
        seq = await feed.next(feed.start_seq())
        first = json.loads(feed.body)["n"]
        await asyncio.sleep(0.2)  # a slow reader: about ten samples pass meanwhile
        seq2 = await feed.next(seq)
        assert seq2 > seq + 3  # it skipped the ones in between, got the newest at once
        assert json.loads(feed.body)["n"] >= first + 4
    finally:
        feed.unsubscribe()
        await feed.close()


# -- the endpoints ------------------------------------------------------------------------------------------


async def _get(server: AdminServer, path: str, **headers) -> tuple[int, dict, bytes]:
    host, port = server.address
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{host}:{port}{path}", headers=headers, allow_redirects=False) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def test_dashboard_json_exact_after_known_traffic():
    b1, b2 = await Backend("a").start(), await Backend("b").start()
    mesh = Mesh(local_node="node-a")
    await mesh.apply(table_for(7, {"web": (0, [b1.port, b2.port]), "down": (0, [closed_port()])}, retries=0))
    ports = {lst.service: lst.port for lst in mesh.listeners()}
    disc = DiscoveryMetrics()
    disc.lag(0.02)
    disc.lag(0.2)
    server = AdminServer(MeshState(mesh), port=0, registry=make_registry(discovery=disc))
    await server.start()
    try:
        payload = bytes(range(256)) * 4
        for _ in range(5):
            assert await echo(ports["web"], payload) == payload
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", ports["down"])
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        await wait_for(lambda: mesh.connections() == 0, what="connections closed")
        status, headers, body = await _get(server, "/v1/dashboard")
        assert status == 200 and headers["Content-Type"] == "application/json"
        v = json.loads(body)
        assert (v["v"], v["scope"], v["node"], v["processes"]) == (1, "node", "node-a", 1)
        assert v["table"]["version"] == 7 and 0 <= v["table"]["age_seconds"] < 60
        assert v["discovery"]["lag_count"] == 2 and v["discovery"]["lag_mean_seconds"] == 0.11
        assert v["discovery"]["lag_p99_le_seconds"] == 0.25
        svc = {s["name"]: s for s in v["services"]}
        web = svc["web"]
        assert (web["accepted"], web["connections"], web["active"]) == (5, 5, 0)
        assert (web["bytes_in"], web["bytes_out"]) == (5 * 1024, 5 * 1024)
        assert web["bound_port"] == ports["web"] and web["listening"] is True
        assert sorted(r["connections"] for r in web["replicas"]) == [2, 3]
        assert {r["id"]: r["bytes_in"] for r in web["replicas"]} == {
            r["id"]: 1024 * r["connections"] for r in web["replicas"]
        }
        assert {(r["state"], r["node"]) for r in web["replicas"]} == {("running", "n1")}
        assert sum(web["failed"].values()) == 0 and web["healthy"] == 2
        down = svc["down"]
        assert down["accepted"] == 3 and down["failed"]["refused"] == 3 and down["connect_failures"] == {"refused": 3}
        assert down["ingress"] == {"node-a": {"accepted": 3, "failed": 3, "rate": None}}
        assert sorted((x["service"], x["bound_port"], x["listening"]) for x in v["listeners"]) == sorted(
            [("web", ports["web"], True), ("down", ports["down"], True)]
        )
        # nobody watches: the JSON endpoint sampled on demand, no sampler is left running
        assert not server.dashboard.feed.running
    finally:
        await server.stop()
        await mesh.shutdown(1.0)
        await b1.close()
        await b2.close()


async def _read_events(resp: aiohttp.ClientResponse, n: int, timeout: float = 5.0) -> list[dict]:
    """Read ``n`` SSE "view" events from a streaming response."""
    events: list[dict] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while len(events) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(events)} events within {timeout}s"
        chunk = await asyncio.wait_for(resp.content.readany(), left)
        assert chunk, "the stream ended"
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
            if fields.get(b"event") == b"view":
                events.append(json.loads(fields[b"data"]))
    return events


async def test_stream_pushes_rates_while_load_runs_and_stops_with_the_last_watcher():
    b = await Backend().start()
    mesh = Mesh()
    await mesh.apply(table_for(1, {"web": (0, [b.port])}))
    (lst,) = mesh.listeners()
    server = AdminServer(MeshState(mesh), port=0)
    await server.start()
    host, port = server.address
    feed = server.dashboard.feed
    stop = time.monotonic() + 3.0
    done = 0

    async def load() -> None:  # bounded: 3 s and 2000 connections at most
        nonlocal done
        while time.monotonic() < stop and done < 2000:
            await echo(lst.port, b"x" * 100)
            done += 1

    try:
        async with aiohttp.ClientSession() as s:
            streams = [await s.get(f"http://{host}:{port}/v1/dashboard/stream") for _ in range(3)]
            assert all(r.headers["Content-Type"] == "text/event-stream" for r in streams)
            loader = asyncio.create_task(load())
            evs = await _read_events(streams[0], 4)
            others = [await _read_events(r, 2) for r in streams[1:]]
            await loader
            assert all(e["v"] == 1 for e in evs + [x for o in others for x in o])
            gaps = [round(b["generated_at"] - a["generated_at"], 2) for a, b in itertools.pairwise(evs)]
            assert all(0.3 <= g <= 1.0 for g in gaps), gaps  # about two a second, never faster
            rates = [e["services"][0]["rates"]["accepted"] for e in evs[1:]]
            assert any(r and r > 0 for r in rates), rates
            assert feed.watchers == 3 and feed.running
            for r in streams:
                r.close()
        await wait_for(lambda: feed.watchers == 0, timeout=2.0, what="the streams noticed closed")
        assert not feed.running
    finally:
        await server.stop()
        await mesh.shutdown(1.0)
        await b.close()


async def test_page_files_redirects_and_stop_with_open_streams():
    mesh = Mesh()
    server = AdminServer(MeshState(mesh), port=0)
    await server.start()
    try:
        status, headers, _ = await _get(server, "/", Accept="text/html,application/xhtml+xml")
        assert status == 302 and headers["Location"] == "/ui/"
        status, headers, body = await _get(server, "/")
        assert status == 200 and b'"/v1/dashboard/stream"' in body  # tools still get the JSON list
        assert (await _get(server, "/ui"))[1]["Location"] == "/ui/"
        for name, ctype in ASSETS.items():
            path = "/ui/" if name == "index.html" else f"/ui/{name}"
            status, headers, body = await _get(server, path)
            assert status == 200 and headers["Content-Type"] == ctype and body == asset(name)
        html = asset("index.html").decode()
        assert "http://" not in html and "https://" not in html  # no external asset
        assert (await _get(server, "/ui/mesh.yaml"))[0] == 404
        assert (await _get(server, "/ui/..%2Fadmin.py"))[0] == 404
        status, _, body = await _get(server, "/v1/dashboard")
        assert status == 200 and json.loads(body)["table"] is None  # no table yet: an empty view, not an error
        host, port = server.address
        async with aiohttp.ClientSession() as s:
            streams = [await s.get(f"http://{host}:{port}/v1/dashboard/stream") for _ in range(5)]
            await _read_events(streams[0], 1)
            t0 = time.monotonic()
            await server.stop()
            assert time.monotonic() - t0 < 2.0  # open streams do not hold the shutdown
            for r in streams:
                r.close()
    finally:
        await server.stop()
        await mesh.shutdown(1.0)


# -- the page in a real browser -------------------------------------------------------------------------------


def _browser_problem() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install chromium chromium-driver; scripts/test does it)"
    return None


@pytest.fixture(scope="module")
def browser():
    problem = _browser_problem()
    if problem:
        pytest.skip(f"no headless Chromium: {problem}")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service as DriverService

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,720"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=opts)
    except WebDriverException as exc:
        pytest.skip(f"headless Chromium does not start here: {str(exc).splitlines()[0]}")
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """Selenium calls off the event loop (the agent's load runs on it meanwhile)."""

    def __init__(self, driver) -> None:
        self.d = driver

    async def run(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def js(self, script: str, *args):
        return await asyncio.to_thread(self.d.execute_script, script, *args)

    async def wait(self, script: str, timeout: float = 5.0, what: str = "") -> object:
        """Poll a JS expression (``return ...``) until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"page: timed out after {timeout}s waiting for {what or script}")
            await asyncio.sleep(0.05)

    async def errors(self) -> list[dict]:
        logs = await asyncio.to_thread(self.d.get_log, "browser")
        return [e for e in logs if e["level"] in ("SEVERE", "ERROR")]


REPLICAS = ("replica-1", "replica-2", "replica-3")

STATE_OF = "return [...document.querySelectorAll('[data-replica]')].map(e => [e.dataset.replica, e.dataset.state])"
FIG = (
    'const e = document.querySelector(\'[data-service="web:0"] .svc [data-field="{}"] .v\'); return e && e.textContent'
)
REP_TOTAL = (
    "return Object.fromEntries([...document.querySelectorAll('[data-service=\"web:0\"] [data-replica]')]"
    ".map(e => [e.dataset.replica, Number(e.querySelector('[data-field=\"connections\"] .v').textContent)]))"
)


def _config(ports: list[int], draining: str | None = None, without: str | None = None) -> str:
    lines = ["services:", "  web:", "    listen: 127.0.0.1:0", "    endpoints:"]
    for name, port in zip(REPLICAS, ports, strict=True):
        if name == without:
            continue
        state = ", state: draining" if name == draining else ""
        lines.append(f"      - {{id: {name}, address: 127.0.0.1, port: {port}{state}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.uvloop_only
@pytest.mark.timeout(120)
async def test_page_shows_a_running_mesh_live(tmp_path, browser):
    backends = [await Backend(name).start() for name in REPLICAS]
    ports = [b.port for b in backends]
    agent = await Agent(tmp_path, _config(ports)).start()
    page = Page(browser)
    holder = None
    try:
        lp = await agent.bound_port("web")
        url = f"http://{agent.admin[0]}:{agent.admin[1]}/ui/"
        await page.run(browser.set_window_size, 1280, 720)
        await page.run(browser.get, url)
        got = await page.wait(STATE_OF + ".length === 3 && " + STATE_OF[7:], what="three replicas shown")
        assert sorted(map(tuple, got)) == [(r, "running") for r in REPLICAS]
        assert await page.js("return document.querySelector('#live').dataset.live") == "live"
        assert await page.js("return document.querySelector('[data-listener=\"web:0\"]').dataset.up") == "up"
        assert await page.js("return document.querySelector('#f-table').textContent.startsWith('v1')")
        # 1280x720: the grid fits, no horizontal scrolling
        assert await page.js("return document.documentElement.scrollWidth <= window.innerWidth")

        # figures move while bounded load runs (4 clients, 6 s and 30,000 connections at most: on a quiet machine
        # 3,000 were all done before the page's first sample, and the totals then did not move)
        stop_at, done = time.monotonic() + 6.0, [0]

        async def client() -> None:
            while time.monotonic() < stop_at and done[0] < 30000:
                await echo(lp, b"y" * 512)
                done[0] += 1

        load = [asyncio.create_task(client()) for _ in range(4)]
        cps = await page.wait(
            f"const t = (() => {{ {FIG.format('cps')} }})(); return t && t !== '0' && t !== '\u2013' && t",
            timeout=5,
            what="new connections/s above 0",
        )
        totals_1 = await page.js(REP_TOTAL)
        await asyncio.sleep(1.0)
        totals_2 = await page.js(REP_TOTAL)
        assert all(totals_2[r] > totals_1[r] for r in REPLICAS), (totals_1, totals_2)
        assert float(cps.rstrip("k")) > 0
        screenshot = tmp_path / "dashboard-1280x720.png"
        await page.run(browser.save_screenshot, str(screenshot))
        assert screenshot.stat().st_size > 10_000
        keep = os.environ.get("MESH_DASHBOARD_SCREENSHOT")  # where a copy goes (docs/img/dashboard.png)
        if keep:
            shutil.copyfile(screenshot, keep)
        await asyncio.gather(*load)
        assert done[0] > 0

        # the load's last connections closed (else one of them could pass for the held one below)
        await page.wait(
            "return [...document.querySelectorAll('[data-replica]')].every(e => "
            "e.querySelector('[data-field=\"active\"] .v').textContent === '0')",
            timeout=5,
            what="no connection active after the load",
        )
        # a replica that is stopped (config: draining, SIGHUP): the page says so within a second
        r, w = await asyncio.open_connection("127.0.0.1", lp)  # one connection held: to see it drain
        w.write(b"held")
        await asyncio.wait_for(r.readexactly(4), 5)
        held_by = await page.wait(
            "const e = [...document.querySelectorAll('[data-replica]')].find(e => "
            "e.querySelector('[data-field=\"active\"] .v').textContent === '1'); return e && e.dataset.replica",
            what="the held connection shown",
        )
        agent.cfg.write_text(_config(ports, draining=held_by))
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGHUP)
        await page.wait(
            f"const e = document.querySelector('[data-replica=\"{held_by}\"]'); return e && e.dataset.state === 'draining'",
            timeout=1.0,
            what=f"{held_by} draining within a second",
        )
        drained_in = time.monotonic() - t0
        assert "draining" in await page.js(
            f"return document.querySelector('[data-replica=\"{held_by}\"] .rep-state').textContent"
        )  # written, not only coloured
        # removed from the table while its connection is open: still shown, as draining and removed
        agent.cfg.write_text(_config(ports, without=held_by))
        agent.proc.send_signal(signal.SIGHUP)
        await page.wait(
            f"const e = document.querySelector('[data-replica=\"{held_by}\"] .tag-gone'); return !!e",
            timeout=3.0,  # (the issue's "within a second" is the draining check above; this is a second reload)
            what=f"{held_by} removed but draining",
        )
        holder, _ = w, r
        w.close()
        t0 = time.monotonic()
        await page.wait(
            f"return !document.querySelector('[data-replica=\"{held_by}\"]')",
            timeout=1.0,
            what=f"{held_by} gone once its last connection closed",
        )
        gone_in = time.monotonic() - t0
        print(f"\ndashboard: draining shown {drained_in:.2f}s after SIGHUP, gone {gone_in:.2f}s after close")

        # a narrow window: everything readable, nothing wider than the window
        await page.run(browser.set_window_size, 400, 800)
        await page.wait("return document.documentElement.scrollWidth <= window.innerWidth", what="no horizontal scroll")
        assert await page.js(
            "return [...document.querySelectorAll('[data-replica]')].every(e => e.getBoundingClientRect().right <= window.innerWidth)"
        )
        await page.run(browser.save_screenshot, str(tmp_path / "dashboard-narrow.png"))
        assert await page.errors() == []
    finally:
        if holder is not None:
            holder.close()
        await page.run(browser.set_window_size, 1280, 720)
        await agent.stop()
        for b in backends:
            await b.close()


def _text(svc: str, sel: str) -> str:
    """JS: the text of ``sel`` inside the summary of service row ``svc`` ("name:port"), or null."""
    return f"const e = document.querySelector('[data-service=\"{svc}\"] .svc {sel}'); return e && e.textContent"


@pytest.mark.uvloop_only
@pytest.mark.timeout(120)
async def test_page_shows_http_routes_requests_classes_and_rules(tmp_path, browser):
    """Two http services on one port (a host rule, a path rule): the page shows each one's requests/s, its
    requests by status class and its rule, while bounded keep-alive load runs."""
    from tests.httpbackend import HttpBackend
    from tests.util import reserved_port

    shop, api = await HttpBackend("shop").start(), await HttpBackend("api").start()
    with reserved_port() as port:
        cfg = (
            "services:\n"
            f"  shop:\n    listen: 127.0.0.1:{port}\n    protocol: http\n    hosts: ['shop.example.com']\n"
            f"    endpoints: ['127.0.0.1:{shop.port}']\n"
            f"  api:\n    listen: 127.0.0.1:{port}\n    protocol: http\n    paths: ['/api']\n"
            f"    endpoints: ['127.0.0.1:{api.port}']\n"
        )
        agent = await Agent(tmp_path, cfg).start()
    page = Page(browser)
    s_shop, s_api = f"shop:{port}", f"api:{port}"
    try:
        await agent.bound_port("shop")
        await page.run(browser.set_window_size, 1280, 720)
        await page.run(browser.get, f"http://{agent.admin[0]}:{agent.admin[1]}/ui/")
        rule = await page.wait(_text(s_shop, "[data-field=rule]"), what="shop's rule shown")
        assert rule == "hosts shop.example.com · paths any"
        assert await page.js(_text(s_api, "[data-field=rule]")) == "hosts any · paths /api"
        assert await page.js(_text(s_shop, ".svc-port")) == f":{port}/http"

        stop_at, done, missing = time.monotonic() + 5.0, [0], [0]

        async def client() -> None:  # keep-alive: a few connections, many requests; every 5th is a 404
            async with aiohttp.ClientSession() as s:
                for i in itertools.count():
                    if time.monotonic() > stop_at or done[0] >= 20000:
                        return
                    path = "/status/404" if i % 5 == 0 else "/echo"
                    async with s.get(f"http://127.0.0.1:{port}{path}", headers={"Host": "shop.example.com"}) as r:
                        await r.read()
                        missing[0] += r.status == 404
                    async with s.get(f"http://127.0.0.1:{port}/api/x", headers={"Host": "other.example.com"}) as r:
                        await r.read()
                        assert r.status == 200
                    done[0] += 1

        load = [asyncio.create_task(client()) for _ in range(2)]
        rps = await page.wait(
            _text(s_shop, "[data-field=rps] .v") + " !== '0' && e.textContent !== '\u2013' && e.textContent",
            timeout=5,
            what="shop's requests/s above 0",
        )
        assert float(rps.rstrip("k")) > 0
        cls_of = "return [...document.querySelectorAll('[data-service=\"{}\"] [data-class]')].map(x => x.dataset.class)"
        await page.wait(cls_of.format(s_shop) + ".join() === '2xx,4xx'", what="2xx and 4xx shown for shop")
        await page.wait(cls_of.format(s_api) + ".join() === '2xx'", what="2xx shown for api")
        assert await page.wait("const e = document.querySelector('#f-rps'); return e && e.textContent !== '0'")
        await page.run(browser.save_screenshot, str(tmp_path / "dashboard-http.png"))
        await asyncio.gather(*load)
        assert done[0] > 0
        # the load is over: totals exact (the view may be up to one sample old), nothing in flight
        h: dict = {}

        async def settled() -> bool:
            body = json.loads((await agent.get("/v1/dashboard"))[1])
            h.update({s["name"]: s["http"] for s in body["services"]})
            return h["api"]["requests"] == done[0]

        await wait_for(settled, what="the last requests in /v1/dashboard")
        assert h["api"]["by_class"]["2xx"] == done[0]
        assert h["shop"]["requests"] == done[0] and h["shop"]["by_class"]["4xx"] == missing[0] > 0
        await page.wait(
            _text(s_shop, "[data-field=requests-active] .v") + " === '0'", what="no request in flight after the load"
        )
        assert await page.js("return document.documentElement.scrollWidth <= window.innerWidth")
        assert await page.errors() == []
    finally:
        await agent.stop()
        await shop.close()
        await api.close()


# -- the cluster view (meshagent.clusterview) -----------------------------------------------------------------


def _node_view(node: str, replicas: list[tuple[str, str, str | None, int]], accepted: int) -> dict:
    """A node view with one service; replicas: (id, node, via, connections)."""
    return {
        "v": 1, "scope": "node", "node": node, "generated_at": 50.0, "nodes": [], "table": None, "cluster": None,
        "listeners": [], "processes": 1, "fd_exhausted": 0, "discovery": None,
        "services": [{
            "name": "web", "port": 8080, "protocol": "tcp", "listen_host": "0.0.0.0", "bound_port": 8080,
            "listening": True, "accepted": accepted, "active": 0, "connections": 0, "bytes_in": 0, "bytes_out": 0,
            "retries": 0, "failed": {"refused": 1}, "connect_failures": {}, "healthy": 0, "endpoints": 0,
            "ingress": {node: {"accepted": accepted, "failed": 1}},
            "replicas": [
                {"id": rid, "node": rnode, "address": "x", "via": via, "state": "running", "listed": True,
                 "weight": 1, "active": 1, "connections": conns, "bytes_in": conns, "bytes_out": 10 * conns,
                 "ejections": 0, "ejected_seconds_left": 0.0}
                for rid, rnode, via, conns in replicas
            ],
        }],
    }  # fmt: skip


def test_merge_node_views_counts_each_replica_once_by_its_own_node():
    from meshagent.clusterview import merge_node_views

    own = _node_view(
        "m1", [("a", "m1", None, 5), ("b", "w2", "10.0.0.2:7481", 99), ("c", "w3", "10.0.0.3:7481", 4)], 10
    )
    w2 = _node_view("w2", [("b", "w2", None, 7), ("a", "m1", "10.0.0.1:7481", 3)], 6)
    facts = {"m1": {"reachable": True}, "w2": {"reachable": True}, "w3": {"reachable": False, "error": "refused"}}
    view = merge_node_views(own, {"w2": w2, "w3": None}, facts, now=51.0)
    assert view["scope"] == "cluster" and view["generated_at"] == 51.0
    assert [n["id"] for n in view["nodes"]] == ["m1", "w2", "w3"]
    assert view["nodes"][2] == {"id": "w3", "self": False, "reachable": False, "error": "refused"}
    (svc,) = view["services"]
    # a: by m1 (5, not m1 + w2's remote view of it); b: by w2 itself (7, not m1's 99); c: w3 is silent, so
    # m1's remote view of it
    reps = {(r["node"], r["id"]): (r["connections"], r["via"]) for r in svc["replicas"]}
    assert reps == {("m1", "a"): (5, None), ("w2", "b"): (7, None), ("w3", "c"): (4, "10.0.0.3:7481")}
    assert (svc["accepted"], svc["connections"], svc["bytes_out"], svc["active"]) == (16, 16, 160, 3)
    assert svc["failed"] == {"refused": 2}
    assert svc["ingress"] == {"m1": {"accepted": 10, "failed": 1, "listening": True},
                              "w2": {"accepted": 6, "failed": 1, "listening": True}}  # fmt: skip


def _http_figures(
    requests: dict, *, active: int, reused: int, new: int, dur: tuple, retries: dict, generated: dict
) -> dict:
    """A node view's http figures of a service, as build_view makes them (http_summary of a merged row)."""
    from mesh.metrics import http_summary

    buckets = 12
    row = {
        "requests": requests, "generated": generated, "retries": retries, "active": active, "queued": 1,
        "pool_new": new, "pool_reused": reused, "upgrades": 1,
        "duration": {"counts": [dur[0]] + [0] * buckets, "sum": dur[1]},
        "upstream_time": {"counts": [reused + new] + [0] * buckets, "sum": 0.001 * (reused + new)},
    }  # fmt: skip
    return {**http_summary(row), "hosts": ["shop.example"], "paths": ["/api"]}


def test_merge_node_views_sums_http_figures():
    from meshagent.clusterview import merge_node_views

    own = _node_view("m1", [("a", "m1", None, 5)], 10)
    w2 = _node_view("w2", [("b", "w2", None, 7)], 6)
    own["services"][0]["http"] = _http_figures(
        {"GET": {"2xx": 8, "5xx": 1}, "POST": {"2xx": 1}}, active=2, reused=7, new=3, dur=(10, 1.0),
        retries={"connect": 2}, generated={"503": {"no_endpoint": 1}},
    )  # fmt: skip
    w2["services"][0]["http"] = _http_figures(
        {"GET": {"2xx": 20, "4xx": 10}}, active=1, reused=25, new=5, dur=(30, 6.0),
        retries={"connect": 1, "status_503": 4}, generated={"503": {"no_endpoint": 2}, "502": {"refused": 1}},
    )  # fmt: skip
    facts = {"m1": {"reachable": True}, "w2": {"reachable": True}}
    view = merge_node_views(own, {"w2": w2}, facts, now=51.0)
    (svc,) = view["services"]
    h = svc["http"]
    assert h == {
        "requests": 40,
        "by_class": {"1xx": 0, "2xx": 29, "3xx": 0, "4xx": 10, "5xx": 1},
        "by_method": {"GET": 39, "POST": 1},
        "active": 3,
        "queued": 2,
        "retries": 7,
        "retries_by_reason": {"connect": 3, "status_503": 4},
        "generated": {"502 refused": 1, "503 no_endpoint": 3},
        "upstream_reused": 32,
        "upstream_new": 8,
        "upgrades": 2,
        "duration_mean_seconds": 0.175,  # (0.1 x 10 + 0.2 x 30) / 40
        "upstream_mean_seconds": 0.001,
        "hosts": ["shop.example"],
        "paths": ["/api"],
    }
    # the rates of the cluster feed read these figures like a node's
    later = merge_node_views(own, {"w2": w2}, facts, now=52.0)
    later["services"][0]["http"]["requests"] += 8
    add_rates(later, view)
    assert later["services"][0]["rates"]["requests"] == 8.0
    # tcp services (and a cluster of nodes without http figures) keep "http": null
    plain = merge_node_views(_node_view("m1", [], 1), {}, {"m1": {}}, now=1.0)
    assert plain["services"][0]["http"] is None


@pytest.mark.uvloop_only
async def test_a_manager_reads_another_agents_view_through_its_tunnel(tmp_path):
    from types import SimpleNamespace

    from cluster.state import NodeInfo
    from mesh.dashboard import Dashboard
    from meshagent.cluster import ClusterAgent
    from meshagent.clusterview import ClusterView, FetchError, fetch_node_view
    from tests.fakeengine import FakeContainer, running_fake_engine

    token = "0123456789abcdef0123456789abcdef"
    gen = running_fake_engine(tmp_path)
    fake = await gen.__anext__()
    fake.swarm = {"LocalNodeState": "active", "NodeID": "nodew1", "ControlAvailable": False, "NodeAddr": "127.0.0.1"}
    fake.add(FakeContainer(id="a" * 64, name="web.1.t1", labels={"com.docker.swarm.task.id": "t1"}, ip="172.17.0.5"))
    worker = ClusterAgent(f"unix://{fake.sock}", token, tunnel_port=0, bind="127.0.0.1", control_wait=1.0)
    b = await Backend().start()
    manager_mesh = Mesh(local_node="nodem")
    try:
        await worker.start(info_timeout=5)
        # the worker's data plane serves one replica of its own (applied directly: no manager runs here)
        await worker.mesh.apply(RoutingTable(version=1, services=(Service("web", (Route(
            port=0, listen_host="127.0.0.1",
            endpoints=(Endpoint(id="t1", address="127.0.0.1", port=b.port, node="nodew1"),)),)),)))  # fmt: skip
        (lst,) = worker.mesh.listeners()
        for _ in range(4):
            assert await echo(lst.port, b"z" * 300) == b"z" * 300
        await wait_for(lambda: worker.mesh.connections() == 0, what="connections closed")

        port = worker.tunnel.port
        with pytest.raises(FetchError, match="reset"):  # no cluster state yet: no node is an allowed peer
            await fetch_node_view("127.0.0.1", port, token)
        assert worker.tunnel.stats.refused.get("peer") == 1
        worker._peers = frozenset({"127.0.0.1"})  # what a cluster state listing this address as a node allows
        view = await fetch_node_view("127.0.0.1", port, token)
        assert view["node"] == "nodew1" and view["cluster"]["role"] == "worker"
        (svc,) = view["services"]
        assert [(r["id"], r["node"], r["connections"], r["bytes_in"]) for r in svc["replicas"]] == [
            ("t1", "nodew1", 4, 1200)
        ]
        # another cluster's token: its tunnel header is not sealed with this cluster's key, so the tunnel
        # refuses it before the report server sees a request
        with pytest.raises(FetchError, match="reset"):
            await fetch_node_view("127.0.0.1", port, "wrong-token-wrong-token-wrong")
        assert worker.tunnel.stats.refused.get("auth") == 1 and worker.report.unauthorized == 0

        # a manager's view: itself, the worker (through its tunnel) and a node whose agent is gone
        nodes = [NodeInfo("nodem", "127.0.0.1", tunnel=1), NodeInfo("nodew1", "127.0.0.1", tunnel=port),
                 NodeInfo("nodegone", "127.0.0.1", tunnel=closed_port())]  # fmt: skip
        stub = SimpleNamespace(manager=True, state=SimpleNamespace(nodes=nodes), token=token, advertise="127.0.0.1")
        cv = ClusterView(stub)
        dash = Dashboard(MeshState(manager_mesh), node="nodem", collect=cv)
        doc = json.loads(await dash.feed.current())
        assert doc["scope"] == "cluster"
        by_id = {n["id"]: n for n in doc["nodes"]}
        assert [n["id"] for n in doc["nodes"]] == ["nodem", "nodegone", "nodew1"]
        assert by_id["nodew1"]["reachable"] is True and by_id["nodew1"]["role"] == "worker"
        assert by_id["nodegone"]["reachable"] is False and by_id["nodegone"]["error"]
        (svc,) = doc["services"]
        assert [(r["id"], r["node"], r["connections"]) for r in svc["replicas"]] == [("t1", "nodew1", 4)]
        assert svc["ingress"]["nodew1"]["accepted"] == 4
        fetched = cv.fetches
        await dash.feed.sample()  # within a second: the nodes are not asked again
        assert cv.fetches == fetched == 2
        await dash.close()
    finally:
        await manager_mesh.shutdown(0.1)
        await worker.stop(0.1)
        await b.close()
        with contextlib.suppress(StopAsyncIteration):
            await gen.__anext__()
