"""Read a bundle as a stream: the signed head first, then payload bytes only as their blocks verify.

Layout (docs/bundle-format.md): a ustar archive whose members come in a fixed order

    signer.pem            signer certificate chain (PEM), leaf first
    manifest.sig          64-byte Ed25519 signature over manifest.json
    manifest.json         the manifest (agent.core.manifest)
    crl.pem               optional: a root-signed revocation list
    NAME.blocks           per payload: SHA-256 of every stored block, concatenated
    NAME                  per payload: the stored bytes (raw or zstd)

The reader hands out nothing from a payload until the block holding it has
matched its hash, and the block list itself is checked against the signed
manifest before it is used, so no unverified byte ever reaches a slot or the
decompressor. Writing bundles is host work: agent.host.bundle_writer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from agent.adapters.readahead import ReadAhead
from agent.core import manifest as manifest_mod
from agent.core import tarstream
from agent.core.frozen import Frozen
from agent.core.manifest import Manifest, Payload
from agent.errors import BundleError, HashMismatch, UnsafeMember

CHAIN_NAME, SIG_NAME, MANIFEST_NAME, CRL_NAME = "signer.pem", "manifest.sig", "manifest.json", "crl.pem"
HEAD_LIMITS = {CHAIN_NAME: 16 * 1024, SIG_NAME: 64, MANIFEST_NAME: manifest_mod.MAX_MANIFEST_BYTES,
               CRL_NAME: 256 * 1024}
ZSTD_LEVEL = 3
# The window bundles are written with (agent.host.bundle_writer): level 3 alone picks 2 MiB
# for a large image; 1 MiB costs nothing measurable in size on a rootfs image and takes
# 1 MiB off the decoder's resident memory (ZstdDecompressor.memory_size(): 2.6 -> 1.5 MB).
ZSTD_WINDOW_LOG = 20
ZSTD_MAX_WINDOW = 1 << 23  # bounds the decompressor's memory on the device (other tools' bundles)
READ_SIZE = 1 << 20  # bytes pulled from the stream at once: a whole number of blocks
# A zstd payload's stored blocks are read and verified on their own thread, this many
# buffers of this size ahead of the decompressor (docs/performance.md, "zstd" and section
# 8): four keep both cores busy; 512 KiB each (2 MiB in all) decoded 1 GiB in 0.81-0.96 s
# (best-median) where 256 KiB took 0.93-1.35 s, half the handoffs between the threads.
FEED_BUFFERS = 4
FEED_BUFFER = 1 << 19


class Head(Frozen):
    chain_pem: bytes
    signature: bytes
    manifest_bytes: bytes
    crl: bytes | None
    size: int  # bytes of the bundle read so far


# --- reading --------------------------------------------------------------------------------
class BundleReader:
    """Reads one bundle stream in order: ``read_head()``, then ``payloads(manifest)``.

    ``payloads`` takes the manifest that ``agent.core.trust`` returned: the reader
    never decides trust itself, and refuses to hand out payload bytes before it
    has been given a verified manifest (calling out of order is a RuntimeError).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._tar = tarstream.TarReader(stream)
        self._head: Head | None = None
        self._pending: tarstream.Member | None = None
        self._payloads_started = False

    @property
    def offset(self) -> int:
        return self._tar.offset

    def read_head(self) -> Head:
        if self._head is not None:
            raise RuntimeError("read_head() called twice")
        parts: dict[str, bytes] = {}
        for expected in (CHAIN_NAME, SIG_NAME, MANIFEST_NAME):
            member = self._tar.next_member()
            if member is None:
                raise BundleError(f"bundle ends before '{expected}'")
            parts[expected] = self._read_small(member, expected)
        crl = None
        nxt = self._tar.next_member()
        if nxt is not None and nxt.name == CRL_NAME:
            crl = self._read_small(nxt, CRL_NAME)
            nxt = self._tar.next_member()
        self._pending = nxt
        self._head = Head(parts[CHAIN_NAME], parts[SIG_NAME], parts[MANIFEST_NAME], crl,
                          self._tar.offset)
        return self._head

    def _read_small(self, member: tarstream.Member, expected: str) -> bytes:
        if member.name != expected:
            raise UnsafeMember(f"bundle member '{member.name}' found where '{expected}' belongs")
        limit = HEAD_LIMITS[expected]
        if member.size > limit:
            raise BundleError(f"'{expected}' is {member.size} bytes, more than {limit}")
        data = self._tar.read_exact(member.size)
        self._tar.skip_padding(member.size)
        return data

    def payloads(self, verified: Manifest) -> Iterator[PayloadReader]:
        if self._head is None:
            raise RuntimeError("payloads() called before read_head()")
        if self._payloads_started:
            raise RuntimeError("payloads() called twice")
        self._payloads_started = True
        for p in verified.payloads:
            self._expect(f"{p.name}.blocks", p.blocks_size)
            digests = self._tar.read_exact(p.blocks_size)
            self._tar.skip_padding(p.blocks_size)
            if hashlib.sha256(digests).hexdigest() != p.blocks_sha256:
                raise HashMismatch(f"block list of payload '{p.name}' does not match the manifest")
            self._expect(p.name, p.stored_size)
            reader = PayloadReader(self._tar, p, digests)
            try:
                yield reader
            except BaseException:  # the consumer gave up (GeneratorExit): stop reading ahead
                reader.close()
                raise
            reader.drain()
            self._tar.skip_padding(p.stored_size)
        end = self._tar.next_member()
        if end is not None:
            raise UnsafeMember(f"bundle member '{end.name}' is not in the manifest")

    def _expect(self, name: str, size: int) -> tarstream.Member:
        member = self._pending if self._pending is not None else self._tar.next_member()
        self._pending = None
        if member is None:
            raise BundleError(f"bundle ends before member '{name}'")
        if member.name != name:
            raise UnsafeMember(f"bundle member '{member.name}' found where '{name}' belongs")
        if member.size != size:
            raise BundleError(f"member '{name}' holds {member.size} bytes, the manifest says {size}")
        return member


