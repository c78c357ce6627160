"""U-Boot with RAUC's boot-attempts scheme (RAUC ``src/bootloaders/uboot.c``, docs "Integration" → U-Boot).

Variables in the U-Boot environment:
    BOOT_ORDER      slots by priority, space separated ("A B")
    BOOT_<S>_LEFT   boot attempts left, *hexadecimal* (RAUC prints "%x", U-Boot's
                    setexpr computes in hex); the boot script (boards/uboot/boot-rauc.cmd)
                    boots the first slot in BOOT_ORDER with attempts left and
                    decrements its counter before booting it
RAUC's mark-good sets BOOT_<S>_LEFT to the default attempts (3); mark-bad
removes the slot from BOOT_ORDER and sets its counter to 0; set-primary puts it
first with the primary attempts (3).

edgeops adds what RAUC cannot express (a trial of exactly one boot, and which
slot is the trial): the trial slot gets BOOT_<S>_LEFT=1 and
    EO_TRIAL        the slot armed by set_trial, until commit or mark_bad
Like RAUC, the running committed slot must be confirmed on every boot
(``confirm``), or its attempts run out after three boots.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.adapters.bootloader import register
from agent.adapters.bootloader.envfile import EnvStore
from agent.adapters.bootloader.fwenv import store_from_settings
from agent.errors import BootloaderError, ConfigError

ATTEMPTS = 3


def attempts(env: Mapping[str, str], slot: str) -> int:
    try:
        return int(env.get(f"BOOT_{slot}_LEFT", "0"), 16)
    except ValueError:
        return 0


class UBootRauc:
    def __init__(self, store: EnvStore, slots: tuple[str, ...], *, attempts: int = ATTEMPTS) -> None:
        if not 1 <= attempts <= 9:
            # the counter is written in hex; U-Boot's `test -gt` reads decimal, so 'a'..'f' is 0
            raise ConfigError(f"uboot_rauc attempts must be 1 to 9, not {attempts}")
        self.store = store
        self.slots = slots
        self.attempts = attempts

    def _order(self, env: Mapping[str, str]) -> list[str]:
        return [s for s in env.get("BOOT_ORDER", "").split() if s in self.slots]

    def primary(self) -> str:
        env = self.store.read()
        order = [s for s in self._order(env) if s != env.get("EO_TRIAL")]
        if not order:
            raise BootloaderError(f"BOOT_ORDER={env.get('BOOT_ORDER', '')!r} names no committed slot",
                                  hint="set it: fw_setenv BOOT_ORDER 'A B'")
        # RAUC's get_primary: the first slot with attempts left; if all are spent the
        # boot script resets every counter, so the first in the order is next anyway.
        return next((s for s in order if attempts(env, s) > 0), order[0])

    def trial(self) -> str | None:
        env = self.store.read()
        slot = env.get("EO_TRIAL")
        return slot if slot in self.slots and self._order(env)[:1] == [slot] else None

    def set_trial(self, slot: str) -> None:
        self._check(slot)
        primary = self.primary()
        if slot == primary:
            raise BootloaderError(f"slot {slot} is the primary; a trial needs the other slot")
        env = self.store.read()
        env.update({"BOOT_ORDER": self._ordered(env, slot, primary), f"BOOT_{slot}_LEFT": "1",
                    f"BOOT_{primary}_LEFT": f"{self.attempts:x}", "EO_TRIAL": slot})
        self.store.write(env)

    def commit(self, slot: str) -> None:
        self._check(slot)
        env = self.store.read()
        new = dict(env)
        new.update({"BOOT_ORDER": self._ordered(env, slot), f"BOOT_{slot}_LEFT": f"{self.attempts:x}"})
        new.pop("EO_TRIAL", None)
        if new != env:
            self.store.write(new)

    def confirm(self, slot: str) -> None:
        """RAUC's mark-good for the running committed slot: refill its attempts.

        "Committed" is the first slot in BOOT_ORDER that is not a trial, whatever its
        counter: on the boot that spent its last attempt, primary() already names the
        other slot, and that is exactly the boot whose confirmation must not be lost."""
        self._check(slot)
        env = self.store.read()
        committed = next((s for s in self._order(env) if s != env.get("EO_TRIAL")), None)
        if slot == committed and attempts(env, slot) != self.attempts:
            env[f"BOOT_{slot}_LEFT"] = f"{self.attempts:x}"
            self.store.write(env)

    def mark_bad(self, slot: str) -> None:
        self._check(slot)
        if slot == self.primary():
            raise BootloaderError(f"refusing to mark the primary slot {slot} bad",
                                  hint="commit or roll back to the other slot first")
        env = self.store.read()
        new = dict(env)
        new["BOOT_ORDER"] = " ".join(s for s in self._order(env) if s != slot)
        new[f"BOOT_{slot}_LEFT"] = "0"
        if new.get("EO_TRIAL") == slot:
            del new["EO_TRIAL"]
        if new != env:
            self.store.write(new)

    def _ordered(self, env: Mapping[str, str], *first: str) -> str:
        rest = [s for s in self._order(env) if s not in first]
        return " ".join([*first, *rest])

    def _check(self, slot: str) -> None:
        if slot not in self.slots:
            raise BootloaderError(f"no slot named {slot!r} ({'/'.join(self.slots)})")


def initial_env(primary: str) -> dict[str, str]:
    return {"BOOT_ORDER": primary, f"BOOT_{primary}_LEFT": f"{ATTEMPTS:x}"}


@register("uboot_rauc")
def _factory(settings: Mapping[str, Any], base: Path, slots: tuple[str, ...]) -> UBootRauc:
    return UBootRauc(store_from_settings(settings, base), slots,
                     attempts=int(settings.get("attempts", ATTEMPTS)))
