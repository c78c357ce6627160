"""Make a payload delta-capable (host side): content-defined chunks, zstd per chunk, patches against bases.

The stored payload is ``[index frame][one zstd frame per chunk][patch frames]``
(docs/delta.md): a full install decompresses it as ordinary zstd (the index and the
patches are skippable frames), and a device holding one of the base releases fetches
only the frames and patches it lacks, by HTTP Range. Everything is computed once,
when the release is built; devices and servers do no per-pair work.

Chunking is FastCDC 2020 (Xia et al., USENIX ATC '16 and its 2020 normalised form, as
``pyfastcdc`` implements it; casync's chunker follows the same idea). A chunk absent
from a base gets a patch when zstd, with base bytes that resemble it as its dictionary
(the idea behind ``zstd --patch-from``), makes it clearly smaller than its plain frame.
Resemblance is found with small sub-chunks: the base offsets where a chunk's sub-chunks
also occur vote for an alignment, and the region at the chunk's own offset is a
candidate too (file-system metadata that changed in place). Consecutive chunks a base
lacks may instead share one *run patch*: one frame, so they keep each other's context.
Long because (about 480 lines) building, the bases given as bundles and ``delta-info`` (which
replays the device's plan on local files) share the format's details in one place.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from agent.adapters import bundle as bundle_mod
from agent.core import delta_index as dx
from agent.core import manifest as manifest_mod
from agent.core import tarstream
from agent.errors import BundleError, UsageError

AVG_CHUNK = 128 * 1024  # min avg/4, max 4·avg (FastCDC's usual spread); 64 KiB: docs/delta.md
SUB_CHUNK = 2048  # sub-chunks that locate a chunk's likeness in a base
# Measured on squashfs v1 -> v3 (docs/delta.md, "What each change gave"): 64 KiB of slack, four
# alignments and the 99.5 % run threshold each took 37-57 KB off, together 103 KB; 128 KiB of
# slack no more. A 98 % patch threshold took 30 KB off alone, but 4 KB less with the others
# (the chunks it patches no longer join runs), so it stays at 85 %.
SLACK = 64 * 1024  # base bytes either side of an aligned region
ALIGNMENTS = 4  # best-voted base alignments a chunk's patch draws on, besides its own offset
LEVEL = 19
PATCH_GAIN = 0.85  # a patch (+ its ~48 index bytes) must be at most this fraction of the frame
RUN_BYTES = 2 << 20  # image bytes one run patch rebuilds at most (device: dx.MAX_RUN)
RUN_DICT = 4 << 20  # base bytes one run patch refers to at most (device: dx.MAX_DICT)
RUN_GAIN = 0.995  # a run patch must be at most this fraction of its chunks' own downloads
META_KEY = "delta_index_bytes"
META_SHA = "delta_index_sha256"  # of the whole index frame: the signed manifest pins the index


@dataclass(frozen=True)
class BaseImage:
    version: str
    path: Path


@dataclass
class Built:
    stored: Path
    size: int
    sha256: str
    index_bytes: int  # the whole index frame
    chunks: int
    frames_bytes: int
    patch_bytes: dict[str, int] = field(default_factory=dict)
    copies: dict[str, int] = field(default_factory=dict)
    patches: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)  # run patches (several chunks each)
    index_sha256: str = ""


def _cut(data: bytes, avg: int) -> list[tuple[int, int]]:
    from pyfastcdc import FastCDC  # host extra: chunking runs on the build host only

    return [(c.offset, c.length) for c in FastCDC(avg).cut_buf(data)]


class _BaseMap:
    def __init__(self, base: BaseImage, avg: int) -> None:
        self.version = base.version
        try:
            self.data = base.path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read base image {base.path}: {exc.strerror}") from None
        self.sha256 = hashlib.sha256(self.data).digest()
        self.chunks: dict[bytes, int] = {}
        for off, n in _cut(self.data, avg):
            self.chunks.setdefault(hashlib.sha256(self.data[off:off + n]).digest(), off)
        self.subs: dict[bytes, int] = {}
        for off, n in _cut(self.data, SUB_CHUNK):
            self.subs.setdefault(_key(self.data, off, n), off)


def _key(data: bytes, off: int, n: int) -> bytes:
    return hashlib.blake2b(memoryview(data)[off:off + n], digest_size=12).digest()


def _extents(base: _BaseMap, subs: list[tuple[int, int, bytes]], off: int, n: int
             ) -> list[tuple[int, int]]:
    votes: Counter[int] = Counter()
    for soff, slen, key in subs:
        hit = base.subs.get(key)
        if hit is not None:
            votes[hit - soff] += slen
    size = len(base.data)
    cands = [d for d, _ in votes.most_common(ALIGNMENTS)]
    if 0 not in cands:
        cands.append(0)
    kept: list[tuple[int, int]] = []
    for d in cands:  # best-voted first: a region that would make too many extents is left out
        a, b = max(0, off + d - SLACK), min(size, off + d + n + SLACK)
        if a < b and len(merged := _merge([*kept, (a, b - a)])) <= dx.MAX_EXTENTS:
            kept = merged
    return kept


def _patch(data: bytes, base: _BaseMap, extents: list[tuple[int, int]], level: int, *,
           check: bool = False) -> bytes:
    """zstd of ``data`` with the base extents as a raw-content dictionary (no extents: plain).
    ``check``: decode it as the device will, b"" if that does not give ``data`` back."""
    from agent.device.delta import _unzstd

    dictionary = b"".join(base.data[a:a + n] for a, n in extents)
    d = (zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
         if dictionary else None)
    blob = zstandard.ZstdCompressor(level=level, dict_data=d, write_content_size=True,
                                    write_checksum=False).compress(data)
    if check and _unzstd(blob, len(data), dictionary or None) != data:
        return b""
    return blob


def _runs(cuts: list[tuple[int, int]], single: dict[int, tuple[dx.Op | None, bytes, int]]
          ) -> list[range]:
    """Runs of two or more consecutive chunks a device holding the base cannot copy, each
    rebuilding at most ``RUN_BYTES``: candidates for one frame instead of one per chunk."""
    out: list[range] = []
    cur: list[int] = []
    size = 0
    for i, (_, n) in enumerate(cuts):
        local = i in single and isinstance(single[i][0], dx.Copy)
        if local or (cur and size + n > RUN_BYTES):
            if len(cur) > 1:
                out.append(range(cur[0], cur[-1] + 1))
            cur, size = [], 0
        if not local and n <= RUN_BYTES:
            cur.append(i)
            size += n
    if len(cur) > 1:
        out.append(range(cur[0], cur[-1] + 1))
    return out


def _run_extents(per_chunk: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The base regions of a run's chunks, merged, in base order; chunks are taken in order
    until ``RUN_DICT`` bytes or ``dx.MAX_RUN_EXTENTS`` regions would be exceeded."""
    kept: list[tuple[int, int]] = []
    for ext in per_chunk:
        merged = _merge(kept + ext)
        if len(merged) > dx.MAX_RUN_EXTENTS or sum(n for _, n in merged) > RUN_DICT:
            break
        kept = merged
    return kept


