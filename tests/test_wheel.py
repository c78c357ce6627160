"""An installed edgeops, not a checkout: a wheel in a fresh venv lists boards and writes agent.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.adapters import boardfiles
from agent.core import config

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv with the wheel built from this tree (and its host extra) installed."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)  # pip wheel writes build/ into the tree it builds
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # noqa: E731
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src))
    if built.returncode != 0:
        pytest.fail(f"pip wheel failed: {built.stderr[-2000:]}")
    wheel = next((work / "dist").glob("edgeops-*.whl"))
    venv = work / "venv"
    run(sys.executable, "-m", "venv", str(venv)).check_returncode()
    got = run(str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[host]")
    if got.returncode != 0:
        pytest.skip(f"cannot install the wheel's dependencies here: {got.stderr.strip()[-300:]}")
    return venv / "bin"


def test_installed_wheel_lists_every_board_the_source_tree_ships(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run([installed / "edgeops", "board", "list"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert listed == set(boardfiles.available((ROOT / "boards",)))


def test_installed_wheel_writes_a_valid_agent_config(installed: Path, tmp_path: Path) -> None:
    proc = subprocess.run([installed / "edgeops", "board", "config", "rpi4"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = config.parse(proc.stdout, tmp_path / "agent.toml")
    assert (cfg.board, cfg.bootloader) == ("rpi4", "rpi_tryboot")
    assert tomllib.loads(proc.stdout)["device"]["compatible"] == cfg.compatible


def test_stage_rootfs_works_with_a_wheel_installed_edgeops(installed: Path, tmp_path: Path) -> None:
    from agent.host import keys

    root = keys.init_root(tmp_path / "root")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    proc = subprocess.run(["sh", str(ROOT / "image" / "stage-rootfs.sh"), "--rootfs", str(rootfs),
                           "--board", "x86-64-grub", "--keyring", str(root.cert_path),
                           "--edgeops", str(installed / "edgeops")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})  # no checkout on the path
    assert proc.returncode == 0, proc.stderr
    cfg = config.load(rootfs / "etc" / "edgeops" / "agent.toml")
    assert cfg.board == "x86-64-grub"
    assert (rootfs / "usr/share/edgeops/boards/x86-64-grub.toml").is_file()



def test_installed_wheel_carries_the_dashboard_assets(installed: Path) -> None:
    """The dashboard serves its script and stylesheet from package data: the wheel must hold them."""
    shipped = sorted(p.name for p in (ROOT / "agent" / "controller" / "web").iterdir())
    script = ("import sys; from importlib import resources; "
              "web = resources.files('agent.controller') / 'web'; "
              "print(' '.join(n for n in sys.argv[1:] if (web / n).is_file() and (web / n).read_bytes()))")
    proc = subprocess.run([installed / "python", "-c", script, *shipped], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == shipped
