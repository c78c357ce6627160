#!/usr/bin/env python3
"""`make demo`: the whole update life cycle on a simulated board, narrated.

Every step runs the real `edgeops` command (shown with a `$`), in a temporary
directory that is removed at the end (set KEEP=1 to keep it).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TTY = sys.stdout.isatty()
BOLD, DIM, GREEN, RED, RESET = (("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m") if TTY
                                else ("", "", "", "", ""))
EDGEOPS = [str(Path(sys.executable).parent / "edgeops")]
if not Path(EDGEOPS[0]).exists():
    EDGEOPS = [sys.executable, "-m", "agent.cli"]


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def run(*args: str | Path, expect: int = 0, show: bool = True, live: bool = False) -> str:
    cmd = [*EDGEOPS, *map(str, args)]
    print(f"{DIM}$ edgeops {' '.join(shlex.quote(str(a)) for a in args)}{RESET}", flush=True)
    if live:  # let the progress bar draw on the terminal
        rc = subprocess.call(cmd, cwd=WORK)
        out = ""
    else:
        proc = subprocess.run(cmd, cwd=WORK, capture_output=True, text=True)
        rc, out = proc.returncode, proc.stdout
        if show and out.strip():
            print("  " + out.rstrip().replace("\n", "\n  "))
        if proc.stderr.strip():
            colour = RED if rc else DIM
            print(f"  {colour}{proc.stderr.rstrip()}{RESET}")
    if rc != expect:
        raise SystemExit(f"demo: expected exit {expect}, got {rc}")
    if expect:
        print(f"  {GREEN}refused as expected (exit {rc}){RESET}")
    return out


def image(path: Path, version: str, size: int = 6 << 20) -> Path:
    """A stand-in rootfs: deterministic bytes, partly compressible."""
    block, out = hashlib.sha256(version.encode()).digest(), bytearray()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64 + bytes(2048)
    path.write_bytes(bytes(out[:size]))
    return path


def main() -> int:
    start = time.monotonic()
    cfg = ("--config", "device/agent.toml")
    say("1. Keys: an offline root certifies a short-lived signer (Ed25519, X.509)")
    run("keys", "init-root", "--out", "root")
    run("keys", "issue-signer", "--root", "root", "--out", "signer", "--days", "90")

    say("2. A simulated device: slots A/B, a U-Boot environment, committed on v1.0")
    image(WORK / "v1.img", "1.0")
    run("sim", "init", "device", "--image", "v1.img", "--keyring", "root/root.crt",
        "--compatible", "demo-board", "--version", "1.0")
    run("status", *cfg)

    sign = ("--key", "signer/signer.key", "--cert", "signer/signer.crt", "--compatible", "demo-board")
    say("3. Release v2.0: build a signed, zstd-compressed bundle and install it as a stream")
    image(WORK / "v2.img", "2.0")
    run("bundle", "create", *sign, "--version", "2.0", "--security-version", "1",
        "--payload", "rootfs=v2.img", "--compress", "zstd", "-o", "v2.bundle")
    run("install", "v2.bundle", *cfg, live=True)
    run("status", *cfg)

    say("4. Reboot: the bootloader tries slot B once; the agent runs the health checks and commits")
    run("sim", "reboot", *cfg)
    run("agent", "--once", *cfg)
    run("status", *cfg)

    say("5. Release v3.0 ships an app that never comes up: its health check fails")
    image(WORK / "v3.img", "3.0")
    (WORK / "v3-health.toml").write_text(
        'deadline = 10\ninterval = 0.2\nretries = 3\n\n[[probe]]\ntype = "tcp"\n'
        'host = "127.0.0.1"\nport = 9\nname = "v3 app listens on :9"\n')
    run("bundle", "create", *sign, "--version", "3.0", "--security-version", "2",
        "--payload", "rootfs=v3.img", "--health", "v3-health.toml", "-o", "v3.bundle")
    run("install", "v3.bundle", *cfg, live=True)
    run("sim", "reboot", *cfg)
    run("agent", "--once", *cfg)
    say("   ... the agent marked v3.0 bad and rebooted; after the reboot it notes the revert")
    run("agent", "--once", *cfg)
    run("status", *cfg)

    say("6. Attacks: a tampered v3.0 and a re-signed v1.0 below the security floor")
    data = bytearray((WORK / "v3.bundle").read_bytes())
    data[len(data) // 2] ^= 0x40
    (WORK / "v3-tampered.bundle").write_bytes(bytes(data))
    run("install", "v3-tampered.bundle", *cfg, expect=15)
    run("bundle", "create", *sign, "--version", "1.0", "--security-version", "0",
        "--payload", "rootfs=v1.img", "-o", "v1-resigned.bundle")
    run("install", "v1-resigned.bundle", *cfg, expect=12)

    say("7. Where the device stands")
    run("history", *cfg)
    run("status", *cfg)
    print(f"\n{GREEN}demo finished in {time.monotonic() - start:.1f} s{RESET} "
          f"(work dir {WORK}{'' if KEEP else ', removed'})")
    return 0


if __name__ == "__main__":
    KEEP = os.environ.get("KEEP") == "1"
    WORK = Path(tempfile.mkdtemp(prefix="edgeops-demo-"))
    try:
        sys.exit(main())
    finally:
        if not KEEP:
            shutil.rmtree(WORK, ignore_errors=True)
