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


MAX_ID_FILE = 4096  # bytes read from controller_id_file: a serial, not a document


def read_token(cfg: FleetConfig, where: str = "[fleet]") -> FleetConfig:
    """``cfg`` with the token from its ``token_file`` and the controller id from its
    ``controller_id_file`` (each when it names one)."""
    cfg = read_controller_id(cfg, where)
    if cfg.token_file is None:
        return cfg
    try:
        text = cfg.token_file.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg.with_token(text, where)


def read_controller_id(cfg: FleetConfig, where: str = "[fleet]") -> FleetConfig:
    """``cfg`` with the controller id from its ``controller_id_file``, when it names one."""
    if cfg.controller_id_file is not None:
        try:
            with open(cfg.controller_id_file, "rb") as f:
                raw = f.read(MAX_ID_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"{where}: controller_id_file: {exc}",
                              hint="the device's id is read from there (its hardware serial); "
                                   "run as root, or set controller_id") from None
        if len(raw) > MAX_ID_FILE:
            raise ConfigError(f"{where}: controller_id_file {cfg.controller_id_file} is over "
                              f"{MAX_ID_FILE} bytes: not a serial")
        cfg = cfg.with_controller_id(raw.decode(errors="replace"), where)
    return cfg


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
