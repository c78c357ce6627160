"""edgeops fleet-sim: run a scenario of simulated devices against a real controller on loopback."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from agent.cli.common import command
from agent.errors import UsageError


def register(sub: Any) -> None:
    p = command(sub, "fleet-sim", "simulate a fleet (sites, links, a rollout) against a real "
                "controller on 127.0.0.1", "edgeops fleet-sim canary-bad-release --devices 200")
    p.add_argument("scenario", nargs="?", help="a scenario name (tools/fleet_sim/scenarios) or a .toml file")
    p.add_argument("--list", action="store_true", help="list the bundled scenarios")
    p.add_argument("--devices", type=int, help="override the scenario's device count")
    p.add_argument("--time-scale", type=float, help="simulated seconds per real second")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the simulation's random choices (default 1)")
    p.add_argument("--db", help="controller database URL (default: a SQLite file in --data)")
    p.add_argument("--data", type=Path,
                   help="keep the controller's files here (default: a temporary directory)")
    p.add_argument("--until", choices=("settled", "converged"), default="settled",
                   help="stop when the rollout stopped and devices settled, or once every device "
                   "runs the release")
    p.add_argument("--json", action="store_true", help="print the whole report (every device) as JSON")
    p.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> int:
    from agent.host import fleet_sim

    if a.list:
        for path in sorted(fleet_sim.SCENARIOS.glob("*.toml")):
            sc = fleet_sim.Scenario.load(path)
            print(f"{path.stem:22} {sc.devices:6} devices  {sc.description}")
        return 0
    if not a.scenario:
        raise UsageError("name a scenario (edgeops fleet-sim --list shows them)")
    sc = fleet_sim.Scenario.load(fleet_sim.scenario_path(a.scenario))
    if a.devices is not None:
        if not 1 <= a.devices <= fleet_sim.MAX_DEVICES:
            raise UsageError(f"--devices must be from 1 to {fleet_sim.MAX_DEVICES}")
        sc = sc.with_(devices=a.devices)
    if a.time_scale is not None:
        if a.time_scale <= 0:
            raise UsageError("--time-scale must be positive")
        sc = sc.with_(time_scale=a.time_scale)
    with tempfile.TemporaryDirectory(prefix="edgeops-fleet-sim-") as tmp:
        report = fleet_sim.run(sc, a.data or Path(tmp), seed=a.seed, db_url=a.db, until=a.until)
    out = report.summary()
    if a.json:
        out = {**out, "devices": report.devices, "controller_versions": report.controller_versions,
               "rollout": report.rollout}
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
