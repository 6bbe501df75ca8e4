"""Balancing algorithms: exact, table-driven, seeded."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.balancer import (
    IP_HASH_CACHE,
    MAX_SCHEDULE,
    RING_POINTS_PER_WEIGHT,
    HashRing,
    LeastConn,
    PowerOfTwo,
    RoundRobin,
    make_balancer,
    weighted_schedule,
)
from mesh.pool import Host
from mesh.routing import Endpoint

ALGOS = (RoundRobin, LeastConn, PowerOfTwo, HashRing)


def make_hosts(*weights: int, prefix: str = "h") -> tuple[Host, ...]:
    return tuple(Host(Endpoint(f"{prefix}{i}", "127.0.0.1", 9000 + i, weight=w)) for i, w in enumerate(weights))


def client_ips(n: int) -> list[tuple[str, int]]:
    return [(f"10.{i // 250}.{i % 250}.{(i * 7) % 250 + 1}", 40000 + i) for i in range(n)]


# -- the weighted schedule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, expected",
    [
        ((), ()),
        ((1,), (0,)),
        ((1, 1, 1), (0, 1, 2)),
        ((7, 7), (0, 1)),  # reduced by the gcd
        ((1, 2, 3), (2, 1, 0, 2, 1, 2)),
        ((2, 4, 6), (2, 1, 0, 2, 1, 2)),
        ((5, 1, 1), (0, 0, 0, 1, 2, 0, 0)),  # light hosts mid-cycle, not bunched at the end
        ((3, 1), (0, 0, 1, 0)),
        ((7, 3, 2), (0, 1, 0, 2, 0, 0, 1, 0, 2, 0, 1, 0)),
    ],
)
def test_weighted_schedule(weights, expected):
    assert weighted_schedule(weights) == expected


def test_weighted_schedule_exact_counts_for_large_weights():
    weights = (1000, 999, 998, 997, 1)
    sched = weighted_schedule(weights)
    assert [sched.count(i) for i in range(5)] == list(weights)


def test_weighted_schedule_scales_down_beyond_the_cap():
    weights = (1000, 1000, 1000, 1000, 999, 1)
    sched = weighted_schedule(weights)
    counts = [sched.count(i) for i in range(6)]
    assert len(sched) <= MAX_SCHEDULE
    assert counts == [819, 819, 819, 819, 818, 1]  # w * 4096 // 4999, at least 1


@pytest.mark.parametrize("bad", [(0,), (1, -2), (1.5,)])
def test_weighted_schedule_rejects_bad_weights(bad):
    with pytest.raises(ValueError, match="weights must be positive integers"):
        weighted_schedule(bad)


def test_make_balancer_names_and_unknown():
    for cls in ALGOS:
        assert type(make_balancer(cls.name, random.Random(1))) is cls
    with pytest.raises(ValueError, match=r"unknown balance algorithm 'random'.*round-robin"):
        make_balancer("random")


# -- common behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALGOS)
def test_empty_and_fully_excluded_give_none(cls):
    b = cls(random.Random(1))
    assert b.pick(()) is None
    assert b.pick((), ("10.0.0.1", 1)) is None
    hosts = make_hosts(1, 2, 3)
    assert b.pick(hosts, ("10.0.0.1", 1), exclude=set(hosts)) is None
    assert b.pick(hosts, None, exclude=hosts) is None


@pytest.mark.parametrize("cls", ALGOS)
def test_exclude_is_honoured(cls):
    b = cls(random.Random(3))
    hosts = make_hosts(1, 2, 3)
    for excluded in ({hosts[0]}, {hosts[2]}, {hosts[0], hosts[2]}):
        seen = Counter(b.pick(hosts, client, excluded) for client in client_ips(200))
        assert not set(seen) & excluded
        assert set(seen) == set(hosts) - excluded, seen


@pytest.mark.parametrize("cls", ALGOS)
def test_rebuild_only_when_the_tuple_changes(cls):
    b = cls(random.Random(1))
    hosts = make_hosts(1, 1)
    b.pick(hosts, ("10.0.0.1", 1))
    built_for = b._hosts
    for client in client_ips(20):
        b.pick(hosts, client)
    assert b._hosts is built_for is hosts
    other = make_hosts(1, 1, 1)
    assert b.pick(other, ("10.0.0.1", 1)) in other
    assert b._hosts is other


# -- repick (slow start's second pick) ----------------------------------------------------------------


@pytest.mark.parametrize("cls", (RoundRobin, LeastConn, PowerOfTwo))
@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (1, 2, 3, 1)])
def test_repick_spreads_over_the_others_by_weight(cls, weights):
    """What a turned-down host does not take goes to the others in proportion to their weights, not to
    its neighbour in a schedule; idle hosts, so least-conn is all ties."""
    b = cls(random.Random(11))
    hosts = make_hosts(*weights)
    out = hosts[-1]
    b.pick(hosts)  # (the cursor's first placement)
    n = 12000
    got = Counter(b.repick(hosts, None, (out,)) for _ in range(n))
    assert out not in got
    total = sum(weights[:-1])
    for h, w in zip(hosts[:-1], weights[:-1], strict=True):
        share = w / total
        assert abs(got[h] - n * share) <= 4 * (n * share * (1 - share)) ** 0.5, (got, h)


@pytest.mark.parametrize("cls", (RoundRobin, LeastConn))
def test_repick_does_not_move_the_cursor(cls):
    a, b = cls(random.Random(2)), cls(random.Random(2))
    hosts = make_hosts(1, 1, 1)
    first = [a.pick(hosts), b.pick(hosts)]
    assert first[0] is first[1]
    for _ in range(5):
        b.repick(hosts, None, (hosts[0],))
    assert [a.pick(hosts) for _ in range(6)] == [b.pick(hosts) for _ in range(6)]


@pytest.mark.parametrize("cls", ALGOS)
def test_repick_with_everything_excluded_gives_none(cls):
    b = cls(random.Random(1))
    hosts = make_hosts(1, 2)
    assert b.repick(hosts, None, hosts) is None
    assert b.repick((), None, (hosts[0],)) is None


# -- round robin ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, picks, expected",
    [
        ((1, 1, 1), 300, [100, 100, 100]),
        ((1, 2, 3), 600, [100, 200, 300]),
        ((5, 1, 1), 70, [50, 10, 10]),
        ((1,), 5, [5]),
    ],
)
def test_round_robin_exact_distribution(weights, picks, expected):
    hosts = make_hosts(*weights)
    b = RoundRobin(random.Random(7))
    seq = [b.pick(hosts) for _ in range(picks)]
    assert [seq.count(h) for h in hosts] == expected
    # every window of one full cycle holds exact proportions, wherever it starts
    cycle = sum(weights)
    for start in range(cycle):
        window = seq[start : start + cycle]
        assert [window.count(h) for h in hosts] == list(weights)


def test_round_robin_random_start_offset_differs_between_rngs():
    hosts = make_hosts(1, 1, 1)

    def first_three(seed):
        b = RoundRobin(random.Random(seed))
        return [hosts.index(b.pick(hosts)) for _ in range(3)]

    assert first_three(0) == [1, 2, 0]
    assert first_three(1) == [0, 1, 2]
    assert first_three(5) == [2, 0, 1]
    assert first_three(1) == first_three(1)


def test_round_robin_keeps_its_position_across_rebuilds():
    hosts = make_hosts(1, 1, 1, 1)
    b = RoundRobin(random.Random(1))  # starts at 1
    assert [hosts.index(b.pick(hosts)) for _ in range(2)] == [1, 2]
    fewer = hosts[:3]  # host 3 ejected: the position (3) continues modulo the new cycle
    assert [fewer.index(b.pick(fewer)) for _ in range(4)] == [0, 1, 2, 0]


def test_round_robin_exclude_continues_the_cycle():
    hosts = make_hosts(1, 1, 1)
    b = RoundRobin(random.Random(1))  # starts at 0
    assert b.pick(hosts, exclude={hosts[0]}) is hosts[1]
    assert b.pick(hosts) is hosts[2]
    assert b.pick(hosts) is hosts[0]


# -- least-conn -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, active, expected",
    [
        ((1, 1, 1), (3, 1, 2), 1),
        ((1, 1, 1), (0, 5, 5), 0),
        ((1, 2, 1), (2, 3, 2), 1),  # 3/2 < 2/1
        ((1, 3, 1), (1, 4, 2), 0),  # 1/1 < 4/3 < 2/1
        ((10, 1), (19, 2), 0),  # 1.9 < 2
        ((1, 1000), (1, 999), 1),
    ],
)
def test_least_conn_picks_the_minimum(weights, active, expected):
    hosts = make_hosts(*weights)
    for h, a in zip(hosts, active, strict=True):
        h.active = a
    for seed in range(5):  # whatever the start offset
        assert LeastConn(random.Random(seed)).pick(hosts) is hosts[expected]


def test_least_conn_ties_follow_weighted_round_robin():
    hosts = make_hosts(1, 2, 3)  # all idle: every pick is a tie
    b = LeastConn(random.Random(1))
    seq = [b.pick(hosts) for _ in range(600)]
    assert [seq.count(h) for h in hosts] == [100, 200, 300]


def test_least_conn_held_connections_follow_weights():
    hosts = make_hosts(1, 2, 3)
    b = LeastConn(random.Random(1))
    for _ in range(60):
        b.pick(hosts).active += 1
    assert [h.active for h in hosts] == [10, 20, 30]


def test_least_conn_exclude_takes_the_next_lightest():
    hosts = make_hosts(1, 1, 1)
    for h, a in zip(hosts, (0, 1, 2), strict=True):
        h.active = a
    b = LeastConn(random.Random(1))
    assert b.pick(hosts, exclude={hosts[0]}) is hosts[1]
    assert b.pick(hosts, exclude={hosts[0], hosts[1]}) is hosts[2]


# -- p2c --------------------------------------------------------------------------------------------


def test_p2c_prefers_the_lighter_of_two():
    hosts = make_hosts(1, 1)  # two hosts: the two candidates are always both
    hosts[0].active = 5
    b = PowerOfTwo(random.Random(1))
    assert {b.pick(hosts) for _ in range(50)} == {hosts[1]}
    weighted = make_hosts(1, 3)
    weighted[0].active, weighted[1].active = 1, 2  # 1/1 vs 2/3
    bw = PowerOfTwo(random.Random(2))
    assert {bw.pick(weighted) for _ in range(50)} == {weighted[1]}


def test_p2c_never_picks_the_heaviest_of_three():
    hosts = make_hosts(1, 1, 1)
    for h, a in zip(hosts, (0, 1, 9), strict=True):
        h.active = a
    b = PowerOfTwo(random.Random(4))
    seen = Counter(b.pick(hosts) for _ in range(3000))
    assert hosts[2] not in seen
    # host 0 wins whenever drawn (2 of 3 pairs), host 1 only against host 2 (1 of 3)
    assert seen == {hosts[0]: 1979, hosts[1]: 1021}


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (1, 2, 3), (10, 1)])
def test_p2c_idle_distribution_follows_weights(weights):
    hosts = make_hosts(*weights)
    b = PowerOfTwo(random.Random(11))
    n = 12000
    seen = Counter(b.pick(hosts) for _ in range(n))
    total = sum(weights)
    for h, w in zip(hosts, weights, strict=True):
        # idle hosts tie, the first candidate wins: a weighted random choice
        assert abs(seen[h] / n - w / total) < 0.02, (seen, weights)


def test_p2c_held_connections_follow_weights():
    hosts = make_hosts(1, 2, 3)
    b = PowerOfTwo(random.Random(5))
    for _ in range(600):
        b.pick(hosts).active += 1
    assert [h.active for h in hosts] == [100, 200, 300]


def test_p2c_is_reproducible_with_a_seed():
    hosts = make_hosts(1, 2, 3, 4)
    a = PowerOfTwo(random.Random(9))
    b = PowerOfTwo(random.Random(9))
    assert [hosts.index(a.pick(hosts)) for _ in range(50)] == [hosts.index(b.pick(hosts)) for _ in range(50)]


# -- hash -------------------------------------------------------------------------------------------


def test_hash_same_client_same_host_and_port_ignored():
    hosts = make_hosts(1, 1, 1, 1)
    b = HashRing(random.Random(1))
    for ip, port in client_ips(100):
        first = b.pick(hosts, (ip, port))
        assert all(b.pick(hosts, (ip, p)) is first for p in (1, 2, 65535))


def test_hash_ip_cache_is_bounded_and_transparent():
    hosts = make_hosts(1, 1, 1)
    b = HashRing(random.Random(1))
    clients = client_ips(IP_HASH_CACHE + 500)
    first = [b.pick(hosts, c) for c in clients]
    assert len(b._ip_hashes) <= IP_HASH_CACHE
    assert [b.pick(hosts, c) for c in clients] == first
    uncached = HashRing(random.Random(1))
    assert [uncached.pick(hosts, c) for c in clients[:50]] == first[:50]


def test_hash_is_the_same_in_every_process():
    # the ring depends only on endpoint ids and weights, never on the rng or hash seed
    hosts = make_hosts(1, 2, 3)
    a, b = HashRing(random.Random(1)), HashRing(random.Random(2))
    clients = client_ips(300)
    assert [a.pick(hosts, c) for c in clients] == [b.pick(hosts, c) for c in clients]
    twin = make_hosts(1, 2, 3)  # other Host objects for the same endpoints
    assert [hosts.index(a.pick(hosts, c)) for c in clients] == [twin.index(b.pick(twin, c)) for c in clients]


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (1, 2, 3), (1, 4)])
def test_hash_distribution_follows_weights(weights):
    hosts = make_hosts(*weights)
    b = HashRing(random.Random(1))
    clients = client_ips(1000)
    seen = Counter(b.pick(hosts, c) for c in clients)
    total = sum(weights)
    for h, w in zip(hosts, weights, strict=True):
        share = seen[h] / len(clients)
        assert abs(share - w / total) < 0.25 * w / total + 0.02, (seen, weights)


@pytest.mark.parametrize("removed", [0, 2, 4])
def test_hash_removing_one_host_moves_only_its_clients(removed):
    hosts = make_hosts(1, 2, 1, 3, 1)
    b = HashRing(random.Random(1))
    clients = client_ips(1000)
    before = {c: b.pick(hosts, c) for c in clients}
    rest = tuple(h for i, h in enumerate(hosts) if i != removed)
    after = {c: b.pick(rest, c) for c in clients}
    moved = [c for c in clients if after[c] is not before[c]]
    assert moved, "the removed host had no clients: a useless test"
    assert all(before[c] is hosts[removed] for c in moved)
    assert all(after[c] is before[c] for c in clients if before[c] is not hosts[removed])
    # a retry that excludes the host goes exactly where its removal would send the client
    assert all(b.pick(hosts, c, {hosts[removed]}) is after[c] for c in clients)
    # skipping the host on the big ring is the same as a ring built without it
    fresh = HashRing(random.Random(2))
    assert all(fresh.pick(rest, c) is after[c] for c in clients)
    assert len(fresh._keys) < len(b._keys)


def test_hash_weight_increase_only_moves_clients_to_that_host():
    hosts = make_hosts(1, 1, 1)
    b = HashRing(random.Random(1))
    clients = client_ips(1000)
    before = [hosts.index(b.pick(hosts, c)) for c in clients]
    heavier = (*hosts[:2], Host(Endpoint("h2", "127.0.0.1", 9002, weight=3)))
    after = [heavier.index(b.pick(heavier, c)) for c in clients]
    assert sum(x != y for x, y in zip(before, after, strict=True)) > 100
    assert all(x == y or y == 2 for x, y in zip(before, after, strict=True))


def test_hash_without_client_is_weighted_round_robin():
    hosts = make_hosts(1, 2, 3)
    b = HashRing(random.Random(1))
    seq = [b.pick(hosts, None) for _ in range(60)]
    assert [seq.count(h) for h in hosts] == [10, 20, 30]


def test_hash_ring_size():
    hosts = make_hosts(1, 2)
    b = HashRing(random.Random(1))
    b.rebuild(hosts)
    assert len(b._keys) == 3 * RING_POINTS_PER_WEIGHT
    assert repr(b) == "<HashRing hosts=2 ring_hosts=2 points=480>"
    b.set_universe(make_hosts(1, 2, 3, prefix="x"))  # the pool's whole set: hosts outside it force a rebuild
    b.pick(hosts, ("10.0.0.1", 1))
    assert len(b._keys) == 3 * RING_POINTS_PER_WEIGHT
