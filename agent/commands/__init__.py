"""CLI command groups: each module adds its subcommands with ``register(subparsers)``."""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import DEFAULT_CONFIG


def config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("EDGEOPS_CONFIG") or DEFAULT_CONFIG)
