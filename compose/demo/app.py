"""The demo web service: "Hello from <container id>! Visits: N" with N kept in redis.

Standard library only (the image needs no pip install).  Talks RESP to redis itself:
one short connection per visit, INCR of the key "visits".  GET /healthz answers 200
without redis, so a redis restart does not take every replica out of the mesh.

``python app.py --healthcheck`` is the image's HEALTHCHECK: exit 0 when GET /healthz on
this container answers 200 within 2 s.  Swarm reports a task "running" only once its
container is healthy, and the mesh routes to running tasks only, so a new replica gets
traffic once it answers, not once its process exists.

SIGTERM (what ``docker stop`` and swarm send; the app is PID 1, which has no default
handler) and SIGINT stop accepting, let the requests in progress finish, and exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REDIS_HOST = os.environ.get("REDIS_HOST", "redis")
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
PORT = int(os.environ.get("PORT", "8000"))
HOSTNAME = socket.gethostname()  # the container id (short) in Docker


def incr(key: str = "visits", timeout: float = 1.0) -> int:
    """INCR ``key`` in redis; raises OSError/ValueError when redis is away or answers oddly."""
    with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"*2\r\n$4\r\nINCR\r\n${len(key)}\r\n{key}\r\n".encode())
        line = s.makefile("rb").readline()
    if not line.startswith(b":"):
        raise ValueError(f"unexpected redis answer {line[:80]!r}")
    return int(line[1:].strip())


class Handler(BaseHTTPRequestHandler):
    timeout = 10  # a client that sends nothing does not hold a thread (or the exit) for long

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, "ok\n")
            return
        try:
            visits: str = str(incr())
        except (OSError, ValueError) as exc:
            visits = f"unknown (redis: {exc})"
        self._send(200, f"Hello from {HOSTNAME}! Visits: {visits}\n")

    def _send(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet: one line per request is noise here
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in progress
    request_queue_size = 128


def healthcheck(port: int = PORT, timeout: float = 2.0) -> int:
    """0 when GET /healthz on 127.0.0.1:``port`` answers 200, else 1 (the HEALTHCHECK's exit code)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            head = s.recv(64)
    except OSError:
        return 1
    return 0 if head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")) else 1


def serve(port: int = PORT) -> None:
    server = Server(("0.0.0.0", port), Handler)

    def stop(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever() to return: it must not run on the thread that serves
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--healthcheck"]:
        sys.exit(healthcheck())
    serve()
