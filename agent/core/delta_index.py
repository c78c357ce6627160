"""The delta index of a payload: its content-defined chunks, and per base release how to rebuild them.

A delta-capable payload is stored as zstd frames, one per chunk, so a full install
decompresses it like any zstd payload; the index and the patches ride in zstd
*skippable* frames (RFC 8878 §3.1.2), which every decoder ignores. The index frame
comes first in the stored bytes, so the signed block list (``NAME.blocks``) covers it.
Encoding, bounds and semantics: docs/delta.md. Pure: bytes in, records out; every size
and count read from input is bounded, and only ``DeltaIndexError`` is raised.
"""

from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass

from agent.errors import BundleError

MAGIC = b"EDX1"  # version 1: one chunk per patch
MAGIC2 = b"EDX2"  # version 2: also run patches (one frame for several consecutive chunks)
MAGICS = (MAGIC, MAGIC2)
SKIPPABLE_INDEX = 0x184D2A5E  # zstd skippable frame carrying the index
SKIPPABLE_PATCHES = 0x184D2A5F  # zstd skippable frame carrying patches
FRAME_HEADER = 8  # magic (u32 LE) + content length (u32 LE)
MAX_FRAME_CONTENT = (1 << 32) - 1
MAX_INDEX_BYTES = 64 << 20  # the decompressed index body
MAX_CHUNKS = 1 << 20
MAX_CHUNK = 16 << 20
MAX_BASES = 8
MAX_OPS = MAX_CHUNKS
MAX_EXTENTS = 4
MAX_RUN_EXTENTS = 64  # extents of a run patch
MAX_RUN = 4 << 20  # bytes of image content one run patch rebuilds
MAX_DICT = 8 << 20  # bytes of base data one patch may refer to
MAX_IMAGE = 1 << 44
COPY, PATCH, RUN = 1, 2, 3
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")


class DeltaIndexError(BundleError):
    """The delta index is malformed or out of bounds."""

    hint = "the bundle's delta index is damaged; a full install still works"


@dataclass(frozen=True)
class Chunk:
    length: int  # bytes of image content
    frame_length: int  # bytes of its zstd frame in the stored payload
    sha256: bytes  # of the content
    frame_sha256: bytes  # of the frame


@dataclass(frozen=True)
class Copy:
    chunk: int
    offset: int  # in the base image: the chunk equals base[offset:offset+length]


@dataclass(frozen=True)
class Patch:
    chunk: int
    offset: int  # of the patch bytes, relative to the data origin (the end of the index frame)
    length: int
    sha256: bytes  # of the patch bytes
    extents: tuple[tuple[int, int], ...]  # (offset, length) in the base: the dictionary, in order
    count: int = 1  # consecutive chunks it rebuilds, from ``chunk`` on (> 1: a run patch, EDX2)

    @property
    def last(self) -> int:
        return self.chunk + self.count - 1


Op = Copy | Patch


@dataclass(frozen=True)
class Base:
    version: str
    size: int  # bytes of the base image
    sha256: bytes  # of the base image
    ops: tuple[Op, ...]  # by increasing chunk; chunks without an op are fetched


@dataclass(frozen=True)
class DeltaIndex:
    chunks: tuple[Chunk, ...]
    bases: tuple[Base, ...]

    def offsets(self) -> list[int]:
        """Image offset of every chunk, plus the image size at the end."""
        out, pos = [0], 0
        for c in self.chunks:
            pos += c.length
            out.append(pos)
        return out

    def frame_offsets(self) -> list[int]:
        """Offset of every chunk's frame relative to the data origin, plus the frames' end."""
        out, pos = [0], 0
        for c in self.chunks:
            pos += c.frame_length
            out.append(pos)
        return out

    def base(self, version: str) -> Base | None:
        for b in self.bases:
            if b.version == version:
                return b
        return None


# --- frames ------------------------------------------------------------------------------------
def frame(magic: int, content: bytes) -> bytes:
    if len(content) > MAX_FRAME_CONTENT:
        raise ValueError("skippable frame content over 4 GiB")
    return struct.pack("<II", magic, len(content)) + content


