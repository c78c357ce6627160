"""Verified bytes read ahead on a thread of their own, in a few reused buffers.

A zstd payload's stored blocks are read and checked against the signed list here, a few
buffers ahead of the decompressor (agent.adapters.bundle), so reading + hashing overlaps
decoding on a second core (docs/performance.md, "zstd").
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Callable


class ReadAhead:
    """Verified stored bytes for the decompressor, read on a thread of their own.

    The thread fills free buffers with ``fill`` (which reads whole stored blocks and checks
    each against the signed list) and queues them; ``read`` (zstandard's ``stream_reader``
    source) hands out one filled buffer at a time and recycles the one it handed out before:
    python-zstandard asks for new input only once it consumed the last and dropped its
    reference to it (c-ext/decompressionreader.c: ``read_decompressor_input`` runs only
    when ``input.pos == input.size``, and ``decompress_input`` clears ``readResult`` then).
    Memory is bounded by the buffers made here; nothing unverified is ever queued; an error
    in ``fill`` (a block that fails its hash, a truncated stream) is raised by the next
    ``read``, after every buffer verified before it. The thread alone touches the stream
    until ``finish`` has joined it."""

    def __init__(self, fill: Callable[[memoryview], int], size: int, count: int) -> None:
        self._fill = fill
        self._free: queue.Queue[memoryview | None] = queue.Queue()
        for _ in range(count):
            self._free.put(memoryview(mmap.mmap(-1, size)))  # page-aligned, never zero-filled
        self._ready: queue.Queue[tuple[memoryview, int] | BaseException] = queue.Queue()
        self._held: memoryview | None = None
        self._pending: tuple[memoryview, int] | BaseException | None = None  # taken by first()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="bundle-verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (buf := self._free.get()) is not None:
                n = self._fill(buf)
                self._ready.put((buf, n))
                if not n:
                    return
        except BaseException as exc:  # raised by the consumer's next read
            self._ready.put(exc)

    def read(self, size: int = -1) -> memoryview:
        if self._held is not None:
            self._free.put(self._held)
            self._held = None
        if self._ended:
            return memoryview(b"")
        item = self._pending if self._pending is not None else self._ready.get()
        self._pending = None
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        buf, n = item
        if not n:
            self._ended = True
            return memoryview(b"")
        self._held = buf
        return buf[:n]

    def first(self) -> memoryview:
        """The first verified buffer, left for the next ``read`` (to look at a frame header);
        empty if the payload is empty or its first read failed (``read`` raises that)."""
        if self._pending is None:
            self._pending = self._ready.get()
        item = self._pending
        return memoryview(b"") if isinstance(item, BaseException) else item[0][:item[1]]

    def finish(self) -> None:
        """Read (and so verify) to the end of the payload, and join the thread."""
        while not self._ended:
            self.read()
        self._thread.join()

    def stop(self) -> None:
        self._ended = True
        self._free.put(None)  # the thread ends at its next free buffer
