"""Fleet commands: talk to a hawkBit-DDI controller (ours or a real hawkBit).

    edgeops fleet poll [--once]   finish boot/trial work, poll, install, report (loop by default)
    edgeops fleet status [--json] the action in flight and reports waiting for the link
    edgeops fleet flush           deliver queued reports now
"""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from agent.cli.common import add_config_option, command, config_path
from agent.core import config as config_mod


def register(sub: Any) -> None:
    fleet = command(sub, "fleet", "poll a hawkBit DDI controller, install, report",
                    "edgeops fleet poll --once")
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)

    def cmd(name: str, helptext: str, fn: Callable[[argparse.Namespace], int], example: str
            ) -> argparse.ArgumentParser:
        p = command(fsub, name, helptext, example)
        add_config_option(p, "; [fleet] in it or in fleet.toml beside it")
        p.set_defaults(func=fn)
        return p

    p = cmd("poll", "run the fleet loop: boot/trial work, poll, install, report", _poll,
            "edgeops fleet poll --once")
    p.add_argument("--once", action="store_true", help="one poll, then exit")
    s = cmd("status", "show the fleet action in flight and queued reports", _status,
            "edgeops fleet status --json")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    cmd("flush", "deliver queued reports now", _flush, "edgeops fleet flush")


@contextmanager
def _agent(a: argparse.Namespace) -> Iterator[Any]:
    from agent.adapters.ddi_http import DdiClient
    from agent.device.fleet import FleetAgent
    from agent.device.fleet_files import load_fleet
    from agent.device.updater import Updater, open_device

    path = config_path(a.config)
    cfg = config_mod.load(path)
    fleet = load_fleet(cfg)  # once: the agent below never reads agent.toml again
    dev = open_device(cfg)
    try:
        yield FleetAgent(Updater(dev), DdiClient(fleet))
    finally:
        dev.close()


def _poll(a: argparse.Namespace) -> int:
    from agent.device.push import LongPoll

    stop = False

    def _term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    with _agent(a) as agent:
        waker = LongPoll(agent.client, wait=agent.cfg.longpoll_wait)
        while True:
            agent.up.messages.clear()
            cycle = agent.up.cycle()
            for m in cycle.messages:
                print(m, flush=True)
            if cycle.rebooted:
                break
            out = agent.poll_once()
            for m in out.messages:
                print(m, flush=True)
            if out.error:
                print(f"poll failed, retrying in {out.sleep:.0f}s: {out.error}", flush=True)
            if a.once or out.rebooted or stop:
                break
            if agent.cfg.push == "longpoll" and out.error is None:
                waker.wait(out.sleep, agent.etag, stop=lambda: stop)
            else:
                waker.supported = False
                waker.wait(out.sleep, None, stop=lambda: stop)
    return 0


def _status(a: argparse.Namespace) -> int:
    with _agent(a) as agent:
        st = agent.status()
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    act = st["action"]
    print(f"controller       {st['controller']} (auth {st['auth']})")
    print(f"device phase     {st['phase']}")
    print(f"action           {act['id'] + ' ' + act['stage'] if act else '-'}")
    print(f"queued reports   {st['pending_reports']}")
    return 0


def _flush(a: argparse.Namespace) -> int:
    with _agent(a) as agent:
        r = agent.sync.flush(force=True)
    print(f"delivered {r.delivered}, set aside {r.rejected}"
          f"{', more waiting for the link' if r.remaining else ''}")
    return 0
