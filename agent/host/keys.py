"""Host-side key management: an offline root certifies short-lived signers.

X.509 with Ed25519 keys, so chains, validity windows and revocation lists are
standard and inspectable with ``openssl x509 -text``. The root key is needed
only to issue or revoke signers, never to build a release.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError

ROOT_DAYS = 20 * 365
SIGNER_DAYS = 90
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class KeyPair:
    key_path: Path
    cert_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeops"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_root(out: Path, *, name: str = "edgeops root", days: int = ROOT_DAYS) -> KeyPair:
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / "root.key", out / "root.crt"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists", hint="choose an empty --out directory; a root is made once")
    key = ed25519.Ed25519PrivateKey.generate()
    now = _utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    _write_private(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return KeyPair(key_path, cert_path)


def load_root(root_dir: Path) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((root_dir / "root.key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((root_dir / "root.crt").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the root from {root_dir}: {exc}",
                          hint="pass the directory made by 'edgeops keys init-root'") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{root_dir}/root.key is not an Ed25519 key")
    return key, cert


def issue_signer(root_dir: Path, out: Path, *, days: int = SIGNER_DAYS,
                 name: str = "edgeops signer", not_before: dt.datetime | None = None) -> KeyPair:
    root_key, root_cert = load_root(root_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / "signer.key", out / "signer.crt"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists", hint="choose an empty --out directory")
    key = ed25519.Ed25519PrivateKey.generate()
    start = not_before or (_utcnow() - CLOCK_SKEW)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(root_key, None)
    )
    _write_private(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return KeyPair(key_path, cert_path)


def revoke(root_dir: Path, serials: list[int]) -> Path:
    """Add serials to the root's CRL (``revoked.crl``), bumping its CRL number.

    Devices learn of it from any later bundle built with ``--crl`` (the CRL is
    signed by the root, so it may travel inside bundles) or from a CRL file in
    their keyring directory.
    """
    root_key, root_cert = load_root(root_dir)
    crl_path = root_dir / "revoked.crl"
    known: dict[int, dt.datetime] = {}
    number = 0
    if crl_path.exists():
        old = x509.load_pem_x509_crl(crl_path.read_bytes())
        for r in old:
            known[r.serial_number] = r.revocation_date_utc
        number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    now = _utcnow()
    for s in serials:
        known.setdefault(s, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=ROOT_DAYS))
        .add_extension(x509.CRLNumber(number + 1), critical=False)
    )
    for serial, when in sorted(known.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(root_key, None)
    tmp = crl_path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, crl_path)
    return crl_path


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
