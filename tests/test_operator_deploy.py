"""Safe deployment defaults (issue 13, item 1): a named target, no other board, no needless reinstall.

A real controller on 127.0.0.1 over real SQLite; devices report their compatible and version
through DDI configData, as the edgeops agent does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from agent.controller import rollout
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import COMPATIBLE, Keys, run_cli


@pytest.fixture
def ctl(tmp_path: Path, pki: Keys) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    yield c
    c.stop()


def _devices(ctl: LocalController, spec: dict[str, tuple[str, str]]) -> None:
    """Register devices {id: (compatible, version)} and let each report itself over DDI."""
    ids = []
    for did, (compatible, version) in spec.items():
        token = ctl.api("POST", "/devices", {"id": did})["token"]
        r = requests.put(f"{ctl.url}/DEFAULT/controller/v1/{did}/configData", timeout=10,
                         headers={"Authorization": f"TargetToken {token}"},
                         json={"mode": "merge", "data": {"edgeops.compatible": compatible,
                                                         "edgeops.version": version}})
        assert r.status_code == 200, r.text
        ids.append(did)
    ctl.api("POST", "/groups", {"name": "g", "devices": ids})


def _upload(ctl: LocalController, path: Path) -> int:
    with open(path, "rb") as f:
        return int(ctl.api("POST", "/bundles?filename=" + path.name, data=f)["id"])


def _post(ctl: LocalController, path: str, body: Any) -> requests.Response:
    return requests.post(f"{ctl.url}/api/v1{path}", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {ctl.token}"})


def _action_devices(ctl: LocalController) -> set[str]:
    return {a["device"] for a in ctl.api("GET", "/actions")["actions"]}


def test_deploy_without_a_target_is_refused_and_creates_nothing(ctl: LocalController, make_bundle) -> None:
    _devices(ctl, {"d1": (COMPATIBLE, "1.0"), "d2": (COMPATIBLE, "1.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    r = _post(ctl, "/deployments", {"bundle": bid})
    assert r.status_code == 400, r.text
    assert "all" in r.json()["message"]
    assert ctl.api("GET", "/rollouts")["rollouts"] == []
    assert _action_devices(ctl) == set()


def test_rollout_without_a_target_is_refused(ctl: LocalController, make_bundle) -> None:
    _devices(ctl, {"d1": (COMPATIBLE, "1.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    r = _post(ctl, "/rollouts", {"bundle": bid, "policy": {"canary_percent": 50}})
    assert r.status_code == 400, r.text
    assert ctl.api("GET", "/rollouts")["rollouts"] == []


def test_deploy_to_all_reaches_every_device_that_needs_it(ctl: LocalController, make_bundle) -> None:
    _devices(ctl, {"d1": (COMPATIBLE, "1.0"), "d2": (COMPATIBLE, "1.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    out = ctl.api("POST", "/deployments", {"bundle": bid, "all": True})
    assert out["skipped"] == {}
    assert _action_devices(ctl) == {"d1", "d2"}


def test_named_device_of_another_board_is_refused_even_with_force(ctl: LocalController,
                                                                  make_bundle) -> None:
    _devices(ctl, {"d1": ("other-board", "1.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    for force in (False, True):
        r = _post(ctl, "/deployments", {"bundle": bid, "device": "d1", "force": force})
        assert r.status_code == 409, r.text
        assert "other-board" in r.json()["message"] and "\n" not in r.json()["message"]
    assert _action_devices(ctl) == set()


def test_group_deploy_leaves_out_other_boards_and_devices_on_the_version(ctl: LocalController,
                                                                        make_bundle) -> None:
    _devices(ctl, {"d1": (COMPATIBLE, "1.0"), "d2": ("other-board", "1.0"), "d3": (COMPATIBLE, "2.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    out = ctl.api("POST", "/deployments", {"bundle": bid, "group": "g"})
    assert set(out["skipped"]) == {"d2", "d3"}
    assert "incompatible" in out["skipped"]["d2"] and "already runs 2.0" in out["skipped"]["d3"]
    assert _action_devices(ctl) == {"d1"}
    assert sum(out["wave_sizes"].values()) == 1


def test_device_already_on_the_version_is_refused_unless_forced(ctl: LocalController, make_bundle) -> None:
    _devices(ctl, {"d1": (COMPATIBLE, "2.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    r = _post(ctl, "/deployments", {"bundle": bid, "device": "d1"})
    assert r.status_code == 409 and "already runs 2.0" in r.json()["message"], r.text
    assert _action_devices(ctl) == set()
    ctl.api("POST", "/deployments", {"bundle": bid, "device": "d1", "force": True})
    assert _action_devices(ctl) == {"d1"}


def test_a_device_that_just_failed_the_release_is_left_out_unless_forced(ctl: LocalController,
                                                                        make_bundle) -> None:
    _devices(ctl, {"d1": (COMPATIBLE, "1.0"), "d2": (COMPATIBLE, "1.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    rid = ctl.api("POST", "/deployments", {"bundle": bid, "device": "d1"})["id"]
    aid = ctl.api("GET", f"/actions?rollout={rid}")["actions"][0]["id"]
    ctl.fleet.feedback("d1", aid, {"status": {"execution": "closed", "result": {"finished": "failure"}}})
    out = ctl.api("POST", "/deployments", {"bundle": bid, "group": "g"})
    assert "failed 2.0" in out["skipped"]["d1"] and set(out["skipped"]) == {"d1"}
    forced = ctl.api("POST", "/deployments", {"bundle": bid, "device": "d1", "force": True})
    assert forced["skipped"] == {}


def test_a_deployment_that_leaves_nobody_is_refused(ctl: LocalController, make_bundle) -> None:
    _devices(ctl, {"d1": (COMPATIBLE, "2.0"), "d2": (COMPATIBLE, "2.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    r = _post(ctl, "/rollouts", {"bundle": bid, "group": "g"})
    assert r.status_code == 409, r.text
    assert "2 already runs 2.0" in r.json()["message"]
    assert ctl.api("GET", "/rollouts")["rollouts"] == []


def test_all_with_a_group_is_refused(ctl: LocalController, make_bundle) -> None:
    _devices(ctl, {"d1": (COMPATIBLE, "1.0")})
    bid = _upload(ctl, make_bundle("2.0", size=4096))
    r = _post(ctl, "/deployments", {"bundle": bid, "group": "g", "all": True})
    assert r.status_code == 400, r.text


def test_cli_deploy_without_a_target_exits_2_before_any_request(tmp_path: Path) -> None:
    # Nothing listens on this URL: the refusal must come from the argument check, not a request.
    proc = run_cli("controller", "deploy", "1", "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2, proc.stderr
    assert "--all" in proc.stderr


@given(bc=st.sampled_from(["a", "b"]), bv=st.sampled_from(["1", "2"]),
       dc=st.sampled_from([None, "", "a", "b"]), dv=st.sampled_from([None, "1", "2"]),
       force=st.booleans(), failed=st.booleans())
def test_eligibility_table(bc: str, bv: str, dc: str | None, dv: str | None, force: bool,
                           failed: bool) -> None:
    why = rollout.ineligible(bc, bv, dc, dv, force=force, failed_it=failed)
    other_board = bool(dc) and dc != bc
    same_version = dv == bv
    assert (why is None) == (not other_board and (force or not (same_version or failed)))
    if other_board:
        assert why is not None and why.startswith("incompatible")
