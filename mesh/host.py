"""One endpoint's runtime state (Envoy's "host") and its health bits.

``Host.health`` is a bitmask written by two sources: active health checks set
``FAILED_ACTIVE_HC``, passive outlier detection (``mesh.pool.Pool``) sets
``EJECTED``.  0 = healthy.  A ``Host`` lives as long as its ``Endpoint.key`` is
listed by the route's table, and longer while open connections still hold it.
"""

from __future__ import annotations

from mesh.routing import Endpoint, parse_hostport
from mesh.stats import HostStats

__all__ = ["EJECTED", "FAILED_ACTIVE_HC", "HEALTHY", "Host", "health_text"]

HEALTHY = 0
FAILED_ACTIVE_HC = 1
EJECTED = 2


def health_text(health: int) -> str:
    if not health:
        return "ok"
    parts = []
    if health & FAILED_ACTIVE_HC:
        parts.append("failed_hc")
    if health & EJECTED:
        parts.append("ejected")
    return "|".join(parts)


class Host:
    """Runtime state of one ``Endpoint`` of one route (Envoy's "host").

    The proxy reads ``address``/``port``/``via`` and does ``active += 1`` / ``-= 1``
    around a proxied connection; everything else is written by the ``Pool``.
    """

    __slots__ = (
        "active",
        "address",
        "connected",
        "consecutive_failures",
        "dial",
        "draining",
        "ejected_until",
        "ejections",
        "endpoint",
        "health",
        "idle",
        "key",
        "local",
        "port",
        "stats",
        "via",
        "weight",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.key = endpoint.key
        self.address = endpoint.address
        self.port = endpoint.port
        self.via = endpoint.via
        self.local = endpoint.via is None
        # Where the proxy connects: the endpoint itself, or the tunnel of the agent on its node.
        # Parsed once per host, not once per connection.
        self.dial = (endpoint.address, endpoint.port) if endpoint.via is None else parse_hostport(endpoint.via)
        self.active = 0
        self.health = HEALTHY
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        # False for a host that joined a running pool and has not had a successful connect yet
        # (``Pool.update``): its connect failures eject it only briefly (``mesh.pool``).
        self.connected = True
        self.stats = HostStats()
        self.endpoint = endpoint
        self.weight = endpoint.weight
        self.draining = endpoint.state == "draining"
        self.idle: list | None = None  # http routes: idle keep-alive upstream connections, newest last

    def _set_endpoint(self, endpoint: Endpoint) -> None:
        # Same key, so address/port/via are unchanged; weight, node and state may differ.
        self.endpoint = endpoint
        self.weight = endpoint.weight
        self.draining = endpoint.state == "draining"

    @property
    def id(self) -> str:
        return self.endpoint.id

    @property
    def healthy(self) -> bool:
        return not self.health

    def __repr__(self) -> str:
        via = f" via {self.via}" if self.via else ""
        ej = f" ejected_until={self.ejected_until:.3f}" if self.health & EJECTED else ""
        return (
            f"<Host {self.endpoint.id} {self.endpoint.hostport}{via} w={self.weight} active={self.active} "
            f"health={health_text(self.health)}{' draining' if self.draining else ''} "
            f"fails={self.consecutive_failures} ejections={self.ejections}{ej}"
            f"{'' if self.connected else ' never-connected'}>"
        )
