"""Static configuration: a YAML or TOML file turned into a ``RoutingTable``.

The file format (YAML shown; TOML has the same tree)::

    defaults:                       # optional: ServiceOptions applied to every service
      connect_timeout: 2s
    services:
      web:
        listen: 8080                # or "127.0.0.1:8080", or a list of them; 0 = any free port
        protocol: tcp               # tcp | udp | tls (passthrough routed by SNI) | http
        balance: round-robin        # round-robin | least-conn | p2c | hash
        endpoints: ["127.0.0.1:9001", {address: 127.0.0.1, port: 9002, weight: 2}]
      site-a:
        listen: 8443
        protocol: tls
        sni: ["a.example.com", "*.a.example.com"]   # no sni: the port's default service
        endpoints: ["127.0.0.1:9443"]
      api:
        listen: 80                  # several http services share a port, told apart by hosts/paths
        protocol: http
        hosts: ["shop.example.com", "*.shop.example.com"]   # no hosts: any host
        paths: ["/api"]             # path prefixes; no paths: any path
        endpoints: ["127.0.0.1:9101"]

See examples/mesh.yaml for every option.

Rules:
- Every error is a ``ConfigError`` whose message starts with "file:line:" and
  names the key path (``services.web.balance``) and what is expected.
- YAML positions come from the composed node tree (``start_mark``), so the line
  is exact; duplicate keys are errors (PyYAML would silently keep the last one).
- ``tomllib`` gives no positions: the line of a key is found by scanning the text
  for table headers and ``key =`` lines (best effort, falling back to the line of
  the nearest enclosing table); the key path is always in the message.
- Unknown keys are errors, with a "did you mean" hint when a known key is close.
- Option values (durations, numbers, words, ...) are parsed by ``mesh.options``,
  the same schema the Docker label reader uses, so a value means the same thing
  here and in a label (docs/options.md).
- A static endpoint's id is its "host:port" unless the file gives one.
- ``protocol`` is one word per service (tcp, udp, tls or http); ``sni`` only with tls,
  ``hosts`` and ``paths`` only with http.  A udp service balances with ``udp_balance``,
  which is ``balance`` when only that is given (in the service or in ``defaults``),
  else ``hash``.
- ``accept_proxy`` is a list of networks, or a mapping ``{trusted: [...]}`` (the form
  docs/options.md shows), in a service or in ``defaults``.
- Routes that cannot share a listen address (``mesh.routing.route_conflict``: a tcp
  route next to any other stream route on its port, two http routes claiming the same
  host and path prefix, two tls routes claiming the same SNI name) reject the file,
  naming both services, at the ``listen`` line of the one later by name.
- ``listen`` port 0 means any free port, chosen when the listener binds (tests:
  the admin API's ``/v1/table`` shows the bound port).  Only ``listen``: an
  endpoint's port is never 0.  With ``workers`` > 1 (``--workers N``) port 0 is
  an error: each worker process would bind a port of its own
  (``check_workers`` says the same for a table from any source).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mesh import options as schema
from mesh.errors import ConfigError
from mesh.options import OptionError, describe
from mesh.routing import (
    Endpoint,
    HealthCheck,
    Match,
    Route,
    RoutingTable,
    Service,
    ServiceOptions,
    TableError,
    format_hostport,
    parse_hostport,
)

__all__ = ["check_workers", "load_config", "parse_config", "parse_duration", "parse_listen"]

KeyPath = tuple[str | int, ...]


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "500ms", "5s", "2m", "1h" (``mesh.options`` grammar).

    Raises ``ValueError`` (an ``OptionError``)."""
    return schema.parse_duration(value)


_LISTEN_EXPECTED = "expected a port (0-65535; 0 = any free port, chosen at bind) or 'host:port'"


