"""make image's arm64 parts: U-Boot's environment on the disk, the Raspberry Pi layout and cmdline.txt.

The builds themselves need root, qemu-user and minutes (make image BOARD=uboot-arm64 / rpi4,
make e2e BOARD=uboot-arm64, make image-check BOARD=rpi4); these tests need neither.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.adapters import boardfiles
from agent.adapters.bootloader import fwenv, uboot
from agent.core import config
from agent.device import boardcheck
from tests.conftest import load_script, run_cli

ROOT = Path(__file__).resolve().parent.parent


build = load_script("image_build_arm64", ROOT / "image/build.py")
rpi_check = load_script("rpi_check", ROOT / "tools/e2e/rpi_check.py")
needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None,
                                  reason="sfdisk missing (Debian package fdisk)")


def staged_uboot_tree(tmp_path: Path, *, tpm_optional: bool = False) -> Path:
    tree = tmp_path / "rootfs"
    (tree / "etc/edgeops").mkdir(parents=True)
    (tree / "etc/edgeops/agent.toml").write_text(
        run_cli("board", "config", "uboot-arm64", check=True).stdout)
    b = build.Build("uboot-arm64", build.TARGETS["uboot-arm64"], tmp_path, tmp_path, "edgeops", "1.0", 1,
                    tpm_optional=tpm_optional)
    build.stage_board(b, tree)
    return tree


@pytest.mark.parametrize("optional", [False, True])
def test_tpm_optional_is_the_only_way_the_image_drops_the_boards_tpm_requirement(
        tmp_path: Path, optional: bool) -> None:
    tree = staged_uboot_tree(tmp_path, tpm_optional=optional)
    cfg = config.parse((tree / "etc/edgeops/agent.toml").read_text(), tree / "etc/edgeops/agent.toml")
    assert cfg.tpm.required is (not optional)


def test_the_uboot_image_points_the_agent_at_its_fw_env_config(tmp_path: Path) -> None:
    tree = staged_uboot_tree(tmp_path)
    cfg = config.parse((tree / "etc/edgeops/agent.toml").read_text(), tree / "etc/edgeops/agent.toml")
    assert cfg.bootloader_settings.get("fw_env_config") == "/etc/fw_env.config"
    assert not {"env", "env_size", "env_offsets"} & set(cfg.bootloader_settings)
    (tree / "dev").mkdir()
    with open(tree / "dev/vda", "wb") as f:
        f.truncate(8 << 20)
    # as on the device, with the tree as /: the image's own fw_env.config, its /dev/vda
    settings = {**cfg.bootloader_settings, "fw_env_config": "etc/fw_env.config", "root": "."}
    store = fwenv.store_from_settings(settings, tree)
    assert [(loc.path, loc.offset) for loc in store.locations] == [
        (tree / "dev/vda", 0x3F8000), (tree / "dev/vda", 0x3FC000)]
    assert store.size == 0x4000


@pytest.mark.skipif(shutil.which("fw_printenv") is None, reason="fw_printenv missing (libubootenv-tool)")
def test_the_agents_trial_reads_back_with_the_real_fw_printenv(tmp_path: Path) -> None:
    """What the agent writes through the image's fw_env.config is what libubootenv reads,
    and what libubootenv's fw_setenv writes (the factory env) the agent reads."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    work = tmp_path / "work"
    work.mkdir()
    printed = build.uboot_initial_env(disk, work)
    assert dict(ln.split("=", 1) for ln in printed.split()) == uboot.initial_env("A")
    cfg = tmp_path / "fw_env.config"
    cfg.write_text((ROOT / "image/uboot-arm64/fw_env.config").read_text().replace("/dev/vda", str(disk)))
    bl = uboot.UBootBootcount(fwenv.load(cfg), ("A", "B"))
    assert (bl.primary(), bl.trial()) == ("A", None)
    bl.set_trial("B")
    out = subprocess.run(["fw_printenv", "-c", str(cfg)], capture_output=True, text=True, check=True).stdout
    env = dict(ln.split("=", 1) for ln in out.split())
    assert env["EO_SLOT"] == "B" and env["EO_ALT"] == "A" and env["upgrade_available"] == "1"


