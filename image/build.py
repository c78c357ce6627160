#!/usr/bin/env python3
"""Build a bootable A/B disk image for a board from Debian packages only (``make image``).

Standard library only: it runs with the build host's python3 and calls Debian's tools
(mmdebstrap, mkfs.ext4 -d, mkfs.vfat + mtools, sfdisk, grub-mkimage, grub-editenv), so no
loop mount, no docker and no network beyond Debian's package archive (and PyPI's cache for
the one wheel Debian lacks). Steps, each timed:

  base tree   mmdebstrap --variant=essential with image/x86-64/packages.txt, trimmed
              (image/x86-64/trim.sh); the .debs and the trimmed tree are cached under
              CACHE/<sha256 of everything that shapes the tree>/, so a warm build skips it
  edgeops     a wheel built (pip wheel --no-deps) from a clean copy of this source tree,
              installed without dependencies onto Debian's python3 packages (zstandard,
              psutil, idna, certifi, charset-normalizer); what bookworm lacks or has too old,
              pinned wheels in /usr/lib/edgeops/vendor: cryptography (bookworm's 38 misses
              APIs edgeops uses), urllib3 2 and requests (bookworm's urllib3 1.26 has no
              read1), tpm2-pytss (bookworm has 1.2)
  stage       image/stage-rootfs.sh (agent.toml, keyring, board file, units), fstab
              (the data partition at /var/lib/edgeops, the ESP at /boot/efi)
  factory     'edgeops provision --root' writes the journal of the data partition: slot A
              committed and good with the image's version and security_version
  disk        GPT: esp | rootfs_A | rootfs_B | data (PARTLABELs), slot sizes from the board
              file; GRUB EFI at the removable-media path, the board's grub.cfg, grubenv

Outputs in OUT: disk.img (sparse), rootfs.ext4 (the slot payload for bundles), pki/ (the
test PKI: root and signer), build.json (what was built, offsets, sizes and timings).

The arm64 boards (TARGETS) share one base tree (image/arm64/, built under qemu-user) and differ
in the disk: uboot-arm64 (QEMU virt) a GPT from 4 MiB with boot.scr on p1
(boards/uboot/boot-virt.cmd) and the U-Boot environment raw below it, written by
libubootenv's fw_setenv; rpi4/rpi5/cm4 an MBR with autoboot.txt and per-slot FAT boot
partitions (cmdline.txt per slot), checked by tools/e2e/rpi_check.py. docs/boards.md,
"arm64 and Raspberry Pi images".

Long because it is one build script for every board a newcomer runs by hand, standard
library only, so it runs with the build host's python3 (make image: $(PY)).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# dpkg never unpacks these: documentation and translations the device does not need
PATH_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*",
                 "/usr/share/locale/*", "/usr/share/lintian/*", "/usr/share/zsh/*")
HOST_TOOLS = {  # command -> Debian package
    "mmdebstrap": "mmdebstrap", "grub-mkimage": "grub-common", "grub-editenv": "grub-common",
    "mkfs.vfat": "dosfstools", "mcopy": "mtools", "mkfs.ext4": "e2fsprogs", "sfdisk": "fdisk",
    "qemu-system-x86_64": "qemu-system-x86", "swtpm": "swtpm",
}
HOST_FILES = {"/usr/lib/grub/x86_64-efi/part_gpt.mod": "grub-efi-amd64-bin",
              "/usr/share/OVMF/OVMF_CODE_4M.fd": "ovmf"}
# the arm64 boards: the tree is built under qemu-user (binfmt_misc, checked with arch-test);
# uboot-arm64 also boots it (QEMU virt + Debian's U-Boot) and writes its boot.scr and env
HOST_TOOLS_ARM64 = {"mmdebstrap": "mmdebstrap", "mkfs.vfat": "dosfstools", "mcopy": "mtools",
                    "mkfs.ext4": "e2fsprogs", "sfdisk": "fdisk", "arch-test": "arch-test",
                    "update-binfmts": "binfmt-support", "mkimage": "u-boot-tools",
                    "fw_printenv": "libubootenv-tool", "qemu-system-aarch64": "qemu-system-arm"}
HOST_FILES_ARM64 = {"/usr/libexec/qemu-binfmt/aarch64-binfmt-P": "qemu-user-static",
                    "/usr/lib/u-boot/qemu_arm64/u-boot.bin": "u-boot-qemu"}
# pip's platform tags for a foreign architecture's wheels (bookworm: glibc 2.36, CPython 3.11)
PIP_PLATFORM = {"arm64": ["--platform", "manylinux_2_34_aarch64", "--platform",
                          "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
                          "--python-version", "3.11", "--implementation", "cp"]}
# GRUB modules in BOOTX64.EFI: grub.cfg's commands, GPT, FAT (ESP) and ext2 (the slots)
GRUB_MODULES = ("part_gpt fat ext2 normal configfile loadenv search search_label search_fs_file "
                "regexp linux test echo boot reboot halt cat ls serial terminal terminfo sleep")
# Vendored (pinned, the versions the suite runs with): what Debian bookworm lacks or has too old
WHEELS = {  # PyPI's wheels, as the suite runs them (image/x86-64/packages.txt says why)
    "cryptography": "50.0.2",  # bookworm: 38.0.4, without APIs agent/core/trust.py uses
    "urllib3": "2.8.0",  # bookworm: 1.26.12, without HTTPResponse.read1 (download.py)
    "requests": "2.34.2",  # bookworm: 2.28.1, which wants urllib3 < 1.27
}
TPM2_PYTSS = "3.0.0"  # bookworm: 1.2.0; built here against bookworm's libtss2
ESP_MIB = 32
DATA_MIB = 256
ALIGN_MIB = 1
TYPE_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
TYPE_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
TYPE_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # a FAT partition that is no ESP


@dataclass(frozen=True)
class Target:
    """What a board's image is made of: the Debian architecture, the base tree's inputs, and
    how it boots (grub: ESP + GRUB EFI; uboot: U-Boot's boot.scr and a raw environment;
    rpi: autoboot.txt and per-slot FAT boot partitions)."""
    arch: str  # Debian's name
    arch_dir: Path  # packages.txt, trim.sh, initramfs.* (the cache key)
    triplet: str  # the multiarch directory under /usr/lib
    boot: str


TARGETS = {
    "x86-64-grub": Target("amd64", HERE / "x86-64", "x86_64-linux-gnu", "grub"),
    "uboot-arm64": Target("arm64", HERE / "arm64", "aarch64-linux-gnu", "uboot"),
    "rpi4": Target("arm64", HERE / "arm64", "aarch64-linux-gnu", "rpi"),
    "rpi5": Target("arm64", HERE / "arm64", "aarch64-linux-gnu", "rpi"),
    "cm4": Target("arm64", HERE / "arm64", "aarch64-linux-gnu", "rpi"),
}


class BuildError(Exception):
    """One line for the person running the build; exit 2."""


@dataclass
class Partition:
    name: str  # the GPT PARTLABEL
    size_mib: int
    type_uuid: str
    start: int = 0  # bytes, filled in from sfdisk's table


@dataclass
class Build:
    board: str
    target: Target
    out: Path
    cache: Path
    edgeops: str
    version: str
    security_version: int
    tpm_optional: bool = False  # --tpm-optional: [tpm] required = false (a smoke boot without one)
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)


# --- small helpers ------------------------------------------------------------------------------
def run(argv: Sequence[str | Path], *, env: dict[str, str] | None = None, quiet: bool = True,
        cwd: Path | None = None) -> str:
    """Run a tool; on failure raise BuildError with its last lines of output."""
    try:
        proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                              env={**os.environ, **(env or {})}, check=False)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} not found; install it (see image/README.md)") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BuildError(f"{Path(str(argv[0])).name} failed (exit {proc.returncode}):\n{tail}")
    if not quiet:
        print(proc.stdout, end="")
    return proc.stdout


class step:  # a context manager that reads like a label: with step(b, "disk"): ...
    def __init__(self, build: Build, name: str) -> None:
        self.build, self.name = build, name

    def __enter__(self) -> None:
        self.t0 = time.monotonic()
        print(f"image: {self.name} ...", flush=True)

    def __exit__(self, *exc: object) -> None:
        took = time.monotonic() - self.t0
        self.build.timings[self.name] = round(took, 1)
        if exc[0] is None:
            print(f"image: {self.name} done in {took:.1f} s", flush=True)


def mib(n: int) -> int:
    return n << 20


def parse_size_mib(text: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t) >> 20


def read_list(path: Path) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()
            if ln.split("#", 1)[0].strip()]


# --- host tools ---------------------------------------------------------------------------------
def host_tools(target: Target | None = None) -> None:
    foreign = target is not None and target.arch != "amd64"
    tools, files = (HOST_TOOLS_ARM64, HOST_FILES_ARM64) if foreign else (HOST_TOOLS, HOST_FILES)
    missing = sorted({pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None}
                     | {pkg for path, pkg in files.items() if not Path(path).exists()})
    if not missing:
        if foreign:
            foreign_exec(target.arch)  # type: ignore[union-attr]
        return
    if os.geteuid() != 0:
        raise BuildError(f"missing Debian packages: {' '.join(missing)} (run as root to "
                         f"install them, or apt-get install them)")
    print(f"image: apt-get install {' '.join(missing)}", flush=True)
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        env={"DEBIAN_FRONTEND": "noninteractive"})
    if foreign:
        foreign_exec(target.arch)  # type: ignore[union-attr]


def foreign_exec(arch: str) -> None:
    """binfmt_misc with qemu-user for ARCH, so mmdebstrap can run the tree's maintainer
    scripts: mounted (a container may not have it) and the qemu entry enabled."""
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", binfmt])
    qemu = {"arm64": "qemu-aarch64"}[arch]
    if not (binfmt / qemu).exists():
        run(["update-binfmts", "--enable", qemu])
    out = subprocess.run(["arch-test", arch], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BuildError(f"this host cannot run {arch} programs ({(out.stdout + out.stderr).strip()});"
                         f" install qemu-user-static and binfmt-support, and allow binfmt_misc")


# --- the base tree ------------------------------------------------------------------------------
def base_inputs(arch_dir: Path) -> list[Path]:
    return [arch_dir / "packages.txt", arch_dir / "trim.sh", arch_dir / "initramfs.conf",
            arch_dir / "initramfs.modules"]


def cache_key(arch_dir: Path, arch: str = "amd64") -> str:
    """Everything that shapes the base tree: packages, trim, initramfs settings, mirrors, options."""
    h = hashlib.sha256()
    if arch != "amd64":  # (amd64's key stays what it was: its cached trees stay valid)
        h.update(f"arch={arch}\0".encode())
    for p in base_inputs(arch_dir):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update("\n".join((SUITE, *MIRRORS, *PATH_EXCLUDES)).encode())
    return h.hexdigest()[:16]


def mmdebstrap_argv(arch_dir: Path, debs: Path, tar: Path, arch: str = "amd64") -> list[str]:
    pkgs = ",".join(read_list(arch_dir / "packages.txt"))
    # a foreign architecture's maintainer scripts run under qemu-user (binfmt_misc)
    argv = ["mmdebstrap", "--mode=root", "--variant=essential", "--format=tar",
            f"--architectures={arch}",
            f"--include={pkgs}", "--skip=download/empty", "--skip=cleanup/apt/cache"]
    for pattern in PATH_EXCLUDES:
        argv.append(f"--dpkgopt=path-exclude={pattern}")
    argv.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    # the .debs of earlier builds, and afterwards this build's, in DEBS (apt ignores extras)
    argv += ["--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives",
             f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
             # the initramfs settings before the kernel's postinst first builds one
             "--essential-hook=mkdir -p \"$1\"/etc/initramfs-tools/conf.d "
             "\"$1\"/usr/share/initramfs-tools/modules.d",
             f"--essential-hook=copy-in {arch_dir / 'initramfs.conf'} /etc/initramfs-tools/conf.d/",
             f"--essential-hook=upload {arch_dir / 'initramfs.modules'} "
             "/usr/share/initramfs-tools/modules.d/edgeops",
             f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
             "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb",
             f"--customize-hook=upload {arch_dir / 'trim.sh'} /tmp/trim.sh",
             "--customize-hook=chroot \"$1\" sh /tmp/trim.sh",
             "--customize-hook=rm -f \"$1\"/tmp/trim.sh \"$1\"/tmp/keep-modules",
             SUITE, str(tar), *MIRRORS]
    return argv


def base_tree(b: Build, arch_dir: Path) -> Path:
    arch = b.target.arch
    key = cache_key(arch_dir, arch)
    where = b.cache / key
    tar = where / "base.tar"
    b.facts["base_cache"] = str(tar)
    if tar.exists():
        print(f"image: base tree from the cache ({tar})", flush=True)
        b.facts["base_cached"] = True
        return tar
    b.facts["base_cached"] = False
    debs = b.cache / f"debs-{SUITE}-{arch}"
    debs.mkdir(parents=True, exist_ok=True)
    where.mkdir(parents=True, exist_ok=True)
    part = where / "base.tar.part"
    run(mmdebstrap_argv(arch_dir, debs, part, arch))
    part.rename(tar)
    (where / "packages.txt").write_text((arch_dir / "packages.txt").read_text())
    return tar


# --- edgeops and the wheels it vendors ---------------------------------------------------------
def clean_copy(dest: Path) -> None:
    """The source tree as git sees it (tracked and new files, nothing ignored): pip wheel
    writes build/ into the directory it builds, so never into the working tree."""
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=REPO).split("\0")
    for name in files:
        src = REPO / name
        if not name or not src.is_file():
            continue  # deleted but still in the index
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)


def build_wheels(b: Build, work: Path, pip: str) -> tuple[Path, list[Path]]:
    """edgeops's own wheel from a clean copy of the source, and the pinned wheels Debian lacks
    (WHEELS), downloaded once into the cache per architecture. For another architecture:
    cryptography's manylinux wheel for it, and not tpm2-pytss: PyPI has no binary wheel of it
    and building one needs that architecture's compiler (left out, with a note)."""
    arch = b.target.arch
    wheels = work / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="edgeops-src-") as tmp:
        clean_copy(Path(tmp))
        run([pip, "wheel", "-q", "--no-deps", "-w", wheels, tmp])
    own = next(wheels.glob("edgeops-*.whl"))
    vendor = b.cache / ("wheels" if arch == "amd64" else f"wheels-{arch}")
    vendor.mkdir(parents=True, exist_ok=True)
    out = []
    if arch == "amd64":
        tpm = sorted(vendor.glob(f"tpm2_pytss-{TPM2_PYTSS}-*.whl"))
        if not tpm:
            # built against the build host's libtss2 for its python3: the image's are the same
            # Debian release's (bookworm: python 3.11, tpm2-tss 3.2.1)
            run([pip, "wheel", "-q", "--no-deps", "-w", vendor, f"tpm2-pytss=={TPM2_PYTSS}"])
            tpm = sorted(vendor.glob(f"tpm2_pytss-{TPM2_PYTSS}-*.whl"))
        out.append(tpm[-1])
    else:
        b.facts["left_out"] = ["tpm2-pytss (no binary wheel for this architecture on PyPI)"]
    for name, version in WHEELS.items():
        have = sorted(vendor.glob(f"{name}-{version}-*.whl"))
        if not have:  # cryptography's is manylinux (abi3, glibc 2.34: bookworm has 2.36)
            run([pip, "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", vendor,
                 *PIP_PLATFORM.get(arch, []), f"{name}=={version}"])
            have = sorted(vendor.glob(f"{name}-{version}-*.whl"))
        out.append(have[-1])
    return own, out


