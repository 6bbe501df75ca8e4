"""mesh/metrics.py: snapshots of live stats, merging, metric families, removed-host folding, discovery.

The pure parts use real ``Pool`` objects with hand-set counters (what the proxy would add) and exact
assertions on the parsed exposition.  The end-to-end test (real Mesh, real backends, HTTP scrape) is in
tests/test_admin.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.listener import Listener
from mesh.metrics import (
    REMOVED_ENDPOINT,
    SNAPSHOT_VERSION,
    DiscoveryMetrics,
    MetricsExporter,
    StatsReader,
    WorkerStats,
    make_registry,
    merge_snapshots,
)
from mesh.pool import EJECTED, FAILED_ACTIVE_HC, Pool
from mesh.routing import Endpoint, Route, ServiceOptions
from mesh.stats import CONNECT_BUCKETS

ROOT = Path(__file__).resolve().parent.parent


def ep(i: int, state: str = "running") -> Endpoint:
    return Endpoint(id=f"e{i}", address=f"10.0.0.{i}", port=8080, state=state)


def make_pool(n: int = 2, service: str = "web", port: int = 80, **opts) -> Pool:
    route = Route(port=port, endpoints=tuple(ep(i) for i in range(1, n + 1)))
    return Pool(service, route, ServiceOptions(**opts), clock=lambda: 100.0)


def host(pool: Pool, ident: str):
    return next(h for h in pool.hosts if h.endpoint.id == ident)


def traffic(h, conns: int, bytes_in: int, bytes_out: int, connect: float = 0.0007, dur: float = 0.02) -> None:
    """What the proxy adds for ``conns`` closed connections."""
    for _ in range(conns):
        h.stats.connections += 1
        h.stats.bytes_in += bytes_in
        h.stats.bytes_out += bytes_out
        h.stats.connect_time.observe(connect)
        h.stats.duration.observe(dur)


def listener(pool: Pool) -> Listener:
    """A real, unstarted Listener (never bound: these tests read counters only)."""
    return Listener("127.0.0.1", pool.port, pool, service=pool.service)


def reader(pools, info=None) -> StatsReader:
    listeners = [listener(p) for p in pools]
    return StatsReader(lambda: listeners, lambda: dict(info or {}), clock=lambda: 100.0)


def scrape(snaps) -> dict[str, dict[tuple, float]]:
    """Render like /metrics and parse back: {sample name: {sorted label items: value}}."""
    body, ctype = MetricsExporter(None).render(snaps)
    assert ctype.startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def L(**kw) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in kw.items()))


def test_counters_and_gauges_exact():
    pool = make_pool(3)
    e1, e2, e3 = (host(pool, f"e{i}") for i in (1, 2, 3))
    pool.stats.accepted = 9
    pool.stats.no_endpoint = 1
    pool.stats.retries = 2
    pool.stats.overflow_closed = 1
    pool.stats.connect_failed("refused")
    pool.stats.connect_failed("refused")
    pool.stats.connect_failed("timeout")
    traffic(e1, 3, 1000, 2000)
    traffic(e2, 2, 10, 20, connect=0.003, dur=7.0)
    e1.active = 2
    pool.set_active_health(e3, False)
    assert e3.health == FAILED_ACTIVE_HC
    rd = reader([pool], {"table_version": 7, "table_applied": 1700000000.5})
    rd._listeners_of()[0].acceptor.fd_exhausted = 4
    m = scrape([rd.snapshot()])

    assert m["mesh_connections_accepted_total"] == {L(service="web", port=80): 9}
    assert m["mesh_retries_total"] == {L(service="web", port=80): 2}
    assert m["mesh_connections_failed_total"] == {
        L(service="web", port=80, reason="no_endpoint"): 1,
        L(service="web", port=80, reason="refused"): 0,  # per connection: needs RouteStats.failed
        L(service="web", port=80, reason="timeout"): 0,
        L(service="web", port=80, reason="unreachable"): 0,
        L(service="web", port=80, reason="error"): 0,
        L(service="web", port=80, reason="overflow"): 1,
    }
    assert m["mesh_upstream_connect_failures_total"] == {
        L(service="web", port=80, reason="refused"): 2,
        L(service="web", port=80, reason="timeout"): 1,
        L(service="web", port=80, reason="unreachable"): 0,
        L(service="web", port=80, reason="error"): 0,
    }
    assert m["mesh_listener_up"] == {L(service="web", port=80): 0}  # never started
    assert m["mesh_upstream_connections_total"] == {
        L(service="web", port=80, endpoint="e1"): 3,
        L(service="web", port=80, endpoint="e2"): 2,
        L(service="web", port=80, endpoint="e3"): 0,
    }
    assert m["mesh_received_bytes_total"][L(service="web", port=80, endpoint="e1")] == 3000
    assert m["mesh_sent_bytes_total"][L(service="web", port=80, endpoint="e1")] == 6000
    assert m["mesh_received_bytes_total"][L(service="web", port=80, endpoint="e2")] == 20
    assert m["mesh_sent_bytes_total"][L(service="web", port=80, endpoint="e2")] == 40
    assert m["mesh_connections_active"] == {
        L(service="web", port=80, endpoint="e1"): 2,
        L(service="web", port=80, endpoint="e2"): 0,
        L(service="web", port=80, endpoint="e3"): 0,
    }
    assert m["mesh_endpoint_up"] == {
        L(service="web", port=80, endpoint="e1"): 1,
        L(service="web", port=80, endpoint="e2"): 1,
        L(service="web", port=80, endpoint="e3"): 0,
    }
    assert m["mesh_endpoint_healthy"][L(service="web", port=80, endpoint="e3")] == 0
    assert m["mesh_healthy_endpoints"] == {L(service="web", port=80): 2}
    assert m["mesh_endpoints"] == {L(service="web", port=80): 3}
    assert m["mesh_table_version"] == {(): 7}
    assert m["mesh_table_applied_timestamp_seconds"] == {(): 1700000000.5}
    assert m["mesh_fd_exhausted_total"] == {(): 4}
    # histograms: cumulative buckets in Prometheus' number format, exact counts and sums
    b = m["mesh_upstream_connect_seconds_bucket"]
    assert b[(("endpoint", "e1"), ("le", "0.0005"), ("port", "80"), ("service", "web"))] == 0
    assert b[(("endpoint", "e1"), ("le", "0.001"), ("port", "80"), ("service", "web"))] == 3
    assert b[(("endpoint", "e2"), ("le", "0.0025"), ("port", "80"), ("service", "web"))] == 0
    assert b[(("endpoint", "e2"), ("le", "0.005"), ("port", "80"), ("service", "web"))] == 2
    assert b[(("endpoint", "e2"), ("le", "+Inf"), ("port", "80"), ("service", "web"))] == 2
    assert len([k for k in b if ("endpoint", "e1") in k]) == len(CONNECT_BUCKETS) + 1
    assert m["mesh_upstream_connect_seconds_count"][L(service="web", port=80, endpoint="e2")] == 2
    assert m["mesh_upstream_connect_seconds_sum"][L(service="web", port=80, endpoint="e2")] == pytest.approx(0.006)
    d = m["mesh_connection_duration_seconds_bucket"]
    assert d[(("endpoint", "e2"), ("le", "5.0"), ("port", "80"), ("service", "web"))] == 0
    assert d[(("endpoint", "e2"), ("le", "10.0"), ("port", "80"), ("service", "web"))] == 2
    # never a client address, never an unexpected label
    labels = {k for series in m.values() for key in series for k, _ in key}
    assert labels <= {"service", "port", "endpoint", "reason", "le"}


def test_ejection_and_draining_gauges():
    pool = make_pool(4, consecutive_failures=1, max_ejection_percent=50)
    e1, e2 = host(pool, "e1"), host(pool, "e2")
    pool.report_failure(e1)
    assert e1.health & EJECTED
    pool.update(Route(port=80, endpoints=(ep(1), ep(2, "draining"), ep(3), ep(4))), ServiceOptions())
    snap = reader([pool]).snapshot()
    rows = {h["id"]: h for h in snap["routes"][0]["hosts"]}
    assert rows["e1"]["ejected_seconds_left"] == pytest.approx(10.0)
    assert rows["e2"]["draining"] is True and rows["e2"]["listed"] is True
    m = scrape([snap])
    assert m["mesh_ejections_total"][L(service="web", port=80, endpoint="e1")] == 1
    assert m["mesh_endpoint_ejected"][L(service="web", port=80, endpoint="e1")] == 1
    assert m["mesh_endpoint_up"][L(service="web", port=80, endpoint="e1")] == 0
    assert m["mesh_endpoint_healthy"][L(service="web", port=80, endpoint="e1")] == 1  # ejected, not failed HC
    assert m["mesh_endpoint_up"][L(service="web", port=80, endpoint="e2")] == 0  # draining
    assert m["mesh_healthy_endpoints"] == {L(service="web", port=80): 2}
    assert m["mesh_endpoints"] == {L(service="web", port=80): 4}
    assert e2.active == 0


def test_removed_hosts_fold_into_route_totals_and_stay_monotonic():
    pool = make_pool(3)
    rd = reader([pool])
    traffic(host(pool, "e1"), 2, 100, 200)
    traffic(host(pool, "e2"), 1, 5, 6)
    e3 = host(pool, "e3")
    traffic(e3, 4, 1, 1)
    e3.active = 1  # still carries a connection when it leaves the table
    m0 = scrape([rd.snapshot()])

    # e2 and e3 leave the table; e3 keeps its connection.  No scrape in between: on_change catches it.
    pool.update(Route(port=80, endpoints=(ep(1),)), ServiceOptions())
    traffic(e3, 1, 1, 1)  # its last connection closes... later
    m1 = scrape([rd.snapshot()])
    up = m1["mesh_upstream_connections_total"]
    assert up == {
        L(service="web", port=80, endpoint="e1"): 2,
        L(service="web", port=80, endpoint="e3"): 5,  # departed but busy: still exported under its id
        L(service="web", port=80, endpoint=REMOVED_ENDPOINT): 1,  # e2 folded
    }
    assert m1["mesh_endpoint_up"][L(service="web", port=80, endpoint="e3")] == 0
    assert m1["mesh_endpoints"] == {L(service="web", port=80): 1}
    e3.active = 0
    m2 = scrape([rd.snapshot()])
    assert m2["mesh_upstream_connections_total"] == {
        L(service="web", port=80, endpoint="e1"): 2,
        L(service="web", port=80, endpoint=REMOVED_ENDPOINT): 6,
    }
    assert m2["mesh_received_bytes_total"][L(service="web", port=80, endpoint=REMOVED_ENDPOINT)] == 10
    assert L(service="web", port=80, endpoint="e3") not in m2["mesh_connections_active"]
    # the per-route sum of every per-endpoint counter never went down
    for name in ("mesh_upstream_connections_total", "mesh_received_bytes_total", "mesh_sent_bytes_total"):
        sums = [sum(m[name].values()) for m in (m0, m1, m2)]
        assert sums == sorted(sums), (name, sums)
    hist = "mesh_connection_duration_seconds_count"
    assert [sum(m[hist].values()) for m in (m0, m1, m2)] == [7, 8, 8]


def test_host_added_and_removed_between_scrapes_is_not_lost():
    pool = make_pool(1)
    rd = reader([pool])
    rd.snapshot()
    pool.update(Route(port=80, endpoints=(ep(1), ep(2))), ServiceOptions())
    traffic(host(pool, "e2"), 3, 1, 1)
    pool.update(Route(port=80, endpoints=(ep(1),)), ServiceOptions())
    m = scrape([rd.snapshot()])
    assert m["mesh_upstream_connections_total"][L(service="web", port=80, endpoint=REMOVED_ENDPOINT)] == 3


def test_route_that_stops_being_served_drops_its_ledger():
    a, b = listener(make_pool(1, port=80)), listener(make_pool(1, port=81))
    a.acceptor.fd_exhausted, b.acceptor.fd_exhausted = 2, 3
    listeners = [a, b]
    rd = StatsReader(lambda: listeners)
    assert rd.snapshot()["fd_exhausted"] == 5
    assert len(rd._ledgers) == 2
    b.acceptor.fd_exhausted = 4  # counted after the last snapshot, before the listener goes away
    listeners.remove(b)
    snap = rd.snapshot()
    assert [r["port"] for r in snap["routes"]] == [80]
    assert len(rd._ledgers) == 1
    assert snap["fd_exhausted"] == 6  # the process-wide counter does not go down with the listener


def test_snapshot_is_json_and_merge_sums_workers():
    # two workers serving the same table
    w1, w2 = make_pool(2), make_pool(2)
    w1.stats.accepted, w2.stats.accepted = 5, 7
    w1.stats.connect_failed("refused")
    w2.stats.connect_failed("refused")
    w2.stats.connect_failed("unreachable")
    traffic(host(w1, "e1"), 5, 1000, 1000)
    traffic(host(w2, "e1"), 2, 1000, 1000)
    host(w1, "e1").active = 1
    host(w2, "e1").active = 2
    w2.set_active_health(host(w2, "e2"), False)  # only worker 2 sees e2 failing
    s1 = json.loads(json.dumps(reader([w1], {"table_version": 4, "table_applied": 10.0}).snapshot()))
    s2 = json.loads(json.dumps(reader([w2], {"table_version": 3, "table_applied": 20.0}).snapshot()))
    assert s1["v"] == SNAPSHOT_VERSION
    merged = merge_snapshots([s1, s2])
    assert merged["processes"] == 2
    assert merged["table_version"] == 3 and merged["table_applied"] == 20.0
    m = scrape([s1, s2])
    assert m["mesh_connections_accepted_total"] == {L(service="web", port=80): 12}
    assert m["mesh_upstream_connect_failures_total"][L(service="web", port=80, reason="refused")] == 2
    assert m["mesh_upstream_connect_failures_total"][L(service="web", port=80, reason="unreachable")] == 1
    assert m["mesh_upstream_connections_total"][L(service="web", port=80, endpoint="e1")] == 7
    assert m["mesh_received_bytes_total"][L(service="web", port=80, endpoint="e1")] == 7000
    assert m["mesh_connections_active"][L(service="web", port=80, endpoint="e1")] == 3
    assert m["mesh_upstream_connect_seconds_count"][L(service="web", port=80, endpoint="e1")] == 7
    # endpoint up = any worker can use it; healthy likewise
    assert m["mesh_endpoint_up"][L(service="web", port=80, endpoint="e2")] == 1
    assert m["mesh_endpoint_healthy"][L(service="web", port=80, endpoint="e2")] == 1
    assert m["mesh_data_plane_processes"] == {(): 2}
    assert m["mesh_table_version"] == {(): 3}
    # merging never mutates its inputs (the parent may keep the last snapshot of a slow worker)
    assert s1["routes"][0]["hosts"][0]["connections"] == 5


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"v": 99}, "format 99"),
        ({"buckets": {"connect_time": [1.0], "duration": [1.0]}}, "different histogram buckets"),
    ],
)
def test_merge_rejects_incompatible_snapshots(bad, message):
    good = reader([make_pool(1)]).snapshot()
    with pytest.raises(ValueError, match=message):
        merge_snapshots([good, {**good, **bad}])


def test_merge_of_nothing_renders_empty_families():
    m = scrape([])
    assert m["mesh_data_plane_processes"] == {(): 0}
    assert "mesh_table_version" not in m
    assert "mesh_connections_accepted_total" not in m


def test_discovery_metrics():
    d = DiscoveryMetrics()
    for t, a in [("container", "start"), ("container", "start"), ("container", "exec_start: sh -c 'x'")]:
        d.event(t, a)
    d.event("service", "update")
    d.reconnect()
    hooks = d.hooks()  # what the composition root hands to discovery.watcher.Watcher
    assert set(hooks) == {"on_event", "on_reconnect", "on_lag"}
    for s in (0.02, 0.3, 0.3, 120.0):
        d.lag(s)
    hooks["on_lag"](-1.0, "container")
    body = MetricsExporter(make_registry(discovery=d, process=False)).render([])[0].decode()
    m = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            m.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    assert m["mesh_discovery_events_total"] == {
        L(type="container", action="start"): 2,
        L(type="container", action="exec_start"): 1,
        L(type="service", action="update"): 1,
    }
    assert m["mesh_discovery_reconnects_total"] == {(): 1}
    lag = m["mesh_discovery_lag_seconds_bucket"]
    assert lag[(("le", "0.01"),)] == 1  # the negative one (clock skew) clamps to 0
    assert lag[(("le", "0.025"),)] == 2
    assert lag[(("le", "0.5"),)] == 4
    assert lag[(("le", "60.0"),)] == 4
    assert lag[(("le", "+Inf"),)] == 5
    assert m["mesh_discovery_lag_seconds_sum"][()] == pytest.approx(120.62)


def test_discovery_event_labels_are_bounded():
    d = DiscoveryMetrics()
    for i in range(500):
        d.event("container", f"verb{i}")
    assert len(d.events) == 201
    assert d.events[("other", "other")] == 300


def test_registry_has_process_metrics_and_is_not_global():
    from prometheus_client import REGISTRY

    reg = make_registry()
    assert reg is not REGISTRY
    body, _ = MetricsExporter(reg).render([])
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"process_cpu_seconds", "process_open_fds", "python_info", "python_gc_objects_collected"} <= names


# Every family /metrics serves, as prometheus_client's parser names and types them (counters lose "_total").
FAMILY_TYPES = {
    "mesh_connections_accepted": "counter",
    "mesh_connections_active": "gauge",
    "mesh_connections_failed": "counter",
    "mesh_upstream_connections": "counter",
    "mesh_received_bytes": "counter",
    "mesh_sent_bytes": "counter",
    "mesh_upstream_connect_seconds": "histogram",
    "mesh_connection_duration_seconds": "histogram",
    "mesh_upstream_connect_failures": "counter",
    "mesh_retries": "counter",
    "mesh_ejections": "counter",
    "mesh_endpoint_up": "gauge",
    "mesh_endpoint_healthy": "gauge",
    "mesh_endpoint_ejected": "gauge",
    "mesh_healthy_endpoints": "gauge",
    "mesh_endpoints": "gauge",
    "mesh_listener_up": "gauge",
    "mesh_table_version": "gauge",
    "mesh_table_applied_timestamp_seconds": "gauge",
    "mesh_fd_exhausted": "counter",
    "mesh_data_plane_processes": "gauge",
    "mesh_discovery_events": "counter",
    "mesh_discovery_reconnects": "counter",
    "mesh_discovery_lag_seconds": "histogram",
}


def test_exposition_reads_back_with_prometheus_client_parser():
    """The whole /metrics body (registry part from generate_latest, mesh part from render_text) parsed by
    prometheus_client: family names and types, HELP, label escaping, histogram structure, exact values."""
    weird = 'we"ird\\svc\nx'  # quote, backslash and newline must survive the label escaping
    pool = make_pool(3, service=weird)
    rd = reader([pool], {"table_version": 3, "table_applied": 12.25})
    rd.snapshot()  # the reader learns the pool's hosts (a running admin server scrapes from the start)
    traffic(host(pool, "e1"), 3, 7, 9, connect=0.2, dur=100.0)
    pool.stats.connect_failed("refused")
    pool.stats.no_endpoint = 2
    pool.set_active_health(host(pool, "e2"), False)
    traffic(host(pool, "e3"), 1, 1, 1)
    pool.update(Route(port=80, endpoints=(ep(1), ep(2))), ServiceOptions())
    snap = rd.snapshot()
    merged = merge_snapshots([snap])
    assert [h["id"] for h in merged["routes"][0]["hosts"]] == ["e1", "e2"]
    assert merged["routes"][0]["removed"]["connections"] == 1

    body, _ = MetricsExporter(make_registry(discovery=DiscoveryMetrics(), process=False)).render([snap])
    fams = list(text_string_to_metric_families(body.decode()))
    names = [f.name for f in fams]
    assert len(names) == len(set(names))  # no family written twice (the two parts of the body do not clash)
    assert {f.name: f.type for f in fams} == FAMILY_TYPES
    assert all(f.documentation for f in fams)

    mesh = [
        s for f in fams if f.name.startswith("mesh_") and not f.name.startswith("mesh_discovery_") for s in f.samples
    ]
    # 19 route-level and global + 36 counter samples for e1, e2 and _removed + 4 state gauges for e1, e2
    assert len(mesh) == 19 + 3 * 36 + 2 * 4
    assert {s.labels["service"] for s in mesh if "service" in s.labels} == {weird}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in mesh}
    assert len(got) == len(mesh)  # every sample has its own name and label set

    def at(name, **labels):
        return got[(name, L(service=weird, port=80, **labels))]

    assert at("mesh_upstream_connections_total", endpoint="e1") == 3
    assert at("mesh_upstream_connections_total", endpoint=REMOVED_ENDPOINT) == 1
    assert at("mesh_received_bytes_total", endpoint="e1") == 21
    assert at("mesh_sent_bytes_total", endpoint="e1") == 27
    assert at("mesh_connections_failed_total", reason="no_endpoint") == 2
    assert at("mesh_upstream_connect_failures_total", reason="refused") == 1
    assert at("mesh_endpoint_healthy", endpoint="e2") == 0
    assert at("mesh_endpoint_up", endpoint="e1") == 1
    assert at("mesh_healthy_endpoints") == 1
    assert at("mesh_endpoints") == 2
    assert at("mesh_upstream_connect_seconds_bucket", endpoint="e1", le="0.1") == 0
    assert at("mesh_upstream_connect_seconds_bucket", endpoint="e1", le="0.25") == 3
    assert at("mesh_upstream_connect_seconds_sum", endpoint="e1") == pytest.approx(0.6)
    assert at("mesh_connection_duration_seconds_sum", endpoint="e1") == 300.0
    assert got[("mesh_table_version", ())] == 3
    assert got[("mesh_table_applied_timestamp_seconds", ())] == 12.25

    # every histogram series: cumulative buckets ending in +Inf, +Inf == _count
    for f in fams:
        if f.type != "histogram":
            continue
        series: dict[tuple, list] = {}
        for s in f.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(key, []).append(s)
        assert series, f.name
        for key, samples in series.items():
            buckets = [s for s in samples if s.name == f.name + "_bucket"]
            counts = [s.value for s in buckets]
            assert counts == sorted(counts), (f.name, key)
            assert buckets[-1].labels["le"] == "+Inf"
            (count,) = (s.value for s in samples if s.name == f.name + "_count")
            assert count == counts[-1], (f.name, key)


def test_scrape_of_1000_endpoints_is_cheap():
    pools = [make_pool(100, service=f"s{i}", port=1000 + i) for i in range(10)]
    for p in pools:
        for h in p.hosts:
            traffic(h, 1, 10, 10)
    rd = reader(pools)
    rd.snapshot()
    t0 = time.perf_counter()
    snap = rd.snapshot()
    t_snap = time.perf_counter() - t0
    t0 = time.perf_counter()
    body, _ = MetricsExporter(None).render([snap])
    t_render = time.perf_counter() - t0
    print(f"\n1000 endpoints: snapshot {t_snap * 1000:.1f} ms, render {t_render * 1000:.1f} ms, {len(body)} bytes")
    # the snapshot runs on the event loop: it must stay well under a scrape interval's worth of latency
    assert t_snap < 0.25
    assert t_render < 5.0
    assert body.count(b"mesh_upstream_connections_total{") == 1000


def test_grafana_dashboard_is_valid_and_uses_our_metrics():
    path = ROOT / "compose" / "grafana-dashboard.json"
    dash = json.loads(path.read_text())
    assert dash["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" for v in dash["templating"]["list"])
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    disc = DiscoveryMetrics()
    disc.event("container", "start")
    snap = reader([make_pool(1)], {"table_version": 1, "table_applied": 1.0}).snapshot()
    from mesh.metrics import _http_route

    snap["routes"][0]["http"] = _http_route(None)  # as an http route's row (its families appear once used)
    snap["routes"][0]["http"]["requests"] = {"GET": {"2xx": 1}}
    body, _ = MetricsExporter(make_registry(discovery=disc)).render([snap])
    known = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    used = set()
    for e in exprs:
        for tok in e.replace("(", " ").replace(")", " ").replace("{", " ").replace("[", " ").split():
            if tok.startswith(("mesh_", "process_")):
                used.add(tok)
    assert len([u for u in used if u.startswith("mesh_")]) >= 15, sorted(used)
    assert used <= known, f"dashboard uses unknown metrics: {sorted(used - known)}"
    for p in dash["panels"]:
        if p.get("type") != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_worker_stats_stay_monotonic_across_restarts_and_silent_workers():
    def worker_snap(pid: int, conns: dict[str, int], active: int = 0, accepted: int = 0) -> dict:
        pool = make_pool(3)
        pool.stats.accepted = accepted
        for ident, n in conns.items():
            traffic(host(pool, ident), n, 10, 20)
        host(pool, "e1").active = active
        snap = json.loads(json.dumps(reader([pool], {"table_version": 5, "table_applied": 50.0}).snapshot()))
        snap["pid"] = pid
        return snap

    ws = WorkerStats()
    assert ws.combine([{}], [101]) == []  # a worker that answered garbage is skipped (and logged)
    t1 = [worker_snap(101, {"e1": 4, "e3": 1}, active=1, accepted=5), worker_snap(102, {"e1": 2}, accepted=2)]
    m1 = scrape(ws.combine(t1, [101, 102]))
    assert m1["mesh_connections_accepted_total"] == {L(service="web", port=80): 7}
    assert m1["mesh_upstream_connections_total"][L(service="web", port=80, endpoint="e1")] == 6
    assert m1["mesh_data_plane_processes"] == {(): 2}

    # worker 102 does not answer in time: its last counters still count
    m2 = scrape(ws.combine([worker_snap(101, {"e1": 5, "e3": 1}, accepted=6)], [101, 102]))
    assert m2["mesh_connections_accepted_total"] == {L(service="web", port=80): 8}
    assert m2["mesh_upstream_connections_total"][L(service="web", port=80, endpoint="e1")] == 7

    # worker 101 died and was replaced by 103 (fresh counters); the table no longer lists e3
    now = [worker_snap(103, {"e1": 1}, accepted=1), worker_snap(102, {"e1": 3}, accepted=3)]
    for snap in now:
        snap["routes"][0]["hosts"] = [h for h in snap["routes"][0]["hosts"] if h["id"] != "e3"]
    m3 = scrape(ws.combine(now, [102, 103]))
    assert m3["mesh_connections_accepted_total"] == {L(service="web", port=80): 6 + 1 + 3}
    assert m3["mesh_upstream_connections_total"] == {
        L(service="web", port=80, endpoint="e1"): 5 + 1 + 3,
        L(service="web", port=80, endpoint="e2"): 0,
        L(service="web", port=80, endpoint=REMOVED_ENDPOINT): 1,  # e3's count from the dead worker
    }
    assert m3["mesh_connections_active"][L(service="web", port=80, endpoint="e1")] == 0  # the dead had none left
    assert m3["mesh_endpoint_up"][L(service="web", port=80, endpoint="e1")] == 1
    assert m3["mesh_data_plane_processes"] == {(): 2}
    assert m3["mesh_table_version"] == {(): 5}
    for name in ("mesh_upstream_connections_total", "mesh_received_bytes_total", "mesh_connections_accepted_total"):
        sums = [sum(m[name].values()) for m in (m1, m2, m3)]
        assert sums == sorted(sums), (name, sums)


def test_discovery_hooks_match_the_watcher():
    import inspect

    from discovery.watcher import Watcher

    params = inspect.signature(Watcher).parameters
    assert set(DiscoveryMetrics().hooks()) <= set(params)


# -- snapshots in slices (StatsReader.snapshot_async): exact and monotonic while the loop runs between them ----


def _conns(snap, port: int = 80) -> dict[str, int]:
    """Per-endpoint connection counters of a snapshot's route on ``port`` (removed totals: "_removed")."""
    (r,) = [r for r in snap["routes"] if r["port"] == port]
    return {**{h["id"]: h["connections"] for h in r["hosts"]}, REMOVED_ENDPOINT: r["removed"]["connections"]}


