"""The journal is removed, emptied or replaced at every life-cycle phase: nothing is lost.

A sim device committed a bundle with security_version 3 (floor 3) and then stops in each
phase of a second install (security_version 4) — killed right after the journal committed
that phase, as a power cut would leave it. Then its journal is deleted, truncated to 0 bytes,
or replaced by an older copy of itself from before the floor rose. Each time:

* the loss is found before anything acts on it: ``status`` says so, a bundle below the floor
  the witness knows is refused as a rollback, any other install with ``JournalLost`` (exit 22),
  and nothing of the device (boot environment, slots) changes;
* ``journal recover`` restores exactly the status the device had before the loss;
* from there the device settles and goes on: the floor never drops below 3, a lower bundle
  never installs, a higher one commits.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.journal import Journal
from agent.core import lifecycle
from agent.core.config import load
from agent.core.lifecycle import Phase
from agent.device import recovery
from agent.device.updater import Updater, open_device
from agent.errors import JournalLost, RollbackRefused
from agent.host import sim
from tests.conftest import Keys, make_image, run_cli

FAILING = {"retries": 1, "deadline": 5, "interval": 0.1,
           "probe": [{"type": "tcp", "host": "127.0.0.1", "port": 9, "name": "app port"}]}
LOSSES = ("remove", "empty", "replace")


class Killed(BaseException):
    """The process dies right after the journal committed the phase (and its witness followed)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: Keys) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("loss")
    dev = base / "pristine"
    sim.init_device(dev, image=make_image(base / "v1.img", 300_000, "1.0"), keyring=pki.root_crt,
                    slot_size=1 << 20)
    out = {"pristine": dev}
    for name, sv, health in (("v3", 3, None), ("v4", 4, None), ("v4bad", 4, FAILING), ("v1", 1, None),
                             ("v5", 5, None)):
        b = base / f"{name}.bundle"
        img = make_image(base / f"{name}.img", 300_000, name)
        args: list[str | Path] = ["bundle", "create", "--key", pki.signer_key, "--cert", pki.signer_crt,
                                  "--compatible", "edgeops-sim", "--version", name,
                                  "--security-version", str(sv), "--payload", f"rootfs={img}", "-o", b]
        if health:
            h = base / f"{name}.health.json"
            h.write_text(json.dumps(health))
            args += ["--health", h]
        run_cli(*args, check=True)
        out[name] = b
    shutil.copy(dev / "state" / "journal.db", base / "journal-before-floor.db")  # floor 0, same id
    out["older"] = base / "journal-before-floor.db"
    up = updater(dev)
    install(up, out["v3"])
    reboot_and_cycle(up, dev)
    assert up.journal.security_floor == 3 and up.status()["booted_slot"] == "B"
    up.dev.close()
    return out


def updater(d: Path) -> Updater:
    return Updater(open_device(load(d / "agent.toml")), sleep=lambda s: None)


def install(up: Updater, bundle: Path) -> None:
    up.install(io.BytesIO(bundle.read_bytes()))


def reboot_and_cycle(up: Updater, d: Path) -> None:
    sim.SimFirmware(d).reboot()
    up.messages.clear()
    up.rebooted = False
    up.cycle()


@pytest.fixture
def killed_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Phase | None]]:
    """Set [phase]: the next journal commit into that phase is the last thing the process does."""
    target: list[Phase | None] = [None]
    real = Journal.apply

    def apply(self: Journal, t: lifecycle.Transition, **kw: Any) -> None:
        real(self, t, **kw)
        if t.state.phase is target[0]:
            target[0] = None
            raise Killed

    monkeypatch.setattr(Journal, "apply", apply)
    yield target


def bring_to(phase: Phase, d: Path, world: dict[str, Path], kill: list[Phase | None]) -> None:
    """Leave the device in ``phase`` of an install of security_version 4, as a power cut would."""
    up = updater(d)
    try:
        if phase is Phase.IDLE:
            return
        bundle = world["v4bad" if phase is Phase.REVERTING else "v4"]
        if phase in (Phase.WRITING, Phase.WRITTEN):
            kill[0] = phase
            with pytest.raises(Killed):
                install(up, bundle)
            return
        install(up, bundle)
        if phase is Phase.TRIAL_PENDING:
            return
        kill[0] = phase
        with pytest.raises(Killed):
            reboot_and_cycle(up, d)
    finally:
        up.dev.close()
        assert updater_phase(d) == phase


def updater_phase(d: Path) -> Phase:
    j = Journal(d / "state" / "journal.db")
    try:
        return j.state().phase
    finally:
        j.close()


def lose(d: Path, how: str, world: dict[str, Path]) -> None:
    db = d / "state" / "journal.db"
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    if how == "remove":
        db.unlink()
    elif how == "empty":
        db.write_bytes(b"")
    else:
        shutil.copy(world["older"], db)


def device_bytes(d: Path) -> tuple[str, ...]:
    return tuple(hashlib.sha256((d / n).read_bytes()).hexdigest()
                 for n in ("uboot.env", "slot-a.img", "slot-b.img"))


def settle(d: Path) -> Updater:
    for _ in range(4):
        up = updater(d)
        up.cycle()
        if up.journal.state().phase is Phase.IDLE and not up.rebooted:
            return up
        up.dev.close()
        sim.SimFirmware(d).reboot()
    raise AssertionError("the device did not settle")


