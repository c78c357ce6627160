"""Metrics: the device's textfile for node_exporter, and the controller's /metrics scraped by a
real Prometheus. Formats are checked by promtool and by prometheus_client's own parser."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from agent.host.simfleet import start_controller
from tests.conftest import BundleFactory, Keys, run_cli

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                      reason="prometheus missing (Debian package prometheus)")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def with_metrics(device_dir: Path) -> Path:
    cfg = device_dir / "agent.toml"
    cfg.write_text(cfg.read_text().replace("[agent]\n", '[agent]\nmetrics_file = "textfile/edgeops.prom"\n'))
    return cfg


def test_agent_textfile_tells_what_status_tells(device_dir: Path, make_bundle: BundleFactory) -> None:
    cfg = with_metrics(device_dir)
    run_cli("install", make_bundle("2.0", security_version=2), "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    run_cli("agent", "--once", "--config", cfg, check=True)
    got = samples((device_dir / "textfile" / "edgeops.prom").read_text())
    st = json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout)
    for name, s in st["slots"].items():
        key = ("edgeops_slot_info", tuple(sorted({
            "slot": name, "version": s["version"] or "", "state": s["state"],
            "booted": str(s["booted"]).lower(), "primary": str(name == st["primary_slot"]).lower()}.items())))
        assert got[key] == 1.0
    assert got[("edgeops_security_floor", ())] == st["security_floor"] == 2
    assert got[("edgeops_phase_info", (("phase", st["phase"]),))] == 1.0
    assert got[("edgeops_events", (("event", "committed"),))] == 1.0


def test_idle_cycles_do_not_rewrite_the_textfile(device_dir: Path) -> None:
    cfg = with_metrics(device_dir)
    run_cli("agent", "--once", "--config", cfg, check=True)
    path = device_dir / "textfile" / "edgeops.prom"
    before = path.stat()
    run_cli("agent", "--once", "--config", cfg, check=True)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@needs_prometheus
def test_promtool_accepts_the_textfile(device_dir: Path) -> None:
    cfg = with_metrics(device_dir)
    run_cli("agent", "--once", "--config", cfg, check=True)
    text = (device_dir / "textfile" / "edgeops.prom").read_bytes()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metrics_file_without_the_extra_is_a_config_error(device_dir: Path, tmp_path: Path) -> None:
    cfg = with_metrics(device_dir)
    blocker = tmp_path / "no_prometheus"
    blocker.mkdir()
    (blocker / "prometheus_client.py").write_text("raise ImportError('not installed')\n")
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": f"{blocker}:{Path(__file__).resolve().parent.parent}"}
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--once", "--config", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3 and "edgeops[metrics]" in proc.stderr


@needs_prometheus
def test_a_real_prometheus_scrapes_the_controller(tmp_path: Path, pki: Keys,
                                                  make_bundle: BundleFactory) -> None:
    ctl = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    prom = None
    try:
        for i, site in enumerate(["lyon", "lyon", "porto"]):
            ctl.api("POST", "/devices", {"id": f"d{i}", "site": site})
        with open(make_bundle("2.0", size=4096), "rb") as f:
            bid = ctl.api("POST", "/bundles?filename=v2.bundle", data=f)["id"]
        ctl.api("POST", "/deployments", {"bundle": bid, "device": "d0"})
        token = tmp_path / "token"
        token.write_text(ctl.token)
        host = ctl.url.removeprefix("http://")
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: edgeops\n"
            "    metrics_path: /api/v1/metrics\n"
            f"    authorization: {{type: Bearer, credentials_file: {token}}}\n"
            f"    static_configs: [{{targets: ['{host}']}}]\n")
        port = _free_port()
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        query = f"http://127.0.0.1:{port}/api/v1/query"

        def value(q: str) -> dict[str, float]:
            r = requests.get(query, params={"query": q}, timeout=5).json()
            return {json.dumps(x["metric"], sort_keys=True): float(x["value"][1])
                    for x in r.get("data", {}).get("result", [])}

        deadline = time.monotonic() + 30
        while True:
            try:
                got = value("edgeops_controller_devices")
                if got:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "Prometheus never scraped the controller"
            time.sleep(0.3)
        by_site = {json.loads(k)["site"]: v for k, v in got.items()}
        assert by_site == {"lyon": 2.0, "porto": 1.0}
        assert list(value('edgeops_controller_actions{status="open"}').values()) == [1.0]
        assert list(value('up{job="edgeops"}').values()) == [1.0]  # auth and format accepted
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(10)
        ctl.stop()


def test_metrics_need_the_operator_token(tmp_path: Path) -> None:
    ctl = start_controller(tmp_path / "ctl", tick_interval=3600)
    try:
        assert requests.get(f"{ctl.url}/api/v1/metrics", timeout=5).status_code == 401
        r = requests.get(f"{ctl.url}/api/v1/metrics", headers={"Authorization": f"Bearer {ctl.token}"},
                         timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert samples(r.text)[("edgeops_controller_bundles", ())] == 0.0
    finally:
        ctl.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
