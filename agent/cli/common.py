"""What the CLI command groups share: where the agent's config file is, and the option naming it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.core.config import DEFAULT_CONFIG


def config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("EDGEOPS_CONFIG") or DEFAULT_CONFIG)


def add_config_option(parser: argparse.ArgumentParser, more: str = "") -> None:
    """``--config FILE`` after a command (``main`` also takes it before the command)."""
    parser.add_argument("--config", help="agent config (default /etc/edgeops/agent.toml, or "
                                         f"$EDGEOPS_CONFIG){more}")
