"""Active health checks of a pool's endpoints.

Rules:

- One ``HealthChecker`` per pool, one asyncio task per checker.  Each round
  probes every live, directly reached host of the pool concurrently (at most
  ``MAX_CONCURRENT_PROBES`` at a time), each probe first delayed by
  ``rng.uniform(0, jitter * interval)`` so nodes do not probe in lock step.
  The next round starts ``interval`` after the previous one started (or at once
  if the probes took longer).  Hosts added or removed by ``pool.update`` are
  picked up by the next round because each round reads ``pool.hosts`` afresh.
- Hosts reached through another node's agent (``via`` set) are skipped: the
  agent on that node checks them.  Draining hosts are skipped: they get no new
  connections, so their health does not matter.
- Initial state: hosts start healthy, with or without a check.  A failing check
  marks a host unhealthy after ``fall`` failures in a row; an unhealthy host
  comes back after ``rise`` passes in a row.  Why not start "unknown": discovery
  lists only running containers, so a new replica is almost always fine; starting
  unhealthy would remove capacity on every scale-up and turn an agent restart
  into a total outage until ``rise`` probes passed.  A broken new replica gets
  traffic for at most ``fall`` rounds, and passive outlier detection (connect
  failures) usually ejects it sooner.  The first round runs as soon as the
  checker starts.
- ``stop()`` cancels the task and its probes, and clears the failed-check bit
  of every host (a check that is no longer configured must not keep hosts out).
- kind "tcp": a connect within ``timeout`` passes.  kind "http": a tiny HTTP/1.1
  client sends ``GET path`` with a Host header and ``Connection: close``, reads
  only the status line (bounded to ``MAX_STATUS_LINE`` bytes) within
  ``timeout``, and passes when the status is in ``expect_status``.
"""

from __future__ import annotations

import asyncio
import logging
import random

from mesh.host import FAILED_ACTIVE_HC, Host
from mesh.pool import Pool
from mesh.routing import HealthCheck, format_hostport

__all__ = ["MAX_CONCURRENT_PROBES", "MAX_STATUS_LINE", "HealthChecker", "ProbeFailed", "probe"]

log = logging.getLogger(__name__)

MAX_CONCURRENT_PROBES = 64
MAX_STATUS_LINE = 1024


class ProbeFailed(Exception):
    """A probe did not pass; the message says why (for the health-flip log line)."""


