"""Write a payload stream into a slot (a regular file or a block device) and make it durable.

Moves bytes only: which slot to write is the orchestrator's decision.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from agent.errors import PayloadTooLarge, SlotError


def capacity(path: Path) -> int:
    """Bytes a slot can hold: a block device's size, or a (preallocated, sparse) file's length."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SlotError(f"slot {path} cannot be opened: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise SlotError(f"slot {path} is neither a regular file nor a block device")
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_fits(path: Path, size: int, what: str) -> None:
    room = capacity(path)
    if size > room:
        raise PayloadTooLarge(f"payload '{what}' is {size} bytes, slot {path} holds {room}")


def write(path: Path, chunks: Iterable[memoryview | bytes], *, limit: int) -> int:
    """Stream chunks into the slot from offset 0, then fsync. Never writes past ``limit``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SlotError(f"slot {path} cannot be opened for writing: {exc.strerror}") from None
    written = 0
    try:
        for chunk in chunks:
            if written + len(chunk) > limit:
                raise PayloadTooLarge(f"payload overflows slot {path} ({limit} bytes)")
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                written += n
        os.fsync(fd)
    except OSError as exc:
        raise SlotError(f"writing slot {path} failed at byte {written}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return written


def digest(path: Path, size: int, block: int = 1 << 20) -> str:
    """SHA-256 of the first ``size`` bytes of a slot: what a read-back check compares."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(block, left))
            if not chunk:
                raise SlotError(f"slot {path} is shorter than {size} bytes")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()
