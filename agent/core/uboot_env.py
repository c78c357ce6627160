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
Pure: bytes in and out. The copies on disk are agent.adapters.bootloader.envfile.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

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
