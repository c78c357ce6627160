"""The U-Boot environment on disk: one or two copies at offsets of a file or raw device.

Reads pick the current copy and writes go to the other one with the next ``flags``
counter (the rules and the byte layout are agent.core.uboot_env), fsynced, so a
write torn by a power cut leaves the old copy current.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from agent.core.uboot_env import MAX_ENV_SIZE, EnvError, check, decode_data, encode, newer


# A NamedTuple, not a dataclass: 'edgeops status' reads the env, and Python 3.11 compiles each
# dataclass's methods at import (tools/bench/startup.py).
class Location(NamedTuple):
    path: Path
    offset: int


class EnvStore:
    """An environment on a file or raw device, at one or two locations (fw_env.config's lines)."""

    def __init__(self, locations: list[Location], size: int) -> None:
        if not 1 <= len(locations) <= 2:
            raise EnvError("an environment has one or two copies")
        if not 16 <= size <= MAX_ENV_SIZE:
            raise EnvError(f"environment size {size} is out of range")
        self.locations = locations
        self.size = size
        self.redundant = len(locations) == 2

    def _read_block(self, loc: Location) -> bytes:
        try:
            with open(loc.path, "rb") as f:
                f.seek(loc.offset)
                return f.read(self.size)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise EnvError(f"cannot read the environment at {loc.path}: {exc.strerror}") from None

    def _current(self) -> tuple[int | None, int, dict[str, str]]:
        """(index of the current copy or None, its flags, env)."""
        copies = []
        for i, loc in enumerate(self.locations):
            block = self._read_block(loc)
            if len(block) < self.size:
                continue
            ok, flags, data = check(block, redundant=self.redundant)
            if ok:
                copies.append((i, flags, data))
        if not copies:
            return None, 0, {}
        if len(copies) == 2 and newer(copies[1][1], copies[0][1]):
            copies.reverse()
        i, flags, data = copies[0]
        return i, flags, decode_data(data)

    def exists(self) -> bool:
        return self._current()[0] is not None

    def read(self) -> dict[str, str]:
        index, _, env = self._current()
        if index is None:
            path = self.locations[0].path
            why = ("not found" if not Path(path).exists() else
                   "too short" if len(self._read_block(self.locations[0])) < self.size else
                   "CRC mismatch in every copy")
            raise EnvError(f"no valid U-Boot environment at {path} ({why})",
                           hint="check fw_env.config / the board file, or initialise it with 'fw_setenv'")
        return env

    def write(self, env: Mapping[str, str]) -> None:
        index, flags, _ = self._current()
        target = 0 if index is None or not self.redundant else 1 - index
        block = encode(env, self.size, redundant=self.redundant, flags=(flags + 1) & 0xFF)
        loc = self.locations[target]
        try:
            fd = os.open(loc.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, block, loc.offset)
                self._extend_file(fd, loc.path)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise EnvError(f"cannot write the environment at {loc.path}: {exc.strerror}") from None

    def _extend_file(self, fd: int, path: Path) -> None:
        # fw_printenv refuses a file-backed env whose second copy cannot be read in
        # full (tests/test_uboot_env.py), so a regular file always spans every copy.
        end = max(loc.offset + self.size for loc in self.locations if loc.path == path)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size < end:
            os.ftruncate(fd, end)

    def update(self, **changes: str) -> dict[str, str]:
        env = self.read() if self.exists() else {}
        env.update(changes)
        self.write(env)
        return env
