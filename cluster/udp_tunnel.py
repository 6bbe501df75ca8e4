"""The UDP tunnel between agents: a datagram for a replica on this node, sent by another node's agent.

A node's published udp port sends a datagram for a replica on another node to that node's agent,
at the node's tunnel address (the same port number as the TCP tunnel, ``--tunnel-port``, over UDP),
with the UDP tunnel header in front (``mesh.udp``: magic, version, the client's address and port,
the target "<endpoint id>:<target port>").  Datagrams, not a stream: no head-of-line blocking, and a
lost datagram is lost for one client only, as it would be without the mesh.

``UdpTunnelServer`` (a ``mesh.udp.UdpSite``) checks every datagram:

- from an address that is not a cluster node (``allowed(ip)``): dropped, counted ``peer``;
- a header that does not parse: dropped, ``malformed``;
- a target that is not a local UDP endpoint of a mesh service (``resolve(target)`` -> (pool, host)
  of the data plane's own udp route, or None): dropped, ``unknown_target``.

A session per sending socket (each session of the sending agent has its own connected socket, so
it stands for one client and one target); the session's datagrams must keep the header it started
with, a different header starts a new session.  The session's own connected socket sends on to the
replica (with a PROXY v2 header naming the original client when the service asks for one) and the
replica's replies go back, without a header, to the sending agent's socket, which hands them to the
client from the published port.  Idle timeout and cap as for a published port (the service's
``udp_idle_timeout``; ``max_sessions`` for the whole tunnel).  A replica that refuses (ICMP port
unreachable) counts as a failure of the shared host, and the session moves to another local replica
of the same route, never to another node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mesh.proxy.preamble import TunnelRefused, endpoint_target
from mesh.udp import (
    DROP_REASONS,
    TUNNEL_MAGIC_SEALED,
    Session,
    UdpSite,
    dgram_proxy_header,
    parse_tunnel_datagram,
)

__all__ = ["TUNNEL_DROP_REASONS", "UdpTunnelServer"]

log = logging.getLogger(__name__)

TUNNEL_DROP_REASONS = (*DROP_REASONS, "peer", "malformed", "auth", "unknown_target")
MAX_TUNNEL_SESSIONS = 50_000


def _peer_ip(addr: tuple) -> str:
    ip = str(addr[0])
    return ip[7:] if ip.startswith("::ffff:") else ip


class UdpTunnelServer(UdpSite):
    """The receiving end of the UDP tunnel on one node (module docstring)."""

    uniform_idle = False  # sessions of several services: the sweep looks at each

    def __init__(
        self,
        resolve: Callable[[str], tuple[Any, Any] | None],
        allowed: Callable[[str], bool],
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        max_sessions: int = MAX_TUNNEL_SESSIONS,
        auth: Any = None,
    ) -> None:
        super().__init__(host, port, name="udp tunnel", drops=TUNNEL_DROP_REASONS)
        # cluster mode: a mesh.proxy.preamble.TunnelAuth; every session's header must be sealed with it
        self.auth = auth
        self.resolve = resolve
        self.allowed = allowed
        self.max_sessions = max_sessions

    def _datagram(self, addr: tuple, data: bytes, now: float) -> None:
        s = self.sessions.get(addr)
        if s is not None and data.startswith(s.tag):
            self._forward(s, data[len(s.tag) :], now)
            return
        if not self.allowed(_peer_ip(addr)):
            self.stats.drop("peer")
            return
        try:
            client, target, n = parse_tunnel_datagram(data)
        except ValueError as exc:
            self.stats.drop("malformed")
            log.debug("udp tunnel: datagram from %s dropped: %s", addr, exc)
            return
        if self.auth is not None:
            try:
                if data[:3] != TUNNEL_MAGIC_SEALED:
                    raise TunnelRefused("auth", "UDP tunnel header not sealed")
                self.auth.check_datagram_header(bytes(data[:n]))
            except TunnelRefused as exc:
                self.stats.drop("auth")
                log.debug("udp tunnel: datagram from %s dropped: %s", addr, exc)
                return
            if s is not None and s.client == client and endpoint_target(s.host.endpoint) == target:
                # the sender resealed its header (every few seconds): the same session, its socket kept
                s.tag = bytes(data[:n])
                self._forward(s, data[n:], now)
                return
        try:
            found = self.resolve(target)
        except Exception:
            log.exception("udp tunnel: resolve(%r) failed", target)
            found = None
        if found is None:
            self.stats.drop("unknown_target")
            return
        pool, host = found
        if s is not None:
            self._end(s, "replaced")
        self._make_room(self.max_sessions)
        s = Session(addr, client, addr, pool, now)
        s.tag = bytes(data[:n])
        if not self._open(s, host, self._prefix(pool, client)):
            return
        self.sessions[addr] = s
        self.stats.sessions_created += 1
        self._forward(s, data[n:], now)

    def _prefix(self, pool: Any, client: tuple) -> bytes:
        if pool.options.proxy_protocol is None:
            return b""
        return dgram_proxy_header(client, ("0.0.0.0" if ":" not in client[0] else "::", pool.route.port))

    def _rechoose(self, s: Session, exclude: tuple) -> tuple[Any, bytes] | None:
        best = None
        for h in getattr(s.pool, "usable", ()):
            if h.via is None and h not in exclude and (best is None or h.active * best.weight < best.active * h.weight):
                best = h
        return None if best is None else (best, self._prefix(s.pool, s.client))

    def status(self) -> dict[str, Any]:
        st = self.stats
        return {
            "port": self.port,
            "listening": self.listening,
            "datagrams": self.datagrams,
            "sessions_active": len(self.sessions),
            "sessions_created": st.sessions_created,
            "sessions_evicted": st.sessions_evicted,
            "sessions_ended": dict(st.sessions_ended),
            "dropped": dict(st.dropped),
        }

    def __repr__(self) -> str:
        return f"<UdpTunnelServer port={self.port} sessions={len(self.sessions)} dropped={self.stats.dropped}>"
