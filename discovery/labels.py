"""Parse and validate ``mesh.*`` labels (container labels, or swarm service labels).

Every label is documented in docs/discovery.md; the service options among them
(``mesh.balance``, timeouts, ``mesh.health*``, ...) are parsed by ``mesh.options``,
the schema the config file reader uses too, so a value means the same thing in a
label and in mesh.yaml (docs/options.md).  ``parse_labels`` returns None
for an object without ``mesh.publish`` (it does not join the mesh), a
``MeshLabels`` for a valid one, and raises ``LabelError`` naming the first bad
label and what it expects.  Unknown ``mesh.*`` labels do not make an object
invalid (a newer agent may know them); they are returned as warnings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh import options as schema
from mesh.errors import ConfigError
from mesh.options import OptionError
from mesh.routing import HealthCheck, ServiceOptions, TableError, transport_of

__all__ = ["KNOWN_LABELS", "LabelError", "MeshLabels", "PublishSpec", "parse_duration", "parse_labels"]

PREFIX = "mesh."
_SERVICE_LABELS = {o.label: o for o in schema.SERVICE_OPTIONS}
_HEALTH_LABELS = {o.label: o for o in schema.HEALTH_OPTIONS if o.field != "kind"}
KNOWN_LABELS = (
    "mesh.enable",
    "mesh.publish",
    "mesh.service",
    "mesh.network",
    schema.ENDPOINT_WEIGHT.label,
    schema.SNI.label,
    schema.HTTP_HOSTS.label,
    schema.HTTP_PATHS.label,
    *_SERVICE_LABELS,
    "mesh.health",
    *_HEALTH_LABELS,
)
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class LabelError(ConfigError):
    """A ``mesh.*`` label has a bad value.  ``label`` is its key; the message says what is expected."""

    def __init__(self, label: str, value: str, expected: str) -> None:
        self.label = label
        self.value = value
        super().__init__(f"label {label}={value!r}: {expected}")


@dataclass(frozen=True, slots=True)
class PublishSpec:
    """One ``published:target`` pair of ``mesh.publish``."""

    published: int
    target: int
    listen_host: str = "0.0.0.0"
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class MeshLabels:
    """The parsed ``mesh.*`` labels of one container or swarm service.  ``sni``: the server names of
    its ``/tls`` ports (``mesh.tls.sni``; empty = the default service of those ports).  ``hosts`` and
    ``paths``: the Host names and path prefixes of its ``/http`` ports (``mesh.http.hosts``,
    ``mesh.http.paths``; empty = any)."""

    publish: tuple[PublishSpec, ...]
    options: ServiceOptions
    service: str | None = None
    weight: int = 1
    network: str | None = None
    warnings: tuple[str, ...] = ()
    sni: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()


def parse_duration(label: str, value: str, *, allow_zero: bool = False) -> float:
    """Seconds from a duration label ("500ms", "2s", "1.5m", "1h", "5"; ``mesh.options`` grammar)."""
    return _parse(label, value, schema.Duration(positive=not allow_zero))


def _parse(label: str, value: str, type_: schema.ValueType) -> Any:
    try:
        return type_.parse(value)
    except OptionError as exc:
        raise LabelError(label, value, exc.expected) from exc


def _port(label: str, text: str, whole: str, *, any_port: bool = False) -> int:
    low = 0 if any_port else 1
    if not (text.isascii() and text.isdigit()) or not low <= int(text) < 65536:
        hint = " (0 = any free port)" if any_port else ""
        raise LabelError(label, whole, f"port {text!r} must be a number {low}..65535{hint}")
    return int(text)


def parse_publish(value: str, label: str = "mesh.publish") -> tuple[PublishSpec, ...]:
    """``[listen_ip:]published:target[/proto]`` or ``published[/proto]`` (target = published),
    comma-separated; ``proto`` is ``tcp`` (the default), ``udp``, ``tls`` (passthrough routed by
    SNI, ``mesh.tls.sni``) or ``http`` (requests routed by ``mesh.http.hosts`` / ``mesh.http.paths``).

    A published port of 0 means any free port, chosen when the data plane binds it (tests read it
    back from the listener); the target port, and a bare ``published`` (which is also the target),
    are never 0.  One port may be published once per transport: ``53:53/tcp,53:53/udp`` is fine,
    ``443/tcp,443/tls`` and ``80/tcp,80/http`` are not (all of them are TCP).
    """
    specs: list[PublishSpec] = []
    items = [p.strip() for p in value.split(",")]
    if not value.strip() or any(not p for p in items):
        raise LabelError(
            label,
            value,
            "expected published:target[/tcp|/udp|/tls|/http], several separated by commas, e.g. 8080:80",
        )
    for item in items:
        body, slash, proto_text = item.partition("/")
        proto = "tcp"
        if slash:
            try:
                proto = schema.PROTOCOL.parse(proto_text)
            except OptionError:
                raise LabelError(
                    label, value, f"expected /tcp, /udp, /tls or /http, got /{proto_text} in {item!r}"
                ) from None
        host = "0.0.0.0"
        if body.startswith("["):  # [v6]:published:target
            end = body.find("]")
            if end < 0 or body[end + 1 : end + 2] != ":":
                raise LabelError(label, value, f"expected [address]:published:target in {item!r}")
            host, body = body[1:end], body[end + 2 :]
        parts = body.split(":")
        if len(parts) == 3:
            host, parts = parts[0], parts[1:]
            if not host:
                raise LabelError(label, value, f"empty listen address in {item!r}")
        if len(parts) == 1:
            published = target = _port(label, parts[0], value)
        elif len(parts) == 2:
            published, target = _port(label, parts[0], value, any_port=True), _port(label, parts[1], value)
        else:
            raise LabelError(label, value, f"expected published:target in {item!r}")
        specs.append(PublishSpec(published=published, target=target, listen_host=host, protocol=proto))
    seen = set()
    for s in specs:
        transport = transport_of(s.protocol)
        if (s.published, transport) in seen:
            what = "udp" if transport == "udp" else "tcp (tcp, tls and http are all TCP)"
            raise LabelError(label, value, f"port {s.published} is published twice for {what}")
        seen.add((s.published, transport))
    return tuple(sorted(specs, key=lambda s: (s.published, s.listen_host, s.protocol)))


def _health(labels: Mapping[str, str]) -> HealthCheck | None:
    sub = sorted(k for k in labels if k.startswith("mesh.health."))
    kind = _parse("mesh.health", labels["mesh.health"], schema.HEALTH_SWITCH) if "mesh.health" in labels else None
    if kind is None:
        if sub:
            raise LabelError(sub[0], labels[sub[0]], "needs mesh.health=tcp or mesh.health=http")
        return None
    values = {"kind": kind}
    for label, option in _HEALTH_LABELS.items():
        if label in labels:
            values[option.field] = _parse(label, labels[label], option.type)
    try:
        return schema.health_check(values, kind_spelling=lambda k: f"mesh.health={k}")
    except OptionError as exc:
        label = next(o.label for o in schema.HEALTH_OPTIONS if o.field == exc.field)
        raise LabelError(label, labels[label], exc.expected) from exc


def parse_labels(labels: Mapping[str, str] | Iterable[tuple[str, str]]) -> MeshLabels | None:
    """Parse the ``mesh.*`` labels of one object.  None when it does not join the mesh
    (no ``mesh.publish``, or ``mesh.enable=false``).  Raises ``LabelError``."""
    all_labels = dict(labels.items() if isinstance(labels, Mapping) else labels)
    mine = {k: str(v) for k, v in all_labels.items() if k.startswith(PREFIX)}
    if "mesh.enable" in mine and not _parse("mesh.enable", mine["mesh.enable"], schema.Boolean()):
        return None
    if "mesh.publish" not in mine:
        return None
    publish = parse_publish(mine["mesh.publish"])
    warnings = tuple(f"unknown label {k} (ignored)" for k in sorted(mine) if k not in KNOWN_LABELS)

    service = None
    if "mesh.service" in mine:
        service = mine["mesh.service"].strip()
        if not _SERVICE_NAME.match(service):
            raise LabelError(
                "mesh.service", mine["mesh.service"], "expected a name of letters, digits, '_', '.', '-' (max 128)"
            )
    weight = 1
    if schema.ENDPOINT_WEIGHT.label in mine:
        weight = _parse(schema.ENDPOINT_WEIGHT.label, mine[schema.ENDPOINT_WEIGHT.label], schema.ENDPOINT_WEIGHT.type)
    network = None
    if "mesh.network" in mine:
        network = mine["mesh.network"].strip()
        if not network or any(c.isspace() for c in network):
            raise LabelError("mesh.network", mine["mesh.network"], "expected a network name")

    sni: tuple[str, ...] = ()
    if schema.SNI.label in mine:
        sni = _parse(schema.SNI.label, mine[schema.SNI.label], schema.SNI.type)
        if not any(p.protocol == "tls" for p in publish):
            raise LabelError(schema.SNI.label, mine[schema.SNI.label], "needs a /tls port in mesh.publish")

    rules: dict[str, tuple[str, ...]] = {}
    for option in (schema.HTTP_HOSTS, schema.HTTP_PATHS):
        if option.label in mine:
            rules[option.field] = _parse(option.label, mine[option.label], option.type)
            if not any(p.protocol == "http" for p in publish):
                raise LabelError(option.label, mine[option.label], "needs an /http port in mesh.publish")

    opts = {o.field: _parse(label, mine[label], o.type) for label, o in _SERVICE_LABELS.items() if label in mine}
    if "udp_balance" not in opts and "balance" in opts:
        opts["udp_balance"] = opts["balance"]  # a udp port balances as told, else by client hash
    health = _health(mine)
    try:
        options = ServiceOptions(**opts, health_check=health)
    except TableError as exc:  # cross-field rules, e.g. base_ejection_time <= max_ejection_time
        field = schema.blame(exc, tuple(opts))
        label = next((o.label for o in schema.SERVICE_OPTIONS if o.field == field), "mesh.*")
        raise LabelError(label, mine.get(label, ""), str(exc)) from exc
    return MeshLabels(
        publish=publish,
        options=options,
        service=service,
        weight=weight,
        network=network,
        warnings=warnings,
        sni=sni,
        hosts=rules.get("hosts", ()),
        paths=rules.get("paths", ()),
    )
