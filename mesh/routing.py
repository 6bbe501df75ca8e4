"""The routing table: the contract between discovery and the data plane.

Everything here is immutable and built from the standard library only, so that
``discovery/`` (and the cluster control plane) can produce tables and ``mesh/``
can consume them without either knowing the other.

Shape::

    RoutingTable(version, services)
      Service(name, options, routes)
        Route(listen_host, port, protocol, match, endpoints)
          Match(hosts, paths)
          Endpoint(id, address, port, node, weight, state, via)

Rules:
- Equal inputs give equal tables: every collection is a tuple sorted by a stable
  key (services by name, routes by (port, listen_host), endpoints by id).  The
  ``normalized()`` constructor helpers do the sorting so producers cannot forget.
- ``RoutingTable.digest`` covers the content and not the version: two producers
  (two managers) that see the same cluster publish tables with the same digest.
- A table round-trips through JSON: ``RoutingTable.from_json(t.to_json()) == t``.
- An endpoint is identified by ``Endpoint.key`` = (id, address, port, via).  The
  data plane keeps per-endpoint state (health, ejection, active connections)
  across tables as long as the key is present.  Docker reuses addresses at once,
  so discovery sets ``id`` to the container/task id, never to the address alone.
- ``state="draining"``: the endpoint gets no new connections; open ones stay.
- ``via`` is ``None`` for an endpoint reached directly, or "host:port" of the
  tunnel of the agent on the endpoint's node (cluster-wide forwarding).
- ``Route.protocol`` says what a listener speaks: "tcp" (a byte stream per
  connection), "http" (requests routed by ``Match``), "tls" (passthrough routed
  by the SNI name, ``Match.hosts``) or "udp" (datagrams).  Which of them a data
  plane serves is the data plane's business (``mesh.runtime.FRONTS``); the
  contract only says what they mean.
- Sharing a listen address: two routes on the same (listen_host, port) of the
  same transport (udp, or stream = tcp/http/tls) are allowed only when both
  are http, or both are tls, and their ``Match`` rules differ; a tcp route owns
  its port alone, and a tcp and an http/tls route never share one.  The same
  port number may carry a stream route and a udp route.
- Port 0 asks for any free port at bind time (tests); it never conflicts, and
  the bound port is read back from the listener.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "BALANCERS",
    "PROXY_PROTOCOLS",
    "Endpoint",
    "HealthCheck",
    "Match",
    "Route",
    "RoutingTable",
    "Service",
    "ServiceOptions",
    "TableError",
    "format_hostport",
    "parse_hostport",
    "route_conflict",
    "valid_host_pattern",
]

BALANCERS = ("round-robin", "least-conn", "p2c", "hash")
PROXY_PROTOCOLS = (None, "v1", "v2")
ENDPOINT_STATES = ("running", "draining")
PROTOCOLS = ("tcp", "http", "tls", "udp")
# Protocols whose routes may share one listen address, told apart by their Match rules.
SHARED_PROTOCOLS = ("http", "tls")
HEALTH_KINDS = ("tcp", "http")


class TableError(ValueError):
    """A table (or a part of one) violates the contract.  The message says which field."""


HTTP_RETRY_STATUSES = (502, 503, 504)
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Options added after tables were first published: left out of the JSON while at their default, so a
# table that does not use them keeps the JSON (and digest) it had before they existed.
_OMIT_WHEN_DEFAULT = frozenset(
    {
        "slow_start", "accept_proxy", "http_head_timeout", "http_max_head", "http_max_headers", "http_max_body",
        "http_response_timeout", "http_keepalive_timeout", "http_pool_max_idle", "http_pool_idle_timeout",
        "http_trusted", "http_retry_on", "http_retry_budget", "http_hash_key", "http_sticky", "http_sticky_name",
        "http_sticky_max_age", "http_sticky_secure", "http_sticky_samesite", "http_max_inflight", "http_queue",
        "http_queue_timeout",
    }
)  # fmt: skip
_TUPLE_OPTIONS = ("accept_proxy", "http_trusted", "http_retry_on")


def _valid_token(text: object) -> bool:
    """An RFC 9110 token (a header or cookie name)."""
    return isinstance(text, str) and bool(text) and all(c in _TOKEN_CHARS for c in text)


def _valid_hash_key(text: object) -> bool:
    if not isinstance(text, str) or ":" not in text:
        return False
    kind, _, name = text.partition(":")
    return kind in ("header", "cookie") and _valid_token(name)


def _valid_cidr(text: object) -> bool:
    import ipaddress

    try:
        ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        return False
    return True


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise TableError(msg)


def parse_hostport(text: str, default_host: str | None = None) -> tuple[str, int]:
    """Parse "host:port", "[v6]:port" or (with ``default_host``) a bare "port".

    Raises ``TableError`` with a message that quotes the input.
    """
    s = str(text).strip()
    host: str | None
    if s.startswith("["):
        end = s.find("]")
        _check(end > 0 and s[end + 1 : end + 2] == ":", f"expected '[address]:port', got {text!r}")
        host, port_s = s[1:end], s[end + 2 :]
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    elif ":" not in s and default_host is not None:
        host, port_s = default_host, s
    else:
        raise TableError(f"expected 'host:port', got {text!r}")
    _check(bool(host), f"missing host in {text!r}")
    _check(port_s.isdigit(), f"port must be a number in {text!r}")
    port = int(port_s)
    _check(0 < port < 65536, f"port out of range 1-65535 in {text!r}")
    return host, port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health check of a service's endpoints.

    kind "tcp": a connect within ``timeout`` is a pass.  kind "http": GET ``path``
    (Host ``host`` if set) and a status in ``expect_status`` is a pass.  An
    endpoint turns healthy after ``rise`` passes in a row and unhealthy after
    ``fall`` failures in a row.  Each probe is delayed by a random share of up to
    ``jitter`` x interval so nodes do not probe in lock step.
    """

    kind: str = "tcp"
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    path: str = "/"
    host: str | None = None
    expect_status: tuple[int, ...] = (200,)
    jitter: float = 0.1

    def __post_init__(self) -> None:
        _check(self.kind in HEALTH_KINDS, f"health check kind must be one of {HEALTH_KINDS}, got {self.kind!r}")
        _check(self.interval > 0, f"health check interval must be > 0, got {self.interval!r}")
        _check(self.timeout > 0, f"health check timeout must be > 0, got {self.timeout!r}")
        _check(self.rise >= 1 and self.fall >= 1, "health check rise and fall must be >= 1")
        _check(0 <= self.jitter <= 1, f"health check jitter must be within 0..1, got {self.jitter!r}")
        _check(self.path.startswith("/"), f"health check path must start with '/', got {self.path!r}")
        _check(
            len(self.expect_status) > 0 and all(100 <= s <= 599 for s in self.expect_status),
            f"health check expect_status must be HTTP statuses, got {self.expect_status!r}",
        )


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """Per-service behaviour of the data plane.  Defaults are what a user gets with no options.

    Timeouts are in seconds; ``idle_timeout`` 0 disables it.
    ``retries``: how many *other* endpoints a failed connect is retried on
    (before any byte was sent upstream).
    Outlier detection: ``consecutive_failures`` connect failures in a row eject an
    endpoint for ``base_ejection_time`` x (number of its ejections so far), capped
    at ``max_ejection_time``; at most ``max_ejection_percent`` % of a route's
    endpoints are ejected at once.  ``panic_threshold`` (%): when fewer than that
    share of endpoints are usable, balance over all of them instead of refusing.
    ``locality``: "prefer" local endpoints (cluster mode) or "off".
    ``zero_copy``: let a direction of a connection that carries a large transfer move to
    the kernel (``os.splice``, Linux), as HAProxy's ``option splice-auto`` does.  Off by
    default: it saves CPU but measured lower throughput at 1 MiB x 64 connections (docs/benchmarks.md).
    UDP routes (``mesh.udp``): ``udp_balance`` chooses a new session's replica (the readers set it
    to ``balance`` when only that is given; else ``hash`` on the client IP, so a client keeps its
    replica); a session ends after ``udp_idle_timeout`` seconds without a datagram either way, or
    once the replica sent ``udp_responses`` datagrams per client datagram (0 = not limited; DNS: 1);
    at most ``udp_max_sessions`` sessions per listener (beyond: the oldest idle one is evicted).
    """

    balance: str = "round-robin"
    proxy_protocol: str | None = None
    connect_timeout: float = 3.0
    idle_timeout: float = 3600.0
    retries: int = 2
    consecutive_failures: int = 3
    base_ejection_time: float = 10.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50
    panic_threshold: int = 50
    health_check: HealthCheck | None = None
    locality: str = "prefer"
    zero_copy: bool = False
    udp_balance: str = "hash"
    udp_idle_timeout: float = 30.0
    udp_responses: int = 0
    udp_max_sessions: int = 10000
    # -- every protocol ------------------------------------------------------------------------
    slow_start: float = 0.0
    accept_proxy: tuple[str, ...] = ()
    # -- http routes (mesh.proxy.http) -----------------------------------------------------------
    http_head_timeout: float = 10.0
    http_max_head: int = 65536
    http_max_headers: int = 100
    http_max_body: int = 0
    http_response_timeout: float = 60.0
    http_keepalive_timeout: float = 75.0
    http_pool_max_idle: int = 64
    http_pool_idle_timeout: float = 1.5
    http_trusted: tuple[str, ...] = ()
    http_retry_on: tuple[int, ...] = ()
    http_retry_budget: int = 20
    http_hash_key: str | None = None
    http_sticky: str | None = None
    http_sticky_name: str = "mesh_sticky"
    http_sticky_max_age: int = 0
    http_sticky_secure: bool = False
    http_sticky_samesite: str = "lax"
    http_max_inflight: int = 0
    http_queue: int = 100
    http_queue_timeout: float = 5.0

    def __post_init__(self) -> None:
        _check(self.balance in BALANCERS, f"balance must be one of {', '.join(BALANCERS)}; got {self.balance!r}")
        _check(
            self.proxy_protocol in PROXY_PROTOCOLS,
            f"proxy_protocol must be one of v1, v2 (or unset); got {self.proxy_protocol!r}",
        )
        _check(self.connect_timeout > 0, f"connect_timeout must be > 0, got {self.connect_timeout!r}")
        _check(self.idle_timeout >= 0, f"idle_timeout must be >= 0 (0 = off), got {self.idle_timeout!r}")
        _check(0 <= self.retries <= 100, f"retries must be within 0..100, got {self.retries!r}")
        _check(self.consecutive_failures >= 1, "consecutive_failures must be >= 1")
        _check(
            0 < self.base_ejection_time <= self.max_ejection_time, "need 0 < base_ejection_time <= max_ejection_time"
        )
        _check(0 <= self.max_ejection_percent <= 100, "max_ejection_percent must be within 0..100")
        _check(0 <= self.panic_threshold <= 100, "panic_threshold must be within 0..100")
        _check(self.locality in ("prefer", "off"), f"locality must be 'prefer' or 'off', got {self.locality!r}")
        _check(isinstance(self.zero_copy, bool), f"zero_copy must be true or false, got {self.zero_copy!r}")
        _check(
            self.udp_balance in BALANCERS,
            f"udp_balance must be one of {', '.join(BALANCERS)}; got {self.udp_balance!r}",
        )
        _check(self.udp_idle_timeout > 0, f"udp_idle_timeout must be > 0, got {self.udp_idle_timeout!r}")
        _check(0 <= self.udp_responses <= 1000, f"udp_responses must be within 0..1000, got {self.udp_responses!r}")
        _check(
            1 <= self.udp_max_sessions <= 1_000_000,
            f"udp_max_sessions must be within 1..1000000, got {self.udp_max_sessions!r}",
        )
        object.__setattr__(self, "accept_proxy", tuple(self.accept_proxy))
        object.__setattr__(self, "http_trusted", tuple(self.http_trusted))
        object.__setattr__(self, "http_retry_on", tuple(sorted(set(self.http_retry_on))))
        _check(self.slow_start >= 0, f"slow_start must be >= 0 (0 = off), got {self.slow_start!r}")
        for name in ("accept_proxy", "http_trusted"):
            for cidr in getattr(self, name):
                _check(_valid_cidr(cidr), f"{name}: {cidr!r} is not an IP network (e.g. 10.0.0.0/8, ::1)")
        _check(self.http_head_timeout > 0, f"http_head_timeout must be > 0, got {self.http_head_timeout!r}")
        _check(
            1024 <= self.http_max_head <= 1 << 20,
            f"http_max_head must be within 1024..1048576, got {self.http_max_head!r}",
        )
        _check(
            1 <= self.http_max_headers <= 1000,
            f"http_max_headers must be within 1..1000, got {self.http_max_headers!r}",
        )
        _check(self.http_max_body >= 0, f"http_max_body must be >= 0 (0 = no limit), got {self.http_max_body!r}")
        _check(self.http_response_timeout > 0, f"http_response_timeout must be > 0, got {self.http_response_timeout!r}")
        _check(
            self.http_keepalive_timeout > 0, f"http_keepalive_timeout must be > 0, got {self.http_keepalive_timeout!r}"
        )
        _check(
            0 <= self.http_pool_max_idle <= 10000,
            f"http_pool_max_idle must be within 0..10000, got {self.http_pool_max_idle!r}",
        )
        _check(
            self.http_pool_idle_timeout > 0, f"http_pool_idle_timeout must be > 0, got {self.http_pool_idle_timeout!r}"
        )
        _check(
            all(c in HTTP_RETRY_STATUSES for c in self.http_retry_on),
            f"http_retry_on takes {', '.join(map(str, HTTP_RETRY_STATUSES))}; got {self.http_retry_on!r}",
        )
        _check(
            0 <= self.http_retry_budget <= 100,
            f"http_retry_budget must be within 0..100, got {self.http_retry_budget!r}",
        )
        _check(
            self.http_hash_key is None or _valid_hash_key(self.http_hash_key),
            f"http_hash_key must be header:<name> or cookie:<name>, got {self.http_hash_key!r}",
        )
        _check(
            self.http_sticky in (None, "cookie"), f"http_sticky must be 'cookie' (or unset), got {self.http_sticky!r}"
        )
        _check(
            _valid_token(self.http_sticky_name),
            f"http_sticky_name must be a cookie name, got {self.http_sticky_name!r}",
        )
        _check(
            0 <= self.http_sticky_max_age <= 10**9,
            f"http_sticky_max_age must be >= 0 (0 = session cookie), got {self.http_sticky_max_age!r}",
        )
        _check(isinstance(self.http_sticky_secure, bool), "http_sticky_secure must be true or false")
        _check(
            self.http_sticky_samesite in ("lax", "strict", "none"),
            f"http_sticky_samesite must be lax, strict or none, got {self.http_sticky_samesite!r}",
        )
        _check(
            0 <= self.http_max_inflight <= 100000,
            f"http_max_inflight must be within 0..100000 (0 = no limit), got {self.http_max_inflight!r}",
        )
        _check(0 <= self.http_queue <= 100000, f"http_queue must be within 0..100000, got {self.http_queue!r}")
        _check(self.http_queue_timeout > 0, f"http_queue_timeout must be > 0, got {self.http_queue_timeout!r}")

    def for_protocol(self, protocol: str) -> ServiceOptions:
        """The options a route of ``protocol`` runs with: a udp route balances with ``udp_balance``."""
        if protocol != "udp" or self.udp_balance == self.balance:
            return self
        return replace(self, balance=self.udp_balance)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One replica of a route: where to connect.  See the module docstring for ``id`` and ``via``."""

    id: str
    address: str
    port: int
    node: str = ""
    weight: int = 1
    state: str = "running"
    via: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.id), "endpoint id must not be empty")
        _check(bool(self.address), f"endpoint {self.id}: address must not be empty")
        _check(
            isinstance(self.port, int) and 0 < self.port < 65536,
            f"endpoint {self.id}: port out of range: {self.port!r}",
        )
        _check(
            isinstance(self.weight, int) and 1 <= self.weight <= 1000,
            f"endpoint {self.id}: weight must be 1..1000, got {self.weight!r}",
        )
        _check(
            self.state in ENDPOINT_STATES, f"endpoint {self.id}: state must be running or draining, got {self.state!r}"
        )
        if self.via is not None:
            parse_hostport(self.via)

    @property
    def key(self) -> tuple[str, str, int, str | None]:
        return (self.id, self.address, self.port, self.via)

    @property
    def hostport(self) -> str:
        return format_hostport(self.address, self.port)


def valid_host_pattern(name: str) -> bool:
    """A DNS name ("shop.example.com") or a leading-label wildcard ("*.example.com")."""
    if name.startswith("*."):
        name = name[2:]
    if not name or len(name) > 253:
        return False
    for label in name.split("."):
        if not 0 < len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            return False
    return True


@dataclass(frozen=True, slots=True)
class Match:
    """Which requests of a shared listener a route takes.

    ``hosts``: names the request is for (the HTTP Host header, or the TLS SNI
    name), exact ("shop.example.com") or a wildcard for one or more leading
    labels ("*.example.com"); empty = any host.  ``paths``: HTTP path prefixes
    (each starts with "/"); empty = any path.  Stored lower-cased (hosts),
    de-duplicated and sorted.  A tcp or udp route has an empty ``Match``.
    """

    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        hosts = tuple(sorted({str(h).strip().lower().rstrip(".") for h in self.hosts}))
        for h in hosts:
            _check(valid_host_pattern(h), f"match host must be a DNS name or '*.name', got {h!r}")
        paths = tuple(sorted({str(p) for p in self.paths}))
        for p in paths:
            _check(
                p.startswith("/") and p.isprintable() and " " not in p and "?" not in p and "#" not in p,
                f"match path must start with '/' and hold no space, '?' or '#', got {p!r}",
            )
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "paths", paths)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.paths)

    def rules(self) -> tuple[tuple[str, str], ...]:
        """Every (host, path prefix) pair this match covers; "" means any."""
        return tuple((h, p) for h in (self.hosts or ("",)) for p in (self.paths or ("",)))


def transport_of(protocol: str) -> str:
    """The L4 transport a protocol listens on: "udp" or "stream"."""
    return "udp" if protocol == "udp" else "stream"


@dataclass(frozen=True, slots=True)
class Route:
    """A published port, what it speaks, which requests it takes (``match``) and the endpoints behind it."""

    port: int
    endpoints: tuple[Endpoint, ...] = ()
    listen_host: str = "0.0.0.0"
    protocol: str = "tcp"
    match: Match = field(default_factory=Match)

    def __post_init__(self) -> None:
        _check(isinstance(self.port, int) and 0 <= self.port < 65536, f"listen port out of range: {self.port!r}")
        _check(self.protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        _check(bool(self.listen_host), "listen_host must not be empty")
        _check(isinstance(self.match, Match), f"route :{self.port}: match must be a Match, got {self.match!r}")
        if self.protocol in ("tcp", "udp"):
            _check(not self.match, f"route :{self.port}: a {self.protocol} route cannot have host/path match rules")
        elif self.protocol == "tls":
            _check(not self.match.paths, f"route :{self.port}: a tls route matches SNI names only, not paths")
        ids = [e.id for e in self.endpoints]
        _check(len(ids) == len(set(ids)), f"route :{self.port}: duplicate endpoint ids")
        object.__setattr__(self, "endpoints", tuple(sorted(self.endpoints, key=lambda e: e.id)))

    @property
    def listen(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    @property
    def transport(self) -> str:
        return transport_of(self.protocol)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    routes: tuple[Route, ...]
    options: ServiceOptions = field(default_factory=ServiceOptions)

    def __post_init__(self) -> None:
        _check(bool(self.name), "service name must not be empty")
        object.__setattr__(
            self,
            "routes",
            tuple(sorted(self.routes, key=lambda r: (r.port, r.listen_host, r.protocol, r.match.hosts, r.match.paths))),
        )


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """An immutable, versioned snapshot.  ``version`` is assigned by the producer
    and grows with each publish; ``digest`` identifies the content."""

    version: int = 0
    services: tuple[Service, ...] = ()

    def __post_init__(self) -> None:
        names = [s.name for s in self.services]
        _check(len(names) == len(set(names)), "duplicate service names")
        object.__setattr__(self, "services", tuple(sorted(self.services, key=lambda s: s.name)))
        seen: list[tuple[Route, str]] = []
        for svc in self.services:
            for r in svc.routes:
                for other, name in seen:
                    why = route_conflict(other, name, r, svc.name)
                    if why is not None:
                        raise TableError(why)
                seen.append((r, svc.name))

    # -- derived views --------------------------------------------------------------
    def service(self, name: str) -> Service | None:
        for s in self.services:
            if s.name == name:
                return s
        return None

    def routes(self) -> Iterable[tuple[Service, Route]]:
        for s in self.services:
            for r in s.routes:
                yield s, r

    @property
    def digest(self) -> str:
        body = json.dumps(self.to_dict()["services"], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def same_content(self, other: RoutingTable | None) -> bool:
        return other is not None and self.services == other.services

    def with_version(self, version: int) -> RoutingTable:
        return replace(self, version=version)

    # -- JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "services": [_service_to_dict(s) for s in self.services]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingTable:
        try:
            return cls(
                version=int(data.get("version", 0)),
                services=tuple(_service_from_dict(s) for s in data.get("services", ())),
            )
        except TableError:
            raise
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise TableError(f"malformed routing table: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> RoutingTable:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TableError(f"routing table is not JSON: {exc}") from exc
        _check(isinstance(data, dict), "routing table JSON must be an object")
        return cls.from_dict(data)


def route_conflict(a: Route, a_service: str, b: Route, b_service: str) -> str | None:
    """Why route ``b`` of ``b_service`` cannot be served next to route ``a`` of ``a_service``, naming
    both services (and the rule both claim), or None when they can share (module docstring rules).
    Used by the table itself and by the label builder, which skips the newcomer instead of failing."""
    if a.port == 0 or b.port == 0 or a.port != b.port or a.transport != b.transport:
        return None  # port 0: any free port, never the same as another
    if not _hosts_overlap(a.listen_host, b.listen_host):
        return None
    where = format_hostport(b.listen_host, b.port)
    if b.protocol not in SHARED_PROTOCOLS or a.protocol != b.protocol:
        return (
            f"service {b_service!r} listens on {where} ({b.protocol}), "
            f"already used by service {a_service!r} ({a.protocol})"
        )
    if a.listen_host != b.listen_host:
        return (
            f"services {a_service!r} and {b_service!r} share port {b.port} ({b.protocol}) "
            f"with different listen addresses ({a.listen_host}, {b.listen_host})"
        )
    if b.protocol == "http":
        # no paths and paths ["/"] take the same requests
        common = {(h, p or "/") for h, p in a.match.rules()} & {(h, p or "/") for h, p in b.match.rules()}
    else:
        common = set(a.match.rules()) & set(b.match.rules())
    if not common:
        return None
    host, path = min(common)
    if b.protocol == "tls":
        what = f"SNI name {host!r}" if host else "no SNI name (the default service)"
        return f"services {a_service!r} and {b_service!r} both claim {what} on {where} (tls)"
    return (
        f"services {a_service!r} and {b_service!r} both claim host {host or '*'!r} "
        f"path {path or '/'!r} on {where} ({b.protocol})"
    )


def _hosts_overlap(a: str, b: str) -> bool:
    wild = ("0.0.0.0", "::", "*")
    return a == b or a in wild or b in wild


def _plain(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


_DEFAULT_OPTIONS: dict[str, Any] = {}


def _service_to_dict(s: Service) -> dict[str, Any]:
    opts = _plain(s.options)
    if not _DEFAULT_OPTIONS:
        _DEFAULT_OPTIONS.update(_plain(ServiceOptions()))
    for name in _OMIT_WHEN_DEFAULT:
        if opts[name] == _DEFAULT_OPTIONS[name]:
            del opts[name]
    for name in _TUPLE_OPTIONS:
        if name in opts:
            opts[name] = list(opts[name])
    if s.options.health_check is not None:
        hc = _plain(s.options.health_check)
        hc["expect_status"] = list(hc["expect_status"])
        opts["health_check"] = hc
    return {
        "name": s.name,
        "options": opts,
        "routes": [_route_to_dict(r) for r in s.routes],
    }


def _route_to_dict(r: Route) -> dict[str, Any]:
    d: dict[str, Any] = {
        "port": r.port,
        "listen_host": r.listen_host,
        "protocol": r.protocol,
        "endpoints": [_plain(e) for e in r.endpoints],
    }
    if r.match:
        # Only when set, so a table without match rules has the same JSON (and digest) as before they existed.
        d["match"] = {"hosts": list(r.match.hosts), "paths": list(r.match.paths)}
    return d


def _service_from_dict(d: dict[str, Any]) -> Service:
    opts = dict(d.get("options") or {})
    hc = opts.get("health_check")
    if hc is not None:
        hc = dict(hc)
        if "expect_status" in hc:
            hc["expect_status"] = tuple(hc["expect_status"])
        opts["health_check"] = HealthCheck(**hc)
    for name in _TUPLE_OPTIONS:
        if name in opts:
            opts[name] = tuple(opts[name])
    routes = tuple(
        Route(
            port=r["port"],
            listen_host=r.get("listen_host", "0.0.0.0"),
            protocol=r.get("protocol", "tcp"),
            match=Match(**(r.get("match") or {})),
            endpoints=tuple(Endpoint(**e) for e in r.get("endpoints", ())),
        )
        for r in d["routes"]
    )
    return Service(name=d["name"], routes=routes, options=ServiceOptions(**opts))
