"""The install path's own X.509 reader and Ed25519 check agree with ``cryptography``.

``agent.core.certs`` reads the certificates and CRLs of a trust chain without
``cryptography`` (docs/performance.md section 7). Here ``cryptography`` builds them — random
names, serials, dates and extensions — and is the oracle for what each field says; damaged
DER must never parse into a certificate its issuer's key verifies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.adapters.truststore import TrustStore
from agent.core import certs, der, trust
from agent.core import ed25519 as ed
from agent.core.der import DerError
from agent.core.pem import pem_blocks

ROOT_KEY = ed25519.Ed25519PrivateKey.generate()
LEAF_KEY = ed25519.Ed25519PrivateKey.generate()
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
KU_FIELDS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
ATTRS = (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME,
         NameOID.COUNTRY_NAME, NameOID.EMAIL_ADDRESS, NameOID.SERIAL_NUMBER)
PURPOSES = (ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.CLIENT_AUTH,
            x509.ObjectIdentifier("2.25.147612934"))


def der_of(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def name_of(parts: list[tuple[x509.ObjectIdentifier, str]]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, v) for oid, v in parts])


# cryptography writes these as UTF8String, but country and serial as PrintableString and an
# e-mail address as IA5String (RFC 5280 appendix A), so those draw from their alphabets
PRINTABLE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
attribute = st.one_of(
    st.tuples(st.sampled_from(ATTRS[:3]), text),
    st.tuples(st.just(NameOID.COUNTRY_NAME), st.text(PRINTABLE, min_size=2, max_size=2)),
    st.tuples(st.just(NameOID.SERIAL_NUMBER), st.text(PRINTABLE, min_size=1, max_size=20)),
    st.tuples(st.just(NameOID.EMAIL_ADDRESS), st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                                      min_size=1, max_size=20)))
names = st.lists(attribute, min_size=1, max_size=4).map(name_of)
times = st.integers(0, 2 ** 34).map(lambda s: EPOCH + dt.timedelta(seconds=s))


@st.composite
def certificates(draw: st.DrawFn) -> x509.Certificate:
    start = draw(times)
    b = (x509.CertificateBuilder().subject_name(draw(names)).issuer_name(draw(names))
         .public_key(LEAF_KEY.public_key())
         .serial_number(draw(st.integers(1, 2 ** 159 - 1)))
         .not_valid_before(start)
         .not_valid_after(start + dt.timedelta(seconds=draw(st.integers(0, 2 ** 32)))))
    if draw(st.booleans()):
        ca = draw(st.booleans())
        path = draw(st.none() | st.integers(0, 5)) if ca else None
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path), critical=draw(st.booleans()))
    if draw(st.booleans()):
        bits = {f: draw(st.booleans()) for f in KU_FIELDS}
        if not bits["key_agreement"]:
            bits["encipher_only"] = bits["decipher_only"] = False
        if not any(bits.values()):  # RFC 5280 §4.2.1.3: one bit set (an empty one is refused)
            bits["digital_signature"] = True
        b = b.add_extension(x509.KeyUsage(**bits), critical=draw(st.booleans()))
    if draw(st.booleans()):
        eku = draw(st.lists(st.sampled_from(PURPOSES), min_size=1, max_size=3, unique=True))
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=draw(st.booleans()))
    if draw(st.booleans()):
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(LEAF_KEY.public_key()),
                            critical=False)
    return b.sign(ROOT_KEY, None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(certificates())
def test_every_field_reads_as_cryptography_reads_it(c: x509.Certificate) -> None:
    got = certs.load_cert(der_of(c))
    assert got.subject.text == c.subject.rfc4514_string()
    assert got.issuer.text == c.issuer.rfc4514_string()
    assert got.serial_number == c.serial_number
    assert got.not_before == int(c.not_valid_before_utc.timestamp())
    assert got.not_after == int(c.not_valid_after_utc.timestamp())
    assert got.ed25519_key == LEAF_KEY.public_key().public_bytes_raw()
    assert got.spki == LEAF_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    exts = {e.oid: e.value for e in c.extensions}
    bc = exts.get(x509.BasicConstraints.oid)
    assert (got.ca, got.path_length) == ((None, None) if bc is None else (bc.ca, bc.path_length))
    ku = exts.get(x509.KeyUsage.oid)
    want_ku = None if ku is None else sum(
        1 << i for i, f in enumerate(KU_FIELDS)
        if (getattr(ku, f) if f not in ("encipher_only", "decipher_only") or ku.key_agreement else False))
    assert got.key_usage == want_ku
    eku = exts.get(x509.ExtendedKeyUsage.oid)
    assert got.ext_key_usage == (None if eku is None else tuple(o.dotted_string for o in eku))


@settings(max_examples=60, deadline=None)
@given(certificates())
def test_a_certificate_verifies_under_its_issuer_key_only(c: x509.Certificate) -> None:
    root = certs.load_cert(der_of(x509.CertificateBuilder().subject_name(c.issuer)
                                  .issuer_name(c.issuer).public_key(ROOT_KEY.public_key())
                                  .serial_number(1).not_valid_before(EPOCH)
                                  .not_valid_after(EPOCH + dt.timedelta(days=1)).sign(ROOT_KEY, None)))
    got = certs.load_cert(der_of(c))
    assert got.issued_by(root)
    assert not got.issued_by(got)  # signed by the root's key, not the leaf's own


def sample_chain() -> tuple[x509.Certificate, bytes]:
    root = (x509.CertificateBuilder().subject_name(name_of([(NameOID.COMMON_NAME, "root")]))
            .issuer_name(name_of([(NameOID.COMMON_NAME, "root")])).public_key(ROOT_KEY.public_key())
            .serial_number(7).not_valid_before(EPOCH).not_valid_after(EPOCH + dt.timedelta(days=9999))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ROOT_KEY, None))
    leaf = (x509.CertificateBuilder().subject_name(name_of([(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(root.subject).public_key(LEAF_KEY.public_key()).serial_number(8)
            .not_valid_before(EPOCH).not_valid_after(EPOCH + dt.timedelta(days=99))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .sign(ROOT_KEY, None))
    return root, der_of(leaf)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")  # serial 0
def test_no_damaged_byte_yields_a_certificate_its_issuer_verifies() -> None:
    """Every byte of a signer certificate, changed three ways: the reader refuses it or reads
    a certificate the root's key does not verify; and whatever it reads, cryptography reads too."""
    root_c, leaf = sample_chain()
    root = certs.load_cert(der_of(root_c))
    assert certs.load_cert(leaf).issued_by(root)
    for pos in range(len(leaf)):
        for mutate in (lambda b: b ^ 0x01, lambda b: b ^ 0x80, lambda b: (b + 1) & 0xFF):
            data = leaf[:pos] + bytes([mutate(leaf[pos])]) + leaf[pos + 1:]
            try:
                got = certs.load_cert(data)
            except DerError:
                continue
            assert not got.issued_by(root), f"byte {pos} changed still verifies"
            parsed = x509.load_der_x509_certificate(data)  # raises if we read what it cannot
            assert parsed.subject.rfc4514_string() == got.subject.text
            assert parsed.serial_number == got.serial_number


