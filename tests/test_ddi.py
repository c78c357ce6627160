"""agent.core.ddi: the documented DDI shapes parse; anything else raises only DdiProtocolError."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import ddi

FIX = Path(__file__).parent / "fixtures" / "ddi"


def fixture(name: str) -> bytes:
    return (FIX / name).read_bytes()


def test_base_with_deployment_from_docs() -> None:
    b = ddi.parse_base(fixture("base_deployment.json"))
    assert b.sleep == 12 * 3600
    assert b.deployment is not None and b.deployment.endswith("/deploymentBase/3?c=-2129030598")
    assert ddi.action_id_from_href(b.deployment) == "3"
    assert b.config_data is not None and b.cancel is None


def test_base_with_cancel_from_docs() -> None:
    b = ddi.parse_base(fixture("base_cancel.json"))
    assert b.cancel is not None and ddi.action_id_from_href(b.cancel) == "5"
    assert b.deployment is None


def test_legacy_base_and_deployment_from_ddia() -> None:
    assert ddi.parse_base(fixture("base_ddia.json")).sleep == 300
    d = ddi.parse_deployment(fixture("deployment_ddia.json"))
    assert d.action_id == "1" and d.download == "forced" and d.maintenance_window is None
    (a,) = d.artifacts()
    assert (a.filename, a.size, a.sha256, a.md5) == (
        "linux.zip", 52167, None, "5813e9655bd6871d0c25b8d510fd8605")
    assert d.may_install_now


def test_deployment_from_docs_prefers_https_link() -> None:
    d = ddi.parse_deployment(fixture("deployment_base.json"))
    assert d.action_id == "8" and d.maintenance_window == "available"
    first = d.artifacts()[0]
    assert first.url.startswith("https://link-to-cdn.com/")
    assert first.sha256 is not None and len(first.sha256) == 64
    assert [a.filename for a in d.artifacts()] == ["binary.tgz", "file.signature"]


def test_cancel_from_docs() -> None:
    assert ddi.parse_cancel(fixture("cancel_action.json")) == ddi.Cancel("5", "5")


@pytest.mark.parametrize("download,update,window,ok", [
    ("forced", "forced", None, True), ("attempt", "attempt", "available", True),
    ("forced", "forced", "unavailable", False), ("skip", "forced", None, False),
    ("forced", "skip", None, False),
])
def test_may_install_now(download: str, update: str, window: str | None, ok: bool) -> None:
    doc = json.loads(fixture("deployment_ddia.json"))
    doc["deployment"].update(download=download, update=update)
    if window:
        doc["deployment"]["maintenanceWindow"] = window
    assert ddi.parse_deployment(json.dumps(doc).encode()).may_install_now is ok


def test_feedback_bodies_have_the_documented_shape() -> None:
    for name, fb in [("feedback_success_ddia.json", ddi.Feedback("closed", "success")),
                     ("feedback_proceeding_ddia.json",
                      ddi.Feedback("proceeding", "none", ("Some feedback",), ddi.Progress(2, 5)))]:
        doc = json.loads(fixture(name))
        body = fb.body()
        assert body["status"]["execution"] == doc["status"]["execution"]
        assert body["status"]["result"]["finished"] == doc["status"]["result"]["finished"]
        if doc["status"]["result"].get("progress"):
            assert body["status"]["result"]["progress"] == doc["status"]["result"]["progress"]
        assert body["status"].get("details", []) == doc["status"].get("details", [])


def test_config_data_body_matches_docs() -> None:
    doc = json.loads(fixture("config_data.json"))
    assert ddi.config_data_body(doc["data"]) == doc


@pytest.mark.parametrize("text,seconds", [("00:00:01", 1), ("01:02:03", 3723), ("12:00:00", 43200)])
def test_sleep(text: str, seconds: int) -> None:
    assert ddi.parse_sleep(text) == seconds


@pytest.mark.parametrize("bad", [b"", b"[]", b"{", b'{"deployment": 1, "id": "1"}',
                                 b'{"id": "1", "deployment": {"download": "now", "chunks": []}}',
                                 b'{"id": "1", "deployment": {"chunks": [{"artifacts": [{"size": -1}]}]}}',
                                 b'{"id": "", "deployment": {}}',
                                 b"[" * 100_000])
def test_bad_deployments_raise_protocol_error(bad: bytes) -> None:
    with pytest.raises(ddi.DdiProtocolError):
        ddi.parse_deployment(bad)


def test_limits_are_enforced() -> None:
    doc = json.loads(fixture("deployment_ddia.json"))
    doc["deployment"]["chunks"] *= ddi.MAX_CHUNKS + 1
    with pytest.raises(ddi.DdiProtocolError, match="chunks"):
        ddi.parse_deployment(json.dumps(doc).encode())
    with pytest.raises(ddi.DdiProtocolError, match="exceeds"):
        ddi.parse_base(b" " * (ddi.MAX_DOCUMENT + 1))
    with pytest.raises(ddi.DdiProtocolError, match="HH:MM:SS"):
        ddi.parse_base(b'{"config": {"polling": {"sleep": "5 minutes"}}}')
    with pytest.raises(ddi.DdiProtocolError, match="http"):
        ddi.parse_base(b'{"_links": {"deploymentBase": {"href": "file:///etc/passwd"}}}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "deployment", "chunks", "artifacts", "size", "hashes", "sha256",
                         "_links", "download", "href", "config", "polling", "sleep", "update",
                         "cancelAction", "stopId", "filename", "maintenanceWindow"]),
        children, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_parsers_raise_only_their_error(value: object) -> None:
    raw = json.dumps(value).encode()
    for parse in (ddi.parse_base, ddi.parse_deployment, ddi.parse_cancel):
        with contextlib.suppress(ddi.DdiProtocolError):
            parse(raw)
