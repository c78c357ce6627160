"""Write a payload stream into a slot (a regular file or a block device) and make it durable.

Moves bytes only: which slot to write is the orchestrator's decision. The hot path
(``write_from``) fills a small ring of reusable aligned buffers and writes them while the
next one fills; docs/performance.md has the measurements behind each choice.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import queue
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable
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


RING = 4  # buffers in flight: one being filled, one per verify lane, one being written
BUFFER_SIZE = 1 << 20  # bytes per buffer: a large, page-aligned write (and RSS stays small)
WRITEBACK_BEHIND = 4  # drop a buffer's pages this many writes later (its writeback is done)
# Threads that verify filled buffers side by side: SHA-256 releases the GIL, so on two cores
# two buffers hash at once while the caller's thread reads the next one; measured here, a
# 64 MiB payload's read + per-block hashes took 47 ms on one thread and 25 ms on two
# (docs/performance.md, "verify lanes").
VERIFY_LANES = 2

Fill = Callable[[memoryview], int]  # fills (part of) a buffer, returns the byte count; 0 = end
Check = Callable[[memoryview], None]  # sees every filled buffer before it is written
# Checks the filled bytes that start at this offset of the payload; raises if they are not
# the signed ones (a raw payload's blocks: agent.adapters.bundle.PayloadReader.verify_apart)
Verify = Callable[[memoryview, int], None]
# A filled buffer on its way to the slot: the buffer, its byte count (-1: dropped, since it
# or one before it failed a check) and the payload offset of its first byte
_Item = tuple[memoryview, int, int]


def ring(n: int = RING, size: int = BUFFER_SIZE) -> list[memoryview]:
    """``n`` reusable page-aligned buffers (anonymous mmap: whole pages for the kernel to copy,
    and never zero-filled by Python, unlike a fresh ``bytearray`` per chunk)."""
    return [memoryview(mmap.mmap(-1, size)) for _ in range(n)]


class _Sink:
    """The write side of a slot: buffered writes whose writeback starts as each buffer is
    written, and whose pages are dropped a few buffers later, so the disk writes while we
    read, the dirty set stays a few MiB, the page cache keeps what the system was using, and
    the final fsync has little left to do.

    Not O_DIRECT: measured on two virtual disks, 1 MiB O_DIRECT writes at queue depth 1 were
    no faster than these on the one and half as fast on the other, where the kernel's
    writeback sends larger, concurrent requests (docs/performance.md, section 9). Slot data
    goes through ``os.write`` (the seam the power-cut and disk-full suites cut at)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SlotError(f"slot {path} cannot be opened for writing: {exc.strerror}") from None
        self.written = 0
        self._behind: deque[tuple[int, int]] = deque()

    def write(self, view: memoryview) -> None:
        start = self.written
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n
        self._writeback(start, self.written - start)

    def _writeback(self, start: int, n: int) -> None:
        # Linux's POSIX_FADV_DONTNEED starts writeback of the dirty range (WB_SYNC_NONE) and
        # drops the pages already clean (mm/fadvise.c): called now for what was just written
        # and again a few writes later to free it, it keeps the dirty set small and the disk
        # busy while we read, where a plain write + fsync leaves a GiB dirty for the fsync.
        if not _FADVISE:
            return
        os.posix_fadvise(self.fd, start, n, os.POSIX_FADV_DONTNEED)
        self._behind.append((start, n))
        if len(self._behind) > WRITEBACK_BEHIND:
            os.posix_fadvise(self.fd, *self._behind.popleft(), os.POSIX_FADV_DONTNEED)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


_FADVISE = hasattr(os, "posix_fadvise")


