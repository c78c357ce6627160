"""The measurement log's record format: one JSON line per extended event. Pure.

A verifier replays the log to explain a quote's PCR digest, so the log is
appended *before* each extend. Power can cut a line short; such a line was never
followed by its extend and is dropped, while a complete line that does not parse
means the log cannot explain the PCR any more.
"""

from __future__ import annotations

import json

from agent.core.attest import Event


class CorruptLog(ValueError):
    """A complete line of the log is not an event."""


def encode(event: Event) -> bytes:
    """One event as a complete line."""
    return (json.dumps({"pcr": event.pcr, "label": event.label, "digest": event.digest.hex()})
            + "\n").encode()


def complete_length(data: bytes) -> int:
    """How many leading bytes of ``data`` are whole lines: the rest is a line torn by a power cut."""
    return data.rfind(b"\n") + 1


def decode(data: bytes) -> list[Event]:
    """The events of the complete lines of ``data``, in order; raise ``CorruptLog`` on a bad line."""
    events = []
    for line in data[:complete_length(data)].splitlines():
        try:
            d = json.loads(line)
            events.append(Event(int(d["pcr"]), str(d["label"]), bytes.fromhex(d["digest"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptLog(f"not a measurement event: {line[:80]!r}") from exc
    return events


__all__ = ["CorruptLog", "complete_length", "decode", "encode"]
