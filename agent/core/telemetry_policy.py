"""Telemetry decisions, pure: what a series may leave the device as, what the buffer keeps, when to send.

Nothing here reads a clock, a file or a socket: the buffer (``agent.adapters.telemetry_buffer``),
the senders (``agent.adapters.remote_write``, ``agent.adapters.otlp``) and the device's
collector (``agent.device.telemetry``) pass ``now`` and rows in and act on what comes out.

* **Label policies** (``[[telemetry.policy]]``): the first rule whose ``match`` (an fnmatch
  pattern on the metric name) fits decides the series' *scope* — ``upstream`` (sent on),
  ``regional`` (sent to the edgeops controller, which keeps it on site and never forwards it),
  ``local`` (never leaves the device) — and which labels are dropped or replaced by a salted
  SHA-256 (``hash``). ``aggregate`` drops the named labels and sums the series that then
  collide, so a per-user count leaves the site only as a total.
* **Budget** (``budget_bytes``): a fixed cost per buffered sample (``SAMPLE_COST``, measured
  for our SQLite rows, index included) turns the disk budget into a row cap that holds
  exactly. Over the cap, samples older than ``full_resolution`` are first downsampled to one
  per ``downsample_step`` per series (the mean for a gauge, the last value for a counter,
  at the last original timestamp of the step), then the oldest are evicted; each removed
  sample is counted under its reason.
* **Sending**: priorities (agent and health series first), a byte cap per second, and the
  retry rules of the Prometheus Remote-Write 1.0 spec
  (https://prometheus.io/docs/specs/remote_write_spec/, "Retries & Backoff"): retry on 5xx
  with backoff, MUST NOT retry 2xx or a 4xx other than 429, MAY retry 429 — we do, honouring
  ``Retry-After`` (RFC 9110 §10.2.3, delta-seconds or an HTTP-date) up to a cap.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.errors import ConfigError

SAMPLE_COST = 48  # bytes one buffered sample costs on disk (row + ts index), see docs/telemetry.md
SCOPES = ("upstream", "regional", "local")
SCOPE_LABEL = "edgeops_scope"  # set to "regional" on series a controller must keep on site
LABEL_ACTIONS = ("drop", "hash", "aggregate")


class Priority(enum.IntEnum):
    """Lower goes first: what an operator needs to judge an update before the rest."""

    AGENT = 0  # edgeops_* (slots, phase, health probes, update durations)
    SYSTEM = 1
    QOE = 2


def priority_of(name: str) -> Priority:
    if name.startswith("edgeops_qoe_"):
        return Priority.QOE
    if name.startswith("edgeops_"):
        return Priority.AGENT
    return Priority.SYSTEM


# --- label policies --------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesRule:
    match: str = "*"
    scope: str = "upstream"
    drop: tuple[str, ...] = ()
    hash: tuple[str, ...] = ()
    aggregate: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    scope: str
    labels: tuple[tuple[str, str], ...]  # sorted by name, as remote write requires
    aggregate: bool = False


def parse_rules(raw: object, where: str) -> tuple[SeriesRule, ...]:
    """``[[telemetry.policy]]`` tables (or a relay's rules) into rules; one clear line if bad."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: policy must be an array of tables ([[telemetry.policy]])")
    rules = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: policy #{i + 1} must be a table")
        unknown = set(item) - {"match", "scope", *LABEL_ACTIONS}
        if unknown:
            raise ConfigError(f"{where}: policy #{i + 1}: unknown keys {', '.join(sorted(unknown))}")
        match, scope = item.get("match", "*"), item.get("scope", "upstream")
        if not isinstance(match, str) or not match:
            raise ConfigError(f"{where}: policy #{i + 1}: match must be a metric-name pattern")
        if scope not in SCOPES:
            raise ConfigError(f"{where}: policy #{i + 1}: scope must be one of {', '.join(SCOPES)}")
        lists = {}
        for key in LABEL_ACTIONS:
            v = item.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise ConfigError(f"{where}: policy #{i + 1}: {key} must be a list of label names")
            if "__name__" in v:
                raise ConfigError(f"{where}: policy #{i + 1}: the metric name cannot be {key}ed")
            lists[key] = tuple(v)
        rules.append(SeriesRule(match, scope, lists["drop"], lists["hash"], lists["aggregate"]))
    return tuple(rules)


def hash_value(value: str, salt: bytes) -> str:
    """A salted SHA-256 of a label value, 16 hex digits: joins series, reveals nothing."""
    import hashlib  # not at the top: config imports this module, and _hashlib loads libcrypto

    return hashlib.sha256(salt + value.encode()).hexdigest()[:16]


def decide(labels: Mapping[str, str], rules: Sequence[SeriesRule], salt: bytes = b"") -> Decision:
    """What the first matching rule makes of one series (no rule: sent on as it is)."""
    import fnmatch

    name = labels.get("__name__", "")
    rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.match)), SeriesRule())
    out: dict[str, str] = {}
    for k, v in labels.items():
        if k in rule.drop or k in rule.aggregate:
            continue
        out[k] = hash_value(v, salt) if k in rule.hash else v
    scope = rule.scope
    if labels.get(SCOPE_LABEL) == "regional" and scope == "upstream":
        scope = "regional"  # a device said so: a relay never widens a scope
    if scope == "regional":
        out[SCOPE_LABEL] = "regional"
    return Decision(scope, tuple(sorted(out.items())), bool(rule.aggregate))


