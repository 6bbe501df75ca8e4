"""The TCP front: a published port whose connections are spliced as they are.

Nothing happens before the splice: at accept the listener's route is read ONCE
(its pool and options), a host is chosen with no await in between, and the
splice dials it while the client's first bytes wait in the pre-connect buffer.
No host -> ``no_endpoint`` is counted and the client is closed at once.

Incoming PROXY headers (``accept_proxy``, rules in ``mesh.proxy.inbound``): a
service without it pays one attribute test per connection.  With it, an
``_InboundPhase`` holds the transport first:

- A trusted peer: nothing is chosen or dialled until the header is complete
  (``HEADER_TIMEOUT`` from accept).  Then the route is read again, ``client``
  becomes the carried address, a host is chosen for it and the splice starts
  with the bytes after the header as its pre-connect buffer.
- An untrusted peer: the splice starts at once, as without the option (a
  protocol where the server speaks first must not wait for the client), while
  the phase looks at the client's first bytes: a PROXY signature closes the
  pair (``untrusted_header``); anything else is handed to the splice and the
  phase steps aside.  Until then it passes the splice's events on (EOF, loss,
  write flow control of the client side).
- Closed in the phase: counted in ``listener.inbound_stats`` by reason; the
  connection's ``reason`` (access log) is that reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mesh.proxy import inbound
from mesh.proxy.inbound import InboundProxy, InboundProxyError, trusted_networks
from mesh.proxy.splice import WRITE_HIGH, Splice, reset
from mesh.stats import InboundStats

if TYPE_CHECKING:
    from mesh.listener import Listener
    from mesh.routing import ServiceOptions

__all__ = ["TcpConnection", "tcp_front"]

log = logging.getLogger(__name__)


class TcpConnection(Splice):
    """One accepted client connection of a tcp listener (``site`` is the ``Listener``)."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        site = self.site
        site.registry.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]
        if self.client is None:
            self.client = transport.get_extra_info("peername")
        # Read the route once; no await between here and choose().
        self.pool = pool = site.pool
        self.options = options = pool.options
        if options.accept_proxy:
            _InboundPhase.begin(self, options)
            return
        stats = pool.stats
        stats.accepted += 1
        host = pool.choose(self.client)
        if host is None:
            stats.no_endpoint += 1
            self.reason = "no_endpoint"
            transport.close()
            return
        host.active += 1
        self._start(host)

    def _route(self, buffered: bytes = b"") -> None:
        """``connection_made``'s choose-and-start, for the inbound phase: the route is read again
        (a header may have taken a while) and ``buffered`` goes first."""
        self.pool = pool = self.site.pool
        self.options = pool.options
        stats = pool.stats
        stats.accepted += 1
        host = pool.choose(self.client)
        if host is None:
            stats.no_endpoint += 1
            self.reason = "no_endpoint"
            self.transport.close()
            return
        host.active += 1
        self._start(host, buffered)


class _InboundPhase(asyncio.Protocol):
    """A connection of a service with ``accept_proxy`` until its first bytes are judged (module docstring)."""

    __slots__ = ("conn", "done", "reader", "started", "timer")

    def __init__(self, conn: TcpConnection, reader: InboundProxy) -> None:
        self.conn = conn
        self.reader = reader
        self.started = not reader.peer_trusted  # untrusted: the splice runs meanwhile
        self.done = False
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def begin(cls, conn: TcpConnection, options: ServiceOptions) -> None:
        """Called from ``connection_made``: take the transport, then wait (trusted) or start (untrusted)."""
        reader = InboundProxy(trusted_networks(options.accept_proxy), conn.client)  # type: ignore[arg-type]
        phase = cls(conn, reader)
        conn.transport.set_protocol(phase)
        if phase.started:
            conn._route()
        else:
            loop = conn.loop
            phase.timer = loop.call_at(loop.time() + inbound.HEADER_TIMEOUT, phase._timeout)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        try:
            res = self.reader.feed(data)
        except InboundProxyError as exc:
            self._close(exc.reason, str(exc))
            return
        if res is None:
            return
        client, rest = res
        conn = self._hand_over()
        if self.started:
            if rest:
                conn.data_received(rest)
            return
        conn.site.inbound_stats.headers += 1
        conn.client = client
        conn._route(rest)

    def eof_received(self) -> bool | None:
        if self.done:
            return False
        if self.started:
            # A direct client that closed its side while its first bytes could still be a signature.
            held = self.reader.buffered
            conn = self._hand_over()
            if held:
                conn.data_received(held)
            return conn.eof_received()
        self._close("incomplete", "the client closed before its PROXY header was complete")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if not self.done:
            if not self.started and conn.reason is None:
                conn.reason = "incomplete"
                conn.site.inbound_stats.closed["incomplete"] += 1
            self._finish()
        conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()

    def _timeout(self) -> None:
        self.timer = None
        if not self.done:
            self._close("timeout", f"no complete PROXY header within {inbound.HEADER_TIMEOUT}s of accept")

    def _finish(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _hand_over(self) -> TcpConnection:
        self._finish()
        conn = self.conn
        conn.transport.set_protocol(conn)
        return conn

    def _close(self, reason: str, detail: str) -> None:
        self._finish()
        conn = self.conn
        conn.site.inbound_stats.closed[reason] += 1
        log.debug("tcp %s client %s: %s (%s)", conn.site.name, conn.client, detail, reason)
        if self.started:
            conn.abort(reason)  # the splice is dialling (or spliced): cut both sides
        else:
            if conn.reason is None:
                conn.reason = reason
            reset(conn.transport)

    def __repr__(self) -> str:
        return f"<inbound phase {self.conn!r} {self.reader!r}{' done' if self.done else ''}>"


def tcp_front(listener: Listener):
    """The protocol factory of a tcp listener: ``factory(peer)`` -> a ``TcpConnection``.
    Adds ``inbound_stats`` (``InboundStats``) to the listener."""
    listener.inbound_stats = InboundStats()  # type: ignore[attr-defined]

    def factory(peer: tuple | None = None) -> TcpConnection:
        return TcpConnection(listener, peer)

    return factory
