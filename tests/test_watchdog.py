"""Watchdog: fed only while the main loop kicks; magic close; real sd_notify datagrams."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.watchdog import DevWatchdog, SystemdNotify, Watchdog, WatchdogError, from_environment


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_tick_feeds_only_while_the_loop_kicks(tmp_path: Path) -> None:
    dev = tmp_path / "watchdog"
    dev.touch()
    clock = FakeClock()
    wd = Watchdog(DevWatchdog(dev), stale_after=10, clock=clock)
    assert wd.tick()
    clock.t += 9
    assert wd.tick()
    clock.t += 2  # 11 s since the last kick
    assert not wd.tick()
    wd.kick()
    assert wd.tick()
    wd.kick(grace=60)  # the loop announces a 60 s long-poll
    clock.t += 65
    assert wd.tick()
    clock.t += 10
    assert not wd.tick()
    wd.stop(clean=True)
    assert dev.read_bytes() == b"\0\0\0\0V"


def test_hung_loop_stops_the_feeding(tmp_path: Path) -> None:
    dev = tmp_path / "watchdog"
    dev.touch()
    wd = Watchdog(DevWatchdog(dev), interval=0.01, stale_after=0.15)
    wd.start()
    stop_loop = threading.Event()

    def main_loop() -> None:
        while not stop_loop.is_set():
            wd.kick()
            time.sleep(0.01)

    loop = threading.Thread(target=main_loop)
    loop.start()
    time.sleep(0.3)
    fed_while_alive = dev.stat().st_size
    assert fed_while_alive >= 5
    stop_loop.set()  # the loop "hangs": no more kicks
    loop.join()
    time.sleep(0.3)  # past stale_after: the feeding must have stopped
    size = dev.stat().st_size
    time.sleep(0.2)
    assert dev.stat().st_size == size, "the watchdog was fed although the loop was hung"
    wd.stop(clean=False)  # no magic close: the hardware reset stays armed
    assert not dev.read_bytes().endswith(b"V")
    assert set(dev.read_bytes()) == {0}


def test_fifo_device(tmp_path: Path) -> None:
    fifo = tmp_path / "wdfifo"
    os.mkfifo(fifo)
    got = bytearray()

    def reader() -> None:
        with open(fifo, "rb") as f:
            got.extend(f.read())

    t = threading.Thread(target=reader)
    t.start()
    wd = Watchdog(DevWatchdog(fifo), stale_after=5)
    wd.tick()
    wd.stop()
    t.join(5)
    assert bytes(got) == b"\0V"


def test_missing_device_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(WatchdogError):
        DevWatchdog(tmp_path / "nope")


def test_systemd_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    try:
        wd = from_environment({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}, None)
        assert wd is not None and wd.interval == pytest.approx(0.1)
        wd.start()
        assert server.recv(64) == b"WATCHDOG=1"
        wd.kick()
        assert server.recv(64) == b"WATCHDOG=1"
        wd.stop()
        msgs = []
        while True:
            try:
                msgs.append(server.recv(64))
            except TimeoutError:
                break
        assert msgs[-1] == b"STOPPING=1"
    finally:
        server.close()


def test_abstract_notify_socket() -> None:
    name = f"edgeops-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        SystemdNotify("@" + name).feed()
        assert server.recv(64) == b"WATCHDOG=1"
    finally:
        server.close()


def test_environment_choice(tmp_path: Path) -> None:
    dev = tmp_path / "watchdog"
    assert from_environment({}, dev) is None
    dev.touch()
    wd = from_environment({"WATCHDOG_USEC": "1000000", "NOTIFY_SOCKET": "/x", "WATCHDOG_PID": "1"},
                          dev, pid=2)
    assert wd is not None and isinstance(wd.feeder, DevWatchdog)  # systemd's dog is for pid 1
    wd.stop()
    with pytest.raises(WatchdogError):
        from_environment({"WATCHDOG_USEC": "soon", "NOTIFY_SOCKET": "/x"}, None)


def test_agent_loop_feeds_systemd_watchdog(device_dir: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config",
                             str(device_dir / "agent.toml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.recv(64) == b"WATCHDOG=1"
        assert server.recv(64) == b"WATCHDOG=1"  # fed again on its 0.2 s interval
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        msgs = []
        while True:
            try:
                msgs.append(server.recv(64))
            except TimeoutError:
                break
            if msgs[-1] == b"STOPPING=1":
                break
        assert msgs[-1] == b"STOPPING=1"
    finally:
        proc.kill()
        proc.wait()
        server.close()


@pytest.mark.parametrize("in_trial", [True, False])
def test_agent_crash_leaves_the_watchdog_armed_only_during_a_trial(
        device_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_bundle: Any,
        in_trial: bool) -> None:
    import io

    from agent.core.config import load
    from agent.device import service
    from agent.device.updater import Updater, open_device
    from agent.host import sim

    if in_trial:
        dev_ = open_device(load(device_dir / "agent.toml"))
        Updater(dev_).install(io.BytesIO(make_bundle("2.0").read_bytes()))
        dev_.close()
        sim.SimFirmware(device_dir).reboot()
    dog = tmp_path / "watchdog"
    dog.touch()
    def cycle(self: Updater) -> None:
        time.sleep(0.05)  # fed meanwhile
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(Updater, "cycle", cycle)
    dev_ = open_device(load(device_dir / "agent.toml"))
    try:
        with pytest.raises(RuntimeError):
            service.run(Updater(dev_), once=False, stop=service.Stop(), watchdog=lambda up: Watchdog(
                DevWatchdog(dog), interval=0.01, stale_after=60))
    finally:
        dev_.close()
    fed = dog.read_bytes()
    assert fed and set(fed[:-1]) == {0}
    # the magic 'V' disarms it: never during a trial (a hung trial must be reset by hardware),
    # but a committed system is not reset because its agent crashed
    assert fed.endswith(b"V") is not in_trial


def test_sigterm_ends_the_agent_during_a_held_long_poll(device_dir: Path) -> None:
    import signal
    import subprocess
    import sys

    from tests.fakeddi import FakeDdi

    fake = FakeDdi(token="t0k3n", sleep="00:01:00")  # holds each long-poll for 10 s
    cfg = device_dir / "agent.toml"
    with open(cfg, "a") as f:
        f.write(f'\n[fleet]\nurl = "{fake.url}"\ncontroller_id = "dev1"\nauth = "target"\n'
                f'token = "t0k3n"\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any("If-None-Match" in h and "Prefer" in h for _, _, h in fake.requests):
            assert time.monotonic() < deadline, "the agent never long-polled"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)  # the request is being held by the controller now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 5, "SIGTERM waited for the held long-poll to end"
        assert proc.returncode == 0, err
        assert out.strip().endswith("phase: idle")
    finally:
        proc.kill()
        proc.wait()
        fake.close()
