"""Rollout planning and gating. Pure: targets, outcomes and ``now`` in, a plan or a decision out.

A plan is a list of waves. Wave 0 is the canary: ``canary_percent`` of the
targets (at least one), chosen deterministically from the rollout's seed and
spread across sites round-robin, so one bad site cannot hide a bad release and
one site cannot take the whole canary. Later waves grow by ``growth`` each.

Between waves the gate decides (``evaluate``):
- ``pause`` as soon as failures in the current wave reach ``error_threshold``
  (the release is bad: stop before anyone else gets it);
- ``advance`` (or ``complete`` after the last wave) once successes reach
  ``success_threshold`` of the wave; success means the device reported
  ``closed/success``, which edgeops agents send only after the trial boot
  committed the new slot, and rauc-hawkbit-updater as soon as the image is
  written. With ``require_commit`` only the stronger signal counts: ``Fleet``
  passes a success that did not come after a commit as ``running``
  (``actions.gate_outcome``), so the wave cannot pass on written images alone;
- ``pause`` when ``window`` seconds pass without reaching the threshold;
- ``wait`` otherwise.

Pacing (``release``): within the waves, a rollout may release its actions gradually rather
than a whole wave at once. Three limits, each off by default (0):
- a rate ramp, as AWS IoT Jobs' exponential rollout rate: ``ramp_rate`` devices in the first
  minute, times ``ramp_growth`` each further minute while no device of the rollout failed
  (after a failure the rate stays where it started);
- ``site_concurrency``: at most this many devices of one site with an action in flight;
- ``download_seconds``: per site, only as many downloads in flight as the site's measured
  bandwidth (``site_bandwidth``, from the download times its devices reported) serves within
  that many seconds each; a site not measured yet gets one download to measure it by.
A device not yet released counts as ``pending`` at the gate, so a wave never passes on the
share of it that was released.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from agent.controller.errors import BadRequest, Conflict

Outcome = Literal["pending", "running", "success", "failure", "canceled"]
Verdict = Literal["wait", "advance", "complete", "pause"]


@dataclass(frozen=True)
class Target:
    device_id: str
    site: str = ""


@dataclass(frozen=True)
class Policy:
    canary_percent: float = 5.0
    growth: float = 2.0
    success_threshold: float = 0.95  # fraction of a wave that must commit
    error_threshold: float = 0.2  # fraction of a wave failing that pauses the rollout
    window: float = 3600.0  # seconds a wave may take to pass the gate
    require_commit: bool = False  # count only successes reported after a committed trial
    ramp_rate: float = 0.0  # devices released in the first minute; 0: a whole wave at once
    ramp_growth: float = 2.0  # the per-minute rate's factor each minute while nothing failed
    site_concurrency: float = 0.0  # devices of one site with an action in flight; 0: no cap
    download_seconds: float = 0.0  # pace each site by its measured bandwidth; 0: off

    def __post_init__(self) -> None:
        checks = [
            (0 < self.canary_percent <= 100, "canary_percent must be in (0, 100]"),
            (1 <= self.growth <= 100, "growth must be from 1 to 100"),
            (0 < self.success_threshold <= 1, "success_threshold must be in (0, 1]"),
            (0 < self.error_threshold <= 1, "error_threshold must be in (0, 1]"),
            (self.window > 0, "window must be positive"),
            (0 <= self.ramp_rate <= 1e6 and 0 <= self.site_concurrency <= 1e6
             and 0 <= self.download_seconds <= 1e7,
             "ramp_rate and site_concurrency must be from 0 to 1e6, download_seconds from 0 to 1e7"),
            (1 <= self.ramp_growth <= 100, "ramp_growth must be from 1 to 100"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadRequest(f"rollout policy: {message}")

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise BadRequest(f"rollout policy: unknown keys {sorted(unknown)}")
        flag = d.get("require_commit", False)
        if not isinstance(flag, bool):
            raise BadRequest("rollout policy: require_commit must be true or false")
        try:
            numbers = {k: float(v) for k, v in d.items() if k != "require_commit"}
        except (TypeError, ValueError):
            raise BadRequest("rollout policy values must be numbers") from None
        return cls(**numbers, require_commit=flag)  # type: ignore[arg-type]


    @property
    def paced(self) -> bool:
        return bool(self.ramp_rate or self.site_concurrency or self.download_seconds)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


def _rank(seed: str, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def spread_order(targets: Sequence[Target], seed: str) -> list[str]:
    """All targets, interleaved across sites; within a site and across sites, order is by hash."""
    by_site: dict[str, list[str]] = defaultdict(list)
    for t in sorted(set(targets), key=lambda t: _rank(seed, t.device_id)):
        by_site[t.site].append(t.device_id)
    sites = sorted(by_site, key=lambda s: _rank(seed, "site:" + s))
    out: list[str] = []
    depth = max((len(v) for v in by_site.values()), default=0)
    for i in range(depth):
        out += [by_site[s][i] for s in sites if i < len(by_site[s])]
    return out


def wave_sizes(total: int, policy: Policy) -> list[int]:
    if total <= 0:
        return []
    size = min(total, max(1, math.ceil(total * policy.canary_percent / 100)))
    sizes: list[int] = []
    left = total
    while left:
        take = min(left, size)
        sizes.append(take)
        left -= take
        size = max(size + 1, math.ceil(size * policy.growth))  # strictly growing waves
    return sizes


def plan(targets: Sequence[Target], policy: Policy, seed: str) -> list[list[str]]:
    order = spread_order(targets, seed)
    waves, start = [], 0
    for n in wave_sizes(len(order), policy):
        waves.append(order[start:start + n])
        start += n
    return waves


def evaluate(outcomes: Mapping[str, Outcome], *, policy: Policy, wave_started: float, now: float,
             last_wave: bool) -> Decision:
    """Gate decision for the running wave, from each of its devices' outcome."""
    n = len(outcomes)
    if n == 0:
        return Decision("complete" if last_wave else "advance", "empty wave")
    failed = sum(1 for o in outcomes.values() if o == "failure")
    ok = sum(1 for o in outcomes.values() if o == "success")
    if failed / n >= policy.error_threshold:
        return Decision("pause", f"{failed} of {n} devices in the wave failed "
                                 f"(error threshold {policy.error_threshold:.0%})")
    if ok / n >= policy.success_threshold:
        return Decision("complete" if last_wave else "advance",
                        f"{ok} of {n} devices committed (threshold {policy.success_threshold:.0%})")
    if now - wave_started > policy.window:
        return Decision("pause", f"only {ok} of {n} devices committed within {policy.window:g} s "
                                 f"(threshold {policy.success_threshold:.0%})")
    return Decision("wait", f"{ok} of {n} committed, {failed} failed")


