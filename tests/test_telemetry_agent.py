"""Agent series from what the device recorded: update phase durations (from the trace's
spans), bytes downloaded and saved by delta (``delta.last``), health-probe results and
latencies (the last health round), model version and inference error rate (ModelHost's counts)."""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent.core.config import AgentConfig, load
from agent.core.telemetry_policy import ModelRecord, agent_series
from agent.device.telemetry import Collector, open_buffer
from tests import rangeserver
from tests.conftest import BundleFactory, Keys, run_cli
from tests.test_delta import _device, _run, _serve, world

__all__ = ["world"]  # a fixture, re-used

Series = dict[tuple[tuple[str, str], ...], tuple[float, str]]


def with_telemetry(device_dir: Path) -> Path:
    cfg = device_dir / "agent.toml"
    cfg.write_text(cfg.read_text() + "\n[telemetry]\n")
    return cfg


def collect(cfg: AgentConfig) -> Series:
    buf = open_buffer(cfg)
    try:
        return {lb: (v, kind) for lb, v, kind in Collector(cfg, buffer=buf).agent()}
    finally:
        buf.close()


def named(series: Series, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(kv for kv in lb if kv[0] != "__name__"): v for lb, (v, _) in series.items()
            if dict(lb)["__name__"] == name}


# --- the pure part --------------------------------------------------------------------------------
@pytest.mark.parametrize(("durations", "health", "download", "models", "want"), [
    ({}, [], None, [], set()),
    ({"update": 9.5, "write": 2.0, "bogus": 1.0}, [], None, [],
     {("edgeops_update_seconds", (), 9.5), ("edgeops_update_phase_seconds", (("phase", "write"),), 2.0)}),
    ({}, [("app", True, 0.25), ("disk", False, 0.0)], None, [],
     {("edgeops_health_probe_up", (("probe", "app"),), 1.0),
      ("edgeops_health_probe_seconds", (("probe", "app"),), 0.25),
      ("edgeops_health_probe_up", (("probe", "disk"),), 0.0),
      ("edgeops_health_probe_seconds", (("probe", "disk"),), 0.0)}),
    ({}, [], {"received": 100, "saved": 900, "mode": "delta"}, [],
     {("edgeops_update_downloaded_bytes", (("mode", "delta"),), 100.0),
      ("edgeops_update_delta_saved_bytes", (("mode", "delta"),), 900.0)}),
    ({}, [], {"received": "x", "saved": None}, [], set()),  # a malformed record: nothing made up
    ({}, [], None, [ModelRecord("det", "2.0", "trial")],
     {("edgeops_model_info", (("model", "det"), ("state", "trial"), ("version", "2.0")), 1.0)}),
    ({}, [], None, [ModelRecord("det", "2.0", "good", "1.0", 8, 2)],
     {("edgeops_model_info", (("model", "det"), ("state", "good"), ("version", "2.0")), 1.0),
      ("edgeops_model_requests_total", (("model", "det"), ("version", "1.0")), 8.0),
      ("edgeops_model_errors_total", (("model", "det"), ("version", "1.0")), 2.0),
      ("edgeops_model_error_ratio", (("model", "det"), ("version", "1.0")), 0.25)}),
    ({}, [], None, [ModelRecord("det", "1.0", "good", "1.0", 0, 0)],
     {("edgeops_model_info", (("model", "det"), ("state", "good"), ("version", "1.0")), 1.0),
      ("edgeops_model_requests_total", (("model", "det"), ("version", "1.0")), 0.0),
      ("edgeops_model_errors_total", (("model", "det"), ("version", "1.0")), 0.0),
      ("edgeops_model_error_ratio", (("model", "det"), ("version", "1.0")), 0.0)}),  # no 0/0
])
def test_agent_series_are_made_from_the_records(durations: dict[str, float],
                                                health: list[tuple[str, bool, float]],
                                                download: dict[str, Any] | None,
                                                models: list[ModelRecord], want: set[Any]) -> None:
    got = {(dict(lb)["__name__"], tuple(kv for kv in lb if kv[0] != "__name__"), v)
           for lb, v, _ in agent_series(durations, health, download, models)}
    assert got == want


