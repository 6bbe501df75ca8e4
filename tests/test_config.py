from __future__ import annotations

import textwrap

import pytest

from mesh.config import check_workers, load_config, parse_config, parse_duration, parse_listen
from mesh.errors import ConfigError
from mesh.routing import Endpoint, HealthCheck, Match, Route, RoutingTable, Service, ServiceOptions


def ep(hostport: str, **kw) -> Endpoint:
    host, port = hostport.rsplit(":", 1)
    return Endpoint(id=kw.pop("id", hostport), address=host, port=int(port), **kw)


E1, E2, E3 = ep("127.0.0.1:9001"), ep("127.0.0.1:9002"), ep("127.0.0.1:9003")

GOOD = [
    (
        "minimal.yaml",
        """
        services:
          web:
            listen: 8080
            balance: round-robin
            endpoints: ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
        """,
        RoutingTable(1, (Service("web", (Route(8080, (E1, E2, E3)),), ServiceOptions(udp_balance="round-robin")),)),
    ),
    (
        "lists.yml",
        """
        services:
          web:
            listen: ["127.0.0.1:8080", 8081, "8082"]
            balance: hash
            endpoints:
              - 127.0.0.1:9001
              - {address: 127.0.0.1, port: 9002, weight: 5, id: b, state: draining}
          db:
            listen: "[::1]:5432"
            endpoints: []
        """,
        RoutingTable(
            1,
            (
                Service(
                    "web",
                    tuple(
                        Route(port, (E1, ep("127.0.0.1:9002", id="b", weight=5, state="draining")), host)
                        for host, port in (("127.0.0.1", 8080), ("0.0.0.0", 8081), ("0.0.0.0", 8082))
                    ),
                    ServiceOptions(balance="hash", udp_balance="hash"),
                ),
                Service("db", (Route(5432, (), "::1"),)),
            ),
        ),
    ),
    (
        "options.yaml",
        """
        defaults:
          connect_timeout: 500ms
          retries: 1
        services:
          web:
            listen: 80
            endpoints: ["127.0.0.1:9001"]
            balance: least-conn
            proxy_protocol: v2
            idle_timeout: 2m
            retries: 0
            consecutive_failures: 5
            base_ejection_time: 1.5
            max_ejection_time: 1h
            max_ejection_percent: 30
            panic_threshold: 0
            locality: "off"
            health_check:
              kind: http
              interval: 2s
              timeout: 250ms
              rise: 1
              fall: 4
              path: /healthz
              host: example.org
              expect_status: [200, 204]
              jitter: 0.5
          api:
            listen: 81
            endpoints: ["127.0.0.1:9002"]
            health_check: {kind: tcp}
            proxy_protocol: none
        """,
        RoutingTable(
            1,
            (
                Service(
                    "web",
                    (Route(80, (E1,)),),
                    ServiceOptions(
                        balance="least-conn",
                        udp_balance="least-conn",
                        proxy_protocol="v2",
                        connect_timeout=0.5,
                        idle_timeout=120.0,
                        retries=0,
                        consecutive_failures=5,
                        base_ejection_time=1.5,
                        max_ejection_time=3600.0,
                        max_ejection_percent=30,
                        panic_threshold=0,
                        locality="off",
                        health_check=HealthCheck(
                            kind="http",
                            interval=2.0,
                            timeout=0.25,
                            rise=1,
                            fall=4,
                            path="/healthz",
                            host="example.org",
                            expect_status=(200, 204),
                            jitter=0.5,
                        ),
                    ),
                ),
                Service(
                    "api",
                    (Route(81, (E2,)),),
                    ServiceOptions(connect_timeout=0.5, retries=1, health_check=HealthCheck(kind="tcp")),
                ),
            ),
        ),
    ),
    (
        "minimal.toml",
        """
        [services.web]
        listen = 8080
        balance = "p2c"
        endpoints = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
        """,
        RoutingTable(
            1, (Service("web", (Route(8080, (E1, E2, E3)),), ServiceOptions(balance="p2c", udp_balance="p2c")),)
        ),
    ),
    (
        "full.toml",
        """
        [defaults]
        idle_timeout = 0

        [services.web]
        listen = ["127.0.0.1:8080", 8081]
        connect_timeout = "2s"

        [services.web.health_check]
        kind = "http"
        expect_status = 204

        [[services.web.endpoints]]
        address = "127.0.0.1"
        port = 9001
        weight = 2

        [[services.web.endpoints]]
        address = "127.0.0.1"
        port = 9002
        id = "two"

        [services.db]
        listen = 5432
        endpoints = [{ address = "127.0.0.1", port = 9003 }]
        """,
        RoutingTable(
            1,
            (
                Service(
                    "web",
                    tuple(
                        Route(p, (ep("127.0.0.1:9001", weight=2), ep("127.0.0.1:9002", id="two")), h)
                        for h, p in (("127.0.0.1", 8080), ("0.0.0.0", 8081))
                    ),
                    ServiceOptions(
                        connect_timeout=2.0,
                        idle_timeout=0.0,
                        health_check=HealthCheck(kind="http", expect_status=(204,)),
                    ),
                ),
                Service("db", (Route(5432, (E3,)),), ServiceOptions(idle_timeout=0.0)),
            ),
        ),
    ),
    ("no-services.yaml", "services: {}\n", RoutingTable(1, ())),
    (
        "any-port.yaml",
        """
        services:
          a: {listen: "127.0.0.1:0", endpoints: ["127.0.0.1:9001"]}
          b: {listen: 0, endpoints: ["127.0.0.1:9001"]}
          c: {listen: ["[::1]:0", "0", 8080], endpoints: []}
        """,
        RoutingTable(
            1,
            (
                Service("a", (Route(0, (E1,), "127.0.0.1"),)),
                Service("b", (Route(0, (E1,)),)),
                Service("c", (Route(0, (), "::1"), Route(0, ()), Route(8080, ()))),
            ),
        ),
    ),
    (
        "any-port.toml",
        """
        [services.a]
        listen = "127.0.0.1:0"
        endpoints = ["127.0.0.1:9001"]
        """,
        RoutingTable(1, (Service("a", (Route(0, (E1,), "127.0.0.1"),)),)),
    ),
]


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.mark.parametrize("name, text, expected", GOOD, ids=[g[0] for g in GOOD])
def test_good_files(tmp_path, name, text, expected):
    table = load_config(write(tmp_path, name, text))
    assert table == expected
    assert RoutingTable.from_json(table.to_json()) == table


