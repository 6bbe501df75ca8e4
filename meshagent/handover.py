"""Handing the listening sockets of a running agent to its successor (``mesh run --handover PATH``).

HAProxy's seamless reload (``expose-fd listeners`` + ``-x``) and Envoy's hot restart do the same: the new
process gets copies of the old one's listening sockets over a unix socket (SCM_RIGHTS), starts serving
on them, and only then tells the old one to stop accepting and drain.  A copied descriptor refers to the
same kernel socket, so its accept queue is never closed: a connection waiting there is accepted by
whichever process accepts next, none is refused or reset.

Rules of one handover (``HandoverServer`` is the old side, ``Takeover`` the new one):

1. The old agent serves PATH (a unix stream socket, mode 0600, bound under a temporary name and renamed
   over PATH, so the path always names a live socket or a stale file, never nothing).
2. The new agent connects and sends ``{"type": "hello", "pid": P, "protocol": 1}``.
3. The old agent answers ``{"type": "sockets", "pid": P, "sockets": [entry, ...]}`` (one line), then the
   descriptors in the order of the entries, in batches of at most ``FD_BATCH`` (the kernel's SCM_MAX_FD
   is 253), one byte of payload each.  An entry names the socket: ``{"kind": "stream"|"dgram", "host":
   H, "port": N, "role": R}``, role being the data-plane protocol ("tcp", "tls", "http", "udp"),
   "admin", "tunnel", "udp-tunnel" or "control".  It keeps serving.  An agent that already handed its
   sockets over answers ``{"type": "busy"}``.
4. The new agent checks every descriptor against its entry (socket type, bound port, listening); on any
   mismatch it closes them all and binds normally, and the old one, never told to stop, keeps serving.
5. The new agent serves on the sockets its table needs (``mesh.listener.INHERITED``: ``bind_socket``
   takes from there), and once its first table is applied sends ``{"type": "release"}``.
6. The old agent stops accepting everywhere (closes its own descriptors only), answers
   ``{"type": "released", "pid": P}``, drains its open connections within its grace and exits 0.
7. The new agent closes the sockets it did not need and serves PATH itself, for the next upgrade.

Whatever fails before step 6 leaves the old agent serving: no answer within the timeout, a stale PATH,
a manifest mismatch, the new agent dying.  Only the new agent's ``release`` stops the old one, and it is
sent only while the new one accepts on the same sockets, so the two are never both stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FD_BATCH", "HandoverServer", "Offer", "Takeover", "request_takeover"]

log = logging.getLogger("meshagent.handover")

PROTOCOL = 1
FD_BATCH = 200
MAX_LINE = 8 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Offer:
    """One socket the old agent hands over: its key (kind, host, port), what it serves, and the socket
    (anything with ``fileno()``: a ``socket.socket``, asyncio's TransportSocket, uvloop's pseudo-socket)."""

    kind: str
    host: str
    port: int
    role: str
    sock: Any

    def entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "host": self.host, "port": self.port, "role": self.role}


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


# -- the old agent's side -------------------------------------------------------------------------------


class HandoverServer:
    """Serves ``path``; hands the sockets ``offers()`` lists to the first new agent that asks, and when
    it says release, awaits ``release()`` (which must stop accepting everywhere) and answers.

    ``released`` is set once the sockets belong to the new agent; the caller then drains and exits."""

    def __init__(
        self,
        path: str,
        offers: Callable[[], Sequence[Offer]],
        release: Callable[[], Awaitable[None]],
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.path = path
        self.offers = offers
        self.release = release
        self.timeout = timeout
        self.released = asyncio.Event()
        self.handovers = 0  # descriptors sets sent (a new agent that gave up still counts)
        self.in_progress = False  # a new agent holds our sockets and has not released us yet
        self._sock: socket.socket | None = None
        self._ino: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind under a temporary name and rename over ``path`` (atomic: a previous agent's socket or a
        stale file there is replaced).  Raises OSError when the directory is not writable."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(8)
            os.rename(tmp, self.path)
            self._ino = os.stat(self.path).st_ino
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.create_task(self._serve(), name="handover-server")
        log.info(
            "handover: serving %s (a new agent started with --handover %s takes the sockets over)", *[self.path] * 2
        )

    async def close(self) -> None:
        """Stop serving ``path``; remove it if it still names this agent's socket (after a handover it
        names the new agent's)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_listener()

    def _close_listener(self) -> None:
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            try:
                await self._handle(conn)
            except (OSError, ValueError, TimeoutError) as exc:
                log.warning("handover: a new agent's request failed (%s); still serving", exc)
            finally:
                conn.close()
            if self.released.is_set():
                self._close_listener()
                return

    async def _handle(self, conn: socket.socket) -> None:
        reader = _LineReader(conn)
        hello = await asyncio.wait_for(reader.readline(), self.timeout)
        if hello is None or hello.get("type") != "hello":
            raise ValueError(f"expected a hello, got {hello!r}")
        peer = hello.get("pid")
        loop = asyncio.get_running_loop()
        if self.released.is_set():
            await loop.sock_sendall(conn, _line({"type": "busy", "pid": os.getpid()}))
            return
        offers = list(self.offers())
        fds = [o.sock.fileno() for o in offers]
        msg = {"type": "sockets", "pid": os.getpid(), "protocol": PROTOCOL, "sockets": [o.entry() for o in offers]}
        await loop.sock_sendall(conn, _line(msg))
        conn.setblocking(True)
        conn.settimeout(self.timeout)  # one byte per batch: the buffer is never full; bounded all the same
        for i in range(0, len(fds), FD_BATCH):
            socket.send_fds(conn, [b"F"], fds[i : i + FD_BATCH])
        conn.setblocking(False)
        self.handovers += 1
        log.info("handover: sent %d socket(s) to pid %s; serving until it has taken over", len(fds), peer)
        self.in_progress = True
        try:
            ask = await reader.readline()  # no timeout: until the new agent releases us or goes away
        finally:
            self.in_progress = False
        if ask is None:
            log.warning("handover: pid %s went away before taking over; still serving", peer)
            return
        if ask.get("type") != "release":
            raise ValueError(f"expected release, got {ask!r}")
        self.released.set()
        await self.release()
        await loop.sock_sendall(conn, _line({"type": "released", "pid": os.getpid()}))
        log.info("handover: pid %s serves the sockets now; this agent stopped accepting and drains", peer)


