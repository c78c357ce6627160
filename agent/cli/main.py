"""The ``edgeops`` command: argument parsing, exit codes, output. No update logic lives here.

Exit codes (documented in README.md, stable for scripts):
    0 success            10 bad signature              20 device error (slot, bootloader, journal)
    1 internal error     11 untrusted/expired/revoked  21 not possible in the device's state
    2 usage error        12 rollback refused           22 journal lost or replaced: run
    3 config error       13 incompatible bundle           'edgeops journal recover'
                         14 malformed/unsafe bundle    30 health checks failed
                         15 hash or size mismatch      40 transport error (retry later)
                         16 payload larger than its    41 not found at the source (HTTP 404/410):
                            slot                          fix the URL, retrying will not help
                                                      130 interrupted (Ctrl-C, SIGINT)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from agent import __version__, errors

TYPE_CHECKING = False  # typing itself costs 'edgeops --version' 3 ms; mypy knows this name
if TYPE_CHECKING:
    import argparse  # imported by build_parser: the agent service's process never parses

# Each command word and the module of agent.cli whose register(subparsers) adds it. Only
# the chosen command's module is imported (explicitly: a broken group fails loudly), so
# 'edgeops status' never loads what 'bundle create' needs; --help and an unknown word load
# them all. tests/test_cli.py checks this table against what each register() adds.
COMMANDS: dict[str, str] = {
    "keys": "keys_cmd",
    "bundle": "bundle_cmd",
    "sim": "sim_cmd",
    **dict.fromkeys(("install", "status", "history", "rollback", "mark-good", "mark-bad",
                     "health", "agent"), "device_cmd"),
    "board": "board_cmd",
    "model": "model_cmd",
    "fleet": "fleet_cmd",
    "controller": "controller_cmd",
    "tpm": "tpm_cmd",
    "provision": "provision_cmd",
    "decommission": "decommission_cmd",
    "journal": "journal_cmd",
    "telemetry": "telemetry_cmd",
    "console": "console_cmd",
    "fleet-sim": "fleet_sim_cmd",
}
GROUPS = tuple(dict.fromkeys(COMMANDS.values()))  # in the order 'edgeops --help' lists them
OWN_COMMANDS = ("help",)  # registered here, no group module

EXIT_CODES: list[tuple[type[errors.EdgeopsError], int]] = [
    (errors.UsageError, 2),
    (errors.ConfigError, 3),
    (errors.SignatureError, 10),
    (errors.UntrustedSigner, 11),
    (errors.SignerExpired, 11),
    (errors.SignerRevoked, 11),
    (errors.RollbackRefused, 12),
    (errors.IncompatibleBundle, 13),
    (errors.HashMismatch, 15),
    (errors.PayloadTooLarge, 16),
    (errors.BundleError, 14),
    (errors.TrustError, 11),
    (errors.JournalLost, 22),
    (errors.DeviceError, 20),
    (errors.StateError, 21),
    (errors.HealthCheckFailed, 30),
    (errors.SourceNotFound, 41),
    (errors.TransportError, 40),
    (errors.EdgeopsError, 1),
]


def exit_code(exc: errors.EdgeopsError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def group(name: str) -> ModuleType:
    """The command group module ``agent.cli.<name>``."""
    return importlib.import_module(f"agent.cli.{name}")


def command_word(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv`` as argparse will see it, skipping the top-level options."""
    args = iter(argv)
    for arg in args:
        if arg == "--":
            return next(args, None)
        if _abbreviates(arg, "--config"):
            next(args, None)  # --config FILE
        elif not arg.startswith("-"):
            return arg
    return None


def groups_for(argv: Sequence[str] | None) -> tuple[str, ...]:
    """The command groups ``argv`` needs registered: the command's own; all of them for
    top-level help or a word argparse must refuse (its message lists every command); none
    for --version or a missing command."""
    if argv is None:
        return GROUPS
    word = command_word(argv)
    if word is None:
        top = argv[:list(argv).index("--")] if "--" in argv else argv
        return GROUPS if any(_asks_help(a) for a in top) else ()
    if word in OWN_COMMANDS:
        return ()
    return (COMMANDS[word],) if word in COMMANDS else GROUPS


