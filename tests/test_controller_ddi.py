"""The controller's DDI and management API over real HTTP on 127.0.0.1, SQLite on disk."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.host import keys
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import Keys, run_cli


@pytest.fixture
def ctl(tmp_path: Path, pki: Keys) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600, poll_sleep=90)
    yield c
    c.stop()


def upload(ctl: LocalController, path: Path) -> requests.Response:
    with open(path, "rb") as f:
        return requests.post(f"{ctl.url}/api/v1/bundles?filename={path.name}", data=f, timeout=30,
                             headers={"Authorization": f"Bearer {ctl.token}"})


def ddi(ctl: LocalController, did: str, token: str, path: str = "", method: str = "GET",
        **kw: object) -> requests.Response:
    return requests.request(method, f"{ctl.url}/DEFAULT/controller/v1/{did}{path}", timeout=10,
                            headers={"Authorization": f"TargetToken {token}"}, **kw)  # type: ignore[arg-type]


def test_poll_shapes_deployment_and_feedback(ctl: LocalController, make_bundle) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1", "site": "a"})["token"]
    base = ddi(ctl, "dev1", token).json()
    # DdiControllerBase: polling sleep as HH:MM:SS, this device's share of the configured 90 s
    # spread by +-10 % (controller.shaping); configData asked for until attributes arrive
    h, m, sec = (int(x) for x in base["config"]["polling"]["sleep"].split(":"))
    assert 81 <= h * 3600 + m * 60 + sec <= 99
    assert base["_links"]["configData"]["href"].endswith("/DEFAULT/controller/v1/dev1/configData")
    assert ddi(ctl, "dev1", token, "/configData", "PUT",
               json={"mode": "merge", "data": {"version": "1.0", "hw": "2"}}).status_code == 200
    assert "_links" not in ddi(ctl, "dev1", token).json()

    path = make_bundle("2.0", size=5000)
    bundle = upload(ctl, path).json()
    assert bundle["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    ctl.api("POST", "/deployments", {"bundle": bundle["id"], "device": "dev1"})
    href = ddi(ctl, "dev1", token).json()["_links"]["deploymentBase"]["href"]
    assert "/DEFAULT/controller/v1/dev1/deploymentBase/" in href and "?c=" in href
    doc = requests.get(href, headers={"Authorization": f"TargetToken {token}"}, timeout=10).json()
    # DdiDeploymentBase: id as a string, download/update handling, chunks with artifacts
    assert doc["deployment"]["download"] in ("skip", "attempt", "forced")
    chunk = doc["deployment"]["chunks"][0]
    assert chunk["version"] == "2.0"
    art = chunk["artifacts"][0]
    assert art["size"] == path.stat().st_size
    assert set(art["hashes"]) == {"sha1", "md5", "sha256"}
    url = art["_links"]["download"]["href"]
    auth = {"Authorization": f"TargetToken {token}"}
    whole = requests.get(url, headers=auth, timeout=10)
    assert whole.status_code == 200 and whole.content == path.read_bytes()
    part = requests.get(url, headers={**auth, "Range": "bytes=100-"}, timeout=10)
    assert part.status_code == 206 and part.content == path.read_bytes()[100:]
    assert part.headers["Content-Range"] == f"bytes 100-{art['size'] - 1}/{art['size']}"
    assert requests.get(url, timeout=10).status_code == 401  # artifacts need the device token too

    fb = f"/deploymentBase/{doc['id']}/feedback"
    assert ddi(ctl, "dev1", token, fb, "POST", json={"status": {"execution": "bogus"}}).status_code == 400
    closed = {"status": {"execution": "closed", "result": {"finished": "success"}, "details": ["ok"]}}
    for _ in range(2):  # an offline queue may replay a report: the second changes nothing
        assert ddi(ctl, "dev1", token, fb, "POST", json=closed).status_code == 200
    assert ctl.api("GET", "/actions?device=dev1")["actions"][0]["status"] == "success"
    assert ctl.api("GET", "/devices")["devices"][0]["version"] == "2.0"
    assert "_links" not in ddi(ctl, "dev1", token).json()


def test_auth_is_required(ctl: LocalController) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    assert ddi(ctl, "dev1", "wrong").status_code == 401
    assert ddi(ctl, "nobody", token).status_code == 401
    assert requests.get(f"{ctl.url}/DEFAULT/controller/v1/dev1", timeout=10).status_code == 401
    assert requests.get(f"{ctl.url}/api/v1/devices", timeout=10).status_code == 401
    assert requests.get(f"{ctl.url}/api/v1/devices", headers={"Authorization": "Bearer nope"},
                        timeout=10).status_code == 401
    err = requests.get(f"{ctl.url}/api/v1/devices", timeout=10).json()
    assert err["error"] == "Unauthorized" and "Bearer" in err["hint"]


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/deployments", {"bundle": "one", "device": "dev1"}),
    ("POST", "/deployments", {"bundle": [1], "group": "g"}),
    ("POST", "/rollouts", {"bundle": {"id": 1}, "group": "g"}),
    ("GET", "/actions?rollout=abc", None),
    ("GET", "/actions?rollout=99999999999999999999", None),
])
def test_malformed_api_requests_are_400_not_500(ctl: LocalController, method: str, path: str,
                                                body: object) -> None:
    ctl.api("POST", "/devices", {"id": "dev1"})  # targets exist: only the bad field is wrong
    ctl.api("POST", "/groups", {"name": "g", "devices": ["dev1"]})
    r = requests.request(method, f"{ctl.url}/api/v1{path}", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {ctl.token}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "BadRequest"


def test_a_number_too_large_for_an_id_is_400(ctl: LocalController) -> None:
    ctl.api("POST", "/devices", {"id": "dev1"})
    r = requests.post(f"{ctl.url}/api/v1/deployments", data='{"bundle": 1e400, "device": "dev1"}',
                      headers={"Authorization": f"Bearer {ctl.token}",
                               "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "BadRequest"


def test_upload_rejects_untrusted_and_damaged_bundles(ctl: LocalController, make_bundle,
                                                      tmp_path: Path) -> None:
    other = keys.init_root(tmp_path / "other-root")
    signer = keys.issue_signer(tmp_path / "other-root", tmp_path / "other-signer")
    foreign = make_bundle("2.0", size=5000, signer=(signer.key_path, signer.cert_path))
    r = upload(ctl, foreign)
    assert r.status_code == 422 and r.json()["error"] == "UntrustedSigner", r.text
    assert other.cert_path.exists()

    damaged = make_bundle("2.1", size=200_000)
    raw = bytearray(damaged.read_bytes())
    raw[-20_000] ^= 1  # one bit inside the payload: only the block hashes can catch it
    damaged.write_bytes(bytes(raw))
    r = upload(ctl, damaged)
    assert r.status_code == 422 and r.json()["error"] == "HashMismatch", r.text
    assert ctl.api("GET", "/bundles")["bundles"] == []
    assert [p.name for p in (ctl.fleet.artifacts).iterdir()] == []  # nothing half-stored


def test_cancel_action_shape(ctl: LocalController, make_bundle) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    bid = upload(ctl, make_bundle("2.0", size=5000)).json()["id"]
    rid = ctl.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})["id"]
    aid = ctl.api("GET", "/actions")["actions"][0]["id"]
    ctl.api("POST", f"/rollouts/{rid}/cancel")
    links = ddi(ctl, "dev1", token).json()["_links"]
    assert "deploymentBase" not in links
    doc = ddi(ctl, "dev1", token, f"/cancelAction/{aid}").json()
    assert doc == {"id": str(aid), "cancelAction": {"stopId": str(aid)}}  # DdiCancel
    assert ddi(ctl, "dev1", token, f"/deploymentBase/{aid}").status_code == 404
    rej = {"status": {"execution": "rejected", "result": {"finished": "none"}}}
    assert ddi(ctl, "dev1", token, f"/cancelAction/{aid}/feedback", "POST", json=rej).status_code == 200
    assert ctl.api("GET", "/actions")["actions"][0]["status"] == "running"  # device carries on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_cli(port: int, env: dict[str, str], *args: str | Path) -> subprocess.Popen[str]:
    """`edgeops controller serve` in a subprocess, returned once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "controller", "serve",
                             "--listen", f"127.0.0.1:{port}", *map(str, args)],
                            env=env, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        try:
            requests.get(f"http://127.0.0.1:{port}/_empty", timeout=1)
            return proc
        except requests.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"controller did not start: {proc.communicate()[1]}")