YAML_SVC = """
services:
  web:
    listen: 8080
    endpoints: ["127.0.0.1:9001"]
"""

BAD = [
    # (file name, text, exact message after "<path>:")
    ("empty.yaml", "", "1: the file is empty; expected a mapping with a 'services' key"),
    ("empty.toml", "# nothing\n", "1: the file is empty; expected a table with a 'services' key"),
    ("comments.yaml", "# only a comment\n", "1: the file is empty; expected a mapping with a 'services' key"),
    (
        "syntax.yaml",
        "services:\n  web:\n    listen: [8080\n    balance: p2c\n",
        "4: YAML syntax error: expected ',' or ']', but got ':'",
    ),
    ("tab.yaml", "services:\n\tweb: {}\n", "2: YAML syntax error: found character '\\t' that cannot start any token"),
    ("syntax.toml", "[services.web]\nlisten = \n", "2: TOML syntax error: Invalid value"),
    (
        "unknown.yaml",
        YAML_SVC + "    balanse: p2c\n",
        "6: services.web.balanse: unknown key 'balanse' (did you mean 'balance'?)",
    ),
    (
        "unknown-nohint.yaml",
        YAML_SVC + "    colour: blue\n",
        "6: services.web.colour: unknown key 'colour'; expected one of: listen, endpoints, protocol, sni, hosts, "
        "paths, balance, proxy_protocol, connect_timeout, idle_timeout, retries, consecutive_failures, "
        "base_ejection_time, max_ejection_time, max_ejection_percent, panic_threshold, locality, zero_copy, "
        "udp_balance, udp_idle_timeout, udp_responses, udp_max_sessions, slow_start, accept_proxy, "
        "http_head_timeout, http_max_head, http_max_headers, http_max_body, http_response_timeout, "
        "http_keepalive_timeout, http_pool_max_idle, http_pool_idle_timeout, http_trusted, http_retry_on, "
        "http_retry_budget, http_hash_key, http_sticky, http_sticky_name, http_sticky_max_age, "
        "http_sticky_secure, http_sticky_samesite, http_max_inflight, http_queue, http_queue_timeout, health_check",
    ),
    ("unknown-top.yaml", "servces: {}\n", "1: servces: unknown key 'servces' (did you mean 'services'?)"),
    (
        "unknown.toml",
        '[services.web]\nlisten = 80\nendpoints = []\n\n[services.web.health_check]\nkind = "tcp"\nintervall = 3\n',
        "7: services.web.health_check.intervall: unknown key 'intervall' (did you mean 'interval'?)",
    ),
    (
        "balance.yaml",
        YAML_SVC + "    balance: rr\n",
        "6: services.web.balance: expected one of round-robin, least-conn, p2c, hash; got 'rr'",
    ),
    (
        "balance.toml",
        '[services.web]\nlisten = 80\nbalance = "fastest"\nendpoints = []\n',
        "3: services.web.balance: expected one of round-robin, least-conn, p2c, hash; got 'fastest'",
    ),
    (
        "port.yaml",
        "services:\n  web:\n    listen: 70000\n    endpoints: []\n",
        "3: services.web.listen: expected a port (0-65535; 0 = any free port, chosen at bind) or 'host:port': "
        "port out of range 0-65535 in '70000'",
    ),
    (
        "port-list.yaml",
        "services:\n  web:\n    listen:\n      - 80\n      - 'localhost:http'\n    endpoints: []\n",
        "5: services.web.listen[1]: expected a port (0-65535; 0 = any free port, chosen at bind) or 'host:port': "
        "port must be a number in 'localhost:http'",
    ),
    (
        "any-port-bad-host.yaml",
        "services:\n  web:\n    listen: ':0'\n    endpoints: []\n",
        "3: services.web.listen: expected a port (0-65535; 0 = any free port, chosen at bind) or 'host:port': "
        "missing host in ':0'",
    ),
    (
        "endpoint-str-port-0.yaml",
        "services:\n  web:\n    listen: 0\n    endpoints: ['127.0.0.1:0']\n",
        "4: services.web.endpoints[0]: expected 'host:port': port out of range 1-65535 in '127.0.0.1:0'",
    ),
    (
        "endpoint-port.yaml",
        "services:\n  web:\n    listen: 80\n    endpoints:\n      - address: 127.0.0.1\n        port: 0\n",
        "6: services.web.endpoints[0].port: expected a whole number 1..65535, got 0",
    ),
    (
        "endpoint-str.yaml",
        "services:\n  web:\n    listen: 80\n    endpoints: ['127.0.0.1:9001', '127.0.0.1']\n",
        "4: services.web.endpoints[1]: expected 'host:port': expected 'host:port', got '127.0.0.1'",
    ),
    (
        "duration.yaml",
        YAML_SVC + "    connect_timeout: 5 seconds\n",
        "6: services.web.connect_timeout: expected a duration like 5, 0.5, '500ms', '5s' or '2m'; got '5 seconds'",
    ),
    (
        "duration-neg.yaml",
        YAML_SVC + "    idle_timeout: -1\n",
        "6: services.web.idle_timeout: duration must not be negative; got -1",
    ),
    (
        "duration-zero.yaml",
        YAML_SVC + "    health_check: {interval: 0s}\n",
        "6: services.web.health_check.interval: must be > 0",
    ),
    (
        "dup-port.yaml",
        "services:\n  a:\n    listen: 8080\n    endpoints: []\n  b:\n    listen: '127.0.0.1:8080'\n    endpoints: []\n",
        "6: service 'b' listens on 127.0.0.1:8080 (tcp), already used by service 'a' (tcp)",
    ),
    (
        "dup-port.toml",
        "[services.a]\nlisten = 8080\nendpoints = []\n\n[services.b]\nendpoints = []\nlisten = [9000, 8080]\n",
        "7: service 'b' listens on 0.0.0.0:8080 (tcp), already used by service 'a' (tcp)",
    ),
    (
        "dup-listen.yaml",
        "services:\n  a:\n    listen: [8080, '0.0.0.0:8080']\n    endpoints: []\n",
        "3: services.a.listen[1]: 0.0.0.0:8080 is listed twice",
    ),
    (
        "dup-key.yaml",
        YAML_SVC + "    listen: 8081\n",
        "6: services.web.listen: duplicate key (first at line 4)",
    ),
    (
        "dup-endpoint.yaml",
        "services:\n  web:\n    listen: 80\n    endpoints:\n      - 127.0.0.1:1\n      - 127.0.0.1:1\n",
        "6: services.web.endpoints[1]: duplicate endpoint id '127.0.0.1:1' (also endpoints[0])",
    ),
    ("not-mapping.yaml", "- a\n- b\n", "1: expected a mapping with a 'services' key, got a list"),
    (
        "services-list.yaml",
        "services:\n  - web\n",
        "1: services: expected a mapping of service name to service, got a list",
    ),
    (
        "missing-services.yaml",
        "defaults: {}\n",
        "1: missing key 'services' (a mapping of service name to its listen/endpoints)",
    ),
    (
        "missing-listen.yaml",
        "services:\n  web:\n    endpoints: []\n",
        "2: services.web: missing key 'listen'",
    ),
    (
        "retries-type.yaml",
        YAML_SVC + "    retries: 'two'\n",
        "6: services.web.retries: expected a whole number 0..100, got 'two'",
    ),
    (
        "retries-bool.toml",
        "[services.web]\nlisten = 80\nendpoints = []\nretries = true\n",
        "4: services.web.retries: expected a whole number 0..100, got a boolean (true)",
    ),
    (
        "weight.yaml",
        "services:\n  web:\n    listen: 80\n    endpoints:\n      - {address: h, port: 1, weight: 0}\n",
        "5: services.web.endpoints[0].weight: expected a whole number 1..1000, got 0",
    ),
    (
        "state.yaml",
        "services:\n  web:\n    listen: 80\n    endpoints:\n      - {address: h, port: 1, state: stopped}\n",
        "5: services.web.endpoints[0].state: expected 'running' or 'draining', got 'stopped'",
    ),
    (
        "endpoints-type.yaml",
        "services:\n  web:\n    listen: 80\n    endpoints: 127.0.0.1:9001\n",
        "4: services.web.endpoints: expected a list of 'host:port' or mappings, got '127.0.0.1:9001'",
    ),
    (
        "health-kind.yaml",
        YAML_SVC + "    health_check:\n      kind: udp\n",
        "7: services.web.health_check.kind: expected one of tcp, http; got 'udp'",
    ),
    (
        "health-status.yaml",
        YAML_SVC + "    health_check:\n      expect_status: [200, 999]\n",
        "7: services.web.health_check.expect_status[1]: expected a whole number 100..599, got 999",
    ),
    (
        "health-path.yaml",
        YAML_SVC + "    health_check:\n      path: healthz\n",
        "7: services.web.health_check.path: expected a path starting with / and without spaces, got 'healthz'",
    ),
    (
        "health-jitter.yaml",
        YAML_SVC + "    health_check:\n      jitter: 2\n",
        "7: services.web.health_check.jitter: expected a number within 0..1, got 2",
    ),
    (
        "ejection.yaml",
        YAML_SVC + "    base_ejection_time: 10m\n    max_ejection_time: 1m\n",
        "3: services.web: need 0 < base_ejection_time <= max_ejection_time",
    ),
    (
        "proxy.yaml",
        YAML_SVC + "    proxy_protocol: v3\n",
        "6: services.web.proxy_protocol: expected v1, v2 or none; got 'v3'",
    ),
    (
        "protocol.yaml",
        YAML_SVC + "    protocol: sctp\n",
        "6: services.web.protocol: expected tcp, udp, tls or http; got 'sctp'",
    ),
    (
        "merge.yaml",
        "x: &x {a: 1}\nservices:\n  <<: *x\n",
        "3: YAML merge keys ('<<') are not supported; write the keys out",
    ),
    (
        "inline.toml",
        '[services]\nweb = { listen = 80, endpoints = [], balance = "x" }\n',
        "2: services.web.balance: expected one of round-robin, least-conn, p2c, hash; got 'x'",
    ),
    (
        "array-of-tables.toml",
        '[services.web]\nlisten = 80\n\n[[services.web.endpoints]]\naddress = "h"\nport = 1\n\n'
        '[[services.web.endpoints]]\naddress = "h"\nweight = 2\nport = 0\n',
        "11: services.web.endpoints[1].port: expected a whole number 1..65535, got 0",
    ),
    (
        "dotted-key.toml",
        "[services]\nweb.listen = 80\nweb.endpoints = []\nweb.health_check.rise = 0\n",
        "4: services.web.health_check.rise: expected a whole number 1..100, got 0",
    ),
    (
        "service-name.yaml",
        "services:\n  1: {listen: 80, endpoints: []}\n",
        "2: services: service name must be a non-empty string, got 1",
    ),
]


