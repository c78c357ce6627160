"""The dashboard in a real browser: Debian's headless chromium, driven by Selenium through chromedriver.

A controller on 127.0.0.1 with 300 registered devices (DDI clients from tests/ddidevices.py
report for the canary wave). The tests log in, read the fleet page, start a canary rollout
with the form, pause and resume it with the buttons, and watch the page (refreshed by its
own script) show the rollout paused on a failing device with the reason. Screenshots go to
``$EDGEOPS_SCREENSHOTS`` (default ``build/screenshots/``); README.md shows two of them,
copied to docs/img/.

Chromium runs with a fresh profile and without anything that reaches the network
(``CHROMIUM_FLAGS``); Selenium is given the driver's path, so selenium-manager downloads nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.host.simfleet import LocalController, start_controller
from tests.conftest import Keys
from tests.ddidevices import DdiDevice, register

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("EDGEOPS_SCREENSHOTS", ROOT / "build" / "screenshots"))
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1700")
DEVICES = 300
WAIT = 30  # seconds for the page's own refresh (every 5 s) to show a change
# The page's refresh replaces the elements it redraws: one found just before a refresh is gone
# when its text is read. A wait then looks again instead of failing (CI saw this once).
REDRAWN = (StaleElementReferenceException,)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def fleet(tmp_path: Path, pki: Keys, make_bundle: Callable[..., Path]) -> Iterator[
        tuple[LocalController, dict[str, DdiDevice]]]:
    ctl = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=1.0, flush_interval=0.5)
    devices = {d.device_id: d for d in register(ctl, DEVICES)}
    with open(make_bundle("2.0", size=4096), "rb") as f:
        ctl.api("POST", "/bundles?filename=release-2.0.edgeops", data=f)
    yield ctl, devices
    ctl.stop()


def shot(driver: object, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    return path


def text_of(driver: object, element_id: str) -> str:
    """The element's text, looked up again if a refresh replaced it between finding and reading."""
    for _ in range(4):
        try:
            return str(driver.find_element(By.ID, element_id).text)  # type: ignore[attr-defined]
        except REDRAWN:
            continue
    return str(driver.find_element(By.ID, element_id).text)  # type: ignore[attr-defined]


def wait_for(driver: object, seconds: float = WAIT) -> WebDriverWait:  # type: ignore[type-arg]
    return WebDriverWait(driver, seconds, ignored_exceptions=REDRAWN)


def wait_text(driver: object, element_id: str, wanted: str) -> None:
    wait_for(driver).until(lambda d: d.find_elements(By.ID, element_id) and text_of(d, element_id) == wanted)


def accept_confirm(driver: object) -> None:
    """The page's script asks before starting a rollout: the dialog proves the script loaded."""
    WebDriverWait(driver, 5).until(expected_conditions.alert_is_present()).accept()


def log_in(driver: object, ctl: LocalController) -> None:
    driver.get(ctl.url + "/login")  # type: ignore[attr-defined]
    driver.delete_all_cookies()  # type: ignore[attr-defined]  # a session of an earlier test's controller
    driver.get(ctl.url + "/")  # type: ignore[attr-defined]
    assert "/login" in driver.current_url  # type: ignore[attr-defined]  # no session: the login page
    driver.find_element(By.ID, "token").send_keys(ctl.token)  # type: ignore[attr-defined]
    driver.find_element(By.ID, "login").click()  # type: ignore[attr-defined]
    wait_for(driver).until(lambda d: d.find_elements(By.ID, "total"))


def start_canary(driver: object, threshold: str) -> None:
    Select(driver.find_element(By.ID, "start-group")).select_by_value("all")  # type: ignore[attr-defined]
    for field, value in (("start-canary", "5"), ("start-threshold", threshold)):
        box = driver.find_element(By.ID, field)  # type: ignore[attr-defined]
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "start").click()  # type: ignore[attr-defined]
    accept_confirm(driver)
    wait_for(driver).until(lambda d: d.find_elements(By.ID, "rollout-status"))


def test_login_shows_the_whole_fleet(browser: object, fleet: tuple[LocalController, dict[str, DdiDevice]]
                                     ) -> None:
    ctl, devices = fleet
    for d in list(devices.values())[:120]:  # some devices have polled: online
        d.step(lambda _: None)
    log_in(browser, ctl)
    assert text_of(browser, "total") == str(DEVICES)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr")) == 50  # type: ignore[attr-defined]
    wait_for(browser).until(lambda d: text_of(d, "online") == "120")  # after the batched write
    assert text_of(browser, "never") == str(DEVICES - 120)
    assert f"{DEVICES} matching devices" in text_of(browser, "page-info")
    shot(browser, "dashboard-fleet")


def test_canary_pauses_on_a_failing_device_and_resumes(browser: object, fleet: tuple[
        LocalController, dict[str, DdiDevice]]) -> None:
    ctl, devices = fleet
    log_in(browser, ctl)
    start_canary(browser, threshold="0.05")
    assert text_of(browser, "rollout-status") == "running"
    rid = int(browser.find_element(By.ID, "rollout").get_attribute("data-rollout"))  # type: ignore[attr-defined]
    canary = ctl.fleet.wave_members(rid, 0)
    assert len(canary) == DEVICES * 5 // 100

    # The operator pauses and resumes by hand while the canary installs.
    browser.find_element(By.ID, "pause").click()  # type: ignore[attr-defined]
    wait_text(browser, "rollout-status", "paused")
    browser.find_element(By.ID, "resume").click()  # type: ignore[attr-defined]
    wait_text(browser, "rollout-status", "running")

    # The canary reports: one device fails its health check; the gate pauses the rollout and the
    # page, refreshing itself, shows why.
    bad = canary[len(canary) // 2]
    for did in canary:
        devices[did].step(lambda d: "health probe 'app' failed after 3 tries" if d == bad else None)
    wait_text(browser, "rollout-status", "paused")
    failing = text_of(browser, "failing")
    assert bad in failing and "health probe 'app' failed after 3 tries" in failing
    assert "1 of 15 devices in the wave failed" in text_of(browser, "rollout-reason")
    shot(browser, "dashboard-paused")

    # The device's own page has the action and its reason.
    browser.find_element(By.LINK_TEXT, bad).click()  # type: ignore[attr-defined]
    wait_for(browser).until(lambda d: d.find_elements(By.ID, "history"))
    assert "failure" in text_of(browser, "history") and "failed after 3 tries" in text_of(browser, "history")


def test_resume_with_skip_goes_on_after_a_failed_canary(browser: object, fleet: tuple[
        LocalController, dict[str, DdiDevice]]) -> None:
    ctl, devices = fleet
    log_in(browser, ctl)
    start_canary(browser, threshold="0.05")
    rid = int(browser.find_element(By.ID, "rollout").get_attribute("data-rollout"))  # type: ignore[attr-defined]
    canary = ctl.fleet.wave_members(rid, 0)
    for did in canary:
        devices[did].step(lambda d: "broken" if d == canary[0] else None)
    wait_text(browser, "rollout-status", "paused")
    Select(browser.find_element(By.ID, "resume-choice")).select_by_value("skip")  # type: ignore[attr-defined]
    browser.find_element(By.ID, "resume").click()  # type: ignore[attr-defined]
    wait_text(browser, "rollout-status", "running")
    assert ctl.api("GET", f"/rollouts/{rid}")["current_wave"] == 1
    shot(browser, "dashboard-resumed")
