"""Raspberry Pi 4 / 400 / CM4 / 5: A/B boot partitions with autoboot.txt and the tryboot flag.

Follows the Raspberry Pi documentation, "autoboot.txt" (documentation/asciidoc/
computers/config_txt/autoboot.adoc, https://www.raspberrypi.com/documentation/
computers/config_txt.html#autoboot-txt) and "Fail-safe OS updates (TRYBOOT)"
(raspberry-pi.adoc#fail-safe-os-updates-tryboot):

* ``autoboot.txt`` lives on the first FAT partition, is limited to 512 bytes and
  understands the ``[all]``, ``[none]`` and ``[tryboot]`` filters::

      [all]
      tryboot_a_b=1
      boot_partition=2
      [tryboot]
      boot_partition=3

* ``reboot '0 tryboot'`` sets a one-shot flag; the firmware clears it before it
  starts the OS, so the next reset of any kind (watchdog, power cut, panic)
  boots the ``[all]`` partition again. ``0`` means "the default partition", i.e.
  the one autoboot.txt chooses; with the flag set the ``[tryboot]`` filter passes.
* ``tryboot_a_b=1`` makes the firmware load the normal config.txt from the tried
  partition, so the A/B switch happens at partition level.
* The OS sees ``/proc/device-tree/chosen/bootloader/tryboot`` (1 during a trial)
  and ``.../partition`` (the booted partition), both big-endian u32.
* Commit = "replace autoboot.txt swapping the boot_partition configuration";
  cancel = do nothing and reboot normally.

How edgeops maps that onto the Bootloader protocol:
    primary()     the ``[all]`` boot_partition
    set_trial(S)  ``[tryboot]`` boot_partition=S, and arm the one-shot flag: by
                  default by writing "0 tryboot" to systemd's reboot parameter file, so
                  the agent's next ``systemctl reboot`` is ``reboot(2)`` with that
                  argument; or (tryboot_flag = "vcmailbox") in the firmware directly,
                  as RAUC's ``src/bootloaders/raspberrypi.c`` does
    trial()       the ``[tryboot]`` slot while the flag is armed or this is a trial boot
    commit(S)     rewrite autoboot.txt with [all]=S, [tryboot]=the old primary
    mark_bad(S)   point ``[tryboot]`` at the primary and disarm the flag
Every rewrite of autoboot.txt is atomic at file level (tmp, fsync, rename,
fsync dir); what FAT guarantees beyond that is in docs/boards.md.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.adapters.bootloader import register
from agent.adapters.fsutil import atomic_write
from agent.errors import BootloaderError, ConfigError

AUTOBOOT = "autoboot.txt"
MAX_AUTOBOOT = 512  # the firmware reads no more (autoboot.adoc)
TRYBOOT_PARAM = "0 tryboot"
FILTERS = ("all", "none", "tryboot")


class AutobootError(BootloaderError):
    pass


# --- files on the boot partition ------------------------------------------------------------
class BootFs(Protocol):
    """Whole files on a (FAT) boot partition: read, and replace atomically."""

    def read(self, name: str) -> bytes | None: ...

    def replace(self, name: str, data: bytes) -> None: ...


@dataclass(frozen=True)
class DirBootFs:
    """A mounted boot partition (or a directory standing in for one)."""

    root: Path

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BootloaderError(f"cannot read {self.root / name}: {exc.strerror}") from None

    def replace(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self.root / name, data)
        except OSError as exc:
            raise BootloaderError(f"cannot write {self.root / name}: {exc.strerror}",
                                  hint="is the boot partition mounted read-write?") from None


# --- autoboot.txt ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Autoboot:
    """What an autoboot.txt says. ``extra`` keeps other [all] properties the board uses."""

    boot_partition: int
    tryboot_partition: int | None
    tryboot_a_b: bool = True
    extra: tuple[tuple[str, str], ...] = ()

    def to_bytes(self) -> bytes:
        lines = ["[all]", f"tryboot_a_b={int(self.tryboot_a_b)}",
                 *(f"{k}={v}" for k, v in self.extra), f"boot_partition={self.boot_partition}"]
        if self.tryboot_partition is not None:
            lines += ["[tryboot]", f"boot_partition={self.tryboot_partition}"]
        data = ("\n".join(lines) + "\n").encode()
        if len(data) > MAX_AUTOBOOT:
            raise AutobootError(f"autoboot.txt would be {len(data)} bytes; the firmware reads 512")
        return data


def parse_autoboot(data: bytes) -> Autoboot:
    """Sections and properties as the firmware reads them: the last setting wins."""
    if len(data) > MAX_AUTOBOOT:
        raise AutobootError(f"autoboot.txt is {len(data)} bytes; the firmware reads only 512")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise AutobootError("autoboot.txt is not ASCII") from None
    section = "all"
    props: dict[str, dict[str, str]] = {f: {} for f in FILTERS}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            if section not in FILTERS:
                raise AutobootError(f"autoboot.txt supports only [all], [none] and [tryboot], "
                                    f"not [{section}]")
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise AutobootError(f"autoboot.txt line {raw!r} is not key=value")
        props[section][key.strip()] = value.strip()
    base = props["all"]
    trial = props["tryboot"].get("boot_partition")
    return Autoboot(
        boot_partition=_partition(base.get("boot_partition", "0")),
        tryboot_partition=_partition(trial) if trial is not None else None,
        tryboot_a_b=base.get("tryboot_a_b", "0") == "1",
        extra=tuple((k, v) for k, v in base.items() if k not in ("boot_partition", "tryboot_a_b")),
    )


def _partition(text: str) -> int:
    if not (text.isascii() and text.isdigit()):  # int() would also take "1_0" or " +3"
        raise AutobootError(f"autoboot.txt boot_partition={text!r} is not a partition number")
    return int(text)


# --- the device tree the firmware hands the OS -----------------------------------------------
@dataclass(frozen=True)
class BootInfo:
    tryboot: bool
    partition: int | None


def read_boot_info(proc: Path = Path("/proc")) -> BootInfo:
    node = proc / "device-tree/chosen/bootloader"
    return BootInfo(tryboot=_dt_u32(node / "tryboot") == 1, partition=_dt_u32(node / "partition"))


def _dt_u32(path: Path) -> int | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None


# --- the one-shot tryboot flag -----------------------------------------------------------------
class TrybootFlag(Protocol):
    def armed(self) -> bool: ...

    def set(self, on: bool) -> None: ...


@dataclass(frozen=True)
class RebootParamFlag:
    """systemd's reboot argument file: ``systemctl reboot`` passes it to reboot(2), as
    ``reboot "0 tryboot"`` would (RAUC's Pi integration and newer systemd use the file)."""

    path: Path = Path("/run/systemd/reboot-param")

    def armed(self) -> bool:
        try:
            return "tryboot" in self.path.read_text()
        except OSError:
            return False

    def set(self, on: bool) -> None:
        try:
            if on:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, f"{TRYBOOT_PARAM}\n".encode())
            elif self.armed():
                self.path.unlink()
        except OSError as exc:
            raise BootloaderError(f"cannot {'arm' if on else 'disarm'} tryboot at {self.path}: "
                                  f"{exc.strerror}") from None


