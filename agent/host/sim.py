"""The ``sim`` board: a device made of files that behaves like the hardware.

    DIR/agent.toml          the agent's config (paths relative to DIR)
    DIR/slot-a.img, -b.img  rootfs slots: sparse files
    DIR/uboot.env           a redundant U-Boot environment (2 x 16 KiB), fw_printenv-readable
    DIR/keyring/root.crt    trusted roots
    DIR/state/journal.db    the agent's journal
    DIR/run/                the running system: cmdline, boot_id, pids of running agents

``SimFirmware.boot`` is what U-Boot does at power-on with the bootcount scheme
(agent.adapters.bootloader.uboot): count the boot of a trial slot, fall back when the
count passes bootlimit, and "start the kernel" by writing run/cmdline. A reboot
first stops the agents that run on the device (SIGTERM, then they are gone); a
power cut kills them with SIGKILL at whatever instruction they were on.
What it does not model: losing writes still in the page cache (the agent
fsyncs everything it relies on, and the env is redundant for torn writes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

from agent.adapters.bootloader.envfile import EnvStore, Location
from agent.adapters.bootloader.uboot import DEFAULT_ENV_SIZE, initial_env
from agent.adapters.journal import Journal
from agent.core import lifecycle
from agent.core.config import AgentConfig
from agent.errors import ConfigError

SLOTS = ("A", "B")
SLOT_FILES = {"A": "slot-a.img", "B": "slot-b.img"}
ENV_FILE = "uboot.env"

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


def env_store(base: Path) -> EnvStore:
    path = base / ENV_FILE
    return EnvStore([Location(path, 0), Location(path, DEFAULT_ENV_SIZE)], DEFAULT_ENV_SIZE)


class SimFirmware:
    """Power-on behaviour of the simulated board."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.run = base / "run"
        self.env = env_store(base)

    def boot(self) -> str:
        env = self.env.read()
        if env.get("upgrade_available") == "1":
            count = int(env.get("bootcount", "0")) + 1
            env["bootcount"] = str(count)
            if count > int(env.get("bootlimit", "1")):
                # altbootcmd
                env.update(EO_SLOT=env["EO_ALT"], upgrade_available="0", bootcount="0")
            self.env.write(env)
        slot = env["EO_SLOT"]
        self.run.mkdir(exist_ok=True)
        _atomic_write(self.run / "boot_id", f"{uuid.uuid4()}\n")
        _atomic_write(self.run / "cmdline", f"root=/dev/sim{slot} ro edgeops.slot={slot}\n")
        return slot

    def _stop_agents(self, sig: int) -> None:
        pids = self.run / "pids"
        if not pids.is_dir():
            return
        for pidfile in pids.iterdir():
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text()), sig)
            pidfile.unlink(missing_ok=True)
        if sig == signal.SIGTERM:
            time.sleep(0.05)

    def reboot(self) -> str:
        self._stop_agents(signal.SIGTERM)
        return self.boot()

    def power_cut(self) -> str:
        self._stop_agents(signal.SIGKILL)
        return self.boot()


class SimRuntime:
    def __init__(self, config: AgentConfig) -> None:
        if config.runtime_dir is None:
            raise ConfigError(f"{config.path}: [runtime] dir is required for the sim board")
        self.dir = config.runtime_dir
        self.base = config.base
        self.slots = tuple(config.slots)

    def booted_slot(self) -> str:
        from agent.adapters.runtime import slot_from_cmdline

        return slot_from_cmdline((self.dir / "cmdline").read_text(), self.slots)

    def boot_id(self) -> str:
        return (self.dir / "boot_id").read_text().strip()

    def reboot(self, reason: str) -> None:
        # The calling agent is "on the device": unregister it so the firmware
        # does not signal the process that asked for the reboot.
        (self.dir / "pids" / str(os.getpid())).unlink(missing_ok=True)
        SimFirmware(self.base).reboot()

    def register_process(self) -> Path:
        pids = self.dir / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        path = pids / str(os.getpid())
        path.write_text(str(os.getpid()))
        return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
