"""Device identity: an enrolled key, short-lived client certificates, mutual TLS.

Controller side, ``DeviceCA``: a small CA in the style of ``agent.host.keys`` (an
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

Renewal follows the clock rule of ``agent.core.trust``: the device judges time by
``best_known_time`` (never earlier than the journal's trusted time), renews at
two thirds of the certificate's life, right after connectivity returns, and
whenever the certificate is expired or not yet valid at that time.

With the fleet controller (docs/tpm.md, "mTLS to the fleet controller"): the controller serves
``server_context(require_client_cert=False)`` and runs ``check_peer`` on every request that
carries a certificate, binding it to the controllerId; devices get certificates from
``DeviceCA.issue_csr`` through ``POST …/identity/renew``. ``FleetIdentity`` is the agent's side:
it keeps the DDI session on the current certificate (``ContextAdapter``) and renews it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from requests.adapters import HTTPAdapter

from agent.adapters import fsutil
from agent.adapters.rot import RootOfTrust
from agent.errors import ConfigError, StateError, TransportError, TrustError
from agent.host import keys

if TYPE_CHECKING:
    from agent.device.fleet import FleetConfig

CERT_LIFETIME = 24 * 3600
RENEW_AT = 2 / 3
SEALED_NAME = "identity_key"
MAX_DEVICE_ID = 64
MAX_SERIALS = 16  # serials kept per device: the current certificate and a few still in date
MAX_CSR = 8192
RENEW_PATH = "identity/renew"
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not named by Python's ssl.VerifyFlags): the application
# judges the dates instead, so a device hears why it was refused (see server_context).
VERIFY_NO_CHECK_TIME = 0x200000


class IdentityError(TrustError):
    hint = "enrol the device again or ask the operator to check its record"


class DeviceRevoked(IdentityError):
    hint = "the device was revoked; it must be re-enrolled by an operator"


class CertificateExpired(IdentityError):
    hint = "renew the certificate ('edgeops tpm renew' or wait for the agent to do it)"


class EnrolmentMismatch(IdentityError):
    pass


class CertificateRequired(IdentityError):
    hint = "connect with the device's client certificate (mTLS); see docs/tpm.md"


class WrongDevice(IdentityError):
    hint = "a device certificate is valid only for the controllerId it names"


class CertificateRefused(TransportError):
    """The controller ended the TLS handshake over our client certificate (expired, revoked...)."""

    hint = "renew the certificate ('edgeops tpm renew'); a revoked device must be re-enrolled"


_ALERT = re.compile(r"alert ([a-z ]+?)\s*(?:\(|$|'|\"|\))", re.IGNORECASE)


def tls_alert(exc: BaseException) -> str | None:
    """The TLS alert an exception reports (e.g. 'certificate expired'), if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # requests wraps urllib3 wraps ssl
        seen.add(id(e))
        m = _ALERT.search(str(e))
        if m:
            return m.group(1).strip().lower()
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                m = _ALERT.search(str(arg))
                if m:
                    return m.group(1).strip().lower()
        e = e.__cause__ or e.__context__
    return None


_REFUSALS = ("CertificateExpired", "CertificateRequired", "DeviceRevoked", "WrongDevice",
             "EnrolmentMismatch", "IdentityError")


def http_failure(what: str, code: int, body: bytes) -> TransportError:
    """A clear TransportError for an HTTP error answer; ``CertificateRefused`` when an edgeops
    controller refused the device's certificate (its JSON error names the reason)."""
    error = message = ""
    if code in (401, 403):
        try:
            doc = json.loads(body[:4096])
            error, message = str(doc.get("error", "")), str(doc.get("message", ""))
        except (ValueError, AttributeError):
            pass
    if error in _REFUSALS:
        return CertificateRefused(f"{what} answered HTTP {code}: {error}: {message}")
    return TransportError(f"{what} answered HTTP {code}" + (f": {error}" if error else ""))


