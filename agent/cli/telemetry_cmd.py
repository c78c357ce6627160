"""edgeops telemetry: what the device's telemetry buffer holds, and sending it now."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from agent.cli.common import add_config_option, command, config_path
from agent.errors import ConfigError, TransportError

if TYPE_CHECKING:
    from agent.core.config import AgentConfig


def register(sub: Any) -> None:
    p = command(sub, "telemetry", "the telemetry buffer: status, flush", "edgeops telemetry status")
    ts = p.add_subparsers(dest="telemetry_command", metavar="ACTION", required=True)
    s = command(ts, "status", "buffer fill, oldest sample, last successful send, drops",
                "edgeops telemetry status --json")
    add_config_option(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_status)
    f = command(ts, "flush", "send what is buffered now, ignoring the retry backoff",
                "edgeops telemetry flush")
    add_config_option(f)
    f.set_defaults(func=_flush)


def _config(a: argparse.Namespace) -> AgentConfig:
    from agent.core import config as config_mod

    cfg = config_mod.load(config_path(a.config))
    if cfg.telemetry is None:
        raise ConfigError(f"{cfg.path} has no [telemetry] section",
                          hint="add [telemetry] (docs/telemetry.md) to collect and buffer telemetry")
    return cfg


def _when(t: float | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _status(a: argparse.Namespace) -> int:
    from agent.device.telemetry import open_buffer

    cfg = _config(a)
    buf = open_buffer(cfg)
    try:
        st = buf.status()
    finally:
        buf.close()
    fill = round(st.samples / st.max_samples, 4)
    doc: dict[str, Any] = {
           "buffer": str(cfg.telemetry_path), "samples": st.samples, "max_samples": st.max_samples,
           "fill": fill, "series": st.series,
           "oldest_ms": st.oldest_ms, "newest_ms": st.newest_ms, "spans_pending": st.spans_pending,
           "last_send": st.last_send, "last_trace_send": st.last_trace_send,
           "dropped": st.dropped, "file_bytes": st.file_bytes}
    if a.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"buffer   {doc['buffer']} ({st.file_bytes} bytes)")
    print(f"samples  {st.samples} of {st.max_samples} ({100 * fill:.1f}%) in {st.series} series")
    print(f"oldest   {_when(st.oldest_ms / 1000) if st.oldest_ms is not None else 'none'}")
    print(f"spans    {st.spans_pending} waiting")
    print(f"sent     samples {_when(st.last_send)}, traces {_when(st.last_trace_send)}")
    dropped = ", ".join(f"{k} {n}" for k, n in st.dropped.items()) or "none"
    print(f"dropped  {dropped}")
    return 0


def _flush(a: argparse.Namespace) -> int:
    from agent.device.telemetry import open_buffer, shipper

    cfg = _config(a)
    buf = open_buffer(cfg)
    try:
        report = shipper(cfg, buf).flush(force=True)
        left = buf.status()
    finally:
        buf.close()
    print(f"sent {report.samples} samples ({report.bytes} bytes) and {report.spans} spans; "
          f"{left.samples} samples and {left.spans_pending} spans left")
    if report.retry_in is not None:
        raise TransportError(f"telemetry receiver did not take the rest: {report.last}",
                             hint="the agent retries by itself; see 'edgeops telemetry status'")
    return 0
