"""The controller's database: SQLite by default (WAL), or PostgreSQL given a ``postgresql://`` URL.

All SQL in this package is written once, in the subset both engines accept:
``?`` placeholders (rewritten to ``%s`` for psycopg), ``INSERT ... ON CONFLICT``,
``RETURNING id``, ``DOUBLE PRECISION``/``BIGINT`` columns. The only per-engine
text is the auto-increment key and the row lock (``FOR UPDATE``), which SQLite
does not need because ``BEGIN IMMEDIATE`` already serialises writers.

Several controller processes may share one PostgreSQL database: every state
change runs in one transaction, and the rollout gate locks its rollout row.

The schema carries a version (kv ``schema``); ``prepare`` brings an older database up to
``SCHEMA_VERSION`` in one transaction when it is opened (``MIGRATIONS``).

Damage is refused, never papered over (``DatabaseRefused``, one line, exit 20): a new
database is made only where none exists (no file; on PostgreSQL, none of our tables), or
in an empty file when the operator says ``init``. An existing file that is empty, fails
SQLite's ``quick_check``, is not SQLite at all, or lacks the controller's tables is not
touched. (Starting an empty fleet over a damaged one would turn every device away with 401.) The SQLite file
and the ``-wal``/``-shm`` files SQLite makes beside it (which take the main file's mode)
are private to the controller's user: the file is created 0600, and tightened to 0600 if
an older controller left it readable.

Long because it holds both backends side by side (about 470 lines), with the schema and its
migrations, so that what each engine does differently (the reader connection, savepoints,
commit failure) can be read in one place.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.adapters.fsutil import fsync_dir
from agent.controller import tokens
from agent.controller.errors import BadRequest, DatabaseRefused, ReaderBusy
from agent.errors import TransportError

Row = tuple[Any, ...]
SCHEMA_VERSION = 5
REQUIRED = ("devices", "actions", "kv")  # tables every controller database has had since version 1
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
    updated DOUBLE PRECISION NOT NULL, detail TEXT NOT NULL DEFAULT '',
    success_after TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS actions_device ON actions (device_id, status);
CREATE INDEX IF NOT EXISTS actions_rollout ON actions (rollout_id, wave);
CREATE TABLE IF NOT EXISTS feedback (
    id {pk}, action_id BIGINT NOT NULL, device_id TEXT NOT NULL, execution TEXT NOT NULL,
    finished TEXT NOT NULL, body TEXT NOT NULL, received DOUBLE PRECISION NOT NULL, idem_key TEXT);
CREATE INDEX IF NOT EXISTS feedback_key ON feedback (device_id, idem_key);
CREATE INDEX IF NOT EXISTS feedback_action ON feedback (action_id, id);
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mirror_docs (
    device_id TEXT NOT NULL, path TEXT NOT NULL, body TEXT NOT NULL,
    fetched DOUBLE PRECISION NOT NULL, PRIMARY KEY (device_id, path));
CREATE TABLE IF NOT EXISTS mirror_auth (device_id TEXT PRIMARY KEY, auth TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id {pk}, device_id TEXT NOT NULL, path TEXT NOT NULL, method TEXT NOT NULL,
    body TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_events (
    id {pk}, rollout_id BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL, who TEXT NOT NULL,
    event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, id);
CREATE TABLE IF NOT EXISTS rollout_skipped (
    rollout_id BIGINT NOT NULL, device_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS attest_nonces (
    device_id TEXT PRIMARY KEY, nonce TEXT NOT NULL, issued DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS attestations (
    device_id TEXT PRIMARY KEY, ak TEXT NOT NULL, kind TEXT NOT NULL,
    bound DOUBLE PRECISION NOT NULL, result TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
    checked DOUBLE PRECISION NOT NULL, verified DOUBLE PRECISION, boot_slot TEXT,
    events TEXT NOT NULL DEFAULT '[]', resets BIGINT, restarts BIGINT,
    quotes BIGINT NOT NULL DEFAULT 0, refusals BIGINT NOT NULL DEFAULT 0);
"""


TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))


