"""Logging set-up for the agent: readable text, or one JSON object per line.

Text:  ``2026-11-27T20:55:01.123Z INFO  mesh.runtime: listening on 0.0.0.0:8080 service=web``
JSON:  ``{"ts": "2026-11-27T20:55:01.123Z", "level": "info", "logger": "mesh.runtime", "msg": "...", "service": "web"}``

Fields passed with ``log.info(..., extra={"service": "web"})`` are appended to text lines as key=value
and become keys of the JSON object.  Timestamps are UTC with milliseconds.

``log_access`` writes the access log: one line per closed connection on the ``mesh.access`` logger, which
``setup_logging`` holds at WARNING (off) unless ``access_log=True``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["ACCESS_LOGGER", "LEVELS", "JsonFormatter", "TextFormatter", "log_access", "log_request", "setup_logging"]

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")
ACCESS_LOGGER = "mesh.access"  # one line per closed connection (log_access); off unless asked for

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime"}


def _ts(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: message key=value ...`` plus the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_ts(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, and ``exc`` for tracebacks."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _extras(record).items():
            obj.setdefault(k, v)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


def setup_logging(
    level: str = "info", fmt: str = "text", stream: TextIO | None = None, *, access_log: bool = False
) -> logging.Handler:
    """Configure the root logger: ``level`` one of LEVELS, ``fmt`` "text" or "json"; output to stderr.

    ``access_log``: let the ``mesh.access`` logger (one line per closed connection) through at INFO
    whatever ``level`` is; without it that logger is held at WARNING, so it is off.

    Replaces handlers installed by an earlier call, so it can be called again (e.g. in a worker).
    Returns the installed handler.  Raises ``ValueError`` naming a bad level or format.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}; got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_mesh_handler", False):
            root.removeHandler(old)
    handler._mesh_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access logger is per request; the admin API is not the hot path but keep it quiet by default.
    logging.getLogger("aiohttp.access").setLevel(max(root.level, logging.WARNING))
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.WARNING)
    return handler


_access = logging.getLogger(ACCESS_LOGGER)


def log_access(
    service: str,
    port: int,
    endpoint: str | None,
    client: tuple[str, int] | None,
    received: int,
    sent: int,
    duration: float,
    reason: str,
) -> None:
    """One line per closed connection on the ``mesh.access`` logger (off unless the CLI enables it).

    The proxy calls it once per closed connection, and only when the access log was asked for
    (``--access-log``; a flag checked at close, never per chunk).  Fields, passed as ``extra`` so both
    formatters print them: service, port, endpoint (id, or "-" when none was chosen), client ("ip:port"),
    received_bytes (from the client), sent_bytes (to the client), duration_seconds, reason (why it closed:
    "client_closed", "upstream_closed", "idle_timeout", "no_endpoint", "refused", "timeout",
    "unreachable", "error", "overflow", "shutdown").
    """
    client_s = f"{client[0]}:{client[1]}" if client else "-"
    ep = endpoint or "-"
    # The message stays short: the formatters above print the fields (text: key=value, JSON: keys).
    _access.info(
        "connection closed",
        extra={
            "service": service,
            "port": port,
            "endpoint": ep,
            "client": client_s,
            "received_bytes": received,
            "sent_bytes": sent,
            "duration_seconds": round(duration, 6),
            "reason": reason,
        },
    )


def log_request(
    service: str,
    port: int,
    client: tuple[str, int] | None,
    host: str,
    method: str,
    path: str,
    status: int,
    sent: int,
    duration: float,
    endpoint: str | None,
    retries: int,
) -> None:
    """One line per HTTP request on the ``mesh.access`` logger (http listeners; off unless asked for).

    Fields (``extra``, so the text and JSON formatters print them): service ("-" when no route matched),
    port, client ("ip:port"), host (the Host the request named), method, path (the request target), status
    (the one the client got; generated ones included), sent_bytes (to the client, head included),
    duration_seconds, endpoint (the last one tried, or "-"), retries."""
    _access.info(
        "request",
        extra={
            "service": service,
            "port": port,
            "client": f"{client[0]}:{client[1]}" if client else "-",
            "host": host or "-",
            "method": method,
            "path": path,
            "status": status,
            "sent_bytes": sent,
            "duration_seconds": round(duration, 6),
            "endpoint": endpoint or "-",
            "retries": retries,
        },
    )
