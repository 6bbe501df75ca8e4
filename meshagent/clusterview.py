"""The whole-cluster dashboard: a manager's agent shows every node's replicas and traffic on one page.

How a manager learns the other nodes' live counters (docs/cluster.md, "The cluster dashboard")::

    manager agent (someone watches /ui/) ── every 1 s, per node ──▶ node's tunnel port (7481, already open
        between nodes; only node addresses are accepted)   tunnel header, target "@dashboard"
                                                            └──▶ that agent's NodeReport (127.0.0.1:<any>)
            GET /v1/dashboard/node, Authorization: Bearer <cluster token> ◀── its node view (JSON)

Rules:
- Pull, and only while watched: the manager asks when its dashboard feed samples (a stream is open, or
  ``GET /v1/dashboard`` is called); at most once a second per node, whatever the number of watchers.
  With nobody watching no node does anything for the dashboard.
- No new port and no change to the control plane: the request rides the tunnel every node already accepts
  from the other nodes, to a reserved target ("@dashboard" cannot be a "<task id>:<port>" target), which
  ``ClusterAgent._resolve`` maps to the node's loopback ``NodeReport``.  The report checks the cluster token.
- Each replica is counted once, by its own node: a node's view lists its local replicas (``via`` null) with
  every connection they served, from its own clients and through the tunnel alike (the tunnel shares the
  data plane's host and stats).  A node's view of *remote* replicas is dropped, except for a node that did not
  answer: its replicas are then shown as the manager sees them (remote, via its tunnel) and the node is marked
  unreachable, with the error.
- ``ingress`` of a service says how many connections each node accepted on the published port.
- An http service's ``http`` figures (requests by class and method, active, queued, retries, upstream
  reuse, upgrades, generated responses) are the sums over the nodes that answered, each node counting the
  requests its own port accepted; the mean times are weighted by requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from mesh.metrics import json_bytes, run_off_loop
from mesh.proxy.preamble import TunnelAuth, tunnel_header

__all__ = [
    "DASHBOARD_TARGET",
    "NODE_PATH",
    "ClusterView",
    "NodeReport",
    "fetch_node_view",
    "merge_node_views",
]

log = logging.getLogger(__name__)

DASHBOARD_TARGET = "@dashboard"  # the tunnel target of a node's dashboard report (never a task id)
NODE_PATH = "/v1/dashboard/node"
MAX_REPORT = 8 * 1024 * 1024  # bytes of one node's answer
REFRESH = 1.0  # seconds: how often a manager asks each node, at most
FETCH_TIMEOUT = 1.5


class NodeReport:
    """A node's dashboard view for the managers: ``GET /v1/dashboard/node`` on 127.0.0.1 (any free port),
    token-checked, reached by the other nodes only through the tunnel (target ``DASHBOARD_TARGET``)."""

    def __init__(self, view: Callable[[], Any], token: str) -> None:
        self._view = view
        self._token = f"Bearer {token}".encode()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.requests = 0
        self.unauthorized = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(NODE_PATH, self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), self._token):
            self.unauthorized += 1
            return web.Response(status=401, text="a cluster token is required\n")
        view = await self._view()
        body = await run_off_loop(json_bytes, view)  # in pieces, off the loop: see mesh.metrics.json_bytes
        return web.Response(body=body, content_type="application/json")


class FetchError(Exception):
    pass


async def fetch_node_view(addr: str, port: int, token: str, timeout: float = FETCH_TIMEOUT) -> dict[str, Any]:
    """Ask the agent at ``addr``'s tunnel ``port`` for its node view (``FetchError`` naming what failed)."""
    try:
        return await asyncio.wait_for(_fetch(addr, port, token), timeout)
    except TimeoutError as exc:
        raise FetchError(f"no answer within {timeout:g}s") from exc
    except (OSError, ValueError) as exc:
        raise FetchError(str(exc) or type(exc).__name__) from exc


