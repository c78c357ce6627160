"""Fuzz invariants (as h11's fuzz/afl-server.py): any input parses or raises our own error."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import tarstream, trust
from agent.bundle import BundleReader
from agent.errors import EdgeopsError
from tests.conftest import Keys


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_any_tar_header_parses_or_raises_bundle_error(block: bytes) -> None:
    with contextlib.suppress(EdgeopsError):
        tarstream.parse_header(block)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_any_byte_stream_reads_or_raises_our_error(data: bytes) -> None:
    with contextlib.suppress(EdgeopsError):
        BundleReader(io.BytesIO(data)).read_head()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory, pki: Keys) -> bytes:
    from agent import bundle, keys

    img = tmp_path_factory.mktemp("fz") / "img"
    img.write_bytes(bytes(range(256)) * 64)
    out = img.with_suffix(".bundle")
    bundle.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                  chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim", version="2.0",
                  security_version=1, build_time=1_800_000_000 - 10**7,
                  sources=[bundle.PayloadSource("rootfs", "rootfs", img, True, 4096)])
    return out.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                min_size=1, max_size=4))
def test_mutated_bundles_verify_fully_or_raise_our_error(sample: bytes, pki: Keys,
                                                         flips: list[tuple[int, int]]) -> None:
    data = bytearray(sample)
    for pos, value in flips:
        data[pos % len(data)] = value
    keyring = trust.Keyring.from_pem(pki.root_crt.read_bytes())
    try:
        reader = BundleReader(io.BytesIO(bytes(data)))
        head = reader.read_head()
        verdict = trust.verify_head(manifest_bytes=head.manifest_bytes, signature=head.signature,
                                    chain_pem=head.chain_pem, keyring=keyring,
                                    device=trust.DeviceFacts("edgeops-sim", 0, 0))
        for pr in reader.payloads(verdict.manifest):
            for _ in pr.installed_chunks(whole_hash=True):
                pass
    except EdgeopsError:
        return
    # Whatever survived every check must be the original content, byte for byte,
    # except in places nobody reads (tar padding, header fields we ignore).
    assert verdict.manifest.version == "2.0"


def test_reader_refuses_payloads_before_the_head(sample: bytes) -> None:
    reader = BundleReader(io.BytesIO(sample))
    with pytest.raises(RuntimeError, match="before read_head"):
        next(iter(reader.payloads(None)))  # type: ignore[arg-type]


def test_bundle_file_is_a_plain_tar(sample: bytes, tmp_path: Path) -> None:
    import tarfile

    p = tmp_path / "b.tar"
    p.write_bytes(sample)
    with tarfile.open(p) as t:
        assert t.getnames() == ["signer.pem", "manifest.sig", "manifest.json", "rootfs.blocks", "rootfs"]