def parse_listen(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """A listen address: "host:port", "[v6]:port" or a bare "port" (on ``default_host``).

    The grammar of ``mesh.routing.parse_hostport``, except that the port may be 0: any free
    port, chosen when the listener binds.  Raises ``TableError`` quoting the input.
    """
    s = str(text).strip()
    head, sep, port_s = s.rpartition(":")
    number = port_s.isascii() and port_s.isdigit()
    if number and int(port_s) > 65535:
        raise TableError(f"port out of range 0-65535 in {text!r}")
    if not (number and int(port_s) == 0):
        return parse_hostport(s, default_host=default_host)
    if not sep:
        return default_host, 0
    # The host part follows the contract's rules: check it on a valid port, report the input as given.
    try:
        host, _ = parse_hostport(f"{head}:1")
    except TableError as exc:
        raise TableError(str(exc).replace(repr(f"{head}:1"), repr(text))) from None
    return host, 0


def _any_port_message(service: str, workers: int) -> str:
    return (
        f"service {service!r} listens on port 0 (any free port), which --workers {workers} cannot share: "
        "each worker process would bind a port of its own; give the service a fixed port"
    )


def check_workers(table: RoutingTable, workers: int) -> None:
    """Refuse a table with a port-0 route (any free port) for ``workers`` > 1 data-plane processes.

    With SO_REUSEPORT every worker binds the listen address itself, so port 0 would give each
    worker a different port.  Raises ``ConfigError`` naming the first such service.
    """
    if workers <= 1:
        return
    for svc, route in table.routes():
        if route.port == 0:
            raise ConfigError(_any_port_message(svc.name, workers))


def load_config(path: str | Path, *, version: int = 1, workers: int = 1) -> RoutingTable:
    """Read ``path`` (.yaml, .yml or .toml) and return its routing table with ``version``.

    ``workers``: the data-plane processes that will serve it (``--workers``); above 1, a
    ``listen`` on port 0 is an error.  Raises ``ConfigError`` naming the file and line of
    whatever is wrong.
    """
    source = str(path)
    suffix = Path(source).suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(
            f"unknown config file type {suffix or '(none)'!r}; expected .yaml, .yml or .toml", source=source
        )
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", source=source) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file is not UTF-8 text: {exc.reason}", source=source) from exc
    fmt = "toml" if suffix == ".toml" else "yaml"
    return parse_config(text, source=source, fmt=fmt, version=version, workers=workers)


def parse_config(
    text: str, *, source: str = "<config>", fmt: str = "yaml", version: int = 1, workers: int = 1
) -> RoutingTable:
    """Like ``load_config`` for text already read; ``fmt`` is "yaml" or "toml"."""
    if fmt == "yaml":
        data, lines = _read_yaml(text, source)
    elif fmt == "toml":
        data, lines = _read_toml(text, source)
    else:
        raise ValueError(f"fmt must be 'yaml' or 'toml', got {fmt!r}")
    return _Builder(source, lines, workers).table(data, version)


# -- reading, with positions ---------------------------------------------------------------------


class _Lines:
    """Key path -> 1-based line; lookups fall back to the nearest enclosing path."""

    def __init__(self, lines: dict[KeyPath, int]) -> None:
        self._lines = lines

    def __call__(self, path: KeyPath) -> int | None:
        p = tuple(path)
        while True:
            if p in self._lines:
                return self._lines[p]
            if not p:
                return None
            p = p[:-1]


def _read_yaml(text: str, source: str) -> tuple[Any, _Lines]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"YAML syntax error: {what}", source=source, line=mark.line + 1 if mark else None) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", source=source, line=1) from exc
    finally:
        loader.dispose()
    if node is None:
        raise ConfigError("the file is empty; expected a mapping with a 'services' key", source=source, line=1)
    lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
    constructor = yaml.SafeLoader("")

    def walk(n: yaml.Node, path: KeyPath) -> Any:
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError(
                        f"{_dotted(path) or 'top level'}: keys must be plain names",
                        source=source,
                        line=key_node.start_mark.line + 1,
                    )
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConfigError(
                        "YAML merge keys ('<<') are not supported; write the keys out",
                        source=source,
                        line=key_node.start_mark.line + 1,
                    )
                try:
                    key = constructor.construct_object(key_node)
                except yaml.YAMLError as exc:
                    raise ConfigError(f"bad key: {exc}", source=source, line=key_node.start_mark.line + 1) from exc
                if key in out:
                    raise ConfigError(
                        f"{_dotted((*path, key))}: duplicate key (first at line {lines[(*path, key)]})",
                        source=source,
                        line=key_node.start_mark.line + 1,
                    )
                lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = walk(value_node, (*path, key))
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, item in enumerate(n.value):
                lines[(*path, i)] = item.start_mark.line + 1
                items.append(walk(item, (*path, i)))
            return items
        try:
            return constructor.construct_object(n)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"{_dotted(path)}: bad value: {getattr(exc, 'problem', None) or exc}",
                source=source,
                line=n.start_mark.line + 1,
            ) from exc

    try:
        data = walk(node, ())
    finally:
        constructor.dispose()
    return data, _Lines(lines)


