"""Resuming an auto-paused rollout (issue 13, item 2): retry, skip or raise the threshold, on record.

A real controller on 127.0.0.1 over real SQLite; devices report over DDI with their
TargetTokens, as any hawkBit client does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.controller.db import SCHEMA_VERSION, open_database
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import COMPATIBLE, Keys, run_cli

N = 10  # devices; canary_percent 50 makes two waves of 5


@pytest.fixture
def ctl(tmp_path: Path, pki: Keys) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    yield c
    c.stop()


@pytest.fixture
def fleet(ctl: LocalController, make_bundle) -> dict[str, str]:
    tokens = {}
    for i in range(N):
        did = f"d{i}"
        tokens[did] = ctl.api("POST", "/devices", {"id": did})["token"]
        _ddi(ctl, did, tokens[did], "PUT", "configData",
             {"mode": "merge", "data": {"edgeops.compatible": COMPATIBLE, "edgeops.version": "1.0"}})
    ctl.api("POST", "/groups", {"name": "g", "devices": list(tokens)})
    return tokens


def _ddi(ctl: LocalController, did: str, token: str, method: str, path: str, body: Any) -> None:
    r = requests.request(method, f"{ctl.url}/DEFAULT/controller/v1/{did}/{path}", json=body, timeout=10,
                         headers={"Authorization": f"TargetToken {token}"})
    assert r.status_code == 200, r.text


def _report(ctl: LocalController, tokens: dict[str, str], did: str, aid: int, finished: str) -> None:
    _ddi(ctl, did, tokens[did], "POST", f"deploymentBase/{aid}/feedback",
         {"status": {"execution": "closed", "result": {"finished": finished},
                     "details": [f"health check 'web' {finished}"]}})


def _open_actions(ctl: LocalController, rid: int) -> dict[str, int]:
    return {a["device"]: a["id"] for a in ctl.api("GET", f"/actions?rollout={rid}")["actions"]
            if a["status"] == "open"}


def _resume(ctl: LocalController, rid: int, body: Any = None, **headers: str) -> requests.Response:
    return requests.post(f"{ctl.url}/api/v1/rollouts/{rid}/resume", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {ctl.token}", **headers})


def _paused_by_a_failure(ctl: LocalController, tokens: dict[str, str], make_bundle,
                         succeed: int = 4) -> tuple[int, str]:
    """A rollout whose canary (5 devices) has one failure (error threshold 0.2) and ``succeed``
    successes: paused. Returns (rollout id, the failed device)."""
    with open(make_bundle("2.0", size=4096), "rb") as f:
        bid = ctl.api("POST", "/bundles?filename=b.bundle", data=f)["id"]
    rid = ctl.api("POST", "/rollouts", {"bundle": bid, "group": "g", "policy": {
        "canary_percent": 50, "error_threshold": 0.2}})["id"]
    canary = sorted(_open_actions(ctl, rid).items())
    assert len(canary) == 5
    bad, bad_aid = canary[0]
    _report(ctl, tokens, bad, bad_aid, "failure")
    for did, aid in canary[1:1 + succeed]:
        _report(ctl, tokens, did, aid, "success")
    st = ctl.api("GET", f"/rollouts/{rid}")
    assert st["status"] == "paused" and "failed" in st["reason"], st
    return rid, bad


def test_plain_resume_that_would_pause_again_is_409_naming_the_choices(ctl, fleet, make_bundle) -> None:
    rid, _ = _paused_by_a_failure(ctl, fleet, make_bundle)
    r = _resume(ctl, rid)
    assert r.status_code == 409, r.text
    message = r.json()["message"]
    assert all(c in message for c in ("retry", "skip", "raise-threshold")), message
    assert ctl.api("GET", f"/rollouts/{rid}")["status"] == "paused"


def test_retry_gives_the_failed_device_a_new_action(ctl, fleet, make_bundle) -> None:
    rid, bad = _paused_by_a_failure(ctl, fleet, make_bundle)
    r = _resume(ctl, rid, {"choice": "retry"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running"
    assert set(_open_actions(ctl, rid)) == {bad}  # only the failed one, again
    assert r.json()["actions"]["0"] == {"open": 1, "success": 4}  # its old failure is history


def test_retry_that_succeeds_lets_the_wave_pass(ctl, fleet, make_bundle) -> None:
    rid, bad = _paused_by_a_failure(ctl, fleet, make_bundle)
    _resume(ctl, rid, {"choice": "retry"})
    _report(ctl, fleet, bad, _open_actions(ctl, rid)[bad], "success")
    st = ctl.api("GET", f"/rollouts/{rid}")
    assert st["status"] == "running" and st["current_wave"] == 1, st


def test_skip_leaves_the_failed_device_out_and_goes_on(ctl, fleet, make_bundle) -> None:
    rid, bad = _paused_by_a_failure(ctl, fleet, make_bundle)
    r = _resume(ctl, rid, {"choice": "skip"})
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["current_wave"] == 1 and st["status"] == "running", st  # 4 of 4 counted: wave passed
    assert st["skipped_devices"] == [bad]
    assert bad not in _open_actions(ctl, rid)


def test_raise_threshold_changes_the_policy_and_goes_on(ctl, fleet, make_bundle) -> None:
    rid, _ = _paused_by_a_failure(ctl, fleet, make_bundle, succeed=0)
    r = _resume(ctl, rid, {"choice": "raise-threshold", "threshold": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["policy"]["error_threshold"] == 0.5 and r.json()["status"] == "running"


def test_a_threshold_that_still_pauses_is_refused(ctl, fleet, make_bundle) -> None:
    rid, _ = _paused_by_a_failure(ctl, fleet, make_bundle, succeed=0)
    r = _resume(ctl, rid, {"choice": "raise-threshold", "threshold": 0.2})  # not above 0.2
    assert r.status_code == 400, r.text
    assert ctl.api("GET", f"/rollouts/{rid}")["policy"]["error_threshold"] == 0.2


@pytest.mark.parametrize("body", [{"choice": "later"}, {"choice": "retry", "threshold": 0.5},
                                  {"choice": "raise-threshold"}, {"choice": "raise-threshold",
                                                                  "threshold": 2},
                                  {"choice": "retry", "extra": 1}, {"choice": 3}])
def test_malformed_resume_bodies_are_400_and_change_nothing(ctl, fleet, make_bundle, body) -> None:
    rid, _ = _paused_by_a_failure(ctl, fleet, make_bundle)
    r = _resume(ctl, rid, body)
    assert r.status_code == 400, r.text
    assert ctl.api("GET", f"/rollouts/{rid}")["status"] == "paused"


def test_plain_resume_after_an_operator_pause_keeps_todays_behaviour(ctl, fleet, make_bundle) -> None:
    with open(make_bundle("2.0", size=4096), "rb") as f:
        bid = ctl.api("POST", "/bundles?filename=b.bundle", data=f)["id"]
    rid = ctl.api("POST", "/rollouts", {"bundle": bid, "group": "g"})["id"]
    ctl.api("POST", f"/rollouts/{rid}/pause")
    r = _resume(ctl, rid)
    assert r.status_code == 200 and r.json()["status"] == "running", r.text


def test_history_records_each_step_with_who_and_when(ctl, fleet, make_bundle) -> None:
    rid, bad = _paused_by_a_failure(ctl, fleet, make_bundle)
    _resume(ctl, rid, {"choice": "retry"}, **{"X-Edgeops-Operator": "alice"})
    history = ctl.api("GET", f"/rollouts/{rid}")["history"]
    events = [(h["who"], h["event"]) for h in history]
    assert events == [("operator", "created"), ("controller", "paused"),
                      ("operator:alice", "resumed: retry")], history
    assert bad in history[-1]["detail"]
    for h in history:
        assert datetime.fromisoformat(h["at"]).utcoffset() is not None  # ISO 8601 with a zone


def test_cli_resume_retry_failed_is_recorded(ctl, fleet, make_bundle) -> None:
    rid, bad = _paused_by_a_failure(ctl, fleet, make_bundle)
    proc = run_cli("controller", "rollout", "resume", str(rid), "--retry-failed",
                   "--url", ctl.url, "--token", ctl.token)
    assert proc.returncode == 0, proc.stderr
    assert ctl.api("GET", f"/rollouts/{rid}")["history"][-1]["event"] == "resumed: retry"
    assert set(_open_actions(ctl, rid)) == {bad}


def test_a_version_3_database_gains_the_history_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    open_database(str(path)).close()
    raw = sqlite3.connect(path)
    raw.executescript("DROP TABLE rollout_events; DROP TABLE rollout_skipped; "
                      "UPDATE kv SET v = '3' WHERE k = 'schema';")
    raw.close()
    db = open_database(str(path))
    try:
        assert db.query("SELECT v FROM kv WHERE k = 'schema'") == [(str(SCHEMA_VERSION),)]
        assert db.query("SELECT COUNT(*) FROM rollout_events") == [(0,)]
        assert db.query("SELECT COUNT(*) FROM rollout_skipped") == [(0,)]
    finally:
        db.close()