class _LineReader:
    """JSON lines from a non-blocking socket on the running loop."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    async def readline(self) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        while b"\n" not in self.buf:
            data = await loop.sock_recv(self.conn, 65536)
            if not data:
                return None
            self.buf += data
            if len(self.buf) > MAX_LINE:
                raise ValueError("handover message too long")
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)


# -- the new agent's side ----------------------------------------------------------------------------------


class Takeover:
    """The sockets received from the old agent (``request_takeover``), and the connection to it."""

    def __init__(self, conn: socket.socket, old_pid: int, sockets: list[tuple[dict[str, Any], socket.socket]]) -> None:
        self.conn = conn
        self.old_pid = old_pid
        self.sockets = sockets

    def offer(self, store: Any) -> None:
        """Put every received socket into ``store`` (``mesh.listener.INHERITED``), by (kind, host, port)."""
        for entry, sock in self.sockets:
            store.add(entry["kind"], entry["host"], int(entry["port"]), sock)

    def take(self, store: Any, role: str) -> socket.socket | None:
        """The received socket of ``role`` ("admin", "control", ...), out of ``store``."""
        for entry, _ in self.sockets:
            if entry.get("role") == role:
                return store.take(entry["kind"], entry["host"], int(entry["port"]))
        return None

    def release(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Tell the old agent to stop accepting and drain (blocking; run it in a thread).  True once it
        confirmed; False if it did not within ``timeout`` (it may be stopped: it accepts nothing then,
        and this agent serves the sockets either way)."""
        conn = self.conn
        try:
            conn.settimeout(timeout)
            conn.sendall(_line({"type": "release", "pid": os.getpid()}))
            buf = b""
            while b"\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    break
                buf += data
            ok = buf.startswith(b"{") and json.loads(buf.partition(b"\n")[0]).get("type") == "released"
        except (OSError, ValueError) as exc:
            log.warning("handover: the old agent (pid %d) did not confirm the release: %s", self.old_pid, exc)
            ok = False
        finally:
            conn.close()
        if ok:
            log.info("handover: the old agent (pid %d) stopped accepting and drains", self.old_pid)
        return ok

    def abandon(self) -> None:
        """Give the sockets back (close our copies and the connection): the old agent keeps serving."""
        for _, sock in self.sockets:
            sock.close()
        self.conn.close()


