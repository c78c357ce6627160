"""Install a bundle by delta: fetch by HTTP Range only what the active slot cannot provide.

The signed head is read and verified by ``Updater.install`` as for any install; this module
is the payload writer it is handed. Per payload: fetch the block list and the delta index
(docs/delta.md), check them against the signed manifest, plan each chunk (``core.delta_plan``:
already in the target slot from an interrupted attempt, copied from the active slot, rebuilt
from a patch against it, or fetched), fetch the needed ranges coalesced and batched
(``adapters.range_fetch``), and write every chunk straight into the inactive slot once its
SHA-256 matched the signed index. A local source that fails its hash (an active slot changed
outside edgeops) is fetched instead; a fetched byte that fails is a ``HashMismatch``: the
bundle is bad. Progress (the chunks written and fsynced) is kept in the journal, so a dropped
link or a reboot resumes without fetching them again. Whenever the delta cannot be used (no
index, no matching base, a server without Range support) the payload is installed whole.
Long because (about 530 lines) the whole device procedure reads top to bottom in one place:
fetch and verify the index, plan, write, resume, and the fleet agent's entry point.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

import zstandard

from agent.adapters import slots
from agent.adapters.bundle import ZSTD_MAX_WINDOW, PayloadReader
from agent.adapters.download import ArtifactMismatch, DownloadFailed, ResumableStream
from agent.adapters.range_fetch import MAX_PARTS, HeadStream, Part, RangeFetcher, RangeUnsupported
from agent.core import delta_index as dx
from agent.core import delta_plan, logs, tarstream
from agent.core.manifest import Manifest, Payload
from agent.errors import BundleError, HashMismatch, SlotError

if TYPE_CHECKING:
    from agent.adapters.bundle import BundleReader
    from agent.adapters.ddi_http import DdiClient
    from agent.core.ddi import Artifact
    from agent.device.updater import InstallResult, Progress, Updater

log = logs.get(__name__)
META_KEY = "delta_index_bytes"
META_SHA = "delta_index_sha256"
PROGRESS_KEY = "delta.progress"
LAST_KEY = "delta.last"  # the last download's figures (fleet.py writes a whole one's, mode "full")
GAP = 4096  # ranges closer than this merge: an HTTP part costs ~100 bytes of framing
BUDGET = 48  # ranges per payload when the server answers one range per request
MULTI_BUDGET = 2048  # ranges per payload while the server answers multi-range requests
PROBE = 2  # ranges of the first request while the server's multi-range support is unknown
BATCH_BYTES = 4 << 20  # bytes per multi-range request
CHECKPOINT = 64 << 20  # bytes written between fsync + journal progress
HEAD_FIRST = 8 * 1024  # the signed head of the bench's bundles is 4 KiB; more comes if needed
AHEAD_BYTES = 2 << 20  # fetched bytes the reading thread may hold before they are decoded
Buf = bytes | memoryview  # a chunk's bytes; a run patch's chunks are views of its one output


@dataclass
class DeltaStats:
    bundle_size: int
    received: int = 0
    requests: int = 0
    mode: str = "delta"  # or "full" when the delta could not be used
    chunks: int = 0
    copied: int = 0
    patched: int = 0
    fetched: int = 0
    repaired: int = 0  # local sources that failed their hash and were fetched
    resumed: int = 0  # chunks found already written by an interrupted attempt
    resumes: int = 0  # dropped links survived
    notes: list[str] = field(default_factory=list)

    @property
    def saved(self) -> int:
        return max(0, self.bundle_size - self.received)

    def line(self) -> str:
        pct = 100.0 * self.received / self.bundle_size if self.bundle_size else 0.0
        return (f"{self.mode}: fetched {self.received} of {self.bundle_size} bytes ({pct:.1f} %, "
                f"saved {self.saved}) in {self.requests} requests; chunks {self.chunks}: "
                f"{self.copied} copied, {self.patched} patched, {self.fetched} fetched, "
                f"{self.repaired} repaired, {self.resumed} resumed")


def install(updater: Updater, fetcher: RangeFetcher, *, progress: Progress | None = None,
            replace_trial: bool = True) -> tuple[InstallResult, DeltaStats]:
    """Install the bundle at ``fetcher``'s URL by delta where possible.

    ``RangeUnsupported`` comes before anything was verified or recorded, carrying the server's
    open 200 answer: the caller then downloads the bundle whole the usual way, from it."""
    head = HeadStream(fetcher, HEAD_FIRST)
    head.first()  # a server without Range support shows here, its answer kept for the caller
    writer = DeltaWriter(updater, fetcher, head, progress)
    try:
        result = updater.install(cast(BinaryIO, head), total=fetcher.size, progress=progress,
                                 replace_trial=replace_trial, writer=writer)
    finally:
        head.close()
        writer.stats.received, writer.stats.requests = fetcher.received, fetcher.requests
    st = writer.stats
    updater.journal.put(LAST_KEY, {"received": st.received, "saved": st.saved,
                                   "requests": st.requests, "mode": st.mode})
    return result, st


def for_fleet(updater: Updater, client: DdiClient, artifact: Artifact, stream: ResumableStream,
              progress: Progress, cancelled: Callable[[], bool], note: list[str], *,
              sleep: Callable[[float], None] = time.sleep
              ) -> tuple[InstallResult | None, ResumableStream]:
    """The fleet agent's delta attempt: the result, or None and the stream for the full
    download (a technician's armed trial goes first: ``replace_trial=False``). A server
    without Range support answered the probe with 200: that answer becomes the full
    download, so it sees one request, as before. Bytes saved go to ``note`` (the DDI
    feedback details); ``install`` keeps them in the journal (``delta.last``) for the metrics."""
    fetcher = RangeFetcher(client.session, client.origin, artifact.url, size=artifact.size,
                           policy=client.cfg.download, cancelled=cancelled)
    try:
        result, stats = install(updater, fetcher, progress=progress, replace_trial=False)
    except RangeUnsupported as exc:
        if exc.response is None:
            return None, stream
        stream.close()
        return None, ResumableStream(client.session, client.origin, artifact.url,
                                     size=artifact.size, sha256=artifact.sha256,
                                     policy=client.cfg.download, response=exc.response,
                                     cancelled=cancelled)
    note.append(stats.line())
    updater.journal.put("fleet.delta.last", {"received": stats.received, "saved": stats.saved,
                                             "requests": stats.requests, "mode": stats.mode})
    return result, stream


def note_whole(updater: Updater, stream: ResumableStream) -> None:
    """A whole download's figures in ``delta.last``, so it never shows the update before."""
    updater.journal.put(LAST_KEY, {"received": stream.pos, "saved": 0,
                                   "requests": 1 + stream.resumes, "mode": "full"})


class DeltaWriter:
    """The payload writer ``Updater.install`` calls once the head is verified and the
    install recorded: returns the bytes installed."""

    def __init__(self, updater: Updater, fetcher: RangeFetcher, head: HeadStream,
                 progress: Progress | None = None, *, sleep: Callable[[float], None] = time.sleep
                 ) -> None:
        self.up, self.fetcher, self.head, self.progress = updater, fetcher, head, progress
        self.sleep = sleep
        self.stats = DeltaStats(fetcher.size)
        self._done_bytes = 0
        self._recorded = False  # the journal holds a delta.progress record (ours or an earlier one)

    def __call__(self, reader: BundleReader, m: Manifest, dest: dict[str, Path]) -> int:
        if not all(_index_len(p) for p in m.payloads):
            self.stats.mode = "full"
            self.stats.notes.append("a payload has no delta index")
            self.head.sequential()
            written = 0
            for pr in reader.payloads(m):
                path = dest[pr.payload.name]
                written += slots.write(path, self._counted(pr.installed_chunks()),
                                       limit=slots.capacity(path))
            return written
        pos = reader.offset  # just after the first payload's block-list header
        written = 0
        for i, p in enumerate(m.payloads):
            blocks_off = pos if i == 0 else pos + tarstream.BLOCK
            data_off = self._payload_start(blocks_off, p)
            written += self._payload(p, dest[p.name], blocks_off, data_off)
            pos = data_off + p.stored_size + tarstream.padding(p.stored_size)
        return written

    # --- layout --------------------------------------------------------------------------
    @staticmethod
    def _payload_start(blocks_off: int, p: Payload) -> int:
        return blocks_off + p.blocks_size + tarstream.padding(p.blocks_size) + tarstream.BLOCK

    def _head_of(self, p: Payload, blocks_off: int, data_off: int
                 ) -> tuple[bytes | None, dx.DeltaIndex | None, int]:
        """Fetch and verify the index frame; return the block list (if it was fetched), the
        index and the index frame's length. With ``delta_index_sha256`` in the signed meta the
        index alone is fetched and checked against it; without (bundles before it), the block
        list and the whole blocks holding the index, checked against the block list."""
        bs = p.block_size
        ilen = _index_len(p)
        if ilen > p.stored_size:
            raise dx.DeltaIndexError(f"payload '{p.name}' declares an index larger than itself")
        pinned = _index_sha(p)
        digests: bytes | None = None
        if pinned:
            raw = self._read(data_off - tarstream.BLOCK, data_off + ilen)
            hdr, stored = raw[:tarstream.BLOCK], raw[tarstream.BLOCK:]
            if hashlib.sha256(stored).hexdigest() != pinned:
                raise HashMismatch(f"delta index of payload '{p.name}' does not match the "
                                   "manifest; stopped before using it")
        else:
            covered = min(p.stored_size, -(-ilen // bs) * bs)
            raw = self._read(blocks_off, data_off + covered)
            digests = raw[:p.blocks_size]
            if hashlib.sha256(digests).hexdigest() != p.blocks_sha256:
                raise HashMismatch(f"block list of payload '{p.name}' does not match the manifest")
            hdr = raw[data_off - blocks_off - tarstream.BLOCK:data_off - blocks_off]
            stored = raw[data_off - blocks_off:]
            for k in range(0, covered, bs):
                if hashlib.sha256(stored[k:k + bs]).digest() != digests[32 * (k // bs):32 * (k // bs) + 32]:
                    raise HashMismatch(f"payload '{p.name}' block {k // bs} does not match its "
                                       "signed hash; stopped before using it")
        member = tarstream.parse_header(hdr)
        if member is None or member.name != p.name or member.size != p.stored_size:
            raise BundleError(f"bundle member for payload '{p.name}' is not where the manifest puts it")
        try:  # signed, yet unusable (a writer's bug): the whole payload still installs
            if dx.index_frame_length(stored[:12]) != ilen:
                raise dx.DeltaIndexError(f"payload '{p.name}' index length disagrees with its meta")
            try:
                body = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompress(
                    stored[dx.FRAME_HEADER + 4:ilen], max_output_size=dx.MAX_INDEX_BYTES)
            except zstandard.ZstdError as exc:
                raise dx.DeltaIndexError(f"payload '{p.name}' index is not zstd: {exc}") from None
            return digests, dx.decode(body, size=p.size, data_size=p.stored_size - ilen), ilen
        except dx.DeltaIndexError as exc:
            self.stats.notes.append(exc.one_line())
            return digests, None, ilen

    def _read(self, start: int, end: int) -> bytes:
        """Bytes [start, end), taking what the head window already holds."""
        have = self.head.window(start, end)
        if len(have) == end - start:
            return have
        return have + self.fetcher.read_range(start + len(have), end)

    # --- one payload -----------------------------------------------------------------------
    def _payload(self, p: Payload, target: Path, blocks_off: int, data_off: int) -> int:
        digests, index, ilen = self._head_of(p, blocks_off, data_off)
        base_path, base = self._base(p, index) if index is not None else (Path("/"), None)
        if base is None or index is None:
            self.stats.mode = "full"
            self.stats.notes.append(f"payload '{p.name}': no base this device holds")
            return self._whole(p, target, digests, blocks_off, data_off)
        return self._apply(p, target, base_path, base, index, data_off + ilen)

    def _base(self, p: Payload, index: dx.DeltaIndex) -> tuple[Path, dx.Base | None]:
        cfg = self.up.cfg
        booted = self.up.dev.runtime.booted_slot()
        path = Path(cfg.slots[booted][p.slot_class]) if p.slot_class in cfg.slots.get(booted, {}) \
            else Path("/nonexistent")
        info = self.up.journal.slots().get(booted)
        version = info.version if info is not None else None
        return path, (index.base(str(version)) if version else None)

    def _whole(self, p: Payload, target: Path, digests: bytes | None, blocks_off: int,
               data_off: int) -> int:
        if digests is None:  # the index was pinned by the manifest: the block list comes now
            digests = self._read(blocks_off, blocks_off + p.blocks_size)
            if hashlib.sha256(digests).hexdigest() != p.blocks_sha256:
                raise HashMismatch(f"block list of payload '{p.name}' does not match the manifest")
        stream = self.fetcher.stream_from(data_off)
        try:
            pr = PayloadReader(tarstream.TarReader(cast(BinaryIO, stream)), p, digests)
            return slots.write(target, self._counted(pr.installed_chunks()),
                               limit=slots.capacity(target))
        finally:
            self.fetcher.received += stream.pos - data_off
            stream.close()

    def _counted(self, chunks: Iterator[memoryview]) -> Iterator[memoryview]:
        for c in chunks:
            self._tick(len(c))
            yield c

    def _tick(self, n: int) -> None:
        self._done_bytes += n
        if self.progress is not None:
            self.progress(self._done_bytes, self.fetcher.size)

    def _apply(self, p: Payload, target: Path, base_path: Path, base: dx.Base,
               index: dx.DeltaIndex, origin: int) -> int:
        st = self.stats
        st.chunks += len(index.chunks)
        offsets = index.offsets()
        slots.check_fits(target, p.size, p.name)
        try:
            tfd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SlotError(f"slot {target} cannot be opened: {exc.strerror}") from None
        try:
            bfd = os.open(base_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            bfd = -1  # no readable active slot: every local source fails its hash and is fetched
        writer = _SlotWriter(tfd)
        try:
            done = self._resumed(p, target, tfd, index, offsets)
            forced: set[int] = set()
            resumes = 0
            since_sync = 0
            while True:
                plan = delta_plan.steps(index, base, have=frozenset(done), fetch=frozenset(forced))
                todo = [s for s in plan if s.kind != delta_plan.HAVE]
                if not todo:
                    break
                sources = self._sources(index, todo, origin, bfd)
                try:
                    for s, data in sources:
                        if data is None:
                            forced.add(s.chunk)  # a local source failed: fetch it next round
                            st.repaired += 1
                            continue
                        writer.put(data, offsets[s.chunk])
                        done.add(s.chunk)
                        st.copied += s.kind == delta_plan.COPY
                        st.patched += s.kind == delta_plan.PATCH
                        st.fetched += s.kind == delta_plan.FETCH
                        self._tick(len(data))
                        since_sync += len(data)
                        if since_sync >= CHECKPOINT:
                            writer.flush()
                            self._checkpoint(p, target, tfd, done)
                            since_sync = 0
                except (RangeUnsupported, ArtifactMismatch):
                    raise
                except DownloadFailed as exc:
                    resumes += 1
                    st.resumes = resumes
                    if resumes > self.fetcher.policy.max_resumes:
                        raise
                    log.info("delta fetch interrupted (%s); resuming", exc.one_line())
                    writer.flush()
                    self._checkpoint(p, target, tfd, done)
                    self.sleep(min(5.0, self.fetcher.policy.backoff * 2 ** (resumes - 1)))
                finally:
                    sources.close()  # its reading thread ends before anything else happens
            writer.flush()
            os.fsync(tfd)
        except OSError as exc:
            raise SlotError(f"writing slot {target} failed: {exc.strerror}") from None
        finally:
            writer.close()
            os.close(tfd)
            if bfd >= 0:
                os.close(bfd)
        if self._recorded:  # no record, no commit: each one is an fsync (synchronous=FULL)
            self.up.journal.put(PROGRESS_KEY, None)
            self._recorded = False
        return p.size

    def _sources(self, index: dx.DeltaIndex, todo: list[delta_plan.Step], origin: int, bfd: int
                 ) -> Generator[tuple[delta_plan.Step, Buf | None], None, None]:
        """Each step's verified bytes (None: a local source failed its hash): local copies
        first, then the remote spans in bundle order (patches sit after the frames), so the
        answer is read front to back; pwrite does not care about the order. The remote bytes
        are read from the socket by a thread (``_Ahead``) while this one verifies the copies
        and decodes what came before: recv, SHA-256, zstd and pwrite all release the GIL, so on
        two cores the download no longer waits for the decoding, nor the decoding for it."""
        remote = sorted(delta_plan.spans(index, todo, origin), key=lambda sp: sp.start)
        served = delta_plan.steps_of(todo)
        ahead = _Ahead(self._parts([(s.start, s.end) for s in remote]), remote, AHEAD_BYTES)
        try:
            yield from self._copies(index, todo, bfd)
            offsets = index.offsets()
            while (item := ahead.get()) is not None:
                span, blob = item
                yield from self._decoded(index, offsets, served[span.chunk], blob, bfd)
                del item, blob
        finally:
            ahead.stop()

    def _copies(self, index: dx.DeltaIndex, todo: list[delta_plan.Step], bfd: int
                ) -> Iterator[tuple[delta_plan.Step, Buf | None]]:
        last: tuple[bytes, bytes] | None = None  # (sha256, bytes) of the last verified copy
        for s in todo:
            if s.kind != delta_plan.COPY:
                continue
            c = index.chunks[s.chunk]
            assert isinstance(s.op, dx.Copy)
            data = _pread(bfd, c.length, s.op.offset)
            # the same chunk again (runs of zeros): equal to bytes that hashed to this very
            # sha256, so it does too; comparing is ten times cheaper than hashing
            if last is not None and last[0] == c.sha256 and last[1] == data:
                yield s, data
                continue
            ok = hashlib.sha256(data).digest() == c.sha256
            if ok:
                last = (c.sha256, data)
            yield s, data if ok else None

    @staticmethod
    def _decoded(index: dx.DeltaIndex, offsets: list[int], group: list[delta_plan.Step],
                 blob: bytes, bfd: int) -> Iterator[tuple[delta_plan.Step, Buf | None]]:
        """The chunks one fetched span rebuilds: its hash is checked before it is decoded, and
        each chunk's bytes against the chunk's own hash before they are handed on."""
        s = group[0]
        c = index.chunks[s.chunk]
        if s.kind == delta_plan.PATCH:
            op = s.op
            assert isinstance(op, dx.Patch)
            if hashlib.sha256(blob).digest() != op.sha256:
                raise HashMismatch(f"patch for chunk {op.chunk} does not match the signed "
                                   "index; stopped before using it")
            size = offsets[op.last + 1] - offsets[op.chunk]
            out = _unzstd(blob, size, _dictionary(bfd, op.extents))
            view = memoryview(out) if out is not None else None
            for t in group:  # a run patch: every chunk of it the plan wants, each verified
                k = t.chunk
                rel = offsets[k] - offsets[op.chunk]
                piece = None if view is None else view[rel:rel + index.chunks[k].length]
                ok = piece is not None and hashlib.sha256(piece).digest() == index.chunks[k].sha256
                yield t, piece if ok else None
            return
        if hashlib.sha256(blob).digest() != c.frame_sha256:
            raise HashMismatch(f"chunk {s.chunk} (image bytes {offsets[s.chunk]}..) "
                               "does not match the signed index; stopped before using it")
        plain = _unzstd(blob, c.length, None)
        if plain is None or hashlib.sha256(plain).digest() != c.sha256:
            raise HashMismatch(f"chunk {s.chunk} decompresses to other bytes than its "
                               "signed hash")
        yield s, plain

    def _parts(self, wanted: list[tuple[int, int]]) -> Iterator[Part]:
        """The wanted ranges' parts, in order. Coalescing to ``BUDGET`` ranges costs bytes
        between them (ext4 v1 -> v3: a fifth more), which only a single-range server needs:
        while the server's support is unknown the first request asks for ``PROBE`` ranges,
        and the rest are coalesced for what it answered (``ranges_for``)."""
        rest = wanted
        if self.fetcher.multi is None:
            ranges = ranges_for(rest, multi=True)
            if len(ranges) <= BUDGET:  # as few ranges as a single-range server allows
                rest = []
                for batch in delta_plan.batches(ranges, max_bytes=BATCH_BYTES, max_parts=MAX_PARTS):
                    yield from self.fetcher.fetch(batch)
            else:
                yield from self.fetcher.fetch(ranges[:PROBE])
                end = ranges[PROBE - 1][1]
                rest = [r for r in rest if r[0] >= end]
        ranges = ranges_for(rest, multi=self.fetcher.multi is not False)
        for batch in delta_plan.batches(ranges, max_bytes=BATCH_BYTES, max_parts=MAX_PARTS):
            yield from self.fetcher.fetch(batch)

    # --- resuming ----------------------------------------------------------------------------
    def _checkpoint(self, p: Payload, target: Path, tfd: int, done: set[int]) -> None:
        os.fsync(tfd)  # the journal may only name chunks that are on the medium
        runs: list[list[int]] = []
        for i in sorted(done):
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        self.up.journal.put(PROGRESS_KEY, {"sha256": p.sha256, "slot": str(target), "done": runs})
        self._recorded = True

    def _resumed(self, p: Payload, target: Path, tfd: int, index: dx.DeltaIndex,
                 offsets: list[int]) -> set[int]:
        """Chunks an interrupted attempt at this same payload wrote, re-verified in the slot."""
        rec = self.up.journal.get(PROGRESS_KEY)
        self._recorded = self._recorded or rec is not None
        if not (isinstance(rec, dict) and rec.get("sha256") == p.sha256
                and rec.get("slot") == str(target) and isinstance(rec.get("done"), list)):
            return set()
        claimed: set[int] = set()
        for run in rec["done"][:len(index.chunks)]:
            if (isinstance(run, list) and len(run) == 2 and all(type(x) is int for x in run)
                    and 0 <= run[0] < run[1] <= len(index.chunks)):
                claimed.update(range(run[0], run[1]))
        have = set()
        for i in sorted(claimed):  # claimed by the journal, believed only once re-hashed
            c = index.chunks[i]
            if hashlib.sha256(_pread(tfd, c.length, offsets[i])).digest() == c.sha256:
                have.add(i)
        self.stats.resumed += len(have)
        self._tick(sum(index.chunks[i].length for i in have))
        return have


def ranges_for(wanted: list[tuple[int, int]], *, multi: bool) -> list[tuple[int, int]]:
    """The requests' ranges for the wanted spans: few for a single-range server (each range is
    a request), nearly exact for a multi-range one (each range is ~100 bytes of framing)."""
    return delta_plan.coalesce(wanted, gap=GAP, budget=MULTI_BUDGET if multi else BUDGET)


def _index_sha(p: Payload) -> str:
    """The index frame's SHA-256 from the signed meta (hex), or "" (bundles before it)."""
    v = p.meta.get(META_SHA) if isinstance(p.meta, dict) else None
    return v if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) \
        else ""


def _index_len(p: Payload) -> int:
    v = p.meta.get(META_KEY) if isinstance(p.meta, dict) else None
    return v if type(v) is int and 0 < v <= dx.MAX_INDEX_BYTES + dx.FRAME_HEADER else 0


def _pread(fd: int, n: int, off: int) -> bytes:
    if fd < 0:
        return b""
    try:
        return os.pread(fd, n, off)
    except OSError:
        return b""


def _dictionary(fd: int, extents: tuple[tuple[int, int], ...]) -> bytes:
    """A patch's raw-content dictionary: its base extents, concatenated in order."""
    return b"".join(_pread(fd, n, off) for off, n in extents)


class _Ahead:
    """The remote spans' bytes, read from their parts in a thread and held, at most ``limit``
    bytes (or one span) ahead, until the verifying thread takes them in order. Nothing read
    here is used before that thread checked its hash. A failure of the download (a dropped
    link, a cancel) is handed over in its place, after the spans read before it; ``stop``
    ends the thread early (the consumer failed), waiting at most for the read under way."""

    def __init__(self, parts: Iterator[Part], spans: list[delta_plan.Span], limit: int) -> None:
        self.parts, self.spans, self.limit = parts, spans, limit
        self.cv = threading.Condition()
        self.items: deque[tuple[delta_plan.Span, bytes] | BaseException | None] = deque()
        self.held = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="delta-fetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            part: Part | None = None
            for span in self.spans:
                while part is None or span.start >= part.end:
                    part = next(self.parts)
                part.skip_to(span.start)
                blob = part.read(span.end - span.start)
                if not self._put((span, blob), len(blob)):
                    return
            self._put(None, 0)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc, 0)
        finally:
            close = getattr(self.parts, "close", None)
            if close is not None:
                close()  # the generator's open answer, from the thread that iterated it

    def _put(self, item: tuple[delta_plan.Span, bytes] | BaseException | None, n: int) -> bool:
        with self.cv:
            while self.items and self.held + n > self.limit and not self.stopped:
                self.cv.wait()
            if self.stopped:
                return False
            self.items.append(item)
            self.held += n
            self.cv.notify_all()
            return True

    def get(self) -> tuple[delta_plan.Span, bytes] | None:
        """The next span and its bytes, None after the last; raises what stopped the reading."""
        with self.cv:
            while not self.items:
                self.cv.wait()
            item = self.items.popleft()
            if isinstance(item, tuple):
                self.held -= len(item[1])
            self.cv.notify_all()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.items.clear()
            self.cv.notify_all()
        self.thread.join()


class _SlotWriter:
    """pwrite in a thread while the caller reads and hashes the next chunk (both release the
    GIL, as in adapters.slots.write); ``flush`` waits for every queued write, raising its error."""

    def __init__(self, fd: int, depth: int = 8) -> None:
        self.fd = fd
        self.q: queue.Queue[tuple[Buf, int] | None] = queue.Queue(maxsize=depth)
        self.failed: list[OSError] = []
        self.thread = threading.Thread(target=self._run, name="delta-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            try:
                if not self.failed:
                    view, off = memoryview(item[0]), item[1]
                    while view:
                        n = os.pwrite(self.fd, view, off)
                        view, off = view[n:], off + n
            except OSError as exc:
                self.failed.append(exc)
            finally:
                self.q.task_done()
        self.q.task_done()

    def put(self, data: Buf, off: int) -> None:
        if self.failed:
            raise self.failed[0]
        self.q.put((data, off))

    def flush(self) -> None:
        self.q.join()
        if self.failed:
            raise self.failed[0]

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


def _unzstd(blob: bytes, size: int, dictionary: bytes | None) -> bytes | None:
    try:
        d = (zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
             if dictionary else None)
        dctx = zstandard.ZstdDecompressor(dict_data=d, max_window_size=ZSTD_MAX_WINDOW)
        out = dctx.decompress(blob, max_output_size=size)
    except zstandard.ZstdError:
        return None
    return out if len(out) == size else None


__all__ = ["BUDGET", "GAP", "HEAD_FIRST", "MAX_PARTS", "MULTI_BUDGET", "PROBE", "DeltaStats",
           "DeltaWriter", "install"]