async def _http_status(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, check: HealthCheck, host: str
) -> int:
    request = (
        f"GET {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mesh-health-check\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    )
    writer.write(request.encode("latin-1"))
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise ProbeFailed(f"status line longer than {MAX_STATUS_LINE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        raise ProbeFailed(f"connection closed before a status line ({len(exc.partial)} bytes)") from None
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ProbeFailed(f"bad status line {line[:80]!r}")
    return int(parts[1])


async def probe(address: str, port: int, check: HealthCheck) -> None:
    """Probe ``address:port`` once; return on a pass, raise ``ProbeFailed`` naming the reason otherwise."""
    writer = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(address, port, limit=MAX_STATUS_LINE)
            if check.kind == "http":
                status = await _http_status(reader, writer, check, check.host or format_hostport(address, port))
                if status not in check.expect_status:
                    raise ProbeFailed(f"HTTP status {status}, expected {'/'.join(map(str, check.expect_status))}")
    except TimeoutError:
        raise ProbeFailed(f"timed out after {check.timeout}s") from None
    except ConnectionRefusedError:
        raise ProbeFailed("connection refused") from None
    except OSError as exc:
        raise ProbeFailed(f"{type(exc).__name__}: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()  # a plain FIN: the endpoint should not log a reset for every probe


class HealthChecker:
    """Probes a pool's hosts every ``check.interval`` and writes ``pool.set_active_health``.  See the module docstring."""

    def __init__(self, pool: Pool, check: HealthCheck, *, rng: random.Random | None = None) -> None:
        for name, value in (("path", check.path), ("host", check.host or "")):
            if any(c <= " " or c == "\x7f" for c in value):
                raise ValueError(
                    f"service {pool.service}: health check {name} must not contain spaces or control "
                    f"characters, got {value!r}"
                )
        self.pool = pool
        self.check = check
        self._rng = rng if rng is not None else random.Random()
        self._task: asyncio.Task[None] | None = None
        # Host -> (passes in a row, failures in a row); pruned to the pool's hosts each round.
        self._streaks: dict[Host, list[int]] = {}
        self._sem: asyncio.Semaphore | None = None
        self.rounds = 0  # completed rounds, for tests and the admin API

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start probing (the first round begins at once).  Needs a running loop; idempotent."""
        if self.running:
            return
        self._sem = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"health {self.pool.service}:{self.pool.port}"
        )

    def stop(self) -> asyncio.Future[None]:
        """Cancel probing now and clear the failed-check bit of every host.

        Returns a future that is done once the task has finished; awaiting it is
        optional (``await checker.stop()`` guarantees nothing runs afterwards).
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        task, self._task = self._task, None
        for host in self.pool.hosts:
            if host.health & FAILED_ACTIVE_HC:
                self.pool.set_active_health(host, True, "health check removed")
        self._streaks.clear()
        if task is None or task.done():
            done.set_result(None)
        else:
            task.cancel()
            task.add_done_callback(lambda _t: done.done() or done.set_result(None))
        return done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.check.interval
        while True:
            started = loop.time()
            try:
                await self.run_round()
            except Exception:
                # A bug must not silently end health checking for good: log, try next round.
                log.exception("health check round of service %s port %d failed", self.pool.service, self.pool.port)
            delay = started + interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def run_round(self) -> None:
        """Probe every eligible host once (concurrently) and apply rise/fall."""
        hosts = [h for h in self.pool.hosts if h.via is None and not h.draining]
        current = set(self.pool.hosts)
        for gone in [h for h in self._streaks if h not in current]:
            del self._streaks[gone]
        if hosts:
            await asyncio.gather(*(self._probe_host(h) for h in hosts))
        self.rounds += 1

    async def _probe_host(self, host: Host) -> None:
        check = self.check
        if check.jitter > 0:
            await asyncio.sleep(self._rng.uniform(0, check.jitter * check.interval))
        if self._sem is None:
            self._sem = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        async with self._sem:
            try:
                await probe(host.address, host.port, check)
            except ProbeFailed as exc:
                self._record(host, False, str(exc))
            except Exception as exc:  # e.g. a malformed address: a failure, not the end of the checker
                self._record(host, False, f"{type(exc).__name__}: {exc}")
            else:
                self._record(host, True, "")

    def _record(self, host: Host, passed: bool, reason: str) -> None:
        streak = self._streaks.get(host)
        if streak is None:
            streak = self._streaks[host] = [0, 0]
        failed_now = bool(host.health & FAILED_ACTIVE_HC)
        if passed:
            streak[0] += 1
            streak[1] = 0
            if failed_now and streak[0] >= self.check.rise:
                self.pool.set_active_health(host, True, f"{streak[0]} passes in a row")
        else:
            streak[0] = 0
            streak[1] += 1
            if not failed_now and streak[1] >= self.check.fall:
                self.pool.set_active_health(host, False, f"{streak[1]} failures in a row, last: {reason}")
            elif streak[1] == 1:
                log.debug("health check of %s (%s:%d) failed: %s", host.id, self.pool.service, self.pool.port, reason)

    def __repr__(self) -> str:
        failed = sum(1 for h in self.pool.hosts if h.health & FAILED_ACTIVE_HC)
        return (
            f"<HealthChecker {self.pool.service}:{self.pool.port} {self.check.kind} every {self.check.interval}s "
            f"rounds={self.rounds} failed={failed} {'running' if self.running else 'stopped'}>"
        )
