"""The model updater's shell: verify → stream → validate → store → switch → report.

Nothing is activated before every check passed; every refusal is written to the
journal's history and outbox and raised as a typed error. Policy lives in
``spec``/``validate``/``health``; bytes on disk in ``store``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from agent.adapters import tflite as validate_mod
from agent.adapters.bundle import BundleReader
from agent.adapters.journal import Journal
from agent.adapters.model_store import MODEL_FILE, VALIDATION_FILE, ModelStore, VersionInfo, write_file
from agent.core import lifecycle, logs
from agent.core import model_spec as spec_mod
from agent.core.config import AgentConfig
from agent.core.manifest import Manifest, Payload
from agent.core.model_health import HealthPolicy
from agent.core.outbox import MODEL_KIND
from agent.errors import (
    ConfigError,
    EdgeopsError,
    ModelBundleError,
    ModelStateError,
    ModelTooLarge,
    RollbackRefused,
)

log = logs.get("edgeops.models")
REPORT_KIND = MODEL_KIND


@dataclass(frozen=True)
class ModelSettings:
    root: Path
    keep: int = 3  # versions kept per model (current and last-known-good are never deleted)
    budget_bytes: int = 256 << 20  # all models together
    health: HealthPolicy = field(default_factory=HealthPolicy)
    notify_pidfile: Path | None = None  # signal this process when `current` changes
    notify_signal: int = int(signal.SIGHUP)
    notify_socket: Path | None = None  # or send a JSON line to this unix datagram socket


def settings_from_config(cfg: AgentConfig) -> ModelSettings:
    """The optional [models] table of the agent config (docs/models.md), as loaded with it."""
    return settings_from_dict(cfg.models, cfg.state_dir / "models", cfg.base)


def settings_from_dict(doc: dict[str, Any], default_root: Path, base: Path) -> ModelSettings:
    try:
        sig = doc.get("notify_signal", "SIGHUP")
        return ModelSettings(
            root=base / doc["dir"] if "dir" in doc else default_root,
            keep=max(2, int(doc.get("keep", 3))),
            budget_bytes=int(doc.get("budget_bytes", 256 << 20)),
            health=HealthPolicy.from_dict(doc.get("health", {})),
            notify_pidfile=base / doc["notify_pidfile"] if "notify_pidfile" in doc else None,
            notify_signal=int(getattr(signal, sig)) if isinstance(sig, str) else int(sig),
            notify_socket=base / doc["notify_socket"] if "notify_socket" in doc else None,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"[models]: {exc}") from None


@dataclass(frozen=True)
class InstallResult:
    name: str
    version: str
    previous: str | None
    report: validate_mod.ValidationReport
    pruned: list[str]


class ModelManager:
    """Installs, commits, reverts and rolls back models. ``cfg`` is needed only to install."""

    def __init__(self, settings: ModelSettings, journal: Journal | None, *,
                 cfg: AgentConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = ModelStore(settings.root)
        self.journal = journal
        self.cfg = cfg
        self.clock = clock

    @contextmanager
    def locked(self) -> Iterator[None]:
        # A lock of its own, not the device lock: a model may be installed during an OS install.
        self.settings.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.settings.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- install ----------------------------------------------------------------------------
    def install(self, stream: BinaryIO) -> InstallResult:
        if self.cfg is None:
            raise RuntimeError("install() needs the agent config")
        # lazy: only installing needs the root of trust and cryptography (ModelHost does not)
        from agent.adapters import rot
        from agent.adapters.truststore import TrustStore

        with self.locked():
            reader = BundleReader(stream)
            name = version = None
            staging: Path | None = None
            try:
                head = reader.read_head()
                trust = TrustStore(self.cfg, self._journal(),
                                   rot.root_for_updater(self.cfg.tpm, self.cfg.state_dir))
                verdict = trust.verify(head, self.clock(), device_floor=False)
                m = verdict.manifest
                model, val, spec = _model_payloads(m)
                name, version = model.name, m.version
                if m.security_version < (floor := self.floor(name)):
                    raise RollbackRefused(f"model {name} {version} has security_version "
                                          f"{m.security_version}, below this model's floor {floor}",
                                          hint="pack the model with --security-version at or "
                                               "above the floor")
                self._check_room(name, version, model.size + val.size)
                trust.accept(verdict)
                staging = self.store.stage(name)
                for pr in reader.payloads(m):
                    dest = staging / (MODEL_FILE if pr.payload is model else VALIDATION_FILE)
                    write_file(dest, pr.installed_chunks(), limit=pr.payload.size)
                data = (staging / MODEL_FILE).read_bytes()
                vset = spec_mod.load_validation((staging / VALIDATION_FILE).read_bytes(), spec)
                report = validate_mod.validate(data, vset, spec)
            except (EdgeopsError, OSError) as exc:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                reason = exc.one_line() if isinstance(exc, EdgeopsError) else f"I/O error: {exc}"
                self._report("refused", name, version, reason)
                raise
            info = VersionInfo(version, "trial", self.clock(), 0, model.sha256, m.security_version,
                               spec.to_meta())
            self._make_room(0)  # the staged files already count in the store's usage
            self.store.commit(name, staging, info)
            previous = self.store.current(name)
            self.store.point(name, "current", version)
            if self.store.good(name) is None:
                # the first model has nothing to fall back to: it is the last-known-good
                self.store.point(name, "good", version)
            pruned = self.store.prune(name, self.settings.keep)
            self._report("activated", name, version,
                         f"validated {report.cases} cases, max error {report.max_abs_error:.3g}, "
                         f"median {report.median_ms:.3f} ms", previous=previous)
        self.notify(name, version, "activated")
        return InstallResult(name, version, previous, report, pruned)

    def _check_room(self, name: str, version: str, incoming: int) -> None:
        if (self.store.dir(name) / version).exists():
            raise ModelStateError(f"version {version} of model {name} is already installed",
                                  hint="ship a new version, or use 'edgeops model rollback'")
        budget = self.settings.budget_bytes
        fixed = self.store.protected_usage()
        if fixed + incoming > budget:
            raise ModelTooLarge(f"model {name} {version} needs {incoming} bytes; with the running "
                                f"and last-known-good models ({fixed} bytes) that exceeds the "
                                f"budget of {budget} bytes")
        free = shutil.disk_usage(self.settings.root).free
        if incoming > free:
            raise ModelTooLarge(f"model {name} {version} needs {incoming} bytes, the disk has {free}")
        # Older versions are deleted for the budget only once the new one has been verified
        # and validated (_make_room): a tampered bundle must not cost the device its fallbacks.

    def _make_room(self, incoming: int) -> None:
        for gone in self.store.make_room(incoming, self.settings.budget_bytes):
            log.info("deleted %s to make room", gone)

    # --- after the swap: the health verdict, made by agent.device.modelhost ------------------------
    def commit(self, name: str, version: str, reason: str) -> bool:
        with self.locked():
            if self.store.current(name) != version:
                return False  # something newer was installed meanwhile
            old = self.store.good(name)
            if old and old != version and self.store.info(name, old).state == "trial":
                # it served as the fallback (the first model is made last-known-good unjudged)
                self.store.set_state(name, old, "good", "was last-known-good")
            self.store.set_state(name, version, "good", reason)
            self.store.point(name, "good", version)
            sv = self.store.info(name, version).security_version
            if self.journal is not None and sv > self.floor(name):
                self.journal.put(_floor_key(name), sv)  # as the OS floor rises at commit
            self._report("good", name, version, reason)
        return True

    def _check_floor(self, name: str, version: str) -> None:
        sv = self.store.info(name, version).security_version
        if sv < (floor := self.floor(name)):
            raise RollbackRefused(f"model {name} {version} has security_version {sv}, below this "
                                  f"model's floor {floor}",
                                  hint="a model with a security fix cannot be rolled back; "
                                       "install a newer version instead")

    def floor(self, name: str) -> int:
        """Each model's own anti-rollback floor: the highest security_version judged good.
        Models and the OS are released on their own cadence, so they do not share one."""
        return int(self.journal.get(_floor_key(name), 0)) if self.journal is not None else 0

    def revert(self, name: str, version: str, reason: str) -> str | None:
        """Put the last-known-good model back; returns its version, or None if there is none."""
        with self.locked():
            good = self.store.good(name)
            if self.store.current(name) != version:
                return None
            if good is None or good == version:
                self._report("unhealthy", name, version, f"{reason}; no other last-known-good "
                                                        f"model to revert to")
                return None
            self.store.set_state(name, version, "bad", reason)
            self.store.point(name, "current", good)
            self._report("reverted", name, version, reason, previous=good)
        self.notify(name, good, "reverted")
        return good

    def rollback(self, name: str) -> str:
        """Operator's revert: back to the last-known-good, or to the good version before it."""
        with self.locked():
            cur = self.store.current(name)
            if cur is None:
                raise ModelStateError(f"no model named {name} is installed")
            target = self.store.good(name)
            if target == cur:
                older = [v for v in self.store.versions(name)
                         if v.state == "good" and v.version != cur]
                if not older:
                    raise ModelStateError(f"model {name} has no other good version to roll back to")
                target = older[-1].version
                self._check_floor(name, target)
                self.store.point(name, "good", target)
            assert target is not None
            state = self.store.info(name, cur).state
            self.store.set_state(name, cur, "bad" if state == "trial" else state,
                                 "rolled back by operator")
            self.store.point(name, "current", target)
            self._report("rolled-back", name, cur, "rolled back by operator", previous=target)
        self.notify(name, target, "rolled-back")
        return target

    # --- reads --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        models = {}
        for name in self.store.names():
            cur, good = self.store.current(name), self.store.good(name)
            models[name] = {
                "current": cur, "good": good,
                "state": self.store.info(name, cur).state if cur else None,
                "versions": [{"version": v.version, "state": v.state, "size": v.size,
                              "installed": v.installed, "current": v.version == cur,
                              "good": v.version == good, "reason": v.reason}
                             for v in self.store.versions(name)],
            }
        return {"root": str(self.settings.root), "usage_bytes": self.store.usage(),
                "budget_bytes": self.settings.budget_bytes, "keep": self.settings.keep,
                "models": models}

    # --- reporting and notification -------------------------------------------------------------
    def _journal(self) -> Journal:
        if self.journal is None:
            raise RuntimeError("this operation needs the journal")
        return self.journal

    def _report(self, status: str, name: str | None, version: str | None, reason: str, *,
                previous: str | None = None) -> None:
        if self.journal is None:
            log.warning("model %s %s %s: %s", name, version, status, reason)
            return
        now = self.clock()
        detail = f"model {name or '?'}: {reason}"
        self.journal.record([lifecycle.History(f"model-{status}", None, version, detail)], now=now)
        self.journal.enqueue(REPORT_KIND, {"model": name, "version": version, "status": status,
                                           "reason": reason, "previous": previous}, now=now)

    def notify(self, name: str, version: str, event: str) -> None:
        """Best effort: tell an application that does not embed ModelHost to reload."""
        s = self.settings
        if s.notify_pidfile is not None:
            try:
                os.kill(int(s.notify_pidfile.read_text().strip()), s.notify_signal)
            except (OSError, ValueError) as exc:
                log.warning("cannot signal the process in %s: %s", s.notify_pidfile, exc)
        if s.notify_socket is not None:
            line = json.dumps({"model": name, "version": version, "event": event,
                               "path": str(self.store.model_path(name, version))}) + "\n"
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.sendto(line.encode(), str(s.notify_socket))
            except OSError as exc:
                log.warning("cannot notify %s: %s", s.notify_socket, exc)


