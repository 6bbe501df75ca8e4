"""The control plane: manager agents serve the cluster state, every agent subscribes.

Protocol (details in docs/cluster.md)::

    GET /v1/cluster?after=<digest>&wait=<seconds>
    Authorization: Bearer <token>

    200  {"digest": ..., "table": {...}, "nodes": {...}}   the current state, when its
         digest differs from ``after`` (at once) or as soon as it changes
    204  nothing changed within ``wait`` (capped by the server's max_wait)
    400  bad query;  401  missing/wrong token;  503  shutting down

Why long-poll and not a stream: every answer is a complete state, so there is no
framing, no heartbeat and no per-subscriber cursor on the server; the server keeps
no per-client state; a subscriber that was away asks with its last digest and
gets the current state in one round trip; bursts of changes coalesce (a subscriber
always receives the latest, not every intermediate).  The cost is one request per
change or per ``wait`` seconds, which is nothing at the rate a swarm changes.  A
manager that dies is seen at once (connection refused/reset); one that hangs is
seen after ``wait`` + a grace, and meanwhile the subscriber keeps its last state.

Client rules:
- It asks one manager at a time; on any failure (connect, timeout, non-200/204,
  401, malformed state) it moves to the next manager after a capped exponential
  backoff with jitter (the first retry comes quickly so failover is fast).
- It never applies anything on failure: the last good state stays in use while no
  manager answers.  It never applies a state equal (by digest) to the last one it
  applied, so equal states from different managers apply once.
- ``after`` is the digest string the server sent, not one the client computes, so
  agents of different versions cannot make each other spin.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from mesh.errors import MeshError, ProtocolError
from mesh.routing import TableError, format_hostport

from .state import ClusterState

__all__ = [
    "DEFAULT_CONTROL_PORT",
    "ControlAuthError",
    "ControlClient",
    "ControlClientStats",
    "ControlServer",
    "ControlServerStats",
    "backoff_delay",
]

log = logging.getLogger(__name__)

DEFAULT_CONTROL_PORT = 7480
PATH = "/v1/cluster"
MAX_DIGEST_LENGTH = 128
DEFAULT_MAX_WAIT = 25.0
DEFAULT_MAX_RESPONSE = 32 * 1024 * 1024


class ControlAuthError(MeshError):
    """A manager rejected our token (HTTP 401)."""


def backoff_delay(failures: int, rng: random.Random, base: float = 0.1, cap: float = 10.0) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures.

    0 after none; else min(cap, base * 2**(failures-1)) scaled by a random factor in
    [0.5, 1.0) so that many subscribers do not retry in lock step.
    """
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** min(failures - 1, 30)) * (0.5 + rng.random() / 2)


def _bearer_ok(header: str | None, token_bytes: bytes) -> bool:
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), token_bytes)


class ControlServerStats:
    """Plain counters, exported by metrics at scrape time."""

    __slots__ = ("bad_requests", "changed", "requests", "unauthorized", "unchanged")

    def __init__(self) -> None:
        self.requests = 0
        self.unauthorized = 0
        self.bad_requests = 0
        self.changed = 0  # 200 answers
        self.unchanged = 0  # 204 answers

    def __repr__(self) -> str:
        return (
            f"<ControlServerStats requests={self.requests} 200={self.changed} 204={self.unchanged} "
            f"401={self.unauthorized} 400={self.bad_requests}>"
        )


