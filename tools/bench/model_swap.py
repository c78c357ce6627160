#!/usr/bin/env python3
"""Benchmark: hot-swap a model 100 times while two threads run inference in a tight loop.

Prints failed predictions, the longest gap between two successful predictions,
p99 latency during swaps against steady state measured in the same run, and
memory (RSS) with one and with two interpreters loaded. Target (issue 6): zero
failures and the longest gap under 2x the steady-state p99.

    .venv/bin/python tools/bench/model_swap.py [--swaps 100] [--features 512]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from agent.adapters import tflite as validate  # noqa: E402
from agent.adapters.model_store import MODEL_FILE, ModelStore, VersionInfo  # noqa: E402
from agent.device.modelhost import ModelHost  # noqa: E402


def _tiny() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "tools" / "make_tiny_model.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WARMUP = 0.5  # seconds: first interpreter calls and thread start-up are not steady state


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def setup_store(root: Path, features: int) -> ModelStore:
    tiny = _tiny()
    store = ModelStore(root)
    for i, version in enumerate(("a", "b")):
        staging = store.stage("bench")
        (staging / MODEL_FILE).write_bytes(tiny.build(float(i + 1), in_features=features,
                                                      out_features=features))
        store.commit("bench", staging, VersionInfo(version, "good", time.time() + i, 0, ""))
    store.point("bench", "current", "a")
    return store


def rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def memory_figures(store: ModelStore) -> tuple[float, float, float]:
    data = store.model_path("bench", "a").read_bytes()
    validate.interpreter_class()  # import the runtime before the baseline
    base = rss_mib()
    one = validate.load(data)
    one_rss = rss_mib()
    two = validate.load(store.model_path("bench", "b").read_bytes())
    two_rss = rss_mib()
    del one, two
    return base, one_rss, two_rss


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        store = setup_store(Path(tmp), args.features)
        base, one_rss, two_rss = memory_figures(store)
        x = np.random.default_rng(1).standard_normal((1, args.features)).astype(np.float32)
        host = ModelHost(store.root, "bench", poll_interval=args.poll, pool_size=args.threads)
        done: list[list[tuple[float, float]]] = [[] for _ in range(args.threads)]
        failed = [0]
        stop = threading.Event()

        def client(i: int) -> None:
            log = done[i]
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    host.predict([x])
                except Exception:
                    failed[0] += 1
                    continue
                t1 = time.perf_counter()
                log.append((t1, t1 - t0))

        with host:
            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.threads)]
            for t in threads:
                t.start()
            time.sleep(WARMUP)
            steady_start = time.perf_counter()
            time.sleep(args.steady)
            swap_start = time.perf_counter()
            peak_rss = rss_mib()
            switch: list[float] = []  # link renamed -> predict() answers from the new model
            for n in range(args.swaps):
                target = "b" if n % 2 == 0 else "a"
                t0 = time.perf_counter()
                store.point("bench", "current", target)
                while host.version != target:
                    time.sleep(0.0005)
                switch.append(time.perf_counter() - t0)
                peak_rss = max(peak_rss, rss_mib())
                time.sleep(args.settle)
            swap_end = time.perf_counter()
            stop.set()
            for t in threads:
                t.join()
        report(done, failed[0], (steady_start, swap_start, swap_end), host.swaps, args,
               (base, one_rss, two_rss, peak_rss), switch)
    return 0


def longest_gap(ends: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(ends)), default=float("nan"))


def report(done: list[list[tuple[float, float]]], failed: int, phases: tuple[float, float, float],
           swaps: int, args: argparse.Namespace, mem: tuple[float, float, float, float],
           switch: list[float]) -> None:
    steady_start, swap_start, swap_end = phases
    events = sorted(e for log in done for e in log)
    steady = [lat for end, lat in events if steady_start <= end < swap_start]
    during = [lat for end, lat in events if swap_start <= end <= swap_end]
    gap = longest_gap([end for end, _ in events if swap_start <= end <= swap_end])
    # the same measure over a steady window after warm-up: what this machine does without swaps
    steady_gap = longest_gap([end for end, _ in events if steady_start <= end < swap_start])
    p99_steady, p99_swap = percentile(steady, 99), percentile(during, 99)
    base, one_rss, two_rss, peak = mem
    ms = 1000.0
    print(f"GIL switch interval {sys.getswitchinterval() * 1000:g} ms")
    print(f"model: fully-connected {args.features}x{args.features} float32 "
          f"({args.features * args.features * 4 / 2**20:.1f} MiB of weights), "
          f"{args.threads} inference threads, {swaps} swaps in {swap_end - swap_start:.2f} s "
          f"(steady window {swap_start - steady_start:.2f} s after {WARMUP:g} s warm-up)")
    print(f"predictions: {len(steady)} steady, {len(during)} during swaps, failed {failed}")
    print(f"p50 latency  steady {percentile(steady, 50) * ms:.3f} ms   "
          f"during swaps {percentile(during, 50) * ms:.3f} ms")
    print(f"p99 latency  steady {p99_steady * ms:.3f} ms   during swaps {p99_swap * ms:.3f} ms   "
          f"ratio {p99_swap / p99_steady:.2f}x")
    print(f"longest gap between two successful predictions: during swaps {gap * ms:.3f} ms, "
          f"steady {steady_gap * ms:.3f} ms (ratio {gap / steady_gap:.2f}x); "
          f"= {gap / p99_steady:.1f}x steady p99 (target < 2x)")
    print(f"swap (link renamed -> new model answering): p50 {percentile(switch, 50) * ms:.1f} ms, "
          f"max {max(switch) * ms:.1f} ms, loaded beside the serving model")
    print(f"RSS: runtime only {base:.1f} MiB, one interpreter {one_rss:.1f} MiB "
          f"(+{one_rss - base:.1f}), two {two_rss:.1f} MiB (+{two_rss - base:.1f}); "
          f"peak sampled during swaps {peak:.1f} MiB; ru_maxrss "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--swaps", type=int, default=100)
    ap.add_argument("--features", type=int, default=512, help="model is FEATURESxFEATURES")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steady", type=float, default=3.0,
                    help="seconds of steady state first (about as long as the swaps take)")
    ap.add_argument("--settle", type=float, default=0.02, help="seconds between swaps")
    ap.add_argument("--poll", type=float, default=0.005, help="ModelHost poll interval")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval (s): how long a Python thread keeps the GIL")
    args = ap.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
