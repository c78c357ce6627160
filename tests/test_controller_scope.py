"""A device sees only what is assigned to it, under this controller's tenant only.

As in hawkBit, an artifact downloads only for a device whose newest action for that bundle
exists and is not canceled (404 otherwise, the answer for a bundle that does not exist); a
regional controller applies the same rule to what its parent offered each device. A DDI path
under any other tenant is 404, and links carry the configured tenant, never the path's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from agent.host.simfleet import LocalController, start_controller
from tests.conftest import BundleFactory, Keys, run_cli
from tests.test_controller_ddi import free_port


@pytest.fixture
def ctl(tmp_path: Path, pki: Keys) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600, tenant="Fleet-A")
    yield c
    c.stop()


def _upload(ctl: LocalController, path: Path, name: str) -> int:
    with open(path, "rb") as f:
        return int(ctl.api("POST", f"/bundles?filename={name}", data=f)["id"])


def _artifact(url: str, tenant: str, did: str, token: str, bid: int, name: str) -> int:
    return requests.get(f"{url}/{tenant}/controller/v1/{did}/softwaremodules/{bid}/artifacts/{name}",
                        headers={"Authorization": f"TargetToken {token}"}, timeout=10).status_code


def test_a_device_downloads_only_bundles_of_its_own_actions(ctl: LocalController,
                                                            make_bundle: BundleFactory) -> None:
    t1 = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    t2 = ctl.api("POST", "/devices", {"id": "dev2"})["token"]
    mine = _upload(ctl, make_bundle("2.0", size=4096), "mine.bundle")
    nobodys = _upload(ctl, make_bundle("3.0", size=4096), "nobodys.bundle")
    rid = ctl.api("POST", "/deployments", {"bundle": mine, "device": "dev1"})["id"]

    assert _artifact(ctl.url, "Fleet-A", "dev1", t1, mine, "mine.bundle") == 200
    assert _artifact(ctl.url, "Fleet-A", "dev2", t2, mine, "mine.bundle") == 404  # dev1's, not dev2's
    assert _artifact(ctl.url, "Fleet-A", "dev1", t1, nobodys, "nobodys.bundle") == 404  # deployed to nobody
    assert _artifact(ctl.url, "Fleet-A", "dev2", t2, nobodys, "nobodys.bundle") == 404
    ctl.api("POST", f"/rollouts/{rid}/cancel")  # hawkBit: a canceled assignment is no longer one
    assert _artifact(ctl.url, "Fleet-A", "dev1", t1, mine, "mine.bundle") == 404


def test_only_the_controllers_tenant_is_served_and_linked(ctl: LocalController,
                                                          make_bundle: BundleFactory) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    bid = _upload(ctl, make_bundle("2.0", size=4096), "b.bundle")
    ctl.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})
    auth = {"Authorization": f"TargetToken {token}"}
    for tenant in ("DEFAULT", "other", "..%2f..", "%2e%2e", "Fleet-A%00"):
        r = requests.get(f"{ctl.url}/{tenant}/controller/v1/dev1", headers=auth, timeout=10)
        assert r.status_code == 404, (tenant, r.status_code)
        assert r.json()["error"] == "NotFound"
    # the comparison ignores case; the links carry the configured spelling
    base = requests.get(f"{ctl.url}/fleet-a/controller/v1/dev1", headers=auth, timeout=10).json()
    href = base["_links"]["deploymentBase"]["href"]
    assert f"{ctl.url}/Fleet-A/controller/v1/dev1/deploymentBase/" in href
    doc = requests.get(href.replace("/Fleet-A/", "/FLEET-A/"), headers=auth, timeout=10).json()
    art = doc["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download"]["href"]
    assert art.startswith(f"{ctl.url}/Fleet-A/controller/v1/dev1/softwaremodules/")


def test_a_tenant_that_is_not_a_plain_name_is_a_usage_error(tmp_path: Path) -> None:
    r = run_cli("controller", "serve", "--db", tmp_path / "c.db", "--tenant", "../x",
                "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "c.db").exists()


def _wait_for(cond: Callable[[], bool], timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


def test_a_regional_controller_serves_each_device_only_what_its_parent_offered_it(
        tmp_path: Path, pki: Keys, make_bundle: BundleFactory) -> None:
    central = start_controller(tmp_path / "central", keyring=pki.root_crt, tick_interval=3600)
    regional = start_controller(tmp_path / "regional", parent=central.url, parent_interval=0.1,
                                tick_interval=3600)
    try:
        t1 = central.api("POST", "/devices", {"id": "dev1"})["token"]
        t2 = central.api("POST", "/devices", {"id": "dev2"})["token"]
        for did, token in (("dev1", t1), ("dev2", t2)):  # first contact: the parent vouches
            assert requests.get(f"{regional.url}/DEFAULT/controller/v1/{did}", timeout=10,
                                headers={"Authorization": f"TargetToken {token}"}).status_code == 200
        bid = _upload(central, make_bundle("2.0", size=4096), "b.bundle")
        central.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})
        _wait_for(lambda: _artifact(regional.url, "DEFAULT", "dev1", t1, bid, "b.bundle") == 200)
        assert _artifact(regional.url, "DEFAULT", "dev2", t2, bid, "b.bundle") == 404
        assert requests.get(f"{regional.url}/OTHER/controller/v1/dev1", timeout=10, headers={
            "Authorization": f"TargetToken {t1}"}).status_code == 404
    finally:
        regional.stop()
        central.stop()
