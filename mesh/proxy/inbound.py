"""Incoming PROXY headers (v1/v2) from trusted sources: a pure, incremental reader every front uses.

Behind a cloud load balancer or HAProxy the peer of every connection is the
balancer, and the real client is named by the PROXY header it sends first.  A
service opts in with ``accept_proxy`` (CIDRs; empty = off: the fronts test that
one attribute and nothing of this module runs).  The rule, per connection:

- A peer inside one of the networks is *trusted*: its connection MUST begin with
  a v1 or v2 header, decoded strictly by ``mesh.proxyproto.decode`` (bounded: at
  most ``16 + 216 + MAX_V2_TLV_BYTES`` bytes are held).  First bytes that cannot
  start either signature are ``missing_header``; a header that began with a
  signature but is malformed is ``bad_header``.  The front closes the
  connection on either, when the header is not complete ``HEADER_TIMEOUT``
  seconds after accept (``timeout``: a deadline from accept, not an inactivity
  timer, so one byte per second does not keep it open), and when the peer closes
  first (``incomplete``).
- What a header carries: command PROXY with family INET or INET6 -> its source
  address becomes the connection's ``client`` everywhere (balancing hash, the
  PROXY header the mesh sends to replicas, the tunnel header, the access log).
  LOCAL (the balancer's own health check), UNSPEC (v1 "UNKNOWN") and UNIX ->
  the peer's address is kept.  The bytes after the header are application data.
- Any other peer is *untrusted* and served as a direct client, unless its first
  bytes are a PROXY signature ("PROXY " or the 12-byte v2 signature), checked on
  as many bytes as have arrived: then ``untrusted_header`` and the connection is
  closed (nobody outside the networks may claim another client's address).
  While the bytes so far are a strict prefix of a signature (at most 11 bytes)
  they are held; the first byte that differs releases them.
- IPv4-mapped IPv6 peers (``::ffff:a.b.c.d``, a dual-stack listener) are the
  IPv4 address; an IPv6 network inside ``::ffff:0:0/96`` is the IPv4 network.

API (pure: no I/O, no clock; the front owns the socket and the deadline)::

    nets = trusted_networks(options.accept_proxy)   # TrustedNetworks, parsed once per CIDR tuple; None if empty
    nets = listener_networks(listener)              # a shared port: the union over its routes (cached)
    reader = InboundProxy(nets, peer)               # one per connection; peer = (ip, port, ...) or None
    reader.peer_trusted                             # must a header come first?
    reader.feed(data) -> None                       # need more bytes
                      -> (client, rest)             # done: client = the carried address, else the peer
                      raises InboundProxyError      # .reason: "missing_header" | "bad_header" | "untrusted_header"

Counters: ``mesh.stats.InboundStats`` on the listener (``listener.inbound_stats``),
closed connections by ``REASONS``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from mesh.errors import ProtocolError
from mesh.proxyproto import MAX_V1_LENGTH, V1_PREFIX, V2_SIGNATURE, ProxyHeader, decode
from mesh.stats import InboundStats

__all__ = [
    "HEADER_TIMEOUT",
    "REASONS",
    "InboundProxy",
    "InboundProxyError",
    "InboundStats",
    "TrustedNetworks",
    "listener_networks",
    "trusted_networks",
]

HEADER_TIMEOUT = 5.0  # seconds from accept to a complete header (trusted peers)
REASONS = InboundStats.REASONS  # why a connection was closed before its splice
PEER_CACHE = 4096  # peer IP -> trusted: a bounded cache (cleared when full)
_NETWORKS_CACHE = 256

_V2_FIXED = 16
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")
_CARRIED = (socket.AF_INET, socket.AF_INET6)


class InboundProxyError(ValueError):
    """The first bytes break the rule (module docstring).  ``reason``: "missing_header",
    "bad_header" or "untrusted_header" (the counter the front increments)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


