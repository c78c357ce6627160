"""Overload: a full database queue answers 429 with Retry-After, and every device-side client
waits at least that long (the real controller on 127.0.0.1; its queue is filled by holding
the database writer's lock while one device write waits on it)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from agent.adapters.ddi_http import DdiClient
from agent.adapters.ddi_poll import BasePoll
from agent.controller.shaping import PollShaper
from agent.core.config import load
from agent.core.fleet_config import FleetConfig
from agent.core.outbox import MAX_RETRY_AFTER, Backoff, Report, Sync, retry_after
from agent.device.fleet import FleetAgent
from agent.device.updater import Updater, open_device
from agent.errors import Throttled
from agent.host.simfleet import LocalController, start_controller

RETRY = 7


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[LocalController]:
    # no timed gate tick: one could take the single queue slot before the test's write does
    c = start_controller(tmp_path / "ctl", db_queue=1, retry_after=RETRY, poll_sleep=1,
                         tick_interval=3600)
    yield c
    c.stop()


@pytest.fixture
def token(ctl: LocalController) -> str:
    return str(ctl.api("POST", "/devices", {"id": "dev1"})["token"])


class Busy:
    """The controller's one database call slot taken: the writer's lock held, one device write
    (a configData report) waiting on it. Polls read over their own connection without queueing
    (dbexec.read), but a full queue turns them away too."""

    def __init__(self, ctl: LocalController, token: str) -> None:
        self.ctl, self.token = ctl, token
        self.lock = ctl.fleet.db._lock
        self.waiting: threading.Thread | None = None
        self.answer: list[int] = []

    def __enter__(self) -> Busy:
        self.lock.acquire()
        self.waiting = threading.Thread(target=lambda: self.answer.append(requests.put(
            f"{self.ctl.url}/DEFAULT/controller/v1/dev1/configData", timeout=30,
            json={"data": {"k": "v"}},
            headers={"Authorization": f"TargetToken {self.token}"}).status_code))
        self.waiting.start()
        time.sleep(0.3)  # a head start: the write, not a poll's fallback, takes the one slot
        # the waiting write has reached the executor once a poll is refused
        for _ in range(200):
            if _poll(self.ctl, self.token, timeout=5).status_code == 429:
                break
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        assert self.waiting is not None
        self.waiting.join(30)


def _poll(ctl: LocalController, token: str, timeout: float = 30) -> requests.Response:
    return requests.get(f"{ctl.url}/DEFAULT/controller/v1/dev1", timeout=timeout,
                        headers={"Authorization": f"TargetToken {token}"})


def _cfg(ctl: LocalController, token: str) -> FleetConfig:
    return FleetConfig(url=ctl.url, controller_id="dev1", auth="target", token=token,
                       poll_interval=1.0, min_sleep=0)


def test_a_full_database_queue_answers_429_with_a_spread_retry_after(ctl: LocalController,
                                                                     token: str) -> None:
    with Busy(ctl, token) as busy:
        r = _poll(ctl, token)
        assert r.status_code == 429
        assert RETRY <= int(r.headers["Retry-After"]) <= 2 * RETRY
        assert r.json()["error"] == "Overloaded"
    assert busy.answer == [200]  # the write that waited was served, not dropped
    # the jobs that queued behind the locks (last-seen flush, gate tick) finish within moments
    for _ in range(50):
        if _poll(ctl, token).status_code == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the controller kept refusing polls after its queue drained")


def test_the_fleet_agent_sleeps_at_least_the_retry_after(ctl: LocalController, token: str,
                                                         device_dir: Path) -> None:
    dev = open_device(load(device_dir / "agent.toml"))
    try:
        agent = FleetAgent(Updater(dev, sleep=lambda s: None), DdiClient(_cfg(ctl, token)),
                           sleep=lambda s: None, backoff=Backoff(base=0.01, cap=0.01,
                                                                 rng=random.Random(0)))
        with Busy(ctl, token):
            out = agent.poll_once()
        assert out.error is not None and "429" in out.error
        assert out.sleep >= RETRY  # its own backoff alone would say at most 1 s (poll_interval)
    finally:
        dev.close()


def test_the_idle_agents_poller_raises_throttled_with_the_delay(ctl: LocalController,
                                                                token: str) -> None:
    poll = BasePoll(_cfg(ctl, token))
    try:
        with Busy(ctl, token), pytest.raises(Throttled) as caught:
            poll.poll()
        assert RETRY <= caught.value.retry_after <= 2 * RETRY
    finally:
        poll.close()


def test_reports_wait_at_least_the_retry_after() -> None:
    class Box:
        def __init__(self) -> None:
            self.rows = [(1, "ddi", Report("POST", "x/feedback", {}, "k").to_dict())]

        def enqueue(self, kind: str, body: dict[str, object]) -> None: ...

        def pending(self, n: int, kind: str | None = None) -> list[tuple[int, str, dict[str, object]]]:
            return list(self.rows)

        def mark_sent(self, oid: int) -> None:
            self.rows = []

    def send(report: Report) -> None:
        raise Throttled("busy", retry_after=50)

    sync = Sync(Box(), send, backoff=Backoff(base=0.01, cap=0.01))  # type: ignore[arg-type]
    result = sync.flush()
    assert result.remaining and result.retry_in is not None and result.retry_in >= 50


@given(st.text(max_size=20))
def test_retry_after_is_a_bounded_number_or_nothing(value: str) -> None:
    got = retry_after(value)
    if got is not None:
        assert 0 <= got <= MAX_RETRY_AFTER
        assert value.strip().isdigit()


# --- config.polling.sleep shaping (controller.shaping) -------------------------------------------
@given(st.text(min_size=1, max_size=64), st.integers(10, 86400))
def test_each_device_gets_its_own_stable_sleep_within_ten_percent(device: str, sleep: int) -> None:
    shaper = PollShaper(sleep)
    got = shaper.sleep_for(device, 0.0)
    assert abs(got - sleep) <= 0.1 * sleep + 1
    assert shaper.sleep_for(device, 1.0) == got  # same device, same answer: its ETag holds


def test_a_surge_of_polls_stretches_every_sleep_and_the_stretch_ends_with_it() -> None:
    shaper = PollShaper(60, devices=600)  # steady: 10 polls/s
    for i in range(600):  # 60 polls/s over the last 10 s: a whole fleet came back at once
        shaper.seen(i / 60)
    assert shaper.sleep_for("d", 10.0) >= 2 * 54  # stretched
    assert shaper.sleep_for("d", 10.01) >= 4 * 54  # still above 1.5 x the stretched rate: again
    for i in range(20):  # then 2 polls/s: well under the steady rate
        shaper.seen(30 + i / 2)
    shaper.sleep_for("d", 40.0)
    assert shaper.sleep_for("d", 40.1) <= 66  # back to the plain sleep, one step at a time
