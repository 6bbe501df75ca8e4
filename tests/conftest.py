from __future__ import annotations

import asyncio

import uvloop


def pytest_asyncio_loop_factories(config, item):
    """Run async tests on both the default asyncio loop and uvloop (the product's loop).

    Tests marked ``uvloop_only`` (expensive ones: gigabytes, thousands of sockets, real engines)
    run once, on uvloop.
    """
    if item.get_closest_marker("uvloop_only"):
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
