"""The ``[console]`` section of agent.toml: who may use the console without a login, USB policy. Pure.

    [console]
    device = "ttyS0"            # the serial port (from the board file's [board] console)
    open_read_only = false      # read-only commands without a login (board policy)
    usb = "offer"               # "offer" on the console | "install" at once | "off"
    pin_file = "console/pin"    # relative to state_dir; 0600, written by 'console set-pin'
    idle_logout = 900           # seconds without input before a login lapses
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from agent.core.frozen import Frozen
from agent.errors import ConfigError

USB_POLICIES = ("offer", "install", "off")
_KEYS = {"device", "open_read_only", "usb", "pin_file", "idle_logout"}
_TTY = re.compile(r"tty[A-Za-z0-9]{1,16}")


class ConsoleSettings(Frozen):
    device: str | None = None
    open_read_only: bool = False
    usb: str = "offer"
    pin_file: str = "console/pin"
    idle_logout: float = 900.0


def check_tty(name: object, where: str) -> str:
    """A serial console device name as board files and units spell it (``ttyS0``,
    ``ttyAMA0``, ``ttyUSB0``): no path, nothing a unit name could not carry."""
    if not isinstance(name, str) or not _TTY.fullmatch(name):
        raise ConfigError(f"{where}: console must be a tty name such as 'ttyS0' or 'ttyAMA0'")
    return name


def parse_console(table: Any, where: str) -> ConsoleSettings:
    if table is None:
        return ConsoleSettings()
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [console] must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: [console] has unknown keys {', '.join(sorted(unknown))}")
    usb = table.get("usb", "offer")
    if usb not in USB_POLICIES:
        raise ConfigError(f"{where}: [console] usb must be one of {', '.join(USB_POLICIES)}")
    open_ro = table.get("open_read_only", False)
    if not isinstance(open_ro, bool):
        raise ConfigError(f"{where}: [console] open_read_only must be true or false")
    pin = table.get("pin_file", "console/pin")
    if not isinstance(pin, str) or not pin or ".." in PurePosixPath(pin).parts:
        raise ConfigError(f"{where}: [console] pin_file must be a path inside state_dir")
    idle = table.get("idle_logout", 900)
    if not isinstance(idle, int | float) or isinstance(idle, bool) or not 10 <= idle <= 86400:
        raise ConfigError(f"{where}: [console] idle_logout must be 10 to 86400 seconds")
    dev = table.get("device")
    return ConsoleSettings(device=check_tty(dev, where) if dev is not None else None,
                           open_read_only=open_ro, usb=str(usb), pin_file=pin,
                           idle_logout=float(idle))
