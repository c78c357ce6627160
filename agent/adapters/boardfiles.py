"""Find and read the installed board files: /etc, /usr/share, the wheel's data, the source tree.

Order is precedence: a board file an integrator drops in /etc/edgeops/boards wins over
the one the package ships. A wheel installs the shipped files under
``<prefix>/share/edgeops/boards`` (setup.cfg ``data_files``); a source checkout has them in
``boards/`` at its top.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agent.core.boardfile import Board, parse
from agent.errors import ConfigError

BOARD_DIRS = tuple(dict.fromkeys((
    Path("/etc/edgeops/boards"),
    Path("/usr/share/edgeops/boards"),
    Path(sys.prefix) / "share" / "edgeops" / "boards",
    Path(__file__).resolve().parents[2] / "boards",
)))


def find(name: str, dirs: tuple[Path, ...] = BOARD_DIRS) -> Path:
    if name.endswith(".toml") or "/" in name:
        return Path(name)
    for d in dirs:
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    raise ConfigError(f"no board file '{name}.toml' in {', '.join(map(str, dirs))}",
                      hint=f"choose one of: {', '.join(available(dirs)) or 'none installed'}")


def available(dirs: tuple[Path, ...] = BOARD_DIRS) -> list[str]:
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})


def load(name: str, dirs: tuple[Path, ...] = BOARD_DIRS) -> Board:
    path = find(name, dirs)
    try:
        return parse(path.read_text(), str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read board file {path}: {exc.strerror}") from None
