"""A raw payload read apart: read on one thread, its blocks verified on others, nothing unverified used."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent.adapters import slots
from agent.adapters.bundle import BundleReader, PayloadReader
from agent.core import manifest as manifest_mod
from agent.core import tarstream
from agent.errors import HashMismatch
from agent.host import bundle_writer, keys
from tests.conftest import Keys, make_image

BLOCK = 4096


def _bundle(tmp_path: Path, pki: Keys, image: Path, *, compress: bool = False) -> bytes:
    out = tmp_path / "b.bundle"
    bundle_writer.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                         chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim",
                         version="2.0", security_version=1, build_time=1_800_000_000,
                         sources=[bundle_writer.PayloadSource("rootfs", "rootfs", image, compress, BLOCK)])
    return out.read_bytes()


def _payloads(data: bytes) -> tuple[BundleReader, manifest_mod.Manifest]:
    """The reader past its head, and the manifest taken as verified (trust is tested elsewhere)."""
    reader = BundleReader(io.BytesIO(data))
    return reader, manifest_mod.from_bytes(reader.read_head().manifest_bytes)


def _first(data: bytes) -> PayloadReader:
    reader, m = _payloads(data)
    return next(iter(reader.payloads(m)))


def _tamper(data: bytes, block: int) -> bytes:
    """``data`` with one byte of stored block ``block`` of payload 'rootfs' flipped."""
    r = tarstream.TarReader(io.BytesIO(data))
    while (member := r.next_member()) is not None:
        if member.name == "rootfs":
            out = bytearray(data)
            out[r.offset + block * BLOCK + 5] ^= 0xFF
            return bytes(out)
        r.read_exact(member.size)
        r.skip_padding(member.size)
    raise AssertionError("no payload 'rootfs'")


def test_read_apart_and_verified_in_order_gives_the_image(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 3 << 20, "raw")
    apart = _first(_bundle(tmp_path, pki, image)).verify_apart()
    assert apart is not None
    read, verify = apart
    out = bytearray()
    buf = memoryview(bytearray(1 << 20))
    while n := read(buf):
        verify(buf[:n], len(out))
        out += buf[:n]
    assert bytes(out) == image.read_bytes()


def test_verify_names_the_tampered_block(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 1 << 20, "raw")
    apart = _first(_tamper(_bundle(tmp_path, pki, image), 100)).verify_apart()
    assert apart is not None
    read, verify = apart
    buf = memoryview(bytearray(1 << 20))
    n = read(buf)
    with pytest.raises(HashMismatch, match="block 100 "):
        verify(buf[:n], 0)


def test_a_payload_read_apart_and_not_verified_is_refused_at_its_end(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 2 << 20, "raw")
    reader, m = _payloads(_bundle(tmp_path, pki, image))
    payloads = reader.payloads(m)
    apart = next(payloads).verify_apart()
    assert apart is not None
    read, verify = apart
    buf = memoryview(bytearray(1 << 20))
    verify(buf[:read(buf)], 0)
    while read(buf):  # the second megabyte is never verified
        pass
    with pytest.raises(RuntimeError, match="block 256 was read and never verified"):
        next(payloads)


def test_verify_refuses_bytes_that_are_not_whole_blocks_read(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 1 << 20, "raw")
    apart = _first(_bundle(tmp_path, pki, image)).verify_apart()
    assert apart is not None
    read, verify = apart
    buf = memoryview(bytearray(BLOCK * 4))
    n = read(buf)
    with pytest.raises(ValueError, match="not whole blocks"):
        verify(buf[:n], 1)
    with pytest.raises(ValueError, match="not whole blocks"):
        verify(buf[:n], BLOCK)  # reaches past what was read


def test_a_zstd_payload_is_not_read_apart(tmp_path: Path, pki: Keys) -> None:
    image = make_image(tmp_path / "img", 1 << 20, "zstd")
    assert _first(_bundle(tmp_path, pki, image, compress=True)).verify_apart() is None


def test_the_slot_writer_stops_at_the_tampered_buffer_and_writes_every_one_before(tmp_path: Path,
                                                                                  pki: Keys) -> None:
    image = make_image(tmp_path / "img", 4 << 20, "raw")
    pr = _first(_tamper(_bundle(tmp_path, pki, image), 600))  # in the third 1 MiB buffer
    apart = pr.verify_apart()
    assert apart is not None
    slot = tmp_path / "slot.img"
    with open(slot, "wb") as f:
        f.truncate(8 << 20)
    with pytest.raises(HashMismatch, match="block 600 "):
        slots.write_from(slot, apart[0], limit=8 << 20, verify=apart[1])
    got, want = slot.read_bytes(), image.read_bytes()
    assert got[:2 << 20] == want[:2 << 20]
    assert got[2 << 20:] == bytes(6 << 20)