def test_a_truncated_certificate_is_refused_at_every_length() -> None:
    _, leaf = sample_chain()
    for n in range(len(leaf)):
        with pytest.raises(DerError):
            certs.load_cert(leaf[:n])


def test_bytes_after_the_certificate_are_refused() -> None:
    _, leaf = sample_chain()
    with pytest.raises(DerError, match="unexpected bytes"):
        certs.load_cert(leaf + b"\x00")


@pytest.mark.parametrize(("blob", "why"), [
    (b"\x30\x80\x00\x00", "indefinite length"),
    (b"\x30\x81\x05\x02\x01\x01\x02\x00", "shortest form"),
    (b"\x30\x82\x00\x03\x02\x01\x01", "shortest form"),
    (b"\x3f\x01\x00", "multi-byte tags"),
    (b"\x30\x05\x02\x01", "run past the end"),
    (b"\x30\x85\x01\x00\x00\x00\x00", "length of 5 bytes"),
])
def test_non_der_lengths_and_tags_are_refused(blob: bytes, why: str) -> None:
    with pytest.raises(DerError, match=why):
        der.Reader(blob).inner(der.SEQUENCE, "x")


@pytest.mark.parametrize(("blob", "read", "why"), [
    (b"\x02\x02\x00\x01", "integer", "shortest form"),
    (b"\x02\x02\xff\x80", "integer", "shortest form"),
    (b"\x02\x00", "integer", "empty INTEGER"),
    (b"\x01\x01\x01", "boolean", "neither 00 nor FF"),
    (b"\x03\x02\x03\x01", "bit_string", "malformed BIT STRING"),
    (b"\x03\x01\x01", "bit_string", "malformed BIT STRING"),
    (b"\x03\x02\x08\x00", "bit_string", "malformed BIT STRING"),
    (b"\x06\x02\x80\x01", "oid", "malformed OBJECT IDENTIFIER"),
    (b"\x06\x01\x81", "oid", "malformed OBJECT IDENTIFIER"),
])
def test_non_der_values_are_refused(blob: bytes, read: str, why: str) -> None:
    with pytest.raises(DerError, match=why):
        getattr(der.Reader(blob), read)("x")


