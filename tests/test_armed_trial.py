"""A trial armed for the next boot is not disarmed by an install unless asked (--replace-trial).

Installing writes the slot that holds the armed trial, and a bundle refused half-way (a
damaged block, a dropped link) then leaves that slot empty and the trial gone. So the
command line and the fleet agent refuse such an install in one line naming the trial; the
boot environment and the trial's slot stay byte-for-byte as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.core.config import load
from agent.device.updater import open_device
from agent.host import sim
from tests.conftest import BundleFactory, run_cli


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def boot_and_trial(d: Path) -> tuple[bytes, str]:
    return (d / "uboot.env").read_bytes(), hashlib.sha256((d / "slot-b.img").read_bytes()).hexdigest()


def status(cfg: Path) -> dict[str, object]:
    return dict(json.loads(run_cli("status", "--json", "--config", cfg, check=True).stdout))


def damaged(path: Path) -> Path:
    """The bundle with one payload byte flipped near its end: refused after most of it is written."""
    data = bytearray(path.read_bytes())
    data[-5000] ^= 1
    out = path.with_suffix(".damaged")
    out.write_bytes(bytes(data))
    return out


def test_an_install_over_an_armed_trial_is_refused(device_dir: Path, make_bundle: BundleFactory) -> None:
    cfg = device_dir / "agent.toml"
    run_cli("install", make_bundle("2.0"), "--config", cfg, check=True)
    before = boot_and_trial(device_dir)
    for bundle in (make_bundle("2.1"), damaged(make_bundle("2.2"))):
        proc = run_cli("install", bundle, "--config", cfg)
        assert proc.returncode == 21
        line = one_line_error(proc.stderr)
        assert "slot B holds version 2.0, armed to be tried at the next boot" in line
        assert "--replace-trial" in line
        assert boot_and_trial(device_dir) == before
    st = status(cfg)
    assert (st["phase"], st["trial_pending_slot"]) == ("trial-pending", "B")
    run_cli("sim", "reboot", "--config", cfg, check=True)
    assert "committed: slot B 2.0" in run_cli("agent", "--once", "--config", cfg, check=True).stdout


def test_replace_trial_says_it(device_dir: Path, make_bundle: BundleFactory) -> None:
    cfg = device_dir / "agent.toml"
    run_cli("install", make_bundle("2.0"), "--config", cfg, check=True)
    run_cli("install", make_bundle("2.1"), "--replace-trial", "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    assert "committed: slot B 2.1" in run_cli("agent", "--once", "--config", cfg, check=True).stdout


def test_a_trial_only_the_bootloader_knows_is_refused_too(device_dir: Path,
                                                          make_bundle: BundleFactory) -> None:
    cfg = device_dir / "agent.toml"
    dev = open_device(load(cfg))
    try:
        dev.bootloader.set_trial("B")  # fw_setenv by hand, or a journal recovered from an old witness
    finally:
        dev.close()
    before = boot_and_trial(device_dir)
    proc = run_cli("install", make_bundle("2.0"), "--config", cfg)
    assert proc.returncode == 21
    assert "a trial the journal does not know" in one_line_error(proc.stderr)
    assert boot_and_trial(device_dir) == before


def test_the_fleet_agent_waits_for_an_armed_trial(device_dir: Path, make_bundle: BundleFactory) -> None:
    import random

    from agent.adapters.ddi_http import DdiClient
    from agent.core.fleet_config import DownloadPolicy, FleetConfig
    from agent.core.outbox import Backoff
    from agent.device.fleet import FleetAgent
    from agent.device.updater import Updater
    from tests.fakeddi import Action, FakeDdi

    cfg = device_dir / "agent.toml"
    run_cli("install", make_bundle("2.0"), "--config", cfg, check=True)  # a technician's trial
    before = boot_and_trial(device_dir)
    fake = FakeDdi(token="t")
    try:
        fake.deploy(Action("4", make_bundle("3.0").read_bytes()))
        dev = open_device(load(cfg))
        try:
            fc = FleetConfig(url=fake.url, controller_id="dev1", auth="target", token="t", min_sleep=0,
                             download=DownloadPolicy(read_timeout=2, backoff=0.01))
            out = FleetAgent(Updater(dev, sleep=lambda s: None), DdiClient(fc), sleep=lambda s: None,
                             backoff=Backoff(base=0.01, cap=0.01, rng=random.Random(0))).poll_once()
        finally:
            dev.close()
        assert any("will retry" in m and "armed to be tried" in m for m in out.messages), out.messages
        assert fake.actions[0].closed is None and boot_and_trial(device_dir) == before
    finally:
        fake.close()
    sim.SimFirmware(device_dir).reboot()
    assert "committed: slot B 2.0" in run_cli("agent", "--once", "--config", cfg, check=True).stdout


@pytest.mark.parametrize("flag", [False, True])
def test_the_status_text_names_a_lost_journal(device_dir: Path, flag: bool) -> None:
    cfg = device_dir / "agent.toml"
    if flag:
        (device_dir / "state" / "journal.db").unlink()
    out = run_cli("status", "--config", cfg, check=True).stdout
    assert ("journal recover" in out) is flag
