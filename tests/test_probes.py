"""agent.adapters.probes against real parts: an HTTP server, sockets, processes, the filesystem."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.adapters.probes import DETAIL_CHARS, ProbeSpec, run_all, run_probe
from agent.errors import ConfigError


# --- real servers ---------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/ok": 200, "/fail": 500}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass


@pytest.fixture
def http_base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def listening_port() -> Iterator[int]:
    # Connections complete in the kernel's backlog; nobody ever answers them.
    with socket.create_server(("127.0.0.1", 0)) as srv:
        yield srv.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        return int(srv.getsockname()[1])


def probe(kind: str, **fields: Any) -> ProbeSpec:
    return ProbeSpec(kind, **fields)


# --- command --------------------------------------------------------------------------------
def test_command_true_passes() -> None:
    r = run_probe(probe("command", argv=("true",)))
    assert r.ok and r.detail == "exit 0"


def test_command_false_fails_with_exit_code() -> None:
    r = run_probe(probe("command", argv=("false",)))
    assert not r.ok and r.detail == "exit 1"


def test_command_failure_detail_has_last_stderr_line() -> None:
    r = run_probe(probe("command", argv=("sh", "-c", "echo first >&2; echo boom >&2; exit 3")))
    assert not r.ok and r.detail == "exit 3: boom"


def test_command_detail_falls_back_to_stdout_when_stderr_is_empty() -> None:
    r = run_probe(probe("command", argv=("sh", "-c", "echo not ready; exit 2")))
    assert r.detail == "exit 2: not ready"


def test_command_timeout_fails_quickly() -> None:
    start = time.monotonic()
    r = run_probe(probe("command", argv=("sh", "-c", "sleep 5"), timeout=0.5))
    assert not r.ok and "timed out after 0.5s" in r.detail
    assert time.monotonic() - start < 3


def test_command_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    r = run_probe(probe("command", argv=("sh", "-c", script), timeout=0.5))
    assert not r.ok
    child = int(pidfile.read_text())
    assert _gone_within(child, 2.0)


def _gone_within(pid: int, seconds: float) -> bool:
    # SIGKILL is delivered asynchronously; the orphan may linger as a zombie of init.
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def test_command_that_exits_is_not_held_up_by_a_background_child() -> None:
    start = time.monotonic()
    r = run_probe(probe("command", argv=("sh", "-c", "sleep 5 & exit 0"), timeout=10))
    assert r.ok and time.monotonic() - start < 3


def test_command_output_is_bounded_and_keeps_the_last_line() -> None:
    script = "head -c 1000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo the-end >&2; exit 1"
    r = run_probe(probe("command", argv=("sh", "-c", script)))
    assert r.detail == "exit 1: the-end"


def test_command_long_last_line_is_cut_to_a_bounded_detail() -> None:
    script = "head -c 100000 /dev/zero | tr '\\0' y >&2; exit 1"
    r = run_probe(probe("command", argv=("sh", "-c", script)))
    assert not r.ok and len(r.detail) <= DETAIL_CHARS and r.detail.endswith("yyyy")


def test_command_missing_binary_fails_without_raising() -> None:
    r = run_probe(probe("command", argv=("/nonexistent/edgeops-probe",)))
    assert not r.ok and "cannot run" in r.detail and "No such file" in r.detail


def test_command_killed_by_signal_says_so() -> None:
    r = run_probe(probe("command", argv=("sh", "-c", "kill -9 $$")))
    assert not r.ok and r.detail == "killed by signal 9"


# --- systemd --------------------------------------------------------------------------------
def test_systemd_without_systemctl_is_not_available(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no systemctl
    r = run_probe(probe("systemd", unit="ssh.service"))
    assert not r.ok and "systemd not available" in r.detail


def test_systemd_missing_unit_fails() -> None:
    # Either systemd runs here and the unit is not active, or systemd is not available.
    r = run_probe(probe("systemd", unit="edgeops-no-such-unit.service"))
    assert not r.ok and r.detail


# --- http -----------------------------------------------------------------------------------
def test_http_200_passes(http_base: str) -> None:
    r = run_probe(probe("http", url=f"{http_base}/ok"))
    assert r.ok and r.detail == "HTTP 200"


def test_http_500_fails_with_status(http_base: str) -> None:
    r = run_probe(probe("http", url=f"{http_base}/fail"))
    assert not r.ok and r.detail == "HTTP 500"


def test_http_refused_connection_fails(closed_port: int) -> None:
    r = run_probe(probe("http", url=f"http://127.0.0.1:{closed_port}/"))
    assert not r.ok and "refused" in r.detail.lower()


def test_http_silent_server_times_out(listening_port: int) -> None:
    start = time.monotonic()
    r = run_probe(probe("http", url=f"http://127.0.0.1:{listening_port}/", timeout=0.3))
    assert not r.ok and "timed out" in r.detail
    assert time.monotonic() - start < 3


# --- tcp ------------------------------------------------------------------------------------
def test_tcp_listening_port_passes(listening_port: int) -> None:
    r = run_probe(probe("tcp", host="127.0.0.1", port=listening_port))
    assert r.ok and r.detail == f"connected to 127.0.0.1:{listening_port}"


def test_tcp_closed_port_fails(closed_port: int) -> None:
    r = run_probe(probe("tcp", host="127.0.0.1", port=closed_port))
    assert not r.ok and "refused" in r.detail.lower()


# --- process --------------------------------------------------------------------------------
def test_process_running_python_passes() -> None:
    name = psutil.Process().name()
    r = run_probe(probe("process", process=name))
    assert r.ok and name in r.detail


def test_process_missing_name_fails() -> None:
    r = run_probe(probe("process", process="edgeops-no-such-process"))
    assert not r.ok and "no process named" in r.detail


# --- disk -----------------------------------------------------------------------------------
def test_disk_zero_floor_passes(tmp_path: Path) -> None:
    r = run_probe(probe("disk", path=str(tmp_path), min_free_mb=0))
    assert r.ok and "MB free" in r.detail


def test_disk_impossible_floor_fails(tmp_path: Path) -> None:
    r = run_probe(probe("disk", path=str(tmp_path), min_free_mb=1 << 40))
    assert not r.ok and f"need {1 << 40} MB" in r.detail


def test_disk_missing_path_fails(tmp_path: Path) -> None:
    r = run_probe(probe("disk", path=str(tmp_path / "gone"), min_free_mb=0))
    assert not r.ok and "cannot check" in r.detail


# --- results and run_all --------------------------------------------------------------------
def test_result_times_come_from_the_given_clock() -> None:
    ticks = iter([100.0, 100.25])
    r = run_probe(probe("command", argv=("true",)), now=lambda: next(ticks))
    assert (r.at, r.duration) == (100.0, 0.25)


def test_unknown_kind_fails_without_raising() -> None:
    r = run_probe(probe("telepathy"))
    assert not r.ok and "unknown probe kind" in r.detail


def test_run_all_keeps_spec_order_and_names(http_base: str) -> None:
    specs = [probe("command", argv=("false",), name="first"),
             probe("http", url=f"{http_base}/ok", name="second"),
             probe("command", argv=("true",), name="third")]
    assert [(r.name, r.ok) for r in run_all(specs)] == [
        ("first", False), ("second", True), ("third", True)]


def test_run_all_runs_slow_probes_side_by_side() -> None:
    specs = [probe("command", argv=("sleep", "0.5"), name=f"s{i}") for i in range(8)]
    start = time.monotonic()
    assert all(r.ok for r in run_all(specs))
    assert time.monotonic() - start < 2.5  # one after another would take 4 s


def test_run_all_of_nothing_is_empty() -> None:
    assert run_all([]) == []


# --- ProbeSpec.from_dict --------------------------------------------------------------------
@pytest.mark.parametrize(("doc", "expected"), [
    ({"type": "http", "url": "http://127.0.0.1:8080/health"},
     ProbeSpec("http", "http http://127.0.0.1:8080/health", url="http://127.0.0.1:8080/health")),
    ({"type": "command", "command": ["sh", "-c", "test -e /run/app.ready"]},
     ProbeSpec("command", "command sh -c 'test -e /run/app.ready'",
               argv=("sh", "-c", "test -e /run/app.ready"))),
    ({"type": "systemd", "unit": "x.service", "timeout": 10},
     ProbeSpec("systemd", "systemd x.service", 10.0, unit="x.service")),
    ({"type": "tcp", "host": "127.0.0.1", "port": 22, "name": "ssh"},
     ProbeSpec("tcp", "ssh", host="127.0.0.1", port=22)),
    ({"type": "process", "name": "nginx"},
     ProbeSpec("process", "process nginx", process="nginx")),
    ({"type": "disk", "path": "/", "min_free_mb": 100},
     ProbeSpec("disk", "disk / >= 100 MB free", path="/", min_free_mb=100)),
])
def test_from_dict_reads_each_toml_form(doc: dict[str, Any], expected: ProbeSpec) -> None:
    assert ProbeSpec.from_dict(doc) == expected


def test_from_dict_default_name_of_multiline_command_is_one_line() -> None:
    spec = ProbeSpec.from_dict({"type": "command", "command": ["sh", "-c", "a\nb"]})
    assert "\n" not in spec.name


@pytest.mark.parametrize(("doc", "named"), [
    ({"url": "http://x/"}, "type must be one of"),
    ({"type": "ftp", "url": "ftp://x/"}, "type must be one of"),
    ({"type": "http"}, "needs the key 'url'"),
    ({"type": "http", "url": "http://x/", "uri": "y"}, "unknown key 'uri'"),
    ({"type": "http", "url": "file:///etc/passwd"}, "url must be an http"),
    ({"type": "http", "url": "http://[::1/"}, "url must be an http"),
    ({"type": "http", "url": "http://x/", "timeout": 0}, "timeout must be a number"),
    ({"type": "http", "url": "http://x/", "timeout": True}, "timeout must be a number"),
    ({"type": "http", "url": "http://x/", "name": "a\nb"}, "name must be one line"),
    ({"type": "http", "url": "http://x/" + "a" * 1024}, "url must be one line of 1 to 1024"),
    ({"type": "command", "command": "true"}, "command must be a list"),
    ({"type": "command", "command": []}, "command must be a list"),
    ({"type": "command", "command": ["x"] * 65}, "command must be a list of 1 to 64"),
    ({"type": "command", "command": ["sh", 1]}, "command must be a list"),
    ({"type": "command", "command": ["a\0b"]}, "without NUL"),
    ({"type": "command", "command": [""]}, "command[0] must name a program"),
    ({"type": "systemd", "unit": "--user"}, "unit must be a unit name"),
    ({"type": "tcp", "host": "h", "port": 0}, "port must be a whole number from 1 to 65535"),
    ({"type": "tcp", "host": "h", "port": "22"}, "port must be a whole number"),
    ({"type": "process", "process": "nginx"}, "unknown key 'process'"),
    ({"type": "disk", "path": "data", "min_free_mb": 1}, "path must be an absolute path"),
    ({"type": "disk", "path": "/", "min_free_mb": -1}, "min_free_mb must be a whole number"),
    (["http"], "must be a table"),
])
def test_from_dict_rejects_with_the_key_named(doc: Any, named: str) -> None:
    with pytest.raises(ConfigError, match=r"^probe") as info:
        ProbeSpec.from_dict(doc)
    assert named in str(info.value)
    assert "\n" not in str(info.value)

