"""LinuxRuntime.reboot: systemd does the reboot; its noise stays off the console, its refusal
does not pass silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.adapters.runtime import LinuxRuntime
from agent.errors import DeviceError


def fake_systemctl(tmp_path: Path, *, stderr: str, code: int) -> tuple[str, Path]:
    """A stand-in systemctl that records its argv and says what systemd 252 says."""
    argv_file = tmp_path / "argv"
    script = tmp_path / "systemctl"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {argv_file}\n"
                      f"printf '%s\\n' '{stderr}' >&2\nexit {code}\n")
    os.chmod(script, 0o755)
    return str(script), argv_file


def test_reboot_asks_systemd_with_the_reason(tmp_path: Path) -> None:
    exe, argv = fake_systemctl(tmp_path, stderr="", code=0)
    LinuxRuntime(("A", "B"), systemctl=exe).reboot("trial of 2.0")
    assert argv.read_text().splitlines() == ["reboot", "--message=trial of 2.0"]


def test_logind_noise_on_an_image_without_dbus_is_not_shown(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    exe, _ = fake_systemctl(tmp_path, stderr="Failed to connect to bus: No such file or directory",
                            code=0)
    LinuxRuntime(("A", "B"), systemctl=exe).reboot("technician console")
    out, err = capfd.readouterr()
    assert "Failed to connect to bus" not in out + err


def test_a_refused_reboot_is_an_error_naming_what_systemctl_said(tmp_path: Path) -> None:
    exe, _ = fake_systemctl(tmp_path, stderr="Access denied", code=1)
    with pytest.raises(DeviceError, match=r"reboot refused .*exit 1.*Access denied"):
        LinuxRuntime(("A", "B"), systemctl=exe).reboot("x")


def test_a_missing_systemctl_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot run"):
        LinuxRuntime(("A", "B"), systemctl=str(tmp_path / "absent")).reboot("x")
