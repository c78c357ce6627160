"""mTLS between the real fleet agent and the real controller, with a TPM-held identity.

A real swtpm (tests/swtpm.py) holds the sealed device key; the controller runs on 127.0.0.1 over
HTTPS with a DeviceCA and requires client certificates on DDI routes. Covered: first issue with
the enrolment token, polls over mTLS, renewal at two thirds of the life (the agent switches to the
new certificate), and refusals: expired, revoked, another controllerId, no certificate.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import errors
from agent.adapters.ddi_http import DdiClient
from agent.adapters.rot.keystore import KeystoreRoot
from agent.adapters.tls import mount_context
from agent.controller.ca import DeviceCA
from agent.controller.db import open_database
from agent.controller.fleet import Fleet
from agent.controller.http import Settings
from agent.controller.serve import serve_in_thread
from agent.core import evidence
from agent.core.fleet_config import FleetConfig
from agent.core.identity import CERT_LIFETIME, CertTimes
from agent.device import attestation
from agent.device.fleet import FleetAgent
from agent.device.identity import DeviceIdentity, FleetIdentity
from agent.device.updater import Updater
from agent.errors import CertificateRefused
from tests.conftest import Keys, run_cli
from tests.swtpm import SwTpm

DAY = 86400


@dataclass
class Controller:
    url: str
    ca: DeviceCA
    fleet: Fleet
    settings: Settings

    def api(self, method: str, path: str, body: Any = None) -> Any:
        r = requests.request(method, f"{self.url}/api/v1{path}", json=body, timeout=10,
                             headers={"Authorization": "Bearer op"}, verify=str(self.ca.cert_path))
        assert r.status_code < 300, r.text
        return r.json()

    def ddi(self, did: str, path: str = "", *, ctx: Any = None, method: str = "GET",
            **kw: Any) -> requests.Response:
        with requests.Session() as s:
            if ctx is not None:
                mount_context(s, self.url, ctx)
            return s.request(method, f"{self.url}/DEFAULT/controller/v1/{did}{path}", timeout=10,
                             verify=str(self.ca.cert_path), **kw)


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Controller]:
    ca = DeviceCA.init(tmp_path / "ca")
    ca.ensure_crl()
    crt, key = ca.issue_server("localhost", tmp_path / "server")
    ctx = ca.server_context(crt, key, require_client_cert=False)
    (tmp_path / "ctl").mkdir()
    fleet = Fleet(open_database(str(tmp_path / "ctl" / "controller.db")), tmp_path / "ctl")
    settings = Settings(api_token="op", device_ca=ca, ssl_context=ctx, tick_interval=3600,
                        poll_sleep=90)
    running = serve_in_thread(fleet, settings)
    assert running.url.startswith("https://127.0.0.1:")
    yield Controller(running.url, ca, fleet, settings)
    running.stop()


@pytest.fixture
def board(tpm_board: Updater) -> Updater:
    return tpm_board


def _config(ctl: Controller, did: str, token: str, **kw: Any) -> FleetConfig:
    return FleetConfig(url=ctl.url, controller_id=did, auth="target", token=token,
                       ca_cert=ctl.ca.cert_path, push="none", **kw)


def _context_with(ident: DeviceIdentity, pem: bytes, where: Path, ca: DeviceCA) -> Any:
    """An mTLS context with this device's sealed key and a given certificate for it."""
    other = DeviceIdentity(ident.root, where)
    other.store_certificate(pem)
    return other.client_context(ca.cert_path)


def _enrolled_agent(ctl: Controller, board: Updater, did: str = "gw-1") -> tuple[FleetAgent, str]:
    token = ctl.api("POST", "/devices", {"id": did})["token"]
    agent = FleetAgent(board, DdiClient(_config(ctl, did, token, identity=True)), sleep=lambda s: None)
    out = agent.poll_once()  # no certificate yet: first issue with the enrolment token, then the poll
    assert out.error is None, out
    assert any(m.startswith("identity certificate renewed") for m in out.messages), out.messages
    return agent, token