CONSOLE_SCRIPT = """#!/usr/bin/python3
# installed by image/build.py from the edgeops wheel (console_scripts: edgeops)
import sys
from agent.cli.main import run
sys.exit(run())
"""


def install_wheel(wheel: Path, tree: Path, site: str, *, scripts: bool, pip: str,
                  arch: str = "amd64") -> None:
    """Unpack a wheel into TREE with pip --target, then move its parts where Debian's python3
    looks: the packages into SITE, console scripts to /usr/bin, data files to /usr/share."""
    foreign = ["--only-binary", ":all:", *PIP_PLATFORM[arch]] if arch in PIP_PLATFORM else []
    with tempfile.TemporaryDirectory(prefix="edgeops-wheel-") as tmp:
        run([pip, "install", "-q", "--no-deps", "--no-compile", *foreign, "--target", tmp, wheel])
        t = Path(tmp)
        dest = tree / site.lstrip("/")
        dest.mkdir(parents=True, exist_ok=True)
        for item in t.iterdir():
            if item.name in ("bin", "share"):
                continue
            shutil.rmtree(dest / item.name, ignore_errors=True)
            shutil.move(str(item), dest / item.name)
        if (t / "share").is_dir():
            shutil.copytree(t / "share", tree / "usr/share", dirs_exist_ok=True)
    if scripts:
        exe = tree / "usr/bin/edgeops"
        exe.write_text(CONSOLE_SCRIPT)
        exe.chmod(0o755)


