"""The control plane: manager agents serve the cluster state, every agent subscribes.

Protocol (details in docs/cluster.md)::

    GET /v1/cluster?after=<digest>&wait=<seconds>[&delta=1]
    Authorization: Bearer <token>       [Accept-Encoding: gzip]

    200  {"digest": ..., "table": {...}, "nodes": {...}}   the current state, when its
         digest differs from ``after`` (at once) or as soon as it changes
    200  {"digest": ..., "base": <after>, "version": v, "services": {name: service | null},
          "nodes": {id: node | null}}   with delta=1, when the server still holds the
         state ``after`` names: only what changed since it
    204  nothing changed within ``wait`` (capped by the server's max_wait)
    400  bad query;  401  missing/wrong token;  503  shutting down

Why long-poll and not a stream: there is no framing, no heartbeat and no
per-subscriber cursor on the server (its memory per subscriber is one waiting
request); a subscriber that was away asks with its last digest and gets what it
misses in one round trip; bursts of changes coalesce (a subscriber receives the
latest, not every intermediate).  A manager that dies is seen at once (connection
refused/reset); one that hangs is seen after ``wait`` + a grace, and meanwhile the
subscriber keeps its last state.

Scale (docs/cluster.md, "Limits"): the server keeps the last ``history`` states by
digest; a subscriber whose ``after`` is one of them gets a delta (whole services
that changed, nodes that changed), one that missed more (or that comes from a
manager with other states) gets the full snapshot.  Digests are content hashes, so
a delta works across managers that saw the same states.  Each answer body is built
once per (state, base, encoding) and shared by every subscriber; bodies above 1 KiB
are gzip-compressed for clients that accept it.  A publish wakes the waiting
subscribers ``coalesce`` seconds later, so a burst of publishes is one wake-up.

Client rules:
- It starts at a random manager of the list (several managers share the subscribers)
  and asks one at a time; on any failure (connect, timeout, non-200/204, 401,
  malformed state, a delta that does not give the announced digest) it moves to the
  next manager after a capped exponential backoff with full jitter (the first retry
  comes within ``backoff_base``, so failover is fast, and a herd that lost its manager
  at the same moment comes back spread over the backoff window).
- It never applies anything on failure: the last good state stays in use while no
  manager answers.  It never applies a state equal (by digest) to the last one it
  applied, so equal states from different managers apply once.
- ``after`` is the digest string the server sent, not one the client computes, so
  agents of different versions cannot make each other spin.

TLS (optional, ``ControlTLS``; docs/cluster.md, "The control channel's TLS"): the server serves HTTPS with a
certificate and key from files; a client verifies it against a CA file and a fixed server name
(``DEFAULT_TLS_NAME``, not the address: managers come and go by address), and sends the token only after
the handshake verified.  With ``mutual`` the server also requires a client certificate from that CA.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import inspect
import json
import logging
import os
import random
import ssl
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import quote

from aiohttp import web

from mesh.errors import ConfigError, MeshError, ProtocolError
from mesh.headguard import HeadGuard
from mesh.routing import Service, TableError, format_hostport

from .state import ClusterState, ServicePart, parse_node, parse_service

__all__ = [
    "DEFAULT_CONTROL_PORT",
    "DEFAULT_TLS_NAME",
    "ControlAuthError",
    "ControlClient",
    "ControlClientStats",
    "ControlServer",
    "ControlServerStats",
    "ControlTLS",
    "ControlTLSError",
    "backoff_delay",
]

log = logging.getLogger(__name__)

DEFAULT_CONTROL_PORT = 7480
PATH = "/v1/cluster"
MAX_DIGEST_LENGTH = 128
DEFAULT_MAX_WAIT = 25.0
DEFAULT_MAX_RESPONSE = 32 * 1024 * 1024
DEFAULT_HISTORY = 32  # states a server can answer deltas from
DEFAULT_COALESCE = 0.02  # seconds from a publish to waking the subscribers
COMPRESS_MIN = 1024  # bodies below this are sent as they are
BACKLOG = 4096  # a restarted manager is reconnected to by every subscriber at about the same time
# Every node of the cluster can reach the control port: a request head (and, with TLS, the handshake) must end
# within this deadline from its first byte (the accept, for a connection's first), else 408 and close.  Only the
# head: a long-poll waits after it, up to ``wait`` seconds, and is never cut.
DEFAULT_HEAD_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024  # a whole request head (ours is ~250 bytes); aiohttp's own limits are per line and field
# The name a client checks in the managers' certificate (a DNS SAN).  Managers are reached by address (the
# engine's Swarm.RemoteManagers), and those change when nodes are promoted, demoted or readdressed: one
# cluster certificate carrying a fixed name, shared as a secret by every manager, keeps working through that,
# where IP SANs would need a new certificate for every manager change.  The trust is in the CA file.
DEFAULT_TLS_NAME = "mesh-control"


class ControlAuthError(MeshError):
    """A manager rejected our token (HTTP 401)."""


class ControlTLSError(ProtocolError):
    """The TLS handshake with a manager failed (its certificate did not verify, or it speaks plain HTTP):
    nothing was sent, least of all the token."""


def _read_pem(path: str, flag: str) -> None:
    """Check at start-up that ``path`` is a readable file, naming it and the flag otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read the file: {exc.strerror or exc}", source=path) from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag}: not a PEM file (no '-----BEGIN ' line)", source=path)


