"""Update traces: each update, across its reboot and an outage, reaches an OTLP/HTTP receiver
as one trace with the expected spans (decoded with the official opentelemetry-proto messages)."""

from __future__ import annotations

import gzip
import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agent.core.config import load
from agent.device.telemetry import open_buffer
from tests.conftest import BundleFactory, Keys, run_cli

FAILING = {"retries": 1, "deadline": 5, "interval": 0.1,
           "probe": [{"type": "tcp", "host": "127.0.0.1", "port": 9, "name": "app port"}]}


class OtlpReceiver(ThreadingHTTPServer):
    def __init__(self, fail_first: int = 0) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        self.fail_first, self.paths = fail_first, []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.paths.append((self.path, self.headers["Content-Type"],
                                    self.headers["Content-Encoding"]))
                if outer.fail_first:
                    outer.fail_first -= 1
                    self.send_response(503)
                else:
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(gzip.decompress(body))
                    outer.exports.append(req)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def traces(self) -> dict[bytes, list[Any]]:
        out: dict[bytes, list[Any]] = {}
        for req in self.exports:
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.setdefault(s.trace_id, []).append(s)
        return out


def with_traces(device_dir: Path, url: str) -> Path:
    cfg = device_dir / "agent.toml"
    cfg.write_text(cfg.read_text() + f'\n[telemetry]\notlp_url = "{url}"\n')
    return cfg


def names(spans: list[Any]) -> list[str]:
    return [s.name for s in sorted(spans, key=lambda s: (s.start_time_unix_nano, s.parent_span_id != b""))]


def test_a_committed_update_is_one_trace_with_its_spans(device_dir: Path,
                                                        make_bundle: BundleFactory) -> None:
    rx = OtlpReceiver(fail_first=1)  # the link is down at first: the trace waits in the buffer
    cfg = with_traces(device_dir, rx.url)
    run_cli("install", make_bundle("2.0"), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    run_cli("agent", "--once", "--config", cfg, check=True)
    assert run_cli("telemetry", "flush", "--config", cfg).returncode == 40  # 503: kept
    assert run_cli("telemetry", "flush", "--config", cfg).returncode == 0
    traces = rx.traces()
    assert len(traces) == 1
    (spans,) = traces.values()
    assert names(spans) == ["update", "verify", "write", "reboot", "health", "commit"]
    root = next(s for s in spans if s.name == "update")
    assert all(s.parent_span_id == root.span_id for s in spans if s is not root)
    assert root.status.code == 1  # OK
    ordered = sorted((s for s in spans if s is not root), key=lambda s: s.start_time_unix_nano)
    for a, b in itertools.pairwise(ordered):
        assert a.end_time_unix_nano == b.start_time_unix_nano  # one span ends where the next begins
    assert rx.paths[-1] == ("/v1/traces", "application/x-protobuf", "gzip")
    buf = open_buffer(load(cfg))
    try:
        assert buf.status().spans_pending == 0  # acknowledged, never sent again
    finally:
        buf.close()


def test_a_reverted_update_ends_its_trace_in_error(device_dir: Path, make_bundle: BundleFactory) -> None:
    rx = OtlpReceiver()
    cfg = with_traces(device_dir, rx.url)
    run_cli("install", make_bundle("3.0", health=FAILING), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    run_cli("agent", "--once", "--config", cfg)
    for _ in range(3):  # the revert reboots back into the old slot, whose cycle ends it
        run_cli("sim", "reboot", "--config", cfg)
        run_cli("agent", "--once", "--config", cfg)
    assert run_cli("telemetry", "flush", "--config", cfg).returncode == 0
    (spans,) = rx.traces().values()
    got = names(spans)
    assert got[:5] == ["update", "verify", "write", "reboot", "health"] and got[-1] == "revert"
    root = next(s for s in spans if s.name == "update")
    assert root.status.code == 2  # ERROR
    assert {a.key: a.value.string_value for a in root.attributes}["edgeops.outcome"] == "reverted"


def test_without_telemetry_an_update_writes_no_telemetry_file(device_dir: Path,
                                                             make_bundle: BundleFactory) -> None:
    cfg = device_dir / "agent.toml"
    run_cli("install", make_bundle("2.0"), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    run_cli("agent", "--once", "--config", cfg, check=True)
    assert not list(load(cfg).state_dir.glob("telemetry*"))


def test_a_fleet_update_trace_starts_with_its_download(tmp_path: Path, pki: Keys,
                                                      make_bundle: BundleFactory) -> None:
    from agent.core import lifecycle
    from agent.device.fleet import DdiClient, FleetAgent, FleetConfig
    from agent.device.updater import Updater, open_device
    from agent.host import sim
    from agent.host.simfleet import start_controller
    from tests.conftest import make_image

    rx = OtlpReceiver()
    ctl = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    try:
        board = tmp_path / "b0"
        sim.init_device(board, image=make_image(tmp_path / "i0", 4096, "1.0"), keyring=pki.root_crt,
                        slot_size=1 << 20)
        cfg_path = with_traces(board, rx.url)
        token = ctl.api("POST", "/devices", {"id": "d0"})["token"]
        with open(make_bundle("2.0", size=4096), "rb") as f:
            bid = ctl.api("POST", "/bundles?filename=v2.bundle", data=f)["id"]
        ctl.api("POST", "/deployments", {"bundle": bid, "device": "d0"})
        for _ in range(6):
            dev = open_device(load(cfg_path))
            try:
                up = Updater(dev, sleep=lambda s: None)
                up.cycle()
                if dev.journal.state().phase is lifecycle.Phase.IDLE:
                    fc = FleetConfig(url=ctl.url, controller_id="d0", auth="target", token=token,
                                     push="none")
                    FleetAgent(up, DdiClient(fc), sleep=lambda s: None).poll_once()
            finally:
                dev.close()
    finally:
        ctl.stop()
    assert run_cli("telemetry", "flush", "--config", cfg_path).returncode == 0
    (spans,) = rx.traces().values()
    assert names(spans) == ["update", "download", "verify", "write", "reboot", "health", "commit"]
    download = next(s for s in spans if s.name == "download")
    assert {a.key for a in download.attributes} >= {"action", "artifact"}
