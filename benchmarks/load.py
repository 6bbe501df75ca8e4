"""Load generators: wrk (preferred) in its own process, or a multiprocess Python client when wrk is absent.

Both return a ``LoadResult``: requests, bytes, errors and latency percentiles in milliseconds.  Every run is
bounded by its duration (wrk is also killed after duration + 30 s).  ``close=True`` sends
``Connection: close`` so that every request opens a new connection (the churn workload).  ``hosts`` (the HTTP
suite's Host-routed workload) sends successive requests with ``Host:`` cycling through those names (wrk: a Lua
``request()`` returning prebuilt requests; the Python client: prebuilt requests taken in turn).
"""

from __future__ import annotations

import array
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.proc import BenchError, parse_cpus, pin_prefix, python_env

# wrk calls done() once at the end; its latency object is in microseconds.
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"mean_us":%.3f,"max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""

# Prebuilt requests, one per host name, taken in turn (wrk.format copies the -H headers, e.g. Connection: close).
WRK_HOSTS_LUA = r"""
local hosts = {%s}
local reqs = {}
local n = 0
init = function(args)
  for i, h in ipairs(hosts) do
    local headers = {}
    for k, v in pairs(wrk.headers) do headers[k] = v end
    headers["Host"] = h
    reqs[i] = wrk.format(nil, nil, headers)
  end
end
request = function()
  n = n %% #reqs + 1
  return reqs[n]
end
"""


def _lua_hosts(hosts: list[str]) -> str:
    for h in hosts:
        if not h or any(c in h for c in '"\\\r\n '):
            raise BenchError(f"host name {h!r} cannot go into a request")
    return WRK_HOSTS_LUA % ", ".join(f'"{h}"' for h in hosts)


