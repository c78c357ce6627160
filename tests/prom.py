"""A real Prometheus (Debian's ``prometheus``) on 127.0.0.1 with its remote-write receiver on,
for the telemetry tests, and the PromQL helpers they share."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus missing (Debian package prometheus)")

# Backfill: samples older than the head's newest minus half a block (1h) are "out of bounds"
# unless the out-of-order window covers them (docs/telemetry.md, "Receiver settings").
CONFIG = "global: {scrape_interval: 1h}\nstorage:\n  tsdb:\n    out_of_order_time_window: 12h\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prom:
    url: str

    @property
    def write_url(self) -> str:
        return self.url + "/api/v1/write"

    def raw(self, selector: str, at: float, window: str = "8h") -> dict[str, list[tuple[int, float]]]:
        """Every stored sample of ``selector`` in ``window`` before ``at``: a range-vector
        query returns the raw samples at their own timestamps (ms)."""
        r = requests.get(self.url + "/api/v1/query", params={"query": f"{selector}[{window}]",
                                                             "time": f"{at:.3f}"}, timeout=30)
        r.raise_for_status()
        out = {}
        for series in r.json()["data"]["result"]:
            key = ",".join(f"{k}={v}" for k, v in sorted(series["metric"].items()))
            out[key] = [(round(float(t) * 1000), float(v)) for t, v in series["values"]]
        return out

    def query_range(self, query: str, start: float, end: float, step: float) -> list[dict[str, object]]:
        r = requests.get(self.url + "/api/v1/query_range", params={
            "query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"}, timeout=30)
        r.raise_for_status()
        return list(r.json()["data"]["result"])


@contextmanager
def prometheus(tmp: Path) -> Iterator[Prom]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "prometheus.yml").write_text(CONFIG)
    port = free_port()
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}",
                             "--web.enable-remote-write-receiver"],
                            stdout=subprocess.DEVNULL, stderr=(tmp / "log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (tmp / "log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield Prom(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
