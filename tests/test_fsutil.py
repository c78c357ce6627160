"""The one atomic write: old or new bytes, never a mix; the mode it is asked for; no litter."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.adapters import fsutil


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old and longer")
    fsutil.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_atomic_write_creates_the_mode_it_is_asked_for(tmp_path: Path) -> None:
    secret, public = tmp_path / "key", tmp_path / "pub"
    fsutil.atomic_write(secret, "k", mode=fsutil.SECRET)
    fsutil.atomic_write(public, "p")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), fsutil.atomic_file(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("power cut")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_dir_mode_creates_missing_parents(tmp_path: Path) -> None:
    target = tmp_path / "state" / "deep" / "f"
    fsutil.atomic_write(target, b"x", dir_mode=0o700)
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert target.read_bytes() == b"x"
