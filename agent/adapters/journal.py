"""The journal: one SQLite file holding the life-cycle state, slot records, history and outbox.

WAL mode with ``synchronous=FULL`` so a committed transaction survives a power
cut. The journal stores and returns; it decides nothing. ``apply`` writes a new
life-cycle state together with its records in one transaction, which is what
lets the shell "persist before acting".
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core import lifecycle
from agent.errors import ConfigError, DeviceError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slots (
    name TEXT PRIMARY KEY, state TEXT NOT NULL, version TEXT,
    security_version INTEGER, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, event TEXT NOT NULL,
    slot TEXT, version TEXT, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    body TEXT NOT NULL, sent REAL);
"""
MAX_HISTORY = 10_000  # rows kept; older ones are pruned so the journal cannot fill the disk


class JournalError(DeviceError):
    """A journal transaction could not be made durable (a full disk, an I/O error). SQLite
    rolled it back, so the journal still holds its last committed state."""

    hint = "free space on the state partition (or check the disk); the journal kept its last state"


@dataclass(frozen=True)
class SlotInfo:
    name: str
    state: str
    version: str | None
    security_version: int | None


@dataclass(frozen=True)
class HistoryRow:
    id: int
    ts: float
    event: str
    slot: str | None
    version: str | None
    detail: str


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        _state_dir(path.parent)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO kv VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise DeviceError(f"journal {path} cannot be opened: {exc}",
                              hint="check the state directory; move a corrupt journal aside") from None

    def close(self) -> None:
        self._db.close()

    # --- key/value -------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def _put(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    def put(self, key: str, value: Any) -> None:
        with self._tx():
            self._put(key, value)

    def state(self) -> lifecycle.State:
        raw = self.get("state")
        return lifecycle.State.from_dict(raw) if raw else lifecycle.State()

    @property
    def security_floor(self) -> int:
        return int(self.get("security_floor", 0))

    @property
    def trusted_time(self) -> int:
        return int(self.get("trusted_time", 0))

    def raise_trusted_time(self, t: int) -> None:
        """Only ever moves forward (see agent.core.trust: the clock rule)."""
        with self._tx():
            if t > int(self.get("trusted_time", 0)):
                self._put("trusted_time", t)

    # --- transitions -----------------------------------------------------------------------
    def apply(self, t: lifecycle.Transition, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx():
            self._put("state", t.state.to_dict())
            for r in t.records:
                self._record(r, now)

    def record(self, records: Iterable[lifecycle.Record], *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx():
            for r in records:
                self._record(r, now)

    def _record(self, r: lifecycle.Record, now: float) -> None:
        match r:
            case lifecycle.SlotRecord():
                self._db.execute("INSERT OR REPLACE INTO slots VALUES (?,?,?,?,?)",
                                 (r.slot, r.state, r.version, r.security_version, now))
            case lifecycle.RaiseFloor():
                if r.security_version > int(self.get("security_floor", 0)):
                    self._put("security_floor", r.security_version)
            case lifecycle.History():
                self._db.execute(
                    "INSERT INTO history (ts, event, slot, version, detail) VALUES (?,?,?,?,?)",
                    (now, r.event, r.slot, r.version, r.detail))
                self._db.execute("DELETE FROM history WHERE id <= "
                                 "(SELECT MAX(id) FROM history) - ?", (MAX_HISTORY,))

    def _tx(self) -> _Tx:
        return _Tx(self._db, self.path)

    # --- reads -----------------------------------------------------------------------------
    def slots(self) -> dict[str, SlotInfo]:
        rows = self._db.execute("SELECT name, state, version, security_version FROM slots")
        return {r[0]: SlotInfo(*r) for r in rows}

    def event_counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT event, COUNT(*) FROM history GROUP BY event").fetchall())

    def history(self, limit: int = 50) -> list[HistoryRow]:
        rows = self._db.execute(
            "SELECT id, ts, event, slot, version, detail FROM history ORDER BY id DESC LIMIT ?",
            (limit,)).fetchall()
        return [HistoryRow(*r) for r in reversed(rows)]

    # --- outbox: reports waiting for the link (used by the fleet client) --------------------
    def enqueue(self, kind: str, body: dict[str, Any], *, now: float | None = None) -> int:
        with self._tx():
            cur = self._db.execute("INSERT INTO outbox (ts, kind, body) VALUES (?,?,?)",
                                   (time.time() if now is None else now, kind, json.dumps(body)))
            return int(cur.lastrowid or 0)

    def pending(self, limit: int = 100, *, kind: str | None = None
                ) -> list[tuple[int, str, dict[str, Any]]]:
        """Unsent reports in order; ``kind`` picks one sender's queue, so one sender's
        backlog never hides another's."""
        if kind is None:
            rows = self._db.execute("SELECT id, kind, body FROM outbox WHERE sent IS NULL "
                                    "ORDER BY id LIMIT ?", (limit,)).fetchall()
        else:
            rows = self._db.execute("SELECT id, kind, body FROM outbox WHERE sent IS NULL "
                                    "AND kind=? ORDER BY id LIMIT ?", (kind, limit)).fetchall()
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def pending_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE sent IS NULL").fetchone()[0])

    def mark_sent(self, outbox_id: int, *, now: float | None = None) -> None:
        with self._tx():
            self._db.execute("UPDATE outbox SET sent=? WHERE id=?",
                             (time.time() if now is None else now, outbox_id))


def _state_dir(d: Path) -> None:
    """Create the state directory, or say in one line why it cannot be one (``state_dir =
    "/dev/null"``, a file, an unwritable parent): a configuration error, not a traceback."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if d.exists() and not d.is_dir():
            raise ConfigError(f"state_dir {d} is not a directory",
                              hint="set [device] state_dir to a directory on the data partition") from None
        raise ConfigError(f"state_dir {d} cannot be created: {exc.strerror}",
                          hint="set [device] state_dir to a writable directory") from None


class _Tx:
    """One ``BEGIN IMMEDIATE`` … ``COMMIT``; any SQLite failure (``database or disk is full``)
    rolls back and becomes one ``JournalError`` line instead of a traceback."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as failed:
                exc = failed
        # A failed COMMIT may already have rolled back: then there is nothing left to roll back.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise self._failed(exc) from None

    def _failed(self, exc: sqlite3.Error) -> JournalError:
        return JournalError(f"journal {self._path} cannot be written: {exc}")
