"""Pool: outlier ejection, panic, draining, locality, exclude, update.  Fake clock, seeded rng, exact."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import replace

import pytest

from mesh.balancer import HashRing, LeastConn, RoundRobin
from mesh.pool import EJECTED, FAILED_ACTIVE_HC, NEW_HOST_EJECTION, Host, Pool
from mesh.routing import Endpoint, Route, ServiceOptions


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoints(n: int, *, weights=None, draining=(), via=()) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(
            f"e{i}",
            f"10.0.0.{i + 1}",
            8000,
            weight=weights[i] if weights else 1,
            state="draining" if i in draining else "running",
            via="198.18.0.2:7946" if i in via else None,
        )
        for i in range(n)
    )


def make_pool(n=4, clock=None, seed=1, **opts) -> Pool:
    return Pool(
        "web",
        Route(8080, endpoints(n)),
        ServiceOptions(**opts),
        rng=random.Random(seed),
        clock=clock or Clock(),
    )


def picks(pool: Pool, n: int, exclude=()) -> Counter:
    return Counter(h.id if h else None for h in (pool.choose(None, exclude) for _ in range(n)))


def fail(pool: Pool, host: Host, times: int) -> None:
    for _ in range(times):
        pool.report_failure(host)


# -- outlier ejection -------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 3, 5])
def test_ejected_after_consecutive_failures(threshold):
    pool = make_pool(consecutive_failures=threshold)
    h = pool.hosts[0]
    fail(pool, h, threshold - 1)
    assert h.health == 0 and h.consecutive_failures == threshold - 1
    fail(pool, h, 1)
    assert h.health == EJECTED
    assert h.ejections == 1 and h.stats.ejections == 1 and h.consecutive_failures == 0
    assert h.ejected_until == 1000.0 + 10.0
    assert picks(pool, 300) == {"e1": 100, "e2": 100, "e3": 100}


def test_success_resets_the_consecutive_count():
    pool = make_pool(consecutive_failures=3)
    h = pool.hosts[0]
    fail(pool, h, 2)
    pool.report_success(h)
    assert h.consecutive_failures == 0
    fail(pool, h, 2)
    assert h.health == 0
    fail(pool, h, 1)
    assert h.health == EJECTED


def test_ejection_backoff_grows_and_is_capped():
    clock = Clock()
    pool = make_pool(clock=clock, consecutive_failures=1, base_ejection_time=10, max_ejection_time=35)
    h = pool.hosts[0]
    durations = []
    for _ in range(5):
        fail(pool, h, 1)
        durations.append(h.ejected_until - clock.now)
        clock.now = h.ejected_until  # expiry is inclusive
        assert pool.choose(None, exclude=pool.hosts[1:]) is h
        assert h.health == 0
    assert durations == [10, 20, 30, 35, 35]
    assert h.ejections == 5 and h.stats.ejections == 5


def test_ejection_expires_lazily_at_the_next_choose(caplog):
    clock = Clock()
    pool = make_pool(n=2, clock=clock, consecutive_failures=1)
    a = pool.hosts[0]
    with caplog.at_level(logging.INFO, logger="mesh.pool"):
        fail(pool, a, 1)
        clock.now += 9.999
        assert picks(pool, 10) == {"e1": 10}
        assert a.health == EJECTED
        clock.now += 0.001
        assert picks(pool, 10) == {"e0": 5, "e1": 5}
        assert a.health == 0
        assert pool._next_expiry == float("inf")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "service web port 8080: ejected endpoint e0 (10.0.0.1:8000) for 10.0s after 1 connect failures in a row "
        "(ejection #1)",
        "service web port 8080: endpoint e0 (10.0.0.1:8000) back from ejection",
    ]
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_next_expiry_is_the_earliest():
    clock = Clock()
    pool = make_pool(n=4, clock=clock, consecutive_failures=1, max_ejection_percent=100, panic_threshold=0)
    a, b, c, _ = pool.hosts
    fail(pool, a, 1)  # until 1010
    fail(pool, a, 1)  # already ejected: counted, not re-ejected
    assert a.ejections == 1 and a.consecutive_failures == 1
    clock.now = 1005.0
    fail(pool, b, 1)  # until 1015
    b.ejections = 0
    clock.now = 1001.0
    assert pool._next_expiry == 1010.0
    clock.now = 1010.0
    pool.choose()
    assert (a.health, b.health, c.health) == (0, EJECTED, 0)
    assert pool._next_expiry == 1015.0


@pytest.mark.parametrize(
    "n, percent, allowed",
    [
        (4, 50, 2),
        (2, 50, 1),
        (3, 10, 1),  # at least one when percent > 0 and >= 2 hosts
        (10, 25, 2),  # rounded down
        (10, 100, 10),
        (1, 50, 0),  # a lone host is never ejected below 100 %
        (1, 100, 1),
        (5, 0, 0),  # 0 % turns ejection off
    ],
)
def test_max_ejection_percent_bound(n, percent, allowed):
    pool = make_pool(n=n, consecutive_failures=1, max_ejection_percent=percent, panic_threshold=0)
    for h in pool.hosts:
        fail(pool, h, 1)
    assert sum(1 for h in pool.hosts if h.health & EJECTED) == allowed
    assert [bool(h.health) for h in pool.hosts] == [i < allowed for i in range(n)]


def test_host_over_threshold_is_ejected_once_the_bound_allows():
    clock = Clock()
    pool = make_pool(n=2, clock=clock, consecutive_failures=2, max_ejection_percent=50)
    a, b = pool.hosts
    fail(pool, a, 2)
    fail(pool, b, 3)  # bound reached: b keeps counting
    assert (a.health, b.health, b.consecutive_failures) == (EJECTED, 0, 3)
    clock.now += 10
    fail(pool, b, 1)  # a's ejection expires first, then b goes
    assert (a.health, b.health) == (0, EJECTED)


def test_ejection_count_decays_after_healthy_periods():
    clock = Clock()
    pool = make_pool(clock=clock, consecutive_failures=1, base_ejection_time=10, max_ejection_time=100)
    h = pool.hosts[0]
    for _ in range(4):
        fail(pool, h, 1)
        clock.now = h.ejected_until
    assert h.ejections == 4
    pool.choose()
    # 250 s healthy = two full max_ejection_time periods: 4 -> 2 -> 1, then this ejection makes 2
    clock.now += 250
    fail(pool, h, 1)
    assert h.ejections == 2
    assert h.ejected_until - clock.now == 20


def test_a_new_host_that_never_connected_is_ejected_only_briefly(caplog):
    """Scale-up / rolling update: a replica that joins a running pool and is dialled before it listens (or
    before its node's agent knows it) is out for NEW_HOST_EJECTION x its ejections, not base_ejection_time;
    once it connected, the usual times apply."""
    clock = Clock()
    pool = make_pool(n=2, clock=clock, consecutive_failures=3, base_ejection_time=10, max_ejection_time=300)
    pool.update(Route(8080, endpoints(3)), pool.options)
    old, new = pool.hosts[0], pool.hosts[2]
    assert (old.connected, new.connected) == (True, False)
    durations = []
    with caplog.at_level(logging.WARNING, logger="mesh.pool"):
        for _ in range(3):
            fail(pool, new, 3)
            durations.append(new.ejected_until - clock.now)
            clock.now = new.ejected_until
            pool.choose()
            assert new.health == 0
    assert durations == [NEW_HOST_EJECTION, 2 * NEW_HOST_EJECTION, 3 * NEW_HOST_EJECTION]
    assert caplog.records[0].getMessage().endswith("(ejection #1, never connected yet)")
    # a never-connected host that keeps failing backs off, one NEW_HOST_EJECTION more each time
    new.ejections = 20
    fail(pool, new, 3)
    assert new.ejected_until - clock.now == 21 * NEW_HOST_EJECTION
    clock.now = new.ejected_until
    pool.choose()
    pool.report_success(new)
    assert new.connected
    new.ejections = 0
    fail(pool, new, 3)
    assert new.ejected_until - clock.now == 10
    clock.now = new.ejected_until
    pool.choose()
    fail(pool, old, 3)  # the hosts the pool started with count as connected
    assert old.health == EJECTED and old.ejected_until - clock.now == 10


def test_failure_of_a_removed_host_does_not_eject():
    pool = make_pool(n=3, consecutive_failures=1)
    gone = pool.hosts[0]
    pool.update(Route(8080, endpoints(3)[1:]), pool.options)
    fail(pool, gone, 3)
    assert gone.health == 0 and gone.draining
    assert [h.id for h in pool.hosts] == ["e1", "e2"]


# -- active health, panic ---------------------------------------------------------------------------


def test_active_health_flips_once(caplog):
    pool = make_pool(n=3)
    changes = []
    pool.on_change.append(lambda p: changes.append(len(p.usable)))
    h = pool.hosts[1]
    with caplog.at_level(logging.INFO, logger="mesh.pool"):
        pool.set_active_health(h, False, "3 failures in a row")
        pool.set_active_health(h, False)
        assert h.health == FAILED_ACTIVE_HC
        assert picks(pool, 20) == {"e0": 10, "e2": 10}
        pool.set_active_health(h, True)
        pool.set_active_health(h, True)
    assert h.health == 0
    assert changes == [2, 3]
    assert [r.getMessage() for r in caplog.records] == [
        "service web port 8080: endpoint e1 (10.0.0.2:8000) is now unhealthy by health check: 3 failures in a row",
        "service web port 8080: endpoint e1 (10.0.0.2:8000) is now healthy by health check",
    ]


def test_both_health_sources_must_clear():
    clock = Clock()
    pool = make_pool(n=3, clock=clock, consecutive_failures=1)
    h = pool.hosts[0]
    pool.set_active_health(h, False)
    fail(pool, h, 1)
    assert h.health == FAILED_ACTIVE_HC | EJECTED
    clock.now += 10
    pool.choose()
    assert h.health == FAILED_ACTIVE_HC and h not in pool.usable
    pool.set_active_health(h, True)
    assert h in pool.usable


@pytest.mark.parametrize(
    "n, unhealthy, threshold, panic, usable",
    [
        (4, 1, 50, False, 3),
        (4, 2, 50, False, 2),  # exactly 50 % healthy is not below the threshold
        (4, 3, 50, True, 4),
        (4, 4, 50, True, 4),
        (4, 3, 0, False, 1),  # 0 turns panic off
        (4, 4, 0, False, 0),
        (4, 1, 100, True, 4),
        (4, 0, 100, False, 4),
    ],
)
def test_panic_mode(n, unhealthy, threshold, panic, usable):
    pool = make_pool(n=n, panic_threshold=threshold)
    for h in pool.hosts[:unhealthy]:
        pool.set_active_health(h, False)
    assert pool.panic is panic
    assert len(pool.usable) == usable
    got = picks(pool, 40)
    if usable:
        assert sum(got.values()) == 40 and len(got) == usable
    else:
        assert got == {None: 40}
    assert ("PANIC" in repr(pool)) is panic


def test_panic_is_logged_once_each_way(caplog):
    pool = make_pool(n=4)
    with caplog.at_level(logging.INFO, logger="mesh.pool"):
        for h in pool.hosts[:3]:
            pool.set_active_health(h, False)
        pool.set_active_health(pool.hosts[3], False)  # still panic: no second panic line
        pool.set_active_health(pool.hosts[0], True)
        pool.set_active_health(pool.hosts[1], True)
    panic_lines = [r.getMessage() for r in caplog.records if "panic" in r.getMessage()]
    assert panic_lines == [
        "service web port 8080: panic mode, only 1 of 4 endpoints healthy; balancing over all of them",
        "service web port 8080: panic mode over",
    ]


def test_panic_ignores_draining_hosts():
    pool = Pool("web", Route(8080, endpoints(4, draining=(0, 1))), ServiceOptions(), rng=random.Random(1))
    pool.set_active_health(pool.hosts[2], False)  # 1 of 2 live healthy: 50 %, no panic
    assert not pool.panic
    assert picks(pool, 10) == {"e3": 10}
    pool.set_active_health(pool.hosts[3], False)  # 0 of 2: panic over the live ones only
    assert pool.panic
    assert picks(pool, 10) == {"e2": 5, "e3": 5}


# -- draining, exclude ------------------------------------------------------------------------------


def test_draining_hosts_get_no_new_connections_but_stay_listed():
    pool = Pool("web", Route(8080, endpoints(3, draining=(1,))), ServiceOptions(), rng=random.Random(1))
    assert [h.id for h in pool.hosts] == ["e0", "e1", "e2"]
    assert pool.hosts[1].draining
    assert picks(pool, 100) == {"e0": 50, "e2": 50}
    all_draining = Pool("web", Route(8080, endpoints(2, draining=(0, 1))), ServiceOptions())
    assert all_draining.choose() is None
    assert "live=0" in repr(all_draining)


@pytest.mark.parametrize("balance", ["round-robin", "least-conn", "p2c", "hash"])
def test_exclude_through_the_pool(balance):
    pool = make_pool(n=3, balance=balance)
    a, b, c = pool.hosts
    client = ("192.0.2.7", 5555)
    assert pool.choose(client, exclude=(a, b)) is c
    assert pool.choose(client, exclude=(a, b, c)) is None
    seen = {pool.choose(client, exclude={a}) for _ in range(30)}
    assert a not in seen and seen <= {b, c}


# -- locality -----------------------------------------------------------------------------------------


def local_remote_pool(locality="prefer") -> Pool:
    # e0, e1 local; e2, e3 reached through another node's agent
    return Pool(
        "web",
        Route(8080, endpoints(4, via=(2, 3))),
        ServiceOptions(locality=locality),
        rng=random.Random(1),
        local_node="n1",
    )


def test_locality_prefers_local_hosts():
    pool = local_remote_pool()
    assert [h.local for h in pool.hosts] == [True, True, False, False]
    assert picks(pool, 20) == {"e0": 10, "e1": 10}


def test_locality_spills_when_no_local_host_is_usable():
    pool = local_remote_pool()
    pool.set_active_health(pool.hosts[0], False)
    assert picks(pool, 20) == {"e1": 20}
    pool.set_active_health(pool.hosts[1], False)  # 2 of 4 healthy: no panic, remote only
    assert picks(pool, 20) == {"e2": 10, "e3": 10}


def test_locality_spills_when_the_connection_tried_every_local_host():
    pool = local_remote_pool()
    e0, e1, e2, e3 = pool.hosts
    assert pool.choose(None, exclude=(e0, e1)) is e2
    e2.active = 1  # the least loaded remote host gets the retry
    assert pool.choose(None, exclude=(e0, e1)) is e3
    assert pool.choose(None, exclude=(e0, e1, e3)) is e2
    assert pool.choose(None, exclude=pool.hosts) is None


def test_locality_spills_when_local_hosts_carry_more_than_their_share():
    pool = local_remote_pool()  # 2 local + 2 remote, weight 1 each
    e0, e1, e2, _e3 = pool.hosts
    # Light load stays local: below SPILL_SLACK (8) per local unit of weight nothing spills.
    e0.active = e1.active = 7
    assert picks(pool, 10) == {"e0": 5, "e1": 5}
    # 2 x 9 local, 0 remote: fair local share is 9, limit 2 x 9 + 16 = 34 > 18: still local.
    e0.active = e1.active = 9
    assert pool.choose() in (e0, e1)
    # 2 x 20 local, 1 remote: fair = 41 x 2/4 = 20.5, limit 57 > 40: local.
    e0.active = e1.active = 20
    e2.active = 1
    assert pool.choose() in (e0, e1)
    # One local host of weight 1 against three remote ones: its fair share is a quarter.
    heavy = Pool(
        "web",
        Route(8080, endpoints(4, via=(1, 2, 3))),
        ServiceOptions(locality="prefer"),
        rng=random.Random(1),
        local_node="n1",
    )
    h0, h1, h2, h3 = heavy.hosts
    assert [h.local for h in heavy.hosts] == [True, False, False, False]
    h0.active = 40  # fair local share 40 / 4 = 10, limit 2 x 10 + 8 = 28 < 40: spill
    h2.active = 1
    assert heavy.choose() is h1  # the least loaded remote host
    h1.active = 1
    assert heavy.choose() is h3
    h0.active = 20  # fair (20 + 2) / 4 = 5.5, limit 19 < 20: still spilling
    assert heavy.choose() is h3
    h0.active = 18  # limit (18 + 2) / 4 x 2 + 8 = 18: not over it, local again
    assert heavy.choose() is h0


def test_locality_is_ignored_in_panic_mode():
    pool = local_remote_pool()
    for h in pool.hosts[:3]:  # both local hosts and one remote fail: 1 of 4 healthy, panic
        pool.set_active_health(h, False)
    assert pool.panic
    assert picks(pool, 40) == {"e0": 10, "e1": 10, "e2": 10, "e3": 10}
    pool.set_active_health(pool.hosts[0], True)  # 2 of 4: panic over, the healthy local host wins
    assert not pool.panic
    assert picks(pool, 10) == {"e0": 10}


def test_locality_off_uses_every_host():
    pool = local_remote_pool("off")
    assert picks(pool, 40) == {"e0": 10, "e1": 10, "e2": 10, "e3": 10}


# -- update -------------------------------------------------------------------------------------------


def test_update_keeps_state_of_surviving_hosts_and_drops_removed_ones():
    clock = Clock()
    pool = make_pool(n=3, clock=clock, consecutive_failures=1)
    e0, e1, e2 = pool.hosts
    e0.active = 4
    e0.stats.connections = 17
    fail(pool, e1, 1)
    pool.set_active_health(e2, False)
    stats = pool.stats
    stats.accepted = 9
    changes = []
    pool.on_change.append(lambda p: changes.append([h.id for h in p.hosts]))

    new_eps = (
        replace(endpoints(3)[0], weight=5),  # e0: weight changes in place
        endpoints(3)[1],  # e1: unchanged
        Endpoint("e9", "10.0.0.9", 8000),  # new; e2 removed
    )
    pool.update(Route(8080, new_eps), replace(pool.options, balance="least-conn"))

    assert [h.id for h in pool.hosts] == ["e0", "e1", "e9"]
    assert pool.hosts[0] is e0 and pool.hosts[1] is e1
    assert (e0.active, e0.stats.connections, e0.weight, e0.endpoint.weight) == (4, 17, 5, 5)
    assert (e1.health, e1.ejections, e1.ejected_until) == (EJECTED, 1, 1010.0)
    assert e2.draining and e2 not in pool.hosts
    assert pool.stats is stats and stats.accepted == 9
    assert isinstance(pool.balancer, LeastConn)
    assert changes == [["e0", "e1", "e9"]]
    assert pool._next_expiry == 1010.0
    # least-conn over e0 (4 active / weight 5) and e9 (idle): e9
    assert pool.choose() is pool.hosts[2]


def test_update_same_key_new_state_drains_in_place():
    pool = make_pool(n=2)
    e0, e1 = pool.hosts
    pool.update(Route(8080, endpoints(2, draining=(0,))), pool.options)
    assert pool.hosts == (e0, e1) and e0.draining
    assert picks(pool, 4) == {"e1": 4}
    pool.update(Route(8080, endpoints(2)), pool.options)  # back to running (e.g. a cancelled stop)
    assert not e0.draining and picks(pool, 4) == {"e0": 2, "e1": 2}


def test_update_reused_address_is_a_new_host():
    pool = make_pool(n=1)
    old = pool.hosts[0]
    old.active = 1
    fail(pool, old, 2)
    replacement = Endpoint("other-task", old.address, old.port)
    pool.update(Route(8080, (replacement,)), pool.options)
    (new,) = pool.hosts
    assert new is not old and new.active == 0 and new.consecutive_failures == 0
    assert old.draining


def test_update_balance_change_keeps_hosts():
    pool = make_pool(n=2, balance="round-robin")
    hosts = pool.hosts
    assert isinstance(pool.balancer, RoundRobin)
    pool.update(pool.route, replace(pool.options, balance="hash"))
    assert pool.hosts == hosts and isinstance(pool.balancer, HashRing)
    same = pool.balancer
    pool.update(pool.route, replace(pool.options, retries=5))
    assert pool.balancer is same


def test_hash_through_the_pool_moves_only_the_ejected_hosts_clients():
    clock = Clock()
    pool = make_pool(n=5, clock=clock, balance="hash", consecutive_failures=1)
    clients = [(f"172.16.{i // 200}.{i % 200}", 1000 + i) for i in range(500)]
    before = {c: pool.choose(c) for c in clients}
    victim = pool.hosts[2]
    fail(pool, victim, 1)
    during = {c: pool.choose(c) for c in clients}
    moved = {c for c in clients if during[c] is not before[c]}
    assert moved == {c for c in clients if before[c] is victim} and moved
    assert victim not in during.values()
    clock.now += 10  # back from ejection: its clients come back to it
    assert {c: pool.choose(c) for c in clients} == before


def test_choose_does_not_rebuild_per_connection():
    pool = make_pool(n=3, balance="hash")
    preferred = pool._preferred
    for i in range(50):
        pool.choose((f"10.1.0.{i}", 1))
    assert pool._preferred is preferred and pool.balancer._hosts is preferred


def test_on_change_errors_are_logged_not_raised(caplog):
    pool = make_pool(n=2)

    def broken(_pool):
        raise RuntimeError("boom")

    pool.on_change.append(broken)
    with caplog.at_level(logging.ERROR, logger="mesh.pool"):
        pool.set_active_health(pool.hosts[0], False)
    assert pool.hosts[0].health == FAILED_ACTIVE_HC
    assert "on_change callback" in caplog.text


def test_reprs_reveal_state():
    clock = Clock()
    pool = Pool(
        "web",
        Route(8080, endpoints(3, via=(2,), draining=(1,))),
        ServiceOptions(consecutive_failures=1, max_ejection_percent=100),
        rng=random.Random(1),
        clock=clock,
    )
    e0, e1, e2 = pool.hosts
    e0.active = 2
    fail(pool, e0, 1)
    assert repr(e0) == (
        "<Host e0 10.0.0.1:8000 w=1 active=2 health=ejected fails=0 ejections=1 ejected_until=1010.000>"
    )
    assert repr(e1) == "<Host e1 10.0.0.2:8000 w=1 active=0 health=ok draining fails=0 ejections=0>"
    assert repr(e2) == "<Host e2 10.0.0.3:8000 via 198.18.0.2:7946 w=1 active=0 health=ok fails=0 ejections=0>"
    assert repr(pool) == "<Pool web:8080 balance=round-robin hosts=3 live=2 healthy=1 usable=1 preferred=1>"
