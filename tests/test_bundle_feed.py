"""A zstd payload's read-ahead: verified before decoding, bounded in memory and window, stoppable."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import zstandard

from agent.adapters import bundle as bundle_mod
from agent.adapters.bundle import BundleReader, PayloadReader
from agent.core import manifest as manifest_mod
from agent.core import tarstream
from agent.errors import BundleError, HashMismatch
from agent.host import bundle_writer, keys
from tests.conftest import Keys, make_image

BLOCK = 4096


def _create(tmp_path: Path, pki: Keys, image: Path, *, stored: Path | None = None) -> Path:
    out = tmp_path / "b.bundle"
    installed = None
    if stored is not None:
        import hashlib

        data = image.read_bytes()
        installed = (len(data), hashlib.sha256(data).hexdigest())
    bundle_writer.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                         chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim",
                         version="2.0", security_version=1, build_time=1_800_000_000,
                         sources=[bundle_writer.PayloadSource("rootfs", "rootfs", image, True, BLOCK,
                                                              stored=stored, installed=installed)])
    return out


def _payload(stream: io.BytesIO) -> tuple[BundleReader, PayloadReader]:
    """The reader and its first payload; the manifest is taken as verified (trust is tested
    elsewhere: this is about what the reader does with a trusted one)."""
    reader = BundleReader(stream)
    m = manifest_mod.from_bytes(reader.read_head().manifest_bytes)
    return reader, next(iter(reader.payloads(m)))


def _stored_offset(data: bytes, name: str) -> int:
    """Where member ``name``'s bytes start in a bundle."""
    r = tarstream.TarReader(io.BytesIO(data))
    while (member := r.next_member()) is not None:
        if member.name == name:
            return r.offset
        r.read_exact(member.size)
        r.skip_padding(member.size)
    raise AssertionError(f"no member {name}")


_OLDER: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _older_feeds() -> None:
    """Feed threads another test left ending are not this test's."""
    _OLDER.clear()
    _OLDER.update(t for t in threading.enumerate() if t.name == "bundle-verify")


def _feed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bundle-verify" and t not in _OLDER]


def _read_all(pr: PayloadReader) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(pr.buffer_size))
    while n := pr.readinto(buf):
        out += buf[:n]
    return bytes(out)


def test_a_tampered_zstd_block_stops_the_decoder_at_the_verified_bytes(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 3 << 20, "feed")
    data = bytearray(_create(tmp_path, pki, image).read_bytes())
    bad_block = 200
    data[_stored_offset(bytes(data), "rootfs") + bad_block * BLOCK + 7] ^= 0xFF
    _, pr = _payload(io.BytesIO(bytes(data)))
    out = bytearray()
    buf = memoryview(bytearray(pr.buffer_size))
    with pytest.raises(HashMismatch, match=f"block {bad_block} "):
        while n := pr.readinto(buf):
            out += buf[:n]
    assert image.read_bytes().startswith(bytes(out))
    assert pr.stored_read <= bad_block * BLOCK  # the bad block never reached the decoder


def test_the_feed_reads_a_bounded_amount_ahead_of_the_decoder(tmp_path: Path, pki: Keys) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(range(256)) * (64 << 12))  # 16 MiB that zstd shrinks to little
    data = _create(tmp_path, pki, image).read_bytes()
    stream = io.BytesIO(data)
    _, pr = _payload(stream)
    pr.readinto(memoryview(bytearray(BLOCK)))  # one small read starts the feed, then wait
    time.sleep(0.3)
    ahead = stream.tell() - _stored_offset(data, "rootfs")
    assert 0 < ahead <= (bundle_mod.FEED_BUFFERS + 1) * bundle_mod.FEED_BUFFER


def test_a_consumer_that_stops_early_leaves_no_feed_thread(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 4 << 20, "stop")
    reader = BundleReader(io.BytesIO(_create(tmp_path, pki, image).read_bytes()))
    payloads = reader.payloads(manifest_mod.from_bytes(reader.read_head().manifest_bytes))
    next(payloads).readinto(memoryview(bytearray(BLOCK)))
    assert _feed_threads()
    payloads.close()  # what a consumer's error does to the generator (GeneratorExit)
    deadline = time.monotonic() + 5
    while _feed_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _feed_threads()


def test_a_chunk_consumer_that_stops_early_leaves_no_feed_thread(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 4 << 20, "chunks")
    _, pr = _payload(io.BytesIO(_create(tmp_path, pki, image).read_bytes()))
    chunks = pr.installed_chunks()
    next(chunks)
    assert _feed_threads()
    chunks.close()  # a slot write that failed drops its chunk iterator (agent.device.delta)
    deadline = time.monotonic() + 5
    while _feed_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _feed_threads()


