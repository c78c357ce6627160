"""The device agent's own DDI client (agent.device.fleet) against this controller, over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core import lifecycle
from agent.core.config import load
from agent.device.updater import Updater, open_device
from agent.host import sim
from agent.host.simfleet import start_controller
from tests.conftest import Keys, make_image

client = pytest.importorskip("agent.device.fleet",
                             reason="the device-side DDI client is not in this tree yet")

BROKEN = '\n[[health.probe]]\ntype = "disk"\npath = "/"\nmin_free_mb = 1000000000\nname = "broken-app"\n'


def agent_cycle(board: Path, url: str, did: str, token: str) -> None:
    """What the service does on a sim board: finish a trial, then one DDI poll."""
    for _ in range(3):
        dev = open_device(load(board / "agent.toml"))
        try:
            up = Updater(dev, sleep=lambda s: None)
            up.cycle()
            if dev.journal.state().phase is not lifecycle.Phase.IDLE:
                continue
            cfg = client.FleetConfig(url=url, controller_id=did, auth="target", token=token, push="none")
            outcome = client.FleetAgent(up, client.DdiClient(cfg), sleep=lambda s: None).poll_once()
            if not outcome.rebooted:
                return
        finally:
            dev.close()


def test_real_agent_rolls_forward_and_reverts(tmp_path: Path, pki: Keys, make_bundle) -> None:
    ctl = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    boards = {}
    for i in range(3):
        board = tmp_path / f"b{i}"
        sim.init_device(board, image=make_image(tmp_path / f"i{i}", 4096, "1.0"), keyring=pki.root_crt,
                        slot_size=1 << 20)
        if i == 2:
            with open(board / "agent.toml", "a") as f:
                f.write(BROKEN)
        boards[f"d{i}"] = (board, ctl.api("POST", "/devices", {"id": f"d{i}"})["token"])
    ctl.api("POST", "/groups", {"name": "g", "devices": list(boards)})
    with open(make_bundle("2.0", size=4096), "rb") as f:
        bid = ctl.api("POST", "/bundles?filename=v2.bundle", data=f)["id"]
    rid = ctl.api("POST", "/deployments", {"bundle": bid, "group": "g"})["id"]
    for _ in range(4):
        for did, (board, token) in boards.items():
            agent_cycle(board, ctl.url, did, token)
    actions = {a["device"]: a["status"] for a in ctl.api("GET", f"/actions?rollout={rid}")["actions"]}
    assert actions == {"d0": "success", "d1": "success", "d2": "failure"}
    view = {d["id"]: d["version"] for d in ctl.api("GET", "/devices")["devices"]}
    for did, (board, _) in boards.items():
        dev = open_device(load(board / "agent.toml"))
        try:
            st = Updater(dev).status()
        finally:
            dev.close()
        running = st["slots"][st["booted_slot"]]["version"]
        assert running == ("1.0" if did == "d2" else "2.0")
        assert view[did] == running  # the controller's view matches the device's
    ctl.stop()


def test_real_agent_through_a_faulty_link(tmp_path: Path, pki: Keys, make_bundle) -> None:
    """Dropped, truncated and refused downloads and a lost feedback answer: every device ends on
    the new version committed, and the controller's view matches it."""
    from tests.faultproxy import Fault, FaultProxy

    ctl = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    port = int(ctl.url.rsplit(":", 1)[1])
    # Faults pick a connection by its first request; the agent keeps connections alive, so a
    # cut "after" a few KB lands inside the 40 KB artifact that follows the small poll answers.
    art = FaultProxy(("127.0.0.1", port), [Fault("drop", after=3000), Fault("truncate", after=9000),
                                           Fault("http503")], match=b"/controller/v1/d0")
    fb = FaultProxy(("127.0.0.1", port), [Fault("http503"), Fault("drop", after=20_000),
                                          Fault("stall", after=2000, seconds=1.0)],
                    match=b"/controller/v1/d1")
    try:
        boards = {}
        for i, proxy in enumerate((art, fb)):
            board = tmp_path / f"b{i}"
            sim.init_device(board, image=make_image(tmp_path / f"i{i}", 4096, "1.0"), keyring=pki.root_crt,
                            slot_size=1 << 20)
            boards[f"d{i}"] = (board, ctl.api("POST", "/devices", {"id": f"d{i}"})["token"], proxy.url)
        with open(make_bundle("2.0", size=40_000), "rb") as f:
            bid = ctl.api("POST", "/bundles?filename=v2.bundle", data=f)["id"]
        rid = ctl.api("POST", "/deployments", {"bundle": bid, "all": True})["id"]
        for _ in range(8):
            for did, (board, token, url) in boards.items():
                agent_cycle(board, url, did, token)
        assert art.applied == ["drop", "truncate", "http503"]  # the faults really happened
        assert fb.applied == ["http503", "drop", "stall"]
        actions = {a["device"]: a["status"] for a in ctl.api("GET", f"/actions?rollout={rid}")["actions"]}
        assert actions == {"d0": "success", "d1": "success"}
        view = {d["id"]: d["version"] for d in ctl.api("GET", "/devices")["devices"]}
        for did, (board, _, _) in boards.items():
            dev = open_device(load(board / "agent.toml"))
            try:
                st = Updater(dev).status()
            finally:
                dev.close()
            assert st["slots"][st["booted_slot"]]["version"] == view[did] == "2.0"
        finals = ctl.fleet.db.query("SELECT COUNT(*) FROM feedback WHERE device_id = 'd1' "
                                    "AND execution = 'closed'")[0][0]
        assert finals == 1  # the retried final report was applied once
    finally:
        art.close()
        fb.close()
        ctl.stop()