def test_cli_serve_and_manage(tmp_path: Path, pki: Keys, make_bundle) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "EDGEOPS_CONTROLLER_TOKEN": "op-token", "EDGEOPS_CONTROLLER_URL": url}
    proc = serve_cli(port, env, "--db", tmp_path / "c.db", "--keyring", pki.root_crt)
    try:
        os.environ["EDGEOPS_CONTROLLER_TOKEN"], old = "op-token", os.environ.get("EDGEOPS_CONTROLLER_TOKEN")
        os.environ["EDGEOPS_CONTROLLER_URL"] = url
        try:
            out = run_cli("controller", "device", "add", "d1", "--site", "x", "--json", check=True).stdout
            assert '"token"' in out
            run_cli("controller", "group", "add", "g", "d1", check=True)
            out = run_cli("controller", "bundle", "upload", make_bundle("2.0", size=4096), "--json",
                          check=True).stdout
            assert '"version": "2.0"' in out
            out = run_cli("controller", "rollout", "create", "1", "--group", "g", "--json", check=True).stdout
            assert '"status": "running"' in out
            halted = run_cli("controller", "rollout", "halt", "--json", check=True).stdout
            assert '"halted": [\n    1\n  ]' in halted
            bad = run_cli("controller", "rollout", "resume", "1")
            assert bad.returncode == 2 and "409" in bad.stderr
            bad = run_cli("controller", "device", "list", "--token", "wrong")
            assert bad.returncode == 2 and "401" in bad.stderr
        finally:
            os.environ.pop("EDGEOPS_CONTROLLER_URL")
            if old is None:
                os.environ.pop("EDGEOPS_CONTROLLER_TOKEN")
            else:
                os.environ["EDGEOPS_CONTROLLER_TOKEN"] = old
    finally:
        proc.terminate()
        proc.wait(10)


