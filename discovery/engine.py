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

The engine is found as the docker CLI finds it (``resolve_docker_host``):
``--docker HOST`` > ``DOCKER_HOST`` > ``DOCKER_CONTEXT`` > the ``currentContext``
of ``$DOCKER_CONFIG/config.json`` (default ~/.docker) > the local socket.  A
context is read from the CLI's context store by a small reader here (not
docker-py: it ignores DOCKER_CONTEXT, builds TLS settings for ``requests``
rather than an ``ssl.SSLContext``, and would pull in requests and urllib3 for
two JSON files).  ``ssh://`` hosts run ``ssh ... docker system dial-stdio`` per
connection behind a private unix socket (``discovery.sshbridge``), as the CLI
does.  Host resolution reads files (context, certificates) and runs once, when
discovery starts.
"""

from __future__ import annotations

import hashlib
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

from .sshbridge import SshBridge

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
    "SshTarget",
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
class SshTarget:
    """An ``ssh://[user@]host[:port]`` engine: reached by running ``ssh ... docker system dial-stdio``."""

    host: str
    user: str | None = None
    port: int | None = None

    def command(self, connect_timeout: float = 10.0) -> list[str]:
        """The ssh command line for one connection (the docker CLI's, plus BatchMode: an agent never prompts).
        Keys, known hosts, jump hosts and multiplexing come from the user's ssh configuration."""
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(connect_timeout))}", "-T"]
        if self.user:
            cmd += ["-l", self.user]
        if self.port:
            cmd += ["-p", str(self.port)]
        return [*cmd, "--", self.host, "docker", "system", "dial-stdio"]


@dataclass(frozen=True, slots=True)
class DockerHost:
    """Where the engine is and how to talk to it.

    ``url`` is the normalized address ("unix:///path", "tcp://host:port" or
    "ssh://[user@]host[:port]"); ``ssl`` is None for plain connections, an
    SSLContext for TLS; ``ssh`` is set for ssh:// hosts; ``context`` names the
    docker context the address came from (None: the flag, DOCKER_HOST or the
    default socket).
    """

    url: str
    socket_path: str | None = None
    host: str | None = None
    port: int | None = None
    ssl: ssl.SSLContext | None = None
    ssh: SshTarget | None = None
    context: str | None = None

    @property
    def base_url(self) -> str:
        if self.socket_path is not None or self.ssh is not None:
            # the host part is ignored on a unix socket (ssh: the bridge's); "docker" is what the CLI sends
            return "http://docker"
        scheme = "https" if self.ssl is not None else "http"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def __repr__(self) -> str:
        ctx = f", context={self.context!r}" if self.context else ""
        return f"DockerHost({self.url!r}, tls={self.ssl is not None}{ctx})"


