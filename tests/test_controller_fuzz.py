"""No 5xx from input: generated requests to every DDI and operator route get a 4xx, never a 500.

The route list is read from the application itself (``build_app``), so a new route is fuzzed
without anyone remembering to add it. Path parameters, headers, query strings and JSON bodies
come from hypothesis (wrong types, huge and negative ids, deep nesting, odd text), beside a
fixed set of the inputs that used to give 500 (100,000-deep JSON, ids too large for SQLite,
``details: 5``). A central controller and a regional one (served from a mirror of the central)
are both fuzzed; afterwards both still serve a normal poll.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.controller.app import build_app
from agent.controller.http import Settings
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import Keys


@dataclass
class Target:
    ctl: LocalController
    routes: list[tuple[str, str]]  # (method, pattern) as the app registered them
    token: str
    aid: int
    bid: int
    seen: set[tuple[str, str]]


def _routes(ctl: LocalController, parent: str | None) -> list[tuple[str, str]]:
    app = build_app(ctl.fleet, Settings(api_token="x", parent=parent))  # not started: only its routes
    out = []
    for r in app.router.routes():
        info = r.resource.get_info() if r.resource is not None else {}
        pattern = info.get("formatter") or info.get("path")
        if pattern and r.method != "HEAD":
            out.append((r.method, pattern))
    return sorted(set(out))


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory, pki: Keys) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    ctl = start_controller(tmp / "central", keyring=pki.root_crt, tick_interval=3600, body_timeout=2.0)
    token = ctl.api("POST", "/devices", {"id": "dev1", "site": "a"})["token"]
    ctl.api("POST", "/groups", {"name": "g", "devices": ["dev1"]})
    # the operator routes' {id}: a device of its own, so that a generated revoke or tag lands on
    # a real record without ending the token the DDI routes (and _still_serving) go on using
    ctl.api("POST", "/devices", {"id": "dev2", "site": "a"})
    yield Target(ctl, _routes(ctl, None), token, 0, 0, set())
    ctl.stop()


@pytest.fixture(scope="module")
def deployed(central: Target, make_bundle_module: Path) -> Target:
    with open(make_bundle_module, "rb") as f:
        central.bid = central.ctl.api("POST", "/bundles?filename=b.bundle", data=f)["id"]
    central.ctl.api("POST", "/deployments", {"bundle": central.bid, "device": "dev1"})
    central.aid = central.ctl.api("GET", "/actions")["actions"][0]["id"]
    return central


@pytest.fixture(scope="module")
def make_bundle_module(tmp_path_factory: pytest.TempPathFactory, pki: Keys) -> Path:
    import time

    from agent.host import bundle_writer, keys
    from tests.conftest import COMPATIBLE, make_image

    tmp = tmp_path_factory.mktemp("fuzz-bundle")
    out = tmp / "v2.bundle"
    bundle_writer.create(out, sign=keys.load_signing_key(pki.signer_key).sign,
                         chain_pem=pki.signer_crt.read_bytes(), compatible=COMPATIBLE, version="2.0",
                         security_version=1, build_time=int(time.time()),
                         sources=[bundle_writer.PayloadSource("rootfs", "rootfs",
                                                              make_image(tmp / "img", 4096, "2.0"),
                                                              False, 65536)])
    return out


@pytest.fixture(scope="module")
def regional(deployed: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz-regional")
    ctl = start_controller(tmp / "regional", parent=deployed.ctl.url, parent_interval=3600,
                           tick_interval=3600, body_timeout=2.0)
    t = Target(ctl, _routes(ctl, deployed.ctl.url), deployed.token, deployed.aid, deployed.bid, set())
    r = requests.get(f"{ctl.url}/DEFAULT/controller/v1/dev1", timeout=10,
                     headers={"Authorization": f"TargetToken {t.token}"})
    assert r.status_code == 200  # the parent vouched for dev1: later requests reach the handlers
    yield t
    ctl.stop()


# --- what goes into a request ---------------------------------------------------------------------
ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
HUGE = ["99999999999999999999", "9223372036854775808", "-1", "0", "1e400", "0x10", "١٢", "1.5",
        "..", "%2e%2e%2f", "DEFAULT/../x"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | ODD_TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(ODD_TEXT, kids, max_size=4),
    max_leaves=20)
FIELDS = ["id", "token", "site", "tags", "name", "devices", "bundle", "device", "group", "percent",
          "policy", "status", "data", "mode", "csr", "ak_public_pem", "kind", "execution", "result",
          "finished", "details", "progress", "cnt", "of", "code", "canary_percent", "window"]


def shaped(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Bodies that look like the real ones, with any value in any field."""
    return st.dictionaries(st.sampled_from(FIELDS), kids, max_size=6)


