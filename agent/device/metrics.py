"""Device metrics for Prometheus, as a node_exporter textfile: no port to open, no CPU at idle.

An offline-first device has no business running an HTTP server for a scraper that
may not reach it; node_exporter's textfile collector (``--collector.textfile.directory``)
already runs on most fleets and picks the file up. The file is rewritten (atomically,
through ``fsutil.atomic_write``) only when a value changed, so an idle agent writes
nothing, as the rest of the agent. Needs the ``[metrics]`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.adapters.fsutil import atomic_write
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.device.updater import Updater


def render(up: Updater, *, link_up: bool | None = None) -> tuple[Any, bytes]:
    try:
        from prometheus_client import CollectorRegistry, Gauge, generate_latest
    except ImportError:
        raise ConfigError("[agent] metrics_file needs prometheus-client",
                          hint="pip install 'edgeops[metrics]', or remove metrics_file") from None
    reg = CollectorRegistry()
    st = up.status()
    slot = Gauge("edgeops_slot_info", "One series per slot: what it holds and its state",
                 ["slot", "version", "state", "booted", "primary"], registry=reg)
    for name, s in st["slots"].items():
        slot.labels(name, s["version"] or "", s["state"], str(s["booted"]).lower(),
                    str(name == st["primary_slot"]).lower()).set(1)
    Gauge("edgeops_phase_info", "The update state machine's phase", ["phase"],
          registry=reg).labels(st["phase"]).set(1)
    Gauge("edgeops_trial", "1 while a trial boot is being tested", registry=reg).set(int(st["trial"]))
    Gauge("edgeops_security_floor", "Bundles below this security_version are refused",
          registry=reg).set(st["security_floor"])
    Gauge("edgeops_trusted_time_seconds", "The device's best-known trusted time (docs/trust.md)",
          registry=reg).set(st["trusted_time"] or 0)
    events = Gauge("edgeops_events", "Journal history rows by event (committed, health-failed, "
                   "refused, ...)", ["event"], registry=reg)
    for event, n in sorted(up.journal.event_counts().items()):
        events.labels(event).set(n)
    Gauge("edgeops_reports_pending", "Reports queued for the controller (offline-first outbox)",
          registry=reg).set(up.journal.pending_count())
    last = up.journal.get("delta.last")  # agent.device.delta: what the last update downloaded
    if isinstance(last, dict):
        for key, what in (("received", "bytes it downloaded"), ("saved", "bytes it did not need"),
                          ("requests", "HTTP requests it made")):
            Gauge(f"edgeops_delta_last_{key}", f"The last delta update: {what}",
                  registry=reg).set(float(last.get(key) or 0))
    if link_up is not None:
        Gauge("edgeops_fleet_link_up", "1 if the last poll of the controller succeeded",
              registry=reg).set(int(link_up))
    return reg, generate_latest(reg)


def write(up: Updater, path: Path, *, link_up: bool | None = None) -> bool:
    """Rewrite ``path`` if anything changed; True if it was written."""
    _, text = render(up, link_up=link_up)
    try:
        if path.read_bytes() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)  # node_exporter reads it as another user: PUBLIC mode
    return True
