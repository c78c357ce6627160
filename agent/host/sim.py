"""Create a ``sim`` board: a device made of files that behaves like the hardware (host tooling).

    DIR/agent.toml          the agent's config (paths relative to DIR)
    DIR/slot-a.img, -b.img  rootfs slots: sparse files
    DIR/uboot.env           a redundant U-Boot environment (2 x 16 KiB), fw_printenv-readable
    DIR/keyring/root.crt    trusted roots
    DIR/state/journal.db    the agent's journal, and state/witness.json its witness
    DIR/run/                the running system: cmdline, boot_id, pids of running agents

The board's power-on behaviour and running system (``SimFirmware``, ``SimRuntime``,
``env_store``) are the adapter ``agent.adapters.simboard``, so the device shell can run on
a sim board without importing host tools; they are re-exported here for the host side.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from agent.adapters.bootloader.uboot import DEFAULT_ENV_SIZE, initial_env
from agent.adapters.journal import Journal
from agent.adapters.simboard import ENV_FILE, SimFirmware, SimRuntime, env_store
from agent.adapters.witness import WitnessFile
from agent.core import lifecycle
from agent.core.config import load
from agent.errors import ConfigError

__all__ = ["CONFIG_TEMPLATE", "ENV_FILE", "SLOTS", "SLOT_FILES", "SimFirmware", "SimRuntime",
           "env_store", "init_device", "parse_size"]

SLOTS = ("A", "B")
SLOT_FILES = {"A": "slot-a.img", "B": "slot-b.img"}

CONFIG_TEMPLATE = """\
# edgeops agent configuration for a simulated board. Paths are relative to this file.
[device]
board = "sim"
compatible = "{compatible}"
state_dir = "state"
keyring = "keyring/root.crt"
crl_dir = "keyring"

[bootloader]
backend = "uboot"
env = "{env}"
env_size = {env_size}
env_offsets = [0, {env_size}]

[runtime]
kind = "sim"
dir = "run"

[agent]
poll_interval = 5

[slots.A]
rootfs = "{slot_a}"

[slots.B]
rootfs = "{slot_b}"

[health]
deadline = 60
interval = 0.5
retries = 3

[[health.probe]]
type = "disk"
path = "/"
min_free_mb = 1
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise ConfigError(f"size {text!r} is not a number with an optional K/M/G suffix") from None


def init_device(target: Path, *, image: Path, keyring: Path, compatible: str = "edgeops-sim",
                version: str = "1.0", slot_size: int | None = None,
                now: float | None = None) -> Path:
    """Create a sim device booted and committed on slot A, which holds ``image`` as ``version``."""
    if (target / "agent.toml").exists():
        raise ConfigError(f"{target} already holds a device", hint="choose a new directory")
    try:
        image_size = image.stat().st_size
    except OSError as exc:
        raise ConfigError(f"cannot read image {image}: {exc.strerror}") from None
    size = slot_size if slot_size is not None else max(2 * image_size, 1 << 20)
    size = -(-size // (1 << 20)) * (1 << 20)
    if image_size > size:
        raise ConfigError(f"image is {image_size} bytes, larger than --slot-size {size}")
    target.mkdir(parents=True, exist_ok=True)
    for name in SLOT_FILES.values():
        with open(target / name, "wb") as f:
            f.truncate(size)
    with open(image, "rb") as src, open(target / SLOT_FILES["A"], "r+b") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    (target / "keyring").mkdir(exist_ok=True)
    shutil.copyfile(keyring, target / "keyring" / "root.crt")
    (target / "agent.toml").write_text(CONFIG_TEMPLATE.format(
        compatible=compatible, env=ENV_FILE, env_size=DEFAULT_ENV_SIZE,
        slot_a=SLOT_FILES["A"], slot_b=SLOT_FILES["B"]))
    (target / "fw_env.config").write_text(
        f"# device offset size — for fw_printenv -c (run from this directory)\n"
        f"{ENV_FILE} 0x0 {DEFAULT_ENV_SIZE:#x}\n{ENV_FILE} {DEFAULT_ENV_SIZE:#x} {DEFAULT_ENV_SIZE:#x}\n")
    store = env_store(target)
    store.write(initial_env("A"))
    store.write(initial_env("A"))  # both copies valid from the start
    journal = Journal(target / "state" / "journal.db")
    journal.follow(WitnessFile(load(target / "agent.toml").witness_path, None).write)  # both, at once
    try:
        journal.record([
            lifecycle.SlotRecord("A", "good", version, 0),
            lifecycle.SlotRecord("B", "empty"),
            lifecycle.History("provisioned", "A", version, f"sim device, image {image.name}"),
        ], now=now)
        journal.raise_trusted_time(int(time.time() if now is None else now))
    finally:
        journal.close()
    SimFirmware(target).boot()
    return target / "agent.toml"