Runner = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BootloaderError(f"{argv[0]} failed: {exc}", hint="install vcmailbox (raspi-utils) "
                              "or set tryboot_flag = 'reboot-param'") from None


@dataclass(frozen=True)
class VcMailboxFlag:
    """The firmware's reboot flag itself, through the (undocumented, but used by the
    raspberrypi-firmware driver and RAUC) mailbox tags Get/Set Reboot Flags: armed at
    once, for whatever reboot comes next, and readable back."""

    run: Runner = _run

    def armed(self) -> bool:
        words = self.run(["vcmailbox", "0x00030064", "4", "0", "0"]).split()
        if len(words) <= 5:
            raise BootloaderError(f"cannot parse vcmailbox output {' '.join(words)!r}")
        return int(words[5], 0) != 0

    def set(self, on: bool) -> None:
        self.run(["vcmailbox", "0x00038064", "4", "0", "1" if on else "0"])


FLAGS: dict[str, Callable[[Path], TrybootFlag]] = {
    "reboot-param": RebootParamFlag,
    "vcmailbox": lambda _path: VcMailboxFlag(),
}


# --- the backend ------------------------------------------------------------------------------
class RpiTryboot:
    def __init__(self, fs: BootFs, partitions: Mapping[str, int], *, proc: Path = Path("/proc"),
                 flag: TrybootFlag | None = None) -> None:
        if len(set(partitions.values())) != len(partitions):
            raise ConfigError("[bootloader] partitions must give each slot its own partition")
        self.fs = fs
        self.partitions = dict(partitions)
        self.proc = proc
        self.flag: TrybootFlag = flag or RebootParamFlag()

    # reading
    def autoboot(self) -> Autoboot:
        data = self.fs.read(AUTOBOOT)
        if data is None:
            raise AutobootError("autoboot.txt is missing from the boot partition",
                                hint="run 'edgeops board check' for the file to create")
        return parse_autoboot(data)

    def slot_of(self, partition: int | None) -> str | None:
        return next((s for s, p in self.partitions.items() if p == partition), None)

    def booted_slot(self) -> str | None:
        return self.slot_of(read_boot_info(self.proc).partition)

    def armed(self) -> bool:
        """Is the one-shot tryboot flag requested for the next reboot?"""
        return self.flag.armed()

    def primary(self) -> str:
        ab = self.autoboot()
        slot = self.slot_of(ab.boot_partition)
        if slot is None:
            raise AutobootError(f"autoboot.txt boots partition {ab.boot_partition}, which is no slot "
                                f"({self._names()})", hint="fix [all] boot_partition in autoboot.txt")
        return slot

    def trial(self) -> str | None:
        ab = self.autoboot()
        slot = self.slot_of(ab.tryboot_partition)
        if slot is None or slot == self.slot_of(ab.boot_partition):
            return None
        info = read_boot_info(self.proc)
        running_trial = info.tryboot and info.partition == ab.tryboot_partition
        return slot if running_trial or self.armed() else None

    # writing
    def set_trial(self, slot: str) -> None:
        part = self._part(slot)
        ab = self.autoboot()
        if ab.boot_partition == part:
            raise BootloaderError(f"slot {slot} is the primary; a trial needs the other slot")
        self._write(Autoboot(ab.boot_partition, part, True, ab.extra))
        self._arm(True)

    def commit(self, slot: str) -> None:
        part = self._part(slot)
        ab = self.autoboot()
        self._arm(False)
        if ab.boot_partition == part:
            return
        # the documented commit: swap the boot_partition values of [all] and [tryboot]
        self._write(Autoboot(part, ab.boot_partition, True, ab.extra))

    def mark_bad(self, slot: str) -> None:
        part = self._part(slot)
        ab = self.autoboot()
        if ab.boot_partition == part:
            raise BootloaderError(f"refusing to mark the primary slot {slot} bad",
                                  hint="commit or roll back to the other slot first")
        self._arm(False)
        if ab.tryboot_partition == part:  # so even a stray 'reboot "0 tryboot"' cannot boot it
            self._write(Autoboot(ab.boot_partition, ab.boot_partition, True, ab.extra))

    def _write(self, ab: Autoboot) -> None:
        if self.fs.read(AUTOBOOT) != ab.to_bytes():
            self.fs.replace(AUTOBOOT, ab.to_bytes())

    def _arm(self, on: bool) -> None:
        if on or self.flag.armed():
            self.flag.set(on)

    def _part(self, slot: str) -> int:
        try:
            return self.partitions[slot]
        except KeyError:
            raise BootloaderError(f"no slot named {slot!r} ({self._names()})") from None

    def _names(self) -> str:
        return ", ".join(f"{s}=partition {p}" for s, p in self.partitions.items())