BODY = st.one_of(
    JSON, shaped(JSON), shaped(shaped(JSON)),
    st.builds(lambda e, f, d: {"status": {"execution": e, "result": {"finished": f}, "details": d}},
              st.sampled_from(["closed", "proceeding", "canceled", "rejected", "x"]) | JSON,
              st.sampled_from(["success", "failure", "none"]) | JSON, JSON),
    st.builds(lambda m, d: {"mode": m, "data": d}, st.sampled_from(["merge", "replace", "remove"]) | JSON,
              st.dictionaries(ODD_TEXT, ODD_TEXT | JSON, max_size=4)),
)


def _param(name: str, t: Target, draw: Any) -> str:
    real = {"tenant": "DEFAULT", "cid": "dev1", "aid": str(t.aid), "mid": str(t.bid), "fn": "b.bundle",
            "id": "dev2", "rid": "1", "verb": "pause"}
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return real.get(name, "x")
    if choice == 1:
        return quote(draw(st.sampled_from(HUGE)), safe="")
    if choice == 2:
        return str(draw(st.integers(-(1 << 70), 1 << 70)))
    return quote(draw(ODD_TEXT), safe="") or "x"


@st.composite
def request_for(draw: Any, t: Target, route: tuple[str, str]) -> tuple[str, str, dict[str, str],
                                                                       bytes | None]:
    method, pattern = route
    t.seen.add(route)
    path = re.sub(r"\{(\w+)\}", lambda m: _param(m.group(1), t, draw), pattern)
    if draw(st.booleans()):
        path += "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in draw(st.dictionaries(
            st.sampled_from(["rollout", "device", "filename", "c"]), ODD_TEXT | st.sampled_from(HUGE),
            max_size=3)).items())
    auth = draw(st.sampled_from([f"TargetToken {t.token}", f"Bearer {t.ctl.token}", "TargetToken nope",
                                 "Bearer ", "Basic x", ""]))
    headers = {"Authorization": auth} if auth else {}
    if draw(st.booleans()):
        headers["Prefer"] = draw(st.sampled_from(["wait=0.01", "wait=-5", "wait=1e400", "wait=nan",
                                                  "wait=x"]))
        headers["If-None-Match"] = draw(st.sampled_from(['"x"', "*", ""]))
    if draw(st.booleans()):
        headers["Idempotency-Key"] = draw(ODD_TEXT.filter(lambda s: s.isascii() and s.isprintable())
                                          .map(lambda s: s.strip() or "k"))
    body: bytes | None = None
    if method in ("POST", "PUT"):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            body = draw(st.binary(max_size=200))
        elif kind == 1:
            body = None
        else:
            body = json.dumps(draw(BODY)).encode()
    return method, path, headers, body


def _check(t: Target, method: str, path: str, headers: dict[str, str], body: bytes | None) -> None:
    r = requests.request(method, t.ctl.url + path, headers=headers, data=body, timeout=30)
    assert r.status_code < 500, (method, path, headers, body[:300] if body else body, r.status_code,
                                 r.text[:500])