async def _fetch(addr: str, port: int, token: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(addr, port)
    try:
        local = writer.get_extra_info("sockname")[:2]
        peer = writer.get_extra_info("peername")[:2]
        writer.write(tunnel_header(local, peer, DASHBOARD_TARGET, auth=TunnelAuth(token)))
        writer.write(
            f"GET {NODE_PATH} HTTP/1.1\r\nHost: mesh-agent\r\nAuthorization: Bearer {token}\r\n"
            "Accept: application/json\r\nConnection: close\r\n\r\n".encode()
        )
        raw = await reader.read(MAX_REPORT + 65536)
        while chunk := await reader.read(65536):
            raw += chunk
            if len(raw) > MAX_REPORT + 65536:
                raise ValueError(f"answer larger than {MAX_REPORT} bytes")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not raw:
        raise ValueError("the tunnel closed without an answer (refused: is this node's agent current?)")
    head, sep, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or not status[1].isdigit():
        raise ValueError("not an HTTP answer")
    if status[1] != b"200":
        raise ValueError(f"HTTP {status[1].decode()}")
    if b"transfer-encoding: chunked" in head.lower():
        raise ValueError("chunked answer not expected")
    doc = json.loads(body)
    if not isinstance(doc, dict) or doc.get("v") != 1 or not isinstance(doc.get("services"), list):
        raise ValueError("not a dashboard view (v 1)")
    return doc


# -- merging (pure) -------------------------------------------------------------------------------------------


def merge_node_views(
    own: Mapping[str, Any],
    others: Mapping[str, Mapping[str, Any] | None],
    nodes: Mapping[str, Mapping[str, Any]],
    *,
    now: float,
) -> dict[str, Any]:
    """One cluster view from the manager's own node view and the other nodes' (None: did not answer).

    ``nodes``: node id -> facts shown in the node's column header (addr, state, availability, reachable,
    error, age_seconds).  Each replica comes from its own node's view; a node that did not answer
    contributes the manager's own (remote) view of its replicas.
    """
    me = own["node"]
    answered = {me: own, **{n: v for n, v in others.items() if v is not None}}
    services: dict[tuple[str, int], dict[str, Any]] = {}
    order: list[tuple[str, int]] = []

    def entry(s: Mapping[str, Any]) -> dict[str, Any]:
        key = (s["name"], s["port"])
        if key not in services:
            order.append(key)
            services[key] = {
                **{k: s[k] for k in ("name", "port", "protocol", "listen_host", "bound_port", "listening")},
                "accepted": 0, "active": 0, "connections": 0, "bytes_in": 0, "bytes_out": 0, "retries": 0,
                "failed": {}, "connect_failures": {}, "healthy": 0, "endpoints": 0, "ingress": {}, "replicas": [],
                "http": None,
            }  # fmt: skip
        return services[key]

    for node_id, view in answered.items():
        for s in view["services"]:
            into = entry(s)
            into["listening"] = into["listening"] or s["listening"]
            for k in ("accepted", "retries"):
                into[k] += s[k]
            for field in ("failed", "connect_failures"):
                for reason, n in s[field].items():
                    into[field][reason] = into[field].get(reason, 0) + n
            if s.get("http") is not None:
                into["http"] = _add_http(into["http"], s["http"])
            into["ingress"][node_id] = {
                "accepted": s["accepted"],
                "failed": sum(s["failed"].values()),
                "listening": s["listening"],
            }
            for rep in s["replicas"]:
                if rep.get("via") is None and rep["node"] == node_id:
                    _add_replica(into, rep)
    # replicas of nodes that did not answer: as the manager sees them
    silent = {n for n in nodes if n not in answered}
    for s in own["services"]:
        into = entry(s)
        for rep in s["replicas"]:
            if rep["node"] in silent:
                _add_replica(into, rep)
    for s in services.values():
        s["replicas"].sort(key=lambda r: (r["node"], r["id"]))
        if s["http"] is not None:
            s["http"] = _finish_http(s["http"])
    node_ids = sorted(set(nodes) | set(answered), key=lambda n: (n != me, n))
    out = dict(own)
    out.update(
        scope="cluster",
        generated_at=now,
        nodes=[{"id": n, "self": n == me, **dict(nodes.get(n, {}))} for n in node_ids],
        services=[services[k] for k in sorted(order)],
    )
    return out


_HTTP_SUMS = ("requests", "active", "queued", "retries", "upstream_reused", "upstream_new", "upgrades")
_HTTP_BY = ("by_class", "by_method", "retries_by_reason", "generated")


def _add_http(into: dict[str, Any] | None, h: Mapping[str, Any]) -> dict[str, Any]:
    """Sum one node's http figures of a service (``mesh.metrics.http_summary`` plus hosts and paths) into
    ``into``: every node accepts requests for the service on its own published port.  The mean times are
    weighted by each node's requests (the upstream one by its requests sent upstream); hosts and paths are
    the service's rules, the same on every node."""
    if into is None:
        into = {k: h.get(k, 0) for k in _HTTP_SUMS}
        into.update({k: dict(h.get(k) or {}) for k in _HTTP_BY})
        into["hosts"], into["paths"] = list(h.get("hosts") or []), list(h.get("paths") or [])
        into["_weights"] = [0, 0.0, 0, 0.0]
    else:
        for k in _HTTP_SUMS:
            into[k] += h.get(k, 0)
        for k in _HTTP_BY:
            counts = into[k]
            for name, n in (h.get(k) or {}).items():
                counts[name] = counts.get(name, 0) + n
    w = into["_weights"]
    upstream = h.get("upstream_reused", 0) + h.get("upstream_new", 0)
    if h.get("duration_mean_seconds") is not None and h.get("requests"):
        w[0] += h["requests"]
        w[1] += h["duration_mean_seconds"] * h["requests"]
    if h.get("upstream_mean_seconds") is not None and upstream:
        w[2] += upstream
        w[3] += h["upstream_mean_seconds"] * upstream
    return into


def _finish_http(h: dict[str, Any]) -> dict[str, Any]:
    n, total, n_up, total_up = h.pop("_weights")
    h["duration_mean_seconds"] = round(total / n, 6) if n else None
    h["upstream_mean_seconds"] = round(total_up / n_up, 6) if n_up else None
    for k in ("by_method", "retries_by_reason", "generated"):
        h[k] = dict(sorted(h[k].items()))
    return h


def _add_replica(into: dict[str, Any], rep: Mapping[str, Any]) -> None:
    into["replicas"].append(dict(rep))
    into["active"] += rep["active"]
    into["connections"] += rep["connections"]
    into["bytes_in"] += rep["bytes_in"]
    into["bytes_out"] += rep["bytes_out"]
    into["endpoints"] += 1 if rep["listed"] else 0
    into["healthy"] += 1 if rep["listed"] and rep["state"] == "running" else 0


# -- the manager's collector ----------------------------------------------------------------------------------


class ClusterView:
    """The ``collect`` of a manager agent's ``mesh.dashboard.Dashboard``: its own node view, merged with the
    other nodes' (asked through their tunnels, at most every ``refresh`` seconds each, all at once).

    ``agent``: a ``meshagent.cluster.ClusterAgent`` (``manager``, ``node_id``, ``state.nodes``, ``token``).
    On a worker, or before the first cluster state, it is the node view alone."""

    def __init__(self, agent: Any, *, refresh: float = REFRESH, timeout: float = FETCH_TIMEOUT) -> None:
        self.agent = agent
        self.refresh = refresh
        self.timeout = timeout
        self._last: dict[str, tuple[float, dict[str, Any] | None, str | None]] = {}  # node -> (when, view, error)
        self.fetches = 0

    async def __call__(self, dashboard: Any) -> dict[str, Any]:
        own = await dashboard.node_view()
        state = getattr(self.agent, "state", None)
        if not self.agent.manager or state is None:
            return own
        now = time.monotonic()
        peers = {n.id: n for n in state.nodes if n.id != own["node"]}
        due = [n for n in peers.values() if n.tunnel and now - self._last.get(n.id, (-1e9,))[0] >= self.refresh]
        if due:
            results = await asyncio.gather(*(self._ask(n) for n in due))
            for n, (view, error) in zip(due, results, strict=True):
                prev = self._last.get(n.id)
                if view is None and prev is not None and prev[1] is not None and now - prev[0] < 3 * self.refresh:
                    view = prev[1]  # one missed answer: keep the last one a moment (marked by its error)
                self._last[n.id] = (now, view, error)
        for gone in [k for k in self._last if k not in peers]:
            del self._last[gone]
        others: dict[str, dict[str, Any] | None] = {}
        facts: dict[str, dict[str, Any]] = {
            own["node"]: {"addr": getattr(self.agent, "advertise", None), "role": "manager", "reachable": True}
        }
        for n in peers.values():
            when, view, error = self._last.get(n.id, (None, None, "no tunnel port (no agent there)"))
            others[n.id] = view
            facts[n.id] = {
                "addr": n.addr,
                "state": n.state,
                "availability": n.availability,
                "reachable": view is not None and error is None,
                "error": error,
                "asked_seconds_ago": None if when is None else round(now - when, 3),
            }
            if view is not None and view.get("cluster"):
                facts[n.id]["role"] = view["cluster"].get("role")
        # in the render thread: thousands of replicas per node are copied (the data plane shares this loop)
        return await run_off_loop(merge_node_views, own, others, facts, now=own["generated_at"])

    async def _ask(self, node: Any) -> tuple[dict[str, Any] | None, str | None]:
        self.fetches += 1
        try:
            return await fetch_node_view(node.addr, node.tunnel, self.agent.token, self.timeout), None
        except FetchError as exc:
            log.debug("dashboard: node %s (%s:%s) did not answer: %s", node.id, node.addr, node.tunnel, exc)
            return None, str(exc)
