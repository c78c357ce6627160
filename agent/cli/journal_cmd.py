"""edgeops journal: whether the journal matches its witness, and rebuilding it when it does not."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli.common import add_config_option, command, config_path


def register(sub: Any) -> None:
    p = command(sub, "journal", "the journal and its witness: status, recover",
                "edgeops journal status")
    js = p.add_subparsers(dest="journal_command", metavar="ACTION", required=True)

    s = command(js, "status", "say whether the journal is the one its witness knows",
                "edgeops journal status --json")
    add_config_option(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_status)

    r = command(js, "recover", "rebuild a lost, emptied or replaced journal from its witness "
                               "(never lowers the security floor; keeps the old file)",
                "edgeops journal recover")
    add_config_option(r)
    r.set_defaults(func=_recover)


def _status(a: argparse.Namespace) -> int:
    from agent.core import config as config_mod
    from agent.device.updater import Updater, open_device

    cfg = config_mod.load(config_path(a.config))
    dev = open_device(cfg)
    try:
        up = Updater(dev)
        finding = up.journal_finding()
        out = {"journal": str(dev.journal.path), "witness": str(cfg.witness_path),
               "verdict": finding.verdict, "reason": finding.reason,
               "identity": dev.journal.identity, "generation": dev.journal.generation}
    finally:
        dev.close()
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"journal  {out['journal']} ({str(out['identity'])[:8]}, generation {out['generation']})")
        print(f"witness  {out['witness']}")
        print(f"{'lost' if finding.verdict == 'lost' else 'ok'}: {finding.reason}")
    return 0


def _recover(a: argparse.Namespace) -> int:
    from agent.core import config as config_mod
    from agent.device import recovery
    from agent.device.updater import Updater

    cfg = config_mod.load(config_path(a.config))
    dev, aside = recovery.open_for_recovery(cfg)
    try:
        if aside is not None:
            print(f"journal SQLite cannot read was set aside as {aside.name}")
        print(recovery.recover(Updater(dev)))
    finally:
        dev.close()
    return 0
