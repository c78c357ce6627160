"""What the dashboard shows, read from the database: read-only SQL over ``db.SCHEMA``, records out.

Every function here takes the ``Fleet`` (for its database and clock) and returns plain
dataclasses that ``dashboard_html`` renders; none writes. Each page is one call, so the
routes (``dashboard``) run it on the controller's database thread (``dbexec``) and the event loop
keeps serving device polls while a page is read. The SQL is in the subset SQLite and
PostgreSQL both accept (``db``): ``?`` placeholders, no engine-specific functions.

Paging and filtering happen in SQL (``LIMIT``/``OFFSET`` over the primary key, ``WHERE`` on
the filters), so a page costs the same at 10,000 devices as at 100: the devices table is
scanned once for the counts and once for the page (``tools/bench/dashboard.py`` measures it).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.controller.errors import BadRequest, NotFound
from agent.controller.fleet import Fleet

ONLINE_WINDOW = 900.0  # seconds: "online" polled within this (as metrics' devices_seen_recently)
PER_PAGE = 50
MAX_PER_PAGE = 200
MAX_FILTER = 128  # characters of a tag, site or version filter
STATES = ("online", "offline", "never", "failing", "updating")
HISTORY = 50  # actions shown on a device's page
PLOT_POINTS = 24  # samples in the versions-over-time plot
PLOT_VERSIONS = 6  # lines in it; the rest are summed as "other"


@dataclass(frozen=True)
class Filters:
    tag: str = ""
    site: str = ""
    version: str = ""
    state: str = ""
    page: int = 1
    per: int = PER_PAGE

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> Filters:
        """From a request's query string; ``BadRequest`` (400) names the bad parameter."""
        texts = {}
        for key in ("tag", "site", "version", "state"):
            v = query.get(key, "")
            if len(v) > MAX_FILTER or any(ord(c) < 32 for c in v):
                raise BadRequest(f"?{key}= must be at most {MAX_FILTER} printable characters")
            texts[key] = v
        if texts["state"] and texts["state"] not in STATES:
            raise BadRequest(f"?state= must be one of {', '.join(STATES)}")
        page = _small_int(query, "page", 1, 1_000_000)
        per = _small_int(query, "per", PER_PAGE, MAX_PER_PAGE)
        return cls(texts["tag"], texts["site"], texts["version"], texts["state"], page, per)

    def query(self, **override: Any) -> dict[str, str]:
        """These filters as query parameters (for links), without the defaults."""
        d = {"tag": self.tag, "site": self.site, "version": self.version, "state": self.state,
             "page": str(self.page), "per": str(self.per)} | {k: str(v) for k, v in override.items()}
        return {k: v for k, v in d.items()
                if v and not (k == "page" and v == "1") and not (k == "per" and v == str(PER_PAGE))}


def _small_int(query: Mapping[str, str], key: str, default: int, top: int) -> int:
    raw = query.get(key, "")
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 7) or not 1 <= int(raw) <= top:
        raise BadRequest(f"?{key}= must be a whole number from 1 to {top}")
    return int(raw)


@dataclass(frozen=True)
class DeviceRow:
    id: str
    site: str
    version: str
    tags: list[str]
    last_seen: float | None
    online: bool
    action: str  # the status of its newest action, "" when it has none
    detail: str  # that action's failure reason or last detail


@dataclass(frozen=True)
class WaveView:
    wave: int
    size: int
    counts: dict[str, int]  # action status -> count

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in ("success", "failure", "canceled"))


@dataclass(frozen=True)
class RolloutView:
    id: int
    name: str
    status: str
    reason: str
    bundle: int
    version: str
    current_wave: int
    policy: dict[str, Any]
    waves: list[WaveView]
    failing: list[tuple[str, int, str]]  # (device, wave, reason)
    history: list[dict[str, Any]] = field(default_factory=list)  # {at, who, event, detail}, oldest first


@dataclass(frozen=True)
class Summary:
    total: int
    online: int
    offline: int
    never: int
    by_version: list[tuple[str, int]]
    by_site: list[tuple[str, int]]


@dataclass(frozen=True)
class FleetPage:
    summary: Summary
    filters: Filters
    matched: int
    devices: list[DeviceRow]
    rollout: RolloutView | None
    rollouts: list[tuple[int, str, str]]  # (id, name, status), newest first
    bundles: list[tuple[int, str]]  # (id, version), newest first, for the start form
    groups: list[str]
    history: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # versions over time
    now: float = 0.0


@dataclass(frozen=True)
class DevicePage:
    device: DeviceRow
    attributes: dict[str, str]
    groups: list[str]
    # (action id, rollout id, version, status, detail, updated), newest first
    actions: list[tuple[int, int | None, str, str, str, float]]
    now: float
    # the last attestation (controller.attestation): result, kind, checked, boot slot, detail
    attestation: tuple[str, str, float, str | None, str] | None = None


