"""The device's parts, opened from its config: the journal, the bootloader backend, the runtime.

Every command that looks at the device opens these and nothing more; the updater drives
them, ``agent.device.status`` only reads them (so ``edgeops status`` loads no updater).
"""

from __future__ import annotations

from agent.adapters import bootloader as bootloader_mod
from agent.adapters.journal import Journal
from agent.adapters.runtime import LinuxRuntime, Runtime
from agent.core.config import AgentConfig


class Device:
    """What ``open_device`` opened; ``close`` releases the journal."""

    # A plain class, not a dataclass: 'edgeops status' opens one, and Python 3.11 compiles
    # each dataclass's methods at import (tools/bench/startup.py).
    def __init__(self, config: AgentConfig, journal: Journal, bootloader: bootloader_mod.Bootloader,
                 runtime: Runtime) -> None:
        self.config, self.journal, self.bootloader, self.runtime = config, journal, bootloader, runtime

    def close(self) -> None:
        self.journal.close()


def open_device(config: AgentConfig) -> Device:
    slot_names = tuple(config.slots)
    bl = bootloader_mod.create(config.bootloader, config.bootloader_settings, config.base, slot_names)
    rt: Runtime
    if config.runtime == "sim":
        from agent.adapters.simboard import SimRuntime  # lazy: only a sim board needs it

        rt = SimRuntime(config)
    else:
        rt = LinuxRuntime(slot_names)
    return Device(config, Journal(config.journal_path), bl, rt)
