"""The device side of Eclipse hawkBit's DDI API v1, over ``requests``, and the policy shell
that turns polls into installs and reports.

Protocol references (cited where each shape is used):
  * https://eclipse.dev/hawkbit/apis/ddi_api/ — base poll resource, deploymentBase,
    cancelAction, feedback execution/result mapping, configData, authentication
    (``Authorization: TargetToken <token>`` / ``GatewayToken <token>``, or client certificates).
  * https://eclipse.dev/hawkbit/rest-api/ddi/ — the OpenAPI of the same resources.

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
"""

from __future__ import annotations

import logging
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import requests

from agent.adapters.download import DownloadPolicy, Origin, ResumableStream, new_session, open_url
from agent.core import ddi, lifecycle
from agent.core.outbox import KIND, MODEL_KIND, Backoff, Rejected, Report, Sync
from agent.core.trust import best_known_time
from agent.device.updater import Updater
from agent.errors import (
    CertificateRefused,
    ConfigError,
    DeviceError,
    EdgeopsError,
    StateError,
    TransportError,
    TrustError,
)

if TYPE_CHECKING:
    from agent.device.identity import FleetIdentity

MAX_CONFIG_ATTRIBUTES = 16  # [fleet] attributes; with ours and the model reports' within ddi's 64
MAX_MODEL_REPORTS = 16  # two attributes each, beside the device's own
log = logging.getLogger(__name__)
ACTION_KEY = "fleet.action"
BUNDLE_SUFFIXES = (".bundle", ".eob", ".edgeops")


# --- configuration -------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetConfig:
    url: str  # controller origin, e.g. https://ddi.example.com
    controller_id: str
    tenant: str = "DEFAULT"
    auth: str = "none"  # none | target | gateway
    token: str = field(default="", repr=False)  # never printed, never logged
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_cert: Path | None = None
    identity: bool = False  # mTLS with the device identity (TPM-sealed key), renewed by the agent
    poll_interval: float = 300.0  # used when the server gives no config.polling.sleep
    min_sleep: float = 1.0
    max_sleep: float = 86400.0
    push: str = "longpoll"  # longpoll | none
    longpoll_wait: float = 60.0
    max_attempts: int = 5
    download: DownloadPolicy = field(default_factory=DownloadPolicy)
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.url.rstrip('/')}/{self.tenant}/controller/v1/{self.controller_id}"


