"""``python -m agent.cli``: the same command as the ``edgeops`` console script."""

from agent.cli.main import run

run()
