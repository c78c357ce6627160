"""The controller's database: SQLite by default (WAL), or PostgreSQL given a ``postgresql://`` URL.

All SQL in this package is written once, in the subset both engines accept:
``?`` placeholders (rewritten to ``%s`` for psycopg), ``INSERT ... ON CONFLICT``,
``RETURNING id``, ``DOUBLE PRECISION``/``BIGINT`` columns. The only per-engine
text is the auto-increment key and the row lock (``FOR UPDATE``), which SQLite
does not need because ``BEGIN IMMEDIATE`` already serialises writers.

Several controller processes may share one PostgreSQL database: every state
change runs in one transaction, and the rollout gate locks its rollout row.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.controller.errors import BadRequest

Row = tuple[Any, ...]

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, token TEXT NOT NULL, site TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]', attributes TEXT NOT NULL DEFAULT '{}',
    version TEXT, last_seen DOUBLE PRECISION, created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS group_members (
    grp TEXT NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (grp, device_id));
CREATE TABLE IF NOT EXISTS bundles (
    id {pk}, version TEXT NOT NULL, compatible TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    sha1 TEXT NOT NULL, md5 TEXT NOT NULL, size BIGINT NOT NULL, filename TEXT NOT NULL,
    signer TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id {pk}, bundle_id BIGINT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL,
    policy TEXT NOT NULL, current_wave INTEGER NOT NULL, waves INTEGER NOT NULL,
    wave_started DOUBLE PRECISION, reason TEXT NOT NULL DEFAULT '',
    created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_targets (
    rollout_id BIGINT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS actions (
    id {pk}, device_id TEXT NOT NULL, bundle_id BIGINT NOT NULL, rollout_id BIGINT,
    wave INTEGER, status TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS actions_device ON actions (device_id, status);
CREATE INDEX IF NOT EXISTS actions_rollout ON actions (rollout_id, wave);
CREATE TABLE IF NOT EXISTS feedback (
    id {pk}, action_id BIGINT NOT NULL, device_id TEXT NOT NULL, execution TEXT NOT NULL,
    finished TEXT NOT NULL, body TEXT NOT NULL, received DOUBLE PRECISION NOT NULL, idem_key TEXT);
CREATE INDEX IF NOT EXISTS feedback_key ON feedback (device_id, idem_key);
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mirror_docs (
    device_id TEXT NOT NULL, path TEXT NOT NULL, body TEXT NOT NULL,
    fetched DOUBLE PRECISION NOT NULL, PRIMARY KEY (device_id, path));
CREATE TABLE IF NOT EXISTS mirror_auth (device_id TEXT PRIMARY KEY, auth TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id {pk}, device_id TEXT NOT NULL, path TEXT NOT NULL, method TEXT NOT NULL,
    body TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
"""


class Database(Protocol):
    dialect: str
    for_update: str

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def insert(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def tx(self) -> Any: ...
    def close(self) -> None: ...


@dataclass
class SqliteDatabase:
    """One connection guarded by a lock: the aiohttp loop and test threads may share it."""

    path: Path
    dialect: str = "sqlite"
    for_update: str = ""

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a power cut loses at most the last commits, never corrupts.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._lock = threading.RLock()
        self._depth = 0
        self._db.executescript(SCHEMA.replace("{pk}", "INTEGER PRIMARY KEY AUTOINCREMENT"))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, tuple(params)).rowcount

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            row = self._db.execute(sql + " RETURNING id", tuple(params)).fetchone()
            return int(row[0])

    @contextmanager
    def tx(self) -> Iterator[None]:
        with self._lock:
            if self._depth:  # nested: the outer transaction commits
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresDatabase:
    """psycopg 3, one connection per process; autocommit outside ``tx()``."""

    dialect = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise BadRequest("a PostgreSQL URL needs psycopg",
                             hint="pip install 'psycopg[binary]>=3.1'") from None
        self._conn = psycopg.connect(url, autocommit=True)
        self._lock = threading.RLock()
        self._depth = 0
        # Several processes may start at once: serialise schema creation.
        with self._lock, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(4242)")
            for stmt in SCHEMA.replace("{pk}", "BIGSERIAL PRIMARY KEY").split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)  # type: ignore[arg-type]

    @staticmethod
    def _sql(sql: str) -> Any:
        return sql.replace("?", "%s")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return list(self._conn.execute(self._sql(sql), tuple(params)).fetchall())

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return int(self._conn.execute(self._sql(sql), tuple(params)).rowcount)

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            row = self._conn.execute(self._sql(sql + " RETURNING id"), tuple(params)).fetchone()
            assert row is not None
            return int(row[0])

    @contextmanager
    def tx(self) -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                with self._conn.transaction():
                    yield
            finally:
                self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_database(url: str) -> Database:
    """``sqlite:///path``, a bare path, or ``postgresql://…``."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    if not path:
        raise BadRequest(f"database URL {url!r} names no file")
    return SqliteDatabase(Path(path))
