"""Health of a freshly swapped model: pure decisions from counters, no clock or threads.

The host (agent.device.modelhost) counts requests, errors and latencies of the new
model, and keeps the previous model's steady-state latencies as the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["wait", "commit", "revert"]


@dataclass(frozen=True)
class HealthPolicy:
    window_s: float = 60.0  # observe the new model this long before calling it good
    min_requests: int = 20  # judge nothing on fewer requests: no traffic is no evidence
    max_error_rate: float = 0.05
    max_p95_ratio: float = 2.0  # new p95 may be at most this multiple of the previous model's
    p95_floor_ms: float = 1.0  # below this a p95 is scheduler noise, not a regression

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> HealthPolicy:
        base = cls()
        return cls(
            window_s=float(doc.get("window_s", base.window_s)),
            min_requests=int(doc.get("min_requests", base.min_requests)),
            max_error_rate=float(doc.get("max_error_rate", base.max_error_rate)),
            max_p95_ratio=float(doc.get("max_p95_ratio", base.max_p95_ratio)),
            p95_floor_ms=float(doc.get("p95_floor_ms", base.p95_floor_ms)),
        )


@dataclass(frozen=True)
class WindowStats:
    requests: int
    errors: int
    p95_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


def p95(samples: Sequence[float]) -> float | None:
    """Nearest-rank 95th percentile; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def decide(policy: HealthPolicy, new: WindowStats, previous: WindowStats | None, *,
           elapsed: float, app_failure: str | None = None) -> Decision:
    if app_failure:
        return Decision("revert", f"application check failed: {app_failure}")
    if new.requests >= policy.min_requests and new.error_rate > policy.max_error_rate:
        # errors are judged early: every further request would fail too
        return Decision("revert", f"error rate {new.error_rate:.1%} over {new.requests} requests "
                                  f"exceeds {policy.max_error_rate:.1%}")
    if elapsed < policy.window_s or new.requests < policy.min_requests:
        return Decision("wait", f"{new.requests} requests in {elapsed:.1f}s")
    if previous is not None and previous.p95_ms is not None and new.p95_ms is not None:
        limit = max(policy.max_p95_ratio * previous.p95_ms, policy.p95_floor_ms)
        if new.p95_ms > limit:
            return Decision("revert", f"p95 latency {new.p95_ms:.3f} ms exceeds {limit:.3f} ms "
                                      f"({policy.max_p95_ratio:g}x the previous model's "
                                      f"{previous.p95_ms:.3f} ms)")
    return Decision("commit", f"{new.requests} requests, error rate {new.error_rate:.1%}, "
                              f"p95 {new.p95_ms or 0:.3f} ms")
