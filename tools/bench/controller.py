"""Benchmark: device polls per second one controller serves at p99 < 50 ms, beside the stack's baseline.

    python tools/bench/controller.py [--devices 10000] [--seconds 5] [--workers 1]

Starts ``edgeops controller serve`` (aiohttp + uvloop, SQLite WAL) on 127.0.0.1 with
--workers processes sharing the port (--reuse-port, SO_REUSEPORT; default 1), registers --devices
devices and gives 1 % of them an open deployment so polls exercise both answers.
The load generator is this process: keep-alive HTTP/1.1 over asyncio streams (uvloop),
closed loop, each connection polling as a distinct device with its TargetToken. It
sweeps the concurrency and reports the best rate whose p99 stays under 50 ms, for the
DDI base poll and for the stack's cheapest response (``GET /_empty``), then the ratio.
Everything is bounded: loopback only, a fixed number of connections, fixed seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

P99_BAR = 0.050
CONCURRENCY = (4, 8, 16, 32, 64)


@dataclass
class Result:
    concurrency: int
    rate: float
    p50: float
    p99: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(data: Path, devices: int) -> list[tuple[str, str]]:
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.controller.tokens import digest

    db = open_database(str(data / "c.db"))
    fleet = Fleet(db, data)
    creds = []
    with db.tx():
        for i in range(devices):
            did, token = f"dev{i:06d}", f"tok{i:06d}"
            db.execute("INSERT INTO devices (id, token, site, tags, attributes, created) "
                       "VALUES (?, ?, ?, '[]', '{\"version\": \"1.0\"}', 0)",
                       [did, digest(token), f"s{i % 7}"])
            creds.append((did, token))
        db.execute("INSERT INTO bundles (version, compatible, sha256, sha1, md5, size, filename, signer, "
                   "created) VALUES ('2.0', 'x', 'a', 'b', 'c', 1, 'f', 's', 0)")
        for did, _ in creds[::100]:
            db.execute("INSERT INTO actions (device_id, bundle_id, status, created, updated) "
                       "VALUES (?, 1, 'open', 0, 0)", [did])
    fleet.db.close()
    return creds


async def _client(host: str, port: int, reqs: list[bytes], stop: float, lat: list[float]) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    errors, i = 0, 0
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            lat.append(time.perf_counter() - t0)
    finally:
        writer.close()
    return errors


async def run_load(port: int, requests_for: list[list[bytes]], seconds: float) -> Result:
    lat: list[float] = []
    start = time.perf_counter()
    stop = start + seconds
    errs = await asyncio.gather(*(_client("127.0.0.1", port, r, stop, lat) for r in requests_for))
    took = time.perf_counter() - start
    lat.sort()
    n = len(lat)
    return Result(len(requests_for), n / took, lat[n // 2] if n else 0, lat[int(n * 0.99)] if n else 0,
                  sum(errs))


def poll_requests(creds: list[tuple[str, str]], conns: int) -> list[list[bytes]]:
    per = [creds[i::conns] for i in range(conns)]
    return [[(f"GET /DEFAULT/controller/v1/{d} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              f"Authorization: TargetToken {t}\r\n\r\n").encode() for d, t in chunk] for chunk in per]


def empty_requests(conns: int) -> list[list[bytes]]:
    return [[b"GET /_empty HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"] for _ in range(conns)]


def sweep(port: int, make: object, seconds: float) -> tuple[Result, list[Result]]:
    results = []
    for c in CONCURRENCY:
        r = asyncio.run(run_load(port, make(c), seconds))  # type: ignore[operator]
        results.append(r)
        print(f"    concurrency {c:3d}: {r.rate:8.0f}/s  p50 {r.p50 * 1000:6.2f} ms  "
              f"p99 {r.p99 * 1000:6.2f} ms  errors {r.errors}", flush=True)
    ok = [r for r in results if r.p99 < P99_BAR and r.errors == 0]
    best = max(ok, key=lambda r: r.rate) if ok else Result(0, 0.0, 0, 0, 0)
    return best, results


def start_server(data: Path, port: int, workers: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEOPS_CONTROLLER_TOKEN": "bench"}
    cmd = [sys.executable, "-m", "agent.cli", "controller", "serve", "--db", str(data / "c.db"),
           "--listen", f"127.0.0.1:{port}"] + (["--reuse-port"] if workers > 1 else [])
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL) for _ in range(workers)]
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                time.sleep(0.5 * workers)  # let every worker bind
                return procs
        except OSError:
            time.sleep(0.1)
    raise SystemExit("controller did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=4.0, help="per concurrency step (max 30)")
    ap.add_argument("--workers", type=int, default=1, help="controller processes (max 4)")
    a = ap.parse_args()
    seconds, workers = min(a.seconds, 30.0), max(1, min(a.workers, 4))
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-") as tmp:
        data = Path(tmp)
        creds = prepare(data, a.devices)
        port = free_port()
        procs = start_server(data, port, workers)
        try:
            print(f"controller: {workers} process(es), aiohttp + uvloop, SQLite WAL, {a.devices} devices; "
                  f"load: this process, {os.cpu_count()} CPUs shared")
            print("  DDI base poll (TargetToken auth + open-action lookup):")
            polls, _ = sweep(port, lambda c: poll_requests(creds, c), seconds)
            print("  baseline: GET /_empty on the same stack:")
            base, _ = sweep(port, empty_requests, seconds)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    ratio = polls.rate / base.rate if base.rate else 0.0
    print(f"\npolls/s at p99 < 50 ms: {polls.rate:,.0f} (concurrency {polls.concurrency}, "
          f"p99 {polls.p99 * 1000:.1f} ms)")
    print(f"baseline empty responses/s at p99 < 50 ms: {base.rate:,.0f} (concurrency {base.concurrency}, "
          f"p99 {base.p99 * 1000:.1f} ms)")
    print(f"ratio polls/baseline: {ratio:.2f}; target 2,000 polls/s: "
          f"{'met' if polls.rate >= 2000 else 'NOT met'}")
    return 0 if polls.rate >= 2000 else 1


if __name__ == "__main__":
    sys.exit(main())