class ControlTLS:
    """TLS for the control channel: a server context (managers) and a client context (subscribers), both
    loaded from files once, at start-up (the only blocking reads).

    ``cert``/``key``: this node's certificate chain and its key (PEM): the managers' server certificate,
    and a subscriber's client certificate (presented when the manager asks for one).  ``ca``: the CA a
    client verifies the manager's certificate with (and, with ``mutual``, the manager a client's).
    ``name``: the name the manager's certificate must carry (a DNS SAN; ``DEFAULT_TLS_NAME``).
    Raises ``ConfigError`` naming the file (or the flag) for a missing or unreadable file, a key that does
    not match its certificate, or a combination that cannot work.
    """

    __slots__ = ("ca", "cert", "client", "key", "mutual", "name", "server")

    def __init__(
        self,
        ca: str,
        cert: str | None = None,
        key: str | None = None,
        *,
        name: str = DEFAULT_TLS_NAME,
        mutual: bool = False,
    ) -> None:
        if (cert is None) != (key is None):
            raise ConfigError("--control-tls-cert and --control-tls-key go together: give both or neither")
        if mutual and cert is None:
            raise ConfigError("--control-tls-mutual needs --control-tls-cert and --control-tls-key (the client's)")
        if not name:
            raise ConfigError("--control-tls-name must not be empty")
        self.ca, self.cert, self.key, self.name, self.mutual = ca, cert, key, name, mutual
        _read_pem(ca, "--control-tls-ca")
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            client.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"--control-tls-ca: no usable CA certificate: {exc}", source=ca) from exc
        self.server: ssl.SSLContext | None = None
        if cert is not None and key is not None:
            _read_pem(cert, "--control-tls-cert")
            _read_pem(key, "--control-tls-key")
            server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server.minimum_version = ssl.TLSVersion.TLSv1_2

            def no_password() -> str:  # OpenSSL would otherwise ask on the terminal
                raise ConfigError("--control-tls-key: the key is encrypted; give an unencrypted key", source=key)

            try:
                server.load_cert_chain(cert, key, password=no_password)
                client.load_cert_chain(cert, key, password=no_password)
            except ssl.SSLError as exc:
                if "KEY_VALUES_MISMATCH" in str(exc):
                    raise ConfigError(
                        f"--control-tls-key {key} is not the key of this certificate", source=cert
                    ) from exc
                raise ConfigError(
                    f"--control-tls-cert/--control-tls-key: cannot load the certificate and key ({key}): {exc}",
                    source=cert,
                ) from exc
            if mutual:
                server.verify_mode = ssl.CERT_REQUIRED
                server.load_verify_locations(cafile=ca)
            self.server = server
        self.client = client

    @classmethod
    def from_files(
        cls,
        ca: str | None,
        cert: str | None = None,
        key: str | None = None,
        *,
        name: str | None = None,
        mutual: bool = False,
    ) -> ControlTLS | None:
        """The TLS of the ``--control-tls-*`` flags; None (plain HTTP) when none is given.  Every node of a
        cluster gets the same flags (the role is known only at run time), so the CA is what turns TLS on."""
        if ca is None:
            if cert is not None or key is not None or mutual or name is not None:
                raise ConfigError(
                    "--control-tls-cert/-key/-name/-mutual need --control-tls-ca: every node verifies the "
                    "managers with it (give all nodes the same --control-tls-* flags)"
                )
            return None
        return cls(os.fspath(ca), cert, key, name=DEFAULT_TLS_NAME if name is None else name, mutual=mutual)

    def server_context(self) -> ssl.SSLContext:
        """The manager's context; ``ConfigError`` when this node has no certificate to serve."""
        if self.server is None:
            raise ConfigError(
                "this node is a manager: serving the control channel over TLS needs --control-tls-cert "
                "and --control-tls-key"
            )
        return self.server

    def __repr__(self) -> str:
        return f"<ControlTLS ca={self.ca} cert={self.cert} name={self.name} mutual={self.mutual}>"


