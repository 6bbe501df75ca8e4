from __future__ import annotations

import pytest

from mesh.routing import (
    Endpoint,
    HealthCheck,
    Route,
    RoutingTable,
    Service,
    ServiceOptions,
    TableError,
    parse_hostport,
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
