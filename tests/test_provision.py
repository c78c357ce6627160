"""edgeops provision: the factory record a device image needs, written once, on a sim device."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from agent.adapters.journal import Journal
from agent.core import lifecycle
from agent.core.config import load
from agent.device import provision
from agent.device.updater import Updater, open_device
from agent.errors import ConfigError, StateError
from agent.host import sim
from tests.conftest import BundleFactory, Keys, make_image, run_cli


def unprovisioned(device_dir: Path) -> Path:
    """A sim device as a real image leaves the factory today: slot A written, no journal."""
    shutil.rmtree(device_dir / "state")
    return device_dir / "agent.toml"


def journal_dump(device_dir: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(device_dir / "state" / "journal.db")
    try:
        return [*db.execute("SELECT * FROM kv ORDER BY key"), *db.execute("SELECT * FROM slots"),
                *db.execute("SELECT * FROM history ORDER BY id")]
    finally:
        db.close()


def test_factory_records_are_what_sim_init_writes() -> None:
    f = provision.Factory("A", "1.0", 2)
    assert provision.factory_records(f, ("A", "B"), "factory image") == [
        lifecycle.SlotRecord("A", "good", "1.0", 2), lifecycle.SlotRecord("B", "empty"),
        lifecycle.RaiseFloor(2), lifecycle.History("provisioned", "A", "1.0", "factory image")]


def test_provision_records_the_factory_slot_and_the_floor(device_dir: Path) -> None:
    cfg = load(unprovisioned(device_dir))
    res = provision.provision(cfg, provision.Factory("A", "1.0", 3), now=1_700_000_000)
    assert res.changed and res.floor == 3
    j = Journal(cfg.journal_path)
    try:
        slots = j.slots()
        assert (slots["A"].state, slots["A"].version, slots["A"].security_version) == ("good", "1.0", 3)
        assert slots["B"].state == "empty"
        assert j.security_floor == 3 and j.trusted_time == 1_700_000_000
        assert [h.event for h in j.history()] == ["provisioned"]
    finally:
        j.close()


def test_a_second_run_changes_nothing(device_dir: Path) -> None:
    cfg = load(unprovisioned(device_dir))
    provision.provision(cfg, provision.Factory("A", "1.0", 1), now=1_700_000_000)
    before = journal_dump(device_dir)
    again = provision.provision(cfg, provision.Factory("A", "9.9", 7), now=1_800_000_000)
    assert not again.changed
    assert again.factory == provision.Factory("A", "1.0", 1)
    assert "nothing changed" in again.message
    assert journal_dump(device_dir) == before


def test_a_sim_device_counts_as_provisioned(device_dir: Path) -> None:
    cfg = load(device_dir / "agent.toml")
    res = provision.provision(cfg, provision.Factory("A", "1.0", 0))
    assert not res.changed and res.factory is not None and res.factory.version == "1.0"
    # ... and says so from then on in its own key, which history pruning cannot drop
    assert Journal(cfg.journal_path).get(provision.FACTORY_KEY)["slot"] == "A"


def test_a_journal_with_updates_but_no_factory_record_is_refused(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    cfg = load(unprovisioned(device_dir))
    j = Journal(cfg.journal_path)
    j.record([lifecycle.SlotRecord("B", "good", "2.0", 1)])
    j.close()
    with pytest.raises(StateError, match="no factory provisioning"):
        provision.provision(cfg, provision.Factory("A", "1.0", 1))


def test_an_unknown_slot_is_a_config_error(device_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no slot named 'C'"):
        provision.provision(load(unprovisioned(device_dir)), provision.Factory("C", "1.0", 0))


def test_rollback_after_the_first_update_needs_the_factory_record(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    """Fails on the code before provisioning existed: an image's factory slot was 'empty',
    so after the first update 'rollback' said "slot A holds no known-good version"."""
    cfg = load(unprovisioned(device_dir))
    provision.provision(cfg, provision.Factory("A", "1.0", 0))
    dev = open_device(cfg)
    try:
        up = Updater(dev, sleep=lambda s: None)
        with open(make_bundle("2.0", security_version=0), "rb") as f:
            up.install(f)
        sim.SimFirmware(device_dir).reboot()
        up.cycle()
        assert up.status()["slots"]["B"]["state"] == "good"
        assert up.status()["slots"]["A"]["version"] == "1.0"
        assert up.rollback() == "A"
    finally:
        dev.close()


def test_the_floor_refuses_an_older_bundle_from_the_first_install(
        device_dir: Path, make_bundle: BundleFactory) -> None:
    from agent.errors import RollbackRefused

    cfg = load(unprovisioned(device_dir))
    provision.provision(cfg, provision.Factory("A", "1.0", 2))
    dev = open_device(cfg)
    try:
        with pytest.raises(RollbackRefused), open(make_bundle("0.9", security_version=1), "rb") as f:
            Updater(dev, sleep=lambda s: None).install(f)
    finally:
        dev.close()


def test_root_puts_the_journal_below_the_image_tree(tmp_path: Path, pki: Keys) -> None:
    """Image build time: agent.toml says /var/lib/edgeops, the journal lands in ROOT/var/lib/edgeops."""
    etc = tmp_path / "tree" / "etc" / "edgeops"
    etc.mkdir(parents=True)
    cfg = etc / "agent.toml"
    cfg.write_text(run_cli("board", "config", "x86-64-grub", check=True).stdout)
    factory = tmp_path / "factory"
    out = run_cli("provision", "--config", cfg, "--root", factory, "--slot", "A",
                  "--version", "1.0", "--security-version", "1", "--json", check=True)
    assert json.loads(out.stdout) == {"changed": True, "floor": 1, "slot": "A", "version": "1.0",
                                      "security_version": 1, "tpm": None}
    assert (factory / "var/lib/edgeops/journal.db").is_file()
    again = run_cli("provision", "--config", cfg, "--root", factory, "--slot", "A",
                    "--version", "1.0", "--security-version", "1", check=True)
    assert "nothing changed" in again.stdout


def test_root_without_slot_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(run_cli("board", "config", "x86-64-grub", check=True).stdout)
    proc = run_cli("provision", "--config", cfg, "--root", tmp_path / "r", "--version", "1")
    assert proc.returncode == 2 and "--root needs --slot" in proc.stderr


def test_release_file_gives_version_and_floor(tmp_path: Path, pki: Keys) -> None:
    d = tmp_path / "dev"
    sim.init_device(d, image=make_image(tmp_path / "v1.img", 100_000, "1"), keyring=pki.root_crt)
    shutil.rmtree(d / "state")
    (tmp_path / "release.toml").write_text('version = "4.2"\nsecurity_version = 5\n')
    out = run_cli("provision", "--config", d / "agent.toml", "--slot", "A",
                  "--release", tmp_path / "release.toml", check=True)
    assert "slot A 4.2 committed and good, security floor 5" in out.stdout
    status = json.loads(run_cli("status", "--config", d / "agent.toml", "--json", check=True).stdout)
    assert status["slots"]["A"]["state"] == "good" and status["security_floor"] == 5


@pytest.mark.parametrize("text", ['version = 1\n', 'security_version = 1\n',
                                  'version = "1"\nsecurity_version = -1\n', 'not toml ='])
def test_a_bad_release_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(ConfigError):
        provision.read_release(tmp_path / "r.toml")
