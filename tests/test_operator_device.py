"""The device CLI tells the truth while it works (issue 13, items 8 and 9).

Each test drives a simulated board (real files, the real U-Boot environment codec) through
the real ``edgeops`` command in a subprocess.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EDGEOPS, BundleFactory, run_cli

FAILING = {"retries": 3, "interval": 0.1, "deadline": 30,
           "probe": [{"type": "disk", "path": "/", "min_free_mb": 10**9, "name": "impossible"}]}


def _status(cfg: Path) -> dict[str, object]:
    return dict(json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout))


def _trial_booted(device_dir: Path, bundle: Path) -> Path:
    """Installed and rebooted into the trial; the agent has not run since."""
    cfg = device_dir / "agent.toml"
    run_cli("install", bundle, "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    return cfg


def test_status_in_a_trial_the_agent_has_not_picked_up_says_trial_and_fallback(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    cfg = _trial_booted(device_dir, make_bundle("2.0"))
    st = _status(cfg)
    assert st["booted_slot"] == "B" and st["trial"] is True and st["trial_picked_up"] is False, st
    text = run_cli("status", "--config", cfg, check=True).stdout
    assert "not yet picked up" in text
    assert "falls back to slot A" in text
    assert "tries slot B once" not in text


def test_status_before_the_trial_boot_says_the_next_boot_tries_it(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    cfg = device_dir / "agent.toml"
    run_cli("install", make_bundle("2.0"), "--config", cfg, check=True)
    assert _status(cfg)["trial"] is False
    assert "next boot     tries slot B once" in run_cli("status", "--config", cfg, check=True).stdout


def test_mark_good_on_a_committed_system_exits_0(device_dir: Path) -> None:
    cfg = device_dir / "agent.toml"
    proc = run_cli("mark-good", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "already committed" in proc.stdout
    assert _status(cfg)["phase"] == "idle"


def test_mark_good_with_a_trial_armed_for_the_next_boot_is_still_refused(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    cfg = device_dir / "agent.toml"
    run_cli("install", make_bundle("2.0"), "--config", cfg, check=True)
    proc = run_cli("mark-good", "--config", cfg)
    assert proc.returncode == 21, proc.stderr


def test_mark_good_commits_a_trial_the_agent_has_not_picked_up(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    cfg = _trial_booted(device_dir, make_bundle("2.0"))
    run_cli("mark-good", "--config", cfg, check=True)
    st = _status(cfg)
    assert (st["primary_slot"], st["trial"]) == ("B", False), st


def test_rollback_says_it_reboots(device_dir: Path, make_bundle: BundleFactory) -> None:
    # security_version 0 keeps the floor where slot A's 1.0 is: A and B both good to boot
    cfg = _trial_booted(device_dir, make_bundle("2.0", security_version=0))
    run_cli("agent", "--once", "--config", cfg, check=True)
    proc = run_cli("rollback", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "reboot" in proc.stdout.splitlines()[0]  # said before it happens
    assert "reboot" in run_cli("rollback", "--help").stdout


def test_agent_logs_each_round_of_a_trials_health_window(device_dir: Path,
                                                        make_bundle: BundleFactory) -> None:
    cfg = _trial_booted(device_dir, make_bundle("2.0", health=FAILING))
    proc = run_cli("agent", "--once", "--config", cfg)
    rounds = [line for line in proc.stderr.splitlines() if "trial health round" in line]
    assert len(rounds) == FAILING["retries"] - 1, proc.stderr  # the last round is the verdict
    assert all("impossible" in r and "s left" in r for r in rounds), rounds
    assert "round 1:" in rounds[0] and "round 2:" in rounds[1]


@pytest.fixture
def http_404() -> Iterator[str]:
    class NotHere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotHere)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/missing.bundle"
    server.shutdown()
    server.server_close()


def test_install_from_a_url_that_is_404_is_not_retry_later(device_dir: Path, http_404: str) -> None:
    proc = run_cli("install", http_404, "--config", device_dir / "agent.toml")
    assert proc.returncode == 41, proc.stderr
    assert "404" in proc.stderr and "retrying it will not help" in proc.stderr
    assert "41" in run_cli("help", "exit-codes", check=True).stdout


def _wait_reading_stdin(pid: int, timeout: float = 30.0) -> None:
    """Until the process blocks in a read of fd 0 (/proc/PID/syscall: number, then fd)."""
    read = {"x86_64": 0, "aarch64": 63}.get(os.uname().machine)
    if read is None:  # another architecture's call numbers: give it time, as before
        time.sleep(1.5)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # "running" while it runs, else the call and its args
            call = Path(f"/proc/{pid}/syscall").read_text().split()
            if len(call) > 1 and call[0] == str(read) and int(call[1], 16) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never waited on stdin within {timeout} s")


def _default_sigint() -> None:
    # A shell starts a background job with SIGINT ignored, and Python then keeps it ignored;
    # a technician's terminal never does: the CLI is tested as it meets a Ctrl-C there.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_and_130_is_in_the_table(device_dir: Path) -> None:
    proc = subprocess.Popen([*EDGEOPS, "install", "-", "--config", str(device_dir / "agent.toml")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)
    _wait_reading_stdin(proc.pid)  # waiting on stdin for the bundle
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    table = run_cli("help", "exit-codes", check=True).stdout
    assert "130 interrupted" in table
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "| 130 |" in readme and "| 41 |" in readme
