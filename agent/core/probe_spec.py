"""What a health probe is: its parsed, bounded spec and its one-line result. Pure: no I/O.

``ProbeSpec.from_dict`` turns one probe table of agent.toml or of a bundle manifest into a
frozen record, raising only ``ConfigError``; the bounded readers here are shared with
``agent.core.health``. Running a probe is the adapter's job (``agent.adapters.probes``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from agent.core.frozen import Frozen
from agent.errors import ConfigError

KINDS = ("command", "systemd", "http", "tcp", "process", "disk")
MAX_STRING = 1024
MAX_ARGV = 64
MAX_TIMEOUT = 600.0


class ProbeSpec(Frozen):
    kind: str
    name: str = ""  # empty: a readable default such as "http http://127.0.0.1:8080/health"
    timeout: float = 5.0
    argv: tuple[str, ...] = ()  # command
    unit: str = ""  # systemd
    url: str = ""  # http
    host: str = ""  # tcp
    port: int = 0  # tcp
    process: str = ""  # process
    path: str = ""  # disk
    min_free_mb: int = 0  # disk

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", one_line(f"{self.kind} {self.target}", MAX_STRING))

    @property
    def target(self) -> str:
        """What the probe looks at, in words."""
        targets = {
            "command": shlex.join(self.argv),
            "systemd": self.unit,
            "http": self.url,
            "tcp": f"{self.host}:{self.port}",
            "process": self.process,
            "disk": f"{self.path} >= {self.min_free_mb} MB free",
        }
        return targets.get(self.kind, "")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "probe") -> ProbeSpec:
        """Parse one TOML/JSON probe table; raise only ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f'{where} must be a table like {{type = "http", url = "..."}}')
        kind = d.get("type")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ConfigError(f"{where}.type must be one of: {', '.join(KINDS)}")
        fields = _FIELDS[kind]
        # For "process" the TOML key "name" is the process to look for, not a display name.
        common = {"type", "timeout"} | ({"name"} if "name" not in fields else set())
        _check_keys(d, f"{where} ({kind})", set(fields), set(fields) | common)
        values = {attr: read(d[key], f"{where}.{key}") for key, (attr, read) in fields.items()}
        if "timeout" in d:
            values["timeout"] = bounded_float(d["timeout"], f"{where}.timeout", 0.1, MAX_TIMEOUT)
        if "name" in common and "name" in d:
            values["name"] = _string(d["name"], f"{where}.name")
        return cls(kind, **values)


# --- bounded field readers, shared with agent.core.health ---------------------------------
def bounded_float(value: object, where: str, lo: float, hi: float) -> float:
    # bool is an int to Python but `deadline = true` is a mistake; NaN fails the range test.
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be a number from {lo:g} to {hi:g}")
    return float(value)


def bounded_int(value: object, where: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ConfigError(f"{where} must be a whole number from {lo} to {hi}")
    return value


def _string(value: object, where: str) -> str:
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_STRING
            or any(c < " " or c == "\x7f" for c in value)):
        raise ConfigError(f"{where} must be one line of 1 to {MAX_STRING} characters")
    return value


def _argv(argv: object, where: str) -> tuple[str, ...]:
    hint = f'{where} must be a list of 1 to {MAX_ARGV} strings, e.g. ["sh", "-c", "..."]'
    if not isinstance(argv, list | tuple) or not 1 <= len(argv) <= MAX_ARGV:
        raise ConfigError(hint)
    for arg in argv:
        # Arguments may span lines (sh -c scripts) but a NUL cannot be passed to exec.
        if not isinstance(arg, str) or len(arg) > MAX_STRING or "\0" in arg:
            raise ConfigError(f"{hint}, each at most {MAX_STRING} characters without NUL")
    if not argv[0]:
        raise ConfigError(f"{where}[0] must name a program")
    return tuple(argv)


def _unit(value: object, where: str) -> str:
    unit = _string(value, where)
    if unit.startswith("-"):  # systemctl would read it as an option
        raise ConfigError(f"{where} must be a unit name such as 'nginx.service'")
    return unit


def _url(value: object, where: str) -> str:
    url = _string(value, where)
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        usable = False
    if not usable:
        raise ConfigError(f"{where} must be an http:// or https:// URL with a host")
    return url


def _abs_path(value: object, where: str) -> str:
    path = _string(value, where)
    if not path.startswith("/"):  # relative to the agent's working directory means nothing
        raise ConfigError(f"{where} must be an absolute path")
    return path


# Per kind: TOML key -> (ProbeSpec field, reader). Every key listed is required.
_FIELDS: dict[str, dict[str, tuple[str, Callable[[object, str], Any]]]] = {
    "command": {"command": ("argv", _argv)},
    "systemd": {"unit": ("unit", _unit)},
    "http": {"url": ("url", _url)},
    "tcp": {"host": ("host", _string),
            "port": ("port", lambda v, w: bounded_int(v, w, 1, 65535))},
    "process": {"name": ("process", _string)},
    "disk": {"path": ("path", _abs_path),
             "min_free_mb": ("min_free_mb", lambda v, w: bounded_int(v, w, 0, 1 << 40))},
}


def _check_keys(d: Mapping[str, Any], where: str, required: set[str], allowed: set[str]) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{where} has unknown key {str(key)!r}; "
                              f"allowed: {', '.join(sorted(allowed))}")
    for key in sorted(required):
        if key not in d:
            raise ConfigError(f"{where} needs the key {key!r}")


def one_line(text: str, limit: int) -> str:
    """Collapse whitespace and control characters so a detail fits one log line."""
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ProbeResult(Frozen):
    name: str
    ok: bool
    detail: str  # one line: exit code and last stderr line, HTTP status, free MB, ...
    at: float  # when the probe started, on the clock passed to run_probe
    duration: float
