"""One grammar for every service option, wherever it is written.

An option can be set in a config file (``connect_timeout: 500ms`` in mesh.yaml or
mesh.toml), on a container (``--label mesh.connect-timeout=500ms``) or on a swarm
service (``docker service create --label mesh.connect-timeout=500ms``).  This
module is the one schema both readers use: ``mesh/config.py`` (file) and
``discovery/labels.py`` (labels).  Each ``Option`` names its field in the routing
contract, its file key, its label and its value type; a value type parses text
with one grammar, so the same text means the same value in all three places.
docs/options.md is the user-facing version of this docstring.

Grammar of text (a label is always text; in a file, a quoted or unquoted string):
- Surrounding whitespace is trimmed; whitespace inside a value is never allowed.
  Empty text is never a value.
- number: ASCII digits with an optional fraction: ``5``, ``0.5``, ``1.25``
  (not ``.5``, ``5.``, ``+5``, ``1e3``, ``1_000``).
- duration: a number with an optional unit ``ms``, ``s``, ``m`` or ``h`` written
  right after it (``500ms``, ``1.5s``, ``2m``; not ``5 s``); no unit means
  seconds.  Never negative; "> 0" where zero makes no sense.
- whole number: ASCII digits only, within the option's range.
- percentage: a whole number 0..100, optionally followed by ``%`` (``50%``).
- boolean: ``true``/``yes``/``on``/``1`` or ``false``/``no``/``off``/``0``, any case.
- word (enum): one of the option's words, any case (``P2C`` = ``p2c``).
- list: items separated by commas (spaces around an item are trimmed).
- size: a whole number of bytes, optionally followed right after it by ``KiB``, ``MiB`` or
  ``GiB`` (x 1024, 1024**2, 1024**3; ``64KiB`` = 65536); no fraction, no other unit (not
  ``64k``, ``64KB``, ``64 KiB``).
- IP networks: a list of addresses or networks (``10.0.0.0/8``, ``192.168.1.7``,
  ``fd00::/8``); host bits are ignored (``10.1.2.3/8`` is ``10.0.0.0/8``); ``none``
  for none.
- path prefixes: a list of paths, each starting with ``/``, without spaces, ``?`` or ``#``.
- hash key: ``header:<name>`` or ``cookie:<name>``, the name an HTTP token.

A file may also hold native YAML/TOML values: a number where a duration (seconds),
number or whole number is expected, a whole number where a size is expected, a
boolean where a boolean is expected, a list where a list is expected (an empty list
for a list option that may be empty); ``false`` or ``null`` for an option that can be
switched off.  Non-finite numbers (``.inf``, ``.nan``) are rejected.  Whatever the source,
the parsed value then goes through the same range check.

Errors: a parser raises ``OptionError``.  ``str(err)`` says what is expected and
what was given (``expected a whole number 0..100, got '101'``), the form the file
reader puts after "file:line: key.path:"; ``err.expected`` is the first half only,
for the label reader, whose message already quotes the value
(``label mesh.retries='101': expected a whole number 0..100``).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Protocol

from mesh.routing import (
    BALANCERS,
    HEALTH_KINDS,
    HTTP_RETRY_STATUSES,
    HealthCheck,
    TableError,
    valid_host_pattern,
)

__all__ = [
    "ENDPOINT_WEIGHT",
    "HEALTH_OPTIONS",
    "HEALTH_SWITCH",
    "HTTP_HOSTS",
    "HTTP_PATHS",
    "PROTOCOL",
    "SERVICE_OPTIONS",
    "SNI",
    "Boolean",
    "Choice",
    "Duration",
    "HashKey",
    "HostHeader",
    "HttpPath",
    "Networks",
    "Number",
    "Option",
    "OptionError",
    "PathPrefixes",
    "RetryStatuses",
    "ServerNames",
    "Size",
    "Statuses",
    "Token",
    "WholeNumber",
    "blame",
    "default_of",
    "describe",
    "health_check",
    "parse_bool",
    "parse_duration",
]

_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_DURATION = re.compile(rf"({_NUMBER})(ms|s|m|h)?")
_NUMBER_RE = re.compile(_NUMBER)
_DIGITS = re.compile(r"[0-9]+")
_SIZE = re.compile(r"([0-9]+)(KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: a header or cookie name
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_MAX_DIGITS = 18  # longer whole numbers are out of every range (and int() of huge text is slow)
DURATION_EXPECTED = "expected a duration like 5, 0.5, '500ms', '5s' or '2m'"
_UNSET = object()


def _or(words: Iterable[str]) -> str:
    """The words joined as in "a, b or c"."""
    *head, last = words
    return f"{', '.join(head)} or {last}" if head else last


def describe(value: object) -> str:
    """How an error message shows a value a user wrote."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


