"""The orchestrator: drives ``lifecycle`` and calls the adapters, persisting before acting.

It holds no policy of its own. Each public method takes the device lock, so
two installers (or an installer and the service) never interleave.
Flow of an install: read the signed head → ``trust`` decides → the journal
records WRITING → the bootloader marks the target slot bad → payloads stream
through ``bundle`` (verified block by block) into ``slots`` → fsync → WRITTEN →
the bootloader sets the trial → TRIAL_PENDING. After the reboot ``on_boot``
feeds ``Booted`` to the state machine and ``run_health`` decides commit or revert.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from agent.adapters import bootloader as bootloader_mod
from agent.adapters import probes, slots
from agent.adapters.bundle import BundleReader
from agent.adapters.journal import Journal
from agent.adapters.rot import tpm as tpm_mod
from agent.adapters.runtime import LinuxRuntime, RegistersProcess, Runtime
from agent.adapters.truststore import TrustStore
from agent.adapters.verdict import VerdictBox
from agent.core import health, lifecycle, trust
from agent.core.config import AgentConfig
from agent.errors import (
    ConfigError,
    DeviceBusy,
    EdgeopsError,
    IncompatibleBundle,
    RollbackRefused,
    StateError,
)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class Device:
    config: AgentConfig
    journal: Journal
    bootloader: bootloader_mod.Bootloader
    runtime: Runtime

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


@dataclass
class InstallResult:
    version: str
    slot: str
    bytes_written: int
    payloads: list[str] = field(default_factory=list)


@dataclass
class CycleResult:
    phase: str
    messages: list[str]
    rebooted: bool = False


class Updater:
    def __init__(self, device: Device, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.dev = device
        self.cfg = device.config
        self.journal = device.journal
        self.clock = clock
        self.sleep = sleep
        self.messages: list[str] = []
        self._root: tpm_mod.RootOfTrust | None = None
        self._root_opened = False
        self.rebooted = False
        self._health_allowed = True

    # --- locking ----------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cfg.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DeviceBusy("another edgeops process holds the device lock") from None
            yield
        finally:
            os.close(fd)

    # --- the state machine's shell -----------------------------------------------------------
    def _step(self, event: lifecycle.Event) -> None:
        before = self.journal.state()
        t = lifecycle.step(before, event)
        if t.state != before or t.records:
            # An idle cycle changes nothing and writes nothing: SD cards wear out.
            self.journal.apply(t, now=self.clock())
        for record in t.records:
            if isinstance(record, lifecycle.RaiseFloor) and (root := self.root()) is not None:
                root.raise_floor(record.security_version)  # journal first; _sync_boot catches up
            if isinstance(record, lifecycle.History):
                self.messages.append(f"{record.event}: slot {record.slot} {record.version or ''} "
                                     f"{record.detail}".rstrip())
        for action in t.actions:
            self._act(action)
            if self.rebooted:
                return

    def _act(self, action: lifecycle.Action) -> None:
        bl = self.dev.bootloader
        match action:
            case lifecycle.BootMarkBad(slot):
                bl.mark_bad(slot)
            case lifecycle.BootSetTrial(slot):
                bl.set_trial(slot)
                self._step(lifecycle.TrialSet())
            case lifecycle.BootCommit(slot):
                bl.commit(slot)
                if self.journal.state().phase is lifecycle.Phase.COMMITTING:
                    self._step(lifecycle.CommitDone())
            case lifecycle.RunHealth():
                if self._health_allowed:
                    self._run_health()
            case lifecycle.Reboot(reason):
                self.messages.append(f"rebooting: {reason}")
                self.rebooted = True
                self.dev.runtime.reboot(reason)

    # --- install ----------------------------------------------------------------------------
    def install(self, stream: BinaryIO, *, total: int = 0, progress: Progress | None = None
                ) -> InstallResult:
        with self.locked():
            self._sync_boot()
            reader = BundleReader(stream)
            try:
                verdict, target = self._verify(reader)
            except Exception as exc:  # a bug must not leave a refusal unrecorded either
                why = exc.one_line() if isinstance(exc, EdgeopsError) else f"{type(exc).__name__}: {exc}"
                self.journal.record([lifecycle.History("refused", None, None, why)], now=self.clock())
                raise
            m = verdict.manifest
            self._step(lifecycle.Install(target, self.dev.runtime.booted_slot(), m.version,
                                         m.security_version, self.dev.runtime.boot_id(), m.health))
            written = 0
            try:
                for pr in reader.payloads(m):
                    dest = self.cfg.slots[target][pr.payload.slot_class]
                    chunks = pr.installed_chunks()
                    if progress is not None:
                        chunks = _counting(chunks, written, total or _total(m), progress)
                    written += slots.write(dest, chunks, limit=slots.capacity(dest))
            except Exception as exc:  # whatever broke the write, the journal must not stay WRITING
                reason = exc.one_line() if isinstance(exc, EdgeopsError) else f"{type(exc).__name__}: {exc}"
                self._step(lifecycle.WriteFailed(reason))
                raise
            if (root := self.root()) is not None:
                for p in m.payloads:  # measured once written and fsynced, before the trial is set
                    root.measure(f"install:{p.name}:{target}", bytes.fromhex(p.sha256))
            self._step(lifecycle.WriteDone())
            return InstallResult(m.version, target, written, [p.name for p in m.payloads])

    def _verify(self, reader: BundleReader) -> tuple[trust.Verdict, str]:
        store = TrustStore(self.cfg, self.journal, self.root())
        verdict = store.verify(reader.read_head(), self.clock())
        phase = self.journal.state().phase
        if phase not in (lifecycle.Phase.IDLE, lifecycle.Phase.WRITING, lifecycle.Phase.WRITTEN,
                         lifecycle.Phase.TRIAL_PENDING):
            raise StateError(f"cannot install while the device is {phase}",
                             hint="let the trial finish ('edgeops agent --once') first")
        booted = self.dev.runtime.booted_slot()
        primary = self.dev.bootloader.primary()
        if primary != booted:
            # e.g. a rollback armed and its reboot still to come: the inactive slot is the one
            # the bootloader will boot next, and must not be overwritten
            raise StateError(f"the bootloader will boot slot {primary} next, not the running "
                             f"slot {booted}", hint="reboot first, then install")
        target = self.cfg.other_slot(booted)
        if verdict.manifest.health:
            try:
                health.parse_policy(verdict.manifest.health, base=health.parse_policy(self.cfg.health))
            except ConfigError as exc:
                raise IncompatibleBundle(f"bundle health checks do not fit this device: {exc}") from None
        classes = [p.slot_class for p in verdict.manifest.payloads]
        if dup := next((c for c in classes if classes.count(c) > 1), None):
            raise IncompatibleBundle(f"two payloads target slot class '{dup}'; a slot takes one image")
        for p in verdict.manifest.payloads:
            dest = self.cfg.slots[target].get(p.slot_class)
            if dest is None:
                if p.slot_class == "model":
                    raise IncompatibleBundle("this is a model bundle",
                                             hint="install it with 'edgeops model install'")
                raise IncompatibleBundle(f"payload '{p.name}' targets class '{p.slot_class}', "
                                         f"which this board has no slot for")
            slots.check_fits(dest, p.size, p.name)
        store.accept(verdict)
        return verdict, target

    # --- boot, health, commit ----------------------------------------------------------------
    def _sync_boot(self, *, health: bool = False) -> None:
        """Tell the state machine which boot this is. Only the agent cycle runs health checks;
        every other command just brings the recorded state up to date first."""
        rt = self.dev.runtime
        self._health_allowed = health
        try:
            self._step(lifecycle.Booted(rt.booted_slot(), rt.boot_id()))
        finally:
            self._health_allowed = True
        if (root := self.root()) is not None:
            root.measure("boot:slot", rt.booted_slot().encode(), once=True)
            # power may have failed between the journal's floor and the TPM's: catch up
            root.raise_floor(self.journal.security_floor)
        self._confirm_boot()

    def _confirm_boot(self) -> None:
        # RAUC-style schemes (grub, uboot_rauc) spend a try on every boot, so the running
        # committed slot is confirmed on each boot, as RAUC's mark-good service does.
        bl = self.dev.bootloader
        if (not isinstance(bl, bootloader_mod.Confirmable) or self.rebooted
                or self.journal.state().phase is not lifecycle.Phase.IDLE):
            return
        # each backend confirms only its committed slot (a fallback slot stays unconfirmed)
        bl.confirm(self.dev.runtime.booted_slot())

    def register_process(self) -> Path | None:
        """Tell a runtime that tracks agent processes (the sim board) that this one runs;
        returns the file to remove when the process ends, or None."""
        rt = self.dev.runtime
        return rt.register_process() if isinstance(rt, RegistersProcess) else None

    def root(self) -> tpm_mod.RootOfTrust | None:
        """The TPM (or provisioned keystore) if this device opted in; opened once per Updater."""
        if not self._root_opened:
            self._root = tpm_mod.root_for_updater(self.cfg.path, self.cfg.state_dir)
            self._root_opened = True
        return self._root

    def cycle(self) -> CycleResult:
        """One agent cycle: note the boot, finish what a previous boot left, run a pending trial."""
        with self.locked():
            self._sync_boot(health=True)
        return CycleResult(str(self.journal.state().phase), self.messages, self.rebooted)

    def _run_health(self) -> None:
        policy = self.policy()
        # The deadline counts from the first health run of this boot, so an agent
        # that keeps restarting mid-trial cannot extend it (CLOCK_MONOTONIC is per boot).
        boot_id = self.dev.runtime.boot_id()
        mark = self.journal.get("trial_started")
        if not mark or mark.get("boot_id") != boot_id:
            mark = {"boot_id": boot_id, "monotonic": time.monotonic()}
            self.journal.put("trial_started", mark)
        started = float(mark["monotonic"])
        results: list[probes.ProbeResult] = []
        while True:
            results += probes.run_all(policy.probes)
            decision = health.decide(policy, results, started=started, now=time.monotonic())
            if decision.verdict == "commit":
                self._step(lifecycle.HealthPassed(decision.reason))
                return
            if decision.verdict == "revert":
                self._step(lifecycle.HealthFailed(decision.reason))
                return
            if self._wait_for_next_round(policy.interval):
                return  # a technician decided meanwhile

    def policy(self) -> health.HealthPolicy:
        base = health.parse_policy(self.cfg.health)
        override = self.journal.state().health
        return health.parse_policy(override, base=base) if override else base

    def health_report(self) -> list[probes.ProbeResult]:
        return probes.run_all(self.policy().probes)

    def mark_good(self) -> None:
        self._operator_verdict(good=True)

    def mark_bad(self) -> None:
        self._operator_verdict(good=False)

    # A technician's verdict must not wait for the agent's health loop, which holds the lock
    # for up to the whole deadline: when the lock is busy the verdict is handed to that loop
    # (agent.adapters.verdict), and taken before its next probe round.
    VERDICT_POLL = 0.5  # how often the health loop looks for a verdict while it waits

    def _wait_for_next_round(self, interval: float) -> bool:
        """Sleep until the next probe round, taking a technician's verdict as soon as it comes."""
        left = interval
        while True:
            if self._take_operator_verdict():
                return True
            if left <= 0:
                return False
            step = min(self.VERDICT_POLL, left)
            self.sleep(step)
            left -= step

    def _operator_verdict(self, *, good: bool) -> None:
        what = "mark-good" if good else "mark-bad"
        give_up = time.monotonic() + 5.0  # the agent may be just starting its cycle
        while True:
            try:
                with self.locked():
                    self._sync_boot()
                    self._require(lifecycle.Phase.TESTING, what)
                    self._step(self._verdict_event(good))
                return
            except DeviceBusy:
                if self.journal.state().phase is lifecycle.Phase.TESTING:
                    break
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.1)
        box = VerdictBox(self.cfg.state_dir)
        box.post(good=good, boot_id=self.dev.runtime.boot_id())
        # The loop looks between sleeps of VERDICT_POLL and after each probe round; a round
        # is bounded by the probes' timeouts, so the whole deadline is the outer bound.
        wait = self.policy().deadline + 10.0
        deadline = time.monotonic() + wait
        if not box.wait_taken(wait):
            raise DeviceBusy(f"the agent's health loop did not take the {what} verdict "
                             f"within {wait:.0f} s")
        while self.journal.state().phase is lifecycle.Phase.TESTING and time.monotonic() < deadline:
            time.sleep(0.1)  # taken; wait until the journal shows it applied
        last = self.journal.history(1)
        self.messages.append(f"handed to the running agent: {last[0].event} {last[0].detail or ''}"
                             .rstrip() if last else "handed to the running agent")

    def _take_operator_verdict(self) -> bool:
        good = VerdictBox(self.cfg.state_dir).take(self.dev.runtime.boot_id())
        if good is None:
            return False
        self._step(self._verdict_event(good))
        return True

    @staticmethod
    def _verdict_event(good: bool) -> lifecycle.Event:
        if good:
            return lifecycle.HealthPassed("marked good by operator")
        return lifecycle.HealthFailed("marked bad by operator")

    def rollback(self) -> str:
        with self.locked():
            self._sync_boot()
            self._require(lifecycle.Phase.IDLE, "rollback")
            booted = self.dev.runtime.booted_slot()
            other = self.cfg.other_slot(booted)
            info = self.journal.slots().get(other)
            if info is None or info.state != "good":
                raise StateError(f"slot {other} holds no known-good version to roll back to "
                                 f"({info.state if info else 'empty'})")
            floor = self.journal.security_floor
            if (root := self.root()) is not None:
                floor = max(floor, root.floor())  # the TPM's counter outlives a re-imaged journal
            if (info.security_version or 0) < floor:
                raise RollbackRefused(f"slot {other} has security_version {info.security_version}, "
                                      f"below the device floor {floor}",
                                      hint="a release with a security fix cannot be rolled back; "
                                           "install a newer release instead")
            self._step(lifecycle.Rollback(other, info.version))
            return other

    def _require(self, phase: lifecycle.Phase, what: str) -> None:
        now = self.journal.state().phase
        if now is not phase:
            raise StateError(f"'{what}' needs the device to be {phase}, it is {now}")

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st = self.journal.state()
        rt, bl = self.dev.runtime, self.dev.bootloader
        booted = rt.booted_slot()
        records = self.journal.slots()
        out_slots = {}
        for name, classes in self.cfg.slots.items():
            info = records.get(name)
            out_slots[name] = {
                "device": str(classes["rootfs"]),
                "version": info.version if info else None,
                "state": _public_state(info.state if info else "empty"),
                "security_version": info.security_version if info else None,
                "booted": name == booted,
            }
        return {
            "booted_slot": booted,
            "primary_slot": bl.primary(),
            "trial": st.phase in (lifecycle.Phase.TESTING, lifecycle.Phase.COMMITTING),
            "trial_pending_slot": bl.trial(),
            "phase": str(st.phase),
            "compatible": self.cfg.compatible,
            "security_floor": self.journal.security_floor,
            "trusted_time": self.journal.trusted_time,
            "slots": out_slots,
        }


def _public_state(state: str) -> str:
    # "written" is an internal step: to a person it is a trial waiting to happen
    return {"written": "trial"}.get(state, state)


def _total(m: Any) -> int:
    return sum(p.size for p in m.payloads)


def _counting(chunks: Iterator[memoryview], start: int, total: int, progress: Progress
              ) -> Iterator[memoryview]:
    done = start
    for c in chunks:
        done += len(c)
        progress(done, total)
        yield c
