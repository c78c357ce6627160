"""Device identity rules both ends share: device IDs, key fingerprints, certificate life, renewal.

Pure: certificates and keys come in as ``cryptography`` objects, the time as a number. The
controller's CA (``agent.controller.ca``) issues and checks by these rules and the device
(``agent.device.identity``) renews by them, so the two can never disagree on, say, what counts
as "two thirds of its life".

Renewal follows the clock rule of ``agent.core.trust``: the device judges time by
``best_known_time`` (never earlier than the journal's trusted time), renews at two thirds of the
certificate's life, right after connectivity returns, and whenever the certificate is expired or
not yet valid at that time.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ConfigError

CERT_LIFETIME = 24 * 3600  # seconds a device certificate lives, by default
RENEW_AT = 2 / 3  # of the certificate's life
RENEW_PATH = "identity/renew"  # under the device's DDI base URL: POST a CSR, get a certificate
MAX_DEVICE_ID = 64


def check_device_id(device_id: str) -> None:
    """A device ID is a certificate's CN and a URL path segment: keep it short and plain."""
    if not (0 < len(device_id) <= MAX_DEVICE_ID and device_id.replace("-", "").replace(".", "").isalnum()):
        raise ConfigError(f"device ID {device_id!r} must be 1-{MAX_DEVICE_ID} letters, digits, '-' or '.'")


def spki(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The key's DER SubjectPublicKeyInfo: what "the same key" means when comparing keys."""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the SPKI, hex: how the CA's registry remembers a device's key."""
    h = hashes.Hash(hashes.SHA256())
    h.update(spki(public_key))
    return h.finalize().hex()


@dataclass(frozen=True)
class CertTimes:
    """A certificate's validity window, in seconds since the epoch."""

    not_before: int
    not_after: int

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertTimes:
        return cls(int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp()))

    def life_left(self, best_known_time: int) -> int:
        return self.not_after - best_known_time

    def valid_at(self, best_known_time: int) -> bool:
        return self.not_before <= best_known_time < self.not_after

    def renew_after(self) -> int:
        return self.not_before + int((self.not_after - self.not_before) * RENEW_AT)


def renewal_due(times: CertTimes | None, best_known_time: int, *, connectivity_returned: bool = False
                ) -> bool:
    """Renew when there is no certificate, at 2/3 of its life, after an outage, or when it is not
    valid at the best-known time (a clock wound back cannot make an old certificate look fresh)."""
    if times is None or connectivity_returned:
        return True
    return not times.not_before <= best_known_time < times.renew_after()


__all__ = ["CERT_LIFETIME", "MAX_DEVICE_ID", "RENEW_AT", "RENEW_PATH", "CertTimes",
           "check_device_id", "key_fingerprint", "renewal_due", "spki"]
