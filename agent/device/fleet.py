"""The fleet agent: the policy shell that turns DDI polls into installs and reports.

The HTTP is ``agent.adapters.ddi_http.DdiClient``, the documents ``agent.core.ddi``, the settings
``agent.core.fleet_config`` (read from disk once by ``agent.device.fleet_files``); this module
decides what a poll means for the device and drives ``Updater`` accordingly.

Report semantics (why rollouts can trust them): ``closed``+``success`` is sent only after
the new slot was committed by its health checks on the trial boot; ``closed``+``failure``
when the trial reverted or the install was refused. Before that the server sees
``proceeding`` (download started, progress), ``downloaded`` (image written, trial armed).

Crash safety: the action id and stage are saved in the journal (kv ``fleet.action``) before
each side effect. After a reboot or power cut:
  * stage ``downloading``: the lifecycle already rolled the half-written slot back to empty;
    the next poll starts the action's download again from byte 0 — the bundle head must be
    re-verified anyway, and ``Updater.install`` is idempotent on the inactive slot;
  * stage ``installed``: the trial runs (``Updater.cycle``); ``reconcile`` reports its end;
    if the reboot itself never happened (crash right before it) it is done now.
Final reports use deterministic idempotency keys (``<action>:closed``) so a report queued
twice across a crash is still one report to a deduplicating server.
Long because (a little over 400 lines) the poll, the install with its delta path and
telemetry marks, the reports and the console's audit forwarding share the one action record
and its crash rules above; apart, each would re-read them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from agent.adapters.ddi_http import DdiClient, redact
from agent.adapters.download import DownloadCancelled
from agent.core import ddi, lifecycle, logs
from agent.core.fleet_config import FleetConfig
from agent.core.outbox import KIND, MODEL_KIND, Backoff, Report, Sync
from agent.core.trust import best_known_time
from agent.device import telemetry
from agent.device.attestation import Attestor
from agent.device.fleet_files import find_fleet, load_fleet
from agent.device.identity import FleetIdentity
from agent.device.push import next_poll
from agent.device.updater import Updater
from agent.errors import (
    CertificateRefused,
    DeviceError,
    EdgeopsError,
    StateError,
    Throttled,
    TransportError,
    TrustError,
)

MAX_MODEL_REPORTS = 16  # two attributes each, beside the device's own
log = logs.get(__name__)
ACTION_KEY = "fleet.action"
CANCEL_CHECK = 30.0  # seconds between looks for a cancel while a download runs
BUNDLE_SUFFIXES = (".bundle", ".eob", ".edgeops")


# --- the policy shell ----------------------------------------------------------------------
@dataclass
class PollOutcome:
    sleep: float
    messages: list[str] = field(default_factory=list)
    rebooted: bool = False
    error: str | None = None


class FleetAgent:
    def __init__(self, updater: Updater, client: DdiClient, *, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 identity: FleetIdentity | None = None) -> None:
        self.up, self.client, self.cfg = updater, client, client.cfg
        self.journal = updater.journal
        self.clock, self.sleep = clock, sleep
        self.sync = Sync(self.journal, client.send, backoff=backoff)
        self.poll_backoff = Backoff(base=2.0, cap=max(self.cfg.poll_interval, 2.0),
                                    rng=backoff.rng if backoff else None)
        self.messages: list[str] = []
        self.etag: str | None = None
        if identity is None and self.cfg.identity:
            identity = FleetIdentity.for_agent(updater.cfg, self.cfg)
        self.identity = identity
        if identity is not None:
            identity.attach(client.session)
        self._offline = False  # the last poll failed: renew once connectivity returns
        self.attestor = Attestor(updater.root, client, self.journal, updater.dev.runtime.boot_id,
                                 interval=self.cfg.attest_interval, clock=clock)
        self._refused = False  # the controller refused our certificate (403 with a reason, TLS alert)

    # --- journal-backed action record ------------------------------------------------------
    def action(self) -> dict[str, Any] | None:
        value = self.journal.get(ACTION_KEY)
        return value if isinstance(value, dict) else None

    def _set_action(self, value: dict[str, Any] | None) -> None:
        self.journal.put(ACTION_KEY, value)

    def _feedback(self, action_id: str, fb: ddi.Feedback, kind: str = "deploymentBase") -> None:
        fb = ddi.Feedback(fb.execution, fb.finished, fb.details, fb.progress,
                          ddi.ddi_time(self.clock()), {"id": action_id})
        self.sync.queue("POST", f"{kind}/{action_id}/feedback", fb.body())
        self.messages.append(f"report {kind} {action_id}: {fb.execution}/{fb.finished}"
                             f"{' ' + fb.details[0] if fb.details else ''}")

    def _final(self, action_id: str, finished: ddi.Finished, detail: str) -> None:
        key = f"{action_id}:closed"
        if not self.journal.get(f"fleet.key.{key}"):
            body = ddi.Feedback("closed", finished, (detail,), None, ddi.ddi_time(self.clock()),
                                {"id": action_id}).body()
            self.journal.enqueue("ddi", Report("POST", f"deploymentBase/{action_id}/feedback",
                                               body, f"{self.cfg.controller_id}:{key}").to_dict())
            self.journal.put(f"fleet.key.{key}", True)
            self.messages.append(f"report deploymentBase {action_id}: closed/{finished} {detail}")
        self._set_action(None)

    # --- one poll ----------------------------------------------------------------------------
    def poll_once(self) -> PollOutcome:
        self.messages = []
        rebooted = self.reconcile()
        if rebooted:
            return PollOutcome(0.0, self.messages, True)
        self._renew(connectivity_returned=False)
        self._forward_model_reports()
        self._forward_console_audit()
        self.sync.flush()
        try:
            answer = self.client.poll()
        except TransportError as exc:
            self._offline, self._refused = True, isinstance(exc, CertificateRefused)
            delay = self.poll_backoff.next_delay()
            if isinstance(exc, Throttled):  # 429: come back no sooner than the controller said
                delay = max(delay, exc.retry_after)
            return PollOutcome(delay, self.messages, error=exc.one_line())
        self.poll_backoff.reset()
        self._refused = False
        if self._offline:
            self._offline = False
            self._renew(connectivity_returned=True)
        if (said := self.attestor.maybe_attest()) is not None:
            self.messages.append(said)
        self.etag = answer.etag
        base = answer.base
        rebooted = False
        if base is not None:
            rebooted = self._act_on(base)
        if not rebooted:
            self.sync.flush(force=True)
        return PollOutcome(self._sleep_for(base), self.messages, rebooted)

    def _renew(self, *, connectivity_returned: bool) -> None:
        """Renew the identity certificate when due (two thirds of its life, not valid at the
        best-known time, or right after connectivity returned). Never fatal for the poll."""
        if self.identity is None:
            return
        now = best_known_time(self.clock(), self.journal.trusted_time)
        try:
            cert = self.identity.maybe_renew(now, connectivity_returned=connectivity_returned,
                                             refused=self._refused)
        except EdgeopsError as exc:
            self.messages.append(f"certificate renewal failed: {exc.one_line()}")
            return
        if cert is not None:
            self._refused = False
            self.messages.append(f"identity certificate renewed: serial {cert.serial_number:x}, "
                                 f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")

    def _sleep_for(self, base: ddi.BaseResource | None) -> float:
        return next_poll(base, self.cfg)  # the idle service paces its own polls the same way

    def _act_on(self, base: ddi.BaseResource) -> bool:
        if base.config_data is not None:
            self._send_attributes()
        try:
            if base.cancel is not None:
                self._handle_cancel(base.cancel)
            elif base.deployment is not None:
                return self._handle_deployment(base.deployment)
        except TransportError as exc:
            self.messages.append(f"will retry: {exc.one_line()}")
        return False

    def _send_attributes(self) -> None:
        # The server shows the configData link until it has the attributes; do not queue a
        # second copy while the first is still waiting in the outbox.
        if any(b.get("path") == "configData" for _, _, b in self.journal.pending(100, kind=KIND)):
            return
        self.sync.queue("PUT", "configData", ddi.config_data_body(self._device_attributes()))

    def _device_attributes(self) -> dict[str, str]:
        attrs = {"edgeops.compatible": self.up.cfg.compatible, "edgeops.board": self.up.cfg.board,
                 **self.cfg.attributes}
        slots = self.journal.slots()
        booted = self.up.dev.runtime.booted_slot()
        if booted in slots and slots[booted].version:
            attrs["edgeops.version"] = str(slots[booted].version)
        return attrs

    def _forward_model_reports(self) -> None:
        """Model swaps and reverts (agent.device.models) reach the controller as device attributes
        (hawkBit shows them on the target), newest last so each model's latest status wins."""
        rows = self.journal.pending(MAX_MODEL_REPORTS, kind=MODEL_KIND)
        if not rows:
            return
        # The device's own attributes travel along: a server that has any configData stops
        # asking for it (hawkBit, and our controller), so these must not arrive alone.
        attrs: dict[str, str] = self._device_attributes()
        for _, _, body in rows:
            name = str(body.get("model") or "?")
            attrs[f"edgeops.model.{name}"] = f"{body.get('version')} {body.get('status')}"
            attrs[f"edgeops.model.{name}.reason"] = str(body.get("reason") or "")
        self.sync.queue("PUT", "configData", ddi.config_data_body(attrs))  # durable first ...
        for oid, _, _ in rows:
            self.journal.mark_sent(oid)  # ... then the model rows are done

    def _forward_console_audit(self) -> None:
        """The console's audit rows (agent.core.console_audit) reach the controller the same
        way: one attribute per row, queued durably before the rows are marked done."""
        from agent.core import console_audit

        rows = self.journal.pending(MAX_MODEL_REPORTS, kind=console_audit.KIND)
        if not rows:
            return
        attrs: dict[str, str] = self._device_attributes()
        attrs.update(console_audit.attribute(oid, body) for oid, _, body in rows)
        self.sync.queue("PUT", "configData", ddi.config_data_body(attrs))
        for oid, _, _ in rows:
            self.journal.mark_sent(oid)

    # --- cancel ------------------------------------------------------------------------------
    def _handle_cancel(self, href: str) -> None:
        cancel = self.client.cancel(href)
        act = self.action()
        if act and act["id"] == cancel.stop_id and act["stage"] == "installed":
            # The image is written and the trial armed or running: the trial decides now.
            fb = ddi.Feedback("rejected", "none",
                              ("already installed; the trial result will be reported",))
        else:
            if act and act["id"] == cancel.stop_id:
                self._set_action(None)
            fb = ddi.Feedback("closed", "success", ("canceled before installing",))
        self._feedback(cancel.action_id, fb, kind="cancelAction")

    # --- deployment --------------------------------------------------------------------------
    def _handle_deployment(self, href: str) -> bool:
        aid = ddi.action_id_from_href(href)
        act = self.action()
        if act and act["id"] == aid and act["stage"] == "installed":
            return False  # the trial's result is reported by reconcile()
        if self.journal.get(f"fleet.key.{aid}:closed"):
            return False  # our final report is still on its way: never install twice
        dep = self.client.deployment(href)
        if not dep.may_install_now:
            return self._defer(dep, act)
        try:
            artifact = pick_bundle(dep)
        except ddi.DdiProtocolError as exc:
            self._final(aid, "failure", str(exc))
            return False
        attempts = int(act["attempts"]) + 1 if act and act["id"] == aid else 1
        self._set_action({"id": aid, "stage": "downloading", "attempts": attempts})
        self._feedback(aid, ddi.Feedback("proceeding", "none", (
            f"downloading {artifact.filename} ({artifact.size} bytes), attempt {attempts}",)))
        self.sync.flush()
        return self._install(aid, artifact, attempts)

    def _defer(self, dep: ddi.Deployment, act: dict[str, Any] | None) -> bool:
        if act and act["id"] == dep.action_id and act["stage"] == "waiting":
            return False
        self._set_action({"id": dep.action_id, "stage": "waiting", "attempts": 0})
        why = (f"waiting: download={dep.download} update={dep.update} "
               f"maintenanceWindow={dep.maintenance_window or 'none'} "
               f"(this agent streams download and install as one step)")
        self._feedback(dep.action_id, ddi.Feedback("scheduled", "none", (why,)))
        return False

    def _install(self, aid: str, artifact: ddi.Artifact, attempts: int) -> bool:
        telemetry.mark(self.up.cfg, "download", action=aid, artifact=artifact.filename)
        stream = self.client.open_artifact(artifact, sleep=self.sleep, cancelled=self._cancel_watch(aid))
        marks = _Quartiles(lambda cnt: self._feedback(
            aid, ddi.Feedback("proceeding", "none", ("downloading",), ddi.Progress(cnt, 4))))
        from agent.device import delta  # by delta where the server allows (zstandard: lazily)

        delta_note: list[str] = []
        try:
            result, stream = delta.for_fleet(self.up, self.client, artifact, stream, marks,
                                             self._cancel_watch(aid), delta_note, sleep=self.sleep)
            result = result or self.up.install(cast(BinaryIO, stream), total=artifact.size,
                                               progress=marks, replace_trial=False)
        except StateError as exc:
            self.messages.append(f"device busy, will retry: {exc}")
            return False
        except TrustError as exc:  # bad bytes: retrying the same artifact cannot help
            self._final(aid, "failure", f"install refused: {exc.one_line()}")
            return False
        except DownloadCancelled as exc:  # the next poll confirms the cancelAction
            self.messages.append(f"download stopped: {exc}")
            return False
        except TransportError as exc:
            if attempts >= self.cfg.max_attempts:
                self._final(aid, "failure", f"download failed {attempts} times: {exc}")
            else:
                self.messages.append(f"download failed, will retry: {exc.one_line()}")
            return False
        except (DeviceError, EdgeopsError) as exc:
            self._final(aid, "failure", f"install failed: {exc.one_line()}")
            return False
        finally:
            stream.close()
        if not delta_note:  # a whole download (no Range): its bytes, as a delta install notes its own
            delta.note_whole(self.up, stream)
        self._set_action({"id": aid, "stage": "installed", "attempts": attempts,
                          "slot": result.slot, "version": result.version})
        self._feedback(aid, ddi.Feedback("downloaded", "none", (
            f"{result.version} written to slot {result.slot}; trial boot next", *delta_note)))
        return self._reboot_into_trial(aid)

    def _cancel_watch(self, aid: str) -> Callable[[], bool]:
        """Asked between reads of a running download: at most every CANCEL_CHECK seconds, one
        poll for a cancelAction of this action (the loop cannot poll while it downloads)."""
        due = [self.clock() + CANCEL_CHECK]

        def cancelled() -> bool:
            if self.clock() < due[0]:
                return False
            due[0] = self.clock() + CANCEL_CHECK
            try:
                base = self.client.poll().base
                return bool(base and base.cancel and self.client.cancel(base.cancel).stop_id == aid)
            except TransportError:
                return False  # the download's own limits decide about a bad link

        return cancelled

    def _reboot_into_trial(self, aid: str) -> bool:
        self.sync.flush(force=True)  # tell the server before the link goes down for the reboot
        self.messages.append(f"rebooting into the trial of action {aid}")
        self.up.reboot_into_trial(f"trial boot for fleet action {aid}")
        return True

    # --- after the trial -----------------------------------------------------------------------
    def reconcile(self) -> bool:
        """Report the end of an installed action once the lifecycle has decided it."""
        act = self.action()
        if not act or act.get("stage") != "installed":
            return False
        phase = self.journal.state().phase
        if phase is lifecycle.Phase.TRIAL_PENDING:
            return self._reboot_into_trial(str(act["id"]))  # we crashed before rebooting
        if phase is not lifecycle.Phase.IDLE:
            return False  # the trial is still running
        info = self.journal.slots().get(str(act["slot"]))
        booted = self.up.dev.runtime.booted_slot()
        if (info is not None and info.state == "good" and info.version == act["version"]
                and booted == act["slot"]):
            self._final(str(act["id"]), "success",
                        f"{act['version']} committed by health checks on slot {act['slot']}")
        else:
            self._final(str(act["id"]), "failure", f"{act['version']} did not pass its trial; "
                        f"{_last_event(self.journal)}; running slot {booted}")
        return False

    @property
    def link_up(self) -> bool:
        """Whether the last poll reached the controller."""
        return not self._offline

    def status(self) -> dict[str, Any]:
        pending = [b for _, _, b in self.journal.pending(1000, kind=KIND)]
        return {"controller": redact(self.cfg.base_url), "auth": self.cfg.auth,
                "action": self.action(), "pending_reports": len(pending),
                "phase": str(self.journal.state().phase)}