@dataclass
class LoadResult:
    """One bounded load run.  Latencies are in milliseconds."""

    requests: int
    duration_s: float
    bytes: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    tool: str

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        d = asdict(self)
        d["rps"] = round(self.rps, 1)
        d["mbps"] = round(self.bytes / self.duration_s / 1e6, 2) if self.duration_s > 0 else 0.0
        return d


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    host: str,
    port: int,
    path: str,
    connections: int,
    duration: int,
    *,
    close: bool = False,
    threads: int = 1,
    cpus: str | None = None,
    workdir: Path | None = None,
    hosts: list[str] | None = None,
) -> LoadResult:
    """Run ``wrk -t THREADS -c CONNECTIONS -d DURATION`` against http://host:port/path."""
    if duration < 1:
        raise BenchError(f"wrk duration must be at least 1 s, got {duration}")
    threads = max(1, min(threads, connections))
    script = (workdir or Path("/tmp")) / ("meshbench-wrk-hosts.lua" if hosts else "meshbench-wrk.lua")
    script.write_text((_lua_hosts(hosts) if hosts else "") + WRK_LUA)
    argv = [
        *pin_prefix(cpus),
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{host}:{port}{path}")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {duration + 30}s: {' '.join(argv)}") from exc
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            d = json.loads(line[len("WRKJSON ") :])
            break
    else:
        raise BenchError(f"wrk printed no result (exit {out.returncode}): {out.stderr.strip() or out.stdout[-500:]}")
    # wrk counts a non-2xx/3xx answer as a status error and socket failures in connect/read/write/timeout.
    errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return LoadResult(
        requests=d["requests"],
        duration_s=d["duration_us"] / 1e6,
        bytes=d["bytes"],
        errors=errors,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        p999_ms=d["p999_us"] / 1000,
        mean_ms=d["mean_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        tool="wrk",
    )


# -- the Python fallback client -------------------------------------------------------------------------------


class _HttpClient(asyncio.Protocol):
    """One connection that sends a GET, reads the whole response (Content-Length), and repeats until the
    deadline.  In churn mode the server closes after each response and the driver opens a new connection."""

    __slots__ = ("buf", "done", "driver", "need", "sent", "transport")

    def __init__(self, driver: _Driver) -> None:
        self.driver = driver
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.need = -1  # body bytes still expected; -1 = reading the head
        self.sent = 0
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter_ns()
        d = self.driver
        if d.rotate:
            d.turn = (d.turn + 1) % len(d.rotate)
            self.transport.write(d.rotate[d.turn])
        else:
            self.transport.write(d.request)

    def data_received(self, data: bytes) -> None:
        d = self.driver
        d.bytes += len(data)
        while data:
            if self.need < 0:
                buf = self.buf + data
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = buf
                    return
                head = buf[:end]
                if not head.startswith(b"HTTP/1.1 200"):
                    d.errors += 1
                i = head.lower().find(b"content-length:")
                if i < 0:
                    self.need = 0
                else:
                    j = head.find(b"\r\n", i)
                    self.need = int(head[i + 15 : j if j > 0 else len(head)])
                self.buf = b""
                data = buf[end + 4 :]
            take = min(self.need, len(data))
            self.need -= take
            data = data[take:]
            if self.need == 0:
                self.need = -1
                now = time.perf_counter_ns()
                d.latencies.append((now - self.sent) // 1000)
                d.requests += 1
                if d.close or now >= d.deadline_ns:
                    self.done = True
                    assert self.transport is not None
                    self.transport.close()
                    return
                self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self.driver.errors += 1
        self.driver.closed(self)


class _Driver:
    def __init__(
        self, host: str, port: int, path: str, close: bool, deadline_ns: int, hosts: list[str] | None = None
    ) -> None:
        self.host, self.port, self.close, self.deadline_ns = host, port, close, deadline_ns
        conn = b"close" if close else b"keep-alive"
        self.request = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: %s\r\n\r\n" % (path.encode(), host.encode(), conn)
        # With host names: successive requests (of any connection) take them in turn.
        self.rotate = [
            b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: %s\r\n\r\n" % (path.encode(), h.encode(), conn)
            for h in hosts or ()
        ]
        self.turn = -1
        self.requests = self.bytes = self.errors = 0
        self.latencies = array.array("Q")
        self.live = 0
        self.finished: asyncio.Event | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def closed(self, _client: _HttpClient) -> None:
        self.live -= 1
        if time.perf_counter_ns() < self.deadline_ns:
            self._spawn()
        elif self.live == 0 and self.finished is not None:
            self.finished.set()

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self.open())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.live += 1
        try:
            await loop.create_connection(lambda: _HttpClient(self), self.host, self.port)
        except OSError:
            self.errors += 1
            self.live -= 1
            if time.perf_counter_ns() < self.deadline_ns:
                await asyncio.sleep(0.01)
                self._spawn()
            elif self.live == 0 and self.finished is not None:
                self.finished.set()

    async def run(self, connections: int, duration: float) -> None:
        self.finished = asyncio.Event()
        for _ in range(connections):
            await self.open()
        # Bounded: the deadline stops every connection; the extra time covers the last in-flight responses.
        try:
            await asyncio.wait_for(self.finished.wait(), duration + 10)
        except TimeoutError:
            self.errors += self.live


def _worker_main(argv: list[str]) -> int:
    """``python -m benchmarks.load HOST PORT PATH CONNECTIONS DURATION CLOSE OUTFILE [CPUS [HOSTS]]``: one client
    process (HOSTS: comma-separated Host names taken in turn).

    Latencies (microseconds, uint64) go to OUTFILE; the counters are printed as one ``RESULT {json}`` line.
    """
    import os

    import uvloop

    host, port, path, conns, duration, close, out = argv[:7]
    if len(argv) > 7 and argv[7]:
        os.sched_setaffinity(0, parse_cpus(argv[7]))
    hosts = [h for h in argv[8].split(",") if h] if len(argv) > 8 else None
    start_ns = time.perf_counter_ns()
    drv = _Driver(host, int(port), path, close == "1", start_ns + int(float(duration) * 1e9), hosts)
    uvloop.run(drv.run(int(conns), float(duration)))
    elapsed = (time.perf_counter_ns() - start_ns) / 1e9
    Path(out).write_bytes(drv.latencies.tobytes())
    res = {"requests": drv.requests, "bytes": drv.bytes, "errors": drv.errors, "elapsed": elapsed}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def _pct(sorted_vals: array.array, p: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[i] / 1000


def run_python(
    host: str,
    port: int,
    path: str,
    connections: int,
    duration: float,
    *,
    close: bool = False,
    procs: int = 1,
    cpus: str | None = None,
    hosts: list[str] | None = None,
) -> LoadResult:
    """The fallback client: ``procs`` processes share ``connections`` and report merged results."""
    procs = max(1, min(procs, connections))
    tmp = Path(tempfile.mkdtemp(prefix="meshbench-load-"))
    workers = []
    try:
        for i in range(procs):
            share = connections // procs + (1 if i < connections % procs else 0)
            out = tmp / f"lat{i}.bin"
            argv = [
                sys.executable,
                "-m",
                "benchmarks.load",
                host,
                str(port),
                path,
                str(share),
                str(duration),
                "1" if close else "0",
                str(out),
                cpus or "",
                ",".join(hosts or ()),
            ]
            popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env())
            workers.append((popen, out))
        requests = nbytes = errors = 0
        elapsed = 0.0
        lat = array.array("Q")
        for p, out in workers:
            try:
                stdout, stderr = p.communicate(timeout=duration + 30)
            except subprocess.TimeoutExpired as exc:
                p.kill()
                raise BenchError(f"python load client did not finish within {duration + 30}s") from exc
            line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise BenchError(f"python load client failed (exit {p.returncode}): {stderr.strip()[-800:]}")
            r = json.loads(line[7:])
            requests, nbytes, errors = requests + r["requests"], nbytes + r["bytes"], errors + r["errors"]
            elapsed = max(elapsed, r["elapsed"])
            lat.frombytes(out.read_bytes())
    finally:
        for p, _ in workers:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    vals = array.array("Q", sorted(lat))
    mean = (sum(vals) / len(vals) / 1000) if vals else 0.0
    return LoadResult(
        requests=requests,
        duration_s=elapsed,
        bytes=nbytes,
        errors=errors,
        p50_ms=_pct(vals, 50),
        p90_ms=_pct(vals, 90),
        p99_ms=_pct(vals, 99),
        p999_ms=_pct(vals, 99.9),
        mean_ms=mean,
        max_ms=(vals[-1] / 1000 if vals else 0.0),
        tool=f"python x{procs}",
    )


def run_load(
    tool: str,
    host: str,
    port: int,
    path: str,
    connections: int,
    duration: float,
    *,
    close: bool = False,
    cpus: str | None = None,
    workdir: Path | None = None,
    procs: int = 1,
    hosts: list[str] | None = None,
) -> LoadResult:
    """``tool``: "wrk" or "python"."""
    if tool == "wrk":
        return run_wrk(
            host, port, path, connections, max(1, round(duration)), close=close, cpus=cpus, workdir=workdir, hosts=hosts
        )
    if tool == "python":
        return run_python(host, port, path, connections, duration, close=close, procs=procs, cpus=cpus, hosts=hosts)
    raise BenchError(f"load tool must be wrk or python, got {tool!r}")


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
