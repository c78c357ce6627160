"""Benchmark: a staged rollout to 10,000 simulated devices served by one controller process.

    python tools/bench/fleet.py [--devices 10000] [--workers 3] [--poll-sleep 60] [--steady 60]
                                [--timeout 1500]

Starts ``edgeops controller serve`` (aiohttp + uvloop, SQLite WAL) on 127.0.0.1 with --devices
devices registered and one synthetic bundle, then runs that many
``agent.host.litedevice.SimAgent`` devices in --workers processes (``agent.host.simpool``:
each an asyncio loop with its own keep-alive pool; real time, no network shaping), each
polling every --poll-sleep seconds as the controller tells it (``config.polling.sleep``,
spread +-10 % per device). After one poll interval to spread them and --steady seconds of
steady polling (the baseline), it creates a staged rollout to the whole fleet (canary 1 %,
then 10 %, then the rest) and waits until every device runs the release. It prints, all from
this one run: the rollout's wall time, the controller's CPU time and peak RSS, poll p50/p99 in
the steady phase and during the rollout (and their ratio) as the devices measured them and as
the controller did (its ``edgeops_controller_poll_seconds`` histogram: bucket bounds), bytes
served, and the final states from both sides.
Targets: the run completes; poll p99 < 250 ms; controller RSS < 300 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

P99_BAR, RSS_BAR = 0.250, 300 << 20
TOKEN = "bench-fleet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(data: Path, devices: int, poll_sleep: int) -> tuple[list[tuple[str, str, Any]], int]:
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.host.fleet_sim import Scenario, Site, populate

    sc = Scenario("bench", devices=devices, poll_sleep=poll_sleep, bundle_size=64 << 10,
                  sites=tuple(Site(f"site{i}") for i in range(10)))
    fleet = Fleet(open_database(str(data / "c.db")), data / "artifacts-dir")
    try:
        return populate(fleet, sc, random.Random(7))
    finally:
        fleet.db.close()


def start_controller(data: Path, port: int, poll_sleep: int) -> subprocess.Popen[bytes]:
    # PYTHONFAULTHANDLER: a controller that stops answering is sent SIGABRT (main) and writes
    # every thread's stack to its log, which the benchmark prints.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEOPS_CONTROLLER_TOKEN": TOKEN,
           "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "agent.cli", "controller", "serve", "--db", str(data / "c.db"),
           "--data", str(data / "artifacts-dir"), "--listen", f"127.0.0.1:{port}",
           "--poll-sleep", str(poll_sleep)]
    proc = subprocess.Popen(cmd, env=env, stderr=(data / "controller.log").open("wb"))
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("controller did not start")


def api(port: int, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    for _ in range(30):
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 429: the controller said when to come back
            if exc.code != 429:
                raise
            time.sleep(float(exc.headers.get("Retry-After", "5")))
    raise SystemExit(f"{method} {path}: the controller stayed overloaded")


class ProcWatch:
    """CPU seconds (utime + stime) and peak RSS of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_rss = pid, 0
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick

    def sample(self) -> None:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * q))] if v else 0.0