@pytest.mark.parametrize("name, text, message", BAD, ids=[b[0] for b in BAD])
def test_bad_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:{message}"
    assert info.value.source == str(path)
    assert info.value.line == int(message.split(":", 1)[0])


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: cannot read config file: No such file or directory"
    bad = tmp_path / "mesh.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == f"{bad}: unknown config file type '.json'; expected .yaml, .yml or .toml"


def test_version_argument(tmp_path):
    path = write(tmp_path, "v.yaml", YAML_SVC)
    assert load_config(path).version == 1
    assert load_config(path, version=7).version == 7
    assert load_config(path, version=7).same_content(load_config(path))


@pytest.mark.parametrize(
    "value, seconds",
    [(5, 5.0), (0.25, 0.25), ("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5), (" 3s ", 3.0)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", [True, None, "", "5 sec", "-1s", "1d", [1], -0.5, " 3 s ", ".5s", "5.s", float("nan")]
)
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_example_config_loads():
    from pathlib import Path

    table = load_config(Path(__file__).parent.parent / "examples" / "mesh.yaml")
    assert [s.name for s in table.services] == ["api", "db", "dns", "site-a", "site-b", "web"]
    # every option is spelled out in the example with its default value
    web = table.service("web")
    # (udp_balance follows a given balance)
    assert web.options == ServiceOptions(
        health_check=HealthCheck(kind="http", path="/healthz", host="web.example.org", expect_status=(200, 204)),
        udp_balance="round-robin",
    )
    assert table.service("api").options == ServiceOptions(
        balance="p2c", udp_balance="p2c", health_check=HealthCheck(interval=2.0)
    )
    assert table.service("db").options == ServiceOptions(balance="hash", idle_timeout=0.0)
    dns = table.service("dns")
    assert [r.protocol for r in dns.routes] == ["udp"] and dns.options == ServiceOptions(
        udp_balance="hash", udp_idle_timeout=30.0, udp_responses=1, udp_max_sessions=10000
    )
    tls = [(r.protocol, r.port, r.match.hosts) for name in ("site-a", "site-b") for r in table.service(name).routes]
    assert tls == [("tls", 9443, ("a.example.com",)), ("tls", 9443, ("*.b.example.com", "b.example.com"))]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", ("0.0.0.0", 0)),
        ("00", ("0.0.0.0", 0)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:0", ("localhost", 0)),
        ("8080", ("0.0.0.0", 8080)),
        (" 127.0.0.1:8080 ", ("127.0.0.1", 8080)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        (":0", "missing host in ':0'"),
        ("::0", "expected 'host:port', got '::0'"),
        ("a:b:0", "expected 'host:port', got 'a:b:0'"),
        ("[::1]0", "expected '[address]:port', got '[::1]0'"),
        ("65536", "port out of range 0-65535 in '65536'"),
        ("h:-0", "port must be a number in 'h:-0'"),
        ("h:", "port must be a number in 'h:'"),
    ],
)
def test_parse_listen_rejects(text, message):
    with pytest.raises(ValueError) as info:
        parse_listen(text)
    assert str(info.value) == message


ANY_PORT = (
    "services:\n  web:\n    listen: 8080\n    endpoints: []\n  test:\n    listen: ['127.0.0.1:0']\n    endpoints: []\n"
)


def test_port_0_is_refused_with_several_workers():
    """--workers N > 1: every worker binds the listen address itself (SO_REUSEPORT), so port 0 would give
    each worker a port of its own.  The file reader names the line; check_workers does it for any table."""
    table = parse_config(ANY_PORT)  # one process: fine
    assert [r.port for _, r in table.routes()] == [0, 8080]
    check_workers(table, 1)
    with pytest.raises(ConfigError) as info:
        parse_config(ANY_PORT, source="mesh.yaml", workers=2)
    assert str(info.value) == (
        "mesh.yaml:6: services.test.listen[0]: service 'test' listens on port 0 (any free port), which --workers 2 "
        "cannot share: each worker process would bind a port of its own; give the service a fixed port"
    )
    with pytest.raises(ConfigError, match=r"^service 'test' listens on port 0 \(any free port\), which --workers 3"):
        check_workers(table, 3)
    fixed = parse_config(ANY_PORT.replace("'127.0.0.1:0'", "'127.0.0.1:8081'"), workers=2)
    check_workers(fixed, 2)


# -- udp and tls passthrough ---------------------------------------------------------------------

ISSUE_EXAMPLE = """
services:
  dns:
    listen: "127.0.0.1:5353"
    protocol: udp                # tcp | http | udp | tls
    balance: round-robin
    endpoints: ["127.0.0.1:5301", "127.0.0.1:5302"]
  site-a:
    listen: 8443
    protocol: tls                # TLS passthrough, routed by SNI
    sni: ["a.example.com"]
    endpoints: ["127.0.0.1:9443"]
  site-b:
    listen: 8443
    protocol: tls
    sni: ["b.example.com", "*.b.example.com"]
    endpoints: ["127.0.0.1:9444"]
"""


def test_udp_and_tls_example_loads(tmp_path):
    table = load_config(write(tmp_path, "mesh.yaml", ISSUE_EXAMPLE))
    got = [(s.name, r.protocol, r.listen_host, r.port, r.match.hosts, s.options.udp_balance) for s, r in table.routes()]
    assert got == [
        ("dns", "udp", "127.0.0.1", 5353, (), "round-robin"),  # balance given: udp follows it
        ("site-a", "tls", "0.0.0.0", 8443, ("a.example.com",), "hash"),
        ("site-b", "tls", "0.0.0.0", 8443, ("*.b.example.com", "b.example.com"), "hash"),
    ]
    assert RoutingTable.from_json(table.to_json()) == table


def test_udp_options_in_a_file():
    table = parse_config(
        "defaults:\n  balance: p2c\nservices:\n  dns:\n    listen: 53\n    protocol: udp\n    endpoints: []\n"
        "    udp_idle_timeout: 5s\n    udp_responses: 1\n    udp_max_sessions: 100\n"
        "  dns2:\n    listen: 54\n    protocol: UDP\n    endpoints: []\n    udp_balance: hash\n"
    )
    dns, dns2 = table.services
    assert dns.options == ServiceOptions(
        balance="p2c", udp_balance="p2c", udp_idle_timeout=5.0, udp_responses=1, udp_max_sessions=100
    )
    assert (dns2.options.balance, dns2.options.udp_balance, dns2.routes[0].protocol) == ("p2c", "hash", "udp")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "services:\n  a:\n    listen: 443\n    endpoints: []\n    sni: a.example.com\n",
            "m.yaml:5: services.a.sni: only applies to protocol tls (this service is tcp)",
        ),
        (
            "services:\n  a:\n    listen: 443\n    protocol: tls\n    endpoints: []\n    sni: ['a.example.com', 'x y']\n",
            "m.yaml:6: services.a.sni[1]: expected a DNS name or '*.name', got 'x y'",
        ),
        (
            "services:\n  a: {listen: 443, protocol: tls, sni: [a.example.com], endpoints: []}\n"
            "  b: {listen: 443, protocol: tls, sni: [A.EXAMPLE.COM], endpoints: []}\n",
            "m.yaml:3: services 'a' and 'b' both claim SNI name 'a.example.com' on 0.0.0.0:443 (tls)",
        ),
        (
            "services:\n  plain: {listen: 443, endpoints: []}\n  site: {listen: 443, protocol: tls, endpoints: []}\n",
            "m.yaml:3: service 'site' listens on 0.0.0.0:443 (tls), already used by service 'plain' (tcp)",
        ),
        (
            "services:\n  a: {listen: 53, protocol: udp, endpoints: []}\n  b: {listen: 53, protocol: udp, endpoints: []}\n",
            "m.yaml:3: service 'b' listens on 0.0.0.0:53 (udp), already used by service 'a' (udp)",
        ),
        (
            "services:\n  a: {listen: 80, protocol: quic, endpoints: []}\n",
            "m.yaml:2: services.a.protocol: expected tcp, udp, tls or http; got 'quic'",
        ),
    ],
)
def test_udp_tls_errors(text, error):
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="m.yaml")
    assert str(info.value) == error


