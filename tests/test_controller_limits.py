"""The controller cannot be starved: idle, slow and lying clients are bounded in time and number.

Real sockets on 127.0.0.1 only, every count and duration bounded; the flood test runs the real
``edgeops controller serve`` under systemd's default file limit (1,024) and prints a normal
device poll's latency during the flood.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.controller.connections import ConnectionGuard, connection_cap
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import Keys
from tests.test_controller_ddi import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def quick(tmp_path: Path, pki: Keys) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600, idle_timeout=1.0,
                         body_timeout=1.0)
    yield c
    c.stop()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(s: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Seconds until the server closes ``s`` (sending ``trickle`` a byte every 0.2 s meanwhile)."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    i = 0
    while time.monotonic() - t0 < seconds:
        if i < len(trickle):
            try:
                s.sendall(trickle[i:i + 1])
            except OSError:
                return time.monotonic() - t0
            i += 1
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    raise AssertionError(f"the server kept the connection open for {seconds} s")


def test_an_idle_connection_is_closed_after_the_idle_timeout(quick: LocalController) -> None:
    with _connect(quick.url) as s:
        assert _closed_within(s, 5) < 3


def test_headers_sent_a_byte_at_a_time_do_not_hold_a_connection(quick: LocalController) -> None:
    slow = b"GET /DEFAULT/controller/v1/dev1 HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
    with _connect(quick.url) as s:
        assert _closed_within(s, 5, trickle=slow) < 3


def test_a_lying_content_length_is_answered_408_within_the_body_timeout(quick: LocalController) -> None:
    token = quick.api("POST", "/devices", {"id": "dev1"})["token"]
    head = (f"POST /DEFAULT/controller/v1/dev1/deploymentBase/1/feedback HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: TargetToken {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 1000\r\n\r\n").encode()
    with _connect(quick.url) as s:
        s.sendall(head + b'{"status":')  # and then nothing: 990 bytes promised, never sent
        s.settimeout(5)
        t0 = time.monotonic()
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - t0 < 3
    # an operator upload that stalls is dropped the same way
    with _connect(quick.url) as s:
        s.sendall(b"POST /api/v1/bundles?filename=b.bundle HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer test-token\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")


# --- the guard's bookkeeping, with stand-in transports ------------------------------------------
class _Transport:
    def __init__(self) -> None:
        self.aborted = False
        self.proto: Any = None

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            self.proto.connection_lost(None)


class _Handler:
    def connection_made(self, t: Any) -> None:
        pass

    def connection_lost(self, exc: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass


def _accept(guard: ConnectionGuard) -> tuple[Any, _Handler, _Transport]:
    handler = _Handler()
    proto = guard.factory(lambda: handler)()
    t = _Transport()
    t.proto = proto
    proto.connection_made(t)  # type: ignore[arg-type]
    return proto, handler, t


def test_the_guard_sheds_the_oldest_anonymous_connection_and_keeps_authenticated_ones() -> None:
    guard = ConnectionGuard(max_connections=6, max_unauthenticated=3)
    devices = [_accept(guard) for _ in range(2)]
    for _, handler, _ in devices:
        guard.authenticated(handler)
    flood = [_accept(guard) for _ in range(50)]
    assert guard.stats().unauthenticated == 3 and guard.stats().open == 5
    assert not any(t.aborted for _, _, t in devices)  # the flood never reaches the headroom
    assert [t.aborted for _, _, t in flood] == [True] * 47 + [False] * 3  # oldest first
    # a connection that sent a request is not shed while a silent one exists, even when it is
    # the oldest; one with a request in flight goes last of all
    oldest, middle, newest = flood[-3:]
    oldest[0].data_received(b"GET / HTTP/1.1\r\n")
    guard.begin(oldest[1])
    middle[0].data_received(b"GET / HTTP/1.1\r\n")
    later = _accept(guard)
    assert not oldest[2].aborted and not middle[2].aborted and newest[2].aborted
    later[0].data_received(b"GET / HTTP/1.1\r\n")
    _accept(guard)  # now every other one has spoken: the oldest idle one goes, not the busy one
    assert not oldest[2].aborted and middle[2].aborted
    guard.end(oldest[1])


def test_the_guard_refuses_a_newcomer_when_everything_is_busy_and_trusted() -> None:
    guard = ConnectionGuard(max_connections=2, max_unauthenticated=1)
    held = []
    for _ in range(2):
        held.append(_accept(guard))
        guard.authenticated(held[-1][1])
        guard.begin(held[-1][1])  # e.g. two held long-polls
    _, _, newcomer = _accept(guard)
    assert newcomer.aborted and not any(t.aborted for _, _, t in held)
    assert guard.stats().refused == 1


def test_the_cap_stays_below_the_file_limit() -> None:
    cap = connection_cap(1024)
    assert 2 * cap + 64 + 128 <= 1024
    guard = ConnectionGuard.for_file_limit(1024)
    assert guard.max_unauthenticated < guard.max_connections == cap


# --- the flood ------------------------------------------------------------------------------------
FLOOD = 1_100  # idle sockets opened at once: more than the 1,024 files the server may hold
LATER = 300  # opened while the polls run, so the flood keeps coming (1,400 sockets in all)
POLLS = 60


def _open_idle(port: int, n: int, into: list[socket.socket]) -> None:
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)  # never wait for the server: the flood must not stall the test
        s.connect_ex(("127.0.0.1", port))
        into.append(s)


def test_a_flood_of_idle_sockets_does_not_starve_device_polls(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FLOOD + LATER + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"this test process may open only {hard} files; the flood needs {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEOPS_CONTROLLER_TOKEN": "op"}

    def systemd_default_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "controller", "serve", "--db",
                             str(tmp_path / "c.db"), "--listen", f"127.0.0.1:{port}"], env=env,
                            stderr=subprocess.PIPE, text=True, preexec_fn=systemd_default_limit)
    socks: list[socket.socket] = []
    t_start = time.monotonic()
    try:
        for _ in range(400):
            try:
                requests.get(f"{url}/_empty", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        else:
            raise AssertionError("the controller did not start")
        token = requests.post(f"{url}/api/v1/devices", json={"id": "dev1"}, timeout=5,
                              headers={"Authorization": "Bearer op"}).json()["token"]
        poll = f"{url}/DEFAULT/controller/v1/dev1"
        auth = {"Authorization": f"TargetToken {token}"}
        kept = requests.Session()  # a device that was already connected when the flood began
        assert kept.get(poll, headers=auth, timeout=5).status_code == 200

        _open_idle(port, FLOOD, socks)
        time.sleep(0.5)  # let the server accept (and shed) the whole flood
        latencies: list[float] = []
        for i in range(POLLS):
            _open_idle(port, LATER // POLLS, socks)
            t0 = time.perf_counter()
            r = requests.get(poll, headers={**auth, "Connection": "close"}, timeout=5)
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            if i % 10 == 0:
                assert kept.get(poll, headers=auth, timeout=5).status_code == 200
        assert len(socks) <= 1_500 and time.monotonic() - t_start < 60
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(10)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    with capsys.disabled():
        print(f"\nflood: {len(socks)} idle sockets against a 1,024-file controller; {POLLS} device "
              f"polls on new connections: p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    assert latencies[-1] < 1.0


# --- one controller per port unless asked -----------------------------------------------------------
def _serve(port: int, db: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEOPS_CONTROLLER_TOKEN": "op"}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "controller", "serve", "--db", str(db),
                             "--listen", f"127.0.0.1:{port}", *extra], env=env,
                            stderr=subprocess.PIPE, text=True)


def _wait_up(port: int) -> None:
    for _ in range(400):
        try:
            requests.get(f"http://127.0.0.1:{port}/_empty", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise AssertionError("the controller did not start")


def test_a_second_controller_on_the_same_port_is_refused_unless_asked(tmp_path: Path) -> None:
    port = free_port()
    first = _serve(port, tmp_path / "a.db")
    try:
        _wait_up(port)
        second = _serve(port, tmp_path / "b.db")  # another fleet: it must not take half the devices
        try:
            _, err = second.communicate(timeout=30)
        finally:
            second.kill()
        assert second.returncode == 40, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "cannot listen on 127.0.0.1:" in lines[0], err
        assert "--reuse-port" in lines[0]
    finally:
        first.terminate()
        first.wait(10)

    # Asked for, on both: processes of one fleet share the port.
    port = free_port()
    procs = [_serve(port, tmp_path / "shared.db", "--reuse-port") for _ in range(2)]
    try:
        _wait_up(port)
        time.sleep(1)
        assert all(p.poll() is None for p in procs), [p.communicate(timeout=5)[1] for p in procs]
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