@needs_sfdisk
def test_the_uboot_disk_keeps_the_environment_below_the_first_partition(tmp_path: Path) -> None:
    disk = tmp_path / "dev/mmcblk0"
    disk.parent.mkdir()
    parts = build.uboot_layout(64)
    build.make_disk(disk, parts, {}, first_mib=build.UBOOT_FIRST_MIB)
    assert parts[0].start == build.UBOOT_FIRST_MIB << 20
    assert max(build.ENV_COPIES) + build.ENV_SIZE <= parts[0].start
    board = boardfiles.load("uboot-arm64")
    assert not [p for p in boardcheck.check(board, tmp_path) if "overlaps" in p.what]
    assert [p.name for p in parts][1:3] == ["rootfs_A", "rootfs_B"]  # p2/p3: boot-virt.cmd's eo_part


def test_boot_virt_reads_the_copies_fw_env_config_names() -> None:
    """boot-virt.cmd reads/writes 512-byte blocks: 0x1fc0 and 0x1fe0, 0x20 of them."""
    script = (ROOT / "boards/uboot/boot-virt.cmd").read_text()
    cfg = (ROOT / "image/uboot-arm64/fw_env.config").read_text()
    locations, size = fwenv.parse(cfg, size_of=lambda p: 8 << 20)
    for loc in locations:
        assert f"{loc.offset // 512:x} {size // 512:x}" in script
    assert "${fdtcontroladdr}" in script and "/boot/initrd.img" in script


@pytest.mark.parametrize("slot", ["A", "B"])
def test_rpi_cmdline_names_the_slots_own_rootfs(slot: str) -> None:
    import tomllib

    doc = tomllib.loads((ROOT / "boards/rpi4.toml").read_text())
    line = build.rpi_cmdline(doc, slot, "serial0")
    args = dict(a.split("=", 1) for a in line.split() if "=" in a)
    assert args["root"] == doc["slots"][slot]["rootfs"]["path"]
    assert args["edgeops.slot"] == slot and line.count("\n") == 1
    assert rpi_check.cmdline_want(doc, slot).items() <= args.items()


def test_rpi_cmdline_takes_the_board_files_fixup_values() -> None:
    doc = {"slots": {"A": {"rootfs": {"path": "/dev/mmcblk0p5"}}},
           "fixups": [{"payload": "boot", "file": "cmdline.txt", "format": "cmdline",
                       "set": {"A": {"root": "PARTUUID=ed6e0a5b-05", "edgeops.slot": "A"}}}]}
    args = dict(a.split("=", 1) for a in build.rpi_cmdline(doc, "A", "serial0").split() if "=" in a)
    assert args["root"] == "PARTUUID=ed6e0a5b-05"


@needs_sfdisk
def test_the_rpi_disk_is_what_the_image_check_wants(tmp_path: Path) -> None:
    import tomllib

    board = tomllib.loads((ROOT / "boards/rpi4.toml").read_text())
    disk = tmp_path / "disk.img"
    sizes = {"boot": build.parse_size_mib("64M"), "rootfs": build.parse_size_mib("2G")}
    build.make_rpi_disk(disk, sizes, {})
    parts = rpi_check.check_partitions(disk, board)
    assert sorted(parts) == [1, 2, 3, 4, 5, 6, 7]
    small = tmp_path / "small.img"
    build.make_rpi_disk(small, {"boot": 64, "rootfs": 1024}, {})
    with pytest.raises(rpi_check.CheckFailure, match="rootfs"):
        rpi_check.check_partitions(small, board)


@pytest.mark.parametrize("text", ["[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n",
                                  "[all]\nboot_partition=2\n[tryboot]\nboot_partition=3\n"])
def test_the_image_check_refuses_an_autoboot_txt_that_is_not_the_factory_one(text: str) -> None:
    assert rpi_check.parse_autoboot(text) != rpi_check.AUTOBOOT
    assert rpi_check.parse_autoboot(build.AUTOBOOT_TXT) == rpi_check.AUTOBOOT


def test_arm64_base_tree_has_its_own_cache_key() -> None:
    d = ROOT / "image/arm64"
    assert build.cache_key(d, "arm64") != build.cache_key(d, "amd64")
    assert "linux-image-arm64" in build.read_list(d / "packages.txt")
    assert build.TARGETS["rpi4"].arch_dir == build.TARGETS["uboot-arm64"].arch_dir == d


