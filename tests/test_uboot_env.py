"""U-Boot environment: byte-exact against the real fw_printenv/fw_setenv (libubootenv-tool).

Both directions, redundant fallback, a write torn at every byte, fw_env.config
parsing, and hypothesis properties of the codec.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.bootloader import fwenv
from agent.adapters.bootloader.envfile import EnvStore
from agent.core import uboot_env
from agent.core.uboot_env import EnvError

SIZE = 0x400  # small blocks keep the every-byte sweep fast; the layout does not depend on size


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} missing: apt-get install libubootenv-tool")
    return path


def make(tmp: Path, *, redundant: bool = True, size: int = SIZE) -> tuple[EnvStore, Path]:
    env = tmp / "uboot.env"
    cfg = tmp / "fw_env.config"
    lines = [f"{env} 0x0 {size:#x}"] + ([f"{env} {size:#x} {size:#x}"] if redundant else [])
    cfg.write_text("\n".join(lines) + "\n")
    locs, sz = fwenv.parse(cfg.read_text())
    return EnvStore(locs, sz), cfg


def printenv(cfg: Path) -> dict[str, str] | None:
    r = subprocess.run([tool("fw_printenv"), "-c", str(cfg)], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def setenv(cfg: Path, *args: str) -> None:
    subprocess.run([tool("fw_setenv"), "-c", str(cfg), *args], check=True, capture_output=True)


ENV = {"EO_SLOT": "B", "EO_ALT": "A", "upgrade_available": "1", "bootcount": "0",
       "bootargs": "console=ttyS0,115200 root=PARTLABEL=rootfs_B quiet", "empty_ok": "x y  z"}


@pytest.mark.parametrize("redundant", [False, True])
def test_fw_printenv_reads_what_edgeops_writes(tmp_path: Path, redundant: bool) -> None:
    store, cfg = make(tmp_path, redundant=redundant)
    store.write(ENV)
    assert printenv(cfg) == ENV
    store.write({**ENV, "EO_SLOT": "A"})  # a second write goes to the other copy when redundant
    assert printenv(cfg) == {**ENV, "EO_SLOT": "A"}


@pytest.mark.parametrize("redundant", [False, True])
def test_edgeops_reads_what_fw_setenv_writes(tmp_path: Path, redundant: bool) -> None:
    store, cfg = make(tmp_path, redundant=redundant)
    store.write({"seed": "1"})
    for i in range(3):  # several writes walk the flags counter and alternate the copies
        setenv(cfg, "BOOT_ORDER", f"B A {i}")
        setenv(cfg, "bootargs", "a=b c=d")
        assert store.read() == {"seed": "1", "BOOT_ORDER": f"B A {i}", "bootargs": "a=b c=d"}
    setenv(cfg, "seed")  # deletes
    assert "seed" not in store.read()
    store.update(after="edgeops")
    assert printenv(cfg) == {"BOOT_ORDER": "B A 2", "bootargs": "a=b c=d", "after": "edgeops"}


def test_flags_wrap_around_agrees_with_fw_printenv(tmp_path: Path) -> None:
    store, cfg = make(tmp_path)
    path = store.locations[0].path
    # copy 0 holds flags 255, copy 1 flags 0: 0 is newer after the wrap
    path.write_bytes(uboot_env.encode({"v": "old"}, SIZE, redundant=True, flags=255)
                     + uboot_env.encode({"v": "new"}, SIZE, redundant=True, flags=0))
    assert store.read() == {"v": "new"} == printenv(cfg)
    store.write({"v": "newer"})  # goes over the 255 copy with flags 1
    assert path.read_bytes()[4] == 1
    assert store.read() == {"v": "newer"} == printenv(cfg)


def test_corrupt_current_copy_falls_back_in_both(tmp_path: Path) -> None:
    store, cfg = make(tmp_path)
    store.write({"v": "old"})
    store.write({"v": "new"})  # copy 1 is current
    assert store.read() == {"v": "new"} == printenv(cfg)
    path = store.locations[1].path
    data = bytearray(path.read_bytes())
    data[SIZE + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.read() == {"v": "old"} == printenv(cfg)


def test_torn_write_at_every_byte_leaves_old_or_new(tmp_path: Path) -> None:
    store, cfg = make(tmp_path)
    old, new = {"EO_SLOT": "A", "n": "1" * 40}, {"EO_SLOT": "B", "n": "2" * 40, "x": "y"}
    store.write(old)
    store.write(old)
    path = store.locations[0].path
    before = path.read_bytes()
    store.write(new)
    after = path.read_bytes()
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert changed, "the write changed nothing"
    start = changed[0]
    checked_with_tool = 0
    for cut in range(start, changed[-1] + 2):
        path.write_bytes(after[:cut] + before[cut:])  # the power failed after `cut` bytes
        got = store.read()
        assert got in (old, new), f"cut at byte {cut}: {got}"
        if cut % 7 == 0 or cut - start < 8:  # the real tool on a sample: it is a subprocess each
            assert printenv(cfg) == got, f"fw_printenv disagrees at byte {cut}"
            checked_with_tool += 1
    assert checked_with_tool > 10


def test_fw_env_config_forms(tmp_path: Path) -> None:
    dev = tmp_path / "mmcblk0boot1"
    dev.write_bytes(b"\0" * 0x10000)
    text = ("# comment\n\n"
            f"{dev}  -0x8000  0x4000  0x200  # from the end, sector size ignored\n"
            f"{dev}\t-0x4000\t16384\n")
    locs, size = fwenv.parse(text)
    assert size == 0x4000
    assert [loc.offset for loc in locs] == [0x8000, 0xC000]
    for bad in ("", "dev 0x0\n", "a 0 0x10\nb 0 0x20\n", "a zz 0x10\n", "a -0x100 0x10\n",
                "/dev/mtd1 0x0 0x10000 0x10000\n", "/dev/ubi0:env 0x0 0x1f000 0x1f000\n"):
        with pytest.raises(EnvError):
            fwenv.parse(bad.replace("a -0x100", f"{dev} -0x20000"))


def test_emmc_boot_partition_unlocked_only_while_writing(tmp_path: Path) -> None:
    dev = tmp_path / "dev/mmcblk0boot0"
    dev.parent.mkdir()
    dev.write_bytes(b"\0" * 0x8000)
    force_ro = tmp_path / "sys/block/mmcblk0boot0/force_ro"
    force_ro.parent.mkdir(parents=True)
    force_ro.write_text("1\n")
    cfg = tmp_path / "fw_env.config"
    cfg.write_text("/dev/mmcblk0boot0 0x0 0x4000\n/dev/mmcblk0boot0 0x4000 0x4000\n")
    seen: list[str] = []
    store = fwenv.load(cfg, base=tmp_path, sysfs=tmp_path / "sys")
    real = EnvStore.write

    def spy(self: EnvStore, env: dict[str, str]) -> None:
        seen.append(force_ro.read_text().strip())
        real(self, env)

    EnvStore.write = spy  # type: ignore[method-assign]
    try:
        store.write({"a": "1"})
    finally:
        EnvStore.write = real  # type: ignore[method-assign]
    assert seen == ["0"] and force_ro.read_text().strip() == "1"
    assert store.read() == {"a": "1"}


names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="="),
                min_size=1, max_size=12)
values = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF), max_size=30)


@given(st.dictionaries(names, values, max_size=12), st.booleans(), st.integers(0, 255))
def test_codec_round_trips(env: dict[str, str], redundant: bool, flags: int) -> None:
    block = uboot_env.encode(env, 2048, redundant=redundant, flags=flags)
    ok, got_flags, data = uboot_env.check(block, redundant=redundant)
    assert ok and got_flags == (flags if redundant else 0)
    assert uboot_env.decode_data(data) == env


@settings(max_examples=300)
@given(st.binary(max_size=600), st.booleans())
def test_any_bytes_parse_or_raise_env_error(data: bytes, redundant: bool) -> None:
    try:
        _ok, _, payload = uboot_env.check(data, redundant=redundant)
        env = uboot_env.decode_data(payload)
    except EnvError:
        return
    assert all(k and "=" not in k for k in env)


# --- the shipped boot scripts ------------------------------------------------------------------
BOARDS = Path(__file__).resolve().parent.parent / "boards"


@pytest.mark.parametrize("script", ["boot.cmd", "boot-rauc.cmd"])
def test_boot_scripts_build_with_real_mkimage(tmp_path: Path, script: str) -> None:
    mkimage = shutil.which("mkimage")
    if mkimage is None:
        pytest.skip("mkimage missing: apt-get install u-boot-tools")
    out = tmp_path / "boot.scr"
    subprocess.run([mkimage, "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-n", "edgeops",
                    "-d", str(BOARDS / "uboot" / script), str(out)], check=True, capture_output=True)
    listing = subprocess.run([mkimage, "-l", str(out)], check=True, capture_output=True, text=True).stdout
    assert "Script" in listing
    assert (BOARDS / "uboot" / script).read_bytes() in out.read_bytes()


@pytest.mark.parametrize("order, a_left, b_left, boots, a_after, b_after", [
    ("A B", "3", "3", "A", "2", "3"),
    ("B A", "3", "1", "B", "3", "0"),
    ("B A", "3", "0", "A", "2", "0"),   # the trial's single attempt is spent: fall back
    ("A", "1", "0", "A", "0", "0"),     # B was marked bad (removed from the order)
    ("A", "0", "0", "A", "2", "3"),     # nothing left: reset all to 3, reset, boot A (3 - 1)
])
def test_rauc_script_decisions(tmp_path: Path, order: str, a_left: str, b_left: str, boots: str,
                               a_after: str, b_after: str) -> None:
    from tests import firmware as fw

    store, _ = make(tmp_path, size=0x4000)
    store.write({"BOOT_ORDER": order, "BOOT_A_LEFT": a_left, "BOOT_B_LEFT": b_left})
    assert fw.UBootRauc(store).boot() == boots
    env = store.read()
    assert (env["BOOT_A_LEFT"], env["BOOT_B_LEFT"]) == (a_after, b_after)


@pytest.mark.parametrize("env, boots, after", [
    ({"EO_SLOT": "A", "EO_ALT": "A", "upgrade_available": "0"}, "A", {"bootcount": None}),
    ({"EO_SLOT": "B", "EO_ALT": "A", "upgrade_available": "1", "bootcount": "0", "bootlimit": "1"},
     "B", {"bootcount": "1", "EO_SLOT": "B"}),
    ({"EO_SLOT": "B", "EO_ALT": "A", "upgrade_available": "1", "bootcount": "1", "bootlimit": "1"},
     "A", {"bootcount": "0", "EO_SLOT": "A", "upgrade_available": "0"}),
    ({"EO_SLOT": "C", "EO_ALT": "A", "upgrade_available": "0"}, "A", {"EO_SLOT": "A"}),
])
def test_bootcount_script_decisions(tmp_path: Path, env: dict[str, str], boots: str,
                                    after: dict[str, str | None]) -> None:
    from tests import firmware as fw

    store, _ = make(tmp_path, size=0x4000)
    store.write(env)
    assert fw.UBootBootcount(store).boot() == boots
    got = store.read()
    for key, value in after.items():
        assert got.get(key) == value, key


def test_rauc_backend_reads_what_rauc_writes_with_fw_setenv(tmp_path: Path) -> None:
    from agent.adapters.bootloader.uboot_rauc import UBootRauc

    store, cfg = make(tmp_path, size=0x4000)
    store.write({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0"})
    # what `rauc status mark-active B` runs (src/bootloaders/uboot.c r_uboot_set_primary)
    setenv(cfg, "BOOT_B_LEFT", "3")
    setenv(cfg, "BOOT_ORDER", "B A")
    bl = UBootRauc(store, ("A", "B"))
    assert bl.primary() == "B" and bl.trial() is None
    bl.mark_bad("A")
    assert printenv(cfg) == {"BOOT_ORDER": "B", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "3"}
    bl.set_trial("A")
    assert printenv(cfg) == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "1", "BOOT_B_LEFT": "3", "EO_TRIAL": "A"}
    bl.commit("A")
    assert printenv(cfg) == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
