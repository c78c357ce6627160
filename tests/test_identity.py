"""Device identity: enrolment, 24 h certificates, renewal, expiry, revocation, mTLS on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import errors
from agent.adapters.rot import tpm
from agent.adapters.rot.keystore import KeystoreRoot
from agent.controller.ca import DeviceCA
from agent.core.identity import CERT_LIFETIME, CertTimes, renewal_due
from agent.device.identity import DeviceIdentity
from tests.swtpm import SwTpm, require_swtpm

DAY = 86400


@pytest.fixture(params=["tpm", "keystore"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tpm.RootOfTrust]:
    if request.param == "keystore":
        yield KeystoreRoot(tmp_path / "state", reason="test")
        return
    require_swtpm()
    sw = SwTpm(tmp_path / "tpmstate").start()
    yield tpm.TpmRoot(tpm.TpmSettings(sw.tcti), tmp_path / "state")
    sw.stop()


@pytest.fixture
def ca(tmp_path: Path) -> DeviceCA:
    return DeviceCA.init(tmp_path / "ca")


def _enrolled(ca: DeviceCA, root: tpm.RootOfTrust, state: Path, *, now: float | None = None,
              device_id: str = "gw-1") -> DeviceIdentity:
    ident = DeviceIdentity(root, state)
    public = ident.ensure_key()
    ca.enrol(device_id, public, root.ak_public_pem(), root.kind)
    ident.store_certificate(ca.issue(device_id, public, now=time.time() if now is None else now))
    return ident


@dataclass
class Outcome:
    server_saw: str | None = None
    server_error: Exception | None = None
    client_error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _mtls(ca: DeviceCA, tmp_path: Path, client: ssl.SSLContext) -> Outcome:
    cert, key = ca.issue_server("localhost", tmp_path / "server")
    sctx = ca.server_context(cert, key)
    out = Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with sctx.wrap_socket(conn, server_side=True) as s:
                peer = s.getpeercert(binary_form=True)
                assert peer is not None
                out.server_saw = ca.check_peer(peer, now=time.time())
                s.sendall(b"ok")
        except Exception as exc:  # recorded for the assertion in the test thread
            out.server_error = exc
        finally:
            listener.close()
            out.done.set()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with client.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                server_hostname="localhost") as s:
            if s.recv(2) != b"ok":
                raise ssl.SSLError("server closed without confirming")
    except (ssl.SSLError, OSError) as exc:
        out.client_error = exc
    assert out.done.wait(5)
    return out


def test_mtls_with_sealed_identity(root: tpm.RootOfTrust, ca: DeviceCA, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ident = _enrolled(ca, root, state)
    out = _mtls(ca, tmp_path, ident.client_context(ca.cert_path))
    assert out.server_error is None and out.client_error is None
    assert out.server_saw == "gw-1"
    # the private key exists on disk only sealed (TPM) or as the keystore's 0600 file
    for f in state.rglob("*"):
        if f.is_file():
            assert b"PRIVATE KEY" not in f.read_bytes() or root.kind == "keystore", f
            assert f.stat().st_mode & 0o077 == 0 or f.suffix == ".crt", f


def test_certificate_is_short_lived_and_for_clients(root: tpm.RootOfTrust, ca: DeviceCA,
                                                    tmp_path: Path) -> None:
    ident = _enrolled(ca, root, tmp_path / "state")
    cert = ident.certificate()
    assert cert is not None
    life = CertTimes.of(cert)
    assert life.not_after - life.not_before == CERT_LIFETIME + 300
    assert cert.subject.rfc4514_string().endswith("CN=gw-1") or "CN=gw-1" in cert.subject.rfc4514_string()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_expired_certificate_refused(ca: DeviceCA, tmp_path: Path) -> None:
    root = KeystoreRoot(tmp_path / "state", reason="test")
    ident = _enrolled(ca, root, tmp_path / "state", now=time.time() - 2 * DAY)
    out = _mtls(ca, tmp_path, ident.client_context(ca.cert_path))
    assert out.server_saw is None
    assert isinstance(out.server_error, ssl.SSLError) and "expired" in str(out.server_error)
    assert out.client_error is not None
    cert = ident.certificate()
    assert cert is not None
    with pytest.raises(errors.CertificateExpired):
        ca.check_peer(cert.public_bytes(serialization.Encoding.DER), now=time.time())


def test_revoked_device_refused(root: tpm.RootOfTrust, ca: DeviceCA, tmp_path: Path) -> None:
    ident = _enrolled(ca, root, tmp_path / "state")
    ca.revoke("gw-1")
    with pytest.raises(errors.DeviceRevoked):
        ca.issue("gw-1", ident.ensure_key(), now=time.time())
    out = _mtls(ca, tmp_path, ident.client_context(ca.cert_path))  # the CRL is checked by TLS
    assert out.server_saw is None
    assert isinstance(out.server_error, ssl.SSLError) and "revoked" in str(out.server_error)


def test_renewal_keeps_the_key_and_extends_life(ca: DeviceCA, tmp_path: Path) -> None:
    root = KeystoreRoot(tmp_path / "state", reason="test")
    t0 = time.time() - 17 * 3600
    ident = _enrolled(ca, root, tmp_path / "state", now=t0)
    assert ident.renewal_due(int(time.time()))  # 17 h of 24: past two thirds
    old = ident.certificate()
    ident.store_certificate(ca.issue("gw-1", ident.ensure_key(), now=time.time()))
    new = ident.certificate()
    assert old is not None and new is not None and new.serial_number != old.serial_number
    assert new.public_key() == old.public_key()
    assert not ident.renewal_due(int(time.time()))
    assert ident.renewal_due(int(time.time()), connectivity_returned=True)
    out = _mtls(ca, tmp_path, ident.client_context(ca.cert_path))
    assert out.server_saw == "gw-1"


def test_enrolment_binds_one_key(ca: DeviceCA, tmp_path: Path) -> None:
    a = DeviceIdentity(KeystoreRoot(tmp_path / "a", reason="test"), tmp_path / "a")
    b = DeviceIdentity(KeystoreRoot(tmp_path / "b", reason="test"), tmp_path / "b")
    ca.enrol("gw-1", a.ensure_key(), b"ak", "keystore")
    with pytest.raises(errors.EnrolmentMismatch):
        ca.enrol("gw-1", b.ensure_key(), b"ak", "keystore")
    with pytest.raises(errors.EnrolmentMismatch):
        ca.issue("gw-1", b.ensure_key(), now=time.time())
    with pytest.raises(errors.IdentityError):
        ca.issue("gw-2", b.ensure_key(), now=time.time())
    with pytest.raises(errors.EnrolmentMismatch):  # a certificate for someone else's key
        a.store_certificate(_issue_for(ca, b))


def _issue_for(ca: DeviceCA, ident: DeviceIdentity) -> bytes:
    ca.enrol("gw-b", ident.ensure_key(), b"ak", "keystore")
    return ca.issue("gw-b", ident.ensure_key(), now=time.time())


NB, NA = 1_000_000, 1_000_000 + 24 * 3600


@pytest.mark.parametrize(("now", "connectivity", "due"), [
    (NB + 3600, False, False),            # fresh
    (NB + 15 * 3600, False, False),       # before two thirds (16 h)
    (NB + 16 * 3600, False, True),        # at two thirds
    (NA + 1, False, True),                # expired
    (NB - 10, False, True),               # clock before the certificate: not trusted, renew
    (NB + 3600, True, True),              # connectivity just returned
])
def test_renewal_policy(now: int, connectivity: bool, due: bool) -> None:
    assert renewal_due(CertTimes(NB, NA), now, connectivity_returned=connectivity) is due
    assert renewal_due(None, now)


@pytest.mark.parametrize(("now", "valid"), [(NB - 1, False), (NB, True), (NA - 1, True), (NA, False)])
def test_certificate_valid_at(now: int, valid: bool) -> None:
    assert CertTimes(NB, NA).valid_at(now) is valid


def test_crl_builder_keeps_entries_and_counts_up(tmp_path: Path) -> None:
    import datetime as dt

    from agent.adapters.ca_store import load_root
    from agent.core import pki

    DeviceCA.init(tmp_path / "ca")
    key, cert = load_root(tmp_path / "ca")
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    first = pki.revocation_list(key, cert.subject, [7], now=t0)
    second = pki.revocation_list(key, cert.subject, [7, 9], now=t0 + dt.timedelta(hours=1),
                                 previous=first, last_update=t0 + dt.timedelta(seconds=1))
    assert first.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    assert {r.serial_number: r.revocation_date_utc for r in second} == {
        7: t0, 9: t0 + dt.timedelta(hours=1)}  # a serial keeps its first revocation date
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
               for c in (first, second)]
    assert numbers == [1, 2]
    assert first.last_update_utc == t0 - pki.CLOCK_SKEW
    assert second.last_update_utc == t0 + dt.timedelta(seconds=1)
