"""Process resource limits.

A proxy holds two descriptors per connection, so the default soft
RLIMIT_NOFILE (often 1024) caps it at ~500 connections.  ``raise_nofile`` lifts
the soft limit to the hard limit, and beyond it when a larger ``max_fds`` is
asked for and the process may raise its hard limit (root with
CAP_SYS_RESOURCE, up to ``/proc/sys/fs/nr_open``).  It never lowers a limit.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["nofile", "raise_nofile"]

log = logging.getLogger(__name__)

_NR_OPEN = "/proc/sys/fs/nr_open"


def nofile() -> tuple[int, int]:
    """The current (soft, hard) RLIMIT_NOFILE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _nr_open() -> int | None:
    try:
        with open(_NR_OPEN) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def raise_nofile(max_fds: int | None = None) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, or to ``max_fds`` when that is larger
    (raising the hard limit too, where permitted; otherwise a warning and the hard limit).

    Returns the soft limit now in force.  Raises ValueError for a bad ``max_fds``.
    """
    if max_fds is not None and (isinstance(max_fds, bool) or not isinstance(max_fds, int) or max_fds < 1):
        raise ValueError(f"max_fds must be a positive integer, got {max_fds!r}")
    soft, hard = nofile()
    inf = resource.RLIM_INFINITY
    if hard == inf:
        # RLIM_INFINITY is not a valid soft limit for descriptors: the kernel caps at nr_open.
        cap = _nr_open() or soft
        target = max(soft, min(max_fds or cap, cap))
        new_hard = hard
    elif max_fds is not None and max_fds > hard:
        cap = _nr_open()
        target = min(max_fds, cap) if cap else max_fds
        new_hard = target
    else:
        target, new_hard = hard, hard
    if target <= soft and new_hard == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, new_hard))
        return target
    except (ValueError, OSError) as exc:
        if new_hard == hard:
            log.warning("cannot raise the soft fd limit from %d to %d: %s", soft, target, exc)
            return soft
        log.warning("cannot raise the fd limit to %d (hard limit %d): %s; using %d", target, hard, exc, hard)
    if hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft
