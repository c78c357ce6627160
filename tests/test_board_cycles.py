"""The spine's full cycles on every real-board backend, against a replica of the board's storage.

For each backend: trial → commit, trial → revert on failed health, trial →
power cut → bootloader fallback. The Updater (journal, trust, lifecycle) is the
real one; the firmware is tests/firmware.py reading the same disk image bytes
the backend wrote (sfdisk-partitioned image; FAT via mkfs.vfat + mtools; the
U-Boot env at raw offsets named by a fw_env.config). Rootfs slots are plain
files because agent.adapters.slots writes whole files/devices, not image partitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.adapters import boardfiles
from agent.adapters.bootloader import Bootloader, fwenv
from agent.adapters.bootloader import grub as grub_mod
from agent.adapters.bootloader import uboot as uboot_mod
from agent.adapters.bootloader import uboot_rauc as rauc_mod
from agent.adapters.bootloader.rpi_tryboot import RebootParamFlag, RpiTryboot
from agent.adapters.journal import Journal
from agent.core import grubenv, lifecycle
from agent.core.autoboot import initial_autoboot
from agent.core.config import AgentConfig
from agent.device.updater import Device, Updater
from tests import firmware as fw
from tests.conftest import COMPATIBLE, BundleFactory, Keys, make_image

ROOTFS_AB = "size=4MiB, name=rootfs_A\nsize=4MiB, name=rootfs_B\n"
GPT_UBOOT = "label: gpt\nstart=16MiB, size=8MiB, name=boot\n" + ROOTFS_AB
GPT_GRUB = "label: gpt\nstart=1MiB, size=34MiB, type=U, name=esp\n" + ROOTFS_AB
MBR_RPI = "label: dos\nstart=1MiB, size=34MiB, type=c\nsize=34MiB, type=c\nsize=34MiB, type=c\n"


@dataclass
class Board:
    bl: Bootloader
    runtime: fw.Runtime
    updater: Updater
    healthy: Path

    def cycle(self) -> lifecycle.Phase:
        """One agent cycle; until agent/device/updater.py has its per-boot confirm hook
        (``Updater._confirm_boot``), the same hook is run here."""
        self.updater.rebooted = False
        self.updater.cycle()
        phase = self.updater.journal.state().phase
        if hasattr(Updater, "_confirm_boot"):
            return phase
        confirm: Callable[[str], None] | None = getattr(self.bl, "confirm", None)
        booted = self.runtime.booted_slot()
        if confirm is not None and phase is lifecycle.Phase.IDLE and booted == self.bl.primary():
            confirm(booted)
        return phase


def _uboot_env(disk: fw.Disk, tmp: Path) -> fwenv.FwEnvStore:
    cfg = tmp / "fw_env.config"
    cfg.write_text(f"# two copies in the gap before partition 1\n"
                   f"{disk.path} 0x800000 0x4000\n{disk.path} 0x804000 0x4000\n")
    return fwenv.load(cfg)


def _build(kind: str, tmp: Path) -> tuple[Bootloader, Any]:
    slots = ("A", "B")
    if kind == "uboot":
        disk = fw.make_disk(tmp / "emmc.img", GPT_UBOOT, 40)
        store = _uboot_env(disk, tmp)
        store.write(uboot_mod.initial_env("A"))
        return uboot_mod.UBootBootcount(store, slots), fw.UBootBootcount(store)
    if kind == "uboot_rauc":
        disk = fw.make_disk(tmp / "emmc.img", GPT_UBOOT, 40)
        store = _uboot_env(disk, tmp)
        store.write(rauc_mod.initial_env("A"))
        return rauc_mod.UBootRauc(store, slots), fw.UBootRauc(store)
    if kind == "grub":
        fw.need("mtype", "mtools")
        disk = fw.make_disk(tmp / "disk.img", GPT_GRUB, 48, fat=(1,))
        esp = fw.MtoolsFs(disk.path, disk.offset(1))
        # where the board file puts grubenv, relative to the ESP mounted at /boot/efi
        env = boardfiles.load("x86-64-grub").settings["grubenv"].removeprefix("/boot/efi/")
        esp.replace(env, grubenv.encode(grub_mod.initial_env("A", slots)))
        return grub_mod.GrubRauc(esp, env, slots), fw.Grub(esp, env)
    fw.need("mtype", "mtools")
    disk = fw.make_disk(tmp / "sd.img", MBR_RPI, 110, fat=(1, 2, 3))
    boot = fw.MtoolsFs(disk.path, disk.offset(1))
    boot.replace("autoboot.txt", initial_autoboot(2, 3))
    parts = {"A": 2, "B": 3}
    param = tmp / "run/systemd/reboot-param"
    bl = RpiTryboot(boot, parts, proc=tmp / "proc", flag=RebootParamFlag(param))
    return bl, fw.RpiFirmware(boot, tmp / "proc", parts, param)


@pytest.fixture(params=["uboot", "uboot_rauc", "grub", "rpi_tryboot"])
def board(request: pytest.FixtureRequest, tmp_path: Path, pki: Keys) -> Iterator[Board]:
    bl, firmware = _build(request.param, tmp_path)
    slot_files = {}
    for s in ("A", "B"):
        slot_files[s] = tmp_path / f"rootfs-{s}.img"
        with open(slot_files[s], "wb") as f:
            f.truncate(1 << 20)
    healthy = tmp_path / "healthy"
    cfg = AgentConfig(
        path=tmp_path / "agent.toml", board=request.param, compatible=COMPATIBLE,
        state_dir=tmp_path / "state", keyring=pki.root_crt, crl_dir=None,
        bootloader=request.param, bootloader_settings={},
        slots={s: {"rootfs": p} for s, p in slot_files.items()},
        health={"deadline": 5, "interval": 0.1, "retries": 1,
                "probe": [{"type": "command", "name": "marker", "command": ["test", "-e", str(healthy)]}]},
    )
    runtime = fw.Runtime(firmware)
    assert runtime.power_on() == "A"
    dev = Device(cfg, Journal(cfg.journal_path), bl, runtime)
    b = Board(bl, runtime, Updater(dev, sleep=lambda s: None), healthy)
    assert b.cycle() is lifecycle.Phase.IDLE
    yield b
    dev.close()


def _install(board: Board, make_bundle: BundleFactory, tmp_path: Path) -> None:
    bundle = make_bundle("2.0", image=make_image(tmp_path / "v2.img", 200_000, "2.0"))
    with open(bundle, "rb") as f:
        result = board.updater.install(f)
    assert result.slot == "B"
    assert board.bl.trial() == "B" and board.bl.primary() == "A"


def _stays_on(board: Board, slot: str, boots: int = 4) -> None:
    for _ in range(boots):
        board.runtime.reboot("routine")
        assert board.runtime.booted_slot() == slot
        assert board.cycle() is lifecycle.Phase.IDLE
    assert board.bl.primary() == slot and board.bl.trial() is None


def test_trial_then_commit(board: Board, make_bundle: BundleFactory, tmp_path: Path) -> None:
    board.healthy.touch()
    _install(board, make_bundle, tmp_path)
    board.runtime.reboot("install done")
    assert board.runtime.booted_slot() == "B"
    assert board.cycle() is lifecycle.Phase.IDLE
    assert board.updater.journal.slots()["B"].state == "good"
    _stays_on(board, "B")


def test_trial_reverts_on_failed_health(board: Board, make_bundle: BundleFactory,
                                        tmp_path: Path) -> None:
    _install(board, make_bundle, tmp_path)
    board.runtime.reboot("install done")
    assert board.runtime.booted_slot() == "B"
    board.cycle()  # health fails → mark B bad → reboot
    assert board.runtime.reboots[-1].startswith("trial rejected")
    assert board.runtime.booted_slot() == "A"
    assert board.cycle() is lifecycle.Phase.IDLE
    assert board.updater.journal.slots()["B"].state == "bad"
    _stays_on(board, "A")


def test_trial_power_cut_falls_back(board: Board, make_bundle: BundleFactory, tmp_path: Path) -> None:
    board.healthy.touch()
    _install(board, make_bundle, tmp_path)
    board.runtime.reboot("install done")
    assert board.runtime.booted_slot() == "B"
    board.runtime.power_cut()  # the trial system dies before the agent runs a check
    assert board.runtime.booted_slot() == "A", "the bootloader itself must fall back"
    assert board.cycle() is lifecycle.Phase.IDLE
    assert board.updater.journal.slots()["B"].state == "bad"
    _stays_on(board, "A")


def test_a_dead_trial_never_boots_again_whatever_the_resets(board: Board, make_bundle: BundleFactory,
                                                             tmp_path: Path) -> None:
    """The agent never gets to run: the bootloader alone must keep leaving the trial, even after
    the committed slot has spent its own tries (RAUC's schemes refill the counters then)."""
    board.healthy.touch()
    _install(board, make_bundle, tmp_path)
    board.runtime.reboot("install done")
    assert board.runtime.booted_slot() == "B"
    for _ in range(8):
        board.runtime.power_cut()
        assert board.runtime.booted_slot() == "A"


def test_rauc_scheme_confirms_the_committed_slot_even_on_its_last_attempt(tmp_path: Path) -> None:
    from agent.adapters.bootloader import uboot_rauc as rauc_mod
    from agent.adapters.bootloader.envfile import EnvStore, Location

    store = EnvStore([Location(tmp_path / "env", 0)], 0x4000)
    store.write({**rauc_mod.initial_env("A"), "BOOT_ORDER": "B A", "BOOT_B_LEFT": "0"})
    bl = rauc_mod.UBootRauc(store, ("A", "B"))
    assert bl.primary() == "A"  # B spent its last try on this very boot
    bl.confirm("B")  # the agent, running on B, confirms it
    assert store.read()["BOOT_B_LEFT"] == "3" and bl.primary() == "B"
    bl.confirm("A")  # a fallback slot is never confirmed in B's place
    assert store.read()["BOOT_ORDER"] == "B A"
    with pytest.raises(Exception, match="1 to 9"):
        rauc_mod.UBootRauc(store, ("A", "B"), attempts=10)
