"""ModelHost: hot swap under concurrent predict() with zero failures, health verdicts, revert."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("ai_edge_litert")

from agent.core.model_health import HealthPolicy  # noqa: E402
from agent.device.modelhost import HealthSample, ModelHost  # noqa: E402
from agent.device.models import ModelManager, ModelSettings  # noqa: E402
from agent.errors import ModelStateError  # noqa: E402
from tests.test_models import (  # noqa: E402
    cfg,
    install,
    journal,
    make_model_bundle,
    manager,
    settings,
    tiny,
)

__all__ = ["cfg", "journal", "make_model_bundle", "manager", "settings"]  # fixtures, re-used

X = np.array([[1.0, 2.0, -0.5, 4.0]], dtype=np.float32)
WANT = {v: tiny.expected(X, float(v.split(".")[0])) for v in ("1.0", "2.0", "3.0")}


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def which(out: Any) -> str:
    for v, want in WANT.items():
        if np.array_equal(out, want):
            return v
    raise AssertionError(f"output {out} is no known model's")


def test_start_without_a_model_is_refused(settings: ModelSettings) -> None:
    with pytest.raises(ModelStateError):
        ModelHost(settings.root, "tiny").start()


def test_serves_the_current_model(manager: ModelManager, make_model_bundle: Any) -> None:
    install(manager, make_model_bundle("1.0"))
    with ModelHost(manager.settings.root, "tiny") as host:
        assert host.version == "1.0"
        assert which(host.predict([X])[0]) == "1.0"


def test_swaps_under_concurrent_predict_with_zero_failures(manager: ModelManager,
                                                           make_model_bundle: Any) -> None:
    install(manager, make_model_bundle("1.0"))
    swaps: list[tuple[str, str]] = []
    host = ModelHost(manager.settings.root, "tiny", poll_interval=0.002, pool_size=2,
                     on_swap=lambda old, new: swaps.append((old, new)))
    failures: list[str] = []
    seen: list[list[str]] = [[], []]
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                seen[i].append(which(host.predict([X])[0]))
            except Exception as exc:  # any failure at all is what this test exists to catch
                failures.append(repr(exc))

    with host:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        install(manager, make_model_bundle("2.0", scale=2.0))
        assert wait_for(lambda: host.version == "2.0")
        for n in range(20):  # and back and forth, as fast as the watcher notices
            target = "1.0" if n % 2 == 0 else "2.0"
            manager.store.point("tiny", "current", target)
            assert wait_for(lambda t=target: host.version == t)  # type: ignore[misc]
        time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert host.swaps == 21 and swaps[0] == ("1.0", "2.0")
    assert all(len(s) > 50 for s in seen)
    assert {v for s in seen for v in s} == {"1.0", "2.0"}
    assert seen[0][-1] == seen[1][-1] == "2.0"


def _health_settings(settings: ModelSettings, **kw: Any) -> ModelSettings:
    policy = HealthPolicy(window_s=0.2, min_requests=10, max_error_rate=0.05, max_p95_ratio=50.0,
                          p95_floor_ms=50.0)
    return replace(settings, health=replace(policy, **kw))


def _drive(host: ModelHost, until: Callable[[], bool], inputs: Any = None) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if until():
            return True
        with contextlib.suppress(ValueError):
            host.predict([X if inputs is None else inputs])
        time.sleep(0.001)
    return False


def test_healthy_model_becomes_last_known_good(settings: ModelSettings, journal: Any, cfg: Any,
                                               make_model_bundle: Any) -> None:
    mgr = ModelManager(_health_settings(settings), journal, cfg=cfg)
    install(mgr, make_model_bundle("1.0"))
    with ModelHost(mgr.settings.root, "tiny", poll_interval=0.01, settings=mgr.settings,
                   journal_path=cfg.journal_path) as host:
        install(mgr, make_model_bundle("2.0", scale=2.0))
        assert _drive(host, lambda: mgr.store.good("tiny") == "2.0")
        assert host.version == "2.0"
    assert mgr.store.info("tiny", "2.0").state == "good"
    assert journal.pending()[-1][2]["status"] == "good"
    assert not [r for r in journal.history() if r.event == "model-reverted"]


def test_app_check_failure_reverts_to_last_known_good(settings: ModelSettings, journal: Any,
                                                      cfg: Any, make_model_bundle: Any) -> None:
    mgr = ModelManager(_health_settings(settings), journal, cfg=cfg)
    install(mgr, make_model_bundle("1.0"))
    checked: list[HealthSample] = []
    limit = 2 * float(np.abs(WANT["1.0"]).max())  # v3's outputs are 3x v1's: out of range

    def output_range(sample: HealthSample) -> str | None:
        checked.append(sample)
        top = max(float(np.abs(o[0]).max()) for o in sample.outputs)
        return f"outputs reach {top:g}, expected at most {limit:g}" if top > limit else None

    with ModelHost(mgr.settings.root, "tiny", poll_interval=0.01, settings=mgr.settings,
                   journal_path=cfg.journal_path, app_check=output_range) as host:
        install(mgr, make_model_bundle("3.0", scale=3.0))
        assert _drive(host, lambda: host.version == "1.0" and host.swaps == 2)
        until = time.monotonic() + 0.4  # past another window: the restored model is not judged
        _drive(host, lambda: time.monotonic() > until)
        assert which(host.predict([X])[0]) == "1.0" and host.swaps == 2
    assert checked and checked[0].version == "3.0"
    assert mgr.store.info("tiny", "3.0").state == "bad"
    rows = [r for r in journal.history() if r.event == "model-reverted"]
    assert rows and "application check failed" in rows[-1].detail
    reports = [b for _, kind, b in journal.pending() if kind == "model-report"]
    assert (reports[-1]["status"], reports[-1]["version"], reports[-1]["previous"]) == \
        ("reverted", "3.0", "1.0")


def test_error_rate_reverts(settings: ModelSettings, journal: Any, cfg: Any,
                            make_model_bundle: Any) -> None:
    mgr = ModelManager(_health_settings(settings, window_s=60), journal, cfg=cfg)
    install(mgr, make_model_bundle("1.0"))
    with ModelHost(mgr.settings.root, "tiny", poll_interval=0.01, settings=mgr.settings,
                   journal_path=cfg.journal_path) as host:
        install(mgr, make_model_bundle("2.0", scale=2.0))
        assert wait_for(lambda: host.version == "2.0")
        bad_input = np.zeros((1, 5), dtype=np.float32)  # the app sends what the model rejects
        assert _drive(host, lambda: host.version == "1.0", inputs=bad_input)
    assert "error rate" in mgr.store.info("tiny", "2.0").reason


def test_unloadable_model_keeps_the_old_one_serving(manager: ModelManager,
                                                   make_model_bundle: Any) -> None:
    install(manager, make_model_bundle("1.0"))
    install(manager, make_model_bundle("2.0", scale=2.0))
    manager.store.point("tiny", "current", "1.0")
    with ModelHost(manager.settings.root, "tiny", poll_interval=0.005) as host:
        path: Path = manager.store.model_path("tiny", "2.0")
        path.write_bytes(path.read_bytes()[:100])  # damaged on disk after validation
        manager.store.point("tiny", "current", "2.0")
        assert wait_for(lambda: host.last_error is not None)
        assert host.version == "1.0" and which(host.predict([X])[0]) == "1.0"


def test_interpreter_crash_on_load_keeps_the_old_one_serving(manager: ModelManager,
                                                             make_model_bundle: Any,
                                                             monkeypatch: Any) -> None:
    from agent.adapters import tflite as validate

    install(manager, make_model_bundle("1.0"))
    install(manager, make_model_bundle("2.0", scale=2.0))
    manager.store.point("tiny", "current", "1.0")
    with ModelHost(manager.settings.root, "tiny", poll_interval=0.005) as host:
        def broken(*a: Any, **k: Any) -> Any:
            raise RuntimeError("Failed to allocate tensors")  # what the interpreter raises
        monkeypatch.setattr(validate, "load", broken)
        manager.store.point("tiny", "current", "2.0")
        assert wait_for(lambda: host.last_error is not None)
        assert "allocate" in str(host.last_error)
        assert host.version == "1.0" and which(host.predict([X])[0]) == "1.0"


def test_no_request_waits_for_a_slow_load(manager: ModelManager, make_model_bundle: Any,
                                          monkeypatch: Any) -> None:
    from agent.adapters import tflite as validate
    from agent.device import modelhost

    install(manager, make_model_bundle("1.0"))
    install(manager, make_model_bundle("2.0", scale=2.0))
    manager.store.point("tiny", "current", "1.0")
    load_s = 0.6
    real_load = validate.load

    def slow_load(data: bytes, *, num_threads: int = 1) -> Any:
        time.sleep(load_s)  # a big model: the load takes far longer than any inference
        return real_load(data, num_threads=num_threads)

    with ModelHost(manager.settings.root, "tiny", poll_interval=0.005) as host:
        monkeypatch.setattr(modelhost.validate_mod, "load", slow_load)
        manager.store.point("tiny", "current", "2.0")
        longest, served = 0.0, {"1.0": 0, "2.0": 0}
        end = time.monotonic() + 2 * load_s  # the whole load, and the swap after it
        while time.monotonic() < end:
            t0 = time.monotonic()
            served[which(host.predict([X])[0])] += 1
            longest = max(longest, time.monotonic() - t0)
    assert served["1.0"] > 10 and served["2.0"] > 10  # old model served during the load
    assert longest < load_s / 2
