"""Run the controller's blocking database work off the event loop, behind a bounded queue.

Every handler reaches ``Fleet`` (and the regional mirror its tables) through ``call``: the
work runs on one dedicated thread per process (both ``db`` backends hold one connection
behind a lock, so more threads would only queue on it; with PostgreSQL, more capacity is
more controller processes on the same database, docs/scale.md), so a slow query or a
transaction waiting for a row lock no longer stalls every other request, the long-polls held
open, or the TLS handshakes on the same loop.

The queue is bounded: when ``limit`` calls are already waiting or running, the next request
is refused with ``Overloaded`` (429 and a ``Retry-After`` spread over [retry_after,
2 x retry_after] seconds, so the devices it turns away do not return together). Background
jobs (gate ticks, last-seen flushes, compaction) pass ``bounded=False``: they are few, and
refusing them would only postpone the work the devices are waiting for.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from agent.controller.errors import Overloaded

T = TypeVar("T")
DEFAULT_LIMIT = 512  # calls waiting or running; about 0.15 s of SQLite polls on this machine
DEFAULT_RETRY_AFTER = 5  # seconds: the lower end of the Retry-After spread


@dataclass
class DbExecutor:
    workers: int = 1
    limit: int = DEFAULT_LIMIT
    retry_after: int = DEFAULT_RETRY_AFTER
    rng: random.Random = field(default_factory=random.Random)
    pending: int = 0  # calls submitted and not yet finished
    refused: int = 0  # calls answered with Overloaded, for /metrics and the benchmark
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.limit < 1:
            raise ValueError("a database executor needs at least one worker and a limit of one")
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="edgeops-db")

    async def run(self, fn: Callable[..., T], *args: Any, bounded: bool = True, **kw: Any) -> T:
        if bounded and self.pending >= self.limit:
            self.refused += 1
            raise Overloaded(f"{self.pending} database calls are already waiting",
                             retry_after=self.rng.randint(self.retry_after, 2 * self.retry_after))
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(fn, *args, **kw))
        finally:
            self.pending -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


DBEXEC = web.AppKey("dbexec", DbExecutor)


def for_dialect(dialect: str, *, limit: int = DEFAULT_LIMIT,
                retry_after: int = DEFAULT_RETRY_AFTER) -> DbExecutor:
    """One thread: each backend has one connection per process (``dialect`` is for when that
    changes: a PostgreSQL pool would take more)."""
    return DbExecutor(workers=1, limit=limit, retry_after=retry_after)


async def call(app: web.Application, fn: Callable[..., T], *args: Any, bounded: bool = True,
               **kw: Any) -> T:
    """``fn(*args, **kw)`` on the application's database executor."""
    return await app[DBEXEC].run(fn, *args, bounded=bounded, **kw)


async def lifecycle(app: web.Application) -> Any:
    """aiohttp cleanup context: the executor's threads end with the server (after the
    other cleanups, which may still write: ``app.build_app`` installs this one first)."""
    yield
    app[DBEXEC].close()
