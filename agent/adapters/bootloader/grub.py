"""GRUB (x86-64 gateways): RAUC's A/B scheme over the grubenv block.

The block itself, byte-exact, is agent.core.grubenv.

The A/B scheme is RAUC's (RAUC docs, "Integration" → "GRUB", and
``src/bootloaders/grub.c``):
    ORDER        slots by priority, space separated ("A B")
    <S>_OK       1: the slot may be booted at all
    <S>_TRY      set to 1 by grub.cfg when it picks the slot; cleared by "mark good"
A slot is good iff OK=1 and TRY=0; grub.cfg (boards/grub/grub.cfg) boots the
first good slot in ORDER, so a slot that is not marked good after its boot is
skipped on the next one. RAUC's mark-good is ``<S>_OK=1 <S>_TRY=0``, its
set-primary adds ``ORDER=<S> first``, its mark-bad is ``<S>_OK=0 <S>_TRY=0``.

RAUC cannot tell "tried once" from "committed" (both are good+first); edgeops
needs that for ``primary()``/``trial()``, so it adds one variable RAUC ignores:
    EO_TRIAL     the slot armed by set_trial, until commit or mark_bad
Because grub.cfg consumes <S>_TRY on *every* boot, the running committed slot
must be confirmed on every boot (``confirm``), as RAUC's mark-good service does.

Power cuts. grubenv sits on the FAT ESP, where a temp file + rename is not power-cut
safe (an e2e power cut left a 0-byte grubenv). So there are two copies, ``grubenv`` and
``grubenv.b`` beside it, and each is rewritten *in place* (same file, size and clusters,
as GRUB's save_env writes its block) in three durable steps: byte 0 of the header broken,
bytes 1.. of the new block, byte 0 restored. A copy caught between the steps has no
valid header, so it fails to decode here and GRUB's ``load_env`` refuses it too
(grub-core/commands/loadenv.c read_envblk_file: "invalid environment block" when
grub_envblk_open, lib/envblk.c, finds no signature; no variable is set). The primary is
written only while the backup holds a valid block, and the backup only after the primary
is durable, so at every instant one copy holds the old or the new state in full. Reads,
here and in grub.cfg, take the primary if it decodes and fall back to the backup.
Creating a copy (missing, or of another size) uses atomic_write: the other copy is valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.adapters.bootloader import register
from agent.adapters.bootloader.bootfs import BootFs, DirBootFs, write_in_place
from agent.core import grubenv
from agent.core.grubenv import GrubEnvError
from agent.errors import BootloaderError, ConfigError

BACKUP_SUFFIX = ".b"  # grubenv.b beside grubenv; boards/grub/grub.cfg names the same file
_TORN = b"!"  # byte 0 while a copy is being rewritten: "# GRUB Environment Block" broken


def _decoded(data: bytes | None) -> dict[str, str] | None:
    if data is None:
        return None
    try:
        return grubenv.decode(data)
    except GrubEnvError:
        return None


class GrubRauc:
    """RAUC's GRUB A/B scheme; ``fs``/``name`` locate grubenv (on the ESP or /boot)."""

    def __init__(self, fs: BootFs, name: str, slots: tuple[str, ...]) -> None:
        self.fs = fs
        self.name = name
        self.slots = slots

    @property
    def backup(self) -> str:
        return self.name + BACKUP_SUFFIX

    def read(self) -> dict[str, str]:
        return self._load()[0]

    def _load(self) -> tuple[dict[str, str], int]:
        """The first copy that decodes (primary, then backup), and its size."""
        datas = [self.fs.read(self.name), self.fs.read(self.backup)]
        for data in datas:
            env = _decoded(data)
            if env is not None and data is not None:
                return env, len(data)
        if datas[0] is None and datas[1] is None:
            raise GrubEnvError(f"grubenv {self.name} is missing",
                               hint=f"create it: grub-editenv {self.name} create")
        if datas[0] is not None and datas[1] is None:
            grubenv.decode(datas[0])  # raises with the reason, as before there was a backup
        raise GrubEnvError(f"neither {self.name} nor {self.backup} holds a GRUB environment block",
                           hint=f"re-create it: grub-editenv {self.name} create")

    def _write(self, env: dict[str, str]) -> None:
        _, size = self._load()
        block = grubenv.encode(env, max(grubenv.BLOCK_SIZE, size))
        primary, backup = self.fs.read(self.name), self.fs.read(self.backup)
        if _decoded(backup) is None:
            # the primary is about to be torn open: first make the backup a full copy of it
            assert primary is not None
            self._store(self.backup, backup, primary)
            backup = primary
        self._store(self.name, primary, block)
        self._store(self.backup, backup, block)

    def _in_sync(self) -> bool:
        """Both copies hold the same valid block (else a cut interrupted the last write)."""
        primary = self.fs.read(self.name)
        return _decoded(primary) is not None and self.fs.read(self.backup) == primary

    def _store(self, name: str, old: bytes | None, new: bytes) -> None:
        """Make ``name`` hold ``new``; in place if it has the size, else created whole."""
        if old == new:
            return
        if old is None or len(old) != len(new):
            self.fs.replace(name, new)  # creating: the other copy is valid meanwhile
            return
        write_in_place(self.fs, name, 0, _TORN)
        write_in_place(self.fs, name, 1, new[1:])
        write_in_place(self.fs, name, 0, new[:1])

    def _order(self, env: Mapping[str, str]) -> list[str]:
        return [s for s in env.get("ORDER", "").split() if s in self.slots]

    def good(self, env: Mapping[str, str], slot: str) -> bool:
        return env.get(f"{slot}_OK") == "1"

    def primary(self) -> str:
        env = self.read()
        trial = env.get("EO_TRIAL")
        for slot in self._order(env):
            if slot != trial and self.good(env, slot):
                return slot
        raise GrubEnvError(f"no slot in ORDER={env.get('ORDER', '')!r} has _OK=1",
                           hint="set one: grub-editenv FILE set ORDER='A B' A_OK=1 A_TRY=0")

    def trial(self) -> str | None:
        env = self.read()
        slot = env.get("EO_TRIAL")
        order = self._order(env)
        return slot if slot in self.slots and order[:1] == [slot] and self.good(env, slot) else None

    def set_trial(self, slot: str) -> None:
        self._check(slot)
        primary = self.primary()
        if slot == primary:
            raise BootloaderError(f"slot {slot} is the primary; a trial needs the other slot")
        env = self.read()
        # RAUC set-primary on the trial slot, and the primary made good again so that
        # grub.cfg's loop falls through to it once the trial's TRY flag is spent.
        env.update({f"{slot}_OK": "1", f"{slot}_TRY": "0", f"{primary}_OK": "1",
                    f"{primary}_TRY": "0", "ORDER": self._ordered(env, slot, primary),
                    "EO_TRIAL": slot})
        self._write(env)

    def commit(self, slot: str) -> None:
        self._check(slot)
        env = self.read()
        new = dict(env)
        new.update({f"{slot}_OK": "1", f"{slot}_TRY": "0", "ORDER": self._ordered(env, slot)})
        new.pop("EO_TRIAL", None)
        if new != env or not self._in_sync():
            self._write(new)

    def confirm(self, slot: str) -> None:
        """RAUC's mark-good for the running committed slot: grub.cfg spent its TRY flag."""
        self._check(slot)
        env = self.read()
        if slot == self.primary() and env.get(f"{slot}_TRY") != "0":
            env[f"{slot}_TRY"] = "0"
            self._write(env)

    def mark_bad(self, slot: str) -> None:
        self._check(slot)
        primary = self.primary()
        if slot == primary:
            raise BootloaderError(f"refusing to mark the primary slot {slot} bad",
                                  hint="commit or roll back to the other slot first")
        env = self.read()
        new = dict(env)
        # RAUC mark-bad, plus the primary first in ORDER so that even GRUB's
        # "nothing good" fallback (menu entry 0 in RAUC's example) cannot pick the bad slot.
        new.update({f"{slot}_OK": "0", f"{slot}_TRY": "0", "ORDER": self._ordered(env, primary)})
        if new.get("EO_TRIAL") == slot:
            del new["EO_TRIAL"]
        if new != env or not self._in_sync():
            self._write(new)

    def _ordered(self, env: Mapping[str, str], *first: str) -> str:
        rest = [s for s in self._order(env) if s not in first]
        rest += [s for s in self.slots if s not in first and s not in rest]
        return " ".join([*first, *rest])

    def _check(self, slot: str) -> None:
        if slot not in self.slots:
            raise BootloaderError(f"no slot named {slot!r} ({'/'.join(self.slots)})")


def initial_env(primary: str, slots: tuple[str, ...]) -> dict[str, str]:
    """A fresh board: ``primary`` good and first, the others not bootable yet."""
    env = {"ORDER": " ".join([primary, *(s for s in slots if s != primary)])}
    for s in slots:
        env.update({f"{s}_OK": "1" if s == primary else "0", f"{s}_TRY": "0"})
    return env


@register("grub")
def _factory(settings: Mapping[str, Any], base: Path, slots: tuple[str, ...]) -> GrubRauc:
    try:
        path = base / str(settings.get("grubenv", "/boot/grub/grubenv"))
    except TypeError as exc:
        raise ConfigError(f"[bootloader] grubenv must be a path: {exc}") from None
    return GrubRauc(DirBootFs(path.parent), path.name, slots)