def _truthy(value: str | None) -> bool:
    # the docker CLI treats any non-empty DOCKER_TLS_VERIFY as "on"
    return bool(value) and value not in ("0", "false", "False")


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def _tls_context(env: Mapping[str, str], *, verify: bool) -> ssl.SSLContext:
    cert_path = env.get("DOCKER_CERT_PATH") or os.path.join(_home(env), ".docker")
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

    Order: ``arg`` (``mesh run --docker HOST``), else ``DOCKER_HOST``, else the
    context named by ``DOCKER_CONTEXT``, else the ``currentContext`` of
    ``$DOCKER_CONFIG/config.json`` (``DOCKER_CONFIG`` defaults to ~/.docker), else
    the unix socket /var/run/docker.sock.  The context named ``default`` is that
    last step.  Accepted forms: ``unix:///path``, ``/path``, ``tcp://host[:port]``,
    ``http://`` / ``https://host[:port]``, ``ssh://[user@]host[:port]``.  For tcp
    given by ``arg`` or ``DOCKER_HOST``, ``DOCKER_TLS_VERIFY`` (non-empty) turns on
    TLS with verification against ``$DOCKER_CERT_PATH/ca.pem`` and the client cert
    ``cert.pem`` / ``key.pem`` (``DOCKER_CERT_PATH`` defaults to ~/.docker);
    ``DOCKER_TLS`` alone turns on TLS without verification.  A context's endpoint
    carries its own TLS settings instead (``_context_host``).  The default port is
    2376 with TLS, 2375 without.  Raises ``HostError`` naming the bad value (or
    the context and its file).  Reads files: call it at start-up, or in a thread.
    """
    env = os.environ if env is None else env
    raw = (arg or "").strip() or (env.get("DOCKER_HOST") or "").strip()
    if raw:
        return _parse_host(raw, env, None)
    name = (env.get("DOCKER_CONTEXT") or "").strip() or _current_context(env)
    if name and name != "default":
        return _context_host(name, env)
    return _parse_host(f"unix://{DEFAULT_UNIX_SOCKET}", env, None)


def _parse_host(raw: str, env: Mapping[str, str], context: _ContextTLS | None) -> DockerHost:
    """One address.  ``context``: the TLS settings of the context it came from (None: from the environment)."""
    if raw.startswith("/"):
        raw = "unix://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    name = context.name if context is not None else None
    where = f"docker context {name!r}: host {raw!r}" if name else f"docker host {raw!r}"
    if scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path.startswith("/"):
            raise HostError(f"{where}: a unix socket needs an absolute path (unix:///path/docker.sock)")
        return DockerHost(url=f"unix://{path}", socket_path=path, context=name)
    if scheme in ("tcp", "http", "https"):
        if context is not None:
            tls = scheme == "https" or context.tls
            if scheme == "http" and context.tls:
                raise HostError(f"{where}: http:// with TLS material in the context; use tcp:// or https://")
        else:
            tls_verify = _truthy(env.get("DOCKER_TLS_VERIFY"))
            tls = scheme == "https" or tls_verify or _truthy(env.get("DOCKER_TLS"))
            if scheme == "http" and tls_verify:
                raise HostError(f"{where}: http:// with DOCKER_TLS_VERIFY set; use tcp:// or https://")
        host = parts.hostname
        if not host:
            raise HostError(f"{where}: missing host name (tcp://host:port)")
        try:
            port = parts.port or (2376 if tls else 2375)
        except ValueError as exc:
            raise HostError(f"{where}: bad port") from exc
        if parts.path not in ("", "/"):
            raise HostError(f"{where}: a path prefix is not supported")
        if not tls:
            ctx = None
        elif context is not None:
            ctx = context.ssl_context()
        else:
            ctx = _tls_context(env, verify=tls_verify)
        shown = f"[{host}]" if ":" in host else host
        return DockerHost(url=f"tcp://{shown}:{port}", host=host, port=port, ssl=ctx, context=name)
    if scheme == "ssh":
        return _ssh_host(raw, parts, where, name)
    if scheme in ("npipe", "fd"):
        raise HostError(f"{where}: {scheme}:// is not supported; use unix://, tcp:// or ssh://")
    raise HostError(f"{where}: expected unix:///path, tcp://host:port or ssh://[user@]host[:port]")


def _ssh_host(raw: str, parts: Any, where: str, context: str | None) -> DockerHost:
    # the docker CLI's rules for ssh:// (connhelper/ssh): user and port optional, nothing else
    if parts.password is not None:
        raise HostError(f"{where}: a password in the address is not supported (use an ssh key or agent)")
    host = parts.hostname
    if not host:
        raise HostError(f"{where}: missing host name (ssh://[user@]host[:port])")
    if host.startswith("-"):
        raise HostError(f"{where}: a host name may not start with '-'")
    try:
        port = parts.port
    except ValueError as exc:
        raise HostError(f"{where}: bad port") from exc
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise HostError(f"{where}: nothing may follow the host (no path, query or fragment)")
    user = parts.username or None
    target = SshTarget(host=host, user=user, port=port)
    shown = (f"{user}@" if user else "") + (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    return DockerHost(url=f"ssh://{shown}", ssh=target, context=context)


# -- docker contexts --------------------------------------------------------------------------------------
#
# The CLI's context store (docker/cli, cli/context/store), under $DOCKER_CONFIG (default ~/.docker):
#   config.json                                      {"currentContext": "<name>", ...}
#   contexts/meta/<sha256(name)>/meta.json           {"Name": ..., "Endpoints": {"docker": {"Host": ...,
#                                                      "SkipTLSVerify": bool}}, "Metadata": {...}}
#   contexts/tls/<sha256(name)>/docker/{ca,cert,key}.pem   (each optional)
# TLS is on when the endpoint has TLS files or SkipTLSVerify; ca.pem verifies the engine (without it, the
# system's CAs do), cert.pem + key.pem are the client certificate; SkipTLSVerify turns verification off.


def _config_dir(env: Mapping[str, str]) -> str:
    return env.get("DOCKER_CONFIG") or os.path.join(_home(env), ".docker")


def _current_context(env: Mapping[str, str]) -> str | None:
    """``currentContext`` of config.json, or None (no file, or no such key)."""
    path = os.path.join(_config_dir(env), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        raise HostError(f"{path}{f':{line}' if line else ''}: not valid JSON: {exc}") from exc
    name = doc.get("currentContext") if isinstance(doc, dict) else None
    if name is not None and not isinstance(name, str):
        raise HostError(f"{path}: currentContext: expected a context name, got {name!r}")
    return name or None


@dataclass(frozen=True, slots=True)
class _ContextTLS:
    """A context's TLS settings for its docker endpoint."""

    name: str
    tls_dir: str
    ca: str | None
    cert: str | None
    key: str | None
    skip_verify: bool

    @property
    def tls(self) -> bool:
        return self.skip_verify or any((self.ca, self.cert, self.key))

    def ssl_context(self) -> ssl.SSLContext:
        where = f"docker context {self.name!r}"
        if bool(self.cert) != bool(self.key):
            raise HostError(f"{where}: {self.tls_dir} has only one of cert.pem and key.pem")
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            if self.skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if self.cert and self.key:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise HostError(f"{where}: cannot load TLS files from {self.tls_dir}: {exc}") from exc
        return ctx


