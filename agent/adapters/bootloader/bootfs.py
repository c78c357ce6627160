"""Whole files on a (FAT) boot partition: read one, replace one, or rewrite bytes of one in place.

The Raspberry Pi's autoboot.txt is replaced whole (``atomic_write``). GRUB's grubenv is
rewritten in place (``write_in_place``): on vfat a temp file + rename is not power-cut
safe (the rename and the new file's clusters reach the disk in no fixed order), while
overwriting bytes of an existing file keeps its size, clusters and directory entry, as
GRUB's own save_env does (grub.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from agent.adapters.fsutil import atomic_write
from agent.errors import BootloaderError


class BootFs(Protocol):
    """Whole files on a (FAT) boot partition: read, and replace atomically."""

    def read(self, name: str) -> bytes | None: ...

    def replace(self, name: str, data: bytes) -> None: ...


@runtime_checkable
class InPlaceFs(Protocol):
    """A BootFs that can also overwrite bytes of an existing file without moving it."""

    def rewrite(self, name: str, offset: int, data: bytes) -> None: ...


def write_in_place(fs: BootFs, name: str, offset: int, data: bytes) -> None:
    """Overwrite ``data`` at ``offset`` of the existing file ``name``, durably.

    A BootFs that cannot write in place (mtools in the tests) gets the whole file replaced
    with the same bytes changed: same result, weaker power-cut guarantee."""
    if isinstance(fs, InPlaceFs):
        fs.rewrite(name, offset, data)
        return
    old = fs.read(name)
    if old is None or len(old) < offset + len(data):
        raise BootloaderError(f"cannot rewrite {name} in place: it is missing or too short")
    fs.replace(name, old[:offset] + data + old[offset + len(data):])


@dataclass(frozen=True)
class DirBootFs:
    """A mounted boot partition (or a directory standing in for one)."""

    root: Path

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BootloaderError(f"cannot read {self.root / name}: {exc.strerror}") from None

    def replace(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self.root / name, data)
        except OSError as exc:
            raise BootloaderError(f"cannot write {self.root / name}: {exc.strerror}",
                                  hint="is the boot partition mounted read-write?") from None

    def rewrite(self, name: str, offset: int, data: bytes) -> None:
        """Overwrite bytes inside the existing file (never grows it), then fsync it."""
        path = self.root / name
        try:
            with open(path, "r+b") as f:
                if os.fstat(f.fileno()).st_size < offset + len(data):
                    raise BootloaderError(f"cannot rewrite {path} in place: the file is too short")
                f.seek(offset)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise BootloaderError(f"cannot write {path}: {exc.strerror}",
                                  hint="is the boot partition mounted read-write?") from None
