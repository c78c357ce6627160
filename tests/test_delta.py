"""Delta installs over real HTTP on 127.0.0.1: verified before written, resumable, same as a full install."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.download import DownloadPolicy, Origin, new_session
from agent.adapters.range_fetch import RangeFetcher, RangeUnsupported
from agent.core import delta_index as dx
from agent.core.config import load
from agent.device import delta
from agent.device.updater import Updater, open_device
from agent.errors import HashMismatch
from agent.host import bundle_writer, delta_writer, keys, sim
from tests import rangeserver
from tests.conftest import Keys, run_cli

ROOT = Path(__file__).resolve().parent.parent
SIZE = 1 << 20


def _image(seed: int, n: int = SIZE) -> bytes:
    r = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += r.randbytes(64) * r.randint(1, 8)
    return bytes(out[:n])


def _v2(v1: bytes) -> bytes:
    """v1 with an edit in place, an insertion that shifts what follows, and new random data."""
    b = bytearray(v1)
    b[100_000:100_016] = b"changed in place"
    b[400_000:400_000] = b"inserted" * 2000
    b[700_000:760_000] = random.Random(99).randbytes(60_000)
    return bytes(b[:SIZE])


def _world(pki: Keys, tmp_path: Path, *, runs: bool = True) -> dict[str, Any]:
    tmp_path = tmp_path / ("w2" if runs else "w1")  # both fixtures in one test stay apart
    tmp_path.mkdir()
    v1 = _image(1)
    v2 = _v2(v1)
    (tmp_path / "v1.img").write_bytes(v1)
    (tmp_path / "v2.img").write_bytes(v2)
    built = delta_writer.build(tmp_path / "v2.img", [delta_writer.BaseImage("1.0", tmp_path / "v1.img")],
                               tmp_path / "stored", avg=16384, runs=runs)
    bundle = tmp_path / "v2.bundle"
    bundle_writer.create(bundle, sign=keys.load_signing_key(pki.signer_key).sign,
                         chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim",
                         version="2.0", security_version=1, build_time=int(time.time()),
                         sources=[bundle_writer.PayloadSource(
                             "rootfs", "rootfs", tmp_path / "v2.img", stored=built.stored,
                             installed=(built.size, built.sha256), meta=delta_writer.meta_for(built))])
    return {"v1": v1, "v2": v2, "bundle": bundle, "built": built, "tmp": tmp_path, "pki": pki}


@pytest.fixture
def world(pki: Keys, tmp_path: Path) -> dict[str, Any]:
    """v2 against v1 as ``bundle create`` makes it: index format 2, with run patches."""
    return _world(pki, tmp_path)


@pytest.fixture
def world_v1(pki: Keys, tmp_path: Path) -> dict[str, Any]:
    """The same release with an index of format 1 (one chunk per patch, plain frames fetched)."""
    return _world(pki, tmp_path, runs=False)


def _device(world: dict[str, Any], name: str) -> Path:
    d = world["tmp"] / name
    sim.init_device(d, image=world["tmp"] / "v1.img", keyring=world["pki"].root_crt, version="1.0",
                    slot_size=2 << 20)
    return d


def _slot(dev: Path, slot: str, n: int = SIZE) -> bytes:
    with open(load(dev / "agent.toml").slots[slot]["rootfs"], "rb") as f:
        return f.read(n)


def _run(dev: Path, url: str, size: int, **kw: Any) -> tuple[Any, delta.DeltaStats]:
    device = open_device(load(dev / "agent.toml"))
    try:
        up = Updater(device, sleep=lambda s: None)
        fetcher = RangeFetcher(new_session(), Origin(url), url + "/b", size=size,
                               policy=DownloadPolicy(backoff=0.0))
        return delta.install(up, fetcher, **kw)
    finally:
        device.close()


def _serve(world: dict[str, Any], **kw: Any) -> rangeserver.Served:
    return rangeserver.Served({"/b": world["bundle"]}, **kw)


def _index(world: dict[str, Any]) -> dx.DeltaIndex:
    import zstandard

    stored = world["built"].stored.read_bytes()
    n = dx.index_frame_length(stored[:12])
    body = zstandard.ZstdDecompressor().decompress(stored[12:n], max_output_size=dx.MAX_INDEX_BYTES)
    return dx.decode(body, size=SIZE, data_size=len(stored) - n)


def test_a_delta_install_writes_the_same_slot_as_a_full_install(world: dict[str, Any]) -> None:
    full, by_delta = _device(world, "full"), _device(world, "delta")
    run_cli("install", world["bundle"], "--config", full / "agent.toml", check=True)
    state = _serve(world)
    with rangeserver.serve(state) as url:
        result, stats = _run(by_delta, url, world["bundle"].stat().st_size)
    assert result.slot == "B" and stats.mode == "delta"
    assert _slot(by_delta, "B") == _slot(full, "B") == world["v2"]
    assert state.body_bytes < 0.6 * world["bundle"].stat().st_size, stats.line()


def test_a_server_answering_one_range_per_request_still_gets_few_requests(world: dict[str, Any]) -> None:
    dev = _device(world, "dev")
    state = _serve(world, multi=False)
    with rangeserver.serve(state) as url:
        _, stats = _run(dev, url, world["bundle"].stat().st_size)
    assert _slot(dev, "B") == world["v2"]
    assert state.requests <= delta.BUDGET + 4 and stats.requests == state.requests


def _covered(op: dx.Op) -> range:
    return range(op.chunk, op.last + 1) if isinstance(op, dx.Patch) else range(op.chunk, op.chunk + 1)


def _tamper_refused(world: dict[str, Any], tmp_path: Path, chunk: int, at: int, match: str) -> None:
    """Flip a byte ``at`` bytes after the data origin; the install stops with ``match`` and
    chunk ``chunk``'s bytes in the target slot are what they were."""
    index = _index(world)
    raw = bytearray(world["bundle"].read_bytes())
    stored = world["built"].stored.read_bytes()
    data_at = raw.find(stored[:4096])
    raw[data_at + dx.index_frame_length(stored[:12]) + at] ^= 0xFF
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(bytes(raw))
    dev = _device(world, "dev")
    before = _slot(dev, "B", 2 << 20)
    with rangeserver.serve(rangeserver.Served({"/b": bad})) as url, \
            pytest.raises(HashMismatch, match=match):
        _run(dev, url, bad.stat().st_size)
    after = _slot(dev, "B", 2 << 20)
    a, n = index.offsets()[chunk], index.chunks[chunk].length
    assert after[a:a + n] == before[a:a + n]
    status = _status(dev)
    assert status["slots"]["B"]["state"] != "trial" and status["booted_slot"] == "A"


