#!/usr/bin/env python3
"""Install time of edgeops against the machine's limit, measured alternately in one run, and RAUC's.

  limit    what one serial pass costs here: `openssl dgst -sha256 BUNDLE` then
           `dd if=IMAGE of=COPY bs=1M conv=fsync` (read + SHA-256 + write with fsync)
  edgeops  `edgeops install BUNDLE` into a fresh file-backed sim slot: Python start-up,
           signature check, per-block verification, write and fsync included
  RAUC     ../shared/anchors/rauc_baseline.sh (RAUC 1.8, plain bundle) on the 256 MiB anchor
           image, with this run's limit for that image beside it (needs root)

For each size the raw install, the zstd install and the limit take turns, run by run, so a
neighbour's load hits all three alike; each figure is the best of --runs. The whole
measurement is done twice (--rounds) and every ratio is printed with its spread over the
rounds (min-max). ratio = limit wall / install wall (above 1: faster than the limit).
Warm page cache. edgeops runs as a device runs it (--via wheel, the default): this tree's
wheel, byte-compiled by pip, in a fresh venv whose only other path is this environment's
site-packages for the dependencies (a .pth line, as the image's vendored wheels). The
checkout's editable install adds its import hook to every start, ~0.02 s here, which no
device pays; --via checkout measures that instead (byte-compiled first). Output: a table,
then one `name value unit` line per figure for scripts.
Usage: tools/bench/install.py [--sizes 64,256,1024] [--runs 5] [--rounds 2] [--no-rauc]
                              [--via wheel|checkout] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import install_wheel  # the sibling bench's wheel in a fresh venv

ROOT = Path(__file__).resolve().parents[2]
# the anchors live in the shared tree beside the checkout (or beside the worktrees' parent)
ANCHORS = next((p / "shared" / "anchors" for p in ROOT.parents if (p / "shared" / "anchors").is_dir()),
               ROOT.parent / "shared" / "anchors")
MIB = 1 << 20


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    rss_mib: float


def run_measured(cmd: list[str], tree: Path | None = ROOT, out: int | None = subprocess.DEVNULL) -> Run:
    """Run ``cmd`` from ``tree`` (on its PYTHONPATH; None: neither, for an installed edgeops)
    and measure it: wall, the child's CPU (user + sys, os.wait4) and its peak RSS; it must
    succeed. tools/bench/install_fixed.py measures the same way."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, cwd=tree, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def edgeops(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *map(str, args)]


def best(runs: list[Run]) -> Run:
    return Run(min(r.wall for r in runs), min(r.cpu for r in runs), max(r.rss_mib for r in runs))


def make_image(path: Path, size_mib: int) -> None:
    if path.exists() and path.stat().st_size == size_mib * MIB:
        return
    subprocess.run([sys.executable, str(ANCHORS / "mkimage.py"), str(path), str(size_mib)],
                   check=True, stdout=subprocess.DEVNULL)