def transport_failure(what: str, exc: BaseException) -> TransportError:
    """A clear TransportError for a failed request: says so when the controller refused our
    certificate at the TLS handshake (alerts: certificate expired, certificate revoked, ...)."""
    alert = tls_alert(exc)
    if alert is not None and ("certificate" in alert or alert in ("unknown ca", "bad certificate")):
        return CertificateRefused(f"{what} failed: the controller refused this device's certificate "
                                  f"(TLS alert: {alert})")
    detail = f" (TLS alert: {alert})" if alert else ""
    return TransportError(f"{what} failed: {type(exc).__name__}{detail}")


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
        self._cache: tuple[tuple[int, int, int], dict[str, dict[str, object]]] | None = None
        self._crl: tuple[tuple[int, int, int], x509.CertificateRevocationList] | None = None

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

    def _registry(self, *, fresh: bool = True) -> dict[str, dict[str, object]]:
        """The registry; ``fresh=False`` (read-only callers: every mTLS request) may return a copy
        cached until the file changes (it is replaced by rename, so the inode changes)."""
        path = self.dir / "devices.json"
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if not fresh and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        reg = dict(json.loads(path.read_text()))
        if not fresh:
            self._cache = (key, reg)
        return reg

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise registry changes across threads and controller processes (flock)."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save(self, reg: dict[str, dict[str, object]]) -> None:
        fsutil.atomic_write(self.dir / "devices.json", json.dumps(reg, indent=1, sort_keys=True).encode(),
                            mode=fsutil.SECRET, dir_mode=0o700)

    def enrolment(self, device_id: str, *, fresh: bool = True) -> Enrolment:
        rec = self._registry(fresh=fresh).get(device_id)
        if rec is None:
            raise IdentityError(f"device '{device_id}' is not enrolled")
        return Enrolment(device_id, str(rec["key"]), str(rec["ak"]), str(rec["kind"]),
                         bool(rec["revoked"]), tuple(int(str(s)) for s in rec["serials"]))  # type: ignore[attr-defined]

    def enrol(self, device_id: str, tls_public_pem: bytes, ak_public_pem: bytes, kind: str) -> Enrolment:
        """Bind a device ID to its key once; a second, different key for the same ID is refused."""
        _check_device_id(device_id)
        fp = _fingerprint(_load_public(tls_public_pem))
        with self._locked():
            reg = self._registry()
            old = reg.get(device_id)
            if old is not None and (old["key"] != fp or old["revoked"]):
                raise EnrolmentMismatch(f"device '{device_id}' is enrolled with another key or revoked")
            if old is None:
                reg[device_id] = {"key": fp, "ak": ak_public_pem.decode(), "kind": kind,
                                  "revoked": False, "serials": []}
                self._save(reg)
        return self.enrolment(device_id)

    def issue(self, device_id: str, tls_public_pem: bytes, *, now: float,
              lifetime: int = CERT_LIFETIME) -> bytes:
        with self._locked():
            return self._issue(device_id, tls_public_pem, now=now, lifetime=lifetime)

    def _issue(self, device_id: str, tls_public_pem: bytes, *, now: float, lifetime: int) -> bytes:
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
        # Renewal every 16 h adds a serial each time: keep the newest few (the certificate in use
        # and any still in date). An older one is refused by check_peer as unknown.
        reg[device_id]["serials"] = [*rec.serials, serial][-MAX_SERIALS:]
        self._save(reg)
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_csr(self, device_id: str, csr_pem: bytes, *, now: float, lifetime: int = CERT_LIFETIME,
                  enrol: tuple[bytes, str] | None = None) -> bytes:
        """Issue from a CSR: its signature proves the requester holds the key, its subject must
        name the device. ``enrol`` = (AK public PEM, kind) first binds an unknown device to the
        CSR's key (the caller has authenticated the request with the enrolment token)."""
        if len(csr_pem) > MAX_CSR:
            raise IdentityError("certificate request too large")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise IdentityError("not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise IdentityError("the certificate request's signature does not verify")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [str(n.value) for n in names] != [device_id]:
            raise WrongDevice(f"the certificate request names {[str(n.value) for n in names]}, "
                              f"not '{device_id}'")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise EnrolmentMismatch("device keys are ECC P-256")
        public_pem = public.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
        if enrol is not None and device_id not in self._registry():
            self.enrol(device_id, public_pem, enrol[0], enrol[1])
        return self.issue(device_id, public_pem, now=now, lifetime=lifetime)

    def revoke(self, device_id: str) -> None:
        """Refuse the device from now on: registry first (issue), then the CRL (TLS)."""
        with self._locked():
            rec = self.enrolment(device_id)
            reg = self._registry()
            reg[device_id]["revoked"] = True
            self._save(reg)
            self._publish_crl(list(rec.serials) or [0])

    def revoke_certificates(self, serials: list[int]) -> None:
        """Put single certificates (a leaked or superseded one) on the CRL; the device stays."""
        with self._locked():
            self._publish_crl(serials)

    def ensure_crl(self) -> None:
        """An empty CRL if none exists yet, so a server can always check revocations."""
        with self._locked():
            if not self.crl_path.exists():
                self._publish_crl([])

    def _publish_crl(self, serials: list[int]) -> None:
        """``keys.revoke``'s CRL (same file, same numbering), but each new CRL's lastUpdate is later
        than the previous one's: a running server holds every CRL it loaded and OpenSSL prefers the
        newest by lastUpdate (one-second resolution), so two CRLs within a second must differ."""
        ca_key, ca_cert = keys.load_root(self.dir)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        last = now - keys.CLOCK_SKEW
        known: dict[int, dt.datetime] = {}
        number = 0
        if self.crl_path.exists():
            old = x509.load_pem_x509_crl(self.crl_path.read_bytes())
            known = {r.serial_number: r.revocation_date_utc for r in old}
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            last = min(max(last, old.last_update_utc + dt.timedelta(seconds=1)), now)
        for serial in serials:
            known.setdefault(serial, now)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(last).next_update(now + dt.timedelta(days=keys.ROOT_DAYS))
                   .add_extension(x509.CRLNumber(number + 1), critical=False))
        for serial, when in sorted(known.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        crl = builder.sign(ca_key, None)
        fsutil.atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM),
                            mode=fsutil.SECRET, dir_mode=0o700)

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
        fsutil.atomic_write(out / "server.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            mode=fsutil.SECRET, dir_mode=0o700)
        fsutil.atomic_write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM),
                            mode=fsutil.SECRET, dir_mode=0o700)
        return out / "server.crt", out / "server.key"

    def server_context(self, cert: Path, key: Path, *, require_client_cert: bool = True
                       ) -> ssl.SSLContext:
        """mTLS server: a client certificate chained to this CA, not expired, not on the CRL.

        ``require_client_cert=False`` is the fleet controller's mode. A client without a
        certificate gets in (a device fetching its first certificate with its enrolment token, an
        operator on /api), and OpenSSL checks only the chain and the purpose (clientAuth); the
        dates and the CRL are left to ``check_peer``, which the controller runs on every request
        that carries a certificate. Why: asyncio (and uvloop) close the connection on a failed
        handshake without sending the TLS alert, so a device refused by OpenSSL sees only
        "connection closed"; refused by ``check_peer`` it gets 403 with the reason
        (CertificateExpired, DeviceRevoked) and knows to renew or to stop."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=str(self.cert_path))
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.reload_crl(ctx)
        else:
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.verify_flags |= VERIFY_NO_CHECK_TIME
        return ctx

    def reload_crl(self, ctx: ssl.SSLContext) -> None:
        """Add the current CRL to a (running) server context that checks it at the handshake.
        OpenSSL keeps every CRL it was given and uses the newest (``_publish_crl`` makes each
        newer). ``check_peer`` reads the CRL and the registry itself on every request anyway."""
        if self.crl_path.exists():
            ctx.load_verify_locations(cafile=str(self.crl_path))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

    def check_peer(self, peer_der: bytes, *, now: float, device_id: str | None = None) -> str:
        """After the handshake: the device is enrolled, not revoked, the certificate one we issued
        and in date, and (``device_id``) it names the device the request speaks for."""
        cert = x509.load_der_x509_certificate(peer_der)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1:
            raise IdentityError("the client certificate names no single device")
        cn = str(names[0].value)
        if device_id is not None and cn != device_id:
            raise WrongDevice(f"the client certificate is for '{cn}', not for '{device_id}'")
        rec = self.enrolment(cn, fresh=False)
        if rec.revoked:
            raise DeviceRevoked(f"device '{cn}' is revoked")
        crl = self._current_crl()
        if crl is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number):
            raise DeviceRevoked(f"the certificate of '{cn}' (serial {cert.serial_number:x}) is on "
                                "the device CA's revocation list")
        if cert.serial_number not in rec.serials:
            raise DeviceRevoked(f"device '{cn}' presented a certificate this CA does not list "
                                f"(serial {cert.serial_number:x}): superseded or never issued")
        times = CertTimes.of(cert)
        if times.life_left(int(now)) <= 0:
            end = dt.datetime.fromtimestamp(times.not_after, dt.UTC)
            raise CertificateExpired(f"the certificate of '{cn}' expired {end:%Y-%m-%d %H:%M} UTC")
        if now < times.not_before:
            raise CertificateExpired(f"the certificate of '{cn}' is not valid yet")
        return cn

    def _current_crl(self) -> x509.CertificateRevocationList | None:
        try:
            st = self.crl_path.stat()
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._crl is None or self._crl[0] != key:
            self._crl = (key, x509.load_pem_x509_crl(self.crl_path.read_bytes()))
        return self._crl[1]


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
        fsutil.atomic_write(self.cert_path, pem, mode=fsutil.SECRET, dir_mode=0o700)

    def renewal_due(self, best_known_time: int, *, connectivity_returned: bool = False) -> bool:
        cert = self.certificate()
        return renewal_due(CertTimes.of(cert) if cert else None, best_known_time,
                           connectivity_returned=connectivity_returned)

    def csr(self, device_id: str) -> bytes:
        """A certificate signing request for the device ID, signed by the sealed key (proof of
        possession for the controller)."""
        _check_device_id(device_id)
        req = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(self._private(), hashes.SHA256()))
        return req.public_bytes(serialization.Encoding.PEM)

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


# --- the agent's side of renewal -----------------------------------------------------------------
class ContextAdapter(HTTPAdapter):
    """A requests adapter whose connections use one SSLContext: how the in-memory identity key
    (``client_context``) reaches requests, which otherwise takes key *files* only."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, ssl_context=self.ctx, **pool_kwargs)


