"""The U-Boot environment block, byte-exact, single or redundant.

Layout (U-Boot ``include/env_internal.h``, ``env_t``):
    single:    crc32(data) LE u32 | data
    redundant: crc32(data) LE u32 | flags u8 | data
``data`` is ``name=value\\0`` entries ended by an empty string (``\\0\\0``) and
padded to the block size. With two copies the valid one with the newer ``flags``
counter is current (counter arithmetic wraps: 0 is newer than 255); a write
goes to the *other* copy with flags + 1, so a write torn by a power cut leaves
the old copy current. This is what ``fw_printenv``/``fw_setenv``
(libubootenv) read and write; tests check both directions against them.
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import BootloaderError

MAX_ENV_SIZE = 1 << 20


class EnvError(BootloaderError):
    pass


def encode(env: Mapping[str, str], size: int, *, redundant: bool = False, flags: int = 0) -> bytes:
    header = 5 if redundant else 4
    parts = []
    for k, v in env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise EnvError(f"U-Boot variable {k!r} cannot be stored")
        parts.append(f"{k}={v}".encode() + b"\0")
    data = b"".join(parts) + b"\0"
    room = size - header
    if len(data) > room:
        raise EnvError(f"environment needs {len(data)} bytes, the block holds {room}")
    data += b"\0" * (room - len(data))
    crc = zlib.crc32(data).to_bytes(4, "little")
    return crc + (bytes([flags & 0xFF]) if redundant else b"") + data


def decode_data(data: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in data.split(b"\0"):
        if not raw:
            break
        name, sep, value = raw.partition(b"=")
        if not sep or not name:
            raise EnvError(f"environment entry without '=': {raw[:40]!r}")
        try:
            env[name.decode()] = value.decode()
        except UnicodeDecodeError:
            raise EnvError("environment entry is not UTF-8") from None
    else:
        raise EnvError("environment is not terminated by an empty entry")
    return env


def check(block: bytes, *, redundant: bool) -> tuple[bool, int, bytes]:
    """(crc ok, flags, data) of one copy."""
    header = 5 if redundant else 4
    if len(block) <= header:
        raise EnvError("environment block is too small")
    data = block[header:]
    ok = zlib.crc32(data) == int.from_bytes(block[:4], "little")
    return ok, (block[4] if redundant else 0), data


def newer(a: int, b: int) -> bool:
    """Is flags ``a`` newer than ``b``? (U-Boot env_check_redund: counters wrap at 255.)"""
    if a == b:
        return False
    if a == 0 and b == 255:
        return True
    if a == 255 and b == 0:
        return False
    return a > b


@dataclass(frozen=True)
class Location:
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