class OptionError(ValueError):
    """A value does not fit its option.  See the module docstring for ``str()`` vs ``expected``.

    ``index``: for a list given as a list in a file, the position of the bad item.
    ``field``: set by cross-field checks (``health_check``): the field that is wrong.
    """

    def __init__(
        self,
        expected: str,
        value: object,
        *,
        sep: str = ",",
        message: str | None = None,
        index: int | None = None,
        field: str | None = None,
    ) -> None:
        self.expected = expected
        self.value = value
        self.index = index
        self.field = field
        super().__init__(message if message is not None else f"{expected}{sep} got {describe(value)}")


def _text(value: object) -> str | None:
    """The trimmed text of a string value, None for anything else."""
    return value.strip() if isinstance(value, str) else None


def _native_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# -- value types ------------------------------------------------------------------------------------


class ValueType(Protocol):
    """Parses a value of one option: text (the grammar above) or a native file value."""

    def parse(self, value: object) -> Any: ...


def parse_duration(value: object) -> float:
    """Seconds from a duration: text such as "500ms", "5s", "1.5m", "1h", "5" (seconds), or in a
    file a number of seconds.  Raises ``OptionError`` (a ``ValueError``)."""
    n = _native_number(value)
    if n is None:
        text = _text(value)
        m = _DURATION.fullmatch(text) if text is not None else None
        if m is None:
            raise OptionError(DURATION_EXPECTED, value, sep=";")
        n = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(n):
        raise OptionError(DURATION_EXPECTED, value, sep=";")
    if n < 0:
        raise OptionError("expected a duration >= 0", value, message=f"duration must not be negative; got {value!r}")
    return n


@dataclass(frozen=True, slots=True)
class Duration:
    """A duration (see ``parse_duration``); ``positive``: zero is refused too."""

    positive: bool = True

    def parse(self, value: object) -> float:
        seconds = parse_duration(value)
        if self.positive and seconds == 0:
            raise OptionError("expected a duration > 0", value, message="must be > 0")
        return seconds


@dataclass(frozen=True, slots=True)
class WholeNumber:
    """A whole number within ``lo..hi``; ``percent``: text may end in "%"."""

    lo: int
    hi: int
    percent: bool = False

    def parse(self, value: object) -> int:
        expected = f"expected a whole number {self.lo}..{self.hi}"
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            text = _text(value)
            if text is not None and self.percent and text.endswith("%"):
                text = text[:-1]
            if text is None or not _DIGITS.fullmatch(text):
                raise OptionError(expected, value)
            text = text.lstrip("0") or "0"
            if len(text) > _MAX_DIGITS:
                raise OptionError(expected, value)
            n = int(text)
        if not self.lo <= n <= self.hi:
            raise OptionError(expected, value)
        return n


@dataclass(frozen=True, slots=True)
class Number:
    """A number (fraction allowed) within ``lo..hi``."""

    lo: float
    hi: float

    def parse(self, value: object) -> float:
        expected = f"expected a number within {self.lo:g}..{self.hi:g}"
        n = _native_number(value)
        if n is None:
            text = _text(value)
            if text is None or not _NUMBER_RE.fullmatch(text):
                raise OptionError(expected, value)
            n = float(text)
        if not (math.isfinite(n) and self.lo <= n <= self.hi):
            raise OptionError(expected, value)
        return n


@dataclass(frozen=True, slots=True)
class Choice:
    """One of ``words`` (word -> value), any case.  ``off``: what a file's ``false``/``null`` means
    (unset: they are errors)."""

    words: tuple[tuple[str, Any], ...]
    expected: str
    off: Any = _UNSET

    def parse(self, value: object) -> Any:
        if self.off is not _UNSET and (value is None or value is False):
            return self.off
        text = _text(value)
        if text is not None:
            lowered = text.lower()
            for word, result in self.words:
                if lowered == word:
                    return result
        raise OptionError(self.expected, value, sep=";")