_TOML_POS = re.compile(r"\(at line (\d+), column \d+\)")
_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_TOML_KEY = re.compile(
    r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)
_TOML_INLINE_KEY = re.compile(r"[{,]\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*=")


def _toml_keys(dotted: str) -> KeyPath:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", dotted)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def _read_toml(text: str, source: str) -> tuple[Any, _Lines]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_POS.search(msg)
        raise ConfigError(
            f"TOML syntax error: {_TOML_POS.sub('', msg).strip()}", source=source, line=int(m.group(1)) if m else None
        ) from exc
    if not data:
        raise ConfigError("the file is empty; expected a table with a 'services' key", source=source, line=1)
    # Best effort: tomllib has no positions.  Walk the text, tracking the current table
    # header (and array-of-tables indices), and record the first line of every key path.
    lines: dict[KeyPath, int] = {(): 1}
    table: KeyPath = ()
    counters: dict[KeyPath, int] = {}
    for no, line in enumerate(text.splitlines(), start=1):
        h = _TOML_HEADER.match(line)
        if h:
            keys = _toml_keys(h.group(2))
            if h.group(1) == "[[":
                idx = counters.get(keys, -1) + 1
                counters[keys] = idx
                lines.setdefault(keys, no)
                table = (*keys, idx)
            else:
                table = keys
            lines.setdefault(table, no)
            continue
        k = _TOML_KEY.match(line)
        if k:
            path = (*table, *_toml_keys(k.group(1)))
            lines.setdefault(path, no)
            rest = line[k.end() :]
            # keys of an inline table on the same line: ``web = { listen = 8080, ... }``
            for ik in _TOML_INLINE_KEY.finditer(rest):
                name = ik.group(1)
                lines.setdefault((*path, name[1:-1] if name[:1] in "\"'" else name), no)
    return data, _Lines(lines)


# -- building the table ----------------------------------------------------------------------------

_OPTIONS = {o.key: o for o in schema.SERVICE_OPTIONS}
_HEALTH = {o.key: o for o in schema.HEALTH_OPTIONS}
_OPTION_KEYS = (*_OPTIONS, "health_check")
# A route's match rules: file key -> (the protocol it goes with, its option).
_MATCH_KEYS = {
    schema.SNI.key: ("tls", schema.SNI),
    schema.HTTP_HOSTS.key: ("http", schema.HTTP_HOSTS),
    schema.HTTP_PATHS.key: ("http", schema.HTTP_PATHS),
}
_SERVICE_KEYS = ("listen", "endpoints", "protocol", *_MATCH_KEYS, *_OPTION_KEYS)
# Options that a file may also write as a mapping: key -> the mapping's one key holding the value.
_MAPPING_FORMS = {"accept_proxy": "trusted"}
_HEALTH_KEYS = tuple(_HEALTH)
_ENDPOINT_KEYS = ("address", "port", "weight", "id", "state")
_TOP_KEYS = ("services", "defaults")
_PORT = schema.WholeNumber(1, 65535)


def _field(key: str) -> str:
    """The ``ServiceOptions`` field of a file key."""
    return _OPTIONS[key].field if key in _OPTIONS else key