def index_frame_length(head: bytes) -> int:
    """Total bytes of the index frame that starts a stored payload, from its first 12 bytes."""
    if len(head) < FRAME_HEADER + len(MAGIC):
        raise DeltaIndexError("stored payload is too short to start with a delta index")
    magic, n = (int(x) for x in struct.unpack_from("<II", head))
    if magic != SKIPPABLE_INDEX or head[FRAME_HEADER:FRAME_HEADER + 4] not in MAGICS:
        raise DeltaIndexError("stored payload does not start with a delta index frame")
    if n > MAX_INDEX_BYTES:
        raise DeltaIndexError(f"delta index frame of {n} bytes is over {MAX_INDEX_BYTES}")
    return FRAME_HEADER + n


# --- encoding ----------------------------------------------------------------------------------
def _varint(n: int, out: bytearray) -> None:
    if n < 0:
        raise ValueError("negative varint")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def encode(index: DeltaIndex) -> bytes:
    """The index body (what follows the magic in the frame, before compression): version 1
    (``EDX1``) unless a run patch needs version 2 (``EDX2``), so older readers keep reading
    what they can."""
    runs = any(isinstance(op, Patch) and op.count > 1 for b in index.bases for op in b.ops)
    out = bytearray(MAGIC2 if runs else MAGIC)
    _varint(len(index.chunks), out)
    _varint(len(index.bases), out)
    for c in index.chunks:
        _varint(c.length, out)
        _varint(c.frame_length, out)
        out += c.sha256
        out += c.frame_sha256
    for b in index.bases:
        v = b.version.encode("ascii")
        out.append(len(v))
        out += v
        _varint(b.size, out)
        out += b.sha256
        _varint(len(b.ops), out)
        prev = -1
        for op in b.ops:
            _varint(op.chunk - prev - 1, out)
            if isinstance(op, Copy):
                prev = op.chunk
                out.append(COPY)
                _varint(op.offset, out)
            else:
                prev = op.last
                if op.count > 1:
                    out.append(RUN)
                    _varint(op.count, out)
                else:
                    out.append(PATCH)
                _varint(op.offset, out)
                _varint(op.length, out)
                out += op.sha256
                out.append(len(op.extents))
                for off, n in op.extents:
                    _varint(off, out)
                    _varint(n, out)
    return bytes(out)


# --- decoding ----------------------------------------------------------------------------------
class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise DeltaIndexError(f"delta index ends inside {what}")
        b = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return b

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str, hi: int) -> int:
        n, shift = 0, 0
        while True:
            if self.pos >= len(self.data):
                raise DeltaIndexError(f"delta index ends inside {what}")
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise DeltaIndexError(f"delta index has an overlong number for {what}")
        if n > hi:
            raise DeltaIndexError(f"delta index {what} is {n}, more than {hi}")
        return n


