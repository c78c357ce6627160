"""X.509 builders the host key tool and the controller's device CA share: root certificates, CRLs.

Pure: the keys, serial numbers and ``now`` are passed in, the certificate or CRL comes out; the
files live in ``agent.adapters.ca_store``. Both CAs are an Ed25519 root made the same way
(``edgeops keys init-root`` and ``DeviceCA.init``) with revocations in the same kind of CRL, so
one builder keeps them from drifting apart.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

ROOT_DAYS = 20 * 365
SIGNER_DAYS = 90
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start this much before "now"


def name(common_name: str) -> x509.Name:
    """O=edgeops, CN=``common_name``."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeops"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def root_certificate(key: ed25519.Ed25519PrivateKey, *, common_name: str, now: dt.datetime,
                     days: int, serial: int) -> x509.Certificate:
    """A self-signed CA certificate that may sign end-entity certificates and CRLs (no sub-CAs)."""
    return (
        x509.CertificateBuilder()
        .subject_name(name(common_name))
        .issuer_name(name(common_name))
        .public_key(key.public_key())
        .serial_number(serial)
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


def revocation_list(ca_key: ed25519.Ed25519PrivateKey, issuer: x509.Name, serials: Iterable[int], *,
                    now: dt.datetime, previous: x509.CertificateRevocationList | None = None,
                    last_update: dt.datetime | None = None) -> x509.CertificateRevocationList:
    """The CA's next CRL: ``previous``'s entries plus ``serials`` (revoked at ``now`` unless
    already listed), its CRL number one higher. lastUpdate is ``last_update``, by default
    ``now`` minus the clock skew; nextUpdate is ``ROOT_DAYS`` after ``now``."""
    known: dict[int, dt.datetime] = {}
    number = 0
    if previous is not None:
        known = {r.serial_number: r.revocation_date_utc for r in previous}
        number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    for serial in serials:
        known.setdefault(serial, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(now - CLOCK_SKEW if last_update is None else last_update)
        .next_update(now + dt.timedelta(days=ROOT_DAYS))
        .add_extension(x509.CRLNumber(number + 1), critical=False)
    )
    for serial, when in sorted(known.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return builder.sign(ca_key, None)


__all__ = ["CLOCK_SKEW", "ROOT_DAYS", "SIGNER_DAYS", "name", "revocation_list", "root_certificate"]
