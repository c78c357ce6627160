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
The file's format is agent.core.autoboot. Every rewrite of autoboot.txt is atomic at
file level (tmp, fsync, rename, fsync dir); what FAT guarantees beyond that is in
docs/boards.md.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.adapters.bootloader import register
from agent.adapters.bootloader.bootfs import BootFs, DirBootFs
from agent.adapters.fsutil import atomic_write
from agent.core.autoboot import AUTOBOOT, Autoboot, AutobootError, parse_autoboot
from agent.errors import BootloaderError, ConfigError

TRYBOOT_PARAM = "0 tryboot"


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