def test_a_tampered_fetched_chunk_is_refused_before_it_is_written(world_v1: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    index = _index(world_v1)
    local = {k for op in index.bases[0].ops for k in _covered(op)}
    fetched = next(i for i in range(len(index.chunks)) if i not in local)
    _tamper_refused(world_v1, tmp_path, fetched, index.frame_offsets()[fetched] + 3,
                    f"chunk {fetched} ")


def test_a_tampered_run_patch_is_refused_before_any_of_its_chunks_is_written(
        world: dict[str, Any], tmp_path: Path) -> None:
    index = _index(world)
    run = next(op for op in index.bases[0].ops if isinstance(op, dx.Patch) and op.count > 1)
    _tamper_refused(world, tmp_path, run.last, run.offset + run.length // 2,
                    f"patch for chunk {run.chunk} ")


def test_an_index_of_format_1_still_installs_by_delta(world_v1: dict[str, Any]) -> None:
    stored = world_v1["built"].stored.read_bytes()
    assert stored[8:12] == dx.MAGIC
    dev = _device(world_v1, "dev")
    with rangeserver.serve(_serve(world_v1)) as url:
        _, stats = _run(dev, url, world_v1["bundle"].stat().st_size)
    assert stats.mode == "delta" and stats.fetched > 0
    assert _slot(dev, "B") == world_v1["v2"]


def test_run_patches_download_less_than_one_frame_per_chunk(world: dict[str, Any],
                                                            world_v1: dict[str, Any]) -> None:
    assert world["built"].stored.read_bytes()[8:12] == dx.MAGIC2 and world["built"].runs["1.0"]
    got = []
    for w in (world, world_v1):
        dev = _device(w, "dev-" + w["bundle"].parent.name)
        state = _serve(w)
        with rangeserver.serve(state) as url:
            _run(dev, url, w["bundle"].stat().st_size)
        assert _slot(dev, "B") == w["v2"]
        got.append(state.body_bytes)
    assert got[0] < got[1]


def test_only_a_single_range_server_gets_ranges_coalesced_to_the_budget(
        world_v1: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delta, "BUDGET", 2)  # fewer than the world's spans
    monkeypatch.setattr(delta, "GAP", 0)
    got = {}
    for multi in (True, False):
        dev = _device(world_v1, f"dev-{multi}")
        state = _serve(world_v1, multi=multi)
        with rangeserver.serve(state) as url:
            _run(dev, url, world_v1["bundle"].stat().st_size)
        assert _slot(dev, "B") == world_v1["v2"]
        got[multi] = (state.body_bytes, state.requests)
    assert got[True][0] < got[False][0]  # no gap filler for the multi-range server
    assert got[False][1] <= 2 + delta.PROBE + 2  # head, index, probe, the budget


def test_many_tiny_ranges_come_back_exact_from_one_multi_range_request(tmp_path: Path) -> None:
    blob = random.Random(5).randbytes(5000)
    (tmp_path / "f").write_bytes(blob)
    wanted = [(i, i + 1 + i % 3) for i in range(0, 4000, 37)] + [(4999, 5000)]
    state = rangeserver.Served({"/f": tmp_path / "f"})
    with rangeserver.serve(state) as url:
        f = RangeFetcher(new_session(), Origin(url), url + "/f", size=len(blob))
        got = [p.read(p.end - p.start) for p in f.fetch(wanted[:100])]
        got += [p.read(p.end - p.start) for p in f.fetch(wanted[100:])]
    assert got == [blob[a:b] for a, b in wanted] and f.multi is True and state.requests == 2


def _status(dev: Path) -> dict[str, Any]:
    device = open_device(load(dev / "agent.toml"))
    try:
        return Updater(device).status()
    finally:
        device.close()


def test_a_modified_active_slot_still_ends_with_exactly_the_new_image(world: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    dev = _device(world, "dev")
    slot_a = load(dev / "agent.toml").slots["A"]["rootfs"]
    with open(slot_a, "r+b") as f:  # someone edited the running root fs outside edgeops
        for off in range(0, SIZE, 150_000):
            f.seek(off)
            f.write(b"tampered" * 64)
    index = _index(world)
    offsets = index.offsets()
    by_offset = {offsets[i]: c.sha256 for i, c in enumerate(index.chunks)}
    written: list[tuple[int, bytes]] = []
    real = os.pwrite
    slot_b = os.path.realpath(load(dev / "agent.toml").slots["B"]["rootfs"])

    def pwrite(fd: int, data: Any, off: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == slot_b:
            written.append((off, hashlib.sha256(bytes(data)).digest()))
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with rangeserver.serve(_serve(world)) as url:
        _, stats = _run(dev, url, world["bundle"].stat().st_size)
    monkeypatch.undo()
    assert stats.repaired > 0 and written
    assert all(by_offset.get(off) == digest for off, digest in written), "wrote unverified bytes"
    assert _slot(dev, "B") == world["v2"]


def test_a_dropped_link_resumes_without_fetching_written_chunks_again(world: dict[str, Any]) -> None:
    clean_dev, dev = _device(world, "clean"), _device(world, "dropped")
    clean = _serve(world)
    with rangeserver.serve(clean) as url:
        _, clean_stats = _run(clean_dev, url, world["bundle"].stat().st_size)
    dropped = _serve(world, drop_after=clean.body_bytes * 2 // 3)
    with rangeserver.serve(dropped) as url:
        _, stats = _run(dev, url, world["bundle"].stat().st_size)
    assert stats.resumes == 1
    assert _slot(dev, "B") == world["v2"]
    index = _index(world)
    biggest = max(max(c.frame_length for c in index.chunks),
                  max(op.length for op in index.bases[0].ops if isinstance(op, dx.Patch)))
    # only what was in flight when the link dropped comes again: at most one span and the gap
    # and multipart framing next to it
    assert dropped.body_bytes - clean.body_bytes <= biggest + delta.GAP + 4096, (stats.line(),
                                                                                  clean_stats.line())
    assert (stats.copied, stats.patched, stats.fetched) == (clean_stats.copied, clean_stats.patched,
                                                            clean_stats.fetched)


KILL_RUNNER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
kill_at, count = int(sys.argv[4]), [0]
real = os.pwrite
def pwrite(*a):
    n = real(*a)
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return n
os.pwrite = pwrite
from agent.adapters.download import DownloadPolicy, Origin, new_session
from agent.adapters.range_fetch import RangeFetcher
from agent.core.config import load
from agent.device import delta
from agent.device.updater import Updater, open_device
delta.CHECKPOINT = 64 * 1024
from pathlib import Path
up = Updater(open_device(load(Path(sys.argv[2]))))
url = sys.argv[3]
f = RangeFetcher(new_session(), Origin(url), url, size=int(sys.argv[5]), policy=DownloadPolicy())
delta.install(up, f)
"""


def test_a_power_cut_mid_delta_keeps_the_old_slot_and_a_later_install_resumes(
        world: dict[str, Any]) -> None:
    dev = _device(world, "dev")
    cfg = dev / "agent.toml"
    size = world["bundle"].stat().st_size
    state = _serve(world)
    with rangeserver.serve(state) as url:
        proc = subprocess.run([sys.executable, "-c", KILL_RUNNER, str(ROOT), str(cfg), url + "/b",
                               "30", str(size)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr
        run_cli("sim", "power-cut", "--config", cfg, check=True)
        status = _status(dev)
        assert status["booted_slot"] == "A" and status["slots"]["A"]["state"] == "good"
        assert status["slots"]["B"]["state"] != "trial"
        first = state.body_bytes
        result, stats = _run(dev, url, size)
    assert result.slot == "B" and stats.resumed > 0, stats.line()
    assert _slot(dev, "B") == world["v2"]
    assert first > 0 and state.body_bytes - first < first + size // 2


def test_a_device_on_a_release_the_index_does_not_know_installs_the_whole_payload(
        world: dict[str, Any]) -> None:
    d = world["tmp"] / "other"
    (world["tmp"] / "v0.img").write_bytes(_image(7))
    sim.init_device(d, image=world["tmp"] / "v0.img", keyring=world["pki"].root_crt, version="0.9",
                    slot_size=2 << 20)
    with rangeserver.serve(_serve(world)) as url:
        _, stats = _run(d, url, world["bundle"].stat().st_size)
    assert stats.mode == "full"
    assert _slot(d, "B") == world["v2"]


def test_a_server_without_range_support_is_told_before_anything_is_recorded(
        world: dict[str, Any]) -> None:
    dev = _device(world, "dev")
    device = open_device(load(dev / "agent.toml"))
    try:
        before = device.journal.history(50)
    finally:
        device.close()
    with rangeserver.serve(_serve(world, ranges=False)) as url, pytest.raises(RangeUnsupported):
        _run(dev, url, world["bundle"].stat().st_size)
    device = open_device(load(dev / "agent.toml"))
    try:
        assert device.journal.history(50) == before
    finally:
        device.close()


def test_delta_info_predicts_what_the_device_downloads(world: dict[str, Any]) -> None:
    dev = _device(world, "dev")
    state = _serve(world)
    with rangeserver.serve(state) as url:
        _run(dev, url, world["bundle"].stat().st_size)
    proc = run_cli("bundle", "delta-info", world["bundle"], "--against", world["tmp"] / "v1.img",
                   "--json", check=True)
    import json

    info = json.loads(proc.stdout)
    assert info["base"] == "1.0"
    assert abs(info["download_bytes"] - state.body_bytes) <= 0.05 * state.body_bytes + 2048


def test_the_controllers_file_server_refusing_multi_range_gets_single_ranges(
        world: dict[str, Any]) -> None:
    """The controller serves artifacts with aiohttp's FileResponse (ddi_routes.ddi_artifact): one
    range per request, 416 for several. The device notices and asks one range at a time."""
    import asyncio
    import threading

    from aiohttp import web

    async def artifact(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(world["bundle"])

    app = web.Application()
    app.router.add_get("/b", artifact)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        dev = _device(world, "dev")
        _, stats = _run(dev, f"http://127.0.0.1:{port}", world["bundle"].stat().st_size)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()
    assert stats.mode == "delta" and stats.requests <= delta.BUDGET + 4
    assert _slot(dev, "B") == world["v2"]


def test_the_fleet_agent_installs_by_delta_from_the_controller_and_reports_it(
        world: dict[str, Any]) -> None:
    from agent.host.simfleet import start_controller
    from tests.test_controller_agent import agent_cycle

    ctl = start_controller(world["tmp"] / "ctl", keyring=world["pki"].root_crt, tick_interval=3600)
    try:
        board = _device(world, "board")
        token = ctl.api("POST", "/devices", {"id": "d0"})["token"]
        ctl.api("POST", "/groups", {"name": "g", "devices": ["d0"]})
        with open(world["bundle"], "rb") as f:
            bid = ctl.api("POST", "/bundles?filename=v2.bundle", data=f)["id"]
        rid = ctl.api("POST", "/deployments", {"bundle": bid, "group": "g"})["id"]
        for _ in range(4):
            agent_cycle(board, ctl.url, "d0", token)
        actions = ctl.api("GET", f"/actions?rollout={rid}")["actions"]
        assert [a["status"] for a in actions] == ["success"]
    finally:
        ctl.stop()
    device = open_device(load(board / "agent.toml"))
    try:
        last = device.journal.get("delta.last")
        booted = device.runtime.booted_slot()
    finally:
        device.close()
    assert isinstance(last, dict) and last["mode"] == "delta"
    assert last["saved"] > 0 and last["received"] + last["saved"] == world["bundle"].stat().st_size
    assert _slot(board, booted) == world["v2"]
    pytest.importorskip("prometheus_client", reason="needs the [metrics] extra")
    from agent.device import metrics

    device = open_device(load(board / "agent.toml"))
    try:
        _, text = metrics.render(Updater(device))
    finally:
        device.close()
    assert f"edgeops_delta_last_saved {float(last['saved'])}".encode() in text


def test_bundle_create_delta_against_an_older_bundle_installs_by_delta(world: dict[str, Any]) -> None:
    pki, tmp = world["pki"], world["tmp"]
    common = ["--key", pki.signer_key, "--cert", pki.signer_crt, "--compatible", "edgeops-sim",
              "--security-version", "1"]
    run_cli("bundle", "create", *common, "--version", "1.0", "--payload", f"rootfs={tmp / 'v1.img'}",
            "-o", tmp / "v1.bundle", check=True)
    out = run_cli("bundle", "create", *common, "--version", "2.0", "--payload",
                  f"rootfs={tmp / 'v2.img'}", "--base", tmp / "v1.bundle", "--chunk-size", "16384",
                  "-o", tmp / "v2d.bundle", check=True)
    assert "delta-capable" in out.stdout and "base 1.0" in out.stdout
    dev = _device(world, "dev")
    state = rangeserver.Served({"/b": tmp / "v2d.bundle"})
    with rangeserver.serve(state) as url:
        _, stats = _run(dev, url, (tmp / "v2d.bundle").stat().st_size)
    assert stats.mode == "delta" and stats.copied > 0
    assert _slot(dev, "B") == world["v2"]


def test_bundle_create_with_a_missing_base_says_so_in_one_line(world: dict[str, Any]) -> None:
    pki, tmp = world["pki"], world["tmp"]
    proc = run_cli("bundle", "create", "--key", pki.signer_key, "--cert", pki.signer_crt,
                   "--compatible", "edgeops-sim", "--security-version", "1", "--version", "2.0",
                   "--payload", f"rootfs={tmp / 'v2.img'}", "--base", "1.0=" + str(tmp / "nope.img"),
                   "-o", tmp / "x.bundle")
    assert proc.returncode == 2, proc.stderr
    assert "nope.img" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp / "x.bundle").exists()


def test_a_signed_but_unusable_index_installs_the_whole_payload(world: dict[str, Any]) -> None:
    tmp, pki, built = world["tmp"], world["pki"], world["built"]
    stored = bytearray(built.stored.read_bytes())
    stored[20] ^= 0xFF  # inside the compressed index body; the skippable frame still frames it
    (tmp / "odd.stored").write_bytes(bytes(stored))
    odd = tmp / "odd.bundle"
    bundle_writer.create(odd, sign=keys.load_signing_key(pki.signer_key).sign,
                         chain_pem=pki.signer_crt.read_bytes(), compatible="edgeops-sim",
                         version="2.0", security_version=1, build_time=int(time.time()),
                         sources=[bundle_writer.PayloadSource(
                             "rootfs", "rootfs", tmp / "v2.img", stored=tmp / "odd.stored",
                             installed=(built.size, built.sha256),
                             meta={**delta_writer.meta_for(built), delta_writer.META_SHA:
                                   hashlib.sha256(stored[:built.index_bytes]).hexdigest()})])
    dev = _device(world, "dev")
    with rangeserver.serve(rangeserver.Served({"/b": odd})) as url:
        _, stats = _run(dev, url, odd.stat().st_size)
    assert stats.mode == "full" and stats.notes
    assert _slot(dev, "B") == world["v2"]


def test_an_index_that_differs_from_its_signed_hash_is_refused_before_anything_is_written(
        world: dict[str, Any], tmp_path: Path) -> None:
    _tamper_refused(world, tmp_path, 0, -world["built"].index_bytes + 40, "delta index of payload")
