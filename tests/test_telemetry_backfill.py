"""Telemetry through a 6-hour outage into a real Prometheus: every sample the budget held
arrives at its original timestamp; a budget too small downsamples and evicts by the rules and
says so; receiver faults and a power cut lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.adapters import remote_write
from agent.adapters.remote_write import RemoteWrite
from agent.core import telemetry_policy as tp
from agent.core.config import load
from agent.device.telemetry import Telemetry, open_buffer, shipper
from tests.faultproxy import Fault, FaultProxy
from tests.prom import Prom, needs_prometheus, prometheus

pytestmark = needs_prometheus
INTERVAL = 10.0
OUTAGE = 6 * 3600.0
CLOSED = "http://127.0.0.1:9/api/v1/write"  # discard port: nothing listens, the link is down


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    with prometheus(tmp_path_factory.mktemp("prom")) as p:
        yield p


def telemetry_config(device_dir: Path, url: str, **extra: object) -> Path:
    cfg = device_dir / "agent.toml"
    lines = [f'remote_write_url = "{url}"', "bytes_per_second = 100000000", "batch_samples = 5000"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    cfg.write_text(cfg.read_text() + "\n[telemetry]\n" + "\n".join(lines) + "\n")
    return cfg


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def series(run: str, n: int = 3) -> list[tuple[tuple[str, str], ...]]:
    return [(("__name__", "edgeops_test_value"), ("k", str(i)), ("run", run)) for i in range(n)]


def value_at(i: int, t: float) -> float:
    return float((int(t) // 10) % 1000 + i * 1000)  # a different value at every tick


def run_outage(cfg_path: Path, run: str) -> tuple[Telemetry, Clock, dict[tuple[tuple[str, str], ...],
                                                                     list[tuple[int, float]]]]:
    """Collect every 10 s of a simulated 6 h outage (the link down), recording what was made."""
    cfg = load(cfg_path)
    start = float(int(time.time() - OUTAGE - 600) // 60 * 60)
    clock = Clock(start)
    made: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {s: [] for s in series(run)}

    def collect() -> list[tuple[tuple[tuple[str, str], ...], float, str]]:
        out = []
        for i, s in enumerate(series(run)):
            v = value_at(i, clock.t)
            made[s].append((int(clock.t * 1000), v))
            out.append((s, v, "gauge"))
        return out

    tel = Telemetry(cfg, clock=clock, collector=collect,
                    ship=None)
    tel.ship.metrics = RemoteWrite(CLOSED, timeout=2)
    while clock.t < start + OUTAGE:
        report = tel.tick()
        assert report.samples == 0  # nothing gets through a cut link
        clock.t += INTERVAL
    return tel, clock, made


def test_six_hour_outage_arrives_whole_at_original_timestamps(device_dir: Path, prom: Prom) -> None:
    cfg = telemetry_config(device_dir, prom.write_url)
    tel, clock, made = run_outage(cfg, "whole")
    try:
        held = tel.buffer.status()
        assert held.samples == sum(len(v) for v in made.values()) and not held.dropped
        tel.ship.metrics = RemoteWrite(prom.write_url)  # the link returns
        report = tel.flush(force=True)
        assert report.retry_in is None and report.samples == held.samples
        assert tel.buffer.status().samples == 0
    finally:
        tel.close()
    got = prom.raw('edgeops_test_value{run="whole"}', at=clock.t)
    want = {",".join(f"{k}={v}" for k, v in sorted(s)): pts for s, pts in made.items()}
    assert got == want
    # and as a range query over the outage window: one value per 10 s step, none missing
    first = min(t for pts in made.values() for t, _ in pts) / 1000
    last = max(t for pts in made.values() for t, _ in pts) / 1000
    rng = prom.query_range('edgeops_test_value{run="whole",k="0"}', first, last, INTERVAL)
    assert [float(v) for _, v in rng[0]["values"]] == [v for _, v in made[series("whole")[0]]]


def test_budget_too_small_downsamples_then_evicts_and_counts_it(device_dir: Path, prom: Prom) -> None:
    budget = 1500 * tp.SAMPLE_COST
    cfg = telemetry_config(device_dir, prom.write_url, budget_bytes=budget)
    tel, clock, made = run_outage(cfg, "small")
    try:
        kept = tel.buffer.all_samples()
        st = tel.buffer.status()
        tel.ship.metrics = RemoteWrite(prom.write_url)
        assert tel.flush(force=True).samples == len(kept)
    finally:
        tel.close()
    generated = sum(len(v) for v in made.values())
    assert len(kept) == st.max_samples == 1500
    assert st.dropped["downsampled"] + st.dropped["evicted"] == generated - len(kept)
    assert st.dropped["evicted"] > 0 and st.dropped["downsampled"] > 0
    last_add = int((clock.t - INTERVAL) * 1000)
    horizon = last_add - 3600_000
    oldest = min(t for _, t, _, _ in kept)
    for s, pts in made.items():
        mine = {t: (v, d) for lb, t, v, d in kept if lb == s}
        # the last hour (and the step the horizon cuts) at full resolution, every sample
        full = [(t, v) for t, v in pts if t // 60_000 * 60_000 + 60_000 > horizon]
        assert all(mine.get(t) == (v, False) for t, v in full)
        # before it: one sample per minute, at the minute's last original timestamp, its mean
        buckets: dict[int, list[tuple[int, float]]] = {}
        for t, v in pts:
            if t // 60_000 * 60_000 + 60_000 <= horizon:
                buckets.setdefault(t // 60_000, []).append((t, v))
        for b, group in buckets.items():
            t_last = group[-1][0]
            if t_last < oldest:
                assert not any(t // 60_000 == b for t in mine)  # evicted: the oldest went first
                continue
            if t_last // 60_000 == oldest // 60_000 and t_last not in mine:
                continue  # the one minute eviction cut through
            assert mine[t_last] == (pytest.approx(sum(v for _, v in group) / len(group)), True)
            assert [t for t in mine if t // 60_000 == b] == [t_last]
    got = prom.raw('edgeops_test_value{run="small"}', at=clock.t)
    want: dict[str, list[tuple[int, float]]] = {}
    for lb, t, v, _ in kept:
        want.setdefault(",".join(f"{k}={x}" for k, x in sorted(lb)), []).append((t, v))
    assert {k: [(t, pytest.approx(v)) for t, v in pts] for k, pts in want.items()} == got


class Receiver(ThreadingHTTPServer):
    """A remote-write receiver that answers from a script (then 200) and decodes what it takes."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script, self.taken, self.seen = list(script), [], 0
        self.times: list[float] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.seen += 1
                outer.times.append(time.monotonic())
                status, headers = outer.script.pop(0) if outer.script else (200, {})
                if status == 200:
                    outer.taken.extend(remote_write.decode(body))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/v1/write"