def backoff_delay(failures: int, rng: random.Random, base: float = 0.1, cap: float = 10.0) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures.

    0 after none; else uniform in [0, min(cap, base * 2**(failures-1))) ("full jitter"):
    subscribers that failed at the same moment (their manager restarted) retry spread
    over the whole window instead of in a wave at its end.
    """
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** min(failures - 1, 30)) * rng.random()


def _bearer_ok(header: str | None, token_bytes: bytes) -> bool:
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), token_bytes)


class ControlServerStats:
    """Plain counters, exported by metrics at scrape time."""

    __slots__ = (
        "bad_requests", "bytes_sent", "changed", "deltas", "head_timeouts", "heads_too_large", "publishes",
        "requests", "snapshots", "unauthorized", "unchanged", "waiting", "wakeups",
    )  # fmt: skip

    def __init__(self) -> None:
        self.requests = 0
        self.unauthorized = 0
        self.bad_requests = 0
        self.changed = 0  # 200 answers (= deltas + snapshots)
        self.deltas = 0  # 200 answers that carried a delta
        self.snapshots = 0  # 200 answers that carried the whole state
        self.unchanged = 0  # 204 answers
        self.bytes_sent = 0  # bodies of 200 answers, as sent (compressed or not)
        self.publishes = 0  # publishes that changed the digest
        self.wakeups = 0  # times the waiting subscribers were woken (a burst of publishes is one)
        self.waiting = 0  # gauge: subscribers waiting now
        self.head_timeouts = 0  # connections closed (408) for a request head not complete within head_timeout
        self.heads_too_large = 0  # connections closed for a request head over MAX_HEAD bytes

    def __repr__(self) -> str:
        return (
            f"<ControlServerStats requests={self.requests} 200={self.changed} (delta {self.deltas}) "
            f"204={self.unchanged} 401={self.unauthorized} 400={self.bad_requests} waiting={self.waiting} "
            f"head_timeouts={self.head_timeouts}>"
        )


class _GuardedSite(web.BaseSite):
    """A site like aiohttp's ``TCPSite`` (or ``SockSite``, for a socket ``sock`` inherited through a handover)
    whose connections are ``_HeadGuard``s around the runner's request handlers.  It is one of the runner's
    ``sites`` with the asyncio server in ``_server``, like theirs: a handover lists and closes it the same way."""

    __slots__ = ("_control", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        control: ControlServer,
        sock: Any = None,
        *,
        ssl_context: ssl.SSLContext | None,
        backlog: int,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._control = control
        self._sock = sock

    @property
    def name(self) -> str:
        c = self._control
        return f"{'https' if self._ssl_context else 'http'}://{format_hostport(c.host, c.port)}"

    async def start(self) -> None:
        await super().start()
        handlers = self._runner.server
        assert handlers is not None
        control = self._control
        stats, timeout = control.stats, control.head_timeout

        def factory() -> _HeadGuard:
            return _HeadGuard(handlers(), stats, timeout)

        loop = asyncio.get_running_loop()
        # with TLS, asyncio's SSL protocol wraps the guard: it sees plaintext, from the end of the handshake,
        # which gets the same deadline (asyncio's default is 60 s)
        tls: dict[str, Any] = {} if self._ssl_context is None else {
            "ssl": self._ssl_context, "ssl_handshake_timeout": timeout}  # fmt: skip
        if self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog, **tls)
        else:
            self._server = await loop.create_server(
                factory, control.host, control.port, backlog=self._backlog, reuse_address=True, **tls
            )


class _HeadGuard(HeadGuard):
    """A control-port connection: ``HeadGuard``'s request-head deadline (mesh/headguard.py, shared with the
    admin API) and size cap, counted in ``ControlServerStats``.  Only the head is bounded: a long-poll waits
    after its head, up to ``wait`` seconds; requests to the control port carry no body."""

    __slots__ = ("stats",)

    max_head = MAX_HEAD

    def __init__(self, inner: asyncio.Protocol, stats: ControlServerStats, timeout: float) -> None:
        super().__init__(inner, timeout)
        self.stats = stats

    def __repr__(self) -> str:
        return f"<control connection in_head={self.in_head} head_bytes={self.head_bytes}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._start_head()
        self.inner.connection_made(transport)  # type: ignore[union-attr]

    def _timed_out(self) -> None:
        self.stats.head_timeouts += 1

    def _too_large(self) -> None:
        self.stats.heads_too_large += 1
        super()._too_large()


class ControlServer:
    """Serves the latest published ``ClusterState`` to subscribers (long-poll).

    ``publish(state)`` replaces the state and, when its digest changed, wakes every
    waiting subscriber ``coalesce`` seconds later (a burst is one wake-up).  Until the
    first publish, subscribers wait (a manager that has not built its state yet never
    serves an empty one).  ``history``: how many recent states deltas can start from.
    """

    def __init__(
        self,
        token: str,
        host: str = "0.0.0.0",
        port: int = DEFAULT_CONTROL_PORT,
        *,
        state: ClusterState | None = None,
        max_wait: float = DEFAULT_MAX_WAIT,
        history: int = DEFAULT_HISTORY,
        coalesce: float = DEFAULT_COALESCE,
        tls: ssl.SSLContext | None = None,
        head_timeout: float = DEFAULT_HEAD_TIMEOUT,
    ) -> None:
        if not token:
            raise ValueError("ControlServer needs a non-empty token")
        if max_wait <= 0:
            raise ValueError(f"max_wait must be > 0, got {max_wait!r}")
        if not 0 < head_timeout < float("inf"):
            raise ValueError(f"head_timeout must be > 0, got {head_timeout!r}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history!r}")
        if coalesce < 0:
            raise ValueError(f"coalesce must be >= 0, got {coalesce!r}")
        self._token = token.encode()
        self.host = host
        self.port = port
        self.max_wait = max_wait
        self.history = history
        self.coalesce = coalesce
        self.head_timeout = head_timeout
        self.tls = tls  # serve HTTPS with this context (``ControlTLS.server_context()``); None: plain HTTP
        self.stats = ControlServerStats()
        self._state: ClusterState | None = None
        self._digest = ""
        self._past: OrderedDict[str, ClusterState] = OrderedDict()  # digest -> state, oldest first
        self._bodies: dict[tuple[str, bool], tuple[bytes, bool]] = {}  # (base or "", gzip) -> (body, is delta)
        self._waiters: set[asyncio.Future[None]] = set()
        self._wake: asyncio.TimerHandle | None = None
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
        previous state's (only then are waiting subscribers woken)."""
        # services equal to the previous state's keep their serialised form
        state.reuse(self._state)
        digest = state.digest
        changed = digest != self._digest
        self._state = state
        self._digest = digest
        self._bodies = {}  # built on the first request for each (base, encoding)
        self._past.pop(digest, None)
        self._past[digest] = state
        while len(self._past) > self.history:
            self._past.popitem(last=False)
        if changed:
            self.stats.publishes += 1
            if self._waiters:
                self._schedule_wake()
        return changed

    def _schedule_wake(self) -> None:
        if self._wake is not None:
            return  # a wake-up is already due: this publish joins it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # published before the loop runs: nobody is waiting yet
        if self.coalesce > 0:
            self._wake = loop.call_later(self.coalesce, self._wake_all)
        else:
            self._wake_all()

    def _wake_all(self) -> None:
        self._wake = None
        self.stats.wakeups += 1
        waiters, self._waiters = self._waiters, set()
        for w in waiters:
            if not w.done():
                w.set_result(None)

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
        from mesh.listener import INHERITED

        # a socket handed over by the previous agent (meshagent/handover.py) keeps its accept queue
        inherited = INHERITED.take("stream", self.host, self.port) if self.port else None
        # TLS is per connection: an inherited socket serves it as well as a fresh one
        site = _GuardedSite(self._runner, self, inherited, backlog=BACKLOG, ssl_context=self.tls)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]
        log.info(
            "control server listening on %s (%s)",
            format_hostport(self.host, self.port),
            "plain HTTP"
            if self.tls is None
            else "TLS" + (", client certificates required" if self.tls.verify_mode == ssl.CERT_REQUIRED else ""),
        )

    async def stop(self) -> None:
        """Answer waiting subscribers with 503 and close."""
        self._closing = True
        if self._wake is not None:
            self._wake.cancel()
        self._wake_all()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def _answer(self, after: str, delta: bool, gz: bool) -> tuple[bytes, bool]:
        """The body for a subscriber at ``after``: a delta when asked for and ``after`` is a state we
        still hold (and the delta is smaller than the snapshot), else the snapshot.  Cached."""
        base = after if delta and after in self._past else ""
        key = (base, gz)
        hit = self._bodies.get(key)
        if hit is not None:
            return hit
        raw = self._bodies.get((base, False))
        if raw is None:
            assert self._state is not None
            body, is_delta = self._state.wire(self._digest), False
            if base:
                d = _delta_body(self._past[base], self._state, self._digest, base)
                if len(d) < len(body) // 2:
                    body, is_delta = d, True
            raw = self._bodies[(base, False)] = (body, is_delta)
        if not gz or len(raw[0]) < COMPRESS_MIN:
            hit = raw
        else:
            hit = (gzip.compress(raw[0], compresslevel=5, mtime=0), raw[1])
        self._bodies[key] = hit
        return hit

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
        delta = request.query.get("delta") == "1"
        gz = "gzip" in request.headers.get("Accept-Encoding", "")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait, self.max_wait)
        while True:
            if self._closing:
                return web.Response(status=503, text="shutting down\n")
            # while a wake-up is due (a burst is being coalesced) a subscriber that can wait joins it
            if self._state is not None and self._digest != after and (self._wake is None or loop.time() >= deadline):
                body, is_delta = self._answer(after, delta, gz)
                self.stats.changed += 1
                if is_delta:
                    self.stats.deltas += 1
                else:
                    self.stats.snapshots += 1
                self.stats.bytes_sent += len(body)
                headers = {"ETag": self._digest}
                if gz and len(body) and body[:2] == b"\x1f\x8b":
                    headers["Content-Encoding"] = "gzip"
                return web.Response(body=body, content_type="application/json", headers=headers)
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.stats.unchanged += 1
                return web.Response(status=204)
            waiter = loop.create_future()
            self._waiters.add(waiter)
            timer = loop.call_at(deadline, _resolve, waiter)
            self.stats.waiting += 1
            try:
                await waiter
            finally:
                self.stats.waiting -= 1
                timer.cancel()
                self._waiters.discard(waiter)

    def __repr__(self) -> str:
        tls = " tls" if self.tls is not None else ""
        return f"<ControlServer {format_hostport(self.host, self.port)}{tls} digest={self._digest or None}>"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _delta_body(base: ClusterState, new: ClusterState, digest: str, base_digest: str) -> bytes:
    """What changed from ``base`` to ``new``: whole services (their canonical JSON) and nodes."""
    old = {s.name: p.hash for s, p in zip(base.table.services, base.parts(), strict=True)}
    pieces = []
    names = set()
    for svc, part in zip(new.table.services, new.parts(), strict=True):
        names.add(svc.name)
        if old.get(svc.name) != part.hash:
            pieces.append(json.dumps(svc.name).encode() + b":" + part.json)
    for name in sorted(old.keys() - names):
        pieces.append(json.dumps(name).encode() + b":null")
    nodes: dict[str, Any] = {}
    if base.nodes is not new.nodes and base.nodes != new.nodes:
        old_nodes, new_nodes = base._nodes_by_id(), new._nodes_by_id()
        nodes = {nid: (n.to_dict() if n is not None else None)
                 for nid in sorted(old_nodes.keys() | new_nodes.keys())
                 if (n := new_nodes.get(nid)) != old_nodes.get(nid)}  # fmt: skip
    return b'{"base":%s,"digest":%s,"nodes":%s,"services":{%s},"version":%d}' % (
        json.dumps(base_digest).encode(), json.dumps(digest).encode(),
        json.dumps(nodes, sort_keys=True, separators=(",", ":")).encode(), b",".join(pieces), new.version)  # fmt: skip