class PayloadReader:
    """One payload: verified stored blocks in, installed bytes out, sizes and hashes checked.

    The hot path is ``readinto(buf)``: stored bytes are read straight into the caller's
    buffer (a slot writer's ring, agent.adapters.slots) and each block is hashed there, so
    a raw payload costs one copy and one SHA-256 pass per byte. A zstd payload's stored
    blocks are read and verified by a feed thread (``agent.adapters.readahead``) a few small buffers ahead of
    the decompressor, which reads them in place and decompresses straight into the caller's
    buffer: reading + hashing the stored bytes, decompressing, and the slot writer's own
    stages (agent.adapters.slots) overlap, since each releases the GIL.
    """

    def __init__(self, tar: tarstream.TarReader, payload: Payload, digests: bytes) -> None:
        self.payload = payload
        self._tar = tar
        self._digests = digests
        self._left = payload.stored_size
        # one flag per stored block, set once it matched its signed hash: drain() refuses to
        # finish a payload any of whose blocks was read and not verified (verify_apart)
        self._verified = bytearray(-(-payload.stored_size // payload.block_size))
        self._read = 0  # stored bytes read from the stream, verified or not yet
        self.installed = 0
        self._scratch: memoryview | None = None  # verified stored bytes, for drain()
        self._feed: ReadAhead | None = None  # zstd: verified stored bytes, read ahead
        self._z: Any = None
        # zstd: whether the (first) frame carries its content checksum; None until decoding starts
        self.frame_checksum: bool | None = None

    @property
    def stored_read(self) -> int:
        """Stored bytes read and verified so far (what may have been used)."""
        bs, size, flags = self.payload.block_size, self.payload.stored_size, self._verified
        short = flags[-1:] == b"\x01" and size % bs  # the partial last block is verified
        return flags.count(1) * bs - (bs - size % bs if short else 0)

    @property
    def buffer_size(self) -> int:
        """The smallest good buffer for ``readinto``: whole blocks, at least ``READ_SIZE``."""
        return max(READ_SIZE, self.payload.block_size)

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` with the next installed bytes, every one from a verified block, and
        return how many (``buf`` is filled up to a whole number of blocks, or to the end).
        0 means the end; the installed size is checked against the manifest there."""
        p = self.payload
        return self._count(self._stored_into(buf) if p.compression == "none" else self._decompress_into(buf))

    def verify_apart(self) -> tuple[Callable[[memoryview], int], Callable[[memoryview, int], None]] | None:
        """``readinto`` of a raw payload in two halves, for a writer that verifies on threads
        of its own (``slots.write_from``, whose verify lanes hash two buffers at once):
        ``read(buf)`` fills ``buf`` with the next whole stored blocks, **not yet checked**;
        ``verify(view, offset)`` checks the blocks read at that payload offset against the
        signed list and raises ``HashMismatch`` on the first that differs. The caller must
        pass every buffer through ``verify`` before it uses a byte of it; ``drain`` (the end
        of the payload) refuses a payload with a block read and never verified. None for a
        zstd payload: its decoder is handed verified bytes only (``readinto``)."""
        if self.payload.compression != "none":
            return None
        return (lambda buf: self._count(self._read_stored(buf))), self._verify

    def _count(self, n: int) -> int:
        p = self.payload
        self.installed += n
        if self.installed > p.size:
            raise HashMismatch(f"payload '{p.name}' decompresses past its declared {p.size} bytes")
        if not n and self.installed != p.size:
            raise HashMismatch(f"payload '{p.name}' has {self.installed} bytes, the manifest says {p.size}")
        return n

    def whole_hash_check(self, whole_hash: bool | None = None) -> Callable[[memoryview], None] | None:
        """A check for every installed buffer, in order, that hashes the whole payload and
        raises ``HashMismatch`` at its last byte if the SHA-256 differs from the manifest's.

        ``whole_hash=None`` (an install) hashes the whole only where nothing else would catch
        a fault: for raw payloads the signed block list already pins every byte, and so it
        does the stored bytes of a zstd payload, whose decompressed bytes are then a function
        of verified input, checked for decoder faults by the frame's own content checksum
        (XXH64, which edgeops' bundles always carry): a second SHA-256 pass of the image adds
        time (0.65 s per GiB here) and no protection against a forger. A zstd frame without
        that checksum is hashed whole. ``bundle verify`` asks for the whole hash always, to
        catch a bundle whose creator wrote an inconsistent manifest. Returns None when no
        whole hash is wanted.
        """
        p = self.payload
        if whole_hash is None and p.compression == "none":
            return None
        if whole_hash is False:
            return None
        h = hashlib.sha256()
        seen = [0]
        skip: list[bool | None] = [None if whole_hash is None else False]

        def check(view: memoryview) -> None:
            if skip[0] is None:  # the first buffer was decoded: its frame header was read
                skip[0] = self.frame_checksum is True
            if skip[0]:
                return
            h.update(view)  # releases the GIL: runs beside the reader and the writer
            seen[0] += len(view)
            if seen[0] == p.size and h.hexdigest() != p.sha256:
                raise HashMismatch(f"payload '{p.name}' SHA-256 does not match the manifest")

        return check

    def installed_chunks(self, read_size: int = READ_SIZE, *, whole_hash: bool | None = None
                         ) -> Iterator[memoryview]:
        """Yield the bytes to install, each chunk a fresh buffer the consumer may keep; size
        and (see ``whole_hash_check``) SHA-256 of the whole are checked at the end."""
        size = max(self.payload.block_size, read_size // self.payload.block_size * self.payload.block_size)
        check = self.whole_hash_check(whole_hash)
        try:
            while True:
                buf = memoryview(bytearray(size))
                n = self.readinto(buf)
                if not n:
                    return
                if check is not None:
                    check(buf[:n])
                yield buf[:n]
        finally:  # a consumer that stops early (GeneratorExit) stops the read-ahead too
            self.close()

    def _stored_into(self, buf: memoryview) -> int:
        """Read the next whole blocks of stored bytes into ``buf`` and verify each in place."""
        offset = self._read
        n = self._read_stored(buf)
        if n:
            self._verify(buf[:n], offset)
        return n

    def _read_stored(self, buf: memoryview) -> int:
        """Read the next whole blocks of stored bytes into ``buf``, unchecked (``_verify``)."""
        bs = self.payload.block_size
        n = min(len(buf) // bs * bs, self._left)
        if not n:
            if self._left:
                raise ValueError(f"a {len(buf)}-byte buffer cannot hold a {bs}-byte block")
            return 0
        self._tar.readinto_exact(buf[:n])
        self._left -= n
        self._read += n
        return n

    def _verify(self, view: memoryview, offset: int) -> None:
        """Check the stored blocks in ``view``, read from payload ``offset``, against the
        signed list. Safe on several threads at once: each buffer's blocks are its own."""
        bs, digests, sha256 = self.payload.block_size, self._digests, hashlib.sha256
        if offset % bs or offset + len(view) > self._read:
            raise ValueError(f"bytes {offset}..+{len(view)} are not whole blocks read from this payload")
        first = i = offset // bs
        for off in range(0, len(view), bs):
            if sha256(view[off:off + bs]).digest() != digests[32 * i:32 * i + 32]:
                raise HashMismatch(
                    f"payload '{self.payload.name}' block {i} (bytes {i * bs}..) does not "
                    f"match its signed hash; stopped before using it"
                )
            i += 1
        self._verified[first:i] = b"\x01" * (i - first)

    def _verified_read(self, size: int = -1) -> memoryview:
        """The next verified stored bytes, in one reused buffer (``drain``)."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(self.buffer_size))
        return self._scratch[:self._stored_into(self._scratch)]

    def _decompress_into(self, buf: memoryview) -> int:
        import zstandard  # only compressed payloads need it: a raw install never loads it

        try:
            if self._z is None:
                bs = self.payload.block_size
                size = max(bs, FEED_BUFFER // bs * bs)
                self._feed = ReadAhead(self._stored_into, size, max(2, FEED_BUFFERS * FEED_BUFFER // size))
                self.frame_checksum = _frame_checksum(self._feed.first(), zstandard)
                # max_window_size bounds the decoder's memory: a frame that asks for a larger
                # window is refused ("Frame requires too much memory"), not obeyed
                dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
                self._z = dctx.stream_reader(self._feed, read_size=size,  # type: ignore[arg-type]
                                             closefd=False)
            got = 0
            while got < len(buf):  # fill it: a full buffer is an aligned, large write
                k = self._z.readinto(buf[got:])
                if not k:
                    break
                got += k
            return got
        except zstandard.ZstdError as exc:
            raise BundleError(f"payload '{self.payload.name}' is not valid zstd: {exc}") from None

    def drain(self) -> None:
        """Consume what the consumer left unread, still verifying it."""
        if self._feed is not None:
            self._feed.finish()
        while self._left:
            self._verified_read()
        if 0 in self._verified:  # a writer that read with verify_apart skipped a verify: a bug
            raise RuntimeError(f"payload '{self.payload.name}' block {self._verified.index(0)} "
                               "was read and never verified")

    def close(self) -> None:
        """Stop reading ahead (the consumer stopped before the end); idempotent."""
        if self._feed is not None:
            self._feed.stop()


def _frame_checksum(head: memoryview, zstandard: Any) -> bool:
    """Whether the zstd frame starting ``head`` declares a content checksum (RFC 8878
    3.1.1.1.1, Content_Checksum_flag); False when the header does not parse (the decoder
    then says why)."""
    try:
        return bool(zstandard.get_frame_parameters(bytes(head[:18])).has_checksum)
    except zstandard.ZstdError:
        return False