def test_tcp_and_udp_services_share_a_port_number():
    table = parse_config(
        "services:\n  dns-tcp: {listen: 53, endpoints: []}\n  dns-udp: {listen: 53, protocol: udp, endpoints: []}\n"
    )
    assert [(s.name, r.protocol, r.port) for s, r in table.routes()] == [("dns-tcp", "tcp", 53), ("dns-udp", "udp", 53)]


# -- http routes --------------------------------------------------------------------------------

HTTP_EXAMPLE = """
services:
  shop:
    listen: 8080
    protocol: http               # tcp (default) | http
    hosts: ["shop.example.com", "*.shop.example.com"]   # optional: any host when absent
    paths: ["/"]                 # optional path prefixes; the longest match wins across services
    endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]
  api:
    listen: 8080                 # several http services share one port
    protocol: http
    hosts: ["shop.example.com"]
    paths: ["/api"]
    endpoints: ["127.0.0.1:9101"]
"""


def test_http_example_loads(tmp_path):
    table = load_config(write(tmp_path, "mesh.yaml", HTTP_EXAMPLE))
    assert table == RoutingTable(
        1,
        (
            Service(
                "api",
                (Route(8080, (ep("127.0.0.1:9101"),), protocol="http",
                       match=Match(hosts=("shop.example.com",), paths=("/api",))),),
            ),
            Service(
                "shop",
                (Route(8080, (E1, E2), protocol="http",
                       match=Match(hosts=("*.shop.example.com", "shop.example.com"), paths=("/",))),),
            ),
        ),
    )  # fmt: skip
    assert RoutingTable.from_json(table.to_json()) == table


