"""Fix-ups in the install flow, on the sim board with a FAT boot partition per slot.

One signed bundle (rootfs + a boot.vfat whose cmdline.txt was built for slot A) installs into
either slot; after its hashes are verified and before the trial is armed, the agent makes the
written slot's cmdline.txt name that slot, journaling each fix-up. The power is cut at every
durable step of an install (tests/faults.py, the sim board's power cut): the device then boots
a committed slot, a trial is never armed with boot files that name another slot, and
installing again re-applies the fix-ups and commits.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.adapters import fixup_apply
from agent.core.config import load
from agent.device.updater import Updater, open_device
from agent.host import sim
from tests.conftest import Keys, make_image, run_cli
from tests.faults import killed, run_with_kill, steps
from tests.test_fixups_apply import fat_image, need
from tests.test_powerloss import settle

IMAGE_SIZE = 400_000
SLOT = 1 << 20
BOOT_SIZE = 2 << 20
PAYLOAD_LINE = b"console=ttyS0,115200 root=/dev/simA rootwait edgeops.slot=A\n"  # built for A

FIXUPS = """
[[fixups]]
payload = "boot"
file = "cmdline.txt"
format = "cmdline"
access = "mtools"
set.A = { root = "/dev/simA", "edgeops.slot" = "A" }
set.B = { root = "/dev/simB", "edgeops.slot" = "B" }
"""


def line(dev: Path, slot: str) -> bytes:
    return fixup_apply.read(dev / f"boot-{slot.lower()}.img", "cmdline.txt")


def names(dev: Path, slot: str) -> bool:
    return f"root=/dev/sim{slot}".encode() in line(dev, slot) and \
        f"edgeops.slot={slot}".encode() in line(dev, slot)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: Keys) -> dict[str, Path]:
    need("mcopy", "mtools")
    base = tmp_path_factory.mktemp("fixups")
    boot = fat_image(base / "boot.vfat", {"cmdline.txt": PAYLOAD_LINE, "config.txt": b"x=1\n"})
    images = {v: make_image(base / f"{v}.img", IMAGE_SIZE, v) for v in ("1.0", "2.0", "3.0")}
    dev = base / "pristine"
    sim.init_device(dev, image=images["1.0"], keyring=pki.root_crt, slot_size=SLOT)
    cfg = dev / "agent.toml"
    text = cfg.read_text()
    for s in "ab":
        text = text.replace(f'rootfs = "slot-{s}.img"', f'rootfs = "slot-{s}.img"\nboot = "boot-{s}.img"')
    cfg.write_text(text + FIXUPS)
    shutil.copyfile(boot, dev / "boot-a.img")  # the factory's slot A, fixed up at build time
    with open(dev / "boot-a.img", "r+b") as f:
        f.truncate(BOOT_SIZE)
    with open(dev / "boot-b.img", "wb") as f:
        f.truncate(BOOT_SIZE)
    out = {"pristine": dev, **{f"img{v}": p for v, p in images.items()}}
    for v, sv in (("2.0", 1), ("3.0", 2)):
        b = base / f"v{v}.bundle"
        run_cli("bundle", "create", "--key", pki.signer_key, "--cert", pki.signer_crt,
                "--compatible", "edgeops-sim", "--version", v, "--security-version", str(sv),
                "--payload", f"rootfs={images[v]}", "--payload", f"boot={boot}",
                "-o", b, check=True)
        out[f"v{v}"] = b
    return out


def fresh(world: dict[str, Path], where: Path) -> Path:
    shutil.copytree(world["pristine"], where / "dev")
    return where / "dev"


def fixup_history(dev: Path) -> list[tuple[str | None, str | None, str]]:
    device = open_device(load(dev / "agent.toml"))
    try:
        rows = Updater(device).journal.history(50)
        return [(r.slot, r.version, r.detail) for r in rows if r.event == "fixup"]
    finally:
        device.close()


def test_one_payload_installs_into_either_slot_and_each_names_its_own(world: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    dev = fresh(world, tmp_path)
    cfg = dev / "agent.toml"
    run_cli("install", world["v2.0"], "--config", cfg, check=True)
    assert names(dev, "B")
    run_cli("sim", "reboot", "--config", cfg, check=True)
    settle(cfg)
    run_cli("install", world["v3.0"], "--config", cfg, check=True)  # B -> A, the same boot.vfat
    assert names(dev, "A") and names(dev, "B")
    run_cli("sim", "reboot", "--config", cfg, check=True)
    settle(cfg)
    device = open_device(load(cfg))
    try:
        assert device.runtime.booted_slot() == "A"
        assert Updater(device).journal.slots()["A"].version == "3.0"
    finally:
        device.close()


def test_each_applied_fixup_has_a_journal_entry(world: dict[str, Path], tmp_path: Path) -> None:
    dev = fresh(world, tmp_path)
    run_cli("install", world["v2.0"], "--config", dev / "agent.toml", check=True)
    assert fixup_history(dev) == [("B", "2.0", "boot:cmdline.txt root=/dev/simB edgeops.slot=B")]


def test_a_payload_without_the_file_fails_the_install_and_arms_no_trial(
        world: dict[str, Path], tmp_path: Path, pki: Keys) -> None:
    dev = fresh(world, tmp_path)
    cfg = dev / "agent.toml"
    bare = fat_image(tmp_path / "bare.vfat", {"config.txt": b"x=1\n"})
    bundle = tmp_path / "bare.bundle"
    run_cli("bundle", "create", "--key", pki.signer_key, "--cert", pki.signer_crt,
            "--compatible", "edgeops-sim", "--version", "2.0", "--security-version", "1",
            "--payload", f"rootfs={world['img2.0']}", "--payload", f"boot={bare}", "-o", bundle,
            check=True)
    proc = run_cli("install", bundle, "--config", cfg)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "fix-up" in err[0] and "cmdline.txt" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
    device = open_device(load(cfg))
    try:
        assert device.bootloader.trial() is None
        assert Updater(device).journal.state().phase == "idle"
    finally:
        device.close()
    assert sim.SimFirmware(dev).reboot() == "A"


def test_a_power_cut_at_any_step_boots_a_committed_slot_and_a_rerun_reapplies(
        world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    probe = fresh(world, tmp_path_factory.mktemp("probe"))
    total = steps(run_with_kill(0, "install", world["v2.0"], "--config", probe / "agent.toml"))
    # every step from the end of the boot payload's write on: the fix-up, its journal entry,
    # WRITTEN, the trial's arming (earlier cuts are test_powerloss's, with no fix-up near)
    first = total - 16
    outcomes, fixed_at_cut = set(), set()
    for n in range(first, total + 1):
        dev = fresh(world, tmp_path_factory.mktemp(f"cut{n}"))
        cfg = dev / "agent.toml"
        proc = run_with_kill(n, "install", world["v2.0"], "--config", cfg)
        assert killed(proc), f"step {n}: {proc.stderr}"
        b = dev / "boot-b.img"
        fixed_at_cut.add(not fixup_apply.blank(b) and b"edgeops.slot=B" in line(dev, "B"))
        device = open_device(load(cfg))
        try:  # the invariant: a trial is armed only once its boot files name it
            if device.bootloader.trial() == "B":
                assert names(dev, "B"), f"step {n}: trial armed before its fix-up"
        finally:
            device.close()
        run_cli("sim", "power-cut", "--config", cfg, check=True)
        settle(cfg)
        device = open_device(load(cfg))
        try:
            booted = device.runtime.booted_slot()
            info = Updater(device).journal.slots()[booted]
            assert info.state == "good" and device.bootloader.primary() == booted, f"step {n}"
            assert names(dev, booted), f"step {n}: the running slot {booted}'s cmdline.txt"
            outcomes.add(info.version)
        finally:
            device.close()
        if booted == "A":  # installing again re-applies the fix-up and commits
            run_cli("install", world["v2.0"], "--config", cfg, check=True)
            assert names(dev, "B")
            run_cli("sim", "reboot", "--config", cfg, check=True)
            settle(cfg)
            assert sim.SimFirmware(dev).reboot() == "B"
    assert outcomes == {"1.0", "2.0"}  # cuts before the arming keep A; after it, B commits
    assert fixed_at_cut == {False, True}  # the window holds cuts before and after the fix-up


def test_board_check_reports_a_slot_whose_cmdline_names_the_other(tmp_path: Path) -> None:
    """An rpi4 replica: slot B's boot partition still says slot A's root."""
    need("mkfs.ext4", "e2fsprogs")
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    fat_image(root / "dev/mmcblk0p2",
              {"cmdline.txt": b"console=serial0 root=/dev/mmcblk0p5 rootwait edgeops.slot=A\n"})
    fat_image(root / "dev/mmcblk0p3",
              {"cmdline.txt": b"console=serial0 root=/dev/mmcblk0p5 rootwait edgeops.slot=A\n"})
    for n, boot in ((5, 2), (6, 3)):
        tree = tmp_path / f"t{n}"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/fstab").write_text(f"/dev/mmcblk0p{boot} /boot/firmware vfat defaults 0 2\n")
        subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(root / f"dev/mmcblk0p{n}"), "4M"],
                       check=True, capture_output=True)
    proc = run_cli("board", "check", "--board", "rpi4", "--root", root)
    assert proc.returncode == 20
    lines = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if "name slot" in ln]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert "slot B boot:cmdline.txt" in lines[0] and "root=/dev/mmcblk0p6 edgeops.slot=B" in lines[0]


def _can_mount(tmp: Path) -> bool:
    """Whether this machine lets a test mount an ext4 image (root, loop devices, no seccomp)."""
    if shutil.which("mount") is None or shutil.which("mkfs.ext4") is None:
        return False
    img, mnt = tmp / "probe.ext4", tmp / "probe"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", str(img), "1M"], check=True, capture_output=True)
    if subprocess.run(["mount", str(img), str(mnt)], capture_output=True).returncode != 0:
        return False
    subprocess.run(["umount", str(mnt)], check=True)
    return True


def test_a_mounted_ext4_rootfs_gets_its_slots_fstab_through_mount(
        tmp_path: Path, pki: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """access = "mount": the real mount(8) and umount(8) on the written slot (a loop device)."""
    if not _can_mount(tmp_path):
        pytest.skip("mounting an ext4 image needs root and loop devices (Debian: mount, e2fsprogs)")
    images = {}
    for v in ("1.0", "2.0"):
        tree = tmp_path / f"tree-{v}"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/fstab").write_text("proc /proc proc defaults 0 0\n"
                                        "/dev/simbootA /boot/firmware vfat defaults 0 2\n")
        (tree / "etc/version").write_text(v)
        images[v] = tmp_path / f"rootfs-{v}.ext4"
        subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(images[v]), "2M"], check=True,
                       capture_output=True)
    dev = tmp_path / "dev"
    sim.init_device(dev, image=images["1.0"], keyring=pki.root_crt, slot_size=4 << 20)
    cfg = dev / "agent.toml"
    cfg.write_text(cfg.read_text() + """
[[fixups]]
payload = "rootfs"
file = "etc/fstab"
format = "fstab"
set.A = { "/boot/firmware" = "/dev/simbootA" }
set.B = { "/boot/firmware" = "/dev/simbootB" }
""")
    bundle = tmp_path / "v2.bundle"
    run_cli("bundle", "create", "--key", pki.signer_key, "--cert", pki.signer_crt,
            "--compatible", "edgeops-sim", "--version", "2.0", "--security-version", "1",
            "--payload", f"rootfs={images['2.0']}", "-o", bundle, check=True)
    monkeypatch.setattr(fixup_apply, "RUN_DIR", tmp_path / "run-edgeops")
    device = open_device(load(cfg))
    try:
        with open(bundle, "rb") as f:
            Updater(device, sleep=lambda s: None).install(f)
    finally:
        device.close()
    fstab = fixup_apply.read(dev / "slot-b.img", "etc/fstab")
    assert b"/dev/simbootB /boot/firmware vfat defaults 0 2\n" in fstab
    assert fixup_apply.read(dev / "slot-b.img", "etc/version") == b"2.0"
    assert list((tmp_path / "run-edgeops").iterdir()) == []  # unmounted, mount point removed
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts
