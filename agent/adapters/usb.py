"""USB mass storage: block device events (pyudev) and reading a stick without trusting it.

Three small interfaces, no policy (``agent.device.usb_updates`` decides what to do):

* ``BlockEvents`` — ``add``/``remove`` of block devices and partitions. ``UdevMonitor`` is
  the real one (pyudev's netlink monitor, the ``[udev]`` extra, imported only when used);
  tests and the sim board inject ``BlockEvent`` values into any iterator instead.
* ``Medium`` — the top level and one folder of a filesystem, and opening a regular file
  there for reading. ``MountedMedium`` mounts it ``ro,nosuid,nodev,noexec`` into a private
  directory (mount(8)); ``MtoolsMedium`` reads a FAT filesystem without mounting it, with
  mtools (``mdir``/``mcopy``), for kernels without vfat or when mounting is not wanted.
* ``GuardedStream`` — reads that fail because the stick went away (EIO, ENODEV, a reader
  that stopped short) become ``MediumGone``, a ``TransportError``: to an install it is a
  truncated stream like any other.

Entries are never followed: ``scandir(follow_symlinks=False)`` and ``O_NOFOLLOW`` with an
``fstat`` after the open refuse links, device nodes, FIFOs and sockets; names and counts
are bounded here, by the caller's limits. pyudev's monitor: pyudev docs, "Monitoring
devices" (``Monitor.from_netlink``, ``filter_by('block')``, ``poll(timeout)``).
Long because (about 410 lines) the three readers of a stick — mounted, mtools, the one write
— share the bounds, the link refusals and the "stick gone" mapping that make them safe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

from agent.errors import DeviceError, TransportError

MOUNT_OPTIONS = "ro,nosuid,nodev,noexec"
MAX_ENTRIES = 512  # names read from one folder; a stick with more is read up to here
MTOOLS_TIMEOUT = 30.0
_GONE = {errno.EIO, errno.ENODEV, errno.ENXIO, errno.ESTALE, errno.ENOENT}


class MediumGone(TransportError):
    """The stick was removed or failed while it was read."""

    hint = "put the stick back and start the install again; nothing was committed"


class MediumError(DeviceError):
    """The stick could not be opened or read at all (not a filesystem this device reads)."""

    hint = "use a stick with one FAT or ext4 filesystem"


@dataclass(frozen=True)
class BlockEvent:
    action: str  # add | remove | change
    devnode: str  # /dev/sdb1
    devtype: str  # disk | partition
    fs_type: str | None  # ID_FS_TYPE: vfat, ext4, ... None when udev saw no filesystem
    bus: str | None = None  # ID_BUS: usb, ...


class BlockEvents(Protocol):
    def __iter__(self) -> Iterator[BlockEvent]: ...


class UdevMonitor:
    """Block device events from the kernel through udev (pyudev)."""

    def __init__(self, timeout: float = 1.0, *, source: str = "udev") -> None:
        """``source="kernel"`` listens to the kernel's own uevents (no udevd needed; udev's
        properties such as ID_FS_TYPE are then missing, and blkid fills the filesystem in)."""
        try:
            import pyudev  # type: ignore[import-untyped]
        except ModuleNotFoundError:
            raise DeviceError("watching for USB sticks needs pyudev, which is not installed",
                              hint="pip install 'edgeops[udev]', or set [console] usb = \"off\"") from None
        self._pyudev = pyudev
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source=source)
        self.monitor.filter_by("block")
        self.timeout = timeout
        self.stopped = False

    def __iter__(self) -> Iterator[BlockEvent]:
        self.monitor.start()
        while not self.stopped:
            dev = self.monitor.poll(timeout=self.timeout)
            if dev is not None and (event := event_of(dev, dev.action or "change")) is not None:
                yield event

    def present(self) -> list[BlockEvent]:
        """The block devices there now, as ``add`` events (a stick inserted before the start)."""
        out = []
        for dev in self.context.list_devices(subsystem="block"):
            if (event := event_of(dev, "add")) is not None:
                out.append(event)
        return out


def event_of(dev: Any, action: str) -> BlockEvent | None:
    """A pyudev ``Device`` as a ``BlockEvent`` (None without a device node)."""
    node = dev.device_node
    if not node:
        return None
    props = dev.properties
    fs = props.get("ID_FS_TYPE") or None
    if fs is None and action in ("add", "change"):
        fs = probe_fs_type(str(node))
    # ID_BUS is udev's; a kernel-source event has none, and sysfs still shows a USB parent
    bus = props.get("ID_BUS") or ("usb" if dev.find_parent("usb") is not None else None)
    return BlockEvent(action, str(node), str(dev.device_type or "disk"), fs, bus)


def probe_fs_type(devnode: str) -> str | None:
    """The filesystem type blkid reads from ``devnode`` (what udev would have put in
    ID_FS_TYPE), or None: no filesystem, no blkid, or the device is gone."""
    try:
        proc = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", devnode],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = proc.stdout.strip()
    return value if proc.returncode == 0 and value.isascii() and value.isalnum() else None


# --- reading a stick ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # file | dir | other (links, device nodes, FIFOs, sockets)
    size: int | None  # what the filesystem claims; None where the reader cannot tell


class Medium(Protocol):
    where: str  # for messages: the device node

    def entries(self, folder: str = "") -> list[Entry]: ...
    def open(self, path: str) -> BinaryIO: ...
    def close(self) -> None: ...


class DirectoryMedium:
    """A filesystem already mounted (or any directory): entries are not followed."""

    def __init__(self, root: Path, where: str | None = None) -> None:
        self.root = root
        self.where = where or str(root)

    def _walk(self, parts: list[str]) -> int:
        """A directory fd for ``parts`` below the root, each step opened with O_NOFOLLOW:
        a folder that is a link (``edgeops -> /etc``) is refused, never followed."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts:
                if part in ("", ".", ".."):
                    raise MediumError(f"{self.where}: {'/'.join(parts)!r} is not a plain path")
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def entries(self, folder: str = "") -> list[Entry]:
        out: list[Entry] = []
        try:
            fd = self._walk([p for p in folder.split("/") if p])
        except FileNotFoundError:
            return []
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                return []  # a link or a file where the folder belongs: nothing to look at
            raise _gone_or(exc, self.where) from None
        try:
            with os.scandir(fd) as it:
                for e in it:
                    if len(out) >= MAX_ENTRIES:
                        break
                    st = e.stat(follow_symlinks=False)
                    kind = ("file" if stat.S_ISREG(st.st_mode)
                            else "dir" if stat.S_ISDIR(st.st_mode) else "other")
                    out.append(Entry(e.name, kind, st.st_size if kind == "file" else None))
        except OSError as exc:
            raise _gone_or(exc, self.where) from None
        finally:
            os.close(fd)
        return out

    def open(self, path: str) -> BinaryIO:
        *parents, name = path.split("/")
        try:
            dfd = self._walk(parents)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise MediumError(f"{self.where}: a folder on the way to {path} is a link") from None
            raise _gone_or(exc, self.where) from None
        try:
            try:  # said plainly first; the O_NOFOLLOW open and fstat below are what holds
                mode = os.lstat(name, dir_fd=dfd).st_mode
            except OSError as exc:
                raise _gone_or(exc, self.where) from None
            if stat.S_ISLNK(mode):
                raise MediumError(f"{self.where}: {path} is a link; only regular files are read")
            if not stat.S_ISREG(mode):
                raise MediumError(f"{self.where}: {path} is not a regular file")
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK,
                             dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise MediumError(f"{self.where}: {path} is a link; only regular files "
                                      "are read") from None
                raise _gone_or(exc, self.where) from None
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MediumError(f"{self.where}: {path} is not a regular file")
        os.set_blocking(fd, True)
        return cast(BinaryIO, GuardedStream(os.fdopen(fd, "rb", buffering=0), self.where))

    def close(self) -> None:
        pass


