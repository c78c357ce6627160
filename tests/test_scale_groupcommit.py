"""Group commit and the poll reader (controller/dbexec): device writes share one transaction per
batch, each in its own savepoint, answered only once committed; reads run over their own SQLite
connection and never wait for the writer. The last test SIGKILLs a real controller process in
the middle of a burst of feedback and finds every acknowledged report in the database."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.controller.db import SqliteDatabase
from agent.controller.dbexec import DbExecutor
from agent.controller.errors import ReaderBusy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteDatabase]:
    d = SqliteDatabase(tmp_path / "c.db")
    d.execute("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    yield d
    d.close()


def _put(db: SqliteDatabase, k: str, fail: bool = False) -> str:
    db.execute("INSERT INTO t (k, n) VALUES (?, 1)", [k])
    if fail:
        raise ValueError(f"{k} refused after writing")
    return k


async def _queued_writes(ex: DbExecutor, db: SqliteDatabase, keys: list[str],
                         failing: set[str] = frozenset()) -> list[Any]:  # type: ignore[assignment]
    """Hold the writer thread while ``keys`` queue as group writes, then let it go."""
    gate = threading.Event()
    held = asyncio.ensure_future(ex.run(gate.wait, 30))
    await asyncio.sleep(0.05)
    writes = [asyncio.ensure_future(ex.write(_put, db, k, k in failing)) for k in keys]
    await asyncio.sleep(0.05)
    gate.set()
    await held
    return await asyncio.gather(*writes, return_exceptions=True)


def _rows(db: SqliteDatabase) -> set[str]:
    return {k for (k,) in db.query("SELECT k FROM t")}


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), batch=st.integers(1, 16))
def test_queued_writes_commit_in_batches_of_at_most_the_bound(tmp_path_factory: Any, n: int,
                                                              batch: int) -> None:
    db = SqliteDatabase(tmp_path_factory.mktemp("g") / "c.db")
    db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    ex = DbExecutor(db=db, batch=batch)
    try:
        keys = [f"k{i}" for i in range(n)]
        got = asyncio.run(_queued_writes(ex, db, keys))
        assert got == keys
        assert _rows(db) == set(keys)
        assert ex.grouped == n
        assert ex.commits == -(-n // batch)  # every batch full but the last: no commit per write
    finally:
        ex.close()
        db.close()


def test_a_write_that_raises_is_undone_alone_and_the_rest_commit(db: SqliteDatabase) -> None:
    ex = DbExecutor(db=db, batch=64)
    try:
        keys = [f"k{i}" for i in range(10)]
        got = asyncio.run(_queued_writes(ex, db, keys, failing={"k3", "k7"}))
    finally:
        ex.close()
    assert [type(g).__name__ for g in got].count("ValueError") == 2
    assert isinstance(got[3], ValueError) and isinstance(got[7], ValueError)
    assert _rows(db) == set(keys) - {"k3", "k7"}
    assert ex.commits == 1


def test_a_failed_commit_acknowledges_none_of_its_batch(db: SqliteDatabase) -> None:
    """A batch whose COMMIT fails (here: a deferred foreign key, checked only at COMMIT) answers
    every write in it with the error, and none of them is in the database."""
    ex = DbExecutor(db=db, batch=64)

    async def go() -> list[Any]:
        gate = threading.Event()
        held = asyncio.ensure_future(ex.run(gate.wait, 30))
        await asyncio.sleep(0.05)
        writes: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(ex.write(_put, db, f"k{i}")) for i in range(5)]
        writes.append(asyncio.ensure_future(ex.write(_deferred_fk, db)))
        await asyncio.sleep(0.05)
        gate.set()
        await held
        return await asyncio.gather(*writes, return_exceptions=True)

    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE child (pid INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    try:
        got = asyncio.run(go())
    finally:
        ex.close()
    assert all(isinstance(g, sqlite3.IntegrityError) for g in got), got
    assert _rows(db) == set()


def _deferred_fk(db: SqliteDatabase) -> None:
    """A write that is fine until COMMIT: a deferred foreign key to nothing."""
    db.execute("INSERT INTO child (pid) VALUES (42)")


def test_a_read_answers_while_the_writer_holds_the_database(db: SqliteDatabase) -> None:
    """The writer's connection inside a long transaction (its lock held by another thread, as
    the writer thread holds it during a batch): a poll's read still answers at once."""
    db.execute("INSERT INTO t (k, n) VALUES ('seen', 1)")
    ex = DbExecutor(db=db)

    async def go() -> list[Any]:
        return await asyncio.wait_for(ex.read(db.query, "SELECT k FROM t"), 5)

    started, release = threading.Event(), threading.Event()

    def long_transaction() -> None:
        with db.tx():
            db.execute("INSERT INTO t (k, n) VALUES ('uncommitted', 1)")
            started.set()
            release.wait(30)

    th = threading.Thread(target=long_transaction)
    th.start()
    started.wait(10)
    try:
        got = asyncio.run(go())
    finally:
        release.set()
        th.join(30)
        ex.close()
    assert got == [("seen",)]  # the last commit, not the writer's open transaction


