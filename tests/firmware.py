"""Faithful stand-ins for what each board's firmware decides at power-on, plus a disk replica.

Each ``boot(...)`` reads the board's storage exactly where the real bootloader
would and applies the decision its script (or ROM) documents:
    UBootScript     U-Boot's bootcount/bootlimit/altbootcmd logic, then the real
                    boards/uboot/boot.cmd or boot-rauc.cmd run by tests/hush.py
    Grub            boards/grub/grub.cfg (RAUC's ORDER/<S>_OK/<S>_TRY loop)
    RpiFirmware     the Raspberry Pi bootloader with autoboot.txt and the one-shot
                    tryboot flag (autoboot.adoc; raspberry-pi.adoc "TRYBOOT")
``MtoolsFs`` is a BootFs on a FAT partition inside a disk image (mcopy/mtype,
no loop mount), so the backends write the very bytes the firmware reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.adapters.bootloader.bootfs import BootFs
from agent.adapters.bootloader.envfile import EnvStore
from agent.core.autoboot import parse_autoboot
from tests import hush

MiB = 1 << 20


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} missing: apt-get install {package}")


# --- disk replicas --------------------------------------------------------------------------
@dataclass
class Disk:
    path: Path
    parts: dict[int, tuple[int, int]]  # partition number -> (byte offset, byte size)

    def offset(self, n: int) -> int:
        return self.parts[n][0]


def make_disk(path: Path, layout: str, size_mib: int, *, fat: tuple[int, ...] = ()) -> Disk:
    """A sparse image partitioned by ``sfdisk`` with ``layout`` (sfdisk script), FAT where asked."""
    need("sfdisk", "fdisk")
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["sfdisk", "--quiet", str(path)], input=layout, text=True, check=True,
                   capture_output=True)
    out = subprocess.run(["sfdisk", "--dump", str(path)], text=True, check=True,
                         capture_output=True).stdout
    parts: dict[int, tuple[int, int]] = {}
    for line in out.splitlines():
        if line.startswith(str(path)) and ":" in line:
            name, _, rest = line.partition(":")
            fields = dict(f.strip().split("=", 1) for f in rest.split(",") if "=" in f)
            n = int(name.strip()[len(str(path)):].lstrip("p"))
            parts[n] = (int(fields["start"]) * 512, int(fields["size"]) * 512)
    disk = Disk(path, parts)
    for n in fat:
        need("mkfs.vfat", "dosfstools")
        off, size = parts[n]
        subprocess.run(["mkfs.vfat", "-n", f"BOOT{n}", "--offset", str(off // 512), str(path),
                        str(size // 1024)], check=True, capture_output=True)
    return disk


@dataclass
class MtoolsFs:
    """Files on the FAT partition at ``offset`` inside ``image``, through mtools."""

    image: Path
    offset: int

    def _img(self) -> str:
        return f"{self.image}@@{self.offset}"

    def read(self, name: str) -> bytes | None:
        r = subprocess.run(["mtype", "-i", self._img(), f"::/{name}"], capture_output=True,
                           env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        return r.stdout if r.returncode == 0 else None

    def replace(self, name: str, data: bytes) -> None:
        # Same order as DirBootFs: whole new file, then a rename over the old one.
        folder, _, base = name.rpartition("/")
        new = f"::/{folder}/.{base}.new" if folder else f"::/.{base}.new"
        tmp = self.image.with_name(f"{self.image.name}.{base}.upload")
        tmp.write_bytes(data)
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        parts = folder.split("/") if folder else []
        for i in range(len(parts)):  # mmd makes one level at a time
            subprocess.run(["mmd", "-i", self._img(), "::/" + "/".join(parts[:i + 1])],
                           capture_output=True, env=env)
        subprocess.run(["mcopy", "-o", "-i", self._img(), str(tmp), new], check=True,
                       capture_output=True, env=env)
        subprocess.run(["mdel", "-i", self._img(), f"::/{name}"], capture_output=True, env=env)
        subprocess.run(["mren", "-i", self._img(), new, base], check=True,
                       capture_output=True, env=env)
        tmp.unlink()


# --- firmware -------------------------------------------------------------------------------
BOARDS = Path(__file__).resolve().parent.parent / "boards"


@dataclass
class UBootScript:
    """U-Boot's autoboot running the real boot script (tests/hush.py) over the env store.

    With ``bootcount`` (CONFIG_BOOTCOUNT_LIMIT + CONFIG_BOOTCOUNT_ENV, doc/README.bootcount):
    while upgrade_available=1 every boot increments and saves ``bootcount``, and once
    bootcount > bootlimit U-Boot runs ``altbootcmd`` instead of ``bootcmd``.
    """

    store: EnvStore
    script: str
    bootcount: bool
    log: list[str] = field(default_factory=list)

    def boot(self) -> str:
        from agent.adapters.runtime import slot_from_cmdline

        for _ in range(3):  # a script may `reset` (RAUC: all attempts spent)
            env = self.store.read() if self.store.exists() else {}
            env.setdefault("bootcmd", "source boot.scr")
            cmd = "bootcmd"
            if self.bootcount and env.get("upgrade_available") == "1":
                env["bootcount"] = str(int(env.get("bootcount", "0")) + 1)
                self.store.write(env)
                if int(env.get("bootlimit", "0") or 0) and int(env["bootcount"]) > int(env["bootlimit"]):
                    cmd = "altbootcmd" if env.get("altbootcmd") else "bootcmd"
            shell = hush.Hush(env, self.store.write, {"boot.scr": self.script})
            try:
                shell.run(env[cmd])
            except hush.Booted as booted:
                self.log.append(booted.bootargs)
                return slot_from_cmdline(booted.bootargs, ("A", "B"))
            except hush.Reset:
                continue
            raise AssertionError(f"the boot script ended without booting: {shell.output}")
        raise AssertionError("U-Boot reset three times in a row")


def UBootBootcount(store: EnvStore) -> UBootScript:
    return UBootScript(store, (BOARDS / "uboot/boot.cmd").read_text(), bootcount=True)


def UBootRauc(store: EnvStore) -> UBootScript:
    return UBootScript(store, (BOARDS / "uboot/boot-rauc.cmd").read_text(), bootcount=False)


@dataclass
class Grub:
    """GRUB running the real boards/grub/grub.cfg (tests/grubsh.py) over grubenv on the ESP."""

    fs: BootFs
    name: str = "EFI/edgeops/grubenv"

    def boot(self) -> str:
        from tests.grubsh import GrubScript

        script = (BOARDS / "grub/grub.cfg").read_text()
        assert f"($root)/{self.name}" in script, "grub.cfg reads grubenv from another place"
        return GrubScript(self.fs).boot(script)


@dataclass
class RpiFirmware:
    """The Pi bootloader: autoboot.txt on partition 1 + the one-shot tryboot flag."""

    fs: BootFs
    proc: Path
    partitions: dict[str, int]
    reboot_param: Path
    flag: bool = False  # the one-shot flag lives in RAM-like state: a power cut clears it
    log: list[tuple[int, bool]] = field(default_factory=list)

    def boot(self) -> str:
        data = self.fs.read("autoboot.txt")
        assert data is not None, "no autoboot.txt: the firmware would boot partition 1"
        ab = parse_autoboot(data)
        tryboot, self.flag = self.flag, False  # cleared before the OS starts
        part = ab.tryboot_partition if tryboot and ab.tryboot_partition else ab.boot_partition
        node = self.proc / "device-tree/chosen/bootloader"
        node.mkdir(parents=True, exist_ok=True)
        (node / "tryboot").write_bytes(int(tryboot).to_bytes(4, "big"))
        (node / "partition").write_bytes(part.to_bytes(4, "big"))
        self.reboot_param.unlink(missing_ok=True)  # /run is a tmpfs
        self.log.append((part, tryboot))
        slot = next(s for s, p in self.partitions.items() if p == part)
        return slot

    def reboot(self) -> str:
        """``systemctl reboot``: systemd passes /run/systemd/reboot-param to reboot(2)."""
        try:
            self.flag = "tryboot" in self.reboot_param.read_text()
        except FileNotFoundError:
            self.flag = False
        return self.boot()

    def power_cut(self) -> str:
        self.flag = False
        return self.boot()


@dataclass
class Runtime:
    """The running system on top of a firmware: which slot booted, which boot this is."""

    firmware: UBootScript | Grub | RpiFirmware
    slot: str = ""
    boot: str = ""
    reboots: list[str] = field(default_factory=list)

    def power_on(self) -> str:
        self.slot = self.firmware.boot()
        self.boot = str(uuid.uuid4())
        return self.slot

    def booted_slot(self) -> str:
        return self.slot

    def boot_id(self) -> str:
        return self.boot

    def reboot(self, reason: str) -> None:
        self.reboots.append(reason)
        fw = self.firmware
        self.slot = fw.reboot() if isinstance(fw, RpiFirmware) else fw.boot()
        self.boot = str(uuid.uuid4())

    def power_cut(self) -> None:
        fw = self.firmware
        self.slot = fw.power_cut() if isinstance(fw, RpiFirmware) else fw.boot()
        self.boot = str(uuid.uuid4())