class MountedMedium(DirectoryMedium):
    """A block device mounted ``ro,nosuid,nodev,noexec`` under a private directory until ``close``."""

    def __init__(self, devnode: str, fs_type: str | None = None, *, under: Path | None = None) -> None:
        if under is not None:
            under.mkdir(parents=True, exist_ok=True, mode=0o700)
        mnt = Path(tempfile.mkdtemp(prefix="usb-", dir=under))
        argv = ["mount", "-o", MOUNT_OPTIONS, *(["-t", fs_type] if fs_type else []), devnode, str(mnt)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=MTOOLS_TIMEOUT, check=False)
        if proc.returncode != 0:
            mnt.rmdir()
            raise MediumError(f"cannot mount {devnode} read-only: "
                              f"{(proc.stderr.strip().splitlines() or ['mount failed'])[-1]}")
        super().__init__(mnt, devnode)
        self.mountpoint = mnt

    def close(self) -> None:
        # lazy: a stick pulled mid-read leaves a mount that cannot be unmounted normally
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True,
                       timeout=MTOOLS_TIMEOUT, check=False)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()


class MtoolsMedium:
    """A FAT filesystem read with mtools, without mounting (``mcopy -i DEV ::path -``)."""

    def __init__(self, devnode: str) -> None:
        self.where = devnode
        self.env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}
        self.entries("")  # not FAT, or unreadable: refused now, in one line

    def entries(self, folder: str = "") -> list[Entry]:
        target = "::/" + folder.strip("/")
        try:
            proc = subprocess.run(["mdir", "-i", self.where, "-b", target], capture_output=True,
                                  timeout=MTOOLS_TIMEOUT, env=self.env, check=False)
        except FileNotFoundError:
            raise MediumError("reading FAT without mounting needs mtools",
                              hint="apt install mtools") from None
        if proc.returncode != 0:
            if b"not found" in proc.stderr:
                return []
            if not os.path.exists(self.where):
                raise MediumGone(f"{self.where} went away while it was read")
            raise MediumError(f"{self.where}: not a FAT filesystem mtools can read: "
                              f"{proc.stderr.decode(errors='replace').strip()[:120]}")
        out: list[Entry] = []
        prefix = target.rstrip("/") + "/"
        for raw in proc.stdout.split(b"\n")[:MAX_ENTRIES]:
            line = raw.decode("utf-8", errors="replace")
            if not line.startswith(prefix):
                continue
            name = line[len(prefix):]
            kind = "dir" if name.endswith("/") else "file"
            name = name.rstrip("/")
            if name and "/" not in name:
                out.append(Entry(name, kind, None))  # FAT has no links or device nodes
        return out

    def open(self, path: str) -> BinaryIO:
        proc = subprocess.Popen(["mcopy", "-n", "-i", self.where, "::/" + path.strip("/"), "-"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        assert proc.stdout is not None
        return cast(BinaryIO, GuardedStream(proc.stdout, self.where, proc))

    def close(self) -> None:
        pass


class GuardedStream:
    """A read-only stream over a stick: a read the stick did not finish raises ``MediumGone``.

    Over a pipe from mcopy, the end of data is trusted only if mcopy then exits 0; a
    stick pulled mid-copy makes mcopy fail, and the stream says so instead of a short EOF."""

    def __init__(self, raw: IO[bytes], where: str, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.raw, self.where, self.proc = raw, where, proc
        self.done = 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(n)
        except OSError as exc:
            raise _gone_or(exc, self.where, self.done) from None
        if not data and n != 0 and self.proc is not None:
            try:
                code = self.proc.wait(timeout=MTOOLS_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = -9
            if code != 0:
                raise MediumGone(f"{self.where}: reading stopped at byte {self.done} (mcopy exit {code})")
        self.done += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.raw.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            assert self.proc.stderr is not None
            self.proc.stderr.close()

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gone_or(exc: OSError, where: str, done: int | None = None) -> DeviceError | TransportError:
    if exc.errno in _GONE:
        at = f" at byte {done}" if done is not None else ""
        return MediumGone(f"{where}: the stick went away{at} ({exc.strerror})")
    return MediumError(f"{where}: {exc.strerror}")


def write_file(devnode: str, fs_type: str | None, name: str, data: bytes, *,
               mount_under: Path | None = None) -> None:
    """Put one new file (``name``, no folders) at the stick's top level: the one write this
    device makes to a stick (the console's diagnostics). FAT goes through mtools (no mount);
    anything else is mounted ``rw,nosuid,nodev,noexec`` just for the write, then synced and
    unmounted. An existing name is never overwritten or followed."""
    if "/" in name or name.startswith(".") or not name:
        raise MediumError(f"{name!r} is not a plain file name")
    if mount_under is not None:
        mount_under.mkdir(parents=True, exist_ok=True, mode=0o700)
    if fs_type in ("vfat", "msdos", "fat"):
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        with tempfile.NamedTemporaryFile(dir=mount_under) as tmp:
            tmp.write(data)
            tmp.flush()
            copied = subprocess.run(["mcopy", "-D", "s", "-i", devnode, tmp.name, f"::/{name}"],
                                    capture_output=True, timeout=MTOOLS_TIMEOUT, env=env, check=False)
        if copied.returncode != 0:
            raise MediumError(f"cannot write {name} to {devnode}: "
                              f"{copied.stderr.decode(errors='replace').strip()[:120]}")
        return
    mnt = Path(tempfile.mkdtemp(prefix="usb-rw-", dir=mount_under))
    argv = ["mount", "-o", "rw,nosuid,nodev,noexec", *(["-t", fs_type] if fs_type else []),
            devnode, str(mnt)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=MTOOLS_TIMEOUT, check=False)
    if proc.returncode != 0:
        mnt.rmdir()
        raise MediumError(f"cannot mount {devnode} to write: "
                          f"{(proc.stderr.strip().splitlines() or ['mount failed'])[-1]}")
    try:
        fd = os.open(mnt / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _gone_or(exc, devnode) from None
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=MTOOLS_TIMEOUT, check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def open_medium(devnode: str, fs_type: str | None, *, mount_under: Path | None = None,
                prefer_mount: bool = True) -> Medium:
    """The stick's filesystem: mounted read-only where the kernel can, FAT through mtools
    otherwise (or when ``prefer_mount`` is False)."""
    if fs_type in ("vfat", "msdos", "fat") and not prefer_mount:
        return MtoolsMedium(devnode)
    try:
        return MountedMedium(devnode, fs_type, under=mount_under)
    except MediumError:
        if fs_type in ("vfat", "msdos", "fat", None):
            return MtoolsMedium(devnode)
        raise