@pytest.mark.parametrize(("tag", "value", "want"), [
    (der.UTC_TIME, b"491231235959Z", "2049-12-31T23:59:59"),
    (der.UTC_TIME, b"500101000000Z", "1950-01-01T00:00:00"),
    (der.GENERALIZED_TIME, b"99991231235959Z", "9999-12-31T23:59:59"),
    (der.GENERALIZED_TIME, b"20240229120000Z", "2024-02-29T12:00:00"),
])
def test_times_read_as_rfc_5280_says(tag: int, value: bytes, want: str) -> None:
    got = der.time(tag, value, "t")
    assert dt.datetime.fromtimestamp(got, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") == want


@pytest.mark.parametrize(("tag", "value"), [
    (der.UTC_TIME, b"490101000000+0100"), (der.UTC_TIME, b"4901010000Z"),
    (der.GENERALIZED_TIME, b"20230229120000Z"), (der.GENERALIZED_TIME, b"20231301120000Z"),
    (der.GENERALIZED_TIME, b"20230101120000.5Z"), (der.UTC_TIME, b"49010100000 Z"),
    (der.GENERALIZED_TIME, b"00000101000000Z"), (der.OCTET_STRING, b"20230101120000Z"),
])
def test_times_in_other_forms_are_refused(tag: int, value: bytes) -> None:
    with pytest.raises(DerError):
        der.time(tag, value, "t")


@given(st.lists(st.integers(0, 2 ** 64), min_size=1, max_size=8))
def test_oids_round_trip(arcs: list[int]) -> None:
    dotted = ".".join(str(a) for a in [1, 3, *arcs])
    assert der.oid_text(der.oid_bytes(dotted)) == dotted


def with_extension(ext: x509.ExtensionType, critical: bool) -> bytes:
    return der_of(x509.CertificateBuilder().subject_name(name_of([(NameOID.COMMON_NAME, "x")]))
                  .issuer_name(name_of([(NameOID.COMMON_NAME, "x")])).public_key(LEAF_KEY.public_key())
                  .serial_number(3).not_valid_before(EPOCH).not_valid_after(EPOCH + dt.timedelta(days=1))
                  .add_extension(ext, critical=critical).sign(ROOT_KEY, None))


def test_a_critical_extension_not_understood_makes_the_certificate_unusable() -> None:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    assert certs.load_cert(with_extension(ext, False)).serial_number == 3
    with pytest.raises(DerError, match=r"critical extension 1\.3\.6\.1\.4\.1\.99999\.1 is not understood"):
        certs.load_cert(with_extension(ext, True))


def test_name_constraints_on_a_ca_are_refused_not_ignored() -> None:
    nc = x509.NameConstraints(permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None)
    with pytest.raises(DerError, match=r"2\.5\.29\.30 is not understood"):
        certs.load_cert(with_extension(nc, True))


def test_a_chain_with_a_non_ed25519_key_reads_but_signs_nothing() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    c = (x509.CertificateBuilder().subject_name(name_of([(NameOID.COMMON_NAME, "ec")]))
         .issuer_name(name_of([(NameOID.COMMON_NAME, "ec")])).public_key(key.public_key())
         .serial_number(5).not_valid_before(EPOCH).not_valid_after(EPOCH + dt.timedelta(days=1))
         .sign(key, hashes.SHA256()))
    got = certs.load_cert(der_of(c))
    assert got.key_algorithm == "1.2.840.10045.2.1" and got.ed25519_key is None
    assert not got.ed25519_signed and not got.issued_by(got)
    with pytest.raises(trust.UntrustedSigner, match="not Ed25519"):
        trust.check_signer_usage(got)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 2 ** 159 - 1), max_size=6, unique=True), st.integers(0, 2 ** 40),
       times, st.booleans())
