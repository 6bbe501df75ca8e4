"""Load-balancing algorithms over precomputed tuples of hosts.

Rules every balancer follows:

- The pool hands ``pick()`` the same tuple object until the set of usable hosts
  (or one of their weights) changes.  A balancer rebuilds its precomputed state
  (weighted schedule, hash ring, cumulative weights) only when it sees a tuple
  it did not build for -- one identity compare per pick, never a rebuild per
  connection.
- ``pick()`` never awaits and never raises: an empty tuple, or every host in
  ``exclude``, gives ``None``.  ``exclude`` (hosts this connection already
  tried) is checked only when it is non-empty, so the common path does not pay
  for it; with ``exclude`` a balancer may fall back to scanning.
- Weights are respected by every algorithm.  Loads are compared as
  ``active / weight`` by cross-multiplying, so no float division per pick.
- Randomness comes only from the injected ``random.Random``, so a seeded rng
  gives a reproducible sequence of picks.
- ``repick(hosts, client, exclude)`` is the pool's second pick when slow start
  turned down a ramping host (``mesh.pool``; ``exclude`` then holds it): what
  the ramping host does not take must spread over the others by weight, not go
  to one of them.  ``pick`` does that for p2c (a new random pair).  Round robin
  would hand it to the host after it in the schedule, so it draws a weighted
  random slot instead; least-conn takes the least loaded, ties broken from a
  weighted random place instead of the cursor.  Neither moves the cursor.

Algorithms (``ServiceOptions.balance``):

``round-robin``
    An expanded, smoothly interleaved schedule (earliest-deadline-first over
    ``(k - 1/2) / weight``) in which each host appears ``weight / gcd`` times.  The
    position starts at a random offset the first time there are hosts, so
    processes and nodes that receive the same table at the same moment do not
    move in lock step.  O(1) per pick.
``least-conn``
    The host with the fewest ``active / weight``.  Ties are broken by starting
    the scan at the next host of the weighted round-robin schedule, so an idle
    pool (all ties) is spread exactly like weighted round robin.  O(n) per pick:
    the proxy changes ``host.active`` directly, so an exact minimum needs a
    look at every host; for very large pools use ``p2c``.
``p2c``
    Power of two choices: two distinct hosts drawn at random in proportion to
    their weights; the one with the lower ``active / weight`` wins (the first
    drawn on a tie).  O(1) unweighted, O(log n) weighted.
``hash``
    Consistent hashing of the client IP (the port is ignored) on a ring with
    virtual nodes, ``RING_POINTS_PER_WEIGHT`` points per unit of weight.  A ring
    rather than Maglev because it gives an exact guarantee: removing (or
    ejecting) one host moves only the clients that were on it; Maglev moves a
    few others too.  All processes and nodes compute the same ring (blake2b of
    the endpoint id, never Python's per-process ``hash()``).  Without a client
    address it falls back to weighted round robin, so anonymous connections do
    not all land on one host.  O(log n) per pick.
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Sequence
from hashlib import blake2b
from heapq import heapify, heapreplace
from itertools import accumulate
from math import gcd
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.host import Host

__all__ = [
    "BALANCER_CLASSES",
    "IP_HASH_CACHE",
    "MAX_RING_POINTS",
    "MAX_SCHEDULE",
    "RING_POINTS_PER_WEIGHT",
    "Balancer",
    "HashRing",
    "LeastConn",
    "PowerOfTwo",
    "RoundRobin",
    "make_balancer",
    "weighted_schedule",
]

# A schedule longer than this is scaled down (weights then hold approximately).
MAX_SCHEDULE = 4096
# Ring points: enough per host that shares stay within a few percent of the weights.
RING_POINTS_PER_WEIGHT = 160
MAX_RING_POINTS = 1 << 16
IP_HASH_CACHE = 8192

Client = tuple[str, int] | None


def weighted_schedule(weights: Sequence[int]) -> tuple[int, ...]:
    """Indexes into ``weights``, index i appearing ``weights[i] / gcd`` times, smoothly interleaved.

    Earliest deadline first: the k-th turn of host i is due in the middle of its
    k-th share, at ``(k - 1/2) / w_i``; ties go to the lower index.  Weights 5, 1, 1
    give ``(0, 0, 0, 1, 2, 0, 0)``: the light hosts land mid-cycle, not at its end.  When the
    reduced weights sum to more than ``MAX_SCHEDULE`` they are scaled down (at
    least one turn each), so proportions then hold only approximately.
    """
    n = len(weights)
    if n == 0:
        return ()
    for w in weights:
        if not isinstance(w, int) or w < 1:
            raise ValueError(f"weights must be positive integers, got {w!r}")
    g = gcd(*weights)
    ws = [w // g for w in weights]
    total = sum(ws)
    if total == n:
        return tuple(range(n))
    if total > MAX_SCHEDULE:
        ws = [max(1, w * MAX_SCHEDULE // total) for w in ws]
        total = sum(ws)
    # (deadline, index, turn).  Deadlines are computed, not accumulated: every turn
    # k <= w is due before 1.0 and turn w + 1 after it, so one cycle of ``total``
    # pops gives each host exactly its w turns.
    heap = [(0.5 / w, i, 1) for i, w in enumerate(ws)]
    heapify(heap)
    out = []
    for _ in range(total):
        _, i, k = heap[0]
        out.append(i)
        heapreplace(heap, ((k + 0.5) / ws[i], i, k + 1))
    return tuple(out)


def _hash64(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big")


def _lighter(a: Host, b: Host) -> bool:
    """True when ``a`` carries strictly less ``active / weight`` than ``b``."""
    return a.active * b.weight < b.active * a.weight


class Balancer:
    """Base class: ``pick(hosts, client, exclude)`` over a tuple prepared by the pool."""

    name = ""
    __slots__ = ("_hosts", "_rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._hosts: tuple[Host, ...] | None = None

    def pick(self, hosts: tuple[Host, ...], client: Client = None, exclude: Collection[Host] = ()) -> Host | None:
        """Choose one host of ``hosts`` not in ``exclude``; ``None`` when there is none."""
        raise NotImplementedError

    def repick(self, hosts: tuple[Host, ...], client: Client, exclude: Collection[Host]) -> Host | None:
        """A second pick after slow start turned one down (module docstring); ``pick`` by default."""
        return self.pick(hosts, client, exclude)

    def rebuild(self, hosts: tuple[Host, ...]) -> None:
        """Precompute for ``hosts`` (called when the pool's tuple changes; also done lazily by pick)."""
        self._hosts = hosts

    def set_universe(self, hosts: tuple[Host, ...]) -> None:
        """Every host the pool may pass to ``pick()`` until the next table update (a hint).

        Called by the pool on creation and on every ``update()`` (weights may have
        changed in place).  Balancers that can precompute over the whole set, so a
        health flip costs less, use it; the others ignore it.
        """

    def __repr__(self) -> str:
        n = -1 if self._hosts is None else len(self._hosts)
        return f"<{type(self).__name__} hosts={n}>"


class _Scheduled(Balancer):
    """A balancer that walks a weighted schedule with a cursor (``_next``)."""

    __slots__ = ("_next", "_started")

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._next = 0
        self._started = False

    def _place_cursor(self, n: int) -> None:
        """After a rebuild to a schedule of ``n`` slots: a random start the first time (nodes that
        receive the same table at the same moment do not move in lock step), the same place after."""
        if not n:
            return
        if not self._started:
            self._started = True
            self._next = self._rng.randrange(n)
        else:
            self._next %= n


class RoundRobin(_Scheduled):
    """Weighted round robin over an expanded schedule, random start offset.  See the module docstring."""

    name = "round-robin"
    __slots__ = ("_schedule",)

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._schedule: tuple[Host, ...] = ()

    def rebuild(self, hosts: tuple[Host, ...]) -> None:
        self._hosts = hosts
        self._schedule = tuple(hosts[i] for i in weighted_schedule([h.weight for h in hosts]))
        self._place_cursor(len(self._schedule))

    def pick(self, hosts: tuple[Host, ...], client: Client = None, exclude: Collection[Host] = ()) -> Host | None:
        if hosts is not self._hosts:
            self.rebuild(hosts)
        sched = self._schedule
        n = len(sched)
        if not n:
            return None
        i = self._next
        host = sched[i]
        i += 1
        self._next = 0 if i == n else i
        if exclude and host in exclude:
            return self._scan(exclude)
        return host

    def repick(self, hosts: tuple[Host, ...], client: Client, exclude: Collection[Host]) -> Host | None:
        # A weighted random slot (a few draws), not the next one: the turned-down share spreads.
        if hosts is not self._hosts:
            self.rebuild(hosts)
        sched = self._schedule
        n = len(sched)
        if not n:
            return None
        rand = self._rng.random
        for _ in range(4):
            host = sched[int(rand() * n)]
            if host not in exclude:
                return host
        return self._scan_from(int(rand() * n), exclude)

    def _scan(self, exclude: Collection[Host]) -> Host | None:
        sched = self._schedule
        n = len(sched)
        i = self._next
        for _ in range(n - 1):
            host = sched[i]
            i = 0 if i + 1 == n else i + 1
            if host not in exclude:
                self._next = i
                return host
        return None

    def _scan_from(self, i: int, exclude: Collection[Host]) -> Host | None:
        """The first host of the schedule from slot ``i`` on that is not in ``exclude`` (no cursor move)."""
        sched = self._schedule
        n = len(sched)
        for _ in range(n):
            host = sched[i]
            if host not in exclude:
                return host
            i = 0 if i + 1 == n else i + 1
        return None

    def __repr__(self) -> str:
        return f"<RoundRobin hosts={len(self._hosts or ())} schedule={len(self._schedule)} next={self._next}>"


class LeastConn(_Scheduled):
    """Fewest ``active / weight``; ties follow the weighted round-robin schedule."""

    name = "least-conn"
    __slots__ = ("_order",)

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._order: tuple[int, ...] = ()

    def rebuild(self, hosts: tuple[Host, ...]) -> None:
        self._hosts = hosts
        self._order = weighted_schedule([h.weight for h in hosts])
        self._place_cursor(len(self._order))

    def pick(self, hosts: tuple[Host, ...], client: Client = None, exclude: Collection[Host] = ()) -> Host | None:
        if hosts is not self._hosts:
            self.rebuild(hosts)
        n = len(hosts)
        if not n:
            return None
        order = self._order
        i = self._next
        start = order[i]
        i += 1
        self._next = 0 if i == len(order) else i
        best = None
        # Scan from the schedule's host to the end, then wrap: the first host of the
        # minimal load wins, so ties rotate in weighted round-robin order.
        for j in range(start, start + n):
            host = hosts[j if j < n else j - n]
            if exclude and host in exclude:
                continue
            if best is None or _lighter(host, best):
                best = host
                if not host.active:
                    break  # nothing is lighter than idle
        return best

    def repick(self, hosts: tuple[Host, ...], client: Client, exclude: Collection[Host]) -> Host | None:
        # Ties from a weighted random place, not the cursor's (whose next host would take them all).
        if hosts is not self._hosts:
            self.rebuild(hosts)
        if not hosts:
            return None
        order = self._order
        rand = self._rng.random
        for _ in range(4):  # a start that is not excluded, or its excluded slot would pass ties to its neighbour
            start = order[int(rand() * len(order))]
            if hosts[start] not in exclude:
                break
        return self._lightest(hosts, start, exclude)

    @staticmethod
    def _lightest(hosts: tuple[Host, ...], start: int, exclude: Collection[Host]) -> Host | None:
        """``pick``'s scan (inlined there), from index ``start``."""
        n = len(hosts)
        best = None
        for j in range(start, start + n):
            host = hosts[j if j < n else j - n]
            if exclude and host in exclude:
                continue
            if best is None or _lighter(host, best):
                best = host
                if not host.active:
                    break  # nothing is lighter than idle
        return best


class PowerOfTwo(Balancer):
    """Power of two choices: two distinct weighted-random hosts, the lighter one wins."""

    name = "p2c"
    __slots__ = ("_cum", "_total")

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._cum: list[int] | None = None  # None: all weights equal, sample uniformly
        self._total = 0

    def rebuild(self, hosts: tuple[Host, ...]) -> None:
        self._hosts = hosts
        weights = [h.weight for h in hosts]
        if weights and min(weights) != max(weights):
            self._cum = list(accumulate(weights))
            self._total = self._cum[-1]
        else:
            self._cum = None
            self._total = len(weights)

    def _draw(self) -> int:
        return bisect_right(self._cum, self._rng.random() * self._total)

    def pick(self, hosts: tuple[Host, ...], client: Client = None, exclude: Collection[Host] = ()) -> Host | None:
        if hosts is not self._hosts:
            self.rebuild(hosts)
        n = len(hosts)
        if n <= 1:
            if n == 0 or (exclude and hosts[0] in exclude):
                return None
            return hosts[0]
        if self._cum is None:
            # int(random() * n) rather than randrange(): a third of the cost, and the
            # bias (n / 2**53) is far below anything a balancer could notice.
            rand = self._rng.random
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            if j >= i:
                j += 1
        else:
            i = self._draw()
            # A few redraws make the two candidates distinct with overwhelming
            # probability even when one host carries most of the weight.
            for _ in range(4):
                j = self._draw()
                if j != i:
                    break
            else:
                j = i + 1 if i + 1 < n else 0
        a = hosts[i]
        b = hosts[j]
        if exclude:
            a_out = a in exclude
            b_out = b in exclude
            if a_out and b_out:
                return self._scan(hosts, exclude)
            if a_out:
                return b
            if b_out:
                return a
        return b if _lighter(b, a) else a

    @staticmethod
    def _scan(hosts: tuple[Host, ...], exclude: Collection[Host]) -> Host | None:
        best = None
        for host in hosts:
            if host not in exclude and (best is None or _lighter(host, best)):
                best = host
        return best


class HashRing(Balancer):
    """Consistent hashing of the client IP on a ring with virtual nodes; round robin without a client.

    The ring is built over the pool's whole host set (``set_universe``, on table
    updates) and a pick walks clockwise past hosts that are not in the tuple it
    was given (unhealthy, ejected, draining, excluded).  That gives exactly the
    mapping a ring built over the usable hosts alone would give, while a health
    flip costs a set build instead of re-sorting every ring point.
    """

    name = "hash"
    __slots__ = ("_ip_hashes", "_keys", "_member", "_owners", "_partial", "_points", "_ring_hosts", "_rr")

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._keys: list[int] = []
        self._owners: list[Host] = []
        self._ring_hosts: frozenset[Host] = frozenset()
        self._member: frozenset[Host] = frozenset()
        self._partial = False  # True when the ring holds hosts that pick() must skip
        self._points: dict[tuple[str, int], list[int]] = {}  # (endpoint id, count) -> ring points
        # Client IP -> ring position: clients repeat, and a dict hit is ~10x cheaper
        # than blake2b.  Cleared when full, so memory stays bounded under a scan.
        self._ip_hashes: dict[str, int] = {}
        self._rr = RoundRobin(self._rng)

    def _host_points(self, ident: str, count: int) -> list[int]:
        pts = self._points.get((ident, count))
        if pts is None:
            pts = [_hash64(f"{ident}#{k}") for k in range(count)]
            self._points[(ident, count)] = pts
        return pts

    def set_universe(self, hosts: tuple[Host, ...]) -> None:
        self._build_ring(hosts)
        self._hosts = None  # re-derive the members at the next rebuild/pick

    def _build_ring(self, hosts: tuple[Host, ...]) -> None:
        total_weight = sum(h.weight for h in hosts)
        per_weight = RING_POINTS_PER_WEIGHT
        if total_weight * per_weight > MAX_RING_POINTS:
            # Approximate beyond the cap: the point count then depends on the whole
            # set, so a removal may move a few other clients too.
            per_weight = max(1, MAX_RING_POINTS // total_weight)
        if len(self._points) > 4 * len(hosts) + 64:
            self._points.clear()  # bound the cache of departed hosts' points
        # Sort packed ints (point << 20 | host index): much faster than sorting tuples.
        ring = []
        for idx, host in enumerate(hosts):
            ring.extend((p << 20) | idx for p in self._host_points(host.endpoint.id, host.weight * per_weight))
        ring.sort()
        mask = (1 << 20) - 1
        self._keys = [x >> 20 for x in ring]
        self._owners = [hosts[x & mask] for x in ring]
        self._ring_hosts = frozenset(hosts)

    def rebuild(self, hosts: tuple[Host, ...]) -> None:
        self._hosts = hosts
        self._rr.rebuild(hosts)
        if not self._ring_hosts.issuperset(hosts):
            self._build_ring(hosts)  # used without a pool, or a host the ring has not seen
        self._member = frozenset(hosts)
        self._partial = len(self._member) != len(self._ring_hosts)

    def pick(self, hosts: tuple[Host, ...], client: Client = None, exclude: Collection[Host] = ()) -> Host | None:
        if hosts is not self._hosts:
            self.rebuild(hosts)
        if client is None:
            return self._rr.pick(hosts, None, exclude)
        keys = self._keys
        n = len(keys)
        if not n or not hosts:
            return None
        ip = client[0]
        point = self._ip_hashes.get(ip)
        if point is None:
            if len(self._ip_hashes) >= IP_HASH_CACHE:
                self._ip_hashes.clear()
            point = self._ip_hashes[ip] = _hash64(ip)
        i = bisect_left(keys, point)
        if i == n:
            i = 0
        owners = self._owners
        host = owners[i]
        if self._partial or exclude:
            # Walk clockwise: the next usable host on the ring is where this client
            # goes while its own host is out, so retries stay consistent too.
            member = self._member
            for _ in range(n - 1):
                if host in member and not (exclude and host in exclude):
                    return host
                i = 0 if i + 1 == n else i + 1
                host = owners[i]
            if host in member and not (exclude and host in exclude):
                return host
            return None
        return host

    def __repr__(self) -> str:
        return f"<HashRing hosts={len(self._hosts or ())} ring_hosts={len(self._ring_hosts)} points={len(self._keys)}>"


BALANCER_CLASSES: dict[str, type[Balancer]] = {cls.name: cls for cls in (RoundRobin, LeastConn, PowerOfTwo, HashRing)}


def make_balancer(name: str, rng: random.Random | None = None) -> Balancer:
    """A new balancer for ``ServiceOptions.balance``; ``ValueError`` names an unknown algorithm."""
    try:
        cls = BALANCER_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown balance algorithm {name!r}; expected one of {', '.join(BALANCER_CLASSES)}") from None
    return cls(rng)
