"""What devices can make the controller keep: the bounds, and the compaction of old feedback.

A device decides how often it reports and how much it puts in a report; the controller
decides what it keeps (docs/fleet-controller.md, "Retention"): per action the newest
``FEEDBACK_KEPT`` reports and the first failure; for actions closed longer than
``FEEDBACK_RETENTION`` only the last report and the first failure; a bounded set of
configData attributes; Idempotency-Keys of bounded length. What one report keeps is
``actions.stored_report``'s business. The functions run inside the caller's transaction.
"""

from __future__ import annotations

import json

from agent.controller import tokens
from agent.controller.db import Database
from agent.controller.errors import BadRequest

FEEDBACK_KEPT = 20  # reports kept per action: the newest, and the first failure besides
FEEDBACK_RETENTION = 30 * 86400.0  # seconds after which a closed action keeps only its last report
COMPACT_BATCH = 500  # closed actions compacted per transaction
MAX_ATTRIBUTES = 100  # configData attributes per device (hawkBit's default quota is 100 too)
MAX_ATTRIBUTE_KEY = 128  # characters (hawkBit: 128)
MAX_ATTRIBUTE_VALUE = 2048  # characters (what agent.core.ddi sends at most)
MAX_KEY = 64  # bytes of an Idempotency-Key as stored


def trim_feedback(db: Database, action_id: int, keep: int) -> None:
    """Keep the newest ``keep`` reports of an action and its first failure."""
    rows = db.query("SELECT id FROM feedback WHERE action_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                    [action_id, keep - 1])
    if not rows:
        return
    first = db.query("SELECT MIN(id) FROM feedback WHERE action_id = ? AND finished = 'failure'",
                     [action_id])[0][0]
    db.execute("DELETE FROM feedback WHERE action_id = ? AND id < ? AND id <> ?",
               [action_id, rows[0][0], first if first is not None else -1])


def compact(db: Database, cutoff: float, batch: int = COMPACT_BATCH) -> int:
    """Actions closed before ``cutoff`` keep only their last report and their first failure.
    One transaction, at most ``batch`` actions, continuing from where the last call stopped
    (a cursor in kv); returns how many it compacted."""
    with db.tx():
        rows = db.query("SELECT v FROM kv WHERE k = 'compacted_until'")
        since, last = json.loads(rows[0][0]) if rows else [0.0, 0]
        actions = db.query(  # in (updated, id) order: ties on 'updated' cannot stall the cursor
            "SELECT id, updated FROM actions WHERE status IN ('success', 'failure', 'canceled') "
            "AND updated < ? AND (updated > ? OR (updated = ? AND id > ?)) ORDER BY updated, id "
            "LIMIT ?", [cutoff, since, since, last, batch])
        for action_id, updated in actions:
            trim_feedback(db, int(action_id), 1)
            since, last = float(updated), int(action_id)
        db.execute("INSERT INTO kv (k, v) VALUES ('compacted_until', ?) ON CONFLICT (k) DO "
                   "UPDATE SET v = excluded.v", [json.dumps([since, last])])
    return len(actions)


def check_attributes(data: dict[str, str]) -> None:
    for k, v in data.items():
        if not k or len(k) > MAX_ATTRIBUTE_KEY or len(v) > MAX_ATTRIBUTE_VALUE:
            raise BadRequest(f"configData attribute {k[:40]!r}: keys are 1-{MAX_ATTRIBUTE_KEY} and "
                             f"values at most {MAX_ATTRIBUTE_VALUE} characters")


def idem_key(key: str | None) -> str | None:
    """An Idempotency-Key as stored: a long one by its digest, so a key costs at most 64 bytes."""
    if not key:
        return None
    return key if len(key) <= MAX_KEY else "sha256:" + tokens.digest(key)[:MAX_KEY - 7]
