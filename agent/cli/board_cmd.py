"""edgeops board: list and show board files, and check the running system against one."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from agent.cli.common import command
from agent.errors import DeviceError


def register(sub: Any) -> None:
    p = command(sub, "board", "board files: list, show, check the running system",
                "edgeops board list")
    ss = p.add_subparsers(dest="board_command", metavar="ACTION", required=True)
    command(ss, "list", "the board files installed", "edgeops board list").set_defaults(func=_list)
    s = command(ss, "show", "print a board file", "edgeops board show rpi4")
    s.add_argument("name", help="board name (as 'board list' shows it) or .toml path")
    s.set_defaults(func=_show)
    g = command(ss, "config", "print the agent.toml a device image of this board ships",
                "edgeops board config rpi4 > rootfs/etc/edgeops/agent.toml")
    g.add_argument("name", help="board name or .toml path")
    g.add_argument("--keyring", default="/etc/edgeops/keyring/root.crt",
                   help="the fleet's root certificates on the device")
    g.add_argument("--state-dir", default="/var/lib/edgeops",
                   help="the agent's state directory on the device (default /var/lib/edgeops)")
    g.add_argument("--tpm-tcti", help="TCTI of the TPM (default device:/dev/tpmrm0 when the board "
                                      "requires one)")
    g.set_defaults(func=_config)
    c = command(ss, "check", "validate this system against its board file",
                "edgeops board check --config dev/agent.toml")
    c.add_argument("--board", help="board name or .toml path (default: [device] board of --config)")
    c.add_argument("--config", help="agent config to cross-check (default $EDGEOPS_CONFIG)")
    c.add_argument("--root", type=Path, default=None,
                   help="look for devices, /proc and the env under DIR (an image or replica; "
                        "default /, or the device folder of a sim --config)")
    c.set_defaults(func=_check)


def _list(a: argparse.Namespace) -> int:
    from agent.adapters import boardfiles

    for name in boardfiles.available():
        b = boardfiles.load(name)
        print(f"{name:14} {b.backend:12} {b.description}")
    return 0


def _show(a: argparse.Namespace) -> int:
    from agent.adapters import boardfiles

    print(boardfiles.find(a.name).read_text(), end="")
    return 0


def _config(a: argparse.Namespace) -> int:
    from agent.adapters import boardfiles
    from agent.host import boardconfig

    print(boardconfig.agent_toml(boardfiles.load(a.name), keyring=a.keyring, state_dir=a.state_dir,
                            crl_dir=str(Path(a.keyring).parent), tpm_tcti=a.tpm_tcti), end="")
    return 0


def _check(a: argparse.Namespace) -> int:
    from agent.adapters import boardfiles
    from agent.core import config as config_mod
    from agent.device import boardcheck

    cfg = None
    cfg_arg = a.config or os.environ.get("EDGEOPS_CONFIG")
    if cfg_arg:
        cfg = config_mod.load(Path(cfg_arg))
    name = a.board or (cfg.board if cfg else None)
    if not name:
        raise DeviceError("no board named", hint="pass --board NAME or --config agent.toml")
    board = boardfiles.load(name)
    if a.root is not None:
        root = a.root.resolve()  # a relative root would be joined twice to relative settings
    elif cfg is not None and cfg.runtime == "sim":
        root = cfg.base  # a sim device's "disk" is its folder
    else:
        root = Path("/")
    problems = boardcheck.check(board, root, agent_compatible=cfg.compatible if cfg else None,
                            agent_backend=cfg.bootloader if cfg else None, config=cfg)
    for p in problems:
        print(f"problem: {p}")
    if problems:
        hint = ("a simulated device lives in a folder: pass --config DIR/agent.toml or --root DIR"
                if board.backend == "uboot" and board.name == "sim" and root == Path("/") else
                "apply the fixes listed above, then run 'edgeops board check' again")
        raise DeviceError(f"{len(problems)} problem(s) with board '{board.name}' under {root}",
                          hint=hint)
    print(f"ok: this system matches board '{board.name}' ({board.backend}, {len(board.slot_names)} slots)")
    return 0