def test_agent_polls_over_mtls_with_tpm_identity_and_renews(ctl: Controller, board: Updater,
                                                            tmp_path: Path) -> None:
    agent, token = _enrolled_agent(ctl, board)
    assert agent.identity is not None and agent.identity.ident.root.kind == "tpm"
    ident = agent.identity.ident
    first = ident.certificate()
    assert first is not None
    life = CertTimes.of(first)
    assert life.not_after - life.not_before == CERT_LIFETIME + 300  # 24 h (+ skew)
    assert ctl.ca.enrolment("gw-1").kind == "tpm"
    # The poll and its configData report went over mTLS: the controller has the attributes.
    agent.poll_once()
    assert ctl.fleet.devices()[0]["attributes"].get("edgeops.compatible") == board.cfg.compatible
    # Under mTLS the TargetToken alone opens no DDI route.
    r = ctl.ddi("gw-1", headers={"Authorization": f"TargetToken {token}"})
    assert r.status_code == 401 and r.json()["error"] == "CertificateRequired", r.text
    # Only the sealed blob is on disk, never the private key in clear.
    for f in board.cfg.state_dir.rglob("*"):
        if f.is_file():
            assert b"PRIVATE KEY" not in f.read_bytes(), f

    # 17 h later (device clock) the certificate is past two thirds: the agent renews by itself,
    # authenticated by the current certificate, and switches its DDI session to the new one.
    agent.identity.min_interval = 0.0
    agent.clock = lambda: time.time() + 17 * 3600
    out = agent.poll_once()
    agent.clock = time.time
    assert out.error is None and any("renewed" in m for m in out.messages), out
    second = ident.certificate()
    assert second is not None and second.serial_number != first.serial_number
    assert second.public_key() == first.public_key()  # same sealed key, new certificate
    assert not ident.renewal_due(int(time.time()))
    # Put the old certificate on the CRL: the controller refuses it, and the agent still polls,
    # so it really uses the new one.
    ctl.ca.revoke_certificates([first.serial_number])
    old_ctx = _context_with(ident, first.public_bytes(serialization.Encoding.PEM), tmp_path / "old",
                            ctl.ca)
    r = ctl.ddi("gw-1", ctx=old_ctx)
    assert r.status_code == 403 and r.json()["error"] == "DeviceRevoked", r.text
    assert "revocation list" in r.json()["message"]
    out = agent.poll_once()
    assert out.error is None, out
    assert ctl.ddi("gw-1", ctx=ident.client_context(ctl.ca.cert_path)).status_code == 200


def test_expired_revoked_and_foreign_certificates_are_refused(ctl: Controller, board: Updater,
                                                              tmp_path: Path) -> None:
    agent, token = _enrolled_agent(ctl, board)
    assert agent.identity is not None
    ident = agent.identity.ident
    public = ident.ensure_key()

    # Expired: a certificate for the enrolled key, issued two days ago. The controller refuses it
    # with the reason, and the agent's client says why (not just "HTTP 403").
    expired = _context_with(ident, ctl.ca.issue("gw-1", public, now=time.time() - 2 * DAY),
                            tmp_path / "expired", ctl.ca)
    client = DdiClient(_config(ctl, "gw-1", token))
    mount_context(client.session, ctl.url, expired)
    with pytest.raises(CertificateRefused, match="CertificateExpired: the certificate of 'gw-1' expired"):
        client.poll()
    r = ctl.ddi("gw-1", ctx=expired)
    assert r.status_code == 403 and r.json()["error"] == "CertificateExpired", r.text

    # Another controllerId: gw-1's valid certificate cannot poll, report or renew as gw-2.
    ctl.api("POST", "/devices", {"id": "gw-2"})
    mine = ident.client_context(ctl.ca.cert_path)
    r = ctl.ddi("gw-2", ctx=mine)
    assert r.status_code == 403 and r.json()["error"] == "WrongDevice", r.text
    assert "gw-1" in r.json()["message"] and "gw-2" in r.json()["message"]
    r = ctl.ddi("gw-2", "/configData", ctx=mine, method="PUT", json={"data": {"x": "1"}})
    assert r.status_code == 403
    r = ctl.ddi("gw-2", "/identity/renew", ctx=mine, method="POST",
                json={"csr": ident.csr("gw-2").decode()})
    assert r.status_code == 403 and r.json()["error"] == "WrongDevice", r.text
    assert ctl.ddi("gw-1", ctx=mine).status_code == 200  # while its own id works

    # Revoked by the operator (registry and CRL): refused on the next request, with the reason;
    # renewal, with the certificate or with the enrolment token, is refused too.
    ctl.api("POST", "/devices/gw-1/revoke")
    assert ctl.ca.enrolment("gw-1").revoked
    out = agent.poll_once()
    assert out.error is not None and "DeviceRevoked" in out.error, out
    out = agent.poll_once()  # a refused certificate makes the agent try to renew: refused as well
    assert any("renewal failed" in m and "DeviceRevoked" in m for m in out.messages), out.messages
    assert out.error is not None and "DeviceRevoked" in out.error, out
    r = ctl.ddi("gw-1", ctx=mine)
    assert r.status_code == 403 and r.json()["error"] == "DeviceRevoked", r.text
    fi = FleetIdentity(ident, _config(ctl, "gw-1", token, identity=True))
    with pytest.raises(errors.IdentityError, match="DeviceRevoked"):
        fi.renew(int(time.time()))
    # Without a certificate, DDI routes answer 401 CertificateRequired, also named by the client.
    with pytest.raises(CertificateRefused, match="CertificateRequired"):
        DdiClient(_config(ctl, "gw-1", token)).poll()