def test_http_services_without_rules_and_the_toml_spelling():
    table = parse_config(
        '[services.any]\nlisten = 80\nprotocol = "HTTP"\nendpoints = []\n\n'
        '[services.api]\nlisten = 80\nprotocol = "http"\npaths = ["/api", "/v2/"]\nendpoints = []\n\n'
        '[services.shop]\nlisten = 80\nprotocol = "http"\nhosts = "Shop.example.com"\nendpoints = []\n',
        source="m.toml",
        fmt="toml",
    )
    assert [(s.name, r.protocol, r.port, r.match.hosts, r.match.paths) for s, r in table.routes()] == [
        ("any", "http", 80, (), ()),
        ("api", "http", 80, (), ("/api", "/v2/")),
        ("shop", "http", 80, ("shop.example.com",), ()),
    ]


def test_http_options_in_a_file_and_in_defaults():
    table = parse_config(
        "defaults:\n  accept_proxy: {trusted: ['10.0.0.0/8']}\n  http_trusted: [192.168.0.0/16]\n"
        "  http_max_head: 16KiB\nservices:\n"
        "  shop:\n    listen: 80\n    protocol: http\n    endpoints: []\n    slow_start: 30s\n"
        "    http_max_body: 10MiB\n    http_retry_on: [502, 503]\n    http_retry_budget: 10%\n"
        "    http_hash_key: header:X-User\n    balance: hash\n    http_sticky: cookie\n"
        "    http_sticky_name: SRV\n    http_sticky_max_age: 3600\n    http_sticky_secure: true\n"
        "    http_sticky_samesite: strict\n    http_max_inflight: 10\n    http_queue: 0\n"
        "    http_queue_timeout: 250ms\n    http_response_timeout: 2m\n    http_keepalive_timeout: 5s\n"
        "    http_head_timeout: 3s\n    http_max_headers: 50\n    http_pool_max_idle: 0\n"
        "    http_pool_idle_timeout: 500ms\n"
        "  plain:\n    listen: 81\n    endpoints: []\n    accept_proxy: none\n",
        source="m.yaml",
    )
    shop, plain = table.service("shop"), table.service("plain")
    assert shop.options == ServiceOptions(
        balance="hash", udp_balance="hash", slow_start=30.0, accept_proxy=("10.0.0.0/8",),
        http_trusted=("192.168.0.0/16",), http_max_head=16384, http_max_body=10 << 20, http_retry_on=(502, 503),
        http_retry_budget=10, http_hash_key="header:x-user", http_sticky="cookie", http_sticky_name="SRV",
        http_sticky_max_age=3600, http_sticky_secure=True, http_sticky_samesite="strict", http_max_inflight=10,
        http_queue=0, http_queue_timeout=0.25, http_response_timeout=120.0, http_keepalive_timeout=5.0,
        http_head_timeout=3.0, http_max_headers=50, http_pool_max_idle=0, http_pool_idle_timeout=0.5,
    )  # fmt: skip
    # a service may switch a default off
    assert plain.options == ServiceOptions(http_trusted=("192.168.0.0/16",), http_max_head=16384)
    assert RoutingTable.from_json(table.to_json()) == table


