"""Applying fix-ups to a slot's filesystem (agent.adapters.fixup_apply): directories, FAT through
mtools, ext4 read through debugfs, and mount(8) driven through its argv (this machine cannot
mount vfat: the kernel here has no module for it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.adapters import fixup_apply
from agent.core.fixups import Fixup, SlotFixup, parse_fixups
from agent.errors import SlotError

LINE_A = b"console=serial0,115200 root=/dev/mmcblk0p5 rootwait edgeops.slot=A\n"
LINE_B = b"console=serial0,115200 root=/dev/mmcblk0p6 rootwait edgeops.slot=B\n"


def cmdline_fixup(access: str = "mount", file: str = "cmdline.txt") -> Fixup:
    (f,) = parse_fixups([{"payload": "boot", "file": file, "format": "cmdline", "access": access,
                          "set": {"A": {"root": "/dev/mmcblk0p5", "edgeops.slot": "A"},
                                  "B": {"root": "/dev/mmcblk0p6", "edgeops.slot": "B"}}}],
                        "t", slots=("A", "B"), classes=("boot", "rootfs"))
    return f


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool} (Debian package {package})")


def fat_image(path: Path, files: dict[str, bytes]) -> Path:
    need("mkfs.vfat", "dosfstools")
    need("mcopy", "mtools")
    subprocess.run(["mkfs.vfat", "-C", str(path), "2048"], check=True, capture_output=True)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for name, data in files.items():
        src = path.parent / f"src-{name.replace('/', '_')}"
        src.write_bytes(data)
        subprocess.run(["mcopy", "-i", str(path), str(src), f"::/{name}"], check=True, env=env,
                       capture_output=True)
    return path


# --- a directory ------------------------------------------------------------------------------
def test_a_directory_slot_gets_its_own_line(tmp_path: Path) -> None:
    (tmp_path / "cmdline.txt").write_bytes(LINE_A)
    assert fixup_apply.apply(SlotFixup(cmdline_fixup(), "B", tmp_path)) is True
    assert (tmp_path / "cmdline.txt").read_bytes() == LINE_B


def test_applying_again_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "cmdline.txt").write_bytes(LINE_A)
    fix = SlotFixup(cmdline_fixup(), "B", tmp_path)
    fixup_apply.apply(fix)
    inode = (tmp_path / "cmdline.txt").stat().st_ino
    assert fixup_apply.apply(fix) is False
    assert (tmp_path / "cmdline.txt").stat().st_ino == inode  # not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmdline.txt"]  # no temp file left


def test_a_symlinked_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(LINE_A)
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "cmdline.txt").symlink_to(outside)
    with pytest.raises(SlotError, match="symbolic link"):
        fixup_apply.apply(SlotFixup(cmdline_fixup(), "B", fs))
    assert outside.read_bytes() == LINE_A


def test_a_symlinked_directory_on_the_path_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "fstab").write_bytes(b"/dev/a /boot vfat defaults 0 0\n")
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "etc").symlink_to(real)
    (f,) = parse_fixups([{"payload": "rootfs", "file": "etc/fstab", "format": "fstab",
                          "set": {"A": {"/boot": "/dev/a"}, "B": {"/boot": "/dev/b"}}}],
                        "t", slots=("A", "B"), classes=("rootfs",))
    with pytest.raises(SlotError, match="etc is a symbolic link"):
        fixup_apply.apply(SlotFixup(f, "B", fs))
    assert (real / "fstab").read_bytes() == b"/dev/a /boot vfat defaults 0 0\n"


def test_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "cmdline.txt")
    with pytest.raises(SlotError, match="not a regular file"):
        fixup_apply.apply(SlotFixup(cmdline_fixup(), "B", tmp_path))


def test_a_device_node_is_refused(tmp_path: Path) -> None:
    try:
        os.mknod(tmp_path / "cmdline.txt", 0o600 | 0o020000, os.makedev(1, 3))  # like /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    with pytest.raises(SlotError, match="not a regular file"):
        fixup_apply.apply(SlotFixup(cmdline_fixup(), "B", tmp_path))


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SlotError, match=r"cmdline\.txt is missing"):
        fixup_apply.apply(SlotFixup(cmdline_fixup(), "B", tmp_path))


# --- mount(8), through its argv ---------------------------------------------------------------
class FakeMount:
    """Stands in for mount/umount: 'mounts' a directory's files into the mount point and
    copies them back at umount, recording every command."""

    def __init__(self, disk: Path) -> None:
        self.disk, self.calls = disk, []  # type: ignore[var-annotated]

    def __call__(self, argv: list[str]) -> None:
        self.calls.append(argv)
        if argv[0] == "mount":
            shutil.copytree(self.disk, argv[-1], dirs_exist_ok=True, symlinks=True)
        elif argv[0] == "umount":
            mnt = Path(argv[-1])
            shutil.rmtree(self.disk)
            shutil.copytree(mnt, self.disk, symlinks=True)
            for p in mnt.iterdir():
                p.unlink()


def test_mount_access_mounts_without_exec_or_devices_and_unmounts(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "cmdline.txt").write_bytes(LINE_A)
    runner = FakeMount(disk)
    fs = fixup_apply.MountFs(runner, under=tmp_path / "run")
    assert fixup_apply.apply(SlotFixup(cmdline_fixup(), "B", Path("/dev/mmcblk0p3")), fs)
    (mount, dev, mnt), umount = runner.calls[0][2:], runner.calls[1]
    assert runner.calls[0][:2] == ["mount", "-o"] and mount == "rw,nosuid,nodev,noexec"
    assert dev == "/dev/mmcblk0p3" and umount == ["umount", mnt]
    assert (disk / "cmdline.txt").read_bytes() == LINE_B
    assert list((tmp_path / "run").iterdir()) == []  # the mount point is gone


def test_mount_access_unmounts_when_the_fixup_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "cmdline.txt").symlink_to("/etc/hostname")
    runner = FakeMount(disk)
    with pytest.raises(SlotError, match="symbolic link"):
        fixup_apply.apply(SlotFixup(cmdline_fixup(), "B", Path("/dev/sdz3")),
                          fixup_apply.MountFs(runner, under=tmp_path / "run"))
    assert [c[0] for c in runner.calls] == ["mount", "umount"]
    assert list((tmp_path / "run").iterdir()) == []


def test_a_failing_mount_is_one_line_and_leaves_no_mount_point(tmp_path: Path) -> None:
    def refuse(argv: list[str]) -> None:
        raise SlotError("mount failed: wrong fs type, bad option, bad superblock")

    with pytest.raises(SlotError, match="wrong fs type"):
        fixup_apply.apply(SlotFixup(cmdline_fixup(), "B", Path("/dev/sdz3")),
                          fixup_apply.MountFs(refuse, under=tmp_path / "run"))
    assert list((tmp_path / "run").iterdir()) == []


# --- FAT without mounting (mtools) --------------------------------------------------------------
def test_mtools_access_edits_the_file_inside_a_fat_image(tmp_path: Path) -> None:
    img = fat_image(tmp_path / "boot.vfat", {"cmdline.txt": LINE_A, "config.txt": b"arm_64bit=1\n"})
    assert fixup_apply.apply(SlotFixup(cmdline_fixup("mtools"), "B", img)) is True
    assert fixup_apply.read(img, "cmdline.txt") == LINE_B
    assert fixup_apply.read(img, "config.txt") == b"arm_64bit=1\n"


def test_mtools_access_leaves_an_image_already_fixed_byte_for_byte(tmp_path: Path) -> None:
    img = fat_image(tmp_path / "boot.vfat", {"cmdline.txt": LINE_B})
    before = img.read_bytes()
    assert fixup_apply.apply(SlotFixup(cmdline_fixup("mtools"), "B", img)) is False
    assert img.read_bytes() == before


def test_mtools_access_refuses_a_file_the_payload_lacks(tmp_path: Path) -> None:
    img = fat_image(tmp_path / "boot.vfat", {"config.txt": b"x=1\n"})
    with pytest.raises(SlotError, match=r"cmdline\.txt is missing"):
        fixup_apply.apply(SlotFixup(cmdline_fixup("mtools"), "B", img))


# --- reading back (board check) ---------------------------------------------------------------
def test_read_finds_a_file_in_an_ext4_image_without_mounting(tmp_path: Path) -> None:
    need("mkfs.ext4", "e2fsprogs")
    need("debugfs", "e2fsprogs")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/fstab").write_bytes(b"/dev/mmcblk0p3 /boot/firmware vfat defaults 0 2\n")
    img = tmp_path / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(img), "4M"], check=True,
                   capture_output=True)
    assert fixup_apply.read(img, "etc/fstab") == b"/dev/mmcblk0p3 /boot/firmware vfat defaults 0 2\n"
    with pytest.raises(SlotError, match="missing or not a regular file"):
        fixup_apply.read(img, "etc/missing")


def test_read_refuses_what_is_no_known_filesystem(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * 4096)
    with pytest.raises(SlotError, match="no FAT or ext filesystem"):
        fixup_apply.read(junk, "cmdline.txt")


def test_an_all_zero_slot_is_blank_and_a_formatted_one_is_not(tmp_path: Path) -> None:
    zero = tmp_path / "zero"
    zero.write_bytes(bytes(8192))
    assert fixup_apply.blank(zero)
    assert not fixup_apply.blank(fat_image(tmp_path / "boot.vfat", {"cmdline.txt": LINE_A}))
