"""The multi-process simulator (agent/host/simpool): devices split over worker processes, each
an event loop of SimAgents, against a real controller on 127.0.0.1; results gathered. And the
controller's own base-poll histogram (edgeops_controller_poll_seconds) that the benchmark
prints beside the devices' figures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from agent.controller.http import PollTimes
from agent.host.simfleet import LocalController, start_controller
from agent.host.simpool import SimPool, split


@given(n=st.integers(0, 300), workers=st.integers(1, 12))
def test_split_puts_every_device_in_exactly_one_worker_of_about_equal_size(n: int, workers: int) -> None:
    creds = [(f"d{i}", f"t{i}") for i in range(n)]
    parts = split(creds, workers)
    flat = [c for p in parts for c in p]
    assert sorted(flat) == sorted(creds)
    assert len(parts) == max(1, min(workers, n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@given(st.lists(st.floats(0, 20, allow_nan=False), max_size=50))
def test_poll_times_count_each_answer_in_the_first_bucket_that_holds_it(values: list[float]) -> None:
    h = PollTimes()
    for v in values:
        h.observe(v)
    assert sum(h.counts) == len(values)
    edges = [0.0, *h.bounds, float("inf")]
    for i, n in enumerate(h.counts):  # bucket i holds (edges[i], edges[i + 1]]
        assert n == sum(1 for v in values if (edges[i] < v or (i == 0 and v == 0)) and v <= edges[i + 1])


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", poll_sleep=2)
    yield c
    c.stop()


def test_worker_processes_poll_the_controller_and_report_every_device(ctl: LocalController) -> None:
    creds = [(f"dev{i}", str(ctl.api("POST", "/devices", {"id": f"dev{i}"})["token"])) for i in range(12)]
    pool = SimPool(ctl.url, creds, workers=3, poll_sleep=2, release="2.0", connections=16)
    t0 = time.monotonic()
    pool.start()
    try:
        deadline = time.monotonic() + 60
        while pool.progress()[1] < 3 * len(creds) and time.monotonic() < deadline:
            time.sleep(0.5)
        result = pool.stop()
    except BaseException:
        pool.kill()
        raise
    t1 = time.monotonic()
    assert set(result.running) == {d for d, _ in creds}
    assert set(result.running.values()) == {"1.0"}  # no release: every device stays where it was
    assert len(result.latencies) == len(result.stamps) >= 3 * len(creds)
    assert all(t0 <= t <= t1 for t in result.stamps)  # one clock across the processes
    assert result.between(t0, t1) == result.latencies
    # the controller timed the same polls (held long-polls aside)
    text = requests.get(f"{ctl.url}/api/v1/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {ctl.token}"}).text
    inf = [line for line in text.splitlines()
           if line.startswith('edgeops_controller_poll_seconds_bucket{le="+Inf"}')]
    assert inf and float(inf[0].rsplit(" ", 1)[1]) >= len(result.latencies)