def decode(body: bytes, *, size: int, data_size: int) -> DeltaIndex:
    """Parse an index body for a payload of ``size`` installed bytes whose stored bytes after
    the index frame are ``data_size`` long. Checks that the chunks tile the image, the frames
    and patches lie in the stored data without overlapping, and every base range fits its base."""
    if len(body) > MAX_INDEX_BYTES:
        raise DeltaIndexError(f"delta index is {len(body)} bytes, more than {MAX_INDEX_BYTES}")
    cur = _Cursor(body)
    magic = cur.take(4, "the magic")
    if magic not in MAGICS:
        raise DeltaIndexError("delta index has the wrong magic (a newer format?)")
    n_chunks = cur.varint("chunk count", MAX_CHUNKS)
    n_bases = cur.varint("base count", MAX_BASES)
    chunks = []
    total = frames = 0
    for i in range(n_chunks):
        length = cur.varint(f"chunk {i} length", MAX_CHUNK)
        flen = cur.varint(f"chunk {i} frame length", MAX_CHUNK + MAX_CHUNK // 64 + 4096)
        if length == 0 or flen == 0:
            raise DeltaIndexError(f"delta index chunk {i} is empty")
        total += length
        frames += flen
        chunks.append(Chunk(length, flen, cur.take(32, "a chunk hash"), cur.take(32, "a frame hash")))
    if total != size:
        raise DeltaIndexError(f"delta index chunks cover {total} bytes, the payload has {size}")
    if frames > data_size:
        raise DeltaIndexError("delta index frames run past the stored payload")
    bases = []
    patches: list[tuple[int, int]] = []
    for k in range(n_bases):
        vlen = cur.byte("a base version")
        version = cur.take(vlen, "a base version").decode("ascii", "replace")
        if not _VERSION_RE.fullmatch(version):
            raise DeltaIndexError(f"delta index base {k} has a malformed version")
        bsize = cur.varint(f"base {k} size", MAX_IMAGE)
        bsha = cur.take(32, "a base hash")
        n_ops = cur.varint(f"base {k} op count", n_chunks)
        ops: list[Op] = []
        prev = -1
        for _ in range(n_ops):
            chunk = prev + 1 + cur.varint("an op's chunk gap", n_chunks)
            if chunk >= n_chunks:
                raise DeltaIndexError(f"delta index base {k} names chunk {chunk} of {n_chunks}")
            prev = chunk
            length = chunks[chunk].length
            kind = cur.byte("an op kind")
            count, max_ext = 1, MAX_EXTENTS
            if kind == RUN and magic == MAGIC2:
                count = cur.varint("a run's chunk count", n_chunks)
                if count < 2 or chunk + count > n_chunks:
                    raise DeltaIndexError(f"delta index run at chunk {chunk} of {count} chunks "
                                          f"does not fit {n_chunks} chunks")
                prev = chunk + count - 1
                length = sum(c.length for c in chunks[chunk:chunk + count])
                if length > MAX_RUN:
                    raise DeltaIndexError(f"delta index run at chunk {chunk} rebuilds {length} "
                                          f"bytes, more than {MAX_RUN}")
                kind, max_ext = PATCH, MAX_RUN_EXTENTS
            if kind == COPY:
                off = cur.varint("a copy offset", MAX_IMAGE)
                if off + length > bsize:
                    raise DeltaIndexError(f"delta index copy for chunk {chunk} runs past base {k}")
                ops.append(Copy(chunk, off))
            elif kind == PATCH:
                poff = cur.varint("a patch offset", data_size)
                plen = cur.varint("a patch length", max(length, MAX_CHUNK) + MAX_CHUNK // 64 + 4096)
                if plen == 0 or poff < frames or poff + plen > data_size:
                    raise DeltaIndexError(f"delta index patch for chunk {chunk} lies outside "
                                          "the patch area")
                psha = cur.take(32, "a patch hash")
                n_ext = cur.byte("an extent count")
                if not (count > 1 or n_ext >= 1) or n_ext > max_ext:
                    raise DeltaIndexError(f"delta index patch for chunk {chunk} has {n_ext} extents")
                extents = []
                dict_bytes = 0
                for _ in range(n_ext):
                    eoff = cur.varint("an extent offset", MAX_IMAGE)
                    elen = cur.varint("an extent length", MAX_DICT)
                    if elen == 0 or eoff + elen > bsize:
                        raise DeltaIndexError(f"delta index patch for chunk {chunk} refers past "
                                              f"base {k}")
                    dict_bytes += elen
                    extents.append((eoff, elen))
                if dict_bytes > MAX_DICT:
                    raise DeltaIndexError(f"delta index patch for chunk {chunk} refers to "
                                          f"{dict_bytes} base bytes, more than {MAX_DICT}")
                patches.append((poff, plen))
                ops.append(Patch(chunk, poff, plen, psha, tuple(extents), count))
            else:
                raise DeltaIndexError(f"delta index op kind {kind} is unknown")
        bases.append(Base(version, bsize, bsha, tuple(ops)))
    if cur.pos != len(body):
        raise DeltaIndexError("delta index has bytes after its end")
    if len({b.version for b in bases}) != len(bases):
        raise DeltaIndexError("delta index names a base version twice")
    patches.sort()
    for (a, n), (b, _) in itertools.pairwise(patches):
        if a + n > b:
            raise DeltaIndexError("delta index patches overlap")
    return DeltaIndex(tuple(chunks), tuple(bases))
