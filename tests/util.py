"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterator


async def wait_for(
    cond: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> None:
    """Poll ``cond`` until it is true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        res = cond()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond!r}")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A fixed port for ``--workers N`` (each worker binds the route's own port, so port 0 cannot be used).

    The socket is bound with SO_REUSEPORT and held, never listening, for the whole block: no other
    process can take the port in the meantime (a bind without SO_REUSEPORT, or by another user, fails,
    and the kernel never hands it out as an ephemeral port), while the workers (SO_REUSEPORT, same user)
    can bind it.  It takes no connections: only listening sockets do.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
