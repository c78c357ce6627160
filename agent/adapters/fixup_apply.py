"""Apply a slot's fix-ups to its written filesystem, and read them back. No policy.

What a fix-up sets, and how a file is edited, is ``agent.core.fixups``; this module only
reaches the target slot's filesystem and moves the bytes. The filesystem is opened as a
directory for the length of one ``with`` block (``SlotFs``):

* ``MountFs`` (``access = "mount"``, the default): mount(8) the slot's device
  ``rw,nosuid,nodev,noexec`` on a private directory (0700, under /run/edgeops), and umount it
  afterwards on every exit path (umount writes the FAT/ext4 metadata back);
* ``MtoolsFs`` (``access = "mtools"``): a FAT filesystem without mounting — the file is
  copied out with ``mcopy``, edited there, copied back with ``mcopy -o`` and the device
  fsynced (kernels without vfat, image trees, and the tests: this machine cannot mount);
* a device path that is a directory (an image tree checked with ``board check --root``) is
  used as it is.

Inside the directory a file is replaced by ``fsutil.atomic_write`` (temp file, fsync,
rename, fsync of the directory), and only when its bytes change, so applying the same fix-up
twice writes nothing the second time. Every component of the path is checked with lstat
first: a symlink, a device node or anything but a regular file is refused, so a payload
cannot steer the write outside its own filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from agent.adapters.fsutil import PUBLIC, atomic_write
from agent.core import fixups
from agent.errors import SlotError

TIMEOUT = 60.0  # seconds for one mount, umount or mcopy
MOUNT_OPTIONS = "rw,nosuid,nodev,noexec"
RUN_DIR = Path("/run/edgeops")
Runner = Callable[[list[str]], None]


def _run(argv: list[str]) -> None:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                              check=False)
    except FileNotFoundError:
        pkg = "mtools" if argv[0].startswith("m") and argv[0] != "mount" else "mount"
        raise SlotError(f"{argv[0]} is not installed", hint=f"apt install {pkg}") from None
    except subprocess.TimeoutExpired:
        raise SlotError(f"{' '.join(argv[:2])} did not finish within {TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise SlotError(f"{argv[0]} failed: {last[:200]}")


class SlotFs(Protocol):
    """A written slot's filesystem as a directory, while the block runs."""

    def opened(self, device: Path, files: tuple[str, ...]) -> contextlib.AbstractContextManager[Path]:
        ...


class MountFs:
    """mount(8) the device on a private directory; umount on the way out."""

    def __init__(self, run: Runner = _run, under: Path | None = None) -> None:
        self.run, self.under = run, under if under is not None else RUN_DIR

    @contextlib.contextmanager
    def opened(self, device: Path, files: tuple[str, ...]) -> Iterator[Path]:
        self.under.mkdir(parents=True, exist_ok=True, mode=0o700)
        mnt = Path(tempfile.mkdtemp(prefix="fixup-", dir=self.under))
        try:
            self.run(["mount", "-o", MOUNT_OPTIONS, str(device), str(mnt)])
            try:
                yield mnt
            finally:
                self.run(["umount", str(mnt)])
        finally:
            with contextlib.suppress(OSError):
                mnt.rmdir()


