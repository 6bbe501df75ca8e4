"""A small asynchronous client for the read-only part of the Docker Engine API.

Why aiohttp and not docker-py: docker-py is blocking (requests + urllib3).  Its
events iterator would pin a thread that cannot be interrupted (stopping it means
closing its socket from another thread), and when dockerd restarts the iterator
simply ends.  Speaking HTTP/1.1 over the unix socket with aiohttp keeps
everything on the event loop: every call is cancellable, has a timeout, and the
end of the events stream is an ordinary, detectable EOF.  aiohttp is already a
dependency (admin API), so nothing new is pulled in.

Only GET requests are made, so the agent works behind a read-only socket proxy
(it needs the sections PING, VERSION, INFO, EVENTS, CONTAINERS, NETWORKS and, for
swarm services, SERVICES and TASKS).

Errors are mapped once, here, to ``EngineError`` subclasses (``mesh.errors``
hierarchy); callers never see aiohttp exceptions.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from mesh.errors import MeshError

__all__ = [
    "API_VERSION",
    "DEFAULT_UNIX_SOCKET",
    "DockerHost",
    "Engine",
    "EngineAPIError",
    "EngineError",
    "EngineUnavailable",
    "HostError",
    "NotFound",
    "NotSwarmManager",
    "StreamEnded",
    "resolve_docker_host",
]

log = logging.getLogger(__name__)

# The API version this client was written and tested against (dockerd 20.10).  Newer
# engines still serve it; an older engine is used at its own (lower) version.
API_VERSION = "1.41"
MIN_API_VERSION = "1.30"
DEFAULT_UNIX_SOCKET = "/var/run/docker.sock"
# Events lines are small JSON objects; a line longer than this is not an event.
MAX_EVENT_LINE = 1 << 20


class EngineError(MeshError):
    """Talking to the Docker engine failed."""


class HostError(EngineError):
    """The engine address (DOCKER_HOST, --docker) or its TLS settings are unusable."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached (no socket, refused, timed out, connection lost)."""


class StreamEnded(EngineUnavailable):
    """The events stream ended.  dockerd closes it without an error when it restarts."""


class EngineAPIError(EngineError):
    """The engine answered with an HTTP error status."""

    def __init__(self, status: int, message: str, *, path: str = "") -> None:
        self.status = status
        self.path = path
        self.message = message
        super().__init__(f"GET {path}: HTTP {status}: {message}" if path else f"HTTP {status}: {message}")


class NotFound(EngineAPIError):
    """404: the object (container, service, network) does not exist (any more)."""


class NotSwarmManager(EngineAPIError):
    """503 on a swarm endpoint: this engine is not a swarm manager (or not in a swarm)."""


@dataclass(frozen=True, slots=True)
class DockerHost:
    """Where the engine is and how to talk to it.

    ``url`` is the normalized address ("unix:///path" or "tcp://host:port");
    ``ssl`` is None for plain connections, an SSLContext for TLS.
    """

    url: str
    socket_path: str | None = None
    host: str | None = None
    port: int | None = None
    ssl: ssl.SSLContext | None = None

    @property
    def base_url(self) -> str:
        if self.socket_path is not None:
            # the host part is ignored on a unix socket; "docker" is what the CLI sends
            return "http://docker"
        scheme = "https" if self.ssl is not None else "http"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def __repr__(self) -> str:
        return f"DockerHost({self.url!r}, tls={self.ssl is not None})"


def _truthy(value: str | None) -> bool:
    # the docker CLI treats any non-empty DOCKER_TLS_VERIFY as "on"
    return bool(value) and value not in ("0", "false", "False")


