"""The console's place in the image: board files name the serial port, agent.toml carries it,
and the units that put the console on that port (and watch for sticks) pass systemd's check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.core import boardfile
from agent.core.config import parse
from agent.errors import ConfigError
from agent.host import boardconfig
from tests.test_image import needs_systemd, verify_units

ROOT = Path(__file__).resolve().parent.parent
BOARDS = sorted((ROOT / "boards").glob("*.toml"))


@pytest.mark.parametrize("path", [p for p in BOARDS if p.stem != "sim"], ids=lambda p: p.stem)
def test_every_real_board_names_its_console_port(path: Path) -> None:
    board = boardfile.parse(path.read_text(), str(path))
    assert board.console is not None and board.console.startswith("tty")


@pytest.mark.parametrize("value", ['"/dev/ttyS0"', '"ttyS0; reboot"', "0", '""'])
def test_a_console_that_is_not_a_tty_name_is_refused(value: str) -> None:
    text = (ROOT / "boards/rpi4.toml").read_text().replace('console = "ttyS0"', f"console = {value}")
    with pytest.raises(ConfigError, match="console must be a tty name"):
        boardfile.parse(text, "rpi4.toml")


def test_the_generated_agent_toml_names_the_console(tmp_path: Path) -> None:
    pytest.importorskip("tomli_w", reason="pip install tomli-w (the host extra)")
    board = boardfile.parse((ROOT / "boards/rpi5.toml").read_text(), "rpi5.toml")
    text = boardconfig.agent_toml(board)
    cfg = parse(text, tmp_path / "agent.toml")
    assert cfg.console.device == "ttyAMA10" and cfg.console.usb == "offer"


@needs_systemd
def test_the_console_and_usb_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (ROOT / "image/systemd").glob("*.service"):
        shutil.copy(unit, units)
    (units / "edgeops-console@ttyS0.service").symlink_to("edgeops-console@.service")
    assert verify_units(tmp_path, "edgeops-console@ttyS0.service", "edgeops-usb.service") == []
