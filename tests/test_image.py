"""Device images: agent.toml generated from each board file, the staging script, the units."""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters import boardfiles
from agent.core import config
from agent.device import boardcheck
from agent.host import boardconfig
from tests.conftest import Keys, run_cli

ROOT = Path(__file__).resolve().parent.parent
REPO_BOARDS = (ROOT / "boards",)
STAGE = ROOT / "image" / "stage-rootfs.sh"
EDGEOPS = f"{sys.executable} -m agent.cli"


@pytest.mark.parametrize("name", boardfiles.available(REPO_BOARDS))
def test_generated_agent_config_agrees_with_its_board_file(name: str, tmp_path: Path) -> None:
    board = boardfiles.load(name, REPO_BOARDS)
    text = boardconfig.agent_toml(board, keyring="/etc/edgeops/keyring/root.crt")
    path = tmp_path / "agent.toml"
    path.write_text(text)
    cfg = config.parse(text, path)
    assert (cfg.board, cfg.compatible, cfg.bootloader) == (board.name, board.compatible, board.backend)
    assert cfg.bootloader_settings == board.settings
    assert cfg.health == board.health
    for spec in board.slots:
        want = spec.device.value if spec.device.kind == "path" else str(spec.device.resolve(Path("/")))
        assert cfg.slots[spec.slot][spec.cls] == tmp_path / want  # absolute paths stay absolute
    assert config.tpm_settings_from_toml(text, path).required == board.tpm_required
    assert not [p for p in boardcheck.check(board, tmp_path, agent_compatible=cfg.compatible,
                                        agent_backend=cfg.bootloader)
                if "agent.toml" in p.what]


_scalar = st.one_of(st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1),
                    st.floats(allow_nan=False), st.text(max_size=20))
_key = st.text(min_size=1, max_size=12)
_flat = st.one_of(_scalar, st.lists(_scalar, max_size=4),
                  st.dictionaries(_key, _scalar, max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_key, _flat, max_size=6),
       st.lists(st.dictionaries(_key, _scalar, min_size=1, max_size=3), max_size=3))
def test_toml_writer_round_trips(doc: dict[str, Any], probes: list[dict[str, Any]]) -> None:
    doc = {k: v for k, v in doc.items() if k != "probe"}
    if probes:
        doc["probe"] = probes
    assert tomllib.loads(tomli_w.dumps({"t": doc})) == {"t": doc}


def test_toml_writer_spells_special_floats() -> None:
    back = tomllib.loads(tomli_w.dumps({"t": {"a": math.inf, "b": -math.inf}}))["t"]
    assert back == {"a": math.inf, "b": -math.inf}
    assert math.isnan(tomllib.loads(tomli_w.dumps({"t": {"n": math.nan}}))["t"]["n"])


def stage(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(STAGE), "--edgeops", EDGEOPS, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(ROOT)})


def test_stage_rootfs_writes_a_config_the_agent_reads(tmp_path: Path, pki: Keys) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[fleet]\nurl = "https://ddi.example"\ncontroller_id = "gw-1"\n'
                     'auth = "target"\ntoken = "s3cret"\n')
    proc = stage(tmp_path, "--rootfs", rootfs, "--board", "uboot-arm64", "--keyring", pki.root_crt,
                 "--fleet", fleet, "--controller")
    assert proc.returncode == 0, proc.stderr
    etc = rootfs / "etc" / "edgeops"
    cfg = config.load(etc / "agent.toml")
    assert cfg.board == "uboot-arm64" and cfg.keyring == Path("/etc/edgeops/keyring/root.crt")
    assert (etc / "keyring" / "root.crt").read_bytes() == pki.root_crt.read_bytes()
    assert stat.S_IMODE((etc / "fleet.toml").stat().st_mode) == 0o600
    from agent.device.fleet import load_fleet

    assert load_fleet(etc / "agent.toml").controller_id == "gw-1"
    assert boardfiles.load("uboot-arm64", (rootfs / "usr/share/edgeops/boards",)).name == "uboot-arm64"
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "edgeops-agent.service").resolve().is_file()
    assert (wants / "edgeops-controller.service").resolve().is_file()
    assert (wants / "edgeops-provision.service").resolve().is_file()
    import configparser

    conf = configparser.ConfigParser()
    conf.read(rootfs / "etc/systemd/system.conf.d/edgeops-watchdog.conf")
    assert conf["Manager"]["RuntimeWatchdogSec"]  # a hung system is reset by hardware


