"""The demo web service: "Hello from <container id>! Visits: N" with N kept in redis.

Standard library only (the image needs no pip install).  Talks RESP to redis itself:
one short connection per visit, INCR of the key "visits".  GET /healthz answers 200
without redis, so a redis restart does not take every replica out of the mesh.
"""

from __future__ import annotations

import os
import socket
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


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
