"""The web dashboard over HTTP, without a browser: sessions, CSRF, escaping, filters, paging, no 5xx.

A real controller on 127.0.0.1 over a real SQLite file (``simfleet.start_controller``);
requests plays the operator. The browser tests are tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.controller import dashboard_auth
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import Keys
from tests.ddidevices import DdiDevice, register

TOKEN = "test-token"  # what start_controller configures


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalController]:
    c = start_controller(tmp_path_factory.mktemp("dash"), tick_interval=3600)
    for i in range(30):
        c.api("POST", "/devices", {"id": f"d{i:03d}", "site": ("north", "south", "east")[i % 3],
                                   "tags": ["even"] if i % 2 == 0 else ["odd"]})
    c.api("POST", "/groups", {"name": "all", "devices": [f"d{i:03d}" for i in range(30)]})
    yield c
    c.stop()


def login(ctl: LocalController) -> requests.Session:
    s = requests.Session()
    r = s.post(ctl.url + "/login", data={"token": TOKEN, "next": "/"}, allow_redirects=False, timeout=10)
    assert r.status_code == 303, r.text
    return s


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert m, "no CSRF field on the page"
    return m.group(1)


def device_ids(html: str) -> list[str]:
    table = html.split('id="devices"', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<a href="/devices/[^"]+">([^<]+)</a>', table)


# --- auth -------------------------------------------------------------------------------------
def test_no_session_is_sent_to_the_login_page(ctl: LocalController) -> None:
    r = requests.get(ctl.url + "/?site=north", allow_redirects=False, timeout=10)
    assert r.status_code == 303
    assert r.headers["Location"] == "/login?next=" + quote("/?site=north", safe="")


def test_wrong_token_gets_no_session(ctl: LocalController) -> None:
    r = requests.post(ctl.url + "/login", data={"token": "not-it"}, allow_redirects=False, timeout=10)
    assert r.status_code == 401
    assert dashboard_auth.COOKIE not in r.cookies
    assert "not the operator token" in r.text


def test_session_cookie_is_httponly_strict_and_does_not_carry_the_token(ctl: LocalController) -> None:
    r = requests.post(ctl.url + "/login", data={"token": TOKEN}, allow_redirects=False, timeout=10)
    header = r.headers["Set-Cookie"]
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Max-Age=" in header
    value = r.cookies[dashboard_auth.COOKIE]
    assert TOKEN not in value and TOKEN not in header


def test_forged_cookie_is_refused(ctl: LocalController) -> None:
    s = login(ctl)
    good = s.cookies[dashboard_auth.COOKIE]
    expires, nonce, mac = good.split(".")
    forged = f"{int(expires) + 10**6}.{nonce}.{mac}"  # a longer life, same signature
    r = requests.get(ctl.url + "/", cookies={dashboard_auth.COOKIE: forged}, allow_redirects=False,
                     timeout=10)
    assert r.status_code == 303 and r.headers["Location"].startswith("/login")


def test_expired_session_is_refused() -> None:
    key = b"k" * 32
    value = dashboard_auth.issue(key, now=1000.0)
    assert dashboard_auth.check(key, value, 1000.0 + dashboard_auth.SESSION_LIFETIME - 1) is not None
    assert dashboard_auth.check(key, value, 1000.0 + dashboard_auth.SESSION_LIFETIME) is None


def test_post_without_the_csrf_token_is_forbidden(ctl: LocalController) -> None:
    s = login(ctl)
    r = s.post(ctl.url + "/ui/rollouts", data={"bundle": "1"}, allow_redirects=False, timeout=10)
    assert r.status_code == 403
    r = s.post(ctl.url + "/ui/rollouts", data={"bundle": "1", "csrf": "0" * 64}, allow_redirects=False,
               timeout=10)
    assert r.status_code == 403


def test_csrf_token_of_another_session_is_forbidden(ctl: LocalController) -> None:
    other = csrf_of(login(ctl).get(ctl.url + "/", timeout=10).text)
    s = login(ctl)
    r = s.post(ctl.url + "/logout", data={"csrf": other}, allow_redirects=False, timeout=10)
    assert r.status_code == 403


def test_post_from_another_origin_is_forbidden_even_with_the_token(ctl: LocalController) -> None:
    s = login(ctl)
    csrf = csrf_of(s.get(ctl.url + "/", timeout=10).text)
    r = s.post(ctl.url + "/logout", data={"csrf": csrf}, headers={"Origin": "http://evil.example"},
               allow_redirects=False, timeout=10)
    assert r.status_code == 403
    r = s.post(ctl.url + "/logout", data={"csrf": csrf}, headers={"Origin": ctl.url}, allow_redirects=False,
               timeout=10)
    assert r.status_code == 303


def test_logins_are_logged_without_tokens_or_cookies(ctl: LocalController,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeops.controller")
    requests.post(ctl.url + "/login", data={"token": "guess-0123456789"}, allow_redirects=False, timeout=10)
    s = login(ctl)
    assert "wrong token" in caplog.text and "logged in" in caplog.text
    for secret in ("guess-0123456789", TOKEN, s.cookies[dashboard_auth.COOKIE]):
        assert secret not in caplog.text


def test_logout_ends_the_session_in_this_browser(ctl: LocalController) -> None:
    s = login(ctl)
    r = s.post(ctl.url + "/logout", data={"csrf": csrf_of(s.get(ctl.url + "/", timeout=10).text)},
               allow_redirects=False, timeout=10)
    assert r.status_code == 303
    assert s.get(ctl.url + "/", allow_redirects=False, timeout=10).status_code == 303


def test_login_does_not_redirect_off_site(ctl: LocalController) -> None:
    r = requests.post(ctl.url + "/login", data={"token": TOKEN, "next": "//evil.example/"},
                      allow_redirects=False, timeout=10)
    assert r.headers["Location"] == "/"


def test_session_key_changes_with_the_operator_token(tmp_path: Path) -> None:
    a = dashboard_auth.session_key(tmp_path, "digest-a")
    assert dashboard_auth.session_key(tmp_path, "digest-a") == a
    assert dashboard_auth.session_key(tmp_path, "digest-b") != a
    assert (tmp_path / dashboard_auth.KEY_FILE).stat().st_mode & 0o077 == 0


# --- content ----------------------------------------------------------------------------------
def test_markup_in_a_device_site_renders_inert(ctl: LocalController) -> None:
    ctl.api("POST", "/devices", {"id": "evil1", "site": "<script>alert(1)</script>",
                                 "tags": ['"><img src=x onerror=alert(2)>']})
    s = login(ctl)
    for path in ("/", "/devices/evil1", "/?site=" + quote("<script>alert(1)</script>")):
        html = s.get(ctl.url + path, timeout=10).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
        assert "<script>alert" not in html and "<img src=x" not in html, path


def test_pages_forbid_inline_script(ctl: LocalController) -> None:
    r = login(ctl).get(ctl.url + "/", timeout=10)
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in r.text  # the one script is an external file of ours


def test_site_filter_lists_only_that_site(ctl: LocalController) -> None:
    html = login(ctl).get(ctl.url + "/?site=south&per=200", timeout=10).text
    ids = device_ids(html)
    assert ids == [f"d{i:03d}" for i in range(30) if i % 3 == 1]


def test_tag_filter_matches_whole_tags(ctl: LocalController) -> None:
    s = login(ctl)
    assert device_ids(s.get(ctl.url + "/?tag=odd&per=200", timeout=10).text) == \
        [f"d{i:03d}" for i in range(30) if i % 2]
    assert device_ids(s.get(ctl.url + "/?tag=od&per=200", timeout=10).text) == []  # no substring match


def test_pages_are_cut_in_the_database(ctl: LocalController) -> None:
    html = login(ctl).get(ctl.url + "/?per=10&page=2", timeout=10).text
    assert device_ids(html) == [f"d{i:03d}" for i in range(10, 20)]
    assert 'id="next"' in html and 'id="prev"' in html


def test_state_filter_never_seen_lists_devices_that_never_polled(ctl: LocalController) -> None:
    ctl.fleet.touch({"d000": ctl.fleet.clock()})
    s = login(ctl)
    assert "d000" not in device_ids(s.get(ctl.url + "/?state=never&per=200", timeout=10).text)
    assert device_ids(s.get(ctl.url + "/?state=online&per=200", timeout=10).text) == ["d000"]


def test_malformed_page_number_is_a_400_naming_it(ctl: LocalController) -> None:
    r = login(ctl).get(ctl.url + "/?page=-1", timeout=10)
    assert r.status_code == 400 and "?page=" in r.text


def test_unknown_device_is_a_404_page(ctl: LocalController) -> None:
    r = login(ctl).get(ctl.url + "/devices/nobody", timeout=10)
    assert r.status_code == 404 and "nobody" in r.text


def test_assets_are_served_by_the_controller(ctl: LocalController) -> None:
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        r = requests.get(ctl.url + "/ui/static/" + name, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith(kind) and r.content
    assert requests.get(ctl.url + "/ui/static/../app.py", timeout=10).status_code == 404


# --- no 5xx for any query ---------------------------------------------------------------------
PARAM = st.sampled_from(["tag", "site", "version", "state", "page", "per", "x"])
VALUE = st.one_of(st.text(max_size=200), st.integers().map(str), st.sampled_from(
    ["online", "failing", "0", "1e9", "\uff19", "%00", "-1", "200", "201", "9" * 30]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(PARAM, VALUE, max_size=5))
def test_any_fleet_query_is_answered_without_a_5xx(ctl: LocalController, query: dict[str, str]) -> None:
    r = shared_session(ctl).get(ctl.url + "/", params=query, allow_redirects=False, timeout=10)
    assert r.status_code in (200, 400), (query, r.status_code, r.text[:300])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["devices", "rollouts"]), ident=st.text(min_size=1, max_size=60))
def test_any_device_or_rollout_path_is_answered_without_a_5xx(ctl: LocalController, kind: str,
                                                               ident: str) -> None:
    r = shared_session(ctl).get(f"{ctl.url}/{kind}/{quote(ident, safe='')}", allow_redirects=False,
                                timeout=10)
    assert r.status_code < 500, (ident, r.status_code, r.text[:300])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(form=st.dictionaries(st.sampled_from(["bundle", "group", "canary_percent", "error_threshold",
                                             "choice", "threshold"]), VALUE, max_size=6),
       verb=st.sampled_from(["pause", "resume", "halt", "nope", "1"]))
def test_any_action_form_is_answered_without_a_5xx(ctl: LocalController, form: dict[str, str],
                                                   verb: str) -> None:
    s = shared_session(ctl)
    form = {**form, "csrf": _CSRF[0]}
    for path in ("/ui/rollouts", f"/ui/rollouts/1/{verb}", "/ui/rollouts/x/pause"):
        r = s.post(ctl.url + path, data=form, allow_redirects=False, timeout=10)
        assert r.status_code < 500, (path, form, r.status_code, r.text[:300])


_CSRF: list[str] = []
_SESSIONS: list[requests.Session] = []


def shared_session(ctl: LocalController) -> requests.Session:
    """One login for all of hypothesis' examples (a fixture would be made once per test anyway)."""
    if not _SESSIONS:
        s = login(ctl)
        _CSRF.append(csrf_of(s.get(ctl.url + "/", timeout=10).text))
        _SESSIONS.append(s)
    return _SESSIONS[0]


