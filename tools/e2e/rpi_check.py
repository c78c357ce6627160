#!/usr/bin/env python3
"""A Raspberry Pi image checked structurally, since it cannot boot here (``make image-check BOARD=rpi4``).

Reads OUT/disk.img from ``make image BOARD=rpi4`` (or rpi5, cm4) with Debian's tools only
(sfdisk --json, mtools, debugfs), never mounting it, and checks:

  partitions  MBR as the board file's header says: p1 FAT autoboot, p2/p3 FAT boot A/B,
              p4 extended holding p5/p6 rootfs A/B (ext4) and p7 data; every slot at least
              the board file's min_size
  autoboot    p1's autoboot.txt: tryboot_a_b=1, [all] boot_partition=2, [tryboot] 3
              (docs/boards.md), under 512 bytes
  per slot    p2's and p3's cmdline.txt: one line, root= the slot's own rootfs as the board
              file names it (or its [[fixups]] value) and edgeops.slot=A / B; config.txt,
              kernel8.img (an uncompressed arm64 Image) and initrd.img present
  rootfs A    /etc/fstab mounts the data partition at the agent's state_dir, and
              'edgeops board check --root' passes on a replica of the device built from the
              disk's own partitions (dev/mmcblk0pN, /boot/autoboot, /proc/cmdline from
              cmdline.txt of A, /proc/mounts from the image's fstab)

Prints one line per check and exits 1 on the first failure (with what was found).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
AUTOBOOT = {"all": {"tryboot_a_b": "1", "boot_partition": "2"}, "tryboot": {"boot_partition": "3"}}
ARM64_IMAGE_MAGIC = b"ARM\x64"  # at offset 56 of an arm64 Image (Documentation/arch/arm64/booting.rst)


class CheckFailure(Exception):
    pass


def ok(what: str) -> None:
    print(f"image-check: ok: {what}", flush=True)


def sh(argv: list[str], **kw: Any) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, **kw)
    if proc.returncode != 0:
        raise CheckFailure(f"{' '.join(argv[:3])}: {proc.stderr.strip()[-500:]}")
    return str(proc.stdout)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def partitions(disk: Path) -> list[dict[str, Any]]:
    table = json.loads(sh(["sfdisk", "--json", str(disk)]))["partitiontable"]
    if table.get("label") != "dos":
        raise CheckFailure(f"partition table is {table.get('label')}, the Pi's boot ROM reads MBR (dos)")
    return list(table["partitions"])


def check_partitions(disk: Path, board: dict[str, Any]) -> dict[int, tuple[int, int]]:
    rows = partitions(disk)
    got = {int(re.sub(r".*?(\d+)$", r"\1", str(r["node"]))):
           (int(r["start"]) * 512, int(r["size"]) * 512, str(r["type"])) for r in rows}
    want = {1: "c", 2: "c", 3: "c", 4: "5", 5: "83", 6: "83", 7: "83"}
    if {n: t for n, (_, _, t) in got.items()} != want:
        found = sorted((n, t) for n, (_, _, t) in got.items())
        raise CheckFailure(f"partitions {found}, want {sorted(want.items())}")
    slots = board["slots"]
    for slot in ("A", "B"):
        for cls in ("boot", "rootfs"):
            spec = slots[slot][cls]
            n = int(str(spec["path"]).rsplit("p", 1)[1])
            if got[n][1] < parse_size(str(spec["min_size"])):
                raise CheckFailure(f"slot {slot} {cls} (p{n}) holds {got[n][1]} bytes, the board needs "
                                   f"{spec['min_size']}")
    ok("MBR: p1 autoboot, p2/p3 boot A/B (FAT), p4 extended, p5/p6 rootfs A/B, p7 data; "
       "slots at least the board's min_size")
    return {n: (s, z) for n, (s, z, _) in got.items()}


def fat_read(disk: Path, offset: int, name: str) -> bytes:
    with tempfile.NamedTemporaryFile() as tmp:
        sh(["mcopy", "-n", "-o", "-i", f"{disk}@@{offset}", f"::/{name}", tmp.name])
        return Path(tmp.name).read_bytes()


def fat_list(disk: Path, offset: int) -> set[str]:
    out = sh(["mdir", "-b", "-i", f"{disk}@@{offset}", "::/"])
    return {ln.rstrip("/").rsplit("/", 1)[-1] for ln in out.splitlines() if ln.strip()}


def parse_autoboot(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    cur = "all"
    for ln in text.splitlines():
        ln = ln.strip()
        if ln.startswith("[") and ln.endswith("]"):
            cur = ln[1:-1]
        elif "=" in ln:
            k, v = ln.split("=", 1)
            sections.setdefault(cur, {})[k.strip()] = v.strip()
    return sections


def check_autoboot(disk: Path, parts: dict[int, tuple[int, int]]) -> bytes:
    raw = fat_read(disk, parts[1][0], "autoboot.txt")
    if len(raw) > 512:
        raise CheckFailure(f"autoboot.txt is {len(raw)} bytes; the firmware reads 512 at most")
    if parse_autoboot(raw.decode()) != AUTOBOOT:
        raise CheckFailure(f"autoboot.txt says {raw.decode()!r}, want tryboot_a_b=1, boot_partition=2, "
                           "[tryboot] boot_partition=3")
    ok("p1 autoboot.txt: tryboot_a_b=1, boot_partition=2, [tryboot] boot_partition=3")
    return raw


def cmdline_want(board: dict[str, Any], slot: str) -> dict[str, str]:
    want = {"root": str(board["slots"][slot]["rootfs"]["path"]), "edgeops.slot": slot}
    for fx in board.get("fixups", []) or []:
        if fx.get("file") == "cmdline.txt":
            want.update({str(k): str(v) for k, v in fx.get("set", {}).get(slot, {}).items()})
    return want


def check_boot_partitions(disk: Path, parts: dict[int, tuple[int, int]], board: dict[str, Any]
                          ) -> dict[str, str]:
    cmdlines = {}
    for slot, n in (("A", 2), ("B", 3)):
        files = fat_list(disk, parts[n][0])
        missing = {"cmdline.txt", "config.txt", "kernel8.img", "initrd.img"} - files
        if missing:
            raise CheckFailure(f"boot partition {slot} (p{n}) lacks {', '.join(sorted(missing))}")
        text = fat_read(disk, parts[n][0], "cmdline.txt").decode()
        if text.count("\n") > 1 or not text.strip():
            raise CheckFailure(f"p{n} cmdline.txt must be one line, is {text!r}")
        args = dict(a.split("=", 1) for a in text.split() if "=" in a)
        for key, value in cmdline_want(board, slot).items():
            if args.get(key) != value:
                raise CheckFailure(f"p{n} cmdline.txt has {key}={args.get(key)}, slot {slot} needs {value}")
        with tempfile.NamedTemporaryFile() as tmp:
            sh(["mcopy", "-n", "-o", "-i", f"{disk}@@{parts[n][0]}", "::/kernel8.img", tmp.name])
            with open(tmp.name, "rb") as f:
                head = f.read(64)
        if head[56:60] != ARM64_IMAGE_MAGIC:
            raise CheckFailure(f"p{n} kernel8.img is no uncompressed arm64 Image")
        cmdlines[slot] = text.strip()
        dtbs = sorted(f for f in files if f.endswith(".dtb"))
        trees = ", ".join(dtbs) if dtbs else "no device tree (none for this board in Debian's 6.1)"
        ok(f"p{n} boot {slot}: cmdline.txt '{text.strip()}'; config.txt, kernel8.img (arm64 Image), "
           f"initrd.img, {trees}")
    return cmdlines


def extract(disk: Path, start: int, size: int, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    sh(["dd", f"if={disk}", f"of={dest}", "bs=1M", f"skip={start}", f"count={size}",
        "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none"])


def debugfs_cat(img: Path, path: str) -> str:
    return sh(["debugfs", "-R", f"cat {path}", str(img)])


def check_board(disk: Path, parts: dict[int, tuple[int, int]], board_name: str, cmdline_a: str,
                autoboot: bytes, edgeops: str) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeops-rpi-check-") as tmp:
        root = Path(tmp)
        for n, (start, size) in parts.items():
            if n != 4:
                extract(disk, start, size, root / f"dev/mmcblk0p{n}")
        fstab = debugfs_cat(root / "dev/mmcblk0p5", "/etc/fstab")
        agent_toml = debugfs_cat(root / "dev/mmcblk0p5", "/etc/edgeops/agent.toml")
        (root / "etc/edgeops").mkdir(parents=True)
        (root / "etc/edgeops/agent.toml").write_text(agent_toml)
        mounts = [ln.split()[:3] for ln in fstab.splitlines() if ln.strip() and not ln.startswith("#")]
        data_mount = [m for m in mounts if m[1] == "/var/lib/edgeops"]
        if not data_mount or data_mount[0][0] != "/dev/mmcblk0p7":
            raise CheckFailure(f"rootfs A's fstab does not mount p7 at /var/lib/edgeops: {mounts}")
        ok("rootfs A: /etc/fstab mounts the data partition p7 at /var/lib/edgeops")
        (root / "proc").mkdir()
        (root / "proc/cmdline").write_text(cmdline_a + "\n")
        (root / "proc/mounts").write_text("".join(
            f"{src} {pt} {typ} rw 0 0\n" for src, pt, typ in [["/dev/root", "/", "ext4"], *mounts[1:]]))
        (root / "boot/autoboot").mkdir(parents=True)
        (root / "boot/autoboot/autoboot.txt").write_bytes(autoboot)
        (root / "dev/watchdog").touch()  # the SoC's, which a replica cannot have
        proc = subprocess.run([edgeops, "board", "check", "--board", board_name, "--config",
                               str(root / "etc/edgeops/agent.toml"), "--root", str(root)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CheckFailure(f"edgeops board check --root: exit {proc.returncode}\n"
                               f"{proc.stdout}{proc.stderr}")
        ok(f"edgeops board check --root (a replica from the disk's partitions): "
           f"{proc.stdout.strip().splitlines()[-1]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--board", default="rpi4")
    p.add_argument("--image", type=Path, help="the disk image (default build/image/BOARD/disk.img)")
    p.add_argument("--edgeops", default=str(REPO / ".venv/bin/edgeops"))
    a = p.parse_args(argv)
    disk = a.image or REPO / "build/image" / a.board / "disk.img"
    for tool, pkg in (("sfdisk", "fdisk"), ("mcopy", "mtools"), ("debugfs", "e2fsprogs")):
        if shutil.which(tool) is None:
            print(f"image-check: {tool} missing; apt-get install {pkg}", file=sys.stderr)
            return 2
    if not disk.exists():
        print(f"image-check: {disk} not found; run 'make image BOARD={a.board}' first", file=sys.stderr)
        return 2
    board = tomllib.loads((REPO / "boards" / f"{a.board}.toml").read_text())
    try:
        parts = check_partitions(disk, board)
        autoboot = check_autoboot(disk, parts)
        cmdlines = check_boot_partitions(disk, parts, board)
        check_board(disk, parts, a.board, cmdlines["A"], autoboot, a.edgeops)
    except CheckFailure as exc:
        print(f"image-check: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"image-check: {disk}: the {a.board} image is as the board file says")
    return 0


if __name__ == "__main__":
    sys.exit(main())
