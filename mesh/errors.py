"""The error hierarchy.  Each I/O boundary maps low-level exceptions to one of
these once, with ``raise X from exc``, so callers handle domain errors only."""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(MeshError):
    """Bad configuration: the message names the file and line (or the service and
    label) and says what was expected."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        self.source = source
        self.line = line
        where = source or ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message


class UpstreamError(MeshError):
    """Talking to an endpoint failed."""


class ConnectError(UpstreamError):
    """The endpoint refused the connection, or it was unreachable."""


class ConnectTimeout(ConnectError):
    """The connect did not finish within the service's connect_timeout."""


class NoEndpoint(UpstreamError):
    """No endpoint is available for a route."""


class ProtocolError(MeshError):
    """A peer sent bytes that break the protocol (e.g. a malformed PROXY header)."""