def _run_steps(rd: StatsReader, slice_hosts: int, between) -> dict:
    """Take a snapshot in slices of ``slice_hosts`` rows, calling ``between(i)`` after slice i (what the loop
    may do while ``snapshot_async`` waits); returns the snapshot and how many slices it took."""
    steps = rd._steps(slice_hosts)
    i = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        between(i)
        i += 1


def test_snapshot_in_slices_equals_the_whole_snapshot():
    pools = [make_pool(7, service=f"s{i}", port=100 + i) for i in range(3)]
    for p in pools:
        for k, h in enumerate(p.hosts):
            traffic(h, k + 1, 10, 20)
    host(pools[1], "e3").health |= EJECTED
    host(pools[1], "e3").ejected_until = 130.0
    rd = reader(pools, {"table_version": 9})
    whole = rd.snapshot()
    sliced = _run_steps(rd, 2, lambda i: None)
    assert {**sliced, "pid": 0} == {**whole, "pid": 0}
    assert sum(len(r["hosts"]) for r in whole["routes"]) == 21


def test_table_applied_between_slices_counts_each_connection_once_and_never_less():
    pool = make_pool(6)
    # slices of 2 rows: [the first route] [this pool's export list and removed totals, e1, e2] [e3, e4] [e5, e6]
    rd = reader([make_pool(2, service="first", port=79), pool])
    for k, h in enumerate(pool.hosts):
        traffic(h, 10 * (k + 1), 1, 1)  # e1: 10 ... e6: 60 -> 210
    e6 = host(pool, "e6")
    e6.active = 1
    s0 = rd.snapshot()
    assert sum(_conns(s0).values()) == 210

    def between(i: int) -> None:
        if i == 1:
            # after e1 and e2 were read: the table drops e5 (idle: folded into the removed totals at once) and
            # e6 (busy: kept), then e6's connection closes and a second table folds it too -- all before
            # their rows are read
            pool.update(Route(port=80, endpoints=tuple(ep(k) for k in range(1, 5))), ServiceOptions())
            traffic(e6, 1, 1, 1)
            e6.active = 0
            pool.update(Route(port=80, endpoints=tuple(ep(k) for k in range(1, 5))), ServiceOptions())

    s1 = _run_steps(rd, 2, between)
    c1 = _conns(s1)
    # e5 and e6 once each: as their own rows (listed when the route's slice began), not in the removed totals
    assert c1 == {"e1": 10, "e2": 20, "e3": 30, "e4": 40, "e5": 50, "e6": 61, REMOVED_ENDPOINT: 0}
    s2 = rd.snapshot()
    c2 = _conns(s2)
    assert c2 == {"e1": 10, "e2": 20, "e3": 30, "e4": 40, REMOVED_ENDPOINT: 111}
    sums = [sum(_conns(s).values()) for s in (s0, s1, s2)]
    assert sums == [210, 211, 211]
    # each series that stays never goes down
    for a, b in ((s0, s1), (s1, s2)):
        ca, cb = _conns(a), _conns(b)
        assert all(cb[k] >= ca[k] for k in ca.keys() & cb.keys())


