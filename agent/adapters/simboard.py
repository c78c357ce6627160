"""The ``sim`` board's firmware and running system: a faithful fake of the hardware, made of files.

    DIR/uboot.env           a redundant U-Boot environment (2 x 16 KiB), fw_printenv-readable
    DIR/run/                the running system: cmdline, boot_id, pids of running agents

``SimFirmware.boot`` is what U-Boot does at power-on with the bootcount scheme
(agent.adapters.bootloader.uboot): count the boot of a trial slot, fall back when the
count passes bootlimit, and "start the kernel" by writing run/cmdline. A reboot
first stops the agents that run on the device (SIGTERM, then they are gone); a
power cut kills them with SIGKILL at whatever instruction they were on.
What it does not model: losing writes still in the page cache (the agent
fsyncs everything it relies on, and the env is redundant for torn writes).

``SimRuntime`` is the ``Runtime`` of an agent running on that board. Both are adapters
(the device opens them when ``[runtime] kind = "sim"``); creating a sim board is host
tooling and lives in ``agent.host.sim``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from agent.adapters.bootloader.envfile import EnvStore, Location
from agent.adapters.bootloader.uboot import DEFAULT_ENV_SIZE
from agent.adapters.fsutil import atomic_write
from agent.adapters.runtime import slot_from_cmdline
from agent.core.config import AgentConfig
from agent.errors import ConfigError

ENV_FILE = "uboot.env"


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
        import uuid  # here, as signal below: 'edgeops status' opens only SimRuntime

        atomic_write(self.run / "boot_id", f"{uuid.uuid4()}\n")
        atomic_write(self.run / "cmdline", f"root=/dev/sim{slot} ro edgeops.slot={slot}\n")
        return slot

    def _stop_agents(self, sig: int) -> None:
        import signal

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
        import signal

        self._stop_agents(signal.SIGTERM)
        return self.boot()

    def power_cut(self) -> str:
        import signal

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