def _dotted(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _Builder:
    def __init__(self, source: str, lines: _Lines, workers: int = 1) -> None:
        self.source = source
        self.lines = lines
        self.workers = workers

    def error(self, path: KeyPath, message: str) -> ConfigError:
        where = _dotted(path)
        return ConfigError(f"{where}: {message}" if where else message, source=self.source, line=self.lines(path))

    def mapping(self, value: Any, path: KeyPath, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected {what}, got {describe(value)}")
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                msg = f"unknown key {str(key)!r}"
                msg += f" (did you mean {hint[0]!r}?)" if hint else f"; expected one of: {', '.join(allowed)}"
                raise self.error((*path, key), msg)
        return dict(value)

    # -- top level ---------------------------------------------------------------------------------
    def table(self, data: Any, version: int) -> RoutingTable:
        top = self.mapping(data, (), _TOP_KEYS, "a mapping with a 'services' key")
        if "services" not in top:
            raise self.error((), "missing key 'services' (a mapping of service name to its listen/endpoints)")
        defaults: dict[str, Any] = {}
        if top.get("defaults") is not None:
            raw = self.mapping(top["defaults"], ("defaults",), _OPTION_KEYS, "a mapping of options")
            defaults = {_field(k): self.option(k, v, ("defaults", k)) for k, v in raw.items()}
        services_raw = top["services"]
        if services_raw is None:
            services_raw = {}
        if not isinstance(services_raw, Mapping):
            raise self.error(
                ("services",), f"expected a mapping of service name to service, got {describe(services_raw)}"
            )
        services = []
        for name, body in services_raw.items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(
                    f"services: service name must be a non-empty string, got {name!r}",
                    source=self.source,
                    line=self.lines(("services", name)),
                )
            services.append(self.service(name, body, defaults))
        try:
            return RoutingTable(version, tuple(services))
        except TableError as exc:
            # The only table-level checks are duplicate names (impossible from a mapping) and
            # listen conflicts: point at the listen key of the service that came second (the newcomer).
            m = re.search(r"services '[^']+' and '([^']+)'", str(exc)) or re.search(r"service '([^']+)'", str(exc))
            path: KeyPath = ("services", m.group(1), "listen") if m else ("services",)
            raise ConfigError(str(exc), source=self.source, line=self.lines(path)) from exc

    # -- one service --------------------------------------------------------------------------------
    def service(self, name: str, body: Any, defaults: dict[str, Any]) -> Service:
        base: KeyPath = ("services", name)
        svc = self.mapping(body, base, _SERVICE_KEYS, "a mapping with 'listen' and 'endpoints'")
        for required in ("listen", "endpoints"):
            if required not in svc:
                raise self.error(base, f"missing key {required!r}")
        listens = self.listens(svc["listen"], (*base, "listen"))
        endpoints = self.endpoints(svc["endpoints"], (*base, "endpoints"))
        opts = dict(defaults)
        for key, value in svc.items():
            if key not in ("listen", "endpoints", "protocol", *_MATCH_KEYS):
                opts[_field(key)] = self.option(key, value, (*base, key))
        if "udp_balance" not in opts and "balance" in opts:
            opts["udp_balance"] = opts["balance"]  # a udp service balances as told, else by client hash
        protocol = "tcp"
        if "protocol" in svc:
            protocol = self.parse(schema.PROTOCOL, svc["protocol"], (*base, "protocol"))
        rules: dict[str, tuple[str, ...]] = {}
        for key, (only, option) in _MATCH_KEYS.items():
            if key in svc:
                mpath: KeyPath = (*base, key)
                if protocol != only:
                    raise self.error(mpath, f"only applies to protocol {only} (this service is {protocol})")
                rules[option.field] = self.parse(option.type, svc[key], mpath)
        match = Match(hosts=rules.get("sni", rules.get("hosts", ())), paths=rules.get("paths", ()))
        try:
            options = ServiceOptions(**opts)
        except TableError as exc:
            # Cross-field checks (e.g. base_ejection_time <= max_ejection_time).
            raise self.error(base, str(exc)) from exc
        routes = []
        for i, (host, port) in enumerate(listens):
            lpath: KeyPath = (*base, "listen", i) if isinstance(svc["listen"], list) else (*base, "listen")
            try:
                routes.append(Route(port=port, endpoints=endpoints, listen_host=host, protocol=protocol, match=match))
            except TableError as exc:
                raise self.error(lpath, str(exc)) from exc
        seen: dict[tuple[str, int], int] = {}
        for i, r in enumerate(routes):
            if r.listen in seen:
                raise self.error((*base, "listen", i), f"{format_hostport(r.listen_host, r.port)} is listed twice")
            seen[r.listen] = i
        try:
            return Service(name=name, routes=tuple(routes), options=options)
        except TableError as exc:
            raise self.error(base, str(exc)) from exc

    def listens(self, value: Any, path: KeyPath) -> list[tuple[str, int]]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(path, "expected at least one port or 'host:port'")
        out = []
        for i, item in enumerate(items):
            ipath = (*path, i) if isinstance(value, list) else path
            if isinstance(item, bool) or not isinstance(item, int | str):
                raise self.error(ipath, f"expected a port or 'host:port', got {describe(item)}")
            try:
                host, port = parse_listen(str(item))
            except TableError as exc:
                raise self.error(ipath, f"{_LISTEN_EXPECTED}: {exc}") from exc
            if port == 0 and self.workers > 1:
                raise self.error(ipath, _any_port_message(path[1], self.workers))
            out.append((host, port))
        return out

    def endpoints(self, value: Any, path: KeyPath) -> tuple[Endpoint, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(path, f"expected a list of 'host:port' or mappings, got {describe(value)}")
        out: list[Endpoint] = []
        ids: dict[str, int] = {}
        for i, item in enumerate(value):
            ipath = (*path, i)
            ep = self.endpoint(item, ipath)
            if ep.id in ids:
                raise self.error(ipath, f"duplicate endpoint id {ep.id!r} (also endpoints[{ids[ep.id]}])")
            ids[ep.id] = i
            out.append(ep)
        return tuple(out)

    def endpoint(self, item: Any, path: KeyPath) -> Endpoint:
        if isinstance(item, str):
            try:
                host, port = parse_hostport(item)
            except TableError as exc:
                raise self.error(path, f"expected 'host:port': {exc}") from exc
            return Endpoint(id=format_hostport(host, port), address=host, port=port)
        if not isinstance(item, Mapping):
            raise self.error(path, f"expected 'host:port' or a mapping with address and port, got {describe(item)}")
        ep = self.mapping(item, path, _ENDPOINT_KEYS, "a mapping")
        for required in ("address", "port"):
            if required not in ep:
                raise self.error(path, f"missing key {required!r}")
        address = self.string(ep["address"], (*path, "address"))
        port = self.parse(_PORT, ep["port"], (*path, "port"))
        weight = self.parse(schema.ENDPOINT_WEIGHT.type, ep.get("weight", 1), (*path, "weight"))
        state = ep.get("state", "running")
        if state not in ("running", "draining"):
            raise self.error((*path, "state"), f"expected 'running' or 'draining', got {describe(state)}")
        ep_id = self.string(ep["id"], (*path, "id")) if "id" in ep else format_hostport(address, port)
        try:
            return Endpoint(id=ep_id, address=address, port=port, weight=weight, state=state)
        except TableError as exc:
            raise self.error(path, str(exc)) from exc

    # -- options ------------------------------------------------------------------------------------
    def option(self, key: str, value: Any, path: KeyPath) -> Any:
        if key == "health_check":
            return self.health_check(value, path)
        inner = _MAPPING_FORMS.get(key)
        if inner is not None and isinstance(value, Mapping):
            body = self.mapping(value, path, (inner,), f"a mapping with {inner!r}")
            if inner not in body:
                raise self.error(path, f"missing key {inner!r}")
            value, path = body[inner], (*path, inner)
        return self.parse(_OPTIONS[key].type, value, path)

    def health_check(self, value: Any, path: KeyPath) -> HealthCheck | None:
        """null/false/"none": no check; "tcp"/"http": that kind with defaults; or a mapping."""
        if not isinstance(value, Mapping):
            kind = self.parse(schema.HEALTH_SWITCH, value, path)
            return None if kind is None else HealthCheck(kind=kind)
        hc = self.mapping(value, path, _HEALTH_KEYS, "a mapping (kind, interval, timeout, rise, fall, ...) or null")
        values = {_HEALTH[key].field: self.parse(_HEALTH[key].type, v, (*path, key)) for key, v in hc.items()}
        try:
            return schema.health_check(values, kind_spelling=lambda kind: f"kind {kind}")
        except OptionError as exc:
            raise self.error((*path, exc.field) if exc.field else path, str(exc)) from exc

    def parse(self, type_: schema.ValueType, value: Any, path: KeyPath) -> Any:
        try:
            return type_.parse(value)
        except OptionError as exc:
            raise self.error(path if exc.index is None else (*path, exc.index), str(exc)) from exc

    def string(self, value: Any, path: KeyPath) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected a non-empty string, got {describe(value)}")
        return value
