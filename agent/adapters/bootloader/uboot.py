"""U-Boot with the classic bootcount scheme (U-Boot doc/README.bootcount, "bootlimit").

Variables (all in the U-Boot environment):
    EO_SLOT            the slot ``bootcmd`` boots
    EO_ALT             the slot ``altbootcmd`` falls back to
    upgrade_available  1 while a trial is pending: only then does U-Boot count boots
    bootcount          incremented by U-Boot on every boot while upgrade_available=1
    bootlimit          1: the second boot of a trial runs ``altbootcmd``

``altbootcmd`` (boards/uboot/boot.cmd) sets EO_SLOT=EO_ALT, upgrade_available=0,
bootcount=0 and boots. So a trial slot boots exactly once; if the agent does
not commit it, any reboot — watchdog, power cut, panic — lands on EO_ALT
without the agent's help. The sim board runs the same decision (agent.host.sim).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.adapters.bootloader import fwenv, register
from agent.adapters.bootloader.envfile import EnvStore
from agent.errors import BootloaderError

DEFAULT_ENV_SIZE = fwenv.DEFAULT_ENV_SIZE  # kept here: the sim board and images name it by scheme


class UBootBootcount:
    def __init__(self, store: EnvStore, slots: tuple[str, ...]) -> None:
        self.store = store
        self.slots = slots

    def _env(self) -> dict[str, str]:
        env = self.store.read()
        for key in ("EO_SLOT", "EO_ALT"):
            if env.get(key) not in self.slots:
                raise BootloaderError(f"U-Boot variable {key}={env.get(key)!r} names no slot "
                                      f"({'/'.join(self.slots)})",
                                      hint="set it with fw_setenv or re-run the board set-up")
        return env

    def _check(self, slot: str) -> None:
        if slot not in self.slots:
            raise BootloaderError(f"no slot named {slot!r}")

    def primary(self) -> str:
        env = self._env()
        return env["EO_ALT"] if env.get("upgrade_available") == "1" else env["EO_SLOT"]

    def trial(self) -> str | None:
        env = self._env()
        return env["EO_SLOT"] if env.get("upgrade_available") == "1" else None

    def set_trial(self, slot: str) -> None:
        self._check(slot)
        env = self._env()
        primary = self.primary()
        if slot == primary:
            raise BootloaderError(f"slot {slot} is the primary; a trial needs the other slot")
        env.update(EO_SLOT=slot, EO_ALT=primary, upgrade_available="1", bootcount="0",
                   bootlimit="1")
        self.store.write(env)

    def commit(self, slot: str) -> None:
        self._check(slot)
        env = self._env()
        if env["EO_SLOT"] == slot and env.get("upgrade_available") == "0":
            return
        env.update(EO_SLOT=slot, upgrade_available="0", bootcount="0")
        self.store.write(env)

    def mark_bad(self, slot: str) -> None:
        self._check(slot)
        env = self._env()
        primary = self.primary()
        if slot == primary:
            raise BootloaderError(f"refusing to mark the primary slot {slot} bad",
                                  hint="commit or roll back to the other slot first")
        # Only a pending trial can make U-Boot boot a non-primary slot: EO_ALT is read by
        # altbootcmd, which runs only while upgrade_available=1 (bootcount_env.c counts
        # boots only then). So a slot that is not on trial needs no env write at all,
        # and a refused install leaves the environment byte-for-byte as it was.
        if env.get("upgrade_available") == "1" and env["EO_SLOT"] == slot:
            env.update(EO_SLOT=primary, EO_ALT=primary, upgrade_available="0", bootcount="0")
            self.store.write(env)


def initial_env(slot: str) -> dict[str, str]:
    return {"EO_SLOT": slot, "EO_ALT": slot, "upgrade_available": "0", "bootcount": "0",
            "bootlimit": "1"}


@register("uboot")
def _factory(settings: Mapping[str, Any], base: Path, slots: tuple[str, ...]) -> UBootBootcount:
    return UBootBootcount(fwenv.store_from_settings(settings, base), slots)