class MtoolsFs:
    """A FAT filesystem through mtools: copy the files out, edit, copy the changed ones back."""

    def __init__(self, run: Runner = _run) -> None:
        self.run = run

    @contextlib.contextmanager
    def opened(self, device: Path, files: tuple[str, ...]) -> Iterator[Path]:
        work = Path(tempfile.mkdtemp(prefix="edgeops-fixup-"))
        try:
            before: dict[str, bytes] = {}
            for name in files:
                local = work / name
                local.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.run(["mcopy", "-n", "-i", str(device), f"::/{name}", str(local)])
                except SlotError as exc:
                    if "not found" not in str(exc):
                        raise
                    raise SlotError(f"{name} is missing from the written slot",
                                    hint="the payload must carry the file its fix-up edits") from None
                before[name] = local.read_bytes()
            yield work
            changed = [n for n in files if (work / n).read_bytes() != before[n]]
            for name in changed:
                self.run(["mcopy", "-o", "-n", "-i", str(device), str(work / name), f"::/{name}"])
            if changed:
                fd = os.open(device, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        finally:
            shutil.rmtree(work, ignore_errors=True)


class DirFs:
    """A device path that is a directory already (an image tree)."""

    @contextlib.contextmanager
    def opened(self, device: Path, files: tuple[str, ...]) -> Iterator[Path]:
        yield device


def slot_fs(access: str, device: Path) -> SlotFs:
    if device.is_dir():
        return DirFs()
    return MtoolsFs() if access == "mtools" else MountFs()


def _regular(top: Path, rel: str) -> Path:
    """``top/rel``, refused unless every component below ``top`` is a real directory and the
    last a regular file (no symlink, device node, FIFO or socket)."""
    path = top
    parts = rel.split("/")
    for n, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise SlotError(f"{rel} is missing from the written slot",
                            hint="the payload must carry the file its fix-up edits") from None
        last = n == len(parts) - 1
        if stat.S_ISLNK(st.st_mode):
            raise SlotError(f"{rel}: {'/'.join(parts[:n + 1])} is a symbolic link; a fix-up "
                            f"writes only regular files")
        if (last and not stat.S_ISREG(st.st_mode)) or (not last and not stat.S_ISDIR(st.st_mode)):
            raise SlotError(f"{rel}: {'/'.join(parts[:n + 1])} is not a regular "
                            f"{'file' if last else 'directory'}; a fix-up writes only regular files")
    return path


def _read(path: Path, rel: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SlotError(f"{rel} is not a regular file")
        data = f.read(fixups.MAX_FILE + 1)
    return data


def apply_in(top: Path, fix: fixups.SlotFixup) -> bool:
    """Apply one fix-up inside the opened filesystem ``top``; True if the file changed."""
    rel = fix.fixup.file
    path = _regular(top, rel)
    old = _read(path, rel)
    new = fixups.apply(fix.fixup.format, old, fix.pairs, f"slot {fix.slot} {rel}")
    if new == old:
        return False
    mode = stat.S_IMODE(os.lstat(path).st_mode) or PUBLIC
    atomic_write(path, new, mode=mode)  # the one atomic write
    return True


def apply(fix: fixups.SlotFixup, fs: SlotFs | None = None) -> bool:
    """Open the slot's filesystem, apply ``fix``, close it durably; True if the file changed."""
    device = Path(fix.device)
    opener = fs if fs is not None else slot_fs(fix.fixup.access, device)
    what = f"fix-up of {fix.fixup.payload}:{fix.fixup.file} for slot {fix.slot} ({device})"
    try:
        with opener.opened(device, (fix.fixup.file,)) as top:
            return apply_in(top, fix)
    except SlotError as exc:
        raise SlotError(f"{what}: {exc}", hint=exc.hint or None) from None
    except OSError as exc:
        raise SlotError(f"{what}: {exc.strerror or exc}") from None


# --- reading back (board check) ----------------------------------------------------------------
def read(device: Path, rel: str, run: Callable[[list[str]], bytes] | None = None) -> bytes:
    """The bytes of ``rel`` in the filesystem on ``device``, without mounting or writing:
    a directory directly; FAT with mtools; ext2/3/4 with debugfs (e2fsprogs)."""
    if device.is_dir():
        return _read(_regular(device, rel), rel)
    head = _head(device)
    runner = run or _capture
    if head[510:512] == b"\x55\xaa" and (b"FAT" in head[54:62] or b"FAT" in head[82:90]):
        return runner(["mcopy", "-n", "-i", str(device), f"::/{rel}", "-"])
    if head[1080:1082] == b"\x53\xef":
        kind = runner(["debugfs", "-R", f"stat /{rel}", str(device)])
        if b"Type: regular" not in kind:
            raise SlotError(f"{rel} on {device} is missing or not a regular file")
        return runner(["debugfs", "-R", f"cat /{rel}", str(device)])
    raise SlotError(f"{device} holds no FAT or ext filesystem that edgeops can read",
                    hint="check it on the device, where the partition is mounted")


def blank(device: Path) -> bool:
    """True if ``device`` (a file or partition, not a directory) starts with no filesystem:
    all zeros, as a slot never written is."""
    return not device.is_dir() and not any(_head(device))


def _head(device: Path) -> bytes:
    try:
        with open(device, "rb") as f:
            return f.read(2048)
    except OSError as exc:
        raise SlotError(f"cannot read {device}: {exc.strerror}") from None


def _capture(argv: list[str]) -> bytes:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, env=env, check=False)
    except FileNotFoundError:
        pkg = "e2fsprogs" if argv[0] == "debugfs" else "mtools"
        raise SlotError(f"{argv[0]} is not installed", hint=f"apt install {pkg}") from None
    except subprocess.TimeoutExpired:
        raise SlotError(f"{argv[0]} did not finish within {TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise SlotError(f"{argv[0]} cannot read {argv[-2] if argv[0] == 'mcopy' else argv[2]}: "
                        f"{proc.stderr.decode(errors='replace').strip()[:160]}")
    if len(proc.stdout) > fixups.MAX_FILE:
        return proc.stdout[:fixups.MAX_FILE + 1]
    return proc.stdout
