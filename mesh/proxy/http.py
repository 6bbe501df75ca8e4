"""The HTTP/1.1 front: requests balanced one by one, routed by Host and path.

A listener of protocol "http" serves the routes of every service that shares its
port (``Listener.bindings``); each accepted connection gets an ``HttpConnection``
with one llhttp parser (httptools, every leniency off).

0. Incoming PROXY headers (``accept_proxy``, rules in ``mesh.proxy.inbound``;
   the port's networks are the union of its routes'): a trusted peer's
   connection must begin with a v1/v2 header, complete ``HEADER_TIMEOUT``
   seconds after accept; its source address becomes ``client`` for
   everything after (forwarding fields and the ``http_trusted`` decision,
   the hash and sticky key, the PROXY header to replicas, the tunnel header,
   the access log).  An untrusted peer is served as a direct client unless it
   starts with a PROXY signature.  Refusals close the connection without a
   response (it is not HTTP yet) and are counted in ``listener.inbound_stats``.

Per request:

1. Head phase.  The head (request line + fields) must be complete within
   ``http_head_timeout`` seconds from its first byte (a deadline, not an
   inactivity timer: slowloris), at most ``http_max_head`` bytes and
   ``http_max_headers`` fields (431; a request target over the size is 414).
   Between requests the client may stay quiet for ``http_keepalive_timeout``.
   These connection-level settings come from the port's first binding (the
   services sharing a port are sorted by name).
2. Framing checks, before anything goes upstream (request smuggling, RFC 9112
   6.1 and 6.3): Content-Length with Transfer-Encoding, differing or repeated
   Content-Length and obs-fold are refused by llhttp (400); Transfer-Encoding
   other than exactly ``chunked`` is 501 and Transfer-Encoding on an HTTP/1.0
   request is 400; a 1.1 request without Host is 400; CONNECT is 501.  Every
   such error closes the connection after the generated response.
3. Routing (``RouteTable``): the most specific host rule first (exact name,
   then the longest wildcard suffix, then the rules without hosts), and within
   it the longest path prefix ("/api" covers "/api", "/api/x" and "/api?x", not
   "/apix"); a less specific host rule is tried when no path of a more specific
   one matches.  Nothing: 404 from the mesh.
4. The head sent upstream is rebuilt: the fields named in ``Connection`` and
   the hop-by-hop ones (Connection, Keep-Alive, Proxy-Connection, TE, Upgrade
   unless upgrading, Transfer-Encoding, Proxy-Authorization) are dropped;
   X-Forwarded-For/-Proto/-Host/-Port and ``Forwarded`` (RFC 7239) are set.  A
   client inside ``http_trusted`` has its incoming forwarding fields kept and
   extended; anyone else's are replaced.  The client is the connection's peer,
   or the address an accepted PROXY header carried (rule 0): the balancer in
   front is an L4 hop and not a forwarder by itself.  A chunked body is re-chunked
   (chunk extensions dropped, trailers passed on), so the replica never sees
   the client's framing, only ours.
5. Balancing per request: the route's balancer chooses among its usable hosts
   with ``host.active`` counting in-flight requests; ``http_hash_key``
   (header:/cookie:) keys the hash balancer; a sticky cookie pins a client to
   a replica while that replica is live and usable.  ``http_max_inflight``
   caps the requests per replica; beyond it requests wait in a bounded queue
   (``http_queue`` per route, ``http_queue_timeout``) and then get 503.
6. Upstream connections are kept per host (``Host.idle``: LIFO, at most
   ``http_pool_max_idle``, closed after ``http_pool_idle_timeout`` idle; the age
   is checked on reuse and one sweep timer per listener closes the stale ones).
   A draining or removed host gets no new request and its idle connections are
   closed at once (``Pool.on_change``).  A service with ``proxy_protocol`` gets
   no pooling: each request has its own upstream connection carrying its
   client's PROXY header (``Connection: close`` upstream).
7. Retries: a failed connect is retried on another host (``retries``); a
   reused connection that fails before any response byte is retried once on a
   new connection when the method is idempotent and the body was kept (at most
   ``RETRY_BODY_LIMIT`` bytes); statuses in ``http_retry_on`` are retried on
   another host under the same conditions, within a budget (retries in flight
   <= max(``MIN_RETRY_CONCURRENCY``, ``http_retry_budget`` % of the route's
   requests in flight)).  Nothing is retried once a response byte reached the
   client.
8. Responses: the status line and fields pass through, less the hop-by-hop
   ones; the mesh sets ``Connection`` for the client; a chunked response to an
   HTTP/1.0 client is sent unchunked and the connection closed.  A response to
   HEAD has no body (llhttp cannot know that: httptools#47): the response
   parser is replaced after the head, and a pooled connection that sends bytes
   while idle is closed.  1xx responses (100-continue) pass through.
9. Upgrades (WebSocket): a request with ``Upgrade`` keeps its Upgrade and
   ``Connection: upgrade`` fields; after a 101 the two connections are handed to
   the shared ``Splice`` (idle timeout, backpressure, half-close, drain) with
   whatever bytes either side already sent.
10. Pipelining: requests are answered in order, one at a time per connection;
   once ``PIPELINE_DEPTH`` requests wait, reading pauses.  Bodies stream both ways
   with backpressure (a side whose write buffer passes ``WRITE_HIGH`` pauses
   reading the other).

Closing while the client may still be sending a body the mesh will not read (413,
or a response that came before the request body was read) is a lingering close:
the mesh half-closes after the response and reads and discards until the client
closes, at most ``LINGER_TIME`` seconds and ``LINGER_BYTES`` bytes, so the client
reads the response instead of a reset.

Generated responses carry a short plain body and are counted by reason
(``HttpStats.generated``): 400 bad_request, 404 no_route, 405/501
not_implemented, 408 head_timeout, 413 body_too_large, 414/431 head_too_large,
502 upstream_failed, 503 no_endpoint / queue_full / queue_timeout, 504
upstream_timeout.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools

from mesh import logs
from mesh.proxy import inbound
from mesh.proxy.dial import RESOURCES_RETRY, connect_failure_reason
from mesh.proxy.inbound import InboundProxy, InboundProxyError, listener_networks, trusted_networks
from mesh.proxy.preamble import replica_header
from mesh.proxy.splice import WRITE_HIGH, Splice, keepalive, keepalive_useful, reset
from mesh.stats import Histogram, InboundStats

if TYPE_CHECKING:
    from mesh.host import Host
    from mesh.listener import Binding, Listener
    from mesh.pool import Pool

__all__ = [
    "HTTP_BUCKETS",
    "PIPELINE_DEPTH",
    "RETRY_BODY_LIMIT",
    "HttpConnection",
    "HttpStats",
    "RouteTable",
    "http_front",
    "http_stats",
]

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 2  # requests read ahead of the one being answered before reading pauses
RETRY_BODY_LIMIT = 64 * 1024  # request bodies kept for a retry
LINGER_TIME = 5.0  # lingering close (HttpConnection._close): the longest wait for the client to stop sending
LINGER_BYTES = 64 << 20  # ... and the most bytes read and discarded meanwhile (more than socket buffers hold)
FORWARDING_CACHE = 16  # Hosts per connection whose forwarding fields are kept
COALESCE_COPY = 16 * 1024  # a response head and body piece up to this size are joined into one write
_NEVER = float("inf")
BODY_PAUSE = 256 * 1024  # request body bytes buffered before upstream is ready: then reading pauses
MIN_RETRY_CONCURRENCY = 3
# Sub-millisecond proxies need fine buckets (seconds).
HTTP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
_METHOD_LABEL = {m.encode(): m for m in METHODS}
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
        b"proxy-authorization", b"proxy-authenticate",
    }
)  # fmt: skip
_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"forwarded"}
)
_REQ_SPECIAL = _HOP | _FORWARDING | {b"host"}  # request fields the rebuilt head does not copy as they are
_CONN_PLAIN = frozenset({b"close", b"keep-alive", b"upgrade", b""})  # Connection tokens that name no field
_RESP_SPECIAL = _HOP | {b"content-length"}  # response fields looked at while the head is rebuilt

_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _generated(status: int, close: bool) -> bytes:
    body = f"{status} {_REASONS[status]}\n".encode()
    conn = b"close" if close else b"keep-alive"
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
        b"connection: %s\r\ncache-control: no-store\r\n\r\n%s"
    ) % (status, _REASONS[status].encode(), len(body), conn, body)


# Built at import: (status, close) -> the whole response.
_RESPONSES = {(s, c): _generated(s, c) for s in _REASONS for c in (False, True)}


class HttpStats:
    """Per route (``Pool``) counters of the HTTP front, read by ``mesh.metrics`` at scrape time.
    ``requests[(method, status_class)]``: finished requests (method one of ``METHODS`` or "other",
    class "1xx".."5xx"); ``generated[(status, reason)]``: responses the mesh made itself."""

    __slots__ = (
        "active",
        "duration",
        "generated",
        "pool_new",
        "pool_reused",
        "queued",
        "requests",
        "retries",
        "retries_active",
        "upgrades",
        "upstream_time",
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.generated: dict[tuple[int, str], int] = {}
        self.retries: dict[str, int] = {}
        self.active = 0
        self.queued = 0
        self.retries_active = 0
        self.pool_new = 0
        self.pool_reused = 0
        self.upgrades = 0
        self.duration = Histogram(HTTP_BUCKETS)
        self.upstream_time = Histogram(HTTP_BUCKETS)

    def __repr__(self) -> str:
        return (
            f"<HttpStats active={self.active} requests={sum(self.requests.values())} "
            f"generated={self.generated} retries={self.retries} reused={self.pool_reused} new={self.pool_new}>"
        )


def http_stats(pool: Pool) -> HttpStats:
    """The ``HttpStats`` of a route (made on first use; it lives as long as the pool)."""
    st = getattr(pool, "http", None)
    if st is None:
        st = pool.http = HttpStats()  # type: ignore[attr-defined]
    return st


class ListenerHttpStats:
    """Per http listener: connections closed before any route was known, by reason."""

    __slots__ = ("closed", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.closed: dict[tuple[int, str], int] = {}

    def __repr__(self) -> str:
        return f"<ListenerHttpStats requests={self.requests} closed={self.closed}>"


# -- routing ---------------------------------------------------------------------------------------
class RouteTable:
    """Host and path rules of one http listener's bindings (module docstring, rule 3)."""

    __slots__ = ("any", "bindings", "exact", "only", "wildcards")

    def __init__(self, bindings: tuple[Binding, ...]) -> None:
        self.bindings = bindings
        exact: dict[str, list[tuple[str, Binding]]] = {}
        wild: dict[str, list[tuple[str, Binding]]] = {}
        anyhost: list[tuple[str, Binding]] = []
        for b in bindings:
            m = b.route.match
            paths = m.paths or ("/",)
            for h in m.hosts or ("",):
                for p in paths:
                    if not h:
                        anyhost.append((p, b))
                    elif h.startswith("*."):
                        wild.setdefault(h[1:], []).append((p, b))  # ".example.com"
                    else:
                        exact.setdefault(h, []).append((p, b))

        def order(rules: list[tuple[str, Binding]]) -> tuple[tuple[str, Binding], ...]:
            return tuple(sorted(rules, key=lambda r: -len(r[0])))

        self.exact = {h: order(r) for h, r in exact.items()}
        self.wildcards = tuple((s, order(r)) for s, r in sorted(wild.items(), key=lambda kv: -len(kv[0])))
        self.any = order(anyhost)
        # One route for any host and every path (the common single service on a port): any origin-form
        # target is that route's, without looking at the host or decoding the path.
        self.only: Binding | None = None
        if not self.exact and not self.wildcards and len(self.any) == 1 and self.any[0][0] == "/":
            self.only = self.any[0][1]

    @staticmethod
    def _path(rules: tuple[tuple[str, Binding], ...], path: str) -> Binding | None:
        for prefix, b in rules:
            if path.startswith(prefix):
                n = len(prefix)
                if n == len(path) or prefix[-1] == "/" or path[n] in "/?":
                    return b
        return None

    def lookup(self, host: str, path: str) -> Binding | None:
        if host:
            rules = self.exact.get(host)
            if rules is not None:
                b = self._path(rules, path)
                if b is not None:
                    return b
            for suffix, rules in self.wildcards:
                if host.endswith(suffix) and len(host) > len(suffix):
                    b = self._path(rules, path)
                    if b is not None:
                        return b
        return self._path(self.any, path)


