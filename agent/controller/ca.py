"""The controller's device CA: enrolment registry, short-lived client certificates, revocation.

A small CA in the style of ``edgeops keys init-root`` (an Ed25519 root certificate, revocations in
its ``revoked.crl``; both built by ``agent.core.pki`` and kept by ``agent.adapters.ca_store``) plus
an enrolment registry (``devices.json``) binding each device ID to one TLS public key and one
attestation key. It issues client certificates for 24 hours by default and refuses unknown,
mismatched or revoked devices; its TLS server context checks the CRL, and OpenSSL refuses expired
certificates itself.

With the fleet controller (docs/tpm.md, "mTLS to the fleet controller"): the controller serves
``server_context(require_client_cert=False)`` and runs ``check_peer`` on every request that
carries a certificate, binding it to the controllerId; devices get certificates from
``DeviceCA.issue_csr`` through ``POST …/identity/renew``. The device's side is
``agent.device.identity``; the rules both share are ``agent.core.identity``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.adapters import ca_store, fsutil
from agent.core import pki
from agent.core.identity import CERT_LIFETIME, CertTimes, check_device_id, key_fingerprint
from agent.errors import (
    CertificateExpired,
    DeviceRevoked,
    EnrolmentMismatch,
    IdentityError,
    WrongDevice,
)

MAX_SERIALS = 16  # serials kept per device: the current certificate and a few still in date
MAX_CSR = 8192
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not named by Python's ssl.VerifyFlags): the application
# judges the dates instead, so a device hears why it was refused (see server_context).
VERIFY_NO_CHECK_TIME = 0x200000
# Everything the CA writes is created 0600 (missing directories 0700), as it always was: the
# registry and the CRL are not secret, but only the controller process reads them.
_MODE, _DIR_MODE = fsutil.SECRET, 0o700


def _load_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EnrolmentMismatch("device keys are ECC P-256")
    return key


def _write(path: Path, data: bytes) -> None:
    fsutil.atomic_write(path, data, mode=_MODE, dir_mode=_DIR_MODE)


@dataclass(frozen=True)
class Enrolment:
    device_id: str
    key_fingerprint: str
    ak_public_pem: str
    kind: str  # "tpm" or "keystore"
    revoked: bool
    serials: tuple[int, ...]


class DeviceCA:
    """Files: root.key/root.crt (as ``edgeops keys init-root`` writes them), devices.json,
    revoked.crl."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._cache: tuple[tuple[int, int, int], dict[str, dict[str, object]]] | None = None
        self._crl: tuple[tuple[int, int, int], x509.CertificateRevocationList] | None = None

    @classmethod
    def init(cls, directory: Path, name: str = "edgeops device CA") -> DeviceCA:
        ca_store.create_root(directory, name=name, days=pki.ROOT_DAYS, now=dt.datetime.now(dt.UTC))
        return cls(directory)

    @property
    def cert_path(self) -> Path:
        return self.dir / ca_store.CERT_NAME

    @property
    def crl_path(self) -> Path:
        return self.dir / ca_store.CRL_NAME

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
        _write(self.dir / "devices.json", json.dumps(reg, indent=1, sort_keys=True).encode())

    def enrolment(self, device_id: str, *, fresh: bool = True) -> Enrolment:
        rec = self._registry(fresh=fresh).get(device_id)
        if rec is None:
            raise IdentityError(f"device '{device_id}' is not enrolled")
        return Enrolment(device_id, str(rec["key"]), str(rec["ak"]), str(rec["kind"]),
                         bool(rec["revoked"]), tuple(int(str(s)) for s in rec["serials"]))  # type: ignore[attr-defined]

    def enrol(self, device_id: str, tls_public_pem: bytes, ak_public_pem: bytes, kind: str) -> Enrolment:
        """Bind a device ID to its key once; a second, different key for the same ID is refused."""
        check_device_id(device_id)
        fp = key_fingerprint(_load_public(tls_public_pem))
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
        if key_fingerprint(public) != rec.key_fingerprint:
            raise EnrolmentMismatch(f"key does not match the one enrolled for '{device_id}'")
        ca_key, ca_cert = ca_store.load_root(self.dir)
        start = dt.datetime.fromtimestamp(now, dt.UTC) - pki.CLOCK_SKEW
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(pki.name(device_id))
            .issuer_name(ca_cert.subject).public_key(public).serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(start + pki.CLOCK_SKEW + dt.timedelta(seconds=lifetime))
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
        """The CRL of ``edgeops keys revoke`` (same file, same numbering), but each new CRL's
        lastUpdate is later than the previous one's: a running server holds every CRL it loaded
        and OpenSSL prefers the newest by lastUpdate (one-second resolution), so two CRLs within a
        second must differ."""
        ca_key, ca_cert = ca_store.load_root(self.dir)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        last = now - pki.CLOCK_SKEW
        old = ca_store.read_crl(self.crl_path)
        if old is not None:
            last = min(max(last, old.last_update_utc + dt.timedelta(seconds=1)), now)
        crl = pki.revocation_list(ca_key, ca_cert.subject, serials, now=now, previous=old,
                                  last_update=last)
        ca_store.write_crl(self.crl_path, crl, mode=_MODE)

    def issue_server(self, hostname: str, out: Path, *, days: int = 30) -> tuple[Path, Path]:
        """A server certificate for the controller endpoint (SAN: the name and 127.0.0.1)."""
        ca_key, ca_cert = ca_store.load_root(self.dir)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - pki.CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, None)
        )
        out.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write(out / "server.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            mode=fsutil.SECRET, dir_mode=_DIR_MODE)
        _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
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


__all__ = ["MAX_CSR", "MAX_SERIALS", "DeviceCA", "Enrolment"]