def test_crls_read_as_cryptography_reads_them(serials: list[int], number: int, when: dt.datetime,
                                              pem: bool) -> None:
    issuer = name_of([(NameOID.ORGANIZATION_NAME, "edgeops"), (NameOID.COMMON_NAME, "r")])
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer).last_update(when)
         .next_update(when + dt.timedelta(days=1)).add_extension(x509.CRLNumber(number), critical=False))
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s)
                                      .revocation_date(when).build())
    crl = b.sign(ROOT_KEY, None)
    blob = crl.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)
    got = trust._load_crl(blob)
    assert got is not None
    assert (got.issuer.text, got.number, got.this_update, got.revoked) == (
        crl.issuer.rfc4514_string(), number, int(when.timestamp()), tuple(r.serial_number for r in crl))
    assert got.signed_by(certs.load_cert(der_of(sample_chain()[0])))  # the root's key signed it
    assert not got.signed_by(certs.load_cert(sample_chain()[1]))  # the leaf's did not


messages = st.binary(max_size=300)


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(0, 63 * 8 + 7), st.booleans(), st.binary(min_size=32, max_size=32))
def test_libcrypto_and_cryptography_agree_on_every_signature(msg: bytes, flip: int, damage: bool,
                                                             other_key: bytes) -> None:
    pub = LEAF_KEY.public_key().public_bytes_raw()
    sig = bytearray(LEAF_KEY.sign(msg))
    if damage:
        sig[flip // 8] ^= 1 << (flip % 8)
    for key in (pub, other_key):
        want = ed.verify_with_cryptography(key, bytes(sig), msg)
        assert ed.verify(key, bytes(sig), msg) is want
    assert ed.verify(pub, bytes(sig), msg) is (not damage)


def test_the_install_check_uses_the_libcrypto_hashlib_already_loaded() -> None:
    assert ed.backend() == "libcrypto"


def test_without_libcrypto_cryptography_checks_the_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ed, "_lib", None)
    monkeypatch.setattr(ed, "_loaded", True)
    msg = os.urandom(40)
    sig = LEAF_KEY.sign(msg)
    pub = LEAF_KEY.public_key().public_bytes_raw()
    assert ed.backend() == "cryptography"
    assert ed.verify(pub, sig, msg) and not ed.verify(pub, sig, msg + b"!")


@pytest.mark.parametrize(("key", "sig"), [(b"\x00" * 31, b"\x00" * 64), (b"\x00" * 32, b"\x00" * 63),
                                          (b"\x00" * 33, b"\x00" * 64), (b"", b"")])
def test_keys_and_signatures_of_the_wrong_size_never_verify(key: bytes, sig: bytes) -> None:
    assert not ed.verify(key, sig, b"m")


def tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def attr(oid: str, tag: int, value: bytes) -> bytes:
    return tlv(der.SEQUENCE, tlv(der.OID, der.oid_bytes(oid)) + tlv(tag, value))