def _merge(ext: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, n in sorted(ext):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], a + n)
        else:
            out.append([a, a + n])
    return [(a, b - a) for a, b in out]


def build(image: Path, bases: Sequence[BaseImage], out: Path, *, avg: int = AVG_CHUNK,
          level: int = LEVEL, threads: int = 2, runs: bool = True) -> Built:
    """Write the delta-capable stored payload of ``image`` to ``out``. ``runs=False``: no run
    patches, so the index stays version 1 (``EDX1``) for agents that read only that."""
    if len({b.version for b in bases}) != len(bases):
        raise UsageError("two --base images name the same version")
    if len(bases) > dx.MAX_BASES:
        raise UsageError(f"at most {dx.MAX_BASES} bases")
    try:
        data = image.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read image {image}: {exc.strerror}") from None
    cuts = _cut(data, avg)
    if len(cuts) > dx.MAX_CHUNKS:
        raise UsageError(f"{len(cuts)} chunks is more than {dx.MAX_CHUNKS}; raise the chunk size")
    view = memoryview(data)
    shas = [hashlib.sha256(view[o:o + n]).digest() for o, n in cuts]
    cctx_level = level

    def compress(i: int) -> bytes:
        o, n = cuts[i]
        return zstandard.ZstdCompressor(level=cctx_level, write_content_size=True,
                                        write_checksum=False).compress(view[o:o + n])

    first: dict[bytes, int] = {}
    for i, s in enumerate(shas):
        first.setdefault(s, i)
    unique = sorted(set(first.values()))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        made = dict(zip(unique, pool.map(compress, unique), strict=True))
    frames = [made[first[s]] for s in shas]
    chunks = tuple(dx.Chunk(n, len(f), s, hashlib.sha256(f).digest())
                   for (_, n), s, f in zip(cuts, shas, frames, strict=True))
    frames_end = sum(len(f) for f in frames)

    sub_cuts = _cut(data, SUB_CHUNK)
    subs_of: list[list[tuple[int, int, bytes]]] = [[] for _ in cuts]
    ci = 0
    for soff, slen in sub_cuts:
        while cuts[ci][0] + cuts[ci][1] <= soff:
            ci += 1
        o, n = cuts[ci]
        if soff + slen <= o + n:
            subs_of[ci].append((soff, slen, _key(data, soff, slen)))

    built = Built(out, len(data), hashlib.sha256(data).hexdigest(), 0, len(chunks), frames_end)
    patch_area = bytearray()
    base_recs = []
    for b in bases:
        bm = _BaseMap(b, avg)
        ops: list[dx.Op] = []
        npatch = ncopy = 0
        start = len(patch_area)
        jobs = []
        for i, (o, n) in enumerate(cuts):
            hit = bm.chunks.get(shas[i])
            if hit is not None:
                ops.append(dx.Copy(i, hit))
                ncopy += 1
            else:
                ext = _extents(bm, subs_of[i], o, n)
                if ext:
                    jobs.append((i, ext))
                    ops.append(dx.Copy(i, -1))  # placeholder, replaced below

        def run(job: tuple[int, list[tuple[int, int]]], bm: _BaseMap = bm) -> bytes:
            i, ext = job
            o, n = cuts[i]
            return _patch(bytes(view[o:o + n]), bm, ext, level)

        with ThreadPoolExecutor(max(1, threads)) as pool:
            results = dict(zip((j[0] for j in jobs), zip(pool.map(run, jobs), (j[1] for j in jobs),
                                                         strict=True), strict=True))
        # per chunk: its op and what a device holding this base downloads for it
        single: dict[int, tuple[dx.Op | None, bytes, int]] = {}
        for op in ops:
            if isinstance(op, dx.Copy) and op.offset >= 0:
                single[op.chunk] = (op, b"", 0)
                continue
            p, ext = results[op.chunk]
            if len(p) + 48 <= PATCH_GAIN * chunks[op.chunk].frame_length:
                single[op.chunk] = (dx.Patch(op.chunk, 0, len(p), hashlib.sha256(p).digest(),
                                             tuple(ext)), p, len(p) + 48)
        runs_of = _runs(cuts, single) if runs else []
        exts = {i: e for i, (_, e) in results.items()}

        def run_patch(r: range, bm: _BaseMap = bm, exts: dict[int, list[tuple[int, int]]] = exts
                      ) -> tuple[bytes, list[tuple[int, int]]]:
            ext = _run_extents([exts.get(i, []) for i in r])
            o, n = cuts[r[0]][0], sum(cuts[i][1] for i in r)
            return _patch(bytes(view[o:o + n]), bm, ext, level, check=True), ext

        with ThreadPoolExecutor(max(1, threads)) as pool:
            run_made = dict(zip((r.start for r in runs_of), pool.map(run_patch, runs_of), strict=True))
        final: list[dx.Op] = []
        i = 0
        nrun = 0
        by_start = {r.start: r for r in runs_of}
        while i < len(cuts):
            r = by_start.get(i)
            if r is not None:
                blob, ext = run_made[i]
                cost = sum(single[k][2] if k in single else chunks[k].frame_length for k in r)
                if blob and len(blob) + 48 <= RUN_GAIN * cost:
                    final.append(dx.Patch(i, frames_end + dx.FRAME_HEADER + len(patch_area),
                                          len(blob), hashlib.sha256(blob).digest(), tuple(ext),
                                          len(r)))
                    patch_area += blob
                    nrun += 1
                    i = r.stop
                    continue
            if i in single:
                op1, p, _ = single[i]
                if isinstance(op1, dx.Patch):
                    op1 = dx.Patch(i, frames_end + dx.FRAME_HEADER + len(patch_area), op1.length,
                                   op1.sha256, op1.extents)
                    patch_area += p
                    npatch += 1
                assert op1 is not None
                final.append(op1)
            i += 1
        built.runs[b.version] = nrun
        base_recs.append(dx.Base(b.version, len(bm.data), bm.sha256, tuple(final)))
        built.copies[b.version], built.patches[b.version] = ncopy, npatch
        built.patch_bytes[b.version] = len(patch_area) - start
    index = dx.DeltaIndex(chunks, tuple(base_recs))
    body = dx.encode(index)
    content = body[:4] + zstandard.ZstdCompressor(level=19).compress(body)  # magic, then the body
    idx_frame = dx.frame(dx.SKIPPABLE_INDEX, content)
    # Patches sit in one skippable frame after the chunk frames, so a full install's decoder
    # passes over them; their offsets (from the data origin) already count its 8-byte header.
    tail = dx.frame(dx.SKIPPABLE_PATCHES, bytes(patch_area)) if patch_area else b""
    with open(out, "wb") as f:
        f.write(idx_frame)
        for fr in frames:
            f.write(fr)
        f.write(tail)
    built.index_bytes = len(idx_frame)
    built.index_sha256 = hashlib.sha256(idx_frame).hexdigest()
    if _decompress_all(out, len(data)) != built.sha256:
        raise BundleError("internal error: the delta payload does not decompress to the image")
    return built