def test_accept_proxy_forms_in_toml():
    table = parse_config(
        '[defaults.accept_proxy]\ntrusted = ["fd00::/8", "10.0.0.0/8"]\n\n'
        "[services.a]\nlisten = 80\nendpoints = []\n\n"
        '[services.b]\nlisten = 81\nendpoints = []\naccept_proxy = ["127.0.0.1"]\n\n'
        "[services.c]\nlisten = 82\nendpoints = []\naccept_proxy = { trusted = [] }\n",
        source="m.toml",
        fmt="toml",
    )
    assert [s.options.accept_proxy for s in table.services] == [
        ("10.0.0.0/8", "fd00::/8"),
        ("127.0.0.1/32",),
        (),
    ]


Y = "services:\n  a:\n    listen: 8080\n    endpoints: []\n"  # line 3: listen; 5: the next key


@pytest.mark.parametrize(
    ("text", "error"),
    [
        # hosts / paths only with protocol http; sni only with tls
        (Y + "    hosts: [a.example.com]\n", "m.yaml:5: services.a.hosts: only applies to protocol http (this service is tcp)"),
        (Y + "    protocol: tls\n    paths: [/api]\n", "m.yaml:6: services.a.paths: only applies to protocol http (this service is tls)"),
        (Y + "    paths: [/api]\n    protocol: udp\n", "m.yaml:5: services.a.paths: only applies to protocol http (this service is udp)"),
        (Y + "    protocol: http\n    sni: a.example.com\n", "m.yaml:6: services.a.sni: only applies to protocol tls (this service is http)"),
        # bad rules, in a list (the item's line) and as text
        (Y + "    protocol: http\n    paths:\n      - /api\n      - api\n",
         "m.yaml:8: services.a.paths[1]: expected a path starting with / (no spaces, '?' or '#'), got 'api'"),
        (Y + "    protocol: http\n    paths: /a?b\n",
         "m.yaml:6: services.a.paths: expected path prefixes starting with /, separated by commas, e.g. /api,/static; got '/a?b'"),
        (Y + "    protocol: http\n    paths: []\n",
         "m.yaml:6: services.a.paths: expected path prefixes starting with /, separated by commas, e.g. /api,/static; got a list"),
        (Y + "    protocol: http\n    hosts: [a.example.com, '*']\n",
         "m.yaml:6: services.a.hosts[1]: expected a DNS name or '*.name', got '*'"),
        # accept_proxy's mapping form
        (Y + "    accept_proxy: {trusted: ['10.0.0.0/8', x]}\n",
         "m.yaml:5: services.a.accept_proxy.trusted[1]: expected an IP address or network (10.0.0.0/8, ::1), got 'x'"),
        (Y + "    accept_proxy:\n      trust: []\n", "m.yaml:6: services.a.accept_proxy.trust: unknown key 'trust' (did you mean 'trusted'?)"),
        (Y + "    accept_proxy: {}\n", "m.yaml:5: services.a.accept_proxy: missing key 'trusted'"),
        ("defaults:\n  accept_proxy: {trusted: 10.0.0.0/33}\nservices: {}\n",
         "m.yaml:2: defaults.accept_proxy.trusted: expected IP addresses or networks separated by commas (or none), "
         "e.g. 10.0.0.0/8,fd00::/8; got '10.0.0.0/33'"),
        (Y + "    http_trusted: {trusted: []}\n",
         "m.yaml:5: services.a.http_trusted: expected IP addresses or networks separated by commas (or none), "
         "e.g. 10.0.0.0/8,fd00::/8; got a mapping"),
        # native values
        (Y + "    http_max_body: 1.5\n",
         "m.yaml:5: services.a.http_max_body: expected a size 0..1024GiB: bytes (65536) or a whole number with KiB, "
         "MiB or GiB (64KiB), got 1.5"),
        (Y + "    http_retry_on: [502, 500]\n", "m.yaml:5: services.a.http_retry_on[1]: expected 502, 503 or 504, got 500"),
        # conflicts: the file is refused, naming both services, at the listen line of the later one by name
        ("services:\n  shop: {listen: 8080, protocol: http, hosts: [shop.example.com], paths: [/, /api], endpoints: []}\n"
         "  api: {listen: 8080, protocol: http, hosts: [SHOP.example.com], paths: [/api], endpoints: []}\n",
         "m.yaml:2: services 'api' and 'shop' both claim host 'shop.example.com' path '/api' on 0.0.0.0:8080 (http)"),
        ("services:\n  a: {listen: 8080, protocol: http, endpoints: []}\n  b: {listen: 8080, protocol: http, endpoints: []}\n",
         "m.yaml:3: services 'a' and 'b' both claim host '*' path '/' on 0.0.0.0:8080 (http)"),
        ("services:\n  a: {listen: 8080, protocol: http, endpoints: []}\n  b: {listen: 8080, endpoints: []}\n",
         "m.yaml:3: service 'b' listens on 0.0.0.0:8080 (tcp), already used by service 'a' (http)"),
        ("services:\n  a: {listen: 8080, endpoints: []}\n  b: {listen: 8080, protocol: http, endpoints: []}\n",
         "m.yaml:3: service 'b' listens on 0.0.0.0:8080 (http), already used by service 'a' (tcp)"),
        ("services:\n  a: {listen: 8080, protocol: tls, endpoints: []}\n  b: {listen: 8080, protocol: http, endpoints: []}\n",
         "m.yaml:3: service 'b' listens on 0.0.0.0:8080 (http), already used by service 'a' (tls)"),
        ("services:\n  a: {listen: 8080, protocol: http, endpoints: []}\n"
         "  b: {listen: '127.0.0.1:8080', protocol: http, paths: [/b], endpoints: []}\n",
         "m.yaml:3: services 'a' and 'b' share port 8080 (http) with different listen addresses (0.0.0.0, 127.0.0.1)"),
    ],
)  # fmt: skip
def test_http_errors(text, error):
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="m.yaml")
    assert str(info.value) == error


def test_http_errors_in_toml_name_the_line():
    with pytest.raises(ConfigError) as info:
        parse_config('[services.a]\nlisten = 80\nendpoints = []\npaths = ["/api"]\n', source="m.toml", fmt="toml")
    assert str(info.value) == "m.toml:4: services.a.paths: only applies to protocol http (this service is tcp)"
    with pytest.raises(ConfigError) as info:
        parse_config(
            '[services.a]\nlisten = 80\nendpoints = []\n\n[services.a.accept_proxy]\ntrusted = ["x"]\n',
            source="m.toml",
            fmt="toml",
        )
    assert str(info.value) == (
        "m.toml:6: services.a.accept_proxy.trusted[0]: expected an IP address or network (10.0.0.0/8, ::1), got 'x'"
    )


def test_http_and_udp_services_share_a_port_number():
    table = parse_config(
        "services:\n  web: {listen: 443, protocol: http, endpoints: []}\n  quic: {listen: 443, protocol: udp, endpoints: []}\n"
    )
    assert [(s.name, r.protocol, r.port) for s, r in table.routes()] == [("quic", "udp", 443), ("web", "http", 443)]
