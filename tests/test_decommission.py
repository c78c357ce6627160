"""edgeops decommission on a simulated device with a real TPM (swtpm on 127.0.0.1): what makes
the device a fleet member is gone, the TPM's edgeops NV indices with it, the run can be
finished after a power cut, and the device can be provisioned again as a factory one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.adapters.rot import tpm
from agent.adapters.rot.base import NotProvisioned
from agent.controller.ca import DeviceCA
from agent.core.config import load
from agent.device import decommission, provision
from agent.device.identity import DeviceIdentity
from agent.errors import DeviceBusy
from tests.conftest import Keys, run_cli
from tests.swtpm import SwTpm


def member(device_dir: Path, sw: SwTpm, pki: Keys, tmp_path: Path) -> Path:
    """The sim device made a fleet member: TPM anchored, an enrolled identity, a token, a
    model in its store and a buffer, as a provisioned device in the field has them."""
    cfg_path = device_dir / "agent.toml"
    cfg_path.write_text(cfg_path.read_text() + f'\n[tpm]\ntcti = "{sw.tcti}"\nrequired = true\n')
    cfg = load(cfg_path)
    assert provision.anchor_tpm(cfg) is not None
    root = tpm.TpmRoot(cfg.tpm, cfg.state_dir)
    ident = DeviceIdentity(root, cfg.state_dir)
    public = ident.ensure_key()
    ca = DeviceCA.init(tmp_path / "ca")
    ca.enrol("gw-1", public, root.ak_public_pem(), root.kind)
    ident.store_certificate(ca.issue("gw-1", public, now=time.time()))
    (device_dir / "fleet.toml").write_text(
        '[fleet]\nurl = "http://127.0.0.1:9"\ncontroller_id = "gw-1"\nauth = "target"\n'
        'token = "0123456789abcdef"\n')
    (cfg.state_dir / "models/detector").mkdir(parents=True)
    (cfg.state_dir / "models/detector/model.bin").write_bytes(b"weights" * 100)
    (cfg.state_dir / "buffers").mkdir()
    (cfg.state_dir / "buffers/metrics.0").write_bytes(b"samples")
    return cfg_path


def test_decommission_erases_membership_and_tpm_indices(device_dir: Path, sw: SwTpm, pki: Keys,
                                                         tmp_path: Path) -> None:
    cfg_path = member(device_dir, sw, pki, tmp_path)
    cfg = load(cfg_path)
    assert (cfg.state_dir / "tpm" / f"{'identity_key'}.sealed").exists()
    out = run_cli("decommission", "--config", cfg_path, "--yes")
    assert out.returncode == 0, out.stderr
    assert "erased: TPM NV index" in out.stdout and "(rollback counter)" in out.stdout
    assert list(cfg.state_dir.iterdir()) == []  # journal, identity, keystore, models, buffers
    assert not (device_dir / "fleet.toml").exists()
    with pytest.raises(NotProvisioned):
        tpm.TpmRoot(cfg.tpm, cfg.state_dir).check_keyring(pki.root_crt.read_bytes())


def test_decommissioned_device_provisions_as_a_factory_one(device_dir: Path, sw: SwTpm, pki: Keys,
                                                           tmp_path: Path) -> None:
    cfg = load(member(device_dir, sw, pki, tmp_path))
    decommission.decommission(cfg)
    again = provision.provision(cfg, provision.Factory("A", "1.0", 1))
    assert again.changed and again.floor == 1
    assert provision.anchor_tpm(cfg) is not None  # a fresh anchor: nothing of the old one left


def test_a_run_cut_short_is_finished_by_running_again(device_dir: Path, sw: SwTpm, pki: Keys,
                                                      tmp_path: Path) -> None:
    cfg = load(member(device_dir, sw, pki, tmp_path))
    # power lost after the identity went: the marker and the rest of the state are still there
    (cfg.state_dir / decommission.MARKER).write_text("edgeops decommission in progress\n")
    for f in (cfg.state_dir / "identity").iterdir():
        f.unlink()
    report = decommission.decommission(cfg)
    assert list(cfg.state_dir.iterdir()) == []
    assert any("journal.db" in line for line in report.erased)
    assert decommission.decommission(cfg).erased == [  # and once more: nothing left to do
        f"decommission marker {cfg.state_dir / decommission.MARKER}"]


def test_decommission_needs_yes_and_the_device_lock(device_dir: Path) -> None:
    no = run_cli("decommission", "--config", device_dir / "agent.toml")
    assert no.returncode == 2 and "pass --yes" in no.stderr
    assert (device_dir / "state/journal.db").exists()
    import fcntl
    import os

    fd = os.open(device_dir / "state/lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(DeviceBusy):
            decommission.decommission(load(device_dir / "agent.toml"))
    finally:
        os.close(fd)
    assert (device_dir / "state/journal.db").exists()
