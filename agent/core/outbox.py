"""Offline-first report delivery: a durable, ordered outbox drained when the link is up.

Every report the server must see is first written to the journal's outbox (one SQLite
transaction, synchronous=FULL), then delivered oldest first. Delivery stops at the first
transport failure so order is kept, and resumes after an exponential backoff with *full
jitter* (delay = uniform(0, min(cap, base * 2**n)), as in AWS's "Exponential Backoff And
Jitter"): a fleet that comes back after an outage spreads its retries instead of stampeding.

Idempotency: each report carries a key made when it is queued (``Idempotency-Key`` header).
A report whose 2xx got lost is sent again with the same key, so a server that dedupes by key
(ours does) sees it once; real hawkBit ignores the header, and a repeated intermediate
feedback is harmless there. A 2xx, or a 409/410 for a report on an action the server already
closed, marks it delivered. Other 4xx mean the server will never accept it: it is set aside
(logged, marked sent) so one poison report cannot block the queue forever.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.core import logs
from agent.errors import Throttled, TransportError

log = logs.get(__name__)
KIND = "ddi"
MODEL_KIND = "model-report"  # written by agent.device.models, forwarded by the fleet client


@dataclass(frozen=True)
class Report:
    """One queued HTTP request, relative to the controller base: method, path, JSON body."""

    method: str
    path: str
    body: dict[str, Any]
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "body": self.body, "key": self.key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        return cls(str(d["method"]), str(d["path"]), dict(d["body"]), str(d["key"]))


class Rejected(Exception):
    """The server answered a 4xx that retrying cannot fix."""


class Outbox(Protocol):
    def enqueue(self, kind: str, body: dict[str, Any], *, now: float | None = None) -> int: ...
    def pending(self, limit: int = 100, *, kind: str | None = None
                ) -> list[tuple[int, str, dict[str, Any]]]: ...
    def mark_sent(self, outbox_id: int, *, now: float | None = None) -> None: ...


Send = Callable[[Report], None]  # raises TransportError (retry) or Rejected (drop)


@dataclass
class Backoff:
    base: float = 1.0
    cap: float = 300.0
    rng: random.Random | None = None
    failures: int = 0

    def next_delay(self) -> float:
        """Full jitter: uniform over [0, min(cap, base * 2**failures)]."""
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 30))
        self.failures += 1
        return (self.rng or random).uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0


MAX_RETRY_AFTER = 3600.0  # seconds: a longer Retry-After is taken as this long


def retry_after(value: str | None) -> float | None:
    """An HTTP ``Retry-After`` in delay-seconds (RFC 9110 section 10.2.3), bounded to
    [0, MAX_RETRY_AFTER]; None when absent or not a number (an HTTP-date needs a clock the
    device may not trust: the caller's own backoff applies then)."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        return None
    return min(float(int(text)), MAX_RETRY_AFTER)


@dataclass
class FlushResult:
    delivered: int
    rejected: int
    remaining: bool
    retry_in: float | None  # seconds until the next try after a transport failure


class Sync:
    def __init__(self, outbox: Outbox, send: Send, *, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.outbox, self.send = outbox, send
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.not_before = 0.0

    def queue(self, method: str, path: str, body: dict[str, Any]) -> Report:
        report = Report(method, path, body, str(uuid.uuid4()))
        self.outbox.enqueue(KIND, report.to_dict())
        return report

    def flush(self, *, force: bool = False) -> FlushResult:
        """Deliver queued reports in order until one fails; honour the backoff unless forced."""
        delivered = rejected = 0
        if not force and self.clock() < self.not_before:
            return FlushResult(0, 0, True, self.not_before - self.clock())
        while batch := self.outbox.pending(50, kind=KIND):
            for oid, _, body in batch:
                try:
                    self.send(Report.from_dict(body))
                    delivered += 1
                except Rejected as exc:
                    log.warning("report %s rejected by the controller, set aside: %s", oid, exc)
                    rejected += 1
                except TransportError as exc:
                    delay = self.backoff.next_delay()
                    if isinstance(exc, Throttled):  # the controller named its own delay
                        delay = max(delay, exc.retry_after)
                    self.not_before = self.clock() + delay
                    log.info("report delivery paused %.1fs: %s", delay, exc.one_line())
                    return FlushResult(delivered, rejected, True, delay)
                self.outbox.mark_sent(oid)
        self.backoff.reset()
        return FlushResult(delivered, rejected, False, None)

    def has_pending(self) -> bool:
        return bool(self.outbox.pending(1, kind=KIND))
