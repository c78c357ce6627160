"""The controller's telemetry relay: a device's samples go through the controller to a real
Prometheus, across a WAN cut, at their original timestamps; what a policy keeps on site never
reaches the upstream receiver; a bad body is a 400, a wrong token a 401."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.adapters import remote_write
from agent.adapters.telemetry_buffer import Point
from agent.core.config import load
from agent.device.telemetry import Telemetry
from agent.host.simfleet import LocalController, start_controller
from tests.faultproxy import Fault, FaultProxy
from tests.prom import Prom, needs_prometheus, prometheus

pytestmark = needs_prometheus


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    with prometheus(tmp_path_factory.mktemp("prom")) as p:
        yield p


@pytest.fixture
def wan(prom: Prom) -> Iterator[FaultProxy]:
    host, port = prom.url.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)), [Fault("drop") for _ in range(10_000)], match=b"POST")
    yield proxy  # the WAN is cut until the test clears the plan
    proxy.close()


@pytest.fixture
def ctl(tmp_path: Path, wan: FaultProxy) -> Iterator[LocalController]:
    data = tmp_path / "ctl"
    data.mkdir()
    (data / "telemetry-relay.toml").write_text(
        f'remote_write_url = "{wan.url}/api/v1/write"\ninterval = 0.2\n'
        '[[policy]]\nmatch = "site_cctv_*"\nscope = "regional"\n')
    c = start_controller(data, tick_interval=3600)
    yield c
    c.stop()


def device(device_dir: Path, ctl: LocalController, cid: str = "d0") -> Telemetry:
    token = ctl.api("POST", "/devices", {"id": cid})["token"]
    (device_dir / "telemetry.token").write_text(token + "\n")
    cfg = device_dir / "agent.toml"
    cfg.write_text(cfg.read_text() + f"""
[telemetry]
remote_write_url = "{ctl.url}/DEFAULT/controller/v1/{cid}/telemetry/write"
credentials_file = "telemetry.token"
[[telemetry.policy]]
match = "app_badge_*"
scope = "regional"
[[telemetry.policy]]
match = "app_face_*"
scope = "local"
""")
    return Telemetry(load(cfg))


def test_relay_carries_samples_through_a_wan_cut_and_keeps_site_data(
        device_dir: Path, ctl: LocalController, wan: FaultProxy, prom: Prom) -> None:
    t0 = int(time.time() * 1000) - 3600_000
    names = ["edgeops_relay_up", "app_badge_swipes", "app_face_matches", "site_cctv_frames"]
    points_by = {n: [(t0 + i * 10_000, float(i)) for i in range(30)] for n in names}
    tel = device(device_dir, ctl)
    try:
        for name in names:
            d = {"__name__": name, "door": "2"}
            from agent.core.telemetry_policy import decide

            dec = decide(d, tel.t.rules)
            if dec.scope == "local":
                continue  # what Telemetry.points does for a local series
            tel.buffer.add([Point(dec.labels, t, v) for t, v in points_by[name]], t0 + 300_000)
        report = tel.flush()
        assert report.retry_in is None and report.samples == 90  # the controller took them
    finally:
        tel.close()
    status = requests.get(ctl.url + "/_telemetry", timeout=10).json()
    assert status["dropped"]["kept-on-site"] == 60  # badge (device rule) + cctv (relay rule)
    time.sleep(1.0)
    assert wan.applied  # the relay tried, and the WAN was down
    assert requests.get(ctl.url + "/_telemetry", timeout=10).json()["samples"] == 30
    wan.plan.clear()  # the WAN returns
    deadline = time.monotonic() + 30
    while requests.get(ctl.url + "/_telemetry", timeout=10).json()["samples"]:
        assert time.monotonic() < deadline, "the relay never forwarded"
        time.sleep(0.2)
    got = prom.raw('{__name__=~"edgeops_relay_up|app_.*|site_.*"}', at=time.time())
    assert got == {"__name__=edgeops_relay_up,door=2,edgeops_device=d0": points_by["edgeops_relay_up"]}


def test_a_device_cannot_send_as_another(device_dir: Path, ctl: LocalController) -> None:
    tel = device(device_dir, ctl, "d1")
    tel.close()
    token = (device_dir / "telemetry.token").read_text().strip()
    ctl.api("POST", "/devices", {"id": "d2"})
    body = remote_write.encode([((("__name__", "x"),), [(1, 1.0)])])
    r = requests.post(ctl.url + "/DEFAULT/controller/v1/d2/telemetry/write", data=body,
                      headers={**remote_write.HEADERS, "Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 401


GOOD = remote_write.encode([((("__name__", "x"), ("k", "v" * 40)), [(1, 1.0), (2, 2.0)])])


@pytest.mark.parametrize("body", [b"\x05hello", b"\xff" * 12, GOOD[:-6],
                                  bytes(__import__("cramjam").snappy.compress_raw(b"\xff\xff\x07"))])
def test_a_bad_body_is_a_400_not_a_5xx(device_dir: Path, ctl: LocalController, body: bytes) -> None:
    tel = device(device_dir, ctl, "d3")
    tel.close()
    token = (device_dir / "telemetry.token").read_text().strip()
    r = requests.post(ctl.url + "/DEFAULT/controller/v1/d3/telemetry/write", data=body,
                      headers={**remote_write.HEADERS, "Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 400, r.text


def test_a_regional_trace_stays_on_site_and_an_upstream_one_goes_on(tmp_path: Path, device_dir: Path) -> None:
    from agent.device.telemetry import open_buffer, shipper
    from tests.test_telemetry_traces import OtlpReceiver

    upstream = OtlpReceiver()
    data = tmp_path / "ctl2"
    data.mkdir()
    (data / "telemetry-relay.toml").write_text(f'otlp_url = "{upstream.url}"\ninterval = 0.2\n')
    ctl = start_controller(data, tick_interval=3600)
    try:
        token = ctl.api("POST", "/devices", {"id": "t0"})["token"]
        (device_dir / "tok").write_text(token)
        base = device_dir / "agent.toml"
        text = base.read_text()
        relay = f"{ctl.url}/DEFAULT/controller/v1/t0/telemetry"
        for scope in ("regional", "upstream"):
            base.write_text(text + f'\n[telemetry]\notlp_url = "{relay}"\n'
                                   f'credentials_file = "tok"\ntraces = "{scope}"\n')
            cfg = load(base)
            buf = open_buffer(cfg)
            try:
                buf.mark_span("verify", 1_000, {"edgeops.version": scope})
                buf.mark_span("write", 2_000)
                buf.end_trace(3_000, ok=True)
                assert shipper(cfg, buf).flush().spans == 3
            finally:
                buf.close()
        deadline = time.monotonic() + 30
        while not upstream.exports:
            assert time.monotonic() < deadline, "the relay never forwarded the upstream trace"
            time.sleep(0.2)
        status = requests.get(ctl.url + "/_telemetry", timeout=10).json()
    finally:
        ctl.stop()
    (spans,) = upstream.traces().values()
    versions = {a.value.string_value for s in spans for a in s.attributes if a.key == "edgeops.version"}
    assert versions == {"upstream"}
    assert {a.key: a.value.string_value for s in spans for a in s.attributes}["edgeops_device"] == "t0"
    assert status["dropped"]["spans-kept-on-site"] == 3
