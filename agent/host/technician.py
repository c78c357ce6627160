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

from agent.core import console_challenge as cc
from agent.core import trust
from agent.errors import UsageError
from agent.host.keys import KeyPair, issue_leaf, load_signing_key

TECHNICIAN_DAYS = 90


def issue_technician(root_dir: Path, out: Path, *, name: str, days: int = TECHNICIAN_DAYS,
                     not_before: dt.datetime | None = None) -> KeyPair:
    return issue_leaf(root_dir, out, stem="technician", what="a technician certificate",
                      name=name, days=days, usage=x509.ObjectIdentifier(cc.TECHNICIAN_OID),
                      not_before=not_before)


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
    der = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    cc.check_technician_usage(trust.parse_certificate(der[0], 0))
    return cc.encode_answer(der, key.sign(challenge.text().encode()))
