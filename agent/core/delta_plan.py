"""Plan a delta install: where each chunk comes from, and which byte ranges of the bundle to fetch.

Pure: the index, the base the device holds and what is already in place go in; steps and
coalesced ranges come out. Coalescing trades a few unneeded bytes for fewer requests:
hawkBit users report that many small Range requests exhaust server quotas, so ranges
closer than ``gap`` merge, and then the smallest gaps merge until at most ``budget``
ranges remain (docs/delta.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.delta_index import Base, Copy, DeltaIndex, Patch

FETCH, COPY, PATCH, HAVE = "fetch", "copy", "patch", "have"


@dataclass(frozen=True)
class Step:
    chunk: int
    kind: str  # FETCH, COPY, PATCH or HAVE (already in the target slot, verified)
    op: Copy | Patch | None = None


@dataclass(frozen=True)
class Span:
    """Bytes of the bundle one step needs, as absolute offsets [start, end)."""

    chunk: int
    start: int
    end: int


def steps(index: DeltaIndex, base: Base | None, *, have: frozenset[int] = frozenset(),
          fetch: frozenset[int] = frozenset(), start: int = 0) -> list[Step]:
    """One step per chunk from ``start`` on. ``fetch`` forces fetching (a local source failed its
    hash), ``have`` marks chunks verified in the target slot already."""
    ops: dict[int, Copy | Patch] = {}
    for op in base.ops if base is not None else ():
        for k in range(op.chunk, op.last + 1 if isinstance(op, Patch) else op.chunk + 1):
            ops[k] = op  # a run patch serves each of its chunks
    out = []
    for i in range(start, len(index.chunks)):
        if i in have:
            out.append(Step(i, HAVE))
        elif i in fetch or i not in ops:
            out.append(Step(i, FETCH))
        else:
            op = ops[i]
            out.append(Step(i, COPY if isinstance(op, Copy) else PATCH, op))
    return out


def spans(index: DeltaIndex, plan: list[Step], origin: int) -> list[Span]:
    """The remote bytes the steps need, in chunk order; ``origin`` is the absolute offset of
    the data origin (the first chunk frame) in the bundle. A run patch is one span, named by
    the first of its chunks the plan asks for (``steps_of`` lists the others)."""
    frames = index.frame_offsets()
    out = []
    seen: set[int] = set()
    for s in plan:
        if s.kind == FETCH:
            out.append(Span(s.chunk, origin + frames[s.chunk], origin + frames[s.chunk + 1]))
        elif s.kind == PATCH:
            assert isinstance(s.op, Patch)
            if s.op.offset not in seen:
                seen.add(s.op.offset)
                out.append(Span(s.chunk, origin + s.op.offset, origin + s.op.offset + s.op.length))
    return out


def steps_of(plan: list[Step]) -> dict[int, list[Step]]:
    """The steps each span serves, by the span's chunk: one, or a run patch's planned chunks."""
    out: dict[int, list[Step]] = {}
    first: dict[int, int] = {}  # run patch offset -> the chunk its span is named by
    for s in plan:
        if s.kind == PATCH and isinstance(s.op, Patch) and s.op.count > 1:
            out.setdefault(first.setdefault(s.op.offset, s.chunk), []).append(s)
        elif s.kind in (FETCH, PATCH):
            out[s.chunk] = [s]
    return out


def coalesce(wanted: list[tuple[int, int]], *, gap: int, budget: int) -> list[tuple[int, int]]:
    """Merge [start, end) ranges (any order, may touch) into at most ``budget`` ranges, first
    those closer than ``gap``, then always the pair with the smallest gap."""
    if budget < 1:
        raise ValueError("budget must be at least 1")
    merged: list[list[int]] = []
    for a, b in sorted(wanted):
        if merged and a - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    if len(merged) > budget:
        order = sorted(range(len(merged) - 1), key=lambda i: (merged[i + 1][0] - merged[i][1], i))
        join = set(order[:len(merged) - budget])
        out = [merged[0]]
        for i in range(1, len(merged)):
            if i - 1 in join:
                out[-1][1] = merged[i][1]
            else:
                out.append(merged[i])
        merged = out
    return [(a, b) for a, b in merged]


def batches(ranges: list[tuple[int, int]], *, max_bytes: int, max_parts: int
            ) -> list[list[tuple[int, int]]]:
    """Group sorted ranges into requests of at most ``max_parts`` ranges and about
    ``max_bytes`` (a single range larger than that is a request of its own)."""
    out: list[list[tuple[int, int]]] = []
    size = 0
    for r in ranges:
        n = r[1] - r[0]
        if out and len(out[-1]) < max_parts and size + n <= max_bytes:
            out[-1].append(r)
            size += n
        else:
            out.append([r])
            size = n
    return out


def fetched_bytes(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)