def _peer_int(ip: str) -> tuple[int, int] | None:
    """``(version, address as int)`` of a textual peer address; an IPv4-mapped IPv6 one is IPv4."""
    try:
        if ":" not in ip:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
        packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    except (OSError, ValueError, TypeError):
        return None
    if packed[:12] == _MAPPED_PREFIX:
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


class TrustedNetworks:
    """The parsed ``accept_proxy`` networks of a service (or a shared port).  Build it through
    ``trusted_networks()`` so a CIDR tuple is parsed once, not once per connection."""

    __slots__ = ("_cache", "_v4", "_v6", "cidrs", "networks")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.cidrs = tuple(cidrs)
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in self.cidrs:
            try:
                net = ipaddress.ip_network(str(text), strict=False)
            except ValueError as exc:
                raise ValueError(f"accept_proxy: {text!r} is not an IP network (e.g. 10.0.0.0/8, ::1)") from exc
            if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED_NET):
                net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
            if net not in nets:
                nets.append(net)
        self.networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(nets)
        # (network, mask) as ints per version: a membership test is an AND and a compare.
        self._v4 = tuple((int(n.network_address), int(n.netmask)) for n in nets if n.version == 4)
        self._v6 = tuple((int(n.network_address), int(n.netmask)) for n in nets if n.version == 6)
        self._cache: dict[str, bool] = {}

    def trusted(self, peer_ip: str | None) -> bool:
        """True when ``peer_ip`` (textual, as ``getpeername()`` gives it) is inside a network."""
        if peer_ip is None:
            return False
        cache = self._cache
        hit = cache.get(peer_ip)
        if hit is not None:
            return hit
        parsed = _peer_int(peer_ip)
        ok = False
        if parsed is not None:
            version, value = parsed
            for net, mask in self._v4 if version == 4 else self._v6:
                if value & mask == net:
                    ok = True
                    break
        if len(cache) >= PEER_CACHE:
            cache.clear()
        cache[peer_ip] = ok
        return ok

    def __repr__(self) -> str:
        return f"<TrustedNetworks {', '.join(map(str, self.networks)) or '-'}>"


_BY_CIDRS: dict[tuple[str, ...], TrustedNetworks] = {}


def trusted_networks(cidrs: tuple[str, ...]) -> TrustedNetworks | None:
    """The parsed networks of an ``accept_proxy`` tuple, cached by the tuple (every connection of a
    service passes the same one); None when it is empty (the feature is off)."""
    if not cidrs:
        return None
    nets = _BY_CIDRS.get(cidrs)
    if nets is None:
        if len(_BY_CIDRS) >= _NETWORKS_CACHE:
            _BY_CIDRS.clear()
        nets = _BY_CIDRS[cidrs] = TrustedNetworks(cidrs)
    return nets


_parsed = trusted_networks  # (InboundProxy's argument has the function's name)


def listener_networks(listener: Any) -> TrustedNetworks | None:
    """For a port shared by several routes (tls, http): the header comes before the route is known,
    so a peer is trusted when any route's ``accept_proxy`` covers it (the union).  Cached on the
    listener (``inbound_cache``) per ``bindings`` tuple, which the runtime replaces on every apply."""
    bindings = listener.bindings
    cached = getattr(listener, "inbound_cache", None)
    if cached is not None and cached[0] is bindings:
        return cached[1]
    cidrs: list[str] = []
    for b in bindings:
        for c in b.pool.options.accept_proxy:
            if c not in cidrs:
                cidrs.append(c)
    nets = trusted_networks(tuple(sorted(cidrs)))
    listener.inbound_cache = (bindings, nets)
    return nets


def _signature(buf: bytearray) -> int:
    """0: ``buf`` cannot start a PROXY signature; 1: a strict prefix of one; 2: it starts with one."""
    n = len(buf)
    sig = V1_PREFIX if buf[:1] == b"P" else V2_SIGNATURE
    m = min(n, len(sig))
    if buf[:m] != sig[:m]:
        return 0
    return 2 if n >= len(sig) else 1


