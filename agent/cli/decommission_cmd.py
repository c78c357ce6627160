"""edgeops decommission: erase this device's fleet membership (argument parsing only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli.common import add_config_option, command, config_path
from agent.errors import UsageError


def register(sub: Any) -> None:
    p = command(
        sub, "decommission",
        "erase the identity key, tokens, journal, models, buffers and edgeops's TPM indices",
        "systemctl stop edgeops-agent.service\nedgeops decommission --yes",
        description="Run on the device as it leaves the fleet, with the agent stopped; the "
                    "controller side is 'edgeops controller device revoke ID'. Afterwards the "
                    "slots keep their OS and the next boot provisions the device as a factory "
                    "one, with no identity and no token (docs/boards.md, 'Decommission'). "
                    "Running it again finishes a run a power cut stopped.")
    add_config_option(p)
    p.add_argument("--yes", action="store_true", help="really erase (there is no undo)")
    p.add_argument("--no-tpm", action="store_true", help="leave the TPM's NV indices alone")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_decommission)


def _decommission(a: argparse.Namespace) -> int:
    from agent.core import config as config_mod
    from agent.device import decommission

    if not a.yes:
        raise UsageError("decommission erases this device's identity, tokens and journal for "
                         "good; pass --yes to do it")
    cfg = config_mod.load(config_path(a.config))
    report = decommission.decommission(cfg, tpm=not a.no_tpm)
    if a.json:
        print(json.dumps({"erased": report.erased, "left": report.left}))
    else:
        for line in report.erased:
            print(f"erased: {line}")
        for line in report.left:
            print(f"left: {line}")
        print("decommissioned: the next boot provisions this device as a factory one")
    return 0
