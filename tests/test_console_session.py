"""The console session in-process (plain text in, text out): what a power cut during the PIN
check leaves, an idle login lapsing, a bug kept to one line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from agent.core import console_auth
from agent.core.config import load
from agent.device import console

PIN = "246813"


def _session(device_dir: Path, lines: str, **kw: object) -> tuple[console.Session, io.StringIO]:
    cfg = load(device_dir / "agent.toml")
    out = io.StringIO()
    return console.Session(cfg, console.Terminal(io.StringIO(lines), out), **kw), out  # type: ignore[arg-type]


def test_an_attempt_counts_before_its_pin_is_checked(device_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    console.set_pin(load(device_dir / "agent.toml"), PIN)

    def power_cut(rec: object, pin: str) -> bool:
        raise SystemExit("power cut during the slow hash")

    monkeypatch.setattr(console_auth, "pin_matches", power_cut)
    session, _ = _session(device_dir, "login\n999999\n")
    with pytest.raises(SystemExit):
        session.run()
    kept = json.loads((device_dir / "state" / "console" / "lockout.json").read_text())
    assert kept["failures"] == 1


def test_a_good_login_clears_the_counted_attempt(device_dir: Path) -> None:
    console.set_pin(load(device_dir / "agent.toml"), PIN)
    session, out = _session(device_dir, f"login\n999999\nlogin\n{PIN}\nexit\n")
    session.run()
    kept = json.loads((device_dir / "state" / "console" / "lockout.json").read_text())
    assert kept["failures"] == 0 and "logged in (pin)" in out.getvalue()


def test_login_without_a_pin_set_counts_nothing(device_dir: Path) -> None:
    session, out = _session(device_dir, "login pin\nlogin pin\nlogin pin\nlogin pin\nexit\n")
    session.run()
    assert "no technician PIN is set" in out.getvalue() and "locked" not in out.getvalue()


def test_an_idle_login_lapses_before_the_next_command(device_dir: Path) -> None:
    console.set_pin(load(device_dir / "agent.toml"), PIN)
    now = [1_900_000_000.0]
    session, out = _session(device_dir, "", clock=lambda: now[0])
    session.term.inp = io.StringIO(f"{PIN}\n")
    session.one("login")
    assert session.who == "pin", out.getvalue()
    now[0] += session.cfg.console.idle_logout + 1
    session.one("reboot")
    assert session.who is None
    assert "(logged out after being idle)" in out.getvalue() and "'reboot' needs a login" in out.getvalue()


def test_a_bug_in_a_command_is_one_line_and_the_console_goes_on(device_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.device import console_views

    def broken(up: object) -> list[str]:
        raise KeyError("slots")

    monkeypatch.setattr(console_views, "slot_lines", broken)
    with open(device_dir / "agent.toml", "a") as f:
        f.write("\n[console]\nopen_read_only = true\n")
    session, out = _session(device_dir, "slots\nstatus\nexit\n")
    assert session.run() == 0
    text = out.getvalue()
    assert "internal error (please report it): KeyError" in text and "Traceback" not in text
    assert "phase     idle" in text


def test_the_challenge_names_the_controller_id_of_a_fleet_toml_beside_agent_toml(
        device_dir: Path) -> None:
    # how the image ships a site's settings (image/stage-rootfs.sh --fleet): not in agent.toml
    (device_dir / "fleet.toml").write_text(
        '[fleet]\nurl = "http://10.0.2.100:8080"\ncontroller_id = "gw-0042"\n'
        'auth = "target"\ntoken = "0123456789abcdef0123456789abcdef"\n')
    (device_dir / "fleet.toml").chmod(0o600)
    cfg = load(device_dir / "agent.toml")
    assert cfg.fleet is None
    session, out = _session(device_dir, "login key\n\nexit\n")
    session.run()
    assert session.id == "gw-0042"
    assert "edgeops-console-v1 gw-0042 " in out.getvalue()


def test_the_challenge_names_the_id_read_from_the_boards_serial(device_dir: Path) -> None:
    # one image, many devices: the id comes from the hardware (controller_id_file)
    serial = device_dir / "product_serial"
    serial.write_text("qemu-7\n")
    (device_dir / "fleet.toml").write_text(
        f'[fleet]\nurl = "http://10.0.2.100:8080"\ncontroller_id_file = "{serial}"\n'
        'auth = "target"\ntoken = "0123456789abcdef0123456789abcdef"\n')
    (device_dir / "fleet.toml").chmod(0o600)
    session, out = _session(device_dir, "login key\n\nexit\n")
    session.run()
    assert session.id == "qemu-7"
    assert "edgeops-console-v1 qemu-7 " in out.getvalue()
