"""Counters kept on the hot path as plain ints.

The proxy increments attributes of these ``__slots__`` objects; nothing here
takes a lock or allocates per chunk.  ``mesh/metrics.py`` reads them at scrape
time with a custom collector, so Prometheus costs nothing between scrapes.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds.  Connect times on a LAN are sub-millisecond; connection durations span
# from a single request to hours.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


class Histogram:
    """Fixed buckets; ``counts[i]`` counts observations <= ``buckets[i]`` (not cumulative),
    the last slot counts the rest (+Inf)."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus-style cumulative buckets: [("0.001", n), ..., ("+Inf", total)]."""
        out = []
        acc = 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum
        self.count += other.count

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} sum={self.sum:.6f}>"


class RouteStats:
    """Per listener (service + port).  Lives as long as the port is served."""

    __slots__ = (
        "accepted",
        "connect_failures",
        "failed",
        "no_endpoint",
        "overflow_closed",
        "retries",
        "slow_start_deferred",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.no_endpoint = 0
        self.retries = 0
        self.overflow_closed = 0
        # Picks of a host in its slow-start ramp that went to another host instead (mesh.pool).
        self.slow_start_deferred = 0
        # Every failed connect attempt, retried or not: reason -> count
        # ("refused", "timeout", "unreachable", "error").
        self.connect_failures: dict[str, int] = {}
        # Client connections given up on after the last attempt failed: reason -> count.
        self.failed: dict[str, int] = {}

    def connect_failed(self, reason: str) -> None:
        self.connect_failures[reason] = self.connect_failures.get(reason, 0) + 1

    def connection_failed(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1

    def __repr__(self) -> str:
        return (
            f"<RouteStats accepted={self.accepted} no_endpoint={self.no_endpoint} "
            f"retries={self.retries} failures={self.connect_failures}>"
        )


class HostStats:
    """Per endpoint (Host).  Bytes are added once per connection, at close."""

    __slots__ = ("bytes_in", "bytes_out", "connect_time", "connections", "duration", "ejections")

    def __init__(self) -> None:
        self.connections = 0  # connections established to this endpoint
        self.bytes_in = 0  # client -> endpoint
        self.bytes_out = 0  # endpoint -> client
        self.ejections = 0
        self.connect_time = Histogram(CONNECT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)

    def __repr__(self) -> str:
        return f"<HostStats connections={self.connections} in={self.bytes_in} out={self.bytes_out}>"


class InboundStats:
    """Per tcp/tls listener: incoming PROXY headers (``mesh.proxy.inbound``).

    ``headers``: connections whose header was accepted (their ``client`` is the
    address it carries, or the peer's for LOCAL/UNSPEC); ``closed``: connections
    closed before the splice, by reason (``REASONS``).
    """

    __slots__ = ("closed", "headers")

    REASONS = ("timeout", "bad_header", "untrusted_header", "missing_header", "incomplete")

    def __init__(self) -> None:
        self.headers = 0
        self.closed: dict[str, int] = dict.fromkeys(self.REASONS, 0)

    def __repr__(self) -> str:
        return f"<InboundStats headers={self.headers} closed={self.closed}>"
