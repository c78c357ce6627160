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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    out: Path
    cache: Path
    edgeops: str
    version: str
    security_version: int
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
def host_tools() -> None:
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None}
                     | {pkg for path, pkg in HOST_FILES.items() if not Path(path).exists()})
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError(f"missing Debian packages: {' '.join(missing)} (run as root to "
                         f"install them, or apt-get install them)")
    print(f"image: apt-get install {' '.join(missing)}", flush=True)
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        env={"DEBIAN_FRONTEND": "noninteractive"})


# --- the base tree ------------------------------------------------------------------------------
def base_inputs(arch_dir: Path) -> list[Path]:
    return [arch_dir / "packages.txt", arch_dir / "trim.sh", arch_dir / "initramfs.conf",
            arch_dir / "initramfs.modules"]


def cache_key(arch_dir: Path) -> str:
    """Everything that shapes the base tree: packages, trim, initramfs settings, mirrors, options."""
    h = hashlib.sha256()
    for p in base_inputs(arch_dir):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update("\n".join((SUITE, *MIRRORS, *PATH_EXCLUDES)).encode())
    return h.hexdigest()[:16]


def mmdebstrap_argv(arch_dir: Path, debs: Path, tar: Path) -> list[str]:
    pkgs = ",".join(read_list(arch_dir / "packages.txt"))
    argv = ["mmdebstrap", "--mode=root", "--variant=essential", "--format=tar",
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
    key = cache_key(arch_dir)
    where = b.cache / key
    tar = where / "base.tar"
    b.facts["base_cache"] = str(tar)
    if tar.exists():
        print(f"image: base tree from the cache ({tar})", flush=True)
        b.facts["base_cached"] = True
        return tar
    b.facts["base_cached"] = False
    debs = b.cache / f"debs-{SUITE}-amd64"
    debs.mkdir(parents=True, exist_ok=True)
    where.mkdir(parents=True, exist_ok=True)
    part = where / "base.tar.part"
    run(mmdebstrap_argv(arch_dir, debs, part))
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
    wheels = work / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="edgeops-src-") as tmp:
        clean_copy(Path(tmp))
        run([pip, "wheel", "-q", "--no-deps", "-w", wheels, tmp])
    own = next(wheels.glob("edgeops-*.whl"))
    vendor = b.cache / "wheels"
    vendor.mkdir(parents=True, exist_ok=True)
    tpm = sorted(vendor.glob(f"tpm2_pytss-{TPM2_PYTSS}-*.whl"))
    if not tpm:
        # built against the build host's libtss2 for its python3: the image's are the same
        # Debian release's (bookworm: python 3.11, tpm2-tss 3.2.1)
        run([pip, "wheel", "-q", "--no-deps", "-w", vendor, f"tpm2-pytss=={TPM2_PYTSS}"])
        tpm = sorted(vendor.glob(f"tpm2_pytss-{TPM2_PYTSS}-*.whl"))
    out = [tpm[-1]]
    for name, version in WHEELS.items():
        have = sorted(vendor.glob(f"{name}-{version}-*.whl"))
        if not have:  # cryptography's is manylinux (abi3, glibc 2.34: bookworm has 2.36)
            run([pip, "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", vendor,
                 f"{name}=={version}"])
            have = sorted(vendor.glob(f"{name}-{version}-*.whl"))
        out.append(have[-1])
    return own, out


CONSOLE_SCRIPT = """#!/usr/bin/python3
# installed by image/build.py from the edgeops wheel (console_scripts: edgeops)
import sys
from agent.cli.main import run
sys.exit(run())
"""


def install_wheel(wheel: Path, tree: Path, site: str, *, scripts: bool, pip: str) -> None:
    """Unpack a wheel into TREE with pip --target, then move its parts where Debian's python3
    looks: the packages into SITE, console scripts to /usr/bin, data files to /usr/share."""
    with tempfile.TemporaryDirectory(prefix="edgeops-wheel-") as tmp:
        run([pip, "install", "-q", "--no-deps", "--no-compile", "--target", tmp, wheel])
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
SLIM_PATHS = (
    "usr/share/perl", "usr/lib/x86_64-linux-gnu/perl", "usr/bin/perl5.*",
    "usr/lib/x86_64-linux-gnu/libperl.so.*",
    "usr/lib/udev/hwdb.bin", "usr/lib/udev/hwdb.d", "etc/udev/hwdb.bin",
    "usr/lib/x86_64-linux-gnu/gconv", "var/cache/apt/*.bin", "var/cache/debconf/*-old",
    "usr/lib/python3.11/test", "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/turtledemo",
)


