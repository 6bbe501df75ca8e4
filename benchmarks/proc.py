"""Process helpers shared by the harness: free ports, readiness, process trees, RSS, CPU pinning, limits."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


def python_env() -> dict[str, str]:
    """The environment for Python children (responder, pproxy shim, load client, mesh): this checkout first on
    the path, whatever the harness's working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class BenchError(RuntimeError):
    """The harness cannot go on: a peer did not start, a tool failed, a result is malformed."""


def raise_nofile(want: int = 200_000) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it); return the soft limit now in force.

    10,000 idle proxied connections need 10,000 client sockets here and 20,000 in the proxy.  As root the
    hard limit can be raised (up to fs.nr_open); otherwise the soft limit goes up to the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((max(want, soft), max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nofile_limit() -> int:
    """The soft RLIMIT_NOFILE in force (peers inherit it; their configs are sized from it)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago, for programs that cannot report the port they bound (nginx, haproxy).

    There is a small race with other programs; ``wait_port`` with the process handle turns a lost race into a
    clear error instead of a hang.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: Proc | None = None, timeout: float = 10.0) -> None:
    """Return once ``host:port`` accepts a TCP connection; raise BenchError on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(
                f"{proc.name} exited with code {proc.popen.returncode} before listening on "
                f"{host}:{port}:\n{proc.log_tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = proc.log_tail() if proc is not None else ""
            raise BenchError(f"nothing listens on {host}:{port} after {timeout}s\n{tail}")
        time.sleep(0.02)


def pin_prefix(cpus: str | None) -> list[str]:
    """``taskset -c CPUS`` (exec's the command, so the pid stays the same), or nothing."""
    if not cpus or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpus]


class Proc:
    """A child process with its output in a log file; ``stop()`` is idempotent."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        cpus: str | None = None,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.argv = [*pin_prefix(cpus), *argv]
        self.log = log
        self._logf = open(log, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._logf,
            stderr=self._logf,
            env=env,
            start_new_session=True,  # a Ctrl-C of the harness reaches the harness only; it stops children itself
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def read_line(self, prefix: str, timeout: float = 15.0) -> str:
        """Read stdout lines until one starts with ``prefix``; return the rest of that line."""
        import selectors

        assert self.popen.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                line = self.popen.stdout.readline().decode(errors="replace")
                if not line:
                    break
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
        finally:
            sel.close()
        raise BenchError(
            f"{self.name} did not print {prefix!r} within {timeout}s (exit code "
            f"{self.popen.poll()}):\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in lines[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._logf.close()

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.popen.poll()}>"


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx workers, mesh workers)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def rss_bytes(pids: Sequence[int]) -> int:
    """Sum of VmRSS over ``pids`` (processes that vanished count 0)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time consumed so far by ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def parse_cpus(text: str) -> set[int]:
    """ "0", "0,1" or "0-3" (taskset's list syntax) -> set of CPU numbers."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise BenchError(f"CPU list must look like 0 or 0,1 or 0-3; got {text!r}")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def machine_busy_seconds() -> float:
    """CPU seconds spent busy (not idle/iowait) by the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(v) for v in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU of this process's waited-for children (wrk, the Python load client)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