class Bench:
    def __init__(self, work: Path, runs: int, installed: Path | None) -> None:
        """``installed``: the bin/ of an installed edgeops to measure; None: this checkout."""
        self.work = work
        self.runs = runs
        self.installed = installed
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "root" / "root.crt").exists():
            shutil.rmtree(work / "root", ignore_errors=True)
            shutil.rmtree(work / "signer", ignore_errors=True)
            subprocess.run(edgeops("keys", "init-root", "--out", work / "root"), check=True,
                           stdout=subprocess.DEVNULL, cwd=ROOT)
            subprocess.run(edgeops("keys", "issue-signer", "--root", work / "root", "--out",
                                   work / "signer"), check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        self.tiny = work / "tiny.img"
        self.tiny.write_bytes(b"v1" * 512)

    def bundle(self, image: Path, name: str, compress: bool) -> Path:
        out = self.work / f"{name}.bundle"
        if not out.exists() or out.stat().st_mtime < image.stat().st_mtime:
            subprocess.run(edgeops(
                "bundle", "create", "--key", self.work / "signer/signer.key", "--cert",
                self.work / "signer/signer.crt", "--compatible", "edgeops-sim", "--version", "2.0",
                "--security-version", "1", "--payload", f"rootfs={image}",
                "--compress", "zstd" if compress else "none", "-o", out), check=True,
                stdout=subprocess.DEVNULL, cwd=ROOT)
        return out

    def install(self, bundle: Path, slot_mib: int) -> Run:
        dev = self.work / "device"
        shutil.rmtree(dev, ignore_errors=True)
        subprocess.run(edgeops("sim", "init", dev, "--image", self.tiny, "--keyring",
                               self.work / "root/root.crt", "--slot-size", f"{slot_mib}M"),
                       check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        args = ("install", bundle, "--config", dev / "agent.toml", "--progress", "never")
        if self.installed is None:
            run = run_measured(edgeops(*args))
        else:
            run = run_measured([str(self.installed / "edgeops"), *map(str, args)], tree=None)
        shutil.rmtree(dev, ignore_errors=True)  # the next writer starts from a fresh, sparse slot
        return run

    def limit(self, bundle: Path, image: Path) -> Run:
        copy = self.work / "copy.img"
        copy.unlink(missing_ok=True)
        a = run_measured(["openssl", "dgst", "-sha256", str(bundle)])
        b = run_measured(["dd", f"if={image}", f"of={copy}", "bs=1M", "conv=fsync", "status=none"])
        copy.unlink()
        return Run(a.wall + b.wall, a.cpu + b.cpu, max(a.rss_mib, b.rss_mib))

    def size(self, size: int, runs_per_round: int) -> dict[str, Run]:
        """One round for one size: raw, zstd and the limit taking turns; best of each."""
        image = self.work / f"image-{size}M.img"
        raw = self.bundle(image, f"raw-{size}M", compress=False)
        zst = self.bundle(image, f"zstd-{size}M", compress=True)
        got: dict[str, list[Run]] = {"raw": [], "zstd": [], "limit": []}
        for _ in range(runs_per_round):
            got["raw"].append(self.install(raw, size))
            got["limit"].append(self.limit(raw, image))
            got["zstd"].append(self.install(zst, size))
        return {k: best(v) for k, v in got.items()}


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


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
    ap.add_argument("--sizes", default="64,256,1024", help="payload sizes in MiB")
    # 5, as #18's own figures were taken: on a box whose timings drift by +-10 % within the
    # hour (docs/performance.md, section 8), the best of 3 was often no run left undisturbed
    ap.add_argument("--runs", type=int, default=5, help="best of this many per round")
    ap.add_argument("--rounds", type=int, default=2, help="whole measurements, for the spread")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeops-bench"))
    ap.add_argument("--no-rauc", action="store_true", help="skip the RAUC anchor")
    ap.add_argument("--via", choices=["wheel", "checkout"], default="wheel",
                    help="measure this tree's wheel in a fresh venv, as a device runs it "
                         "(default), or the checkout with its editable install")
    a = ap.parse_args()
    if a.runs < 1 or a.rounds < 1:
        ap.error("--runs and --rounds must be at least 1")
    sizes = [int(s) for s in a.sizes.split(",")]
    # A device runs byte-compiled modules (pip and Debian packages compile them at install);
    # with PYTHONDONTWRITEBYTECODE set, as here, every start would compile the agent anew.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "agent")], check=True)
    installed = install_wheel(a.work / "wheel", deps=True) if a.via == "wheel" else None
    bench = Bench(a.work, a.runs, installed)
    for size in sizes:
        make_image(a.work / f"image-{size}M.img", size)
    print(f"# edgeops install benchmark ({os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"best of {a.runs} alternating with the limit, {a.rounds} rounds, warm cache, "
          f"{'the wheel in a fresh venv' if installed else 'the checkout'})")
    rounds: dict[int, list[dict[str, Run]]] = {s: [] for s in sizes}
    for _ in range(a.rounds):
        for size in sizes:
            rounds[size].append(bench.size(size, a.runs))
    lines: list[tuple[str, float, str]] = []
    print(f"{'payload':>8} {'limit s':>8} {'raw s':>7} {'zstd s':>7} {'raw/limit':>10} "
          f"{'zstd/limit':>11} {'zstd/raw':>9} {'CPU raw/zstd s':>15} {'RSS raw/zstd MiB':>17}")
    for size in sizes:
        rs = rounds[size]
        r_raw = [r["limit"].wall / r["raw"].wall for r in rs]
        r_zst = [r["limit"].wall / r["zstd"].wall for r in rs]
        z_raw = [r["raw"].wall / r["zstd"].wall for r in rs]
        last = rs[-1]
        rss_raw, rss_zst = max(r["raw"].rss_mib for r in rs), max(r["zstd"].rss_mib for r in rs)
        print(f"{size:>5}MiB {spread([r['limit'].wall for r in rs]):>8} "
              f"{spread([r['raw'].wall for r in rs]):>7} {spread([r['zstd'].wall for r in rs]):>7} "
              f"{spread(r_raw):>10} {spread(r_zst):>11} {spread(z_raw):>9} "
              f"{last['raw'].cpu:>7.2f}/{last['zstd'].cpu:<7.2f} {rss_raw:>8.1f}/{rss_zst:<8.1f}")
        lines += [(f"edgeops_raw_{size}M_ratio_to_limit_min", min(r_raw), "x"),
                  (f"edgeops_raw_{size}M_ratio_to_limit_max", max(r_raw), "x"),
                  (f"edgeops_zstd_{size}M_ratio_to_limit_min", min(r_zst), "x"),
                  (f"edgeops_zstd_{size}M_ratio_to_limit_max", max(r_zst), "x"),
                  (f"edgeops_zstd_{size}M_ratio_to_raw_min", min(z_raw), "x"),
                  (f"edgeops_zstd_{size}M_ratio_to_raw_max", max(z_raw), "x"),
                  (f"edgeops_raw_{size}M_peak_rss", rss_raw, "MiB"),
                  (f"edgeops_zstd_{size}M_peak_rss", rss_zst, "MiB")]
    rauc = "NA"
    if a.no_rauc:
        why = "skipped (--no-rauc)"
    elif os.geteuid() != 0 or not (ANCHORS / "rauc_baseline.sh").exists():
        why = "skipped: needs root and ../shared/anchors/rauc_baseline.sh"
    else:
        try:
            r = rauc_figures(a.work)
        except (RuntimeError, OSError) as exc:
            why = f"could not run here: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
        else:
            image = a.work / "anchors" / "rootfs-256M.img"
            b = bench.bundle(image, "anchor-raw", compress=False)
            lim = best([bench.limit(b, image) for _ in range(a.runs)])
            ours = best([bench.install(b, 256) for _ in range(a.runs)])
            rw = r["rauc_install_wall"]
            rauc = f"{lim.wall / rw:.2f}"
            why = (f"RAUC 1.8 install {rw:.2f} s (median of 3, its service already running), "
                   f"limit {lim.wall:.2f} s, edgeops raw {ours.wall:.2f} s "
                   f"-> edgeops/limit {lim.wall / ours.wall:.2f}, RAUC/limit {rauc}")
            lines += [("rauc_256M_ratio_to_limit", lim.wall / rw, "x"),
                      ("edgeops_raw_anchor256M_ratio_to_limit", lim.wall / ours.wall, "x")]
    print(f"# RAUC ratio to the limit (256 MiB anchor image): {rauc}; {why}")
    # the load while measuring, not only before: a neighbour that started meanwhile shows here
    print(f"# load at the end {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
    print()
    for name, value, unit in lines:
        print(f"{name} {value:.3f} {unit}")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    sys.exit(main())
