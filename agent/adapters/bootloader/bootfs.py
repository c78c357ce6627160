"""Whole files on a (FAT) boot partition: read one, replace one atomically.

The Raspberry Pi's autoboot.txt and GRUB's grubenv on the ESP are both written this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.adapters.fsutil import atomic_write
from agent.errors import BootloaderError


class BootFs(Protocol):
    """Whole files on a (FAT) boot partition: read, and replace atomically."""

    def read(self, name: str) -> bytes | None: ...

    def replace(self, name: str, data: bytes) -> None: ...


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
