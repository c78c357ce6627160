"""The slot writer's ring: what reaches the slot when the filler, the check or the disk fails."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.adapters import slots
from agent.errors import BundleError, HashMismatch, SlotError

MIB = 1 << 20


def _slot(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "slot.img"
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def _data(n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(i.to_bytes(8, "big")).digest() * 128
        i += 1
    return bytes(out[:n])


class _Filler:
    """Fills buffers from ``data``; raises ``fail`` instead of filling buffer number ``at``."""

    def __init__(self, data: bytes, fail: BaseException | None = None, at: int = -1) -> None:
        self.data, self.pos, self.fail, self.at, self.calls = data, 0, fail, at, 0

    def __call__(self, buf: memoryview) -> int:
        if self.calls == self.at and self.fail is not None:
            raise self.fail
        self.calls += 1
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def _written_up_to(slot: Path, data: bytes, end: int) -> None:
    """The slot holds ``data`` up to byte ``end`` and nothing (zeros) after it."""
    got = slot.read_bytes()
    assert got[:end] == data[:end]
    assert got[end:] == bytes(len(got) - end)


@pytest.mark.parametrize("size", [3 * MIB, 3 * MIB + 1234, 4095, 1])
def test_written_bytes_are_the_filled_bytes_with_an_unaligned_tail(tmp_path: Path, size: int) -> None:
    data = _data(size)
    slot = _slot(tmp_path, 4 * MIB)
    assert slots.write_from(slot, _Filler(data), limit=4 * MIB) == size
    assert slot.read_bytes()[:size] == data


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_each_buffer_starts_its_writeback_at_once_and_is_dropped_a_few_writes_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, int, int]] = []
    real_write, real_fadvise = os.write, os.posix_fadvise
    offset = [0]

    def write(fd: int, data: Any) -> int:
        n = real_write(fd, data)
        events.append(("write", offset[0], n))
        offset[0] += n
        return n

    def fadvise(fd: int, start: int, n: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        events.append(("advise", start, n))
        real_fadvise(fd, start, n, advice)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    data = _data(9 * MIB + 77)
    slot = _slot(tmp_path, 12 * MIB)
    slots.write_from(slot, _Filler(data), limit=12 * MIB)
    monkeypatch.undo()
    writes = [(start, n) for kind, start, n in events if kind == "write"]
    for i, (kind, start, n) in enumerate(events):
        if kind == "write":  # its writeback is started before the next buffer is written
            assert events[i + 1] == ("advise", start, n)
    for k, w in enumerate(writes[:-slots.WRITEBACK_BEHIND]):  # its pages dropped later
        advices = [i for i, e in enumerate(events) if e == ("advise", *w)]
        assert len(advices) == 2
        assert advices[1] > events.index(("write", *writes[k + slots.WRITEBACK_BEHIND]))
    assert slot.read_bytes()[:len(data)] == data


def test_a_fill_that_fails_writes_what_was_verified_before_it_and_nothing_after(tmp_path: Path) -> None:
    data = _data(5 * MIB)
    slot = _slot(tmp_path, 8 * MIB)
    with pytest.raises(HashMismatch):
        slots.write_from(slot, _Filler(data, HashMismatch("block 48"), at=3), limit=8 * MIB)
    _written_up_to(slot, data, 3 * MIB)


def test_a_failed_check_stops_that_buffer_and_every_later_one(tmp_path: Path) -> None:
    data = _data(5 * MIB)
    slot = _slot(tmp_path, 8 * MIB)
    seen = [0]

    def check(view: memoryview) -> None:
        seen[0] += 1
        if seen[0] == 2:
            raise HashMismatch("whole payload")

    with pytest.raises(HashMismatch):
        slots.write_from(slot, _Filler(data), limit=8 * MIB, check=check)
    _written_up_to(slot, data, MIB)


def test_verify_sees_every_buffer_at_its_offset_before_any_of_it_is_written(tmp_path: Path) -> None:
    data = _data(5 * MIB + 4096)
    slot = _slot(tmp_path, 8 * MIB)
    seen: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def verify(view: memoryview, offset: int) -> None:
        with open(slot, "rb") as f:
            f.seek(offset)
            on_disk = f.read(len(view))
        assert on_disk == bytes(len(view))  # nothing of this buffer reached the slot yet
        with lock:
            seen.append((offset, bytes(view)))

    assert slots.write_from(slot, _Filler(data), limit=8 * MIB, verify=verify) == len(data)
    assert b"".join(b for _, b in sorted(seen)) == data
    assert [off for off, _ in sorted(seen)] == list(range(0, len(data), MIB))
    assert slot.read_bytes()[:len(data)] == data


def test_two_buffers_are_verified_at_once(tmp_path: Path) -> None:
    """The verify lanes run side by side: two verifies meet at a barrier, or time out."""
    together = threading.Barrier(slots.VERIFY_LANES, timeout=10)
    met: list[int] = []

    def verify(view: memoryview, offset: int) -> None:
        if offset < slots.VERIFY_LANES * MIB:
            met.append(together.wait())

    data = _data(4 * MIB)
    slot = _slot(tmp_path, 4 * MIB)
    assert slots.write_from(slot, _Filler(data), limit=4 * MIB, verify=verify) == len(data)
    assert sorted(met) == list(range(slots.VERIFY_LANES))


def test_a_failed_verify_writes_every_buffer_before_it_and_none_after(tmp_path: Path) -> None:
    """The failing buffer's lane is slow, so the next lane has passed the buffer after it."""
    data = _data(6 * MIB)
    slot = _slot(tmp_path, 8 * MIB)

    def verify(view: memoryview, offset: int) -> None:
        if offset == 2 * MIB:
            time.sleep(0.2)
            raise HashMismatch("block 32")

    with pytest.raises(HashMismatch, match="block 32"):
        slots.write_from(slot, _Filler(data), limit=8 * MIB, verify=verify)
    _written_up_to(slot, data, 2 * MIB)