class InboundProxy:
    """The first bytes of one connection under the rule of the module docstring.

    ``InboundProxy(trusted_networks, peer)``: ``trusted_networks`` is a ``TrustedNetworks`` (or
    an iterable of CIDR strings, parsed through the cache); ``peer`` the accepted peer address.
    ``feed(data)`` takes the bytes as they arrive; it returns None while more are needed, then
    ``(client, rest)`` once: ``client`` is the address the connection is for (the header's source,
    or ``peer`` when none is carried or the peer is untrusted) and ``rest`` the application bytes
    read so far.  It raises ``InboundProxyError`` on input the rule refuses.  Do not feed it after
    a result or an error.  Each byte is copied once and the decoder runs only when a header can be
    complete, so a header sent one byte per segment costs O(header) plus a decode per CRLF.
    """

    __slots__ = ("_buf", "_nets", "_v2_total", "client", "header", "peer", "peer_trusted")

    def __init__(self, trusted_networks: TrustedNetworks | Iterable[str], peer: tuple | None = None) -> None:
        if not isinstance(trusted_networks, TrustedNetworks):
            trusted_networks = _parsed(tuple(trusted_networks)) or TrustedNetworks(())
        self._nets = trusted_networks
        self.peer = peer
        self.peer_trusted = bool(peer) and trusted_networks.trusted(peer[0])  # type: ignore[index]
        self.client: tuple | None = None  # set with the result
        self.header: ProxyHeader | None = None  # the decoded header (TLVs), trusted peers only
        self._buf: bytearray | None = bytearray()
        self._v2_total = 0  # a v2 header's whole length, once its fixed part is read

    @property
    def networks(self) -> tuple:
        return self._nets.networks

    def trusted(self, peer_ip: str | None) -> bool:
        """Is ``peer_ip`` inside the trusted networks?"""
        return self._nets.trusted(peer_ip)

    @property
    def buffered(self) -> bytes:
        """What was fed and not yet returned (held while it may still become a header)."""
        return bytes(self._buf) if self._buf is not None else b""

    def feed(self, data: bytes) -> tuple[tuple | None, bytes] | None:
        buf = self._buf
        if buf is None:
            raise RuntimeError("InboundProxy.feed() after its result")
        buf += data
        if not self.peer_trusted:
            state = _signature(buf)
            if state == 1:
                return None
            if state == 2:
                self._buf = None
                raise InboundProxyError(
                    "untrusted_header", f"a PROXY header from {self.peer[0] if self.peer else '?'}, not a trusted peer"
                )
            return self._done(self.peer, 0)
        if self._v2_total and len(buf) < self._v2_total:
            return None
        state = _signature(buf)
        if state == 0:
            self._buf = None
            raise InboundProxyError("missing_header", f"no PROXY header from a trusted peer: starts {bytes(buf[:8])!r}")
        if state == 1:
            return None
        if buf[0] == 0x50 and b"\n" not in data and len(buf) < MAX_V1_LENGTH:
            return None  # v1: nothing to decide before its LF (or its length bound)
        try:
            res = decode(buf)
        except ProtocolError as exc:
            self._buf = None
            raise InboundProxyError("bad_header", str(exc)) from exc
        if res is None:
            if buf[0] == 0x0D and len(buf) >= _V2_FIXED:
                self._v2_total = _V2_FIXED + ((buf[14] << 8) | buf[15])
            return None
        hdr, consumed = res
        self.header = hdr
        client = self.peer
        if hdr.command == "PROXY" and hdr.family in _CARRIED and hdr.src is not None:
            client = hdr.src
        return self._done(client, consumed)

    def _done(self, client: tuple | None, consumed: int) -> tuple[tuple | None, bytes]:
        buf = self._buf
        self._buf = None
        self.client = client
        return client, bytes(buf[consumed:]) if consumed else bytes(buf)  # type: ignore[index,arg-type]

    def __repr__(self) -> str:
        state = "done" if self._buf is None else f"read={len(self._buf)}"
        return f"<InboundProxy peer={self.peer} trusted={self.peer_trusted} {state} client={self.client}>"
