"""The HTTP backend that every peer forwards to: nginx when installed, else a small uvloop responder.

Both serve ``/100b``, ``/16k`` and ``/1m`` (bodies of 100 B, 16 KiB and 1 MiB), keep connections alive as long
as the client wants, and close after the response when the request says ``Connection: close`` (the churn
workload).  ``python -m benchmarks.backend --port 0`` runs the responder alone and prints ``PORT <n>``.

With ``tags`` (the HTTP suite, ``benchmarks/httpsuite.py``) the same one process listens on one port per tag,
each a replica of its own: every response carries ``X-Bench-Backend: <tag>`` (so a routing check can tell which
replica answered), and a stats port answers ``GET /_stats`` in nginx's ``stub_status`` format, whose accepted
connection count tells how many upstream connections the proxy opened (``Backend.accepts()``).
``python -m benchmarks.backend --tags a,b`` prints ``PORTS a=<n>,b=<n>,_stats=<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.proc import LOOPBACK, BenchError, Proc, free_port, nofile_limit, python_env, tree_pids, wait_port

SIZES = {"100b": 100, "16k": 16 * 1024, "1m": 1024 * 1024}
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
TAG_HEADER = "X-Bench-Backend"
_ACCEPTS = re.compile(rb"server accepts handled requests\s+(\d+)")


def body(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


class Backend:
    """A running backend.  ``kind`` is "nginx" or "uvloop"; ``addr`` is (host, port) of the first listener;
    ``addrs`` maps each tag to its listener (tagged backends only)."""

    kind = ""

    def __init__(self, workdir: Path, cpus: str | None = None, tags: Sequence[str] | None = None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.tags = list(tags or [])
        self.proc: Proc | None = None
        self.addr: tuple[str, int] = (LOOPBACK, 0)
        self.addrs: dict[str, tuple[str, int]] = {}
        self.stats_addr: tuple[str, int] | None = None

    def start(self) -> tuple[str, int]:
        raise NotImplementedError

    def accepts(self) -> int | None:
        """Connections the backend accepted so far, this query's own included (None: no stats port).  Two
        readings around a run differ by the run's upstream connections plus one (the second query)."""
        if self.stats_addr is None:
            return None
        try:
            with socket.create_connection(self.stats_addr, timeout=5) as s:
                s.sendall(b"GET /_stats HTTP/1.0\r\nHost: stats\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        except OSError:
            return None
        m = _ACCEPTS.search(data)
        return int(m.group(1)) if m else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid) if self.proc else []


class NginxBackend(Backend):
    """nginx, one worker, static files, access log off, effectively unlimited keep-alive.  Tagged: one server
    block per tag, each adding its ``X-Bench-Backend`` header, and a ``stub_status`` server for ``accepts()``."""

    kind = "nginx"

    def start(self) -> tuple[str, int]:
        d = self.workdir / "backend-nginx"
        (d / "www").mkdir(parents=True, exist_ok=True)
        (d / "logs").mkdir(exist_ok=True)
        for name, size in SIZES.items():
            (d / "www" / name).write_bytes(body(size))
        port = free_port()
        servers = f"""    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        root {d}/www;
    }}"""
        if self.tags:
            ports = {tag: free_port() for tag in self.tags}
            stats = free_port()
            servers = "\n".join(
                f"""    server {{
        listen {LOOPBACK}:{p} backlog=4096;
        root {d}/www;
        add_header {TAG_HEADER} {tag};
    }}"""
                for tag, p in ports.items()
            )
            servers += f"""
    server {{
        listen {LOOPBACK}:{stats};
        location = /_stats {{ stub_status; }}
    }}"""
            port = ports[self.tags[0]]
        conf = d / "nginx.conf"
        conf.write_text(
            f"""
user root;
worker_processes 1;
worker_rlimit_nofile {nofile_limit()};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections {nofile_limit() - 100}; multi_accept on; }}
http {{
    access_log off;
    default_type application/octet-stream;
    # Measured here: sendfile + per-request open() cost 2x on 100 B and 2.5x on 1 MiB against copying from
    # cached buffers; the backend should be as cheap as possible so that the proxy is what is measured.
    sendfile off;
    output_buffers 2 512k;
    open_file_cache max=16;
    etag off;
    server_tokens off;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
{servers}
}}
"""
        )
        self.proc = Proc(
            "backend nginx",
            ["nginx", "-p", str(d), "-c", str(conf), "-g", "daemon off;"],
            d / "stderr.log",
            cpus=self.cpus,
        )
        wait_port(LOOPBACK, port, self.proc)
        self.addr = (LOOPBACK, port)
        if self.tags:
            self.addrs = {tag: (LOOPBACK, p) for tag, p in ports.items()}
            self.stats_addr = (LOOPBACK, stats)
            for addr in (*self.addrs.values(), self.stats_addr):
                wait_port(*addr, self.proc)
        return self.addr


