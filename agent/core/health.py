"""Turn probe results and a deadline into commit, revert or wait. Pure: no I/O, no clock.

The shell runs the probes (``agent.adapters.probes``; what a probe is lives in
``agent.core.probe_spec``) every ``interval`` seconds during a trial boot, appends the
results and asks ``decide`` what to do. Time is passed in, so every rule is tested with
plain numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from agent.core.frozen import Frozen
from agent.core.probe_spec import ProbeResult, ProbeSpec, bounded_float, bounded_int, one_line
from agent.errors import ConfigError

MAX_PROBES = 32
MAX_DEADLINE = 3600.0
MAX_REASON = 1000
_KEYS = ("deadline", "interval", "retries", "probe")

Verdict = Literal["commit", "revert", "wait"]


class HealthPolicy(Frozen):
    deadline: float = 120.0  # seconds from trial start the checks may take
    interval: float = 2.0  # seconds between attempts
    retries: int = 3  # consecutive failures of one probe that revert
    probes: tuple[ProbeSpec, ...] = ()


class Decision(Frozen):
    verdict: Verdict
    reason: str  # one line


def parse_policy(doc: Mapping[str, Any], *, base: HealthPolicy | None = None) -> HealthPolicy:
    """Build a policy from agent.toml's [health] table, or, given `base`, apply a bundle's
    override: its keys replace base's and its probes are added to base's, because the
    device's own checks must always run. Raises only ConfigError."""
    where = "health" if base is None else "bundle health"
    try:
        return _parse(doc, base or HealthPolicy(), where)
    except ConfigError as exc:
        if base is not None:
            exc.hint = "fix the 'health' object of the bundle manifest and rebuild the bundle"
        raise


def _parse(doc: Mapping[str, Any], base: HealthPolicy, where: str) -> HealthPolicy:
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where} must be a table with keys {', '.join(_KEYS)}")
    for key in doc:
        if key not in _KEYS:
            raise ConfigError(f"{where} has unknown key {str(key)!r}; allowed: {', '.join(_KEYS)}")
    deadline, interval, retries = base.deadline, base.interval, base.retries
    if "deadline" in doc:
        deadline = bounded_float(doc["deadline"], f"{where}.deadline", 1, MAX_DEADLINE)
    if "interval" in doc:
        interval = bounded_float(doc["interval"], f"{where}.interval", 0.1, 600)
    if "retries" in doc:
        retries = bounded_int(doc["retries"], f"{where}.retries", 1, 100)
    probes = _add_probes(base.probes, doc.get("probe", []), where)
    return HealthPolicy(deadline, interval, retries, probes)


def _add_probes(have: tuple[ProbeSpec, ...], docs: object, where: str) -> tuple[ProbeSpec, ...]:
    # Check the count before parsing so a huge list costs nothing.
    if not isinstance(docs, list | tuple) or len(docs) > MAX_PROBES:
        raise ConfigError(f"{where}.probe must be a list of at most {MAX_PROBES} probe tables")
    merged = list(have)
    for i, d in enumerate(docs):
        spec = ProbeSpec.from_dict(d, where=f"{where}.probe[{i}]")
        same = next((p for p in merged if p.name == spec.name), None)
        if same == spec:  # a bundle repeating one of the device's checks: run it once
            continue
        if same is not None:  # results are matched to probes by name
            raise ConfigError(f"{where}.probe[{i}]: another probe is already named "
                              f"{spec.name!r}; give this one a different name")
        merged.append(spec)
    if len(merged) > MAX_PROBES:
        raise ConfigError(f"{where}: {len(merged)} probes in all, at most {MAX_PROBES} allowed")
    return tuple(merged)


def decide(policy: HealthPolicy, results: Sequence[ProbeResult], *,
           started: float, now: float) -> Decision:
    """Commit when every probe's latest result is ok; revert when one probe failed
    `retries` times in a row or the deadline passed without all passing; else wait.

    `results` are all results of this trial in the order they were taken; results
    for names the policy does not know are ignored."""
    if not policy.probes:
        return Decision("commit", "no health probes configured")
    history: dict[str, list[ProbeResult]] = {p.name: [] for p in policy.probes}
    for r in results:
        if r.name in history:
            history[r.name].append(r)
    failing: list[str] = []
    for name, rs in history.items():
        streak = _failure_streak(rs)
        if streak >= policy.retries:
            return _decision("revert", f"probe {name!r} failed {streak} times in a row: "
                                       f"{rs[-1].detail}")
        if not rs or not rs[-1].ok:
            failing.append(f"{name} ({rs[-1].detail if rs else 'no result yet'})")
    if not failing:
        return Decision("commit", f"all {len(history)} health probes passed")
    if now - started > policy.deadline:
        return _decision("revert", f"health deadline of {policy.deadline:g}s passed; "
                                   f"still failing: {'; '.join(failing)}")
    return _decision("wait", f"waiting for: {'; '.join(failing)}")


def _failure_streak(rs: Sequence[ProbeResult]) -> int:
    n = 0
    for r in reversed(rs):
        if r.ok:
            break
        n += 1
    return n


def _decision(verdict: Verdict, reason: str) -> Decision:
    # Details come from probes; keep the reason one bounded line for logs and history.
    return Decision(verdict, one_line(reason, MAX_REASON))