@pytest.mark.parametrize("how", LOSSES)
@pytest.mark.parametrize("phase", list(Phase), ids=str)
def test_journal_loss_at_every_phase(world: dict[str, Path], tmp_path: Path, killed_at: list[Phase | None],
                                     phase: Phase, how: str) -> None:
    d = tmp_path / "dev"
    shutil.copytree(world["pristine"], d)
    bring_to(phase, d, world, killed_at)
    up = updater(d)
    before = up.status()
    up.dev.close()
    assert before["journal"] == "ok" and before["security_floor"] >= 3

    lose(d, how, world)
    up = updater(d)
    try:
        assert up.status()["journal"].startswith("lost: ")
        bytes_before = device_bytes(d)
        with pytest.raises(RollbackRefused, match="below the device floor 3"):
            install(up, world["v1"])
        with pytest.raises(JournalLost, match="does not match its witness"):
            install(up, world["v5"])
        with pytest.raises(JournalLost):
            up.cycle()
        assert device_bytes(d) == bytes_before
        said = recovery.recover(up)
        assert said.startswith("journal recovered from its witness")
        after = up.status()
    finally:
        up.dev.close()
    assert after == before, f"{phase}/{how}: {said}"

    up = settle(d)
    try:
        assert up.journal.security_floor >= 3
        booted = up.status()["booted_slot"]
        assert up.journal.slots()[booted].state == "good"
        with pytest.raises(RollbackRefused):
            install(up, world["v1"])
        install(up, world["v5"])
        reboot_and_cycle(up, d)
        assert up.journal.security_floor == 5 and up.status()["slots"][up.status()["booted_slot"]][
            "version"] == "v5"
    finally:
        up.dev.close()


def test_through_the_command_line(world: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "dev"
    shutil.copytree(world["pristine"], d)
    cfg = d / "agent.toml"
    lose(d, "remove", world)
    proc = run_cli("install", world["v5"], "--config", cfg)
    assert proc.returncode == 22
    assert "journal recover" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert run_cli("install", world["v1"], "--config", cfg).returncode == 12
    assert run_cli("agent", "--once", "--config", cfg).returncode == 22
    assert "lost:" in run_cli("journal", "status", "--config", cfg).stdout
    out = run_cli("journal", "recover", "--config", cfg, check=True).stdout
    assert "security floor 3" in out and "journal.db.lost-" in out
    assert "nothing to recover" in run_cli("journal", "recover", "--config", cfg, check=True).stdout
    assert "floor 3" in run_cli("status", "--config", cfg, check=True).stdout
    run_cli("agent", "--once", "--config", cfg, check=True)
    assert run_cli("install", world["v1"], "--config", cfg).returncode == 12


def test_a_journal_sqlite_cannot_read_is_set_aside_and_recovered(world: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    d = tmp_path / "dev"
    shutil.copytree(world["pristine"], d)
    cfg = d / "agent.toml"
    (d / "state" / "journal.db").write_bytes(b"\x13garbage" * 1000)
    proc = run_cli("status", "--config", cfg)
    assert proc.returncode == 20 and "journal recover" in proc.stderr
    out = run_cli("journal", "recover", "--config", cfg, check=True).stdout
    assert "set aside as journal.db.corrupt-" in out and "security floor 3" in out
    assert list((d / "state").glob("journal.db.corrupt-*"))


def test_another_devices_journal_is_refused(world: dict[str, Path], tmp_path: Path, pki: Keys) -> None:
    d, other = tmp_path / "dev", tmp_path / "other"
    shutil.copytree(world["pristine"], d)
    sim.init_device(other, image=make_image(tmp_path / "o.img", 1000, "o"), keyring=pki.root_crt)
    shutil.copy(other / "state" / "journal.db", d / "state" / "journal.db")
    up = updater(d)
    try:
        assert "re-created or replaced" in up.status()["journal"]
        with pytest.raises(JournalLost):
            install(up, world["v5"])
    finally:
        up.dev.close()


def test_a_damaged_witness_stops_installs_until_recovered(world: dict[str, Path], tmp_path: Path) -> None:
    """An edited witness (the floor lowered) does not verify: installs stop, and recovery takes
    the highest floor any source knows (here the intact journal's)."""
    d = tmp_path / "dev"
    shutil.copytree(world["pristine"], d)
    wf = d / "state" / "witness.json"
    wf.write_text(wf.read_text().replace('"security_floor": 3', '"security_floor": 0'))
    up = updater(d)
    try:
        assert "witness is damaged: its MAC does not verify" in up.status()["journal"]
        with pytest.raises(JournalLost):
            install(up, world["v5"])
        assert recovery.recover(up).startswith("journal recovered from the old journal")
        assert up.status()["security_floor"] == 3 and up.status()["journal"] == "ok"
    finally:
        up.dev.close()


def test_a_keystore_keys_the_witness(world: dict[str, Path], tmp_path: Path) -> None:
    """Once a root of trust is provisioned the witness is rewritten keyed by it; a record keyed
    by another device's key does not verify here."""
    from agent.adapters.rot.keystore import KeystoreRoot

    d = tmp_path / "dev"
    shutil.copytree(world["pristine"], d)
    cfg = load(d / "agent.toml")
    KeystoreRoot(cfg.state_dir).provision(cfg.keyring.read_bytes())
    up = updater(d)
    try:
        assert up.journal_finding().verdict == "refresh"
    finally:
        up.dev.close()
    assert '"keyed": true' in (d / "state" / "witness.json").read_text()
    up = updater(d)
    try:
        assert up.journal_finding().verdict == "ok"
    finally:
        up.dev.close()
    (d / "state" / "keystore" / "journal_witness.secret").write_bytes(b"another device" * 3)
    up = updater(d)
    try:
        assert "MAC does not verify" in up.status()["journal"]
    finally:
        up.dev.close()