def _choice(words: tuple[str, ...] | Mapping[str, Any], expected: str | None = None, *, off: Any = _UNSET) -> Choice:
    pairs = tuple(words.items()) if isinstance(words, Mapping) else tuple((w, w) for w in words)
    if expected is None:
        expected = f"expected one of {', '.join(w for w, _ in pairs)}"
    return Choice(pairs, expected, off)


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(value: object) -> bool:
    """true/yes/on/1 or false/no/off/0 (any case); in a file also a boolean."""
    if isinstance(value, bool):
        return value
    text = _text(value)
    if text is not None:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    raise OptionError("expected true or false", value, sep=";")


class Boolean:
    __slots__ = ()

    def parse(self, value: object) -> bool:
        return parse_bool(value)


def _no_space(text: str) -> bool:
    return text.isprintable() and not any(c.isspace() for c in text)


class HttpPath:
    __slots__ = ()

    def parse(self, value: object) -> str:
        text = _text(value)
        if text is None or not text.startswith("/") or not _no_space(text):
            raise OptionError("expected a path starting with / and without spaces", value)
        return text


class HostHeader:
    __slots__ = ()

    def parse(self, value: object) -> str:
        text = _text(value)
        if not text or not text.isascii() or not _no_space(text):
            raise OptionError("expected a Host header value (a name without spaces)", value)
        return text


class Statuses:
    """HTTP statuses: "200" or "200,204"; in a file also a number or a list of numbers."""

    __slots__ = ()

    def parse(self, value: object) -> tuple[int, ...]:
        item = WholeNumber(100, 599)
        if isinstance(value, list | tuple):
            if not value:
                why = "expected an HTTP status or a list of them"
                raise OptionError(why, value, message=why)
            out = []
            for i, v in enumerate(value):
                try:
                    out.append(item.parse(v))
                except OptionError as exc:
                    raise OptionError(exc.expected, v, index=i) from None
            return tuple(out)
        if isinstance(value, int) and not isinstance(value, bool):
            return (item.parse(value),)
        expected = "expected HTTP status codes 100..599, e.g. 200,204"
        text = _text(value)
        if not text:
            raise OptionError(expected, value, sep=";")
        try:
            return tuple(item.parse(p) for p in text.split(","))
        except OptionError:
            raise OptionError(expected, value, sep=";") from None


class ServerNames:
    """TLS server names (SNI): "a.example.com" or "a.example.com,*.b.example.com"; in a file also a
    list.  Each is a DNS name or a wildcard for its leading labels ("*.example.com"), any case."""

    __slots__ = ()

    expected = "expected DNS names or '*.name' wildcards, separated by commas, e.g. a.example.com,*.b.example.com"

    def parse(self, value: object) -> tuple[str, ...]:
        if isinstance(value, list | tuple):
            items, listed = list(value), True
        else:
            text = _text(value)
            if not text:
                raise OptionError(self.expected, value, sep=";")
            items, listed = text.split(","), False
        out: list[str] = []
        for i, item in enumerate(items):
            name = _text(item)
            name = name.lower().rstrip(".") if name is not None else None
            if not name or not valid_host_pattern(name):
                if listed:
                    raise OptionError("expected a DNS name or '*.name'", item, index=i)
                raise OptionError(self.expected, value, sep=";")
            out.append(name)
        if not out:
            raise OptionError(self.expected, value, sep=";")
        return tuple(sorted(set(out)))


def _human_size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n and n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


@dataclass(frozen=True, slots=True)
class Size:
    """A size in bytes within ``lo..hi``: "65536", "64KiB", "1MiB"; in a file also a whole number."""

    lo: int
    hi: int

    def parse(self, value: object) -> int:
        expected = (
            f"expected a size {_human_size(self.lo)}..{_human_size(self.hi)}: "
            "bytes (65536) or a whole number with KiB, MiB or GiB (64KiB)"
        )
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            text = _text(value)
            m = _SIZE.fullmatch(text) if text is not None else None
            digits = m.group(1).lstrip("0") if m is not None else ""
            if m is None or len(digits) > _MAX_DIGITS:
                raise OptionError(expected, value)
            n = int(digits or "0") * _SIZE_UNITS[m.group(2)]
        if not self.lo <= n <= self.hi:
            raise OptionError(expected, value)
        return n