def test_token_renewal_recovers_an_expired_certificate_and_keys_stay_bound(
        ctl: Controller, board: Updater, tmp_path: Path) -> None:
    agent, token = _enrolled_agent(ctl, board)
    assert agent.identity is not None
    ident = agent.identity.ident
    # After an outage longer than the certificate's life: renew with the enrolment token.
    ident.store_certificate(ctl.ca.issue("gw-1", ident.ensure_key(), now=time.time() - 2 * DAY))
    fi = FleetIdentity(ident, _config(ctl, "gw-1", token, identity=True), min_interval=0)
    assert ident.renewal_due(int(time.time()))
    cert = fi.renew(int(time.time()))
    assert CertTimes.of(cert).life_left(int(time.time())) > 23 * 3600
    # A CSR for another key (not the enrolled, TPM-sealed one) gets nothing, even with the token.
    from agent.adapters.rot.keystore import KeystoreRoot

    stranger = DeviceIdentity(KeystoreRoot(tmp_path / "stranger", reason="test"), tmp_path / "stranger")
    stranger.ensure_key()
    r = requests.post(f"{ctl.url}/DEFAULT/controller/v1/gw-1/identity/renew", timeout=10,
                      verify=str(ctl.ca.cert_path), headers={"Authorization": f"TargetToken {token}"},
                      json={"csr": stranger.csr("gw-1").decode()})
    assert r.status_code == 403 and r.json()["error"] == "EnrolmentMismatch", r.text
    r = requests.post(f"{ctl.url}/DEFAULT/controller/v1/gw-1/identity/renew", timeout=10,
                      verify=str(ctl.ca.cert_path), headers={"Authorization": "TargetToken wrong"},
                      json={"csr": ident.csr("gw-1").decode()})
    assert r.status_code == 401
    # The certificate names the controllerId and is for clients only.
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "gw-1"