# --- the buttons, without a browser ---------------------------------------------------------------
@dataclass
class Canary:
    """A controller with 40 devices and one bundle; an operator logged in (session, CSRF)."""

    ctl: LocalController
    session: requests.Session
    csrf: str
    devices: dict[str, DdiDevice]
    bundle: int

    def start(self) -> int:
        r = self.session.post(self.ctl.url + "/ui/rollouts", allow_redirects=False, timeout=10, data={
            "csrf": self.csrf, "bundle": str(self.bundle), "group": "all", "canary_percent": "10",
            "error_threshold": "0.2"})
        assert r.status_code == 303, r.text
        return int(self.ctl.api("GET", "/rollouts")["rollouts"][-1]["id"])

    def post(self, path: str, **form: str) -> requests.Response:
        return self.session.post(self.ctl.url + path, data={"csrf": self.csrf, **form},
                                 allow_redirects=False, timeout=10)


@pytest.fixture
def canary(tmp_path: Path, pki: Keys, make_bundle: Callable[..., Path]) -> Iterator[Canary]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    devices = {d.device_id: d for d in register(c, 40)}
    with open(make_bundle("2.0", size=4096), "rb") as f:
        bundle = int(c.api("POST", "/bundles?filename=b.edgeops", data=f)["id"])
    s = login(c)
    yield Canary(c, s, csrf_of(s.get(c.url + "/", timeout=10).text), devices, bundle)
    c.stop()


