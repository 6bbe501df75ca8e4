"""mesh.* label parsing: table-driven, exact results and exact error labels."""

from __future__ import annotations

import pytest

from discovery.labels import LabelError, PublishSpec, parse_duration, parse_labels, parse_publish
from mesh.errors import ConfigError
from mesh.routing import HealthCheck, ServiceOptions


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("8080:80", (PublishSpec(8080, 80),)),
        ("8080:80/tcp", (PublishSpec(8080, 80),)),
        ("8080:80/TCP", (PublishSpec(8080, 80),)),
        ("8080", (PublishSpec(8080, 8080),)),
        (" 9090:90 , 8080:80 ", (PublishSpec(8080, 80), PublishSpec(9090, 90))),
        ("127.0.0.1:8080:80", (PublishSpec(8080, 80, listen_host="127.0.0.1"),)),
        ("[::1]:8080:80", (PublishSpec(8080, 80, listen_host="::1"),)),
        ("65535:1", (PublishSpec(65535, 1),)),
        # published port 0: any free port, chosen when the data plane binds it (tests)
        ("0:80", (PublishSpec(0, 80),)),
        ("127.0.0.1:0:80", (PublishSpec(0, 80, listen_host="127.0.0.1"),)),
        ("0:80,8080:81", (PublishSpec(0, 80), PublishSpec(8080, 81))),
        # udp and tls passthrough; one port for tcp and udp
        ("53:53/udp", (PublishSpec(53, 53, protocol="udp"),)),
        ("443:8443/tls", (PublishSpec(443, 8443, protocol="tls"),)),
        ("443:8443/TLS", (PublishSpec(443, 8443, protocol="tls"),)),
        ("53:53/udp,53:53/tcp", (PublishSpec(53, 53), PublishSpec(53, 53, protocol="udp"))),
        ("127.0.0.1:5353:53/udp", (PublishSpec(5353, 53, listen_host="127.0.0.1", protocol="udp"),)),
        # http: requests routed by mesh.http.hosts / mesh.http.paths
        ("80:8000/http", (PublishSpec(80, 8000, protocol="http"),)),
        ("80/HTTP", (PublishSpec(80, 80, protocol="http"),)),
        ("80:8000/http,443:8443/tls", (PublishSpec(80, 8000, protocol="http"), PublishSpec(443, 8443, protocol="tls"))),
        (
            "443:8000/http,443:8000/udp",
            (PublishSpec(443, 8000, protocol="http"), PublishSpec(443, 8000, protocol="udp")),
        ),
    ],
)
def test_publish_valid(value, expected):
    assert parse_publish(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "expected published:target"),
        ("8080:80,", "expected published:target"),
        ("8080:80/sctp", "expected /tcp, /udp, /tls or /http, got /sctp in '8080:80/sctp'"),
        ("8080:80/", "expected /tcp, /udp, /tls or /http, got / in '8080:80/'"),
        ("53:53/udp,53:54/udp", "port 53 is published twice for udp"),
        ("443:443,443:8443/tls", "port 443 is published twice for tcp (tcp, tls and http are all TCP)"),
        ("80:80,80:8000/http", "port 80 is published twice for tcp (tcp, tls and http are all TCP)"),
        ("80/http,80/tls", "port 80 is published twice for tcp (tcp, tls and http are all TCP)"),
        ("80:8000/https", "expected /tcp, /udp, /tls or /http, got /https in '80:8000/https'"),
        ("0", "port '0' must be a number 1..65535"),  # a bare port is the target too
        ("8080:0", "port '0' must be a number 1..65535"),
        ("70000:80", "port '70000' must be a number 0..65535 (0 = any free port)"),
        ("8080:70000", "port '70000' must be a number 1..65535"),
        ("0:80,0:81", "port 0 is published twice"),
        ("web:80", "port 'web' must be a number"),
        ("1:2:3:4", "expected published:target in '1:2:3:4'"),
        ("8080:80,8080:81", "port 8080 is published twice"),
        (":8080:80", "empty listen address"),
        ("[::1:8080:80", "expected [address]:published:target"),
    ],
)
def test_publish_invalid(value, fragment):
    with pytest.raises(LabelError) as ei:
        parse_publish(value)
    assert ei.value.label == "mesh.publish"
    assert fragment in str(ei.value)
    assert str(ei.value).startswith(f"label mesh.publish={value!r}: ")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2s", 2.0), ("500ms", 0.5), ("1.5", 1.5), ("1m", 60.0), ("2h", 7200.0), (" 3 ", 3.0)],
)
def test_duration(value, seconds):
    assert parse_duration("mesh.x", value) == seconds


@pytest.mark.parametrize("value", ["", "-1s", "1d", "s", "0", "1.s"])
def test_duration_invalid(value):
    with pytest.raises(LabelError) as ei:
        parse_duration("mesh.health.interval", value)
    assert ei.value.label == "mesh.health.interval"


def test_no_publish_or_disabled_means_not_in_mesh():
    assert parse_labels({}) is None
    assert parse_labels({"mesh.balance": "p2c"}) is None
    assert parse_labels({"mesh.publish": "8080:80", "mesh.enable": "false"}) is None
    assert parse_labels({"mesh.publish": "8080:80", "mesh.enable": "true"}) is not None


