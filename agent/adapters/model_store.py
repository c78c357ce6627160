"""The on-disk model store: versioned directories and two links, changed only by rename.

    <root>/<name>/<version>/model.tflite      the model, as verified
    <root>/<name>/<version>/validation.npz    its validation set
    <root>/<name>/<version>/info.json         state (trial|good|bad), sizes, spec, reason
    <root>/<name>/current -> <version>        what applications serve
    <root>/<name>/good    -> <version>        the last-known-good model

A new version is written into a staging directory, fsync'd, and renamed into
place; a link is changed by creating a new symlink and renaming it over the old
one, then fsyncing the directory, so after a power cut each link names either
the old or the new version, never nothing (rename(2) is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.adapters.fsutil import atomic_write, fsync_dir
from agent.errors import ModelStoreError

MODEL_FILE, VALIDATION_FILE, INFO_FILE = "model.tflite", "validation.npz", "info.json"
CURRENT, GOOD = "current", "good"
_RESERVED = {CURRENT, GOOD}


@dataclass
class VersionInfo:
    version: str
    state: str  # "trial" until the health window passes, then "good"; "bad" once refused
    installed: float
    size: int  # bytes of the version directory's files
    sha256: str
    security_version: int = 0
    spec: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def write_file(path: Path, chunks: Iterable[bytes | memoryview], *, limit: int) -> int:
    """Write, fsync and return the byte count; stop past ``limit`` (the manifest already bounds it)."""
    n = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            n += len(chunk)
            if n > limit:
                raise ModelStoreError(f"{path.name} grows past its declared {limit} bytes")
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return n


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    # --- reading ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def dir(self, name: str) -> Path:
        return self.root / name

    def link(self, name: str, which: str) -> str | None:
        try:
            return os.readlink(self.dir(name) / which)
        except FileNotFoundError:
            return None

    def current(self, name: str) -> str | None:
        return self.link(name, CURRENT)

    def good(self, name: str) -> str | None:
        return self.link(name, GOOD)

    def info(self, name: str, version: str) -> VersionInfo:
        path = self.dir(name) / version / INFO_FILE
        try:
            return VersionInfo(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ModelStoreError(f"cannot read {path}: {exc}") from None

    def versions(self, name: str) -> list[VersionInfo]:
        """Installed versions, oldest first; half-written (staging) directories are skipped."""
        d = self.dir(name)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") \
                    and (p / INFO_FILE).exists():
                out.append(self.info(name, p.name))
        return sorted(out, key=lambda v: v.installed)

    def model_path(self, name: str, version: str) -> Path:
        return self.dir(name) / version / MODEL_FILE

    def usage(self) -> int:
        return sum(_tree_size(self.dir(n)) for n in self.names())

    # --- writing ---------------------------------------------------------------------------
    def stage(self, name: str) -> Path:
        d = self.dir(name)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob(".staging-*"):  # left by an install that was cut off
            shutil.rmtree(old, ignore_errors=True)
        staging = d / f".staging-{secrets.token_hex(4)}"
        staging.mkdir()
        return staging

    def commit(self, name: str, staging: Path, info: VersionInfo) -> None:
        if info.version in _RESERVED or info.version.startswith("."):
            raise ModelStoreError(f"'{info.version}' cannot be used as a model version")
        info.size = _tree_size(staging) + len(json.dumps(asdict(info)))
        self._write_info(staging, info)
        fsync_dir(staging)
        target = self.dir(name) / info.version
        if target.exists():
            raise ModelStoreError(f"version {info.version} of model {name} is already stored")
        os.rename(staging, target)
        fsync_dir(self.dir(name))

    def set_state(self, name: str, version: str, state: str, reason: str = "") -> None:
        info = self.info(name, version)
        info.state, info.reason = state, reason or info.reason
        self._write_info(self.dir(name) / version, info)

    def _write_info(self, d: Path, info: VersionInfo) -> None:
        atomic_write(d / INFO_FILE, json.dumps(asdict(info), indent=1))

    def point(self, name: str, which: str, version: str) -> None:
        """Atomically make link ``which`` name ``version``."""
        d = self.dir(name)
        if not (d / version / INFO_FILE).exists():
            raise ModelStoreError(f"model {name} has no version {version}")
        tmp = d / f".{which}.{secrets.token_hex(4)}"
        os.symlink(version, tmp)  # relative: the store can be moved as a whole
        os.replace(tmp, d / which)
        fsync_dir(d)

    def remove(self, name: str, version: str) -> None:
        if version in self.protected(name):
            raise ModelStoreError(f"refusing to delete {name} {version}: it is running or "
                                  f"last-known-good")
        d = self.dir(name) / version
        # rename first so a crash never leaves a half-deleted version that looks whole
        doomed = self.dir(name) / f".deleting-{version}-{secrets.token_hex(2)}"
        os.rename(d, doomed)
        fsync_dir(self.dir(name))
        shutil.rmtree(doomed, ignore_errors=True)

    def protected(self, name: str) -> set[str]:
        return {v for v in (self.current(name), self.good(name)) if v}

    # --- disk bounds -----------------------------------------------------------------------
    def prunable(self) -> Iterator[tuple[str, VersionInfo]]:
        """Versions that may be deleted, the least valuable first: bad ones, then oldest."""
        cands = [(n, v) for n in self.names() for v in self.versions(n) if v.version not in
                 self.protected(n)]
        cands.sort(key=lambda nv: (nv[1].state != "bad", nv[1].installed))
        yield from cands

    def make_room(self, incoming: int, budget: int) -> list[str]:
        """Delete unprotected versions until ``incoming`` more bytes fit the budget.

        Returns what was deleted. The caller has checked that it can fit at all.
        """
        removed: list[str] = []
        usage = self.usage()
        for name, v in self.prunable():
            if usage + incoming <= budget:
                break
            self.remove(name, v.version)
            usage -= v.size
            removed.append(f"{name}/{v.version}")
        return removed

    def protected_usage(self) -> int:
        total = 0
        for n in self.names():
            for v in self.versions(n):
                if v.version in self.protected(n):
                    total += v.size
        return total

    def prune(self, name: str, keep: int) -> list[str]:
        """Keep at most ``keep`` versions of a model (never deleting current or good)."""
        versions = self.versions(name)
        removed = []
        excess = len(versions) - keep
        for v in sorted(versions, key=lambda v: (v.state != "bad", v.installed)):
            if excess <= 0:
                break
            if v.version in self.protected(name):
                continue
            self.remove(name, v.version)
            removed.append(f"{name}/{v.version}")
            excess -= 1
        return removed


def _tree_size(d: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(d):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total

