"""What the CLI command groups share: where the agent's config file is."""

from __future__ import annotations

import os
from pathlib import Path

from agent.core.config import DEFAULT_CONFIG


def config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("EDGEOPS_CONFIG") or DEFAULT_CONFIG)
