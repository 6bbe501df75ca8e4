"""``--workers N``: one parent owns the table source and the admin API; N worker processes carry the traffic.

Each worker is ``python -m meshagent worker --control-fd FD --sockets-fd FD2 ...`` running
``mesh.runtime.Mesh`` on uvloop.  The parent binds every port of the table as N SO_REUSEPORT sockets,
one per worker (the kernel spreads new connections over the group), keeps them, and hands socket i to
worker i (SCM_RIGHTS over the second socketpair, FD2).  Because the parent holds every socket, a worker
that exits or is restarted loses nothing queued on its socket (the next process of that slot accepts it),
and a handover (meshagent/handover.py) passes all of them to a new agent, whose workers accept from the
same queues while the old workers drain.  Port 0 is still refused (the parent binds only named ports).

Control channel: a unix socketpair per worker (the child's end is passed as FD), carrying JSON objects, one
per line (UTF-8, "\\n"-terminated), documented in docs/ARCHITECTURE.md ("Worker control channel"):

    parent -> worker  {"type": "sockets", "sockets": [{"kind", "host", "port", "role"}, ...]}
                      (the descriptors, in that order, were sent on the sockets channel just before)
                      {"type": "table", "table": {...RoutingTable.to_dict()...}}
                      {"type": "stats", "id": 7}
                      {"type": "ping", "id": 8}
                      {"type": "shutdown", "grace": 10.0}
    worker -> parent  {"type": "hello", "pid": 1234, "index": 0}
                      {"type": "pong", "id": 8}
                      {"type": "applied", "version": 3}
                      {"type": "stats", "id": 7, "snapshot": {...mesh.metrics.snapshot()...}}
                      {"type": "error", "message": "...", "id": 7}   (a message it could not handle;
                                                                   "id" when the request had one)

Supervision rules:
- A worker that exits while the pool is running is restarted after a backoff (0.1 s doubling to 5 s; the
  backoff resets once a worker has lived 30 s) and is sent the current table at once.
- More than ``max_restarts`` restarts of one slot within ``restart_window`` seconds is a crash loop: the pool
  gives up and sets ``failed`` (the CLI then exits 1 so an outer supervisor sees it).
- Liveness: every ``heartbeat`` seconds the parent pings each worker; any message counts as a sign of life.
  A worker silent for ``hang_timeout`` seconds (stopped, or its loop stuck) is SIGKILLed and the restart
  rule above brings a new one, which accepts what waited in its slot's queues meanwhile (the parent holds
  them open).  ``ready()`` is False while a worker is silent.
- ``shutdown(grace)`` sends SIGTERM to every worker (each stops accepting and drains for its grace), waits up
  to grace + 5 s, then SIGKILLs what is left.  A worker whose control channel closes (the parent died) drains
  and exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from mesh.routing import RoutingTable

__all__ = ["WorkerPool", "worker_main"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024 * 1024  # a routing table of many thousands of endpoints still fits


def _encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class _Worker:
    """One slot of the pool and its current process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.fdsock: socket.socket | None = None  # the parent's end of the sockets channel
        self.has: set[tuple[str, str, int]] = set()  # keys whose socket the current process was sent
        self.told = False  # asked to stop (shutdown message or SIGTERM): never signal it twice
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.applied_version: int | None = None
        self.started_at = 0.0
        self.restarts: deque[float] = deque()
        self.starts = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self.task: asyncio.Task[None] | None = None
        self.last_seen = 0.0  # monotonic time of the last message from the current process
        self.hangs = 0  # times a silent process of this slot was killed

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __repr__(self) -> str:
        return f"<worker {self.index} pid={self.pid} applied={self.applied_version} starts={self.starts}>"

    async def send(self, msg: dict[str, Any]) -> bool:
        w = self.writer
        if w is None or w.is_closing():
            return False
        try:
            w.write(_encode(msg))
            await w.drain()
        except (ConnectionError, OSError):
            return False
        return True


