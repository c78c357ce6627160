"""Fleet operations on the database: devices, groups, bundles, actions and rollouts.

The routes (``ddi_routes``, ``api_routes``) call these; so do tests. Every state
change is one transaction, so a controller killed at any point restarts into a
consistent fleet. Actions for a rollout wave are created only when the wave starts:
a device outside the running waves has no action row, so no code path can hand it
the deployment before the gate has passed.

The decisions live in pure modules beside this one, ``actions`` (what a feedback
report does to an action) and ``rollout`` (waves and the health gate); ``bundles``
puts verified bundle files on disk; ``retention`` bounds what devices can make us keep.
What stays here is the SQL that applies them. Long because it is one class (about 600
lines), so that every state change and its transaction can be read in one place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from agent.controller import bundles, pacing, rollout, tokens
from agent.controller import retention as retention_
from agent.controller.actions import (
    TERMINAL,
    gate_outcome,
    next_status,
    parse_feedback,
    report_details,
    stored_report,
    success_signal,
)
from agent.controller.bundles import BundleInfo
from agent.controller.db import Database
from agent.controller.errors import BadRequest, Conflict, NotFound, Unauthorized
from agent.core import logs
from agent.errors import DeviceRevoked

# One line per rollout transition and per failed action (serve turns it up to INFO).
log = logs.get("edgeops.controller.rollouts")


@dataclass(frozen=True)
class PollInfo:
    action_id: int | None
    action_status: str | None
    wants_config: bool



REVOKED = "revoked:"  # prefix of a revoked device's stored token digest (Fleet.revoke_token)


def _check_token(device_id: str, token: str, stored: str | None) -> None:
    if stored is not None and stored.startswith(REVOKED) and tokens.matches(token, stored[len(REVOKED):]):
        raise DeviceRevoked(f"device {device_id!r} is revoked: its TargetToken no longer works")
    if stored is None or not tokens.matches(token, stored):
        raise Unauthorized("unknown controller id or wrong TargetToken")


class Fleet:
    def __init__(self, db: Database, data_dir: Path, *, keyring_pem: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.data_dir = data_dir
        self.artifacts = data_dir / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.keyring_pem = keyring_pem
        self.clock = clock
        # Called with the ids of devices whose pending work changed (long-poll wake-ups).
        self.listeners: list[Callable[[list[str]], None]] = []
        # Runs the gate after a final report; a served app coalesces these (controller.tasks),
        # so ten thousand reports a minute do not each re-read their wave.
        self.tick_soon: Callable[[], None] = self.tick

    def _notify(self, device_ids: list[str]) -> None:
        for fn in self.listeners:
            fn(device_ids)

    # --- devices and groups ----------------------------------------------------------------
    def add_device(self, device_id: str, *, token: str | None = None, site: str = "",
                   tags: Sequence[str] = ()) -> str:
        """Register a device; returns its TargetToken, the only time anyone sees it (the database
        keeps its SHA-256, ``tokens``)."""
        _check_name(device_id, "device id")
        token = token or tokens.new_token()
        with self.db.tx():
            if self.db.query("SELECT 1 FROM devices WHERE id = ?", [device_id]):
                raise Conflict(f"device {device_id!r} exists")
            self.db.execute("INSERT INTO devices (id, token, site, tags, created) VALUES (?, ?, ?, ?, ?)",
                            [device_id, tokens.digest(token), site, json.dumps(sorted(set(tags))),
                             self.clock()])
        return token

    def tag_device(self, device_id: str, tags: Sequence[str]) -> list[str]:
        with self.db.tx():
            have = set(json.loads(self._device_row(device_id)[3]))
            merged = sorted(have | set(tags))
            self.db.execute("UPDATE devices SET tags = ? WHERE id = ?", [json.dumps(merged), device_id])
        return merged

    def _device_row(self, device_id: str) -> tuple[Any, ...]:
        rows = self.db.query("SELECT id, token, site, tags, attributes, version, last_seen "
                             "FROM devices WHERE id = ?", [device_id])
        if not rows:
            raise NotFound(f"no device {device_id!r}")
        return rows[0]

    def devices(self, device_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT id, site, tags, attributes, version, last_seen FROM devices ORDER BY id")
        wanted = set(device_ids) if device_ids is not None else None
        groups: dict[str, list[str]] = {}
        for grp, dev in self.db.query("SELECT grp, device_id FROM group_members ORDER BY grp"):
            groups.setdefault(dev, []).append(grp)
        return [{"id": r[0], "site": r[1], "tags": json.loads(r[2]), "attributes": json.loads(r[3]),
                 "version": r[4], "last_seen": r[5], "groups": groups.get(r[0], [])}
                for r in rows if wanted is None or r[0] in wanted]

    def add_to_group(self, group: str, device_ids: Sequence[str]) -> None:
        _check_name(group, "group name")
        with self.db.tx():
            for d in device_ids:
                self._device_row(d)
                self.db.execute("INSERT INTO group_members (grp, device_id) VALUES (?, ?) "
                                "ON CONFLICT (grp, device_id) DO NOTHING", [group, d])

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for grp, dev in self.db.query("SELECT grp, device_id FROM group_members ORDER BY grp, device_id"):
            out.setdefault(grp, []).append(dev)
        return out

    def group_members(self, group: str) -> list[str]:
        members = self.groups().get(group)
        if not members:
            raise NotFound(f"no group {group!r} (or it has no devices)")
        return members

    def revoke_token(self, device_id: str) -> None:
        """End the device's TargetToken (decommission's controller side). The stored digest gets
        a ``revoked:`` prefix, which no token's digest matches; whoever still holds the old token
        is told the device is revoked (403), anyone else only 401. A regional controller stops
        serving the token at its next check upstream. The record and history stay."""
        with self.db.tx():
            stored = str(self._device_row(device_id)[1])
            if not stored.startswith(REVOKED):
                self.db.execute("UPDATE devices SET token = ? WHERE id = ?",
                                [REVOKED + stored, device_id])

    def authenticate(self, device_id: str, token: str) -> None:
        rows = self.db.query("SELECT token FROM devices WHERE id = ?", [device_id])
        _check_token(device_id, token, rows[0][0] if rows else None)

    def touch(self, seen: dict[str, float]) -> None:
        """Write batched last-seen times: one transaction per flush, not one per poll."""
        with self.db.tx():
            for device_id, t in seen.items():
                self.db.execute("UPDATE devices SET last_seen = ? WHERE id = ?", [t, device_id])

    def set_attributes(self, device_id: str, data: dict[str, str], mode: str) -> None:
        if mode not in ("merge", "replace", "remove"):
            raise BadRequest(f"configData mode {mode!r} is not merge, replace or remove")
        retention_.check_attributes(data)
        with self.db.tx():
            have: dict[str, str] = json.loads(self._device_row(device_id)[4])
            if mode == "merge":
                have.update(data)
            elif mode == "replace":
                have = dict(data)
            else:
                have = {k: v for k, v in have.items() if k not in data}
            if len(have) > retention_.MAX_ATTRIBUTES:
                raise BadRequest(f"a device has at most {retention_.MAX_ATTRIBUTES} configData attributes")
            self.db.execute("UPDATE devices SET attributes = ? WHERE id = ?", [json.dumps(have), device_id])
            if mode == "remove":
                return
            # The running version comes from feedback (closed/success of a deployment) and from
            # the edgeops agent's own 'edgeops.version' (the version of the slot it booted). A
            # plain 'version' attribute is only an attribute: SWUpdate re-sends its identify
            # list at every start, and it must not undo a success reported since. It fills in
            # a version the controller does not know yet, nothing more.
            if "edgeops.version" in data:
                self.db.execute("UPDATE devices SET version = ? WHERE id = ?",
                                [data["edgeops.version"], device_id])
            elif "version" in data:
                self.db.execute("UPDATE devices SET version = ? WHERE id = ? AND version IS NULL",
                                [data["version"], device_id])

    # --- DDI --------------------------------------------------------------------------------
    def poll(self, device_id: str, token: str) -> PollInfo:
        rows = self._poll_rows(device_id)
        _check_token(device_id, token, rows[0][0] if rows else None)
        r = rows[0]
        return PollInfo(r[2], r[3], r[1] == "{}")

    def poll_certified(self, device_id: str) -> PollInfo:
        """The poll of a device the TLS layer has already authenticated by its client certificate
        (app checks the certificate names this controllerId); it must still be registered."""
        rows = self._poll_rows(device_id)
        if not rows:
            raise Unauthorized(f"controller id {device_id!r} is not registered with this controller")
        r = rows[0]
        return PollInfo(r[2], r[3], r[1] == "{}")

    def require_device(self, device_id: str) -> None:
        if not self.db.query("SELECT 1 FROM devices WHERE id = ?", [device_id]):
            raise Unauthorized(f"controller id {device_id!r} is not registered with this controller")

    def _poll_rows(self, device_id: str) -> list[Any]:
        # One indexed query per poll: this is the hot path the benchmark measures.
        return self.db.query(
            "SELECT d.token, d.attributes, a.id, a.status FROM devices d LEFT JOIN actions a "
            "ON a.device_id = d.id AND a.status IN ('open', 'running', 'canceling') "
            "WHERE d.id = ? ORDER BY a.id", [device_id])

    def action(self, device_id: str, action_id: int) -> tuple[str, BundleInfo]:
        rows = self.db.query("SELECT status, bundle_id FROM actions WHERE id = ? AND device_id = ?",
                             [action_id, device_id])
        if not rows:
            raise NotFound(f"no action {action_id} for {device_id!r}")
        return rows[0][0], self.bundle(rows[0][1])

    def feedback(self, device_id: str, action_id: int, body: dict[str, Any], *, cancel: bool = False,
                 key: str | None = None) -> None:
        """Apply one DDI feedback. A report whose ``Idempotency-Key`` was seen is applied once.

        What is kept is bounded (see docs/fleet-controller.md, "Retention"): a report on a
        closed action is acknowledged and not stored (it cannot change anything); otherwise a
        bounded copy (``actions.stored_report``) is stored and the action keeps its newest
        ``retention.FEEDBACK_KEPT`` reports and its first failure."""
        execution, finished = parse_feedback(body)
        stored = stored_report(body, execution, finished)
        details = "; ".join(report_details(body))[:500]
        key = retention_.idem_key(key)
        now = self.clock()
        with self.db.tx():
            status, _ = self.action(device_id, action_id)
            if status in TERMINAL:
                return
            if key and self.db.query("SELECT 1 FROM feedback WHERE device_id = ? AND idem_key = ?",
                                     [device_id, key]):
                return
            self.db.insert("INSERT INTO feedback (action_id, device_id, execution, finished, body, received, "
                           "idem_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [action_id, device_id, execution, finished, stored, now, key])
            retention_.trim_feedback(self.db, action_id, retention_.FEEDBACK_KEPT)
            new = next_status(status, execution, finished, cancel)
            if new == status:
                return
            self.db.execute("UPDATE actions SET status = ?, updated = ?, detail = ? WHERE id = ?",
                            [new, now, details, action_id])
            if new == "success":
                bundle = self.action(device_id, action_id)[1]
                attributes = json.loads(self._device_row(device_id)[4])
                self.db.execute("UPDATE devices SET version = ? WHERE id = ?", [bundle.version, device_id])
                self.db.execute("UPDATE actions SET success_after = ? WHERE id = ?",
                                [success_signal(attributes), action_id])
        if new == "failure":
            log.warning("action %d of device %s failed: %s", action_id, device_id, details or "no details")
        if new in TERMINAL:
            self.tick_soon()

    def compact(self, retention: float = retention_.FEEDBACK_RETENTION,
                batch: int = retention_.COMPACT_BATCH) -> int:
        """See ``retention.compact``: one batch of closed actions, by this fleet's clock."""
        return retention_.compact(self.db, self.clock() - retention, batch)


    # --- bundles ----------------------------------------------------------------------------
    def upload_bundle(self, stream: BinaryIO, filename: str) -> BundleInfo:
        """Store a bundle after checking its signature and every block against the fleet's roots."""
        if self.keyring_pem is None:
            raise BadRequest("this controller has no keyring: start it with --keyring ROOT.crt",
                             hint="the controller verifies bundles against the fleet's roots")
        stored = bundles.store(stream, self.artifacts, self.keyring_pem, self.clock())
        with self.db.tx():
            rows = self.db.query("SELECT id FROM bundles WHERE sha256 = ?", [stored.sha256])
            if rows:
                return self.bundle(rows[0][0])
            bid = self.db.insert(
                "INSERT INTO bundles (version, compatible, sha256, sha1, md5, size, filename, signer, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [stored.version, stored.compatible, stored.sha256, stored.sha1, stored.md5, stored.size,
                 filename, stored.signer, self.clock()])
        return self.bundle(bid)

    def bundle(self, bundle_id: int) -> BundleInfo:
        rows = self.db.query("SELECT id, version, compatible, sha256, sha1, md5, size, filename, signer "
                             "FROM bundles WHERE id = ?", [bundle_id])
        if not rows:
            raise NotFound(f"no bundle {bundle_id}")
        r = rows[0]
        return BundleInfo(int(r[0]), r[1], r[2], r[3], r[4], r[5], int(r[6]), r[7], r[8])

    def assigned_bundle(self, device_id: str, bundle_id: int) -> BundleInfo:
        """A bundle this device may download: as in hawkBit, the newest of its actions for that
        bundle exists and is not being (or has not been) canceled; otherwise NotFound, the
        same answer as for a bundle that does not exist."""
        rows = self.db.query("SELECT status FROM actions WHERE device_id = ? AND bundle_id = ? "
                             "ORDER BY id DESC LIMIT 1", [device_id, bundle_id])
        if not rows or rows[0][0] in ("canceling", "canceled"):
            raise NotFound(f"no software module {bundle_id} is assigned to {device_id!r}")
        return self.bundle(bundle_id)

    def bundles(self) -> list[BundleInfo]:
        return [self.bundle(r[0]) for r in self.db.query("SELECT id FROM bundles ORDER BY id")]

    def artifact_path(self, bundle: BundleInfo) -> Path:
        return self.artifacts / bundle.sha256

    # --- rollouts ---------------------------------------------------------------------------
    def resolve_targets(self, *, device: str | None = None, group: str | None = None,
                        percent: float | None = None, everyone: bool = False) -> list[rollout.Target]:
        """The devices a deployment names. It must name them: a device, a group, a percentage
        of the fleet, or ``everyone`` (the API's ``"all": true``) -- never the whole fleet by
        default, which once reinstalled and rebooted every device on a forgotten option."""
        if sum(x is not None for x in (device, group)) + everyone > 1:
            raise BadRequest("give one of device, group or all (percent may narrow a group or all)")
        if device is None and group is None and percent is None and not everyone:
            raise BadRequest("name the target devices: device, group, percent, or \"all\": true "
                             "for the whole fleet")
        sites = {d["id"]: d["site"] for d in self.devices()}
        if device is not None:
            ids = [device] if device in sites else []
            if not ids:
                raise NotFound(f"no device {device!r}")
        elif group is not None:
            ids = self.group_members(group)
        else:
            ids = list(sites)
        targets = [rollout.Target(i, sites[i]) for i in ids]
        if percent is not None:
            if not 0 < percent <= 100:
                raise BadRequest("percent must be in (0, 100]")
            order = rollout.spread_order(targets, "percent")
            keep = set(order[:max(1, round(len(order) * percent / 100))])
            targets = [t for t in targets if t.device_id in keep]
        if not targets:
            raise BadRequest("the deployment has no target devices")
        return targets

    def create_rollout(self, bundle_id: int, targets: Sequence[rollout.Target], policy: rollout.Policy,
                       name: str = "", *, who: str = "operator", skipped: Mapping[str, str] | None = None
                       ) -> int:
        bundle = self.bundle(bundle_id)
        now = self.clock()
        with self.db.tx():
            rid = self.db.insert(
                "INSERT INTO rollouts (bundle_id, name, status, policy, current_wave, waves, wave_started, "
                "created) VALUES (?, ?, 'running', ?, 0, 0, ?, ?)",
                [bundle.id, name or f"{bundle.version}", json.dumps(policy.to_dict()), now, now])
            waves = rollout.plan(targets, policy, seed=f"rollout-{rid}")
            for w, ids in enumerate(waves):
                for d in ids:
                    self.db.execute("INSERT INTO rollout_targets (rollout_id, device_id, wave) "
                                    "VALUES (?, ?, ?)", [rid, d, w])
            self.db.execute("UPDATE rollouts SET waves = ? WHERE id = ?", [len(waves), rid])
            left_out = f"; left out {len(skipped)}: {_summary(skipped)}" if skipped else ""
            self._event(rid, who, "created", f"{bundle.version} to {len(targets)} devices in "
                                             f"{len(waves)} waves{left_out}", now)
            self._start_wave(rid, bundle.id, 0, now)
        return rid

    def _start_wave(self, rid: int, bundle_id: int, wave: int, now: float) -> None:
        if pacing.policy(self, rid).paced:  # actions are released at the rollout's pace
            self.db.execute("UPDATE rollouts SET current_wave = ?, wave_started = ? WHERE id = ?",
                            [wave, now, rid])
            pacing.release(self, rid, bundle_id, wave, now)
            return
        ids = [r[0] for r in self.db.query("SELECT device_id FROM rollout_targets WHERE rollout_id = ? "
                                           "AND wave = ? ORDER BY device_id", [rid, wave])]
        for d in ids:
            # One assignment at a time, as hawkBit without multi-assignments: a new one cancels
            # the device's open or running action (it sees cancelAction first, then the new
            # deployment once it confirmed the cancel, or after finishing if it rejects it).
            self.db.execute("UPDATE actions SET status = 'canceling', updated = ? WHERE device_id = ? "
                            "AND status IN ('open', 'running')", [now, d])
            self.db.insert("INSERT INTO actions (device_id, bundle_id, rollout_id, wave, status, created, "
                           "updated) VALUES (?, ?, ?, ?, 'open', ?, ?)", [d, bundle_id, rid, wave, now, now])
        self.db.execute("UPDATE rollouts SET current_wave = ?, wave_started = ? WHERE id = ?",
                        [wave, now, rid])
        self._notify(ids)

    def tick(self) -> None:
        """Run the health gate of every running rollout."""
        for (rid,) in self.db.query("SELECT id FROM rollouts WHERE status = 'running' ORDER BY id"):
            self._tick_one(int(rid))

    def _tick_one(self, rid: int) -> None:
        now = self.clock()
        with self.db.tx():
            rows = self.db.query("SELECT status, policy, current_wave, waves, wave_started, bundle_id "
                                 "FROM rollouts WHERE id = ?" + self.db.for_update, [rid])
            status, policy_json, wave, waves, started, bundle_id = rows[0]
            if status != "running":
                return
            policy = rollout.Policy.from_dict(json.loads(policy_json))
            outcomes = self._wave_outcomes(rid, wave, policy)
            decision = rollout.evaluate(outcomes, policy=policy, wave_started=started, now=now,
                                        last_wave=wave + 1 >= waves)
            if decision.verdict == "advance":
                self._start_wave(rid, bundle_id, wave + 1, now)
                self._event(rid, "controller", "advanced",
                            f"wave {wave + 1} of {waves} started: {decision.reason}", now)
            elif decision.verdict in ("pause", "complete"):
                new = "paused" if decision.verdict == "pause" else "finished"
                self.db.execute("UPDATE rollouts SET status = ?, reason = ? WHERE id = ?",
                                [new, decision.reason, rid])
                self._event(rid, "controller", new, f"wave {wave}: {decision.reason}", now)
            elif policy.paced:  # wait: release whom the pace allows by now
                pacing.release(self, rid, bundle_id, wave, now)

    def rollout_status(self, rid: int) -> dict[str, Any]:
        rows = self.db.query("SELECT id, bundle_id, name, status, policy, current_wave, waves, reason, "
                             "created, wave_started FROM rollouts WHERE id = ?", [rid])
        if not rows:
            raise NotFound(f"no rollout {rid}")
        r = rows[0]
        counts: dict[str, dict[str, int]] = {}
        # A device's newest action in the rollout (a retried device's earlier failure is history).
        for wave, st, n in self.db.query("SELECT wave, status, COUNT(*) FROM actions WHERE id IN "
                                         "(SELECT MAX(id) FROM actions WHERE rollout_id = ? "
                                         "GROUP BY device_id) GROUP BY wave, status", [rid]):
            counts.setdefault(str(wave), {})[st] = int(n)
        sizes = {str(w): int(n) for w, n in self.db.query(
            "SELECT wave, COUNT(*) FROM rollout_targets WHERE rollout_id = ? GROUP BY wave", [rid])}
        policy = json.loads(r[4])
        return {"id": r[0], "bundle": r[1], "name": r[2], "status": r[3], "policy": policy,
                "current_wave": r[5], "waves": r[6], "reason": r[7], "wave_sizes": sizes,
                "actions": counts, "created_at": iso(r[8]), "wave_started_at": iso(r[9]),
                "skipped_devices": [d for (d,) in self.db.query(
                    "SELECT device_id FROM rollout_skipped WHERE rollout_id = ? ORDER BY device_id", [rid])],
                "pacing": pacing.status(self, rid) if rollout.Policy.from_dict(policy).paced else None}

    def rollouts(self) -> list[dict[str, Any]]:
        return [self.rollout_status(int(r[0])) for r in self.db.query("SELECT id FROM rollouts ORDER BY id")]

    def wave_members(self, rid: int, wave: int) -> list[str]:
        return [r[0] for r in self.db.query("SELECT device_id FROM rollout_targets WHERE rollout_id = ? "
                                            "AND wave = ? ORDER BY device_id", [rid, wave])]

    def set_rollout_state(self, rid: int, verb: str, *, who: str = "operator") -> dict[str, Any]:
        if verb == "resume":
            return self.resume_rollout(rid, who=who)
        moves = {"pause": (("running",), "paused"), "resume": (("paused",), "running"),
                 "halt": (("running", "paused"), "halted"), "cancel": (("running", "paused"), "canceled")}
        if verb not in moves:
            raise BadRequest(f"unknown rollout verb {verb!r}")
        allowed, new = moves[verb]
        with self.db.tx():
            st = self.rollout_status(rid)["status"]
            if st not in allowed:
                raise Conflict(f"rollout {rid} is {st}; cannot {verb}")
            self.db.execute("UPDATE rollouts SET status = ?, reason = ? WHERE id = ?",
                            [new, f"{verb} by operator", rid])
            self._event(rid, who, {"pause": "paused", "halt": "halted", "cancel": "canceled"}[verb],
                        f"was {st}", self.clock())
            if verb in ("halt", "cancel"):
                self._cancel_open(rid)
        return self.rollout_status(rid)

    def _cancel_open(self, rid: int) -> None:
        # Not yet fetched or still running: the device gets cancelAction on its next poll.
        ids = [r[0] for r in self.db.query("SELECT device_id FROM actions WHERE rollout_id = ? "
                                           "AND status IN ('open', 'running')", [rid])]
        self.db.execute("UPDATE actions SET status = 'canceling', updated = ? WHERE rollout_id = ? "
                        "AND status IN ('open', 'running')", [self.clock(), rid])
        self._notify(ids)

    def halt_all(self) -> list[int]:
        """Fleet-wide stop: every running or paused rollout is halted and its open actions canceled."""
        rows = self.db.query("SELECT id FROM rollouts WHERE status IN ('running', 'paused')")
        ids = [int(r[0]) for r in rows]
        for rid in ids:
            self.set_rollout_state(rid, "halt")
        return ids

    def actions(self, *, device: str | None = None, rollout_id: int | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT id, device_id, bundle_id, rollout_id, wave, status, detail, success_after, "
               "created, updated FROM actions WHERE 1 = 1")
        params: list[Any] = []
        if device is not None:
            sql, params = sql + " AND device_id = ?", [*params, device]
        if rollout_id is not None:
            sql, params = sql + " AND rollout_id = ?", [*params, rollout_id]
        keys = ("id", "device", "bundle", "rollout", "wave", "status", "detail", "success_after")
        return [{**dict(zip(keys, r[:8], strict=True)), "created_at": iso(r[8]), "updated_at": iso(r[9])}
                for r in self.db.query(sql + " ORDER BY id", params)]

    # --- safe targets, resume choices and a rollout's history -------------------------------
    def select_targets(self, bundle_id: int, *, device: str | None = None, group: str | None = None,
                       percent: float | None = None, everyone: bool = False, force: bool = False
                       ) -> tuple[list[rollout.Target], dict[str, str]]:
        """The devices a deployment goes to, and those it leaves out with why
        (``rollout.ineligible``: another board, or already on the version unless ``force``).
        A single named device that may not have it is refused (409), as is a deployment that
        would leave nobody."""
        bundle = self.bundle(bundle_id)
        targets = self.resolve_targets(device=device, group=group, percent=percent, everyone=everyone)
        known = {d["id"]: d for d in self.devices([t.device_id for t in targets])}
        # whose newest action for this bundle failed (a retry of a failed release is a choice)
        last = {d: st for d, st in self.db.query(
            "SELECT device_id, status FROM actions WHERE id IN (SELECT MAX(id) FROM actions "
            "WHERE bundle_id = ? GROUP BY device_id)", [bundle_id])}
        keep, skipped = [], {}
        for t in targets:
            d = known[t.device_id]
            attrs = d["attributes"]
            why = rollout.ineligible(bundle.compatible, bundle.version,
                                     attrs.get("edgeops.compatible") or attrs.get("compatible"),
                                     d["version"], force=force,
                                     failed_it=last.get(t.device_id) == "failure")
            if why is None:
                keep.append(t)
            else:
                skipped[t.device_id] = why
        hint = "add force (--force) to install it anyway"
        if device is not None and skipped:
            why = skipped[device]
            raise Conflict(f"device {device!r} {why}",
                           hint="upload a bundle for its board" if "incompatible" in why else hint)
        if not keep:
            raise Conflict(f"none of the {len(targets)} target devices may get {bundle.version}: "
                           f"{_summary(skipped)}", hint=hint)
        return keep, skipped

    def _wave_outcomes(self, rid: int, wave: int, policy: rollout.Policy) -> dict[str, rollout.Outcome]:
        """Each device's newest action in the wave as the gate counts it, without the devices an
        operator skipped."""
        outcomes = {d: gate_outcome(s, after, policy.require_commit) for d, s, after in self.db.query(
            "SELECT device_id, status, success_after FROM actions WHERE rollout_id = ? AND wave = ? "
            "AND device_id NOT IN (SELECT device_id FROM rollout_skipped WHERE rollout_id = ?) "
            "ORDER BY id", [rid, wave, rid])}
        if policy.paced:  # members not released yet are pending: the wave passes as a whole
            skipped = {d for (d,) in self.db.query(
                "SELECT device_id FROM rollout_skipped WHERE rollout_id = ?", [rid])}
            unreleased: dict[str, rollout.Outcome] = {
                d: "pending" for d in self.wave_members(rid, wave) if d not in skipped}
            outcomes = unreleased | outcomes
        return outcomes

    def resume_rollout(self, rid: int, choice: rollout.Choice | None = None,
                       threshold: float | None = None, *, who: str = "operator") -> dict[str, Any]:
        """Resume a paused rollout, with the operator's choice about the wave's failed devices:
        ``retry`` (each gets a new action), ``skip`` (they no longer count, and get nothing
        more from this rollout) or ``raise-threshold`` (the policy's error threshold becomes
        ``threshold``). Without a choice only when the gate would not pause again at once
        (``rollout.resume``); each resume is in the history with who and when."""
        now = self.clock()
        with self.db.tx():
            rows = self.db.query("SELECT status, policy, current_wave, waves, bundle_id FROM rollouts "
                                 "WHERE id = ?" + self.db.for_update, [rid])
            if not rows:
                raise NotFound(f"no rollout {rid}")
            status, policy_json, wave, waves, bundle_id = rows[0]
            if status != "paused":
                raise Conflict(f"rollout {rid} is {status}; only a paused rollout resumes")
            policy = rollout.Policy.from_dict(json.loads(policy_json))
            outcomes = self._wave_outcomes(rid, wave, policy)
            failed = sorted(d for d, o in outcomes.items() if o == "failure")
            planned: dict[str, rollout.Outcome] = dict(outcomes)
            if choice == "retry":
                planned.update(dict.fromkeys(failed, "pending"))
            elif choice == "skip":
                planned = {d: o for d, o in outcomes.items() if o != "failure"}
            new_policy, _ = rollout.resume(planned, policy=policy, now=now, last_wave=wave + 1 >= waves,
                                           choice=choice, threshold=threshold)
            if choice == "retry":
                for d in failed:  # as _start_wave: one assignment at a time
                    self.db.execute("UPDATE actions SET status = 'canceling', updated = ? WHERE "
                                    "device_id = ? AND status IN ('open', 'running')", [now, d])
                    self.db.insert("INSERT INTO actions (device_id, bundle_id, rollout_id, wave, status, "
                                   "created, updated) VALUES (?, ?, ?, ?, 'open', ?, ?)",
                                   [d, bundle_id, rid, wave, now, now])
            elif choice == "skip":
                for d in failed:
                    self.db.execute("INSERT INTO rollout_skipped (rollout_id, device_id, at) VALUES "
                                    "(?, ?, ?) ON CONFLICT (rollout_id, device_id) DO NOTHING", [rid, d, now])
            detail = {None: "resumed with a fresh window",
                      "retry": f"retrying {len(failed)} failed devices: {', '.join(failed[:20])}",
                      "skip": f"skipping {len(failed)} failed devices: {', '.join(failed[:20])}",
                      "raise-threshold": f"error threshold {policy.error_threshold:g} -> "
                                         f"{new_policy.error_threshold:g}"}[choice]
            self.db.execute("UPDATE rollouts SET status = 'running', reason = ?, wave_started = ?, "
                            "policy = ? WHERE id = ?",
                            [f"resumed by {who}", now, json.dumps(new_policy.to_dict()), rid])
            self._event(rid, who, "resumed" if choice is None else f"resumed: {choice}",
                        f"wave {wave}: {detail}", now)
        if choice == "retry":
            self._notify(failed)
        self.tick()
        return self.rollout_status(rid)

    def _event(self, rid: int, who: str, event: str, detail: str, at: float) -> None:
        """One line of a rollout's history, in the caller's transaction, and in the log."""
        self.db.execute("INSERT INTO rollout_events (rollout_id, at, who, event, detail) "
                        "VALUES (?, ?, ?, ?, ?)", [rid, at, who, event, detail[:1000]])
        level = logs.WARNING if event in ("paused", "halted") else logs.INFO
        log.log(level, "rollout %d %s by %s: %s", rid, event, who, detail)

    def rollout_history(self, rid: int, limit: int = 500) -> list[dict[str, Any]]:
        """The newest ``limit`` events of a rollout, oldest first."""
        rows = self.db.query("SELECT at, who, event, detail FROM rollout_events WHERE rollout_id = ? "
                             "ORDER BY id DESC LIMIT ?", [rid, limit])
        return [{"at": iso(at), "who": who, "event": ev, "detail": detail}
                for at, who, ev, detail in reversed(rows)]


def iso(t: float | None) -> str | None:
    """An epoch time as ISO 8601 in UTC, to the second (``2026-12-02T00:38:02Z``)."""
    if t is None:
        return None
    return datetime.fromtimestamp(float(t), UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _summary(skipped: Mapping[str, str]) -> str:
    """'3 already run 2.0, 1 incompatible (dev7)': why devices were left out, counted."""
    by: dict[str, list[str]] = {}
    for d, why in sorted(skipped.items()):
        by.setdefault(why.split(":")[0], []).append(d)
    return ", ".join(f"{len(ds)} {why} ({', '.join(ds[:5])}{', ...' if len(ds) > 5 else ''})"
                     for why, ds in by.items())


def _check_name(name: str, what: str) -> None:
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_.:" for c in name):
        raise BadRequest(f"{what} {name!r} must be 1-128 letters, digits, '-', '_', '.', ':'")
