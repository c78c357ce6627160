"""The console's audit records: what each login, failed login and state change leaves behind. Pure.

One ``AuditEvent`` becomes a journal history row (``edgeops history`` and the console's
``logs`` show it) and an outbox row of kind ``console-audit``, which the fleet agent
forwards to the controller when the link returns (``agent.device.fleet``). Whatever a
technician typed is input: control characters are dropped and every field is bounded, so
an escape sequence typed at the port cannot repaint the operator's terminal later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.core import lifecycle

KIND = "console-audit"  # outbox kind
EVENTS = ("login", "login-failed", "locked-out", "logout", "command", "usb")
MAX_FIELD = 200


def clean(text: str, limit: int = MAX_FIELD) -> str:
    """Printable text only, one line, at most ``limit`` characters."""
    out = "".join(ch if ch.isprintable() else "?" for ch in text.replace("\n", " "))
    return out if len(out) <= limit else out[: limit - 3] + "..."


@dataclass(frozen=True)
class AuditEvent:
    ts: float
    event: str  # one of EVENTS
    who: str  # "pin", the technician's certificate subject, or "-" (not logged in)
    method: str  # pin | key | -
    command: str = ""
    outcome: str = ""  # ok | refused | failed: <why>
    tty: str = ""

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown audit event {self.event!r}")

    def detail(self) -> str:
        parts = [f"who={clean(self.who, 80)}", f"via={self.method}"]
        if self.command:
            parts.append(f"cmd={clean(self.command, 80)}")
        if self.outcome:
            parts.append(f"outcome={clean(self.outcome, 120)}")
        if self.tty:
            parts.append(f"tty={clean(self.tty, 32)}")
        return clean(" ".join(parts), MAX_FIELD * 2)

    def history(self) -> lifecycle.History:
        return lifecycle.History(f"console-{self.event}", None, None, self.detail())

    def outbox_body(self) -> dict[str, Any]:
        return {"ts": round(self.ts, 3), "event": self.event, "who": clean(self.who, 80),
                "method": self.method, "command": clean(self.command, 80),
                "outcome": clean(self.outcome, 120), "tty": clean(self.tty, 32)}


def attribute(outbox_id: int, body: dict[str, Any]) -> tuple[str, str]:
    """The DDI configData attribute one audit row travels as (hawkBit keeps attributes as
    strings, keys up to 128 and values up to 128 characters)."""
    value = (f"{body.get('ts')} {body.get('event')} {body.get('who')} "
             f"{body.get('command') or '-'} {body.get('outcome') or '-'}")
    return f"edgeops.console.audit.{outbox_id}", clean(value, 128)
