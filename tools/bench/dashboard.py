"""Benchmark: the dashboard's fleet page at 10,000 devices (first byte, whole page, paint) vs ``/_empty``.

    python tools/bench/dashboard.py [--devices 10000] [--runs 30] [--no-browser]

Starts ``edgeops controller serve`` (a real process, SQLite WAL) on 127.0.0.1 over a database of
--devices devices on 7 sites, with a rollout of 5 waves under way (its canary wave's actions
reported: successes and some failures with reasons), logs in with the operator token and
requests, one at a time over one keep-alive connection: ``GET /_empty`` (the stack's cheapest
response, the baseline), ``GET /`` (the fleet page: counts, the rollout, plots, 50 devices),
``GET /?page=150`` (a late page), ``GET /?state=failing`` and a device's page. For each: the
median and p95 time to the first byte of the response and to its last byte, and the ratio to
the baseline measured in the same run. With Debian's chromium and selenium present (and
without --no-browser), headless chromium also loads ``/`` and reports the browser's own
first-contentful-paint (Paint Timing API), against the issue's bar: under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TOKEN = "bench"
FIRST_PAINT_BAR = 1.0  # seconds (issue 13, item 5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(data: Path, devices: int) -> None:
    """A fleet of ``devices``, one bundle, a 5 %-canary rollout whose canary reported."""
    from agent.controller import rollout
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.controller.tokens import digest

    db = open_database(str(data / "c.db"))
    fleet = Fleet(db, data)
    now = fleet.clock()
    with db.tx():
        for i in range(devices):
            seen = None if i % 10 == 0 else now - (30 if i % 10 < 8 else 7200)
            db.execute("INSERT INTO devices (id, token, site, tags, attributes, version, last_seen, created) "
                       "VALUES (?, ?, ?, ?, '{}', '1.0', ?, 0)",
                       [f"dev{i:06d}", digest(f"tok{i:06d}"), f"site{i % 7}",
                        json.dumps(["rack-a" if i % 2 else "rack-b"]), seen])
            db.execute("INSERT INTO group_members (grp, device_id) VALUES ('all', ?)", [f"dev{i:06d}"])
        db.execute("INSERT INTO bundles (version, compatible, sha256, sha1, md5, size, filename, signer, "
                   "created) VALUES ('2.0', 'x', 'a', 'b', 'c', 1, 'f', 's', ?)", [now - 3600])
    targets = fleet.resolve_targets(group="all")
    rid = fleet.create_rollout(1, targets, rollout.Policy(canary_percent=5, error_threshold=0.5))
    with db.tx():
        for n, did in enumerate(fleet.wave_members(rid, 0)):
            failed = n % 25 == 0
            db.execute("UPDATE actions SET status = ?, detail = ?, updated = ? WHERE device_id = ? AND "
                       "rollout_id = ?", ["failure" if failed else "success",
                                          "health probe 'app' failed" if failed else "committed",
                                          now - 3000 + n, did, rid])
            if not failed:
                db.execute("UPDATE devices SET version = '2.0' WHERE id = ?", [did])
    db.close()


def start_server(data: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEOPS_CONTROLLER_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "agent.cli", "controller", "serve", "--db", str(data / "c.db"),
           "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("controller did not start")


def login(port: int) -> str:
    """The session cookie, from POST /login with the operator token."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        body = f"token={TOKEN}".encode()
        s.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-"
                  b"urlencoded\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = s.recv(65536).split(b"\r\n\r\n")[0].decode()
    for line in head.split("\r\n"):
        if line.lower().startswith("set-cookie:"):
            return line.split(":", 1)[1].split(";")[0].strip()
    raise SystemExit(f"login failed: {head.splitlines()[0]}")


def timed_get(sock: socket.socket, path: str, cookie: str) -> tuple[float, float, int]:
    """(seconds to the first byte, seconds to the last, bytes) of one GET on a kept-alive socket."""
    t0 = time.perf_counter()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode())
    buf = sock.recv(65536)
    first = time.perf_counter() - t0
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"GET {path}: {head.splitlines()[0].decode()}")
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                  if h.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(1 << 20)
    return first, time.perf_counter() - t0, len(body)


