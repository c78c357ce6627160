"""agent.core.outbox: durable, ordered, idempotent delivery; backoff with full jitter."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.ddi_http import DdiClient
from agent.adapters.journal import Journal
from agent.core.fleet_config import FleetConfig
from agent.core.outbox import MODEL_KIND, Backoff, Rejected, Report, Sync
from agent.errors import TransportError
from tests.fakeddi import FakeDdi


class Link:
    def __init__(self) -> None:
        self.up = False
        self.sent: list[Report] = []
        self.reject: set[str] = set()

    def __call__(self, r: Report) -> None:
        if not self.up:
            raise TransportError("link down")
        if r.path in self.reject:
            raise Rejected("HTTP 400")
        self.sent.append(r)


def test_reports_wait_offline_and_arrive_in_order_after_restart(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    link = Link()
    s = Sync(j, link, backoff=Backoff(rng=random.Random(1)))
    for i in range(5):
        s.queue("POST", f"deploymentBase/{i}/feedback", {"n": i})
    r = s.flush()
    assert r.remaining and r.retry_in is not None and link.sent == []
    j.close()
    # the device restarts: the queue is in the journal, not in memory
    j = Journal(tmp_path / "j.db")
    link.up = True
    s = Sync(j, link)
    assert s.flush().delivered == 5
    assert [r.body["n"] for r in link.sent] == [0, 1, 2, 3, 4]
    assert not s.has_pending() and s.flush().delivered == 0
    j.close()


def test_failure_mid_queue_keeps_order(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    calls = {"n": 0}
    sent: list[int] = []

    def flaky(r: Report) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise TransportError("dropped")
        sent.append(r.body["n"])

    s = Sync(j, flaky, clock=lambda: 0.0)
    for i in range(4):
        s.queue("POST", "x", {"n": i})
    assert s.flush().delivered == 2
    assert s.flush(force=True).delivered == 2
    assert sent == [0, 1, 2, 3]
    j.close()


def test_backoff_is_honoured_unless_forced(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    link = Link()
    now = [100.0]
    s = Sync(j, link, backoff=Backoff(base=10, rng=random.Random(3)), clock=lambda: now[0])
    s.queue("POST", "x", {})
    delay = s.flush().retry_in
    assert delay is not None and 0 <= delay <= 10
    link.up = True
    if delay > 0:
        assert s.flush().delivered == 0  # still backing off
    now[0] += delay
    assert s.flush().delivered == 1
    j.close()


def test_poison_report_is_set_aside(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    link = Link()
    link.up = True
    link.reject = {"bad"}
    s = Sync(j, link)
    s.queue("POST", "bad", {})
    s.queue("POST", "good", {})
    r = s.flush()
    assert (r.delivered, r.rejected) == (1, 1) and [x.path for x in link.sent] == ["good"]
    j.close()


def test_full_jitter_bounds_and_spread() -> None:
    b = Backoff(base=1, cap=60, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    ceilings = [min(60, 2 ** i) for i in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    # a fleet after an outage: 1000 devices at the same attempt spread over the window
    spread = sorted(Backoff(base=1, cap=60, rng=random.Random(i), failures=6).next_delay()
                    for i in range(1000))
    assert spread[100] < 10 and spread[900] > 50
    b.reset()
    assert b.next_delay() <= 1


@pytest.fixture
def fake() -> Iterator[FakeDdi]:
    f = FakeDdi()
    yield f
    f.close()


def test_lost_acknowledgement_is_deduplicated_by_the_server(tmp_path: Path, fake: FakeDdi) -> None:
    """The 2xx of a delivered report is lost: the retry carries the same key, seen once."""
    j = Journal(tmp_path / "j.db")
    client = DdiClient(FleetConfig(url=fake.url, controller_id="dev1"))
    lost = {"once": True}

    def send(r: Report) -> None:
        client.send(r)
        if lost.pop("once", False):
            raise TransportError("connection reset before the response")

    s = Sync(j, send, clock=lambda: 0.0)
    s.queue("POST", "deploymentBase/7/feedback",
            {"status": {"execution": "proceeding", "result": {"finished": "none"}}})
    assert s.flush().delivered == 0
    assert s.flush(force=True).delivered == 1
    assert len(fake.feedback) == 1 and fake.duplicates == 1
    j.close()


def test_server_5xx_is_retried_then_delivered(tmp_path: Path, fake: FakeDdi) -> None:
    j = Journal(tmp_path / "j.db")
    client = DdiClient(FleetConfig(url=fake.url, controller_id="dev1"))
    fake.fail_feedback = 2
    s = Sync(j, client.send, clock=lambda: 0.0)
    s.queue("POST", "deploymentBase/7/feedback",
            {"status": {"execution": "closed", "result": {"finished": "success"}}})
    assert s.flush().delivered == 0
    assert s.flush(force=True).delivered == 0
    assert s.flush(force=True).delivered == 1
    assert fake.executions("7") == ["closed/success"]
    j.close()


def test_other_kinds_in_the_outbox_never_hold_reports_back(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    for i in range(120):  # a long backlog of another sender's rows, older than ours
        j.enqueue(MODEL_KIND, {"model": "m", "version": str(i), "status": "activated"})
    link = Link()
    link.up = True
    s = Sync(j, link)
    s.queue("POST", "deploymentBase/1/feedback", {"n": 1})
    assert s.has_pending()
    assert s.flush().delivered == 1 and [r.body for r in link.sent] == [{"n": 1}]
    assert len(j.pending(500, kind=MODEL_KIND)) == 120  # not ours to send, not marked sent
    j.close()