def test_an_oid_arc_too_long_to_print_is_refused_as_der() -> None:
    huge = b"\x2b" + b"\xff" * 4000 + b"\x7f"  # one arc of ~28,000 bits: 8,400 decimal digits
    with pytest.raises(DerError, match="OBJECT IDENTIFIER"):
        der.Reader(tlv(der.OID, huge)).oid("x")
    with pytest.raises(DerError, match="arc longer than 20 bytes"):
        der.Reader(tlv(der.OID, b"\x2b" + b"\x81" * 20 + b"\x01")).oid("x")


def test_a_uuid_oid_reads_and_prints() -> None:
    dotted = "2.25." + str(2 ** 128 - 1)  # X.667: the longest arcs in use
    assert der.oid_text(der.Reader(tlv(der.OID, der.oid_bytes(dotted))).oid("x")) == dotted


@pytest.mark.parametrize(("octets", "ok"), [
    (b"\x2b" + b"\x81" * 19 + b"\x01", True),  # an arc of 20 bytes
    (b"\x2b" + b"\x81" * 20 + b"\x01", False),  # of 21
    (b"\x2b" + b"\x01" * 127, True),  # an OID of 128 bytes
    (b"\x2b" + b"\x01" * 128, False),  # of 129
])
def test_oids_are_bounded_at_128_bytes_and_arcs_at_20(octets: bytes, ok: bool) -> None:
    if ok:
        assert der.Reader(tlv(der.OID, octets)).oid("x") == octets
    else:
        with pytest.raises(DerError, match="OBJECT IDENTIFIER"):
            der.Reader(tlv(der.OID, octets)).oid("x")


def test_a_name_with_a_huge_oid_is_a_der_error_not_a_crash() -> None:
    name = tlv(der.SEQUENCE, tlv(der.SET, tlv(der.SEQUENCE, tlv(der.OID, b"\x2b" + b"\xff" * 900 + b"\x01")
                                              + tlv(der.UTF8_STRING, b"x"))))
    with pytest.raises(DerError):
        certs.name(der.Reader(name), "subject")


def test_the_attributes_of_a_multi_valued_rdn_must_be_in_der_order() -> None:
    cn, o = attr("2.5.4.3", der.UTF8_STRING, b"a"), attr("2.5.4.10", der.UTF8_STRING, b"b")
    first, second = sorted([cn, o])
    assert certs.name(der.Reader(tlv(der.SEQUENCE, tlv(der.SET, first + second))), "n").text in (
        "CN=a+O=b", "O=b+CN=a")
    with pytest.raises(DerError, match="not in DER order"):
        certs.name(der.Reader(tlv(der.SEQUENCE, tlv(der.SET, second + first))), "n")


def self_signed(subject: x509.Name) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(LEAF_KEY.public_key()).serial_number(3).not_valid_before(EPOCH)
            .not_valid_after(EPOCH + dt.timedelta(days=1))
            .sign(ROOT_KEY, None))


def test_a_multi_valued_rdn_reads_as_cryptography_writes_it() -> None:
    """cryptography sorts a SET OF when it writes DER, so the strict order refuses none of its names."""
    rdn = x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zz"),
                                          x509.NameAttribute(NameOID.COMMON_NAME, "aa")])
    c = self_signed(x509.Name([rdn]))
    parsed = x509.load_der_x509_certificate(der_of(c))
    assert certs.load_cert(der_of(c)).subject.text == parsed.subject.rfc4514_string()


@pytest.mark.parametrize("value", [" ", "  ", " a", "a ", "#", "#a", "a#", "\\", "\\ ", "a,b+c", "\0"])
def test_rfc_4514_escapes_at_the_edges_read_as_cryptography_writes_them(value: str) -> None:
    c = self_signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)]))
    assert certs.load_cert(der_of(c)).subject.text == c.subject.rfc4514_string()


def test_a_t61_string_reads_as_cryptography_reads_it() -> None:
    from cryptography.x509.name import _ASN1Type

    c = self_signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Zürich", _type=_ASN1Type.T61String)]))
    assert bytes([der.T61_STRING, len("Zürich".encode())]) + "Zürich".encode() in der_of(c)
    parsed = x509.load_der_x509_certificate(der_of(c))
    assert certs.load_cert(der_of(c)).subject.text == parsed.subject.rfc4514_string() == "CN=Zürich"


