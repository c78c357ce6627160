"""The parts of tools/e2e that judge a run without QEMU: reading the grubenv blocks off the
disk while the guest runs (scenario (d)'s cut during a commit), the image cache key, and the
slimmed slot of image/build.py."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.bootloader import grub
from agent.core import grubenv
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT / "tools/e2e"))
e2e = load_script("e2e_run", ROOT / "tools/e2e/run.py")
build = load_script("image_build_slim", ROOT / "image/build.py")


def envs_of_an_update(tmp_path: Path) -> list[tuple[str, bytes]]:
    """The primary grubenv's bytes at each step of an A->B update, written by the real backend."""
    path = tmp_path / "EFI/edgeops/grubenv"
    path.parent.mkdir(parents=True)
    path.write_bytes(grubenv.encode(grub.initial_env("A", ("A", "B"))))
    (path.parent / "grubenv.b").write_bytes(path.read_bytes())
    bl = grub._factory({"grubenv": "EFI/edgeops/grubenv"}, tmp_path, ("A", "B"))
    steps = [("committed A", path.read_bytes())]
    bl.set_trial("B")
    steps.append(("trial armed", path.read_bytes()))
    env = grubenv.decode(path.read_bytes())
    env["B_TRY"] = "1"  # what grub.cfg saves as it boots the trial
    path.write_bytes(grubenv.encode(env))
    steps.append(("trial booted", path.read_bytes()))
    bl.commit("B")
    steps.append(("committed B", path.read_bytes()))
    return steps


def test_only_the_committed_trial_counts_as_committed(tmp_path: Path) -> None:
    got = [(name, e2e.committed(e2e.env_block(data), "B")) for name, data in envs_of_an_update(tmp_path)]
    assert got == [("committed A", False), ("trial armed", False), ("trial booted", False),
                   ("committed B", True)]


def test_a_torn_block_is_no_block(tmp_path: Path) -> None:
    data = envs_of_an_update(tmp_path)[-1][1]
    assert e2e.env_block(b"\0" + data[1:]) is None  # grub.py tears byte 0 while rewriting
    assert e2e.env_block(data) is not None


def test_env_offsets_finds_both_copies_on_the_disk(tmp_path: Path) -> None:
    block = grubenv.encode(grub.initial_env("A", ("A", "B")))
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
        for off in (1 << 20, 3 << 20):
            f.seek(off)
            f.write(block)
    assert e2e.env_offsets(disk, 1 << 19, 4 << 20) == [1 << 20, 3 << 20]
    with open(disk, "r+b") as f:
        f.seek(5 << 20)
        f.write(block)  # a third, stale copy inside the ESP: the harness refuses to guess
    with pytest.raises(e2e.E2EFailure, match="two grubenv blocks"):
        e2e.env_offsets(disk, 1 << 19, 6 << 20)


def test_image_key_follows_what_goes_into_the_image(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("[fleet]\n")
    one = e2e.image_key(fleet)
    assert e2e.image_key(fleet) == one
    fleet.write_text("[fleet]\ntoken = \"other\"\n")
    assert e2e.image_key(fleet) != one
    assert "agent" in e2e.IMAGE_INPUTS and "tools/e2e/guest" in e2e.IMAGE_INPUTS
    assert "tests" not in e2e.IMAGE_INPUTS


def test_slim_removes_only_what_it_lists(tmp_path: Path) -> None:
    keep = tmp_path / "usr/lib/x86_64-linux-gnu/perl-base/strict.pm"
    gone = tmp_path / "usr/share/perl/5.36/Carp.pm"
    hwdb = tmp_path / "usr/lib/udev/hwdb.bin"
    for f in (keep, gone, hwdb):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * 100)
    assert build.slim(tmp_path) == 200
    assert keep.exists() and not gone.exists() and not hwdb.exists()


def test_every_scenario_runs_once_and_the_dependent_ones_share_a_chain() -> None:
    names = [s for chain in e2e.CHAINS for s in chain if s != "baseline"]
    assert sorted(names) == sorted(set(names)) == sorted(e2e.SCENARIOS)
    # (e) needs (a)'s committed A->B, and (d)'s two power cuts ride on (a) and (e)
    chain_of = {s: i for i, chain in enumerate(e2e.CHAINS) for s in chain}
    assert chain_of["a"] == chain_of["e"] == chain_of["d"]


def test_a_subset_runs_in_chain_order_and_leaves_an_unchosen_chain_off() -> None:
    picked = e2e.chains_for(["e", "b", "a"])
    assert [s for chain in picked for s in chain] == [s for chain in e2e.CHAINS for s in chain
                                                      if s in ("a", "e", "b")]
    only_d = e2e.chains_for(["d"])
    assert sum(1 for chain in only_d if chain) == 1 and ["d"] in only_d


def test_fleet_toml_keeps_its_token_and_takes_the_id_from_the_serial(tmp_path: Path) -> None:
    from agent.device.fleet_files import find_fleet

    old = tmp_path / "fleet.toml"
    old.write_text('[fleet]\nurl = "http://10.0.2.100:8080"\ncontroller_id = "qemu-1"\n'
                   'auth = "target"\ntoken = "00ff"\n')
    path, token = e2e.fleet_toml(old)
    assert token == "00ff" and (path.stat().st_mode & 0o777) == 0o600
    serial = tmp_path / "serial"
    serial.write_text("qemu-7\n")
    path.write_text(path.read_text().replace(e2e.SERIAL_FILE, str(serial)))
    cfg = find_fleet(tmp_path / "agent.toml")
    assert cfg is not None and cfg.controller_id == "qemu-7" and cfg.token == "00ff"


class Running:
    """A QEMU process stand-in that runs until stopped (only poll() is used)."""

    def __init__(self) -> None:
        self.stopped = False

    def poll(self) -> int | None:
        return 0 if self.stopped else None


def watched_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, console: bytes) -> tuple[Any, Running]:
    qemu = sys.modules["qemu"]
    monkeypatch.setattr(qemu, "FIRMWARE_SILENCE", 0.3)
    monkeypatch.setattr(qemu, "WATCH_POLL", 0.05)
    m = qemu.Machine("qemu-t", tmp_path, tmp_path / "disk.img")
    m.console = tmp_path / "console-1.log"
    m.console.write_bytes(console)
    return m, Running()


def test_a_firmware_silent_after_a_guest_reset_gets_the_reset_button_once_per_silence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, proc = watched_machine(tmp_path, monkeypatch,
                              b"BdsDxe: loading Boot0001\n...\n[ 169.9] reboot: Restarting system\n")
    t = threading.Thread(target=m._watch_resets, args=(proc, 1))
    t.start()
    t.join(10)  # two presses end the watch
    assert not t.is_alive()
    assert len(m.firmware_resets) == 2
    assert (tmp_path / "firmware-hang-1-1.txt").read_text().startswith("qemu-t: no firmware output")


def test_a_firmware_that_answers_after_the_reset_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, proc = watched_machine(tmp_path, monkeypatch, b"[ 169.9] reboot: Restarting system\n")
    t = threading.Thread(target=m._watch_resets, args=(proc, 1))
    t.start()
    with open(m.console, "ab") as f:  # OVMF's boot manager, well inside the silence allowed
        f.write(b"BdsDxe: loading Boot0001 \"UEFI Misc Device\"\n")
    time.sleep(1.0)
    proc.stopped = True
    t.join(5)
    assert m.firmware_resets == []
