"""Reads the fleet settings from disk, once at start: ``[fleet]``, else ``fleet.toml`` beside it, the token.

An image can ship the board's agent.toml unchanged and add the fleet settings per site in a
``fleet.toml`` beside it. The settings are read when a command or the service starts and the
resulting ``FleetConfig`` is handed to the DDI client, the fleet agent and the identity: nothing
reads agent.toml again while the agent runs. Light on purpose (the standard library and the
core): the idle service can know its controller without importing an HTTP stack.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from agent.core.config import AgentConfig
from agent.core.fleet_config import FleetConfig, parse_fleet
from agent.errors import ConfigError

FLEET_TOML = "fleet.toml"


def fleet_settings(cfg: AgentConfig) -> FleetConfig | None:
    """The fleet settings of a loaded agent config: its own ``[fleet]`` (parsed with it), else
    ``fleet.toml`` beside it; None when the device is not managed by a fleet controller."""
    if cfg.fleet is not None:
        return read_token(cfg.fleet, f"{cfg.path} [fleet]")
    return _from_file(cfg.path.parent / FLEET_TOML)


def find_fleet(agent_toml: Path | AgentConfig) -> FleetConfig | None:
    """Like load_fleet, but None when the device is not managed by a fleet controller."""
    if isinstance(agent_toml, AgentConfig):
        return fleet_settings(agent_toml)
    for candidate in (agent_toml, agent_toml.parent / FLEET_TOML):
        found = _from_file(candidate)
        if found is not None:
            return found
    return None


def load_fleet(agent_toml: Path | AgentConfig) -> FleetConfig:
    """``[fleet]`` from agent.toml when present, else from fleet.toml beside it (so an image
    can ship the board's agent.toml unchanged and add the fleet settings per site)."""
    cfg = find_fleet(agent_toml)
    if cfg is None:
        path = agent_toml.path if isinstance(agent_toml, AgentConfig) else agent_toml
        raise ConfigError(f"no [fleet] section in {path} or {path.parent / FLEET_TOML}",
                          hint="add [fleet] url = ..., controller_id = ... (docs/fleet-agent.md)")
    return cfg


def read_token(cfg: FleetConfig, where: str = "[fleet]") -> FleetConfig:
    """``cfg`` with the token from its ``token_file`` (when it names one)."""
    if cfg.token_file is None:
        return cfg
    try:
        text = cfg.token_file.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg.with_token(text, where)


def _from_file(candidate: Path) -> FleetConfig | None:
    try:
        doc = tomllib.loads(candidate.read_text())
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {candidate}: {exc}") from None
    table = doc.get("fleet")
    if not isinstance(table, dict):
        return None
    where = f"{candidate} [fleet]"
    return read_token(parse_fleet(table, candidate.parent, where), where)


__all__ = ["FLEET_TOML", "find_fleet", "fleet_settings", "load_fleet", "read_token"]