def _decompress_all(stored: Path, size: int) -> str:
    h = hashlib.sha256()
    total = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=bundle_mod.ZSTD_MAX_WINDOW)
    with open(stored, "rb") as f, dctx.stream_reader(f) as reader:
        while chunk := reader.read(1 << 20):
            total += len(chunk)
            h.update(chunk)
    if total != size:
        raise BundleError("internal error: the delta payload decompresses to the wrong size")
    return h.hexdigest()


# --- bases given as bundles ------------------------------------------------------------------
def base_from_arg(spec: str, workdir: Path) -> BaseImage:
    """``VERSION=IMAGE`` or a bundle file (its first payload, decompressed into ``workdir``)."""
    version, sep, path = spec.partition("=")
    if sep and version and path and not Path(spec).exists():
        if not manifest_mod._VERSION_RE.fullmatch(version):
            raise UsageError(f"--base {spec!r}: {version!r} is not a version")
        return BaseImage(version, Path(path))
    return _base_from_bundle(Path(spec), workdir)


def _base_from_bundle(path: Path, workdir: Path) -> BaseImage:
    """Unpack a previous release's rootfs payload; its block hashes are checked as it is read
    (the build host trusts its own old bundles' signatures; ``bundle verify`` checks them)."""
    if not path.is_file():
        raise UsageError(f"cannot read base {path}: not a file")
    with open(path, "rb") as f:
        reader = bundle_mod.BundleReader(f)
        head = reader.read_head()
        m = manifest_mod.from_bytes(head.manifest_bytes)
        fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".base-")
        with os.fdopen(fd, "wb") as out:
            for pr in reader.payloads(m):
                for chunk in pr.installed_chunks():
                    out.write(chunk)
                break
    return BaseImage(m.version, Path(tmp))


