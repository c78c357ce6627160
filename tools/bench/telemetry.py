#!/usr/bin/env python3
"""Telemetry's cost: bytes on the wire per sample, and the agent's CPU and memory with it on.

1. Wire: the same samples (--series series, --ticks collections 10 s apart, values that move
   as a device's do) encoded three ways in the same run — remote write (protobuf + snappy,
   in the shipper's batches), JSON lines (one object per sample) and the Prometheus text
   format with timestamps — and bytes per sample for each, with the ratio to JSON lines
   (target, issue 16: >= 10x fewer bytes than JSON lines).
2. Agent: two ``edgeops agent`` services on sim devices, the same in every way but one has
   [telemetry] at a 10 s interval with ~300 series (the system and agent series, plus QoE
   probes of 100 TCP targets on 127.0.0.1 — three series each — and a remote-write receiver
   on 127.0.0.1 taking every batch). Over the same --seconds window: CPU % of one core, RSS
   and bytes written, and the difference (target: < 1 % CPU, < 8 MiB RSS added).
"""

from __future__ import annotations

import argparse
import compileall
import json
import math
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from idle import edgeops, sim_device, usage  # noqa: E402


def samples(n_series: int, ticks: int) -> list[tuple[tuple[tuple[str, str], ...], int, float]]:
    t0 = 1_796_169_600_000
    out = []
    for i in range(n_series):
        labels = (("__name__", f"node_metric_{i % 30}"), ("device", f"eth{i // 30}"),
                  ("instance", "edge-0042"))
        for k in range(ticks):
            v = round(1000 + 50 * math.sin(i + k / 7) + k * (i % 3), 2)  # gauges and counters
            out.append((labels, t0 + k * 10_000, v))
    return out


def wire(n_series: int, ticks: int) -> dict[str, float]:
    from agent.adapters.remote_write import encode

    pts = samples(n_series, ticks)
    by_series: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}
    rw = 0
    batch = 2000  # the shipper's default batch_samples
    for start in range(0, len(pts), batch):
        by_series = {}
        for labels, t, v in sorted(pts[start:start + batch], key=lambda p: (p[1], p[0])):
            by_series.setdefault(labels, []).append((t, v))
        rw += len(encode(list(by_series.items())))
    jl = sum(len(json.dumps({"name": dict(lb)["__name__"], "labels": {k: v for k, v in lb
                                                                        if k != "__name__"},
                             "ts": t, "value": v}).encode()) + 1 for lb, t, v in pts)
    text = 0
    for labels, t, v in pts:
        d = dict(labels)
        inner = ",".join(f'{k}="{x}"' for k, x in labels if k != "__name__")
        text += len(f"{d['__name__']}{{{inner}}} {v} {t}\n".encode())
    n = len(pts)
    return {"samples": n, "remote_write": rw / n, "json_lines": jl / n, "text": text / n}


class _Sink(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.samples = 0

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), H)


def _targets(n: int) -> tuple[list[socket.socket], threading.Event]:
    """``n`` listening sockets on 127.0.0.1 that accept and close (the QoE probes' targets)."""
    socks, sel, stop = [], selectors.DefaultSelector(), threading.Event()
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)

    def loop() -> None:
        while not stop.is_set():
            for key, _ in sel.select(0.5):
                try:
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    conn.close()
                except OSError:
                    pass

    threading.Thread(target=loop, daemon=True).start()
    return socks, stop


def agent(seconds: float, settle: float) -> dict[str, tuple[float, float, float]]:
    work = Path(tempfile.mkdtemp(prefix="edgeops-telemetry-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    sink = _Sink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    socks, stop = _targets(100)
    try:
        subprocess.run(edgeops("keys", "init-root", "--out", work / "root"), check=True,
                       stdout=subprocess.DEVNULL, cwd=ROOT)
        (work / "v1.img").write_bytes(b"x" * 4096)
        plain = sim_device(work, "plain")
        tel = sim_device(work, "telemetry")
        targets = ", ".join(f'"127.0.0.1:{s.getsockname()[1]}"' for s in socks)
        with open(tel, "a") as f:
            f.write(f'\n[telemetry]\ninterval = 10\nprobe_count = 1\ntargets = [{targets}]\n'
                    f'remote_write_url = "http://127.0.0.1:{sink.server_address[1]}/api/v1/write"\n')
        procs["agent"] = subprocess.Popen(edgeops("agent", "--config", plain), cwd=ROOT,
                                          stdout=subprocess.DEVNULL)
        procs["agent+telemetry"] = subprocess.Popen(edgeops("agent", "--config", tel), cwd=ROOT,
                                                    stdout=subprocess.DEVNULL)
        time.sleep(settle)
        for name, p in procs.items():
            if p.poll() is not None:
                raise SystemExit(f"{name} exited early ({p.returncode})")
        before = {name: usage(p.pid) for name, p in procs.items()}
        time.sleep(seconds)
        after = {name: usage(p.pid) for name, p in procs.items()}
        from agent.adapters.telemetry_buffer import TelemetryBuffer

        buf = TelemetryBuffer(work / "telemetry" / "state" / "telemetry.db")
        st = buf.status()
        buf.close()
        print(f"# telemetry buffer after the run: {st.samples} samples held, last send "
              f"{'yes' if st.last_send else 'never'}, dropped {st.dropped or 'none'}")
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        stop.set()
        sink.shutdown()
        for s in socks:
            s.close()
        shutil.rmtree(work, ignore_errors=True)
    return {name: (100 * (after[name].cpu - before[name].cpu) / seconds, after[name].rss,
                   (after[name].written - before[name].written) / 1024) for name in after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=300)
    ap.add_argument("--ticks", type=int, default=360, help="collections per series (360: 1 h)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=15.0)
    ap.add_argument("--wire-only", action="store_true")
    a = ap.parse_args()
    w = wire(a.series, a.ticks)
    print(f"# wire: {w['samples']:.0f} samples ({a.series} series x {a.ticks} collections 10 s apart)")
    print(f"telemetry_bytes_per_sample_remote_write {w['remote_write']:.2f}")
    print(f"telemetry_bytes_per_sample_json_lines {w['json_lines']:.2f}")
    print(f"telemetry_bytes_per_sample_prometheus_text {w['text']:.2f}")
    ratio = w["json_lines"] / w["remote_write"]
    print(f"telemetry_json_lines_over_remote_write {ratio:.1f}x (target >= 10x: "
          f"{'ok' if ratio >= 10 else 'under'}); text over remote write "
          f"{w['text'] / w['remote_write']:.1f}x")
    if a.wire_only:
        return 0
    compileall.compile_dir(ROOT / "agent", quiet=1)
    rows = agent(a.seconds, a.settle)
    print(f"# agent over {a.seconds:g} s, 10 s interval, 100 QoE targets (~340 series), in the same run")
    print(f"{'':<18} {'CPU %':>7} {'RSS MiB':>8} {'written KiB':>12}")
    for name, (cpu, rss, written) in rows.items():
        print(f"{name:<18} {cpu:>7.3f} {rss:>8.1f} {written:>12.1f}")
    (c0, r0, _), (c1, r1, w1) = rows["agent"], rows["agent+telemetry"]
    print(f"telemetry_added_cpu {c1 - c0:.3f} % of a core (target < 1: {'ok' if c1 - c0 < 1 else 'over'})")
    print(f"telemetry_added_rss {r1 - r0:.1f} MiB (target < 8: {'ok' if r1 - r0 < 8 else 'over'})")
    print(f"telemetry_written {w1:.1f} KiB over {a.seconds:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
