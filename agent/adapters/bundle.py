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
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from agent.core import manifest as manifest_mod
from agent.core import tarstream
from agent.core.manifest import Manifest, Payload
from agent.errors import BundleError, HashMismatch, UnsafeMember

CHAIN_NAME, SIG_NAME, MANIFEST_NAME, CRL_NAME = "signer.pem", "manifest.sig", "manifest.json", "crl.pem"
HEAD_LIMITS = {CHAIN_NAME: 16 * 1024, SIG_NAME: 64, MANIFEST_NAME: manifest_mod.MAX_MANIFEST_BYTES,
               CRL_NAME: 256 * 1024}
ZSTD_LEVEL = 3
ZSTD_MAX_WINDOW = 1 << 23  # bounds the decompressor's memory on the device
READ_SIZE = 1 << 20  # bytes pulled from the stream at once: a whole number of blocks


@dataclass(frozen=True)
class Head:
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
            yield reader
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
    """One payload: verified stored blocks in, installed bytes out, sizes and hashes checked."""

    def __init__(self, tar: tarstream.TarReader, payload: Payload, digests: bytes) -> None:
        self.payload = payload
        self._tar = tar
        self._digests = digests
        self._next_block = 0
        self._left = payload.stored_size
        self.stored_read = 0

    def stored_chunks(self, read_size: int = READ_SIZE) -> Iterator[memoryview]:
        """Yield stored bytes; each chunk is yielded only after every block in it matched.

        Every chunk is a fresh buffer that the consumer may keep (the slot writer
        queues a few to overlap writing with reading and hashing); memory stays
        bounded by the consumer's queue, not by the payload size.
        """
        bs = self.payload.block_size
        read_size = max(bs, read_size // bs * bs)
        sha256 = hashlib.sha256
        digests = self._digests
        while self._left:
            n = min(read_size, self._left)
            chunk = memoryview(bytearray(n))
            self._tar.readinto_exact(chunk)
            i = self._next_block
            for off in range(0, n, bs):
                if sha256(chunk[off:off + bs]).digest() != digests[32 * i:32 * i + 32]:
                    raise HashMismatch(
                        f"payload '{self.payload.name}' block {i} (bytes {i * bs}..) does not "
                        f"match its signed hash; stopped before using it"
                    )
                i += 1
            self._next_block = i
            self._left -= n
            self.stored_read += n
            yield chunk

    def installed_chunks(self, read_size: int = READ_SIZE, *, whole_hash: bool | None = None
                         ) -> Iterator[memoryview]:
        """Yield the bytes to install; size and SHA-256 of the whole are checked at the end.

        ``whole_hash=None`` hashes the whole only for compressed payloads: for raw ones
        the signed block list already pins every byte, so a second SHA-256 pass adds
        time and no safety (``bundle verify`` still asks for it, to catch a bundle
        whose creator wrote an inconsistent manifest).
        """
        p = self.payload
        total = 0
        if whole_hash is None:
            whole_hash = p.compression != "none"
        h = hashlib.sha256() if whole_hash else None
        if p.compression == "none":
            source: Iterator[memoryview] = self.stored_chunks(read_size)
        else:
            source = self._decompressed(read_size)
        for chunk in source:
            total += len(chunk)
            if total > p.size:
                raise HashMismatch(f"payload '{p.name}' decompresses past its declared {p.size} bytes")
            if h is not None:
                h.update(chunk)
            yield chunk
        if total != p.size:
            raise HashMismatch(f"payload '{p.name}' has {total} bytes, the manifest says {p.size}")
        if h is not None and h.hexdigest() != p.sha256:
            raise HashMismatch(f"payload '{p.name}' SHA-256 does not match the manifest")

    def _decompressed(self, read_size: int) -> Iterator[memoryview]:
        raw = _ChunkFile(self.stored_chunks(read_size))
        dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        try:
            reader = dctx.stream_reader(raw, read_size=read_size, closefd=False)  # type: ignore[arg-type]
            with reader as z:
                while True:
                    out = z.read(read_size)
                    if not out:
                        break
                    yield memoryview(out)
        except zstandard.ZstdError as exc:
            raise BundleError(f"payload '{self.payload.name}' is not valid zstd: {exc}") from None

    def drain(self) -> None:
        """Consume what the consumer left unread, still verifying it."""
        for _ in self.stored_chunks():
            pass


class _ChunkFile(io.RawIOBase):
    def __init__(self, chunks: Iterator[memoryview]) -> None:
        self._chunks = chunks
        self._cur = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._cur:
            self._cur = next(self._chunks, memoryview(b""))
            if not self._cur:
                return 0
        n = min(len(b), len(self._cur))
        b[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n
