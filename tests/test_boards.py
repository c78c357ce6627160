"""Board files and 'edgeops board check' against file replicas of each board's storage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.adapters import boardfiles
from agent.adapters.bootloader import envfile
from agent.adapters.bootloader import grub as grub_mod
from agent.adapters.bootloader import uboot as uboot_mod
from agent.core import boardfile, grubenv
from agent.core.autoboot import initial_autoboot
from agent.device import boardcheck
from agent.errors import ConfigError
from tests.conftest import run_cli

SHIPPED = ["cm4", "rpi4", "rpi5", "sim", "uboot-arm64", "x86-64-grub"]


def sized(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_every_shipped_board_parses_and_names_a_registered_backend() -> None:
    from agent.adapters import bootloader
    from agent.adapters.bootloader import grub, rpi_tryboot, uboot_rauc  # noqa: F401  (register)

    assert set(SHIPPED) <= set(boardfiles.available())
    for name in SHIPPED:
        b = boardfiles.load(name)
        assert b.slot_names == ("A", "B")
        assert b.compatible and b.backend
        assert {s.cls for s in b.slots if s.slot == "A"} == {s.cls for s in b.slots if s.slot == "B"}
    assert {boardfiles.load(n).backend for n in SHIPPED} <= set(bootloader.names())


@pytest.mark.parametrize("text, needle", [
    ("[board]\nname='x'\ncompatible='c'\n[bootloader]\nbackend='uboot'\n[slots.A]\n"
     "rootfs={path='a'}\n", "exactly two slots"),
    ("[board]\nname='x'\ncompatible='c'\n[bootloader]\nbackend='uboot'\n[slots.A]\nrootfs={path='a'}\n"
     "[slots.B]\nrootfs={partlabel='b', path='c'}\n", "exactly one of"),
    ("[board]\nname='x'\n[bootloader]\nbackend='uboot'\n[slots.A]\nrootfs={path='a'}\n"
     "[slots.B]\nrootfs={path='b'}\n", "compatible"),
    ("[boards]\n", "unknown sections"),
    ("[board]\nname='x'\ncompatible='c'\n[bootloader]\nbackend='uboot'\n[slots.A]\n"
     "rootfs={path='a', min_size='lots'}\n[slots.B]\nrootfs={path='b'}\n", "size"),
])
def test_bad_board_files_are_config_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        boardfile.parse(text, "x.toml")


def rpi_replica(root: Path) -> Path:
    for n, size in ((1, 8 << 20), (2, 64 << 20), (3, 64 << 20), (5, 2 << 30), (6, 2 << 30),
                    (7, 64 << 20)):
        sized(root / f"dev/mmcblk0p{n}", size)
    (root / "boot/autoboot").mkdir(parents=True)
    (root / "boot/autoboot/autoboot.txt").write_bytes(initial_autoboot(2, 3))
    node = root / "proc/device-tree/chosen/bootloader"
    node.mkdir(parents=True)
    (node / "partition").write_bytes((2).to_bytes(4, "big"))
    (node / "tryboot").write_bytes((0).to_bytes(4, "big"))
    (root / "dev/watchdog").touch()
    return root


def test_rpi4_replica_passes_then_each_fault_is_one_line(tmp_path: Path) -> None:
    root = rpi_replica(tmp_path)
    board = boardfiles.load("rpi4")
    assert boardcheck.check(board, root) == []
    sized(root / "dev/mmcblk0p6", 1 << 30)  # rootfs B too small
    (root / "dev/watchdog").unlink()
    (root / "proc/device-tree/chosen/bootloader/partition").write_bytes((7).to_bytes(4, "big"))
    problems = [str(p) for p in boardcheck.check(board, root)]
    assert len(problems) == 3, problems
    assert any("slot B rootfs" in p and "grow the partition" in p for p in problems)
    assert any("watchdog" in p for p in problems)
    assert any("which slot is running" in p for p in problems)
    (root / "boot/autoboot/autoboot.txt").unlink()
    assert any("autoboot.txt is missing" in str(p) for p in boardcheck.check(board, root))


def test_uboot_arm64_replica(tmp_path: Path) -> None:
    root = tmp_path
    emmc = sized(root / "dev/mmcblk0", 8 << 20)
    for label in ("rootfs_A", "rootfs_B", "data"):
        target = sized(root / f"parts/{label}", 2 << 30)
        link = root / f"dev/disk/by-partlabel/{label}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    (root / "dev/watchdog0").touch()
    (root / "dev/tpmrm0").touch()
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text("console=ttyS0 root=PARTLABEL=rootfs_A edgeops.slot=A\n")
    board = boardfiles.load("uboot-arm64")
    problems = boardcheck.check(board, root)
    assert len(problems) == 1 and "bootloader state unreadable" in problems[0].what  # env empty
    store = envfile.EnvStore([envfile.Location(emmc, 0x3F8000), envfile.Location(emmc, 0x3FC000)],
                               0x4000)
    store.write(uboot_mod.initial_env("A"))
    assert boardcheck.check(board, root) == []
    (root / "proc/cmdline").write_text("edgeops.slot=B\n")
    assert "neither the primary" in boardcheck.check(board, root)[0].what
    assert "agent.toml compatible" in boardcheck.check(board, root, agent_compatible="other")[-1].what


def test_x86_grub_replica(tmp_path: Path) -> None:
    root = tmp_path
    for label in ("rootfs_A", "rootfs_B", "esp", "data"):
        link = root / f"dev/disk/by-partlabel/{label}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(sized(root / f"parts/{label}", 4 << 30))
    for dev in ("dev/watchdog", "dev/tpmrm0"):
        (root / dev).touch()
    env = root / "boot/efi/EFI/edgeops/grubenv"
    env.parent.mkdir(parents=True)
    env.write_bytes(grubenv.encode(grub_mod.initial_env("A", ("A", "B"))))
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text("root=PARTLABEL=rootfs_A rauc.slot=A\n")
    assert boardcheck.check(boardfiles.load("x86-64-grub"), root) == []


def test_cli_check_against_the_sim_device(device_dir: Path) -> None:
    ok = run_cli("board", "check", "--config", device_dir / "agent.toml", "--root", device_dir)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok: this system matches board 'sim'" in ok.stdout
    os.truncate(device_dir / "slot-b.img", 1000)
    bad = run_cli("board", "check", "--board", "sim", "--root", device_dir)
    assert bad.returncode == 20
    lines = [ln for ln in bad.stdout.splitlines() if ln.startswith("problem:")]
    assert len(lines) == 1 and "slot B rootfs" in lines[0] and "fix:" in lines[0]


def test_cli_list_and_show() -> None:
    out = run_cli("board", "list", check=True).stdout
    assert all(name in out for name in SHIPPED)
    assert "backend = \"grub\"" in run_cli("board", "show", "x86-64-grub", check=True).stdout
    assert run_cli("board", "show", "no-such-board").returncode == 3


def test_env_inside_a_partition_is_a_problem(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk missing (Debian package fdisk)")
    emmc = sized(tmp_path / "dev/mmcblk0", 32 << 20)
    board = boardfiles.load("uboot-arm64")  # env copies at 0x3f8000 and 0x3fc000 (just under 4 MiB)
    subprocess.run(["sfdisk", "-q", str(emmc)], input="label: gpt\nstart=8MiB, size=8MiB, name=boot\n",
                   text=True, check=True, capture_output=True)
    assert not [p for p in boardcheck.check(board, tmp_path) if "overlaps" in p.what]
    subprocess.run(["sfdisk", "-q", str(emmc)], input="label: gpt\nstart=1MiB, size=8MiB, name=boot\n",
                   text=True, check=True, capture_output=True)
    overlaps = [p for p in boardcheck.check(board, tmp_path) if "overlaps" in p.what]
    assert len(overlaps) == 2 and "partition boot" in overlaps[0].what
