"""Drains a telemetry buffer through its senders, in the order and at the pace the policy says.

Remote write for samples, OTLP for finished update traces. Each batch is deleted from the
buffer only after a 2xx (``ack``), so a crash between send and acknowledgement sends it
again, never loses it; the retry delay, the Retry-After rule and the byte cap per second
are ``agent.core.telemetry_policy``'s. ``clock``, ``sleep`` and ``rng`` are seams for tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from agent.adapters.remote_write import Answer
from agent.adapters.remote_write import encode as encode_write
from agent.adapters.telemetry_buffer import TelemetryBuffer
from agent.core import logs
from agent.core import telemetry_policy as tp

log = logs.get("edgeops.telemetry")


class Sender(Protocol):
    def send_body(self, body: bytes) -> Answer: ...


@dataclass
class FlushReport:
    samples: int = 0
    spans: int = 0
    bytes: int = 0
    rejected: int = 0
    retry_in: float | None = None  # set when a send failed: the buffer keeps the rest
    last: str = ""  # the last failure, one line


@dataclass
class _Lane:
    failures: int = 0
    not_before: float = 0.0


@dataclass
class Shipper:
    buffer: TelemetryBuffer
    metrics: Sender | None
    traces: Sender | None = None
    resource: dict[str, str] = field(default_factory=dict)
    batch_samples: int = 2000
    bytes_per_second: int = 64 << 10
    policy: tp.RetryPolicy = field(default_factory=tp.RetryPolicy)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    rng: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        self.rate = tp.RateLimit(self.bytes_per_second)
        self.lanes = {"metrics": _Lane(), "traces": _Lane()}

    def due_in(self) -> float:
        """Seconds until a failed lane may be tried again (0: now)."""
        now = self.clock()
        return max(0.0, min(lane.not_before for lane in self.lanes.values()) - now)

    def flush(self, *, force: bool = False, max_batches: int | None = None) -> FlushReport:
        """Send until the buffer is empty or a send fails (then back off)."""
        report = FlushReport()
        if self.traces is not None:
            self._flush_traces(report, force=force)
        if self.metrics is not None:
            self._flush_metrics(report, force=force, max_batches=max_batches)
        return report

    def _ready(self, lane: _Lane, report: FlushReport, force: bool) -> bool:
        wait = lane.not_before - self.clock()
        if wait > 0 and not force:
            report.retry_in = wait
            return False
        return True

    def _answer(self, lane: _Lane, answer: Answer, report: FlushReport) -> tp.Verdict:
        v = tp.classify(answer.status, answer.retry_after, failures=lane.failures,
                        now=self.clock(), u=self.rng(), policy=self.policy)
        if v.outcome is tp.Outcome.RETRY:
            lane.failures += 1
            lane.not_before = self.clock() + v.delay
            report.retry_in = v.delay
            report.last = f"HTTP {answer.status}" if answer.status else (answer.detail or "no answer")
            log.info("telemetry send failed (%s), next try in %.1fs", report.last, v.delay)
        else:
            lane.failures = 0
            lane.not_before = 0.0
            if v.outcome is tp.Outcome.REJECTED:
                report.last = f"HTTP {answer.status} {answer.detail[:200]}".rstrip()
                log.warning("telemetry receiver refused a batch for good: %s", report.last)
        return v

    def send_now(self, series: list[tuple[tuple[tuple[str, str], ...], list[tuple[int, float]]]],
                 report: FlushReport) -> tp.Outcome | None:
        """Send fresh samples without buffering them (the buffer is empty and the link up);
        None when the lane is backing off. The caller buffers them unless ACKED."""
        assert self.metrics is not None
        lane = self.lanes["metrics"]
        if not self._ready(lane, report, False):
            return None
        body = encode_write(series)
        self._pace(len(body))
        v = self._answer(lane, self.metrics.send_body(body), report)
        if v.outcome is tp.Outcome.ACKED:
            report.samples += sum(len(pts) for _, pts in series)
            report.bytes += len(body)
        return v.outcome

    def _flush_metrics(self, report: FlushReport, *, force: bool, max_batches: int | None) -> None:
        assert self.metrics is not None
        lane, n = self.lanes["metrics"], 0
        while self._ready(lane, report, force) and (max_batches is None or n < max_batches):
            batch = self.buffer.batch(self.batch_samples)
            if not batch.ids:
                return
            body = encode_write(batch.series)
            self._pace(len(body))
            v = self._answer(lane, self.metrics.send_body(body), report)
            n += 1
            if v.outcome is tp.Outcome.RETRY:
                return
            if v.outcome is tp.Outcome.ACKED:
                self.buffer.ack(batch.ids, self.clock())
                report.samples += batch.samples
                report.bytes += len(body)
            else:
                self.buffer.reject(batch.ids)
                report.rejected += batch.samples
            force = False

    def flush_traces(self, report: FlushReport) -> None:
        self._flush_traces(report, force=False)

    def _flush_traces(self, report: FlushReport, *, force: bool) -> None:
        from agent.adapters.otlp import encode as encode_traces

        assert self.traces is not None
        lane = self.lanes["traces"]
        while self._ready(lane, report, force):
            ids, spans = self.buffer.span_batch()
            if not ids:
                return
            body = encode_traces(spans, self.resource)
            self._pace(len(body))
            v = self._answer(lane, self.traces.send_body(body), report)
            if v.outcome is tp.Outcome.RETRY:
                return
            if v.outcome is tp.Outcome.ACKED:
                self.buffer.ack_spans(ids, self.clock())
                report.spans += len(ids)
            else:
                self.buffer.reject_spans(ids)
                report.rejected += len(ids)
            force = False

    def _pace(self, n: int) -> None:
        wait = self.rate.wait(self.clock())
        if wait > 0:
            self.sleep(wait)
        self.rate.sent(n, self.clock())