def test_many_empty_routes_still_yield():
    pools = [make_pool(0, service=f"s{i}", port=1000 + i) for i in range(40)]
    rd = reader(pools)
    slices = []
    snap = _run_steps(rd, 5, slices.append)
    assert len(snap["routes"]) == 40 and len(slices) >= 40 // 5 - 1


def test_a_pool_created_between_slices_keeps_its_ledger():
    a = make_pool(4, port=80)
    b = make_pool(2, service="new", port=81)
    listeners = [listener(a)]
    rd = StatsReader(lambda: listeners, clock=lambda: 100.0)
    rd.snapshot()

    def between(i: int) -> None:
        if i == 0:  # a table adds a port: the runtime's on_pool hook calls watch() at once
            rd.watch(b)
            listeners.append(listener(b))

    _run_steps(rd, 1, between)
    assert id(b) in rd._ledgers  # not dropped as "no longer served"
    traffic(host(b, "e2"), 5, 1, 1)
    b.update(Route(port=81, endpoints=(ep(1),)), ServiceOptions())
    snap = rd.snapshot()
    (r,) = [r for r in snap["routes"] if r["service"] == "new"]
    assert r["removed"]["connections"] == 5


async def test_concurrent_async_snapshots_run_one_after_the_other():
    import asyncio

    pool = make_pool(40)
    rd = reader([pool])
    order: list[str] = []

    async def take(name: str) -> dict:
        order.append(f"{name} start")
        snap = await rd.snapshot_async(slice_hosts=5)
        order.append(f"{name} end")
        return snap

    async def traffic_meanwhile() -> None:
        for _ in range(30):
            for h in pool.hosts:
                traffic(h, 1, 1, 1)
            await asyncio.sleep(0)

    s1, s2, _ = await asyncio.gather(take("a"), take("b"), traffic_meanwhile())
    assert order == ["a start", "b start", "a end", "b end"]
    assert rd.slices >= 2 * (40 // 5 - 1)  # each yielded to the loop between its slices
    c1, c2 = _conns(s1), _conns(s2)
    assert all(c2[k] >= c1[k] for k in c1)  # b read every host after a had finished
    assert sum(c2.values()) > sum(c1.values())
