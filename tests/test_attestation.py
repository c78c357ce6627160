"""Remote attestation: the real agent quotes its swtpm to the real controller, which verifies.

The controller runs on 127.0.0.1 (TargetTokens, no device CA: the attestation key is bound at
the device's first verified quote); the board is a sim device whose agent.toml names a real
swtpm, provisioned as at the factory. Covered: a quote verified with the boot's event log and
the booted slot; refusals of a replayed quote, an old nonce, a tampered log, an event outside
the verifier's PCR, another TPM's key, and malformed documents (422, never 5xx); the operator
forgetting a binding; and when the agent quotes (once per boot, then every attest_interval;
a controller without the routes is asked again a day later).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.adapters.ddi_http import DdiClient
from agent.adapters.rot import tpm
from agent.adapters.rot.keystore import KeystoreRoot
from agent.controller.db import open_database
from agent.controller.fleet import Fleet
from agent.controller.http import Settings
from agent.controller.serve import serve_in_thread
from agent.core import evidence
from agent.core.attest import QuoteRefused
from agent.core.fleet_config import FleetConfig
from agent.device import attestation
from agent.device.fleet import FleetAgent
from agent.device.updater import Updater
from tests.conftest import Keys
from tests.fakeddi import FakeDdi
from tests.swtpm import SwTpm


@dataclass
class Controller:
    url: str
    fleet: Fleet
    tokens: dict[str, str] = field(default_factory=dict)  # device id -> TargetToken

    def api(self, method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(method, f"{self.url}/api/v1{path}", json=body, timeout=10,
                                headers={"Authorization": "Bearer op"})

    def ddi(self, did: str, token: str, path: str, body: Any = None, *,
            data: bytes | None = None) -> requests.Response:
        return requests.post(f"{self.url}/DEFAULT/controller/v1/{did}/{path}", json=body, data=data,
                             headers={"Authorization": f"TargetToken {token}"}, timeout=10)

    def device(self, did: str) -> str:
        r = self.api("POST", "/devices", {"id": did})
        assert r.status_code == 201, r.text
        self.tokens[did] = str(r.json()["token"])
        return self.tokens[did]


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Controller]:
    (tmp_path / "ctl").mkdir()
    fleet = Fleet(open_database(str(tmp_path / "ctl" / "controller.db")), tmp_path / "ctl")
    running = serve_in_thread(fleet, Settings(api_token="op", tick_interval=3600, poll_sleep=90))
    yield Controller(running.url, fleet)
    running.stop()


@pytest.fixture
def board(tpm_board: Updater) -> Updater:
    tpm_board.cycle()  # the agent's first cycle of the boot: measures the booted slot
    return tpm_board


def _agent(ctl: Controller, up: Updater, did: str = "gw-1", **kw: Any) -> FleetAgent:
    token = ctl.device(did)
    cfg = FleetConfig(url=ctl.url, controller_id=did, auth="target", token=token, push="none", **kw)
    return FleetAgent(up, DdiClient(cfg), sleep=lambda s: None)


def _quote_doc(ctl: Controller, did: str, token: str, root: tpm.RootOfTrust) -> dict[str, Any]:
    r = ctl.ddi(did, token, evidence.CHALLENGE_PATH, {})
    assert r.status_code == 200, r.text
    return root.quote(bytes.fromhex(r.json()["nonce"])).to_dict()


def _root(up: Updater) -> tpm.RootOfTrust:
    root = up.root()
    assert root is not None
    return root


def _token(agent: FleetAgent) -> str:
    return agent.cfg.token


# --- the agent and the controller -------------------------------------------------------------
def test_agent_quote_is_verified_with_the_boot_event_log(ctl: Controller, board: Updater) -> None:
    agent = _agent(ctl, board)
    out = agent.poll_once()
    assert out.error is None
    assert any(m.startswith("attestation verified by the controller: tpm quote") for m in out.messages), \
        out.messages
    rec = ctl.api("GET", "/devices/gw-1/attestation").json()
    root = _root(board)
    device_log = [{"label": e.label, "digest": e.digest.hex()} for e in root.quote(os.urandom(16)).events]
    assert rec["result"] == "verified" and rec["kind"] == "tpm" and rec["quotes"] == 1
    assert rec["events"] == device_log and device_log  # the controller holds the device's own log
    assert rec["boot_slot"] == board.dev.runtime.booted_slot()
    assert rec["ak_sha256"] == evidence.key_digest(root.ak_public_pem())


def test_agent_quotes_once_per_boot_then_every_interval(ctl: Controller, board: Updater) -> None:
    agent = _agent(ctl, board, attest_interval=3600)
    now = [1_000_000.0]
    agent.attestor.clock = lambda: now[0]
    agent.poll_once()
    assert not any("attestation" in m for m in agent.poll_once().messages)  # same boot, same hour
    now[0] += 3601
    assert any("attestation verified" in m for m in agent.poll_once().messages)
    # A new worker process of the same boot reads the schedule from the journal: no quote.
    again = FleetAgent(board, agent.client, sleep=lambda s: None)
    again.attestor.clock = lambda: now[0]
    assert not again.attestor.due()
    # A new boot (a new boot id) quotes at its first poll.
    again.attestor.boot_id = lambda: "another-boot"
    assert again.attestor.due()
    assert ctl.api("GET", "/devices/gw-1/attestation").json()["quotes"] == 2


def test_device_without_root_of_trust_does_not_attest(ctl: Controller, updater: Updater) -> None:
    agent = _agent(ctl, updater)
    out = agent.poll_once()
    assert out.error is None and not any("attestation" in m for m in out.messages), out.messages
    assert ctl.api("GET", "/devices/gw-1/attestation").status_code == 404


def test_controller_without_attestation_is_asked_again_a_day_later(board: Updater) -> None:
    fake = FakeDdi(controller_id="gw-1", token="t")
    try:
        cfg = FleetConfig(url=fake.url, controller_id="gw-1", auth="target", token="t", push="none")
        agent = FleetAgent(board, DdiClient(cfg), sleep=lambda s: None)
        now = [1_000_000.0]
        agent.attestor.clock = lambda: now[0]
        out = agent.poll_once()
        assert out.error is None, out
        assert any("no attestation routes" in m for m in out.messages), out.messages
        now[0] += attestation.RETRY_UNSUPPORTED - 60
        assert not agent.attestor.due()
        now[0] += 120
        assert agent.attestor.due()
    finally:
        fake.close()


def test_keystore_device_attests_as_keystore(ctl: Controller, updater: Updater, pki: Keys) -> None:
    KeystoreRoot(updater.cfg.state_dir, reason="test").provision(pki.root_crt.read_bytes())
    up = Updater(updater.dev, sleep=lambda s: None)  # sees the keystore now
    up.cycle()
    out = _agent(ctl, up).poll_once()
    assert any("attestation verified by the controller: keystore" in m for m in out.messages), out
    assert ctl.api("GET", "/devices/gw-1/attestation").json()["kind"] == "keystore"


# --- refusals ---------------------------------------------------------------------------------
def _refused(r: requests.Response, words: str) -> None:
    assert r.status_code == 422, (r.status_code, r.text)
    assert r.json()["error"] == "QuoteRefused" and words in r.json()["message"], r.text


def test_replayed_quote_and_old_nonce_are_refused(ctl: Controller, board: Updater) -> None:
    agent = _agent(ctl, board)
    token, root = _token(agent), _root(board)
    doc = _quote_doc(ctl, "gw-1", token, root)
    assert ctl.ddi("gw-1", token, evidence.QUOTE_PATH, doc).status_code == 200
    _refused(ctl.ddi("gw-1", token, evidence.QUOTE_PATH, doc), "no challenge is outstanding")
    assert ctl.ddi("gw-1", token, evidence.CHALLENGE_PATH, {}).status_code == 200
    _refused(ctl.ddi("gw-1", token, evidence.QUOTE_PATH, doc), "different nonce")
    rec = ctl.api("GET", "/devices/gw-1/attestation").json()
    assert rec["result"] == "refused" and rec["refusals"] == 2 and rec["quotes"] == 1
    # The nonce of a refused answer is spent too; a fresh exchange verifies again.
    fresh = _quote_doc(ctl, "gw-1", token, root)
    assert ctl.ddi("gw-1", token, evidence.QUOTE_PATH, fresh).status_code == 200
    assert ctl.api("GET", "/devices/gw-1/attestation").json()["result"] == "verified"


def test_tampered_event_log_is_refused(ctl: Controller, board: Updater) -> None:
    agent = _agent(ctl, board)
    token, root = _token(agent), _root(board)
    doc = _quote_doc(ctl, "gw-1", token, root)
    doc["events"][0]["digest"] = ("00" * 32)  # claims another slot or image than was measured
    _refused(ctl.ddi("gw-1", token, evidence.QUOTE_PATH, doc), "differ from the expected measurements")
    doc = _quote_doc(ctl, "gw-1", token, root)
    doc["events"].append({"pcr": 16, "label": "install:rootfs:b", "digest": "11" * 32})
    _refused(ctl.ddi("gw-1", token, evidence.QUOTE_PATH, doc), "PCR [16]")


def test_quote_from_another_tpm_is_refused_until_the_operator_forgets(
        ctl: Controller, board: Updater, tmp_path: Path) -> None:
    agent = _agent(ctl, board)
    assert any("attestation verified" in m for m in agent.poll_once().messages)
    other_sw = SwTpm(tmp_path / "other-tpm").start()
    try:
        other = tpm.TpmRoot(tpm.TpmSettings(other_sw.tcti), tmp_path / "other-state")
        doc = _quote_doc(ctl, "gw-1", _token(agent), other)
        _refused(ctl.ddi("gw-1", _token(agent), evidence.QUOTE_PATH, doc), "another attestation key")
        assert ctl.api("GET", "/devices/gw-1/attestation").json()["result"] == "refused"
        # Even a document claiming the bound key fails: the signature is checked under it.
        doc = _quote_doc(ctl, "gw-1", _token(agent), other)
        doc["ak_public_pem"] = _root(board).ak_public_pem().decode()
        _refused(ctl.ddi("gw-1", _token(agent), evidence.QUOTE_PATH, doc), "does not verify")
        assert ctl.api("DELETE", "/devices/gw-1/attestation").status_code == 200
        doc = _quote_doc(ctl, "gw-1", _token(agent), other)
        assert ctl.ddi("gw-1", _token(agent), evidence.QUOTE_PATH, doc).status_code == 200
        rec = ctl.api("GET", "/devices/gw-1/attestation").json()
        assert rec["ak_sha256"] == evidence.key_digest(other.ak_public_pem())
    finally:
        other_sw.stop()


def test_attestation_routes_need_the_device_token(ctl: Controller, board: Updater) -> None:
    agent = _agent(ctl, board)
    assert ctl.ddi("gw-1", "wrong", evidence.CHALLENGE_PATH, {}).status_code == 401
    doc = _quote_doc(ctl, "gw-1", _token(agent), _root(board))
    ctl.device("gw-2")
    assert ctl.ddi("gw-2", _token(agent), evidence.QUOTE_PATH, doc).status_code == 401
    assert ctl.api("GET", "/devices/nobody/attestation").status_code == 404
    assert ctl.api("DELETE", "/devices/nobody/attestation").status_code == 404


@pytest.mark.parametrize("mangle", [
    lambda d: d.pop("kind"),
    lambda d: d.update(kind="hsm"),
    lambda d: d.update(attest="%%%"),
    lambda d: d.update(signature="A" * 5000),
    lambda d: d.update(ak_public_pem=""),
    lambda d: d.update(events="all"),
    lambda d: d.update(events=[{"pcr": 15, "label": "x", "digest": "zz"}]),
    lambda d: d.update(events=[{"pcr": 15, "label": "x\n", "digest": "00"}]),
    lambda d: d.update(events=[{"pcr": True, "label": "x", "digest": "00"}]),
    lambda d: d.update(events=[7] * (evidence.MAX_EVENTS + 1)),
])
def test_malformed_quote_documents_are_refused_not_5xx(ctl: Controller, board: Updater,
                                                       mangle: Any) -> None:
    agent = _agent(ctl, board)
    doc = _quote_doc(ctl, "gw-1", _token(agent), _root(board))
    mangle(doc)
    _refused(ctl.ddi("gw-1", _token(agent), evidence.QUOTE_PATH, doc), "quote document")


def test_quote_body_that_is_not_json_is_a_400(ctl: Controller) -> None:
    token = ctl.device("gw-1")
    r = ctl.ddi("gw-1", token, evidence.QUOTE_PATH, data=b"{not json")
    assert r.status_code == 400, r.text


# --- the pure judgement -----------------------------------------------------------------------
@pytest.fixture
def keystore(tmp_path: Path, pki: Keys) -> KeystoreRoot:
    root = KeystoreRoot(tmp_path / "ks", reason="test")
    root.provision(pki.root_crt.read_bytes())
    root.measure("boot:slot", b"b")
    root.measure("install:rootfs:a", bytes(range(32)))
    return root


def test_judge_names_the_boot_slot_and_the_installs(keystore: KeystoreRoot) -> None:
    nonce = os.urandom(32)
    ev = evidence.parse_evidence(keystore.quote(nonce).to_dict())
    j = evidence.judge(ev, bound_ak_pem=keystore.ak_public_pem(), nonce=nonce, pcr=keystore.pcr)
    assert j.boot_slot == "b"
    assert j.installs == (("install:rootfs:a", bytes(range(32)).hex()),)


def test_judge_refuses_a_quote_of_another_pcr_than_the_policy(keystore: KeystoreRoot) -> None:
    nonce = os.urandom(32)
    ev = evidence.parse_evidence(keystore.quote(nonce).to_dict())
    with pytest.raises(QuoteRefused, match="PCR"):
        evidence.judge(ev, bound_ak_pem=keystore.ak_public_pem(), nonce=nonce, pcr=keystore.pcr - 1)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.dictionaries(st.sampled_from(["kind", "attest", "signature", "ak_public_pem",
                                             "events", "pcrs", "x"]), _json, max_size=7))
def test_parse_evidence_raises_only_quote_refused(junk: dict[str, Any]) -> None:
    try:
        ev = evidence.parse_evidence(junk)
    except QuoteRefused:
        return
    assert ev.kind in evidence.KINDS  # only a document of the right shape gets through


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["attest", "signature"]), flip=st.integers(0, 10_000))
def test_any_flipped_bit_of_a_quote_is_refused(keystore: KeystoreRoot, field: str, flip: int) -> None:
    nonce = os.urandom(32)
    doc = keystore.quote(nonce).to_dict()
    raw = bytearray(base64.b64decode(doc[field]))
    raw[flip % len(raw)] ^= 1 << (flip % 8)
    bad = copy.deepcopy(doc)
    bad[field] = base64.b64encode(bytes(raw)).decode()
    ev = evidence.parse_evidence(json.loads(json.dumps(bad)))
    with pytest.raises(QuoteRefused):
        evidence.judge(ev, bound_ak_pem=keystore.ak_public_pem(), nonce=nonce, pcr=keystore.pcr)


def test_dashboard_device_page_shows_the_verdict(ctl: Controller, board: Updater) -> None:
    agent = _agent(ctl, board)
    s = requests.Session()
    r = s.post(ctl.url + "/login", data={"token": "op", "next": "/"}, allow_redirects=False, timeout=10)
    assert r.status_code == 303, r.text
    assert "attestation: none on record" in s.get(ctl.url + "/devices/gw-1", timeout=10).text
    agent.poll_once()
    html = s.get(ctl.url + "/devices/gw-1", timeout=10).text
    slot = board.dev.runtime.booted_slot()
    assert re.search(r'<p id="attestation">attestation <span class="status verified">verified</span> '
                     rf"\(tpm quote, boot slot {slot}, \d+ s ago\)</p>", html), html
    doc = _quote_doc(ctl, "gw-1", _token(agent), _root(board))
    doc["events"] = []
    ctl.ddi("gw-1", _token(agent), evidence.QUOTE_PATH, doc)
    html = s.get(ctl.url + "/devices/gw-1", timeout=10).text
    assert 'class="status refused">refused</span>' in html and "differ from the expected" in html


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.dictionaries(st.sampled_from(["kind", "attest", "signature", "ak_public_pem",
                                             "events", "pcrs"]), _json, max_size=6))
def test_quote_route_answers_any_document_without_a_5xx(ctl: Controller, junk: dict[str, Any]) -> None:
    if not ctl.fleet.devices(["gw-1"]):
        ctl.device("gw-1")
    token = "t" * 8  # not the device's: the route must still answer 401, never a 5xx
    assert ctl.ddi("gw-1", token, evidence.QUOTE_PATH, junk).status_code == 401
    r = ctl.ddi("gw-1", ctl.tokens["gw-1"], evidence.CHALLENGE_PATH, {})
    assert r.status_code == 200
    r = ctl.ddi("gw-1", ctl.tokens["gw-1"], evidence.QUOTE_PATH, junk)
    assert r.status_code == 422 and r.json()["error"] == "QuoteRefused", r.text
