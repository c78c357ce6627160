"""The ``[telemetry]`` section of ``agent.toml``, for ``agent.core.config`` (docs/telemetry.md).

Apart from ``config`` because only a device that collects telemetry parses it: its table is
read when the agent first asks (``AgentConfig.telemetry``), and ``edgeops status`` never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.telemetry_policy import SCOPES, SeriesRule, parse_rules
from agent.errors import ConfigError


@dataclass(frozen=True)
class TelemetrySettings:
    """The [telemetry] section (docs/telemetry.md): what is collected, buffered and sent where."""

    enabled: bool = True
    interval: float = 10.0  # seconds between collections
    buffer: Path | None = None  # default STATE/telemetry.db
    budget_bytes: int = 16 << 20
    full_resolution: float = 3600.0  # seconds kept at full resolution under budget pressure
    downsample_step: float = 60.0
    remote_write_url: str | None = None
    otlp_url: str | None = None  # OTLP/HTTP base (…/v1/traces is added)
    credentials_file: Path | None = None  # a bearer token, read when sending; never logged
    bytes_per_second: int = 64 << 10
    batch_samples: int = 2000
    targets: tuple[str, ...] = ()  # QoE: "host:port" (TCP connect) or "http(s)://…" (HTTP timing)
    probe_count: int = 5
    probe_timeout: float = 2.0
    listen: str | None = None  # "127.0.0.1:9108": the local Prometheus endpoint, off by default
    rules: tuple[SeriesRule, ...] = ()
    traces: str = "upstream"  # update traces' scope: upstream, regional (the site's controller) or local




_TELEMETRY_KEYS = {"enabled", "interval", "buffer", "budget_bytes", "full_resolution",
                   "downsample_step", "remote_write_url", "otlp_url", "credentials_file",
                   "bytes_per_second", "batch_samples", "targets", "probe_count", "probe_timeout",
                   "listen", "policy", "traces"}


def parse_telemetry(t: Any, path: Path) -> TelemetrySettings:
    """``[telemetry]`` of the agent.toml at ``path`` (relative paths start at its directory)."""
    where = f"{path} [telemetry]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(t) - _TELEMETRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")

    def num(key: str, default: float, lo: float, hi: float) -> float:
        v = t.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ConfigError(f"{where}: {key} must be a number from {_num(lo)} to {_num(hi)}")
        return float(v)

    def url(key: str) -> str | None:
        v = t.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: {key} must be an http:// or https:// URL")
        return v

    targets = t.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(x, str) and x for x in targets):
        raise ConfigError(f"{where}: targets must be a list of 'host:port' or URLs")
    listen = t.get("listen")
    if listen is not None and (not isinstance(listen, str) or ":" not in listen):
        raise ConfigError(f"{where}: listen must be 'ADDRESS:PORT' such as '127.0.0.1:9108'")
    traces = t.get("traces", "upstream")
    if traces not in SCOPES:
        raise ConfigError(f"{where}: traces must be one of {', '.join(SCOPES)}")
    enabled = t.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: enabled must be true or false")
    paths = {}
    for key in ("buffer", "credentials_file"):
        v = t.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise ConfigError(f"{where}: {key} must be a path")
        paths[key] = path.parent / v if v else None
    return TelemetrySettings(
        enabled=enabled, interval=num("interval", 10.0, 1.0, 86400.0), buffer=paths["buffer"],
        budget_bytes=int(num("budget_bytes", 16 << 20, 4096, 1 << 40)),
        full_resolution=num("full_resolution", 3600.0, 0.0, 30 * 86400.0),
        downsample_step=num("downsample_step", 60.0, 1.0, 86400.0),
        remote_write_url=url("remote_write_url"), otlp_url=url("otlp_url"),
        credentials_file=paths["credentials_file"],
        bytes_per_second=int(num("bytes_per_second", 64 << 10, 256, 1 << 32)),
        batch_samples=int(num("batch_samples", 2000, 1, 100_000)), targets=tuple(targets),
        probe_count=int(num("probe_count", 5, 1, 100)),
        probe_timeout=num("probe_timeout", 2.0, 0.05, 60.0), listen=listen,
        rules=parse_rules(t.get("policy"), where), traces=traces)


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)