ManagerList = Sequence[tuple[str, int]]
OnState = Callable[[ClusterState], Awaitable[None] | None]

MAX_RESPONSE_HEAD = 16 * 1024  # status line and headers of an answer
MAX_RESPONSE_HEADERS = 64


class _Answer(NamedTuple):
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes  # as sent (not decompressed)


class _Closed(ConnectionResetError):
    """The connection closed before any byte of the answer (a keep-alive connection the server had just
    closed): the request may be sent again on a new connection."""


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a manager, one request at a time.

    Rules: an answer is a status line and headers (at most ``MAX_RESPONSE_HEAD`` bytes, ``MAX_RESPONSE_HEADERS``
    lines), then a body framed by Content-Length, chunked transfer coding, or the end of the connection (then
    the connection is not reused; nor after ``Connection: close`` or HTTP/1.0).  204, 304 and 1xx have no body.
    A body larger than ``max_body`` bytes, bytes nobody asked for, or a malformed head end the connection with
    ``ProtocolError``.

    Why not aiohttp's client: a long-poll answer is one small response per change, and aiohttp's client
    request (URL and header building, timers, connection pool, response object) cost more CPU than all the
    rest of what a subscriber does per delta (docs/cluster.md, "Limits").
    """

    __slots__ = ("_body", "_buf", "_chunk", "_framing", "_fut", "_got", "_head", "_max", "_timer", "closed",
                 "keep", "transport")  # fmt: skip

    def __init__(self, max_body: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep = True  # may carry another request after this answer
        self._max = max_body
        self._buf = bytearray()
        self._fut: asyncio.Future[_Answer] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._framing: int | str = 0  # bytes of body expected, "chunked" or "close"
        self._chunk = -1  # chunked: bytes left of the current chunk (-1: at a size line)
        self._body = bytearray()
        self._got = False  # a byte of the current answer arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no subclass)

    async def request(self, head: bytes, timeout: float) -> _Answer:
        assert self.transport is not None and self._fut is None and not self.closed
        loop = asyncio.get_running_loop()
        self._fut = fut = loop.create_future()
        self._got = False
        self._head = None
        self._body = bytearray()
        self._timer = loop.call_later(timeout, self._fail, TimeoutError(f"no answer within {timeout:g}s"))
        self.transport.write(head)
        try:
            return await fut
        finally:
            self._timer.cancel()
            self._fut = self._timer = None

    def data_received(self, data: bytes) -> None:
        if self._fut is None or self._fut.done():
            self._fail(ProtocolError("manager sent bytes nobody asked for"))
            return
        self._got = True
        self._buf += data
        try:
            self._parse()
        except ProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep = False
        if self._fut is None or self._fut.done():
            return
        if self._head is not None and self._framing == "close":
            self._done(bytes(self._body))
        elif not self._got:
            self._fut.set_exception(_Closed("connection closed before the answer"))
        else:
            self._fut.set_exception(ProtocolError("connection closed in the middle of the answer"))

    def close(self) -> None:
        self.closed = True
        self.keep = False
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(exc)
        self.close()

    def _done(self, body: bytes) -> None:
        assert self._head is not None and self._fut is not None
        self._fut.set_result(_Answer(self._head[0], self._head[1], body))
        if self._buf:
            self.close()  # more than one answer to one request
        elif not self.keep:
            self.close()

    def _parse(self) -> None:
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    raise ProtocolError("answer head too large")
                return
            if end > MAX_RESPONSE_HEAD:
                raise ProtocolError("answer head too large")
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[: end + 4]
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
                raise ProtocolError(f"not an HTTP answer: {lines[0][:80]!r}")
            if len(lines) - 1 > MAX_RESPONSE_HEADERS:
                raise ProtocolError("too many headers in the answer")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise ProtocolError(f"malformed header line {line[:80]!r}")
                headers[name.lower()] = value.strip()
            status = int(code)
            self.keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            if 100 <= status < 200:
                raise ProtocolError(f"unexpected HTTP {status}")
            te = headers.get("transfer-encoding", "").lower()
            if status in (204, 304):
                self._framing = 0
            elif te:
                if te != "chunked":
                    raise ProtocolError(f"unsupported Transfer-Encoding {te!r}")
                self._framing, self._chunk = "chunked", -1
            elif "content-length" in headers:
                length = headers["content-length"]
                if not length.isdigit():
                    raise ProtocolError(f"bad Content-Length {length!r}")
                if int(length) > self._max:
                    raise ProtocolError(f"state too large ({length} bytes)")
                self._framing = int(length)
            else:
                self._framing = "close"
                self.keep = False
            self._head = (status, headers)
        framing = self._framing
        if isinstance(framing, int):
            if len(buf) >= framing:
                body = bytes(buf[:framing])
                del buf[:framing]
                self._done(body)
        elif framing == "close":
            self._body += buf
            buf.clear()
            if len(self._body) > self._max:
                raise ProtocolError(f"state larger than {self._max} bytes")
        else:
            self._parse_chunks()

    def _parse_chunks(self) -> None:
        buf = self._buf
        while True:
            if self._chunk == -1:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ProtocolError("chunk size line too long")
                    return
                size = bytes(buf[:end]).split(b";", 1)[0].strip()
                try:
                    n = int(size, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size[:20]!r}") from None
                if n < 0 or len(self._body) + n > self._max:
                    raise ProtocolError(f"state larger than {self._max} bytes")
                del buf[: end + 2]
                if n == 0:
                    self._chunk = -2  # trailers until an empty line
                else:
                    self._chunk = n
            if self._chunk == -2:
                if buf.startswith(b"\r\n"):
                    del buf[:2]
                    self._done(bytes(self._body))
                    return
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_RESPONSE_HEAD:
                        raise ProtocolError("chunked trailers too large")
                    return
                del buf[: end + 4]
                self._done(bytes(self._body))
                return
            if len(buf) < self._chunk + 2:
                return
            if buf[self._chunk : self._chunk + 2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            self._body += buf[: self._chunk]
            del buf[: self._chunk + 2]
            self._chunk = -1


def _gunzip(body: bytes, limit: int) -> bytes:
    """A gzip body, decompressed to at most ``limit`` bytes (a small body must not inflate without bound)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"bad gzip body: {exc}") from exc
    if len(out) > limit:
        raise ProtocolError(f"state larger than {limit} bytes")
    if not d.eof:
        raise ProtocolError("truncated gzip body")
    return out