# --- who gets a bundle, and how a paused rollout goes on --------------------------------------
Choice = Literal["retry", "skip", "raise-threshold"]
CHOICES: tuple[Choice, ...] = ("retry", "skip", "raise-threshold")


def ineligible(bundle_compatible: str, bundle_version: str, device_compatible: str | None,
               device_version: str | None, *, force: bool, failed_it: bool = False) -> str | None:
    """Why a device must not get this bundle (None: it may). A device that told us its
    ``compatible`` and names another board never gets it, ``force`` or not (it would refuse the
    bundle after downloading it, or worse, a client without that check would write it); one that
    already runs the bundle's version, or whose last try of this bundle failed (``failed_it``),
    is left alone unless ``force`` (a reinstall reboots it; a failed one would fail again).
    A device that never reported its compatible is not refused: the device itself checks."""
    if device_compatible and device_compatible != bundle_compatible:
        return f"incompatible: it is {device_compatible!r}, the bundle is for {bundle_compatible!r}"
    if not force and device_version is not None and device_version == bundle_version:
        return f"already runs {bundle_version}"
    if not force and failed_it:
        return f"failed {bundle_version} at its last try"
    return None


def resume(outcomes: Mapping[str, Outcome], *, policy: Policy, now: float, last_wave: bool,
           choice: Choice | None, threshold: float | None = None) -> tuple[Policy, Decision]:
    """A paused rollout's resume, decided before anything changes: the policy it runs on and the
    gate's first decision after it. ``outcomes`` are the wave's, with the choice applied by the
    caller (``retry``: the failed devices pending again; ``skip``: the failed devices left out).
    Raises ``ResumeRefused`` when the rollout would pause again at once for the same reason,
    so the operator is asked to choose instead of watching it re-pause within seconds."""
    if choice == "raise-threshold":
        if threshold is None or not 0 < threshold <= 1:
            raise BadRequest("raise-threshold needs 'threshold', a fraction in (0, 1]")
        if threshold <= policy.error_threshold:
            raise BadRequest(f"threshold {threshold:g} does not raise the error threshold "
                             f"{policy.error_threshold:g}")
        policy = Policy(**{**asdict(policy), "error_threshold": threshold})
    elif threshold is not None:
        raise BadRequest("'threshold' goes only with the choice raise-threshold")
    decision = evaluate(outcomes, policy=policy, wave_started=now, now=now, last_wave=last_wave)
    if decision.verdict == "pause":
        what = "choose one of: " + ", ".join(CHOICES) if choice is None else f"{choice} is not enough"
        raise ResumeRefused(f"resuming would pause again at once: {decision.reason}; {what}")
    return policy, decision


