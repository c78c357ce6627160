"""The ``console`` command group: the technician console, its PIN, and the host's answer to a challenge.

    edgeops console                      run the console on this terminal (the serial unit does)
    edgeops console set-pin              store the technician PIN (scrypt, 0600); asks twice
    edgeops console watch-usb            offer (or install) signed bundles from USB sticks (a unit)
    edgeops console answer CHALLENGE     sign a device's challenge (host: technician key)
    edgeops console issue-technician     certify a technician key with the offline root (host)
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from agent.cli.common import add_config_option, command, config_path
from agent.errors import UsageError


def register(sub: Any) -> None:
    p = command(
        sub, "console", "the technician console (serial port or terminal), its PIN and challenges",
        "edgeops console --config /etc/edgeops/agent.toml",
        description="Without a subcommand: run the technician console on this terminal "
                    "(docs/console.md).")
    add_config_option(p)
    p.set_defaults(func=_run)
    cs = p.add_subparsers(dest="console_command", metavar="SUBCOMMAND")
    s = command(cs, "set-pin", "store the technician PIN as a slow hash (0600)",
                "edgeops console set-pin")
    add_config_option(s)
    s.add_argument("--pin-stdin", action="store_true",
                   help="read the PIN from one line of stdin (provisioning) instead of asking twice")
    s.set_defaults(func=_set_pin)
    w = command(cs, "watch-usb", "watch for USB sticks and offer or install their bundles "
                                 "by the [console] usb policy (needs the udev extra)",
                "edgeops console watch-usb")
    add_config_option(w)
    w.set_defaults(func=_watch_usb)
    a = command(cs, "answer", "sign a console challenge with a technician key (host)",
                "edgeops console answer 'edgeops-console-v1 gw-0042 6b1f… 1796400300' \\\n"
                "    --key tech/technician.key --cert tech/technician.crt")
    a.add_argument("challenge", help="the whole 'edgeops-console-v1 ...' line the device shows")
    a.add_argument("--key", type=Path, required=True, help="technician.key")
    a.add_argument("--cert", type=Path, required=True, help="technician.crt")
    a.set_defaults(func=_answer)
    t = command(cs, "issue-technician", "certify a technician key with the root (host)",
                "edgeops console issue-technician --root pki/root --out tech --name 'Alice Example'")
    t.add_argument("--root", type=Path, required=True, help="the root directory (keys init-root)")
    t.add_argument("--out", type=Path, required=True, help="empty directory for the key and cert")
    t.add_argument("--name", required=True, help="the technician's name (certificate subject)")
    t.add_argument("--days", type=int, default=90, help="validity (default 90)")
    t.set_defaults(func=_issue)


def _run(a: argparse.Namespace) -> int:
    from agent.core import config as config_mod
    from agent.device import console

    return console.run(config_mod.load(config_path(a.config)))


def _set_pin(a: argparse.Namespace) -> int:
    from agent.core import config as config_mod
    from agent.core.console_auth import check_pin_policy
    from agent.device import console

    cfg = config_mod.load(config_path(a.config))
    if a.pin_stdin:
        pin = sys.stdin.readline().strip()
    else:
        pin = getpass.getpass("new technician PIN: ")
        check_pin_policy(pin)
        if getpass.getpass("again: ") != pin:
            raise UsageError("the two PINs differ", hint="run 'edgeops console set-pin' again")
    path = console.set_pin(cfg, pin)
    print(f"technician PIN stored in {path} (scrypt, mode 0600)")
    return 0


def _watch_usb(a: argparse.Namespace) -> int:
    from contextlib import contextmanager

    from agent.adapters import usb
    from agent.core import config as config_mod
    from agent.device import usb_updates
    from agent.device.updater import Updater, open_device

    cfg = config_mod.load(config_path(a.config))
    if cfg.console.usb == "off":
        print("[console] usb = \"off\": not watching")
        return 0

    @contextmanager
    def updater() -> Any:
        dev = open_device(cfg)
        try:
            yield Updater(dev)
        finally:
            dev.close()

    watcher = usb_updates.UsbWatcher(updater, cfg.state_dir, cfg.console.usb)
    monitor = usb.UdevMonitor()
    for event in usb_updates.sticks(monitor.present()):  # a stick inserted before the start
        watcher.handle(event)
    for event in usb_updates.sticks(monitor):
        watcher.handle(event)
        for line in watcher.messages:
            print(line, flush=True)
        watcher.messages.clear()
    return 0


def _answer(a: argparse.Namespace) -> int:
    from agent.host import technician

    print(technician.answer(a.challenge, a.key, a.cert))
    return 0


def _issue(a: argparse.Namespace) -> int:
    from agent.host import technician

    pair = technician.issue_technician(a.root, a.out, name=a.name, days=a.days)
    print(f"technician key {pair.key_path}, certificate {pair.cert_path}")
    return 0
