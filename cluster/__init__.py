"""Cluster mode: one routing table for a whole swarm, and forwarding between nodes.

- ``cluster.state``: ``ClusterState`` (cluster table + nodes) and the pure ``localize()``.
- ``cluster.control``: ``ControlServer`` (on managers) and ``ControlClient`` (on every agent).
- ``cluster.tunnel``: ``TunnelServer`` (accepts forwarded connections for local tasks) and
  ``tunnel_header()`` (what the dialing side sends first).
- ``cluster.token``: ``read_token()`` for the shared secret.

May import ``mesh.routing``, ``mesh.errors``, ``mesh.proxyproto``, aiohttp and the
standard library; never ``discovery`` or ``docker``.  See docs/cluster.md.
"""