def _items(value: object, expected: str) -> tuple[list[object], bool]:
    """The items of a list value: (items, True) for a file's list, (text split at commas, False) for text."""
    if isinstance(value, list | tuple):
        return list(value), True
    text = _text(value)
    if not text:
        raise OptionError(expected, value, sep=";")
    return list(text.split(",")), False


class Networks:
    """IP networks (``accept_proxy``, ``http_trusted``): "10.0.0.0/8,fd00::/8" or single addresses; in a
    file also a list.  ``none`` (a file's ``[]``, ``false`` or ``null``): none.  Host bits are ignored
    (10.1.2.3/8 is 10.0.0.0/8); the result is de-duplicated and sorted (IPv4 first), in canonical form."""

    __slots__ = ()

    expected = "expected IP addresses or networks separated by commas (or none), e.g. 10.0.0.0/8,fd00::/8"

    def parse(self, value: object) -> tuple[str, ...]:
        if value is None or value is False or (_text(value) or "").lower() == "none":
            return ()
        items, listed = _items(value, self.expected)
        out: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
        for i, item in enumerate(items):
            text = _text(item)
            try:
                if not text or not _no_space(text):
                    raise ValueError(text)
                out.add(ipaddress.ip_network(text, strict=False))
            except ValueError:
                if listed:
                    raise OptionError("expected an IP address or network (10.0.0.0/8, ::1)", item, index=i) from None
                raise OptionError(self.expected, value, sep=";") from None
        return tuple(str(n) for n in sorted(out, key=lambda n: (n.version, n)))


class RetryStatuses:
    """The statuses an HTTP request is retried on: "502,503" (each of 502, 503, 504); in a file also a
    number or a list.  ``none`` (a file's ``[]``, ``false`` or ``null``): none.  De-duplicated and sorted."""

    __slots__ = ()

    expected = f"expected {_or(map(str, HTTP_RETRY_STATUSES))}, several separated by commas (or none), e.g. 502,503"

    def parse(self, value: object) -> tuple[int, ...]:
        if value is None or value is False or (_text(value) or "").lower() == "none":
            return ()
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        items, listed = _items(value, self.expected)
        out: set[int] = set()
        for i, item in enumerate(items):
            text = _text(item)
            if isinstance(item, int) and not isinstance(item, bool):
                status = item
            elif text is not None and text.isascii() and text.isdigit() and len(text) < 4:
                status = int(text)
            else:
                status = 0
            if status not in HTTP_RETRY_STATUSES:
                if listed:
                    raise OptionError(f"expected {_or(map(str, HTTP_RETRY_STATUSES))}", item, index=i)
                raise OptionError(self.expected, value, sep=";")
            out.add(status)
        return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class Token:
    """An HTTP token (RFC 9110; a header or cookie name), kept as written: ``what`` names it in errors."""

    what: str

    def parse(self, value: object) -> str:
        text = _text(value)
        if text is None or not _TOKEN.fullmatch(text):
            raise OptionError(f"expected {self.what} (letters, digits and !#$%&'*+-.^_`|~)", value)
        return text


class HashKey:
    """What an HTTP route hashes on: "header:<name>" (the name lower-cased) or "cookie:<name>" (kept as
    written: cookie names are case-sensitive); ``none`` (a file's ``false`` or ``null``): the client IP."""

    __slots__ = ()

    expected = "expected header:<name> or cookie:<name> (or none), e.g. header:x-user-id"

    def parse(self, value: object) -> str | None:
        text = _text(value)
        if value is None or value is False or (text or "").lower() == "none":
            return None
        kind, colon, name = (text or "").partition(":")
        kind = kind.lower()
        if not colon or kind not in ("header", "cookie") or not _TOKEN.fullmatch(name):
            raise OptionError(self.expected, value, sep=";")
        return f"{kind}:{name.lower() if kind == 'header' else name}"


