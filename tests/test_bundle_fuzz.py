"""Fuzz invariants (as h11's fuzz/afl-server.py): any input parses or raises our own error."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.adapters.bundle import BundleReader
from agent.core import tarstream, trust
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
    from agent.host import bundle_writer, keys

    img = tmp_path_factory.mktemp("fz") / "img"
    img.write_bytes(bytes(range(256)) * 64)
    out = img.with_suffix(".bundle")
    bundle_writer.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                  chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim", version="2.0",
                  security_version=1, build_time=1_800_000_000 - 10**7,
                  sources=[bundle_writer.PayloadSource("rootfs", "rootfs", img, True, 4096)])
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


def _header(name: bytes, size_field: bytes) -> bytes:
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:124 + len(size_field)] = size_field
    block[156:157] = b"0"
    block[257:263] = b"ustar\0"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


@pytest.mark.parametrize("field", [b"-1", b"+17", b"0o17", b"1_0", b"\t17", b"17\n", b"8"])
def test_tar_size_is_octal_digits_only(field: bytes) -> None:
    with pytest.raises(EdgeopsError, match="malformed size"):
        tarstream.parse_header(_header(b"signer.pem", field))


def test_a_negative_size_never_reads_the_rest_of_the_stream() -> None:
    class Counting(io.BytesIO):
        taken = 0

        def read(self, n: int | None = -1) -> bytes:
            out = super().read(n)
            Counting.taken += len(out)
            return out

    stream = Counting(_header(b"signer.pem", b"-1") + b"A" * (8 << 20))
    with pytest.raises(EdgeopsError):
        BundleReader(stream).read_head()
    assert Counting.taken <= 1024


def test_every_damaged_signer_certificate_is_a_refusal(sample: bytes, pki: Keys) -> None:
    """A base64 character changed anywhere in signer.pem: never a traceback (cryptography
    decodes names and extensions lazily, so damage surfaces wherever they are first read)."""
    start = sample.index(b"-----BEGIN CERTIFICATE-----") + 28
    end = sample.index(b"-----END CERTIFICATE-----")
    keyring = trust.Keyring.from_pem(pki.root_crt.read_bytes())
    for pos in range(start, end):
        if sample[pos:pos + 1] in (b"\n", b"="):
            continue
        for repl in (b"A", b"/", b"z"):
            if sample[pos:pos + 1] == repl:
                continue
            data = sample[:pos] + repl + sample[pos + 1:]
            with contextlib.suppress(EdgeopsError):
                head = BundleReader(io.BytesIO(data)).read_head()
                trust.verify_head(manifest_bytes=head.manifest_bytes, signature=head.signature,
                                  chain_pem=head.chain_pem, keyring=keyring,
                                  device=trust.DeviceFacts("edgeops-sim", 0, 0))


def test_a_root_with_path_length_zero_certifies_no_intermediate(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    from agent.host import keys

    keys.init_root(tmp_path / "root")  # pathLenConstraint 0: signers directly under it only
    root_key, root_cert = keys.load_root(tmp_path / "root")
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, issuer: x509.Certificate | None, key: ed25519.Ed25519PrivateKey,
             signer: ed25519.Ed25519PrivateKey, ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (x509.CertificateBuilder().subject_name(name)
                .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(signer, None))

    mid_key, leaf_key = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    mid = cert("intermediate", root_cert, mid_key, root_key, True)
    leaf = cert("leaf", mid, leaf_key, mid_key, False)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, mid))
    keyring = trust.Keyring.from_pem(root_cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(EdgeopsError, match="not certified by a trusted root"):
        trust.build_path(trust.parse_chain(chain), keyring)
