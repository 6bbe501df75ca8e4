"""mesh/logs.py: the access log line (log_access) in both formats."""

from __future__ import annotations

import io
import json
import logging

import pytest

from mesh.logs import ACCESS_LOGGER, JsonFormatter, TextFormatter, log_access


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_log_line(fmt):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        log_access("web", 8080, "e1", ("10.0.0.7", 51234), 512, 73400, 0.4123456, "client_closed")
        log_access("web", 8080, None, None, 0, 0, 0.001, "no_endpoint")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    if fmt == "json":
        rec = json.loads(lines[0])
        assert {k: rec[k] for k in ("logger", "msg", "service", "port", "endpoint", "client")} == {
            "logger": "mesh.access",
            "msg": "connection closed",
            "service": "web",
            "port": 8080,
            "endpoint": "e1",
            "client": "10.0.0.7:51234",
        }
        assert (rec["received_bytes"], rec["sent_bytes"], rec["duration_seconds"], rec["reason"]) == (
            512,
            73400,
            0.412346,
            "client_closed",
        )
        assert json.loads(lines[1])["endpoint"] == "-" and json.loads(lines[1])["client"] == "-"
    else:
        assert lines[0].endswith(
            "mesh.access: connection closed service=web port=8080 endpoint=e1 client=10.0.0.7:51234 "
            "received_bytes=512 sent_bytes=73400 duration_seconds=0.412346 reason=client_closed"
        )