class UvloopBackend(Backend):
    """This module's responder in its own process."""

    kind = "uvloop"

    def start(self) -> tuple[str, int]:
        d = self.workdir / "backend-uvloop"
        d.mkdir(parents=True, exist_ok=True)
        args = ["--tags", ",".join(self.tags)] if self.tags else ["--port", "0"]
        self.proc = Proc(
            "backend uvloop",
            [sys.executable, "-m", "benchmarks.backend", *args],
            d / "stderr.log",
            cpus=self.cpus,
            stdout_pipe=True,
            env=python_env(),
        )
        if not self.tags:
            port = int(self.proc.read_line("PORT "))
            self.addr = (LOOPBACK, port)
            return self.addr
        ports = dict(item.split("=", 1) for item in self.proc.read_line("PORTS ").split(","))
        self.stats_addr = (LOOPBACK, int(ports.pop("_stats")))
        self.addrs = {tag: (LOOPBACK, int(ports[tag])) for tag in self.tags}
        self.addr = self.addrs[self.tags[0]]
        return self.addr


def make_backend(kind: str, workdir: Path, cpus: str | None = None, tags: Sequence[str] | None = None) -> Backend:
    """``kind``: "nginx", "uvloop" or "auto" (nginx when installed).  ``tags``: one listener (replica) per tag."""
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "uvloop"
    if kind == "nginx":
        if shutil.which("nginx") is None:
            raise BenchError("backend nginx requested but nginx is not installed (apt-get install nginx-light)")
        return NginxBackend(workdir, cpus, tags)
    if kind == "uvloop":
        return UvloopBackend(workdir, cpus, tags)
    raise BenchError(f"backend must be nginx, uvloop or auto; got {kind!r}")


# -- the responder ------------------------------------------------------------------------------------------------


def _response(size: int, close: bool, tag: str = "") -> bytes:
    conn = b"close" if close else b"keep-alive"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: %s\r\n"
    extra = f"{TAG_HEADER}: {tag}\r\n".encode() if tag else b""
    return head % (size, conn) + extra + b"\r\n" + body(size)


def _responses(close: bool, tag: str = "") -> dict[bytes, bytes]:
    return {f"/{name}".encode(): _response(size, close, tag) for name, size in SIZES.items()}


_KEEP = _responses(False)
_CLOSE = _responses(True)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_MAX_HEAD = 16 * 1024
_accepted = 0  # connections accepted by this process (GET /_stats)


def _stats_response() -> bytes:
    text = f"Active connections: 0 \nserver accepts handled requests\n {_accepted} {_accepted} 0 \n".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text)


class Responder(asyncio.Protocol):
    """Answers pipelined GETs from prebuilt responses; no per-request allocation beyond slicing."""

    __slots__ = ("buf", "close_responses", "keep", "transport")

    def __init__(self, keep: dict[bytes, bytes] = _KEEP, close: dict[bytes, bytes] = _CLOSE) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.keep = keep
        self.close_responses = close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        global _accepted
        _accepted += 1
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        t = self.transport
        assert t is not None
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            buf = buf[end + 4 :]
            sp1 = head.find(b" ")
            sp2 = head.find(b" ", sp1 + 1)
            path = head[sp1 + 1 : sp2]
            if b"onnection: close" in head or b"ONNECTION: close" in head:
                t.write(self.close_responses.get(path, _NOT_FOUND))
                t.close()
                return
            resp = self.keep.get(path)
            if resp is None:
                t.write(_stats_response() if path == b"/_stats" else _NOT_FOUND)
                t.close()
                return
            t.write(resp)
        if len(buf) > _MAX_HEAD:
            t.close()
            return
        self.buf = buf


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Responder, host, port, backlog=4096, reuse_address=True)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


async def serve_tagged(host: str, tags: list[str]) -> None:
    """One listener per tag (its responses carry the tag) and one for ``GET /_stats``, all in this process."""
    loop = asyncio.get_running_loop()
    ports = []
    for tag in [*tags, "_stats"]:
        keep, close = (_responses(False, tag), _responses(True, tag)) if tag != "_stats" else ({}, {})
        server = await loop.create_server(
            lambda k=keep, c=close: Responder(k, c), host, 0, backlog=4096, reuse_address=True
        )
        ports.append(f"{tag}={server.sockets[0].getsockname()[1]}")
    print(f"PORTS {','.join(ports)}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backend", description=__doc__)
    p.add_argument("--host", default=LOOPBACK)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tags", default="", help="comma-separated: one listener per tag (prints PORTS tag=port,...)")
    args = p.parse_args(argv)
    from benchmarks.proc import raise_nofile

    raise_nofile()
    import uvloop

    try:
        tags = [t for t in args.tags.split(",") if t]
        uvloop.run(serve_tagged(args.host, tags) if tags else serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