def _context_host(name: str, env: Mapping[str, str]) -> DockerHost:
    """The docker endpoint of context ``name`` in the CLI's context store."""
    base = os.path.join(_config_dir(env), "contexts")
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta_path = os.path.join(base, "meta", digest, "meta.json")
    where = f"docker context {name!r} ({meta_path})"
    try:
        with open(meta_path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise HostError(
            f"docker context {name!r} does not exist (no {meta_path}; `docker context ls` lists them)"
        ) from None
    except OSError as exc:
        raise HostError(f"{where}: {exc}") from exc
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise HostError(f"{where}:{getattr(exc, 'lineno', '?')}: not valid JSON: {exc}") from exc
    endpoint = meta.get("Endpoints", {}).get("docker") if isinstance(meta, dict) else None
    if not isinstance(endpoint, dict):
        raise HostError(f"{where}: no docker endpoint (Endpoints.docker)")
    host = endpoint.get("Host")
    if not isinstance(host, str) or not host.strip():
        raise HostError(f"{where}: Endpoints.docker.Host: expected an address, got {host!r}")
    skip = endpoint.get("SkipTLSVerify", False)
    if not isinstance(skip, bool):
        raise HostError(f"{where}: Endpoints.docker.SkipTLSVerify: expected true or false, got {skip!r}")
    tls_dir = os.path.join(base, "tls", digest, "docker")
    files = {}
    for part in ("ca", "cert", "key"):
        path = os.path.join(tls_dir, f"{part}.pem")
        files[part] = path if os.path.isfile(path) else None
    tls = _ContextTLS(name, tls_dir, files["ca"], files["cert"], files["key"], skip)
    return _parse_host(host.strip(), env, tls)


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
        self.bridge: SshBridge | None = None  # ssh:// hosts: the local socket that runs ssh per connection

    def __repr__(self) -> str:
        return f"<Engine {self.host.url} api={self.api_version}>"

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self.host.ssh is not None:
                if self.bridge is None:
                    self.bridge = SshBridge(self.host.ssh.command(self.timeout), label=self.host.url)
                connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=await self.bridge.start())
            elif self.host.socket_path is not None:
                connector = aiohttp.UnixConnector(path=self.host.socket_path)
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
        if self.bridge is not None:
            await self.bridge.close()
            self.bridge = None

    def _why(self, exc: BaseException) -> str:
        """What went wrong, for an error message: ssh's own words when an ssh:// connection failed."""
        text = str(exc) or type(exc).__name__
        bridge = self.bridge
        if bridge is not None and bridge.last_error:
            text += f" (ssh: {bridge.last_error})"
        return text

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
        session = await self._get_session()
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
            raise EngineUnavailable(f"{self.host.url}: GET {path}: {self._why(exc)}") from exc
        except OSError as exc:
            raise EngineUnavailable(f"{self.host.url}: GET {path}: {self._why(exc)}") from exc
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
        session = await self._get_session()
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
            raise EngineUnavailable(f"{self.host.url}: GET /events: {self._why(exc)}") from exc
        except OSError as exc:
            raise EngineUnavailable(f"{self.host.url}: GET /events: {self._why(exc)}") from exc
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