@pytest.mark.parametrize("bits", [b"\x07\x80\x00", b"\x00\x80", b"\x03\x80", b"\x00"],
                         ids=["trailing zero byte", "unused 0", "unused 3", "no bit"])
def test_key_usage_not_in_minimal_der_is_refused(bits: bytes) -> None:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.15"), tlv(der.BIT_STRING, bits))
    with pytest.raises(DerError, match="no bit set or trailing zero bits"):
        certs.load_cert(with_extension(ext, False))


@pytest.mark.parametrize(("bits", "want"), [(b"\x07\x80", 1 << certs.DIGITAL_SIGNATURE),
                                            (b"\x01\x06", 1 << certs.KEY_CERT_SIGN | 1 << 6),
                                            (b"\x07\x00\x80", 1 << 8)])
def test_key_usage_in_minimal_der_reads(bits: bytes, want: int) -> None:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.15"), tlv(der.BIT_STRING, bits))
    assert certs.load_cert(with_extension(ext, False)).key_usage == want


def test_bytearray_and_memoryview_inputs_read_and_verify() -> None:
    root_c, leaf = sample_chain()
    root = certs.load_cert(bytearray(der_of(root_c)))
    got = certs.load_cert(memoryview(leaf))
    assert got.der == leaf and got.issued_by(root)
    msg = b"signed"
    sig = LEAF_KEY.sign(msg)
    pub = LEAF_KEY.public_key().public_bytes_raw()
    assert ed.verify(bytearray(pub), memoryview(sig), bytearray(msg))


def test_rfc_8032s_first_vector_is_the_libcrypto_probe() -> None:
    """The probe that keeps a libcrypto refusing Ed25519 (FIPS) from refusing every bundle."""
    assert ed.verify_with_cryptography(ed._PROBE_KEY, ed._PROBE_SIG, b"")
    assert not ed.verify_with_cryptography(ed._PROBE_KEY, ed._PROBE_SIG, b"x")


def test_a_libcrypto_that_refuses_the_probe_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ed._bind() is not None  # this machine's libcrypto passes it
    monkeypatch.setattr(ed, "_verify_openssl", lambda *a: False)  # a FIPS build: every verify fails
    assert ed._bind() is None


def pem(label: str, blob: bytes) -> bytes:
    import base64

    body = base64.encodebytes(blob)
    return f"-----BEGIN {label}-----\n".encode() + body + f"-----END {label}-----\n".encode()


def test_pem_blocks_of_one_label_are_read_in_order_and_others_skipped() -> None:
    a, b = os.urandom(50), os.urandom(70)
    data = b"junk\n" + pem("CERTIFICATE", a) + pem("PRIVATE KEY", b"k") + pem("CERTIFICATE", b) + b"tail"
    assert pem_blocks(data, "CERTIFICATE") == [a, b]
    assert pem_blocks(data, "X509 CRL") == []
    assert pem_blocks(pem("CERTIFICATE REQUEST", a), "CERTIFICATE") == []


@pytest.mark.parametrize(("data", "why"), [
    (b"-----BEGIN X509 CRL-----\n" * 20000, "no END line"),  # a regex's quadratic case
    (b"-----BEGIN X509 CRL-----\n" * 20000 + b"-----END X509 CRL-----\n", "boundary line inside"),
    (b"-----BEGIN X509 CRL-----\nAAAA\n", "no END line"),
    (b"-----BEGIN X509 CRL-----\nAA-A\n-----END X509 CRL-----\n", "bad base64"),
    (b"-----BEGIN X509 CRL-----\nAAAA\n-----END CERTIFICATE-----\n", "no END line"),
    (b"-----BEGIN X509 CRL-----\nA!AA\n-----END X509 CRL-----\n", "bad base64"),
])
def test_a_damaged_pem_file_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(DerError, match=why):
        pem_blocks(data, "X509 CRL")


