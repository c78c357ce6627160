"""What the CLI command groups share: the agent's config file and its option, and the shape of a
command's --help (a description, a sentence per option, an example at the end)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from agent.core.config import DEFAULT_CONFIG


def config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("EDGEOPS_CONFIG") or DEFAULT_CONFIG)


def add_config_option(parser: argparse.ArgumentParser, more: str = "") -> None:
    """``--config FILE`` after a command (``main`` also takes it before the command)."""
    parser.add_argument("--config", help="agent config (default /etc/edgeops/agent.toml, or "
                                         f"$EDGEOPS_CONFIG){more}")


def command(parent: Any, name: str, helptext: str, example: str, *, description: str | None = None,
            notes: str = "", formatter_class: type[argparse.HelpFormatter] =
            argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """Add command ``name`` to the subparsers ``parent``: ``helptext`` is its line in the parent's
    list and, as a sentence, its description (unless ``description`` is given); its --help ends
    with ``notes`` (a paragraph, if any) and ``example``, one command line per line, kept as
    written (tests/test_operator_cli.py parses each example)."""
    lines = "\n".join(f"  {line}" for line in example.splitlines())
    p: argparse.ArgumentParser = parent.add_parser(
        name, help=helptext, description=description or helptext[:1].upper() + helptext[1:] + ".",
        epilog=(f"{notes}\n\n" if notes else "") + f"example:\n{lines}",
        formatter_class=formatter_class)
    return p