def test_start_button_creates_a_canary_wave(canary: Canary) -> None:
    rid = canary.start()
    got = canary.ctl.api("GET", f"/rollouts/{rid}")
    assert got["status"] == "running" and got["wave_sizes"]["0"] == 4
    assert got["policy"]["error_threshold"] == 0.2


def test_failed_canary_device_pauses_and_the_page_names_its_reason(canary: Canary) -> None:
    rid = canary.start()
    members = canary.ctl.fleet.wave_members(rid, 0)
    for did in members:
        canary.devices[did].step(lambda d: "health probe 'app' failed" if d == members[0] else None)
    html = canary.session.get(canary.ctl.url + "/", timeout=10).text
    assert re.search(r'id="rollout-status">paused<', html)
    failing = html.split('id="failing"', 1)[1].split("</table>", 1)[0]
    assert members[0] in failing and "health probe &#x27;app&#x27; failed" in failing


def test_pause_and_resume_buttons_move_the_rollout(canary: Canary) -> None:
    rid = canary.start()
    assert canary.post(f"/ui/rollouts/{rid}/pause").status_code == 303
    assert canary.ctl.api("GET", f"/rollouts/{rid}")["status"] == "paused"
    assert canary.post(f"/ui/rollouts/{rid}/resume", choice="").status_code == 303
    assert canary.ctl.api("GET", f"/rollouts/{rid}")["status"] == "running"


