"""The TLS passthrough front: route a connection by the server name (SNI) of its ClientHello.

The mesh holds no key and terminates nothing: it reads the client's first TLS
records until the ClientHello is complete, takes the ``server_name`` extension
(RFC 6066 section 3) out of it, chooses the route, and hands the connection to a
``Splice`` with every byte it read (``_start(host, buffered=hello)``), so the
replica's TLS stack sees the untouched handshake and balancing, connect retries,
the PROXY header and the cluster tunnel work as for any TCP connection.

Rules of the hello phase (``HelloReader``, pure and incremental: each byte is
looked at once, so a client sending one byte per segment costs O(bytes)):

- The first byte must be 22 (a handshake record) and the record version 3.x,
  else the connection is counted ``not_tls`` and closed at once (an HTTP request,
  SSLv2, a port scanner).
- Records (RFC 8446 5.1): type 22 only until the hello is complete, length
  1..2^14 (``MAX_RECORD``).  A ClientHello may be split over several records and
  a record over several reads; the handshake message is reassembled from the
  fragments.  Its type must be 1 (ClientHello) and its length at most
  ``MAX_HELLO``.  Anything else is ``bad_hello``.
- ClientHello (RFC 8446 4.1.2, the same layout as TLS 1.2's): legacy_version,
  random, session id (<= 32 bytes), cipher suites (even, >= 2 bytes),
  compression methods (>= 1), then optional extensions that must exactly fill
  the message; no extension type twice.  Unknown extensions (GREASE values
  0x?a?a, encrypted_client_hello 0xfe0d, ...) are skipped: with ECH the outer
  hello names the public server, and that is what a passthrough proxy routes on.
- server_name: a ServerNameList with exactly one host_name (type 0), 1..255
  bytes of ASCII letters, digits, '-', '_' and '.'; lower-cased, a trailing dot
  dropped.  No extension (or no host_name) = no name.
- The whole phase has a deadline (``HELLO_TIMEOUT`` seconds from accept, not an
  inactivity timer: slowloris), counted ``timeout``; a client that closes first
  is ``incomplete``.
- Incoming PROXY headers (``mesh.proxy.inbound``): the header comes before the
  ClientHello, so before the route is known; a peer is trusted when any route
  of the port has it in ``accept_proxy`` (``listener_networks``: the union).
  Its header is read first (deadline ``HEADER_TIMEOUT`` from accept, or the
  hello's if that is sooner), ``client`` becomes the carried address, and the
  bytes after it go to the hello reader; an untrusted peer's first bytes are
  checked for a PROXY signature on the way to the hello reader.  Closed there:
  ``listener.inbound_stats`` by reason.  No route with ``accept_proxy``: one
  cached lookup per connection and one slot test per hello read.

Choosing the route (``SniTable``, rebuilt only when the listener's bindings
change): an exact name, else the longest matching wildcard ("*.example.com"
covers any name ending in ".example.com"), else the route without names (the
port's default service), else the connection is closed and counted
``no_route``.  Counters per listener: ``SniStats``; per route the pool's
``RouteStats`` as for tcp (``accepted``, ``no_endpoint``, connect failures).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from mesh.proxy import inbound
from mesh.proxy.inbound import InboundProxy, InboundProxyError, listener_networks
from mesh.proxy.splice import WRITE_HIGH, Splice
from mesh.stats import InboundStats

if TYPE_CHECKING:
    from mesh.listener import Binding, Listener

__all__ = [
    "HELLO_TIMEOUT",
    "MAX_HELLO",
    "MAX_RECORD",
    "BadHello",
    "HelloReader",
    "SniStats",
    "SniTable",
    "tls_front",
]

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0  # seconds from accept to a complete ClientHello
MAX_RECORD = 1 << 14  # RFC 8446 5.1: a plaintext record carries at most 2^14 bytes
MAX_HELLO = 1 << 16  # our bound on the ClientHello message (post-quantum key shares are ~1.2 KiB)
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class BadHello(ValueError):
    """The first bytes are not a ClientHello we accept.  ``reason`` is "not_tls" or "bad_hello"."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


