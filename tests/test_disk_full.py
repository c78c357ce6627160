"""A full disk is an error, not a crash: one line, exit 20, a consistent journal, no crash loop.

ENOSPC is injected at the two write seams — the slot writer's ``os.write`` and SQLite's
``COMMIT`` (which is where a full disk reaches the journal) — and, where the test may mount
one, shown on a real size-limited tmpfs. Every case checks what "nothing broke" means: the
active slot and the boot environment are byte-for-byte as before, the journal opens and says
why the install stopped (or the next start closes the interrupted install), and the agent
keeps cycling instead of dying at every start.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.adapters import journal as journal_mod
from agent.cli.main import main
from agent.core.config import load
from agent.device import service
from agent.device.updater import Updater, open_device
from agent.host import sim
from tests.conftest import BundleFactory, Keys, allocated_blocks, make_image, run_cli


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("edgeops: error: ")
    return lines[0]


def untouched(d: Path) -> tuple[bytes, str]:
    return (d / "uboot.env").read_bytes(), hashlib.sha256((d / "slot-a.img").read_bytes()).hexdigest()


def journal_view(d: Path) -> tuple[str, str, str]:
    dev = open_device(load(d / "agent.toml"))
    try:
        last = dev.journal.history(1)[0]
        return str(dev.journal.state().phase), dev.journal.slots()["B"].state, last.event
    finally:
        dev.close()


# --- ENOSPC at the slot writer ------------------------------------------------------------
def test_enospc_while_writing_the_slot(device_dir: Path, make_bundle: BundleFactory,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    real_write = os.write
    slot_b = str(device_dir / "slot-b.img")
    done = [0]

    def write(fd: int, data: Any) -> int:
        """The filesystem fills after 128 KiB of the slot: a short write, then ENOSPC."""
        if os.readlink(f"/proc/self/fd/{fd}") != slot_b:
            return real_write(fd, data)
        room = 128 * 1024 - done[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, memoryview(data)[:room])
        done[0] += n
        return n

    bundle = make_bundle("2.0", size=600_000)
    before = untouched(device_dir)
    monkeypatch.setattr(os, "write", write)
    code = main(["install", str(bundle), "--config", str(device_dir / "agent.toml")])
    monkeypatch.undo()
    assert code == 20
    assert "No space left on device" in one_line_error(capsys.readouterr().err)
    assert untouched(device_dir) == before
    assert journal_view(device_dir) == ("idle", "empty", "failed")
    # no crash loop: the agent cycles, and the same install succeeds once there is room
    run_cli("agent", "--once", "--config", device_dir / "agent.toml", check=True)
    run_cli("install", bundle, "--config", device_dir / "agent.toml", check=True)


# --- ENOSPC in the journal -----------------------------------------------------------------
class _FullDisk:
    """SQLite connections whose COMMIT fails as on a full disk, from the ``at``-th commit on."""

    def __init__(self) -> None:
        self.at: int | None = None
        self.commits = 0

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return _Conn(_real_connect(*args, **kwargs), self)


_real_connect = sqlite3.connect


class _Conn:
    def __init__(self, db: sqlite3.Connection, disk: _FullDisk) -> None:
        self._db, self._disk = db, disk

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            self._disk.commits += 1
            if self._disk.at is not None and self._disk.commits >= self._disk.at:
                self._db.execute("ROLLBACK")
                raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def executescript(self, sql: str) -> Any:
        return self._db.executescript(sql)

    def close(self) -> None:
        self._db.close()


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FullDisk]:
    disk = _FullDisk()
    monkeypatch.setattr(journal_mod.sqlite3, "connect", disk.connect)
    yield disk


@pytest.mark.parametrize("failing_commit", ["first", "WriteDone"])
def test_enospc_in_the_journal_during_an_install(device_dir: Path, make_bundle: BundleFactory,
                                                 full_disk: _FullDisk, failing_commit: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = device_dir / "agent.toml"
    bundle = make_bundle("2.0")
    # count the commits of a good install on a copy, to fail the one that records the step
    probe = device_dir.parent / "probe"
    shutil.copytree(device_dir, probe)
    assert main(["install", str(bundle), "--config", str(probe / "agent.toml")]) == 0
    capsys.readouterr()
    commits_of_install = full_disk.commits
    full_disk.commits = 0
    # an install commits: the trusted time, Install, WriteDone, TrialSet (the last two last)
    full_disk.at = 1 if failing_commit == "first" else commits_of_install - 1
    before = untouched(device_dir)
    assert main(["install", str(bundle), "--config", str(cfg)]) == 20
    line = one_line_error(capsys.readouterr().err)
    assert "cannot be written: database or disk is full" in line
    assert untouched(device_dir) == before
    full_disk.at = None  # space is back: the next start closes what the full disk left open
    assert main(["agent", "--once", "--config", str(cfg)]) == 0
    # the first commit stops the install before anything (not even its refusal) is recorded;
    # a failed WriteDone leaves WRITING, which the next start closes as interrupted
    expected = "provisioned" if failing_commit == "first" else "interrupted"
    assert journal_view(device_dir) == ("idle", "empty", expected)
    assert main(["install", str(bundle), "--config", str(cfg)]) == 0


def test_a_full_disk_during_a_trial_is_no_crash_loop(device_dir: Path, make_bundle: BundleFactory,
                                                     full_disk: _FullDisk,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = device_dir / "agent.toml"
    assert main(["install", str(make_bundle("2.0")), "--config", str(cfg)]) == 0
    sim.SimFirmware(device_dir).reboot()
    full_disk.at = 1
    for _ in range(3):  # the same one line at every start, never a traceback
        assert main(["agent", "--once", "--config", str(cfg)]) == 20
        assert "database or disk is full" in one_line_error(capsys.readouterr().err)
    # the service itself keeps its loop (and the watchdog) alive and says why
    up = Updater(open_device(load(cfg)), sleep=lambda s: None)
    said: list[str] = []
    try:
        phase = service.run(up, once=False, fleet=lambda up: None, stop=_stop_after(1), say=said.append)
    finally:
        up.dev.close()
    assert phase == "trial-pending"
    assert any("database or disk is full" in m for m in said)
    full_disk.at = None
    assert main(["agent", "--once", "--config", str(cfg)]) == 0
    assert "committed" in capsys.readouterr().out


def _stop_after(n: int) -> service.Stop:
    class Counting(service.Stop):
        calls = 0

        def __call__(self) -> bool:
            self.calls += 1
            return self.calls >= n

    return Counting()


# --- a real full filesystem ----------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_slot_file_on_a_full_filesystem(small_fs: Path, pki: Keys, tmp_path: Path,
                                          make_bundle: BundleFactory) -> None:
    """A sim device on a 1.2 MB tmpfs: slot A holds 300 kB, slot B is a sparse 1 MiB file."""
    d = small_fs / "dev"
    sim.init_device(d, image=make_image(tmp_path / "v1.img", 300_000, "1.0"), keyring=pki.root_crt,
                    slot_size=1 << 20)
    (tmp_path / "run").mkdir()  # the sim's running system lives elsewhere: only state and slots fill
    shutil.rmtree(d / "run")
    (d / "run").symlink_to(tmp_path / "run")
    sim.SimFirmware(d).boot()
    cfg = d / "agent.toml"
    before = untouched(d)
    big = make_bundle("2.0", size=1_000_000)
    proc = run_cli("install", big, "--config", cfg)
    assert proc.returncode == 20
    assert "free space on the filesystem that holds the slot file" in one_line_error(proc.stderr)
    assert untouched(d) == before and allocated_blocks(d / "slot-b.img") == 0
    # fill what is left: the journal cannot grow any more either
    with open(small_fs / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(bytes(64 * 1024))
    small = make_bundle("2.1", size=100_000)
    for _ in range(2):
        proc = run_cli("install", small, "--config", cfg)
        assert proc.returncode == 20, proc.stderr
        one_line_error(proc.stderr)
        assert untouched(d) == before
        proc = run_cli("agent", "--once", "--config", cfg)
        assert proc.returncode in (0, 20), proc.stderr
        assert "Traceback" not in proc.stderr
    (small_fs / "filler").unlink()
    run_cli("agent", "--once", "--config", cfg, check=True)
    run_cli("install", small, "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    assert "committed" in run_cli("agent", "--once", "--config", cfg, check=True).stdout
