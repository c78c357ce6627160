"""Write a payload stream into a slot (a regular file or a block device) and make it durable.

Moves bytes only: which slot to write is the orchestrator's decision.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
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
    check_space(path, size)


def check_space(path: Path, size: int) -> None:
    """A slot that is a sparse file (the sim board, a loop-mounted image) takes its blocks
    from the filesystem it lives on as it is written: refuse before the first byte when
    that filesystem cannot hold the payload, instead of failing half-way with ENOSPC.
    Conservative: blocks already allocated anywhere in the file count as reusable."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return  # a block device owns its blocks
        vfs = os.statvfs(path)
    except OSError as exc:
        raise SlotError(f"slot {path} cannot be examined: {exc.strerror}") from None
    needed = size - st.st_blocks * 512
    free = vfs.f_bavail * vfs.f_frsize
    if needed > free:
        raise SlotError(f"slot file {path} needs {needed} more bytes for a {size}-byte payload, "
                        f"its filesystem has {free} free",
                        hint="free space on the filesystem that holds the slot file")


QUEUE_DEPTH = 4  # chunks in flight between the verifying reader and the writer thread


def write(path: Path, chunks: Iterable[memoryview | bytes], *, limit: int) -> int:
    """Stream chunks into the slot from offset 0, then fsync. Never writes past ``limit``.

    A writer thread does the ``write`` calls while the caller's thread reads and
    hashes the next chunk: both release the GIL, so on two cores the install runs
    at the speed of the slower of the two instead of their sum. If the chunk
    iterator raises (a block failed its hash), what was already verified and
    queued is written, nothing more, and the error propagates.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SlotError(f"slot {path} cannot be opened for writing: {exc.strerror}") from None
    q: queue.Queue[memoryview | bytes | None] = queue.Queue(maxsize=QUEUE_DEPTH)
    failed: list[OSError] = []
    written = [0]

    def writer() -> None:
        while (item := q.get()) is not None:
            if failed:
                continue  # keep draining so the producer never blocks
            view = memoryview(item)
            try:
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    written[0] += n
            except OSError as exc:
                failed.append(exc)

    thread = threading.Thread(target=writer, name="slot-writer", daemon=True)
    thread.start()
    queued = 0
    try:
        try:
            for chunk in chunks:
                queued += len(chunk)
                if queued > limit:
                    raise PayloadTooLarge(f"payload overflows slot {path} ({limit} bytes)")
                q.put(chunk)
                if failed:
                    break
        finally:
            q.put(None)
            thread.join()
        if failed:
            raise failed[0]
        os.fsync(fd)
    except OSError as exc:
        raise SlotError(f"writing slot {path} failed at byte {written[0]}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return written[0]


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
