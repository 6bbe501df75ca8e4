"""The dialer: choose -> connect (with a deadline) -> retry on another host -> report to the pool.

One dial task per spliced connection, started by ``Splice._start`` with the
first host already chosen and counted (``host.active += 1``).  Rules:

- Each attempt connects to ``host.dial`` (the endpoint, or the tunnel of the
  agent on its node) within ``options.connect_timeout``.  The deadline is one
  ``loop.call_at`` handle that cancels the task (``Splice._dial_timeout``), not
  an ``asyncio.timeout`` context per attempt.
- A failed attempt gives back ``host.active``, counts the failure by reason
  (``RouteStats.connect_failures``), reports it to the pool (outlier ejection),
  and retries on a host this connection has not tried (``Splice._next_host``),
  at most ``options.retries`` times.  Nothing has been sent upstream before a
  connect succeeded, so a retry is always safe.
- Running out of descriptors or kernel memory *here* (EMFILE, ENFILE, ENOBUFS,
  ENOMEM on our own socket) is not the endpoint's fault: it is counted as
  "local_resources", never reported to the pool, tells the site
  (``resources_exhausted``: accepting pauses, counted as fd exhaustion), and the
  same host is tried again every ``RESOURCES_RETRY`` seconds while the connect
  timeout allows: the client waits rather than being closed.
- Success hands the upstream transport to the splice (``Upstream.connection_made``
  -> ``Splice._upstream_made``), which then owns the host's active count.
- The downstream going away cancels the task; whatever the task still holds is
  given back in ``finally``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.host import Host
    from mesh.proxy.splice import Splice

__all__ = ["connect_failure_reason", "dial"]

log = logging.getLogger(__name__)

_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})
_LOCAL_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCES_RETRY = 0.25  # seconds between attempts while our own descriptors are exhausted


def connect_failure_reason(exc: BaseException) -> str:
    """The ``RouteStats.connect_failures`` key for a failed connect."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError):
        if exc.errno in _UNREACHABLE:
            return "unreachable"
        if exc.errno in _LOCAL_RESOURCES:
            return "local_resources"
    return "error"


async def dial(splice: Splice, host: Host) -> None:
    """Connect ``splice`` to ``host`` or, failing that, to other hosts (see the module docstring)."""
    loop = splice.loop
    pool = splice.pool
    opts = splice.options
    stats = pool.stats  # type: ignore[union-attr]
    timeout = opts.connect_timeout
    task = splice._dial_task
    tried: list[Host] = list(splice._tried) if splice._tried else []  # tunnels that refused it count too
    started = loop.time()
    holding = True  # this task holds ``host.active += 1`` for ``host``
    try:
        while True:
            proto = (splice.upstream_protocol if host.via is None else splice.tunnel_protocol)(splice, host)
            t0 = loop.time()
            splice._dial_expired = False
            timer = loop.call_at(t0 + timeout, splice._dial_timeout)
            err: BaseException | None = None
            try:
                addr, port = host.dial
                await loop.create_connection(lambda p=proto: p, addr, port)
            except asyncio.CancelledError:
                if not splice._dial_expired:
                    raise
                task.uncancel()  # type: ignore[union-attr]
                err = TimeoutError(f"connect timed out after {timeout}s")
            except Exception as exc:
                err = exc
            finally:
                timer.cancel()
            if err is None or proto.made:
                holding = False  # _upstream_made took over the host (or connection_lost will)
                if err is None:
                    host.stats.connect_time.observe(loop.time() - t0)
                return
            reason = connect_failure_reason(err)
            stats.connect_failed(reason)
            log.debug("%r: connect to %r failed: %s (%r)", splice, host, reason, err)
            if reason == "local_resources":
                # Our own descriptors (or kernel memory) ran out: accepting pauses, and this client
                # waits and tries the same host again, within the connect timeout overall.
                exhausted = getattr(splice.site, "resources_exhausted", None)
                if exhausted is not None:
                    exhausted(err)
                if splice._down_lost or loop.time() - started + RESOURCES_RETRY > timeout:
                    stats.connection_failed(reason)
                    splice._dial_failed(reason)
                    return
                await asyncio.sleep(RESOURCES_RETRY)
                continue
            holding = False
            host.active -= 1
            pool.report_failure(host)  # type: ignore[union-attr]
            if splice._down_lost:
                splice._dial_failed(reason)
                return
            tried.append(host)
            if len(tried) > opts.retries or (host := splice._next_host(tried)) is None:  # type: ignore[assignment]
                stats.connection_failed(reason)
                splice._dial_failed(reason)
                return
            stats.retries += 1
            host.active += 1
            holding = True
    finally:
        if holding:
            host.active -= 1
        splice._dial_task = None
        splice._release()
