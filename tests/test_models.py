"""Model updates: real tiny .tflite models, the real interpreter, signed bundles (agent.adapters.bundle)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("ai_edge_litert")

from agent.adapters import model_store as store_mod  # noqa: E402
from agent.adapters import tflite as validate  # noqa: E402
from agent.adapters.journal import Journal  # noqa: E402
from agent.adapters.model_store import ModelStore  # noqa: E402
from agent.core.config import load  # noqa: E402
from agent.core.model_health import HealthPolicy, WindowStats, decide  # noqa: E402
from agent.core.model_spec import ModelSpec, TensorSpec  # noqa: E402
from agent.device.models import ModelManager, ModelSettings  # noqa: E402
from agent.errors import (  # noqa: E402  # noqa: E402
    BundleError,
    HashMismatch,
    IncompatibleBundle,
    ModelLoadError,
    ModelMetaError,
    ModelOutputMismatch,
    ModelShapeMismatch,
    ModelStateError,
    ModelTooLarge,
    ModelTooSlow,
    RollbackRefused,
)
from agent.host import keys  # noqa: E402
from agent.host.model_pack import pack  # noqa: E402
from tests.conftest import COMPATIBLE, EDGEOPS, Keys, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_fc.tflite"


def _tiny() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "tools" / "make_tiny_model.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tiny = _tiny()
SPEC = ModelSpec((TensorSpec((1, 4), "float32"),), (TensorSpec((1, 3), "float32"),),
                 atol=1e-5, rtol=0.0, max_latency_ms=1000.0, validation="tiny-val")


@pytest.fixture
def cfg(device_dir: Path) -> Any:
    return load(device_dir / "agent.toml")


@pytest.fixture
def journal(cfg: Any) -> Any:
    j = Journal(cfg.journal_path)
    yield j
    j.close()


@pytest.fixture
def settings(cfg: Any) -> ModelSettings:
    return ModelSettings(root=cfg.state_dir / "models", keep=3, budget_bytes=1 << 20)


@pytest.fixture
def manager(settings: ModelSettings, journal: Any, cfg: Any) -> ModelManager:
    return ModelManager(settings, journal, cfg=cfg)


BundleMaker = Callable[..., Path]


@pytest.fixture
def make_model_bundle(pki: Keys, tmp_path: Path) -> BundleMaker:
    counter = [0]

    def factory(version: str, *, scale: float = 1.0, model: bytes | None = None,
                val: bytes | None = None, spec: ModelSpec | None = SPEC,
                compatible: str = COMPATIBLE, name: str = "tiny", security_version: int = 0) -> Path:
        counter[0] += 1
        d = tmp_path / f"m{counter[0]}"
        d.mkdir()
        (d / "model.tflite").write_bytes(model if model is not None else tiny.build(scale))
        (d / "val.npz").write_bytes(val if val is not None else tiny.validation_set(scale))
        out = d / f"{name}-{version}.bundle"
        pack(out, model=d / "model.tflite", validation=d / "val.npz", name=name, version=version,
             sign=keys.load_signing_key(pki.signer_key).sign, chain_pem=pki.signer_crt.read_bytes(),
             compatible=compatible, spec=spec, security_version=security_version)
        return out

    return factory


def install(mgr: ModelManager, path: Path) -> Any:
    with open(path, "rb") as f:
        return mgr.install(f)


def outputs(store: ModelStore, name: str, x: Any) -> Any:
    runner = validate.load(store.model_path(name, store.current(name) or "").read_bytes())
    return runner.run([x])[0]


# --- the fixture and the generator ---------------------------------------------------------------
def test_committed_fixture_is_what_the_generator_builds() -> None:
    assert FIXTURE.read_bytes() == tiny.build()


def test_real_interpreter_computes_the_known_weights() -> None:
    runner = validate.load(FIXTURE.read_bytes())
    x = np.array([[1.0, -2.0, 0.5, 3.0]], dtype=np.float32)
    w, b = tiny.weights()
    np.testing.assert_array_equal(runner.run([x])[0], x @ w.T + b)


# --- install ------------------------------------------------------------------------------------
def test_install_validates_activates_and_reports(manager: ModelManager, journal: Any,
                                                 make_model_bundle: BundleMaker) -> None:
    result = install(manager, make_model_bundle("1.0"))
    st = manager.store
    assert (result.name, result.version, result.previous) == ("tiny", "1.0", None)
    assert st.current("tiny") == "1.0" and st.good("tiny") == "1.0"  # first model: nothing older
    assert result.report.cases == 8 and result.report.max_abs_error == 0.0
    x = np.array([[2.0, 0.0, -1.0, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(outputs(st, "tiny", x), tiny.expected(x))
    assert [r.event for r in journal.history()][-1] == "model-activated"
    assert journal.pending()[-1][2]["status"] == "activated"


def test_second_version_keeps_last_known_good(manager: ModelManager,
                                              make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0"))
    result = install(manager, make_model_bundle("2.0", scale=2.0))
    st = manager.store
    assert result.previous == "1.0"
    assert (st.current("tiny"), st.good("tiny")) == ("2.0", "1.0")
    assert st.info("tiny", "2.0").state == "trial"
    x = np.ones((1, 4), dtype=np.float32)
    np.testing.assert_array_equal(outputs(st, "tiny", x), tiny.expected(x, 2.0))


def test_same_version_twice_is_refused(manager: ModelManager, make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0"))
    with pytest.raises(ModelStateError):
        install(manager, make_model_bundle("1.0"))


def test_bundle_for_another_board_is_refused(manager: ModelManager,
                                             make_model_bundle: BundleMaker) -> None:
    with pytest.raises(IncompatibleBundle):
        install(manager, make_model_bundle("1.0", compatible="other-board"))
    assert manager.store.current("tiny") is None


# --- refusals -----------------------------------------------------------------------------------
def _flip_model_byte(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    model = tiny.build()
    at = data.find(model)
    assert at > 0
    data[at + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _truncate_in_model(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:data.find(tiny.build()) + 200])
    return path


REFUSALS: dict[str, tuple[Callable[[BundleMaker], Path], type[Exception]]] = {
    "wrong hash": (lambda mk: _flip_model_byte(mk("2.0")), HashMismatch),
    "truncated bundle": (lambda mk: _truncate_in_model(mk("2.0")), BundleError),
    "truncated model (signed)": (lambda mk: mk("2.0", model=tiny.build()[:300]), ModelLoadError),
    "not a TFLite file": (lambda mk: mk("2.0", model=os.urandom(600)), ModelLoadError),
    "TFL3 identifier on garbage": (lambda mk: mk("2.0", model=b"\x10\0\0\0TFL3" + os.urandom(600)),
                                   ModelLoadError),
    "wrong input shape": (lambda mk: mk("2.0", model=tiny.build(in_features=5)), ModelShapeMismatch),
    "wrong output shape in meta": (
        lambda mk: mk("2.0", spec=replace(SPEC, outputs=(TensorSpec((1, 4), "float32"),))),
        BundleError),  # the validation set no longer fits the promised shape
    "wrong dtype in meta": (
        lambda mk: mk("2.0", spec=replace(SPEC, inputs=(TensorSpec((1, 4), "int8"),))), BundleError),
    "outputs out of tolerance": (lambda mk: mk("2.0", scale=2.0, val=tiny.validation_set(1.0)),
                                 ModelOutputMismatch),
    "slower than the ceiling": (lambda mk: mk("2.0", spec=replace(SPEC, max_latency_ms=1e-6)),
                                ModelTooSlow),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_model_is_never_activated(case: str, manager: ModelManager, journal: Any,
                                          make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0"))
    build, error = REFUSALS[case]
    with pytest.raises(error) as exc:
        install(manager, build(make_model_bundle))
    st = manager.store
    assert st.current("tiny") == "1.0" and st.good("tiny") == "1.0"
    assert [v.version for v in st.versions("tiny")] == ["1.0"]
    assert not list(st.dir("tiny").glob(".staging-*"))
    line = exc.value.one_line()  # type: ignore[attr-defined]
    assert "\n" not in line
    assert journal.history()[-1].event == "model-refused"
    assert journal.history()[-1].detail.endswith(line)
    assert journal.pending()[-1][2]["status"] == "refused"


def test_meta_missing_latency_is_refused(manager: ModelManager, pki: Keys, tmp_path: Path) -> None:
    from agent.host import bundle_writer

    (tmp_path / "m").write_bytes(tiny.build())
    (tmp_path / "v").write_bytes(tiny.validation_set())
    meta = SPEC.to_meta()
    del meta["max_latency_ms"]
    out = tmp_path / "b"
    bundle_writer.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                  chain_pem=pki.signer_crt.read_bytes(), compatible=COMPATIBLE, version="1",
                  security_version=0, build_time=int(time.time()),
                  sources=[bundle_writer.PayloadSource("tiny", "model", tmp_path / "m", meta=meta),
                           bundle_writer.PayloadSource("tiny-val", "model-validation", tmp_path / "v")])
    with pytest.raises(ModelMetaError, match="max_latency_ms"):
        install(manager, out)


def test_model_larger_than_the_budget_is_refused(settings: ModelSettings, journal: Any, cfg: Any,
                                                 make_model_bundle: BundleMaker) -> None:
    mgr = ModelManager(replace(settings, budget_bytes=3000), journal, cfg=cfg)
    install(mgr, make_model_bundle("1.0"))  # ~2.3 kB with its validation set
    with pytest.raises(ModelTooLarge, match="budget"):
        install(mgr, make_model_bundle("2.0", scale=2.0))
    assert mgr.store.current("tiny") == "1.0"
    assert journal.pending()[-1][2]["status"] == "refused"


# --- disk bounds --------------------------------------------------------------------------------
def test_old_versions_pruned_never_current_or_good(settings: ModelSettings, journal: Any, cfg: Any,
                                                   make_model_bundle: BundleMaker) -> None:
    mgr = ModelManager(replace(settings, keep=2), journal, cfg=cfg)
    for i in range(1, 5):
        install(mgr, make_model_bundle(f"{i}.0", scale=float(i)))
    st = mgr.store
    kept = [v.version for v in st.versions("tiny")]
    assert st.current("tiny") == "4.0" and st.good("tiny") == "1.0"  # v1 never passed a window
    assert kept == ["1.0", "4.0"]


def test_budget_makes_room_by_deleting_unprotected(settings: ModelSettings, journal: Any, cfg: Any,
                                                   make_model_bundle: BundleMaker) -> None:
    mgr = ModelManager(replace(settings, keep=10), journal, cfg=cfg)
    install(mgr, make_model_bundle("1.0"))
    install(mgr, make_model_bundle("2.0", scale=2.0))
    install(mgr, make_model_bundle("3.0", scale=3.0))  # 2.0 is now neither current nor good
    per_version = mgr.store.info("tiny", "1.0").size
    mgr2 = ModelManager(replace(settings, keep=10, budget_bytes=int(per_version * 3.5)), journal,
                        cfg=cfg)
    install(mgr2, make_model_bundle("4.0", scale=4.0))
    assert [v.version for v in mgr2.store.versions("tiny")] == ["1.0", "3.0", "4.0"]
    assert mgr2.store.usage() <= int(per_version * 3.5)


def test_a_tampered_bundle_deletes_no_older_version(settings: ModelSettings, journal: Any, cfg: Any,
                                                    make_model_bundle: BundleMaker) -> None:
    mgr = ModelManager(replace(settings, keep=10), journal, cfg=cfg)
    for i, v in enumerate(("1.0", "2.0", "3.0")):
        install(mgr, make_model_bundle(v, scale=float(i + 1)))
    per_version = mgr.store.info("tiny", "1.0").size
    mgr2 = ModelManager(replace(settings, keep=10, budget_bytes=int(per_version * 3.5)), journal,
                        cfg=cfg)
    data = bytearray(make_model_bundle("4.0", scale=4.0).read_bytes())
    data[data.index(tiny.build(4.0)) + 100] ^= 0xFF  # inside the model: caught by its block hash
    with pytest.raises(HashMismatch):
        mgr2.install(io.BytesIO(bytes(data)))
    assert [v.version for v in mgr2.store.versions("tiny")] == ["1.0", "2.0", "3.0"]


# --- atomic links -------------------------------------------------------------------------------
def test_current_link_is_never_missing_or_mixed(manager: ModelManager,
                                                make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0"))
    install(manager, make_model_bundle("2.0", scale=2.0))
    st = manager.store
    want = {v: st.model_path("tiny", v).read_bytes() for v in ("1.0", "2.0")}
    seen: list[str] = []
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        link = st.dir("tiny") / "current"
        while not stop.is_set():
            try:
                data = (link / "model.tflite").read_bytes()
            except OSError as exc:  # a missing link would show here
                bad.append(repr(exc))
                continue
            if data not in want.values():
                bad.append("mixed content")
            seen.append(os.readlink(link))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        st.point("tiny", "current", "1.0" if i % 2 else "2.0")
    stop.set()
    t.join()
    assert not bad and len(seen) > 10
    assert not [p for p in st.dir("tiny").iterdir() if p.name.startswith(".current")]


def test_crash_before_rename_leaves_the_old_link(manager: ModelManager, monkeypatch: Any,
                                                 make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0"))
    install(manager, make_model_bundle("2.0", scale=2.0))

    def power_cut(src: Any, dst: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(store_mod.os, "replace", power_cut)
    with pytest.raises(OSError):
        manager.store.point("tiny", "current", "1.0")
    assert manager.store.current("tiny") == "2.0"


# --- revert, commit, rollback -------------------------------------------------------------------
def test_revert_restores_last_known_good_and_reports(manager: ModelManager, journal: Any,
                                                     make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0"))
    install(manager, make_model_bundle("2.0", scale=2.0))
    assert manager.revert("tiny", "2.0", "p95 too high") == "1.0"
    st = manager.store
    assert st.current("tiny") == "1.0" and st.info("tiny", "2.0").state == "bad"
    assert journal.history()[-1].event == "model-reverted"
    report = journal.pending()[-1][2]
    assert (report["status"], report["version"], report["previous"]) == ("reverted", "2.0", "1.0")


def test_commit_moves_last_known_good(manager: ModelManager, make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0"))
    install(manager, make_model_bundle("2.0", scale=2.0))
    assert manager.commit("tiny", "2.0", "healthy")
    assert manager.store.good("tiny") == "2.0" and manager.store.info("tiny", "2.0").state == "good"
    assert manager.rollback("tiny") == "1.0"  # current was good: back to the good one before it
    assert (manager.store.current("tiny"), manager.store.good("tiny")) == ("1.0", "1.0")


def test_rollback_without_an_older_good_model_is_refused(manager: ModelManager,
                                                         make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0"))
    with pytest.raises(ModelStateError):
        manager.rollback("tiny")


# --- notification of applications that do not embed ModelHost ----------------------------------
def test_notifies_socket_and_signals_pidfile(settings: ModelSettings, journal: Any, cfg: Any,
                                             tmp_path: Path, make_model_bundle: BundleMaker) -> None:
    sock_path = tmp_path / "app.sock"
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(str(os.getpid()))
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
            srv.bind(str(sock_path))
            srv.settimeout(5)
            mgr = ModelManager(replace(settings, notify_socket=sock_path, notify_pidfile=pidfile,
                                       notify_signal=int(signal.SIGUSR1)), journal, cfg=cfg)
            install(mgr, make_model_bundle("1.0"))
            msg = json.loads(srv.recv(4096))
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert (msg["model"], msg["version"], msg["event"]) == ("tiny", "1.0", "activated")
    assert Path(msg["path"]).read_bytes() == tiny.build()
    assert got == [signal.SIGUSR1]


# --- health decisions (pure) --------------------------------------------------------------------
POLICY = HealthPolicy(window_s=10, min_requests=20, max_error_rate=0.05, max_p95_ratio=2.0,
                      p95_floor_ms=1.0)
PREV = WindowStats(1000, 0, 4.0)


@pytest.mark.parametrize(("new", "elapsed", "app", "verdict"), [
    (WindowStats(100, 0, 5.0), 11, None, "commit"),
    (WindowStats(100, 0, 5.0), 5, None, "wait"),  # window not over
    (WindowStats(10, 0, 5.0), 60, None, "wait"),  # too few requests to judge
    (WindowStats(100, 6, 5.0), 1, None, "revert"),  # errors: judged early
    (WindowStats(100, 5, 5.0), 11, None, "commit"),  # exactly at the limit
    (WindowStats(100, 0, 8.5), 11, None, "revert"),  # p95 over 2x previous
    (WindowStats(100, 0, 8.0), 11, None, "commit"),
    (WindowStats(100, 0, 5.0), 11, "outputs all zero", "revert"),
])
def test_health_decisions(new: WindowStats, elapsed: float, app: str | None, verdict: str) -> None:
    assert decide(POLICY, new, PREV, elapsed=elapsed, app_failure=app).verdict == verdict


def test_p95_floor_ignores_microsecond_noise() -> None:
    assert decide(POLICY, WindowStats(100, 0, 0.9), WindowStats(100, 0, 0.01),
                  elapsed=11).verdict == "commit"


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_install_list_status_rollback(device_dir: Path, make_model_bundle: BundleMaker) -> None:
    conf = device_dir / "agent.toml"
    one = make_model_bundle("1.0")
    first = run_cli("model", "install", one, "--config", conf, check=True)
    assert first.stderr == ""  # LiteRT's "INFO: Created ... delegate" does not reach the console
    # stdin carries binary: run_cli's text-mode input would re-encode it
    p = subprocess.run([*EDGEOPS, "model", "install", "-", "--config", str(conf), "--json"],
                       input=make_model_bundle("2.0", scale=2.0).read_bytes(), capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=True)
    assert json.loads(p.stdout.decode().strip().splitlines()[-1])["previous"] == "1.0"
    st = json.loads(run_cli("model", "status", "--config", conf, "--json", check=True).stdout)
    assert (st["models"]["tiny"]["current"], st["models"]["tiny"]["good"]) == ("2.0", "1.0")
    assert "trial" in run_cli("model", "list", "--config", conf, check=True).stdout
    run_cli("model", "rollback", "tiny", "--config", conf, check=True)
    st = json.loads(run_cli("model", "status", "--config", conf, "--json", check=True).stdout)
    assert st["models"]["tiny"]["current"] == "1.0"
    bad = run_cli("model", "install", _flip_model_byte(make_model_bundle("3.0")), "--config", conf)
    assert bad.returncode == 15 and "does not match" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1  # one clear line
    too_slow = make_model_bundle("4.0", spec=replace(SPEC, max_latency_ms=1e-6))  # refused after loading
    wrong = run_cli("model", "install", too_slow, "--config", conf)
    assert wrong.returncode == 14 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


def test_validation_set_is_bounded() -> None:
    from agent.core.model_spec import load_validation
    from agent.errors import ValidationSetError

    buf = io.BytesIO()
    np.savez_compressed(buf, input_0=np.zeros((70_000, 1, 4), np.float32),
                        output_0=np.zeros((70_000, 1, 3), np.float32))
    with pytest.raises(ValidationSetError):
        load_validation(buf.getvalue(), SPEC)  # small on disk, too many cases
    with pytest.raises(ValidationSetError):
        load_validation(b"PK\x03\x04 not really", SPEC)


def test_a_model_has_its_own_floor_not_the_os_floor(manager: ModelManager, journal: Any,
                                                     make_model_bundle: BundleMaker) -> None:
    journal.put("security_floor", 5)  # the OS has moved on
    install(manager, make_model_bundle("1.0", security_version=0))  # the OS floor does not apply
    install(manager, make_model_bundle("2.0", scale=2.0, security_version=2))
    assert manager.commit("tiny", "2.0", "healthy")
    assert manager.floor("tiny") == 2 and manager.floor("other") == 0
    with pytest.raises(RollbackRefused, match="below this model's floor 2"):
        install(manager, make_model_bundle("3.0", scale=3.0, security_version=1))
    assert manager.store.current("tiny") == "2.0"
    install(manager, make_model_bundle("1.0", name="other", security_version=0))  # another model


def test_model_rollback_below_its_floor_is_refused(manager: ModelManager,
                                                   make_model_bundle: BundleMaker) -> None:
    install(manager, make_model_bundle("1.0", security_version=0))
    assert manager.commit("tiny", "1.0", "healthy")
    install(manager, make_model_bundle("2.0", scale=2.0, security_version=3))
    assert manager.commit("tiny", "2.0", "healthy")
    with pytest.raises(RollbackRefused, match="floor 3"):
        manager.rollback("tiny")
    assert manager.store.current("tiny") == "2.0"


def test_validation_array_header_cannot_claim_more_than_it_holds() -> None:
    import zipfile

    from agent.core.model_spec import ValidationSetError, load_validation

    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 4), np.float32))
    header["shape"] = (10**13, 4)  # 146 TiB, in a member of a few hundred bytes
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, header)
    npy.write(bytes(16))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("input_0.npy", npy.getvalue())
        z.writestr("output_0.npy", npy.getvalue())
    with pytest.raises(ValidationSetError, match="declares shape"):
        load_validation(buf.getvalue(), SPEC)
