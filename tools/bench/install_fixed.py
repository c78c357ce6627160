#!/usr/bin/env python3
"""The fixed cost of `edgeops install`: a 1 MiB raw bundle, so the payload is noise.

Runs this checkout's install and, with --against DIR, another tree's (for example
`git archive main | tar -x -C /tmp/base`) alternately, --runs times each, each into a
fresh sim device, and prints the median and minimum of wall time and of CPU time (user +
sys of the child, os.wait4), the peak RSS, and the ratios after/before of the medians.
Both trees are byte-compiled first (a device runs compiled modules; with
PYTHONDONTWRITEBYTECODE set, as here, each start would compile them again) and run on
this Python, with PYTHONPATH set to the tree. docs/performance.md, section 5, has figures.
Usage: tools/bench/install_fixed.py [--against DIR] [--runs 10] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from install import Run, run_measured  # noqa: E402 (the sibling bench's one way to measure a child)


def edgeops(tree: Path, *args: str | Path, out: int | None = subprocess.DEVNULL) -> Run:
    """Run ``edgeops ARGS`` from ``tree`` and measure it (it must succeed)."""
    return run_measured([sys.executable, "-m", "agent.cli", *map(str, args)], tree, out)


def prepare(work: Path) -> Path:
    """Keys, a 1 MiB image and its raw bundle (made once, by this checkout)."""
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "raw-1M.bundle"
    if bundle.exists():
        return bundle
    edgeops(ROOT, "keys", "init-root", "--out", work / "root")
    edgeops(ROOT, "keys", "issue-signer", "--root", work / "root", "--out", work / "signer")
    (work / "image-1M.img").write_bytes(os.urandom(1 << 20))
    (work / "tiny.img").write_bytes(b"v1" * 512)
    edgeops(ROOT, "bundle", "create", "--key", work / "signer/signer.key", "--cert",
            work / "signer/signer.crt", "--compatible", "edgeops-sim", "--version", "2.0",
            "--security-version", "1", "--payload", f"rootfs={work / 'image-1M.img'}",
            "--compress", "none", "-o", bundle)
    return bundle


def install(tree: Path, work: Path, bundle: Path) -> Run:
    dev = work / "device"
    shutil.rmtree(dev, ignore_errors=True)
    edgeops(tree, "sim", "init", dev, "--image", work / "tiny.img", "--keyring",
            work / "root/root.crt", "--slot-size", "8M")
    return edgeops(tree, "install", bundle, "--config", dev / "agent.toml", "--progress", "never")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another tree to run alternately (before)")
    ap.add_argument("--runs", type=int, default=10, help="runs of each tree (default 10)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeops-bench-fixed"))
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    trees = {"this": ROOT, **({"against": a.against.resolve()} if a.against else {})}
    for tree in trees.values():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "agent")], check=True)
    bundle = prepare(a.work)
    runs: dict[str, list[Run]] = {name: [] for name in trees}
    load = os.getloadavg()[0]
    for _ in range(a.runs):  # alternately, so a neighbour's burst hits both alike
        for name, tree in trees.items():
            runs[name].append(install(tree, a.work, bundle))
    print(f"# fixed cost of an install (1 MiB raw bundle), {a.runs} alternating runs each, "
          f"load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, rs in runs.items():
        w, c = [r.wall for r in rs], [r.cpu for r in rs]
        print(f"{name:>8} {trees[name]}: wall median {statistics.median(w):.3f} s (min {min(w):.3f}), "
              f"CPU median {statistics.median(c):.3f} s (min {min(c):.3f}), "
              f"peak RSS {max(r.rss_mib for r in rs):.1f} MiB")
    if "against" in runs:
        this, other = runs["this"], runs["against"]

        def ratio(pick: str) -> float:
            return (statistics.median(getattr(r, pick) for r in this)
                    / statistics.median(getattr(r, pick) for r in other))

        print(f"this/against (medians): CPU {ratio('cpu'):.2f}, wall {ratio('wall'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