class ControlServer:
    """Serves the latest published ``ClusterState`` to subscribers (long-poll).

    ``publish(state)`` replaces the state and, when its digest changed, answers every
    waiting subscriber.  Until the first publish, subscribers wait (a manager that
    has not built its state yet never serves an empty one).
    """

    def __init__(
        self,
        token: str,
        host: str = "0.0.0.0",
        port: int = DEFAULT_CONTROL_PORT,
        *,
        state: ClusterState | None = None,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        if not token:
            raise ValueError("ControlServer needs a non-empty token")
        if max_wait <= 0:
            raise ValueError(f"max_wait must be > 0, got {max_wait!r}")
        self._token = token.encode()
        self.host = host
        self.port = port
        self.max_wait = max_wait
        self.stats = ControlServerStats()
        self._state: ClusterState | None = None
        self._digest = ""
        self._body = b""
        self._changed = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None
        if state is not None:
            self.publish(state)

    @property
    def state(self) -> ClusterState | None:
        return self._state

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (port 0 resolved after ``start()``)."""
        return (self.host, self.port)

    def publish(self, state: ClusterState) -> bool:
        """Make ``state`` the served one.  Returns True when its digest differs from the
        previous state's (only then are waiting subscribers answered)."""
        digest = state.digest
        self._state = state
        changed = digest != self._digest
        self._digest = digest
        # Serialised once per publish, shared by every subscriber.
        body = state.to_dict()
        body["digest"] = digest
        self._body = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if changed:
            ev, self._changed = self._changed, asyncio.Event()
            ev.set()
        return changed

    async def start(self) -> None:
        app = web.Application(client_max_size=1024)
        app.router.add_get(PATH, self._handle)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            max_line_size=4096,
            max_field_size=4096,
            max_headers=32,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]
        log.info("control server listening on %s", format_hostport(self.host, self.port))

    async def stop(self) -> None:
        """Answer waiting subscribers with 503 and close."""
        self._closing = True
        self._changed.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        if not _bearer_ok(request.headers.get("Authorization"), self._token):
            self.stats.unauthorized += 1
            log.debug("control: 401 for %s", request.remote)
            return web.Response(status=401, text="bad or missing token\n", headers={"WWW-Authenticate": "Bearer"})
        after = request.query.get("after", "")
        try:
            wait = float(request.query.get("wait", self.max_wait))
        except ValueError:
            wait = -1.0
        if len(after) > MAX_DIGEST_LENGTH or not after.isascii() or not (0 <= wait < float("inf")):
            self.stats.bad_requests += 1
            return web.Response(status=400, text="expected ?after=<digest>&wait=<seconds>\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait, self.max_wait)
        while True:
            if self._closing:
                return web.Response(status=503, text="shutting down\n")
            if self._state is not None and self._digest != after:
                self.stats.changed += 1
                return web.Response(body=self._body, content_type="application/json", headers={"ETag": self._digest})
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.stats.unchanged += 1
                return web.Response(status=204)
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def __repr__(self) -> str:
        return f"<ControlServer {format_hostport(self.host, self.port)} digest={self._digest or None}>"


ManagerList = Sequence[tuple[str, int]]
OnState = Callable[[ClusterState], Awaitable[None] | None]


class ControlClientStats:
    __slots__ = ("applied", "failovers", "failures", "polls", "unauthorized")

    def __init__(self) -> None:
        self.polls = 0
        self.applied = 0
        self.failures = 0
        self.unauthorized = 0
        self.failovers = 0

    def __repr__(self) -> str:
        return (
            f"<ControlClientStats polls={self.polls} applied={self.applied} failures={self.failures} "
            f"unauthorized={self.unauthorized} failovers={self.failovers}>"
        )


class ControlClient:
    """Subscribes to the managers' cluster state and calls ``on_state`` for each new one.

    ``managers``: a list of (host, control port), or a callable returning one (asked
    before every attempt, so a changing Swarm.RemoteManagers is followed).
    ``on_state(state)`` may be sync or async; an exception in it is logged and the
    state still counts as applied (re-sending the same state would fail again).
    """

    def __init__(
        self,
        managers: ManagerList | Callable[[], ManagerList],
        token: str,
        on_state: OnState,
        *,
        wait: float = 20.0,
        grace: float = 5.0,
        connect_timeout: float = 3.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        max_response: int = DEFAULT_MAX_RESPONSE,
        rng: random.Random | None = None,
    ) -> None:
        if not token:
            raise ValueError("ControlClient needs a non-empty token")
        self._managers = managers if callable(managers) else (lambda m=tuple(managers): m)
        self._token = token
        self._on_state = on_state
        self.wait = wait
        self.grace = grace
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_response = max_response
        self._rng = rng or random.Random()
        self.stats = ControlClientStats()
        self.state: ClusterState | None = None
        self.manager: tuple[str, int] | None = None  # the manager that answered last
        self._applied_digest = ""
        self._after = ""  # the digest the server sent last (opaque to us)
        self._index = 0
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("ControlClient already started")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=self.connect_timeout + self.wait + self.grace,
                connect=self.connect_timeout,
                sock_read=self.wait + self.grace,
            ),
            headers={"Authorization": f"Bearer {self._token}", "User-Agent": "mesh-agent"},
        )
        self._task = asyncio.create_task(self._run(), name="cluster-control-client")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        while True:
            delay = backoff_delay(self._failures, self._rng, self.backoff_base, self.backoff_cap)
            if delay:
                await asyncio.sleep(delay)
            try:
                managers = list(self._managers())
            except Exception:
                # A provider that reads the engine may fail; that must not end the subscription.
                log.exception("control: listing managers failed")
                managers = []
            if not managers:
                self._failure(None, "no managers known")
                continue
            manager = managers[self._index % len(managers)]
            try:
                state = await self._poll(manager)
            except asyncio.CancelledError:
                raise
            except ControlAuthError as exc:
                self.stats.unauthorized += 1
                log.error("control: manager %s rejected our token: %s", format_hostport(*manager), exc)
                self._failure(manager, None)
                continue
            except (aiohttp.ClientError, TimeoutError, OSError, ProtocolError, TableError) as exc:
                self._failure(manager, f"{type(exc).__name__}: {exc}")
                continue
            if self.manager != manager:
                log.info("control: subscribed to manager %s", format_hostport(*manager))
            self.manager = manager
            self._failures = 0
            if state is not None:
                await self._apply(state)

    def _failure(self, manager: tuple[str, int] | None, reason: str | None) -> None:
        self.stats.failures += 1
        self._failures += 1
        self._index += 1
        if manager is not None:
            self.stats.failovers += 1
        if reason is not None:
            where = format_hostport(*manager) if manager else "-"
            log.warning(
                "control: manager %s failed (%s); keeping state %s, trying the next one",
                where,
                reason,
                self.state.digest if self.state else None,
            )

    async def _poll(self, manager: tuple[str, int]) -> ClusterState | None:
        """One long-poll.  Returns the new state, or None when nothing changed."""
        assert self._session is not None
        self.stats.polls += 1
        url = f"http://{format_hostport(*manager)}{PATH}"
        params = {"after": self._after, "wait": f"{self.wait:g}"}
        async with self._session.get(url, params=params, allow_redirects=False) as resp:
            if resp.status == 204:
                return None
            if resp.status == 401:
                raise ControlAuthError("HTTP 401; check the cluster token secret")
            if resp.status != 200:
                raise ProtocolError(f"unexpected HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > self.max_response:
                raise ProtocolError(f"state too large ({resp.content_length} bytes)")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > self.max_response:
                    raise ProtocolError(f"state larger than {self.max_response} bytes")
        try:
            data: Any = json.loads(body)
        except ValueError as exc:
            raise ProtocolError(f"state is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ProtocolError("state is not a JSON object")
        digest = data.get("digest")
        if not isinstance(digest, str) or not digest or len(digest) > MAX_DIGEST_LENGTH:
            raise ProtocolError("state has no valid 'digest'")
        if digest == self._after:
            # A correct server never answers 200 with the digest we already hold;
            # treating it as a failure keeps a broken one from making us spin.
            raise ProtocolError("answered 200 with an unchanged digest")
        state = ClusterState.from_dict(data)
        self._after = digest
        return state

    async def _apply(self, state: ClusterState) -> None:
        digest = state.digest
        if digest == self._applied_digest:
            return
        self._applied_digest = digest
        self.state = state
        self.stats.applied += 1
        try:
            res = self._on_state(state)
            if inspect.isawaitable(res):
                await res
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control: applying cluster state %s failed", digest)

    def __repr__(self) -> str:
        mgr = format_hostport(*self.manager) if self.manager else None
        return f"<ControlClient manager={mgr} digest={self._applied_digest or None} failures={self._failures}>"
