"""The ``edgeops`` command: argument parsing, exit codes, output. No update logic lives here.

Exit codes (documented in README.md, stable for scripts):
    0 success            10 bad signature              20 device error (slot, bootloader, journal)
    1 internal error     11 untrusted/expired/revoked  21 not possible in the device's state
    2 usage error        12 rollback refused           30 health checks failed
    3 config error       13 incompatible bundle        40 transport error (retry later)
                         14 malformed/unsafe bundle
                         15 hash or size mismatch
                         16 payload larger than its slot
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from agent import errors
from agent.cli import (
    board_cmd,
    bundle_cmd,
    controller_cmd,
    device_cmd,
    fleet_cmd,
    keys_cmd,
    model_cmd,
    provision_cmd,
    sim_cmd,
    tpm_cmd,
)

# Command groups, each a module in agent.cli with register(subparsers), imported
# explicitly so a broken group fails loudly. They import their heavy dependencies
# inside the handlers, so --help and --version stay fast.
COMMAND_GROUPS = (keys_cmd, bundle_cmd, sim_cmd, device_cmd, board_cmd, model_cmd,
                  fleet_cmd, controller_cmd, tpm_cmd, provision_cmd)

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
    (errors.DeviceError, 20),
    (errors.StateError, 21),
    (errors.HealthCheckFailed, 30),
    (errors.TransportError, 40),
    (errors.EdgeopsError, 1),
]



def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeops")
    except PackageNotFoundError:  # run from a source tree without installing
        from agent import __version__

        return __version__


def exit_code(exc: errors.EdgeopsError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeops",
        description="Signed A/B updates for edge devices: install, trial boot, health check, "
                    "commit or revert.",
        epilog="Exit codes: see 'edgeops help exit-codes' or README.md.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail to stderr")
    parser.add_argument("--version", action="version", version=f"edgeops {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    h = sub.add_parser("help", help="show help on a topic (exit-codes)")
    h.add_argument("topic", choices=["exit-codes"])
    h.set_defaults(func=lambda a: print(__doc__.split("Exit codes", 1)[1].strip()) or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="edgeops: %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except errors.EdgeopsError as exc:
        code = exit_code(exc)
        if getattr(args, "json", False):
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
    sys.exit(main())


if __name__ == "__main__":
    run()