def test_defaults():
    ml = parse_labels({"mesh.publish": "8080:80", "com.docker.compose.service": "web"})
    assert ml is not None
    assert ml.publish == (PublishSpec(8080, 80),)
    assert ml.options == ServiceOptions()
    assert (ml.service, ml.weight, ml.network, ml.warnings) == (None, 1, None, ())


def test_every_option():
    ml = parse_labels(
        {
            "mesh.publish": "8080:80",
            "mesh.service": "shop.web",
            "mesh.balance": "least-conn",
            "mesh.weight": "5",
            "mesh.network": "front",
            "mesh.proxy-protocol": "v2",
            "mesh.connect-timeout": "250ms",
            "mesh.idle-timeout": "0",
            "mesh.retries": "0",
            "mesh.health": "http",
            "mesh.health.path": "/healthz",
            "mesh.health.host": "shop.example",
            "mesh.health.status": "200, 204",
            "mesh.health.interval": "2s",
            "mesh.health.timeout": "1s",
            "mesh.health.rise": "1",
            "mesh.health.fall": "2",
        }
    )
    assert ml is not None
    assert (ml.service, ml.weight, ml.network) == ("shop.web", 5, "front")
    assert ml.options == ServiceOptions(
        balance="least-conn",
        udp_balance="least-conn",
        proxy_protocol="v2",
        connect_timeout=0.25,
        idle_timeout=0.0,
        retries=0,
        health_check=HealthCheck(
            kind="http",
            path="/healthz",
            host="shop.example",
            expect_status=(200, 204),
            interval=2.0,
            timeout=1.0,
            rise=1,
            fall=2,
        ),
    )


def test_tcp_health_and_proxy_protocol_none():
    ml = parse_labels({"mesh.publish": "1", "mesh.health": "TCP", "mesh.proxy-protocol": "none"})
    assert ml is not None
    assert ml.options.health_check == HealthCheck(kind="tcp")
    assert ml.options.proxy_protocol is None


def test_unknown_label_is_a_warning_not_an_error():
    ml = parse_labels({"mesh.publish": "8080:80", "mesh.balancer": "p2c", "mesh.zzz": "1"})
    assert ml is not None
    assert ml.warnings == ("unknown label mesh.balancer (ignored)", "unknown label mesh.zzz (ignored)")


@pytest.mark.parametrize(
    ("extra", "label", "fragment"),
    [
        ({"mesh.balance": "fastest"}, "mesh.balance", "expected one of round-robin, least-conn, p2c, hash"),
        ({"mesh.weight": "0"}, "mesh.weight", "expected a whole number 1..1000"),
        ({"mesh.weight": "heavy"}, "mesh.weight", "expected a whole number 1..1000"),
        ({"mesh.service": "bad name"}, "mesh.service", "expected a name of letters"),
        ({"mesh.network": " "}, "mesh.network", "expected a network name"),
        ({"mesh.proxy-protocol": "v3"}, "mesh.proxy-protocol", "expected v1, v2 or none"),
        ({"mesh.connect-timeout": "soon"}, "mesh.connect-timeout", "expected a duration"),
        ({"mesh.retries": "101"}, "mesh.retries", "expected a whole number 0..100"),
        ({"mesh.locality": "nearest"}, "mesh.locality", "expected prefer or off"),
        ({"mesh.enable": "maybe"}, "mesh.enable", "expected true or false"),
        ({"mesh.health": "icmp"}, "mesh.health", "expected tcp, http or none"),
        ({"mesh.health.path": "/x"}, "mesh.health.path", "needs mesh.health=tcp or mesh.health=http"),
        ({"mesh.health": "tcp", "mesh.health.path": "/x"}, "mesh.health.path", "only applies to mesh.health=http"),
        ({"mesh.health": "http", "mesh.health.path": "x"}, "mesh.health.path", "starting with /"),
        ({"mesh.health": "http", "mesh.health.status": "ok"}, "mesh.health.status", "HTTP status codes"),
        ({"mesh.health": "http", "mesh.health.status": "99"}, "mesh.health.status", "HTTP status codes"),
        ({"mesh.health": "tcp", "mesh.health.rise": "0"}, "mesh.health.rise", "1..100"),
        ({"mesh.health": "tcp", "mesh.health.interval": "0s"}, "mesh.health.interval", "duration > 0"),
    ],
)
def test_bad_label_names_label(extra, label, fragment):
    with pytest.raises(LabelError) as ei:
        parse_labels({"mesh.publish": "8080:80", **extra})
    assert ei.value.label == label
    assert fragment in str(ei.value)
    assert isinstance(ei.value, ConfigError)


def test_udp_balance_follows_balance_unless_given():
    assert parse_labels({"mesh.publish": "53/udp"}).options.udp_balance == "hash"
    assert parse_labels({"mesh.publish": "53/udp", "mesh.balance": "p2c"}).options.udp_balance == "p2c"
    both = parse_labels({"mesh.publish": "53/udp", "mesh.balance": "p2c", "mesh.udp.balance": "round-robin"})
    assert (both.options.balance, both.options.udp_balance) == ("p2c", "round-robin")