# --- the root filesystem ------------------------------------------------------------------------
# every module the device agent imports, on Debian's packages, in the image itself
IMPORT_CHECK = """
import agent.device.updater, agent.device.fleet, agent.device.provision, agent.adapters.rot.tpm
import cryptography, requests, urllib3, zstandard, psutil, tpm2_pytss
from importlib.metadata import version
print(" ".join(f"{m}={version(m)}" for m in ("cryptography", "requests", "urllib3", "zstandard",
                                                "psutil", "tpm2-pytss")))
"""
IMPORT_CHECK_NO_TPM = """
import agent.device.updater, agent.device.fleet, agent.device.provision, agent.adapters.rot.tpm
import cryptography, requests, urllib3, zstandard, psutil
from importlib.metadata import version
print(" ".join(f"{m}={version(m)}" for m in ("cryptography", "requests", "urllib3", "zstandard",
                                                "psutil")))
"""

# What a headless appliance without D-Bus never runs, masked (a link to /dev/null), each a
# few seconds of a boot under TCG and of every boot on slow hardware. Not the serial getty,
# not fsck, not udev: what the device needs stays.
MASKED_UNITS = (
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",  # trim.sh dropped binfmt_misc
    "systemd-logind.service", "systemd-user-sessions.service",  # no D-Bus, no logins but a getty
    "getty@tty1.service",  # no display: the console is a serial port
    "systemd-ask-password-wall.path", "systemd-update-utmp-runlevel.service",
    "e2scrub_reap.service", "e2scrub_all.timer",  # no LVM
    "fstrim.timer", "dpkg-db-backup.timer",  # no apt on the device; flash wear is the SoC's
    "systemd-pstore.service",
)
# Files the device never reads, out of the slot payload: every byte here is downloaded,
# hashed and written by each update. The full perl (perl-base stays: it is Essential),
# udev's hwdb (device names for desktops), iconv's charset modules, apt's caches, Python's
# own tests and tools. dpkg's database still lists them: nobody runs dpkg on a slot.
SLIM_PATHS = (  # TRIPLET: the architecture's multiarch directory
    "usr/share/perl", "usr/lib/TRIPLET/perl", "usr/bin/perl5.*",
    "usr/lib/TRIPLET/libperl.so.*",
    "usr/lib/udev/hwdb.bin", "usr/lib/udev/hwdb.d", "etc/udev/hwdb.bin",
    "usr/lib/TRIPLET/gconv", "var/cache/apt/*.bin", "var/cache/debconf/*-old",
    "usr/lib/python3.11/test", "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/turtledemo",
)


