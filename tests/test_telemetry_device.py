"""Device telemetry: the [telemetry] section, the collector, policies on the way into the buffer,
priorities, the local endpoint, the CLI, and the service thread."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.telemetry_buffer import Point, TelemetryBuffer
from agent.core.config import load
from agent.core.telemetry_policy import SAMPLE_COST, Budget
from agent.device.telemetry import Collector, Telemetry, open_buffer, probe
from tests.conftest import run_cli
from tests.prom import free_port


def with_telemetry(device_dir: Path, body: str = "") -> Path:
    cfg = device_dir / "agent.toml"
    cfg.write_text(cfg.read_text() + "\n[telemetry]\n" + body)
    return cfg


@pytest.mark.parametrize(("body", "word"), [
    ("colour = 1\n", "unknown keys colour"),
    ("interval = 0\n", "interval"),
    ('remote_write_url = "ftp://x"\n', "remote_write_url"),
    ('listen = "9108"\n', "listen"),
    ('[[telemetry.policy]]\nscope = "moon"\n', "scope"),
    ('traces = "moon"\n', "traces"),
])
def test_a_bad_telemetry_section_is_one_line_and_exit_3(device_dir: Path, body: str, word: str) -> None:
    cfg = with_telemetry(device_dir, body)
    proc = run_cli("telemetry", "status", "--config", cfg)
    assert proc.returncode == 3 and word in proc.stderr and "Traceback" not in proc.stderr


def test_status_without_a_telemetry_section_says_so(device_dir: Path) -> None:
    proc = run_cli("telemetry", "status", "--config", device_dir / "agent.toml")
    assert proc.returncode == 3 and "no [telemetry]" in proc.stderr


def test_status_tells_fill_oldest_and_drops(device_dir: Path) -> None:
    cfg = with_telemetry(device_dir, f"budget_bytes = {100 * SAMPLE_COST}\nfull_resolution = 0\n")
    buf = open_buffer(load(cfg))
    buf.add([Point((("__name__", "x"), ("i", str(i))), 1000 + i, float(i)) for i in range(102)], 2000)
    buf.close()
    st = json.loads(run_cli("telemetry", "status", "--json", "--config", cfg, check=True).stdout)
    assert (st["samples"], st["max_samples"], st["oldest_ms"]) == (100, 100, 1002)
    assert st["dropped"] == {"evicted": 2} and st["last_send"] is None


def test_flush_failure_never_shows_the_token(device_dir: Path) -> None:
    (device_dir / "tok").write_text("s3cr3t-token\n")
    cfg = with_telemetry(device_dir, 'remote_write_url = "http://127.0.0.1:9/w"\n'
                                     'credentials_file = "tok"\n')
    buf = open_buffer(load(cfg))
    buf.add([Point((("__name__", "x"),), 1, 1.0)], 2)
    buf.close()
    proc = run_cli("-v", "telemetry", "flush", "--config", cfg)
    assert proc.returncode == 40 and "s3cr3t" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_agent_series_are_sent_first(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db", Budget())
    buf.add([Point((("__name__", "node_load1"),), 1, 1.0),
             Point((("__name__", "edgeops_qoe_loss_ratio"),), 2, 0.0),
             Point((("__name__", "edgeops_phase_info"),), 3, 1.0)], 4)
    names = [dict(lb)["__name__"] for lb, _ in buf.batch(10).series]
    buf.close()
    assert names == ["edgeops_phase_info", "node_load1", "edgeops_qoe_loss_ratio"]


def test_local_series_never_enter_the_buffer_and_aggregates_are_sums(device_dir: Path) -> None:
    cfg = with_telemetry(device_dir, f'listen = "127.0.0.1:{free_port()}"\n'
                                     '[[telemetry.policy]]\nmatch = "face_*"\nscope = "local"\n'
                                     '[[telemetry.policy]]\nmatch = "visits"\naggregate = ["user"]\n'
                                     '[[telemetry.policy]]\nmatch = "badge"\nhash = ["user"]\n')
    rows = [((("__name__", "face_matches"),), 3.0, "gauge"),
            ((("__name__", "visits"), ("user", "ann")), 2.0, "counter"),
            ((("__name__", "visits"), ("user", "bob")), 5.0, "counter"),
            ((("__name__", "badge"), ("user", "ann")), 1.0, "gauge")]
    tel = Telemetry(load(cfg), collector=lambda: rows, clock=lambda: 100.0)
    try:
        tel.buffer.add(tel.points(100.0), 100_000)
        held = {lb: v for lb, _, v, _ in tel.buffer.all_samples()}
        assert (("__name__", "face_matches"),) in tel.latest  # served locally all the same
    finally:
        tel.close()
    assert held[(("__name__", "visits"),)] == 7.0
    assert not any(dict(lb)["__name__"] == "face_matches" for lb in held)
    (badge,) = [lb for lb in held if dict(lb)["__name__"] == "badge"]
    assert dict(badge)["user"] not in ("ann", "") and len(dict(badge)["user"]) == 16
    assert (load(cfg).state_dir / "telemetry.salt").stat().st_mode & 0o777 == 0o600


def test_the_collector_reads_the_system_and_the_journal(device_dir: Path) -> None:
    cfg = with_telemetry(device_dir)
    run_cli("agent", "--once", "--config", cfg, check=True)
    got = {dict(lb)["__name__"] for lb, _, _ in Collector(load(cfg))()}
    assert {"node_memory_MemAvailable_bytes", "node_cpu_seconds_total", "edgeops_phase_info",
            "edgeops_slot_info", "edgeops_agent_resident_bytes", "node_filesystem_avail_bytes"} <= got


def test_a_tcp_probe_measures_an_open_port_and_loses_a_closed_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        up = probe(f"127.0.0.1:{s.getsockname()[1]}", count=3, timeout=1)
    down = probe(f"127.0.0.1:{free_port()}", count=3, timeout=1)
    assert up.loss == 0.0 and up.latency is not None and up.latency > 0 and up.jitter is not None
    assert down.loss == 1.0 and down.latency is None


def test_the_local_endpoint_serves_the_latest_values_on_loopback(device_dir: Path) -> None:
    port = free_port()
    cfg = with_telemetry(device_dir, f'listen = "127.0.0.1:{port}"\ninterval = 3600\n'
                                     '[[telemetry.policy]]\nmatch = "face_*"\nscope = "local"\n')
    rows = [((("__name__", "face_matches"), ("cam", "1")), 3.0, "gauge")]
    tel = Telemetry(load(cfg), collector=lambda: rows).start()
    try:
        deadline = time.monotonic() + 10
        while True:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if 'face_matches{cam="1"} 3.0' in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
    finally:
        tel.stop()


def test_the_service_buffers_telemetry_in_its_thread_while_the_link_is_down(device_dir: Path) -> None:
    cfg = with_telemetry(device_dir, f'interval = 1\nremote_write_url = "http://127.0.0.1:{free_port()}/w"\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            path = load(cfg).telemetry_path
            if path.exists():
                buf = TelemetryBuffer(path)
                try:
                    if buf.status().samples > 0:
                        break
                finally:
                    buf.close()
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.lists(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 10_000)),
                                             max_size=30), max_size=12))
def test_the_buffer_holds_its_budget_and_accounts_for_every_sample(
        cap: int, adds: list[list[tuple[int, int]]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        buf = TelemetryBuffer(Path(d) / "t.db", Budget(cap * SAMPLE_COST, 1000, 100))
        added, now = 0, 0
        try:
            for batch in adds:
                now += 1000
                buf.add([Point((("__name__", "x"), ("s", str(s))), now - ts, 1.0) for s, ts in batch],
                        now)
                added += len(batch)
                st_ = buf.status()
                assert st_.samples <= cap
                assert st_.samples + sum(st_.dropped.values()) == added
        finally:
            buf.close()
