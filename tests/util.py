"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


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
