"""Running the data plane on uvloop.

``run(main_coro)`` uses ``asyncio.Runner(loop_factory=uvloop.new_event_loop)``;
when uvloop cannot be imported (another platform, a stripped install) it runs
on asyncio's default loop and warns once, with the ImportError's message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_warned = False


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """``uvloop.new_event_loop``, or asyncio's default with one warning (naming the ImportError) when uvloop
    cannot be imported."""
    global _warned
    try:
        import uvloop
    except ImportError as exc:
        if not _warned:
            _warned = True
            # Say why: "No module named 'uvloop'" (not installed) and a broken build (an ImportError from
            # its extension module) call for different fixes.
            log.warning("uvloop is not available (%s); running on the asyncio event loop (slower)", exc)
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Run ``main`` to completion on a new uvloop (or asyncio) event loop and return its result."""
    with asyncio.Runner(loop_factory=loop_factory(), debug=debug) as runner:
        return runner.run(main)
