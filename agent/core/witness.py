"""The journal's witness: a second, MAC'd copy of what a lost journal must not take along. Pure.

The journal holds the security floor, the best-known time, the slot records (which slot
holds a committed version) and the life-cycle state. A ``Record`` is a copy of exactly
those facts plus the journal's identity — a random id made when the journal was created —
and its generation, bumped by every transaction that changes one of them. The device keeps
the record where a journal loss does not reach it (``agent.adapters.witness``) and, before
it acts on the journal, ``judge`` compares the two: a journal that is missing, emptied,
replaced by another or by an older copy of itself is found here, instead of being
re-created with a floor of 0. ``recovered`` rebuilds the facts for ``edgeops journal
recover`` and never lowers the floor or the time.

The MAC is HMAC-SHA256 under a key the root of trust keeps (sealed by the TPM, or the
keystore's 0600 file); a device without a root of trust uses a fixed key, which catches
damage and mix-ups but, like everything on such a device, not a forger holding the disk.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from agent.core.state import State

FORMAT = "edgeops-witness/1"
UNKEYED = b"edgeops witness: no root of trust on this device"
MAX_BYTES = 64 * 1024  # a record is a few hundred bytes; a huge file is not one


class WitnessDamaged(ValueError):
    """The bytes are not a witness record this device wrote (torn, edited or foreign)."""


# A NamedTuple, not a dataclass: 'edgeops status' judges one, and Python 3.11 compiles each
# dataclass's methods at import (tools/bench/startup.py).
class Record(NamedTuple):
    journal_id: str
    generation: int
    security_floor: int
    trusted_time: int
    state: dict[str, Any]  # State.to_dict()
    slots: dict[str, dict[str, Any]]  # name -> state, version, sv


# --- the file format ----------------------------------------------------------------------------
def encode(rec: Record, key: bytes | None) -> bytes:
    """The record as canonical JSON with its MAC; ``key`` None: the device has no root of trust."""
    body = {"format": FORMAT, "keyed": key is not None, "record": rec._asdict()}
    return json.dumps({**body, "mac": _mac(body, key)}, sort_keys=True, indent=1).encode() + b"\n"


def decode(blob: bytes, key: bytes | None) -> tuple[Record, bool]:
    """The record in ``blob`` and whether it was keyed by the root of trust; raises
    ``WitnessDamaged`` for anything else. An unkeyed record is accepted on a device that
    has a root of trust now (it was written before the root was provisioned); ``judge``
    then has it rewritten keyed."""
    if len(blob) > MAX_BYTES:
        raise WitnessDamaged(f"{len(blob)} bytes, more than a witness record holds")
    try:
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise WitnessDamaged(f"not an {FORMAT} record")
        keyed = doc["keyed"]
        if not isinstance(keyed, bool):
            raise WitnessDamaged("'keyed' is not true or false")
        if keyed and key is None:
            raise WitnessDamaged("it was keyed by a root of trust this device does not open")
        body = {"format": FORMAT, "keyed": keyed, "record": doc["record"]}
        if not hmac.compare_digest(str(doc["mac"]), _mac(body, key if keyed else None)):
            raise WitnessDamaged("its MAC does not verify")
        return _record(doc["record"]), keyed
    except WitnessDamaged:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise WitnessDamaged(f"malformed ({type(exc).__name__})") from None


def _mac(body: Mapping[str, Any], key: bytes | None) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key if key is not None else UNKEYED, canonical, hashlib.sha256).hexdigest()


def _record(d: Any) -> Record:
    if not isinstance(d, dict):
        raise TypeError("record")
    rec = Record(str(d["journal_id"]), _int(d["generation"]), _int(d["security_floor"]),
                 _int(d["trusted_time"]), dict(d["state"]),
                 {str(k): dict(v) for k, v in dict(d["slots"]).items()})
    State.from_dict(rec.state)  # a state the life cycle cannot read is no state to recover
    return rec


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("not a count")
    return v


# --- judging a journal against its witness ------------------------------------------------------
Verdict = Literal["ok", "refresh", "lost"]


class Finding(NamedTuple):  # a NamedTuple for the reason Record is one
    verdict: Verdict  # ok: they agree; refresh: write the witness from the journal; lost: refuse
    reason: str


def judge(journal: Record, *, fresh: bool, witness: Record | None, damaged: str | None = None,
          keyed: bool = True, root_key: bool = False) -> Finding:
    """Whether the journal is the one its witness knows.

    ``fresh``: the journal made its identity in this very open (it did not exist, was empty,
    or predates identities). ``witness`` None: there is none; ``damaged``: there is one that
    did not decode. ``keyed``: the witness was keyed by the root of trust; ``root_key``: the
    device has one now. The witness is written after the journal's commit, so it may lag
    (a power cut in between, or a model install that raised the trusted time): a witness
    behind its own journal is brought up to date, never the other way round."""
    if damaged is not None:
        return Finding("lost", f"its witness is damaged: {damaged}")
    if witness is None:
        return Finding("refresh", "first witness of this journal")
    known = f"the witness knows journal {witness.journal_id[:8]} at generation {witness.generation} " \
            f"with floor {witness.security_floor}"
    if fresh:
        return Finding("lost", f"the journal was lost or emptied and re-created; {known}")
    if journal.journal_id != witness.journal_id:
        return Finding("lost", f"the journal was re-created or replaced (it is journal "
                               f"{journal.journal_id[:8]}); {known}")
    if journal.generation < witness.generation:
        return Finding("lost", f"the journal is an older copy of itself (generation "
                               f"{journal.generation}); {known}")
    if journal.security_floor < witness.security_floor or journal.trusted_time < witness.trusted_time:
        return Finding("lost", f"the journal's floor or trusted time is below its witness's; {known}")
    if root_key and not keyed:
        return Finding("refresh", "the witness is keyed by the root of trust from now on")
    if journal.generation > witness.generation or journal != witness:
        return Finding("refresh", "the witness catches up with its journal")
    return Finding("ok", "the journal matches its witness")


def recovered(witness: Record | None, *, journal: Record | None, root_floor: int | None,
              fallback: Record) -> Record:
    """The facts ``edgeops journal recover`` writes into a new journal.

    Slots and state come from the witness; without a usable one, from the journal it
    replaces if that one is still readable, else ``fallback`` (the shell's minimal record:
    idle, the bootloader's primary slot good). The floor and the trusted time are the
    highest any source knows — the root of trust's counter included — so recovering can
    never lower them."""
    base = witness or journal or fallback
    sources = [r for r in (witness, journal, fallback) if r is not None]
    floor = max([r.security_floor for r in sources] + [root_floor or 0])
    when = max(r.trusted_time for r in sources)
    return Record(base.journal_id, base.generation, floor, when, dict(base.state),
                  {k: dict(v) for k, v in base.slots.items()})


__all__ = ["FORMAT", "Finding", "Record", "WitnessDamaged", "decode", "encode", "judge", "recovered"]