def slim(tree: Path) -> int:
    """Remove SLIM_PATHS from TREE; returns the bytes removed."""
    gone = 0
    for pattern in SLIM_PATHS:
        for path in tree.glob(pattern):
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


def stage_rootfs(b: Build, tree: Path, pki: Path, fleet: Path | None, overlays: Sequence[Path],
                 own_wheel: Path, vendored: Sequence[Path], pip: str) -> None:
    install_wheel(own_wheel, tree, "/usr/lib/python3/dist-packages", scripts=True, pip=pip)
    for wheel in vendored:
        install_wheel(wheel, tree, "/usr/lib/edgeops/vendor", scripts=False, pip=pip)
    (tree / "usr/lib/python3/dist-packages/edgeops-vendor.pth").write_text("/usr/lib/edgeops/vendor\n")
    argv = [HERE / "stage-rootfs.sh", "--rootfs", tree, "--board", b.board,
            "--keyring", pki / "root" / "root.crt", "--edgeops", b.edgeops]
    if fleet is not None:
        argv += ["--fleet", fleet]
    run(argv)
    (tree / "etc/fstab").write_text(FSTAB)
    (tree / "var/lib/edgeops").mkdir(parents=True, exist_ok=True)
    (tree / "boot/efi").mkdir(parents=True, exist_ok=True)
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
    b.facts["slimmed_bytes"] = slim(tree)
    # Python's bytecode now, not at the device's first start (the CLI is slow under TCG)
    run(["chroot", tree, "python3", "-m", "compileall", "-q", "-j", "0",
         "/usr/lib/python3/dist-packages/agent", "/usr/lib/edgeops/vendor"])
    run(["mount", "-t", "proc", "proc", tree / "proc"])  # psutil reads /proc at import
    try:
        b.facts["edgeops_in_image"] = run(["chroot", tree, "edgeops", "--version"]).strip()
        b.facts["python_packages"] = run(["chroot", tree, "python3", "-c", IMPORT_CHECK]).strip()
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


def sfdisk_script(parts: Sequence[Partition]) -> str:
    lines = ["label: gpt", "first-lba: 2048"]
    lines += [f'size={p.size_mib}MiB, type={p.type_uuid}, name="{p.name}"' for p in parts]
    return "\n".join(lines) + "\n"


def make_disk(disk: Path, parts: list[Partition], images: dict[str, Path | None]) -> None:
    total = ALIGN_MIB + sum(p.size_mib for p in parts) + 1  # + the backup GPT
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(mib(total))
    proc = subprocess.run(["sfdisk", "-q", str(disk)], input=sfdisk_script(parts), text=True,
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
def build(b: Build, *, fleet: Path | None, overlays: Sequence[Path], pip: str) -> None:
    t0 = time.monotonic()
    if b.board != "x86-64-grub":
        raise BuildError(f"board {b.board}: only x86-64-grub is built so far (see image/README.md)")
    arch_dir = HERE / "x86-64"
    work = b.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    with step(b, "host tools"):
        host_tools()
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
        esp = work / "esp.vfat"
        make_esp(b, esp, work)
        b.facts.update(tree_mib=used, rootfs_fs_mib=fs_mib, slot_mib=slot_mib)
    parts = layout(slot_mib)
    disk = b.out / "disk.img"
    with step(b, "disk"):
        make_disk(disk, parts, {"esp": esp, "rootfs_A": rootfs, "rootfs_B": None, "data": data})
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
    p.add_argument("--overlay", type=Path, action="append", default=[],
                   help="a directory tree copied over the rootfs as it is (symlinks kept)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("image: must run as root (mmdebstrap --mode=root, a root-owned tree)", file=sys.stderr)
        return 2
    b = Build(a.board, a.out.resolve(), a.cache, a.edgeops, a.version, a.security_version)
    try:
        build(b, fleet=a.fleet, overlays=a.overlay, pip=a.pip)
    except BuildError as exc:
        print(f"image: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
