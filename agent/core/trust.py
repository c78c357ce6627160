"""Decide whether a bundle head can be trusted. Pure: bytes and times in, a verdict out.

Order of checks (each raises its own ``TrustError``):
1. the signer chain leads to a root in the keyring, every link signed by its issuer;
2. no certificate in it is expired at the *best-known time*, none is revoked by a root-signed CRL;
3. the manifest signature is valid under the signer's key — only then is the manifest parsed;
4. the signed build time lies inside the signer's validity window;
5. ``compatible`` matches the device and ``security_version`` is not below its floor.

The clock rule (docs/trust.md): ``best_known_time = max(system clock, last trusted
time in the journal)``; the journal's value only ever grows, from the build times
of verified bundles. Expiry is judged at that time, so winding the clock back
cannot revive an expired signer. "Not yet valid" is judged at the signed build
time instead, so a Raspberry Pi that booted in 1970 can still install a bundle
from a freshly issued signer. Build times are capped by the signer's expiry, so
one bundle cannot push a device's idea of time past what its root allowed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import warnings
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.core import manifest as manifest_mod
from agent.core.frozen import Frozen
from agent.core.manifest import Manifest
from agent.errors import (
    IncompatibleBundle,
    RollbackRefused,
    SignatureError,
    SignerExpired,
    SignerRevoked,
    TrustError,
    UntrustedSigner,
)

MAX_CHAIN = 4
MAX_CHAIN_BYTES = 16 * 1024
MAX_CRL_BYTES = 256 * 1024


class Keyring(Frozen):
    roots: tuple[x509.Certificate, ...]

    @classmethod
    def from_pem(cls, data: bytes) -> Keyring:
        try:
            certs = tuple(x509.load_pem_x509_certificates(data))
        except ValueError as exc:
            raise UntrustedSigner(f"keyring is not PEM certificates: {exc}",
                                  hint="pass the root.crt made by 'edgeops keys init-root'") from None
        return cls(certs)


class DeviceFacts(Frozen):
    compatible: str | None  # None: any (for offline 'bundle verify')
    security_floor: int
    best_known_time: int  # seconds since the epoch


class Verdict(Frozen):
    manifest: Manifest
    signer_subject: str
    signer_serial: int
    signer_not_after: int
    crls: tuple[KeptCrl, ...]  # root-verified CRLs worth keeping on the device, newest per root


def best_known_time(system_now: float, journal_trusted: int) -> int:
    return max(int(system_now), journal_trusted)


def _ts(d: dt.datetime) -> int:
    return int(d.timestamp())


def parse_chain(chain_pem: bytes) -> list[x509.Certificate]:
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise UntrustedSigner(f"signer chain is {len(chain_pem)} bytes, more than {MAX_CHAIN_BYTES}")
    try:
        with warnings.catch_warnings():  # a non-positive serial warns; it is refused below
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise UntrustedSigner(f"signer chain is not PEM certificates: {exc}") from None
    if not 1 <= len(certs) <= MAX_CHAIN:
        raise UntrustedSigner(f"signer chain holds {len(certs)} certificates, expected 1 to {MAX_CHAIN}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for i, cert in enumerate(certs):
            _decode_all(cert, i)
    return certs


def _decode_all(cert: x509.Certificate, index: int) -> None:
    """Touch every field we later read: cryptography decodes names, extensions and keys on
    first use, so a damaged certificate would otherwise fail deep inside path building with
    ValueError, InvalidVersion or UnsupportedAlgorithm instead of a refusal."""
    try:
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        list(cert.extensions)
        cert.public_key()
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.version)
        serial = cert.serial_number
    except Exception as exc:  # any decoding failure of unsigned input is a refusal
        raise UntrustedSigner(f"signer chain certificate {index} is malformed: "
                              f"{type(exc).__name__}") from None
    if serial <= 0:
        raise UntrustedSigner(f"signer chain certificate {index} has a non-positive serial "
                              f"(RFC 5280 §4.1.2.2)")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _may_issue(ca: x509.Certificate, below: int) -> bool:
    """``ca`` may certify a chain with ``below`` intermediate CAs under it (RFC 5280 §4.2.1.9
    pathLenConstraint, §4.2.1.3 keyCertSign)."""
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca or (bc.path_length is not None and below > bc.path_length):
        return False
    try:
        return bool(ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
    except x509.ExtensionNotFound:
        return True


def check_signer_usage(leaf: x509.Certificate) -> None:
    """Refuse a leaf no device would accept as a bundle signer (also used by 'bundle create')."""
    if not isinstance(leaf.public_key(), ed25519.Ed25519PublicKey):
        raise UntrustedSigner("signer key is not Ed25519")
    if _is_ca(leaf):
        raise UntrustedSigner("signer certificate is a CA certificate; sign with an issued signer")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise UntrustedSigner("signer certificate does not allow digital signatures")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
            raise UntrustedSigner("signer certificate is not for code signing")
    except x509.ExtensionNotFound:
        pass


def build_path(chain: Sequence[x509.Certificate], keyring: Keyring) -> list[x509.Certificate]:
    """Return [leaf, intermediates..., root], each signed by the next, or raise UntrustedSigner."""
    path = [chain[0]]
    pool = list(chain[1:])
    for _ in range(MAX_CHAIN + 1):
        current = path[-1]
        below = len(path) - 1  # intermediate CAs already in the path
        for root in keyring.roots:
            if current.issuer == root.subject and _may_issue(root, below) and _issued_by(current, root):
                return [*path, root]
        step = next((c for c in pool if c.subject == current.issuer
                     and _may_issue(c, below) and _issued_by(current, c)), None)
        if step is None:
            break
        pool.remove(step)
        path.append(step)
    raise UntrustedSigner(f"signer '{_cn(chain[0])}' is not certified by a trusted root",
                          hint="sign with a signer issued by a root in the device keyring")


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


class KeptCrl(Frozen):
    """A root-verified CRL worth keeping: ``root_id`` names the root that signed it."""

    root_id: str  # SHA-256 prefix of the root's public key: names can repeat, keys do not
    rank: tuple[int, float]  # (CRL number, thisUpdate): higher is newer
    blob: bytes


def revoked_serials(crl_blobs: Iterable[bytes], roots: Sequence[x509.Certificate]
                    ) -> tuple[set[tuple[str, int]], tuple[KeptCrl, ...]]:
    """Serials revoked by CRLs that a trusted root signed; forged or foreign CRLs are ignored.

    Also returns the CRLs worth keeping: the newest per root (highest CRL number, then
    latest thisUpdate). A root's CRL is complete (RFC 5280 §5), so the newest one covers
    every revocation before it and the device's store stays one file per root. Roots are
    told apart by key, not name: two roots may share a subject (e.g. during a rotation).
    """
    revoked: set[tuple[str, int]] = set()
    newest: dict[str, KeptCrl] = {}
    for blob in crl_blobs:
        crl = _load_crl(blob)
        if crl is None:
            continue
        issuer = next((r for r in roots if r.subject == crl.issuer
                       and crl.is_signature_valid(r.public_key())), None)  # type: ignore[arg-type]
        if issuer is None:
            continue
        revoked.update((crl.issuer.rfc4514_string(), r.serial_number) for r in crl)
        kept = KeptCrl(root_id(issuer), (_crl_number(crl), crl.last_update_utc.timestamp()), blob)
        if kept.root_id not in newest or kept.rank > newest[kept.root_id].rank:
            newest[kept.root_id] = kept
    return revoked, tuple(newest.values())


def parses_as_crl(blob: bytes) -> bool:
    return _load_crl(blob) is not None


def _load_crl(blob: bytes) -> x509.CertificateRevocationList | None:
    """A CRL in PEM or DER of at most MAX_CRL_BYTES, or None."""
    if not blob or len(blob) > MAX_CRL_BYTES:
        return None
    try:
        return (x509.load_pem_x509_crl(blob) if blob.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(blob))
    except ValueError:
        return None


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return -1


def root_id(root: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization

    spki = root.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:16]


def verify_head(
    *,
    manifest_bytes: bytes,
    signature: bytes,
    chain_pem: bytes,
    keyring: Keyring,
    device: DeviceFacts,
    crls: Iterable[bytes] = (),
) -> Verdict:
    chain = parse_chain(chain_pem)
    path = build_path(chain, keyring)
    leaf = path[0]
    check_signer_usage(leaf)

    revoked, kept = revoked_serials(crls, keyring.roots)
    for cert, issuer in itertools.pairwise(path):
        if (issuer.subject.rfc4514_string(), cert.serial_number) in revoked:
            raise SignerRevoked(f"signer '{_cn(cert)}' (serial {cert.serial_number:x}) is revoked")

    now = device.best_known_time
    for cert in path:
        if _ts(cert.not_valid_after_utc) < now:
            when = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")
            raise SignerExpired(
                f"certificate '{_cn(cert)}' expired on {cert.not_valid_after_utc:%Y-%m-%d} "
                f"(best-known time {when})"
            )

    if len(signature) != 64:
        raise SignatureError(f"signature is {len(signature)} bytes, an Ed25519 signature is 64")
    key = leaf.public_key()
    assert isinstance(key, ed25519.Ed25519PublicKey)
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError("manifest signature does not verify under the signer's key",
                             hint="the bundle was altered after signing; obtain an intact copy") from None

    m = manifest_mod.from_bytes(manifest_bytes)

    for cert in path:
        if not _ts(cert.not_valid_before_utc) <= m.build_time <= _ts(cert.not_valid_after_utc):
            raise UntrustedSigner(
                f"bundle build time {m.build_time} lies outside the validity of '{_cn(cert)}'",
                hint="build and sign the bundle while its signer is valid",
            )
    check_policy(m, device)
    return Verdict(
        manifest=m,
        signer_subject=_cn(leaf),
        signer_serial=leaf.serial_number,
        signer_not_after=_ts(leaf.not_valid_after_utc),
        crls=kept,
    )


def check_policy(m: Manifest, device: DeviceFacts) -> None:
    if device.compatible is not None and m.compatible != device.compatible:
        raise IncompatibleBundle(
            f"bundle is for '{m.compatible}', this device is '{device.compatible}'"
        )
    if m.security_version < device.security_floor:
        raise RollbackRefused(
            f"bundle security_version {m.security_version} is below the device floor "
            f"{device.security_floor}"
        )


__all__ = [
    "DeviceFacts", "Keyring", "TrustError", "Verdict", "best_known_time", "check_policy",
    "verify_head",
]