def test_etag_long_poll_and_idempotent_feedback(ctl: LocalController, make_bundle) -> None:
    import threading

    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    ddi(ctl, "dev1", token, "/configData", "PUT", json={"data": {"edgeops.version": "1.0"}})
    first = ddi(ctl, "dev1", token)
    etag = first.headers["ETag"]
    assert ctl.api("GET", "/devices")["devices"][0]["version"] == "1.0"
    same = requests.get(f"{ctl.url}/DEFAULT/controller/v1/dev1", timeout=10, headers={
        "Authorization": f"TargetToken {token}", "If-None-Match": etag})
    assert same.status_code == 304

    t0 = time.monotonic()
    held = requests.get(f"{ctl.url}/DEFAULT/controller/v1/dev1", timeout=10, headers={
        "Authorization": f"TargetToken {token}", "If-None-Match": etag, "Prefer": "wait=1"})
    assert held.status_code == 304 and 0.9 < time.monotonic() - t0 < 3

    answer: dict[str, requests.Response] = {}

    def long_poll() -> None:
        answer["r"] = requests.get(f"{ctl.url}/DEFAULT/controller/v1/dev1", timeout=30, headers={
            "Authorization": f"TargetToken {token}", "If-None-Match": etag, "Prefer": "wait=20"})

    th = threading.Thread(target=long_poll)
    th.start()
    time.sleep(0.3)
    bid = upload(ctl, make_bundle("2.0", size=4096)).json()["id"]
    t0 = time.monotonic()
    ctl.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})
    th.join(10)
    assert time.monotonic() - t0 < 2  # woken by the assignment, not by the 20 s timeout
    assert answer["r"].status_code == 200 and "deploymentBase" in answer["r"].json()["_links"]
    assert answer["r"].headers["ETag"] != etag

    aid = ctl.api("GET", "/actions")["actions"][0]["id"]
    fb = {"status": {"execution": "proceeding", "result": {"finished": "none"}}}
    for _ in range(3):
        r = requests.post(f"{ctl.url}/DEFAULT/controller/v1/dev1/deploymentBase/{aid}/feedback", json=fb,
                          headers={"Authorization": f"TargetToken {token}", "Idempotency-Key": "k1"},
                          timeout=10)
        assert r.status_code == 200
    assert ctl.fleet.db.query("SELECT COUNT(*) FROM feedback")[0][0] == 1


