"""The device lock: the agent and scripts are refused at once; a console command waits out an
agent cycle for a bounded time, and says so."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.device.updater import Updater
from agent.errors import DeviceBusy


@contextmanager
def held_by_another_process_for(lock: Path, seconds: float | None) -> Iterator[None]:
    """flock on a second open file description: to flock that is another holder, as the
    agent's process is. Released after ``seconds`` (None: at the end of the block)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    timer = threading.Timer(seconds, os.close, (fd,)) if seconds is not None else None
    if timer is not None:
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.join()
        else:
            os.close(fd)


def test_without_a_wait_a_held_lock_is_refused_at_once(updater: Updater) -> None:
    told: list[float] = []
    updater.on_lock_wait = told.append
    with held_by_another_process_for(updater.cfg.state_dir / "lock", None), \
            pytest.raises(DeviceBusy, match=r"holds the device lock$"), updater.locked():
        pass
    assert told == []


def test_a_wait_takes_the_lock_once_the_other_holder_lets_go(updater: Updater) -> None:
    told: list[float] = []
    updater.lock_wait, updater.on_lock_wait = 20.0, told.append
    entered = False
    with held_by_another_process_for(updater.cfg.state_dir / "lock", 0.5), updater.locked():
        entered = True
    assert entered
    assert told == [20.0]  # told once, with the bound


def test_a_wait_is_bounded_and_the_refusal_says_how_long_it_waited(updater: Updater) -> None:
    updater.lock_wait = 0.6
    with held_by_another_process_for(updater.cfg.state_dir / "lock", None), \
            pytest.raises(DeviceBusy, match=r"waited 1 s"), updater.locked():
        pass
