"""make image's pure parts: the disk layout, the cache key, fstab, and what grub.cfg boots.

The build itself needs root and mmdebstrap (make image, make e2e); these tests need neither.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from agent.adapters.bootloader import grub
from agent.core import config, grubenv
from tests.conftest import load_script, run_cli

ROOT = Path(__file__).resolve().parent.parent
GRUB_CFG = ROOT / "boards/grub/grub.cfg"


build = load_script("image_build", ROOT / "image/build.py")


def menu_entries(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r'menuentry "Slot (\w) [^"]*" \{(.*?)\n\}', text, re.S)}


def test_the_layout_is_the_board_files() -> None:
    board = tomllib.loads((ROOT / "boards/x86-64-grub.toml").read_text())
    parts = build.layout(build.board_slot_mib("x86-64-grub"))
    assert [p.name for p in parts] == ["esp", "rootfs_A", "rootfs_B", "data"]
    assert parts[0].type_uuid == build.TYPE_ESP
    labels = {s: c["rootfs"]["partlabel"] for s, c in board["slots"].items()}
    assert labels == {"A": "rootfs_A", "B": "rootfs_B"}
    assert board["boot"]["partlabel"] == "esp"
    want = build.parse_size_mib(board["slots"]["A"]["rootfs"]["min_size"])
    assert parts[1].size_mib == parts[2].size_mib == want


def test_sfdisk_script_names_every_partition() -> None:
    script = build.sfdisk_script(build.layout(64))
    assert script.startswith("label: gpt\n")
    assert re.findall(r'name="(\w+)"', script) == ["esp", "rootfs_A", "rootfs_B", "data"]


@pytest.mark.parametrize(("text", "mib"), [("4G", 4096), ("512M", 512), ("1.5G", 1536),
                                           ("2GiB", 2048), ("1048576", 1)])
def test_parse_size_mib(text: str, mib: int) -> None:
    assert build.parse_size_mib(text) == mib


def test_grub_boots_slots_by_partition_never_by_filesystem_label() -> None:
    """Fails on the grub.cfg that did 'search --label rootfs_B': the same payload is written
    into either slot, so after A->B and then B->A the labels could not name both slots."""
    text = GRUB_CFG.read_text()
    entries = menu_entries(text)
    assert set(entries) == {"A", "B"}
    numbers = {p.name: i + 1 for i, p in enumerate(build.layout(64))}
    for slot, body in entries.items():
        assert "search" not in body, f"slot {slot} is looked up by something inside the payload"
        assert f',gpt{numbers[f"rootfs_{slot}"]})' in body
        linux = next(ln for ln in body.splitlines() if ln.strip().startswith("linux "))
        assert f"root=PARTLABEL=rootfs_{slot}" in linux and f"edgeops.slot={slot}" in linux
    assert not re.search(r"search\s[^\n]*--(label|fs-uuid)", text)


def test_grub_modules_cover_the_commands_grub_cfg_uses() -> None:
    words = set(re.findall(r"^\s*([a-z_]+)\b", GRUB_CFG.read_text(), re.M))
    need = {"regexp", "load_env", "save_env", "linux", "initrd"} & words
    mods = set(build.GRUB_MODULES.split())
    assert "regexp" in need and "regexp" in mods and "loadenv" in mods and "linux" in mods


def test_the_initial_grubenv_is_the_backends_initial_env(tmp_path: Path) -> None:
    if subprocess.run(["which", "grub-editenv"], capture_output=True).returncode:
        pytest.skip("grub-editenv (grub-common) not installed")
    env = tmp_path / "grubenv"
    subprocess.run(["grub-editenv", env, "create"], check=True)
    subprocess.run(["grub-editenv", env, "set", "ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0",
                    "B_TRY=0"], check=True)
    assert grubenv.decode(env.read_bytes()) == grub.initial_env("A", ("A", "B"))
    src = (ROOT / "image/build.py").read_text()
    assert '"ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0", "B_TRY=0"' in src


def test_fstab_mounts_the_data_partition_at_the_agents_state_dir(tmp_path: Path) -> None:
    """The journal must live on the data partition, not on the slot (an empty journal after
    every update: the trial is never committed and the floor is back to 0)."""
    text = run_cli("board", "config", "x86-64-grub", check=True).stdout
    cfg = config.parse(text, tmp_path / "etc/edgeops/agent.toml")
    rows = [ln.split() for ln in build.FSTAB.splitlines() if ln and not ln.startswith("#")]
    mounts = {r[1]: r[0] for r in rows}
    assert mounts[str(cfg.state_dir)] == "PARTLABEL=data"
    grubenv = tomllib.loads((ROOT / "boards/x86-64-grub.toml").read_text())["bootloader"]["grubenv"]
    esp_mount = next(m for m in mounts if m != "/" and grubenv.startswith(m + "/"))
    assert mounts[esp_mount] == "PARTLABEL=esp"
    unit = (ROOT / "image/systemd/edgeops-agent.service").read_text()
    assert f"RequiresMountsFor={cfg.state_dir}" in unit


def test_cache_key_follows_the_package_list(tmp_path: Path) -> None:
    d = tmp_path / "x86-64"
    d.mkdir()
    for p in build.base_inputs(ROOT / "image/x86-64"):
        (d / p.name).write_bytes(p.read_bytes())
    key = build.cache_key(d)
    assert key == build.cache_key(d)
    (d / "packages.txt").write_text((d / "packages.txt").read_text() + "curl\n")
    assert build.cache_key(d) != key
    assert "curl" in build.read_list(d / "packages.txt")
    assert not [p for p in build.read_list(d / "packages.txt") if p.startswith("#")]


def test_debians_too_old_python_packages_are_vendored_not_installed() -> None:
    pkgs = build.read_list(ROOT / "image/x86-64/packages.txt")
    for debian, wheel in (("python3-cryptography", "cryptography"), ("python3-urllib3", "urllib3"),
                          ("python3-requests", "requests")):
        assert debian not in pkgs and wheel in build.WHEELS
    assert {"python3", "python3-zstandard", "python3-psutil", "linux-image-amd64"} <= set(pkgs)