def slim(tree: Path, triplet: str = "x86_64-linux-gnu") -> int:
    """Remove SLIM_PATHS from TREE; returns the bytes removed."""
    gone = 0
    for pattern in SLIM_PATHS:
        for path in tree.glob(pattern.replace("TRIPLET", triplet)):
            if path.is_dir() and not path.is_symlink():
                gone += sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                gone += path.lstat().st_size
                path.unlink()
    return gone


FSTAB = """\
# edgeops x86-64 image. The slot's root is mounted by the initramfs from root=PARTLABEL=...
# on the kernel command line (grub.cfg), so this file is the same in both slots.
/dev/root        /                 ext4  rw,errors=remount-ro  0 1
# the persistent data partition: the agent's journal, keys and buffers survive every update
PARTLABEL=data   /var/lib/edgeops  ext4  rw,nosuid,nodev,noexec,x-systemd.before=edgeops-agent.service  0 2
# the ESP: grubenv lives here (boards/x86-64-grub.toml: /boot/efi/EFI/edgeops/grubenv)
PARTLABEL=esp    /boot/efi         vfat  umask=0077,flush,x-systemd.before=edgeops-agent.service  0 2
"""


FSTAB_UBOOT = """\
# edgeops uboot-arm64 image. The slot's root is mounted by the initramfs from root=PARTLABEL=...
# (boot.scr's bootargs), so this file is the same in both slots.
/dev/root        /                 ext4  rw,errors=remount-ro  0 1
# the persistent data partition: the agent's journal, keys and buffers survive every update
PARTLABEL=data   /var/lib/edgeops  ext4  rw,nosuid,nodev,noexec,x-systemd.before=edgeops-agent.service  0 2
# the U-Boot environment is raw on the disk (/etc/fw_env.config); p1 holds only boot.scr
"""
FSTAB_RPI = """\
# edgeops Raspberry Pi image. The slot's root comes from its boot partition's cmdline.txt
# (root=/dev/mmcblk0p5 or p6); the /boot/firmware line is the board file's per-slot fix-up
# (p2 in slot A, p3 in slot B), rewritten by the agent after an install into the other slot.
/dev/root        /                 ext4  rw,errors=remount-ro  0 1
# the persistent data partition (p7): the agent's journal, keys and buffers
/dev/mmcblk0p7   /var/lib/edgeops  ext4  rw,nosuid,nodev,noexec,x-systemd.before=edgeops-agent.service  0 2
# autoboot.txt's partition (p1): the rpi_tryboot backend's boot_dir
/dev/mmcblk0p1   /boot/autoboot    vfat  umask=0077,flush,x-systemd.before=edgeops-agent.service  0 2
/dev/mmcblk0p2   /boot/firmware    vfat  umask=0077,flush  0 2
"""
FSTABS = {"grub": FSTAB, "uboot": FSTAB_UBOOT, "rpi": FSTAB_RPI}


