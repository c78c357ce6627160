"""The delta install's reading thread: spans in order, bounded, failures handed over in place."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import cast

import pytest

from agent.adapters.download import DownloadFailed
from agent.adapters.range_fetch import Part
from agent.core.delta_plan import Span
from agent.device.delta import _Ahead


class _FakePart:
    """A range of a fixed byte string, read in order like ``range_fetch.Part``."""

    def __init__(self, data: bytes, start: int, end: int, reads: list[int]) -> None:
        self.data, self.start, self.end, self.pos, self.reads = data, start, end, start, reads

    def read(self, n: int) -> bytes:
        self.reads.append(n)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def skip_to(self, pos: int) -> None:
        self.pos = max(self.pos, pos)


def _parts(data: bytes, ranges: list[tuple[int, int]], reads: list[int],
           fail_after: int | None = None) -> Iterator[Part]:
    for k, (a, b) in enumerate(ranges):
        if fail_after is not None and k == fail_after:
            raise DownloadFailed("range download broke off")
        yield cast(Part, _FakePart(data, a, b, reads))


DATA = bytes(range(256)) * 64


def test_spans_come_out_in_order_with_their_bytes() -> None:
    spans = [Span(0, 0, 10), Span(1, 20, 30), Span(2, 30, 50), Span(3, 4000, 4100)]
    ahead = _Ahead(_parts(DATA, [(0, 50), (4000, 4100)], []), spans, limit=1 << 20)
    got = []
    while (item := ahead.get()) is not None:
        got.append((item[0].chunk, item[1]))
    ahead.stop()
    assert got == [(s.chunk, DATA[s.start:s.end]) for s in spans]


def test_a_failed_request_is_raised_after_the_spans_read_before_it() -> None:
    spans = [Span(0, 0, 10), Span(1, 100, 110)]
    ahead = _Ahead(_parts(DATA, [(0, 10), (100, 110)], [], fail_after=1), spans, limit=1 << 20)
    first = ahead.get()
    assert first is not None and first[1] == DATA[0:10]
    with pytest.raises(DownloadFailed):
        ahead.get()
    ahead.stop()


def test_the_reader_holds_at_most_one_span_beyond_the_limit() -> None:
    spans = [Span(k, 100 * k, 100 * k + 100) for k in range(20)]
    reads: list[int] = []
    ahead = _Ahead(_parts(DATA, [(0, 2000)], reads), spans, limit=250)
    # until the consumer takes one, the reader stops after what the limit allows (2 spans of
    # 100 bytes, and the third waits to be put): it never reads the whole answer ahead
    tick = threading.Event()
    for _ in range(1000):  # a sync point (the third read), not a timed assertion
        if len(reads) >= 3:
            break
        tick.wait(0.01)
    assert len(reads) == 3
    assert len(ahead.items) == 2 and ahead.held == 200
    assert len(reads) <= 3
    ahead.stop()


def test_stop_ends_a_reader_waiting_for_room() -> None:
    spans = [Span(k, 100 * k, 100 * k + 100) for k in range(20)]
    ahead = _Ahead(_parts(DATA, [(0, 2000)], []), spans, limit=100)
    assert ahead.get() is not None
    ahead.stop()
    assert not ahead.thread.is_alive()