class WorkerPool:
    """The parent's side: spawn, feed tables, answer stats, restart, drain."""

    def __init__(
        self,
        n: int,
        worker_args: Sequence[str] = (),
        *,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        python: str = sys.executable,
        heartbeat: float = 1.0,
        hang_timeout: float = 3.0,
    ) -> None:
        if n < 1:
            raise ValueError(f"number of workers must be >= 1, got {n}")
        self.n = n
        self.worker_args = list(worker_args)
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.python = python
        self.heartbeat = heartbeat
        self.hang_timeout = hang_timeout
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._pings: set[asyncio.Task[None]] = set()
        self.table: RoutingTable | None = None
        self.failed = asyncio.Event()
        self.workers = [_Worker(i) for i in range(n)]
        self._ids = itertools.count(1)
        self._stopping = False
        # The listening sockets of the current table, bound once here and shared by every worker.
        self.sockets: dict[tuple[str, str, int], list[socket.socket]] = {}  # key -> one socket per worker
        self.roles: dict[tuple[str, str, int], str] = {}
        self.rebind_max = 30.0  # longest wait between bind retries of a port that could not be bound
        self._rebind: asyncio.TimerHandle | None = None
        self._rebind_delay = 0.5
        self._progress = asyncio.Event()  # set on every "applied" (wait_ready)

    def __repr__(self) -> str:
        return f"<WorkerPool n={self.n} version={self.table.version if self.table else None} {self.workers}>"

    # -- public -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker (they get the current table, if any, as soon as they are up)."""
        for w in self.workers:
            await self._spawn(w)
            w.task = asyncio.create_task(self._supervise(w), name=f"worker-{w.index}")
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="worker-heartbeats")

    async def publish(self, table: RoutingTable) -> None:
        """Make ``table`` current and send it to every running worker (``publish`` of a table source)."""
        if self._stopping:
            return
        self.table = table
        self._bind(table)
        msg = {"type": "table", "table": table.to_dict()}
        await asyncio.gather(*(self._send_table(w, msg) for w in self.workers))

    async def _send_table(self, w: _Worker, msg: dict[str, Any]) -> None:
        if await self._send_sockets(w):
            await w.send(msg)

    def _bind(self, table: RoutingTable) -> None:
        """Bind every named port of ``table`` not bound yet, one SO_REUSEPORT socket per worker (handed-over
        sockets first: ``bind_socket`` takes from INHERITED); close those it no longer has (the workers'
        copies stay open until they apply it)."""
        from mesh.listener import bind_socket

        wanted: dict[tuple[str, str, int], str] = {}
        for _svc, route in table.routes():
            if route.port:
                kind = "dgram" if route.protocol == "udp" else "stream"
                wanted.setdefault((kind, route.listen_host, route.port), route.protocol)
        for key in [k for k in self.sockets if k not in wanted]:
            for sock in self.sockets.pop(key):
                sock.close()
            self.roles.pop(key, None)
            for w in self.workers:
                w.has.discard(key)
        failed = []
        for key, role in wanted.items():
            self.roles[key] = role
            socks = self.sockets.setdefault(key, [])
            kind, host, port = key
            while len(socks) < self.n:
                try:
                    sock = bind_socket(host, port, udp=kind == "dgram", reuse_port=True)
                    # a socket handed over by a one-process agent has no SO_REUSEPORT: set it, so that
                    # the other workers' sockets can join it in one port group
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    socks.append(sock)
                except OSError as exc:
                    failed.append(key)
                    log.error("%s %s:%d: %s; retrying", role, host, port, exc.strerror or exc)
                    break
            if not socks:
                del self.sockets[key]
        if self._rebind is not None:
            self._rebind.cancel()
            self._rebind = None
        if failed and not self._stopping:
            self._rebind = asyncio.get_running_loop().call_later(self._rebind_delay, self._retry_bind)
            self._rebind_delay = min(self._rebind_delay * 2, self.rebind_max)
        else:
            self._rebind_delay = 0.5

    def _retry_bind(self) -> None:
        self._rebind = None
        if self.table is not None and not self._stopping:
            task = asyncio.get_running_loop().create_task(self.publish(self.table))
            self._pings.add(task)
            task.add_done_callback(self._pings.discard)

    async def _send_sockets(self, w: _Worker) -> bool:
        """Send ``w`` the sockets its process does not have yet: descriptors on the sockets channel,
        then a "sockets" message naming them, on the control channel."""
        keys = [k for k, socks in self.sockets.items() if k not in w.has and len(socks) > w.index]
        if not keys:
            return True
        if w.fdsock is None:
            return False
        fds = [self.sockets[k][w.index].fileno() for k in keys]
        try:
            for i in range(0, len(fds), 200):  # SCM_MAX_FD is 253
                socket.send_fds(w.fdsock, [b"F"], fds[i : i + 200])
        except OSError as exc:
            log.warning("worker %d: cannot send its listening sockets: %s", w.index, exc)
            return False
        entries = [{"kind": k[0], "host": k[1], "port": k[2], "role": self.roles.get(k, "")} for k in keys]
        if not await w.send({"type": "sockets", "sockets": entries}):
            return False
        w.has.update(keys)
        return True

    def listening_sockets(self) -> list[tuple[str, str, int, str, socket.socket]]:
        """``(kind, host, port, role, socket)`` of every socket the workers share (for a handover)."""
        return [(k[0], k[1], k[2], self.roles.get(k, ""), s) for k, socks in self.sockets.items() for s in socks]

    def stop_accepting(self) -> None:
        """A new agent took the sockets over: every worker stops accepting and drains (``shutdown``
        then waits for them); this process closes its copies."""
        self._stopping = True
        if self._rebind is not None:
            self._rebind.cancel()
            self._rebind = None
        for w in self.workers:
            self._tell_stop(w)
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets.clear()

    def _tell_stop(self, w: _Worker) -> None:
        if w.told or w.proc is None or w.proc.returncode is not None:
            return
        w.told = True
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(signal.SIGTERM)

    async def wait_ready(self) -> None:
        """Until ``ready()``: every worker applied the current table."""
        while not self.ready():
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), self.heartbeat)

    def ready(self) -> bool:
        """True when every worker has applied the current table and none is silent."""
        if self.table is None:
            return False
        now = time.monotonic()
        return all(
            w.applied_version == self.table.version and now - w.last_seen <= self.hang_timeout for w in self.workers
        )

    def pids(self) -> list[int | None]:
        return [w.pid for w in self.workers]

    async def stats(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """One stats snapshot per worker that answers within ``timeout`` seconds."""

        async def ask(w: _Worker) -> dict[str, Any] | None:
            rid = next(self._ids)
            fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
            w.pending[rid] = fut
            try:
                if not await w.send({"type": "stats", "id": rid}):
                    return None
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                log.warning("worker %d (pid %s) did not answer a stats request within %.1fs", w.index, w.pid, timeout)
                return None
            finally:
                w.pending.pop(rid, None)

        answers = await asyncio.gather(*(ask(w) for w in self.workers))
        return [a for a in answers if a is not None]

    async def shutdown(self, grace: float) -> None:
        """Drain every worker: SIGTERM, wait up to grace + 5 s, SIGKILL the rest."""
        self._stopping = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self._rebind is not None:
            self._rebind.cancel()
            self._rebind = None
        for w in self.workers:
            self._tell_stop(w)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), grace + 5.0)
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    log.warning("worker pid %d did not exit within the grace period; killing it", p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets.clear()
        for w in self.workers:
            if w.task is not None:
                w.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w.task
            if w.fdsock is not None:
                w.fdsock.close()
                w.fdsock = None

    # -- internals ---------------------------------------------------------------------------------
    async def _spawn(self, w: _Worker) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            cmd = [
                self.python,
                "-m",
                "meshagent",
                "worker",
                "--control-fd",
                str(child_sock.fileno()),
                "--sockets-fd",
                str(fd_child.fileno()),
                "--index",
                str(w.index),
                *self.worker_args,
            ]
            w.proc = await asyncio.create_subprocess_exec(
                *cmd, pass_fds=(child_sock.fileno(), fd_child.fileno()), stdin=asyncio.subprocess.DEVNULL
            )
        except BaseException:
            parent_sock.close()
            fd_parent.close()
            raise
        finally:
            child_sock.close()
            fd_child.close()
        if w.fdsock is not None:
            w.fdsock.close()
        fd_parent.setblocking(False)
        w.fdsock = fd_parent
        w.has = set()
        w.told = False
        reader, writer = await asyncio.open_unix_connection(sock=parent_sock, limit=MAX_MESSAGE)
        w.writer = writer
        w.applied_version = None
        w.started_at = w.last_seen = time.monotonic()
        w.starts += 1
        log.info("started worker %d, pid %d", w.index, w.proc.pid, extra={"worker": w.index, "pid": w.proc.pid})
        w.reader = reader
        if self.table is not None:
            await self._send_table(w, {"type": "table", "table": self.table.to_dict()})

    async def _read(self, w: _Worker, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, ValueError, OSError) as exc:
                log.warning("worker %d control channel failed: %s", w.index, exc)
                return
            if not line:
                return
            w.last_seen = time.monotonic()
            try:
                # a stats answer is megabytes at thousands of endpoints: decoded off the loop
                msg = json.loads(line) if len(line) < 65536 else await asyncio.to_thread(json.loads, line)
                kind = msg["type"]
            except (ValueError, KeyError, TypeError):
                log.warning("worker %d sent a malformed control message: %r", w.index, line[:200])
                continue
            if kind == "applied":
                w.applied_version = msg.get("version")
                self._progress.set()
            elif kind == "stats":
                fut = w.pending.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(msg.get("snapshot") or {})
            elif kind == "hello":
                log.debug("worker %d says hello from pid %s", w.index, msg.get("pid"))
            elif kind == "pong":
                pass  # a sign of life (last_seen)
            elif kind == "error":
                log.error("worker %d: %s", w.index, msg.get("message"))
                fut = w.pending.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(None)  # the request failed: do not wait for the timeout

    async def _heartbeats(self) -> None:
        """Ping every worker; kill one that stayed silent for ``hang_timeout`` (see the module docstring)."""
        while not self._stopping:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            for w in self.workers:
                proc = w.proc
                if proc is None or proc.returncode is not None:
                    continue
                silent = now - w.last_seen
                if silent > self.hang_timeout:
                    w.hangs += 1
                    log.error(
                        "worker %d (pid %d) silent for %.1fs (stopped or stuck): killing it so that its share of "
                        "new connections goes to the others; it is restarted",
                        w.index,
                        proc.pid,
                        silent,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    continue
                # Not awaited together: a worker that does not read must not hold up the others' pings.
                task = asyncio.get_running_loop().create_task(self._ping(w))
                self._pings.add(task)
                task.add_done_callback(self._pings.discard)

    async def _ping(self, w: _Worker) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.send({"type": "ping", "id": next(self._ids)}), self.hang_timeout)

    async def _supervise(self, w: _Worker) -> None:
        backoff = self.backoff_initial
        while True:
            proc = w.proc
            assert proc is not None and w.reader is not None
            await self._read(w, w.reader)
            rc = await proc.wait()
            if w.writer is not None:
                w.writer.close()
            if w.fdsock is not None:
                w.fdsock.close()
                w.fdsock = None
            for fut in w.pending.values():
                if not fut.done():
                    fut.cancel()
            if self._stopping:
                return
            now = time.monotonic()
            if now - w.started_at > 30.0:
                backoff = self.backoff_initial
            w.restarts.append(now)
            while w.restarts and now - w.restarts[0] > self.restart_window:
                w.restarts.popleft()
            how = f"signal {-rc}" if rc < 0 else f"code {rc}"
            if len(w.restarts) > self.max_restarts:
                log.error(
                    "worker %d (pid %d) exited with %s, its %d restart within %.0fs: giving up",
                    w.index,
                    proc.pid,
                    how,
                    len(w.restarts),
                    self.restart_window,
                )
                self.failed.set()
                return
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1fs", w.index, proc.pid, how, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)
            if self._stopping:
                return
            try:
                await self._spawn(w)
            except OSError as exc:
                log.error("cannot restart worker %d: %s", w.index, exc)
                self.failed.set()
                return


# -- the worker process ------------------------------------------------------------------------------


async def worker_main(
    control_fd: int,
    index: int,
    *,
    grace: float,
    node: str | None,
    access_log: bool = False,
    sockets_fd: int | None = None,
    token_file: str | None = None,
) -> int:
    """Body of ``python -m meshagent worker``: apply tables from the parent until told (or signalled) to stop."""
    from mesh.listener import INHERITED
    from mesh.runtime import Mesh

    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=control_fd)
    fdsock = socket.socket(fileno=sockets_fd) if sockets_fd is not None else None
    if fdsock is not None:
        INHERITED.strict = True  # every port comes from the parent (one accept queue for all workers)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE)
    if token_file:  # a worker of the cluster agent: tunnel headers (TCP and UDP) sealed with the token
        from cluster.token import read_token
        from mesh.proxy.preamble import TunnelAuth

        auth = TunnelAuth(read_token(token_file))
        mesh = Mesh(local_node=node or None, reuse_port=True, access_log=access_log,
                    tunnel_header=auth.host_header, tunnel_auth=auth)  # fmt: skip
    else:
        mesh = _make_mesh(Mesh, node=node, access_log=access_log)
    stop = asyncio.Event()

    def on_stop(sig: signal.Signals) -> None:
        if stop.is_set():
            from meshagent.cli import force_exit

            force_exit(sig)  # a second signal: now
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    # SIGHUP is the parent's business (reload); a terminal hangup must not kill the workers.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)

    async def send(msg: dict[str, Any] | bytes) -> None:
        try:
            writer.write(msg if isinstance(msg, bytes) else _encode(msg))
            await writer.drain()
        except (ConnectionError, OSError):
            stop.set()

    log.info("worker %d running, pid %d", index, os.getpid(), extra={"worker": index, "pid": os.getpid()})
    await send({"type": "hello", "pid": os.getpid(), "index": index})

    async def serve() -> None:
        from mesh.metrics import stats_message

        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, OSError, ValueError) as exc:  # reset, or a line over MAX_MESSAGE
                line = b""
                log.warning("worker %d: control channel failed: %s", index, exc)
            if not line:
                log.warning("worker %d: control channel closed (parent gone); draining", index)
                break
            msg: Any = None
            try:
                msg = json.loads(line)
                kind = msg["type"]
                if kind == "sockets":
                    _receive_sockets(fdsock, msg["sockets"], INHERITED)
                elif kind == "table":
                    table = RoutingTable.from_dict(msg["table"])
                    await mesh.apply(table)
                    await send({"type": "applied", "version": table.version})
                elif kind == "stats":
                    # the snapshot in slices, its JSON in a thread: the data plane shares this loop
                    await send(await stats_message(mesh, msg.get("id")))
                elif kind == "ping":
                    await send({"type": "pong", "id": msg.get("id")})
                elif kind == "shutdown":
                    break
                else:
                    await send({"type": "error", "message": f"unknown message type {kind!r}"})
            except Exception as exc:  # a bad message must not kill the data plane
                log.exception("worker %d: cannot handle control message", index)
                reply: dict[str, Any] = {"type": "error", "message": f"{type(exc).__name__}: {exc}"}
                if isinstance(msg, dict) and "id" in msg:
                    reply["id"] = msg["id"]
                await send(reply)
        stop.set()

    server = asyncio.create_task(serve())
    # Whatever way serve() ends (even an unexpected exception), the worker must drain and exit, never linger.
    server.add_done_callback(lambda _t: stop.set())
    await stop.wait()
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server
    log.info("worker %d stopping: draining connections for up to %.1fs", index, grace)
    await mesh.shutdown(grace)
    INHERITED.close_all()
    if fdsock is not None:
        fdsock.close()
    writer.close()
    return 0