class HelloReader:
    """Feed it the client's bytes; ``feed`` returns False while more are needed, True once the
    ClientHello is complete (then ``server_name`` is the name, or None).  Raises ``BadHello``.
    ``data`` keeps every byte fed (what the splice sends on)."""

    __slots__ = ("_fragments", "_hs_len", "_pos", "data", "server_name")

    def __init__(self) -> None:
        self.data = bytearray()
        self.server_name: str | None = None
        self._pos = 0  # start of the first record not yet taken into _fragments
        self._fragments = bytearray()  # the handshake message so far
        self._hs_len = -1  # its length, once its 4-byte header is there

    def feed(self, chunk: bytes) -> bool:
        data = self.data
        first = not data
        data += chunk
        if first and data and data[0] != _HANDSHAKE:
            raise BadHello("not_tls", f"first byte {data[0]:#04x} is not a TLS handshake record")
        while True:
            pos = self._pos
            if len(data) - pos < 5:
                if pos == 0 and len(data) >= 2 and data[1] != 3:
                    raise BadHello("not_tls", f"record version {data[1]}.x is not TLS")
                return False
            if data[pos] != _HANDSHAKE:
                raise BadHello("bad_hello", f"record type {data[pos]} before the ClientHello was complete")
            if data[pos + 1] != 3:
                raise BadHello("not_tls" if pos == 0 else "bad_hello", f"record version {data[pos + 1]}.x is not TLS")
            length = (data[pos + 3] << 8) | data[pos + 4]
            if not 0 < length <= MAX_RECORD:
                raise BadHello("bad_hello", f"record length {length} outside 1..{MAX_RECORD}")
            if len(data) - pos - 5 < length:
                return False
            self._fragments += data[pos + 5 : pos + 5 + length]
            self._pos = pos + 5 + length
            frag = self._fragments
            if self._hs_len < 0 and len(frag) >= 4:
                if frag[0] != _CLIENT_HELLO:
                    raise BadHello("bad_hello", f"handshake message type {frag[0]} is not a ClientHello")
                self._hs_len = (frag[1] << 16) | (frag[2] << 8) | frag[3]
                if self._hs_len > MAX_HELLO:
                    raise BadHello("bad_hello", f"ClientHello of {self._hs_len} bytes exceeds {MAX_HELLO}")
            if self._hs_len >= 0 and len(frag) >= 4 + self._hs_len:
                self.server_name = parse_client_hello(bytes(frag[4 : 4 + self._hs_len]))
                return True


def parse_client_hello(body: bytes) -> str | None:
    """The server name of a ClientHello message body (after the 4-byte handshake header), or
    None when it names none.  Raises ``BadHello`` ("bad_hello") when the layout is wrong."""
    n = len(body)
    p = 2 + 32  # legacy_version, random
    if n < p + 1:
        raise BadHello("bad_hello", "ClientHello too short")
    sid = body[p]
    if sid > 32:
        raise BadHello("bad_hello", f"session id of {sid} bytes")
    p += 1 + sid
    if n < p + 2:
        raise BadHello("bad_hello", "ClientHello ends in the session id")
    suites = (body[p] << 8) | body[p + 1]
    if suites < 2 or suites % 2:
        raise BadHello("bad_hello", f"cipher suites of {suites} bytes")
    p += 2 + suites
    if n < p + 1:
        raise BadHello("bad_hello", "ClientHello ends in the cipher suites")
    comp = body[p]
    if comp < 1:
        raise BadHello("bad_hello", "no compression method")
    p += 1 + comp
    if p > n:
        raise BadHello("bad_hello", "ClientHello ends in the compression methods")
    if p == n:
        return None  # no extensions (an old client): no name
    if n < p + 2:
        raise BadHello("bad_hello", "truncated extensions length")
    ext_len = (body[p] << 8) | body[p + 1]
    p += 2
    if p + ext_len != n:
        raise BadHello("bad_hello", "extensions do not fill the ClientHello")
    seen: set[int] = set()
    name = None
    while p < n:
        if n - p < 4:
            raise BadHello("bad_hello", "truncated extension header")
        etype = (body[p] << 8) | body[p + 1]
        elen = (body[p + 2] << 8) | body[p + 3]
        p += 4
        if p + elen > n:
            raise BadHello("bad_hello", f"extension {etype} overruns the ClientHello")
        if etype in seen:
            raise BadHello("bad_hello", f"extension {etype} appears twice")
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            name = _server_name(body[p : p + elen])
        p += elen
    return name


