"""The update life cycle end to end on a sim device, through the orchestrator."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from agent.core import lifecycle
from agent.device.updater import Updater
from agent.errors import RollbackRefused, StateError
from agent.host import sim
from tests.conftest import BundleFactory, slot_sha

FAILING = {"retries": 1, "deadline": 5, "interval": 0.1,
           "probe": [{"type": "tcp", "host": "127.0.0.1", "port": 9, "name": "app port"}]}


def install(up: Updater, path: Path) -> None:
    with open(path, "rb") as f:
        up.install(f)


def reboot_and_cycle(up: Updater, device_dir: Path) -> Updater:
    sim.SimFirmware(device_dir).reboot()
    up.messages.clear()
    up.rebooted = False
    up.cycle()
    return up


def test_install_streams_the_image_into_the_inactive_slot(updater: Updater, device_dir: Path,
                                                          make_bundle: BundleFactory,
                                                          tmp_path: Path) -> None:
    b = make_bundle("2.0", size=400_000)
    install(updater, b)
    img = next(tmp_path.glob("img-2.0-*"))
    assert slot_sha(device_dir / "slot-b.img", 400_000) == slot_sha(img, 400_000)
    st = updater.status()
    assert (st["phase"], st["primary_slot"], st["trial_pending_slot"]) == ("trial-pending", "A", "B")
    assert st["slots"]["B"]["state"] == "trial"


def test_zstd_payload_installs_identically(updater: Updater, device_dir: Path,
                                           make_bundle: BundleFactory, tmp_path: Path) -> None:
    install(updater, make_bundle("2.0", size=400_000, compress=True))
    img = next(tmp_path.glob("img-2.0-*"))
    assert slot_sha(device_dir / "slot-b.img", 400_000) == slot_sha(img, 400_000)


def test_install_from_a_pipe_needs_no_seek(updater: Updater, make_bundle: BundleFactory) -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            chunk = self.inner.read(min(len(b), 7001))  # odd-sized short reads
            b[:len(chunk)] = chunk
            return len(chunk)

        def seekable(self) -> bool:
            return False

    updater.install(Pipe(make_bundle("2.0").read_bytes()))  # type: ignore[arg-type]
    assert updater.journal.state().phase == "trial-pending"


def test_good_trial_commits_and_raises_the_floor(updater: Updater, device_dir: Path,
                                                 make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("2.0", security_version=4))
    reboot_and_cycle(updater, device_dir)
    st = updater.status()
    assert (st["booted_slot"], st["primary_slot"], st["phase"]) == ("B", "B", "idle")
    assert (st["slots"]["B"]["version"], st["slots"]["B"]["state"]) == ("2.0", "good")
    assert updater.journal.security_floor == 4
    assert [h.event for h in updater.journal.history(4)] == ["installed", "trial", "health-passed",
                                                              "committed"]


def test_failed_health_reverts_and_marks_the_slot_bad(updater: Updater, device_dir: Path,
                                                      make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("3.0", security_version=2, health=FAILING))
    reboot_and_cycle(updater, device_dir)
    assert updater.rebooted
    assert any("app port" in m for m in updater.messages)
    reboot_and_cycle(updater, device_dir)  # the agent after the revert reboot
    st = updater.status()
    assert (st["booted_slot"], st["primary_slot"], st["phase"]) == ("A", "A", "idle")
    assert st["slots"]["B"]["state"] == "bad"
    assert updater.journal.security_floor == 0


def test_bundle_health_adds_to_the_device_checks(updater: Updater, make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("3.0", health=FAILING))
    names = [p.name for p in updater.policy().probes]
    assert "app port" in names and len(names) == 2


def test_reinstall_while_a_trial_is_pending_replaces_it(updater: Updater, device_dir: Path,
                                                        make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("2.0"))
    install(updater, make_bundle("2.1"))
    reboot_and_cycle(updater, device_dir)
    assert updater.status()["slots"]["B"]["version"] == "2.1"


def test_install_is_refused_during_a_trial(updater: Updater, device_dir: Path,
                                           make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("2.0"))
    sim.SimFirmware(device_dir).reboot()
    with pytest.raises(StateError, match="while the device is testing"):
        install(updater, make_bundle("2.1"))


def test_rollback_boots_the_other_good_slot(updater: Updater, device_dir: Path,
                                            make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("2.0", security_version=0))
    reboot_and_cycle(updater, device_dir)
    assert updater.rollback() == "A"
    assert updater.rebooted
    assert updater.status()["booted_slot"] == "A"
    assert updater.dev.bootloader.primary() == "A"


def test_install_is_refused_while_a_rollback_waits_for_its_reboot(
        updater: Updater, device_dir: Path, make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("2.0", security_version=0))
    reboot_and_cycle(updater, device_dir)
    updater.dev.bootloader.commit("A")  # what rollback does, just before the reboot it asks for
    slot_a = (device_dir / "slot-a.img").read_bytes()
    with pytest.raises(StateError, match="will boot slot A next"):
        install(updater, make_bundle("3.0", security_version=0))
    assert (device_dir / "slot-a.img").read_bytes() == slot_a
    assert updater.journal.slots()["A"].state == "good"
    assert updater.journal.state().phase is lifecycle.Phase.IDLE


def test_rollback_below_the_floor_is_refused(updater: Updater, device_dir: Path,
                                             make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("2.0", security_version=1))
    reboot_and_cycle(updater, device_dir)
    with pytest.raises(RollbackRefused, match="below the device floor 1"):
        updater.rollback()


def test_rollback_honours_the_anchored_floor_after_a_reimaged_journal(
        updater: Updater, device_dir: Path, make_bundle: BundleFactory) -> None:
    from agent.adapters.rot.keystore import KeystoreRoot

    install(updater, make_bundle("2.0", security_version=0))
    reboot_and_cycle(updater, device_dir)
    # The floor lives in the root of trust too (TPM counter or keystore); the journal's copy is 0.
    root = KeystoreRoot(updater.cfg.state_dir, reason="test")
    root.provision((device_dir / "keyring" / "root.crt").read_bytes())
    root.raise_floor(3)
    fresh = Updater(updater.dev, sleep=lambda s: None)
    with pytest.raises(RollbackRefused, match="below the device floor 3"):
        fresh.rollback()


def test_rollback_needs_a_good_other_slot(updater: Updater) -> None:
    with pytest.raises(StateError, match="no known-good version"):
        updater.rollback()


def test_mark_bad_during_the_trial_reverts(updater: Updater, device_dir: Path,
                                           make_bundle: BundleFactory) -> None:
    install(updater, make_bundle("2.0", health={"deadline": 60, "probe": [
        {"type": "command", "command": ["false"], "name": "never"}], "retries": 100}))
    sim.SimFirmware(device_dir).reboot()
    updater.mark_bad()
    assert updater.rebooted and updater.status()["booted_slot"] == "A"


def test_status_has_the_documented_fields(updater: Updater) -> None:
    st = json.loads(json.dumps(updater.status()))
    assert {"booted_slot", "primary_slot", "trial", "slots"} <= st.keys()
    for slot in st["slots"].values():
        assert {"device", "version", "state"} <= slot.keys()
        assert slot["state"] in {"good", "bad", "trial", "empty"}


def test_a_second_installer_is_locked_out(updater: Updater, make_bundle: BundleFactory) -> None:
    with updater.locked(), pytest.raises(StateError, match="holds the device lock"):
        install(updater, make_bundle("2.0"))


def test_sim_device_folder_can_be_moved(device_dir: Path, tmp_path: Path,
                                        make_bundle: BundleFactory) -> None:
    from agent.core.config import load
    from agent.device.updater import open_device

    moved = tmp_path / "elsewhere"
    device_dir.rename(moved)
    up = Updater(open_device(load(moved / "agent.toml")), sleep=lambda s: None)
    install(up, make_bundle("2.0"))
    assert up.status()["slots"]["B"]["device"].startswith(str(moved))


def test_an_idle_agent_cycle_writes_nothing(updater: Updater, device_dir: Path) -> None:
    updater.cycle()
    db = device_dir / "state" / "journal.db"
    wal = db.with_name("journal.db-wal")
    before = (db.stat().st_mtime_ns, wal.stat().st_size if wal.exists() else 0)
    for _ in range(3):
        updater.cycle()
    assert (db.stat().st_mtime_ns, wal.stat().st_size if wal.exists() else 0) == before
