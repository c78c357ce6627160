"""Host side of console access: issue a technician certificate, answer a device's challenge.

A technician certificate is issued by the same offline root that certifies bundle signers
(``agent.host.keys``), with the technician purpose (``console_challenge.TECHNICIAN_OID``)
instead of code signing, so neither can stand in for the other. Revoking it is
``edgeops keys revoke`` like a signer: devices learn it from the next bundle's CRL.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.adapters import ca_store, fsutil
from agent.core import console_challenge as cc
from agent.core import pki
from agent.errors import ConfigError, UsageError
from agent.host.keys import KeyPair, load_root, load_signing_key, writing

TECHNICIAN_DAYS = 90


def issue_technician(root_dir: Path, out: Path, *, name: str, days: int = TECHNICIAN_DAYS,
                     not_before: dt.datetime | None = None) -> KeyPair:
    root_key, root_cert = load_root(root_dir)
    start = not_before or (dt.datetime.now(dt.UTC) - pki.CLOCK_SKEW)
    end = start + dt.timedelta(days=days)
    if end > root_cert.not_valid_after_utc:
        raise ConfigError(f"a technician certificate valid {days} days would outlive its root",
                          hint="issue it for fewer --days")
    key_path, cert_path = out / "technician.key", out / "technician.crt"
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
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([cc.TECHNICIAN_OID]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()),  # type: ignore[arg-type]
            critical=False)
        .sign(root_key, None)
    )
    with writing("the technician key in", out):
        out.mkdir(parents=True, exist_ok=True)
        ca_store.write_private_key(key_path, key)
        fsutil.atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return KeyPair(key_path, cert_path)


def answer(challenge_text: str, key_path: Path, cert_path: Path) -> str:
    """The line to paste back into the device's console for ``challenge_text``."""
    challenge = cc.Challenge.parse(challenge_text)
    key = load_signing_key(key_path)
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read technician certificate {cert_path}: {exc}",
                         hint="pass the technician.crt from 'edgeops console issue-technician'") from None
    leaf_key = certs[0].public_key()
    if not isinstance(leaf_key, ed25519.Ed25519PublicKey) or leaf_key.public_bytes_raw() != \
            key.public_key().public_bytes_raw():
        raise UsageError("the key does not belong to that certificate",
                         hint="pass the technician.key and technician.crt issued together")
    cc.check_technician_usage(certs[0])
    der = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    return cc.encode_answer(der, key.sign(challenge.text().encode()))
