"""The journal: one SQLite file holding the life-cycle state, slot records, history and outbox.

WAL mode with ``synchronous=FULL`` so a committed transaction survives a power
cut. The journal stores and returns; it decides nothing. ``apply`` writes a new
life-cycle state together with its records in one transaction, which is what
lets the shell "persist before acting".

It also knows who it is: a random ``identity`` made when the file was created (``fresh``
says that happened in this open) and a ``generation`` bumped by every transaction that
changes a witnessed fact — state, slot records, floor, trusted time. A follower set with
``follow`` (the device's witness file, ``agent.adapters.witness``) gets ``facts()`` after
each such commit, so a lost, emptied or replaced journal is told from this one
(``agent.core.witness.judge``) instead of silently starting again at floor 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.adapters.fsutil import fsync_dir
from agent.core import witness
from agent.core.state import State
from agent.errors import ConfigError, DeviceError

if TYPE_CHECKING:  # the table itself is not needed to store its output
    from agent.core.lifecycle import Transition
    from agent.core.records import HistoryRow, Record

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
WITNESSED_KEYS = ("state", "security_floor", "trusted_time")  # and the slots table
RECOVER_HINT = "run 'edgeops journal recover' (it keeps the old file beside the new journal)"
Follower = Callable[[witness.Record], None]


class JournalError(DeviceError):
    """A journal transaction could not be made durable (a full disk, an I/O error). SQLite
    rolled it back, so the journal still holds its last committed state."""

    hint = "free space on the state partition (or check the disk); the journal kept its last state"


class JournalCorrupt(JournalError):
    """SQLite cannot read the file (not a database, or a damaged page)."""

    hint = RECOVER_HINT


# A NamedTuple, not a dataclass: 'edgeops status' reads it, and Python 3.11 compiles each
# dataclass's methods at import (tools/bench/startup.py). So the records written and the
# history read back (agent.core.records) are imported where they are used.
class SlotInfo(NamedTuple):
    name: str
    state: str
    version: str | None
    security_version: int | None


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._follower: Follower | None = None
        self._batch: _Batch | None = None
        _state_dir(path.parent)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO kv VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(f"journal {path} cannot be opened: {exc}") from None
        self.fresh = self._make_identity()

    def _make_identity(self) -> bool:
        if self.get("journal_id") is not None:  # the common case reads, and writes nothing
            return False
        with self._tx():
            if self.get("journal_id") is not None:  # another process was quicker
                return False
            self._put("journal_id", os.urandom(16).hex())  # a random id, as uuid4 is
            self._put("generation", 0)
            return True

    def close(self) -> None:
        self._db.close()

    # --- key/value -------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return list(self._db.execute(sql, args).fetchall())
        except sqlite3.DatabaseError as exc:  # e.g. "database disk image is malformed"
            raise JournalCorrupt(f"journal {self.path} cannot be read: {exc}") from None

    def get(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def _put(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    def put(self, key: str, value: Any) -> None:
        with self._tx():
            self._put(key, value)
            bumped = self._bump() if key in WITNESSED_KEYS else False
        self._notify(bumped)

    def state(self) -> State:
        raw = self.get("state")
        return State.from_dict(raw) if raw else State()

    @property
    def security_floor(self) -> int:
        return int(self.get("security_floor", 0))

    @property
    def trusted_time(self) -> int:
        return int(self.get("trusted_time", 0))

    def raise_trusted_time(self, t: int) -> None:
        """Only ever moves forward (see agent.core.trust: the clock rule)."""
        bumped = False
        with self._tx():
            if t > int(self.get("trusted_time", 0)):
                self._put("trusted_time", t)
                bumped = self._bump()
        self._notify(bumped)

    # --- identity and witness --------------------------------------------------------------
    @property
    def identity(self) -> str:
        return str(self.get("journal_id", ""))

    @property
    def generation(self) -> int:
        return int(self.get("generation", 0))

    def facts(self) -> witness.Record:
        """What the witness keeps a copy of, as of the last commit."""
        slots = {name: {"state": i.state, "version": i.version, "security_version": i.security_version}
                 for name, i in self.slots().items()}
        return witness.Record(self.identity, self.generation, self.security_floor, self.trusted_time,
                              self.state().to_dict(), slots)

    def follow(self, follower: Follower | None) -> None:
        """Hand ``facts()`` to ``follower`` after every commit that changes one of them."""
        self._follower = follower

    def _bump(self) -> bool:
        self._put("generation", int(self.get("generation", 0)) + 1)
        return True

    def _notify(self, bumped: bool) -> None:
        # After the commit: a power cut in between leaves the witness one generation behind,
        # which the next open brings up to date (agent.core.witness.judge).
        if self._batch is not None:  # the batch's one commit notifies once (batch)
            self._batch.bumped |= bumped
            return
        if bumped and self._follower is not None:
            self._follower(self.facts())

    def restore(self, rec: witness.Record, detail: str, *, now: float | None = None) -> None:
        """Write recovered facts over this (new) journal in one transaction, noting it in the history."""
        from agent.core.records import History

        now = time.time() if now is None else now
        with self._tx():
            self._db.execute("DELETE FROM slots")
            for name, info in rec.slots.items():
                self._db.execute("INSERT INTO slots VALUES (?,?,?,?,?)",
                                 (name, str(info["state"]), info.get("version"),
                                  info.get("security_version"), now))
            self._put("state", rec.state)
            self._put("security_floor", rec.security_floor)
            self._put("trusted_time", rec.trusted_time)
            self._record(History("recovered", None, None, detail), now)
            self._bump()
        self.fresh = False  # it holds what its witness vouched for, no longer nothing
        self._notify(True)

    # --- transitions -----------------------------------------------------------------------
    def apply(self, t: Transition, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx():
            self._put("state", t.state.to_dict())
            for r in t.records:
                self._record(r, now)
            self._bump()
        self._notify(True)

    def record(self, records: Iterable[Record], *, now: float | None = None) -> None:
        from agent.core.records import History

        now = time.time() if now is None else now
        records = list(records)
        with self._tx():
            for r in records:
                self._record(r, now)
            bumped = (self._bump() if any(not isinstance(r, History) for r in records)
                      else False)
        self._notify(bumped)

    def _record(self, r: Record, now: float) -> None:
        from agent.core.records import History, RaiseFloor, SlotRecord

        match r:
            case SlotRecord():
                self._db.execute("INSERT OR REPLACE INTO slots VALUES (?,?,?,?,?)",
                                 (r.slot, r.state, r.version, r.security_version, now))
            case RaiseFloor():
                if r.security_version > int(self.get("security_floor", 0)):
                    self._put("security_floor", r.security_version)
            case History():
                self._db.execute(
                    "INSERT INTO history (ts, event, slot, version, detail) VALUES (?,?,?,?,?)",
                    (now, r.event, r.slot, r.version, r.detail))
                self._db.execute("DELETE FROM history WHERE id <= "
                                 "(SELECT MAX(id) FROM history) - ?", (MAX_HISTORY,))

    def _tx(self) -> _Tx:
        return self._batch.join() if self._batch is not None else _Tx(self._db, self.path)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The transactions inside are one: one commit, one WAL sync, one witness update, or
        (on any exception) nothing. For writes with no side effect between them: the install
        records the trusted time and the trial's signer so (docs/performance.md). The write
        lock is taken at the first write, so reads before it hold no writer off. Nested: joins."""
        if self._batch is not None:
            yield
            return
        self._batch = batch = _Batch(self._db, self.path)
        try:
            yield
        except BaseException:
            batch.end(ok=False)
            raise
        finally:
            self._batch = None
        batch.end(ok=True)
        self._notify(batch.bumped)

    # --- reads -----------------------------------------------------------------------------
    def slots(self) -> dict[str, SlotInfo]:
        rows = self._query("SELECT name, state, version, security_version FROM slots")
        return {r[0]: SlotInfo(*r) for r in rows}

    def event_counts(self) -> dict[str, int]:
        return dict(self._query("SELECT event, COUNT(*) FROM history GROUP BY event"))

    def history(self, limit: int = 50) -> list[HistoryRow]:
        from agent.core.records import HistoryRow

        rows = self._query(
            "SELECT id, ts, event, slot, version, detail FROM history ORDER BY id DESC LIMIT ?",
            (limit,))
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

    def last_delivered(self) -> float | None:
        """When the controller last took a report (the console's "last contact"), or None."""
        row = self._query("SELECT MAX(sent) FROM outbox")
        return float(row[0][0]) if row and row[0][0] is not None else None

    def mark_sent(self, outbox_id: int, *, now: float | None = None) -> None:
        with self._tx():
            self._db.execute("UPDATE outbox SET sent=? WHERE id=?",
                             (time.time() if now is None else now, outbox_id))


def set_aside(path: Path, why: str) -> Path | None:
    """Rename a journal (and its -wal/-shm) out of the way, keeping it for inspection; the
    name says why and when. None when there was no file. Nothing is deleted."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{why}-{stamp}.{n}")
    for suffix in ("-wal", "-shm", ""):
        src = path.with_name(path.name + suffix)
        if src.exists():
            os.replace(src, aside.with_name(aside.name + suffix))
    fsync_dir(path.parent)
    return aside


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



class _Joined(_Tx):
    """A transaction inside a batch, committed with it; a SQLite error is still a JournalError."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if isinstance(exc, sqlite3.Error):
            raise self._failed(exc) from None


class _Batch:
    """``Journal.batch``'s one ``BEGIN IMMEDIATE`` … ``COMMIT``, begun at its first write."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db, self._path, self._tx, self._begun, self.bumped = db, path, _Tx(db, path), False, False

    def join(self) -> _Joined:
        if not self._begun:
            self._tx.__enter__()
            self._begun = True
        return _Joined(self._db, self._path)

    def end(self, *, ok: bool) -> None:
        if self._begun:  # commit, or roll back (a failed COMMIT rolls back and raises: _Tx)
            self._tx.__exit__(None if ok else RuntimeError, None, None)
