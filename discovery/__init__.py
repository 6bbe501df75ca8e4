"""discovery: Docker Engine API -> RoutingTable.

Layers (see docs/discovery.md):
- ``engine``: read-only async Engine API client (aiohttp, unix socket or tcp+TLS).
- ``records``: raw API dicts -> small frozen records, at the boundary.
- ``events``: the pure ``classify(event) -> EngineEvent`` (drain, undrain, health, exec probe ...).
- ``labels``: ``mesh.*`` labels -> options; ``LabelError`` names the bad label.
- ``builder``: the pure ``build_table(records...) -> (RoutingTable, problems)``.
- ``follow``: ``Follower``, the one session loop (subscribe, list, follow, reconnect).
- ``watcher``: events -> coalesced re-listings -> published tables, on ``follow``.
- ``cluster``, ``localtasks``: cluster mode (the manager's cluster state; a node's own task containers).

The composition root (meshagent) only needs ``watch()`` and ``probe()`` (cluster mode: ``cluster`` and
``localtasks``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from .builder import Problem, build_table
from .engine import (
    DockerHost,
    Engine,
    EngineAPIError,
    EngineError,
    EngineUnavailable,
    HostError,
    NotFound,
    StreamEnded,
    resolve_docker_host,
)
from .labels import LabelError, parse_labels
from .watcher import PublishFn, PublishInfo, Watcher, WatcherStats

__all__ = [
    "DockerHost",
    "Engine",
    "EngineAPIError",
    "EngineError",
    "EngineUnavailable",
    "HostError",
    "LabelError",
    "NotFound",
    "Problem",
    "PublishInfo",
    "StreamEnded",
    "Watcher",
    "WatcherStats",
    "build_table",
    "parse_labels",
    "probe",
    "resolve_docker_host",
    "watch",
]


async def watch(
    docker_host: str | None,
    publish: PublishFn,
    *,
    env: Mapping[str, str] | None = None,
    api_version: str | None = None,
    on_watcher: Callable[[Watcher], None] | None = None,
    **options: Any,
) -> None:
    """Follow the engine at ``docker_host`` (None: DOCKER_HOST / the local socket, as
    the docker CLI finds it) and call ``publish(table, info)`` for every new table.

    Runs until cancelled (or until the watcher is stopped via ``on_watcher``).
    ``options`` go to ``Watcher`` (mode, coalesce, backstop, converge_interval,
    converge_timeout, backoff_max, on_lag, ...).  ``on_watcher`` receives the
    Watcher before it starts, e.g. to read its ``stats`` and ``lag_samples`` for
    metrics.  Raises ``HostError`` for an unusable address; an engine that is
    down is retried forever (the last table stays published).
    """
    host = resolve_docker_host(docker_host, os.environ if env is None else env)
    async with Engine(host, api_version=api_version) as engine:
        watcher = Watcher(engine, publish, **options)
        if on_watcher is not None:
            on_watcher(watcher)
        await watcher.run()


async def probe(
    docker_host: str | None = None, *, env: Mapping[str, str] | None = None, timeout: float = 2.0
) -> DockerHost | None:
    """The engine that ``watch(docker_host)`` would use, if it answers GET /_ping within
    ``timeout``; else None.  ``mesh run`` without --config uses this to decide whether
    a local engine is there."""
    try:
        host = resolve_docker_host(docker_host, os.environ if env is None else env)
    except HostError:
        return None
    async with Engine(host, timeout=timeout) as engine:
        try:
            return host if await engine.ping() else None
        except EngineError:
            return None
