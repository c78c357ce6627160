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

A device runs edgeops installed from its wheel, byte-compiled (pip compiles it). So the
benchmark builds the wheel of this tree and installs it, without its dependencies, into a
fresh venv (``--via wheel``, the default): what ``--version`` and ``status`` on a sim board
load must then be the standard library and edgeops alone, or the run fails. There
``python -c pass`` is the venv's own. A checkout's editable install costs every command,
``python -c pass`` included, about 0.02 s more (its import hook loads pathlib, urllib and
importlib.util at start-up); ``--via script`` measures that instead, after byte-compiling
``agent/`` (with PYTHONDONTWRITEBYTECODE=1 every run would compile each module again).
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import sysconfig
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


def edgeops(via: str, work: Path) -> tuple[list[str], str]:
    """The command to run and the Python it runs on: the wheel's console script in a fresh
    venv (``wheel``), this environment's console script (``script``) or ``python -m``."""
    if via == "wheel":
        return [str(install_wheel(work) / "edgeops")], str(work / "venv" / "bin" / "python")
    compileall.compile_dir(ROOT / "agent", quiet=1)  # as installed (see the docstring)
    script = Path(sys.executable).with_name("edgeops")
    if via == "script":
        return [str(script)], sys.executable
    return [sys.executable, "-m", "agent.cli"], sys.executable


def install_wheel(work: Path, *, deps: bool = False) -> Path:
    """bin/ of a fresh venv holding this tree's wheel and none of its dependencies; with
    ``deps``, this environment's site-packages on its path as a plain .pth line, as the
    device image puts its vendored wheels there (image/build.py, edgeops-vendor.pth): the
    dependencies importable, this checkout's editable import hook not loaded."""
    src = work / "src"  # pip wheel writes build/ into the tree it builds: build a copy
    for old in (src, work / "dist", work / "venv"):
        shutil.rmtree(old, ignore_errors=True)  # a second run measures this tree, not the last
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache"))
    quiet = {"check": True, "stdout": subprocess.DEVNULL}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(work / "dist"), str(src)], **quiet)  # type: ignore[call-overload]
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], **quiet)  # type: ignore[call-overload]
    wheel = next((work / "dist").glob("edgeops-*.whl"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], **quiet)  # type: ignore[call-overload]
    if deps:
        here = Path(sysconfig.get_paths()["purelib"])
        there = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
        (Path(there) / "edgeops-deps.pth").write_text(f"{here}\n")
    return venv / "bin"


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
    ap.add_argument("--via", choices=["wheel", "script", "module"], default="wheel",
                    help="run edgeops installed from its wheel in a fresh venv (default), this "
                         "environment's 'edgeops' script (a checkout), or 'python -m agent.cli'")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeops-startup-"))
    try:
        cli, python = edgeops(a.via, work)
        cfg = make_device(work, edgeops("module", work)[0])  # keys init-root needs cryptography
        commands = {
            "python -c pass": [python, "-c", "pass"],
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
    print("# python -c pass: the Python that edgeops runs on, in the same run")
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
