"""Model version and inference error rate as telemetry series: the store's ``current`` and
state, and the counts a real ModelHost (the TFLite runtime) wrote for the agent to read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("ai_edge_litert", reason="needs the [models] extra")

from agent.core.config import load  # noqa: E402
from agent.device.modelhost import ModelHost  # noqa: E402
from agent.device.models import ModelManager  # noqa: E402
from tests.test_models import cfg, install, journal, make_model_bundle, manager, settings  # noqa: E402
from tests.test_telemetry_agent import collect, named, with_telemetry  # noqa: E402

__all__ = ["cfg", "journal", "make_model_bundle", "manager", "settings"]  # fixtures, re-used
X = np.array([[1.0, 2.0, -0.5, 4.0]], dtype=np.float32)
MODEL = (("model", "tiny"), ("version", "1.0"))


def serve(manager: ModelManager, ok: int, failed: int) -> None:
    with ModelHost(manager.settings.root, "tiny", stats_interval=3600) as host:
        for _ in range(ok):
            host.predict([X])
        for _ in range(failed):
            with pytest.raises(ValueError):  # the interpreter's answer to a wrong input shape
                host.predict([np.zeros((3, 3), dtype=np.float32)])


def test_the_current_model_version_and_state_are_a_series(device_dir: Path, manager: ModelManager,
                                                          make_model_bundle: Any) -> None:
    cfg_path = with_telemetry(device_dir)
    install(manager, make_model_bundle("1.0"))
    install(manager, make_model_bundle("2.0", scale=2.0))
    assert named(collect(load(cfg_path)), "edgeops_model_info") == {
        (("model", "tiny"), ("state", "trial"), ("version", "2.0")): 1.0}


def test_the_hosts_request_and_error_counts_become_an_error_rate(
        device_dir: Path, manager: ModelManager, make_model_bundle: Any) -> None:
    cfg_path = with_telemetry(device_dir)
    install(manager, make_model_bundle("1.0"))
    serve(manager, ok=6, failed=2)
    series = collect(load(cfg_path))
    assert named(series, "edgeops_model_requests_total") == {MODEL: 8.0}
    assert named(series, "edgeops_model_errors_total") == {MODEL: 2.0}
    assert named(series, "edgeops_model_error_ratio") == {MODEL: 0.25}


def test_the_host_rewrites_its_counts_only_when_they_changed(manager: ModelManager,
                                                             make_model_bundle: Any) -> None:
    install(manager, make_model_bundle("1.0"))
    with ModelHost(manager.settings.root, "tiny", stats_interval=3600) as host:
        written = [host.write_stats(), host.write_stats()]
        host.predict([X])
        written.append(host.write_stats())
    assert written == [True, False, True]  # an idle application writes nothing to the SD card
