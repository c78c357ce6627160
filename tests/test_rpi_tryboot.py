"""Raspberry Pi tryboot backend: autoboot.txt as documented, device-tree detection, atomic commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.bootloader import create
from agent.adapters.bootloader.bootfs import DirBootFs
from agent.adapters.bootloader.rpi_tryboot import RebootParamFlag, RpiTryboot, VcMailboxFlag, read_boot_info
from agent.adapters.fsutil import atomic_write
from agent.core.autoboot import Autoboot, AutobootError, initial_autoboot, parse_autoboot
from agent.errors import BootloaderError
from tests import firmware as fw

# The two files of the documented example (autoboot.adoc, "Example update flow for A/B booting")
DOC_INITIAL = b"[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
DOC_UPDATED = b"[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"


def make(tmp: Path) -> tuple[RpiTryboot, fw.RpiFirmware]:
    boot = tmp / "boot"
    boot.mkdir()
    (boot / "autoboot.txt").write_bytes(initial_autoboot(2, 3))
    parts = {"A": 2, "B": 3}
    param = tmp / "run/systemd/reboot-param"
    bl = RpiTryboot(DirBootFs(boot), parts, proc=tmp / "proc", flag=RebootParamFlag(param))
    return bl, fw.RpiFirmware(DirBootFs(boot), tmp / "proc", parts, param)


def test_initial_file_is_the_documented_one() -> None:
    assert initial_autoboot(2, 3) == DOC_INITIAL
    ab = parse_autoboot(DOC_INITIAL)
    assert (ab.boot_partition, ab.tryboot_partition, ab.tryboot_a_b) == (2, 3, True)


def test_parse_follows_the_firmware_rules() -> None:
    text = b"# comment\n[all]\nboot_partition=5\ntryboot_a_b=1\nboot_partition=2 # last wins\n" \
           b"[none]\nboot_partition=9\n[tryboot]\nboot_partition=3\n"
    ab = parse_autoboot(text)
    assert (ab.boot_partition, ab.tryboot_partition) == (2, 3)
    for bad in (b"x" * 513, b"[pi4]\nboot_partition=2\n", b"[all]\nboot_partition=two\n",
                b"[all]\njunk\n", "[all]\nboot_partition=2\u00e9\n".encode()):
        with pytest.raises(AutobootError):
            parse_autoboot(bad)


def test_device_tree_detection(tmp_path: Path) -> None:
    node = tmp_path / "device-tree/chosen/bootloader"
    assert read_boot_info(tmp_path).partition is None
    node.mkdir(parents=True)
    (node / "tryboot").write_bytes((1).to_bytes(4, "big"))
    (node / "partition").write_bytes((3).to_bytes(4, "big"))
    info = read_boot_info(tmp_path)
    assert info.tryboot and info.partition == 3


def test_documented_flow_commit(tmp_path: Path) -> None:
    bl, firmware = make(tmp_path)
    assert firmware.boot() == "A" and bl.booted_slot() == "A"
    assert bl.primary() == "A" and bl.trial() is None
    bl.set_trial("B")
    assert firmware.reboot_param.read_text().strip() == "0 tryboot"  # what `reboot "0 tryboot"` passes
    assert bl.trial() == "B"
    assert firmware.reboot() == "B" and firmware.log[-1] == (3, True)
    assert read_boot_info(firmware.proc).tryboot and bl.trial() == "B"
    bl.commit("B")
    assert (tmp_path / "boot/autoboot.txt").read_bytes() == DOC_UPDATED
    assert bl.primary() == "B"
    assert firmware.reboot() == "B" and firmware.log[-1] == (3, False)
    assert bl.trial() is None


def test_unconfirmed_trial_falls_back_on_any_reset(tmp_path: Path) -> None:
    bl, firmware = make(tmp_path)
    firmware.boot()
    bl.set_trial("B")
    assert firmware.reboot() == "B"
    assert firmware.power_cut() == "A"  # the flag was one-shot
    assert firmware.reboot() == "A"
    bl.mark_bad("B")
    assert parse_autoboot((tmp_path / "boot/autoboot.txt").read_bytes()).tryboot_partition == 2
    firmware.flag = True  # even a stray `reboot "0 tryboot"` stays on A
    assert firmware.boot() == "A"
    with pytest.raises(BootloaderError):
        bl.mark_bad("A")
    with pytest.raises(BootloaderError):
        bl.set_trial("A")


def test_mark_bad_disarms_a_pending_trial(tmp_path: Path) -> None:
    bl, firmware = make(tmp_path)
    firmware.boot()
    bl.set_trial("B")
    bl.mark_bad("B")
    assert not firmware.reboot_param.exists() and bl.trial() is None
    assert firmware.reboot() == "A"


def test_commit_is_atomic_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bl, firmware = make(tmp_path)
    firmware.boot()
    bl.set_trial("B")
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("rename"), real_replace(a, b))[1])
    bl.commit("B")
    assert calls == ["fsync", "rename", "fsync"]  # file data, the rename, the directory
    assert sorted(p.name for p in (tmp_path / "boot").iterdir()) == ["autoboot.txt"]


def test_crash_before_rename_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "autoboot.txt"
    target.write_bytes(DOC_INITIAL)

    def boom(a: object, b: object) -> None:
        raise OSError(5, "power lost")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, DOC_UPDATED)
    assert target.read_bytes() == DOC_INITIAL


def test_on_a_real_fat_partition(tmp_path: Path) -> None:
    fw.need("mtype", "mtools")
    disk = fw.make_disk(tmp_path / "sd.img", "label: dos\nstart=1MiB, size=34MiB, type=c\n", 40, fat=(1,))
    fs = fw.MtoolsFs(disk.path, disk.offset(1))
    fs.replace("autoboot.txt", DOC_INITIAL)
    bl = RpiTryboot(fs, {"A": 2, "B": 3}, proc=tmp_path / "proc",
                     flag=RebootParamFlag(tmp_path / "param"))
    bl.set_trial("B")
    bl.commit("B")
    assert fs.read("autoboot.txt") == DOC_UPDATED


def test_registered_factory(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/autoboot.txt").write_bytes(DOC_INITIAL)
    bl = create("rpi_tryboot", {"boot_dir": "boot", "partitions": {"A": 2, "B": 3}, "proc": "proc",
                                "reboot_param": "run/reboot-param"}, tmp_path, ("A", "B"))
    assert bl.primary() == "A"


@settings(max_examples=200)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_autoboot_error(data: bytes) -> None:
    try:
        ab = parse_autoboot(data)
    except AutobootError:
        return
    assert isinstance(ab, Autoboot)


@given(st.integers(1, 99), st.integers(1, 99))
def test_autoboot_round_trips(a: int, b: int) -> None:
    ab = Autoboot(a, b)
    assert parse_autoboot(ab.to_bytes()) == ab


def test_vcmailbox_flag_drives_the_firmware_reboot_flag(tmp_path: Path) -> None:
    state = {"flag": 0}
    calls: list[list[str]] = []

    def vcmailbox(argv: list[str]) -> str:  # the firmware's answers, as RAUC documents them
        calls.append(argv)
        if argv[1] == "0x00038064":
            state["flag"] = int(argv[4])
        return f"0x0000001c 0x80000000 {argv[1]} 0x00000004 0x80000004 {state['flag']:#010x} 0x00000000\n"

    bl, firmware = make(tmp_path)
    bl.flag = VcMailboxFlag(vcmailbox)
    firmware.boot()
    bl.set_trial("B")
    assert state["flag"] == 1 and bl.trial() == "B"
    assert ["vcmailbox", "0x00038064", "4", "0", "1"] in calls
    bl.mark_bad("B")
    assert state["flag"] == 0 and bl.trial() is None
    bad = VcMailboxFlag(lambda argv: "garbage")
    with pytest.raises(BootloaderError):
        bad.armed()
