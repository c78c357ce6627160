"""The device's side of remote attestation: when to quote to the controller, and how.

At the agent's first successful poll of each boot (the boot's measurements are in:
``boot:slot``, after the cycle that precedes every poll) and then every
``[fleet] attest_interval`` seconds, the agent asks its controller for a nonce
(``POST …/attestation/challenge``), quotes its measurement PCR with it
(``RootOfTrust.quote``) and sends the quote with its event log
(``POST …/attestation/quote``); the controller judges it (``agent.core.evidence``). The
protocol is edgeops's, beside hawkBit's DDI: a controller that does not know it (hawkBit
itself, 404) is asked again a day later, not at every poll. Never fatal for the poll: a
failed attestation is one message and a retry. A device without a root of trust does not
attest (there is nothing to quote).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent.core import evidence
from agent.errors import EdgeopsError

if TYPE_CHECKING:
    from agent.adapters.ddi_http import DdiClient
    from agent.adapters.rot.base import RootOfTrust

KEY = "fleet.attest"  # journal kv: {"boot": boot id of the last quote, "next": epoch seconds}
RETRY_FAILED = 60.0  # seconds before trying again after a network or TPM failure
RETRY_REFUSED = 600.0  # seconds before quoting again after the controller refused a quote
RETRY_UNSUPPORTED = 86400.0  # a controller without the attestation routes (404, 405)


class Kv(Protocol):
    def get(self, key: str) -> Any: ...
    def put(self, key: str, value: Any) -> None: ...


class Attestor:
    """Quote once per boot (a new boot id: new measurements) and then every ``interval``.

    The schedule is in the journal, not in memory: the idle service starts a fresh worker
    process for each wake-up with work (``agent.device.worker``), and each must not quote
    again. Periodic quotes happen at the polls of a process that polls (``run``); the idle
    service wakes no worker only to quote."""

    def __init__(self, root: Callable[[], RootOfTrust | None], client: DdiClient, journal: Kv,
                 boot_id: Callable[[], str], *, interval: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.root, self.client, self.journal = root, client, journal
        self.boot_id, self.interval, self.clock = boot_id, interval, clock

    def due(self) -> bool:
        if self.interval <= 0:
            return False
        last = self.journal.get(KEY)
        if not isinstance(last, dict) or last.get("boot") != self.boot_id():
            return True
        left = float(last.get("next", 0)) - self.clock()
        # a clock set back would otherwise postpone the next quote by as much
        return left <= 0 or left > max(self.interval, RETRY_UNSUPPORTED)

    def maybe_attest(self) -> str | None:
        """Quote to the controller if due; a message for the poll's outcome, or None."""
        if not self.due():
            return None
        try:
            root = self.root()
            if root is None:
                self.interval = 0  # no root of trust on this device: nothing will ever be quoted
                return None
            return self._attest(root)
        except EdgeopsError as exc:  # transport failure or a TPM error: try again soon
            self._later(RETRY_FAILED)
            return f"attestation failed: {exc.one_line()}"

    def _attest(self, root: RootOfTrust) -> str:
        code, doc = self.client.post_json(evidence.CHALLENGE_PATH, {})
        if code in (404, 405):
            self._later(RETRY_UNSUPPORTED)
            return "attestation: the controller has no attestation routes (asking again in a day)"
        nonce_hex = doc.get("nonce")
        if code != 200 or not isinstance(nonce_hex, str) or len(nonce_hex) > 2 * evidence.NONCE_BYTES:
            self._later(RETRY_REFUSED)
            return f"attestation: the controller's challenge answered HTTP {code} without a nonce"
        try:
            nonce = bytes.fromhex(nonce_hex)
        except ValueError:
            self._later(RETRY_REFUSED)
            return "attestation: the controller's nonce is not hex"
        quote = root.quote(nonce)
        code, doc = self.client.post_json(evidence.QUOTE_PATH, quote.to_dict())
        if code != 200:
            self._later(RETRY_REFUSED)
            return (f"attestation refused by the controller (HTTP {code}): "
                    f"{str(doc.get('message', ''))[:200]}")
        self._later(self.interval)
        return (f"attestation verified by the controller: {quote.kind} quote of PCR "
                f"{list(quote.pcrs)}, {len(quote.events)} event(s), boot slot {doc.get('boot_slot')}")

    def _later(self, seconds: float) -> None:
        self.journal.put(KEY, {"boot": self.boot_id(), "next": self.clock() + seconds})


__all__ = ["KEY", "Attestor"]
