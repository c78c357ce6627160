"""Rebuild a lost, emptied or replaced journal from its witness, never lowering the floor.

``edgeops journal recover`` runs ``recover``, which takes the device lock. Slots and life-cycle
state come from the witness (``agent.core.witness.recovered``); without a usable witness,
from the old journal if it can still be read, else from the bootloader (its primary slot
holds a good, unnamed version). The floor and the trusted time are the highest that the
witness, the old journal and the root of trust's counter know. The old file is renamed,
never deleted, and the new journal starts with a fresh identity and a witness to match.
``open_for_recovery`` opens a device whose journal SQLite cannot even read.
"""

from __future__ import annotations

from pathlib import Path

from agent.adapters import journal as journal_mod
from agent.core import lifecycle
from agent.core import witness as witness_core
from agent.core.config import AgentConfig
from agent.device.parts import Device, open_device
from agent.device.updater import Updater
from agent.errors import EdgeopsError, JournalLost


def open_for_recovery(config: AgentConfig) -> tuple[Device, Path | None]:
    """The device, with a journal SQLite cannot open set aside first (returned, or None)."""
    try:
        return open_device(config), None
    except journal_mod.JournalCorrupt:
        aside = journal_mod.set_aside(config.journal_path, "corrupt")
        return open_device(config), aside


def recover(up: Updater) -> str:
    """Recover the journal of ``up``; one line on what was done."""
    with up.locked():
        return _recover(up)


def _recover(up: Updater) -> str:
    finding = up.journal_finding(again=True)  # the files may have changed since it looked
    if finding.verdict != "lost":
        return f"nothing to recover: {finding.reason}"
    try:
        got = up.guard.witness().read()
    except witness_core.WitnessDamaged:
        got = None
    try:
        old = None if up.journal.fresh else up.journal.facts()
    except journal_mod.JournalCorrupt:
        old = None
    rec = witness_core.recovered(got[0] if got else None, journal=old, root_floor=_root_floor(up),
                                 fallback=_minimal_record(up))
    path = up.journal.path
    up.journal.close()
    aside = journal_mod.set_aside(path, "lost")
    fresh = journal_mod.Journal(path)
    up.replace_journal(fresh)
    fresh.follow(up.guard.witness().write)
    source = "its witness" if got else ("the old journal" if old else "the bootloader")
    fresh.restore(rec, f"{finding.reason}; rebuilt from {source}", now=up.clock())
    after = up.journal_finding(again=True)
    if after.verdict != "ok":  # the new journal and the witness it just wrote must agree
        raise JournalLost(f"the recovered journal does not match its witness: {after.reason}")
    kept = f"; the old file is {aside.name}" if aside else ""
    return (f"journal recovered from {source}: phase {rec.state['phase']}, security floor "
            f"{rec.security_floor}{kept}")


def _root_floor(up: Updater) -> int | None:
    root = up.root()
    if root is None:
        return None
    try:
        return root.floor()
    except EdgeopsError:  # an unprovisioned TPM has no counter: the other sources decide
        return None


def _minimal_record(up: Updater) -> witness_core.Record:
    """What is known without a witness: idle, the bootloader's primary slot holds a good
    version (which one, no record says), the other slot nothing to roll back to."""
    primary = up.dev.bootloader.primary()
    slots = {name: {"state": "good" if name == primary else "empty", "version": None,
                    "security_version": None} for name in up.cfg.slots}
    return witness_core.Record(up.journal.identity, 0, 0, 0, lifecycle.State().to_dict(), slots)