def _server_name(ext: bytes) -> str | None:
    if len(ext) < 2 or ((ext[0] << 8) | ext[1]) != len(ext) - 2:
        raise BadHello("bad_hello", "malformed server_name list")
    p, n = 2, len(ext)
    name = None
    while p < n:
        if n - p < 3:
            raise BadHello("bad_hello", "truncated server_name entry")
        kind, length = ext[p], (ext[p + 1] << 8) | ext[p + 2]
        p += 3
        if p + length > n:
            raise BadHello("bad_hello", "server_name entry overruns the list")
        if kind == 0:
            if name is not None:
                raise BadHello("bad_hello", "two host names in server_name")
            raw = ext[p : p + length]
            if not 0 < length <= 255 or not _NAME_CHARS.issuperset(raw):
                raise BadHello("bad_hello", "server_name host name is not a DNS name")
            name = raw.decode("ascii").lower().rstrip(".")
        p += length
    return name or None


class SniTable:
    """Route lookup of one listener's bindings: exact names, wildcards (longest first), default."""

    __slots__ = ("bindings", "default", "exact", "wildcards")

    def __init__(self, bindings: tuple[Binding, ...]) -> None:
        self.bindings = bindings
        self.exact: dict[str, Binding] = {}
        wild: list[tuple[str, Binding]] = []
        self.default: Binding | None = None
        for b in bindings:
            hosts = b.route.match.hosts
            if not hosts:
                self.default = b
            for h in hosts:
                if h.startswith("*."):
                    wild.append((h[1:], b))  # ".example.com"
                else:
                    self.exact[h] = b
        self.wildcards = tuple(sorted(wild, key=lambda w: -len(w[0])))

    def lookup(self, name: str | None) -> Binding | None:
        if name is not None:
            b = self.exact.get(name)
            if b is not None:
                return b
            for suffix, b in self.wildcards:
                if name.endswith(suffix) and len(name) > len(suffix):
                    return b
        return self.default


class SniStats:
    """Per tls listener: connections closed in the hello phase, by reason."""

    __slots__ = ("closed", "routed")

    REASONS = ("not_tls", "bad_hello", "timeout", "incomplete", "no_route", "overflow")

    def __init__(self) -> None:
        self.routed = 0
        self.closed: dict[str, int] = dict.fromkeys(self.REASONS, 0)

    def __repr__(self) -> str:
        return f"<SniStats routed={self.routed} closed={self.closed}>"