NASTY: list[bytes] = [
    b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json.loads
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"status": {"execution": "closed", "result": {"finished": "success"}, "details": 5}}',
    b'{"status": {"execution": "closed", "details": [1, {"x": 2}]}}',
    b'{"bundle": 99999999999999999999, "device": "dev1"}', b'{"bundle": 1e400, "group": "g"}',
    b'{"bundle": true, "device": "dev1"}', b'{"bundle": 1, "device": 5}', b'{"bundle": 1, "percent": "x"}',
    b'{"id": 5, "tags": "abc"}', b'{"id": "d", "tags": [1, 2]}', b'{"id": "d", "token": 123}',
    b'{"name": ["g"], "devices": "dev1"}', b'{"bundle": 1, "group": "g", "policy": [1, 2]}',
    b'{"bundle": 1, "group": "g", "policy": {"window": "soon"}}', b'{"mode": 5, "data": {"a": "b"}}',
    b'{"data": {"a": 1}}', b'{"data": "a"}', b'{"csr": 5}', b"NaN", b'{"a": NaN}', b'{"x": Infinity}',
    b"1" * 5000, b"\xff\xfe\x00", b"",
]


def _fixed(t: Target) -> None:
    """Every route with each known-bad input, and with ids too large for SQLite."""
    for method, pattern in t.routes:
        for value in ("99999999999999999999", "9223372036854775808", "-1", "abc"):
            path = re.sub(r"\{(aid|mid|rid)\}", value, pattern)
            path = re.sub(r"\{(\w+)\}", lambda m: {"tenant": "DEFAULT", "cid": "dev1", "id": "dev2",
                                                   "fn": "b.bundle", "verb": "pause"}.get(m.group(1), "x"),
                          path)
            for auth in (f"TargetToken {t.token}", f"Bearer {t.ctl.token}"):
                _check(t, method, path, {"Authorization": auth},
                       b"{}" if method in ("POST", "PUT") else None)
        if method in ("POST", "PUT"):
            path = re.sub(r"\{(\w+)\}", lambda m: {"tenant": "DEFAULT", "cid": "dev1", "id": "dev2",
                                                   "aid": str(t.aid), "mid": str(t.bid), "rid": "1",
                                                   "fn": "b.bundle", "verb": "pause"}.get(m.group(1), "x"),
                          pattern)
            for body in NASTY:
                for auth in (f"TargetToken {t.token}", f"Bearer {t.ctl.token}"):
                    _check(t, method, path, {"Authorization": auth, "Content-Type": "application/json"},
                           body)


def _still_serving(t: Target) -> None:
    r = requests.get(f"{t.ctl.url}/DEFAULT/controller/v1/dev1", timeout=10,
                     headers={"Authorization": f"TargetToken {t.token}"})
    assert r.status_code == 200 and "config" in r.json()
    assert requests.get(f"{t.ctl.url}/api/v1/devices", timeout=10,
                        headers={"Authorization": f"Bearer {t.ctl.token}"}).status_code == 200


PER_ROUTE = 25  # generated requests per route and controller (about 1,200 in all)
FUZZ = settings(max_examples=PER_ROUTE, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _fuzz_route(t: Target, route: tuple[str, str]) -> None:
    @FUZZ
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        _check(t, *data.draw(request_for(t, route)))

    fuzz()


def _fuzz_every_route(t: Target) -> None:
    for route in t.routes:
        _fuzz_route(t, route)
    assert t.seen == set(t.routes)


def test_known_bad_inputs_get_4xx_on_every_route(deployed: Target) -> None:
    assert len(deployed.routes) >= 20
    _fixed(deployed)
    _still_serving(deployed)


def test_generated_requests_to_every_central_route_never_get_5xx(deployed: Target) -> None:
    _fuzz_every_route(deployed)
    _still_serving(deployed)


def test_generated_requests_to_every_regional_route_never_get_5xx(regional: Target) -> None:
    _fixed(regional)
    _fuzz_every_route(regional)
    _still_serving(regional)
