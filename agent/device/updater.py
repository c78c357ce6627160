"""Drive the install/boot life cycle on a device: feed events to ``lifecycle``, perform its actions.

No policy here: ``core.plan`` decides whether and where a trusted bundle installs,
``core.lifecycle`` what follows each event, ``core.health`` commit or revert. The updater
reads the facts they need, makes each transition durable in the journal *before* its
actions, and performs them. Every public method takes the device lock.
An install: signed head → trust store and ``trust`` → ``plan_install`` → WRITING → the
target slot marked bad → payloads stream through ``bundle`` (verified block by block)
into ``slots`` → fsync → the slot's fix-ups (``fixup_apply``) → WRITTEN → trial set →
TRIAL_PENDING. After the reboot ``cycle`` feeds ``Booted``, and the health checks decide
commit or revert.

What only an install, a health run or a TPM needs (the bundle reader and zstandard, the
trust store, slots, probes, the root of trust) is imported where it is used: ``edgeops
status`` and the idle agent never load it; an install never loads ``cryptography``
(``agent.core.certs`` reads the chain).
Long because (about 540 lines, on purpose) one module shows every command's sequence
against the journal, the bootloader and the slots; what has a job of its own already lives beside it (the
journal's witness in ``journal_guard``, recovery in ``recovery``, a trial's second look at
its signer in ``adapters.truststore``).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

from agent.adapters import bootloader as bootloader_mod
from agent.adapters.journal import Journal
from agent.adapters.runtime import RegistersProcess
from agent.adapters.verdict import VerdictBox
from agent.core import health, lifecycle, logs
from agent.core.frozen import Frozen, field
from agent.device import telemetry
from agent.device.parts import Device
from agent.device.parts import open_device as open_device  # where callers have found it
from agent.errors import ConfigError, DeviceBusy, DeviceError, EdgeopsError, JournalLost, StateError

if TYPE_CHECKING:  # imported where used (see above), and only a device that checks its journal
    from agent.adapters.bundle import BundleReader
    from agent.adapters.rot import RootOfTrust
    from agent.core.manifest import Manifest
    from agent.core.plan import InstallPlan
    from agent.core.probe_spec import ProbeResult
    from agent.core.witness import Finding
    from agent.device.journal_guard import JournalGuard

Progress = Callable[[int, int], None]  # (installed bytes done, installed bytes of the bundle)
# Writes the payloads of a verified, recorded install (agent.device.delta): (reader, manifest,
# payload name -> target slot path) -> bytes installed. None: stream them from the reader.
PayloadWriter = Callable[["BundleReader", "Manifest", dict[str, Path]], int]


@runtime_checkable
class PhasedProgress(Protocol):
    """A progress display that also shows the install's phase: "verify" (the signed head),
    "write" (payload bytes, verified block by block), "sync" (the final fsync), "done"."""

    def __call__(self, done: int, total: int) -> None: ...

    def phase(self, name: str) -> None: ...


class InstallResult(Frozen, frozen=False):
    version: str
    slot: str
    bytes_written: int
    payloads: list[str] = field(default_factory=list)


class CycleResult(Frozen, frozen=False):
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
        self._root: RootOfTrust | None = None
        self._root_opened = False
        self.rebooted = False
        self._override: tuple[dict[str, Any], health.HealthPolicy] | None = None
        self.verdicts = VerdictBox(self.cfg.state_dir)
        self._guard: JournalGuard | None = None
        # how long a state change waits for the device lock (0: refuse at once, as the agent
        # and scripts want); the console waits out an agent cycle instead of saying "busy"
        self.lock_wait = 0.0
        self.on_lock_wait: Callable[[float], None] | None = None

    # --- locking ----------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cfg.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._take_lock(fd)
            yield
        finally:
            os.close(fd)

    def _take_lock(self, fd: int) -> None:
        """flock without blocking, polled for up to ``lock_wait`` seconds: a blocking flock
        could not be bounded, and a SIGHUP must still end the console while it waits."""
        deadline = time.monotonic() + max(0.0, self.lock_wait)
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" (waited {self.lock_wait:.0f} s)" if self.lock_wait > 0 else ""
                    raise DeviceBusy(f"another edgeops process holds the device lock{waited}") from None
            if not told and self.on_lock_wait is not None:
                self.on_lock_wait(self.lock_wait)
                told = True
            time.sleep(0.2)

    # --- the state machine's shell -----------------------------------------------------------
    def _drive(self, event: lifecycle.Event, *, run_health: bool = True) -> None:
        """Feed ``event`` and whatever follows it to the state machine, one transition at a time.

        Each transition is durable before its actions run. What comes next is data: the
        transition's ``then`` (e.g. ``TrialSet`` once the trial is armed), or the event an
        action produced (the health verdict). Nothing more runs after a reboot was asked for."""
        pending = deque([event])
        while pending:
            t = self._apply(self._vet(pending.popleft()))
            for action in t.actions:
                produced = self._perform(action, run_health=run_health)
                if self.rebooted:
                    return
                if produced is not None:
                    pending.append(produced)
            if t.then is not None:
                pending.append(t.then)

    def _vet(self, event: lifecycle.Event) -> lifecycle.Event:
        """A trial's commit, whoever asks for it (health checks or a technician), waits on one more
        fact: its signer is not revoked by a CRL that came since, nor expired at the best-known time."""
        if not (isinstance(event, lifecycle.HealthPassed)
                and self.journal.state().phase is lifecycle.Phase.TESTING):
            return event  # every other event: no trust store, so an idle cycle loads no cryptography
        from agent.adapters.truststore import TrustStore

        why = TrustStore(self.cfg, self.journal, self.root()).distrust_trial(self.clock())
        return lifecycle.SignerDistrusted(why) if why else event

    def _apply(self, event: lifecycle.Event) -> lifecycle.Transition:
        before = self.journal.state()
        t = lifecycle.step(before, event)
        if t.state != before or t.records:
            # An idle cycle changes nothing and writes nothing: SD cards wear out.
            self.journal.apply(t, now=self.clock())
            telemetry.transition(self.cfg, before.phase, t.state.phase, version=t.state.version)
        for record in t.records:
            if isinstance(record, lifecycle.RaiseFloor) and (root := self.root()) is not None:
                root.raise_floor(record.security_version)  # journal first; _sync_boot catches up
            if isinstance(record, lifecycle.History):
                self.messages.append(f"{record.event}: slot {record.slot} {record.version or ''} "
                                     f"{record.detail}".rstrip())
        return t

    def _perform(self, action: lifecycle.Action, *, run_health: bool) -> lifecycle.Event | None:
        bl = self.dev.bootloader
        match action:
            case lifecycle.BootMarkBad(slot):
                bl.mark_bad(slot)
            case lifecycle.BootSetTrial(slot):
                bl.set_trial(slot)
            case lifecycle.BootCommit(slot):
                bl.commit(slot)
            case lifecycle.RunHealth():
                # only the agent cycle runs health checks; other commands just catch up
                return self._run_health() if run_health else None
            case lifecycle.Reboot(reason):
                self.messages.append(f"rebooting: {reason}")
                self.rebooted = True
                self.dev.runtime.reboot(reason)
        return None

    # --- install ----------------------------------------------------------------------------
    def install(self, stream: BinaryIO, *, total: int = 0, progress: Progress | None = None,
                replace_trial: bool = True, writer: PayloadWriter | None = None) -> InstallResult:
        """Install a bundle into the inactive slot and arm its trial. ``replace_trial=False``
        refuses to overwrite a trial that is armed and waiting for its boot (core.plan).
        ``progress`` is told installed bytes against the manifest's installed total, never
        against ``total`` (the source's length: a download's Content-Length, which for a zstd
        bundle is far smaller than what gets installed); ``total`` is only that, for callers.
        ``writer`` replaces the streaming write of the payloads (a delta install)."""
        from agent.adapters import slots
        from agent.adapters.bundle import BundleReader

        if isinstance(progress, PhasedProgress):
            progress.phase("verify")
        with self.locked():
            telemetry.mark(self.cfg, "verify")  # the update's trace (device.telemetry)
            lost = self._lost()
            if lost is None:
                self._sync_boot()
            reader = BundleReader(stream)
            try:
                m, plan = self._prepare(reader, lost, replace_trial=replace_trial)
            except Exception as exc:  # a bug must not leave a refusal unrecorded either
                if lost is None:  # a journal that is not this device's is set aside by recovery
                    self._note_failure(lifecycle.History("refused", None, None, _why(exc)))
                raise
            self._drive(lifecycle.Install(plan.target, plan.previous, m.version, m.security_version,
                                          self.dev.runtime.boot_id(), m.health))
            dest = {w.payload.name: w.dest for w in plan.writes}
            written = 0
            meter = _Meter(progress, _total(m))  # installed bytes over installed bytes
            try:
                if writer is not None:
                    meter.phase("write")
                    written = writer(reader, m, dest)
                for pr in reader.payloads(m) if writer is None else ():
                    path = dest[pr.payload.name]
                    meter.phase("write")
                    # a raw payload is read here and its blocks verified on the writer's
                    # lanes, two buffers at once; a zstd one decodes verified bytes only
                    apart = pr.verify_apart()
                    fill, verify = apart if apart is not None else (pr.readinto, None)
                    written += slots.write_from(
                        path, meter.counting(fill), limit=slots.capacity(path),
                        buffers=slots.ring(size=pr.buffer_size), verify=verify,
                        check=pr.whole_hash_check(), synced=lambda: meter.phase("sync"))
                meter.phase("done")
            except Exception as exc:  # whatever broke the write, the journal must not stay WRITING
                self._note_failure(lifecycle.WriteFailed(_why(exc)))
                raise
            if (root := self.root()) is not None:
                for p in m.payloads:  # measured once written and fsynced, before the trial is set
                    root.measure(f"install:{p.name}:{plan.target}", bytes.fromhex(p.sha256))
            self._fix_up(plan, m.version)  # verified and synced; the trial is not armed yet
            self._drive(lifecycle.WriteDone())
            return InstallResult(m.version, plan.target, written, [p.name for p in m.payloads])

    def _fix_up(self, plan: InstallPlan, version: str) -> None:
        """Make the written slot's boot files name it (agent.core.fixups), one journal entry per
        fix-up once it is durable. A failure is a failed write: the trial is never armed, the
        old slot boots, and installing again re-applies them (each edit is idempotent)."""
        if not plan.fixups:
            return
        from agent.adapters import fixup_apply

        try:
            for fix in plan.fixups:
                changed = fixup_apply.apply(fix)
                what = f"{fix.fixup.describe(fix.slot)}{'' if changed else ' (already so)'}"
                self.journal.record([lifecycle.History("fixup", fix.slot, version, what)],
                                    now=self.clock())
                self.messages.append(f"fixup: slot {fix.slot} {what}")
        except Exception as exc:  # as for the payload write: the journal must not stay WRITING
            self._note_failure(lifecycle.WriteFailed(f"fix-up: {_why(exc)}"))
            raise

    def _note_failure(self, what: lifecycle.History | lifecycle.WriteFailed) -> None:
        """Record why an install stopped, if the journal can still be written. On a full disk it
        cannot: the error that stopped the install is the one to report, and a WRITING phase
        left behind is closed as "interrupted" by the next start (``Booted``, same boot)."""
        try:
            if isinstance(what, lifecycle.WriteFailed):
                self._drive(what)
            else:
                self.journal.record([what], now=self.clock())
        except DeviceError as exc:
            self.messages.append(f"not recorded: {exc.one_line()}")

    def _prepare(self, reader: BundleReader, lost: JournalLost | None = None, *,
                 replace_trial: bool = True) -> tuple[Manifest, InstallPlan]:
        """Verify, plan and check room before anything on the device changes (as RAUC's
        do_install_bundle): a refusal leaves the journal's trusted time and CRLs as they were.
        The floor and time the witness knows count too, and a lost journal refuses every
        bundle: one below that floor as a rollback, any other until the journal is recovered."""
        from agent.adapters import slots
        from agent.adapters.truststore import TrustStore
        from agent.core.plan import pending_trial, plan_install

        store = TrustStore(self.cfg, self.journal, self.root())
        seen = self.guard.witnessed
        head = reader.read_head()
        verdict = store.verify(head, self.clock(),
                               floor_at_least=seen.security_floor if seen else 0,
                               time_at_least=seen.trusted_time if seen else 0)
        if lost is not None:
            raise lost
        state, bl = self.journal.state(), self.dev.bootloader
        plan = plan_install(verdict.manifest, phase=state.phase,
                            booted=self.dev.runtime.booted_slot(), primary=bl.primary(),
                            slots=self.cfg.slots, device_health=self.cfg.health_policy,
                            pending=pending_trial(state, bl.trial()), replace_trial=replace_trial,
                            fixups=self.cfg.fixups)
        for w in plan.writes:
            slots.check_fits(w.dest, w.payload.size, w.payload.name)
        # One journal commit, one WAL sync (and one witness update when the time rises) for
        # what the verdict taught: the trusted time and the trial's signer. Nothing acts on the
        # device between the two, and a power cut before the commit leaves neither, as a cut
        # before the first of them did when each had its own (docs/performance.md, "syncs").
        with self.journal.batch():
            store.accept(verdict)  # a newer CRL goes to its own file, durably, as before
            store.remember_trial(head, plan.target, verdict.manifest.version)  # for _vet
        return verdict.manifest, plan

    # --- boot, health, commit ----------------------------------------------------------------
    def _sync_boot(self, *, health: bool = False) -> None:
        """Tell the state machine which boot this is. Only the agent cycle runs health checks;
        every other command just brings the recorded state up to date first. Nothing is
        driven on a journal that does not match its witness (``JournalLost``)."""
        if (lost := self._lost()) is not None:  # the committed slot keeps its tries meanwhile
            raise lost
        rt = self.dev.runtime
        if health and self.cfg.runtime == "linux" and (
                self.journal.state().phase is not lifecycle.Phase.IDLE
                or self.dev.bootloader.trial() is not None):
            # a trial decided off the data partition is forgotten by the next slot
            from agent.device.datapart import require_persistent

            require_persistent(self.cfg)
        self._drive(lifecycle.Booted(rt.booted_slot(), rt.boot_id()), run_health=health)
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

    # --- the journal's witness ---------------------------------------------------------------
    @property
    def guard(self) -> JournalGuard:
        """The journal held to its witness (agent.device.journal_guard), made on first use."""
        if self._guard is None:
            from agent.device.journal_guard import JournalGuard

            self._guard = JournalGuard(self.cfg, self.journal, self.root)
        return self._guard

    def journal_finding(self, *, again: bool = False) -> Finding:
        """Whether the journal is the one its witness knows (judged once; ``again``: now)."""
        return self.guard.finding(again=again)

    def replace_journal(self, journal: Journal) -> None:
        """Use ``journal`` from now on (``edgeops journal recover`` made it)."""
        self.dev.journal = self.journal = self.guard.journal = journal

    def _lost(self) -> JournalLost | None:
        """Why the journal cannot be used (the committed slot is still confirmed), or None."""
        lost = self.guard.lost()
        if lost is not None:
            self._confirm_boot()
        return lost

    def register_process(self) -> Path | None:
        """Tell a runtime that tracks agent processes (the sim board) that this one runs;
        returns the file to remove when the process ends, or None."""
        rt = self.dev.runtime
        return rt.register_process() if isinstance(rt, RegistersProcess) else None

    def root(self) -> RootOfTrust | None:
        """The TPM (or provisioned keystore) if this device opted in; opened once per Updater."""
        if not self._root_opened:
            from agent.adapters import rot

            self._root = rot.root_for_updater(self.cfg.tpm, self.cfg.state_dir)
            self._root_opened = True
        return self._root

    def cycle(self) -> CycleResult:
        """One agent cycle: note the boot, finish what a previous boot left, run a pending trial."""
        with self.locked():
            self._sync_boot(health=True)
        return CycleResult(str(self.journal.state().phase), self.messages, self.rebooted)

    def reboot_into_trial(self, reason: str) -> None:
        """Start the armed trial now (the fleet agent, once its install returned): the reboot is
        the life cycle's action like every other. No lock: it writes nothing, and a reboot
        must not wait for a technician's command."""
        self._drive(lifecycle.RebootIntoTrial(reason))

    def _run_health(self) -> lifecycle.Event:
        """Probe until ``health.decide`` commits or reverts, or a technician decides first."""
        from agent.adapters import probes

        try:
            policy = self.policy()
        except ConfigError as exc:
            # Checks that cannot run give no verdict to wait for; waiting would only mean an
            # agent failing the same way at every start until the bootloader gives up.
            return lifecycle.HealthFailed(f"health checks cannot run: {exc}")
        # The deadline counts from the first health run of this boot, so an agent
        # that keeps restarting mid-trial cannot extend it (CLOCK_MONOTONIC is per boot).
        boot_id = self.dev.runtime.boot_id()
        mark = self.journal.get("trial_started")
        if not mark or mark.get("boot_id") != boot_id:
            mark = {"boot_id": boot_id, "monotonic": time.monotonic()}
            self.journal.put("trial_started", mark)
        started = float(mark["monotonic"])
        results: list[ProbeResult] = []
        trial_log = logs.get("edgeops.trial")
        rounds = 0
        while True:
            round_ = probes.run_all(policy.probes)
            results += round_
            telemetry.health(self.cfg, ((r.name, r.ok, r.duration) for r in round_))
            rounds += 1
            decision = health.decide(policy, results, started=started, now=time.monotonic())
            if decision.verdict == "commit":
                return lifecycle.HealthPassed(decision.reason)
            if decision.verdict == "revert":
                return lifecycle.HealthFailed(decision.reason)
            # one line per round while it waits: which probes, which attempt, how long is left
            left = max(0.0, policy.deadline - (time.monotonic() - started))
            trial_log.info("trial health round %d: %s (a probe reverts after %d failures in a row); "
                           "%.0f s of %g s left", rounds, decision.reason, policy.retries, left,
                           policy.deadline)
            # sleep until the next round, taking a technician's verdict as soon as it comes
            if (good := self.verdicts.wait(boot_id, policy.interval, sleep=self.sleep)) is not None:
                return _verdict_event(good)

    def policy(self) -> health.HealthPolicy:
        """The trial's checks: the device's (parsed with its config) plus the bundle's."""
        base = self.cfg.health_policy
        override = self.journal.state().health
        if not override:
            return base
        if self._override is None or self._override[0] != override:
            self._override = (override, health.parse_policy(override, base=base))
        return self._override[1]

    def health_report(self) -> list[ProbeResult]:
        from agent.adapters import probes

        return probes.run_all(self.policy().probes)

    def mark_good(self) -> None:
        self._operator_verdict(good=True)

    def mark_bad(self) -> None:
        self._operator_verdict(good=False)

    def _operator_verdict(self, *, good: bool) -> None:
        # A technician's verdict must not wait for the agent's health loop, which holds the lock
        # for up to the whole deadline: when the lock is busy the verdict is handed to that loop
        # (agent.adapters.verdict), and taken before its next probe round.
        what = "mark-good" if good else "mark-bad"
        give_up = time.monotonic() + 5.0  # the agent may be just starting its cycle
        while True:
            try:
                with self.locked():
                    self._sync_boot()
                    self._require(lifecycle.Phase.TESTING, what)
                    self._drive(_verdict_event(good))
                return
            except DeviceBusy:
                if self.journal.state().phase is lifecycle.Phase.TESTING:
                    break
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.1)
        box = self.verdicts
        box.post(good=good, boot_id=self.dev.runtime.boot_id())
        # The loop looks between its sleeps and after each probe round; a round
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

    def rollback(self) -> str:
        from agent.core.plan import plan_rollback

        with self.locked():
            self._sync_boot()
            self._require(lifecycle.Phase.IDLE, "rollback")
            floor = self.journal.security_floor
            if (root := self.root()) is not None:
                floor = max(floor, root.floor())  # the TPM's counter outlives a re-imaged journal
            other, version = plan_rollback(booted=self.dev.runtime.booted_slot(), slots=self.cfg.slots,
                                           held=self.journal.slots(), floor=floor)
            self._drive(lifecycle.Rollback(other, version))
            return other

    def _require(self, phase: lifecycle.Phase, what: str) -> None:
        now = self.journal.state().phase
        if now is not phase:
            raise StateError(f"'{what}' needs the device to be {phase}, it is {now}")

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        from agent.device import status

        return status.describe(self.cfg, self.dev, self._journal_word())

    def _journal_word(self) -> str:
        from agent.device import status

        finding = self.journal_finding()
        return status.journal_word(finding.verdict, finding.reason)


def _verdict_event(good: bool) -> lifecycle.Event:
    if good:
        return lifecycle.HealthPassed("marked good by operator")
    return lifecycle.HealthFailed("marked bad by operator")


def _why(exc: Exception) -> str:
    return exc.one_line() if isinstance(exc, EdgeopsError) else f"{type(exc).__name__}: {exc}"


def _total(m: Manifest) -> int:
    return sum(p.size for p in m.payloads)


class _Meter:
    """Feeds a progress display installed bytes against the manifest's installed total (a
    download's Content-Length counts stored, perhaps compressed, bytes plus the bundle's head),
    and its phase when it has one (``PhasedProgress``)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def phase(self, name: str) -> None:
        if isinstance(self.progress, PhasedProgress):
            self.progress.phase(name)

    def counting(self, fill: Callable[[memoryview], int]) -> Callable[[memoryview], int]:
        if self.progress is None:
            return fill
        report = self.progress

        def counted(buf: memoryview) -> int:
            n = fill(buf)
            self.done += n
            report(self.done, self.total)
            return n

        return counted
