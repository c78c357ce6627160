#!/usr/bin/env python3
"""Delta-update benchmark on the anchors' corpus: edgeops' delta next to full zstd -19, xdelta3 and casync.

Corpus: ``../shared/anchors/delta/run.sh`` (v1, v2 of a Debian bookworm rootfs as ext4 and
squashfs) and ``tools/bench/delta_v3.sh`` (a third release, v3). For each image type it
builds, in this run, the delta-capable bundles (v2 against v1; v3 against v2 and v1), then
installs each on a sim device that holds the older image in its active slot, over a real
HTTP server on 127.0.0.1 that answers multi-range requests, in a child process whose peak
RSS is measured; the written slot is compared with the new image byte for byte. Baselines
measured in the same run: ``zstd -19 -T2`` of the new image, ``xdelta3 -e -9 -S djw`` for
the same pair. casync's figures (v1 -> v2 only) are read from the anchors' results file.

One line per measurement (``#`` lines are comments):
    method image pair bytes ratio_vs_full_zstd requests decode_s out_MiB_s peak_rss_mb
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from agent.adapters.download import Origin, new_session
from agent.adapters.range_fetch import RangeFetcher
from agent.core.config import load
from agent.device import delta
from agent.device.updater import Updater, open_device
up = Updater(open_device(load(Path(sys.argv[2]))))
f = RangeFetcher(new_session(), Origin(sys.argv[3]), sys.argv[3], size=int(sys.argv[4]))
# The modules the install imports lazily (signature and trust checks), loaded before the clock
# starts, as in a resident agent: the decode rate is then not Python's start-up. Their import
# time is reported on its own ("import_s"), and any module the install still imports is counted.
t = time.perf_counter()
import cryptography.x509
from agent.adapters import rot, truststore, witness
from agent.core import fixups, plan, signer, trust
from agent.device import journal_guard
imports = time.perf_counter() - t
before = set(sys.modules)
t = time.perf_counter()
result, stats = delta.install(up, f)
dt = time.perf_counter() - t
late = len(set(sys.modules) - before)
# VmHWM: this process's own peak RSS (a forked child's ru_maxrss also counts the parent's
# pages it was forked from, on Linux)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"slot": result.slot, "decode_s": dt, "line": stats.line(), "mode": stats.mode,
                  "received": stats.received, "requests": stats.requests, "rss": hwm / 1024,
                  "import_s": imports, "late_imports": late}))
"""


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def emit(method: str, image: str, pair: str, nbytes: int | None, full: int, requests: object = "NA",
         decode_s: object = "NA", mibs: object = "NA", rss: object = "NA") -> None:
    ratio = f"{nbytes / full:.4f}" if nbytes is not None else "NA"
    print(f"{method} {image} {pair} {nbytes if nbytes is not None else 'NA'} {ratio} {requests} "
          f"{decode_s} {mibs} {rss}", flush=True)


def zstd19(path: Path) -> int:
    out = subprocess.run(["zstd", "-19", "-T2", "-c", str(path)], capture_output=True, check=True)
    return len(out.stdout)


def xdelta3(old: Path, new: Path, work: Path) -> tuple[int, float] | None:
    if shutil.which("xdelta3") is None:
        return None
    patch = work / "x.vcdiff"
    subprocess.run(["xdelta3", "-e", "-9", "-S", "djw", "-f", "-s", str(old), str(new), str(patch)],
                   check=True)
    t = time.perf_counter()
    subprocess.run(["xdelta3", "-d", "-f", "-s", str(old), str(patch), str(work / "x.out")], check=True)
    dt = time.perf_counter() - t
    same = _sha(work / "x.out") == _sha(new)
    n = patch.stat().st_size
    patch.unlink()
    (work / "x.out").unlink()
    return (n, dt) if same else None