def buffered(device_dir: Path, url: str, n: int = 50) -> Path:
    cfg_path = telemetry_config(device_dir, url)
    buf = open_buffer(load(cfg_path))
    from agent.adapters.telemetry_buffer import Point

    now = int(time.time() * 1000)
    buf.add([Point((("__name__", "edgeops_fault"), ("i", str(i % 5))), now - 1000 * (n - i), float(i))
             for i in range(n)], now)
    buf.close()
    return cfg_path


def test_429_waits_its_retry_after_then_sends_once(device_dir: Path) -> None:
    rx = Receiver([(429, {"Retry-After": "7"})])
    cfg_path = buffered(device_dir, rx.url)
    cfg = load(cfg_path)
    buf = open_buffer(cfg)
    clock = Clock(1000.0)
    try:
        sh = shipper(cfg, buf, clock=clock, rng=lambda: 0.0)
        first = sh.flush()
        assert first.retry_in == 7.0 and first.samples == 0
        clock.t += 6.9
        assert sh.flush().samples == 0 and rx.seen == 1  # not before Retry-After
        clock.t += 0.2
        assert sh.flush().samples == 50
    finally:
        buf.close()
    assert sorted(v for _, pts in rx.taken for _, v in pts) == [float(i) for i in range(50)]


def test_5xx_is_retried_with_backoff_and_nothing_lost(device_dir: Path) -> None:
    rx = Receiver([(500, {}), (503, {})])
    cfg = load(buffered(device_dir, rx.url))
    buf = open_buffer(cfg)
    clock = Clock(1000.0)
    try:
        sh = shipper(cfg, buf, clock=clock, rng=lambda: 0.5)
        assert sh.flush().retry_in == 0.5  # base 1 s, full jitter at u=0.5
        clock.t += 0.5
        assert sh.flush().retry_in == 1.0  # 2 s ceiling the second time
        clock.t += 1.0
        assert sh.flush().samples == 50 and buf.status().samples == 0
    finally:
        buf.close()
    assert len([v for _, pts in rx.taken for _, v in pts]) == 50


