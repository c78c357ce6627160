"""Rollout pacing applied to the database: which devices of a wave get their action now.

The decisions are ``rollout``'s (``release``, ``ramp_allowance``, ``site_bandwidth``,
``site_caps``: pure); this module reads what they need (actions released and failed, actions
in flight per site, each action's download start and end from its ``proceeding`` and
``downloaded`` feedback) and inserts the actions of the devices released. ``Fleet`` calls it
inside its own transactions (``_start_wave``, ``_tick_one``), and ``status`` for
``rollout status`` (``pacing`` in the JSON).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from agent.controller import rollout
from agent.controller.bundles import BundleInfo
from agent.controller.db import Database


class Fleet(Protocol):
    """What pacing needs of ``fleet.Fleet`` (named here: fleet imports this module)."""

    db: Database
    clock: Callable[[], float]

    def bundle(self, bundle_id: int) -> BundleInfo: ...
    def _notify(self, device_ids: list[str]) -> None: ...


def policy(fleet: Fleet, rid: int) -> rollout.Policy:
    rows = fleet.db.query("SELECT policy FROM rollouts WHERE id = ?", [rid])
    return rollout.Policy.from_dict(json.loads(rows[0][0]))


def release(fleet: Fleet, rid: int, bundle_id: int, wave: int, now: float) -> None:
    waiting = {d: rollout.Target(d, site) for d, site in fleet.db.query(
        "SELECT t.device_id, d.site FROM rollout_targets t JOIN devices d ON d.id = t.device_id "
        "WHERE t.rollout_id = ? AND t.wave = ? AND NOT EXISTS (SELECT 1 FROM actions a "
        "WHERE a.rollout_id = t.rollout_id AND a.device_id = t.device_id)", [rid, wave])}
    if not waiting:
        return
    pol, pace = policy(fleet, rid), status(fleet, rid)
    order = rollout.spread_order(list(waiting.values()), f"rollout-{rid}")
    ids = rollout.release([waiting[d] for d in order], pol, released=pace["released"],
                          since=now - pace["created"], healthy=pace["failed"] == 0,
                          in_flight={k: v["in_flight"] for k, v in pace["sites"].items()},
                          caps={k: v["cap"] if v["cap"] is not None else float("inf")
                                for k, v in pace["sites"].items()})
    for d in ids:  # as in _start_wave: one assignment at a time per device
        fleet.db.execute("UPDATE actions SET status = 'canceling', updated = ? WHERE device_id = ? "
                         "AND status IN ('open', 'running')", [now, d])
        fleet.db.insert("INSERT INTO actions (device_id, bundle_id, rollout_id, wave, status, created, "
                        "updated) VALUES (?, ?, ?, ?, 'open', ?, ?)", [d, bundle_id, rid, wave, now, now])
    fleet._notify(ids)


def status(fleet: Fleet, rid: int) -> dict[str, Any]:
    """What paces a rollout now: its policy's limits, how many it released, and per site the
    actions in flight, the measured bandwidth (bytes/s) and the cap that follows."""
    pol = policy(fleet, rid)
    bundle_id, created = fleet.db.query("SELECT bundle_id, created FROM rollouts WHERE id = ?", [rid])[0]
    size = fleet.bundle(int(bundle_id)).size
    released, failed = fleet.db.query(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status = 'failure' THEN 1 ELSE 0 END), 0) "
        "FROM actions WHERE rollout_id = ?", [rid])[0]
    sites = {r[0]: 0 for r in fleet.db.query(
        "SELECT DISTINCT d.site FROM rollout_targets t JOIN devices d ON d.id = t.device_id "
        "WHERE t.rollout_id = ?", [rid])}
    for site, n in fleet.db.query(
            "SELECT d.site, COUNT(*) FROM actions a JOIN devices d ON d.id = a.device_id "
            "WHERE a.rollout_id = ? AND a.status IN ('open', 'running') GROUP BY d.site", [rid]):
        sites[site] = int(n)
    downloads: dict[str, list[tuple[float, float | None]]] = {}
    for site, st, start, end in fleet.db.query(
            "SELECT d.site, a.status, MIN(CASE WHEN f.execution = 'proceeding' THEN f.received END), "
            "MIN(CASE WHEN f.execution = 'downloaded' THEN f.received END) FROM actions a "
            "JOIN devices d ON d.id = a.device_id JOIN feedback f ON f.action_id = a.id "
            "WHERE a.rollout_id = ? GROUP BY d.site, a.id, a.status", [rid]):
        if start is not None and (end is not None or st in ("open", "running")):
            downloads.setdefault(site, []).append((float(start), None if end is None else float(end)))
    bandwidth = {site: rollout.site_bandwidth(downloads.get(site, []), size) for site in sites}
    caps = rollout.site_caps(pol, bandwidth, size)
    allowed = rollout.ramp_allowance(pol, fleet.clock() - created, healthy=not failed)
    return {"ramp_rate": pol.ramp_rate, "ramp_growth": pol.ramp_growth,
            "site_concurrency": pol.site_concurrency, "download_seconds": pol.download_seconds,
            "created": created, "released": int(released), "failed": int(failed),
            "ramp_allowance": None if allowed == float("inf") else int(allowed),
            "sites": {site: {"in_flight": n, "bandwidth": round(bandwidth[site], 1),
                             "cap": None if caps[site] == float("inf") else int(caps[site])}
                      for site, n in sorted(sites.items())}}