def _sha(path: Path, n: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n if n is not None else -1
        while left:
            b = f.read(1 << 20 if left < 0 else min(1 << 20, left))
            if not b:
                break
            h.update(b)
            if left > 0:
                left -= len(b)
    return h.hexdigest()


def anchors(results: Path) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            f = line.split()
            if len(f) >= 3 and not line.startswith("#") and f[2].isdigit():
                out[(f[0], f[1])] = int(f[2])
    return out


def build(new: Path, version: str, bases: list[tuple[str, Path]], out: Path, keydir: Path,
          avg: int) -> float:
    from agent.host import bundle_writer, delta_writer, keys

    t = time.perf_counter()
    built = delta_writer.build(new, [delta_writer.BaseImage(v, p) for v, p in bases],
                               out.with_suffix(".stored"), avg=avg)
    bundle_writer.create(out, sign=keys.load_signing_key(keydir / "signer" / "signer.key").sign,
                         chain_pem=(keydir / "signer" / "signer.crt").read_bytes(),
                         compatible="edgeops-sim", version=version, security_version=1,
                         build_time=int(time.time()),
                         sources=[bundle_writer.PayloadSource(
                             "rootfs", "rootfs", new, stored=built.stored,
                             installed=(built.size, built.sha256), meta=delta_writer.meta_for(built))])
    out.with_suffix(".stored").unlink()
    dt = time.perf_counter() - t
    log(f"built {out.name}: {out.stat().st_size} bytes, {built.chunks} chunks, index "
        f"{built.index_bytes} B, copies {built.copies}, patches {built.patches}, runs {built.runs} "
        f"({built.patch_bytes} B), {dt:.1f} s")
    return dt


def device_run(old: Path, old_version: str, new: Path, bundle: Path, keydir: Path, work: Path
               ) -> dict[str, object] | None:
    from agent.host import sim
    from tests import rangeserver

    dev = work / f"dev-{old.name}"
    shutil.rmtree(dev, ignore_errors=True)
    size = new.stat().st_size
    sim.init_device(dev, image=old, keyring=keydir / "root" / "root.crt", version=old_version,
                    slot_size=max(size, old.stat().st_size))
    state = rangeserver.Served({"/b": bundle})
    with rangeserver.serve(state) as url:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(dev / "agent.toml"),
                                 url + "/b", str(bundle.stat().st_size)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
    if proc.returncode != 0:
        log(f"device run failed: {err[-800:]}")
        return None
    res = json.loads(out.strip().splitlines()[-1])
    from agent.core.config import load

    slot = load(dev / "agent.toml").slots[res["slot"]]["rootfs"]
    if _sha(Path(slot), size) != _sha(new):
        log("device slot does NOT match the new image; not reported")
        return None
    res.update(served=state.body_bytes, server_requests=state.requests)
    shutil.rmtree(dev, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path(os.environ.get("D", "/tmp/delta")))
    ap.add_argument("--images", default="ext4,sqfs")
    ap.add_argument("--avg", type=int, default=0, help="average chunk size (default: the writer's)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--device-only", nargs=4, metavar=("BUNDLE", "OLD", "OLD_VERSION", "NEW"),
                    help="only the device side, for a bundle built before (signed by --keys)")
    ap.add_argument("--keys", type=Path, help="with --device-only: the dir holding root/root.crt")
    a = ap.parse_args()
    if a.device_only:
        bundle, old, old_version, new = a.device_only
        work = a.work or Path(tempfile.mkdtemp(prefix="delta-dev-", dir=a.corpus))
        res = device_run(Path(old), old_version, Path(new), Path(bundle), a.keys, work)
        if res is None:
            return 1
        dt = float(res["decode_s"])  # type: ignore[arg-type]
        mibs = Path(new).stat().st_size / (1 << 20) / dt
        print(f"edgeops-delta-device {Path(new).name} {Path(old).name}->{Path(new).name} "
              f"{res['served']} NA {res['server_requests']} {dt:.2f} {mibs:.0f} {res['rss']:.1f}")
        log(f"imports before the clock {float(res['import_s']):.2f} s, "  # type: ignore[arg-type]
            f"{res['late_imports']} modules imported during the install")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    from agent.host import delta_writer, keys

    img = a.corpus / "img"
    if not (img / "v1.ext4").exists():
        print("no corpus: run ../shared/anchors/delta/run.sh (and tools/bench/delta_v3.sh)",
              file=sys.stderr)
        return 2
    work = a.work or Path(tempfile.mkdtemp(prefix="delta-bench-", dir=a.corpus))
    work.mkdir(parents=True, exist_ok=True)
    keydir = work / "keys"
    if not keydir.exists():
        keys.init_root(keydir / "root")
        keys.issue_signer(keydir / "root", keydir / "signer")
    avg = a.avg or delta_writer.AVG_CHUNK
    anc = anchors(a.corpus / "results" / "results.txt")
    log("method image pair bytes ratio_vs_full_zstd requests decode_s out_MiB_s peak_rss_mb")
    log(f"chunk avg {avg} B; xdelta3 and full zstd -19 measured in this run; casync read from "
        f"{a.corpus / 'results' / 'results.txt'} (v1->v2 only)")
    for kind in a.images.split(","):
        releases = [v for v in ("v1", "v2", "v3") if (img / f"{v}.{kind}").exists()]
        versions = {"v1": "1.0", "v2": "1.1", "v3": "1.2"}
        jobs: list[tuple[str, list[str]]] = [("v2", ["v1"])]
        if "v3" in releases:
            jobs.append(("v3", ["v2", "v1"]))
        else:
            log(f"{kind}: no v3 (tools/bench/delta_v3.sh): no 'two steps older' figure")
        for new_v, base_vs in jobs:
            new = img / f"{new_v}.{kind}"
            full = zstd19(new)
            emit("full-zstd19", kind, new_v, full, full)
            bundle = work / f"{new_v}.{kind}.bundle"
            enc = build(new, versions[new_v], [(versions[b], img / f"{b}.{kind}") for b in base_vs],
                        bundle, keydir, avg)
            emit("edgeops-bundle-full-download", kind, new_v, bundle.stat().st_size, full, 1)
            for b in base_vs:
                pair = f"{b}->{new_v}"
                old = img / f"{b}.{kind}"
                xd = xdelta3(old, new, work)
                if xd is not None:
                    emit("xdelta3-9-djw", kind, pair, xd[0], full, 1, f"{xd[1]:.2f}")
                for cas in ("casync-16k", "casync-4k"):
                    if pair == "v1->v2" and (cas, kind) in anc:
                        emit(cas + "(anchors)", kind, pair, anc[(cas, kind)], full)
                info = delta_writer.delta_info(bundle, old)
                res = device_run(old, versions[b], new, bundle, keydir, work)
                if res is None:
                    emit("edgeops-delta", kind, pair, None, full)
                    continue
                size_mib = new.stat().st_size / (1 << 20)
                dt = float(res["decode_s"])  # type: ignore[arg-type]
                emit("edgeops-delta", kind, pair, int(res["served"]), full,  # type: ignore[call-overload]
                     res["server_requests"], f"{dt:.2f}", f"{size_mib / dt:.0f}", f"{res['rss']:.1f}")
                emit("edgeops-delta-single-range(delta-info)", kind, pair, info.download_bytes_single,
                     full, info.requests_single)
                log(f"  {pair}: {res['line']}; delta-info predicted {info.download_bytes} B; "
                    f"encode {enc:.1f} s for the bundle; imports before the clock "
                    f"{float(res['import_s']):.2f} s, {res['late_imports']} modules imported during it")
    log(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
