"""The delta index codec and the range planner: round trips, bounds, and parse-or-refuse on any input."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import operator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import delta_index as dx
from agent.core import delta_plan


def _sha(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


@st.composite
def indexes(draw: st.DrawFn) -> tuple[dx.DeltaIndex, int, int]:
    lengths = draw(st.lists(st.integers(1, 1 << 16), min_size=1, max_size=20))
    flens = [draw(st.integers(1, n + 64)) for n in lengths]
    chunks = tuple(dx.Chunk(n, f, _sha(i), _sha(-i))
                   for i, (n, f) in enumerate(zip(lengths, flens, strict=True)))
    frames = sum(flens)
    patch_pos = frames + dx.FRAME_HEADER
    bases = []
    for k in range(draw(st.integers(0, 3))):
        bsize = draw(st.integers(1 << 16, 1 << 20))
        ops: list[dx.Op] = []
        free = -1  # the first chunk not yet covered by an op is free + 1
        for i in sorted(draw(st.sets(st.integers(0, len(chunks) - 1)))):
            if chunks[i].length > bsize or i <= free:
                continue
            count = draw(st.integers(1, 3))
            if count > 1 and i + count <= len(chunks):  # a run patch (format 2)
                plen = draw(st.integers(1, 500))
                ext = tuple((draw(st.integers(0, bsize - 1)), 1)
                            for _ in range(draw(st.integers(0, 6))))
                ops.append(dx.Patch(i, patch_pos, plen, _sha(2000 + i), ext, count))
                patch_pos += plen
                free = i + count - 1
            elif draw(st.booleans()):
                ops.append(dx.Copy(i, draw(st.integers(0, bsize - chunks[i].length))))
            else:
                plen = draw(st.integers(1, 500))
                ext = tuple((draw(st.integers(0, bsize - 1)), 1)
                            for _ in range(draw(st.integers(1, dx.MAX_EXTENTS))))
                ops.append(dx.Patch(i, patch_pos, plen, _sha(1000 + i), ext))
                patch_pos += plen
        bases.append(dx.Base(f"1.{k}", bsize, _sha(k), tuple(ops)))
    return dx.DeltaIndex(chunks, tuple(bases)), sum(lengths), patch_pos


@given(indexes())
@settings(max_examples=150, deadline=None)
def test_an_index_survives_encoding_and_decoding(case: tuple[dx.DeltaIndex, int, int]) -> None:
    index, size, data_size = case
    assert dx.decode(dx.encode(index), size=size, data_size=data_size) == index


@given(indexes(), st.data())
@settings(max_examples=150, deadline=None)
def test_a_damaged_index_parses_or_raises_only_its_own_error(case: tuple[dx.DeltaIndex, int, int],
                                                              data: st.DataObject) -> None:
    index, size, data_size = case
    body = bytearray(dx.encode(index))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    with contextlib.suppress(dx.DeltaIndexError):
        dx.decode(bytes(body[:cut]), size=size, data_size=data_size)


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_random_bytes_parse_or_raise_only_the_index_error(blob: bytes) -> None:
    with contextlib.suppress(dx.DeltaIndexError):
        dx.decode(dx.MAGIC + blob, size=1000, data_size=1 << 20)


@given(indexes())
@settings(max_examples=100, deadline=None)
def test_an_index_is_format_2_exactly_when_it_has_a_run_patch(case: tuple[dx.DeltaIndex, int, int]
                                                              ) -> None:
    index = case[0]
    runs = any(isinstance(op, dx.Patch) and op.count > 1 for b in index.bases for op in b.ops)
    assert dx.encode(index)[:4] == (dx.MAGIC2 if runs else dx.MAGIC)


def test_a_run_patch_in_a_format_1_index_is_refused() -> None:
    chunks = (dx.Chunk(10, 5, _sha(0), _sha(1)), dx.Chunk(10, 5, _sha(2), _sha(3)))
    base = dx.Base("1.0", 100, _sha(4), (dx.Patch(0, 20, 5, _sha(5), ((0, 10),), 2),))
    body = dx.encode(dx.DeltaIndex(chunks, (base,)))
    assert dx.decode(body, size=20, data_size=100).bases[0].ops[0].last == 1  # type: ignore[union-attr]
    with pytest.raises(dx.DeltaIndexError, match="op kind 3"):
        dx.decode(dx.MAGIC + body[4:], size=20, data_size=100)


def test_a_run_patch_past_the_last_chunk_is_refused() -> None:
    chunks = (dx.Chunk(10, 5, _sha(0), _sha(1)), dx.Chunk(10, 5, _sha(2), _sha(3)))
    base = dx.Base("1.0", 100, _sha(4), (dx.Patch(1, 20, 5, _sha(5), (), 2),))
    with pytest.raises(dx.DeltaIndexError, match="does not fit 2 chunks"):
        dx.decode(dx.encode(dx.DeltaIndex(chunks, (base,))), size=20, data_size=100)


def test_a_run_plan_fetches_its_patch_once_for_all_its_chunks() -> None:
    chunks = tuple(dx.Chunk(10, 5, _sha(i), _sha(-i)) for i in range(4))
    run = dx.Patch(1, 20, 7, _sha(9), ((0, 10),), 3)
    index = dx.DeltaIndex(chunks, (dx.Base("1.0", 100, _sha(8), (run,)),))
    plan = delta_plan.steps(index, index.bases[0], have=frozenset({2}))
    spans = delta_plan.spans(index, plan, 1000)
    assert [(s.start, s.end) for s in spans] == [(1000, 1005), (1020, 1027)]
    assert [t.chunk for t in delta_plan.steps_of(plan)[1]] == [1, 3]


def test_chunks_that_do_not_tile_the_payload_are_refused() -> None:
    index = dx.DeltaIndex((dx.Chunk(10, 5, _sha(0), _sha(1)),), ())
    with pytest.raises(dx.DeltaIndexError, match="cover 10 bytes"):
        dx.decode(dx.encode(index), size=11, data_size=100)


def test_a_patch_inside_the_chunk_frames_is_refused() -> None:
    chunks = (dx.Chunk(10, 50, _sha(0), _sha(1)),)
    base = dx.Base("1.0", 100, _sha(2), (dx.Patch(0, 20, 5, _sha(3), ((0, 10),)),))
    with pytest.raises(dx.DeltaIndexError, match="outside the patch area"):
        dx.decode(dx.encode(dx.DeltaIndex(chunks, (base,))), size=10, data_size=100)


def test_a_copy_past_the_end_of_its_base_is_refused() -> None:
    chunks = (dx.Chunk(10, 5, _sha(0), _sha(1)),)
    base = dx.Base("1.0", 15, _sha(2), (dx.Copy(0, 6),))
    with pytest.raises(dx.DeltaIndexError, match="runs past base"):
        dx.decode(dx.encode(dx.DeltaIndex(chunks, (base,))), size=10, data_size=100)


def test_an_index_frame_header_names_its_length() -> None:
    frame = dx.frame(dx.SKIPPABLE_INDEX, dx.MAGIC + b"body")
    assert dx.index_frame_length(frame[:12]) == len(frame)


def test_a_payload_without_an_index_frame_is_told_apart() -> None:
    with pytest.raises(dx.DeltaIndexError, match="does not start"):
        dx.index_frame_length(b"\x28\xb5\x2f\xfd" + bytes(8))  # a plain zstd frame


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 300)), max_size=60),
       st.integers(0, 200), st.integers(1, 20))
@settings(max_examples=200, deadline=None)
def test_coalesced_ranges_cover_every_span_within_the_budget(spans: list[tuple[int, int]], gap: int,
                                                             budget: int) -> None:
    wanted = [(a, a + n) for a, n in spans]
    out = delta_plan.coalesce(wanted, gap=gap, budget=budget)
    assert len(out) <= budget
    assert all(a < b for a, b in out) and all(out[i][1] < out[i + 1][0] for i in range(len(out) - 1))
    for a, b in wanted:
        assert any(x <= a and b <= y for x, y in out)


def test_batches_respect_the_part_count() -> None:
    ranges = [(i * 10, i * 10 + 5) for i in range(10)]
    out = delta_plan.batches(ranges, max_bytes=1 << 20, max_parts=3)
    assert [len(b) for b in out] == [3, 3, 3, 1] and functools.reduce(operator.iadd, out, []) == ranges
