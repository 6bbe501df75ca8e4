"""The hot path: connections spliced to endpoints.

Layout (one splice, several fronts)::

    listener (mesh.listener) ──accept──▶ front ──choose──▶ Splice ──dial──▶ endpoint
                                         tcp.py            splice.py  dial.py   (or another node's agent,
                                         (tunnel: cluster/tunnel.py)           preamble.py's tunnel header)

- ``splice.py``: ``Splice`` / ``Upstream``, the connection pair every stream
  protocol ends in: pre-connect buffer, both-way backpressure, half-close, lazy
  idle deadline, byte counts flushed at close.
- ``dial.py``: choose -> connect with a ``call_at`` deadline -> retry on another
  host before any byte -> report to the pool.
- ``preamble.py``: the first bytes of an upstream connection: PROXY v1/v2 for a
  replica, the tunnel header (PROXY v2 + one target TLV) for another node.
- ``tcp.py``: the tcp front (nothing to do before the splice).
- ``registry.py``: the open connections of a data plane, for draining.

A new stream protocol adds a front module (what happens before the splice, or
between requests) and an entry in ``mesh.listener.FRONTS``; it never adds a
second connection pair.
"""

from mesh.proxy.dial import connect_failure_reason
from mesh.proxy.preamble import host_tunnel_header
from mesh.proxy.registry import ConnectionRegistry
from mesh.proxy.splice import IDLE_CHECKS, PRECONNECT_LIMIT, PRECONNECT_PAUSE, WRITE_HIGH, Splice, Upstream
from mesh.proxy.tcp import TcpConnection, tcp_front

__all__ = [
    "IDLE_CHECKS",
    "PRECONNECT_LIMIT",
    "PRECONNECT_PAUSE",
    "WRITE_HIGH",
    "ConnectionRegistry",
    "Splice",
    "TcpConnection",
    "Upstream",
    "connect_failure_reason",
    "host_tunnel_header",
    "tcp_front",
]
