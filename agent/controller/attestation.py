"""The controller as attestation verifier: nonces issued, quotes judged, the last verdict kept.

Per device: at most one outstanding nonce (``attest_nonces``; a new challenge replaces it,
and answering consumes it, whether the quote passes or not, so no nonce verifies twice), and
one row of ``attestations``: the attestation key bound to the device, and what its last quote
showed. The key is the one the device CA enrolled (``identity/renew``, docs/tpm.md) when there
is one, else the key of the device's first quote, sent with its TargetToken: trust on first
use, as the enrolment itself. A later quote under another key is refused until an operator
forgets the binding (``forget``). The judging is ``agent.core.evidence``; this is its SQL.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.controller.db import Database
from agent.controller.errors import NotFound
from agent.core import evidence
from agent.core.attest import QuoteRefused

# The device CA's enrolment of a device: (AK public PEM, kind), or None if it has none.
Enrolled = Callable[[str], "tuple[bytes, str] | None"]


@dataclass(frozen=True)
class Answer:
    """The outcome of one quote: the device's record as it now stands, and the refusal if any
    (raised by the caller after the transaction that consumed the nonce has committed)."""

    record: dict[str, Any]
    refused: QuoteRefused | None


class Attestations:
    def __init__(self, db: Database, *, pcr: int, clock: Callable[[], float] = time.time,
                 enrolled: Enrolled | None = None) -> None:
        self.db, self.pcr, self.clock = db, pcr, clock
        self.enrolled = enrolled or (lambda _device_id: None)

    def challenge(self, device_id: str) -> bytes:
        nonce = os.urandom(evidence.NONCE_BYTES)
        with self.db.tx():
            self.db.execute("INSERT INTO attest_nonces (device_id, nonce, issued) VALUES (?, ?, ?) "
                            "ON CONFLICT (device_id) DO UPDATE SET nonce = excluded.nonce, "
                            "issued = excluded.issued", [device_id, nonce.hex(), self.clock()])
        return nonce

    def answer(self, device_id: str, doc: Mapping[str, Any]) -> Answer:
        now = self.clock()
        with self.db.tx():
            rows = self.db.query("SELECT nonce, issued FROM attest_nonces WHERE device_id = ?",
                                 [device_id])
            self.db.execute("DELETE FROM attest_nonces WHERE device_id = ?", [device_id])
            have = self._row(device_id)
            try:
                if not rows:
                    raise QuoteRefused("no challenge is outstanding for this device (or it was "
                                       "answered already)", hint="ask for a new one: POST "
                                       f"…/{evidence.CHALLENGE_PATH}, then quote at once")
                if now - float(rows[0][1]) > evidence.NONCE_LIFETIME:
                    raise QuoteRefused(f"the challenge is older than {evidence.NONCE_LIFETIME} s",
                                       hint="ask for a new one and quote at once")
                ev = evidence.parse_evidence(doc)
                ak, kind = self._binding(device_id, have, ev)
                if ev.kind != kind:
                    raise QuoteRefused(f"the device attested as '{kind}' before and now says "
                                       f"'{ev.kind}'")
                j = evidence.judge(ev, bound_ak_pem=ak, nonce=bytes.fromhex(str(rows[0][0])),
                                   pcr=self.pcr)
            except QuoteRefused as exc:
                if have is not None:
                    self.db.execute("UPDATE attestations SET result = 'refused', detail = ?, "
                                    "checked = ?, refusals = refusals + 1 WHERE device_id = ?",
                                    [str(exc)[:300], now, device_id])
                return Answer(self.record(device_id) or {"device": device_id, "result": "refused",
                                                         "detail": str(exc)}, exc)
            events = [{"label": e.label, "digest": e.digest.hex()} for e in ev.events]
            fields = [ak.decode(), kind, "verified", "", now, now, j.boot_slot, json.dumps(events),
                      j.facts.reset_count, j.facts.restart_count]
            if have is None:
                self.db.execute(
                    "INSERT INTO attestations (ak, kind, result, detail, checked, verified, "
                    "boot_slot, events, resets, restarts, bound, quotes, device_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)", [*fields, now, device_id])
            else:
                self.db.execute(
                    "UPDATE attestations SET ak = ?, kind = ?, result = ?, detail = ?, checked = ?, "
                    "verified = ?, boot_slot = ?, events = ?, resets = ?, restarts = ?, "
                    "quotes = quotes + 1 WHERE device_id = ?", [*fields, device_id])
        record = self.record(device_id)
        assert record is not None
        return Answer(record, None)

    def _binding(self, device_id: str, have: tuple[Any, ...] | None,
                 ev: evidence.Evidence) -> tuple[bytes, str]:
        """The AK (and kind) this device's quotes must verify under: the device CA's enrolment,
        else the one bound by its first verified quote, else (first quote) the one it sends."""
        enrolled = self.enrolled(device_id)
        if enrolled is not None:
            return enrolled
        if have is not None:
            return str(have[0]).encode(), str(have[1])
        return ev.ak_public_pem, ev.kind

    def _row(self, device_id: str) -> tuple[Any, ...] | None:
        rows = self.db.query("SELECT ak, kind FROM attestations WHERE device_id = ?", [device_id])
        return tuple(rows[0]) if rows else None

    def record(self, device_id: str) -> dict[str, Any] | None:
        rows = self.db.query(
            "SELECT kind, result, detail, checked, verified, boot_slot, events, resets, restarts, "
            "bound, quotes, refusals, ak FROM attestations WHERE device_id = ?", [device_id])
        if not rows:
            return None
        r = rows[0]
        return {"device": device_id, "kind": r[0], "result": r[1], "detail": r[2], "checked": r[3],
                "verified": r[4], "boot_slot": r[5], "events": json.loads(r[6]), "reset_count": r[7],
                "restart_count": r[8], "bound": r[9], "quotes": r[10], "refusals": r[11],
                "pcr": self.pcr, "ak_sha256": evidence.key_digest(str(r[12]).encode())}

    def forget(self, device_id: str) -> None:
        """Drop the device's bound key and verdict: its next quote binds a key again (a replaced
        TPM). A device enrolled with the device CA stays bound to the CA's record."""
        with self.db.tx():
            if not self.db.execute("DELETE FROM attestations WHERE device_id = ?", [device_id]):
                raise NotFound(f"device {device_id!r} has no attestation on record")
            self.db.execute("DELETE FROM attest_nonces WHERE device_id = ?", [device_id])


__all__ = ["Answer", "Attestations"]
