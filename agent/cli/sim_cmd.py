"""edgeops sim: create a simulated board, reboot it, cut its power."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import command, config_path
from agent.errors import ConfigError


def register(sub: Any) -> None:
    p = command(sub, "sim", "a simulated A/B board made of files",
                "edgeops sim init dev --image rootfs-v1.ext4 --keyring pki/root/root.crt")
    ss = p.add_subparsers(dest="sim_command", metavar="ACTION", required=True)

    i = command(ss, "init", "create a device booted and committed on slot A",
                "edgeops sim init dev --image rootfs-v1.ext4 --keyring pki/root/root.crt "
                "--slot-size 512M")
    i.add_argument("dir", type=Path, help="a new directory for the device (its agent.toml, slots, env)")
    i.add_argument("--image", type=Path, required=True, help="rootfs image for slot A")
    i.add_argument("--keyring", type=Path, required=True, help="trusted root certificate")
    i.add_argument("--compatible", default="edgeops-sim",
                   help="the device's compatible string (default edgeops-sim)")
    i.add_argument("--version", default="1.0", help="the version slot A holds (default 1.0)")
    i.add_argument("--slot-size", help="bytes per slot, K/M/G suffixes (default 2x the image)")
    i.set_defaults(func=_init)

    for name, helptext, fn in (("reboot", "clean reboot: agents get SIGTERM", _reboot),
                               ("power-cut", "power loss: agents are killed mid-step", _cut)):
        r = command(ss, name, helptext, f"edgeops sim {name} --config dev/agent.toml")
        r.add_argument("--config", help="agent.toml of the sim device")
        r.set_defaults(func=fn)


def _init(a: argparse.Namespace) -> int:
    from agent.host import sim

    size = sim.parse_size(a.slot_size) if a.slot_size else None
    path = sim.init_device(a.dir, image=a.image, keyring=a.keyring, compatible=a.compatible,
                           version=a.version, slot_size=size)
    print(f"sim device ready: {path} (slot A, version {a.version}, booted and committed)")
    return 0


def _base(a: argparse.Namespace) -> Path:
    from agent.core import config as config_mod

    cfg = config_mod.load(config_path(a.config))
    if cfg.runtime != "sim":
        raise ConfigError(f"{cfg.path} is not a sim device")
    return cfg.base


def _reboot(a: argparse.Namespace) -> int:
    from agent.host import sim

    slot = sim.SimFirmware(_base(a)).reboot()
    print(f"rebooted: running slot {slot}")
    return 0


def _cut(a: argparse.Namespace) -> int:
    from agent.host import sim

    slot = sim.SimFirmware(_base(a)).power_cut()
    print(f"power restored: running slot {slot}")
    return 0