def parse_fleet(table: dict[str, Any], base: Path, where: str = "[fleet]") -> FleetConfig:
    def path(key: str) -> Path | None:
        v = table.get(key)
        return base / str(v) if v else None

    try:
        url = str(table["url"])
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: url must be http(s)://host[:port]")
        auth = str(table.get("auth", "none"))
        if auth not in ("none", "target", "gateway"):
            raise ConfigError(f"{where}: auth must be none, target or gateway")
        token = str(table.get("token", ""))
        token_file = path("token_file")
        if token_file is not None:
            token = token_file.read_text().strip()
        if auth != "none" and not token:
            raise ConfigError(f"{where}: auth = {auth!r} needs token or token_file")
        dl = DownloadPolicy(
            connect_timeout=float(table.get("connect_timeout", 10)),
            read_timeout=float(table.get("read_timeout", 30)),
            max_resumes=int(table.get("max_resumes", 8)),
            bandwidth=float(table["bandwidth"]) if table.get("bandwidth") else None,
            min_rate=float(table.get("min_rate", 0)),
            min_rate_window=float(table.get("min_rate_window", 60)))
        push = str(table.get("push", "longpoll"))
        if push not in ("longpoll", "none"):
            raise ConfigError(f"{where}: push must be longpoll or none")
        identity = table.get("identity", False)
        if not isinstance(identity, bool):
            raise ConfigError(f"{where}: identity must be true or false")
        if identity and (not table.get("ca_cert") or table.get("client_cert")):
            raise ConfigError(f"{where}: identity = true needs ca_cert and no client_cert/client_key "
                              "(the key is the device's sealed identity key; docs/tpm.md)")
        attrs = table.get("attributes", {})
        if not isinstance(attrs, dict):
            raise ConfigError(f"{where}: attributes must be a table")
        if len(attrs) > MAX_CONFIG_ATTRIBUTES:
            raise ConfigError(f"{where}: at most {MAX_CONFIG_ATTRIBUTES} attributes")
        return FleetConfig(
            url=url, controller_id=str(table["controller_id"]),
            tenant=str(table.get("tenant", "DEFAULT")), auth=auth, token=token,
            client_cert=path("client_cert"), client_key=path("client_key"),
            ca_cert=path("ca_cert"), identity=identity,
            poll_interval=float(table.get("poll_interval", 300)),
            min_sleep=float(table.get("min_sleep", 1)),
            max_sleep=float(table.get("max_sleep", 86400)),
            push=push, longpoll_wait=float(table.get("longpoll_wait", 60)),
            max_attempts=int(table.get("max_attempts", 5)), download=dl,
            attributes={str(k): str(v) for k, v in attrs.items()})
    except KeyError as exc:
        raise ConfigError(f"{where}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError, OSError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_fleet(agent_toml: Path) -> FleetConfig:
    """``[fleet]`` from agent.toml when present, else from fleet.toml beside it (so an image
    can ship the board's agent.toml unchanged and add the fleet settings per site)."""
    cfg = find_fleet(agent_toml)
    if cfg is None:
        raise ConfigError(f"no [fleet] section in {agent_toml} or "
                          f"{agent_toml.parent / 'fleet.toml'}",
                          hint="add [fleet] url = ..., controller_id = ... (docs/fleet-agent.md)")
    return cfg


def find_fleet(agent_toml: Path) -> FleetConfig | None:
    """Like load_fleet, but None when the device is not managed by a fleet controller."""
    for candidate in (agent_toml, agent_toml.parent / "fleet.toml"):
        try:
            doc = tomllib.loads(candidate.read_text())
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {candidate}: {exc}") from None
        if isinstance(doc.get("fleet"), dict):
            return parse_fleet(doc["fleet"], candidate.parent, f"{candidate} [fleet]")
    return None


# --- HTTP ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PollAnswer:
    base: ddi.BaseResource | None  # None: 304 Not Modified (nothing new)
    etag: str | None


class DdiClient:
    def __init__(self, cfg: FleetConfig, session: requests.Session | None = None) -> None:
        self.cfg = cfg
        self.session = session or new_session()
        headers = {"Accept": "application/hal+json, application/json"}
        if cfg.auth == "target":
            headers["Authorization"] = f"TargetToken {cfg.token}"
        elif cfg.auth == "gateway":
            headers["Authorization"] = f"GatewayToken {cfg.token}"
        cert = ((str(cfg.client_cert), str(cfg.client_key or cfg.client_cert))
                if cfg.client_cert else None)
        self.origin = Origin(cfg.url, headers, cert, str(cfg.ca_cert) if cfg.ca_cert else True)
        self.timeout = (cfg.download.connect_timeout, cfg.download.read_timeout)

    def url(self, path: str = "") -> str:
        return f"{self.cfg.base_url}/{path}" if path else self.cfg.base_url

    def _get_json(self, url: str, headers: dict[str, str] | None = None,
                  timeout: tuple[float, float] | None = None) -> tuple[int, bytes, dict[str, str]]:
        try:
            resp = open_url(self.session, self.origin, url, headers or {}, timeout or self.timeout)
            with resp:
                body = resp.raw.read(ddi.MAX_DOCUMENT + 1, decode_content=True) or b""
                code, hdrs = resp.status_code, dict(resp.headers)
        except (requests.RequestException, OSError) as exc:
            raise _failure(f"GET {_redact(url)}", exc) from None
        if code >= 400:
            from agent.adapters.tls import http_failure  # names an mTLS refusal (expired, revoked...)

            raise http_failure(f"GET {_redact(url)}", code, body)
        return code, body, hdrs

    def poll(self, *, etag: str | None = None, wait: float = 0) -> PollAnswer:
        """GET the base resource. ``wait`` > 0 asks a long-poll capable controller to hold the
        request (RFC 7240 ``Prefer: wait``) until something changes; see agent.device.push."""
        headers = {}
        if etag:
            headers["If-None-Match"] = etag  # the base resource supports ETags (DDI guide)
        if wait > 0:
            headers["Prefer"] = f"wait={int(wait)}"
        timeout = (self.timeout[0], self.timeout[1] + wait)
        code, body, hdrs = self._get_json(self.url(), headers, timeout)
        new_etag = hdrs.get("ETag") or hdrs.get("Etag")
        if code == 304:
            return PollAnswer(None, etag)
        return PollAnswer(ddi.parse_base(body), new_etag)

    def deployment(self, href: str) -> ddi.Deployment:
        return ddi.parse_deployment(self._get_json(href)[1])

    def cancel(self, href: str) -> ddi.Cancel:
        return ddi.parse_cancel(self._get_json(href)[1])

    def send(self, report: Report) -> None:
        """Deliver one queued report (Sync's Send). 2xx = delivered."""
        url = self.url(report.path)
        kw = self.origin.request_kwargs(url)
        headers = {**kw["headers"], "Idempotency-Key": report.key}
        try:
            resp = self.session.request(report.method, url, json=report.body, headers=headers,
                                        cert=kw["cert"], verify=kw["verify"],
                                        timeout=self.timeout, allow_redirects=False)
            resp.close()
        except (requests.RequestException, OSError) as exc:
            raise _failure(f"{report.method} {report.path}", exc) from None
        code = resp.status_code
        if 200 <= code < 300:
            return
        if code in (409, 410) and report.path.endswith("/feedback"):
            return  # the action is already closed on the server: nothing left to tell it
        if 400 <= code < 500 and code not in (401, 403, 408, 429):
            raise Rejected(f"{report.method} {report.path} answered HTTP {code}")
        raise TransportError(f"{report.method} {report.path} answered HTTP {code}")

    def open_artifact(self, artifact: ddi.Artifact, *,
                      sleep: Callable[[float], None] = time.sleep) -> ResumableStream:
        return ResumableStream(self.session, self.origin, artifact.url, size=artifact.size,
                               sha256=artifact.sha256, policy=self.cfg.download, sleep=sleep)


def _failure(what: str, exc: BaseException) -> TransportError:
    from agent.adapters.tls import transport_failure  # says so when the controller refused our cert

    return transport_failure(what, exc)


def _redact(url: str) -> str:
    return url.split("?", 1)[0]  # query strings may carry signed-URL secrets


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
            from agent.device.identity import FleetIdentity

            identity = FleetIdentity.for_agent(updater.cfg, self.cfg)
        self.identity = identity
        if identity is not None:
            identity.attach(client.session)
        self._offline = False  # the last poll failed: renew once connectivity returns
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
        self.sync.flush()
        try:
            answer = self.client.poll()
        except TransportError as exc:
            self._offline, self._refused = True, isinstance(exc, CertificateRefused)
            delay = self.poll_backoff.next_delay()
            return PollOutcome(delay, self.messages, error=exc.one_line())
        self.poll_backoff.reset()
        self._refused = False
        if self._offline:
            self._offline = False
            self._renew(connectivity_returned=True)
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
        s = base.sleep if base is not None and base.sleep is not None else self.cfg.poll_interval
        return min(max(s, self.cfg.min_sleep), self.cfg.max_sleep)

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
        stream = self.client.open_artifact(artifact, sleep=self.sleep)
        marks = _Quartiles(lambda cnt: self._feedback(
            aid, ddi.Feedback("proceeding", "none", ("downloading",), ddi.Progress(cnt, 4))))
        try:
            result = self.up.install(cast(BinaryIO, stream), total=artifact.size, progress=marks)
        except StateError as exc:
            self.messages.append(f"device busy, will retry: {exc}")
            return False
        except TrustError as exc:  # bad bytes: retrying the same artifact cannot help
            self._final(aid, "failure", f"install refused: {exc.one_line()}")
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
        self._set_action({"id": aid, "stage": "installed", "attempts": attempts,
                          "slot": result.slot, "version": result.version})
        self._feedback(aid, ddi.Feedback("downloaded", "none", (
            f"{result.version} written to slot {result.slot}; trial boot next",)))
        return self._reboot_into_trial(aid)

    def _reboot_into_trial(self, aid: str) -> bool:
        self.sync.flush(force=True)  # tell the server before the link goes down for the reboot
        self.messages.append(f"rebooting into the trial of action {aid}")
        self.up.dev.runtime.reboot(f"trial boot for fleet action {aid}")
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
        return {"controller": _redact(self.cfg.base_url), "auth": self.cfg.auth,
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
