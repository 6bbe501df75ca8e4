"""The HTTP backend that every peer forwards to: nginx when installed, else a small uvloop responder.

Both serve ``/100b``, ``/16k`` and ``/1m`` (bodies of 100 B, 16 KiB and 1 MiB), keep connections alive as long
as the client wants, and close after the response when the request says ``Connection: close`` (the churn
workload).  ``python -m benchmarks.backend --port 0`` runs the responder alone and prints ``PORT <n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import sys
from pathlib import Path

from benchmarks.proc import LOOPBACK, BenchError, Proc, free_port, nofile_limit, python_env, tree_pids, wait_port

SIZES = {"100b": 100, "16k": 16 * 1024, "1m": 1024 * 1024}
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def body(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


class Backend:
    """A running backend.  ``kind`` is "nginx" or "uvloop"; ``addr`` is (host, port)."""

    kind = ""

    def __init__(self, workdir: Path, cpus: str | None = None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.proc: Proc | None = None
        self.addr: tuple[str, int] = (LOOPBACK, 0)

    def start(self) -> tuple[str, int]:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid) if self.proc else []


class NginxBackend(Backend):
    """nginx, one worker, static files, access log off, effectively unlimited keep-alive."""

    kind = "nginx"

    def start(self) -> tuple[str, int]:
        d = self.workdir / "backend-nginx"
        (d / "www").mkdir(parents=True, exist_ok=True)
        (d / "logs").mkdir(exist_ok=True)
        for name, size in SIZES.items():
            (d / "www" / name).write_bytes(body(size))
        port = free_port()
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
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        root {d}/www;
    }}
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
        return self.addr


class UvloopBackend(Backend):
    """This module's responder in its own process."""

    kind = "uvloop"

    def start(self) -> tuple[str, int]:
        d = self.workdir / "backend-uvloop"
        d.mkdir(parents=True, exist_ok=True)
        self.proc = Proc(
            "backend uvloop",
            [sys.executable, "-m", "benchmarks.backend", "--port", "0"],
            d / "stderr.log",
            cpus=self.cpus,
            stdout_pipe=True,
            env=python_env(),
        )
        port = int(self.proc.read_line("PORT "))
        self.addr = (LOOPBACK, port)
        return self.addr


def make_backend(kind: str, workdir: Path, cpus: str | None = None) -> Backend:
    """``kind``: "nginx", "uvloop" or "auto" (nginx when installed)."""
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "uvloop"
    if kind == "nginx":
        if shutil.which("nginx") is None:
            raise BenchError("backend nginx requested but nginx is not installed (apt-get install nginx-light)")
        return NginxBackend(workdir, cpus)
    if kind == "uvloop":
        return UvloopBackend(workdir, cpus)
    raise BenchError(f"backend must be nginx, uvloop or auto; got {kind!r}")


# -- the responder ------------------------------------------------------------------------------------------------


def _response(size: int, close: bool) -> bytes:
    conn = b"close" if close else b"keep-alive"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n"
    return head % (size, conn) + body(size)


_KEEP = {f"/{name}".encode(): _response(size, False) for name, size in SIZES.items()}
_CLOSE = {f"/{name}".encode(): _response(size, True) for name, size in SIZES.items()}
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_MAX_HEAD = 16 * 1024


class Responder(asyncio.Protocol):
    """Answers pipelined GETs from prebuilt responses; no per-request allocation beyond slicing."""

    __slots__ = ("buf", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
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
                t.write(_CLOSE.get(path, _NOT_FOUND))
                t.close()
                return
            resp = _KEEP.get(path)
            if resp is None:
                t.write(_NOT_FOUND)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backend", description=__doc__)
    p.add_argument("--host", default=LOOPBACK)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    from benchmarks.proc import raise_nofile

    raise_nofile()
    import uvloop

    try:
        uvloop.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
