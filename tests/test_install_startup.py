"""What `edgeops install` costs around its bytes: its exit, and the journal commits it makes.

docs/performance.md (section 5) has the measurements these behaviours came from; the
tests pin the behaviour, never a time. Its imports: tests/test_frozen.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.adapters import journal as journal_mod
from agent.adapters.journal import Journal, JournalError
from agent.adapters.truststore import TRIAL_SIGNER
from agent.cli import main as cli_main
from agent.device.updater import Updater
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


# --- Journal.batch: the install's verdict in one commit -----------------------------------------

def _journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "state" / "journal.db")


def test_a_batch_notifies_its_follower_once_for_two_witnessed_writes(tmp_path: Path) -> None:
    j, seen = _journal(tmp_path), []
    j.follow(seen.append)
    with j.batch():
        j.raise_trusted_time(100)
        j.put("security_floor", 3)
    assert [(r.trusted_time, r.security_floor) for r in seen] == [(100, 3)]


def test_a_batch_that_raises_leaves_nothing_and_tells_no_follower(tmp_path: Path) -> None:
    j, seen = _journal(tmp_path), []
    j.follow(seen.append)
    with pytest.raises(RuntimeError), j.batch():
        j.raise_trusted_time(100)
        j.put("trial_signer", {"x": 1})
        raise RuntimeError("refused")
    assert (j.trusted_time, j.get("trial_signer"), seen) == (0, None, [])


def test_a_batch_inside_a_batch_commits_with_the_outer_one(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    other = _journal(tmp_path)
    with j.batch():
        with j.batch():
            j.put("trial_signer", {"x": 1})
        assert other.get("trial_signer") is None  # not committed yet
    assert other.get("trial_signer") == {"x": 1}


def test_a_batch_takes_the_write_lock_only_at_its_first_write(tmp_path: Path) -> None:
    j, other = _journal(tmp_path), _journal(tmp_path)
    other._db.execute("PRAGMA busy_timeout=0")  # a held lock fails at once instead of waiting
    with j.batch():
        j.get("trusted_time")
        other.put("note", 1)  # another writer is not held off by the batch's reads
        j.put("trial_signer", {"x": 1})
        with pytest.raises(JournalError):
            other.put("note", 2)


def test_a_failed_write_in_a_batch_is_a_journal_error(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    with pytest.raises(JournalError), j.batch(), j._tx():
        j._db.execute("INSERT INTO no_such_table VALUES (1)")  # as a full disk fails a write
    j.put("after", 1)  # and the batch rolled back: the journal takes writes again
    assert j.get("after") == 1


def test_install_commits_the_trusted_time_and_the_trial_signer_together(
        make_bundle: BundleFactory, updater: Updater, monkeypatch: pytest.MonkeyPatch) -> None:
    commits: list[tuple[bool, int, object]] = []
    real = journal_mod._Batch.end

    def spy(batch: journal_mod._Batch, *, ok: bool) -> None:
        real(batch, ok=ok)
        commits.append((ok, updater.journal.trusted_time, updater.journal.get(TRIAL_SIGNER)))

    monkeypatch.setattr(journal_mod._Batch, "end", spy)
    build_time = updater.journal.trusted_time + 3600  # later than anything the device knows
    with open(make_bundle("2.0", build_time=build_time), "rb") as f:
        updater.install(f)
    assert len(commits) == 1
    ok, trusted, signer = commits[0]
    assert ok and trusted == build_time and isinstance(signer, dict) and signer["version"] == "2.0"


def test_an_idle_agent_cycle_loads_no_trust_store_or_cryptography(device_dir: Path) -> None:
    code = ("import sys\nfrom agent.cli.main import main\n"
            f"main(['agent', '--once', '--config', {str(device_dir / 'agent.toml')!r}])\n"
            "print(sorted(m for m in ('cryptography.x509', 'agent.adapters.truststore') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