def scrape_polls(port: int) -> list[tuple[float, float]]:
    """The controller's own base-poll histogram (``edgeops_controller_poll_seconds``): cumulative
    (upper bound, count) pairs from /api/v1/metrics; then its database executor's counters
    (group commits, the writes they carried, 429s) as (-1, n), (-2, n), (-3, n)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/metrics",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    for _ in range(30):
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read().decode()
            break
        except urllib.error.HTTPError as exc:
            if exc.code != 429:
                raise
            time.sleep(float(exc.headers.get("Retry-After", "5")))
    else:
        raise SystemExit("/metrics: the controller stayed overloaded")
    out = []
    for line in text.splitlines():
        if line.startswith("edgeops_controller_poll_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    for i, name in enumerate(("commits", "grouped", "refused"), 1):
        for line in text.splitlines():
            if line.startswith(f"edgeops_controller_db_{name}_total "):
                out.append((-float(i), float(line.rsplit(" ", 1)[1])))
    return out


def hist_quantile(scrapes: tuple[list[tuple[float, float]], list[tuple[float, float]]],
                  q: float) -> tuple[float, int]:
    """(the upper bound of the bucket holding quantile q, polls) between two scrapes."""
    before, after = scrapes
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True) if le >= 0]
    total = counts[-1][1] if counts else 0
    for le, c in counts:
        if total and c >= q * total:
            return le, int(total)
    return float("inf"), int(total)


def run(a: argparse.Namespace, port: int, creds: list[tuple[str, str, Any]], bid: int,
        watch: ProcWatch) -> dict[str, Any]:
    from agent.host.simpool import SimPool

    pool = SimPool(f"http://127.0.0.1:{port}", [(d, t) for d, t, _ in creds], workers=a.workers,
                   poll_sleep=a.poll_sleep, release="2.0", connections=1024)
    pool.start()
    try:
        def wait(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                watch.sample()
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))

        wait(a.poll_sleep)  # every device has polled once: the fleet is spread
        h0, t_steady = scrape_polls(port), time.monotonic()
        wait(a.steady)
        h1, t_roll = scrape_polls(port), time.monotonic()
        cpu0 = watch.cpu()
        policy = {"canary_percent": 1, "growth": 10, "success_threshold": 0.99, "window": a.timeout}
        rid = api(port, "POST", "/rollouts", {"bundle": bid, "policy": policy, "all": True})["id"]
        status: dict[str, Any] = {}
        last_print = 0.0
        while time.monotonic() - t_roll < a.timeout:
            wait(2.0)
            status = api(port, "GET", f"/rollouts/{rid}")
            done, _ = pool.progress()
            if time.monotonic() - last_print >= 30:
                last_print = time.monotonic()
                print(f"  {last_print - t_roll:5.0f} s: wave {status['current_wave']} "
                      f"{status['actions']}; {done} devices done", flush=True)
            if status["status"] != "running" and done == len(creds):
                break
        t_end = time.monotonic()
        wall, cpu = t_end - t_roll, watch.cpu() - cpu0
        h2 = scrape_polls(port)
        devices = api(port, "GET", "/devices")
        r = pool.stop()
    except BaseException:
        pool.kill()
        raise
    versions = {d["id"]: d["version"] for d in devices["devices"]}
    running: dict[str, int] = {}
    for v in r.running.values():
        running[str(v)] = running.get(str(v), 0) + 1
    mismatched = sum(1 for d, v in r.running.items() if versions.get(d) != v)
    return {"wall": wall, "cpu": cpu, "steady": r.between(t_steady, t_roll),
            "during": r.between(t_roll, t_end), "served": r.bytes_in, "status": status,
            "running": running, "mismatched": mismatched, "throttled": r.throttled,
            "failed": r.failed, "ctl_steady": (h0, h1), "ctl_during": (h1, h2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--poll-sleep", type=int, default=60)
    ap.add_argument("--steady", type=float, default=60.0, help="seconds of steady polling measured first")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds the rollout may take")
    ap.add_argument("--workers", type=int, default=3,
                    help="simulator processes (each an event loop of devices; agent.host.simpool)")
    a = ap.parse_args()
    a.devices = max(10, min(a.devices, 20_000))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-fleet-") as tmp:
        data = Path(tmp)
        creds, bid = prepare(data, a.devices, a.poll_sleep)
        port = free_port()
        proc = start_controller(data, port, a.poll_sleep)
        try:
            watch = ProcWatch(proc.pid)
            print(f"controller: 1 process, aiohttp + uvloop, SQLite WAL (group commit, poll reader); "
                  f"{a.devices} simulated devices in {a.workers} worker processes polling every "
                  f"{a.poll_sleep} s; {os.cpu_count()} CPUs shared", flush=True)
            r = run(a, port, creds, bid, watch)
        except BaseException:
            if proc.poll() is None:
                proc.send_signal(signal.SIGABRT)  # faulthandler: the threads' stacks to the log
                proc.wait(20)
            print((data / "controller.log").read_text(errors="replace")[-6000:], file=sys.stderr)
            raise
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)
    st = r["status"]
    p50s, p99s = pct(r["steady"], 0.5), pct(r["steady"], 0.99)
    p50, p99 = pct(r["during"], 0.5), pct(r["during"], 0.99)
    print(f"rollout: {st.get('status')} in {r['wall']:.1f} s wall, waves {st.get('wave_sizes')}, "
          f"reason: {st.get('reason')}")
    print(f"controller CPU: {r['cpu']:.1f} s over the rollout "
          f"({100 * r['cpu'] / r['wall']:.0f} % of one core); "
          f"peak RSS {watch.peak_rss / 2**20:.1f} MiB (bar {RSS_BAR >> 20} MiB)")
    c50s, ns = hist_quantile(r["ctl_steady"], 0.5)
    c99s, _ = hist_quantile(r["ctl_steady"], 0.99)
    c50, nd = hist_quantile(r["ctl_during"], 0.5)
    c99, _ = hist_quantile(r["ctl_during"], 0.99)
    print(f"polls, steady phase (client side): {len(r['steady'])} polls, p50 {p50s * 1000:.1f} ms, "
          f"p99 {p99s * 1000:.1f} ms; controller side: {ns} polls, p50 <= {c50s * 1000:g} ms, "
          f"p99 <= {c99s * 1000:g} ms")
    print(f"polls, during the rollout (client side): {len(r['during'])} polls, p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms (bar {P99_BAR * 1000:.0f} ms); controller side: {nd} polls, "
          f"p50 <= {c50 * 1000:g} ms, p99 <= {c99 * 1000:g} ms; "
          f"ratio p99 rollout/steady {p99 / p99s if p99s else 0:.2f}")
    h_before, h_after = r["ctl_during"]
    d = {int(-le): n1 - n0 for (le, n1), (_, n0) in zip(h_after, h_before, strict=True) if le < 0}
    if d.get(1):
        print(f"database during the rollout: {d.get(2, 0):.0f} device writes in {d[1]:.0f} group commits "
              f"({d.get(2, 0) / d[1]:.1f} per commit); {d.get(3, 0):.0f} requests refused (429)")
    print(f"bytes served during the rollout (response bodies): {r['served']:,}; "
          f"429 answers {r['throttled']}, failed requests {r['failed']}")
    print(f"final device states: {r['running']}; controller view differs for {r['mismatched']} devices")
    ok = (st.get("status") == "finished" and r["running"].get("2.0") == a.devices and p99 < P99_BAR
          and watch.peak_rss < RSS_BAR and r["mismatched"] == 0)
    print(f"targets (completes, p99 < 250 ms, RSS < 300 MiB, views agree): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
