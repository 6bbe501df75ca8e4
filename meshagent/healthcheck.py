"""``python -m meshagent.healthcheck``: the agent image's HEALTHCHECK (compose/Dockerfile).

Exit 0 when the agent's admin API answers GET /readyz with 200 (a table is applied, every listener
is bound, and in cluster mode the tunnel and control ports too), 1 otherwise.  Swarm's
``order: start-first`` stops the old agent only once the new one is healthy, so with this check the
old agent's SIGTERM comes after the new one took the sockets over (``--handover``) and is ready.

Where the admin API listens: ``--admin HOST:PORT``, else the environment's ``MESH_ADMIN``, else the
``--admin`` of the agent's own command line (PID 1 of the container: ``/proc/1/cmdline``), else the
default 127.0.0.1:9901.  An agent run with ``--admin off`` has nothing to ask: healthy (exit 0).
Standard library only: it runs every few seconds in a fresh interpreter.
"""

from __future__ import annotations

import http.client
import os
import sys
from collections.abc import Sequence

DEFAULT_ADMIN = "127.0.0.1:9901"
TIMEOUT = 2.0


def admin_from_argv(argv: Sequence[str]) -> str | None:
    """The value of ``--admin`` (``--admin X`` or ``--admin=X``) in an agent's command line, or None."""
    for i, arg in enumerate(argv):
        if arg == "--admin" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--admin="):
            return arg.partition("=")[2]
    return None


def _proc_cmdline(path: str = "/proc/1/cmdline") -> list[str]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def admin_address(argv: Sequence[str], environ: dict[str, str] | os._Environ, cmdline: Sequence[str]) -> str:
    """Where to ask (see the module docstring): "host:port", or "off"."""
    return admin_from_argv(argv) or environ.get("MESH_ADMIN") or admin_from_argv(cmdline) or DEFAULT_ADMIN


def check(admin: str, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """(ready, what to print) for the admin API at ``admin`` ("host:port", "[v6]:port" or "off")."""
    if admin == "off":
        return True, "the agent runs with --admin off: nothing to check"
    host, sep, port = admin.rpartition(":")
    if not sep or not port.isdigit():
        return False, f"admin address {admin!r}: expected host:port"
    host = host.strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        body = resp.read(512).decode("utf-8", "replace").strip()
    except OSError as exc:
        return False, f"GET http://{admin}/readyz: {exc}"
    finally:
        conn.close()
    return resp.status == 200, f"GET http://{admin}/readyz: {resp.status} {body}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ok, text = check(admin_address(args, os.environ, _proc_cmdline()))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