class PathPrefixes:
    """HTTP path prefixes: "/api" or "/api,/static"; in a file also a list.  Each starts with "/" and holds
    no space, "?" or "#"; kept as written (case matters in a path), de-duplicated and sorted."""

    __slots__ = ()

    expected = "expected path prefixes starting with /, separated by commas, e.g. /api,/static"

    def parse(self, value: object) -> tuple[str, ...]:
        items, listed = _items(value, self.expected)
        out: set[str] = set()
        for i, item in enumerate(items):
            text = _text(item)
            if not text or not text.startswith("/") or not _no_space(text) or "?" in text or "#" in text:
                if listed:
                    raise OptionError("expected a path starting with / (no spaces, '?' or '#')", item, index=i)
                raise OptionError(self.expected, value, sep=";")
            out.add(text)
        if not out:
            raise OptionError(self.expected, value, sep=";")
        return tuple(sorted(out))


# -- the schema -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option:
    """One option: ``field`` of the routing contract, its ``key`` in a file, its ``label``."""

    field: str
    key: str
    label: str
    type: ValueType
    doc: str = ""

    def parse(self, value: object) -> Any:
        return self.type.parse(value)


def _option(field: str, label: str, type_: ValueType, doc: str) -> Option:
    return Option(field, field, label, type_, doc)