_HOSTS: dict[bytes, str] = {}  # Host field -> routing name: the same few values on every request (bounded)


def _host_of(value: bytes) -> str:
    name = _HOSTS.get(value)
    if name is None:
        if len(_HOSTS) >= 4096:
            _HOSTS.clear()
        name = _HOSTS[value] = _host_name(value)
    return name


def _host_name(value: bytes) -> str:
    """The routing name of a Host field: lower-cased, without port and trailing dot."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    i = text.rfind(":")
    if i >= 0:
        text = text[:i]
    return text.rstrip(".")


@functools.lru_cache(maxsize=4096)
def _sticky_id(endpoint_id: str) -> bytes:
    """The sticky cookie's value for an endpoint: a digest, so the cookie does not show container ids."""
    return hashlib.sha256(endpoint_id.encode()).hexdigest()[:16].encode()


def _sticky_value(host: Host) -> bytes:
    return _sticky_id(host.endpoint.id)


def _cookie(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == b"cookie":
            for part in v.split(b";"):
                n, eq, val = part.strip().partition(b"=")
                if eq and n == name:
                    return val.strip().strip(b'"')
    return None


# -- one request ----------------------------------------------------------------------------------
class Exchange:
    """One request and its response on an ``HttpConnection``."""

    __slots__ = (
        "binding",
        "body_done",
        "body_in",
        "body_out",
        "chunked",
        "clen",
        "close_after",
        "conn",
        "conn_tokens",
        "endpoint",
        "head_out",
        "headers",
        "host",
        "hostname",
        "keep_alive",
        "kept",
        "method",
        "pending",
        "pool",
        "queued_at",
        "response_started",
        "retries",
        "retry_counted",
        "set_cookie",
        "started",
        "stats",
        "status",
        "t_sent",
        "task",
        "timer",
        "trailers",
        "tried",
        "up",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # (lower-cased name, value) in order
        self.trailers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.hostname = ""
        self.keep_alive = True
        self.chunked = False
        self.clen = -1
        self.upgrade = False
        self.conn_tokens: frozenset[bytes] | set[bytes] | None = None  # fields named in Connection
        self.binding: Binding | None = None
        self.pool: Pool | None = None  # set while the request counts in the route's stats
        self.stats: HttpStats | None = None  # the route's HttpStats (set with pool)
        self.host: Host | None = None  # set while the request counts in host.active
        self.endpoint: str | None = None  # the id of the last endpoint it went to (access log)
        self.up: UpstreamConn | None = None
        self.task: asyncio.Task | None = None  # a connect under way
        self.head_out = b""
        self.pending: bytearray | None = bytearray()  # body bytes not yet written upstream (None once attached)
        self.kept: bytearray | None = bytearray()  # the body as sent, for a retry (None: too large to keep)
        self.body_in = 0
        self.body_out = 0  # response bytes to the client
        self.body_done = False  # the whole request was read
        self.response_started = False
        self.close_after = False
        self.status = 0
        self.started = time.monotonic()
        self.t_sent = 0.0
        self.timer: asyncio.TimerHandle | None = None  # response timeout, or queue timeout
        self.tried: list[Host] = []
        self.retries = 0
        self.retry_counted = False
        self.set_cookie: bytes | None = None
        self.queued_at = 0.0

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.url[:60]!r} status={self.status}>"


# -- the upstream side --------------------------------------------------------------------------------
class UpstreamConn(asyncio.Protocol):
    """One connection to a host; carries one exchange at a time and may be kept in ``Host.idle``."""

    __slots__ = (
        "chunked_out",
        "closed",
        "done",
        "ex",
        "front",
        "got_bytes",
        "host",
        "last_used",
        "made",
        "no_body",
        "parser",
        "paused",
        "resp_headers",
        "reusable",
        "reused",
        "status",
        "trailers",
        "transport",
    )

    def __init__(self, front: HttpFront, host: Host) -> None:
        self.front = front
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.made = False
        self.closed = False
        self.last_used = 0.0
        self.reused = False
        self.reusable = True
        self.paused = False
        self.status = 0
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.chunked_out = False
        self.no_body = False
        self.got_bytes = False
        self.done = False  # the response is complete (acted on once feed_data returns)
        self.trailers: list[tuple[bytes, bytes]] = []

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            # Bytes on an idle connection: the replica broke framing (or closes with a message).
            self.close()
            return
        self.got_bytes = True
        # What this read makes for the client (the response head, body bytes, the last chunk) is collected
        # and written once at the end: one send per upstream read rather than one per piece.
        conn = ex.conn
        conn._wbuf = []
        try:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                if self.ex is ex and self.status == 101 and ex.upgrade:
                    off = exc.args[0] if exc.args else len(data)
                    conn._upgraded(ex, self, data[off:])
                elif self.ex is ex:
                    conn._upstream_error(ex, self, "bad_response", "101 or upgrade that was not asked for")
                return
            except httptools.HttpParserError as exc:
                if self.ex is ex and not self.done:
                    conn._upstream_error(ex, self, "bad_response", str(exc))
                    return
                self.reusable = False
            # Completion is acted on here, outside the parser's callbacks: finishing may hand this connection
            # to the next request, which must not see the rest of this parse.
            if self.done and self.ex is ex:
                conn._response_done(ex, self)
        finally:
            # (_close flushes and _upgraded sends what was collected before the transport changes hands;
            # a closing connection's leftovers, after an abort, are dropped with it)
            pending = conn._wbuf
            if pending is not None:
                conn._wbuf = None
                if pending and not conn.closing:
                    conn._write_out(pending)

    def eof_received(self) -> bool:
        self.reusable = False
        return False  # close; connection_lost ends a close-delimited body

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        ex = self.ex
        if ex is not None:
            self.ex = None
            ex.conn._upstream_lost(ex, self, exc)

    def pause_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.conn._pause_client(True)

    def resume_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.conn._pause_client(False)

    # llhttp callbacks (each ignores what follows a complete response: that is a broken replica)
    def on_message_begin(self) -> None:
        if self.done:
            self.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.done:
            return
        if self.status:
            self.trailers.append((name, value))
        else:
            self.resp_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None or self.done:
            return
        self.status = self.parser.get_status_code()
        ex.conn._response_head(ex, self)

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is not None and not self.no_body and not self.done:
            if self.chunked_out:
                body = b"%x\r\n%s\r\n" % (len(body), body)
            ex.body_out += len(body)
            conn = ex.conn
            wbuf = conn._wbuf
            if wbuf is not None:
                wbuf.append(body)  # (HttpConnection._write_down, inlined: once per body piece)
            else:
                conn.transport.write(body)

    def on_message_complete(self) -> None:
        if self.ex is None or self.done:
            return
        status = self.status
        if 100 <= status < 200:
            if status != 101:
                self.status = 0  # an interim response: the final one follows
                self.resp_headers = []
            return
        self.done = True

    # helpers
    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def reset_for_reuse(self) -> None:
        self.status = 0
        self.done = False
        self.trailers = []
        self.resp_headers = []
        self.chunked_out = False
        self.got_bytes = False
        # llhttp is ready for the next response after a complete keep-alive one; a new parser only after a
        # response without a body (HEAD, 204, 304: llhttp did not know) or one that did not keep alive.
        if self.no_body or not self.parser.should_keep_alive():
            self.parser = httptools.HttpResponseParser(self)
        self.no_body = False

    def __repr__(self) -> str:
        return f"<UpstreamConn {self.host.endpoint.hostport} reused={self.reused} closed={self.closed}>"


# -- the front (per listener) ---------------------------------------------------------------------------
class HttpFront:
    """What an http listener keeps: the route table cache, counters, the pool sweep timer."""

    __slots__ = ("_sweep", "_watched", "listener", "loop", "stats", "table", "waiters")

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stats = ListenerHttpStats()
        self.table: RouteTable | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._watched: set[int] = set()
        self.waiters: dict[int, deque] = {}  # id(pool) -> queued exchanges (http_max_inflight)

    def routes(self) -> RouteTable:
        lst = self.listener
        table = self.table
        if table is None or table.bindings is not lst.bindings:
            table = self.table = RouteTable(lst.bindings)
            for b in lst.bindings:
                self._watch(b.pool)
        return table

    def _watch(self, pool: Pool) -> None:
        if id(pool) in self._watched:
            return
        self._watched.add(id(pool))
        pool.on_change.append(_drain_idle)

    # -- pooled connections
    def acquire(self, host: Host, opts: Any) -> UpstreamConn | None:
        idle = host.idle
        if not idle:
            return None
        limit = self.loop.time() - opts.http_pool_idle_timeout  # type: ignore[union-attr]
        while idle:
            c = idle.pop()
            if c.closed or c.last_used < limit:
                c.close()
                continue
            c.reused = True
            return c
        return None

    def release(self, host: Host, up: UpstreamConn, opts: Any) -> None:
        if up.closed or not up.reusable or host.draining or opts.http_pool_max_idle == 0 or opts.proxy_protocol:
            up.close()
            return
        idle = host.idle
        if idle is None:
            idle = host.idle = []
        if len(idle) >= opts.http_pool_max_idle:
            idle.pop(0).close()
        up.ex = None
        up.reset_for_reuse()
        if up.paused:
            up.paused = False
            up.transport.resume_reading()  # type: ignore[union-attr]
        loop = self.loop
        up.last_used = loop.time()  # type: ignore[union-attr]
        idle.append(up)
        if self._sweep is None:
            self._sweep = loop.call_at(up.last_used + opts.http_pool_idle_timeout, self._sweep_idle)  # type: ignore[union-attr]

    def _sweep_idle(self) -> None:
        self._sweep = None
        loop = self.loop
        now = loop.time()  # type: ignore[union-attr]
        nxt = None
        for b in self.listener.bindings:
            t = b.pool.options.http_pool_idle_timeout
            for h in b.pool.hosts:
                idle = h.idle
                if not idle:
                    continue
                keep = []
                for c in idle:
                    if c.closed or now - c.last_used >= t:
                        c.close()
                    else:
                        keep.append(c)
                        due = c.last_used + t
                        nxt = due if nxt is None or due < nxt else nxt
                h.idle = keep
        if nxt is not None:
            self._sweep = loop.call_at(nxt, self._sweep_idle)  # type: ignore[union-attr]

    def close_idle(self) -> None:
        for b in self.listener.bindings:
            for h in b.pool.hosts:
                _close_host_idle(h)


def _close_host_idle(h: Host) -> None:
    idle = h.idle
    if idle:
        h.idle = []
        for c in idle:
            c.close()


def _drain_idle(pool: Pool) -> None:
    """``Pool.on_change``: the idle connections of hosts that no longer get requests are closed at once."""
    for h in pool.hosts:
        if h.draining and h.idle:
            _close_host_idle(h)
    # Hosts dropped from the table are no longer in ``hosts``; their connections go when they are next
    # used or by the sweep, which walks ``hosts`` only: close them here by scanning what was kept.
    dropped = getattr(pool, "_http_known", None)
    now = set(map(id, pool.hosts))
    if dropped:
        for h in dropped:
            if id(h) not in now and h.idle:
                _close_host_idle(h)
    pool._http_known = pool.hosts  # type: ignore[attr-defined]


# -- the downstream side ----------------------------------------------------------------------------------
class HttpConnection(asyncio.Protocol):
    """One client connection of an http listener (module docstring)."""

    __slots__ = (
        "_blocked",
        "_deadline",
        "_ex",
        "_fwd",
        "_head_bytes",
        "_inbound",
        "_last",
        "_linger",
        "_paused",
        "_rdeadline",
        "_reading_head",
        "_rex",
        "_timer",
        "_timer_at",
        "_upgrading",
        "_wbuf",
        "client",
        "closing",
        "eof",
        "front",
        "local",
        "loop",
        "opts",
        "parser",
        "queue",
        "site",
        "transport",
        "trusted",
    )

    def __init__(self, front: HttpFront, client: tuple | None) -> None:
        self.front = front
        self.site = front.listener
        self.loop: asyncio.AbstractEventLoop = front.loop  # type: ignore[assignment]
        self.client = client
        self.local: tuple | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()  # requests read and not yet answered; [0] is in flight
        self._ex: Exchange | None = None  # the request being parsed
        self._upgrading: Exchange | None = None  # a request with Upgrade: the parser is done with this connection
        self._head_bytes = 0
        self._reading_head = False
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._paused = 0  # why client reading is paused: 1 pipeline full, 2 upstream buffer full, 4 body buffer full
        self._blocked = False  # the client's write buffer is full
        self._last = False  # a request without keep-alive was read: the connection ends after it
        self.closing = False  # no more requests are served: the connection is being closed
        self.eof = False  # the client half-closed: answer what was read, then close
        self.opts: Any = None
        self.trusted = False
        self._inbound: InboundProxy | None = None  # while the first bytes are judged (accept_proxy)
        self._wbuf: list[bytes] | None = None  # bytes for the client collected while an upstream read is parsed
        self._timer_at = _NEVER  # when ``_timer`` fires
        self._rex: Exchange | None = None  # the request waiting for its response head (response timeout)
        self._rdeadline = 0.0  # ... until then
        self._fwd: dict[bytes, bytes] | None = None  # Host -> the forwarding fields for it (_upstream_head)
        self._linger = -1  # >= 0: lingering after the last response (_close), the bytes still accepted

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        site = self.site
        site.registry.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        if self.client is None:
            self.client = transport.get_extra_info("peername")
        self.opts = opts = site.bindings[0].pool.options  # connection-level settings: the port's first binding
        nets = listener_networks(site)  # accept_proxy: the union over the port's routes (None: off)
        if nets is not None:
            self._inbound = reader = InboundProxy(nets, self.client)
            if reader.peer_trusted:
                # The header must be complete HEADER_TIMEOUT after accept (a deadline; the lazy timer's).
                self._arm(inbound.HEADER_TIMEOUT)
                return
        self._trust()
        self._arm(opts.http_keepalive_timeout)

    def _trust(self) -> None:
        """Is the client a trusted forwarder (``http_trusted``)?  Decided on ``client``: the carried
        address when a PROXY header was accepted, so the balancer in front is not trusted by itself."""
        trust = trusted_networks(self.opts.http_trusted)  # parsed once per CIDR tuple (shared with accept_proxy)
        self.trusted = trust is not None and self.client is not None and trust.trusted(self.client[0])

    def _inbound_bytes(self, data: bytes) -> bytes | None:
        """Feed the PROXY header reader; the bytes for the request parser once it is done, else None."""
        reader: InboundProxy = self._inbound  # type: ignore[assignment]
        try:
            res = reader.feed(data)
        except InboundProxyError as exc:
            self._inbound_close(exc.reason, str(exc))
            return None
        if res is None:
            return None
        self._inbound = None
        client, rest = res
        if reader.peer_trusted:
            self.client = client
            self._fwd = None
            self.site.inbound_stats.headers += 1
            self._trust()
            self._arm(self.opts.http_keepalive_timeout)  # a later deadline: the lazy timer follows it
        return rest

    def _inbound_close(self, reason: str, detail: str) -> None:
        """Closed before any request: counted in ``listener.inbound_stats`` (no response: not HTTP yet)."""
        self._inbound = None
        self.site.inbound_stats.closed[reason] += 1
        log.debug("http %s client %s: %s (%s)", self.site.name, self.client, detail, reason)
        self.closing = True
        self._cancel_timer()
        reset(self.transport)

    def _header_pending(self) -> bool:
        return self._inbound is not None and self._inbound.peer_trusted

    def data_received(self, data: bytes) -> None:
        if self.closing or self._last:
            if self._linger >= 0:
                self._discard(len(data))
            return  # after a request without keep-alive nothing more is read (RFC 9112 9.6)
        if self._inbound is not None:
            data = self._inbound_bytes(data)  # type: ignore[assignment]
            if not data:
                return
        up_ex = self._upgrading
        if up_ex is not None:
            self._send_body(up_ex, data)  # bytes of the upgraded protocol, before the 101
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            err = exc.__context__
            if isinstance(err, _Refuse):
                self._refuse(err.status, err.reason, err.detail)
            else:
                log.error("%r: error in a parser callback", self, exc_info=err)
                self._refuse(400, "bad_request", repr(err))
        except httptools.HttpParserUpgrade as exc:
            ex = self._upgrading
            if ex is None:
                self._refuse(501, "not_implemented", "CONNECT or an upgrade the mesh does not serve")
                return
            off = exc.args[0] if exc.args else len(data)
            rest = data[off:]
            if rest:
                self._send_body(ex, rest)
        except httptools.HttpParserError as exc:
            if self._last:
                return  # bytes after the last request of the connection: ignored
            text = str(exc)
            if "invalid `transfer-encoding`" in text.lower():
                self._refuse(501, "not_implemented", text)  # a coding after chunked
            else:
                self._refuse(400, "bad_request", text)

    def eof_received(self) -> bool:
        if self._linger >= 0:
            self._linger_end()  # the client is done sending: close now
            return False
        if self._inbound is not None:
            if self._header_pending():
                self._inbound_close("incomplete", "the client closed before its PROXY header was complete")
                return False
            held = self._inbound.buffered  # a direct client's first bytes that could have been a signature
            self._inbound = None
            if held and not self.closing:
                self.data_received(held)
        self.eof = True
        if not self.queue:
            self._close()
            return False
        ex = self._ex
        if ex is not None and ex in self.queue and not ex.body_done:
            ex.close_after = True  # an incomplete request: its body will never end (no close-delimited bodies)
        return True  # answer what was read, then close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_pending() and not self.closing:
            self.site.inbound_stats.closed["incomplete"] += 1
        self._inbound = None
        self.closing = True
        self._cancel_timer()
        self._linger = -1
        self._wbuf = None
        while self.queue:
            self._abandon(self.queue.popleft())
        self._ex = None
        self._upgrading = None
        reg = self.site.registry
        if self in reg:
            reg.remove(self)

    def pause_writing(self) -> None:
        self._blocked = True
        up = self.queue[0].up if self.queue else None
        if up is not None and not up.paused and up.transport is not None:
            up.paused = True
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self._blocked = False
        up = self.queue[0].up if self.queue else None
        if up is not None and up.paused and up.transport is not None:
            up.paused = False
            up.transport.resume_reading()

    # -- registry hook
    def abort(self, reason: str = "shutdown") -> None:
        self.closing = True
        for ex in list(self.queue):
            if ex.up is not None:
                ex.up.close()
        if self.transport is not None:
            reset(self.transport)

    # -- timers: one lazy timer per connection for every deadline it has.  ``_deadline`` is the PROXY
    # header's, the request head's or the keep-alive idle time's (by state); ``_rdeadline`` the response
    # head's of ``_rex``, the request in flight.  Arming a deadline stores a number; the timer is moved only
    # when the new deadline is earlier than ``_timer_at``.  And it never sits more than ``_tick()`` (the
    # shortest of the port's head and keep-alive timeouts) ahead of its last firing, so a deadline armed later
    # is never earlier than it: a request costs clock reads, not TimerHandles.  A firing before any deadline
    # is due re-arms at the next one (or the tick).
    def _arm(self, seconds: float) -> None:
        self._deadline = deadline = self.loop.time() + seconds
        if deadline < self._timer_at:
            self._schedule(deadline)

    def _tick(self) -> float:
        opts = self.opts
        return min(opts.http_head_timeout, opts.http_keepalive_timeout)

    def _schedule(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
        when = min(when, self.loop.time() + self._tick())
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        self._timer_at = _NEVER

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _NEVER
        if self.closing:
            return
        now = self.loop.time()
        rex = self._rex
        if rex is not None and now >= self._rdeadline:
            self._rex = None
            self._response_timeout(rex)
            if self.closing:
                return
            rex = self._rex  # (a retry may have sent it again)
        nxt = _NEVER
        if self._header_pending() or self._reading_head or not self.queue:
            if now >= self._deadline:
                if self._header_pending():
                    self._inbound_close(
                        "timeout", f"no complete PROXY header within {inbound.HEADER_TIMEOUT}s of accept"
                    )
                elif self._reading_head:
                    self._refuse(408, "head_timeout", "request head not complete in time")
                else:
                    self._close()  # an idle keep-alive connection
                return
            nxt = self._deadline
        if rex is not None and self._rdeadline < nxt:
            nxt = self._rdeadline
        if nxt is not _NEVER:
            self._schedule(nxt)
        # else: a request is in flight with no response deadline pending; _next() or _attach() arms again

    # -- llhttp callbacks (request side)
    def on_message_begin(self) -> None:
        self._ex = Exchange(self)
        self._head_bytes = 0
        self._reading_head = True
        self._arm(self.opts.http_head_timeout)
        if len(self.queue) >= PIPELINE_DEPTH:
            self._pause_read(True, 1)

    def on_url(self, url: bytes) -> None:
        ex = self._ex
        ex.url += url  # type: ignore[union-attr]
        self._head_bytes += len(url)
        if self._head_bytes > self.opts.http_max_head:
            raise _Refuse(414, "head_too_large", "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self._ex
        if not self._reading_head:
            if ex is not None:  # a trailer field of a chunked body
                ex.trailers.append((name, value))
                self._head_bytes += len(name) + len(value) + 4
                if self._head_bytes > self.opts.http_max_head:
                    raise _Refuse(431, "head_too_large", "request trailers too large")
            return
        self._head_bytes += len(name) + len(value) + 4
        headers = ex.headers  # type: ignore[union-attr]
        if self._head_bytes > self.opts.http_max_head or len(headers) >= self.opts.http_max_headers:
            raise _Refuse(431, "head_too_large", "request head too large")
        headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        ex: Exchange = self._ex  # type: ignore[assignment]
        self._reading_head = False
        self._head_bytes = 0
        parser = self.parser
        ex.method = method = parser.get_method()
        ex.version = version = parser.get_http_version()
        ex.keep_alive = parser.should_keep_alive()
        host_value = None
        te = None
        for k, v in ex.headers:
            if k == b"host":
                if host_value is not None:
                    raise _Refuse(400, "bad_request", "more than one Host field")
                host_value = v
            elif k == b"transfer-encoding":
                te = v if te is None else te + b"," + v
            elif k == b"content-length":
                ex.clen = int(v)  # llhttp has checked it: digits, and no second differing one
            elif k == b"connection":
                named = {t.strip().lower() for t in v.split(b",")} - _CONN_PLAIN
                if named:
                    ex.conn_tokens = named if ex.conn_tokens is None else ex.conn_tokens | named
        if method == b"CONNECT":
            raise _Refuse(501, "not_implemented", "CONNECT is not served")
        if te is not None:
            if version == "1.0":
                raise _Refuse(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
            if te.strip().lower() != b"chunked":
                raise _Refuse(501, "not_implemented", f"Transfer-Encoding {te[:40]!r} is not served")
            ex.chunked = True
        if host_value is None:
            if version != "1.0":
                raise _Refuse(400, "bad_request", "HTTP/1.1 request without Host")
            host_value = b""
        url = ex.url
        if url[:1] != b"/" and url[:7].lower() in (b"http://", b"https:/"):
            # absolute-form (RFC 9112 3.2.2): the authority of the target is the host; origin-form goes upstream
            rest = url.split(b"//", 1)[1]
            slash = rest.find(b"/")
            authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
            host_value = authority
            ex.url = path
            ex.headers = [(k, authority if k == b"host" else v) for k, v in ex.headers]
            if not any(k == b"host" for k, _ in ex.headers):
                ex.headers.append((b"host", authority))
        ex.hostname = _host_of(host_value)
        if parser.should_upgrade():
            ex.upgrade = True
            ex.kept = None
            self._upgrading = ex
        self.front.stats.requests += 1
        if not ex.chunked and ex.clen <= 0:
            ex.body_done = True
        self.queue.append(ex)
        if len(self.queue) == 1:
            self._begin(ex)

    def on_body(self, body: bytes) -> None:
        ex = self._ex
        if ex is None:
            return
        n = len(body)
        ex.body_in += n
        pool = ex.pool
        if pool is not None:
            limit = pool.options.http_max_body
            if limit and ex.body_in > limit:
                raise _Refuse(413, "body_too_large", "request body over the limit")
        self._send_body(ex, b"%x\r\n%s\r\n" % (n, body) if ex.chunked else body)

    def on_message_complete(self) -> None:
        ex = self._ex
        self._ex = None
        if ex is None or ex.upgrade:
            return  # after an upgrade request, the rest is the new protocol's (HttpParserUpgrade follows)
        if not ex.keep_alive:
            self._last = True
        if not ex.body_done:
            ex.body_done = True
            if ex.chunked:
                self._send_body(ex, self._last_chunk(ex))

    # -- request processing
    def _begin(self, ex: Exchange) -> None:
        """The request at the head of the queue: route it and send it."""
        table = self.front.routes()
        binding = table.only
        if binding is None or ex.url[:1] != b"/":
            binding = table.lookup(ex.hostname, ex.url.decode("latin-1"))
            if binding is None:
                self._generate(ex, 404, "no_route")
                return
        ex.binding = binding
        pool = ex.pool = binding.pool
        opts = pool.options
        ex.stats = st = http_stats(pool)
        st.active += 1
        pool.stats.accepted += 1
        if opts.http_max_body and ex.clen > opts.http_max_body:
            self._generate(ex, 413, "body_too_large")
            return
        ex.head_out = self._upstream_head(ex, opts)
        self._dispatch(ex)

    def _upstream_head(self, ex: Exchange, opts: Any) -> bytes:
        """The head sent to the replica (module docstring, rule 4)."""
        extra = ex.conn_tokens  # fields named in the request's Connection (found in on_headers_complete)
        drop = _HOP if extra is None else _HOP | extra
        trusted = self.trusted
        out = [b"%s %s HTTP/1.1\r\n" % (ex.method, ex.url)]
        add = out.append
        xff = fwd = proto = host_fwd = port_fwd = None
        host_value = None
        upgrade_value = None
        for k, v in ex.headers:
            if k not in _REQ_SPECIAL and (extra is None or k not in extra):
                add(b"%s: %s\r\n" % (k, v))  # (most fields: one set lookup)
                continue
            if k in drop:
                if k == b"upgrade":
                    upgrade_value = v
                continue
            if k in _FORWARDING:
                if trusted:
                    if k == b"x-forwarded-for":
                        xff = v if xff is None else xff + b", " + v
                    elif k == b"forwarded":
                        fwd = v if fwd is None else fwd + b", " + v
                    elif k == b"x-forwarded-proto":
                        proto = v
                    elif k == b"x-forwarded-host":
                        host_fwd = v
                    else:
                        port_fwd = v
                continue
            if k == b"host":
                host_value = v
            add(b"%s: %s\r\n" % (k, v))
        host_value = host_value or b""
        if xff is None and fwd is None and proto is None and host_fwd is None and port_fwd is None:
            # Nothing kept from the client: the forwarding fields depend on the client and the Host only,
            # the same on every request of a connection (kept per connection by Host, a few Hosts at most).
            cache = self._fwd
            if cache is None:
                cache = self._fwd = {}
            tail = cache.get(host_value)
            if tail is None:
                if len(cache) >= FORWARDING_CACHE:
                    cache.clear()
                tail = cache[host_value] = self._forwarding(host_value, None, None, None, None, None)
            add(tail)
        else:
            add(self._forwarding(host_value, xff, fwd, proto, host_fwd, port_fwd))
        if ex.upgrade and upgrade_value is not None:
            add(b"upgrade: %s\r\nconnection: upgrade\r\n" % upgrade_value)
        elif opts.proxy_protocol or opts.http_pool_max_idle == 0:
            add(b"connection: close\r\n")
        if ex.chunked:
            add(b"transfer-encoding: chunked\r\n")
        add(b"\r\n")
        return b"".join(out)

    def _forwarding(
        self,
        host_value: bytes,
        xff: bytes | None,
        fwd: bytes | None,
        proto: bytes | None,
        host_fwd: bytes | None,
        port_fwd: bytes | None,
    ) -> bytes:
        """X-Forwarded-For/-Proto/-Host/-Port and Forwarded: the mesh's hop appended to what a trusted
        client sent (arguments None: nothing kept)."""
        ip = self.client[0].encode() if self.client else b""
        out = [
            b"x-forwarded-for: %s\r\n" % (xff + b", " + ip if xff else ip),
            b"x-forwarded-proto: %s\r\n" % (proto or b"http"),
            b"x-forwarded-host: %s\r\n" % (host_fwd if host_fwd is not None else host_value),
            b"x-forwarded-port: %s\r\n" % (port_fwd or str(self.site.port).encode()),
        ]
        node = b'"[%s]"' % ip if b":" in ip else ip
        mine = b"for=%s;proto=http" % node
        if host_value:
            mine += b';host="%s"' % host_value.replace(b'"', b"").replace(b"\\", b"")
        out.append(b"forwarded: %s\r\n" % (fwd + b", " + mine if fwd else mine))
        return b"".join(out)

    def _choose(self, ex: Exchange) -> Host | None:
        pool: Pool = ex.pool  # type: ignore[assignment]
        opts = pool.options
        exclude = ex.tried
        limit = opts.http_max_inflight
        if opts.http_sticky and not exclude:
            want = _cookie(ex.headers, opts.http_sticky_name.encode())
            if want is not None:
                for h in pool.usable:
                    if not h.draining and _sticky_value(h) == want:
                        if not limit or h.active < limit:
                            return h
                        break
        key = self.client
        hk = opts.http_hash_key
        if hk is not None and opts.balance == "hash":
            kind, _, name = hk.partition(":")
            val = None
            if kind == "header":
                lname = name.lower().encode()
                for k, v in ex.headers:
                    if k == lname:
                        val = v
                        break
            else:
                val = _cookie(ex.headers, name.encode())
            if val is not None:
                key = (val.decode("latin-1"), 0)
        if not limit:
            return pool.choose(key, exclude)
        full = list(exclude)
        while True:
            h = pool.choose(key, full)
            if h is None or h.active < limit:
                return h
            full.append(h)

    def _dispatch(self, ex: Exchange) -> None:
        pool: Pool = ex.pool  # type: ignore[assignment]
        host = self._choose(ex)
        if host is None:
            if pool.options.http_max_inflight and pool.usable and not ex.tried:
                self._enqueue(ex)
                return
            pool.stats.no_endpoint += 1
            self._generate(ex, 503, "no_endpoint")
            return
        self._send_to(ex, host)

    def _enqueue(self, ex: Exchange) -> None:
        """Every replica is at ``http_max_inflight``: wait (bounded) for one to finish a request."""
        pool: Pool = ex.pool  # type: ignore[assignment]
        opts = pool.options
        q = self.front.waiters.setdefault(id(pool), deque())
        if len(q) >= opts.http_queue:
            self._generate(ex, 503, "queue_full")
            return
        http_stats(pool).queued += 1
        ex.queued_at = self.loop.time()
        q.append(ex)
        ex.timer = self.loop.call_at(ex.queued_at + opts.http_queue_timeout, self._queue_timeout, ex)

    def _queue_timeout(self, ex: Exchange) -> None:
        ex.timer = None
        if self._unqueue(ex) and not self.closing:
            self._generate(ex, 503, "queue_timeout")

    def _unqueue(self, ex: Exchange) -> bool:
        q = self.front.waiters.get(id(ex.pool))
        if q is None or ex not in q:
            return False
        q.remove(ex)
        http_stats(ex.pool).queued -= 1  # type: ignore[arg-type]
        ex.queued_at = 0.0
        return True

    def _send_to(self, ex: Exchange, host: Host) -> None:
        pool: Pool = ex.pool  # type: ignore[assignment]
        opts = pool.options
        host.active += 1
        ex.host = host
        ex.endpoint = host.endpoint.id
        if opts.http_sticky:
            want = _cookie(ex.headers, opts.http_sticky_name.encode())
            val = _sticky_value(host)
            if want != val:
                c = b"%s=%s; Path=/; HttpOnly; SameSite=%s" % (
                    opts.http_sticky_name.encode(),
                    val,
                    opts.http_sticky_samesite.capitalize().encode(),
                )
                if opts.http_sticky_max_age:
                    c += b"; Max-Age=%d" % opts.http_sticky_max_age
                if opts.http_sticky_secure or opts.http_sticky_samesite == "none":
                    c += b"; Secure"
                ex.set_cookie = c
            else:
                ex.set_cookie = None
        st = http_stats(pool)
        up = None if opts.proxy_protocol or ex.upgrade else self.front.acquire(host, opts)
        if up is not None:
            st.pool_reused += 1
            self._attach(ex, up)
            return
        st.pool_new += 1
        ex.task = task = self.loop.create_task(self._connect(ex, host))
        task.add_done_callback(_task_done)

    async def _connect(self, ex: Exchange, host: Host) -> None:
        """A new connection to ``host`` for ``ex`` (connect retries on other hosts, like ``mesh.proxy.dial``)."""
        loop = self.loop
        pool: Pool = ex.pool  # type: ignore[assignment]
        opts = pool.options
        started = loop.time()
        while True:
            up = UpstreamConn(self.front, host)
            t0 = loop.time()
            try:
                await asyncio.wait_for(loop.create_connection(lambda p=up: p, *host.dial), opts.connect_timeout)
            except asyncio.CancelledError:
                if up.transport is not None:
                    up.transport.abort()
                raise
            except Exception as exc:
                if up.transport is not None:
                    up.transport.abort()
                reason = connect_failure_reason(exc)
                pool.stats.connect_failed(reason)
                if ex.host is not host:
                    return  # abandoned meanwhile (the client went away): accounted for already
                if reason == "local_resources":
                    self.site.resources_exhausted(exc)
                    if loop.time() - started + RESOURCES_RETRY <= opts.connect_timeout:
                        await asyncio.sleep(RESOURCES_RETRY)
                        if ex.host is not host:
                            return
                        continue
                else:
                    pool.report_failure(host)
                host.active -= 1
                ex.host = None
                ex.task = None
                ex.tried.append(host)
                if reason != "local_resources" and len(ex.tried) <= opts.retries:
                    nxt = self._choose(ex)
                    if nxt is None:
                        nxt = pool.last_resort(ex.tried)
                    if nxt is not None:
                        pool.stats.retries += 1
                        self._count_retry(ex, "connect")
                        self._send_to(ex, nxt)
                        return
                pool.stats.connection_failed(reason)
                if reason == "timeout":
                    self._generate(ex, 504, "upstream_timeout")
                else:
                    self._generate(ex, 502, "upstream_failed")
                return
            break
        ex.task = None
        host.stats.connect_time.observe(loop.time() - t0)
        host.stats.connections += 1
        if host.via is None:
            pool.report_success(host)
        transport: asyncio.Transport = up.transport  # type: ignore[assignment]
        if ex.host is not host:
            up.close()
            return
        if keepalive_useful(opts.idle_timeout):
            keepalive(transport)
        if host.via is not None:
            transport.write(self.site.tunnel_header(host, self.client, self._local()))
        elif opts.proxy_protocol:
            transport.write(replica_header(opts.proxy_protocol, self.client, self._local()))
        self._attach(ex, up)

    def _local(self) -> tuple | None:
        if self.local is None and self.transport is not None:
            self.local = self.transport.get_extra_info("sockname")
        return self.local

    def _attach(self, ex: Exchange, up: UpstreamConn) -> None:
        """Send the request head (and the body read so far) on ``up``."""
        ex.up = up
        up.ex = ex
        t: asyncio.Transport = up.transport  # type: ignore[assignment]
        ex.t_sent = now = self.loop.time()
        pending = ex.pending
        ex.pending = None
        if pending:
            t.write(ex.head_out + pending)
        else:
            t.write(ex.head_out)
        if self._paused & 4:
            self._pause_read(False, 4)
        if self._blocked and not up.paused:
            up.paused = True
            t.pause_reading()
        self._rex = ex
        self._rdeadline = due = now + ex.pool.options.http_response_timeout  # type: ignore[union-attr]
        if due < self._timer_at:
            self._schedule(due)

    def _last_chunk(self, ex: Exchange) -> bytes:
        if not ex.trailers:
            return b"0\r\n\r\n"
        parts = [b"0\r\n"]
        for name, value in ex.trailers:
            if name.lower() not in _HOP:
                parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"\r\n")
        return b"".join(parts)

    def _send_body(self, ex: Exchange, data: bytes) -> None:
        """Request bytes (already framed for upstream) towards the replica, kept for a retry while small."""
        kept = ex.kept
        if kept is not None:
            if len(kept) + len(data) > RETRY_BODY_LIMIT:
                ex.kept = None
            else:
                kept += data
        pending = ex.pending
        if pending is not None:
            pending += data
            if len(pending) > BODY_PAUSE:
                self._pause_read(True, 4)
            return
        up = ex.up
        if up is not None and not up.closed:
            up.transport.write(data)  # type: ignore[union-attr]

    def _pause_read(self, pause: bool, bit: int) -> None:
        before = self._paused
        after = (before | bit) if pause else (before & ~bit)
        self._paused = after
        if self.closing or (after == 0) == (before == 0):
            return
        if after:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _pause_client(self, pause: bool) -> None:
        self._pause_read(pause, 2)

    # -- responses
    def _response_head(self, ex: Exchange, up: UpstreamConn) -> None:
        status = up.status
        interim = 100 <= status < 200 and status != 101
        if not interim and self._rex is ex:
            self._rex = None
        pool: Pool = ex.pool  # type: ignore[assignment]
        opts = pool.options
        if status == 101 and not ex.upgrade:
            self._upstream_error(ex, up, "bad_response", "101 to a request that did not ask to upgrade")
            return
        if not interim:
            (ex.stats or http_stats(pool)).upstream_time.observe(self.loop.time() - ex.t_sent)
            if status in opts.http_retry_on and self._may_retry(ex, "status"):
                up.ex = None
                up.close()
                ex.up = None
                self._retry(ex, f"status_{status}")
                return
        if status >= 200 and (ex.method == b"HEAD" or status in (204, 304)):
            up.no_body = True
        chunked = clen = False
        out = [_status_line(status)]
        add = out.append
        named: set[bytes] | None = None
        headers = up.resp_headers
        for k, v in headers:
            if k == b"connection" and v.lower() not in _CONN_PLAIN:
                tokens = {t.strip().lower() for t in v.split(b",")} - _CONN_PLAIN
                if tokens:
                    named = tokens if named is None else named | tokens
        for k, v in headers:
            if k not in _RESP_SPECIAL:
                if named is None or k not in named:
                    add(b"%s: %s\r\n" % (k, v))  # (most fields: one set lookup)
                continue
            if named is not None and k in named:
                continue
            if k == b"transfer-encoding":
                chunked = True
                continue
            if k in _HOP:
                if k == b"connection" and b"close" in v.lower():
                    up.reusable = False
                if not (status == 101 and k == b"upgrade"):
                    continue
            elif k == b"content-length":
                clen = True
            add(b"%s: %s\r\n" % (k, v))
        if interim:
            add(b"\r\n")
            self._write_down(ex, b"".join(out))
            return
        ex.status = status
        ex.response_started = True
        if status == 101:
            add(b"connection: upgrade\r\n\r\n")
            self._write_down(ex, b"".join(out))
            return  # HttpParserUpgrade follows in UpstreamConn.data_received
        close = (
            not ex.keep_alive or ex.upgrade or not ex.body_done or ex.close_after or (self.eof and len(self.queue) <= 1)
        )
        if ex.set_cookie is not None:
            add(b"set-cookie: %s\r\n" % ex.set_cookie)
        if up.no_body:
            if chunked:
                add(b"transfer-encoding: chunked\r\n")
        elif chunked:
            if ex.version == "1.0":
                close = True  # no chunked coding for 1.0: the body goes as it is, ended by the close
            else:
                up.chunked_out = True
                add(b"transfer-encoding: chunked\r\n")
        elif not clen:
            close = True  # a close-delimited body: the client learns its end by the close
        if close:
            ex.close_after = True
            add(b"connection: close\r\n\r\n")
        elif ex.version == "1.0":
            add(b"connection: keep-alive\r\n\r\n")
        else:
            add(b"\r\n")
        self._write_down(ex, b"".join(out))
        if up.no_body:
            up.done = True  # acted on when the parse of this read returns

    def _write_down(self, ex: Exchange, data: bytes) -> None:
        ex.body_out += len(data)
        wbuf = self._wbuf
        if wbuf is not None:
            wbuf.append(data)  # an upstream read is being parsed: sent once it is done (UpstreamConn.data_received)
        else:
            self.transport.write(data)

    def _write_out(self, wbuf: list[bytes]) -> None:
        """Send what an upstream read made for the client: a head and a body piece of at most
        ``COALESCE_COPY`` bytes in one write; larger pieces as they are, one write each (uvloop's
        ``writelines`` of a head and a large piece cost 20% more CPU per 1 MiB response here)."""
        write = self.transport.write
        if len(wbuf) == 1:
            write(wbuf[0])
        elif len(wbuf) == 2 and len(wbuf[1]) <= COALESCE_COPY:
            write(wbuf[0] + wbuf[1])
        else:
            for data in wbuf:
                write(data)

    def _flush(self) -> None:
        """Write what is collected now (before the transport changes hands or closes)."""
        wbuf = self._wbuf
        if wbuf:
            self._wbuf = []
            self._write_out(wbuf)

    def _response_done(self, ex: Exchange, up: UpstreamConn) -> None:
        if up.chunked_out:
            if up.trailers:
                parts = [b"0\r\n"]
                for k, v in up.trailers:
                    if k.lower() not in _HOP:
                        parts.append(b"%s: %s\r\n" % (k, v))
                parts.append(b"\r\n")
                self._write_down(ex, b"".join(parts))
            else:
                self._write_down(ex, b"0\r\n\r\n")
        if not ex.body_done:
            up.reusable = False  # the replica answered before it had the whole request
        host = ex.host
        up.ex = None
        ex.up = None
        if host is not None:
            pool: Pool = ex.pool  # type: ignore[assignment]
            if ex.status >= 500:
                pool.report_failure(host)  # passive outlier detection on gateway errors too
            elif host.consecutive_failures:
                pool.report_success(host)  # (it resets consecutive failures: nothing to do while there are none)
            self.front.release(host, up, pool.options)
        else:
            up.close()
        self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        """``ex`` was answered: account for it and go on with the next request."""
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        pool = ex.pool
        self._account(ex)  # (clears ex.pool)
        if pool is not None and pool.options.http_max_inflight:
            self._wake(pool)
        if ex.close_after or not ex.body_done:
            self._close(linger=not ex.body_done)
            return
        if self.eof and not self.queue:
            self._close()
            return
        self._next()

    def _next(self) -> None:
        if self.closing:
            return
        if self._paused & 3:
            self._pause_read(False, 1 | 2)
        if self.queue:
            self._begin(self.queue[0])
        elif not self._reading_head:
            self._arm(self.opts.http_keepalive_timeout)

    def _wake(self, pool: Pool | None) -> None:
        """A request of ``pool`` finished: let a queued one (``http_max_inflight``) try again."""
        if pool is None or not pool.options.http_max_inflight:
            return
        q = self.front.waiters.get(id(pool))
        while q:
            nxt = q[0]
            host = nxt.conn._choose(nxt)
            if host is None:
                return
            q.popleft()
            http_stats(pool).queued -= 1
            nxt.queued_at = 0.0
            if nxt.timer is not None:
                nxt.timer.cancel()
                nxt.timer = None
            nxt.conn._send_to(nxt, host)

    def _account(self, ex: Exchange, finished: bool = True) -> None:
        """``ex`` is over: give back ``host.active`` (with its byte counts) and count it in the route's stats."""
        host = ex.host
        if host is not None:
            host.active -= 1
            st = host.stats
            st.bytes_in += ex.body_in
            st.bytes_out += ex.body_out
            ex.host = None
        self._count(ex, _STATUS_CLASS[ex.status // 100] if finished else None)

    def _count(self, ex: Exchange, status_class: str | None) -> None:
        """The route's stats of a request that is over (``status_class`` None: the client went away, no
        status to count), and its access-log line.  ``host.active`` is the caller's business."""
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        if self._rex is ex:
            self._rex = None
        pool = ex.pool
        if pool is None:
            return
        hs = ex.stats or http_stats(pool)
        if ex.retry_counted:
            hs.retries_active -= 1
            ex.retry_counted = False
        hs.active -= 1
        ex.pool = None
        if status_class is None:
            return
        hs.duration.observe(time.monotonic() - ex.started)
        key = (_METHOD_LABEL.get(ex.method, "other"), status_class)
        hs.requests[key] = hs.requests.get(key, 0) + 1
        if self.site.access_log:
            self._log(ex, ex.binding.service if ex.binding is not None else "-")

    def _log(self, ex: Exchange, service: str) -> None:
        logs.log_request(
            service,
            self.site.port,
            self.client,
            ex.hostname,
            ex.method.decode("latin-1"),
            ex.url.decode("latin-1"),
            ex.status,
            ex.body_out,
            time.monotonic() - ex.started,
            ex.endpoint,
            ex.retries,
        )

    # -- failures
    def _response_timeout(self, ex: Exchange) -> None:
        up = ex.up
        if up is not None:
            up.ex = None
            up.close()
            ex.up = None
        if ex.host is not None:
            ex.pool.report_failure(ex.host)  # type: ignore[union-attr]
        if ex.response_started:
            self._cut(ex, "upstream_timeout")
            return
        self._generate(ex, 504, "upstream_timeout")

    def _cut(self, ex: Exchange, reason: str) -> None:
        """The response was under way and cannot be completed: the client must not take it as complete."""
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        self._account(ex)
        self.abort(reason)

    def _upstream_error(self, ex: Exchange, up: UpstreamConn, reason: str, detail: str) -> None:
        log.debug("%r: upstream %r: %s: %s", self, up, reason, detail)
        up.ex = None
        up.close()
        ex.up = None
        if ex.host is not None:
            ex.pool.report_failure(ex.host)  # type: ignore[union-attr]
        if ex.response_started:
            self._cut(ex, reason)
            return
        self._generate(ex, 502, "upstream_failed")

    def _upstream_lost(self, ex: Exchange, up: UpstreamConn, exc: Exception | None) -> None:
        """The upstream connection closed while carrying ``ex``."""
        if ex.up is not up:
            return
        ex.up = None
        if ex.response_started:
            if up.status >= 200 and not up.chunked_out and not _has_length(up):
                self._finish(ex)  # the end of a close-delimited body (close_after is set)
                return
            self._cut(ex, "upstream_closed")
            return
        host = ex.host
        if up.reused and not up.got_bytes and self._may_retry(ex, "reused"):
            self._retry(ex, "reused_closed", same_host=True)  # the replica closed an idle connection as it was reused
            return
        if host is not None:
            ex.pool.report_failure(host)  # type: ignore[union-attr]
            if host.via is not None and not up.got_bytes and self._may_retry(ex, "tunnel"):
                self._retry(ex, "tunnel_refused")  # the agent on the replica's node refused the target
                return
        self._generate(ex, 502, "upstream_failed")

    def _may_retry(self, ex: Exchange, why: str) -> bool:
        if self.closing or ex.response_started or ex.upgrade or not ex.body_done:
            return False
        if ex.kept is None:
            return False  # the body was too large to keep
        if why != "tunnel" and ex.method not in _IDEMPOTENT:
            return False
        if why == "reused":
            return not ex.retries
        pool: Pool = ex.pool  # type: ignore[assignment]
        opts = pool.options
        if len(ex.tried) >= opts.retries:
            return False
        st = http_stats(pool)
        budget = max(MIN_RETRY_CONCURRENCY, st.active * opts.http_retry_budget // 100)
        if st.retries_active >= budget and not ex.retry_counted:
            st.retries[why + "_over_budget"] = st.retries.get(why + "_over_budget", 0) + 1
            return False
        return True

    def _retry(self, ex: Exchange, reason: str, same_host: bool = False) -> None:
        host = ex.host
        pool: Pool = ex.pool  # type: ignore[assignment]
        self._count_retry(ex, reason)
        pool.stats.retries += 1
        ex.pending = bytearray(ex.kept) if ex.kept else bytearray()
        if host is not None:
            host.active -= 1
            ex.host = None
        if same_host and host is not None and not host.draining:
            host.active += 1
            ex.host = host
            http_stats(pool).pool_new += 1
            ex.task = task = self.loop.create_task(self._connect(ex, host))
            task.add_done_callback(_task_done)
            return
        if host is not None:
            ex.tried.append(host)
        nxt = self._choose(ex)
        if nxt is None:
            self._generate(ex, 502, "upstream_failed")
            return
        self._send_to(ex, nxt)

    def _count_retry(self, ex: Exchange, reason: str) -> None:
        st = http_stats(ex.pool)  # type: ignore[arg-type]
        st.retries[reason] = st.retries.get(reason, 0) + 1
        ex.retries += 1
        if not ex.retry_counted:
            ex.retry_counted = True
            st.retries_active += 1

    def _abandon(self, ex: Exchange) -> None:
        """The client went away (or is being cut off) while ``ex`` was queued or in flight."""
        up = ex.up
        if up is not None:
            up.ex = None
            up.close()
            ex.up = None
        task = ex.task
        if task is not None:
            ex.task = None
            task.cancel()
        if ex.queued_at:
            self._unqueue(ex)
        self._account(ex, finished=False)

    def _generate(self, ex: Exchange, status: int, reason: str) -> None:
        """Answer ``ex`` with a response of the mesh's own (counted by reason)."""
        close = (
            not ex.keep_alive or not ex.body_done or ex.upgrade or ex.close_after or (self.eof and len(self.queue) <= 1)
        )
        key = (status, reason)
        if ex.pool is not None:
            g = http_stats(ex.pool).generated
        else:
            g = self.front.stats.closed
        g[key] = g.get(key, 0) + 1
        ex.status = status
        ex.response_started = True
        ex.close_after = close
        up = ex.up
        if up is not None:
            up.ex = None
            up.close()
            ex.up = None
        data = _RESPONSES[(status, close)]
        if ex.method == b"HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        self._write_down(ex, data)
        if ex.pool is None:  # not routed: nothing to account for but the log line
            if self.queue and self.queue[0] is ex:
                self.queue.popleft()
            if self.site.access_log:
                self._log(ex, "-")
            if close:
                self._close(linger=not ex.body_done)
            else:
                self._next()
            return
        self._finish(ex)

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        """Bad bytes from the client: answer ``status`` and close the connection (nothing more is read)."""
        log.debug("%r: %d %s: %s", self, status, reason, detail)
        c = self.front.stats.closed
        c[(status, reason)] = c.get((status, reason), 0) + 1
        if self.closing:
            return
        started = any(q.response_started for q in self.queue)
        bad = self._ex
        self._ex = None
        self.closing = True
        for q in list(self.queue):
            self._abandon(q)
        self.queue.clear()
        if bad is not None and bad.pool is not None:
            self._abandon(bad)
        if started:
            reset(self.transport)  # a response is half sent: an error page now would be read as its rest
            return
        self.transport.write(_RESPONSES[(status, True)])
        self._close(linger=status == 413)

    def _close(self, linger: bool = False) -> None:
        """Close the client connection.  ``linger``: the client may still be sending a request body the
        mesh will not read (413, or a response before the body was read): closing with unread bytes would
        reset the connection, and a client still sending would see the reset instead of the response.  So
        the mesh half-closes after the response and reads and discards what comes until the client closes,
        for at most ``LINGER_TIME`` seconds and ``LINGER_BYTES`` bytes (nginx's lingering close)."""
        self.closing = True
        self._cancel_timer()
        if self._wbuf:
            self._flush()
        transport = self.transport
        if linger and self._linger < 0 and not self.eof and not transport.is_closing() and transport.can_write_eof():
            self._linger = LINGER_BYTES
            transport.write_eof()  # after the response: the client reads it, then EOF
            if self._paused:
                self._paused = 0
                transport.resume_reading()
            loop = self.loop
            self._timer_at = when = loop.time() + LINGER_TIME
            self._timer = loop.call_at(when, self._linger_end)
            return
        transport.close()

    def _discard(self, n: int) -> None:
        """Bytes read while lingering (``_close``)."""
        self._linger -= n
        if self._linger < 0:
            self._linger_end()

    def _linger_end(self) -> None:
        self._timer = None
        self._timer_at = _NEVER
        self._linger = -1
        self.transport.close()

    # -- upgrades
    def _upgraded(self, ex: Exchange, up: UpstreamConn, rest_up: bytes) -> None:
        """A 101 came back: hand both connections to a ``Splice`` (with ``host.active`` of the request)."""
        pool: Pool = ex.pool  # type: ignore[assignment]
        host: Host = ex.host  # type: ignore[assignment]
        http_stats(pool).upgrades += 1
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        self._count(ex, "1xx")  # host.active stays: the splice gives it back when the upgraded pair closes
        self.closing = True  # this protocol object is done; the splice carries the connection
        self._cancel_timer()
        if self._wbuf:
            self._flush()  # the 101 goes before anything the splice sends
        self._wbuf = None
        reg = self.site.registry
        if self in reg:
            reg.remove(self)
        up.ex = None
        ex.up = None
        pending = bytes(ex.pending) if ex.pending else b""
        splice = Splice(self.site, self.client)
        splice.transport = self.transport
        splice.pool = pool
        splice.options = pool.options
        splice.local = self.local
        splice.started = ex.started
        reg.add(splice)
        self.transport.set_protocol(splice)
        if self._paused:
            self._paused = 0
            self.transport.resume_reading()
        if up.paused:
            up.paused = False
            up.transport.resume_reading()  # type: ignore[union-attr]
        splice.adopt(host, up.transport, pending, rest_up)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        c = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        return f"<HttpConnection {self.site.name} {c} queue={len(self.queue)}{' closing' if self.closing else ''}>"


_STATUS_CLASS = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx") + ("5xx",) * 4


class _Refuse(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


def _reason(status: int) -> bytes:
    r = _REASONS.get(status)
    if r is not None:
        return r.encode()
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


_STATUS_LINES: dict[int, bytes] = {}  # status -> b"HTTP/1.1 200 OK\r\n" (llhttp gives 100..999: bounded)


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
    return line


def _has_length(up: UpstreamConn) -> bool:
    for k, _ in up.resp_headers:
        if k == b"content-length" or k == b"transfer-encoding":
            return True
    return False


def _task_done(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("http connect task failed", exc_info=task.exception())


def http_front(listener: Listener) -> Any:
    """The protocol factory of an http listener: ``factory(peer)`` -> an ``HttpConnection``.
    Adds ``http`` (the ``HttpFront``: route cache, counters, pooled connections), ``inbound_stats``
    (``InboundStats``) and ``inbound_cache`` (``listener_networks``'s) to the listener."""
    front = listener.http = HttpFront(listener)  # type: ignore[attr-defined]
    listener.inbound_stats = InboundStats()  # type: ignore[attr-defined]
    listener.inbound_cache = None  # type: ignore[attr-defined]

    def factory(peer: tuple | None = None) -> HttpConnection:
        if front.loop is None:
            front.loop = listener.loop
        return HttpConnection(front, peer)

    return factory