def stage_board(b: Build, tree: Path) -> None:
    """What only this board's image has: U-Boot's fw_env.config (and agent.toml naming it)."""
    cfg = tree / "etc/edgeops/agent.toml"
    if b.tpm_optional:  # said in build.json: this image is not the board's as shipped
        cfg.write_text(re.sub(r"^required = true$", "required = false  # image/build.py --tpm-optional",
                              cfg.read_text(), flags=re.M))
        b.facts["tpm_required"] = False
    if b.target.boot != "uboot":
        return
    # QEMU virt's disk is /dev/vda, the board file's eMMC is /dev/mmcblk0: same offsets, and
    # the agent reads the machine's file, as fw_printenv does (agent/adapters/bootloader/fwenv.py)
    shutil.copy2(HERE / "uboot-arm64/fw_env.config", tree / "etc/fw_env.config")
    cfg = tree / "etc/edgeops/agent.toml"
    text = re.sub(r"^env(_size|_offsets)? = (\[[^\]]*\]|.*)\n", "", cfg.read_text(), flags=re.M)
    text = text.replace('backend = "uboot"\n', 'backend = "uboot"\nfw_env_config = '
                        '"/etc/fw_env.config"  # image/uboot-arm64/fw_env.config\n', 1)
    cfg.write_text(text)


def stage_rootfs(b: Build, tree: Path, pki: Path, fleet: Path | None, overlays: Sequence[Path],
                 own_wheel: Path, vendored: Sequence[Path], pip: str) -> None:
    arch = b.target.arch
    install_wheel(own_wheel, tree, "/usr/lib/python3/dist-packages", scripts=True, pip=pip)
    for wheel in vendored:
        install_wheel(wheel, tree, "/usr/lib/edgeops/vendor", scripts=False, pip=pip, arch=arch)
    (tree / "usr/lib/python3/dist-packages/edgeops-vendor.pth").write_text("/usr/lib/edgeops/vendor\n")
    argv = [HERE / "stage-rootfs.sh", "--rootfs", tree, "--board", b.board,
            "--keyring", pki / "root" / "root.crt", "--edgeops", b.edgeops]
    if fleet is not None:
        argv += ["--fleet", fleet]
    run(argv)
    (tree / "etc/fstab").write_text(FSTABS[b.target.boot])
    (tree / "var/lib/edgeops").mkdir(parents=True, exist_ok=True)
    for mnt in {"grub": ("boot/efi",), "rpi": ("boot/autoboot", "boot/firmware"), "uboot": ()}[
            b.target.boot]:
        (tree / mnt).mkdir(parents=True, exist_ok=True)
    stage_board(b, tree)
    (tree / "etc/hostname").write_text("edgeops\n")
    (tree / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 edgeops\n")
    # the factory release of this image, for 'edgeops provision' on a first boot
    (tree / "etc/edgeops/release.toml").write_text(
        f'version = "{b.version}"\nsecurity_version = {b.security_version}\n')
    for overlay in overlays:  # e.g. tools/e2e/guest: files (and unit links) added as they are
        shutil.copytree(overlay, tree, symlinks=True, dirs_exist_ok=True)
    # An empty machine-id makes every first boot of a slot a systemd "first boot" (presets
    # applied again, slow under TCG); one per image build instead. A fleet identity is the
    # data partition's (identity keys), never this.
    (tree / "etc/machine-id").write_text(hashlib.sha256(os.urandom(32)).hexdigest()[:32] + "\n")
    for unit in MASKED_UNITS:
        link = tree / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (tree / "etc/systemd/system/getty.target.wants/getty@tty1.service").unlink(missing_ok=True)
    b.facts["slimmed_bytes"] = slim(tree, b.target.triplet)
    # Python's bytecode now, not at the device's first start (the CLI is slow under TCG)
    run(["chroot", tree, "python3", "-m", "compileall", "-q", "-j", "0",
         "/usr/lib/python3/dist-packages/agent", "/usr/lib/edgeops/vendor"])
    run(["mount", "-t", "proc", "proc", tree / "proc"])  # psutil reads /proc at import
    try:
        b.facts["edgeops_in_image"] = run(["chroot", tree, "edgeops", "--version"]).strip()
        check = IMPORT_CHECK if arch == "amd64" else IMPORT_CHECK_NO_TPM
        b.facts["python_packages"] = run(["chroot", tree, "python3", "-c", check]).strip()
    finally:
        run(["umount", tree / "proc"])


# --- the test PKI -------------------------------------------------------------------------------
def make_pki(b: Build, pki: Path) -> None:
    if (pki / "signer" / "signer.crt").exists():
        return  # kept across builds of the same OUT, so bundles made for it still verify
    run([b.edgeops, "keys", "init-root", "--out", pki / "root", "--name", "edgeops image test root"])
    run([b.edgeops, "keys", "issue-signer", "--root", pki / "root", "--out", pki / "signer",
         "--days", "30"])


# --- the partitions -----------------------------------------------------------------------------
def board_slot_mib(board: str) -> int:
    path = REPO / "boards" / f"{board}.toml"
    doc = tomllib.loads(path.read_text())
    sizes = [parse_size_mib(str(c.get("min_size", "1G"))) for s in doc["slots"].values()
             for c in s.values()]
    return max(sizes)


def tree_mib(tree: Path) -> int:
    out = run(["du", "-s", "--block-size=1M", "-x", tree])
    return int(out.split()[0])


def mkfs_ext4(img: Path, tree: Path, size_mib: int, label: str) -> None:
    img.unlink(missing_ok=True)
    # orphan_file and metadata_csum_seed: GRUB 2.06 (bookworm) cannot read those ext4s
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-O", "^orphan_file,^metadata_csum_seed",
         "-E", "root_owner=0:0", "-d", tree, img, f"{size_mib}M"])


