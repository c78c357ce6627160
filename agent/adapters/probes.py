"""Run health probes: one check, bounded by a timeout, turned into one ``ProbeResult``.

This is the adapter half of health checking. It never decides commit or revert
(``agent.core.health`` does) and never raises for a failing probe: a timeout, a
missing binary, a refused connection or a missing unit is a result with
``ok=False`` and a one-line detail a person can act on.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError

KINDS = ("command", "systemd", "http", "tcp", "process", "disk")
MAX_STRING = 1024
MAX_ARGV = 64
MAX_TIMEOUT = 600.0
STDERR_CHARS = 200  # of a command's last output line kept in the detail
DETAIL_CHARS = 300
_TAIL_BYTES = 4096  # of each output stream kept while a command runs: memory stays bounded
_POLL = 0.1  # seconds between checks whether a command has exited
_PARALLEL = 8


@dataclass(frozen=True)
class ProbeSpec:
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


# --- bounded field readers, shared with agent.core.health ----------------------------------------
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


# --- running -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeResult:
    name: str
    ok: bool
    detail: str  # one line: exit code and last stderr line, HTTP status, free MB, ...
    at: float  # when the probe started, on the clock passed to run_probe
    duration: float


def run_probe(spec: ProbeSpec, *, now: Callable[[], float] = time.monotonic) -> ProbeResult:
    start = now()
    runner = _RUNNERS.get(spec.kind)
    try:
        ok, detail = runner(spec) if runner else (False, f"unknown probe kind {spec.kind!r}")
    except Exception as exc:
        # An unforeseen error must fail this probe, not stop the agent in the middle of a
        # trial: a failed probe leads to a revert, which is the safe outcome.
        ok, detail = False, f"probe error: {type(exc).__name__}: {exc}"
    return ProbeResult(spec.name, ok, one_line(detail, DETAIL_CHARS), start, now() - start)


def run_all(specs: Iterable[ProbeSpec], *,
            now: Callable[[], float] = time.monotonic) -> list[ProbeResult]:
    """Run every probe, in parallel so one slow probe cannot eat the others' deadline."""
    todo = list(specs)
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=min(len(todo), _PARALLEL)) as pool:
        return list(pool.map(lambda spec: run_probe(spec, now=now), todo))


def _command(spec: ProbeSpec) -> tuple[bool, str]:
    try:
        code, last = _run(spec.argv, spec.timeout)
    except OSError as exc:  # missing binary, not executable, ...
        return False, f"cannot run {spec.argv[0]!r}: {exc.strerror or exc}"
    return code == 0, _exit_detail(code, last, spec.timeout)


def _systemd(spec: ProbeSpec) -> tuple[bool, str]:
    if shutil.which("systemctl") is None:
        return False, "systemd not available: no systemctl on PATH"
    if not os.path.isdir("/run/systemd/system"):  # how sd_booted() tells
        return False, "systemd not available: the system was not booted with systemd"
    code, last = _run(["systemctl", "is-active", "--quiet", "--", spec.unit], spec.timeout)
    if code == 0:
        return True, f"{spec.unit} is active"
    return False, f"{spec.unit} is not active ({_exit_detail(code, last, spec.timeout)})"


def _exit_detail(code: int | None, last: str, timeout: float) -> str:
    if code is None:
        text = f"timed out after {timeout:g}s, process group killed"
    elif code < 0:
        text = f"killed by signal {-code}"
    else:
        text = f"exit {code}"
    return f"{text}: {last}" if last else text


def _run(argv: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """Run argv in a process group of its own; return (exit status or None, last output line).

    Output is read as it comes and only its tail is kept, so a chatty probe cannot
    exhaust memory; on timeout the whole group is killed so no helper outlives it.
    """
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    tails = {out: b"", err: b""}
    finished = False
    try:
        with selectors.DefaultSelector() as sel:
            for fd in tails:
                sel.register(fd, selectors.EVENT_READ)
            finished = _collect(proc, sel, tails, time.monotonic() + timeout)
    finally:
        if not finished:  # timed out, or the agent is being stopped: leave nothing running
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    last = _last_line(tails[err]) or _last_line(tails[out])
    return (code if finished else None), last[-STDERR_CHARS:]


def _collect(proc: subprocess.Popen[bytes], sel: selectors.BaseSelector,
             tails: dict[int, bytes], end: float) -> bool:
    """Read output until the process exits; False if it is still running at `end`."""
    while True:
        left = end - time.monotonic()
        exited = proc.poll() is not None
        if left <= 0:
            return exited
        if not sel.get_map():  # both streams closed
            try:
                proc.wait(left)
                return True
            except subprocess.TimeoutExpired:
                return False
        # Poll briefly rather than wait for EOF: a background child may hold the pipes open.
        ready = sel.select(0 if exited else min(left, _POLL))
        if exited and not ready:
            return True
        for key, _ in ready:
            chunk = os.read(key.fd, 65536)
            if chunk:
                tails[key.fd] = (tails[key.fd] + chunk)[-_TAIL_BYTES:]
            else:
                sel.unregister(key.fd)


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _http(spec: ProbeSpec) -> tuple[bool, str]:
    import requests  # lazy: only devices with HTTP probes pay for its import at start-up

    with requests.Session() as session:
        # Health endpoints are local: the device's proxy settings must not reroute them.
        session.trust_env = False
        try:
            # stream=True: the status is all we need, a large body is never downloaded.
            with session.get(spec.url, timeout=spec.timeout, stream=True) as response:
                status = response.status_code
        except requests.Timeout:
            return False, f"GET {spec.url}: timed out after {spec.timeout:g}s"
        except requests.RequestException as exc:
            return False, f"GET {spec.url}: {_error_reason(exc)}"
    return 200 <= status < 300, f"HTTP {status}"


def _error_reason(exc: Exception) -> str:
    # requests nests the OS error deep in a long repr; the errno text is what helps.
    found = re.search(r"\[Errno -?\d+\] ([^'\"\])]+)", str(exc))
    return found.group(1).strip() if found else f"{type(exc).__name__}: {exc}"


def _tcp(spec: ProbeSpec) -> tuple[bool, str]:
    where = f"{spec.host}:{spec.port}"
    try:
        with socket.create_connection((spec.host, spec.port), timeout=spec.timeout):
            pass
    except TimeoutError:
        return False, f"cannot connect to {where}: timed out after {spec.timeout:g}s"
    except OSError as exc:
        return False, f"cannot connect to {where}: {exc.strerror or exc}"
    return True, f"connected to {where}"


def _process(spec: ProbeSpec) -> tuple[bool, str]:
    import psutil  # lazy, as requests above

    for proc in psutil.process_iter(["name", "status"]):
        # A zombie has exited already; it only waits for its parent to reap it.
        if proc.info["name"] == spec.process and proc.info["status"] != psutil.STATUS_ZOMBIE:
            return True, f"{spec.process} runs as pid {proc.pid}"
    return False, f"no process named {spec.process!r}"


def _disk(spec: ProbeSpec) -> tuple[bool, str]:
    try:
        free_mb = shutil.disk_usage(spec.path).free // (1 << 20)
    except OSError as exc:
        return False, f"cannot check {spec.path}: {exc.strerror or exc}"
    detail = f"{free_mb} MB free on {spec.path}, need {spec.min_free_mb} MB"
    return free_mb >= spec.min_free_mb, detail


_RUNNERS: dict[str, Callable[[ProbeSpec], tuple[bool, str]]] = {
    "command": _command,
    "systemd": _systemd,
    "http": _http,
    "tcp": _tcp,
    "process": _process,
    "disk": _disk,
}