class ControlClientStats:
    __slots__ = ("applied", "bytes_received", "deltas", "failovers", "failures", "polls", "snapshots", "tls_failures",
                 "unauthorized")  # fmt: skip

    def __init__(self) -> None:
        self.polls = 0
        self.tls_failures = 0  # handshakes that failed (certificate not verified, peer not TLS): no token sent
        self.applied = 0
        self.failures = 0
        self.unauthorized = 0
        self.failovers = 0
        self.deltas = 0  # 200 answers that were deltas
        self.snapshots = 0  # 200 answers that were whole states
        self.bytes_received = 0  # bodies of 200 answers, decompressed

    def __repr__(self) -> str:
        return (
            f"<ControlClientStats polls={self.polls} applied={self.applied} failures={self.failures} "
            f"unauthorized={self.unauthorized} failovers={self.failovers} deltas={self.deltas}>"
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
        tls: ControlTLS | None = None,
    ) -> None:
        if not token:
            raise ValueError("ControlClient needs a non-empty token")
        if any(c in token for c in "\r\n\0"):
            raise ValueError("ControlClient token must not contain CR, LF or NUL")
        self._managers = managers if callable(managers) else (lambda m=tuple(managers): m)
        self._token = token
        self._on_state = on_state
        self.wait = wait
        self.grace = grace
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_response = max_response
        self.tls = tls  # verify the managers with it and speak HTTPS; None: plain HTTP
        self._rng = rng or random.Random()
        self.stats = ControlClientStats()
        self.state: ClusterState | None = None
        self.manager: tuple[str, int] | None = None  # the manager that answered last
        self._applied_digest = ""
        self._after = ""  # the digest the server sent last (opaque to us)
        self._received: ClusterState | None = None  # the state ``_after`` names (a delta's base)
        # start at a random manager: the workers of a cluster spread over its managers
        self._index = self._rng.randrange(1 << 16)
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: _Connection | None = None  # kept alive to ``_conn_to`` between polls
        self._conn_to: tuple[str, int] | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("ControlClient already started")
        self._task = asyncio.create_task(self._run(), name="cluster-control-client")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._disconnect()

    def _disconnect(self) -> None:
        conn, self._conn, self._conn_to = self._conn, None, None
        if conn is not None:
            conn.close()

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
            except ControlTLSError as exc:
                self.stats.tls_failures += 1
                log.error("control: %s", exc)
                self._failure(manager, None)
                continue
            except (TimeoutError, OSError, ProtocolError, TableError) as exc:
                self._failure(manager, f"{type(exc).__name__}: {exc}")
                continue
            if self.manager != manager:
                log.info("control: subscribed to manager %s", format_hostport(*manager))
            self.manager = manager
            self._failures = 0
            if state is not None:
                await self._apply(state)

    def _failure(self, manager: tuple[str, int] | None, reason: str | None) -> None:
        # the next manager may hold other states: ask it for what we applied, as a full snapshot if need be.
        # The connection stays open when only the answer was bad (a transport error closed it already); it
        # is closed when the next attempt goes to another manager.
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
        self.stats.polls += 1
        query = f"after={quote(self._after, safe='')}&wait={self.wait:g}&delta=1"
        return self._receive(await self._request(manager, f"{PATH}?{query}"))

    def _receive(self, answer: _Answer) -> ClusterState | None:
        """The state one answer carries (None for 204); raises on a bad one (see ``_poll``)."""
        if answer.status == 204:
            return None
        if answer.status == 401:
            raise ControlAuthError("HTTP 401; check the cluster token secret")
        if answer.status != 200:
            raise ProtocolError(f"unexpected HTTP {answer.status}")
        body = answer.body
        encoding = answer.headers.get("content-encoding", "identity").lower()
        if encoding == "gzip":
            body = _gunzip(body, self.max_response)
        elif encoding != "identity":
            raise ProtocolError(f"unsupported Content-Encoding {encoding!r}")
        split = _split_compact(body)
        if split is not None:
            data, raw = split
        else:
            try:
                data, raw = json.loads(body), {}
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
        self.stats.bytes_received += len(body)
        if "base" in data:
            state = self._apply_delta(data, digest, raw)
            self.stats.deltas += 1
        else:
            state = ClusterState.from_dict(data)
            _prime_parts(state, data)
            self.stats.snapshots += 1
        self._after = digest
        self._received = state
        return state

    async def _request(self, manager: tuple[str, int], target: str) -> _Answer:
        """GET ``target`` from ``manager`` on the kept-alive connection (a new one if there is none).  A kept
        connection that the server closed before answering is replaced once: that is not a failure."""
        head = (f"GET {target} HTTP/1.1\r\nHost: {format_hostport(*manager)}\r\n"
                f"Authorization: Bearer {self._token}\r\nUser-Agent: mesh-agent\r\n"
                "Accept-Encoding: gzip\r\n\r\n").encode("utf-8", "surrogateescape")  # fmt: skip
        for _ in range(2):
            conn = self._conn
            reused = conn is not None and self._conn_to == manager and not conn.closed
            if not reused:
                self._disconnect()
                conn = await self._connect(manager)
            assert conn is not None
            try:
                answer = await conn.request(head, self.wait + self.grace)
            except _Closed as exc:
                self._disconnect()
                if reused:
                    continue
                if self.tls is None:
                    # what a TLS manager does with a plain request: closes without a byte
                    raise ProtocolError(
                        f"manager {format_hostport(*manager)} closed a new connection without answering: if it "
                        "serves the control port over TLS, give this node --control-tls-ca"
                    ) from exc
                # TLS 1.3: a manager with --control-tls-mutual refuses a client certificate after the handshake
                # ended on our side (the request, token included, went encrypted to the verified manager)
                raise ProtocolError(
                    f"manager {format_hostport(*manager)} closed a new TLS connection without answering: if it "
                    "requires client certificates (--control-tls-mutual), give this node --control-tls-cert and "
                    "--control-tls-key from its --control-tls-ca"
                ) from exc
            except BaseException:
                self._disconnect()
                raise
            if not conn.keep:
                self._disconnect()
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self, manager: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self.tls
        async with asyncio.timeout(self.connect_timeout):
            if tls is None:
                _, conn = await loop.create_connection(lambda: _Connection(self.max_response), *manager)
            else:
                # create_connection returns after the handshake verified the manager's certificate: the
                # token (in the request head) is never written to a peer that did not prove the name
                try:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self.max_response), *manager,
                        ssl=tls.client, server_hostname=tls.name, ssl_handshake_timeout=self.connect_timeout,
                    )  # fmt: skip
                except ssl.SSLCertVerificationError as exc:
                    raise ControlTLSError(
                        f"manager {format_hostport(*manager)}: its certificate did not verify against "
                        f"--control-tls-ca {tls.ca} for the name {tls.name!r} ({exc.verify_message}); "
                        "the token was not sent"
                    ) from exc
                except ssl.SSLError as exc:
                    if exc.reason == "WRONG_VERSION_NUMBER":
                        raise ControlTLSError(
                            f"manager {format_hostport(*manager)} answered the TLS handshake without TLS: it "
                            "serves the control port in plain HTTP (give the managers --control-tls-cert and "
                            "--control-tls-key); the token was not sent"
                        ) from exc
                    raise ControlTLSError(
                        f"manager {format_hostport(*manager)}: TLS handshake failed ({exc.reason or exc}): "
                        "does it serve the control port over TLS (--control-tls-cert/--control-tls-key), "
                        "and, with --control-tls-mutual there, is our --control-tls-cert from its CA? "
                        "The token was not sent"
                    ) from exc
        self._conn, self._conn_to = conn, manager
        return conn

    def _apply_delta(self, data: dict[str, Any], digest: str, raw: Mapping[str, bytes] = {}) -> ClusterState:
        """The state a delta describes, from the one it is based on; its content must hash to the
        announced digest (else: ProtocolError, and the next poll asks for a full snapshot).

        ``raw``: each changed service's bytes as received (``_split_compact``).  A service's hash is taken of
        them, not of a re-serialisation: the server sends its canonical form, so they are the bytes it hashed.
        Should they not be (a server that formats differently), the digest is checked once more over the
        canonical form before the delta is refused."""
        base = self._received
        if base is None or data.get("base") != self._after:
            self._after = ""  # we do not hold its base: ask for everything
            raise ProtocolError("delta from a state we do not hold")
        services, nodes, version = data.get("services"), data.get("nodes"), data.get("version")
        if not isinstance(services, dict) or not isinstance(nodes, dict) or not isinstance(version, int):
            raise ProtocolError("delta needs 'services' and 'nodes' objects and an integer 'version'")
        index, held = base._service_index(), base.table.services
        changes: dict[str, tuple[Service, ServicePart] | None] = {}
        for name, d in services.items():
            if d is None:
                changes[name] = None
                continue
            if not isinstance(d, dict) or d.get("name") != name:
                raise TableError(f"delta: service {name!r} is not a service object of that name")
            i = index.get(name)
            svc = parse_service(d, held[i] if i is not None else None)
            body = raw.get(name)
            changes[name] = (svc, ServicePart.raw(name, body) if body is not None else ServicePart.of(d))
        node_changes = {nid: (None if n is None else parse_node(nid, n)) for nid, n in nodes.items()}
        state = base.with_changes(version, changes, node_changes)
        if state.digest != digest and raw:
            # not the canonical bytes after all: the same content, hashed as the server should have
            canonical = {name: (None if v is None else (v[0], ServicePart.of(services[name])))
                         for name, v in changes.items()}  # fmt: skip
            state = base.with_changes(version, canonical, node_changes)
        if state.digest != digest:
            self._after = ""
            raise ProtocolError(f"delta gives digest {state.digest}, not the announced {digest}")
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


