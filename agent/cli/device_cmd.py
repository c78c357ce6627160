"""Device commands: install, status, history, rollback, mark-good, mark-bad, health, agent.

Argument parsing and output only: the updater does the work, ``agent.device.service`` runs
the ``agent`` loop. Imports of the device code happen inside the handlers, so parsing
``edgeops status`` loads nothing the command does not use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from agent.cli.common import add_config_option, command, config_path
from agent.errors import HealthCheckFailed, StateError, UsageError

if TYPE_CHECKING:
    from agent.cli.progress import Display
    from agent.device.updater import Updater


# The example that ends each command's --help.
EXAMPLES = {
    "install": "edgeops install https://updates.example.com/gateway-2.1.bundle",
    "status": "edgeops status --json",
    "history": "edgeops history -n 10",
    "rollback": "edgeops rollback",
    "mark-good": "edgeops mark-good    # e.g. from a unit that runs at every boot",
    "mark-bad": "edgeops mark-bad",
    "health": "edgeops health --json",
    "agent": "edgeops agent --once",
}


def register(sub: Any) -> None:
    def cmd(name: str, helptext: str, fn: Callable[[argparse.Namespace], int],
            json_flag: bool = False) -> argparse.ArgumentParser:
        p = command(sub, name, helptext, EXAMPLES[name])
        add_config_option(p)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=fn)
        return p

    i = cmd("install", "install a bundle into the inactive slot and arm a trial boot", _install)
    i.add_argument("source", help="bundle path, '-' for stdin, or an http(s) URL")
    i.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                   help="progress: auto (a bar when stdout is a terminal), always (a bar on a "
                        "terminal, plain periodic lines elsewhere, e.g. journald) or never")
    i.add_argument("--replace-trial", action="store_true",
                   help="overwrite a trial that is armed and waiting for its boot (refused otherwise)")
    # quick_exit: it closes the journal and fsyncs the slot itself; logs: only an install that
    # logs loads logging (cli.main, core.logs)
    i.set_defaults(quick_exit=True, logs="lazy")
    st = cmd("status", "show slots, versions and the boot state", _status, json_flag=True)
    st.set_defaults(logs=False)  # nothing it loads logs (tests/test_imports.py): no logging setup
    h = cmd("history", "show the install and health history", _history, json_flag=True)
    h.add_argument("-n", type=int, default=30, help="rows (default 30)")
    cmd("rollback", "make the other known-good slot primary and reboot into it (at once)", _rollback)
    cmd("mark-good", "commit the running trial slot now (on a committed system: nothing to do, exit 0)",
        _mark_good)
    cmd("mark-bad", "reject the running trial slot and revert", _mark_bad)
    cmd("health", "run the health checks now and print each result", _health, json_flag=True)
    a = cmd("agent", "run the agent service (finishes trials, runs health checks)", _agent)
    a.add_argument("--once", action="store_true", help="one cycle, then exit")
    # The service's worker (agent.device.worker): one wake-up, its outcome as a JSON line on
    # this inherited file descriptor instead of the closing 'phase:' line. Not for people.
    a.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)


@contextmanager
def _updater(a: argparse.Namespace) -> Iterator[Updater]:
    from agent.core import config as config_mod
    from agent.device.updater import Updater, open_device

    cfg = config_mod.load(config_path(a.config))
    dev = open_device(cfg)
    try:
        yield Updater(dev)
    finally:
        dev.close()


@contextmanager
def _source(src: str) -> Iterator[tuple[BinaryIO, int]]:
    if src == "-":
        yield sys.stdin.buffer, 0
        return
    if src.startswith(("http://", "https://")):
        import io

        from agent.adapters import download
        from agent.core import logs

        logs.load()  # requests and urllib3 log through logging themselves: configure it now

        raw, size = download.open_stream(src)
        with io.BufferedReader(raw, buffer_size=256 * 1024) as stream:
            yield cast(BinaryIO, stream), size
        return
    try:
        f = open(src, "rb")  # noqa: SIM115 (closed below; open errors need their own message)
    except OSError as exc:
        raise UsageError(f"cannot open bundle {src}: {exc.strerror}",
                         hint="check the path; '-' reads the bundle from stdin, "
                              "an http(s):// URL downloads it") from None
    with f:
        yield f, 0


def _install(a: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    show = a.progress == "always" or (a.progress == "auto" and tty)
    display: Display | None = None
    if show:  # imported only for a bar: 'never' and a pipe skip the module (docs/performance.md)
        from agent.cli.progress import Display

        display = Display(sys.stdout, tty=tty)
    try:
        with _updater(a) as up, _source(a.source) as (stream, total):
            result = up.install(stream, total=total, progress=display, replace_trial=a.replace_trial)
    finally:
        if display is not None:
            display.close()  # a failed install's bar must not run into the error line
    print(f"installed {result.version} into slot {result.slot} ({result.bytes_written} bytes); "
          f"reboot to try it once")
    return 0


def _status(a: argparse.Namespace) -> int:
    from agent.core import config as config_mod
    from agent.device import status

    # no updater, no lock: it only reads; lazy: the sections it does not show are not parsed
    st = status.read(config_mod.load(config_path(a.config), lazy=True))
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    trial = ""
    if st["trial"]:
        trial = "  (trial)" if st["trial_picked_up"] else "  (trial, not yet picked up by the agent)"
    print(f"booted slot   {st['booted_slot']}{trial}")
    print(f"primary slot  {st['primary_slot']}")
    if st["trial"]:
        print(f"next boot     falls back to slot {st['primary_slot']} unless this trial is committed "
              f"(health checks pass, or 'edgeops mark-good')")
    elif st["trial_pending_slot"]:
        print(f"next boot     tries slot {st['trial_pending_slot']} once")
    print(f"phase         {st['phase']}")
    if st["journal"] != "ok":
        print(f"journal       {st['journal']} (run 'edgeops journal recover')")
    print(f"security      floor {st['security_floor']}")
    for name, s in st["slots"].items():
        mark = "*" if s["booted"] else " "
        note = ""
        if (not s["booted"] and s["state"] == "good"
                and (s["security_version"] or 0) < st["security_floor"]):
            note = f"  (security_version {s['security_version'] or 0} < floor: no rollback to it)"
        print(f" {mark} slot {name}  {s['state']:<6} {s['version'] or '-':<12} {s['device']}{note}")
    return 0


def _history(a: argparse.Namespace) -> int:
    with _updater(a) as up:
        rows = up.journal.history(a.n)
    if a.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.ts))
        print(f"{when}  {r.event:<14} {r.slot or '-':<2} {r.version or '-':<10} {r.detail}")
    return 0


def _rollback(a: argparse.Namespace) -> int:
    print("rolling back: the other known-good slot becomes primary, then the device reboots",
          flush=True)  # before: the reboot may end this process
    with _updater(a) as up:
        slot = up.rollback()
    print(f"rolled back: slot {slot} is primary again; rebooting into it")
    return 0


def _mark_good(a: argparse.Namespace) -> int:
    with _updater(a) as up:
        try:
            up.mark_good()
        except StateError:
            # Already committed (as 'rauc status mark-good' on a good slot): a unit that marks
            # good at every boot must not fail. Anything else (a trial armed for the next boot,
            # a revert under way) is still refused.
            st = up.status()
            booted = st["slots"].get(st["booted_slot"], {})
            committed = st["booted_slot"] == st["primary_slot"] and booted.get("state") == "good"
            if st["phase"] != "idle" or not committed:
                raise
            print(f"slot {st['booted_slot']} ({booted.get('version') or 'no version'}) is already "
                  f"committed; nothing to mark")
            return 0
        print("\n".join(up.messages))
    return 0


def _mark_bad(a: argparse.Namespace) -> int:
    with _updater(a) as up:
        up.mark_bad()
        print("\n".join(up.messages))
    return 0


def _health(a: argparse.Namespace) -> int:
    with _updater(a) as up:
        results = up.health_report()
    if a.json:
        # probes time themselves on the monotonic clock; a reader wants the wall time
        offset = time.time() - time.monotonic()
        print(json.dumps([{**r.__dict__, "at": round(r.at + offset, 3)} for r in results], indent=2))
    else:
        for r in results:
            print(f"{'PASS' if r.ok else 'FAIL'}  {r.name}: {r.detail}")
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise HealthCheckFailed(f"{len(failed)} of {len(results)} health checks failed: "
                                f"{', '.join(failed)}")
    return 0


def _agent(a: argparse.Namespace) -> int:
    from agent.core import logs
    from agent.device import service, worker

    # A trial's health window is logged as it goes (probe, round, time left), not only its verdict.
    logs.get("edgeops.trial").setLevel(logs.INFO)

    if a.report_fd is not None:
        if not a.once:
            raise UsageError("--report-fd is for the service's worker, with --once")
        with _updater(a) as up:
            report = worker.Reporter(a.report_fd, up)
            report.started()
            service.run(up, once=True, report=report)
        return 0
    if not a.once:
        # The service becomes a process of its own, on the standard library (agent.cli.serve).
        from agent.cli import serve

        serve.become_service(config_path(a.config), verbose=bool(getattr(a, "verbose", False)))
    with _updater(a) as up:
        phase = service.run(up, once=True)
    print(f"phase: {phase}")
    return 0