def pick_bundle(dep: ddi.Deployment) -> ddi.Artifact:
    """The one edgeops bundle among the deployment's artifacts (DDI chunks[].artifacts[])."""
    arts = dep.artifacts()
    bundles = [a for a in arts if a.filename.endswith(BUNDLE_SUFFIXES)]
    chosen = bundles or (arts if len(arts) == 1 else [])
    if len(chosen) != 1:
        raise ddi.DdiProtocolError(f"expected one bundle artifact, found {len(chosen)} "
                                   f"among {len(arts)} artifacts")
    return chosen[0]


def _last_event(journal: Any) -> str:
    """Why the trial failed: the health verdict if there is one (the revert row after it only
    says which slot runs now), else the write failure or the interruption."""
    rows = list(reversed(journal.history(8)))
    for wanted in (("health-failed",), ("failed", "interrupted", "reverted")):
        for r in rows:
            if r.event in wanted:
                return f"{r.event}: {r.detail}"
    return "no trial result recorded"


class _Quartiles:
    """Progress at 25/50/75 %: enough for a rollout view, few enough to queue durably."""

    def __init__(self, emit: Callable[[int], None]) -> None:
        self.emit, self.last = emit, 0

    def __call__(self, done: int, total: int) -> None:
        q = min(3, 4 * done // total) if total else 0
        if q > self.last:
            self.last = q
            self.emit(q)


# FleetConfig, DdiClient, find_fleet and load_fleet are named here too, where the fleet tools
# (tools/demo_fleet.py, the image test) find what they need to run an agent from one import.
__all__ = ["ACTION_KEY", "BUNDLE_SUFFIXES", "DdiClient", "FleetAgent", "FleetConfig", "PollOutcome",
           "find_fleet", "load_fleet", "pick_bundle"]