def aggregate(points: Iterable[tuple[tuple[tuple[str, str], ...], int, float]]
              ) -> list[tuple[tuple[tuple[str, str], ...], int, float]]:
    """Sum the samples of series that collide once labels are aggregated away (same labels and
    timestamp); output sorted by labels then timestamp."""
    acc: dict[tuple[tuple[tuple[str, str], ...], int], float] = {}
    for labels, ts, value in points:
        acc[(labels, ts)] = acc.get((labels, ts), 0.0) + value
    return [(labels, ts, v) for (labels, ts), v in sorted(acc.items())]


# --- budget: downsampling, then oldest-first eviction ----------------------------------------
@dataclass(frozen=True)
class Budget:
    budget_bytes: int = 16 << 20
    full_resolution_ms: int = 3600_000
    step_ms: int = 60_000

    @property
    def max_samples(self) -> int:
        return max(1, self.budget_bytes // SAMPLE_COST)


@dataclass(frozen=True)
class Row:
    id: int
    series: int
    ts: int  # ms since the epoch
    value: float
    kind: str = "gauge"  # or "counter"
    downsampled: bool = False


@dataclass(frozen=True)
class Downsampled:
    keep: list[Row]  # rows to rewrite (one per step per series), marked downsampled
    remove: list[int]  # row ids merged into those


def downsample(rows: Sequence[Row], now_ms: int, budget: Budget) -> Downsampled:
    """Per series, one row per whole step that ended before ``now - full_resolution``: the
    last row of the step, carrying the mean (gauge) or the last value (counter). Rows already
    downsampled are left as they are; a step with one row is unchanged."""
    horizon = now_ms - budget.full_resolution_ms
    groups: dict[tuple[int, int], list[Row]] = {}
    for r in rows:
        bucket = r.ts // budget.step_ms
        if r.downsampled or (bucket + 1) * budget.step_ms > horizon:
            continue
        groups.setdefault((r.series, bucket), []).append(r)
    keep: list[Row] = []
    remove: list[int] = []
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: (r.ts, r.id))
        last = group[-1]
        value = last.value if last.kind == "counter" else sum(r.value for r in group) / len(group)
        keep.append(Row(last.id, last.series, last.ts, value, last.kind, True))
        remove.extend(r.id for r in group[:-1])
    return Downsampled(keep, remove)


def evict_count(held: int, budget: Budget) -> int:
    """How many of the oldest samples must go so that ``held`` fits the budget."""
    return max(0, held - budget.max_samples)


# --- sending: batches, rate, retries -----------------------------------------------------------
class Outcome(enum.StrEnum):
    ACKED = "acked"  # 2xx: delete, never send again
    REJECTED = "rejected"  # 4xx other than 429: the receiver will never take it; drop, count
    RETRY = "retry"  # 5xx, 429, no answer: keep, send again after the delay


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    delay: float = 0.0  # seconds before the next try (RETRY)


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 1.0
    cap: float = 300.0  # the longest backoff, and the longest Retry-After we honour

    def backoff(self, failures: int, u: float) -> float:
        """Full jitter over [0, min(cap, base * 2**failures)], ``u`` uniform in [0, 1)."""
        return float(u * min(self.cap, self.base * 2.0 ** min(failures, 30)))