def test_a_read_that_finds_the_database_busy_goes_to_the_writer_thread(db: SqliteDatabase) -> None:
    """The reader connection busy (as during WAL recovery; injected here: the reader raises
    ReaderBusy): the read neither fails nor holds the loop; the writer thread answers it."""
    db.execute("INSERT INTO t (k, n) VALUES ('seen', 1)")
    ex = DbExecutor(db=db)
    ran_on: list[str] = []

    def look() -> list[Any]:
        if getattr(db._local, "reading", False):
            raise ReaderBusy("database is locked (injected)")
        ran_on.append(threading.current_thread().name)
        return db.query("SELECT k FROM t")

    try:
        got = asyncio.run(ex.read(look))
    finally:
        ex.close()
    assert got == [("seen",)]
    assert ex.fallbacks == 1
    assert ran_on and ran_on[0].startswith("edgeops-db_")  # the writer, not edgeops-db-read


def test_the_read_path_refuses_to_write(db: SqliteDatabase) -> None:
    ex = DbExecutor(db=db)
    try:
        with pytest.raises(RuntimeError, match="read-only path"):
            asyncio.run(ex.read(_put, db, "x"))
    finally:
        ex.close()
    assert _rows(db) == set()


# --- SIGKILL in the middle of a burst of feedback ------------------------------------------------
TOKEN = "groupcommit"
DEVICES = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepared(data: Path) -> list[tuple[str, str, int]]:
    """DEVICES devices, each with one open action: (device, token, action id)."""
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.host.fleet_sim import Scenario, populate

    fleet = Fleet(open_database(str(data / "c.db")), data / "files")
    try:
        creds, bid = populate(fleet, Scenario("kill", devices=DEVICES, bundle_size=1024),
                              random.Random(3))
        out = []
        with fleet.db.tx():
            for did, token, _ in creds:
                aid = fleet.db.insert("INSERT INTO actions (device_id, bundle_id, status, created, "
                                      "updated) VALUES (?, ?, 'open', 0, 0)", [did, bid])
                out.append((did, token, aid))
        return out
    finally:
        fleet.db.close()


async def _burst(port: int, devices: list[tuple[str, str, int]], proc: subprocess.Popen[bytes],
                 kill_after: int) -> tuple[set[str], int]:
    """Every device reports at once; the controller is SIGKILLed after ``kill_after`` 200s.
    Returns the idempotency keys acknowledged with 200, and how many requests got no answer."""
    import aiohttp

    acked: set[str] = set()
    lost = 0
    killed = asyncio.Event()

    async def one(s: aiohttp.ClientSession, did: str, token: str, aid: int) -> None:
        nonlocal lost
        key = f"{did}:{aid}:proceeding"
        body = {"id": str(aid), "status": {"execution": "proceeding", "result": {"finished": "none"},
                                           "details": ["downloading"]}}
        try:
            async with s.post(f"http://127.0.0.1:{port}/DEFAULT/controller/v1/{did}/deploymentBase/"
                              f"{aid}/feedback", json=body,
                              headers={"Authorization": f"TargetToken {token}",
                                       "Idempotency-Key": key}) as r:
                await r.read()
                if r.status == 200:
                    acked.add(key)
                    if len(acked) >= kill_after and not killed.is_set():
                        killed.set()
                        os.kill(proc.pid, signal.SIGKILL)
        except (aiohttp.ClientError, OSError, TimeoutError):
            lost += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400),
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        await asyncio.gather(*(one(s, *d) for d in devices))
    return acked, lost


def test_sigkill_during_a_burst_of_feedback_loses_no_acknowledged_report(tmp_path: Path) -> None:
    devices = _prepared(tmp_path)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEOPS_CONTROLLER_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "controller", "serve", "--db",
                             str(tmp_path / "c.db"), "--data", str(tmp_path / "files"),
                             "--listen", f"127.0.0.1:{port}"], env=env, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > end or proc.poll() is not None:
                    raise AssertionError("the controller did not start") from None
                time.sleep(0.1)
        acked, lost = asyncio.run(_burst(port, devices, proc, kill_after=DEVICES // 6))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert lost > 0, "every report was answered before the kill: nothing was in flight"
    con = sqlite3.connect(tmp_path / "c.db")  # what the next controller would open
    try:
        stored = {k for (k,) in con.execute("SELECT idem_key FROM feedback")}
        running = {k for (k,) in con.execute(
            "SELECT device_id || ':' || id || ':proceeding' FROM actions WHERE status = 'running'")}
    finally:
        con.close()
    assert acked <= stored, f"{len(acked - stored)} acknowledged reports are not in the database"
    assert acked <= running  # and each one's effect (the action is running) with it
    assert json.dumps(sorted(stored - running)) == "[]"  # no report without its effect