class ResumeRefused(Conflict):
    hint = ("resume with {\"choice\": \"retry\"} (the failed devices try again), \"skip\" (leave "
            "them out and go on) or \"raise-threshold\" with \"threshold\"")


# --- pacing -------------------------------------------------------------------------------------
def ramp_allowance(policy: Policy, since: float, *, healthy: bool) -> float:
    """Devices the ramp allows to have been released ``since`` seconds after the rollout began:
    each started minute k adds ``ramp_rate * ramp_growth**k`` (growth 1 once something failed).
    Unlimited (inf) without a ramp."""
    if policy.ramp_rate <= 0:
        return math.inf
    g = policy.ramp_growth if healthy else 1.0
    minutes = math.floor(max(0.0, since) / 60) + 1
    total, rate = 0.0, policy.ramp_rate
    for _ in range(min(minutes, 10_000)):
        total += rate
        rate *= g
        if total > 1e12:  # more than any fleet: the ramp no longer limits anything
            return math.inf
    return total


def site_bandwidth(downloads: Sequence[tuple[float, float | None]], size: int) -> float:
    """A site's measured bandwidth in bytes/s from its downloads' (start, end) times (end None:
    still running): the best aggregate seen, each finished download's rate times the number of
    downloads running at its midpoint. 0.0 when none has finished."""
    best = 0.0
    for start, end in downloads:
        if end is None or end <= start:
            continue
        mid = (start + end) / 2
        overlapping = sum(1 for a, b in downloads if a <= mid and (b is None or b >= mid))
        best = max(best, size / (end - start) * overlapping)
    return best


def site_caps(policy: Policy, bandwidth: Mapping[str, float], size: int) -> dict[str, float]:
    """Per site, how many devices may have an action in flight (inf: no cap)."""
    caps: dict[str, float] = {}
    for site, bw in bandwidth.items():
        cap = policy.site_concurrency or math.inf
        if policy.download_seconds > 0 and size > 0:
            cap = min(cap, max(1.0, math.floor(bw * policy.download_seconds / size)))
        caps[site] = cap
    return caps


def release(waiting: Sequence[Target], policy: Policy, *, released: int, since: float, healthy: bool,
            in_flight: Mapping[str, int], caps: Mapping[str, float]) -> list[str]:
    """Which of the wave's ``waiting`` devices (in wave order) to release now."""
    budget = ramp_allowance(policy, since, healthy=healthy) - released
    busy = dict(in_flight)
    out: list[str] = []
    for t in waiting:
        if budget < 1:
            break
        if busy.get(t.site, 0) >= caps.get(t.site, math.inf):
            continue
        out.append(t.device_id)
        busy[t.site] = busy.get(t.site, 0) + 1
        budget -= 1
    return out