def _model_payloads(m: Manifest) -> tuple[Payload, Payload, spec_mod.ModelSpec]:
    models = [p for p in m.payloads if p.slot_class == spec_mod.MODEL_CLASS]
    if not models:
        classes = ", ".join(sorted({p.slot_class for p in m.payloads}))
        raise ModelBundleError(f"this is not a model bundle: its payloads are {classes}",
                               hint="install an OS or app bundle with 'edgeops install'")
    if len(models) > 1:
        raise ModelBundleError(f"the bundle holds {len(models)} '{spec_mod.MODEL_CLASS}' payloads, "
                               f"a model bundle holds one")
    model = models[0]
    spec = spec_mod.spec_from_meta(model.meta, f"payload '{model.name}'")
    try:
        val = m.payload(spec.validation)
    except KeyError:
        raise ModelBundleError(f"validation payload '{spec.validation}' is not in the bundle") from None
    if val.slot_class != spec_mod.VALIDATION_CLASS:
        raise ModelBundleError(f"payload '{val.name}' has class '{val.slot_class}', "
                               f"expected '{spec_mod.VALIDATION_CLASS}'")
    if len(m.payloads) != 2:
        raise ModelBundleError(f"a model bundle holds 2 payloads (model, validation), "
                               f"this one {len(m.payloads)}")
    return model, val, spec


def _floor_key(name: str) -> str:
    return f"model-floor:{name}"