SERVICE_OPTIONS: tuple[Option, ...] = (
    _option(
        "balance",
        "mesh.balance",
        _choice(BALANCERS),
        "round-robin, least-conn (fewest active/weight), p2c (power of two choices), hash (client IP affinity)",
    ),
    _option(
        "proxy_protocol",
        "mesh.proxy-protocol",
        _choice({"v1": "v1", "v2": "v2", "none": None, "off": None}, "expected v1, v2 or none", off=None),
        "send a PROXY protocol header with the client's address to the endpoint",
    ),
    _option("connect_timeout", "mesh.connect-timeout", Duration(positive=True), "per connect attempt"),
    _option(
        "idle_timeout", "mesh.idle-timeout", Duration(positive=False), "close a connection idle in both directions"
    ),
    _option("retries", "mesh.retries", WholeNumber(0, 100), "other endpoints tried when a connect fails"),
    _option(
        "consecutive_failures",
        "mesh.consecutive-failures",
        WholeNumber(1, 100),
        "connect failures in a row that eject an endpoint",
    ),
    _option(
        "base_ejection_time",
        "mesh.base-ejection-time",
        Duration(positive=True),
        "ejection time = this x ejections so far (at most max_ejection_time)",
    ),
    _option("max_ejection_time", "mesh.max-ejection-time", Duration(positive=True), "longest ejection"),
    _option(
        "max_ejection_percent",
        "mesh.max-ejection-percent",
        WholeNumber(0, 100, percent=True),
        "at most this share of endpoints ejected at once",
    ),
    _option(
        "panic_threshold",
        "mesh.panic-threshold",
        WholeNumber(0, 100, percent=True),
        "below this share of healthy endpoints, use them all",
    ),
    _option(
        "locality",
        "mesh.locality",
        _choice(("prefer", "off"), "expected prefer or off", off="off"),
        "prefer endpoints on this node (cluster mode)",
    ),
    _option(
        "zero_copy",
        "mesh.zero-copy",
        Boolean(),
        "move a direction carrying a large transfer to the kernel (os.splice), like HAProxy's splice-auto",
    ),
    _option(
        "udp_balance",
        "mesh.udp.balance",
        _choice(BALANCERS),
        "udp routes: how a new session chooses its replica (default: balance if given, else hash)",
    ),
    _option(
        "udp_idle_timeout",
        "mesh.udp.idle-timeout",
        Duration(positive=True),
        "udp routes: end a session without a datagram either way for this long",
    ),
    _option(
        "udp_responses",
        "mesh.udp.responses",
        WholeNumber(0, 1000),
        "udp routes: end a session once the replica sent this many datagrams per client datagram (0 = no limit)",
    ),
    _option(
        "udp_max_sessions",
        "mesh.udp.max-sessions",
        WholeNumber(1, 1_000_000),
        "udp routes: sessions per listener; beyond it the oldest idle session is evicted",
    ),
    # -- every protocol ---------------------------------------------------------------------------
    _option(
        "slow_start",
        "mesh.slow-start",
        Duration(positive=False),
        "a joining or recovered endpoint's share of new connections grows from 10% to all of it over this time"
        " (0 = off)",
    ),
    _option(
        "accept_proxy",
        "mesh.accept-proxy",
        Networks(),
        "read a PROXY protocol header (v1 or v2) from clients connecting from these networks; in a file"
        " also {trusted: [...]}",
    ),
    # -- http routes ------------------------------------------------------------------------------
    _option(
        "http_head_timeout",
        "mesh.http.head-timeout",
        Duration(positive=True),
        "http routes: a request's head must arrive within this (a deadline, not an inactivity timer)",
    ),
    _option("http_max_head", "mesh.http.max-head", Size(1 << 10, 1 << 20), "http routes: largest request head"),
    _option(
        "http_max_headers",
        "mesh.http.max-headers",
        WholeNumber(1, 1000),
        "http routes: most header fields in a request",
    ),
    _option(
        "http_max_body",
        "mesh.http.max-body",
        Size(0, 1 << 40),
        "http routes: largest request body (413 beyond it; 0 = no limit)",
    ),
    _option(
        "http_response_timeout",
        "mesh.http.response-timeout",
        Duration(positive=True),
        "http routes: the endpoint's response head must arrive within this once the request was sent",
    ),
    _option(
        "http_keepalive_timeout",
        "mesh.http.keepalive-timeout",
        Duration(positive=True),
        "http routes: close a client connection idle between requests for this long",
    ),
    _option(
        "http_pool_max_idle",
        "mesh.http.pool-max-idle",
        WholeNumber(0, 10000),
        "http routes: idle kept-alive connections kept per endpoint (0 = no reuse)",
    ),
    _option(
        "http_pool_idle_timeout",
        "mesh.http.pool-idle-timeout",
        Duration(positive=True),
        "http routes: an idle upstream connection older than this is closed, not reused",
    ),
    _option(
        "http_trusted",
        "mesh.http.trusted",
        Networks(),
        "http routes: forwarders whose X-Forwarded-For / Forwarded headers are kept (others' are replaced)",
    ),
    _option(
        "http_retry_on",
        "mesh.http.retry-on",
        RetryStatuses(),
        "http routes: statuses after which an idempotent request is retried on another endpoint",
    ),
    _option(
        "http_retry_budget",
        "mesh.http.retry-budget",
        WholeNumber(0, 100, percent=True),
        "http routes: retries at most this share of the requests in flight",
    ),
    _option(
        "http_hash_key",
        "mesh.http.hash-key",
        HashKey(),
        "http routes: what balance hash hashes on instead of the client IP",
    ),
    _option(
        "http_sticky",
        "mesh.http.sticky",
        _choice({"cookie": "cookie", "none": None, "off": None}, "expected cookie or none", off=None),
        "http routes: keep a client on its endpoint with a cookie",
    ),
    _option("http_sticky_name", "mesh.http.sticky.name", Token("a cookie name"), "http routes: the sticky cookie"),
    _option(
        "http_sticky_max_age",
        "mesh.http.sticky.max-age",
        WholeNumber(0, 10**9),
        "http routes: the sticky cookie's Max-Age in seconds (0 = a session cookie)",
    ),
    _option("http_sticky_secure", "mesh.http.sticky.secure", Boolean(), "http routes: the sticky cookie is Secure"),
    _option(
        "http_sticky_samesite",
        "mesh.http.sticky.samesite",
        _choice(("lax", "strict", "none"), "expected lax, strict or none"),
        "http routes: the sticky cookie's SameSite",
    ),
    _option(
        "http_max_inflight",
        "mesh.http.max-inflight",
        WholeNumber(0, 100000),
        "http routes: requests at once per endpoint (0 = no limit); more wait in the queue",
    ),
    _option(
        "http_queue",
        "mesh.http.queue",
        WholeNumber(0, 100000),
        "http routes: requests that wait for an endpoint under max-inflight (beyond: 503)",
    ),
    _option(
        "http_queue_timeout",
        "mesh.http.queue-timeout",
        Duration(positive=True),
        "http routes: longest wait in the queue (then 503)",
    ),
)

