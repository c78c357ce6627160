"""Model commands: install, list, status, rollback (device side) and pack (host side)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.cli.common import add_config_option, command, config_path

# LiteRT's C++ core prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on the
# first interpreter of a process, straight to fd 2, and no setting of its Python API turns it
# off. A technician's command must end in one clear line, so the CLI (single-threaded, unlike
# an app embedding ModelHost) captures fd 2 while a model command runs and passes on every
# line except those INFO lines.
_RUNTIME_NOISE = (b"INFO: Created TensorFlow Lite", b"INFO: Initialized TensorFlow Lite")


def _quiet_runtime(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                return fn(a)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                for line in captured.read().splitlines(keepends=True):
                    if not line.startswith(_RUNTIME_NOISE):
                        sys.stderr.buffer.write(line)
                sys.stderr.flush()
    return run

# The example that ends each command's --help.
EXAMPLES = {
    "install": "edgeops model install detector-7.bundle",
    "list": "edgeops model list --json",
    "status": "edgeops model status",
    "rollback": "edgeops model rollback detector",
    "pack": "edgeops model pack --key signer.key --cert signer.crt --compatible my-board \\\n"
            "    --name detector --version 7 --model detector.tflite --validation detector-val.npz \\\n"
            "    --atol 1e-4 --max-latency-ms 30 -o detector-7.bundle",
}


def register(sub: Any) -> None:
    p = command(sub, "model", "install, list, inspect and roll back TFLite models",
                "edgeops model status")
    ms = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    def cmd(name: str, helptext: str, fn: Callable[[argparse.Namespace], int],
            json_flag: bool = False) -> argparse.ArgumentParser:
        c = command(ms, name, helptext, EXAMPLES[name])
        add_config_option(c)
        if json_flag:
            c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(func=_quiet_runtime(fn))
        return c

    i = cmd("install", "verify, validate and activate a model bundle", _install, json_flag=True)
    i.add_argument("source", help="model bundle path, or '-' for stdin")
    cmd("list", "list installed model versions", _list, json_flag=True)
    cmd("status", "show each model's current and last-known-good version", _status, json_flag=True)
    r = cmd("rollback", "make the last-known-good version current again", _rollback)
    r.add_argument("name", help="model name")

    k = command(ms, "pack", "build a signed model bundle (host side)", EXAMPLES["pack"])
    k.add_argument("--key", type=Path, required=True, help="the signing key (signer.key)")
    k.add_argument("--cert", type=Path, required=True,
                   help="its certificate (signer.crt, and any intermediates)")
    k.add_argument("--compatible", required=True, help="the board family string the bundle is for")
    k.add_argument("--name", required=True, help="model name (payload name)")
    k.add_argument("--version", required=True, help="the model's version")
    k.add_argument("--security-version", type=int, default=0,
                   help="anti-rollback level: devices refuse versions of this model below its "
                        "floor (default 0)")
    k.add_argument("--model", type=Path, required=True, help=".tflite file")
    k.add_argument("--validation", type=Path, required=True,
                   help=".npz validation set (input_<i> and output_<j> arrays, docs/models.md)")
    k.add_argument("--atol", type=float, default=1e-5,
                   help="absolute tolerance of a validation output (default 1e-5)")
    k.add_argument("--rtol", type=float, default=0.0,
                   help="relative tolerance of a validation output (default 0)")
    k.add_argument("--max-latency-ms", type=float, default=100.0,
                   help="ceiling for the median invoke time on the device, ms (default 100)")
    k.add_argument("-o", "--output", type=Path, required=True, help="the bundle file to write")
    k.set_defaults(func=_quiet_runtime(_pack))


@contextmanager
def _manager(a: argparse.Namespace) -> Iterator[Any]:
    from agent.adapters.journal import Journal
    from agent.core import config as config_mod
    from agent.device.models import ModelManager, settings_from_config

    cfg = config_mod.load(config_path(a.config))
    journal = Journal(cfg.journal_path)
    try:
        yield ModelManager(settings_from_config(cfg), journal, cfg=cfg)
    finally:
        journal.close()


def _install(a: argparse.Namespace) -> int:
    import sys

    from agent.errors import UsageError

    with _manager(a) as mgr:
        if a.source == "-":
            result = mgr.install(sys.stdin.buffer)
        else:
            try:
                f = open(a.source, "rb")  # noqa: SIM115 (open errors need their own message)
            except OSError as exc:
                raise UsageError(f"cannot open bundle {a.source}: {exc.strerror}") from None
            with f:
                result = mgr.install(f)
    r = result.report
    if a.json:
        print(json.dumps({"model": result.name, "version": result.version,
                          "previous": result.previous, "cases": r.cases,
                          "max_abs_error": r.max_abs_error, "median_ms": r.median_ms,
                          "pruned": result.pruned}))
    else:
        print(f"model {result.name} {result.version} is current (was {result.previous or '-'}); "
              f"validated {r.cases} cases, max error {r.max_abs_error:.3g}, "
              f"median {r.median_ms:.3f} ms")
    return 0


def _list(a: argparse.Namespace) -> int:
    with _manager(a) as mgr:
        st = mgr.status()
    if a.json:
        print(json.dumps(st["models"], indent=2))
        return 0
    if not st["models"]:
        print("no models installed ('edgeops model install BUNDLE')")
        return 0
    print(f"   {'model':<16} {'version':<12} {'state':<6} {'bytes':>10}  {'installed (UTC)':<16}  "
          f"reason      (* current, G last-known-good)")
    for name, m in st["models"].items():
        for v in m["versions"]:
            mark = ("*" if v["current"] else " ") + ("G" if v["good"] else " ")
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v["installed"]))
            print(f"{mark} {name:<16} {v['version']:<12} {v['state']:<6} {v['size']:>10}  {when}  "
                  f"{v['reason']}")
    return 0


def _status(a: argparse.Namespace) -> int:
    with _manager(a) as mgr:
        st = mgr.status()
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"store   {st['root']}  {st['usage_bytes']} of {st['budget_bytes']} bytes, keep {st['keep']}")
    for name, m in st["models"].items():
        print(f"{name:<16} current {m['current'] or '-'} ({m['state'] or '-'}), "
              f"last-known-good {m['good'] or '-'}")
    return 0


def _rollback(a: argparse.Namespace) -> int:
    with _manager(a) as mgr:
        target = mgr.rollback(a.name)
    print(f"model {a.name}: {target} is current again")
    return 0


def _pack(a: argparse.Namespace) -> int:
    from agent.host import keys
    from agent.host.model_pack import pack

    m = pack(a.output, model=a.model, validation=a.validation, name=a.name, version=a.version,
             sign=keys.load_signing_key(a.key).sign, chain_pem=a.cert.read_bytes(),
             compatible=a.compatible, security_version=a.security_version, atol=a.atol,
             rtol=a.rtol, max_latency_ms=a.max_latency_ms)
    print(f"{a.output}: model {a.name} {m.version} for '{m.compatible}', "
          f"{a.output.stat().st_size} bytes")
    return 0
