"""What `edgeops install` costs before and after its bytes: its exit, its imports, its syncs.

docs/performance.md ("64 MiB: what happens before the first byte") has the measurements
these behaviours came from; the tests pin the behaviour, never a time.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from agent.cli import main as cli_main
from tests.conftest import BundleFactory, run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_install_opts_in_to_the_quick_exit() -> None:
    args = cli_main.parse_args(["install", "x.bundle"])
    assert args.quick_exit is True


def test_status_keeps_the_ordinary_exit() -> None:
    assert not getattr(cli_main.parse_args(["status"]), "quick_exit", False)


def test_quick_exit_returns_while_a_non_daemon_thread_runs() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        cli_main.quick_exit(0)  # returns: sys.exit must wait for the thread
    finally:
        stop.set()
        worker.join()


def test_quick_exit_runs_atexit_handlers_and_flushes_stdout() -> None:
    code = ("import atexit\nfrom agent.cli.main import quick_exit\n"
            "atexit.register(lambda: print('handler', end=''))\n"
            "print('buffered ', end='')\nquick_exit(7)\nprint('not reached')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (7, "buffered handler")


def test_installed_line_reaches_a_pipe_with_the_quick_exit(make_bundle: BundleFactory,
                                                           device_dir: Path) -> None:
    proc = run_cli("install", make_bundle("2.0"), "--config", device_dir / "agent.toml",
                   "--progress", "never")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("installed 2.0 into slot B")