class Database(Protocol):
    dialect: str
    for_update: str

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def insert(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def tx(self) -> Any: ...
    def savepoint(self) -> Any: ...
    def reading(self) -> Any: ...
    @property
    def has_reader(self) -> bool: ...
    def close(self) -> None: ...


# --- schema versions -----------------------------------------------------------------------------
def _v2_token_digests(db: Database) -> None:
    """Version 1 kept every device token and the operator token in plaintext."""
    for device_id, token in db.query("SELECT id, token FROM devices"):
        db.execute("UPDATE devices SET token = ? WHERE id = ?", [tokens.digest(token), device_id])
    for (token,) in db.query("SELECT v FROM kv WHERE k = 'api_token'"):
        db.execute("INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                   [tokens.OPERATOR_KEY, tokens.digest(token)])
    db.execute("DELETE FROM kv WHERE k = 'api_token'")


def _v3_success_after(db: Database) -> None:
    """What a success meant (actions.success_signal): 'commit' or 'write'; '' before version 3."""
    db.execute("ALTER TABLE actions ADD COLUMN success_after TEXT NOT NULL DEFAULT ''")


def _v4_rollout_history(db: Database) -> None:
    """A rollout's history (rollout_events: who did what when) and the devices an operator
    skipped (rollout_skipped). Both are new tables, which ``prepare`` creates from SCHEMA right
    after the migrations (IF NOT EXISTS); older rollouts simply have no history before it."""


def _v5_attestation(db: Database) -> None:
    """Remote attestation (controller.attestation): the nonces issued (attest_nonces) and each
    device's bound attestation key and last verdict (attestations); new tables, as in v4."""


# MIGRATIONS[n] takes a database from version n + 1 to n + 2 (version 1 had no 'schema' row).
MIGRATIONS: list[Callable[[Database], None]] = [_v2_token_digests, _v3_success_after,
                                                 _v4_rollout_history, _v5_attestation]
assert len(MIGRATIONS) == SCHEMA_VERSION - 1


def schema_statements(pk: str) -> list[str]:
    return [stmt for stmt in SCHEMA.replace("{pk}", pk).split(";") if stmt.strip()]


def prepare(db: Database, pk: str, *, fresh: bool) -> int:
    """Create the schema (``fresh``) or migrate it to ``SCHEMA_VERSION``; returns the version the
    database had (0 for a fresh one). One transaction: a crash leaves the old version whole."""
    with db.tx():
        if db.dialect == "postgresql":  # several processes may start at once
            db.query("SELECT pg_advisory_xact_lock(4242)")
        if fresh:
            had = 0
        else:
            rows = db.query("SELECT v FROM kv WHERE k = 'schema'")
            had = int(rows[0][0]) if rows else 1
            if had > SCHEMA_VERSION:
                raise DatabaseRefused(f"the database has schema version {had}; this controller "
                                      f"knows {SCHEMA_VERSION}", hint="run the newer edgeops that wrote it")
            for step in MIGRATIONS[had - 1:]:
                step(db)
        for stmt in schema_statements(pk):  # IF NOT EXISTS: adds what a migration did not
            db.execute(stmt)
        db.execute("INSERT INTO kv (k, v) VALUES ('schema', ?) ON CONFLICT (k) DO UPDATE SET "
                   "v = excluded.v", [str(SCHEMA_VERSION)])
    return had


def _private(path: Path) -> None:
    """Tighten a database file (and its -wal/-shm) that an older controller left readable."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mode & 0o077:
                p.chmod(0o600)


SQLITE_PK = "INTEGER PRIMARY KEY AUTOINCREMENT"
READER_WAIT_MS = 50  # the reader connection's busy timeout (it may run on the event loop)


@dataclass
class SqliteDatabase:
    """One connection guarded by a lock: the aiohttp loop and test threads may share it."""

    path: Path
    init: bool = False  # an existing empty file (or SQLite file with no tables) may become a new one
    dialect: str = "sqlite"
    for_update: str = ""
    _building: bool = field(default=False, repr=False)  # the temporary file of _create

    def __post_init__(self) -> None:
        fresh = self._building
        try:
            if not self._building:
                if not self.path.exists():
                    self._create()
                elif self.path.stat().st_size == 0:
                    if not self.init:
                        raise DatabaseRefused(f"the database {self.path} is empty (0 bytes)")
                    self._create(replace_empty=True)
                _private(self.path)
        except OSError as exc:
            raise DatabaseRefused(f"cannot open the database {self.path}: {exc.strerror or exc}",
                                  hint="check the path and its permissions") from None
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._depth = 0
        self._local = threading.local()  # .reading: this thread's queries go to the reader
        self._rdb: sqlite3.Connection | None = None  # opened on the first read (``reading``)
        self._rlock = threading.Lock()
        try:
            self._db.execute("PRAGMA busy_timeout=5000")
            if not fresh:  # read only, before anything (even the journal mode) is written
                fresh = self._check()
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + FULL: a commit is on disk when COMMIT returns (the WAL is fsynced), so a
            # report acknowledged after it survives a power cut as well as a SIGKILL. Device
            # writes are group-committed (dbexec), so that is one fsync per batch (0.8 ms here).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")  # a migration must leave no plaintext behind
            had = prepare(self, SQLITE_PK, fresh=fresh)
            self._db.execute("PRAGMA secure_delete=OFF")
            if had == 1:  # old plaintext tokens: rewrite the file without them, and empty the WAL
                self._db.execute("VACUUM")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if not self._building:  # opened now, not under load (its descriptors, its WAL map)
                self._reader()
        except sqlite3.DatabaseError as exc:  # not SQLite, truncated, or damaged pages
            self._db.close()
            raise DatabaseRefused(f"the database {self.path} cannot be read: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    def _check(self) -> bool:
        """An existing file: whole, and a controller's. Returns True for an empty SQLite database
        that ``init`` allows to become a new one."""
        problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise DatabaseRefused(f"the database {self.path} is damaged: {problems[0]}")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and self.init:
            return True
        if not tables:
            raise DatabaseRefused(f"the database {self.path} holds no tables")
        missing = [t for t in REQUIRED if t not in tables]
        if missing:
            raise DatabaseRefused(f"{self.path} is not a controller database (no table {missing[0]!r})",
                                  hint="check --db: this file belongs to something else")
        return False

    def _create(self, *, replace_empty: bool = False) -> None:
        """A complete new database appears under ``path`` in one step, or not at all: it is built
        in a 0600 file beside it (the -wal and -shm files take that mode) and linked into place,
        so a process starting at the same moment never finds a half-made or empty file.
        ``replace_empty``: put it in place of an empty file (``init``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.new-{os.getpid()}-{threading.get_ident()}")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            SqliteDatabase(tmp, _building=True).close()  # the last close checkpoints the WAL
            if replace_empty:
                if self.path.stat().st_size == 0:  # still empty: nothing of anyone's is lost
                    os.replace(tmp, self.path)
            else:
                self._link(tmp)
            fsync_dir(self.path.parent)
        finally:
            for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
                p.unlink(missing_ok=True)

    def _link(self, tmp: Path) -> None:
        try:
            os.link(tmp, self.path)
        except FileExistsError:  # another process made it first: use theirs
            pass
        except OSError:  # a filesystem without hard links
            if not self.path.exists():
                os.rename(tmp, self.path)

    # --- the reader connection (WAL: sees the last commit, never waits for the writer) -----
    has_reader = True

    @contextmanager
    def reading(self) -> Iterator[None]:
        """On this thread, ``query`` uses the reader connection; writing is refused (a read
        path that writes is a bug, and would race the writer's transactions)."""
        self._local.reading = True
        try:
            yield
        finally:
            self._local.reading = False

    def _reader(self) -> sqlite3.Connection:
        if self._rdb is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # Reads may run on the event loop (dbexec.read): wait briefly, then say so.
            conn.execute(f"PRAGMA busy_timeout={READER_WAIT_MS}")
            conn.execute("PRAGMA query_only=ON")
            self._rdb = conn
        return self._rdb

    def _writing(self) -> None:
        if getattr(self._local, "reading", False):
            raise RuntimeError("a database write on the read-only path (dbexec.read)")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        if getattr(self._local, "reading", False):
            with self._rlock:
                try:
                    return self._reader().execute(sql, tuple(params)).fetchall()
                except sqlite3.OperationalError as exc:
                    if "locked" in str(exc) or "busy" in str(exc):
                        raise ReaderBusy(str(exc)) from None
                    raise
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._writing()
        with self._lock:
            return self._db.execute(sql, tuple(params)).rowcount

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._writing()
        with self._lock:
            row = self._db.execute(sql + " RETURNING id", tuple(params)).fetchone()
            return int(row[0])

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside ``tx``: what the block wrote is undone alone if it raises (group commit)."""
        with self._lock:
            self._db.execute("SAVEPOINT edgeops_one")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK TO SAVEPOINT edgeops_one")
                self._db.execute("RELEASE SAVEPOINT edgeops_one")
                raise
            self._db.execute("RELEASE SAVEPOINT edgeops_one")

    @contextmanager
    def tx(self) -> Iterator[None]:
        self._writing()
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
                try:
                    self._db.execute("COMMIT")
                except BaseException:  # e.g. a deferred constraint: SQLite leaves the tx open
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                self._depth = 0

    def close(self) -> None:
        with self._rlock:
            if self._rdb is not None:
                self._rdb.close()
                self._rdb = None
        with self._lock:
            self._db.close()


class PostgresDatabase:
    """psycopg 3: one writing connection per process (autocommit outside ``tx()``), and a
    second one for the reader thread (``reading``: autocommit, so each poll sees the last
    commit of every process, and never waits behind this process's open transaction)."""

    dialect = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise BadRequest("a PostgreSQL URL needs psycopg",
                             hint="pip install 'psycopg[binary]>=3.1'") from None
        try:
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TransportError(f"cannot reach the database {_redacted(url)}: {first}") from None
        self._lock = threading.RLock()
        self._depth = 0
        self._url = url
        self._local = threading.local()
        self._rconn: Any = None  # opened on the first read on the reader thread
        self._rlock = threading.Lock()
        # None of our tables: a fresh database (prepare locks against a concurrent start). Some
        # but not all of the ones every version had: damaged, or someone else's.
        tables = {r[0] for r in self.query("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_schema = current_schema()")}
        ours = tables & set(TABLES)
        missing = [t for t in REQUIRED if t not in tables]
        if ours and missing:
            self._conn.close()
            raise DatabaseRefused(f"the database {_redacted(url)} has some controller tables but "
                                  f"not {missing[0]!r}: damaged, or not a controller's")
        prepare(self, "BIGSERIAL PRIMARY KEY", fresh=not ours)

    @staticmethod
    def _sql(sql: str) -> Any:
        return sql.replace("?", "%s")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        if getattr(self._local, "reading", False):
            with self._rlock:
                if self._rconn is None or self._rconn.closed:
                    import psycopg

                    self._rconn = psycopg.connect(self._url, autocommit=True, connect_timeout=10)
                return list(self._rconn.execute(self._sql(sql), tuple(params)).fetchall())
        with self._lock:
            return list(self._conn.execute(self._sql(sql), tuple(params)).fetchall())

    def _writing(self) -> None:
        if getattr(self._local, "reading", False):
            raise RuntimeError("a database write on the read-only path (dbexec.read)")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._writing()
        with self._lock:
            return int(self._conn.execute(self._sql(sql), tuple(params)).rowcount)

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._writing()
        with self._lock:
            row = self._conn.execute(self._sql(sql + " RETURNING id"), tuple(params)).fetchone()
            assert row is not None
            return int(row[0])

    @contextmanager
    def tx(self) -> Iterator[None]:
        self._writing()
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

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside ``tx``: a nested psycopg transaction block is a SAVEPOINT, undone alone."""
        with self._lock, self._conn.transaction():
            yield

    has_reader = True

    @contextmanager
    def reading(self) -> Iterator[None]:
        """On this thread, ``query`` uses the reader connection; writing is refused."""
        self._local.reading = True
        try:
            yield
        finally:
            self._local.reading = False

    def close(self) -> None:
        with self._rlock:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None
        with self._lock:
            self._conn.close()


def _redacted(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def open_database(url: str, *, init: bool = False) -> Database:
    """``sqlite:///path``, a bare path, or ``postgresql://…``. ``init``: an existing empty SQLite
    file may become a new database (otherwise it is refused; see the module docstring)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    if not path:
        raise BadRequest(f"database URL {url!r} names no file")
    return SqliteDatabase(Path(path), init=init)
