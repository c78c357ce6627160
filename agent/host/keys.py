"""Host-side key management: an offline root certifies short-lived signers.

X.509 with Ed25519 keys, so chains, validity windows and revocation lists are
standard and inspectable with ``openssl x509 -text``. The root key is needed
only to issue or revoke signers, never to build a release.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.adapters import ca_store, fsutil
from agent.core import pki, trust
from agent.errors import ConfigError, OutputError, TrustError

# The root and its CRL are built the way the controller's device CA builds its own (agent.core.pki).
ROOT_DAYS = pki.ROOT_DAYS
SIGNER_DAYS = pki.SIGNER_DAYS
CLOCK_SKEW = pki.CLOCK_SKEW


@dataclass(frozen=True)
class KeyPair:
    key_path: Path
    cert_path: Path


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turn a failed write of a host tool's output into one line naming the path."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {what} {exc.filename or path}: {exc.strerror}") from None


def init_root(out: Path, *, name: str = "edgeops root", days: int = ROOT_DAYS) -> KeyPair:
    with writing("the root in", out):
        return KeyPair(*ca_store.create_root(out, name=name, days=days, now=_utcnow()))


def load_root(root_dir: Path) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    return ca_store.load_root(root_dir)


def issue_signer(root_dir: Path, out: Path, *, days: int = SIGNER_DAYS,
                 name: str = "edgeops signer", not_before: dt.datetime | None = None) -> KeyPair:
    return issue_leaf(root_dir, out, stem="signer", what="a signer", name=name, days=days,
                      usage=ExtendedKeyUsageOID.CODE_SIGNING, not_before=not_before)


def issue_leaf(root_dir: Path, out: Path, *, stem: str, what: str, name: str, days: int,
               usage: x509.ObjectIdentifier, not_before: dt.datetime | None = None) -> KeyPair:
    """A new Ed25519 key in ``out/STEM.key`` (0600) and its certificate from the root, for one
    purpose (``usage``: code signing for bundle signers, the technician purpose for console
    logins), so that neither can stand in for the other."""
    root_key, root_cert = load_root(root_dir)
    start = not_before or (_utcnow() - CLOCK_SKEW)
    end = start + dt.timedelta(days=days)
    if end > root_cert.not_valid_after_utc:
        # A device checks the whole chain at the best-known time: the leaf would die with the root.
        raise ConfigError(f"{what} valid {days} days would outlive its root "
                          f"(the root expires {root_cert.not_valid_after_utc:%Y-%m-%d})",
                          hint="issue it for fewer --days, or make a new root first")
    key_path, cert_path = out / f"{stem}.key", out / f"{stem}.crt"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists", hint="choose an empty --out directory")
    key = ed25519.Ed25519PrivateKey.generate()
    cert = (
        x509.CertificateBuilder()
        .subject_name(pki.name(name))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(root_key, None)
    )
    with writing(f"the {stem} key in", out):
        out.mkdir(parents=True, exist_ok=True)
        ca_store.write_private_key(key_path, key)
        fsutil.atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return KeyPair(key_path, cert_path)


def revoke(root_dir: Path, serials: list[int]) -> Path:
    """Add serials to the root's CRL (``revoked.crl``), bumping its CRL number.

    Devices learn of it from any later bundle built with ``--crl`` (the CRL is
    signed by the root, so it may travel inside bundles) or from a CRL file in
    their keyring directory.
    """
    root_key, root_cert = load_root(root_dir)
    if root_cert.serial_number in serials:
        # A root listed in its own CRL would make every device distrust the whole fleet at once.
        raise ConfigError("that serial is the root's own: a root cannot revoke itself",
                          hint="to retire a root, rotate the device keyring ('edgeops tpm rotate')")
    crl_path = root_dir / ca_store.CRL_NAME
    crl = pki.revocation_list(root_key, root_cert.subject, serials, now=_utcnow(),
                              previous=ca_store.read_crl(crl_path))
    with writing("the revocation list", crl_path):
        ca_store.write_crl(crl_path, crl)
    return crl_path


def check_signer(key: ed25519.Ed25519PrivateKey, chain_pem: bytes) -> None:
    """Refuse, before a bundle is written, a key and certificate no device would accept:
    a key that is not the certificate's, or a certificate that is no signer (a root, a CA)."""
    try:
        chain = trust.parse_chain(chain_pem)
        trust.check_signer_usage(chain[0])
    except TrustError as exc:
        raise ConfigError(f"signer certificate refused: {exc}",
                          hint="sign with a key and certificate from 'edgeops keys issue-signer'") from None
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if chain[0].ed25519_key != key.public_key().public_bytes(*raw):
        raise ConfigError("the signing key does not match the signer certificate",
                          hint="pass the signer.key that was issued with this signer.crt")


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load signing key {path}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key", hint="use a key from 'edgeops keys issue-signer'")
    return key


def cert_serial(path: Path) -> int:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc}") from None


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()