def request_takeover(path: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[Takeover | None, str]:
    """Ask the agent serving ``path`` for its sockets (blocking, at most about ``timeout`` seconds).

    Returns ``(takeover, "ok")``, or ``(None, why)`` with why one of "absent" (no socket at path),
    "stale" (nothing serves it), "timeout", "busy", "mismatch", "error": for every outcome but "absent"
    and "stale" an old agent may still hold the ports (the caller then retries its binds)."""
    deadline = time.monotonic() + timeout
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
    except FileNotFoundError:
        conn.close()
        log.info("handover: no agent at %s; binding normally", path)
        return None, "absent"
    except ConnectionRefusedError:
        conn.close()
        log.warning("handover: %s is stale (no agent serves it); binding normally", path)
        return None, "stale"
    except OSError as exc:
        conn.close()
        why = "timeout" if isinstance(exc, TimeoutError) else "error"
        log.warning("handover: cannot reach the agent at %s (%s); binding normally", path, exc)
        return None, why
    received: list[int] = []
    try:
        conn.sendall(_line({"type": "hello", "pid": os.getpid(), "protocol": PROTOCOL}))
        # Every read here takes ancillary data: a plain recv() reaching a batch of descriptors would
        # drop them.  The kernel ends a read after the first message that carries descriptors.
        buf = b""
        msg: dict[str, Any] | None = None
        entries: list[Any] = []
        while True:
            if msg is None and b"\n" in buf:
                line = buf.partition(b"\n")[0]
                msg = json.loads(line)
                if msg.get("type") == "busy":
                    log.warning("handover: the agent at %s (pid %s) already handed its sockets over; binding "
                                "normally", path, msg.get("pid"))  # fmt: skip
                    conn.close()
                    return None, "busy"
                if msg.get("type") != "sockets" or not isinstance(msg.get("sockets"), list):
                    raise ValueError(f"unexpected answer {line[:200]!r}")
                entries = msg["sockets"]
            if msg is not None and len(received) >= len(entries):
                break
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            data, fds, flags, _ = socket.recv_fds(conn, 65536, FD_BATCH)
            received.extend(fds)
            for fd in fds:  # a process this one starts (workers, a SIGUSR2 successor) must not inherit them
                os.set_inheritable(fd, False)
            if flags & socket.MSG_CTRUNC:
                raise ValueError("descriptors truncated in transit")
            if not data:
                raise ConnectionError("the old agent closed the connection")
            buf += data
            if len(buf) > MAX_LINE:
                raise ValueError("handover message too long")
        socks = _check(entries, received)
    except TimeoutError:
        _close_fds(received)
        conn.close()
        log.warning("handover: the agent at %s did not answer within %.1fs; binding normally", path, timeout)
        return None, "timeout"
    except _Mismatch as exc:
        conn.close()
        log.error("handover: manifest mismatch from the agent at %s: %s; binding normally", path, exc)
        return None, "mismatch"
    except (OSError, ValueError) as exc:
        _close_fds(received)
        conn.close()
        log.warning("handover: failed with the agent at %s (%s); binding normally", path, exc)
        return None, "error"
    conn.settimeout(None)
    old_pid = int(msg.get("pid") or 0) if msg else 0
    log.info("handover: received %d socket(s) from pid %d: %s", len(socks), old_pid,
             ", ".join(f"{e['role']} {e['host']}:{e['port']}" for e, _ in socks) or "none")  # fmt: skip
    return Takeover(conn, old_pid, socks), "ok"


class _Mismatch(Exception):
    pass


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _check(entries: list[Any], fds: list[int]) -> list[tuple[dict[str, Any], socket.socket]]:
    """Each descriptor is what its entry says (type, bound port, listening); else close all, _Mismatch."""
    if len(fds) != len(entries):
        _close_fds(fds)
        raise _Mismatch(f"{len(entries)} socket(s) named, {len(fds)} received")
    out: list[tuple[dict[str, Any], socket.socket]] = []
    try:
        for entry, fd in zip(entries, fds, strict=True):
            sock = socket.socket(fileno=fd)
            out.append((entry, sock))
            if not isinstance(entry, dict) or entry.get("kind") not in ("stream", "dgram"):
                raise _Mismatch(f"bad entry {entry!r}")
            want = socket.SOCK_STREAM if entry["kind"] == "stream" else socket.SOCK_DGRAM
            if sock.type != want or sock.family not in (socket.AF_INET, socket.AF_INET6):
                raise _Mismatch(f"{entry}: the descriptor is a {sock.family.name} {sock.type.name} socket")
            port = sock.getsockname()[1]
            if port != int(entry.get("port", -1)):
                raise _Mismatch(f"{entry}: the descriptor is bound to port {port}")
            if want == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise _Mismatch(f"{entry}: the descriptor is not listening")
    except BaseException:
        for _, sock in out:
            sock.close()
        _close_fds(fds[len(out) :])
        raise
    return out


def is_address_in_use(exc: BaseException) -> bool:
    """``exc`` (or its cause) is EADDRINUSE: what a bind meets while an old agent still holds a port."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


# -- what the composition root uses ---------------------------------------------------------------------


def server_sockets(server: Any) -> list[Any]:
    """The listening sockets of an aiohttp ``AppRunner`` (the control server) or of an object with an
    asyncio server in ``_server`` (mesh.admin.AdminServer)."""
    out: list[Any] = []
    if server is None:
        return out
    own = getattr(server, "_server", None)  # an asyncio server (not an AppRunner's web.Server)
    if own is not None and hasattr(own, "sockets"):
        out.extend(own.sockets or ())
    for site in list(getattr(server, "sites", ())):
        out.extend(getattr(getattr(site, "_server", None), "sockets", None) or ())
    return out


def close_listeners(server: Any) -> None:
    """Stop listening (this process's descriptors only) without ending the open requests."""
    if server is None:
        return
    own = getattr(server, "_server", None)
    if own is not None and hasattr(own, "sockets"):
        own.close()
    for site in list(getattr(server, "sites", ())):
        inner = getattr(site, "_server", None)
        if inner is not None:
            inner.close()


class Upgrades:
    """One agent's part in handovers, for the composition root (``mesh run``, the cluster agent):

    - ``await takeover()`` at start: ask the agent serving ``path`` for its sockets and put them into
      ``mesh.listener.INHERITED`` (binds then take them); ``contested`` tells whether an old agent may
      still hold the ports (no answer, busy, mismatch: binds are retried until it exits).
    - ``await complete()`` once this agent serves (its first table applied): release the old agent, close
      the inherited sockets nobody took, and serve ``path`` for the next upgrade.
    - ``finished`` is set once a successor took this agent's sockets: the caller drains and exits 0.

    ``offers()`` lists this agent's sockets; ``stop_accepting()`` (async) must stop every accept loop,
    closing only this process's descriptors.
    """

    def __init__(
        self,
        path: str,
        offers: Callable[[], Sequence[Offer]],
        stop_accepting: Callable[[], Awaitable[None]],
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.path = path
        self.offers = offers
        self.stop_accepting = stop_accepting
        self.timeout = timeout
        self.outcome = "none"
        self.taken: Takeover | None = None
        self.server: HandoverServer | None = None
        self.finished = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    @property
    def contested(self) -> bool:
        return self.outcome in ("timeout", "busy", "mismatch", "error")

    async def takeover(self) -> str:
        from mesh.listener import INHERITED

        self.taken, self.outcome = await asyncio.to_thread(request_takeover, self.path, self.timeout)
        if self.taken is not None:
            self.taken.offer(INHERITED)
        return self.outcome

    async def complete(self) -> None:
        from mesh.listener import INHERITED

        taken, self.taken = self.taken, None
        if taken is not None:
            await asyncio.to_thread(taken.release, self.timeout)
            unused = INHERITED.close_all()
            if unused:
                log.info("handover: closed %d inherited socket(s) this agent does not serve: %s", len(unused),
                         ", ".join(f"{k} {h}:{p}" for k, h, p in unused))  # fmt: skip
        await self.serve()

    async def serve(self) -> None:
        if self.server is not None:
            return
        server = HandoverServer(self.path, self.offers, self.stop_accepting, timeout=self.timeout)
        try:
            await server.start()
        except OSError as exc:
            log.error("handover: cannot serve %s (%s): the next upgrade will bind normally", self.path, exc)
            return
        self.server = server
        self._watch = asyncio.create_task(self._finished(server), name="handover-watch")

    async def _finished(self, server: HandoverServer) -> None:
        await server.released.wait()
        if server._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await server._task  # until the new agent has its answer
        self.finished.set()

    async def wait_pending(self) -> None:
        """Stopping (SIGTERM) while a new agent holds this agent's sockets but has not released it yet
        (Swarm's start-first stops the old task as soon as the new one runs): give it up to the timeout
        to finish, so that the sockets go to it rather than the ports closing under it."""
        server = self.server
        if server is None or not server.in_progress:
            return
        log.info("handover: a new agent is taking the sockets over; waiting up to %.1fs for it", self.timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.finished.wait(), self.timeout)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.taken is not None:
            self.taken.abandon()
            self.taken = None
        if self.server is not None:
            await self.server.close()


async def start_admin(admin: Any, sock: socket.socket | None, upgrades: Upgrades | None) -> asyncio.Task[None] | None:
    """Start ``admin`` (mesh.admin.AdminServer): on ``sock`` (handed over) when given, else by binding.
    While an old agent may still hold the port (``upgrades.contested``), a port in use is retried in
    the background every 0.5 s (the returned task) instead of failing the start."""
    if sock is not None:
        admin.sock = sock  # AdminServer serves on it instead of binding host:port
        await admin.start()
        return None
    try:
        await admin.start()
        return None
    except Exception as exc:
        if upgrades is None or not upgrades.contested or not is_address_in_use(exc):
            raise
        log.warning("handover: the admin port is held by the old agent; retrying every 0.5s until it is free")

    async def retry() -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await admin.start()
                return
            except Exception as exc:
                if not is_address_in_use(exc):
                    log.error("admin API: %s", exc)
                    return

    return asyncio.create_task(retry(), name="admin-rebind")