_DECODER = json.JSONDecoder()


def _split_compact(body: bytes) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """``json.loads(body)`` for a compact (no whitespace), ASCII JSON object, plus the bytes of each value of
    its top-level ``"services"`` object, when that is an object (a delta's): {name: bytes}.  Parsed once, by
    the C scanner, one value at a time.  None when the body is not of that shape (the caller then uses
    ``json.loads``, which names what is wrong)."""
    if not body.startswith(b"{") or not body.isascii():
        return None
    text = body.decode("ascii")
    scan = _DECODER.raw_decode
    out: dict[str, Any] = {}
    raw: dict[str, bytes] = {}
    try:
        i = 1
        while text[i] != "}":
            key, i = scan(text, i)
            if not isinstance(key, str) or text[i] != ":":
                return None
            i += 1
            if key == "services" and text[i] == "{":
                services: dict[str, Any] = {}
                raw = {}
                i += 1
                while text[i] != "}":
                    name, i = scan(text, i)
                    if not isinstance(name, str) or text[i] != ":":
                        return None
                    start = i + 1
                    value, i = scan(text, start)
                    services[name] = value
                    raw[name] = body[start:i]
                    if text[i] == ",":
                        i += 1
                        if text[i] == "}":
                            return None
                    elif text[i] != "}":
                        return None
                i += 1
                out[key] = services
            else:
                out[key], i = scan(text, i)
            if text[i] == ",":
                i += 1
                if text[i] == "}":
                    return None
            elif text[i] != "}":
                return None
        if i + 1 != len(text):
            return None
    except (ValueError, IndexError):
        return None
    return out, raw


def _prime_parts(state: ClusterState, data: dict[str, Any]) -> None:
    """Seed a received snapshot's per-service wire form from the JSON it came in (the server's
    canonical form), so that its digest and the next delta do not serialise it again."""
    by_name = {d.get("name"): d for d in data["table"].get("services", ()) if isinstance(d, dict)}
    if len(by_name) != len(state.table.services):
        return
    parts = []
    for svc in state.table.services:
        d = by_name.get(svc.name)
        if d is None:
            return
        parts.append(ServicePart.of(d))
    object.__setattr__(state, "_parts", tuple(parts))