def _tls_context(env: Mapping[str, str], *, verify: bool) -> ssl.SSLContext:
    cert_path = env.get("DOCKER_CERT_PATH") or os.path.join(os.path.expanduser("~"), ".docker")
    ca, cert, key = (os.path.join(cert_path, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    try:
        if verify:
            if not os.path.exists(ca):
                raise HostError(f"DOCKER_TLS_VERIFY is set but {ca} does not exist (set DOCKER_CERT_PATH)")
            ctx = ssl.create_default_context(cafile=ca)
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if os.path.exists(cert) and os.path.exists(key):
            ctx.load_cert_chain(cert, key)
        elif verify:
            raise HostError(f"DOCKER_TLS_VERIFY is set but {cert} / {key} are missing (set DOCKER_CERT_PATH)")
    except (OSError, ssl.SSLError) as exc:
        raise HostError(f"cannot load TLS files from {cert_path}: {exc}") from exc
    return ctx


def resolve_docker_host(arg: str | None = None, env: Mapping[str, str] | None = None) -> DockerHost:
    """Find the engine the way the docker CLI does.

    Order: ``arg`` (``mesh run --docker HOST``), else ``DOCKER_HOST``, else the unix
    socket /var/run/docker.sock.  Accepted forms: ``unix:///path``, ``/path``,
    ``tcp://host[:port]``, ``http://`` / ``https://host[:port]``.  For tcp,
    ``DOCKER_TLS_VERIFY`` (non-empty) turns on TLS with verification against
    ``$DOCKER_CERT_PATH/ca.pem`` and the client cert ``cert.pem`` / ``key.pem``
    (``DOCKER_CERT_PATH`` defaults to ~/.docker); ``DOCKER_TLS`` alone turns on TLS
    without verification.  The default port is 2376 with TLS, 2375 without.
    Raises ``HostError`` naming the bad value.
    """
    env = os.environ if env is None else env
    raw = (arg or env.get("DOCKER_HOST") or f"unix://{DEFAULT_UNIX_SOCKET}").strip()
    if raw.startswith("/"):
        raw = "unix://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path.startswith("/"):
            raise HostError(f"docker host {raw!r}: a unix socket needs an absolute path (unix:///path/docker.sock)")
        return DockerHost(url=f"unix://{path}", socket_path=path)
    if scheme in ("tcp", "http", "https"):
        tls_verify = _truthy(env.get("DOCKER_TLS_VERIFY"))
        tls = scheme == "https" or tls_verify or _truthy(env.get("DOCKER_TLS"))
        if scheme == "http" and tls_verify:
            raise HostError(f"docker host {raw!r}: http:// with DOCKER_TLS_VERIFY set; use tcp:// or https://")
        host = parts.hostname
        if not host:
            raise HostError(f"docker host {raw!r}: missing host name (tcp://host:port)")
        try:
            port = parts.port or (2376 if tls else 2375)
        except ValueError as exc:
            raise HostError(f"docker host {raw!r}: bad port") from exc
        if parts.path not in ("", "/"):
            raise HostError(f"docker host {raw!r}: a path prefix is not supported")
        ctx = _tls_context(env, verify=tls_verify) if tls else None
        shown = f"[{host}]" if ":" in host else host
        return DockerHost(url=f"tcp://{shown}:{port}", host=host, port=port, ssl=ctx)
    if scheme in ("ssh", "npipe", "fd"):
        raise HostError(f"docker host {raw!r}: {scheme}:// is not supported; use unix:// or tcp://")
    raise HostError(f"docker host {raw!r}: expected unix:///path or tcp://host:port")


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (0,)


def _filters(filters: Mapping[str, Any] | None) -> dict[str, str]:
    if not filters:
        return {}
    norm = {k: [v] if isinstance(v, str) else list(v) for k, v in filters.items()}
    return {"filters": json.dumps(norm, sort_keys=True, separators=(",", ":"))}


class Engine:
    """Read-only Engine API client.  Use as ``async with Engine(host) as e: ...``.

    ``api_version``: a fixed version ("1.41"), or None to negotiate: the lower of
    the engine's ApiVersion and ``API_VERSION`` (GET /version, once per connection).
    ``timeout``: per request, not for the events stream.
    """

    def __init__(self, host: DockerHost, *, api_version: str | None = None, timeout: float = 10.0) -> None:
        self.host = host
        self.timeout = timeout
        self._fixed_version = api_version
        self.api_version: str | None = api_version
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"<Engine {self.host.url} api={self.api_version}>"

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self.host.socket_path is not None:
                connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self.host.socket_path)
            else:
                connector = aiohttp.TCPConnector(ssl=self.host.ssl if self.host.ssl is not None else False)
            self._session = aiohttp.ClientSession(
                base_url=self.host.base_url,
                connector=connector,
                # the engine's JSON is read with json.loads below; no cookies, no env proxies
                trust_env=False,
                auto_decompress=True,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reset_version(self) -> None:
        """Forget the negotiated version (call after a reconnect: the engine may have been upgraded)."""
        self.api_version = self._fixed_version

    # -- plumbing -----------------------------------------------------------------
    async def _ensure_version(self) -> str:
        if self.api_version is None:
            ver = await self._request("/version", versioned=False)
            server = str(ver.get("ApiVersion") or "")
            if not server:
                raise EngineAPIError(200, "GET /version has no ApiVersion", path="/version")
            chosen = min(server, API_VERSION, key=_version_tuple)
            if _version_tuple(chosen) < _version_tuple(MIN_API_VERSION):
                raise EngineError(f"engine API version {server} is older than the minimum {MIN_API_VERSION}")
            self.api_version = chosen
        return self.api_version

    def _url(self, path: str, version: str | None) -> str:
        return f"/v{version}{path}" if version else path

    async def _request(
        self, path: str, params: Mapping[str, str] | None = None, *, versioned: bool = True, text: bool = False
    ) -> Any:
        version = await self._ensure_version() if versioned else None
        url = self._url(path, version)
        session = self._get_session()
        try:
            async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise _api_error(resp.status, body, path)
        except EngineError:
            raise
        except TimeoutError as exc:
            raise EngineUnavailable(f"{self.host.url}: GET {path} timed out after {self.timeout}s") from exc
        except aiohttp.ClientError as exc:
            raise EngineUnavailable(f"{self.host.url}: GET {path}: {exc or type(exc).__name__}") from exc
        except OSError as exc:
            raise EngineUnavailable(f"{self.host.url}: GET {path}: {exc}") from exc
        if text:
            return body.decode("utf-8", "replace")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise EngineAPIError(resp.status, f"response is not JSON: {body[:80]!r}", path=path) from exc

    # -- endpoints (all GET) ---------------------------------------------------------
    async def ping(self) -> bool:
        """GET /_ping: True when the engine answers "OK"."""
        return (await self._request("/_ping", versioned=False, text=True)).strip() == "OK"

    async def version(self) -> dict[str, Any]:
        return await self._request("/version", versioned=False)

    async def info(self) -> dict[str, Any]:
        return await self._request("/info")

    async def containers(self, filters: Mapping[str, Any] | None = None, *, all: bool = False) -> list[dict]:
        params = _filters(filters)
        if all:
            params["all"] = "1"
        return await self._request("/containers/json", params)

    async def container(self, container_id: str) -> dict[str, Any]:
        return await self._request(f"/containers/{quote(container_id, safe='')}/json")

    async def services(self, filters: Mapping[str, Any] | None = None) -> list[dict]:
        return await self._request("/services", _filters(filters))

    async def service(self, service_id: str) -> dict[str, Any]:
        return await self._request(f"/services/{quote(service_id, safe='')}")

    async def tasks(self, filters: Mapping[str, Any] | None = None) -> list[dict]:
        return await self._request("/tasks", _filters(filters))

    async def nodes(self, filters: Mapping[str, Any] | None = None) -> list[dict]:
        return await self._request("/nodes", _filters(filters))

    async def network(self, name_or_id: str) -> dict[str, Any]:
        return await self._request(f"/networks/{quote(name_or_id, safe='')}")

    @asynccontextmanager
    async def events(
        self, filters: Mapping[str, Any] | None = None, *, since: float | None = None
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Open GET /events and yield an async iterator of event dicts.

        Entering the context waits for the response headers, i.e. until the engine
        has subscribed us: events that happen after that are not lost, so a listing
        made inside the context cannot miss a change.  The iterator raises
        ``StreamEnded`` when the stream ends (dockerd restart: EOF without error) and
        ``EngineUnavailable`` on other connection failures.
        """
        params = _filters(filters)
        if since is not None:
            params["since"] = f"{since:.9f}"
        version = await self._ensure_version()
        path = "/events"
        session = self._get_session()
        try:
            resp = await session.get(
                self._url(path, version),
                params=params,
                # no total timeout: the stream is idle while nothing happens
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=None),
            )
        except TimeoutError as exc:
            raise EngineUnavailable(f"{self.host.url}: GET /events: connect timed out") from exc
        except aiohttp.ClientError as exc:
            raise EngineUnavailable(f"{self.host.url}: GET /events: {exc or type(exc).__name__}") from exc
        except OSError as exc:
            raise EngineUnavailable(f"{self.host.url}: GET /events: {exc}") from exc
        try:
            if resp.status >= 400:
                raise _api_error(resp.status, await resp.read(), path)
            yield self._iter_events(resp)
        finally:
            resp.close()

    async def _iter_events(self, resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
        buf = b""
        while True:
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                # a restarting dockerd cuts the chunked stream without the final chunk
                raise StreamEnded(f"{self.host.url}: events stream cut: {exc or type(exc).__name__}") from exc
            except OSError as exc:
                raise StreamEnded(f"{self.host.url}: events stream failed: {exc}") from exc
            if not chunk:
                raise StreamEnded(f"{self.host.url}: events stream ended")
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl].strip(), buf[nl + 1 :]
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("docker events: skipping a line that is not JSON: %r", line[:120])
                    continue
                if isinstance(event, dict):
                    yield event
            if len(buf) > MAX_EVENT_LINE:
                raise EngineAPIError(200, f"events line longer than {MAX_EVENT_LINE} bytes", path="/events")


def _api_error(status: int, body: bytes, path: str) -> EngineAPIError:
    try:
        message = str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace").strip()
    message = message or "(no message)"
    if status == 404:
        return NotFound(status, message, path=path)
    if status == 503 and ("swarm" in message.lower() or "manager" in message.lower()):
        return NotSwarmManager(status, message, path=path)
    return EngineAPIError(status, message, path=path)
