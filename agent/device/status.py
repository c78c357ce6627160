"""What ``edgeops status`` reports: the journal, its witness and the bootloader, read, never written.

``describe`` is the one account of a device's state (``Updater.status`` returns it too);
``read`` opens only the device's parts for it, without the updater, the device lock or
the life-cycle table, because a technician types ``status`` on a slow core and every
module loaded is paid for there (``tools/bench/startup.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.core.config import AgentConfig
from agent.core.state import Phase, State
from agent.device.parts import Device, open_device

if TYPE_CHECKING:
    from agent.adapters.rot import RootOfTrust


def describe(cfg: AgentConfig, dev: Device, journal_word: str) -> dict[str, Any]:
    """The status document; ``journal_word`` is "ok" or why installs are refused."""
    st = dev.journal.state()
    booted = dev.runtime.booted_slot()
    records = dev.journal.slots()
    out_slots = {}
    for name, classes in cfg.slots.items():
        info = records.get(name)
        out_slots[name] = {
            "device": str(classes["rootfs"]),
            "version": info.version if info else None,
            "state": public_state(info.state if info else "empty"),
            "security_version": info.security_version if info else None,
            "booted": name == booted,
        }
    return {
        "booted_slot": booted,
        "primary_slot": dev.bootloader.primary(),
        "trial_pending_slot": dev.bootloader.trial(),
        "phase": str(st.phase),
        "compatible": cfg.compatible,
        "security_floor": dev.journal.security_floor,
        "trusted_time": dev.journal.trusted_time,
        "slots": out_slots,
        "journal": journal_word,
        **_trial_now(st, booted, dev),  # "trial" and "trial_picked_up"
    }


def _trial_now(journal: State, booted: str, dev: Device) -> dict[str, bool]:
    """Whether this boot is a trial, also before the agent has picked it up: the journal still
    says the trial is armed, but the device booted the trial's slot in a boot other than the
    install's, which the agent's first cycle turns into a running trial (``lifecycle.step``
    decides, as it will for the agent). Such a boot already spent its one try: the next boot
    falls back (the bootloader's bootcount and upgrade_available say so too)."""
    if journal.phase is Phase.TESTING:
        return {"trial": True, "trial_picked_up": True}
    if journal.phase not in (Phase.TRIAL_PENDING, Phase.WRITTEN):
        committing = journal.phase is Phase.COMMITTING
        return {"trial": committing, "trial_picked_up": committing}
    from agent.core import lifecycle  # only for an armed trial: the table is the one to ask

    ahead = lifecycle.step(journal, lifecycle.Booted(booted, dev.runtime.boot_id()))
    return {"trial": ahead.state.phase is Phase.TESTING, "trial_picked_up": False}


def public_state(state: str) -> str:
    # "written" is an internal step: to a person it is a trial waiting to happen
    return {"written": "trial"}.get(state, state)


def journal_word(finding_verdict: str, reason: str) -> str:
    """"ok", or why installs are refused until 'edgeops journal recover'."""
    return f"lost: {reason}" if finding_verdict == "lost" else "ok"


def read(cfg: AgentConfig) -> dict[str, Any]:
    """Open the device's parts, judge the journal against its witness, describe, close."""
    from agent.device.journal_guard import JournalGuard

    dev = open_device(cfg)
    try:
        guard = JournalGuard(cfg, dev.journal, lambda: _root(cfg))
        finding = guard.finding()
        return describe(cfg, dev, journal_word(finding.verdict, finding.reason))
    finally:
        dev.close()


def _root(cfg: AgentConfig) -> RootOfTrust | None:
    # The root of trust keys the witness where the device has one (as Updater.root does).
    from agent.adapters import rot

    return rot.root_for_updater(cfg.tpm, cfg.state_dir)
