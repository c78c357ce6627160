"""hawkBit semantics where devices depend on them.

* A configData attribute named ``version`` (SWUpdate re-sends its identify list at every
  start) is an attribute; it never overwrites the running version a success reported.
* A second deployment to a device with an open action cancels the older one, as hawkBit does
  without multi-assignments (``JpaDeploymentManagement``: ``closeOrCancelActiveActions`` unless
  ``multi.assignments.enabled``): the device sees cancelAction first, then the new deployment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.controller.errors import BadRequest
from agent.controller.rollout import Policy
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import BundleFactory, Keys


@pytest.fixture
def ctl(tmp_path: Path, pki: Keys) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    yield c
    c.stop()


class Device:
    def __init__(self, ctl: LocalController, did: str) -> None:
        self.root = f"{ctl.url}/DEFAULT/controller/v1/{did}"
        self.auth = {"Authorization": f"TargetToken {ctl.api('POST', '/devices', {'id': did})['token']}"}

    def call(self, method: str, path: str = "", body: Any = None) -> requests.Response:
        r = requests.request(method, self.root + path, json=body, headers=self.auth, timeout=10)
        assert r.status_code == 200, r.text
        return r

    def links(self) -> dict[str, Any]:
        links: dict[str, Any] = self.call("GET").json().get("_links", {})
        return links

    def report(self, kind: str, aid: int, execution: str, finished: str = "none") -> None:
        self.call("POST", f"/{kind}/{aid}/feedback",
                  {"status": {"execution": execution, "result": {"finished": finished}}})


def _bundle(ctl: LocalController, make_bundle: BundleFactory, version: str) -> int:
    with open(make_bundle(version, size=4096), "rb") as f:
        return int(ctl.api("POST", f"/bundles?filename=v{version}.bundle", data=f)["id"])


def _version(ctl: LocalController) -> str | None:
    v: str | None = ctl.api("GET", "/devices")["devices"][0]["version"]
    return v


def test_a_version_attribute_never_overwrites_the_reported_running_version(
        ctl: LocalController, make_bundle: BundleFactory) -> None:
    dev = Device(ctl, "dev1")
    identify = {"mode": "merge", "data": {"version": "1.0", "hw": "2"}}  # SWUpdate's identify list
    dev.call("PUT", "/configData", identify)
    assert _version(ctl) == "1.0"  # nothing known yet: the attribute fills it in
    ctl.api("POST", "/deployments", {"bundle": _bundle(ctl, make_bundle, "2.0"), "device": "dev1"})
    aid = ctl.api("GET", "/actions")["actions"][0]["id"]
    dev.report("deploymentBase", aid, "closed", "success")
    assert _version(ctl) == "2.0"
    dev.call("PUT", "/configData", identify)  # SWUpdate restarted after the update
    assert _version(ctl) == "2.0"
    assert ctl.api("GET", "/devices")["devices"][0]["attributes"]["version"] == "1.0"
    dev.call("PUT", "/configData", {"data": {"edgeops.version": "1.0"}})  # the agent booted 1.0 again
    assert _version(ctl) == "1.0"


def test_a_second_deployment_cancels_the_open_one(ctl: LocalController, make_bundle: BundleFactory) -> None:
    dev = Device(ctl, "dev1")
    ctl.api("POST", "/deployments", {"bundle": _bundle(ctl, make_bundle, "2.0"), "device": "dev1"})
    ctl.api("POST", "/deployments", {"bundle": _bundle(ctl, make_bundle, "3.0"), "device": "dev1"})
    first, second = ctl.api("GET", "/actions")["actions"]
    assert (first["status"], second["status"]) == ("canceling", "open")
    links = dev.links()
    assert "deploymentBase" not in links and links["cancelAction"]["href"].endswith(f"/{first['id']}")
    dev.call("GET", f"/cancelAction/{first['id']}")
    dev.report("cancelAction", first["id"], "closed", "success")
    href = dev.links()["deploymentBase"]["href"]
    assert f"/deploymentBase/{second['id']}?" in href
    doc = dev.call("GET", href.split(dev.root, 1)[1]).json()
    assert doc["deployment"]["chunks"][0]["version"] == "3.0"


def test_a_device_that_rejects_the_cancel_finishes_first_then_gets_the_new_one(
        ctl: LocalController, make_bundle: BundleFactory) -> None:
    dev = Device(ctl, "dev1")
    ctl.api("POST", "/deployments", {"bundle": _bundle(ctl, make_bundle, "2.0"), "device": "dev1"})
    first = ctl.api("GET", "/actions")["actions"][0]["id"]
    dev.report("deploymentBase", first, "proceeding")  # already writing
    ctl.api("POST", "/deployments", {"bundle": _bundle(ctl, make_bundle, "3.0"), "device": "dev1"})
    dev.report("cancelAction", first, "rejected")
    assert [a["status"] for a in ctl.api("GET", "/actions")["actions"]] == ["running", "open"]
    assert f"/deploymentBase/{first}?" in dev.links()["deploymentBase"]["href"]
    dev.report("deploymentBase", first, "closed", "success")
    second = ctl.api("GET", "/actions")["actions"][1]["id"]
    assert f"/deploymentBase/{second}?" in dev.links()["deploymentBase"]["href"]


# --- a gate that needs the stronger signal -----------------------------------------------------------
EDGEOPS_AGENT = {"edgeops.compatible": "edgeops-sim", "edgeops.board": "sim"}  # what agent.device.fleet sends
RAUC_UPDATER = {"product": "Terminator", "model": "T-800"}  # rauc-hawkbit-updater's [device] section


def _rollout(ctl: LocalController, make_bundle: BundleFactory, devices: dict[str, dict[str, str]],
             **policy: Any) -> tuple[int, dict[str, Device]]:
    devs = {}
    for did, attributes in devices.items():
        devs[did] = Device(ctl, did)
        devs[did].call("PUT", "/configData", {"data": attributes})
    ctl.api("POST", "/groups", {"name": "g", "devices": list(devices)})
    rid = ctl.api("POST", "/rollouts", {"bundle": _bundle(ctl, make_bundle, "2.0"), "group": "g",
                                        "policy": {"canary_percent": 100, "success_threshold": 1.0,
                                                   **policy}})["id"]
    return int(rid), devs


def _succeed_all(ctl: LocalController, rid: int, devs: dict[str, Device]) -> None:
    for a in ctl.api("GET", f"/actions?rollout={rid}")["actions"]:
        devs[a["device"]].report("deploymentBase", a["id"], "closed", "success")


def test_a_gate_that_requires_commits_does_not_pass_on_written_images(
        ctl: LocalController, make_bundle: BundleFactory) -> None:
    rid, devs = _rollout(ctl, make_bundle, {"edge": EDGEOPS_AGENT, "rauc": RAUC_UPDATER},
                         require_commit=True, window=60)
    _succeed_all(ctl, rid, devs)
    actions = {a["device"]: a for a in ctl.api("GET", f"/actions?rollout={rid}")["actions"]}
    assert {d: a["status"] for d, a in actions.items()} == {"edge": "success", "rauc": "success"}
    assert {d: a["success_after"] for d, a in actions.items()} == {"edge": "commit", "rauc": "write"}
    st = ctl.api("GET", f"/rollouts/{rid}")
    assert st["status"] == "running" and st["policy"]["require_commit"] is True
    fleet, real = ctl.fleet, ctl.fleet.clock
    fleet.clock = lambda: real() + 61  # the window passes with one of two commits confirmed
    try:
        fleet.tick()
    finally:
        fleet.clock = real
    st = ctl.api("GET", f"/rollouts/{rid}")
    assert st["status"] == "paused" and "only 1 of 2 devices committed" in st["reason"]


def test_without_the_requirement_and_with_a_declared_commit_the_gate_passes(
        ctl: LocalController, make_bundle: BundleFactory) -> None:
    rid, devs = _rollout(ctl, make_bundle, {"edge": EDGEOPS_AGENT, "rauc": RAUC_UPDATER})
    _succeed_all(ctl, rid, devs)
    assert ctl.api("GET", f"/rollouts/{rid}")["status"] == "finished"  # the default: any success


def test_a_client_may_declare_that_it_reports_after_the_commit(tmp_path: Path, pki: Keys,
                                                                make_bundle: BundleFactory) -> None:
    ctl = start_controller(tmp_path / "c2", keyring=pki.root_crt, tick_interval=3600)
    try:
        rid, devs = _rollout(ctl, make_bundle, {"edge": EDGEOPS_AGENT,
                                                "rauc": {**RAUC_UPDATER, "edgeops.success_after": "commit"}},
                             require_commit=True)
        _succeed_all(ctl, rid, devs)
        assert ctl.api("GET", f"/rollouts/{rid}")["status"] == "finished"
    finally:
        ctl.stop()


def test_require_commit_is_a_flag() -> None:
    assert Policy.from_dict({"require_commit": True, "window": 60}).require_commit is True
    assert Policy.from_dict({}).require_commit is False
    assert Policy.from_dict(Policy(require_commit=True).to_dict()) == Policy(require_commit=True)
    with pytest.raises(BadRequest, match="rollout policy: require_commit"):
        Policy.from_dict({"require_commit": "yes"})
