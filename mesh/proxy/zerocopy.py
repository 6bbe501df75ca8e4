"""Zero-copy forwarding for large transfers: ``os.splice`` through a pipe, one direction of a splice.

HAProxy's ``option splice-auto`` in Python: once one direction of a spliced pair
carries a large transfer (a single read of at least ``SPLICE_MIN`` bytes: the
socket had that much queued), that direction stops going through user space.
The bytes move socket -> pipe -> socket inside the kernel (``os.splice``), with
no copy into Python and one callback per pipe-full instead of one per read.

Rules of a ``KernelPipe`` (direction src -> dst of one ``Splice``):

- It starts only when the destination transport's write buffer is empty (so
  nothing written earlier can be overtaken) and the source transport's reading
  is paused for good: from then on the source is read through a ``dup`` of its
  descriptor (``add_reader``), the destination written through another
  (``add_writer`` only while the socket is full).  The transports keep the
  other direction, and the closing.
- Backpressure: reading the source goes on while the pipe has room, so reading
  and writing overlap; a destination that takes nothing more leaves bytes in the
  pipe, and once it is full reading stops until the destination took some (one
  pipe of ``PIPE_SIZE`` bytes is the whole buffer of this direction, in the
  kernel).
- Byte counts: every byte that left the pipe is added to the direction's
  counter (the same counter the transport path adds to), so stats and the idle
  timer do not notice the switch.
- EOF on the source: the pipe is drained, then the splice hears about it the
  way the transport would have told it (``on_eof``).  An error on either side
  (reset, EPIPE) aborts that side's transport; the splice then closes as usual.
- ``close()`` (idempotent) removes the watchers and closes the dups and the pipe.
  Every way a splice ends calls it first: a dup would otherwise keep the socket
  open after its transport closed, and the peer would never see the close.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["AVAILABLE", "PIPE_SIZE", "SPLICE_MIN", "KernelPipe"]

log = logging.getLogger(__name__)

AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice")
SPLICE_MIN = 128 * 1024  # a read this large switches its direction to the kernel path
PIPE_SIZE = 1024 * 1024  # asked for with F_SETPIPE_SZ (the default is 64 KiB)
READS_PER_CALLBACK = 16  # splices from the source per readiness callback, at most
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH})


def socket_fd(transport: Any) -> int:
    """The descriptor of a socket transport, or -1."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    try:
        return sock.fileno()
    except (OSError, ValueError):
        return -1


class KernelPipe:
    """One direction (src -> dst) of a splice, moved by ``os.splice``.  See the module docstring.

    ``count(n)`` adds forwarded bytes; ``on_eof()`` is called once the source's EOF
    went through; ``src_gone()`` / ``dst_gone()`` when a side failed.
    """

    __slots__ = (
        "_cap",
        "_dst",
        "_inpipe",
        "_loop",
        "_pr",
        "_pw",
        "_reading",
        "_src",
        "_src_eof",
        "_writing",
        "closed",
        "count",
        "dst_gone",
        "on_eof",
        "src_gone",
    )

    def __init__(
        self,
        loop: Any,
        src_fd: int,
        dst_fd: int,
        *,
        count: Callable[[int], None],
        on_eof: Callable[[], None],
        src_gone: Callable[[], None],
        dst_gone: Callable[[], None],
    ) -> None:
        self._loop = loop
        self.count = count
        self.on_eof = on_eof
        self.src_gone = src_gone
        self.dst_gone = dst_gone
        self._src = self._dst = self._pr = self._pw = -1
        self._inpipe = 0
        self._cap = PIPE_SIZE
        self._src_eof = False
        self._reading = self._writing = False
        self.closed = False
        try:
            self._pr, self._pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                self._cap = fcntl.fcntl(self._pw, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                self._cap = fcntl.fcntl(self._pw, _F_GETPIPE_SZ)  # smaller (fs.pipe-max-size): more callbacks
            self._src = os.dup(src_fd)
            self._dst = os.dup(dst_fd)
        except OSError:
            self.close()
            raise
        self._read_on()

    # -- watchers ------------------------------------------------------------------------------------
    def _read_on(self) -> None:
        if not self._reading and not self.closed:
            self._loop.add_reader(self._src, self._on_readable)
            self._reading = True

    def _read_off(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._src)
            self._reading = False

    def _write_on(self) -> None:
        if not self._writing and not self.closed:
            self._loop.add_writer(self._dst, self._on_writable)
            self._writing = True

    def _write_off(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._dst)
            self._writing = False

    # -- moving bytes -------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        # Move what the source has, through the pipe, until the source is empty (EAGAIN), the
        # destination is full, or the pipe is: one callback per burst rather than one per splice.
        for _ in range(READS_PER_CALLBACK):
            room = self._cap - self._inpipe
            if room <= 0:
                self._read_off()
                return
            try:
                n = os.splice(self._src, self._pw, room, flags=_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(exc, src=True)
                return
            if n == 0:
                self._src_eof = True
                self._read_off()
                self._flush()
                return
            self._inpipe += n
            self._flush()
            if self.closed or self._writing or not self._reading:
                return  # the destination is full (or we are done): wait for it
        if self._inpipe >= self._cap:
            self._read_off()

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self._inpipe:
            try:
                n = os.splice(self._pr, self._dst, self._inpipe, flags=_FLAGS)
            except (BlockingIOError, InterruptedError):
                # The destination is full: wait until it is writable; keep reading while the pipe has room.
                self._write_on()
                if self._inpipe < self._cap and not self._src_eof:
                    self._read_on()
                return
            except OSError as exc:
                self._fail(exc, src=False)
                return
            self._inpipe -= n
            self.count(n)
        self._write_off()
        if self._src_eof:
            self.close()
            self.on_eof()
        else:
            self._read_on()

    def _fail(self, exc: OSError, *, src: bool) -> None:
        if exc.errno not in _GONE:
            log.debug("zero-copy %s side failed: %r", "source" if src else "destination", exc)
        self.close()
        (self.src_gone if src else self.dst_gone)()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._read_off()
        self._write_off()
        for fd in (self._src, self._dst, self._pr, self._pw):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._src = self._dst = self._pr = self._pw = -1

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("eof" if self._src_eof else "open")
        return f"<KernelPipe {state} in_pipe={self._inpipe} reading={self._reading} writing={self._writing}>"