def _where(f: Filters, now: float) -> tuple[str, list[Any]]:
    sql: list[str] = ["1 = 1"]
    params: list[Any] = []
    if f.tag:
        # tags is a JSON list of strings (Fleet.add_device): match one element exactly.
        sql.append("d.tags LIKE ? ESCAPE '\\'")
        params.append("%" + _like(json.dumps(f.tag)) + "%")
    if f.site:
        sql.append("d.site = ?")
        params.append(f.site)
    if f.version:
        sql.append("COALESCE(d.version, '') = ?")
        params.append(f.version)
    if f.state == "online":
        sql.append("d.last_seen >= ?")
        params.append(now - ONLINE_WINDOW)
    elif f.state == "offline":
        sql.append("d.last_seen < ?")
        params.append(now - ONLINE_WINDOW)
    elif f.state == "never":
        sql.append("d.last_seen IS NULL")
    elif f.state in ("failing", "updating"):
        wanted = "('failure')" if f.state == "failing" else "('open', 'running', 'canceling')"
        sql.append(f"EXISTS (SELECT 1 FROM actions a WHERE a.device_id = d.id AND a.status IN {wanted} "
                   "AND a.id = (SELECT MAX(b.id) FROM actions b WHERE b.device_id = d.id))")
    return " AND ".join(sql), params


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def summary(fleet: Fleet, now: float) -> Summary:
    db = fleet.db
    cut = now - ONLINE_WINDOW
    total, online, never = db.query(
        "SELECT COUNT(*), SUM(CASE WHEN last_seen >= ? THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN last_seen IS NULL THEN 1 ELSE 0 END) FROM devices", [cut])[0]
    total, online, never = int(total), int(online or 0), int(never or 0)
    by_version = [(str(v), int(n)) for v, n in db.query(
        "SELECT COALESCE(version, ''), COUNT(*) FROM devices GROUP BY COALESCE(version, '') "
        "ORDER BY COUNT(*) DESC, COALESCE(version, '')")]
    by_site = [(str(s), int(n)) for s, n in db.query(
        "SELECT site, COUNT(*) FROM devices GROUP BY site ORDER BY COUNT(*) DESC, site")]
    return Summary(total, online, total - online - never, never, by_version, by_site)


def devices(fleet: Fleet, f: Filters, now: float) -> tuple[int, list[DeviceRow]]:
    """The devices matching ``f`` (their count) and the rows of page ``f.page``."""
    where, params = _where(f, now)
    matched = int(fleet.db.query(f"SELECT COUNT(*) FROM devices d WHERE {where}", params)[0][0])
    rows = fleet.db.query(f"SELECT d.id, d.site, COALESCE(d.version, ''), d.tags, d.last_seen FROM "
                          f"devices d WHERE {where} ORDER BY d.id LIMIT ? OFFSET ?",
                          [*params, f.per, (f.page - 1) * f.per])
    latest = _latest_actions(fleet, [r[0] for r in rows])
    return matched, [_device_row(r, latest.get(r[0], ("", "")), now) for r in rows]


def _device_row(r: tuple[Any, ...], latest: tuple[str, str], now: float) -> DeviceRow:
    last = None if r[4] is None else float(r[4])
    return DeviceRow(r[0], r[1], r[2], json.loads(r[3]), last,
                     last is not None and last >= now - ONLINE_WINDOW, latest[0], latest[1])


def _latest_actions(fleet: Fleet, ids: list[str]) -> dict[str, tuple[str, str]]:
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    return {d: (s, detail) for d, s, detail in fleet.db.query(
        "SELECT device_id, status, detail FROM actions WHERE id IN (SELECT MAX(id) FROM actions "
        f"WHERE device_id IN ({marks}) GROUP BY device_id)", ids)}


def rollout_view(fleet: Fleet, rid: int) -> RolloutView:
    st = fleet.rollout_status(rid)  # NotFound for an unknown id
    version_rows = fleet.db.query("SELECT version FROM bundles WHERE id = ?", [st["bundle"]])
    waves = [WaveView(w, st["wave_sizes"].get(str(w), 0), st["actions"].get(str(w), {}))
             for w in range(int(st["waves"]))]
    failing = [(d, int(w), detail or "failed (no reason reported)") for d, w, detail in fleet.db.query(
        "SELECT device_id, wave, detail FROM actions WHERE rollout_id = ? AND status = 'failure' "
        "ORDER BY wave, device_id LIMIT 100", [rid])]
    return RolloutView(int(st["id"]), str(st["name"]), str(st["status"]), str(st["reason"]),
                       int(st["bundle"]), str(version_rows[0][0]) if version_rows else "?",
                       int(st["current_wave"]), dict(st["policy"]), waves, failing,
                       fleet.rollout_history(rid)[-HISTORY:])  # who paused, resumed, skipped, when