def measure(port: int, cookie: str, path: str, runs: int) -> tuple[list[float], list[float], int]:
    firsts, wholes, size = [], [], 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        timed_get(sock, path, cookie)  # warm: the first request pays for imports and caches
        for _ in range(runs):
            f, w, size = timed_get(sock, path, cookie)
            firsts.append(f)
            wholes.append(w)
    return firsts, wholes, size


def p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.95))]


def first_paint(port: int, cookie: str) -> float | None:
    """The browser's first-contentful-paint of ``/`` in seconds, or None without chromium/selenium."""
    if not (os.access("/usr/bin/chromium", os.X_OK) and os.access("/usr/bin/chromedriver", os.X_OK)):
        print("browser: skipped (needs Debian's chromium and chromium-driver)")
        return None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        print("browser: skipped (needs selenium: pip install -e '.[test]')")
        return None
    with tempfile.TemporaryDirectory(prefix="edgeops-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            url = f"http://127.0.0.1:{port}"
            driver.get(url + "/login")
            name, _, value = cookie.partition("=")
            driver.add_cookie({"name": name, "value": value, "path": "/"})
            paints = []
            for _ in range(5):
                driver.get(url + "/")
                fcp = driver.execute_script(
                    "const e = performance.getEntriesByName('first-contentful-paint')[0];"
                    "return e ? e.startTime : null;")
                if fcp is not None:
                    paints.append(float(fcp) / 1000)
        finally:
            driver.quit()
    return statistics.median(paints) if paints else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=30, help="requests per page (max 500)")
    ap.add_argument("--no-browser", action="store_true", help="skip chromium's first-paint measurement")
    a = ap.parse_args()
    devices, runs = max(100, min(a.devices, 200_000)), max(3, min(a.runs, 500))
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-") as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        prepare(data, devices)
        print(f"fleet: {devices} devices, a rollout under way "
              f"(prepared in {time.perf_counter() - t0:.1f} s); "
              f"controller: one process, SQLite WAL; client: this process, {os.cpu_count()} CPUs shared")
        port = free_port()
        proc = start_server(data, port)
        try:
            cookie = login(port)
            pages = [("GET /_empty (baseline)", "/_empty"), ("GET / (fleet page)", "/"),
                     ("GET /?page=150", "/?page=150"), ("GET /?state=failing", "/?state=failing"),
                     ("GET /devices/dev000123", "/devices/dev000123")]
            results = {}
            for _, path in pages:
                results[path] = measure(port, cookie, path, runs)
            base_first = statistics.median(results["/_empty"][0])
            base_whole = statistics.median(results["/_empty"][1])
            for label, path in pages:
                firsts, wholes, size = results[path]
                print(f"{label:28s} first byte median {statistics.median(firsts) * 1000:7.2f} ms "
                      f"(p95 {p95(firsts) * 1000:7.2f})  "
                      f"whole page median {statistics.median(wholes) * 1000:7.2f} ms "
                      f"(p95 {p95(wholes) * 1000:7.2f})  {size / 1024:6.1f} KiB  "
                      f"x{statistics.median(wholes) / base_whole:6.1f} baseline")
            fcp = None if a.no_browser else first_paint(port, cookie)
        finally:
            proc.terminate()
            proc.wait(10)
    page = statistics.median(results["/"][1])
    print(f"\nfleet page at {devices} devices: "
          f"first byte {statistics.median(results['/'][0]) * 1000:.1f} ms, "
          f"whole page {page * 1000:.1f} ms; baseline /_empty {base_first * 1000:.2f} ms first byte, "
          f"{base_whole * 1000:.2f} ms whole; ratio {page / base_whole:.0f}x")
    if fcp is not None:
        print(f"chromium first-contentful-paint of /: {fcp * 1000:.0f} ms (median of 5); bar < 1 s: "
              f"{'met' if fcp < FIRST_PAINT_BAR else 'NOT met'}")
    met = (fcp if fcp is not None else page) < FIRST_PAINT_BAR
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
