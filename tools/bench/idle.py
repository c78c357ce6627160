#!/usr/bin/env python3
"""Idle cost of the agent service: CPU and memory of `edgeops agent` with nothing to do.

Starts a sim device and `edgeops agent` on it, lets it settle, then samples its
CPU time and RSS over --seconds, next to a baseline measured in the same run: a
Python process that only sleeps (the floor for any Python daemon).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def edgeops(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *map(str, args)]


def sample(proc: subprocess.Popen[bytes], seconds: float) -> tuple[float, float]:
    p = psutil.Process(proc.pid)
    t0 = p.cpu_times()
    time.sleep(seconds)
    t1 = p.cpu_times()
    cpu = (t1.user + t1.system) - (t0.user + t0.system)
    return 100 * cpu / seconds, p.memory_info().rss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeops-idle-"))
    try:
        run = dict(check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        subprocess.run(edgeops("keys", "init-root", "--out", work / "root"), **run)  # type: ignore[call-overload]
        (work / "v1.img").write_bytes(b"x" * 4096)
        subprocess.run(edgeops("sim", "init", work / "dev", "--image", work / "v1.img",
                               "--keyring", work / "root/root.crt"), **run)  # type: ignore[call-overload]
        agent = subprocess.Popen(edgeops("agent", "--config", work / "dev/agent.toml"), cwd=ROOT,
                                 stdout=subprocess.DEVNULL)
        base = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        try:
            time.sleep(2.0)  # start-up and the first cycle are not idle
            agent_cpu, agent_rss = sample(agent, a.seconds)
            base_cpu, base_rss = sample(base, a.seconds)
        finally:
            agent.terminate()
            base.terminate()
            agent.wait(10)
            base.wait(10)
        print(f"# idle over {a.seconds:g} s (agent poll interval 5 s)")
        print(f"{'':<24} {'CPU %':>7} {'RSS MiB':>8}")
        print(f"{'edgeops agent':<24} {agent_cpu:>7.3f} {agent_rss:>8.1f}")
        print(f"{'python sleeping':<24} {base_cpu:>7.3f} {base_rss:>8.1f}")
        print(f"edgeops_agent_idle_cpu {agent_cpu:.3f} %\npython_sleep_idle_cpu {base_cpu:.3f} %")
        print(f"edgeops_agent_idle_rss {agent_rss:.1f} MiB\npython_sleep_idle_rss {base_rss:.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
