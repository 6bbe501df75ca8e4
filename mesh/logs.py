"""Logging set-up for the agent: readable text, or one JSON object per line.

Text:  ``2026-11-27T20:55:01.123Z INFO  mesh.runtime: listening on 0.0.0.0:8080 service=web``
JSON:  ``{"ts": "2026-11-27T20:55:01.123Z", "level": "info", "logger": "mesh.runtime", "msg": "...", "service": "web"}``

Fields passed with ``log.info(..., extra={"service": "web"})`` are appended to text lines as key=value
and become keys of the JSON object.  Timestamps are UTC with milliseconds.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["LEVELS", "JsonFormatter", "TextFormatter", "setup_logging"]

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")
ACCESS_LOGGER = "mesh.access"  # same name as mesh.metrics.ACCESS_LOGGER (kept here to avoid the import)

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
