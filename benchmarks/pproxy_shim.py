"""Run pproxy on uvloop: ``python -m benchmarks.pproxy_shim -l ...`` = ``pproxy -l ...``.

pproxy 2.7 calls ``uvloop.install()`` and then ``asyncio.get_event_loop()``, which uvloop >= 0.21 refuses when
no loop was set ("There is no current event loop").  This shim makes ``install()`` also set a fresh uvloop loop,
so pproxy runs unchanged on the loop it was written for.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


def _install() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(uvloop.new_event_loop())


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # set_event_loop_policy is deprecated on new Pythons
    uvloop.install = _install
    from pproxy.server import main

    sys.argv[0] = "pproxy"
    sys.exit(main())