#: What a service speaks: ``protocol:`` in a file, the ``/proto`` suffix of ``mesh.publish`` on a label.
PROTOCOL = _choice(("tcp", "udp", "tls", "http"), "expected tcp, udp, tls or http")

#: TLS passthrough: ``sni:`` of a ``protocol: tls`` service in a file, ``mesh.tls.sni`` on a container or
#: service publishing a ``/tls`` port.  Not a ``ServiceOptions`` field: it is the route's ``Match.hosts``.
SNI = Option("sni", "sni", "mesh.tls.sni", ServerNames(), "tls routes: the server names this service takes")

#: HTTP routes: ``hosts:`` and ``paths:`` of a ``protocol: http`` service in a file, ``mesh.http.hosts`` and
#: ``mesh.http.paths`` on a container or service publishing an ``/http`` port.  Not ``ServiceOptions`` fields:
#: they are the route's ``Match`` (absent: any host, any path).
HTTP_HOSTS = Option(
    "hosts", "hosts", "mesh.http.hosts", ServerNames(), "http routes: the Host names this service takes"
)
HTTP_PATHS = Option(
    "paths", "paths", "mesh.http.paths", PathPrefixes(), "http routes: the path prefixes this service takes"
)

#: ``health_check`` in a file, ``mesh.health`` on a label: the kind of check, or none.
HEALTH_SWITCH = _choice(
    {"tcp": "tcp", "http": "http", "none": None, "off": None}, "expected tcp, http or none", off=None
)

HEALTH_OPTIONS: tuple[Option, ...] = (
    Option("kind", "kind", "mesh.health", _choice(HEALTH_KINDS), "tcp: connect succeeds; http: GET path"),
    Option("interval", "interval", "mesh.health.interval", Duration(positive=True), "time between probes"),
    Option("timeout", "timeout", "mesh.health.timeout", Duration(positive=True), "probe timeout"),
    Option("rise", "rise", "mesh.health.rise", WholeNumber(1, 100), "passes in a row to turn healthy"),
    Option("fall", "fall", "mesh.health.fall", WholeNumber(1, 100), "failures in a row to turn unhealthy"),
    Option("path", "path", "mesh.health.path", HttpPath(), "http only: the path to GET"),
    Option("host", "host", "mesh.health.host", HostHeader(), "http only: Host header (default: endpoint address)"),
    Option("expect_status", "expect_status", "mesh.health.status", Statuses(), "http only: accepted statuses"),
    Option("jitter", "jitter", "mesh.health.jitter", Number(0, 1), "delay each probe by up to this share"),
)
HTTP_ONLY = ("path", "host", "expect_status")

#: An endpoint's weight: ``weight`` of an endpoint in a file, ``mesh.weight`` on a container/service.
ENDPOINT_WEIGHT = Option("weight", "weight", "mesh.weight", WholeNumber(1, 1000), "relative share of new connections")


def default_of(cls: type, field: str) -> Any:
    """The contract's default for a field of ``ServiceOptions`` or ``HealthCheck``."""
    for f in fields(cls):
        if f.name == field:
            return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    raise KeyError(field)


def health_check(values: Mapping[str, Any], *, kind_spelling: Callable[[str], str]) -> HealthCheck:
    """A ``HealthCheck`` from parsed values (field -> value; ``kind`` defaults to tcp).

    Raises ``OptionError`` naming the offending field in ``.field``:
    ``path``, ``host`` and ``expect_status`` only apply to http checks (``kind_spelling("http")``
    says how the reader writes "kind http", e.g. "mesh.health=http").
    """
    kind = values.get("kind", default_of(HealthCheck, "kind"))
    for f in HTTP_ONLY:
        if f in values and kind != "http":
            why = f"only applies to {kind_spelling('http')}"
            raise OptionError(why, values[f], message=why, field=f)
    try:
        return HealthCheck(**values)
    except TableError as exc:  # pragma: no cover - every field is checked by its type
        raise OptionError(str(exc), values, message=str(exc)) from exc


def blame(exc: TableError, given: tuple[str, ...]) -> str | None:
    """Which of the ``given`` fields a cross-field ``TableError`` is about (the first it names)."""
    text = str(exc)
    return next((f for f in given if f in text), None)