def _current_rollout(fleet: Fleet) -> int | None:
    """The newest running or paused rollout, else the newest of any state."""
    rows = fleet.db.query("SELECT id FROM rollouts WHERE status IN ('running', 'paused') "
                          "ORDER BY id DESC LIMIT 1") or fleet.db.query(
        "SELECT id FROM rollouts ORDER BY id DESC LIMIT 1")
    return int(rows[0][0]) if rows else None


def version_history(fleet: Fleet, now: float) -> list[tuple[float, dict[str, int]]]:
    """The fleet's versions over time, sampled at ``PLOT_POINTS`` instants from the first
    successful deployment to ``now``. There is no table of past versions: a device's version at
    ``t`` is the bundle of its newest successful action before ``t``; before its first one it
    counts as "earlier" (and a device with no successful action at all, as its version now).
    The counts are kept as the successes are replayed in time order, so the cost is one pass
    over the successful actions, whatever the number of samples."""
    db = fleet.db
    successes = db.query(
        "SELECT a.device_id, a.updated, b.version FROM actions a JOIN bundles b ON b.id = a.bundle_id "
        "JOIN devices d ON d.id = a.device_id WHERE a.status = 'success' ORDER BY a.updated, a.id")
    if not successes:
        return []
    counts: Counter[str] = Counter({str(v) or "unknown": int(n) for v, n in db.query(
        "SELECT COALESCE(version, ''), COUNT(*) FROM devices WHERE id NOT IN "
        "(SELECT device_id FROM actions WHERE status = 'success') GROUP BY COALESCE(version, '')")})
    counts["earlier"] += len({d for d, _, _ in successes})
    start = float(successes[0][1])
    start -= max(now - start, 1.0) / (PLOT_POINTS - 1)  # the first sample: before any success
    at: dict[str, str] = {}
    out, i = [], 0
    for k in range(PLOT_POINTS):
        t = start + (now - start) * k / (PLOT_POINTS - 1)
        while i < len(successes) and float(successes[i][1]) <= t:
            d, _, v = successes[i]
            counts[at.get(d, "earlier")] -= 1
            at[d] = str(v)
            counts[at[d]] += 1
            i += 1
        out.append((t, {v: n for v, n in counts.items() if n > 0}))
    return out


def fleet_page(fleet: Fleet, f: Filters) -> FleetPage:
    """Everything on ``/``: one call, for one worker thread."""
    now = fleet.clock()
    matched, rows = devices(fleet, f, now)
    rid = _current_rollout(fleet)
    rollouts = [(int(i), str(n), str(s)) for i, n, s in fleet.db.query(
        "SELECT id, name, status FROM rollouts ORDER BY id DESC LIMIT 10")]
    bundles = [(int(i), str(v)) for i, v in fleet.db.query(
        "SELECT id, version FROM bundles ORDER BY id DESC LIMIT 50")]
    groups = [str(g) for (g,) in fleet.db.query("SELECT DISTINCT grp FROM group_members ORDER BY grp")]
    return FleetPage(summary(fleet, now), f, matched, rows,
                     rollout_view(fleet, rid) if rid is not None else None, rollouts, bundles, groups,
                     version_history(fleet, now), now)


def device_page(fleet: Fleet, device_id: str) -> DevicePage:
    now = fleet.clock()
    rows = fleet.db.query("SELECT id, site, COALESCE(version, ''), tags, last_seen, attributes "
                          "FROM devices WHERE id = ?", [device_id])
    if not rows:
        raise NotFound(f"no device {device_id[:128]!r}")
    actions = [(int(i), None if r is None else int(r), str(v), str(s), str(det), float(u))
               for i, r, v, s, det, u in fleet.db.query(
                   "SELECT a.id, a.rollout_id, COALESCE(b.version, '?'), a.status, a.detail, a.updated "
                   "FROM actions a LEFT JOIN bundles b ON b.id = a.bundle_id WHERE a.device_id = ? "
                   "ORDER BY a.id DESC LIMIT ?", [device_id, HISTORY])]
    latest = (actions[0][3], actions[0][4]) if actions else ("", "")
    groups = [str(g) for (g,) in fleet.db.query(
        "SELECT grp FROM group_members WHERE device_id = ? ORDER BY grp", [device_id])]
    att = [(str(r), str(k), float(c), None if b is None else str(b), str(det)) for r, k, c, b, det in
           fleet.db.query("SELECT result, kind, checked, boot_slot, detail FROM attestations "
                          "WHERE device_id = ?", [device_id])]
    return DevicePage(_device_row(rows[0], latest, now), json.loads(rows[0][5]), groups, actions, now,
                      att[0] if att else None)
