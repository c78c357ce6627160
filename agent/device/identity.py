"""The device's identity: a sealed key, its certificate, and renewal for the fleet agent's mTLS.

``DeviceIdentity``: the private key is sealed to the TPM (or kept in the keystore) and unsealed
only into an anonymous in-memory file (memfd) long enough for ``ssl`` to load it. Why not a
TPM-resident key through the tpm2 OpenSSL provider: docs/tpm.md ("mTLS") records what was tried
and failed.

``FleetIdentity`` is the fleet agent's side: it keeps the DDI session on the current certificate
(``agent.adapters.tls.mount_context``) and renews it through ``POST …/identity/renew`` when
``agent.core.identity.renewal_due`` says so. The controller's side is ``agent.controller.ca``.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.adapters import fsutil, rot
from agent.adapters.download import new_session
from agent.adapters.rot import RootOfTrust
from agent.adapters.tls import http_failure, mount_context, transport_failure
from agent.core.config import AgentConfig
from agent.core.fleet_config import FleetConfig
from agent.core.identity import RENEW_PATH, CertTimes, check_device_id, renewal_due, spki
from agent.errors import (
    CertificateExpired,
    CertificateRefused,
    ConfigError,
    EnrolmentMismatch,
    IdentityError,
    StateError,
    TransportError,
)

SEALED_NAME = "identity_key"


# --- the device's key and certificate --------------------------------------------------------
class DeviceIdentity:
    """The device's TLS key, sealed by its root of trust, and its certificate in
    ``<state_dir>/identity/identity.crt``."""

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
        if not isinstance(theirs, ec.EllipticCurvePublicKey) or spki(theirs) != spki(ours):
            raise EnrolmentMismatch("the certificate is for another key than this device's")
        fsutil.atomic_write(self.cert_path, pem, mode=fsutil.SECRET, dir_mode=0o700)

    def renewal_due(self, best_known_time: int, *, connectivity_returned: bool = False) -> bool:
        cert = self.certificate()
        return renewal_due(CertTimes.of(cert) if cert else None, best_known_time,
                           connectivity_returned=connectivity_returned)

    def csr(self, device_id: str) -> bytes:
        """A certificate signing request for the device ID, signed by the sealed key (proof of
        possession for the controller)."""
        check_device_id(device_id)
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


# --- the agent's side of renewal -------------------------------------------------------------
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
    def for_agent(cls, agent_cfg: AgentConfig, cfg: FleetConfig) -> FleetIdentity:
        """The identity of the device ``agent_cfg`` describes, opened once when the agent starts."""
        root = rot.open_root(agent_cfg.tpm, agent_cfg.state_dir)
        return cls(DeviceIdentity(root, agent_cfg.state_dir), cfg)

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
        if cert is not None and CertTimes.of(cert).valid_at(best_known_time):
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


__all__ = ["SEALED_NAME", "DeviceIdentity", "FleetIdentity"]