def is_bundle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            block = f.read(tarstream.BLOCK)
        return tarstream.parse_header(block) is not None
    except (OSError, BundleError):
        return False


def meta_for(built: Built) -> dict[str, Any]:
    return {META_KEY: built.index_bytes, META_SHA: built.index_sha256}


# --- what a device holding an image would download ------------------------------------------
@dataclass
class DeltaInfo:
    bundle_bytes: int
    download_bytes: int
    requests_multi: int  # with a server that answers multi-range requests
    requests_single: int  # with one that answers one range per request
    base: str | None
    chunks: int
    copied: int
    patched: int
    fetched: int
    download_bytes_single: int = 0  # from a server that answers one range per request

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


PART_OVERHEAD = 100  # bytes of multipart framing per range (boundary, Content-Type, Content-Range)


def delta_info(bundle: Path, image: Path) -> DeltaInfo:
    """Simulate the device side (agent.device.delta) on local files: same plan, same coalescing.
    The manifest is not verified here (``bundle verify`` does that)."""
    from agent.core import delta_plan
    from agent.device import delta as device_delta

    size = bundle.stat().st_size
    with open(bundle, "rb") as f:
        reader = bundle_mod.BundleReader(f)
        head = reader.read_head()
        m = manifest_mod.from_bytes(head.manifest_bytes)
        p = m.payloads[0]
        ilen = device_delta._index_len(p)
        blocks_off = reader.offset
        data_off = device_delta.DeltaWriter._payload_start(blocks_off, p)
        head_bytes = min(size, device_delta.HEAD_FIRST)
        if not ilen:
            return DeltaInfo(size, size, 1, 1, None, 0, 0, 0, 0)
        f.seek(data_off)
        stored = f.read(ilen)
        body = zstandard.ZstdDecompressor().decompress(stored[dx.FRAME_HEADER + 4:],
                                                       max_output_size=dx.MAX_INDEX_BYTES)
        index = dx.decode(body, size=p.size, data_size=p.stored_size - ilen)
        origin = data_off + ilen
        if device_delta._index_sha(p):  # the index alone, after the payload's tar header
            meta_bytes = head_bytes + max(0, data_off + ilen - max(head_bytes, data_off - 512))
        else:  # the block list and the whole blocks holding the index
            covered = min(p.stored_size, -(-ilen // p.block_size) * p.block_size)
            meta_bytes = max(head_bytes, data_off + covered)
        img = image.read_bytes()
        sha = hashlib.sha256(img).digest()
        base = next((b for b in index.bases if b.sha256 == sha), None)
        if base is None:
            return DeltaInfo(size, meta_bytes + p.stored_size, 3, 3, None, len(index.chunks), 0, 0,
                             len(index.chunks))
        offsets = index.offsets()
        steps = delta_plan.steps(index, base)
        forced = set()
        for s in steps:
            c = index.chunks[s.chunk]
            if s.kind == delta_plan.COPY:
                assert isinstance(s.op, dx.Copy)
                if hashlib.sha256(img[s.op.offset:s.op.offset + c.length]).digest() != c.sha256:
                    forced.add(s.chunk)
        for group in delta_plan.steps_of(steps).values():
            op = group[0].op
            if not isinstance(op, dx.Patch):
                continue
            f.seek(origin + op.offset)
            blob = f.read(op.length)
            dictionary = b"".join(img[a:a + n] for a, n in op.extents)
            out = device_delta._unzstd(blob, offsets[op.last + 1] - offsets[op.chunk], dictionary)
            for t in group:
                k, c = t.chunk, index.chunks[t.chunk]
                rel = offsets[k] - offsets[op.chunk]
                if out is None or hashlib.sha256(out[rel:rel + c.length]).digest() != c.sha256:
                    forced.add(k)
        del offsets
        first = [s for s in steps if s.kind != delta_plan.HAVE]
        total = total_single = meta_bytes
        req_multi = req_single = 2  # the head window and the block list + index
        for round_steps in (first, [s for s in delta_plan.steps(index, None) if s.chunk in forced]):
            wanted = [(s.start, s.end) for s in delta_plan.spans(index, round_steps, origin)]
            if not wanted:
                continue
            multi = device_delta.ranges_for(wanted, multi=True)
            single = device_delta.ranges_for(wanted, multi=False)
            if len(multi) > device_delta.BUDGET and req_single == 2:  # the device's probe
                probe = multi[:device_delta.PROBE]
                single = probe + device_delta.ranges_for(
                    [r for r in wanted if r[0] >= probe[-1][1]], multi=False)
            total += delta_plan.fetched_bytes(multi) + PART_OVERHEAD * len(multi)
            total_single += delta_plan.fetched_bytes(single)
            req_multi += len(delta_plan.batches(multi, max_bytes=device_delta.BATCH_BYTES,
                                                max_parts=device_delta.MAX_PARTS))
            req_single += len(single)
        kinds = [s.kind for s in steps]
        return DeltaInfo(size, total, req_multi, req_single, base.version, len(index.chunks),
                         kinds.count(delta_plan.COPY) - len([s for s in steps if s.chunk in forced
                                                             and s.kind == delta_plan.COPY]),
                         kinds.count(delta_plan.PATCH), kinds.count(delta_plan.FETCH) + len(forced),
                         total_single)