def initial_autoboot(primary_partition: int, other_partition: int) -> bytes:
    """autoboot.txt for a freshly flashed board: boot ``primary``, trials go to ``other``."""
    return Autoboot(primary_partition, other_partition).to_bytes()


@register("rpi_tryboot")
def _factory(settings: Mapping[str, Any], base: Path, slots: tuple[str, ...]) -> RpiTryboot:
    try:
        root = base / str(settings.get("root", "/"))  # board check --root: a replica of the device
        boot_dir = base / str(settings.get("boot_dir", root / "boot/firmware"))
        parts = {str(k): int(v) for k, v in dict(settings["partitions"]).items()}
        proc = base / str(settings.get("proc", root / "proc"))
        param = base / str(settings.get("reboot_param", root / "run/systemd/reboot-param"))
        flag = FLAGS[str(settings.get("tryboot_flag", "reboot-param"))](param)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"[bootloader] rpi_tryboot needs boot_dir, partitions (slot = partition "
                          f"number) and tryboot_flag 'reboot-param' or 'vcmailbox': {exc}") from None
    if set(parts) != set(slots):
        raise ConfigError(f"[bootloader] partitions name {sorted(parts)}, the slots are {list(slots)}")
    return RpiTryboot(DirBootFs(boot_dir), parts, proc=proc, flag=flag)