def make_esp(b: Build, img: Path, work: Path) -> None:
    efi = work / "BOOTX64.EFI"
    run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/edgeops", "-o", efi,
         *GRUB_MODULES.split()])
    env = work / "grubenv"
    env.unlink(missing_ok=True)
    run(["grub-editenv", env, "create"])
    # agent.adapters.bootloader.grub.initial_env("A", ("A", "B")): A committed, B empty
    run(["grub-editenv", env, "set", "ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0", "B_TRY=0"])
    img.unlink(missing_ok=True)
    run(["mkfs.vfat", "-n", "ESP", "-C", img, str(ESP_MIB * 1024)])
    mt = {"MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", img, "::/EFI", "::/EFI/BOOT", "::/EFI/edgeops"], env=mt)
    run(["mcopy", "-i", img, efi, "::/EFI/BOOT/BOOTX64.EFI"], env=mt)
    run(["mcopy", "-i", img, REPO / "boards/grub/grub.cfg", "::/EFI/edgeops/grub.cfg"], env=mt)
    run(["mcopy", "-i", img, env, "::/EFI/edgeops/grubenv"], env=mt)
    # its second copy (agent/adapters/bootloader/grub.py: each copy rewritten in place)
    run(["mcopy", "-i", img, env, "::/EFI/edgeops/grubenv.b"], env=mt)


def layout(slot_mib: int) -> list[Partition]:
    return [Partition("esp", ESP_MIB, TYPE_ESP), Partition("rootfs_A", slot_mib, TYPE_LINUX),
            Partition("rootfs_B", slot_mib, TYPE_LINUX), Partition("data", DATA_MIB, TYPE_LINUX)]


def sfdisk_script(parts: Sequence[Partition], first_mib: int = ALIGN_MIB) -> str:
    lines = ["label: gpt", f"first-lba: {first_mib * 2048}"]
    lines += [f'size={p.size_mib}MiB, type={p.type_uuid}, name="{p.name}"' for p in parts]
    return "\n".join(lines) + "\n"


def make_disk(disk: Path, parts: list[Partition], images: dict[str, Path | None], *,
              first_mib: int = ALIGN_MIB) -> None:
    total = first_mib + sum(p.size_mib for p in parts) + 1  # + the backup GPT
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(mib(total))
    proc = subprocess.run(["sfdisk", "-q", str(disk)], input=sfdisk_script(parts, first_mib), text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"sfdisk failed: {proc.stderr.strip()}")
    table = json.loads(run(["sfdisk", "--json", disk]))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for p, row in zip(parts, table["partitions"], strict=True):
        p.start = int(row["start"]) * sector
        src = images.get(p.name)
        if src is not None:
            run(["dd", f"if={src}", f"of={disk}", "bs=1M", f"seek={p.start}", "oflag=seek_bytes",
                 "conv=notrunc,sparse", "status=none"])


# --- the whole build ----------------------------------------------------------------------------
# --- U-Boot on QEMU virt (uboot-arm64) ---------------------------------------------------------
UBOOT_BOOT_MIB = 16  # p1: FAT with boot.scr only (U-Boot's distro boot finds it there)
UBOOT_FIRST_MIB = 4  # the environment's two copies lie just below 4 MiB (the board file)
ENV_COPIES = (0x3F8000, 0x3FC000)
ENV_SIZE = 0x4000


def uboot_layout(slot_mib: int) -> list[Partition]:
    return [Partition("boot", UBOOT_BOOT_MIB, TYPE_BASIC_DATA), Partition("rootfs_A", slot_mib, TYPE_LINUX),
            Partition("rootfs_B", slot_mib, TYPE_LINUX), Partition("data", DATA_MIB, TYPE_LINUX)]


def make_uboot_boot(img: Path, work: Path) -> None:
    scr = work / "boot.scr"
    run(["mkimage", "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-n", "edgeops",
         "-d", REPO / "boards/uboot/boot-virt.cmd", scr])
    img.unlink(missing_ok=True)
    run(["mkfs.vfat", "-n", "BOOT", "-C", img, str(UBOOT_BOOT_MIB * 1024)])
    run(["mcopy", "-i", img, scr, "::/boot.scr"], env={"MTOOLS_SKIP_CHECK": "1"})


def uboot_initial_env(disk: Path, work: Path) -> str:
    """The factory environment, written by libubootenv's own fw_setenv into the disk at the
    offsets of image/uboot-arm64/fw_env.config (the same file with the disk's path), and read
    back with fw_printenv: what the agent's uboot backend reads on the device."""
    cfg = work / "fw_env.config"
    cfg.write_text("".join(f"{disk} {hex(o)} {hex(ENV_SIZE)}\n" for o in ENV_COPIES))
    # agent.adapters.bootloader.uboot.initial_env("A")
    initial = {"EO_SLOT": "A", "EO_ALT": "A", "upgrade_available": "0", "bootcount": "0",
               "bootlimit": "1"}
    script, defaults = work / "fw_env.initial", work / "fw_env.default"
    script.write_text("".join(f"{k} {v}\n" for k, v in initial.items()))
    defaults.write_text("".join(f"{k}={v}\n" for k, v in initial.items()))
    # both copies blank: libubootenv starts from the defaults file (-f), then writes copy 2
    run(["fw_setenv", "-c", cfg, "-f", defaults, "-s", script])
    return run(["fw_printenv", "-c", cfg])


# --- Raspberry Pi (rpi4, rpi5, cm4): structural only, they cannot boot here ----------------------
RPI_AUTOBOOT_MIB = 32
RPI_DISK_ID = "0xed6e0a5b"  # MBR disk identifier (PARTUUIDs would be ed6e0a5b-0N)
RPI_DTBS = {"rpi4": ("bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb"), "cm4": ("bcm2711-rpi-cm4.dtb",),
            "rpi5": ("bcm2712-rpi-5-b.dtb",)}