def mount_context(session: requests.Session, url: str, ctx: ssl.SSLContext) -> None:
    """Use ``ctx`` for every request to ``url``'s origin, closing the previous adapter's pooled
    connections so no request keeps using an older certificate."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    prefix = f"{parts.scheme}://{parts.netloc}/"
    old = session.adapters.get(prefix)
    session.mount(prefix, ContextAdapter(ctx))
    if old is not None:
        old.close()


class FleetIdentity:
    """The device identity as the fleet agent uses it: keeps the DDI session's TLS on the current
    certificate, and renews through ``POST …/{controllerId}/identity/renew`` — with the current
    certificate while it is valid at the best-known time, else (or if the controller refuses it
    at the handshake) with the enrolment token (the TargetToken), which also enrols a new device.

    Completed renewals (issued or refused) are at most one per ``min_interval`` seconds of
    monotonic time: a device whose clock is behind the controller's sees every new certificate as
    "not yet valid" and would otherwise renew on every poll."""

    def __init__(self, ident: DeviceIdentity, cfg: FleetConfig, *, min_interval: float = 300.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if cfg.ca_cert is None:
            raise ConfigError("[fleet] identity needs ca_cert: the CA that signed the controller's "
                              "TLS certificate")
        if not cfg.url.startswith("https://"):
            raise ConfigError("[fleet] identity needs an https:// url")
        self.ident, self.cfg = ident, cfg
        self.min_interval, self.monotonic = min_interval, monotonic
        self.sessions: list[requests.Session] = []
        self._last: float | None = None

    @classmethod
    def for_agent(cls, config_path: Path, state_dir: Path, cfg: FleetConfig) -> FleetIdentity:
        from agent.adapters import rot

        root = rot.open_root(rot.load_settings(config_path), state_dir)
        return cls(DeviceIdentity(root, state_dir), cfg)

    def attach(self, session: requests.Session) -> None:
        """Keep ``session``'s connections to the controller on the current certificate."""
        self.sessions.append(session)
        if self.ident.certificate() is not None:
            mount_context(session, self.cfg.url, self._mtls())

    def _mtls(self) -> ssl.SSLContext:
        assert self.cfg.ca_cert is not None
        return self.ident.client_context(self.cfg.ca_cert)

    def maybe_renew(self, best_known_time: int, *, connectivity_returned: bool = False,
                    refused: bool = False) -> x509.Certificate | None:
        """Renew when ``renewal_due`` says so, at most once per ``min_interval`` — except right
        after the controller ``refused`` the certificate (the caller's backoff paces that)."""
        if not refused:
            if not self.ident.renewal_due(best_known_time,
                                          connectivity_returned=connectivity_returned):
                return None
            if self._last is not None and self.monotonic() - self._last < self.min_interval:
                return None
        return self.renew(best_known_time)

    def renew(self, best_known_time: int) -> x509.Certificate:
        """Fetch a new certificate for the sealed key, store it and switch the sessions to it."""
        cfg = self.cfg
        root = self.ident.root
        self.ident.ensure_key()  # normally made by 'edgeops tpm provision'
        body = {"csr": self.ident.csr(cfg.controller_id).decode(), "kind": root.kind,
                "ak_public_pem": root.ak_public_pem().decode()}
        cert = self.ident.certificate()
        ways: list[str] = []
        if cert is not None and CertTimes.of(cert).life_left(best_known_time) > 0 \
                and CertTimes.of(cert).not_before <= best_known_time:
            ways.append("certificate")
        if cfg.token and cfg.auth != "gateway":
            ways.append("token")
        if not ways:
            raise CertificateExpired(
                "no certificate valid at the best-known time and no enrolment token to get one",
                hint="set [fleet] token or token_file (the device's TargetToken), or re-enrol")
        last: TransportError | None = None
        for way in ways:
            try:
                pem = self._post(body, way)
            except CertificateRefused as exc:  # e.g. expired by the controller's clock: use the token
                last = exc
                continue
            self._last = self.monotonic()
            self.ident.store_certificate(pem)
            ctx = self._mtls()
            for s in self.sessions:
                mount_context(s, cfg.url, ctx)
            new = self.ident.certificate()
            assert new is not None
            return new
        assert last is not None
        raise last

    def _post(self, body: dict[str, str], way: str) -> bytes:
        from agent.adapters.download import new_session

        cfg = self.cfg
        assert cfg.ca_cert is not None
        url = f"{cfg.base_url}/{RENEW_PATH}"
        headers = {"Accept": "application/json"}
        with new_session() as session:
            if way == "certificate":
                mount_context(session, cfg.url, self._mtls())
            else:
                headers["Authorization"] = f"TargetToken {cfg.token}"
            try:
                resp = session.post(url, json=body, headers=headers, verify=str(cfg.ca_cert),
                                    timeout=(cfg.download.connect_timeout, cfg.download.read_timeout),
                                    allow_redirects=False)
            except (requests.RequestException, OSError) as exc:
                raise transport_failure(f"certificate renewal ({way})", exc) from None
            with resp:
                code, text = resp.status_code, resp.text[:4096]
        if code == 200:
            try:
                pem = json.loads(text)["certificate"]
            except (ValueError, KeyError, TypeError):
                raise TransportError("certificate renewal: the controller's answer has no "
                                     "'certificate'") from None
            return str(pem).encode()
        try:
            err = json.loads(text)
            why = f"{err.get('error')}: {err.get('message')}"
        except (ValueError, AttributeError):
            why = text[:200]
        if way == "certificate" and code in (401, 403):
            # e.g. expired by the controller's clock while ours says valid: the token may still do
            raise http_failure("certificate renewal (certificate)", code, text.encode())
        if 400 <= code < 500 and code not in (408, 429):
            self._last = self.monotonic()
            raise IdentityError(f"the controller refused the certificate renewal ({way}): "
                                f"HTTP {code} {why}")
        raise TransportError(f"certificate renewal ({way}) answered HTTP {code} {why}")


__all__ = [
    "CERT_LIFETIME",
    "CertTimes",
    "CertificateExpired",
    "CertificateRefused",
    "CertificateRequired",
    "ContextAdapter",
    "DeviceCA",
    "DeviceIdentity",
    "DeviceRevoked",
    "EnrolmentMismatch",
    "FleetIdentity",
    "IdentityError",
    "WrongDevice",
    "http_failure",
    "mount_context",
    "renewal_due",
    "tls_alert",
    "transport_failure",
]