def crl_with(ext: x509.ExtensionType | None, serials: list[int], number: int) -> bytes:
    when = EPOCH + dt.timedelta(days=10)
    b = (x509.CertificateRevocationListBuilder().issuer_name(name_of([(NameOID.COMMON_NAME, "root")]))
         .last_update(when).next_update(when + dt.timedelta(days=1))
         .add_extension(x509.CRLNumber(number), critical=False))
    if ext is not None:
        b = b.add_extension(ext, critical=True)
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s)
                                      .revocation_date(when).build())
    return b.sign(ROOT_KEY, None).public_bytes(serialization.Encoding.DER)


SCOPED = x509.IssuingDistributionPoint(full_name=None, relative_name=None, only_contains_user_certs=True,
                                       only_contains_ca_certs=False, only_some_reasons=None,
                                       indirect_crl=False, only_contains_attribute_certs=False)


OTHER_SCOPE = x509.IssuingDistributionPoint(full_name=None, relative_name=None,
                                            only_contains_user_certs=False, only_contains_ca_certs=True,
                                            only_some_reasons=None, indirect_crl=False,
                                            only_contains_attribute_certs=False)
DELTA = x509.DeltaCRLIndicator(4)


@pytest.mark.parametrize("ext", [DELTA, SCOPED], ids=["delta", "scoped"])
def test_a_partial_crl_still_revokes_its_serials(ext: x509.ExtensionType) -> None:
    got = certs.load_crl(crl_with(ext, [8], 5))
    assert got.partial == (ext.oid.dotted_string,) and got.revoked == (8,)
    root = certs.load_cert(der_of(sample_chain()[0]))
    revoked, kept = trust.revoked_serials([crl_with(ext, [8], 5)], [root])
    assert (root.subject.text, 8) in revoked  # revoking more fails closed
    assert [k.blob for k in kept] == [crl_with(ext, [8], 5)] and kept[0].file != f"{kept[0].root_id}.crl"


def kept_blobs(blobs: list[bytes]) -> set[bytes]:
    root = certs.load_cert(der_of(sample_chain()[0]))
    return {k.blob for k in trust.revoked_serials(blobs, [root])[1]}


@pytest.mark.parametrize("ext", [DELTA, SCOPED], ids=["delta", "scoped"])
def test_a_complete_crl_and_a_newer_partial_one_are_both_kept(ext: x509.ExtensionType) -> None:
    complete, partial = crl_with(None, [8, 9], 3), crl_with(ext, [10], 7)
    assert kept_blobs([complete, partial]) == kept_blobs([partial, complete]) == {complete, partial}


def test_a_complete_crl_as_new_supersedes_a_delta_crl() -> None:
    delta, complete = crl_with(DELTA, [10], 7), crl_with(None, [8, 10], 7)
    assert kept_blobs([delta, complete]) == {complete}
    assert kept_blobs([delta, crl_with(None, [8], 6)]) == {delta, crl_with(None, [8], 6)}  # an older one not


def test_no_complete_crl_evicts_a_scoped_one() -> None:
    """CRL numbers count within a scope (RFC 5280 §5.2.3): a complete #99 says nothing of scoped #7."""
    scoped = crl_with(SCOPED, [10], 7)
    assert scoped in kept_blobs([scoped, crl_with(None, [8], 99)])


def test_each_scope_keeps_its_own_newest_crl() -> None:
    a_old, a_new, b = crl_with(SCOPED, [10], 7), crl_with(SCOPED, [10, 12], 8), crl_with(OTHER_SCOPE, [11], 8)
    assert kept_blobs([a_old, b, a_new]) == {a_new, b}


@pytest.fixture
def store(tmp_path: Path) -> TrustStore:
    root_c, _ = sample_chain()
    (tmp_path / "root.crt").write_bytes(root_c.public_bytes(serialization.Encoding.PEM))
    cfg = SimpleNamespace(keyring=tmp_path / "root.crt", crl_dir=None, state_dir=tmp_path / "state",
                          compatible="x")
    return TrustStore(cfg, None, None)  # type: ignore[arg-type]  # keep_crls reads no more


