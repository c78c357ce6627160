#!/usr/bin/env python3
"""The uboot-arm64 image booted in QEMU's arm64 virt machine: a smoke run (``make e2e BOARD=uboot-arm64``).

Not part of ``make test`` or .ci/run (an emulated arm64 CPU costs minutes per boot). One QEMU
process (guest resets stay inside it), TCG with ``-cpu max,pauth-impdef=on`` (QEMU's own
pointer-authentication algorithm is the slow part of emulating ``max``), Debian's U-Boot for
QEMU (u-boot-qemu: /usr/lib/u-boot/qemu_arm64/u-boot.bin) as ``-bios``, the disk as
virtio-blk, no network. The console (PL011, ttyAMA0) and the markers
(tools/e2e/arm64-guest: a unit writing to the virtio console hvc0) go to files.

  boot      U-Boot runs boards/uboot/boot-virt.cmd from the disk's first partition: slot A,
            Image + initrd, U-Boot's own device tree; the kernel reaches multi-user, the
            agent starts and 'edgeops status' answers (its output is in the transcript)
  fallback  (--fallback) the agent's own uboot backend, on the host, arms a trial of slot B
            in the disk's environment (B holds no kernel: the factory image leaves it empty).
            U-Boot counts the trial's boot (bootcount 1), finds no kernel and resets; the
            next boot is over the limit and falls back to A by U-Boot alone. Afterwards
            libubootenv's fw_printenv reads EO_SLOT=A, upgrade_available=0 from the disk.

Writes OUT/transcript.log (both consoles of every boot), OUT/timings.md and OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UBOOT_BIN = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
GUEST = REPO / "tools/e2e/arm64-guest"
ENV_COPIES = (0x3F8000, 0x3FC000)
ENV_SIZE = 0x4000


class SmokeFailure(Exception):
    pass


def fw_env_config(disk: Path, work: Path) -> Path:
    """The image's /etc/fw_env.config with the disk file in place of /dev/vda."""
    cfg = work / "fw_env.config"
    text = (REPO / "image/uboot-arm64/fw_env.config").read_text().replace("/dev/vda", str(disk))
    cfg.write_text(text)
    return cfg


def fw_printenv(cfg: Path) -> dict[str, str]:
    out = subprocess.run(["fw_printenv", "-c", str(cfg)], capture_output=True, text=True, check=True)
    return dict(ln.split("=", 1) for ln in out.stdout.splitlines() if "=" in ln)