def _abbreviates(arg: str, option: str) -> bool:
    """``arg`` is ``option`` or a prefix argparse accepts for it, its value in the next arg."""
    return "=" not in arg and len(arg) > 2 and arg.startswith("--") and option.startswith(arg)


def _asks_help(arg: str) -> bool:
    if arg.startswith("--"):
        return len(arg) > 2 and "--help".startswith(arg)
    return arg.startswith("-") and "h" in arg  # -h, or grouped short flags such as -vh


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``, with only the command groups it needs registered (see
    ``groups_for``); every group when ``argv`` is None."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="edgeops",
        description="Signed A/B updates for edge devices: install, trial boot, health check, "
                    "commit or revert.",
        epilog="Exit codes: see 'edgeops help exit-codes' or README.md.\n\n"
               "example:\n  edgeops status",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail to stderr")
    parser.add_argument("--version", action="version", version=f"edgeops {__version__}")
    # Also accepted after the command (as 'rauc --conf=F status' and 'rauc status --conf=F');
    # a separate dest, because a subparser's own default would overwrite it.
    parser.add_argument("--config", dest="global_config", metavar="FILE",
                        help="agent config for every command (default /etc/edgeops/agent.toml, "
                             "or $EDGEOPS_CONFIG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in groups_for(argv):
        group(name).register(sub)
    h = sub.add_parser("help", help="show help on a topic (exit-codes)",
                       description="Show help on a topic.", epilog="example:\n  edgeops help exit-codes",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("topic", choices=["exit-codes"],
                   help="exit-codes: what each exit status of edgeops means")
    h.set_defaults(func=lambda a: print(__doc__.split("Exit codes", 1)[1].strip()) or 0)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser(argv).parse_args(argv)
    if getattr(args, "config", None) is None and args.global_config is not None:
        args.config = args.global_config  # the command's own --config wins when both are given
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv)[0]


def _main(argv: Sequence[str] | None) -> tuple[int, bool]:
    """The exit code, and whether the command left nothing for interpreter shutdown to do."""
    args = parse_args(sys.argv[1:] if argv is None else argv)  # --version and --help exit here
    logs = getattr(args, "logs", True)  # a command that loads no logger (status) skips logging
    if logs:  # "lazy" (install): logging loads at the first record, if one comes (core.logs)
        log_to_stderr(verbose=args.verbose, eager=logs != "lazy" or args.verbose)
    code = guarded(lambda: args.func(args), json_errors=getattr(args, "json", False))
    return code, bool(getattr(args, "quick_exit", False))


def log_to_stderr(*, verbose: bool, eager: bool = True) -> None:
    from agent.core import logs

    logs.configure(eager=eager, level=logs.DEBUG if verbose else logs.WARNING,
                   format="edgeops: %(levelname)s: %(message)s")


def guarded(command: Callable[[], int | None], *, json_errors: bool = False) -> int:
    """Run ``command``; an error becomes its line on stderr and its exit code (this table)."""
    try:
        return int(command() or 0)
    except errors.EdgeopsError as exc:
        code = exit_code(exc)
        if json_errors:
            import json

            print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                              "hint": exc.hint, "exit_code": code}))
        print(f"edgeops: error: {exc.one_line()}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("edgeops: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def run() -> None:
    code, quick = _main(None)
    if quick:
        quick_exit(code)
    sys.exit(code)


def quick_exit(code: int) -> None:
    """End the process now, without interpreter shutdown, if nothing needs it; else return.

    Shutdown tears down every imported module object by object: ~0.02-0.03 s of CPU at the
    end of an install, a tenth of a 64 MiB one (docs/performance.md). A command opts in
    (``quick_exit`` in its defaults) when it closes what it opened and syncs what it wrote
    itself. What shutdown would still do is done here: the atexit handlers (logging's flush)
    and stdio. A non-daemon thread still running, or stdout that cannot be flushed, takes
    the ordinary way out (``sys.exit``), which waits for or reports them."""
    import atexit
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    threading = sys.modules.get("threading")
    if threading is not None and any(t is not threading.main_thread() and t.is_alive()
                                     and not t.daemon for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    run()
