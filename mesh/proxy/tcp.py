"""The TCP front: a published port whose connections are spliced as they are.

Nothing happens before the splice: at accept the listener's route is read ONCE
(its pool and options), a host is chosen with no await in between, and the
splice dials it while the client's first bytes wait in the pre-connect buffer.
No host -> ``no_endpoint`` is counted and the client is closed at once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mesh.proxy.splice import WRITE_HIGH, Splice

if TYPE_CHECKING:
    from mesh.listener import Listener

__all__ = ["TcpConnection", "tcp_front"]


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
        self.options = pool.options
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


def tcp_front(listener: Listener):
    """The protocol factory of a tcp listener: ``factory(peer)`` -> a ``TcpConnection``."""

    def factory(peer: tuple | None = None) -> TcpConnection:
        return TcpConnection(listener, peer)

    return factory
