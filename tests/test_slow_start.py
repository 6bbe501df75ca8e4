"""Slow start (mesh/pool.py): a host that joins or recovers ramps from 10 % to its full share over
``slow_start`` seconds.  Fake clock, seeded rng: shares at the start, the middle and after the ramp, for
every balancer; the exact rule with a scripted rng; what does and does not ramp; and the same ramp with real
requests through the HTTP front."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from mesh.pool import SLOW_START_MIN, Pool
from mesh.routing import Endpoint, Route, RoutingTable, Service, ServiceOptions
from mesh.runtime import Mesh
from tests.httpbackend import Client, HttpBackend, response

WINDOW = 60.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def eps(n: int, *, draining=()) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(f"e{i}", f"10.0.0.{i + 1}", 8000, state="draining" if i in draining else "running") for i in range(n)
    )


def make_pool(n=3, *, clock=None, rng=None, **opts) -> Pool:
    opts.setdefault("slow_start", WINDOW)
    return Pool("web", Route(8080, eps(n)), ServiceOptions(**opts), rng=rng or random.Random(5), clock=clock or Clock())


def picks(pool: Pool, n: int, clients=None) -> Counter:
    if clients is None:
        return Counter(pool.choose().id for _ in range(n))
    return Counter(pool.choose(clients[i % len(clients)]).id for i in range(n))


def factor_at(t: float) -> float:
    return 1.0 if t >= WINDOW else SLOW_START_MIN + (1 - SLOW_START_MIN) * t / WINDOW


def expected_share(f: float, n: int) -> float:
    """The ramping host's share of picks among n equal idle hosts (pool docstring): f x its full share,
    for round robin, least-conn and p2c alike (what it turns down is re-picked by weight)."""
    return f / n


# -- shares over the ramp ------------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["round-robin", "least-conn", "p2c"])
@pytest.mark.parametrize("t", [0.0, WINDOW / 4, WINDOW / 2, WINDOW * 0.9, WINDOW, WINDOW * 2], ids=lambda t: f"t={t:g}")
def test_a_joining_host_ramps(balance, t):
    clock = Clock()
    pool = make_pool(3, clock=clock, balance=balance)
    pool.update(Route(8080, eps(4)), pool.options)  # e3 joins at 1000
    new = pool.hosts[3]
    clock.now += t
    f = factor_at(t)
    assert pool.slow_start_factor(new) == pytest.approx(f)
    n = 20000
    got = picks(pool, n)
    share = expected_share(f, 4)
    sigma = math.sqrt(n * share * (1 - share))
    assert abs(got["e3"] - n * share) <= 4 * sigma, (got, share)
    if t >= WINDOW:
        if balance != "p2c":
            assert got == {"e0": 5000, "e1": 5000, "e2": 5000, "e3": 5000}  # exactly as if it had never ramped
        assert pool.ramping == () and not pool._ramp  # the ended ramp was dropped
    else:
        assert pool.ramping == (new,)
        rest = (n - got["e3"]) / 3  # what it did not take is spread evenly, not handed to one neighbour
        for i in range(3):
            assert abs(got[f"e{i}"] - rest) <= 4 * math.sqrt(n / 3), got
        assert 0 < pool.stats.slow_start_deferred < n


def test_the_share_grows_as_the_clock_moves():
    clock = Clock()
    pool = make_pool(3, clock=clock)
    pool.update(Route(8080, eps(4)), pool.options)
    shares = []
    for step in range(7):
        clock.now = 1000.0 + step * WINDOW / 6
        shares.append(picks(pool, 4000)["e3"] / 4000)
    assert shares == sorted(shares) and shares[0] < 0.06 and shares[-1] == 0.25


@pytest.mark.parametrize(("t", "low", "high"), [(0.0, 0.05, 0.16), (WINDOW / 2, 0.45, 0.65), (WINDOW, 1.0, 1.0)])
def test_least_conn_does_not_flood_a_new_host(t, low, high):
    """Three hosts hold 100 connections each; a new one (0) would take every new connection until
    it caught up.  Slow start lets it take about ``factor`` of them."""
    clock = Clock()
    pool = make_pool(3, clock=clock, balance="least-conn")
    for h in pool.hosts:
        h.active = 100
    pool.update(Route(8080, eps(4)), pool.options)
    clock.now += t
    got = Counter()
    for _ in range(100):
        h = pool.choose()
        h.active += 1  # held
        got[h.id] += 1
    assert low <= got["e3"] / 100 <= high, got


def test_hash_does_not_ramp():
    clock = Clock()
    pool = make_pool(3, clock=clock, balance="hash")
    clients = [(f"192.0.2.{i}", 1) for i in range(200)]
    pool.update(Route(8080, eps(4)), pool.options)
    assert not pool._ramp and pool.slow_start_factor(pool.hosts[3]) == 1.0
    ref = make_pool(4, balance="hash")  # the same ring built at once: no host ramping
    assert {c: pool.choose(c).id for c in clients} == {c: ref.choose(c).id for c in clients}
    # ejection and recovery: its clients come back at once (affinity), no ramp
    host = pool.hosts[3]
    pool.set_active_health(host, False)
    pool.set_active_health(host, True)
    assert not pool._ramp and {c: pool.choose(c).id for c in clients} == {c: ref.choose(c).id for c in clients}


# -- the exact rule -------------------------------------------------------------------------------


class Scripted(random.Random):
    """random() answers from a script; everything else (round robin's start offset) is seeded."""

    def __init__(self, script) -> None:
        super().__init__(1)
        self.script = list(script)

    def random(self) -> float:
        return self.script.pop(0)

    def getrandbits(self, k: int) -> int:  # (defined, so randrange uses it rather than random())
        return super().getrandbits(k)


def test_the_rule_keep_with_probability_factor_else_one_repick():
    clock = Clock()
    rng = Scripted([])
    pool = make_pool(1, clock=clock, rng=rng)
    pool.update(Route(8080, eps(2)), pool.options)  # round robin e0, e1, e0, e1, ...; e1 ramps
    e0, e1 = pool.hosts
    clock.now += WINDOW / 2  # factor 0.55
    # e0: no draw.  e1: 0.549 < 0.55 keeps it.  e0.  e1: 0.551 turns it down; the re-pick draws
    # a weighted random slot of the schedule (0.2 -> slot 0: e0).
    rng.script = [0.549, 0.551, 0.2]
    assert [pool.choose() for _ in range(4)] == [e0, e1, e0, e0]
    assert rng.script == [] and pool.stats.slow_start_deferred == 1


def test_a_repick_may_be_another_ramping_host_and_draws_no_more():
    clock = Clock()
    rng = Scripted([])
    pool = make_pool(1, clock=clock, rng=rng)
    pool.update(Route(8080, eps(3)), pool.options)  # e1 and e2 ramp
    e0, e1, e2 = pool.hosts
    # e0.  e1 turned down (0.99); the re-pick's slot 1 is e1 itself (0.5), drawn again: slot 2, e2,
    # ramping too, taken as it is.  The cursor moved once: e2 turned down (0.99), re-picked e1 (0.5).
    rng.script = [0.99, 0.5, 0.9, 0.99, 0.5]
    assert [pool.choose() for _ in range(4)] == [e0, e2, e1, e0]
    assert rng.script == [] and pool.stats.slow_start_deferred == 2


def test_slow_start_never_refuses_the_only_host():
    clock = Clock()
    pool = make_pool(1, clock=clock)
    pool.update(Route(8080, eps(2, draining=(0,))), pool.options)  # e0 drains, e1 joins: the only one
    assert picks(pool, 100) == {"e1": 100}
    assert pool.stats.slow_start_deferred == 0


# -- what ramps ------------------------------------------------------------------------------------


def test_hosts_a_pool_starts_with_do_not_ramp_and_nothing_draws():
    a = make_pool(4, balance="p2c", rng=random.Random(9))
    b = make_pool(4, balance="p2c", rng=random.Random(9), slow_start=0.0)
    assert not a._ramp and a.ramping == ()
    assert [a.choose().id for _ in range(500)] == [b.choose().id for _ in range(500)]
    assert a._rng.getstate() == b._rng.getstate()
    rr = make_pool(4)
    assert picks(rr, 4000) == {"e0": 1000, "e1": 1000, "e2": 1000, "e3": 1000}


def test_slow_start_off_is_the_old_behaviour():
    clock = Clock()
    a = make_pool(3, clock=clock, slow_start=0.0, balance="p2c", consecutive_failures=1, rng=random.Random(3))
    b = make_pool(3, clock=clock, slow_start=0.0, balance="p2c", consecutive_failures=1, rng=random.Random(3))
    b.update(Route(8080, eps(4)), b.options)
    a.update(Route(8080, eps(4)), a.options)
    for p in (a, b):
        p.report_failure(p.hosts[0])
    clock.now += 10.0  # back from ejection
    assert [a.choose().id for _ in range(300)] == [b.choose().id for _ in range(300)]
    assert not a._ramp and a.stats.slow_start_deferred == 0
    state = a._rng.getstate()
    rr = make_pool(4, clock=clock, slow_start=0.0)
    rr.update(Route(8080, eps(5)), rr.options)
    assert picks(rr, 500) == {f"e{i}": 100 for i in range(5)}
    assert a._rng.getstate() == state


def test_recovery_after_an_ejection_ramps_from_when_it_ended():
    clock = Clock()
    pool = make_pool(4, clock=clock, consecutive_failures=1)
    e0 = pool.hosts[0]
    pool.report_failure(e0)  # ejected until 1010
    assert not pool._ramp
    clock.now = 1010.0 + WINDOW / 2
    pool.choose()  # the lazy expiry: the ramp began at 1010, so it is half way now
    assert pool.slow_start_factor(e0) == pytest.approx(factor_at(WINDOW / 2))
    n = 20000
    got = picks(pool, n)
    share = expected_share(factor_at(WINDOW / 2), 4)
    assert abs(got["e0"] - n * share) <= 4 * math.sqrt(n * share * (1 - share))
    clock.now = 1010.0 + WINDOW
    assert picks(pool, 4000) == {"e0": 1000, "e1": 1000, "e2": 1000, "e3": 1000}


def test_recovery_by_active_health_checks_ramps():
    clock = Clock()
    pool = make_pool(4, clock=clock)
    e1 = pool.hosts[1]
    pool.set_active_health(e1, False)
    assert picks(pool, 300)["e1"] == 0
    clock.now += 5
    pool.set_active_health(e1, True)
    assert pool.ramping == (e1,) and pool.slow_start_factor(e1) == pytest.approx(SLOW_START_MIN)
    assert picks(pool, 4000)["e1"] < 4000 * 0.06


def test_a_host_failing_both_checks_ramps_only_once_fully_healthy():
    clock = Clock()
    pool = make_pool(4, clock=clock, consecutive_failures=1)
    e0 = pool.hosts[0]
    pool.set_active_health(e0, False)
    pool.report_failure(e0)  # ejected too, until 1010
    clock.now = 1010.0
    pool.choose()  # un-ejected, still failing its checks: no ramp yet
    assert not pool._ramp
    clock.now = 1020.0
    pool.set_active_health(e0, True)
    assert pool._ramp == {e0: 1020.0}


def test_a_host_that_stops_draining_ramps_and_one_that_leaves_drops_its_ramp():
    clock = Clock()
    pool = Pool("web", Route(8080, eps(3, draining=(2,))), ServiceOptions(slow_start=WINDOW), clock=clock)
    e2 = pool.hosts[2]
    pool.update(Route(8080, eps(3)), pool.options)
    assert pool.ramping == (e2,)
    pool.update(Route(8080, eps(2)), pool.options)  # e2 removed
    assert not pool._ramp


@pytest.mark.parametrize("change", [{"slow_start": 0.0}, {"balance": "hash"}])
def test_turning_slow_start_off_or_to_hash_ends_the_ramps(change):
    clock = Clock()
    pool = make_pool(3, clock=clock)
    pool.update(Route(8080, eps(4)), pool.options)
    assert pool.ramping == (pool.hosts[3],)
    pool.update(Route(8080, eps(4)), ServiceOptions(**{"slow_start": WINDOW, **change}))
    assert not pool._ramp and pool.ramping == ()


def test_a_longer_window_in_an_update_stretches_running_ramps():
    clock = Clock()
    pool = make_pool(3, clock=clock)
    pool.update(Route(8080, eps(4)), pool.options)
    new = pool.hosts[3]
    clock.now += WINDOW  # would be over
    pool.update(Route(8080, eps(4)), ServiceOptions(slow_start=2 * WINDOW))
    assert pool.slow_start_factor(new) == pytest.approx(SLOW_START_MIN + (1 - SLOW_START_MIN) * 0.5)
    assert pool._ramp_end == 1000.0 + 2 * WINDOW


def test_repr_shows_ramping_hosts():
    pool = make_pool(3)
    pool.update(Route(8080, eps(4)), pool.options)
    assert repr(pool).endswith(" ramping=1>")


# -- through the HTTP front, with real traffic ----------------------------------------------------------


async def test_http_front_ramps_a_joining_replica_per_request():
    """Real requests on one keep-alive connection through the HTTP front (mesh.runtime.Mesh, protocol http) to
    four real backends: a replica that joins takes 10 % of its share at first (2.5 % of the requests with
    four), 55 % half way through the window, and exactly its share once the window is over; and the replica
    that answered each request is exactly the one the pool's own rule picks (a pure Pool with the same seed and
    clock): the front applies slow start per request, not per connection.  The pools' clock is a fake one (set
    by a ``Mesh.on_pool`` hook), so the 60 s window passes without a sleep."""

    def answer(name):
        return lambda conn, req: response(200, name.encode(), [("X-Backend", name)])

    backends = [await HttpBackend(f"e{i}", handler=answer(f"e{i}")).start() for i in range(4)]
    clock = Clock()
    options = ServiceOptions(slow_start=WINDOW)
    mesh = Mesh(rng=random.Random(11))
    mesh.on_pool.append(lambda pool: setattr(pool, "_clock", clock))  # Mesh passes no clock to Pool

    def table(version: int, n: int, port: int) -> RoutingTable:
        eps = tuple(Endpoint(f"e{i}", "127.0.0.1", b.port) for i, b in enumerate(backends[:n]))
        return RoutingTable(version, (Service("web", (Route(port, eps, "127.0.0.1", protocol="http"),), options),))

    # The reference draws from its rng exactly as the mesh's pools do: one pool for the listener on port 0,
    # one for the port it got, which then sees e3 join.
    ref_rng = random.Random(11)
    Pool("web", Route(8080, eps(3)), options, rng=ref_rng, clock=clock)
    ref = Pool("web", Route(8080, eps(3)), options, rng=ref_rng, clock=clock)
    try:
        await mesh.apply(table(1, 3, 0))
        port = mesh.listeners()[0].port
        await mesh.apply(table(2, 3, port))
        await mesh.apply(table(3, 4, port))  # e3 joins at 1000.0 on the fake clock
        ref.update(Route(8080, eps(4)), options)
        (lst,) = mesh.listeners()
        (binding,) = lst.bindings
        pool = binding.pool
        assert pool.ramping == (pool.hosts[3],) and pool.slow_start_factor(pool.hosts[3]) == SLOW_START_MIN

        async with Client(port) as client:

            async def run(n: int) -> list[str]:
                got = []
                for _ in range(n):
                    await client.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                    resp = await client.response()
                    assert resp.status == 200, resp.status_line
                    got.append(resp.value("x-backend"))
                return got

            for t, n in ((0.0, 2000), (WINDOW / 2, 2000), (WINDOW, 1200)):
                clock.now = 1000.0 + t
                got = await run(n)
                assert got == [ref.choose().id for _ in range(n)]  # the pool's rule, request by request
                share = expected_share(factor_at(t), 4)
                if t < WINDOW:
                    sigma = math.sqrt(n * share * (1 - share))
                    assert abs(got.count("e3") - n * share) <= 4 * sigma, (t, Counter(got))
                else:  # the ramp is over: round robin's exact turns
                    assert Counter(got) == {f"e{i}": n // 4 for i in range(4)}
                    assert pool.ramping == ()
        assert sum(len(b.requests) for b in backends) == 5200  # nothing retried, nothing else sent
        assert backends[3].connections >= 1 and pool.stats.slow_start_deferred == ref.stats.slow_start_deferred
    finally:
        await mesh.shutdown(1)
        for b in backends:
            await b.close()