def test_when_two_lanes_fail_the_earlier_buffer_s_error_is_raised(tmp_path: Path) -> None:
    data = _data(6 * MIB)
    slot = _slot(tmp_path, 8 * MIB)

    def verify(view: memoryview, offset: int) -> None:
        if offset == 2 * MIB:
            time.sleep(0.2)  # fails last in time, first in the stream
            raise HashMismatch("block 32")
        if offset == 3 * MIB:
            raise HashMismatch("block 48")

    with pytest.raises(HashMismatch, match="block 32"):
        slots.write_from(slot, _Filler(data), limit=8 * MIB, verify=verify)
    assert slot.read_bytes()[2 * MIB:] == bytes(6 * MIB)


def test_a_truncated_fill_after_verified_buffers_writes_them_and_raises(tmp_path: Path) -> None:
    data = _data(5 * MIB)
    slot = _slot(tmp_path, 8 * MIB)
    verified: list[int] = []
    with pytest.raises(HashMismatch, match="truncated"):
        slots.write_from(slot, _Filler(data, HashMismatch("truncated"), at=3), limit=8 * MIB,
                         verify=lambda view, off: verified.append(off))
    assert sorted(verified) == [0, MIB, 2 * MIB]
    _written_up_to(slot, data, 3 * MIB)


def test_a_bad_buffer_before_a_truncation_is_the_error_raised(tmp_path: Path) -> None:
    """The stream is cut while a lane still hashes an earlier, tampered buffer: the install
    fails for the tampered bytes, not for the cut."""
    data = _data(5 * MIB)
    slot = _slot(tmp_path, 8 * MIB)

    def verify(view: memoryview, offset: int) -> None:
        if offset == 0:
            time.sleep(0.2)
            raise HashMismatch("block 0")

    with pytest.raises(HashMismatch, match="block 0"):
        slots.write_from(slot, _Filler(data, BundleError("bundle truncated"), at=2), limit=8 * MIB,
                         verify=verify)
    _written_up_to(slot, data, 0)


def test_a_payload_larger_than_the_slot_is_refused(tmp_path: Path) -> None:
    slot = _slot(tmp_path, 2 * MIB)
    with pytest.raises(slots.PayloadTooLarge):
        slots.write_from(slot, _Filler(_data(3 * MIB)), limit=2 * MIB)
    assert slot.stat().st_size == 2 * MIB


def test_a_disk_error_names_the_slot_and_the_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    slot = _slot(tmp_path, 4 * MIB)

    def write(fd: int, data: Any) -> int:
        if os.fstat(fd).st_ino == slot.stat().st_ino and os.lseek(fd, 0, os.SEEK_CUR) >= MIB:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SlotError, match=rf"slot {slot} failed at byte {MIB}: Input/output error"):
        slots.write_from(slot, _Filler(_data(3 * MIB)), limit=4 * MIB)


def test_the_iterable_writer_keeps_its_chunks_in_order(tmp_path: Path) -> None:
    data = _data(3 * MIB + 7)
    slot = _slot(tmp_path, 4 * MIB)
    chunks = [data[i:i + 300_001] for i in range(0, len(data), 300_001)]
    assert slots.write(slot, chunks, limit=4 * MIB) == len(data)
    assert slot.read_bytes()[:len(data)] == data
