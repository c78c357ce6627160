"""Two controller processes on one port (SO_REUSEPORT) sharing one PostgreSQL database, while the
fleet simulator's devices poll them: a paced, staged rollout finishes with exactly one action per
device and exactly one final report per action.

Uses the throwaway PostgreSQL server of test_controller_postgres (skips, naming the Debian
package, without it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.test_controller_postgres import _fresh_database, pg_url  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "scale-pg"
DEVICES = 40


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(port: int, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(port: int, creds: list[tuple[str, str, Any]], rid_box: list[int], bid: int) -> None:
    import aiohttp

    from agent.host.litedevice import SimAgent, Stats
    from agent.host.netsim import SimClock

    clock, stats, stop = SimClock(1.0), Stats(), asyncio.Event()
    # one connection per device, as real devices: SO_REUSEPORT spreads connections, not requests
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in creds]
    agents = [SimAgent(did, tok, f"http://127.0.0.1:{port}", s, clock, stats, poll_sleep=2,
                       rng=random.Random(did), trial_seconds=0.2)
              for (did, tok, _), s in zip(creds, sessions, strict=True)]
    tasks = [asyncio.create_task(a.run(stop, random.uniform(0, 2))) for a in agents]
    try:
        policy = {"canary_percent": 10, "growth": 3, "success_threshold": 1.0, "window": 600,
                  "ramp_rate": 20, "ramp_growth": 2, "site_concurrency": 6}
        made = await asyncio.to_thread(_api, port, "POST", "/rollouts",
                                       {"bundle": bid, "policy": policy, "all": True})
        rid_box.append(made["id"])
        end = time.monotonic() + 120
        while time.monotonic() < end:
            await asyncio.sleep(1)
            st = await asyncio.to_thread(_api, port, "GET", f"/rollouts/{made['id']}")
            if st["status"] != "running" and all(a.board.running == "2.0" and not a.outbox for a in agents):
                break
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in sessions:
            await s.close()


def test_two_processes_on_one_port_finish_a_rollout_with_no_lost_or_duplicated_action(
        pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    import psycopg

    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.host.fleet_sim import Scenario, Site, populate

    url = _fresh_database(pg_url, "twoprocs")
    shared = tmp_path / "shared"
    fleet = Fleet(open_database(url), shared)
    try:
        creds, bid = populate(fleet, Scenario("pg", devices=DEVICES, sites=(Site("a"), Site("b"))),
                              random.Random(3))
    finally:
        fleet.db.close()
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEOPS_CONTROLLER_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "agent.cli", "controller", "serve", "--db", url, "--data", str(shared),
           "--listen", f"127.0.0.1:{port}", "--poll-sleep", "2", "--reuse-port"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        for _ in range(200):
            try:
                _api(port, "GET", "/rollouts")
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)  # the second process binds too
        cpu0 = [_cpu(p.pid) for p in procs]
        rid: list[int] = []
        asyncio.run(_drive(port, creds, rid, bid))
        used = [_cpu(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
        assert all(p.poll() is None for p in procs)
        assert min(used) > 0.2, used  # both processes served the fleet
        st = _api(port, "GET", f"/rollouts/{rid[0]}")
        assert st["status"] == "finished", st
        with psycopg.connect(url) as conn:
            per_device = conn.execute("SELECT device_id, COUNT(*), MIN(status) FROM actions "
                                      "WHERE rollout_id = %s GROUP BY device_id", [rid[0]]).fetchall()
            finals = conn.execute("SELECT action_id, COUNT(*) FROM feedback WHERE execution = 'closed' "
                                  "GROUP BY action_id").fetchall()
            versions = {r[0] for r in conn.execute("SELECT version FROM devices").fetchall()}
        assert len(per_device) == DEVICES  # no device lost
        assert all(n == 1 and status == "success" for _, n, status in per_device)  # none twice
        assert len(finals) == DEVICES and all(n == 1 for _, n in finals)  # one final report each
        assert versions == {"2.0"}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and /proc: Linux")