class Arm64Machine:
    def __init__(self, disk: Path, work: Path) -> None:
        self.disk, self.work = disk, work
        self.console = work / "console.log"
        self.markers = work / "markers.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = 0.0

    def argv(self) -> list[str]:
        return ["qemu-system-aarch64", "-machine", "virt", "-accel", "tcg,thread=multi",
                "-cpu", "max,pauth-impdef=on", "-smp", "2", "-m", "1024",
                "-bios", str(UBOOT_BIN), "-display", "none", "-monitor", "none",
                "-serial", f"file:{self.console}",
                "-device", "virtio-serial-pci", "-chardev", f"file,id=mk,path={self.markers}",
                "-device", "virtconsole,chardev=mk",
                "-drive", f"if=none,id=disk0,file={self.disk},format=raw,cache=unsafe",
                "-device", "virtio-blk-pci,drive=disk0", "-nic", "none"]

    def power_on(self) -> None:
        for f in (self.console, self.markers):
            f.write_bytes(b"")
        self.t0 = time.monotonic()
        with open(self.work / "qemu.stderr", "wb") as err:  # the child keeps its own copy
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)

    def power_off(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def wait(self, pattern: str, timeout: float, *, where: str = "markers", after: int = 0
             ) -> tuple[re.Match[str], float, int]:
        """The first match of PATTERN past character AFTER of a log, with when it was seen."""
        path = self.markers if where == "markers" else self.console
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = path.read_text(errors="replace")
            m = rx.search(text, after)
            if m:
                return m, self.elapsed(), m.end()
            if self.proc is not None and self.proc.poll() is not None:
                raise SmokeFailure(f"QEMU exited ({self.proc.returncode}) before {pattern!r}:\n"
                                   f"{(self.work / 'qemu.stderr').read_text()[-2000:]}")
            time.sleep(0.5)
        tail = "\n".join(self.console.read_text(errors="replace").splitlines()[-25:])
        raise SmokeFailure(f"no {pattern!r} in {where} within {timeout:.0f} s; console:\n{tail}")


def build_image(out: Path, cache: str) -> Path:
    argv = [sys.executable, str(REPO / "image/build.py"), "--board", "uboot-arm64", "--out",
            str(out), "--overlay", str(GUEST),
            # the arm64 image has no tpm2-pytss (PyPI has no aarch64 wheel; building it needs
            # an arm64 compiler under qemu-user), and the board requires a TPM: without this
            # 'edgeops status' refuses to run (exit 3)
            "--tpm-optional"]
    subprocess.run(argv, check=True, env={**os.environ, "EDGEOPS_CACHE": cache})
    return out / "disk.img"


def arm_trial(cfg: Path, slot: str) -> None:
    """The agent's uboot backend writes the trial, exactly as on the device."""
    sys.path.insert(0, str(REPO))
    from agent.adapters.bootloader import fwenv, uboot

    uboot.UBootBootcount(fwenv.load(cfg), ("A", "B")).set_trial(slot)


def smoke(args: argparse.Namespace) -> dict[str, object]:
    out: Path = args.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"board": "uboot-arm64"}
    rows: list[tuple[str, float]] = []
    t = time.monotonic()
    image = args.image
    if image is None:
        image = build_image(out / "image", args.cache)
        rows.append(("image build (make image BOARD=uboot-arm64, with tools/e2e/arm64-guest)",
                     time.monotonic() - t))
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    cfg = fw_env_config(disk, work)
    env0 = fw_printenv(cfg)
    if env0.get("EO_SLOT") != "A" or env0.get("upgrade_available") != "0":
        raise SmokeFailure(f"the image's environment is not the factory one: {env0}")
    result["factory_env"] = env0
    m = Arm64Machine(disk, work)
    transcript = out / "transcript.log"
    try:
        m.power_on()
        _, t_uboot, pos = m.wait(r"edgeops: booting slot (\w)", 120, where="console")
        rows.append(("power-on -> U-Boot's boot.scr picks a slot", t_uboot))
        _, t_kernel, _ = m.wait(r"Starting kernel", 120, where="console", after=pos)
        rows.append(("power-on -> U-Boot starts the kernel (Image + initrd loaded)", t_kernel))
        booted, t_booted, mpos = m.wait(r"EDGEOPS-ARM64 booted slot=(\w+) uptime=([\d.]+)", 600)
        if booted.group(1) != "A":
            raise SmokeFailure(f"the factory image booted slot {booted.group(1)}, not A")
        rows.append(("power-on -> multi-user (markers unit runs)", t_booted))
        agent, t_agent, mpos = m.wait(r"EDGEOPS-ARM64 agent=(\w+)", 300, after=mpos)
        rows.append((f"power-on -> edgeops-agent {agent.group(1)}", t_agent))
        status, t_status, mpos = m.wait(r"EDGEOPS-ARM64 status rc=(\d+)", 300, after=mpos)
        rows.append(("power-on -> 'edgeops status' answered", t_status))
        lines = [ln.split("| ", 1)[1] for ln in m.markers.read_text(errors="replace").splitlines()
                 if ln.startswith("EDGEOPS-ARM64 status| ")]
        guest_env = dict(ln.split("| ", 1)[1].split("=", 1) for ln in
                         m.markers.read_text(errors="replace").splitlines()
                         if ln.startswith("EDGEOPS-ARM64 fw_printenv| ") and "=" in ln)
        result.update(booted_slot=booted.group(1), agent=agent.group(1),
                      status_rc=int(status.group(1)), status=lines, guest_fw_printenv=guest_env)
        if guest_env.get("EO_SLOT") != "A":
            raise SmokeFailure(f"fw_printenv on the device read {guest_env}, not the factory env")
        if agent.group(1) != "active" or status.group(1) != "0":
            raise SmokeFailure(f"agent {agent.group(1)}, 'edgeops status' exit {status.group(1)}:\n"
                               + "\n".join(lines))
        m.power_off()
        save_transcript(m, transcript, "boot 1: factory slot A")
        if args.fallback:
            arm_trial(cfg, "B")
            result["armed_env"] = fw_printenv(cfg)
            m.power_on()
            _, t1, pos = m.wait(r"edgeops: booting slot B \(partition 3, upgrade_available=1, "
                                r"bootcount=1\)", 180, where="console")
            rows.append(("trial of B (empty slot): U-Boot counts its boot", t1))
            _, t2, pos = m.wait(r"falling back to A", 300, where="console", after=pos)
            rows.append(("-> no kernel, reset; next boot over the limit: U-Boot falls back to A", t2))
            again, t3, _ = m.wait(r"EDGEOPS-ARM64 booted slot=(\w+)", 600)
            rows.append((f"-> multi-user on slot {again.group(1)}", t3))
            m.power_off()
            save_transcript(m, transcript, "boot 2: trial of B without a kernel, fallback", append=True)
            env = fw_printenv(cfg)
            result["after_fallback_env"] = env
            if again.group(1) != "A" or env.get("EO_SLOT") != "A" or env.get("upgrade_available") != "0":
                raise SmokeFailure(f"after the fallback: slot {again.group(1)}, environment {env}")
        result["passed"] = True
    finally:
        m.power_off()
        # the steps that were reached, also when one failed
        result["timings_s"] = {name: round(s, 1) for name, s in rows}
        (out / "timings.md").write_text("| step | s |\n|---|---|\n" + "".join(
            f"| {name} | {s:.1f} |\n" for name, s in rows))
        for name, s in rows:
            print(f"e2e-arm64: {s:7.1f} s  {name}", flush=True)
    return result


