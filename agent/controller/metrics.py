"""Prometheus metrics of the fleet, read from the database at scrape time.

Served at ``GET /api/v1/metrics`` behind the operator token (Prometheus sends it with
``authorization: {type: Bearer, credentials_file: …}`` in its scrape config). The
figures come from the database, not from process memory, so every controller process
sharing one PostgreSQL database reports the same fleet; only the request counters are
per process. Labels are bounded: versions, sites, statuses; never device IDs.
Exposition through ``prometheus_client`` (text format 0.0.4, the library's own writer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from agent.controller.fleet import Fleet
from agent.controller.http import PollTimes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FleetCollector:
    def __init__(self, fleet: Fleet, requests: Counter[str], polls: PollTimes | None = None,
                 db: dict[str, int] | None = None) -> None:
        self.fleet = fleet
        self.requests = requests  # DDI requests by kind, counted by the app in this process
        self.polls = polls  # base-poll answer times in this process
        self.db = db or {}  # this process's database executor: group commits, writes, refusals

    def collect(self) -> Iterator[Metric]:
        db = self.fleet.db
        now = self.fleet.clock()
        yield _gauge("edgeops_controller_devices", "Registered devices, by site", ["site"],
                     db.query("SELECT site, COUNT(*) FROM devices GROUP BY site"))
        yield _gauge("edgeops_controller_devices_running", "Devices by the version they last "
                     "reported running", ["version"],
                     db.query("SELECT COALESCE(version, ''), COUNT(*) FROM devices GROUP BY version"))
        yield _gauge("edgeops_controller_devices_seen_recently", "Devices that polled within the "
                     "last 15 minutes", [],
                     db.query("SELECT COUNT(*) FROM devices WHERE last_seen >= ?", [now - 900]))
        yield _gauge("edgeops_controller_actions", "Deployment actions, by status", ["status"],
                     db.query("SELECT status, COUNT(*) FROM actions GROUP BY status"))
        yield _gauge("edgeops_controller_rollouts", "Rollouts, by status", ["status"],
                     db.query("SELECT status, COUNT(*) FROM rollouts GROUP BY status"))
        yield _gauge("edgeops_controller_bundles", "Bundles uploaded", [],
                     db.query("SELECT COUNT(*) FROM bundles"))
        yield _gauge("edgeops_controller_outbox", "Device reports waiting to be forwarded to "
                     "the parent (regional controllers)", [],
                     db.query("SELECT COUNT(*) FROM outbox"))
        served = CounterMetricFamily("edgeops_controller_ddi_requests", "DDI requests served by "
                                     "this process, by kind", labels=["kind"])
        for kind, n in sorted(self.requests.items()):
            served.add_metric([kind], n)
        yield served
        if self.polls is not None:
            h = HistogramMetricFamily("edgeops_controller_poll_seconds", "Time this process took "
                                      "to answer base polls (held long-polls not counted)")
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, self.polls.bounds), "+Inf"], self.polls.counts, strict=True):
                cumulative += n
                buckets.append((bound, float(cumulative)))
            h.add_metric([], buckets, self.polls.total)
            yield h
        for key, doc in (("commits", "Group commits of device writes (controller.dbexec)"),
                         ("grouped", "Device writes those group commits carried"),
                         ("refused", "Requests refused with 429 because the database queue was full")):
            if key in self.db:
                c = CounterMetricFamily(f"edgeops_controller_db_{key}", doc)
                c.add_metric([], float(self.db[key]))
                yield c


def _gauge(name: str, doc: str, labels: list[str], rows: Any) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for row in rows:
        *values, count = row
        g.add_metric([str(v) for v in values], float(count))
    if not labels and not rows:
        g.add_metric([], 0.0)
    return g


def render(fleet: Fleet, requests: Counter[str], polls: PollTimes | None = None,
           db: dict[str, int] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet, requests, polls, db))  # type: ignore[arg-type]
    return generate_latest(registry)