def test_a_4xx_is_not_retried_and_is_counted(device_dir: Path) -> None:
    rx = Receiver([(400, {})])
    cfg = load(buffered(device_dir, rx.url))
    buf = open_buffer(cfg)
    try:
        report = shipper(cfg, buf).flush()
        assert report.rejected == 50 and rx.seen == 1
        assert buf.status().dropped == {"rejected": 50} and buf.status().samples == 0
    finally:
        buf.close()


def test_dropped_connection_mid_batch_is_resent_and_prometheus_holds_each_once(
        device_dir: Path, prom: Prom) -> None:
    host, port = prom.url.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)), [Fault("drop", after=0)], match=b"POST")
    cfg = load(buffered(device_dir, proxy.url + "/api/v1/write"))
    buf = open_buffer(cfg)
    try:
        sh = shipper(cfg, buf)
        assert sh.flush().retry_in is not None  # Prometheus took it; the answer never came
        assert buf.status().samples == 50
        assert sh.flush(force=True).samples == 50  # sent again: a duplicate it tolerates
    finally:
        buf.close()
        proxy.close()
    assert proxy.applied
    got = prom.raw("edgeops_fault", at=time.time() + 1, window="1h")
    assert sorted(v for pts in got.values() for _, v in pts) == [float(i) for i in range(50)]


def test_power_cut_between_send_and_ack_loses_nothing(device_dir: Path, tmp_path: Path) -> None:
    hold = threading.Event()
    rx = Receiver([])
    taken_before_cut: list[int] = []

    class Stall(BaseHTTPRequestHandler):  # takes the body, then never answers
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            taken_before_cut.append(len(remote_write.decode(body)))
            hold.set()
            time.sleep(60)

        def log_message(self, *a: object) -> None:
            pass

    stall = ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    threading.Thread(target=stall.serve_forever, daemon=True).start()
    cfg_path = buffered(device_dir, f"http://127.0.0.1:{stall.server_address[1]}/api/v1/write")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "telemetry", "flush", "--config",
                             str(cfg_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert hold.wait(60), "the flush never sent"
    proc.send_signal(signal.SIGKILL)  # power cut: sent, not acknowledged
    proc.wait()
    stall.shutdown()
    cfg_path.write_text(cfg_path.read_text().replace(
        f"http://127.0.0.1:{stall.server_address[1]}/api/v1/write", rx.url))
    buf = open_buffer(load(cfg_path))
    try:
        assert buf.status().samples == 50  # nothing was acknowledged, nothing deleted
    finally:
        buf.close()
    out = subprocess.run([sys.executable, "-m", "agent.cli", "telemetry", "flush", "--config",
                          str(cfg_path)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert taken_before_cut and sorted(v for _, pts in rx.taken for _, v in pts) == \
        [float(i) for i in range(50)]


def test_with_the_link_up_a_tick_sends_at_once_and_writes_nothing(device_dir: Path) -> None:
    rx = Receiver([])
    cfg = load(telemetry_config(device_dir, rx.url))
    clock = Clock(time.time())
    rows = [((("__name__", "edgeops_direct"),), 1.0, "gauge")]
    tel = Telemetry(cfg, clock=clock, collector=lambda: rows)
    try:
        tel.tick()  # the first also writes down when samples last went out
        files = [cfg.telemetry_path, cfg.telemetry_path.with_name("telemetry.db-wal")]
        before = [(p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        for _ in range(3):
            clock.t += INTERVAL
            assert tel.tick().samples == 1
        assert [(p.stat().st_size, p.stat().st_mtime_ns) for p in files] == before
        assert tel.buffer.status().samples == 0
    finally:
        tel.close()
    assert len(rx.taken) == 4