def test_cli_serve_with_device_ca_and_tpm_renew(tmp_path: Path, sw: SwTpm, device_dir: Path,
                                                 pki: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """`controller serve --tls-cert --tls-key --device-ca`, `tpm provision`, `tpm renew`,
    `fleet poll --once` over mTLS, `controller device revoke`: the commands an operator runs."""
    ca = DeviceCA.init(tmp_path / "ca")
    crt, key = ca.issue_server("localhost", tmp_path / "server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"https://127.0.0.1:{port}"
    for k, v in {"EDGEOPS_CONTROLLER_TOKEN": "op", "EDGEOPS_CONTROLLER_URL": url,
                 "EDGEOPS_CONTROLLER_CA": str(ca.cert_path)}.items():
        monkeypatch.setenv(k, v)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "controller", "serve", "--db",
                             str(tmp_path / "c.db"), "--listen", f"127.0.0.1:{port}",
                             "--tls-cert", str(crt), "--tls-key", str(key), "--device-ca", str(ca.dir)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            try:
                requests.get(f"{url}/_empty", timeout=1, verify=str(ca.cert_path))
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        added = run_cli("controller", "device", "add", "gw-1", "--json", check=True).stdout
        token = json.loads(added)["token"]
        toml = device_dir / "agent.toml"
        toml.write_text(toml.read_text() + f'\n[tpm]\ntcti = "{sw.tcti}"\n\n[fleet]\nurl = "{url}"\n'
                        f'controller_id = "gw-1"\nauth = "target"\ntoken = "{token}"\n'
                        f'ca_cert = "{ca.cert_path}"\nidentity = true\npush = "none"\n')
        run_cli("tpm", "provision", "--config", toml, "--device-id", "gw-1", check=True)
        out = run_cli("tpm", "renew", "--config", toml, check=True).stdout
        assert "identity certificate renewed for gw-1" in out, out
        status = run_cli("tpm", "status", "--config", toml, check=True).stdout
        assert re.search(r"Identity certificate: valid for another (24 h|23 h 5\d min)", status), status
        poll = run_cli("fleet", "poll", "--once", "--config", toml)
        assert poll.returncode == 0 and "poll failed" not in poll.stdout, poll.stdout + poll.stderr
        assert ca.enrolment("gw-1").kind == "tpm"
        assert "attestation verified by the controller: tpm quote" in poll.stdout, poll.stdout
        said = run_cli("controller", "device", "attestation", "gw-1", check=True).stdout
        assert said.startswith("gw-1: verified (tpm quote of PCR 15"), said
        run_cli("controller", "device", "revoke", "gw-1", check=True)
        poll = run_cli("fleet", "poll", "--once", "--config", toml)
        assert "DeviceRevoked" in poll.stdout, poll.stdout + poll.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_configuration_errors_are_clear(tmp_path: Path) -> None:
    from agent.core.fleet_config import parse_fleet
    from agent.errors import ConfigError

    base = {"url": "https://c.example", "controller_id": "gw-1"}
    cfg = parse_fleet({**base, "identity": True, "ca_cert": "ca.crt"}, tmp_path)
    assert cfg.identity and cfg.ca_cert == tmp_path / "ca.crt"
    for bad in ({"identity": True}, {"identity": True, "ca_cert": "a", "client_cert": "c"},
                {"identity": "yes", "ca_cert": "a"}):
        with pytest.raises(ConfigError, match="identity"):
            parse_fleet({**base, **bad}, tmp_path)
    bad_cli = run_cli("controller", "serve", "--db", tmp_path / "c.db", "--device-ca", tmp_path)
    assert bad_cli.returncode != 0 and "--device-ca (mTLS) needs HTTPS" in bad_cli.stderr
    assert not (tmp_path / "c.db").exists()  # refused before anything was created


def test_agent_attests_under_the_key_its_enrolment_bound(ctl: Controller, board: Updater,
                                                         tmp_path: Path) -> None:
    agent, _ = _enrolled_agent(ctl, board)  # its first poll renewed, then quoted over mTLS
    rec = ctl.api("GET", "/devices/gw-1/attestation")
    enrolled = ctl.ca.enrolment("gw-1").ak_public_pem.encode()
    assert rec["result"] == "verified" and rec["kind"] == "tpm", rec
    assert rec["ak_sha256"] == evidence.key_digest(enrolled)
    # The registry's key is the one quotes must verify under: enrolled with another AK, the
    # same TPM's quote is refused (a device whose TPM is not the one it enrolled with).
    registry = ctl.ca.dir / "devices.json"
    reg = json.loads(registry.read_text())
    reg["gw-1"]["ak"] = KeystoreRoot(tmp_path / "elsewhere", reason="test").ak_public_pem().decode()
    registry.write_text(json.dumps(reg))
    agent.journal.put(attestation.KEY, None)  # due again now
    out = agent.poll_once()
    assert any("attestation refused by the controller (HTTP 422)" in m
               and "another attestation key" in m for m in out.messages), out.messages
    assert ctl.api("GET", "/devices/gw-1/attestation")["result"] == "refused"