AUTOBOOT_TXT = "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"  # docs/boards.md
RPI_CONFIG_TXT = """\
# edgeops {board} boot partition (slot {slot}); https://www.raspberrypi.com/documentation/computers/config_txt.html
arm_64bit=1
kernel=kernel8.img
initramfs initrd.img followkernel
enable_uart=1
dtparam=watchdog=on
"""


def rpi_cmdline(board_doc: dict[str, Any], slot: str, console: str) -> str:
    """cmdline.txt of SLOT: the board file's fix-up values when it declares them (h-fixups:
    [[fixups]] payload = "boot", file = "cmdline.txt"), else its rootfs path."""
    values: dict[str, str] = {}
    for fx in board_doc.get("fixups", []) or []:
        if fx.get("file") == "cmdline.txt":
            values = {str(k): str(v) for k, v in fx.get("set", {}).get(slot, {}).items()}
    slots = board_doc["slots"]
    root = values.pop("root", slots[slot]["rootfs"]["path"])
    rest = " ".join(f"{k}={v}" for k, v in values.items() if k != "edgeops.slot")
    return (f"console={console},115200 root={root} rootfstype=ext4 rootwait ro "
            f"edgeops.slot={slot}{' ' + rest if rest else ''}\n")


def make_rpi_boot(b: Build, img: Path, tree: Path, work: Path, slot: str, boot_mib: int) -> None:
    doc = tomllib.loads((REPO / "boards" / f"{b.board}.toml").read_text())
    console = "serial0" if b.board != "rpi5" else str(doc["board"].get("console", "ttyAMA10"))
    kver = next(p.name for p in (tree / "lib/modules").iterdir())
    d = work / f"boot_{slot}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    shutil.copy2(tree / "boot/Image", d / "kernel8.img")
    shutil.copy2(tree / "boot/initrd.img", d / "initrd.img")
    dtbs = []
    for name in RPI_DTBS[b.board]:
        src = tree / f"usr/lib/linux-image-{kver}/broadcom" / name
        if src.exists():  # bookworm's 6.1 has no Pi 5 tree (bcm2712)
            shutil.copy2(src, d / name)
            dtbs.append(name)
    b.facts.setdefault("rpi_dtbs", dtbs)
    (d / "config.txt").write_text(RPI_CONFIG_TXT.format(board=b.board, slot=slot))
    (d / "cmdline.txt").write_text(rpi_cmdline(doc, slot, console))
    img.unlink(missing_ok=True)
    run(["mkfs.vfat", "-n", f"BOOT_{slot}", "-C", img, str(boot_mib * 1024)])
    run(["mcopy", "-s", "-i", img, *sorted(d.iterdir()), "::/"], env={"MTOOLS_SKIP_CHECK": "1"})


def make_rpi_autoboot(img: Path, work: Path) -> None:
    txt = work / "autoboot.txt"
    txt.write_text(AUTOBOOT_TXT)
    img.unlink(missing_ok=True)
    run(["mkfs.vfat", "-n", "AUTOBOOT", "-C", img, str(RPI_AUTOBOOT_MIB * 1024)])
    run(["mcopy", "-i", img, txt, "::/autoboot.txt"], env={"MTOOLS_SKIP_CHECK": "1"})


def make_rpi_disk(disk: Path, sizes: dict[str, int], images: dict[str, Path | None]) -> list[Partition]:
    """MBR as the board files say: p1 autoboot, p2/p3 boot A/B, p4 extended with p5/p6
    rootfs A/B and p7 data (sfdisk; each logical partition 1 MiB after its EBR)."""
    parts = [Partition("autoboot", RPI_AUTOBOOT_MIB, "c"), Partition("boot_A", sizes["boot"], "c"),
             Partition("boot_B", sizes["boot"], "c"), Partition("rootfs_A", sizes["rootfs"], "83"),
             Partition("rootfs_B", sizes["rootfs"], "83"), Partition("data", DATA_MIB, "83")]
    script = ["label: dos", f"label-id: {RPI_DISK_ID}"]
    at = 4  # MiB; explicit starts, else sfdisk fills the gap below p1 with the extended one
    for p in parts[:3]:
        script.append(f"start={at}MiB, size={p.size_mib}MiB, type={p.type_uuid}")
        at += p.size_mib
    script.append(f"start={at}MiB, type=5")
    script += [f"size={p.size_mib}MiB, type={p.type_uuid}" for p in parts[3:]]
    total = 4 + sum(p.size_mib for p in parts) + 8  # + an EBR (aligned: 1 MiB) per logical
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(mib(total))
    proc = subprocess.run(["sfdisk", "-q", str(disk)], input="\n".join(script) + "\n", text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"sfdisk failed: {proc.stderr.strip()}")
    table = json.loads(run(["sfdisk", "--json", disk]))["partitiontable"]
    rows = [r for r in table["partitions"] if r["type"] != "5"]
    for p, row in zip(parts, rows, strict=True):
        p.start = int(row["start"]) * 512
        src = images.get(p.name)
        if src is not None:
            run(["dd", f"if={src}", f"of={disk}", "bs=1M", f"seek={p.start}", "oflag=seek_bytes",
                 "conv=notrunc,sparse", "status=none"])
    return parts


