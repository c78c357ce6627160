#!/usr/bin/env python3
"""Install throughput, CPU and peak memory of edgeops, next to the machine's limit and RAUC.

Everything is measured in this one run, on this machine:
  limit   read + SHA-256 + write a copy with fsync: `openssl dgst -sha256 BUNDLE`
          followed by `dd if=IMAGE of=COPY bs=1M conv=fsync` (a serial pass; an
          agent that overlaps hashing and writing can beat it)
  edgeops `edgeops install BUNDLE` into a file-backed sim slot, Python start-up,
          signature check, per-block verification, write and fsync included
  RAUC    ../shared/anchors/rauc_baseline.sh (RAUC 1.8, plain bundle, same 256 MiB
          image), run now, and edgeops on the very same image
  before  with --against DIR: the same install by the edgeops in source tree DIR (an
          earlier commit, e.g. `git worktree add DIR <commit>`), alternating run by
          run with this tree's, so a change is judged against its past in one run
Figures are medians of --runs runs, warm page cache. Output: a table, then one
`name value unit` line per figure for scripts.
Usage: tools/bench/install.py [--sizes 64,1024] [--runs 3] [--no-rauc] [--work DIR] [--against DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANCHORS = next((p / "shared" / "anchors" for p in ROOT.parents if (p / "shared" / "anchors").is_dir()),
               ROOT.parent / "shared" / "anchors")
MIB = 1 << 20


@dataclass
class Run:
    wall: float
    cpu: float
    rss_mib: float


def run_measured(cmd: list[str], tree: Path = ROOT) -> Run:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tree,
                            env={**os.environ, "PYTHONPATH": str(tree)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def edgeops(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *map(str, args)]


def median(runs: list[Run]) -> Run:
    return Run(statistics.median(r.wall for r in runs), statistics.median(r.cpu for r in runs),
               max(r.rss_mib for r in runs))


def make_image(path: Path, size_mib: int) -> None:
    if path.exists() and path.stat().st_size == size_mib * MIB:
        return
    subprocess.run([sys.executable, str(ANCHORS / "mkimage.py"), str(path), str(size_mib)],
                   check=True, stdout=subprocess.DEVNULL)


class Bench:
    def __init__(self, work: Path, runs: int) -> None:
        self.work = work
        self.runs = runs
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "root" / "root.crt").exists():
            shutil.rmtree(work / "root", ignore_errors=True)
            shutil.rmtree(work / "signer", ignore_errors=True)
            subprocess.run(edgeops("keys", "init-root", "--out", work / "root"), check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run(edgeops("keys", "issue-signer", "--root", work / "root", "--out",
                                   work / "signer"), check=True, stdout=subprocess.DEVNULL)
        self.tiny = work / "tiny.img"
        self.tiny.write_bytes(b"v1" * 512)

    def bundle(self, image: Path, name: str, compress: bool = False) -> Path:
        out = self.work / f"{name}.bundle"
        if not out.exists() or out.stat().st_mtime < image.stat().st_mtime:
            subprocess.run(edgeops(
                "bundle", "create", "--key", self.work / "signer/signer.key", "--cert",
                self.work / "signer/signer.crt", "--compatible", "edgeops-sim", "--version", "2.0",
                "--security-version", "1", "--payload", f"rootfs={image}",
                "--compress", "zstd" if compress else "none", "-o", out), check=True,
                stdout=subprocess.DEVNULL)
        return out

    def install(self, bundle: Path, slot_mib: int) -> Run:
        return self.installs(bundle, slot_mib, (ROOT,))[0]

    def installs(self, bundle: Path, slot_mib: int, trees: tuple[Path, ...]) -> list[Run]:
        """Median install of ``bundle`` by each source tree, the trees taking turns run by run."""
        runs: list[list[Run]] = [[] for _ in trees]
        for _ in range(self.runs):
            for i, tree in enumerate(trees):
                dev = self.work / "device"
                shutil.rmtree(dev, ignore_errors=True)
                subprocess.run(edgeops("sim", "init", dev, "--image", self.tiny, "--keyring",
                                       self.work / "root/root.crt", "--slot-size", f"{slot_mib}M"),
                               check=True, stdout=subprocess.DEVNULL, cwd=tree,
                               env={**os.environ, "PYTHONPATH": str(tree)})
                runs[i].append(run_measured(edgeops("install", bundle, "--config", dev / "agent.toml",
                                                    "--progress", "never"), tree))
        shutil.rmtree(self.work / "device", ignore_errors=True)
        return [median(r) for r in runs]

    def limit(self, bundle: Path, image: Path) -> float:
        walls = []
        for _ in range(self.runs):
            copy = self.work / "copy.img"
            copy.unlink(missing_ok=True)
            t = timed(["openssl", "dgst", "-sha256", str(bundle)])
            t += timed(["dd", f"if={image}", f"of={copy}", "bs=1M", "conv=fsync", "status=none"])
            copy.unlink()
            walls.append(t)
        return statistics.median(walls)


def rauc_figures(work: Path) -> dict[str, float]:
    script = ANCHORS / "rauc_baseline.sh"
    env = {**os.environ, "RUNS": "3", "VERITY": "0", "WORK": str(work / "anchors")}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = float(parts[1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="64,1024", help="payload sizes in MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeops-bench"))
    ap.add_argument("--no-rauc", action="store_true", help="skip the RAUC anchor")
    ap.add_argument("--against", type=Path, help="also install with the edgeops of this source tree")
    a = ap.parse_args()
    os.chdir(ROOT)
    bench = Bench(a.work, a.runs)
    lines: list[tuple[str, float, str]] = []
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    print(f"# edgeops install benchmark  ({os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"medians of {a.runs}, warm cache)")
    startup = statistics.median(run_measured(edgeops("help", "exit-codes")).wall for _ in range(5))
    print(f"# Python start-up of the CLI (imports included): {startup * 1000:.0f} ms, counted in "
          f"'edgeops'; 'excl. start-up' subtracts it")
    print(f"{'payload':>9} {'edgeops MiB/s':>14} {'excl. start-up':>15} {'limit MiB/s':>12} "
          f"{'ratio':>6} {'ratio excl.':>11} {'CPU s':>6} {'peak RSS MiB':>13}")
    for size in (int(s) for s in a.sizes.split(",")):
        image = a.work / f"image-{size}M.img"
        make_image(image, size)
        b = bench.bundle(image, f"raw-{size}M")
        trees = (ROOT, a.against.resolve()) if a.against else (ROOT,)
        ours, *before = bench.installs(b, size, trees)
        lim = bench.limit(b, image)
        tput, ltput = size / ours.wall, size / lim
        warm = size / max(ours.wall - startup, 1e-6)
        print(f"{size:>6}MiB {tput:>14.1f} {warm:>15.1f} {ltput:>12.1f} {tput / ltput:>6.2f} "
              f"{warm / ltput:>11.2f} {ours.cpu:>6.2f} {ours.rss_mib:>13.1f}")
        lines += [(f"edgeops_install_{size}M_throughput", tput, "MiB/s"),
                  (f"limit_{size}M_throughput", ltput, "MiB/s"),
                  (f"edgeops_install_{size}M_ratio_to_limit", tput / ltput, "x"),
                  (f"edgeops_install_{size}M_ratio_to_limit_excl_startup", warm / ltput, "x"),
                  (f"edgeops_install_{size}M_cpu", ours.cpu, "s"),
                  (f"edgeops_install_{size}M_peak_rss", ours.rss_mib, "MiB")]
        for old in before:
            print(f"{'':>9} before ({a.against}): {size / old.wall:.1f} MiB/s, {old.cpu:.2f} s CPU, "
                  f"{old.rss_mib:.1f} MiB; this tree / before = {old.wall / ours.wall:.2f}x")
            lines += [(f"edgeops_install_{size}M_speed_vs_before", old.wall / ours.wall, "x"),
                      (f"before_install_{size}M_cpu", old.cpu, "s"),
                      (f"before_install_{size}M_peak_rss", old.rss_mib, "MiB")]
        for f in (b, image):
            if size > 256:
                f.unlink(missing_ok=True)  # a GiB of scratch each: do not leave it behind
    if not a.no_rauc:
        if os.geteuid() != 0 or not (ANCHORS / "rauc_baseline.sh").exists():
            print("# RAUC anchor skipped (needs root and ../shared/anchors)")
        else:
            print("# running the RAUC 1.8 anchor on the same 256 MiB image (about a minute) ...")
            r = rauc_figures(a.work)
            image = a.work / "anchors" / "rootfs-256M.img"
            raw = bench.install(bench.bundle(image, "anchor-raw"), 256)
            zst = bench.install(bench.bundle(image, "anchor-zstd", compress=True), 256)
            rw = r["rauc_install_wall"]
            print(f"{'256 MiB anchor image':<28} {'install s':>9} {'MiB/s':>7} {'CPU s':>6} "
                  f"{'RSS MiB':>8} {'vs RAUC':>8}")
            rauc_cpu = r.get("rauc_install_cpu_total", float("nan"))
            print(f"{'RAUC 1.8 plain (squashfs)':<28} {rw:>9.2f} {256 / rw:>7.1f} {rauc_cpu:>6.2f} "
                  f"{r.get('rauc_install_peak_rss', float('nan')):>8.1f} {1.0:>8.2f}")
            for label, run in (("edgeops raw", raw), ("edgeops zstd", zst)):
                print(f"{label:<28} {run.wall:>9.2f} {256 / run.wall:>7.1f} {run.cpu:>6.2f} "
                      f"{run.rss_mib:>8.1f} {rw / run.wall:>8.2f}")
            lines += [("rauc_install_wall", rw, "s"), ("edgeops_raw_256M_install_wall", raw.wall, "s"),
                      ("edgeops_zstd_256M_install_wall", zst.wall, "s"),
                      ("edgeops_raw_speedup_vs_rauc", rw / raw.wall, "x"),
                      ("edgeops_zstd_speedup_vs_rauc", rw / zst.wall, "x")]
    print()
    for name, value, unit in lines:
        print(f"{name} {value:.3f} {unit}")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    sys.exit(main())
