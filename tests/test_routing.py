from __future__ import annotations

import pytest

from mesh.routing import (
    Endpoint,
    HealthCheck,
    Match,
    Route,
    RoutingTable,
    Service,
    ServiceOptions,
    TableError,
    parse_hostport,
    route_conflict,
)


def table(version=1):
    return RoutingTable(
        version,
        (
            Service(
                "web",
                (Route(8080, (Endpoint("b", "127.0.0.1", 9002, weight=2), Endpoint("a", "127.0.0.1", 9001))),),
                ServiceOptions(balance="hash", health_check=HealthCheck(kind="http", expect_status=(200, 204))),
            ),
            Service("db", (Route(5432, (Endpoint("x", "10.0.0.1", 5432, via="198.18.10.12:7946"),)),)),
        ),
    )


def test_sorted_and_deterministic():
    t = table()
    assert [s.name for s in t.services] == ["db", "web"]
    assert [e.id for e in t.service("web").routes[0].endpoints] == ["a", "b"]
    assert table() == t


def test_json_round_trip():
    t = table(7)
    back = RoutingTable.from_json(t.to_json())
    assert back == t
    assert back.version == 7
    assert back.to_json() == t.to_json()


def test_digest_ignores_version():
    assert table(1).digest == table(2).digest
    assert table(1).same_content(table(2))
    other = RoutingTable(1, (Service("web", (Route(8080, (Endpoint("a", "127.0.0.1", 9001),)),)),))
    assert other.digest != table(1).digest


@pytest.mark.parametrize(
    "text, default, expected",
    [
        ("127.0.0.1:80", None, ("127.0.0.1", 80)),
        ("[::1]:8080", None, ("::1", 8080)),
        ("8080", "0.0.0.0", ("0.0.0.0", 8080)),
        ("web:1", None, ("web", 1)),
    ],
)
def test_parse_hostport(text, default, expected):
    assert parse_hostport(text, default) == expected


@pytest.mark.parametrize("text", ["", "80", "host:", ":80", "host:0", "host:70000", "host:abc", "a:b:c"])
def test_parse_hostport_rejects(text):
    with pytest.raises(TableError, match="port|host"):
        parse_hostport(text)


def test_port_conflict_names_both_services():
    with pytest.raises(TableError, match="'b'.*already used by service 'a'"):
        RoutingTable(
            1,
            (
                Service("a", (Route(80, listen_host="0.0.0.0"),)),
                Service("b", (Route(80, listen_host="127.0.0.1"),)),
            ),
        )


def test_different_hosts_same_port_is_fine():
    RoutingTable(
        1, (Service("a", (Route(80, listen_host="127.0.0.1"),)), Service("b", (Route(80, listen_host="127.0.0.2"),)))
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"balance": "random"}, "balance must be one of"),
        ({"proxy_protocol": "v3"}, "proxy_protocol"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"max_ejection_percent": 101}, "max_ejection_percent"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(TableError, match=match):
        ServiceOptions(**kwargs)


def test_malformed_json():
    with pytest.raises(TableError, match="not JSON"):
        RoutingTable.from_json("{")
    with pytest.raises(TableError, match="malformed"):
        RoutingTable.from_json('{"services": [{"name": "x"}]}')


def _svc(name, *routes):
    return Service(name, routes)


@pytest.mark.parametrize(
    ("a", "b", "error"),
    [
        (Route(53, protocol="tcp"), Route(53, protocol="udp"), None),  # one port number, two transports
        (Route(53, protocol="udp"), Route(53, protocol="udp"), "service 'b' listens on 0.0.0.0:53 (udp), already used by service 'a' (udp)"),
        (Route(443, protocol="tls", match=Match(hosts=("a.example.com",))),
         Route(443, protocol="tls", match=Match(hosts=("b.example.com", "*.b.example.com"))), None),
        (Route(443, protocol="tls", match=Match(hosts=("a.example.com",))), Route(443, protocol="tls"), None),  # default
        (Route(443, protocol="tls", match=Match(hosts=("a.example.com",))),
         Route(443, protocol="tls", match=Match(hosts=("A.example.com.",))),
         "services 'a' and 'b' both claim SNI name 'a.example.com' on 0.0.0.0:443 (tls)"),
        (Route(443, protocol="tls"), Route(443, protocol="tls"),
         "services 'a' and 'b' both claim no SNI name (the default service) on 0.0.0.0:443 (tls)"),
        (Route(443, protocol="tcp"), Route(443, protocol="tls"), "service 'b' listens on 0.0.0.0:443 (tls), already used by service 'a' (tcp)"),
        (Route(443, protocol="tls"), Route(443, protocol="tcp"), "service 'b' listens on 0.0.0.0:443 (tcp), already used by service 'a' (tls)"),
        (Route(0, protocol="udp"), Route(0, protocol="udp"), None),
    ],
)  # fmt: skip
def test_route_conflicts(a, b, error):
    assert route_conflict(a, "a", b, "b") == error
    if error is None:
        RoutingTable(1, (_svc("a", a), _svc("b", b)))
    else:
        with pytest.raises(TableError) as info:
            RoutingTable(1, (_svc("a", a), _svc("b", b)))
        assert str(info.value) == error


def test_tls_match_rules():
    with pytest.raises(TableError, match="a tls route matches SNI names only"):
        Route(443, protocol="tls", match=Match(paths=("/x",)))
    with pytest.raises(TableError, match="a udp route cannot have host/path match rules"):
        Route(53, protocol="udp", match=Match(hosts=("a.example.com",)))


def test_udp_options_and_for_protocol():
    o = ServiceOptions(balance="round-robin")
    assert o.for_protocol("tcp") is o
    assert o.for_protocol("udp").balance == "hash"
    assert ServiceOptions(udp_balance="round-robin").for_protocol("udp").balance == "round-robin"
    for kwargs, match in [({"udp_idle_timeout": 0}, "udp_idle_timeout"), ({"udp_max_sessions": 0}, "udp_max_sessions"),
                          ({"udp_responses": 1001}, "udp_responses"), ({"udp_balance": "x"}, "udp_balance")]:  # fmt: skip
        with pytest.raises(TableError, match=match):
            ServiceOptions(**kwargs)
    # older tables (no udp_* fields in their JSON) still load
    old = '{"services":[{"name":"a","options":{"balance":"p2c"},"routes":[{"port":1,"endpoints":[]}]}],"version":1}'
    assert RoutingTable.from_json(old).services[0].options == ServiceOptions(balance="p2c")