# --- the whole build ----------------------------------------------------------------------------
def build(b: Build, *, fleet: Path | None, overlays: Sequence[Path], pip: str) -> None:
    t0 = time.monotonic()
    arch_dir = b.target.arch_dir
    work = b.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    with step(b, "host tools"):
        host_tools(b.target)
    with step(b, "base tree"):
        tar = base_tree(b, arch_dir)
    with step(b, "test PKI"):
        make_pki(b, b.out / "pki")
    with step(b, "edgeops wheel"):
        own, vendored = build_wheels(b, work, pip)
        b.facts["wheel"] = own.name
        b.facts["vendored"] = [w.name for w in vendored]
    tree = work / "rootfs"
    with step(b, "rootfs tree"):
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir()
        run(["tar", "-C", tree, "--numeric-owner", "-xpf", tar])
        stage_rootfs(b, tree, b.out / "pki", fleet, overlays, own, vendored, pip)
    factory = work / "factory"
    with step(b, "factory journal"):
        shutil.rmtree(factory, ignore_errors=True)
        (factory / "var/lib/edgeops").mkdir(parents=True)
        (factory / "var/lib/edgeops").chmod(0o700)
        run([b.edgeops, "provision", "--config", tree / "etc/edgeops/agent.toml", "--root", factory,
             "--slot", "A", "--version", b.version, "--security-version", str(b.security_version),
             "--no-tpm"])
    slot_mib = board_slot_mib(b.board)
    with step(b, "partition images"):
        used = tree_mib(tree)
        fs_mib = min(slot_mib, used + max(96, used // 4))  # room for logs; the slot may be larger
        rootfs = b.out / "rootfs.ext4"
        mkfs_ext4(rootfs, tree, fs_mib, "edgeops-root")
        data = work / "data.ext4"
        mkfs_ext4(data, factory / "var/lib/edgeops", DATA_MIB, "edgeops-data")
        b.facts.update(tree_mib=used, rootfs_fs_mib=fs_mib, slot_mib=slot_mib)
        boot_imgs: dict[str, Path | None] = {}
        if b.target.boot == "grub":
            boot_imgs["esp"] = work / "esp.vfat"
            make_esp(b, work / "esp.vfat", work)
        elif b.target.boot == "uboot":
            boot_imgs["boot"] = work / "boot.vfat"
            make_uboot_boot(work / "boot.vfat", work)
        else:
            doc = tomllib.loads((REPO / "boards" / f"{b.board}.toml").read_text())
            boot_mib = parse_size_mib(str(doc["slots"]["A"]["boot"]["min_size"]))
            make_rpi_autoboot(work / "autoboot.vfat", work)
            boot_imgs["autoboot"] = work / "autoboot.vfat"
            for s in ("A", "B"):  # B's boot partition already names B (the payload is boot.vfat)
                make_rpi_boot(b, work / f"boot_{s}.vfat", tree, work, s, boot_mib)
                boot_imgs[f"boot_{s}"] = work / f"boot_{s}.vfat"
            shutil.copy2(work / "boot_A.vfat", b.out / "boot.vfat")  # the boot payload
    disk = b.out / "disk.img"
    with step(b, "disk"):
        images = {**boot_imgs, "rootfs_A": rootfs, "rootfs_B": None, "data": data}
        if b.target.boot == "grub":
            parts = layout(slot_mib)
            make_disk(disk, parts, images)
        elif b.target.boot == "uboot":
            parts = uboot_layout(slot_mib)
            make_disk(disk, parts, images, first_mib=UBOOT_FIRST_MIB)
            b.facts["uboot_env"] = uboot_initial_env(disk, work).split()
        else:
            parts = make_rpi_disk(disk, {"boot": boot_mib, "rootfs": slot_mib}, images)
    b.timings["total"] = round(time.monotonic() - t0, 1)
    st = disk.stat()
    b.facts.update(
        disk=str(disk), disk_bytes=st.st_size, disk_allocated_bytes=st.st_blocks * 512,
        rootfs_payload=str(rootfs), rootfs_payload_bytes=rootfs.stat().st_size,
        partitions=[asdict(p) for p in parts],
        kernel=next(p.name for p in (tree / "lib/modules").iterdir()),
    )
    (b.out / "build.json").write_text(json.dumps(
        {"board": b.board, "version": b.version, "security_version": b.security_version,
         "timings_s": b.timings, **b.facts}, indent=2) + "\n")
    print(f"image: {disk}: {st.st_size / 2**30:.2f} GiB disk, "
          f"{st.st_blocks * 512 / 2**20:.0f} MiB allocated; rootfs payload "
          f"{rootfs.stat().st_size / 2**20:.0f} MiB ({used} MiB of files); "
          f"built in {b.timings['total']:.0f} s "
          f"({'warm' if b.facts.get('base_cached') else 'cold'}: base tree "
          f"{b.timings['base tree']:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--board", default="x86-64-grub")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("EDGEOPS_CACHE", "/var/cache/edgeops")) / "image")
    p.add_argument("--edgeops", default=str(REPO / ".venv/bin/edgeops"),
                   help="the build host's edgeops (keys, board config, provision)")
    p.add_argument("--pip", default=str(REPO / ".venv/bin/pip"))
    p.add_argument("--version", default="1.0", help="the factory release's version")
    p.add_argument("--security-version", type=int, default=1)
    p.add_argument("--fleet", type=Path, help="fleet.toml for the device (0600 in the image)")
    p.add_argument("--tpm-optional", action="store_true",
                   help="agent.toml [tpm] required = false, for a boot test without a TPM")
    p.add_argument("--overlay", type=Path, action="append", default=[],
                   help="a directory tree copied over the rootfs as it is (symlinks kept)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("image: must run as root (mmdebstrap --mode=root, a root-owned tree)", file=sys.stderr)
        return 2
    if a.board not in TARGETS:
        print(f"image: board {a.board!r} has no image recipe; one of: {', '.join(TARGETS)}",
              file=sys.stderr)
        return 2
    b = Build(a.board, TARGETS[a.board], a.out.resolve(), a.cache, a.edgeops, a.version,
              a.security_version, tpm_optional=a.tpm_optional)
    try:
        build(b, fleet=a.fleet, overlays=a.overlay, pip=a.pip)
    except BuildError as exc:
        print(f"image: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
