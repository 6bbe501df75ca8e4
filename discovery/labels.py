"""Parse and validate ``mesh.*`` labels (container labels, or swarm service labels).

Every label is documented in docs/discovery.md.  ``parse_labels`` returns None
for an object without ``mesh.publish`` (it does not join the mesh), a
``MeshLabels`` for a valid one, and raises ``LabelError`` naming the first bad
label and what it expects.  Unknown ``mesh.*`` labels do not make an object
invalid (a newer agent may know them); they are returned as warnings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.errors import ConfigError
from mesh.routing import BALANCERS, HealthCheck, ServiceOptions, TableError

__all__ = ["KNOWN_LABELS", "LabelError", "MeshLabels", "PublishSpec", "parse_duration", "parse_labels"]

PREFIX = "mesh."
KNOWN_LABELS = (
    "mesh.enable",
    "mesh.publish",
    "mesh.service",
    "mesh.balance",
    "mesh.weight",
    "mesh.network",
    "mesh.proxy-protocol",
    "mesh.connect-timeout",
    "mesh.idle-timeout",
    "mesh.retries",
    "mesh.locality",
    "mesh.health",
    "mesh.health.path",
    "mesh.health.host",
    "mesh.health.status",
    "mesh.health.interval",
    "mesh.health.timeout",
    "mesh.health.rise",
    "mesh.health.fall",
)
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


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
    """The parsed ``mesh.*`` labels of one container or swarm service."""

    publish: tuple[PublishSpec, ...]
    options: ServiceOptions
    service: str | None = None
    weight: int = 1
    network: str | None = None
    warnings: tuple[str, ...] = ()


def parse_duration(label: str, value: str, *, allow_zero: bool = False) -> float:
    """ "500ms", "2s", "1.5m", "1h" or a bare number of seconds."""
    m = _DURATION.match(value.strip())
    if not m:
        raise LabelError(label, value, "expected a duration such as 500ms, 2s, 1m (a bare number means seconds)")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise LabelError(label, value, "expected a duration > 0")
    return seconds


def _int(label: str, value: str, lo: int, hi: int) -> int:
    v = value.strip()
    if not v.isdigit() or not lo <= int(v) <= hi:
        raise LabelError(label, value, f"expected a whole number {lo}..{hi}")
    return int(v)


def _port(label: str, text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise LabelError(label, whole, f"port {text!r} must be a number 1..65535")
    return int(text)


def parse_publish(value: str, label: str = "mesh.publish") -> tuple[PublishSpec, ...]:
    """``[listen_ip:]published:target[/tcp]`` or ``published[/tcp]`` (target = published), comma-separated."""
    specs: list[PublishSpec] = []
    items = [p.strip() for p in value.split(",")]
    if not value.strip() or any(not p for p in items):
        raise LabelError(label, value, "expected published:target[/tcp], several separated by commas, e.g. 8080:80")
    for item in items:
        body, _, proto = item.partition("/")
        proto = proto.strip().lower() or "tcp"
        if proto != "tcp":
            raise LabelError(label, value, f"only tcp is supported, got /{proto} in {item!r}")
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
            published, target = _port(label, parts[0], value), _port(label, parts[1], value)
        else:
            raise LabelError(label, value, f"expected published:target in {item!r}")
        specs.append(PublishSpec(published=published, target=target, listen_host=host))
    seen = set()
    for s in specs:
        if s.published in seen:
            raise LabelError(label, value, f"port {s.published} is published twice")
        seen.add(s.published)
    return tuple(sorted(specs, key=lambda s: (s.published, s.listen_host)))


def _bool(label: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise LabelError(label, value, "expected true or false")


def _health(labels: Mapping[str, str]) -> HealthCheck | None:
    kind = labels.get("mesh.health")
    sub = sorted(k for k in labels if k.startswith("mesh.health."))
    if kind is None or kind.strip().lower() in ("", "none", "off"):
        if sub:
            raise LabelError(sub[0], labels[sub[0]], "needs mesh.health=tcp or mesh.health=http")
        return None
    kind = kind.strip().lower()
    if kind not in ("tcp", "http"):
        raise LabelError("mesh.health", labels["mesh.health"], "expected tcp, http or none")
    kw: dict[str, object] = {"kind": kind}
    if "mesh.health.path" in labels:
        path = labels["mesh.health.path"].strip()
        if kind != "http":
            raise LabelError("mesh.health.path", path, "only applies to mesh.health=http")
        if not path.startswith("/") or any(c.isspace() for c in path):
            raise LabelError("mesh.health.path", path, "expected a path starting with / and without spaces")
        kw["path"] = path
    if "mesh.health.host" in labels:
        host = labels["mesh.health.host"].strip()
        if kind != "http" or not host or any(c.isspace() for c in host):
            raise LabelError("mesh.health.host", host, "expected a Host header value (mesh.health=http only)")
        kw["host"] = host
    if "mesh.health.status" in labels:
        raw = labels["mesh.health.status"]
        if kind != "http":
            raise LabelError("mesh.health.status", raw, "only applies to mesh.health=http")
        codes = []
        for p in raw.split(","):
            p = p.strip()
            if not p.isdigit() or not 100 <= int(p) <= 599:
                raise LabelError("mesh.health.status", raw, "expected HTTP status codes 100..599, e.g. 200,204")
            codes.append(int(p))
        kw["expect_status"] = tuple(codes)
    for key, field in (("mesh.health.interval", "interval"), ("mesh.health.timeout", "timeout")):
        if key in labels:
            kw[field] = parse_duration(key, labels[key])
    for key, field in (("mesh.health.rise", "rise"), ("mesh.health.fall", "fall")):
        if key in labels:
            kw[field] = _int(key, labels[key], 1, 100)
    try:
        return HealthCheck(**kw)  # type: ignore[arg-type]
    except TableError as exc:
        raise LabelError("mesh.health", labels["mesh.health"], str(exc)) from exc


def parse_labels(labels: Mapping[str, str] | Iterable[tuple[str, str]]) -> MeshLabels | None:
    """Parse the ``mesh.*`` labels of one object.  None when it does not join the mesh
    (no ``mesh.publish``, or ``mesh.enable=false``).  Raises ``LabelError``."""
    all_labels = dict(labels.items() if isinstance(labels, Mapping) else labels)
    mine = {k: str(v) for k, v in all_labels.items() if k.startswith(PREFIX)}
    if "mesh.enable" in mine and not _bool("mesh.enable", mine["mesh.enable"]):
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
    weight = _int("mesh.weight", mine["mesh.weight"], 1, 1000) if "mesh.weight" in mine else 1
    network = None
    if "mesh.network" in mine:
        network = mine["mesh.network"].strip()
        if not network or any(c.isspace() for c in network):
            raise LabelError("mesh.network", mine["mesh.network"], "expected a network name")

    opts: dict[str, object] = {}
    if "mesh.balance" in mine:
        balance = mine["mesh.balance"].strip().lower()
        if balance not in BALANCERS:
            raise LabelError("mesh.balance", mine["mesh.balance"], f"expected one of {', '.join(BALANCERS)}")
        opts["balance"] = balance
    if "mesh.proxy-protocol" in mine:
        pp = mine["mesh.proxy-protocol"].strip().lower()
        if pp in ("", "none", "off", "false"):
            opts["proxy_protocol"] = None
        elif pp in ("v1", "v2"):
            opts["proxy_protocol"] = pp
        else:
            raise LabelError("mesh.proxy-protocol", mine["mesh.proxy-protocol"], "expected v1, v2 or none")
    if "mesh.connect-timeout" in mine:
        opts["connect_timeout"] = parse_duration("mesh.connect-timeout", mine["mesh.connect-timeout"])
    if "mesh.idle-timeout" in mine:
        opts["idle_timeout"] = parse_duration("mesh.idle-timeout", mine["mesh.idle-timeout"], allow_zero=True)
    if "mesh.retries" in mine:
        opts["retries"] = _int("mesh.retries", mine["mesh.retries"], 0, 100)
    if "mesh.locality" in mine:
        locality = mine["mesh.locality"].strip().lower()
        if locality not in ("prefer", "off"):
            raise LabelError("mesh.locality", mine["mesh.locality"], "expected prefer or off")
        opts["locality"] = locality
    opts["health_check"] = _health(mine)
    try:
        options = ServiceOptions(**opts)  # type: ignore[arg-type]
    except TableError as exc:  # pragma: no cover - every field is validated above
        raise LabelError("mesh.*", "", str(exc)) from exc
    return MeshLabels(
        publish=publish, options=options, service=service, weight=weight, network=network, warnings=warnings
    )