def write_from(path: Path, fill: Fill, *, limit: int, buffers: list[memoryview] | None = None,
               verify: Verify | None = None, check: Check | None = None,
               synced: Callable[[], None] | None = None) -> int:
    """Fill a ring of buffers with ``fill`` and write them into the slot from offset 0, then
    fsync. Never writes past ``limit``; returns the bytes written.

    The stages overlap, each on its own threads, passing buffers (never copies) along in
    stream order: the caller's thread fills (reads), ``verify`` (when given) checks each
    filled buffer on ``VERIFY_LANES`` threads that take buffers in turn, an optional
    ``check`` thread looks at each verified buffer (a whole-payload hash), and the writer
    thread writes. Reading, hashing and writing all release the GIL, so on two cores the
    install runs at the pace of the slowest stage, not their sum. Without ``verify``,
    ``fill`` must hand over only verified bytes; with it, no buffer reaches ``check`` or the
    slot before ``verify`` passed it. If ``fill`` raises (a truncated stream), what was
    filled before is verified and written, nothing more, and the error propagates; a
    buffer that fails ``verify`` or ``check`` stops itself and every later one from being
    written, and that error propagates (the earliest in the stream, when two lanes fail).
    ``synced`` is called before the final fsync (a progress display's "sync" phase).
    """
    bufs = buffers if buffers is not None else ring()
    sink = _Sink(path)
    free: queue.Queue[memoryview] = queue.Queue()
    for b in bufs:
        free.put(b)
    failed: list[tuple[int, BaseException]] = []  # (payload offset, error) from the threads
    threads: list[threading.Thread] = []

    def start(target: Callable[..., None], *args: object, name: str) -> None:
        threads.append(threading.Thread(target=target, args=args, name=name, daemon=True))

    def stage(fn: Verify, take: Callable[[], _Item | None], put: Callable[[_Item | None], None]) -> None:
        broken = False  # from the failed buffer on, nothing passes (a later lane's too: in order)
        while (item := take()) is not None:
            buf, n, off = item
            if n >= 0 and not broken:
                try:
                    fn(buf[:n], off)
                except BaseException as exc:  # re-raised in the caller's thread
                    failed.append((off, exc))
                    broken = True
            put((buf, -1, off) if broken or n < 0 else item)
            broken = broken or n < 0
        put(None)

    def writer(take: Callable[[], _Item | None]) -> None:
        broken = False  # after a write error or a failed buffer nothing more is written
        while (item := take()) is not None:
            buf, n, off = item
            broken = broken or n < 0
            if not broken:
                try:
                    sink.write(buf[:n])
                except BaseException as exc:  # re-raised in the caller's thread
                    failed.append((off, exc))
                    broken = True
            free.put(buf)

    inlets: list[queue.Queue[_Item | None]] = [queue.Queue()]  # the caller puts in turn
    take = _in_turn(inlets)
    if verify is not None:
        inlets = [queue.Queue() for _ in range(VERIFY_LANES)]
        outlets: list[queue.Queue[_Item | None]] = [queue.Queue() for _ in inlets]
        for i, (src, dst) in enumerate(zip(inlets, outlets, strict=True)):
            start(stage, verify, src.get, dst.put, name=f"slot-verify-{i}")
        take = _in_turn(outlets)
    if check is not None:
        checked: queue.Queue[_Item | None] = queue.Queue()
        start(stage, lambda view, _off: check(view), take, checked.put, name="slot-check")
        take = checked.get
    start(writer, take, name="slot-writer")
    for t in threads:
        t.start()
    put = _in_turn_put(inlets)
    queued = 0
    try:
        try:
            while not failed:
                buf = free.get()
                n = fill(buf)
                if not n:
                    free.put(buf)
                    break
                if queued + n > limit:
                    raise PayloadTooLarge(f"payload overflows slot {path} ({limit} bytes)")
                put((buf, n, queued))
                queued += n
        except Exception as exc:  # after what was filled before it: a lane may still fail that
            failed.append((queued, exc))
        finally:
            for q in inlets:
                q.put(None)
            for t in threads:
                t.join()
        if failed:
            raise min(failed, key=lambda f: f[0])[1]
        if synced is not None:
            synced()
        sink.sync()
    except OSError as exc:
        raise SlotError(f"writing slot {path} failed at byte {sink.written}: {exc.strerror}") from None
    finally:
        sink.close()
    return sink.written


def _in_turn(queues: list[queue.Queue[_Item | None]]) -> Callable[[], _Item | None]:
    """Take from ``queues`` in turn: buffers dealt out in turn come back in stream order."""
    turn = itertools.cycle(queues)
    return lambda: next(turn).get()


def _in_turn_put(queues: list[queue.Queue[_Item | None]]) -> Callable[[_Item], None]:
    turn = itertools.cycle(queues)
    return lambda item: next(turn).put(item)


def write(path: Path, chunks: Iterable[memoryview | bytes], *, limit: int) -> int:
    """Stream ``chunks`` into the slot from offset 0, then fsync (``write_from`` for an iterable:
    each chunk is copied into the ring once; the installer fills the ring directly)."""
    it = iter(chunks)
    pending = [memoryview(b"")]

    def fill(buf: memoryview) -> int:
        n = 0
        while n < len(buf):
            if not pending[0]:
                nxt = next(it, None)
                if nxt is None:
                    break
                pending[0] = memoryview(nxt).cast("B")
            k = min(len(buf) - n, len(pending[0]))
            buf[n:n + k] = pending[0][:k]
            pending[0] = pending[0][k:]
            n += k
        return n

    return write_from(path, fill, limit=limit)


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
