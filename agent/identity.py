"""Device identity: an enrolled key, short-lived client certificates, mutual TLS.

Controller side, ``DeviceCA``: a small CA in the style of ``agent.keys`` (an
Ed25519 CA certificate made by ``keys.init_root``, revocations in its
``revoked.crl`` via ``keys.revoke``) plus an enrolment registry binding each
device ID to one TLS public key and one attestation key. It issues client
certificates for 24 hours by default and refuses unknown, mismatched or revoked
devices; its TLS server context checks the CRL, and OpenSSL refuses expired
certificates itself.

Device side, ``DeviceIdentity``: the private key is sealed to the TPM (or kept
in the keystore) and unsealed only into an anonymous in-memory file (memfd)
long enough for ``ssl`` to load it. Why not a TPM-resident key through the
tpm2 OpenSSL provider: docs/tpm.md ("mTLS") records what was tried and failed.

Renewal follows the clock rule of ``agent.trust``: the device judges time by
``best_known_time`` (never earlier than the journal's trusted time), renews at
two thirds of the certificate's life, right after connectivity returns, and
whenever the certificate is expired or not yet valid at that time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import keys
from agent.errors import ConfigError, StateError, TrustError
from agent.tpm import RootOfTrust, _write_file

CERT_LIFETIME = 24 * 3600
RENEW_AT = 2 / 3
SEALED_NAME = "identity_key"
MAX_DEVICE_ID = 64


class IdentityError(TrustError):
    hint = "enrol the device again or ask the operator to check its record"


class DeviceRevoked(IdentityError):
    hint = "the device was revoked; it must be re-enrolled by an operator"


class CertificateExpired(IdentityError):
    hint = "renew the certificate ('edgeops tpm renew' or wait for the agent to do it)"


class EnrolmentMismatch(IdentityError):
    pass


def _spki(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    h = hashes.Hash(hashes.SHA256())
    h.update(_spki(public_key))
    return h.finalize().hex()


def _check_device_id(device_id: str) -> None:
    if not (0 < len(device_id) <= MAX_DEVICE_ID and device_id.replace("-", "").replace(".", "").isalnum()):
        raise ConfigError(f"device ID {device_id!r} must be 1-{MAX_DEVICE_ID} letters, digits, '-' or '.'")


def _load_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EnrolmentMismatch("device keys are ECC P-256")
    return key


# --- pure renewal policy -------------------------------------------------------------------------
@dataclass(frozen=True)
class CertTimes:
    not_before: int
    not_after: int

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertTimes:
        return cls(int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp()))

    def life_left(self, best_known_time: int) -> int:
        return self.not_after - best_known_time

    def renew_after(self) -> int:
        return self.not_before + int((self.not_after - self.not_before) * RENEW_AT)


def renewal_due(times: CertTimes | None, best_known_time: int, *, connectivity_returned: bool = False
                ) -> bool:
    """Renew when there is no certificate, at 2/3 of its life, after an outage, or when it is not
    valid at the best-known time (a clock wound back cannot make an old certificate look fresh)."""
    if times is None or connectivity_returned:
        return True
    return not times.not_before <= best_known_time < times.renew_after()


# --- the controller's CA -------------------------------------------------------------------------
@dataclass(frozen=True)
class Enrolment:
    device_id: str
    key_fingerprint: str
    ak_public_pem: str
    kind: str  # "tpm" or "keystore"
    revoked: bool
    serials: tuple[int, ...]


class DeviceCA:
    """Files: ca.key/ca.crt (as keys.init_root writes root.key/root.crt), devices.json, revoked.crl."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @classmethod
    def init(cls, directory: Path, name: str = "edgeops device CA") -> DeviceCA:
        keys.init_root(directory, name=name)
        return cls(directory)

    @property
    def cert_path(self) -> Path:
        return self.dir / "root.crt"

    @property
    def crl_path(self) -> Path:
        return self.dir / "revoked.crl"

    def _registry(self) -> dict[str, dict[str, object]]:
        path = self.dir / "devices.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def _save(self, reg: dict[str, dict[str, object]]) -> None:
        _write_file(self.dir / "devices.json", json.dumps(reg, indent=1, sort_keys=True).encode())

    def enrolment(self, device_id: str) -> Enrolment:
        rec = self._registry().get(device_id)
        if rec is None:
            raise IdentityError(f"device '{device_id}' is not enrolled")
        return Enrolment(device_id, str(rec["key"]), str(rec["ak"]), str(rec["kind"]),
                         bool(rec["revoked"]), tuple(int(str(s)) for s in rec["serials"]))  # type: ignore[attr-defined]

    def enrol(self, device_id: str, tls_public_pem: bytes, ak_public_pem: bytes, kind: str) -> Enrolment:
        """Bind a device ID to its key once; a second, different key for the same ID is refused."""
        _check_device_id(device_id)
        fp = _fingerprint(_load_public(tls_public_pem))
        reg = self._registry()
        old = reg.get(device_id)
        if old is not None and (old["key"] != fp or old["revoked"]):
            raise EnrolmentMismatch(f"device '{device_id}' is enrolled with another key or revoked")
        if old is None:
            reg[device_id] = {"key": fp, "ak": ak_public_pem.decode(), "kind": kind, "revoked": False,
                              "serials": []}
            self._save(reg)
        return self.enrolment(device_id)

    def issue(self, device_id: str, tls_public_pem: bytes, *, now: float,
              lifetime: int = CERT_LIFETIME) -> bytes:
        rec = self.enrolment(device_id)
        if rec.revoked:
            raise DeviceRevoked(f"device '{device_id}' is revoked")
        public = _load_public(tls_public_pem)
        if _fingerprint(public) != rec.key_fingerprint:
            raise EnrolmentMismatch(f"key does not match the one enrolled for '{device_id}'")
        ca_key, ca_cert = keys.load_root(self.dir)
        start = dt.datetime.fromtimestamp(now, dt.UTC) - keys.CLOCK_SKEW
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeops"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(ca_cert.subject).public_key(public).serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(start + keys.CLOCK_SKEW + dt.timedelta(seconds=lifetime))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, None)
        )
        reg = self._registry()
        reg[device_id]["serials"] = [*rec.serials, serial]
        self._save(reg)
        return cert.public_bytes(serialization.Encoding.PEM)

    def revoke(self, device_id: str) -> None:
        """Refuse the device from now on: registry first (issue), then the CRL (TLS)."""
        rec = self.enrolment(device_id)
        reg = self._registry()
        reg[device_id]["revoked"] = True
        self._save(reg)
        keys.revoke(self.dir, list(rec.serials) or [0])

    def issue_server(self, hostname: str, out: Path, *, days: int = 30) -> tuple[Path, Path]:
        """A server certificate for the controller endpoint (SAN: the name and 127.0.0.1)."""
        import ipaddress

        ca_key, ca_cert = keys.load_root(self.dir)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - keys.CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, None)
        )
        out.mkdir(parents=True, exist_ok=True)
        _write_file(out / "server.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return out / "server.crt", out / "server.key"

    def server_context(self, cert: Path, key: Path) -> ssl.SSLContext:
        """mTLS server: client certificate required, chained to this CA, not expired, not on the CRL."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(self.cert_path))
        if self.crl_path.exists():
            ctx.load_verify_locations(cafile=str(self.crl_path))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx

    def check_peer(self, peer_der: bytes, *, now: float) -> str:
        """After the handshake: the device is enrolled, not revoked, and the certificate in date."""
        cert = x509.load_der_x509_certificate(peer_der)
        device_id = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        rec = self.enrolment(device_id)
        if rec.revoked or cert.serial_number not in rec.serials:
            raise DeviceRevoked(f"device '{device_id}' is revoked or presented an unknown certificate")
        if CertTimes.of(cert).life_left(int(now)) <= 0:
            raise CertificateExpired(f"certificate of '{device_id}' expired")
        return device_id


# --- the device's side ---------------------------------------------------------------------------
class DeviceIdentity:
    def __init__(self, root: RootOfTrust, state_dir: Path) -> None:
        self.root = root
        self.cert_path = state_dir / "identity" / "identity.crt"

    def _private(self) -> ec.EllipticCurvePrivateKey:
        scalar = self.root.unseal(SEALED_NAME)
        if len(scalar) != 32:
            raise StateError("the sealed identity key is not a P-256 private scalar")
        return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())

    def ensure_key(self) -> bytes:
        """The device's TLS public key (PEM), creating and sealing the private key the first time."""
        try:
            key = self._private()
        except StateError:
            key = ec.generate_private_key(ec.SECP256R1())
            # The bare 32-byte scalar: a TPM seals at most 128 bytes (MAX_SYM_DATA), PKCS#8 is larger.
            self.root.seal(SEALED_NAME, key.private_numbers().private_value.to_bytes(32, "big"))
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)

    def certificate(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except FileNotFoundError:
            return None

    def store_certificate(self, pem: bytes) -> None:
        cert = x509.load_pem_x509_certificate(pem)
        ours = self._private().public_key()
        theirs = cert.public_key()
        if not isinstance(theirs, ec.EllipticCurvePublicKey) or _spki(theirs) != _spki(ours):
            raise EnrolmentMismatch("the certificate is for another key than this device's")
        _write_file(self.cert_path, pem)

    def renewal_due(self, best_known_time: int, *, connectivity_returned: bool = False) -> bool:
        cert = self.certificate()
        return renewal_due(CertTimes.of(cert) if cert else None, best_known_time,
                           connectivity_returned=connectivity_returned)

    def client_context(self, ca_pem_path: Path) -> ssl.SSLContext:
        """An mTLS client context. The key is unsealed into a memfd (never a file on disk) that
        is closed as soon as OpenSSL has read it; the plaintext lives only in this process."""
        if self.certificate() is None:
            raise StateError("the device has no identity certificate yet",
                             hint="enrol the device and fetch a certificate first")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(ca_pem_path))
        pem = self._private().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        fd = os.memfd_create("edgeops-identity", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(self.cert_path, keyfile=f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx


__all__ = ["CERT_LIFETIME", "CertTimes", "CertificateExpired", "DeviceCA", "DeviceIdentity",
           "DeviceRevoked", "EnrolmentMismatch", "IdentityError", "renewal_due"]
