"""Power may fail at any instant: the device still boots a committed version.

The installer and the agent are killed after each of their durable steps in
turn (tests/faults.py), the sim board loses power, and then the device is left
to the agent and the bootloader. At every kill point we assert: the device
boots a slot whose content equals a version the journal calls good, the
journal opens and matches its witness, and a fresh install then commits.

What a SIGKILL cannot show: the page cache survives it, so a missing fsync goes
unnoticed here. That is covered elsewhere: the U-Boot env is tested with writes
torn at every byte (test_uboot_env); grubenv and autoboot.txt are replaced by an
fsynced rename (test_rpi_tryboot: a crash before the rename keeps the old file);
the journal relies on SQLite's WAL with synchronous=FULL, not on our own ordering.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from agent.core.config import load
from agent.device.updater import Updater, open_device
from agent.host import sim
from tests.conftest import Keys, make_image, run_cli
from tests.faults import killed, run_with_kill, steps

IMAGE_SIZE = 2_500_000
SLOT = 4 << 20


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: Keys) -> dict[str, Path]:
    """A pristine device plus v2 and v3 bundles, built once and copied per kill point."""
    base = tmp_path_factory.mktemp("power")
    images = {v: make_image(base / f"{v}.img", IMAGE_SIZE, v) for v in ("1.0", "2.0", "3.0")}
    sim.init_device(base / "pristine", image=images["1.0"], keyring=pki.root_crt, slot_size=SLOT)
    out: dict[str, Path] = {"pristine": base / "pristine", **{f"img{v}": p for v, p in images.items()}}
    for v, sv in (("2.0", 1), ("3.0", 2)):
        b = base / f"v{v}.bundle"
        run_cli("bundle", "create", "--key", pki.signer_key, "--cert", pki.signer_crt,
                "--compatible", "edgeops-sim", "--version", v, "--security-version", str(sv),
                "--payload", f"rootfs={images[v]}", "--compress", "zstd", "-o", b, check=True)
        out[f"v{v}"] = b
    return out


def sha(path: Path, size: int = IMAGE_SIZE) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def settle(cfg: Path) -> None:
    """Let the device come back: the agent runs after every boot until nothing is pending."""
    for _ in range(4):
        run_cli("agent", "--once", "--config", cfg, check=True)
        up = Updater(open_device(load(cfg)), sleep=lambda s: None)
        phase = up.journal.state().phase
        up.dev.close()
        if phase == "idle":
            return
        run_cli("sim", "reboot", "--config", cfg, check=True)
    raise AssertionError(f"device did not settle: phase {phase}")


def assert_boots_good_version(dev: Path, world: dict[str, Path]) -> str:
    cfg = load(dev / "agent.toml")
    device = open_device(cfg)
    try:
        up = Updater(device)
        booted = device.runtime.booted_slot()
        info = up.journal.slots()[booted]
        assert info.state == "good", f"booted slot {booted} is {info.state}"
        assert info.version is not None
        assert sha(cfg.slots[booted]["rootfs"]) == sha(world[f"img{info.version}"]), \
            f"slot {booted} content is not version {info.version}"
        assert device.bootloader.primary() == booted
        assert (info.security_version or 0) >= up.journal.security_floor, "runs below its floor"
        # a cut between the journal's commit and its witness's leaves the witness behind, never
        # a journal the device would refuse as lost
        assert up.journal_finding().verdict != "lost", up.journal_finding().reason
        for name, other in up.journal.slots().items():
            if other.state == "good":
                assert sha(cfg.slots[name]["rootfs"]) == sha(world[f"img{other.version}"])
        return info.version
    finally:
        device.close()


def fresh_device(world: dict[str, Path], tmp_path: Path) -> Path:
    dev = tmp_path / "dev"
    shutil.copytree(world["pristine"], dev)
    return dev


def count_steps(args: list[str | Path]) -> int:
    return steps(run_with_kill(0, *args))


def test_power_cut_at_every_durable_step_of_an_install(world: dict[str, Path],
                                                       tmp_path_factory: pytest.TempPathFactory
                                                       ) -> None:
    probe = fresh_device(world, tmp_path_factory.mktemp("probe"))
    total = count_steps(["install", world["v2.0"], "--config", probe / "agent.toml"])
    assert total >= 8
    outcomes = set()
    for n in range(1, total + 1):
        dev = fresh_device(world, tmp_path_factory.mktemp(f"cut{n}"))
        cfg = dev / "agent.toml"
        proc = run_with_kill(n, "install", world["v2.0"], "--config", cfg)
        assert killed(proc), f"step {n}: {proc.stderr}"
        run_cli("sim", "power-cut", "--config", cfg, check=True)
        settle(cfg)
        outcomes.add(assert_boots_good_version(dev, world))
        # a fresh install still succeeds and commits
        run_cli("install", world["v3.0"], "--config", cfg, check=True)
        run_cli("sim", "reboot", "--config", cfg, check=True)
        settle(cfg)
        assert assert_boots_good_version(dev, world) == "3.0"
    # Early cuts keep 1.0; a cut after the trial was armed boots 2.0 once and commits it.
    assert outcomes == {"1.0", "2.0"}


def test_power_cut_at_every_durable_step_of_trial_and_commit(world: dict[str, Path],
                                                             tmp_path_factory: pytest.TempPathFactory
                                                             ) -> None:
    def armed() -> Path:
        dev = fresh_device(world, tmp_path_factory.mktemp("trial"))
        cfg = dev / "agent.toml"
        run_cli("install", world["v2.0"], "--config", cfg, check=True)
        run_cli("sim", "reboot", "--config", cfg, check=True)
        return dev

    probe = armed()
    total = count_steps(["agent", "--once", "--config", probe / "agent.toml"])
    assert total >= 3
    outcomes = set()
    for n in range(1, total + 1):
        dev = armed()
        cfg = dev / "agent.toml"
        proc = run_with_kill(n, "agent", "--once", "--config", cfg)
        assert killed(proc), f"step {n}: {proc.stderr}"
        run_cli("sim", "power-cut", "--config", cfg, check=True)
        settle(cfg)
        outcomes.add(assert_boots_good_version(dev, world))
    # Cut before the commit reached the bootloader: back on 1.0. After: 2.0 stays.
    assert outcomes == {"1.0", "2.0"}


def test_killed_installer_without_reboot_leaves_a_retryable_device(world: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    dev = fresh_device(world, tmp_path)
    cfg = dev / "agent.toml"
    total = count_steps(["install", world["v2.0"], "--config", fresh_device(world, tmp_path / "p")
                         / "agent.toml"])
    proc = run_with_kill(total // 2, "install", world["v2.0"], "--config", cfg)
    assert killed(proc)
    run_cli("install", world["v2.0"], "--config", cfg, check=True)
    run_cli("sim", "reboot", "--config", cfg, check=True)
    settle(cfg)
    assert assert_boots_good_version(dev, world) == "2.0"


def test_uncommitted_trial_is_left_by_the_bootloader_without_the_agent(world: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    dev = fresh_device(world, tmp_path)
    cfg = dev / "agent.toml"
    run_cli("install", world["v2.0"], "--config", cfg, check=True)
    firmware = sim.SimFirmware(dev)
    assert firmware.reboot() == "B"  # the one trial boot
    assert firmware.power_cut() == "A"  # never committed: the bootloader falls back by itself
    assert firmware.reboot() == "A"
    settle(cfg)
    assert assert_boots_good_version(dev, world) == "1.0"
