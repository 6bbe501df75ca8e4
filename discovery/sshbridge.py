"""ssh:// engines: a private unix socket whose every connection is one ``ssh ... docker system dial-stdio``.

The docker CLI reaches an ``ssh://`` engine by running ``ssh [-l user] [-p port] -- host docker system
dial-stdio`` for each connection and speaking HTTP over the process's stdin/stdout (``dial-stdio`` on the
remote side connects to the remote engine's socket).  ``SshBridge`` does the same for the aiohttp client:
it listens on a unix socket in a private temporary directory (mode 0700), and for each connection aiohttp
opens there it starts that ssh process and copies bytes both ways until either side ends.  ``Engine`` talks
to the bridge with aiohttp's ``UnixConnector``, so nothing else in the client knows about ssh.

Rules:
- One ssh process per connection, as the CLI does; aiohttp's keep-alive pool keeps their number small (the
  events stream holds one, requests share another).  ssh runs with ``BatchMode=yes`` (an agent never prompts)
  and a connect timeout; keys, known hosts, ``ProxyJump`` and ``ControlMaster`` come from ~/.ssh/config.
- When either side closes, the other is closed; a process still alive then is terminated (then killed after
  ``KILL_AFTER`` seconds).  ``close()`` stops the listener, ends every connection and process, and removes
  the directory.
- What ssh wrote on stderr when it failed (bad key, unknown host, no docker on the remote) is kept, bounded,
  in ``last_error`` (until a later connection gets an answer), so the client's error says why rather than
  "server disconnected".
- If the agent dies, the processes' stdin pipes close: ssh sends EOF and the remote ``dial-stdio`` ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

__all__ = ["SshBridge"]

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
STDERR_KEEP = 2048  # bytes of ssh's stderr kept for the error message
KILL_AFTER = 2.0


class SshBridge:
    """See the module docstring.  ``path = await bridge.start()``; ``await bridge.close()``."""

    def __init__(self, command: list[str], *, label: str = "") -> None:
        self.command = command
        self.label = label or " ".join(command)
        self.path: str | None = None
        self.last_error: str | None = None
        self.started = 0  # ssh processes started
        self._dir: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<SshBridge {self.label} path={self.path} started={self.started} open={len(self._tasks)}>"

    async def start(self) -> str:
        """Listen (once); return the socket's path."""
        async with self._lock:
            if self._server is None:
                self._dir = tempfile.mkdtemp(prefix="mesh-ssh-")  # 0700: only this user can connect
                self.path = os.path.join(self._dir, "docker.sock")
                self._server = await asyncio.start_unix_server(self._accept, self.path)
        assert self.path is not None
        return self.path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # close() ends the connections; the server's callback must not see a cancelled task
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C at the agent's terminal is the agent's to handle, not ssh's
            )
        except OSError as exc:
            self.last_error = f"cannot run {self.command[0]}: {exc}"
            log.debug("ssh bridge %s: %s", self.label, self.last_error)
            return
        self.started += 1
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        up = asyncio.ensure_future(_copy(reader, proc.stdin))
        down = asyncio.ensure_future(_copy(proc.stdout, writer, self._answered))
        err = asyncio.ensure_future(_tail(proc.stderr))
        try:
            # Either direction ending ends the connection: the client closed (aiohttp dropped a pooled
            # connection), or ssh / the remote engine did.
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            await _end(proc)
            try:
                stderr = await asyncio.wait_for(err, 1.0)  # its EOF comes with the exit
            except (TimeoutError, OSError):
                stderr = b""
            if proc.returncode not in (0, None, -15):
                text = stderr.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
                self.last_error = f"{self.label}: {text}"
                # debug only: the client's error carries it, and the watcher logs a repeated failure once
                log.debug("ssh bridge: %s", self.last_error)

    def _answered(self) -> None:
        """The remote engine sent bytes: ssh works again, an earlier failure no longer explains anything."""
        self.last_error = None


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, first: Callable[[], None] | None = None) -> None:
    """Copy until EOF (then pass the EOF on); ``first()`` is called when the first bytes arrive."""
    try:
        if first is not None:
            data = await src.read(CHUNK)
            if data:
                first()
                dst.write(data)
                await dst.drain()
            else:
                return
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, BrokenPipeError):
        pass


async def _tail(src: asyncio.StreamReader) -> bytes:
    """Read ``src`` to its end; return its last ``STDERR_KEEP`` bytes."""
    kept = b""
    while data := await src.read(CHUNK):
        kept = (kept + data)[-STDERR_KEEP:]
    return kept


async def _end(proc: asyncio.subprocess.Process) -> None:
    """Let ssh finish if it is finishing; else terminate it, then kill it."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 0.2)
        return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), KILL_AFTER)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