def test_udp_options():
    ml = parse_labels(
        {"mesh.publish": "53/udp", "mesh.udp.idle-timeout": "5s", "mesh.udp.responses": "1",
         "mesh.udp.max-sessions": "100"}
    )  # fmt: skip
    assert ml.options == ServiceOptions(udp_idle_timeout=5.0, udp_responses=1, udp_max_sessions=100)
    assert ml.warnings == ()


def test_tls_sni():
    ml = parse_labels({"mesh.publish": "443:8443/tls", "mesh.tls.sni": "a.example.com,*.B.example.com"})
    assert ml.publish == (PublishSpec(443, 8443, protocol="tls"),)
    assert ml.sni == ("*.b.example.com", "a.example.com")
    assert parse_labels({"mesh.publish": "443:8443/tls"}).sni == ()  # the port's default service


@pytest.mark.parametrize(
    ("labels", "label", "fragment"),
    [
        ({"mesh.publish": "443:8443", "mesh.tls.sni": "a.example.com"}, "mesh.tls.sni", "needs a /tls port"),
        ({"mesh.publish": "443/tls", "mesh.tls.sni": "a..example.com"}, "mesh.tls.sni", "expected DNS names"),
        ({"mesh.publish": "443/tls", "mesh.tls.sni": ""}, "mesh.tls.sni", "expected DNS names"),
        ({"mesh.publish": "53/udp", "mesh.udp.responses": "-1"}, "mesh.udp.responses", "0..1000"),
        ({"mesh.publish": "53/udp", "mesh.udp.idle-timeout": "0"}, "mesh.udp.idle-timeout", "> 0"),
    ],
)
def test_udp_tls_label_errors(labels, label, fragment):
    with pytest.raises(LabelError) as ei:
        parse_labels(labels)
    assert ei.value.label == label
    assert fragment in str(ei.value)


def test_http_hosts_and_paths():
    ml = parse_labels(
        {"mesh.publish": "80:8000/http", "mesh.http.hosts": "a.example.com,*.B.example.com",
         "mesh.http.paths": "/static, /api"}
    )  # fmt: skip
    assert ml.publish == (PublishSpec(80, 8000, protocol="http"),)
    assert (ml.hosts, ml.paths, ml.sni) == (("*.b.example.com", "a.example.com"), ("/api", "/static"), ())
    assert ml.warnings == ()
    bare = parse_labels({"mesh.publish": "80/http"})  # any host, any path
    assert (bare.hosts, bare.paths) == ((), ())


def test_http_options():
    ml = parse_labels(
        {"mesh.publish": "80/http", "mesh.slow-start": "30s", "mesh.accept-proxy": "10.0.0.0/8,fd00::/8",
         "mesh.http.max-body": "10MiB", "mesh.http.retry-on": "503,502", "mesh.http.sticky": "cookie",
         "mesh.http.sticky.name": "SRV", "mesh.http.hash-key": "cookie:uid", "mesh.balance": "hash"}
    )  # fmt: skip
    assert ml.options == ServiceOptions(
        balance="hash", udp_balance="hash", slow_start=30.0, accept_proxy=("10.0.0.0/8", "fd00::/8"),
        http_max_body=10 << 20, http_retry_on=(502, 503), http_sticky="cookie", http_sticky_name="SRV",
        http_hash_key="cookie:uid",
    )  # fmt: skip
    assert ml.warnings == ()


@pytest.mark.parametrize(
    ("labels", "label", "message"),
    [
        ({"mesh.publish": "80:8000", "mesh.http.hosts": "a.example.com"}, "mesh.http.hosts",
         "label mesh.http.hosts='a.example.com': needs an /http port in mesh.publish"),
        ({"mesh.publish": "443/tls", "mesh.http.paths": "/api"}, "mesh.http.paths",
         "label mesh.http.paths='/api': needs an /http port in mesh.publish"),
        ({"mesh.publish": "80/http", "mesh.tls.sni": "a.example.com"}, "mesh.tls.sni",
         "label mesh.tls.sni='a.example.com': needs a /tls port in mesh.publish"),
        ({"mesh.publish": "80/http", "mesh.http.hosts": "a b"}, "mesh.http.hosts",
         "label mesh.http.hosts='a b': expected DNS names or '*.name' wildcards, separated by commas, "
         "e.g. a.example.com,*.b.example.com"),
        ({"mesh.publish": "80/http", "mesh.http.paths": "api"}, "mesh.http.paths",
         "label mesh.http.paths='api': expected path prefixes starting with /, separated by commas, e.g. /api,/static"),
        ({"mesh.publish": "80/http", "mesh.http.paths": "/a,"}, "mesh.http.paths",
         "label mesh.http.paths='/a,': expected path prefixes starting with /, separated by commas, e.g. /api,/static"),
    ],
)  # fmt: skip
def test_http_label_errors(labels, label, message):
    with pytest.raises(LabelError) as ei:
        parse_labels(labels)
    assert (ei.value.label, str(ei.value)) == (label, message)
