"""One option grammar: the same text means the same value in mesh.yaml, mesh.toml, a container
label and a swarm service label (mesh/options.py, docs/options.md).

``TABLE`` is run through all four readers: each row gives the parsed value, or the "expected ..."
phrase that every reader's error must carry (file: after "mesh.yaml:LINE: services.web.KEY: ";
labels: after "label mesh.KEY='TEXT': ").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from discovery.builder import build_table
from discovery.records import ContainerRecord, NetworkAddress, NetworkRecord, ServiceRecord, TaskRecord, frozen_labels
from mesh import options as schema
from mesh.config import parse_config
from mesh.errors import ConfigError
from mesh.routing import HealthCheck, ServiceOptions

# option -> label.  "health_check.X": a key of health_check (kind http) / a mesh.health.* label (mesh.health=http);
# "health_check": the whole check ("tcp", "http", "none") / mesh.health; "weight": an endpoint's weight / mesh.weight.
LABEL = {
    "balance": "mesh.balance",
    "proxy_protocol": "mesh.proxy-protocol",
    "connect_timeout": "mesh.connect-timeout",
    "idle_timeout": "mesh.idle-timeout",
    "retries": "mesh.retries",
    "consecutive_failures": "mesh.consecutive-failures",
    "base_ejection_time": "mesh.base-ejection-time",
    "max_ejection_time": "mesh.max-ejection-time",
    "max_ejection_percent": "mesh.max-ejection-percent",
    "panic_threshold": "mesh.panic-threshold",
    "locality": "mesh.locality",
    "zero_copy": "mesh.zero-copy",
    "udp_balance": "mesh.udp.balance",
    "udp_idle_timeout": "mesh.udp.idle-timeout",
    "udp_responses": "mesh.udp.responses",
    "udp_max_sessions": "mesh.udp.max-sessions",
    "health_check": "mesh.health",
    "health_check.interval": "mesh.health.interval",
    "health_check.timeout": "mesh.health.timeout",
    "health_check.rise": "mesh.health.rise",
    "health_check.fall": "mesh.health.fall",
    "health_check.path": "mesh.health.path",
    "health_check.host": "mesh.health.host",
    "health_check.expect_status": "mesh.health.status",
    "health_check.jitter": "mesh.health.jitter",
    "weight": "mesh.weight",
    "sni": "mesh.tls.sni",
    # every protocol
    "slow_start": "mesh.slow-start",
    "accept_proxy": "mesh.accept-proxy",
    # http routes; "hosts" / "paths": a protocol http service's match / mesh.http.hosts, mesh.http.paths
    "http_head_timeout": "mesh.http.head-timeout",
    "http_max_head": "mesh.http.max-head",
    "http_max_headers": "mesh.http.max-headers",
    "http_max_body": "mesh.http.max-body",
    "http_response_timeout": "mesh.http.response-timeout",
    "http_keepalive_timeout": "mesh.http.keepalive-timeout",
    "http_pool_max_idle": "mesh.http.pool-max-idle",
    "http_pool_idle_timeout": "mesh.http.pool-idle-timeout",
    "http_trusted": "mesh.http.trusted",
    "http_retry_on": "mesh.http.retry-on",
    "http_retry_budget": "mesh.http.retry-budget",
    "http_hash_key": "mesh.http.hash-key",
    "http_sticky": "mesh.http.sticky",
    "http_sticky_name": "mesh.http.sticky.name",
    "http_sticky_max_age": "mesh.http.sticky.max-age",
    "http_sticky_secure": "mesh.http.sticky.secure",
    "http_sticky_samesite": "mesh.http.sticky.samesite",
    "http_max_inflight": "mesh.http.max-inflight",
    "http_queue": "mesh.http.queue",
    "http_queue_timeout": "mesh.http.queue-timeout",
    "hosts": "mesh.http.hosts",
    "paths": "mesh.http.paths",
}
# the options of a route's match: (file protocol, mesh.publish suffix)
MATCH = {"sni": "tls", "hosts": "http", "paths": "http"}


@dataclass(frozen=True)
class Bad:
    expected: str  # the phrase both readers give
    file: str | None = None  # where the file reader words it differently (kept from before the schema)


DURATION = "expected a duration like 5, 0.5, '500ms', '5s' or '2m'"
WHOLE_0_100 = "expected a whole number 0..100"
PATH = "expected a path starting with / and without spaces"
STATUSES = "expected HTTP status codes 100..599, e.g. 200,204"
SNI = "expected DNS names or '*.name' wildcards, separated by commas, e.g. a.example.com,*.b.example.com"
POSITIVE = Bad("expected a duration > 0", file="must be > 0")
NETWORKS = "expected IP addresses or networks separated by commas (or none), e.g. 10.0.0.0/8,fd00::/8"
SIZE_TAIL = ": bytes (65536) or a whole number with KiB, MiB or GiB (64KiB)"
HEAD_SIZE = "expected a size 1KiB..1MiB" + SIZE_TAIL
BODY_SIZE = "expected a size 0..1024GiB" + SIZE_TAIL
RETRY_ON = "expected 502, 503 or 504, several separated by commas (or none), e.g. 502,503"
HASH_KEY = "expected header:<name> or cookie:<name> (or none), e.g. header:x-user-id"
COOKIE_NAME = "expected a cookie name (letters, digits and !#$%&'*+-.^_`|~)"
PATHS = "expected path prefixes starting with /, separated by commas, e.g. /api,/static"

TABLE = [
    # durations: number[unit], unit ms|s|m|h right after the number, no unit = seconds
    ("connect_timeout", "500ms", 0.5),
    ("connect_timeout", "2s", 2.0),
    ("connect_timeout", "1.5m", 90.0),
    ("connect_timeout", "1h", 3600.0),
    ("connect_timeout", "5", 5.0),
    ("connect_timeout", "0.25", 0.25),
    ("connect_timeout", " 3s ", 3.0),
    ("connect_timeout", ".5s", Bad(DURATION)),
    ("connect_timeout", "5 s", Bad(DURATION)),
    ("connect_timeout", "5.s", Bad(DURATION)),
    ("connect_timeout", "5S", Bad(DURATION)),
    ("connect_timeout", "1d", Bad(DURATION)),
    ("connect_timeout", "-1s", Bad(DURATION)),
    ("connect_timeout", "1e3", Bad(DURATION)),
    ("connect_timeout", "1_000", Bad(DURATION)),
    ("connect_timeout", "\u0663", Bad(DURATION)),  # ARABIC-INDIC DIGIT THREE: not an ASCII digit
    ("connect_timeout", "s", Bad(DURATION)),
    ("connect_timeout", "", Bad(DURATION)),
    ("connect_timeout", "9" * 400, Bad(DURATION)),  # float() says inf
    ("connect_timeout", "0", Bad("expected a duration > 0", file="must be > 0")),
    ("connect_timeout", "0ms", Bad("expected a duration > 0", file="must be > 0")),
    ("idle_timeout", "0", 0.0),
    ("idle_timeout", "15m", 900.0),
    ("base_ejection_time", "30s", 30.0),
    ("max_ejection_time", "10m", 600.0),
    ("health_check.interval", "2s", 2.0),
    ("health_check.interval", "0s", Bad("expected a duration > 0", file="must be > 0")),
    ("health_check.timeout", "250ms", 0.25),
    # whole numbers: ASCII digits, within the range
    ("retries", "0", 0),
    ("retries", "100", 100),
    ("retries", " 7 ", 7),
    ("retries", "101", Bad(WHOLE_0_100)),
    ("retries", "-1", Bad(WHOLE_0_100)),
    ("retries", "+1", Bad(WHOLE_0_100)),
    ("retries", "1.0", Bad(WHOLE_0_100)),
    ("retries", "1_0", Bad(WHOLE_0_100)),
    ("retries", "\u00b2", Bad(WHOLE_0_100)),  # SUPERSCRIPT TWO: isdigit() but not a number
    ("retries", "two", Bad(WHOLE_0_100)),
    ("retries", "", Bad(WHOLE_0_100)),
    ("retries", "9" * 5000, Bad(WHOLE_0_100)),  # beyond int()'s digit limit
    ("consecutive_failures", "1", 1),
    ("consecutive_failures", "0", Bad("expected a whole number 1..100")),
    ("health_check.rise", "100", 100),
    ("health_check.rise", "101", Bad("expected a whole number 1..100")),
    ("health_check.fall", "2", 2),
    ("weight", "5", 5),
    ("weight", "0", Bad("expected a whole number 1..1000")),
    ("weight", "lots", Bad("expected a whole number 1..1000")),
    # percentages: a whole number 0..100, "%" allowed
    ("max_ejection_percent", "30", 30),
    ("max_ejection_percent", "30%", 30),
    ("max_ejection_percent", "101%", Bad(WHOLE_0_100)),
    ("max_ejection_percent", "30 %", Bad(WHOLE_0_100)),
    ("max_ejection_percent", "0.5", Bad(WHOLE_0_100)),
    ("panic_threshold", "0", 0),
    ("panic_threshold", "%", Bad(WHOLE_0_100)),
    # numbers
    ("health_check.jitter", "0.5", 0.5),
    ("health_check.jitter", "1", 1.0),
    ("health_check.jitter", "2", Bad("expected a number within 0..1")),
    ("health_check.jitter", ".5", Bad("expected a number within 0..1")),
    # words: any case
    ("balance", "p2c", "p2c"),
    ("balance", "LEAST-CONN", "least-conn"),
    ("balance", " hash ", "hash"),
    ("balance", "rr", Bad("expected one of round-robin, least-conn, p2c, hash")),
    ("balance", "", Bad("expected one of round-robin, least-conn, p2c, hash")),
    ("proxy_protocol", "v2", "v2"),
    ("proxy_protocol", "V1", "v1"),
    ("proxy_protocol", "none", None),
    ("proxy_protocol", "off", None),
    ("proxy_protocol", "v3", Bad("expected v1, v2 or none")),
    ("proxy_protocol", "false", Bad("expected v1, v2 or none")),
    ("proxy_protocol", "", Bad("expected v1, v2 or none")),
    ("locality", "off", "off"),
    ("locality", "Prefer", "prefer"),
    ("locality", "nearest", Bad("expected prefer or off")),
    ("zero_copy", "false", False),
    ("zero_copy", "On", True),
    ("zero_copy", "0", False),
    ("zero_copy", "maybe", Bad("expected true or false")),
    ("health_check", "tcp", HealthCheck(kind="tcp")),
    ("health_check", "HTTP", HealthCheck(kind="http")),
    ("health_check", "none", None),
    ("health_check", "off", None),
    ("health_check", "icmp", Bad("expected tcp, http or none")),
    ("health_check", "", Bad("expected tcp, http or none")),
    # udp routes
    ("udp_balance", "round-robin", "round-robin"),
    ("udp_balance", "HASH", "hash"),
    ("udp_balance", "sticky", Bad("expected one of round-robin, least-conn, p2c, hash")),
    ("udp_idle_timeout", "5s", 5.0),
    ("udp_idle_timeout", "250ms", 0.25),
    ("udp_idle_timeout", "0", Bad("expected a duration > 0", file="must be > 0")),
    ("udp_idle_timeout", "5 s", Bad(DURATION)),
    ("udp_responses", "1", 1),
    ("udp_responses", "0", 0),
    ("udp_responses", "1001", Bad("expected a whole number 0..1000")),
    ("udp_responses", "one", Bad("expected a whole number 0..1000")),
    ("udp_max_sessions", "10000", 10000),
    ("udp_max_sessions", "1", 1),
    ("udp_max_sessions", "0", Bad("expected a whole number 1..1000000")),
    ("udp_max_sessions", "1000001", Bad("expected a whole number 1..1000000")),
    # tls server names (a route's match, not a service option)
    ("sni", "a.example.com", ("a.example.com",)),
    ("sni", "B.Example.com, *.b.example.com", ("*.b.example.com", "b.example.com")),
    ("sni", "a.example.com.", ("a.example.com",)),
    ("sni", "a b.example.com", Bad(SNI)),
    ("sni", "*", Bad(SNI)),
    ("sni", "a.*.example.com", Bad(SNI)),
    ("sni", "a.example.com,", Bad(SNI)),
    ("sni", "", Bad(SNI)),
    # text
    ("health_check.path", "/healthz", "/healthz"),
    ("health_check.path", "healthz", Bad(PATH)),
    ("health_check.path", "/a b", Bad(PATH)),
    ("health_check.host", "shop.example", "shop.example"),
    ("health_check.host", "a b", Bad("expected a Host header value (a name without spaces)")),
    # lists
    ("health_check.expect_status", "200, 204", (200, 204)),
    ("health_check.expect_status", "204", (204,)),
    ("health_check.expect_status", "ok", Bad(STATUSES)),
    ("health_check.expect_status", "99", Bad(STATUSES)),
    ("health_check.expect_status", "200,", Bad(STATUSES)),
    ("health_check.expect_status", "", Bad(STATUSES)),
    # every protocol: slow start, PROXY protocol from trusted load balancers in front
    ("slow_start", "30s", 30.0),
    ("slow_start", "0", 0.0),
    ("slow_start", "5 s", Bad(DURATION)),
    ("slow_start", "-1s", Bad(DURATION)),
    ("accept_proxy", "10.0.0.0/8", ("10.0.0.0/8",)),
    ("accept_proxy", "::1, 10.1.2.3/8,192.168.0.7", ("10.0.0.0/8", "192.168.0.7/32", "::1/128")),
    ("accept_proxy", "10.0.0.0/8,10.0.0.0/8", ("10.0.0.0/8",)),
    ("accept_proxy", "None", ()),
    ("accept_proxy", "10.0.0.0/33", Bad(NETWORKS)),
    ("accept_proxy", "10.0.0.0/8,", Bad(NETWORKS)),
    ("accept_proxy", "lb.internal", Bad(NETWORKS)),
    ("accept_proxy", "10.0.0.0 /8", Bad(NETWORKS)),
    ("accept_proxy", "", Bad(NETWORKS)),
    # http routes: the request head
    ("http_head_timeout", "10s", 10.0),
    ("http_head_timeout", "500ms", 0.5),
    ("http_head_timeout", "0", POSITIVE),
    ("http_max_head", "65536", 65536),
    ("http_max_head", "64KiB", 65536),
    ("http_max_head", "1MiB", 1 << 20),
    ("http_max_head", "1KiB", 1024),
    ("http_max_head", "1023", Bad(HEAD_SIZE)),
    ("http_max_head", "2MiB", Bad(HEAD_SIZE)),
    ("http_max_head", "64k", Bad(HEAD_SIZE)),
    ("http_max_head", "64KB", Bad(HEAD_SIZE)),
    ("http_max_head", "64kib", Bad(HEAD_SIZE)),
    ("http_max_head", "64 KiB", Bad(HEAD_SIZE)),
    ("http_max_head", "1.5KiB", Bad(HEAD_SIZE)),
    ("http_max_head", "9" * 400 + "KiB", Bad(HEAD_SIZE)),
    ("http_max_headers", "100", 100),
    ("http_max_headers", "0", Bad("expected a whole number 1..1000")),
    ("http_max_headers", "1001", Bad("expected a whole number 1..1000")),
    ("http_keepalive_timeout", "75s", 75.0),
    ("http_keepalive_timeout", "0", POSITIVE),
    ("http_trusted", "192.168.0.0/16,fd00::/8", ("192.168.0.0/16", "fd00::/8")),
    ("http_trusted", "none", ()),
    ("http_trusted", "10.0.0.0/8 10.1.0.0/16", Bad(NETWORKS)),
    # http routes: per request
    ("http_max_body", "0", 0),
    ("http_max_body", "10MiB", 10 << 20),
    ("http_max_body", "1GiB", 1 << 30),
    ("http_max_body", "1000000", 1000000),
    ("http_max_body", "10MB", Bad(BODY_SIZE)),
    ("http_max_body", "-1", Bad(BODY_SIZE)),
    ("http_max_body", "2048GiB", Bad(BODY_SIZE)),
    ("http_response_timeout", "60s", 60.0),
    ("http_response_timeout", "2m", 120.0),
    ("http_response_timeout", "0s", POSITIVE),
    ("http_pool_max_idle", "0", 0),
    ("http_pool_max_idle", "64", 64),
    ("http_pool_max_idle", "10001", Bad("expected a whole number 0..10000")),
    ("http_pool_idle_timeout", "1.5s", 1.5),
    ("http_pool_idle_timeout", "500ms", 0.5),
    ("http_pool_idle_timeout", "0", POSITIVE),
    ("http_retry_on", "502,503", (502, 503)),
    ("http_retry_on", "504, 502, 502", (502, 504)),
    ("http_retry_on", "none", ()),
    ("http_retry_on", "500", Bad(RETRY_ON)),
    ("http_retry_on", "502,", Bad(RETRY_ON)),
    ("http_retry_on", "0502", Bad(RETRY_ON)),
    ("http_retry_on", "", Bad(RETRY_ON)),
    ("http_retry_budget", "20", 20),
    ("http_retry_budget", "20%", 20),
    ("http_retry_budget", "101", Bad(WHOLE_0_100)),
    ("http_hash_key", "header:X-User-Id", "header:x-user-id"),
    ("http_hash_key", "Cookie:Session", "cookie:Session"),
    ("http_hash_key", "none", None),
    ("http_hash_key", "query:user", Bad(HASH_KEY)),
    ("http_hash_key", "header:", Bad(HASH_KEY)),
    ("http_hash_key", "header:x user", Bad(HASH_KEY)),
    ("http_hash_key", "x-user-id", Bad(HASH_KEY)),
    ("http_hash_key", "", Bad(HASH_KEY)),
    ("http_sticky", "cookie", "cookie"),
    ("http_sticky", "COOKIE", "cookie"),
    ("http_sticky", "none", None),
    ("http_sticky", "off", None),
    ("http_sticky", "header", Bad("expected cookie or none")),
    ("http_sticky_name", "SERVERID", "SERVERID"),
    ("http_sticky_name", "mesh_sticky", "mesh_sticky"),
    ("http_sticky_name", "a b", Bad(COOKIE_NAME)),
    ("http_sticky_name", "a;b", Bad(COOKIE_NAME)),
    ("http_sticky_name", "", Bad(COOKIE_NAME)),
    ("http_sticky_max_age", "86400", 86400),
    ("http_sticky_max_age", "0", 0),
    ("http_sticky_max_age", "1h", Bad("expected a whole number 0..1000000000")),
    ("http_sticky_secure", "true", True),
    ("http_sticky_secure", "no", False),
    ("http_sticky_secure", "always", Bad("expected true or false")),
    ("http_sticky_samesite", "Strict", "strict"),
    ("http_sticky_samesite", "none", "none"),
    ("http_sticky_samesite", "lax", "lax"),
    ("http_sticky_samesite", "always", Bad("expected lax, strict or none")),
    ("http_max_inflight", "0", 0),
    ("http_max_inflight", "100", 100),
    ("http_max_inflight", "100001", Bad("expected a whole number 0..100000")),
    ("http_queue", "0", 0),
    ("http_queue", "1000", 1000),
    ("http_queue", "-1", Bad("expected a whole number 0..100000")),
    ("http_queue_timeout", "5s", 5.0),
    ("http_queue_timeout", "0ms", POSITIVE),
    # http routes' match: Host names (the grammar of sni) and path prefixes
    ("hosts", "shop.example.com", ("shop.example.com",)),
    ("hosts", "Shop.Example.com, *.shop.example.com", ("*.shop.example.com", "shop.example.com")),
    ("hosts", "*", Bad(SNI)),
    ("hosts", "shop.example.com:8080", Bad(SNI)),
    ("hosts", "", Bad(SNI)),
    ("paths", "/api", ("/api",)),
    ("paths", "/static, /api,/api", ("/api", "/static")),
    ("paths", "/", ("/",)),
    ("paths", "/Api/V1/", ("/Api/V1/",)),
    ("paths", "api", Bad(PATHS)),
    ("paths", "/a?b", Bad(PATHS)),
    ("paths", "/a#b", Bad(PATHS)),
    ("paths", "/a b", Bad(PATHS)),
    ("paths", "/api,", Bad(PATHS)),
    ("paths", "", Bad(PATHS)),
]


def _q(text: str) -> str:
    """A double-quoted string that YAML and TOML both read back as ``text``."""
    return json.dumps(text)


def yaml_file(option: str, text: str) -> tuple[str, int]:
    """A mesh.yaml with ``option`` set to the string ``text``, and the line of that key."""
    head = "services:\n  web:\n    listen: 8080\n"
    if option == "weight":
        return head + f"    endpoints:\n      - {{address: 127.0.0.1, port: 9001, weight: {_q(text)}}}\n", 5
    if option in MATCH:
        return head + f"    endpoints: ['127.0.0.1:9001']\n    protocol: {MATCH[option]}\n    {option}: {_q(text)}\n", 6
    body = head + "    endpoints: ['127.0.0.1:9001']\n"
    if option.startswith("health_check."):
        return body + f"    health_check:\n      kind: http\n      {option.split('.')[1]}: {_q(text)}\n", 7
    return body + f"    {option}: {_q(text)}\n", 5


def toml_file(option: str, text: str) -> tuple[str, int]:
    head = "[services.web]\nlisten = 8080\n"
    if option == "weight":
        return head + f'endpoints = [{{ address = "127.0.0.1", port = 9001, weight = {_q(text)} }}]\n', 3
    if option in MATCH:
        return head + f'endpoints = ["127.0.0.1:9001"]\nprotocol = "{MATCH[option]}"\n{option} = {_q(text)}\n', 5
    body = head + 'endpoints = ["127.0.0.1:9001"]\n'
    if option.startswith("health_check."):
        return body + f'[services.web.health_check]\nkind = "http"\n{option.split(".")[1]} = {_q(text)}\n', 6
    return body + f"{option} = {_q(text)}\n", 4


def value_of(table, option: str):
    (service,) = table.services
    if option == "weight":
        return service.routes[0].endpoints[0].weight
    if option in ("sni", "hosts"):
        return service.routes[0].match.hosts
    if option == "paths":
        return service.routes[0].match.paths
    if option.startswith("health_check."):
        return getattr(service.options.health_check, option.split(".")[1])
    return getattr(service.options, option)


def key_path(option: str) -> str:
    if option == "weight":
        return "services.web.endpoints[0].weight"
    if option in MATCH:
        return f"services.web.{option}"
    return f"services.web.{option}"


def read_file(fmt: str, option: str, text: str):
    """(value, None) or (None, (reason, line)) from the file reader."""
    body, _ = (yaml_file if fmt == "yaml" else toml_file)(option, text)
    try:
        table = parse_config(body, source=f"mesh.{fmt}", fmt=fmt)
    except ConfigError as exc:
        return None, (exc.reason, exc.line)
    return value_of(table, option), None


def labels_for(option: str, text: str) -> dict[str, str]:
    publish = f"8080:9001/{MATCH[option]}" if option in MATCH else "8080:9001"
    labels = {"mesh.publish": publish, LABEL[option]: text}
    if option.startswith("health_check."):
        labels["mesh.health"] = "http"
    return labels


def container_mode(option: str, text: str):
    c = ContainerRecord(
        id="c1", name="web-1", labels=frozen_labels(labels_for(option, text)),
        networks=(NetworkAddress("bridge", "n-bridge", "198.18.201.2"),),
    )  # fmt: skip
    table, problems = build_table([c], local_node="n1")
    return table, problems, "container web-1 (c1)"


def service_mode(option: str, text: str):
    svc = ServiceRecord(id="s1", name="web", labels=frozen_labels(labels_for(option, text)))
    task = TaskRecord(id="t1", service_id="s1", node_id="n1", state="running", desired_state="running",
                      container_id="c-t1")  # fmt: skip
    gw = NetworkRecord(id="gw", name="docker_gwbridge", containers=(("c-t1", "198.18.42.3"),))
    table, problems = build_table(services=[svc], tasks=[task], gwbridge=gw, local_node="n1")
    return table, problems, "service web"


def read_labels(mode, option: str, text: str):
    table, problems, subject = mode(option, text)
    if problems:
        return None, [str(p) for p in problems], subject
    return value_of(table, option), None, subject


def _id(row) -> str:
    option, text, expected = row
    shown = text if len(text) < 20 else text[:8] + f"...({len(text)})"
    return f"{option}={shown!r}-{'bad' if isinstance(expected, Bad) else 'ok'}"


@pytest.mark.parametrize(("option", "text", "expected"), TABLE, ids=[_id(r) for r in TABLE])
@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_file_reader(fmt, option, text, expected):
    value, error = read_file(fmt, option, text)
    if isinstance(expected, Bad):
        assert value is None
        reason, line = error
        want = expected.file if expected.file is not None else expected.expected
        assert reason.startswith(f"{key_path(option)}: {want}"), reason
        # the reader names what was given, except where the legacy wording had no room for it
        if expected.file is None:
            assert reason.endswith(f"got {text!r}"), reason
        assert line == (yaml_file if fmt == "yaml" else toml_file)(option, text)[1]
    else:
        assert error is None
        if option == "health_check" and expected is not None:
            assert value == expected
        else:
            assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("option", "text", "expected"), TABLE, ids=[_id(r) for r in TABLE])
@pytest.mark.parametrize("mode", [container_mode, service_mode], ids=["container", "service"])
def test_label_reader(mode, option, text, expected):
    value, problems, subject = read_labels(mode, option, text)
    if isinstance(expected, Bad):
        assert value is None
        assert problems == [f"{subject}: label {LABEL[option]}={text!r}: {expected.expected} - skipped"]
    else:
        assert problems is None
        assert value == expected and type(value) is type(expected)


def test_table_covers_every_option_of_the_schema():
    options = {o.key for o in schema.SERVICE_OPTIONS} | {f"health_check.{o.key}" for o in schema.HEALTH_OPTIONS}
    options = (options - {"health_check.kind"}) | {"health_check", "weight", *MATCH}
    assert set(LABEL) == options
    assert {row[0] for row in TABLE} == options
    # and every option has a good and a bad row
    for option in options:
        kinds = {isinstance(r[2], Bad) for r in TABLE if r[0] == option}
        assert kinds == {True, False} or option in ("idle_timeout", "base_ejection_time", "max_ejection_time",
                                                     "health_check.timeout", "health_check.fall", "panic_threshold",
                                                     "http_retry_budget"), option  # fmt: skip


def test_schema_spellings_match_the_table():
    got = {o.key: o.label for o in schema.SERVICE_OPTIONS}
    got |= {f"health_check.{o.key}": o.label for o in schema.HEALTH_OPTIONS}
    got["health_check"] = got.pop("health_check.kind")
    got["weight"] = schema.ENDPOINT_WEIGHT.label
    got["sni"] = schema.SNI.label
    got["hosts"] = schema.HTTP_HOSTS.label
    got["paths"] = schema.HTTP_PATHS.label
    assert got == LABEL


def test_every_contract_field_has_an_option():
    """A field added to ServiceOptions/HealthCheck needs a schema entry (and a row in docs/options.md)."""
    from dataclasses import fields

    assert [o.field for o in schema.SERVICE_OPTIONS] == [
        f.name for f in fields(ServiceOptions) if f.name != "health_check"
    ]
    assert [o.field for o in schema.HEALTH_OPTIONS] == [f.name for f in fields(HealthCheck)]


def test_docs_table_lists_every_option_with_its_default():
    text = (Path(__file__).parent.parent / "docs" / "options.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| `([^`]+)`[^|]* \|[^|]+\|.+\| ([^|]+) \|$", text, re.M)
    assert sorted((key, label) for key, label, _ in rows) == sorted(LABEL.items())
    options = {o.key: o for o in schema.SERVICE_OPTIONS}
    options |= {f"health_check.{o.key}": o for o in schema.HEALTH_OPTIONS if o.key != "kind"}
    for key, _, default in rows:
        if key == "health_check":
            assert schema.HEALTH_SWITCH.parse(default.strip("` ")) is ServiceOptions().health_check
        elif key == "weight":
            assert schema.ENDPOINT_WEIGHT.parse(default.strip("` ")) == 1
        elif key == "sni":
            assert default.strip() == "none (the port's default service)"
        elif key in ("hosts", "paths"):
            assert default.strip() == f"any {key[:-1]}"
        elif key == "health_check.host":
            assert HealthCheck().host is None
        else:
            cls, field = (HealthCheck, key.split(".")[1]) if "." in key else (ServiceOptions, key)
            assert options[key].parse(default.strip("` ")) == schema.default_of(cls, field), key


# -- the same cross-field rule from both readers -------------------------------------------------


def test_ejection_times_cross_check_names_the_option():
    with pytest.raises(ConfigError) as info:
        parse_config(
            "services:\n  web:\n    listen: 80\n    endpoints: []\n    base_ejection_time: 10m\n", source="m.yaml"
        )
    assert str(info.value) == "m.yaml:2: services.web: need 0 < base_ejection_time <= max_ejection_time"
    _, problems, _ = container_mode("base_ejection_time", "10m")
    assert [str(p) for p in problems] == [
        "container web-1 (c1): label mesh.base-ejection-time='10m': need 0 < base_ejection_time <= max_ejection_time"
        " - skipped"
    ]


@pytest.mark.parametrize("option", ["health_check.path", "health_check.host", "health_check.expect_status"])
def test_http_only_keys_on_a_tcp_check(option):
    key = option.split(".")[1]
    value = {"path": "/up", "host": "h", "expect_status": "204"}[key]
    with pytest.raises(ConfigError) as info:
        parse_config(
            f"services:\n  web:\n    listen: 80\n    endpoints: []\n    health_check:\n      {key}: {_q(value)}\n",
            source="m.yaml",
        )
    assert str(info.value) == f"m.yaml:6: services.web.{option}: only applies to kind http"
    labels = {"mesh.publish": "80", "mesh.health": "tcp", LABEL[option]: value}
    c = ContainerRecord(id="c1", name="web-1", labels=frozen_labels(labels),
                        networks=(NetworkAddress("bridge", "n-bridge", "198.18.201.2"),))  # fmt: skip
    _, problems = build_table([c])
    assert [str(p) for p in problems] == [
        f"container web-1 (c1): label {LABEL[option]}={value!r}: only applies to mesh.health=http - skipped"
    ]


# -- native YAML/TOML values (the file reader only) --------------------------------------------------

NATIVE = [
    # (yaml value text, option, parsed or "error: reason")
    ("5", "connect_timeout", 5.0),
    ("0.5", "connect_timeout", 0.5),
    (".5", "connect_timeout", 0.5),  # YAML's own float syntax: a number, not our text
    ("0", "idle_timeout", 0.0),
    ("-1", "idle_timeout", "error: services.web.idle_timeout: duration must not be negative; got -1"),
    (".inf", "idle_timeout", f"error: services.web.idle_timeout: {DURATION}; got inf"),
    (".nan", "connect_timeout", f"error: services.web.connect_timeout: {DURATION}; got nan"),
    ("true", "connect_timeout", f"error: services.web.connect_timeout: {DURATION}; got a boolean (true)"),
    ("2", "retries", 2),
    ("2.0", "retries", "error: services.web.retries: expected a whole number 0..100, got 2.0"),
    ("true", "retries", "error: services.web.retries: expected a whole number 0..100, got a boolean (true)"),
    ("1", "health_check.jitter", 1.0),
    ("off", "locality", "off"),  # YAML 1.1 reads a bare off as false
    ("false", "locality", "off"),
    ("null", "locality", "off"),
    ("null", "balance", "error: services.web.balance: expected one of round-robin, least-conn, p2c, hash; got nothing (null)"),
    ("false", "retries", "error: services.web.retries: expected a whole number 0..100, got a boolean (false)"),
    ("false", "proxy_protocol", None),
    ("null", "proxy_protocol", None),
    ("false", "health_check", None),
    ("null", "health_check", None),
    ("[200, 204]", "health_check.expect_status", (200, 204)),
    ("204", "health_check.expect_status", (204,)),
    ("[]", "health_check.expect_status", "error: services.web.health_check.expect_status: expected an HTTP status or a list of them"),
    ("[200, '99']", "health_check.expect_status", "error: services.web.health_check.expect_status[1]: expected a whole number 100..599, got '99'"),
    ("5", "health_check", "error: services.web.health_check: expected tcp, http or none; got 5"),
    # sizes: a whole number of bytes
    ("65536", "http_max_head", 65536),
    ("0", "http_max_body", 0),
    ("65536.0", "http_max_head", f"error: services.web.http_max_head: {HEAD_SIZE}, got 65536.0"),
    ("true", "http_max_body", f"error: services.web.http_max_body: {BODY_SIZE}, got a boolean (true)"),
    # lists that may be empty, and switched off
    ("['10.0.0.0/8', '::1']", "accept_proxy", ("10.0.0.0/8", "::1/128")),
    ("{trusted: ['10.0.0.0/8']}", "accept_proxy", ("10.0.0.0/8",)),
    ("{trusted: none}", "accept_proxy", ()),
    ("[]", "accept_proxy", ()),
    ("null", "accept_proxy", ()),
    ("false", "http_trusted", ()),
    ("['10.0.0.0/8', 10]", "http_trusted", "error: services.web.http_trusted[1]: expected an IP address or network (10.0.0.0/8, ::1), got 10"),
    ("{trusted: []}", "http_trusted", f"error: services.web.http_trusted: {NETWORKS}; got a mapping"),
    ("[502, 503]", "http_retry_on", (502, 503)),
    ("504", "http_retry_on", (504,)),
    ("[]", "http_retry_on", ()),
    ("false", "http_retry_on", ()),
    ("[502, '500']", "http_retry_on", "error: services.web.http_retry_on[1]: expected 502, 503 or 504, got '500'"),
    ("true", "http_retry_on", f"error: services.web.http_retry_on: {RETRY_ON}; got a boolean (true)"),
    ("null", "http_hash_key", None),
    ("false", "http_sticky", None),
    ("null", "http_sticky_name", f"error: services.web.http_sticky_name: {COOKIE_NAME}, got nothing (null)"),
    ("3600", "http_sticky_max_age", 3600),
    ("true", "http_sticky_secure", True),
    ("none", "http_sticky_samesite", "none"),
    ("0", "slow_start", 0.0),
    ("2.5", "slow_start", 2.5),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "option", "expected"), NATIVE)
def test_native_file_values(raw, option, expected):
    body = "services:\n  web:\n    listen: 8080\n    endpoints: ['127.0.0.1:9001']\n"
    if option.startswith("health_check."):
        body += f"    health_check:\n      kind: http\n      {option.split('.')[1]}: {raw}\n"
    else:
        body += f"    {option}: {raw}\n"
    if isinstance(expected, str) and expected.startswith("error: "):
        with pytest.raises(ConfigError) as info:
            parse_config(body, source="m.yaml")
        assert info.value.reason == expected.removeprefix("error: ")
    else:
        value = value_of(parse_config(body, source="m.yaml"), option)
        assert value == expected and type(value) is type(expected)


def test_toml_native_values():
    table = parse_config(
        "[services.web]\nlisten = 80\nendpoints = []\nconnect_timeout = 0.25\nretries = 3\nlocality = false\n"
        '[services.web.health_check]\nkind = "http"\nexpect_status = [200, 204]\njitter = 0\n',
        source="m.toml",
        fmt="toml",
    )
    assert table.services[0].options == ServiceOptions(
        connect_timeout=0.25,
        retries=3,
        locality="off",
        health_check=HealthCheck(kind="http", expect_status=(200, 204), jitter=0.0),
    )


# -- the parsers on their own --------------------------------------------------------------------------


def test_option_error_forms():
    with pytest.raises(schema.OptionError) as info:
        schema.WholeNumber(1, 5).parse("9")
    assert (str(info.value), info.value.expected, info.value.value) == (
        "expected a whole number 1..5, got '9'",
        "expected a whole number 1..5",
        "9",
    )
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("YES", True), ("on", True), ("1", True), ("false", False), ("No", False), (" off ", False),
     ("0", False), (True, True), (False, False)],
)  # fmt: skip
def test_parse_bool(text, expected):
    assert schema.parse_bool(text) is expected


@pytest.mark.parametrize("text", ["", "maybe", "2", "t", None, 1])
def test_parse_bool_rejects(text):
    with pytest.raises(schema.OptionError, match="^expected true or false; got "):
        schema.parse_bool(text)


def test_port_0_means_any_free_port_in_a_file_and_in_a_label():
    """listen 0 (file) and a published port 0 (mesh.publish) both ask for any free port at bind time; two
    services on port 0 never conflict; 0 is never a port to connect to (endpoint / target)."""
    table = parse_config(
        "services:\n"
        "  a: {listen: '127.0.0.1:0', endpoints: ['127.0.0.1:9001']}\n"
        "  b: {listen: '127.0.0.1:0', endpoints: ['127.0.0.1:9001']}\n"
    )
    assert [(s.name, r.listen_host, r.port) for s, r in table.routes()] == [
        ("a", "127.0.0.1", 0),
        ("b", "127.0.0.1", 0),
    ]
    containers = [
        ContainerRecord(
            id=f"c{i}",
            name=f"{name}-1",
            labels=frozen_labels({"mesh.publish": "127.0.0.1:0:80", "mesh.service": name}),
            networks=(NetworkAddress("bridge", "n-bridge", f"198.18.201.{i + 2}"),),
        )
        for i, name in enumerate(("a", "b"))
    ]
    table, problems = build_table(containers, local_node="n1")
    assert problems == ()
    assert [(s.name, r.listen_host, r.port, [e.port for e in r.endpoints]) for s, r in table.routes()] == [
        ("a", "127.0.0.1", 0, [80]),
        ("b", "127.0.0.1", 0, [80]),
    ]
    with pytest.raises(ConfigError, match=r"endpoints\[0\]: expected 'host:port': port out of range 1-65535"):
        parse_config("services:\n  a: {listen: 0, endpoints: ['127.0.0.1:0']}\n")
    bad = ContainerRecord(
        id="c9", name="z-1", labels=frozen_labels({"mesh.publish": "8080:0"}),
        networks=(NetworkAddress("bridge", "n-bridge", "198.18.201.9"),),
    )  # fmt: skip
    _, problems = build_table([bad], local_node="n1")
    assert [str(p) for p in problems] == [
        "container z-1 (c9): label mesh.publish='8080:0': port '0' must be a number 1..65535 - skipped"
    ]