def keep(store: TrustStore, *blobs: bytes) -> set[int]:
    """What a bundle carrying ``blobs`` leaves the device's store revoking, as an install does."""
    _, kept = trust.revoked_serials([*store.stored_crls(), *blobs], store.keyring().roots)
    store.keep_crls(kept)
    revoked, _ = trust.revoked_serials(store.stored_crls(), store.keyring().roots)
    return {serial for _, serial in revoked}


@pytest.mark.parametrize("ext", [DELTA, SCOPED, OTHER_SCOPE], ids=["delta", "scoped", "other scope"])
def test_an_old_complete_crl_in_a_bundle_never_unrevokes_what_a_partial_one_revoked(
        store: TrustStore, ext: x509.ExtensionType) -> None:
    assert keep(store, crl_with(None, [8], 5), crl_with(ext, [10], 7)) == {8, 10}
    assert keep(store, crl_with(None, [8], 3)) == {8, 10}  # replayed from an old bundle
    assert keep(store, crl_with(None, [8], 1)) == {8, 10}


def test_a_newer_crl_of_one_scope_never_drops_another_scopes(store: TrustStore) -> None:
    assert keep(store, crl_with(SCOPED, [10], 7)) == {10}
    assert keep(store, crl_with(OTHER_SCOPE, [11], 8)) == {10, 11}
    assert keep(store, crl_with(SCOPED, [12], 9)) == {11, 12}  # scope A's newest replaces A's own


def test_the_store_drops_a_delta_once_a_complete_crl_covers_it(store: TrustStore) -> None:
    assert keep(store, crl_with(None, [8], 5), crl_with(DELTA, [10], 6)) == {8, 10}
    assert len(list((store.own_dir).glob("*.crl"))) == 2
    assert keep(store, crl_with(None, [8, 10], 6)) == {8, 10}
    assert [p.name for p in store.own_dir.glob("*.crl")] == [f"{trust.root_id(store.keyring().roots[0])}.crl"]


def test_a_critical_entry_extension_makes_a_crl_partial() -> None:
    when = EPOCH + dt.timedelta(days=10)
    entry = (x509.RevokedCertificateBuilder().serial_number(8).revocation_date(when)
             .add_extension(x509.CertificateIssuer([x509.DNSName("other.example")]), critical=True).build())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(name_of([(NameOID.COMMON_NAME, "root")]))
           .last_update(when).next_update(when + dt.timedelta(days=1)).add_revoked_certificate(entry)
           .sign(ROOT_KEY, None).public_bytes(serialization.Encoding.DER))
    got = certs.load_crl(crl)
    assert got.partial == ("2.5.29.29",) and got.revoked == (8,)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_as_der(data: bytes) -> None:
    for load in (certs.load_cert, certs.load_crl):
        with pytest.raises(DerError):  # 600 random bytes are never a certificate or a CRL
            load(data)
    assert trust._load_crl(data) is None


def mutate(data: st.DataObject, blob: bytes) -> bytes:
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "set":
            buf[pos] = data.draw(st.integers(0, 255))
        elif action == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif len(buf) > 1:
            del buf[pos]
    return bytes(buf)


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from([None, DELTA, SCOPED]))
def test_a_crl_damaged_anywhere_is_a_der_error_or_one_the_root_did_not_sign(
        data: st.DataObject, ext: x509.ExtensionType | None) -> None:
    original = crl_with(ext, [8, 2 ** 150], 5)
    damaged = mutate(data, original)
    root = certs.load_cert(der_of(sample_chain()[0]))
    try:
        got = certs.load_crl(damaged)
    except DerError:
        return
    assert damaged == original or not got.signed_by(root)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_certificate_damaged_anywhere_is_a_der_error_or_one_the_root_did_not_sign(
        data: st.DataObject) -> None:
    root_c, leaf = sample_chain()
    damaged = mutate(data, leaf)
    with contextlib.suppress(trust.TrustError):  # and never another exception
        trust.parse_chain(pem("CERTIFICATE", damaged))
    try:
        got = certs.load_cert(damaged)
    except DerError:
        return
    assert damaged == leaf or not got.issued_by(certs.load_cert(der_of(root_c)))
