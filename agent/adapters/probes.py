"""Run health probes: one check, bounded by a timeout, turned into one ``ProbeResult``.

This is the adapter half of health checking: what a probe *is* (``ProbeSpec``, its
parsing and bounds, ``ProbeResult``) is pure and lives in ``agent.core.probe_spec``.
It never decides commit or revert (``agent.core.health`` does) and never raises for a
failing probe: a timeout, a missing binary, a refused connection or a missing unit is a
result with ``ok=False`` and a one-line detail a person can act on.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from agent.core.probe_spec import ProbeResult, ProbeSpec, one_line

__all__ = ["DETAIL_CHARS", "ProbeResult", "ProbeSpec", "run_all", "run_probe"]

STDERR_CHARS = 200  # of a command's last output line kept in the detail
DETAIL_CHARS = 300
_TAIL_BYTES = 4096  # of each output stream kept while a command runs: memory stays bounded
_POLL = 0.1  # seconds between checks whether a command has exited
_PARALLEL = 8


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