def test_pausing_a_halted_rollout_is_a_409_page(canary: Canary) -> None:
    rid = canary.start()
    canary.ctl.api("POST", f"/rollouts/{rid}/halt")
    r = canary.post(f"/ui/rollouts/{rid}/pause")
    assert r.status_code == 409 and "halted" in r.text


def _paused_on_a_failure(canary: Canary) -> int:
    rid = canary.start()
    members = canary.ctl.fleet.wave_members(rid, 0)
    for did in members:
        canary.devices[did].step(lambda d: "broken" if d == members[0] else None)
    assert canary.ctl.api("GET", f"/rollouts/{rid}")["status"] == "paused"
    return rid


def test_resume_skip_goes_on_and_the_rollout_page_says_who(canary: Canary) -> None:
    rid = _paused_on_a_failure(canary)
    assert canary.post(f"/ui/rollouts/{rid}/resume", choice="skip").status_code == 303
    got = canary.ctl.api("GET", f"/rollouts/{rid}")
    assert got["status"] == "running" and got["current_wave"] == 1
    history = canary.session.get(f"{canary.ctl.url}/rollouts/{rid}", timeout=10).text
    history = history.split('id="rollout-history"', 1)[1].split("</table>", 1)[0]
    assert "operator via dashboard" in history and "skip" in history


def test_versions_over_time_replay_successes_in_order(tmp_path: Path) -> None:
    from agent.controller import dashboard_views
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet

    fleet = Fleet(open_database(str(tmp_path / "c.db")), tmp_path, clock=lambda: 1000.0)
    for did in ("a", "b", "c"):
        fleet.add_device(did)
    fleet.db.execute("UPDATE devices SET version = '1.0' WHERE id = 'c'")
    for version in ("2.0", "3.0"):
        fleet.db.execute("INSERT INTO bundles (version, compatible, sha256, sha1, md5, size, filename, "
                         "signer, created) VALUES (?, 'x', ?, 'b', 'c', 1, 'f', 's', 0)", [version, version])
    for did, bundle, at in (("a", 1, 100.0), ("b", 1, 500.0), ("a", 2, 900.0)):
        fleet.db.execute("INSERT INTO actions (device_id, bundle_id, status, created, updated) "
                         "VALUES (?, ?, 'success', ?, ?)", [did, bundle, at, at])
    history = dashboard_views.version_history(fleet, now=1000.0)
    assert len(history) == dashboard_views.PLOT_POINTS
    assert all(sum(c.values()) == 3 for _, c in history)  # every device, at every instant
    assert history[0][1] == {"earlier": 2, "1.0": 1}  # before the first success
    assert history[-1][1] == {"3.0": 1, "2.0": 1, "1.0": 1}
    middle = next(c for t, c in history if 500.0 <= t < 900.0)
    assert middle == {"2.0": 2, "1.0": 1}


def test_a_regional_controller_serves_no_dashboard(ctl: LocalController) -> None:
    from agent.controller.app import build_app
    from agent.controller.http import Settings

    paths = {r.resource.canonical for r in build_app(ctl.fleet, Settings(api_token="x", parent=ctl.url))
             .router.routes() if r.resource is not None}
    assert "/" not in paths and "/login" not in paths
    central = {r.resource.canonical for r in build_app(ctl.fleet, Settings(api_token="x")).router.routes()
               if r.resource is not None}
    assert {"/", "/login"} <= central
