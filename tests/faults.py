"""Run the edgeops CLI in a child process that SIGKILLs itself at its N-th durable step.

Durable steps are the calls whose order makes power-loss safety: os.write /
os.pwrite (slot data, U-Boot env), os.fsync, os.replace, and every journal
transaction commit. SIGKILL right after the N-th one is the same, for every
file the process fsynced, as the power failing at that instant.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNNER = r"""
import os, signal, sys
kill_at = int(os.environ["EDGEOPS_TEST_KILL_AT"])
count = [0]

def tick():
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def after(owner, name):
    orig = getattr(owner, name)
    def wrapped(*args, **kwargs):
        result = orig(*args, **kwargs)
        tick()
        return result
    setattr(owner, name, wrapped)

for name in ("write", "pwrite", "fsync", "replace"):
    after(os, name)
import agent.adapters.journal
after(agent.adapters.journal._Tx, "__exit__")
from agent.cli.main import main
code = main(sys.argv[1:])
sys.stderr.write(f"\nDURABLE-STEPS {count[0]}\n")
sys.exit(code)
"""


def run_with_kill(kill_at: int, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEOPS_TEST_KILL_AT": str(kill_at)}
    return subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def killed(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode == -9


def steps(proc: subprocess.CompletedProcess[str]) -> int:
    for line in proc.stderr.splitlines():
        if line.startswith("DURABLE-STEPS "):
            return int(line.split()[1])
    raise AssertionError(f"child did not finish: rc={proc.returncode} {proc.stderr[-500:]}")