# --- against a real simulated device --------------------------------------------------------------
class NoRangeProxy(ThreadingHTTPServer):
    """In front of the controller, like a CDN that ignores Range: every answer is the whole body."""

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)

        class H(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("range", "if-range")}
                conn = http.client.HTTPConnection(up.hostname or "", up.port, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                finally:
                    conn.close()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "accept-ranges"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _forward

            def log_message(self, *a: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def fleet_update(tmp_path: Path, pki: Keys, bundle: Path, *, ranges: bool) -> Path:
    """One fleet update of a fresh simulated board, through to its commit; its agent.toml."""
    from agent.core import lifecycle
    from agent.device.fleet import DdiClient, FleetAgent, FleetConfig
    from agent.device.updater import Updater, open_device
    from agent.host import sim
    from agent.host.simfleet import start_controller
    from tests.conftest import make_image

    ctl = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    proxy = None if ranges else NoRangeProxy(ctl.url)
    try:
        board = tmp_path / "b0"
        sim.init_device(board, image=make_image(tmp_path / "i0", 4096, "1.0"), keyring=pki.root_crt,
                        slot_size=1 << 20)
        cfg_path = with_telemetry(board)
        token = ctl.api("POST", "/devices", {"id": "d0"})["token"]
        with open(bundle, "rb") as f:
            bid = ctl.api("POST", "/bundles?filename=v2.bundle", data=f)["id"]
        ctl.api("POST", "/deployments", {"bundle": bid, "device": "d0"})
        for _ in range(6):
            dev = open_device(load(cfg_path))
            try:
                up = Updater(dev, sleep=lambda s: None)
                up.cycle()
                if dev.journal.state().phase is lifecycle.Phase.IDLE:
                    fc = FleetConfig(url=proxy.url if proxy else ctl.url, controller_id="d0",
                                     auth="target", token=token, push="none")
                    FleetAgent(up, DdiClient(fc), sleep=lambda s: None).poll_once()
            finally:
                dev.close()
    finally:
        if proxy is not None:
            proxy.shutdown()
            proxy.server_close()
        ctl.stop()
    return cfg_path


def test_a_fleet_update_leaves_its_phase_durations(tmp_path: Path, pki: Keys,
                                                   make_bundle: BundleFactory) -> None:
    cfg = load(fleet_update(tmp_path, pki, make_bundle("2.0", size=4096), ranges=True))
    buf = open_buffer(cfg)
    try:
        _, spans = buf.span_batch()
    finally:
        buf.close()
    took = {s.name: (s.end_ns - s.start_ns) / 1e9 for s in spans}
    series = collect(cfg)
    assert named(series, "edgeops_update_phase_seconds") == {
        (("phase", n),): took[n] for n in ("download", "verify", "write", "reboot", "health", "commit")}
    assert named(series, "edgeops_update_seconds") == {(): took["update"]}


def test_a_whole_download_from_a_server_without_range_leaves_its_bytes(
        tmp_path: Path, pki: Keys, make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0", size=4096)
    series = collect(load(fleet_update(tmp_path, pki, bundle, ranges=False)))
    assert named(series, "edgeops_update_downloaded_bytes") == {(("mode", "full"),): bundle.stat().st_size}
    assert named(series, "edgeops_update_delta_saved_bytes") == {(("mode", "full"),): 0.0}


def test_a_delta_install_leaves_its_downloaded_and_saved_bytes(world: dict[str, Any]) -> None:
    dev = _device(world, "d")
    cfg_path = with_telemetry(dev)
    with rangeserver.serve(_serve(world)) as url:
        _, stats = _run(dev, url, world["bundle"].stat().st_size)
    series = collect(load(cfg_path))
    assert stats.saved > 0
    assert named(series, "edgeops_update_downloaded_bytes") == {(("mode", "delta"),): stats.received}
    assert named(series, "edgeops_update_delta_saved_bytes") == {(("mode", "delta"),): stats.saved}


def test_the_last_health_round_is_a_series_per_probe(device_dir: Path, make_bundle: BundleFactory) -> None:
    with socket.socket() as open_port:
        open_port.bind(("127.0.0.1", 0))
        open_port.listen()
        port = open_port.getsockname()[1]
        health = {"retries": 1, "deadline": 5, "interval": 0.1, "probe": [
            {"type": "tcp", "host": "127.0.0.1", "port": port, "name": "app port"}]}
        cfg_path = with_telemetry(device_dir)
        run_cli("install", make_bundle("2.0", health=health), "--config", cfg_path, check=True)
        run_cli("sim", "reboot", "--config", cfg_path, check=True)
        run_cli("agent", "--once", "--config", cfg_path, check=True)
    series = collect(load(cfg_path))
    app = (("probe", "app port"),)  # beside the device's own (a disk probe)
    assert named(series, "edgeops_health_probe_up")[app] == 1.0
    assert 0 < named(series, "edgeops_health_probe_seconds")[app] < 5


def test_a_failing_probe_shows_as_down(device_dir: Path, make_bundle: BundleFactory) -> None:
    from tests.test_telemetry_traces import FAILING

    cfg_path = with_telemetry(device_dir)
    run_cli("install", make_bundle("3.0", health=FAILING), "--config", cfg_path, check=True)
    run_cli("sim", "reboot", "--config", cfg_path, check=True)
    run_cli("agent", "--once", "--config", cfg_path)
    assert named(collect(load(cfg_path)), "edgeops_health_probe_up")[(("probe", "app port"),)] == 0.0


def test_a_model_link_out_of_the_store_or_an_oversized_counts_file_is_skipped(device_dir: Path) -> None:
    import json
    import os

    from agent.device.telemetry import model_records

    cfg = load(with_telemetry(device_dir))
    root = cfg.state_dir / "models"
    outside = device_dir / "elsewhere"
    (outside / "info.json").parent.mkdir(parents=True)
    (outside / "info.json").write_text(json.dumps({"state": "good"}))
    (root / "evil").mkdir(parents=True)
    os.symlink("../../elsewhere", root / "evil" / "current")
    (root / "big" / "1.0").mkdir(parents=True)
    (root / "big" / "1.0" / "info.json").write_text(json.dumps({"state": "good"}))
    os.symlink("1.0", root / "big" / "current")
    (root / "big" / ".host-stats.json").write_text(json.dumps(
        {"version": "1.0", "requests": 9, "errors": 1, "pad": "x" * 70000}))
    assert [(m.name, m.version, m.served) for m in model_records(cfg)] == [("big", "1.0", None)]