def save_transcript(m: Arm64Machine, transcript: Path, title: str, *, append: bool = False) -> None:
    with open(transcript, "a" if append else "w") as f:
        for label, path in (("ttyAMA0 console", m.console), ("hvc0 markers", m.markers)):
            f.write(f"===== {title}: {label} =====\n{path.read_text(errors='replace')}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=REPO / "build/e2e-arm64")
    p.add_argument("--image", type=Path, help="a disk.img built with tools/e2e/arm64-guest")
    p.add_argument("--cache", default=os.environ.get("EDGEOPS_CACHE", "/var/cache/edgeops"))
    p.add_argument("--fallback", action="store_true", help="also the bootcount fallback")
    a = p.parse_args(argv)
    for tool, pkg in (("qemu-system-aarch64", "qemu-system-arm"), ("fw_printenv", "libubootenv-tool")):
        if shutil.which(tool) is None:
            print(f"e2e-arm64: {tool} missing; apt-get install {pkg}", file=sys.stderr)
            return 2
    if not UBOOT_BIN.exists():
        print(f"e2e-arm64: {UBOOT_BIN} missing; apt-get install u-boot-qemu", file=sys.stderr)
        return 2
    a.out = a.out.resolve()  # fw_env.config names the disk by an absolute path
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        result = smoke(a)
    except (SmokeFailure, subprocess.CalledProcessError) as exc:
        print(f"e2e-arm64: FAILED: {exc}", file=sys.stderr)
        (a.out / "result.json").write_text(json.dumps({"passed": False, "error": str(exc)}, indent=2))
        return 1
    (a.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"e2e-arm64: passed; {a.out}/transcript.log, timings.md, result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
