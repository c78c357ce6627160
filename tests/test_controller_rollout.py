"""Rollouts end to end: real controller on 127.0.0.1, real SQLite, sim boards polling over DDI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.host import sim
from agent.host.simfleet import LocalController, SimDevice, start_controller
from tests.conftest import Keys, make_image

BAD_HEALTH = {"retries": 1, "probe": [{"type": "disk", "path": "/", "min_free_mb": 10**9,
                                       "name": "impossible"}]}
SITES = ("north", "south", "east", "west")


def make_fleet(ctl: LocalController, base: Path, pki: Keys, n: int) -> list[SimDevice]:
    template = base / "template"
    sim.init_device(template, image=make_image(base / "v1.img", 4096, "1.0"), keyring=pki.root_crt,
                    version="1.0", slot_size=1 << 20)
    devices = []
    for i in range(n):
        d = base / f"dev{i:03d}"
        shutil.copytree(template, d)  # cheaper than init_device 200 times; boot ids differ below
        sim.SimFirmware(d).boot()
        did = f"dev{i:03d}"
        token = ctl.api("POST", "/devices", {"id": did, "site": SITES[i % 4]})["token"]
        devices.append(SimDevice(did, token, d, ctl.url))
    ctl.api("POST", "/groups", {"name": "all", "devices": [d.device_id for d in devices]})
    return devices


def upload(ctl: LocalController, path: Path) -> int:
    with open(path, "rb") as f:
        return int(ctl.api("POST", "/bundles?filename=" + path.name, data=f)["id"])


def poll_all(devices: list[SimDevice], rounds: int = 3) -> None:
    for _ in range(rounds):
        for d in devices:
            d.step()


def test_bad_release_halts_after_canary_and_survives_restart(tmp_path: Path, pki: Keys, make_bundle) -> None:
    data = tmp_path / "ctl"
    ctl = start_controller(data, keyring=pki.root_crt, tick_interval=3600)
    devices = make_fleet(ctl, tmp_path, pki, 200)
    bad = make_bundle("2.0", size=4096, health=BAD_HEALTH)
    rid = ctl.api("POST", "/rollouts", {"bundle": upload(ctl, bad), "group": "all",
                                        "policy": {"canary_percent": 5}})["id"]
    canary = set(ctl.fleet.wave_members(rid, 0))
    assert len(canary) == 10
    assert {SITES[int(d[3:]) % 4] for d in canary} == set(SITES)  # spread

    # Restart before anyone polls: the plan and the open actions are in the database.
    ctl.stop()
    ctl = start_controller(data, keyring=pki.root_crt, tick_interval=3600)
    for d in devices:
        d.controller = ctl.url

    poll_all(devices)
    st = ctl.api("GET", f"/rollouts/{rid}")
    assert st["status"] == "paused", st
    assert "failed" in st["reason"]
    assert st["current_wave"] == 0
    received = {d.device_id for d in devices if d.received}
    assert received == canary  # nobody outside the canary got it
    for d in devices:
        assert d.running_version() == "1.0", d.device_id
    view = {x["id"]: x["version"] for x in ctl.api("GET", "/devices")["devices"]}
    assert all(view[d.device_id] == "1.0" for d in devices)  # configData + no success reported
    assert {a["status"] for a in ctl.api("GET", f"/actions?rollout={rid}")["actions"]} == {"failure"}

    # Halting the paused rollout leaves nothing for anyone.
    ctl.api("POST", f"/rollouts/{rid}/halt")
    poll_all(devices, 1)
    assert {d.device_id for d in devices if d.received} == canary
    ctl.stop()


def test_good_release_grows_wave_by_wave(tmp_path: Path, pki: Keys, make_bundle) -> None:
    data = tmp_path / "ctl"
    ctl = start_controller(data, keyring=pki.root_crt, tick_interval=3600)
    devices = make_fleet(ctl, tmp_path, pki, 24)
    good = make_bundle("2.0", size=4096)
    rid = ctl.api("POST", "/rollouts", {"bundle": upload(ctl, good), "group": "all",
                                        "policy": {"canary_percent": 10}})["id"]
    st = ctl.api("GET", f"/rollouts/{rid}")
    assert st["wave_sizes"] == {"0": 3, "1": 6, "2": 12, "3": 3}
    seen_waves = []
    for _ in range(6):
        before = {d.device_id for d in devices if d.received}
        wave = ctl.api("GET", f"/rollouts/{rid}")["current_wave"]
        members = set(ctl.fleet.wave_members(rid, wave))
        poll_all(devices, 1)
        got = {d.device_id for d in devices if d.received} - before
        assert got <= members  # only the running wave's devices ever receive it
        seen_waves.append(wave)
        if ctl.api("GET", f"/rollouts/{rid}")["status"] == "finished":
            break
        if wave == 1:  # restart mid-rollout: plan, wave and open actions come back from SQLite
            ctl.stop()
            ctl = start_controller(data, keyring=pki.root_crt, tick_interval=3600)
            for d in devices:
                d.controller = ctl.url
    assert ctl.api("GET", f"/rollouts/{rid}")["status"] == "finished"
    assert seen_waves[:4] == [0, 1, 2, 3]
    assert all(d.running_version() == "2.0" for d in devices)
    assert all(x["version"] == "2.0" for x in ctl.api("GET", "/devices")["devices"])
    ctl.stop()


def test_cancel_is_honoured_by_devices(tmp_path: Path, pki: Keys, make_bundle) -> None:
    ctl = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    devices = make_fleet(ctl, tmp_path, pki, 4)
    rid = ctl.api("POST", "/deployments", {"bundle": upload(ctl, make_bundle("2.0", size=4096)),
                                           "group": "all"})["id"]
    ctl.api("POST", f"/rollouts/{rid}/cancel")
    assert [d.step() for d in devices] == ["canceled"] * 4
    assert {a["status"] for a in ctl.api("GET", f"/actions?rollout={rid}")["actions"]} == {"canceled"}
    assert [d.step() for d in devices] == ["idle"] * 4
    assert all(not d.received and d.running_version() == "1.0" for d in devices)
    with pytest.raises(AssertionError, match="409"):
        ctl.api("POST", f"/rollouts/{rid}/resume")
    ctl.stop()