def retry_after(header: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` value asks for (delta-seconds or an HTTP-date), or None."""
    if header is None:
        return None
    text = header.strip()
    if text.isdigit():
        return float(int(text))
    from email.utils import parsedate_to_datetime  # not at the top: the idle service loads config

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def classify(status: int | None, retry_after_header: str | None, *, failures: int, now: float,
             u: float, policy: RetryPolicy = RetryPolicy()) -> Verdict:
    """One answer (``status`` None: no answer, a dropped connection) into what to do next."""
    if status is not None and 200 <= status < 300:
        return Verdict(Outcome.ACKED)
    if status is not None and 400 <= status < 500 and status != 429:
        return Verdict(Outcome.REJECTED)
    delay = policy.backoff(failures, u)
    asked = retry_after(retry_after_header, now) if status in (429, 503) else None
    if asked is not None:
        delay = max(delay, min(asked, policy.cap))
    return Verdict(Outcome.RETRY, delay)


@dataclass
class RateLimit:
    """A byte cap per second: after sending n bytes the next send waits n / rate seconds."""

    bytes_per_second: int
    not_before: float = 0.0

    def wait(self, now: float) -> float:
        return max(0.0, self.not_before - now)

    def sent(self, n: int, now: float) -> None:
        self.not_before = max(self.not_before, now) + n / max(1, self.bytes_per_second)


# --- agent series from what the device recorded -----------------------------------------------
Sample = tuple[tuple[tuple[str, str], ...], float, str]  # (labels with __name__, value, kind)


@dataclass(frozen=True)
class ModelRecord:
    """One model as its store and its host left it on disk (``ModelHost`` writes the counts)."""

    name: str
    version: str  # what ``current`` names
    state: str  # trial, good or bad
    served: str | None = None  # the version the counts are of (the host may lag ``current``)
    requests: int = 0
    errors: int = 0


def agent_series(durations: Mapping[str, float], health: Iterable[tuple[str, bool, float]],
                 last_download: Mapping[str, object] | None,
                 models: Iterable[ModelRecord]) -> list[Sample]:
    """The agent's update, health and model series. ``durations``: seconds of the last span of
    each name (``update`` is the whole update, the rest its phases); ``health``: the last
    health round; ``last_download``: the journal's ``delta.last``."""
    out: list[Sample] = []

    def g(name: str, value: float, kind: str = "gauge", **labels: str) -> None:
        out.append((tuple(sorted({"__name__": name, **labels}.items())), float(value), kind))

    for span, secs in sorted(durations.items()):
        if span == "update":
            g("edgeops_update_seconds", secs)
        elif span in SPANS:
            g("edgeops_update_phase_seconds", secs, phase=span)
    for probe, ok, secs in health:
        g("edgeops_health_probe_up", 1.0 if ok else 0.0, probe=probe)
        g("edgeops_health_probe_seconds", secs, probe=probe)
    if last_download:
        mode = str(last_download.get("mode") or "delta")
        for key, name in (("received", "edgeops_update_downloaded_bytes"),
                          ("saved", "edgeops_update_delta_saved_bytes")):
            v = last_download.get(key)
            if isinstance(v, int | float):
                g(name, v, mode=mode)
    for m in models:
        g("edgeops_model_info", 1.0, model=m.name, version=m.version, state=m.state)
        if m.served is not None:
            g("edgeops_model_requests_total", m.requests, "counter", model=m.name, version=m.served)
            g("edgeops_model_errors_total", m.errors, "counter", model=m.name, version=m.served)
            g("edgeops_model_error_ratio", m.errors / m.requests if m.requests else 0.0,
              model=m.name, version=m.served)
    return out


# --- update traces: which phase change opens which span --------------------------------------
SPANS = ("download", "verify", "write", "reboot", "health", "commit", "revert")

# journal phase entered -> span that begins (the previous one ends there); "" ends the trace
_PHASE_SPAN: dict[tuple[str, str], str] = {
    ("idle", "writing"): "write",
    ("writing", "written"): "reboot",
    ("written", "trial-pending"): "reboot",
    ("writing", "trial-pending"): "reboot",
    ("trial-pending", "testing"): "health",
    ("testing", "committing"): "commit",
    ("testing", "reverting"): "revert",
    ("trial-pending", "reverting"): "revert",
    ("committing", "idle"): "",
    ("reverting", "idle"): "",
    ("writing", "idle"): "",  # a write that failed: the trace ends with it
}


def span_for(before: str, after: str) -> str | None:
    """The span a journal phase change starts ("" ends the trace; None: no span boundary)."""
    if before == after:
        return None
    return _PHASE_SPAN.get((before, after))


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    attrs: dict[str, str] = field(default_factory=dict)
    ok: bool = True


# --- the controller's relay ---------------------------------------------------------------------
@dataclass(frozen=True)
class RelaySettings:
    """``DATA/telemetry-relay.toml`` of a controller: where its devices' telemetry goes on to.
    Series whose scope is not ``upstream`` (by a device's rule or by these rules) stay here."""

    remote_write_url: str | None = None
    otlp_url: str | None = None
    credentials_file: str | None = None  # relative to the data directory
    budget_bytes: int = 256 << 20
    interval: float = 10.0  # seconds between forwarding passes while the upstream is down
    bytes_per_second: int = 1 << 20
    rules: tuple[SeriesRule, ...] = ()


_RELAY_KEYS = {"remote_write_url", "otlp_url", "credentials_file", "budget_bytes", "interval",
               "bytes_per_second", "policy"}


def parse_relay(doc: Mapping[str, object], where: str) -> RelaySettings:
    unknown = set(doc) - _RELAY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")

    def url(key: str) -> str | None:
        v = doc.get(key)
        if v is not None and (not isinstance(v, str) or not v.startswith(("http://", "https://"))):
            raise ConfigError(f"{where}: {key} must be an http:// or https:// URL")
        return v

    def num(key: str, lo: float, hi: float, default: float) -> float:
        v = doc.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ConfigError(f"{where}: {key} must be a number from {lo:g} to {hi:g}")
        return float(v)

    cred = doc.get("credentials_file")
    if cred is not None and (not isinstance(cred, str) or not cred):
        raise ConfigError(f"{where}: credentials_file must be a path")
    return RelaySettings(url("remote_write_url"), url("otlp_url"), cred,
                         int(num("budget_bytes", 4096, 1 << 40, 256 << 20)),
                         num("interval", 0.1, 86400, 10.0),
                         int(num("bytes_per_second", 256, 1 << 32, 1 << 20)),
                         parse_rules(doc.get("policy"), where))