def test_documents_parse_with_the_agents_ddi_parsers(ctl: LocalController, make_bundle) -> None:
    """Contract between the two sides: what this controller serves, agent.core.ddi accepts."""
    ddi_mod = pytest.importorskip("agent.core.ddi")
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    bid = upload(ctl, make_bundle("2.0", size=4096)).json()["id"]
    rid = ctl.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})["id"]
    base = ddi_mod.parse_base(ddi(ctl, "dev1", token).content)
    assert base.sleep is not None and 81 <= base.sleep <= 99 and base.deployment and base.config_data
    dep = ddi_mod.parse_deployment(requests.get(base.deployment, timeout=10, headers={
        "Authorization": f"TargetToken {token}"}).content)
    (art,) = dep.artifacts()
    assert art.size == ctl.fleet.bundle(bid).size and art.sha256 == ctl.fleet.bundle(bid).sha256
    ctl.api("POST", f"/rollouts/{rid}/cancel")
    base = ddi_mod.parse_base(ddi(ctl, "dev1", token).content)
    assert base.cancel and not base.deployment
    ddi_mod.parse_cancel(requests.get(base.cancel, timeout=10, headers={
        "Authorization": f"TargetToken {token}"}).content)


def test_generated_operator_token_goes_to_a_0600_file_not_the_log(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPS_CONTROLLER_TOKEN"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    tokens, logs = [], []
    for _ in range(2):  # the second start reuses the stored token
        port = free_port()
        proc = serve_cli(port, env, "--db", tmp_path / "c.db")
        try:
            token = (tmp_path / "controller-data" / "operator.token").read_text().strip()
            ok = requests.get(f"http://127.0.0.1:{port}/api/v1/devices",
                              headers={"Authorization": f"Bearer {token}"}, timeout=5)
            assert ok.status_code == 200
            tokens.append(token)
        finally:
            proc.terminate()
            logs.append(proc.communicate(timeout=10)[1])
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 24
    assert all(tokens[0] not in log and "operator.token" in log for log in logs), logs
    assert (tmp_path / "controller-data" / "operator.token").stat().st_mode & 0o777 == 0o600


def test_a_revoked_device_token_is_refused_from_the_next_request(ctl: LocalController) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    other = ctl.api("POST", "/devices", {"id": "dev2"})["token"]
    assert ddi(ctl, "dev1", token).status_code == 200
    # No device CA on this controller: revoking still ends the token (decommission's other end).
    assert ctl.api("POST", "/devices/dev1/revoke")["token"] == "revoked"
    r = ddi(ctl, "dev1", token)  # its holder learns why; a stranger's guess is only 401
    assert r.status_code == 403 and r.json()["error"] == "DeviceRevoked", r.text
    assert ddi(ctl, "dev1", "a-guess").status_code == 401
    assert ddi(ctl, "dev2", other).status_code == 200  # only that device
    assert "dev1" in [d["id"] for d in ctl.api("GET", "/devices")["devices"]]  # its record stays


def test_revoking_an_unknown_device_is_404(ctl: LocalController) -> None:
    r = requests.post(f"{ctl.url}/api/v1/devices/nosuch/revoke", timeout=10,
                      headers={"Authorization": f"Bearer {ctl.token}"})
    assert r.status_code == 404 and "nosuch" in r.json()["message"]
