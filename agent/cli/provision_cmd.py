"""edgeops provision: record the factory slot as committed and good (argument parsing only)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cli.common import add_config_option, command, config_path
from agent.errors import UsageError

DEFAULT_RELEASE = Path("/etc/edgeops/release.toml")


def register(sub: Any) -> None:
    p = command(
        sub, "provision",
        "record the factory slot as committed and good, with its version and floor",
        "edgeops provision --root build/rootfs --slot A --config build/rootfs/etc/edgeops/agent.toml",
        description="Run once as a device leaves the factory: at image build time with --root "
                    "(the image's tree) and --slot, or on the first boot (the running slot). "
                    "A second run changes nothing.")
    add_config_option(p)
    p.add_argument("--root", type=Path,
                   help="an image tree: the config's state_dir is looked up below it")
    p.add_argument("--slot", help="the factory slot (default: the running slot; required "
                                  "with --root)")
    p.add_argument("--version", help="the factory release's version (default: from --release)")
    p.add_argument("--security-version", type=int,
                   help="its security_version, the device's first floor (default: from --release)")
    p.add_argument("--release", type=Path,
                   help=f"TOML with version and security_version (default {DEFAULT_RELEASE}, "
                        f"below --root when given)")
    p.add_argument("--no-tpm", action="store_true",
                   help="leave the TPM alone (image builds: the TPM is the device's); by default "
                        "a TPM the config names gets the keyring anchor and the counter")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_provision)


def _provision(a: argparse.Namespace) -> int:
    from agent.core import config as config_mod
    from agent.device import provision

    cfg = provision.rooted(config_mod.load(config_path(a.config)), a.root)
    if a.root is not None and not a.slot:
        raise UsageError("--root needs --slot: an image tree has no running slot")
    version, security_version = a.version, a.security_version
    if version is None or security_version is None:
        release = a.release or ((a.root / str(DEFAULT_RELEASE).lstrip("/")) if a.root
                                else DEFAULT_RELEASE)
        rv, rsv = provision.read_release(release)
        version = rv if version is None else version
        security_version = rsv if security_version is None else security_version
    slot = a.slot or provision.booted_factory_slot(cfg)
    result = provision.provision(cfg, provision.Factory(slot, version, security_version))
    anchored = None if a.no_tpm or a.root is not None else provision.anchor_tpm(cfg)
    if a.json:
        f = result.factory
        print(json.dumps({"changed": result.changed, "floor": result.floor,
                          "slot": f.slot if f else None, "version": f.version if f else None,
                          "security_version": f.security_version if f else None,
                          "tpm": anchored}))
    else:
        print(result.message)
        if anchored:
            print(anchored)
    return 0
