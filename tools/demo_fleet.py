"""make demo-fleet: a controller on 127.0.0.1 rolls a release out to five simulated boards.

One board has an application that never becomes healthy: it installs the release, boots it
once as a trial, fails its health check, reverts to the old slot and reports failure. The
others commit and report success. Devices run the real device agent (agent.device.fleet) when it
is present, else the minimal DDI poller in agent.host.simfleet.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from agent.core import lifecycle  # noqa: E402
from agent.core.config import load  # noqa: E402
from agent.device.updater import Updater, open_device  # noqa: E402
from agent.host import (  # noqa: E402
    bundle_writer,
    keys,
    sim,
)
from agent.host.simfleet import SimDevice, start_controller  # noqa: E402

BROKEN = '\n[[health.probe]]\ntype = "disk"\npath = "/"\nmin_free_mb = 1000000000\nname = "app-ready"\n'
SITES = ("berlin", "lyon", "porto", "turin", "ghent")


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def image(path: Path, size: int, seed: str) -> Path:
    import hashlib

    data = b"".join(hashlib.sha256(f"{seed}{i}".encode()).digest() for i in range(size // 32 + 1))
    path.write_bytes(data[:size])
    return path


def device_step(board: Path, url: str, did: str, token: str) -> str:
    try:
        from agent.device import fleet as client
    except ImportError:
        return SimDevice(did, token, board, url).step()
    for _ in range(3):
        dev = open_device(load(board / "agent.toml"))
        try:
            up = Updater(dev, sleep=lambda s: None)
            up.cycle()  # the service: finish a pending trial first
            if dev.journal.state().phase is not lifecycle.Phase.IDLE:
                continue
            cfg = client.FleetConfig(url=url, controller_id=did, auth="target", token=token, push="none")
            out = client.FleetAgent(up, client.DdiClient(cfg), sleep=lambda s: None).poll_once()
            if not out.rebooted:
                return "; ".join(out.messages) or "idle"
        finally:
            dev.close()
    return "rebooted"


def running(board: Path) -> str:
    dev = open_device(load(board / "agent.toml"))
    try:
        st = Updater(dev).status()
    finally:
        dev.close()
    return f"slot {st['booted_slot']} v{st['slots'][st['booted_slot']]['version']}"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="edgeops-demo-fleet-") as tmp:
        t = Path(tmp)
        say("creating a root and a signer; the controller gets only the root certificate")
        root = keys.init_root(t / "root")
        signer = keys.issue_signer(t / "root", t / "signer")
        ctl = start_controller(t / "controller", keyring=root.cert_path, tick_interval=0.5)
        say(f"controller on {ctl.url} (SQLite at {t / 'controller' / 'controller.db'})")
        boards = {}
        for i, site in enumerate(SITES):
            did = f"edge-{i + 1}"
            b = t / did
            sim.init_device(b, image=image(t / f"{did}.img", 8192, "1.0"), keyring=root.cert_path,
                            version="1.0", slot_size=1 << 20)
            if i == 3:
                with open(b / "agent.toml", "a") as f:
                    f.write(BROKEN)
            boards[did] = (b, ctl.api("POST", "/devices", {"id": did, "site": site})["token"])
            note = "  (its app will never be healthy)" if i == 3 else ""
            print(f"    {did} at {site}: {running(b)}{note}")
        ctl.api("POST", "/groups", {"name": "stores", "devices": list(boards)})

        say("signing release 2.0 and uploading it; the controller verifies signature and blocks")
        out = t / "release-2.0.bundle"
        bundle_writer.create(out, sign=keys.load_signing_key(signer.key_path).sign,
                      chain_pem=signer.cert_path.read_bytes(), compatible="edgeops-sim", version="2.0",
                      security_version=1, build_time=int(time.time()),
                      sources=[bundle_writer.PayloadSource("rootfs", "rootfs",
                                                           image(t / "v2.img", 8192, "2.0"))])
        with open(out, "rb") as f:
            bid = ctl.api("POST", "/bundles?filename=release-2.0.bundle", data=f)["id"]

        say("rollout: canary wave first, then growing waves; gate = 50% committed, pause at 60% failed")
        rid = ctl.api("POST", "/rollouts", {"bundle": bid, "group": "stores", "policy": {
            "canary_percent": 20, "success_threshold": 0.5, "error_threshold": 0.6}})["id"]
        for rnd in range(1, 7):
            st = ctl.api("GET", f"/rollouts/{rid}")
            print(f"  round {rnd}: rollout {st['status']}, wave {st['current_wave'] + 1}/{st['waves']}")
            for did, (b, token) in boards.items():
                what = device_step(b, ctl.url, did, token)
                if what not in ("idle", ""):
                    print(f"    {did}: {what}")
            time.sleep(0.6)  # let the gate tick
            if ctl.api("GET", f"/rollouts/{rid}")["status"] != "running":
                break
        st = ctl.api("GET", f"/rollouts/{rid}")
        view = {d["id"]: d["version"] for d in ctl.api("GET", "/devices")["devices"]}
        actions = {a["device"]: a["status"] for a in ctl.api("GET", f"/actions?rollout={rid}")["actions"]}
        done = list(actions.values())
        say(f"rollout {st['status']}: {done.count('success')} of {len(boards)} devices committed, "
            f"{done.count('failure')} reverted (last wave's gate: {st['reason']})")
        for did, (b, _) in boards.items():
            print(f"    {did}: device runs {running(b)}; controller says v{view[did]}, "
                  f"action {actions.get(did, '-')}")
        ctl.stop()
        ok = actions.get("edge-4") == "failure" and sum(v == "success" for v in actions.values()) == 4
        say("done: four boards committed 2.0, edge-4 reverted to 1.0 and said so" if ok
            else "unexpected outcome")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
