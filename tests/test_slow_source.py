"""A trickling or stalled source never holds the device: exit 40, lock released, phase idle.

A loopback server sends a bundle's head at once and then one byte per second (or nothing).
``edgeops install URL`` must give up by itself — the default policy has a minimum rate and
a stall timeout on every download — in one line with exit 40, and leave the device as a
refused install does: the lock free, the phase idle, the half-written slot empty. The
default window is a minute; these tests shorten the window (and only that) to stay quick.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.adapters import download
from agent.adapters.download import DownloadCancelled, DownloadTooSlow, Origin, ResumableStream
from agent.cli.main import main
from agent.core.config import load
from agent.core.fleet_config import DEFAULT_MIN_RATE, DownloadPolicy, parse_fleet
from agent.device.updater import open_device
from agent.errors import ConfigError
from tests.conftest import BundleFactory

FAST = 20_000  # bytes sent at once: the signed head and the first payload blocks
GIVE_UP = 12.0  # the server's own bound per connection: no test can hang on it


@dataclass
class SlowServer:
    """HTTP/1.1 on 127.0.0.1: ``FAST`` bytes, then ``rate`` bytes per second (0: silence)."""

    body: bytes
    rate: int = 1
    length: bool = True  # send Content-Length (else: close-delimited)
    serve: int = 1  # connections answered; later ones are closed at once (bounds an old agent)
    connections: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v2.bundle"

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            if self.connections > self.serve:
                conn.close()
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        end = time.monotonic() + GIVE_UP
        with conn:
            try:
                conn.recv(65536)  # the request; Range is ignored (a 200 says so)
                head = b"HTTP/1.1 200 OK\r\n"
                head += f"Content-Length: {len(self.body)}\r\n".encode() if self.length else b""
                conn.sendall(head + b"Connection: close\r\n\r\n" + self.body[:FAST])
                pos = FAST
                while pos < len(self.body) and time.monotonic() < end and not self._stop.is_set():
                    time.sleep(1.0)
                    if self.rate:
                        conn.sendall(self.body[pos:pos + self.rate])
                        pos += self.rate
            except OSError:
                return  # the client gave up: the point of the test


@pytest.fixture
def slow(make_bundle: BundleFactory) -> Iterator[functools.partial[SlowServer]]:
    servers: list[SlowServer] = []

    def start(**kw: object) -> SlowServer:
        s = SlowServer(make_bundle("2.0", size=300_000).read_bytes(), **kw)  # type: ignore[arg-type]
        servers.append(s)
        return s

    yield functools.partial(start)
    for s in servers:
        s.close()


def lock_is_free(state_dir: Path) -> bool:
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "close-delimited"])
def test_install_from_a_trickling_server_gives_up(slow: functools.partial[SlowServer], device_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], length: bool) -> None:
    server = slow(rate=1, length=length)
    # the default policy, its window shortened from 60 s to 2 s
    monkeypatch.setattr(download, "DownloadPolicy", functools.partial(DownloadPolicy, min_rate_window=2.0))
    t0 = time.monotonic()
    code = main(["install", server.url, "--config", str(device_dir / "agent.toml")])
    elapsed = time.monotonic() - t0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 40, err
    assert len(err) == 1 and f"below the minimum {DEFAULT_MIN_RATE:.0f} B/s" in err[0]
    assert elapsed < 10, f"{elapsed:.1f} s"
    cfg = load(device_dir / "agent.toml")
    assert lock_is_free(cfg.state_dir)
    dev = open_device(cfg)
    try:
        assert dev.journal.state().phase == "idle"
        assert dev.journal.slots()["B"].state == "empty"
        assert dev.journal.history(1)[0].event == "failed"
    finally:
        dev.close()


def test_a_silent_server_is_a_stall(slow: functools.partial[SlowServer]) -> None:
    """Reconnecting does not reset the stall clock: no byte for stall_timeout gives up."""
    server = slow(rate=0, serve=100)
    policy = DownloadPolicy(read_timeout=0.3, stall_timeout=1.5, max_resumes=100, backoff=0.01, tail=1024)
    t0 = time.monotonic()
    with pytest.raises(DownloadTooSlow, match="no byte for"), ResumableStream(
            download.new_session(), Origin(server.url), server.url, size=len(server.body), sha256=None,
            policy=policy) as s:
        while s.read(65536):
            pass
    assert time.monotonic() - t0 < 6 and server.connections >= 2


def test_a_cancel_stops_a_running_download(slow: functools.partial[SlowServer]) -> None:
    server = slow(rate=1000)
    asked = [0]

    def cancelled() -> bool:
        asked[0] += 1
        return asked[0] > 3

    with pytest.raises(DownloadCancelled), ResumableStream(
            download.new_session(), Origin(server.url), server.url, size=len(server.body), sha256=None,
            policy=DownloadPolicy(read_size=4096, tail=1024), cancelled=cancelled) as s:
        while s.read(4096):
            pass


# --- the defaults ------------------------------------------------------------------------------
def test_every_download_has_a_minimum_rate_and_a_stall_timeout_by_default() -> None:
    p = DownloadPolicy()
    assert p.min_rate == DEFAULT_MIN_RATE > 0 and 0 < p.stall_timeout <= 300
    fleet = parse_fleet({"url": "https://c", "controller_id": "d"}, Path("."))
    assert fleet.download.min_rate == DEFAULT_MIN_RATE and fleet.download.stall_timeout == p.stall_timeout


@pytest.mark.parametrize("table, min_rate", [
    ({"bandwidth": 500}, 250.0),  # a cap below the default minimum: the default follows the cap
    ({"min_rate": 0}, 0.0),  # switched off on purpose (the stall timeout still holds)
    ({"min_rate": 5000, "bandwidth": 100_000}, 5000.0),
])
def test_the_minimum_rate_as_configured(table: dict[str, object], min_rate: float) -> None:
    cfg = parse_fleet({"url": "https://c", "controller_id": "d", **table}, Path("."))
    assert cfg.download.min_rate == min_rate


@pytest.mark.parametrize("table", [{"stall_timeout": 0}, {"min_rate": 5000, "bandwidth": 100},
                                   {"min_rate": -1}, {"min_rate_window": 0}])
def test_download_limits_that_cannot_work_are_refused(table: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        parse_fleet({"url": "https://c", "controller_id": "d", **table}, Path("."))


# --- a cancel reaches a running fleet download --------------------------------------------------
def test_a_controller_cancel_reaches_a_running_fleet_download(
        device_dir: Path, make_bundle: BundleFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The artifact trickles (too fast to be given up, too slow to finish soon); the operator
    cancels the action meanwhile: the download stops within a cancel check, the device stays on
    its version, and the next poll confirms the cancel to the server."""
    import random

    from agent.adapters.ddi_http import DdiClient
    from agent.core.fleet_config import FleetConfig
    from agent.core.outbox import Backoff
    from agent.device import fleet
    from agent.device.updater import Updater
    from tests.fakeddi import Action, FakeDdi
    from tests.faultproxy import Fault, FaultProxy

    monkeypatch.setattr(fleet, "CANCEL_CHECK", 0.3, raising=False)
    fake = FakeDdi(token="t")
    proxy = FaultProxy(fake.address, [Fault("trickle", after=30_000, rate=20_000, seconds=10)],
                       match=b"/artifacts/")
    fake.public_url = proxy.url
    try:
        fake.deploy(Action("9", make_bundle("2.0", size=600_000).read_bytes()))
        threading.Timer(1.0, fake.cancel, args=("9",)).start()

        def poll() -> list[str]:
            dev = open_device(load(device_dir / "agent.toml"))
            try:
                cfg = FleetConfig(url=proxy.url, controller_id="dev1", auth="target", token="t",
                                  min_sleep=0, download=DownloadPolicy(read_timeout=2, backoff=0.01))
                agent = fleet.FleetAgent(Updater(dev, sleep=lambda s: None), DdiClient(cfg),
                                         sleep=lambda s: None,
                                         backoff=Backoff(base=0.01, cap=0.01, rng=random.Random(0)))
                return agent.poll_once().messages
            finally:
                dev.close()

        t0 = time.monotonic()
        said = poll()
        assert time.monotonic() - t0 < 5, said
        assert any("download cancelled" in m for m in said), said
        poll()
        assert fake.actions[0].canceled and fake.actions[0].closed is None
        dev = open_device(load(device_dir / "agent.toml"))
        try:
            st = Updater(dev).status()
            assert (st["booted_slot"], st["phase"], st["slots"]["B"]["state"]) == ("A", "idle", "empty")
        finally:
            dev.close()
    finally:
        proxy.close()
        fake.close()
