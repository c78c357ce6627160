"""The agent service's own process: what ``edgeops agent`` becomes once its arguments are parsed.

``edgeops agent`` (without ``--once``) runs for weeks, idle nearly all the time. Parsing its
command line loads argparse and every device command (1.2 MiB that stay resident), so once
the arguments are known the command replaces itself (``os.execv``: the same process id for
systemd, the same stdout, environment and watchdog variables) with a fresh interpreter
running this module, which loads the config and hands it to
``agent.device.service.serve``. Errors end it as they end every command: one line on
stderr and the exit code of ``agent.cli.main``'s table.

    python -m agent.cli.serve CONFIG [--verbose]      (internal: argv made by become_service)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from agent.cli.main import guarded, log_to_stderr

if TYPE_CHECKING:
    from agent.adapters.watchdog import Watchdog


def become_service(config: Path, *, verbose: bool) -> NoReturn:
    """Replace this process with the service's (see the module docstring)."""
    argv = [sys.executable, "-m", "agent.cli.serve", str(config.absolute())]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*argv, *(["--verbose"] if verbose else [])])


def main(argv: Sequence[str]) -> int:
    if not 1 <= len(argv) <= 2 or argv[1:] not in ([], ["--verbose"]):
        print("usage: python -m agent.cli.serve CONFIG [--verbose] (run 'edgeops agent')",
              file=sys.stderr)
        return 2
    log_to_stderr(verbose=len(argv) == 2)
    return guarded(lambda: _serve(Path(argv[0])))


def _serve(path: Path) -> int:
    from agent.core import config as config_mod
    from agent.device import service
    from agent.device.worker import WorkerFailed

    cfg = config_mod.load(path)

    def watchdog(deadline: float) -> Watchdog | None:
        return service.system_watchdog(cfg, deadline, service.board_watchdog(cfg.board))

    try:
        phase = service.serve(cfg, watchdog=watchdog)
    except WorkerFailed as exc:
        if exc.code > 0:
            return exc.code  # the worker printed its error, with this exit code
        raise
    print(f"phase: {phase}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
