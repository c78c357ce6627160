"""Run the controller's blocking database work off the event loop, behind a bounded queue.

Every handler reaches ``Fleet`` (and the regional mirror its tables) through ``call``: the
work runs on a dedicated thread per process, so a slow query or a transaction waiting for a
row lock no longer stalls every other request, the long-polls held open, or the TLS
handshakes on the same loop. Three ways in:

* ``call(app, fn, ...)``: one call on the **writer** thread, in order with every other one
  (operator routes, gate ticks, flushes; each call its own transactions, as before).
* ``write(app, fn, ...)``: a device's write (DDI feedback, configData), **group-committed**:
  the writer thread takes every such call queued since its last turn, at most ``batch``
  (``DEFAULT_BATCH``) of them, and runs them in **one** transaction, each inside its own
  savepoint (one that raises is rolled back alone and gets its exception; the others commit).
  Nothing waits to fill a batch: a batch is what queued while the thread was busy, so a
  lone report commits at once and a burst of a thousand costs sixteen commits, not a
  thousand. **When it is acknowledged**: the awaiting handler resumes (and its 200 is sent)
  only after the batch's ``COMMIT`` has returned; with SQLite that commit is on disk
  (``synchronous=FULL`` in ``db``: the WAL is fsynced once per batch), with PostgreSQL it is
  the server's commit. A batch whose commit fails fails every call in it (none acknowledged).
  A batch's turn comes after the writer jobs queued before it, so a write waits for at most
  those plus one batch (``batch`` savepoints, about 0.1 ms each of SQLite here).
* ``read(app, fn, ...)``: a read-only call (the base poll, authentication, deployment and
  artifact look-ups) on the **reader** thread, over its own connection when the database has
  one (SQLite WAL or a second PostgreSQL connection, ``db.reading``): a reader sees the last
  commit and never waits for the writer, so polls never queue behind feedback transactions.
  Should the reader find the database busy (WAL recovery after a crash) within 50 ms, the call
  goes to the writer thread. A database without a reader connection runs reads on the writer
  thread. (Reading inline on the event loop measured a shorter controller-side tail, but
  dropped a SYN in the connection-flood test: docs/scale.md.)

The queue is bounded: when ``limit`` calls are already waiting or running (reads and writes
together), the next request is refused with ``Overloaded`` (429 and a ``Retry-After``
spread over [retry_after, 2 x retry_after] seconds, so the devices it turns away do not
return together). Background jobs (gate ticks, last-seen flushes, compaction) pass
``bounded=False``: they are few, and refusing them would only postpone the work the
devices are waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiohttp import web

from agent.controller.errors import Overloaded, ReaderBusy
from agent.core import logs

T = TypeVar("T")
DEFAULT_LIMIT = 512  # calls waiting or running; about 0.15 s of SQLite polls on this machine
DEFAULT_RETRY_AFTER = 5  # seconds: the lower end of the Retry-After spread
DEFAULT_BATCH = 64  # device writes per group commit: bounds one transaction's length

log = logs.get("edgeops.controller")


class GroupDb(Protocol):
    """What group commit and the reader need of a ``db.Database`` (``reading``: queries on
    this thread use the reader connection; it raises ``ReaderBusy`` rather than wait)."""

    def tx(self) -> Any: ...
    def savepoint(self) -> Any: ...
    def reading(self) -> Any: ...

    @property
    def has_reader(self) -> bool: ...


@dataclass
class _Queued:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


@dataclass
class DbExecutor:
    db: GroupDb | None = None  # None: no group commit, no reader (every call on the writer)
    limit: int = DEFAULT_LIMIT
    retry_after: int = DEFAULT_RETRY_AFTER
    batch: int = DEFAULT_BATCH
    rng: random.Random = field(default_factory=random.Random)
    pending: int = 0  # calls submitted and not yet finished
    refused: int = 0  # calls answered with Overloaded, for /metrics and the benchmark
    grouping: int = 0  # calls in the batch the writer thread is running now (0: none)
    commits: int = 0  # group commits done, and the writes they carried (for the benchmark)
    grouped: int = 0
    fallbacks: int = 0  # reads sent to the writer thread because the reader found it busy
    _queue: list[_Queued] = field(default_factory=list, repr=False)
    _draining: bool = field(default=False, repr=False)
    _after: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _writer: ThreadPoolExecutor | None = field(default=None, repr=False)
    _reader: ThreadPoolExecutor | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.limit < 1 or self.batch < 1:
            raise ValueError("a database executor needs a limit and a batch of at least one")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="edgeops-db")
        if self.db is not None and self.db.has_reader:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="edgeops-db-read")

    def _admit(self, bounded: bool) -> None:
        if bounded and self.pending >= self.limit:
            self.refused += 1
            raise Overloaded(f"{self.pending} database calls are already waiting",
                             retry_after=self.rng.randint(self.retry_after, 2 * self.retry_after))

    async def run(self, fn: Callable[..., T], *args: Any, bounded: bool = True, **kw: Any) -> T:
        """``fn`` on the writer thread, alone."""
        self._admit(bounded)
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._writer, functools.partial(fn, *args, **kw))
        finally:
            self.pending -= 1

    async def read(self, fn: Callable[..., T], *args: Any, bounded: bool = True, **kw: Any) -> T:
        """``fn`` on the reader thread over the reader connection (on the writer thread for a
        database without one, or when the reader finds the database busy)."""
        db = self.db
        if db is None or not db.has_reader or self._reader is None:
            return await self.run(fn, *args, bounded=bounded, **kw)
        self._admit(bounded)  # an overloaded controller turns polls away too

        def reading() -> T:
            with db.reading():
                return fn(*args, **kw)

        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, reading)
        except ReaderBusy:
            self.fallbacks += 1
            return await self.run(fn, *args, bounded=False, **kw)
        finally:
            self.pending -= 1

    async def write(self, fn: Callable[..., T], *args: Any, bounded: bool = True, **kw: Any) -> T:
        """``fn`` in the next group commit; returns (or raises) once that batch has committed."""
        if self.db is None:
            return await self.run(fn, *args, bounded=bounded, **kw)
        self._admit(bounded)
        self.pending += 1
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queue.append(_Queued(functools.partial(fn, *args, **kw), fut))
            start = not self._draining
            self._draining = True
        try:
            if start:
                loop.run_in_executor(self._writer, self._drain, loop)
            return await fut
        finally:
            self.pending -= 1

    @property
    def queued(self) -> int:
        """Device writes waiting for the next group commit."""
        return len(self._queue)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """On the writer thread, during a batch: run ``fn`` once the batch has committed and
        before its calls are answered (the gate tick a final report asks for). Once per batch."""
        if fn not in self._after:
            self._after.append(fn)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """One group commit, on the writer thread; re-queues itself behind other writer jobs
        while device writes keep arriving."""
        assert self.db is not None
        with self._lock:
            items, self._queue = self._queue[:self.batch], self._queue[self.batch:]
        outcomes: list[tuple[bool, Any]] = []
        self.grouping = len(items)
        try:
            with self.db.tx():
                for it in items:
                    try:
                        with self.db.savepoint():
                            outcomes.append((True, it.fn()))
                    except Exception as exc:  # this call's own error: its savepoint is undone
                        outcomes.append((False, exc))
        except Exception as exc:  # the commit itself failed: nobody is acknowledged
            outcomes = [(False, exc)] * len(items)
            self._after.clear()
        finally:
            self.grouping = 0
        self.commits += 1
        self.grouped += len(items)
        after, self._after = self._after, []
        for fn in after:
            try:
                fn()
            except Exception:  # the periodic tick retries; the batch stays committed
                log.exception("after a group commit")
        for it, (ok, value) in zip(items, outcomes, strict=True):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, it.future, ok, value)
        with self._lock:
            more = bool(self._queue)
            self._draining = more
        if more:
            try:
                assert self._writer is not None
                self._writer.submit(self._drain, loop)
            except (RuntimeError, AssertionError):  # shutting down: finish here
                self._drain(loop)

    def close(self) -> None:
        for pool in (self._reader, self._writer):
            if pool is not None:
                pool.shutdown(wait=True)
        self._reader = self._writer = None


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # the request went away (client closed); the write stands
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


DBEXEC = web.AppKey("dbexec", DbExecutor)


def for_database(db: GroupDb | None, *, limit: int = DEFAULT_LIMIT,
                 retry_after: int = DEFAULT_RETRY_AFTER, batch: int = DEFAULT_BATCH) -> DbExecutor:
    """The executor for ``db``: a writer thread with group commit, and a reader thread when the
    database has a reader connection (SQLite WAL)."""
    return DbExecutor(db=db, limit=limit, retry_after=retry_after, batch=batch)


async def call(app: web.Application, fn: Callable[..., T], *args: Any, bounded: bool = True,
               **kw: Any) -> T:
    """``fn(*args, **kw)`` on the application's writer thread."""
    return await app[DBEXEC].run(fn, *args, bounded=bounded, **kw)


async def read(app: web.Application, fn: Callable[..., T], *args: Any, bounded: bool = True,
               **kw: Any) -> T:
    """A read-only ``fn`` over the reader connection (polls never wait behind writes)."""
    return await app[DBEXEC].read(fn, *args, bounded=bounded, **kw)


async def write(app: web.Application, fn: Callable[..., T], *args: Any, bounded: bool = True,
                **kw: Any) -> T:
    """A device's write, group-committed; returns once it is committed."""
    return await app[DBEXEC].write(fn, *args, bounded=bounded, **kw)


async def lifecycle(app: web.Application) -> Any:
    """aiohttp cleanup context: the executor's threads end with the server (after the
    other cleanups, which may still write: ``app.build_app`` installs this one first)."""
    yield
    app[DBEXEC].close()
