#!/usr/bin/env python3
"""CLI start-up cost: CPU time and peak memory of `edgeops --version` and `edgeops status`.

A technician types these on a slow board, so each must cost little more than starting
Python at all. The benchmark creates a sim device in a temporary directory, then runs
each command --runs times, interleaved with a bare `python -c pass` (the floor for any
Python command), and prints the median and range of each child's CPU time (user + sys,
from os.wait4) and peak RSS (ru_maxrss), with the ratio to that floor measured in the
same run. Targets (issue 10): --version and status each <= 0.08 s CPU and <= 20 MiB.

Linux carries a process's memory high-water mark across exec, so the ru_maxrss of a child
is at least the RSS of the process it was forked from (this benchmark, ~15 MiB). Each
command is therefore started by a minimal ``python -I -S`` launcher (~8 MiB, below any
Python command) that reports the command's own rusage.

A device runs installed, byte-compiled modules (pip compiles them). A checkout may not have
them, and with PYTHONDONTWRITEBYTECODE=1 every run would compile each agent module from
source again (status: +0.07 s), so the benchmark byte-compiles ``agent/`` first.
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_CPU = 0.08  # seconds
TARGET_RSS = 20.0  # MiB


@dataclass
class Sample:
    cpu: list[float] = field(default_factory=list)  # seconds, user + sys
    rss: list[float] = field(default_factory=list)  # MiB, peak


def edgeops(via: str) -> list[str]:
    """The installed console script (what a technician runs), else ``python -m agent.cli``."""
    script = Path(sys.executable).with_name("edgeops")
    if via == "script" or (via == "auto" and script.exists()):
        return [str(script)]
    return [sys.executable, "-m", "agent.cli"]


# Runs argv[1:] with stdout on /dev/null and prints "exit-code cpu-seconds maxrss-KiB".
LAUNCHER = """
import os, sys
null = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, file_actions=null)
_, status, ru = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime, ru.ru_maxrss)
"""


def measure(argv: list[str], into: Sample) -> None:
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, *argv], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    code, cpu, rss = proc.stdout.split()
    if code != "0":
        raise SystemExit(f"{' '.join(argv)} failed ({code}): {proc.stderr}")
    into.cpu.append(float(cpu))
    into.rss.append(int(rss) / 1024)  # KiB on Linux


def make_device(work: Path, cli: list[str]) -> Path:
    run = {"check": True, "stdout": subprocess.DEVNULL, "cwd": ROOT}
    subprocess.run([*cli, "keys", "init-root", "--out", str(work / "root")], **run)  # type: ignore[call-overload]
    (work / "v1.img").write_bytes(b"x" * 4096)
    subprocess.run([*cli, "sim", "init", str(work / "dev"), "--image", str(work / "v1.img"),
                    "--keyring", str(work / "root/root.crt")], **run)  # type: ignore[call-overload]
    return work / "dev" / "agent.toml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    ap.add_argument("--via", choices=["auto", "script", "module"], default="auto",
                    help="run the 'edgeops' console script or 'python -m agent.cli' (default: "
                         "the script when installed beside this Python)")
    a = ap.parse_args()
    cli = edgeops(a.via)
    compileall.compile_dir(ROOT / "agent", quiet=1)  # as installed (see the docstring)
    work = Path(tempfile.mkdtemp(prefix="edgeops-startup-"))
    try:
        cfg = make_device(work, cli)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "edgeops --version": [*cli, "--version"],
            "edgeops status": [*cli, "status", "--config", str(cfg)],
        }
        samples = {name: Sample() for name in commands}
        for argv in commands.values():
            measure(argv, Sample())  # warm the page cache and __pycache__
        for _ in range(a.runs):  # interleaved, so a busy moment of a shared machine hits all alike
            for name, argv in commands.items():
                measure(argv, samples[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(samples, a.runs, cli)
    return 0


def report(samples: dict[str, Sample], runs: int, cli: list[str]) -> None:
    base = samples["python -c pass"]
    base_cpu, base_rss = statistics.median(base.cpu), statistics.median(base.rss)
    print(f"# CLI start-up, median (min-max) of {runs} runs; edgeops = {' '.join(cli)}")
    print(f"{'':<20} {'CPU s':>22} {'peak RSS MiB':>20} {'CPU x pass':>11} {'RSS x pass':>11}")
    for name, s in samples.items():
        cpu, rss = statistics.median(s.cpu), statistics.median(s.rss)
        print(f"{name:<20} {cpu:>8.3f} ({min(s.cpu):.3f}-{max(s.cpu):.3f}) "
              f"{rss:>8.1f} ({min(s.rss):.1f}-{max(s.rss):.1f}) "
              f"{cpu / base_cpu:>10.1f}x {rss / base_rss:>10.2f}x")
    for name, s in samples.items():
        key = name.replace("python -c pass", "python_pass").replace("edgeops ", "edgeops_") \
                  .replace("--", "").replace("-", "_")
        print(f"{key}_cpu {statistics.median(s.cpu):.3f} s\n{key}_rss {statistics.median(s.rss):.1f} MiB")
    for name in ("edgeops --version", "edgeops status"):
        cpu, rss = statistics.median(samples[name].cpu), statistics.median(samples[name].rss)
        verdict = "ok" if cpu <= TARGET_CPU and rss <= TARGET_RSS else "over"
        print(f"target {name}: <= {TARGET_CPU} s CPU and <= {TARGET_RSS:g} MiB: {verdict} "
              f"({cpu:.3f} s, {rss:.1f} MiB; python itself {base_cpu:.3f} s, {base_rss:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