def test_a_payload_read_to_its_end_installs_the_image_and_joins_its_feed(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", (2 << 20) + 123, "end")
    reader = BundleReader(io.BytesIO(_create(tmp_path, pki, image).read_bytes()))
    m = manifest_mod.from_bytes(reader.read_head().manifest_bytes)
    got = b"".join(_read_all(pr) for pr in reader.payloads(m))
    assert got == image.read_bytes()
    assert not _feed_threads()


def test_a_zstd_frame_asking_for_a_window_above_the_bound_is_refused(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 1 << 20, "window")
    stored = tmp_path / "stored.zst"
    # no content size in the header, so the frame names its window (16 MiB) instead
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=24, write_content_size=0)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    with open(stored, "wb") as f, cctx.stream_writer(f, closefd=False) as z:
        z.write(image.read_bytes())
    assert zstandard.get_frame_parameters(stored.read_bytes()).window_size > bundle_mod.ZSTD_MAX_WINDOW
    _, pr = _payload(io.BytesIO(_create(tmp_path, pki, image, stored=stored).read_bytes()))
    with pytest.raises(BundleError, match=r"'rootfs' is not valid zstd: .*memory"):
        _read_all(pr)


def test_a_written_zstd_payload_asks_for_no_more_than_the_writers_window(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 6 << 20, "writer")  # larger than level 3's own window
    data = _create(tmp_path, pki, image).read_bytes()
    frame = zstandard.get_frame_parameters(data[_stored_offset(data, "rootfs"):][:64])
    assert frame.window_size <= 1 << bundle_mod.ZSTD_WINDOW_LOG
    assert frame.has_checksum


# --- the whole-payload hash of an install -----------------------------------------------------
def _installed_with_check(pr: PayloadReader, whole_hash: bool | None = None) -> int:
    """Read the payload as the updater does: every buffer, once decoded, through the check."""
    check = pr.whole_hash_check(whole_hash)
    buf, total = memoryview(bytearray(pr.buffer_size)), 0
    while n := pr.readinto(buf):
        if check is not None:
            check(buf[:n])
        total += n
    return total


def _zstd_file(path: Path, data: bytes, *, checksum: bool) -> Path:
    params = zstandard.ZstdCompressionParameters.from_level(3, write_checksum=int(checksum))
    path.write_bytes(zstandard.ZstdCompressor(compression_params=params).compress(data))
    return path


def _misdeclared(tmp_path: Path, pki: Keys, *, checksum: bool) -> bytes:
    """A signed bundle whose manifest declares another SHA-256 than its zstd payload decodes
    to (a creator's inconsistent manifest; every stored block is signed as it is)."""
    image = make_image(tmp_path / "img", 2 << 20, "declared")
    stored = _zstd_file(tmp_path / "stored.zst", image.read_bytes(), checksum=checksum)
    out = tmp_path / "b.bundle"
    bundle_writer.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                         chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim",
                         version="2.0", security_version=1, build_time=1_800_000_000,
                         sources=[bundle_writer.PayloadSource(
                             "rootfs", "rootfs", image, True, BLOCK, stored=stored,
                             installed=(image.stat().st_size, "ab" * 32))])
    return out.read_bytes()


def test_a_zstd_frame_without_its_checksum_is_hashed_whole_at_install(tmp_path: Path, pki: Keys) -> None:
    _, pr = _payload(io.BytesIO(_misdeclared(tmp_path, pki, checksum=False)))
    with pytest.raises(HashMismatch, match="'rootfs' SHA-256 does not match the manifest"):
        _installed_with_check(pr)
    assert pr.frame_checksum is False


def test_a_checksummed_zstd_frame_is_not_hashed_again_but_bundle_verify_still_is(
        tmp_path: Path, pki: Keys) -> None:
    data = _misdeclared(tmp_path, pki, checksum=True)
    _, pr = _payload(io.BytesIO(data))
    assert _installed_with_check(pr) == 2 << 20  # every stored block verified, the frame's XXH64 too
    assert pr.frame_checksum is True
    _, pr = _payload(io.BytesIO(data))
    with pytest.raises(HashMismatch, match="does not match the manifest"):  # as 'bundle verify' reads
        _installed_with_check(pr, whole_hash=True)


def test_decoded_bytes_that_disagree_with_the_frame_checksum_are_refused(tmp_path: Path, pki: Keys) -> None:
    """What stands in for the whole hash: a decoder whose output is not what was compressed
    (here, a frame whose XXH64 says other content) stops with the decoder's error."""
    image = make_image(tmp_path / "img", 1 << 20, "xxh")
    stored = _zstd_file(tmp_path / "stored.zst", image.read_bytes(), checksum=True)
    raw = bytearray(stored.read_bytes())
    raw[-1] ^= 0xFF  # the frame's Content_Checksum: the last four bytes
    stored.write_bytes(bytes(raw))
    _, pr = _payload(io.BytesIO(_create(tmp_path, pki, image, stored=stored).read_bytes()))
    with pytest.raises(BundleError, match=r"'rootfs' is not valid zstd: .*checksum"):
        _installed_with_check(pr)