def _receive_sockets(fdsock: socket.socket | None, entries: list[dict[str, Any]], store: Any) -> None:
    """The descriptors the parent sent just before a "sockets" message (already in the channel: a
    blocking read with a short timeout), offered to ``bind_socket`` by key (``INHERITED``)."""
    if fdsock is None:
        raise ValueError("sockets sent to a worker started without --sockets-fd")
    fds: list[int] = []
    fdsock.settimeout(5.0)
    while len(fds) < len(entries):
        data, got, flags, _ = socket.recv_fds(fdsock, 256, 200)
        fds.extend(got)
        for fd in got:  # like every socket Python opens: not inherited by processes this one starts
            os.set_inheritable(fd, False)
        if not data or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise ValueError("the sockets channel closed or truncated descriptors")
    for entry, fd in zip(entries, fds, strict=False):
        store.add(entry["kind"], entry["host"], int(entry["port"]), socket.socket(fileno=fd))


def _make_mesh(mesh_cls: Any, *, node: str | None, access_log: bool, reuse_port: bool = True) -> Any:
    """The data plane of this process (``mesh_cls`` is ``mesh.runtime.Mesh``; injected to keep imports lazy)."""
    return mesh_cls(local_node=node or None, reuse_port=reuse_port, access_log=access_log)