@pytest.mark.parametrize("board, tty", [("x86-64-grub", "ttyS0"), ("rpi5", "ttyAMA10")])
def test_stage_rootfs_puts_the_console_on_the_boards_port_instead_of_its_getty(
        tmp_path: Path, pki: Keys, board: str, tty: str) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    proc = stage(tmp_path, "--rootfs", rootfs, "--board", board, "--keyring", pki.root_crt)
    assert proc.returncode == 0, proc.stderr
    units = rootfs / "etc/systemd/system"
    assert config.load(rootfs / "etc/edgeops/agent.toml").console.device == tty
    console = units / f"getty.target.wants/edgeops-console@{tty}.service"
    assert console.resolve() == (units / "edgeops-console@.service").resolve()
    assert console.resolve().is_file()
    # systemd's getty generator would start a login on the kernel's console port: masked
    assert os.readlink(units / f"serial-getty@{tty}.service") == "/dev/null"
    assert (units / "multi-user.target.wants/edgeops-usb.service").resolve().is_file()


@pytest.mark.parametrize("args, says", [
    (["--board", "no-such-board"], "no board file"),
    (["--board", "rpi4", "--keyring-is-missing"], "usage"),
])
def test_stage_rootfs_refuses_bad_input(tmp_path: Path, pki: Keys, args: list[str], says: str) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    proc = stage(tmp_path, "--rootfs", rootfs, "--keyring", pki.root_crt, *args)
    assert proc.returncode != 0 and says in proc.stderr
    assert not (rootfs / "etc/edgeops/agent.toml").exists()


def test_stage_rootfs_refuses_a_keyring_that_is_not_a_certificate(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    bad = tmp_path / "root.crt"
    bad.write_text("not a certificate\n")
    proc = stage(tmp_path, "--rootfs", rootfs, "--board", "rpi4", "--keyring", bad)
    assert proc.returncode == 2 and "not a PEM certificate" in proc.stderr
    assert list(rootfs.iterdir()) == []


def verify_units(root: Path, *units: str) -> list[str]:
    """systemd-analyze verify against a root holding the host's units plus ours; its complaints
    about our files (it exits 0 on unknown keys, so the text is what counts)."""
    if not (root / "usr/lib/systemd/system").exists():
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    exe = root / "usr/bin/edgeops"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                           *(f"/etc/systemd/system/{u}" for u in units)],
                          capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if "edgeops" in line] + ([f"exit {proc.returncode}"] if proc.returncode else [])


needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None
                                   or not Path("/usr/lib/systemd/system").is_dir(),
                                   reason="systemd-analyze missing (Debian package systemd)")


@needs_systemd
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (ROOT / "image/systemd").glob("*.service"):
        shutil.copy(unit, units)
    assert verify_units(tmp_path, "edgeops-agent.service", "edgeops-controller.service",
                        "edgeops-provision.service") == []
    # and the check can fail: a misspelt key is reported
    (units / "edgeops-agent.service").write_text(
        (units / "edgeops-agent.service").read_text().replace("RestartSec=", "RestartSecs="))
    assert any("RestartSecs" in line for line in verify_units(tmp_path, "edgeops-agent.service"))


def test_board_config_cli_prints_the_generated_file() -> None:
    out = run_cli("board", "config", "x86-64-grub", "--keyring", "/k/root.crt", check=True).stdout
    doc = tomllib.loads(out)
    assert doc["device"]["keyring"] == "/k/root.crt" and doc["device"]["crl_dir"] == "/k"
    assert doc["tpm"]["required"] is True
    bad = run_cli("board", "config", "nope")
    assert bad.returncode == 3 and "no board file" in bad.stderr
