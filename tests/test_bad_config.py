"""Bad configuration is exit 3 with one line, found before a byte of the device is written.

A config that is not UTF-8, a ``state_dir`` that is no directory, and health checks that
cannot work (the device's ``[health]`` or a bundle's override) are refused up front; a trial
whose stored checks cannot run any more is reverted with the reason instead of leaving an
agent that exits 3 at every start with no verdict.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from agent.core import lifecycle
from agent.core.config import load
from agent.device.updater import Updater, open_device
from agent.host import sim
from tests.conftest import BundleFactory, allocated_blocks, run_cli


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("edgeops: error: ")
    return lines[0]


def edit(cfg: Path, old: str, new: str) -> None:
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new))


def untouched(device_dir: Path) -> tuple[bytes, str]:
    return ((device_dir / "uboot.env").read_bytes(),
            hashlib.sha256((device_dir / "slot-a.img").read_bytes()).hexdigest())


def test_a_config_that_is_not_utf8_is_exit_3(device_dir: Path) -> None:
    cfg = device_dir / "agent.toml"
    cfg.write_bytes(cfg.read_bytes() + b'\n# caf\xe9 (Latin-1)\n')
    proc = run_cli("status", "--config", cfg)
    assert proc.returncode == 3
    assert "not UTF-8" in one_line_error(proc.stderr)


@pytest.mark.parametrize("where", ["/dev/null", "file"])
def test_a_state_dir_that_is_not_a_directory_is_exit_3(device_dir: Path, where: str) -> None:
    cfg = device_dir / "agent.toml"
    target = "/dev/null" if where == "/dev/null" else str(device_dir / "slot-a.img")
    edit(cfg, 'state_dir = "state"', f'state_dir = "{target}"')
    for cmd in ("status", "agent"):
        proc = run_cli(cmd, *(["--once"] if cmd == "agent" else []), "--config", cfg)
        assert proc.returncode == 3, proc.stderr
        assert "is not a directory" in one_line_error(proc.stderr)


@pytest.mark.parametrize("old, new, words", [
    ("deadline = 60", 'deadline = "soon"', "health.deadline must be a number"),
    ("retries = 3", "retries = -1", "health.retries must be a whole number"),
    ('type = "disk"', 'type = "telepathy"', "health.probe[0].type must be one of"),
])
def test_health_that_cannot_work_is_refused_before_the_install(
        device_dir: Path, make_bundle: BundleFactory, old: str, new: str, words: str) -> None:
    cfg = device_dir / "agent.toml"
    edit(cfg, old, new)
    before = untouched(device_dir)
    proc = run_cli("install", make_bundle("2.0"), "--config", cfg)
    assert proc.returncode == 3
    assert words in one_line_error(proc.stderr)
    assert untouched(device_dir) == before
    assert allocated_blocks(device_dir / "slot-b.img") == 0


def test_status_still_reports_a_device_whose_health_table_cannot_work(device_dir: Path) -> None:
    """status shows no health checks, so it does not parse them (config.load(lazy=True)): a
    technician still sees the slots of a device whose [health] the agent and install refuse."""
    cfg = device_dir / "agent.toml"
    edit(cfg, "deadline = 60", 'deadline = "soon"')
    proc = run_cli("status", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "booted slot" in proc.stdout
    refused = run_cli("agent", "--once", "--config", cfg)
    assert refused.returncode == 3
    assert "health.deadline must be a number" in one_line_error(refused.stderr)


@pytest.mark.parametrize("override, words", [
    ({"deadline": "soon"}, "deadline must be a number"),
    ({"retries": -1}, "retries must be a whole number"),
    ({"probe": [{"type": "telepathy"}]}, "type must be one of"),
])
def test_bundle_health_that_cannot_work_is_refused_before_a_byte(
        device_dir: Path, make_bundle: BundleFactory, override: dict[str, object], words: str) -> None:
    # bundle_writer.create does not judge health ('edgeops bundle create' does): a forged or
    # foreign bundle can carry anything, and the device must refuse it before writing
    before = untouched(device_dir)
    proc = run_cli("install", make_bundle("2.0", health=override), "--config", device_dir / "agent.toml")
    assert proc.returncode == 13
    assert words in one_line_error(proc.stderr)
    assert untouched(device_dir) == before
    assert allocated_blocks(device_dir / "slot-b.img") == 0


def test_a_trial_whose_checks_cannot_run_is_reverted_with_the_reason(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    """Health overrides stored by an older agent (or edited in the journal) that this agent
    cannot parse: the trial is reverted at once, not left to an agent exiting 3 at every start."""
    cfg = load(device_dir / "agent.toml")
    dev = open_device(cfg)
    try:
        up = Updater(dev, sleep=lambda s: None)
        up.install(io.BytesIO(make_bundle("2.0").read_bytes()))
        st = up.journal.state()
        assert st.phase is lifecycle.Phase.TRIAL_PENDING
        up.journal.put("state", {**st.to_dict(), "health": {"deadline": "soon"}})
    finally:
        dev.close()
    sim.SimFirmware(device_dir).reboot()
    proc = run_cli("agent", "--once", "--config", device_dir / "agent.toml")
    assert proc.returncode == 0, proc.stderr
    assert "health checks cannot run" in proc.stdout and "deadline must be a number" in proc.stdout
    settled = run_cli("agent", "--once", "--config", device_dir / "agent.toml", check=True)
    assert "phase: idle" in settled.stdout
    st2 = run_cli("status", "--json", "--config", device_dir / "agent.toml", check=True).stdout
    assert '"booted_slot": "A"' in st2 and '"state": "bad"' in st2