class _HelloPhase(asyncio.Protocol):
    """One accepted connection until its ClientHello is read; then a ``Splice`` takes the transport."""

    __slots__ = ("_accepted_at", "_inbound", "_listener", "_reader", "_timer", "client", "done", "transport")

    def __init__(self, listener: Listener, peer: tuple | None) -> None:
        self._listener = listener
        self.client = peer
        self.transport: asyncio.Transport | None = None
        self._reader = HelloReader()
        self._timer: asyncio.TimerHandle | None = None
        self._inbound: InboundProxy | None = None  # while the first bytes are judged (accept_proxy)
        self._accepted_at = 0.0
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        lst = self._listener
        lst.registry.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        if self.client is None:
            self.client = transport.get_extra_info("peername")
        loop = lst.loop
        self._accepted_at = now = loop.time()
        deadline = now + HELLO_TIMEOUT
        nets = listener_networks(lst)
        if nets is not None:
            self._inbound = reader = InboundProxy(nets, self.client)
            if reader.peer_trusted:
                deadline = min(deadline, now + inbound.HEADER_TIMEOUT)
        self._timer = loop.call_at(deadline, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self._inbound is not None:
            data = self._inbound_bytes(data)  # type: ignore[assignment]
            if not data:
                return
        try:
            complete = self._reader.feed(data)
        except BadHello as exc:
            self._close(exc.reason, str(exc))
            return
        if complete:
            self._route()

    def _inbound_bytes(self, data: bytes) -> bytes | None:
        """Feed the inbound reader; the bytes for the hello reader once it is done, else None."""
        reader = self._inbound
        try:
            res = reader.feed(data)  # type: ignore[union-attr]
        except InboundProxyError as exc:
            self._close(exc.reason, str(exc), header=True)
            return None
        if res is None:
            return None
        self._inbound = None
        client, rest = res
        if reader.peer_trusted:  # type: ignore[union-attr]
            self.client = client
            self._listener.inbound_stats.headers += 1
        return rest

    def _header_pending(self) -> bool:
        return self._inbound is not None and self._inbound.peer_trusted

    def eof_received(self) -> bool:
        if not self.done:
            inb = self._header_pending()
            self._close("incomplete", f"client closed before the {_waited_for(inb)} was complete", header=inb)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            inb = self._header_pending()
            self._close("incomplete", f"connection lost before the {_waited_for(inb)} was complete", header=inb)

    def _timeout(self) -> None:
        self._timer = None
        if self.done:
            return
        if self._header_pending():
            self._close("timeout", f"no complete PROXY header within {inbound.HEADER_TIMEOUT}s", header=True)
            return
        loop = self._listener.loop
        deadline = self._accepted_at + HELLO_TIMEOUT
        if loop.time() < deadline:  # the header's deadline passed, not the hello's
            self._timer = loop.call_at(deadline, self._timeout)
            return
        self._close("timeout", f"no complete ClientHello within {HELLO_TIMEOUT}s")

    def _finish(self) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reg = self._listener.registry
        if self in reg:
            reg.remove(self)

    def _close(self, reason: str, detail: str, *, header: bool = False) -> None:
        self._finish()
        lst = self._listener
        (lst.inbound_stats if header else lst.sni_stats).closed[reason] += 1
        log.debug("tls %s client %s: %s (%s)", self._listener.name, self.client, detail, reason)
        transport = self.transport
        if transport is not None:
            transport.abort()

    def abort(self, reason: str = "shutdown") -> None:
        """Registry hook (shutdown): close now."""
        if not self.done:
            self._close("incomplete", reason)

    def _route(self) -> None:
        lst = self._listener
        table = lst.sni_table
        if table is None or table.bindings is not lst.bindings:
            table = lst.sni_table = SniTable(lst.bindings)
        name = self._reader.server_name
        binding = table.lookup(name)
        if binding is None:
            self._close("no_route", f"no route for server name {name!r} and no default service")
            return
        pool = binding.pool
        stats = pool.stats
        stats.accepted += 1
        # Read the route once; no await between here and choose().
        host = pool.choose(self.client)
        if host is None:
            self._finish()
            stats.no_endpoint += 1
            self.transport.abort()  # type: ignore[union-attr]
            return
        self._finish()
        lst.sni_stats.routed += 1
        conn = Splice(lst, self.client)
        conn.transport = self.transport  # type: ignore[assignment]
        conn.pool = pool
        conn.options = pool.options
        lst.registry.add(conn)
        self.transport.set_protocol(conn)  # type: ignore[union-attr]
        host.active += 1
        conn._start(host, bytes(self._reader.data))
        self._reader = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = len(self._reader.data) if self._reader is not None else 0
        return f"<TLS hello {self._listener.name} {self.client} read={n}{' done' if self.done else ''}>"


def _waited_for(header: bool) -> str:
    return "PROXY header" if header else "ClientHello"


def tls_front(listener: Listener) -> Any:
    """The protocol factory of a tls listener: ``factory(peer)`` -> the hello phase of a connection.
    Adds ``sni_stats`` (``SniStats``), ``sni_table`` (the lookup cache), ``inbound_stats``
    (``InboundStats``) and ``inbound_cache`` (``listener_networks``'s) to the listener."""
    listener.sni_stats = SniStats()  # type: ignore[attr-defined]
    listener.sni_table = None  # type: ignore[attr-defined]
    listener.inbound_stats = InboundStats()  # type: ignore[attr-defined]
    listener.inbound_cache = None  # type: ignore[attr-defined]

    def factory(peer: tuple | None = None) -> _HelloPhase:
        return _HelloPhase(listener, peer)

    return factory
