"""A controller process's background work: long-poll wake-ups, batched last-seen writes, gate ticks,
and the hourly compaction of closed actions' feedback (``Fleet.compact``).

``lifecycle`` is an aiohttp cleanup context (``app.build_app`` installs it): the periodic
jobs start with the server and stop with it, and the last batch of poll times is written
on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from agent.controller.dbexec import DBEXEC, call
from agent.controller.http import FLEET, SEEN, SETTINGS, SHAPER, WAITERS
from agent.controller.retention import COMPACT_BATCH
from agent.core import logs

log = logs.get("edgeops.controller")
COMPACT_INTERVAL = 3600.0  # seconds between passes over closed actions' feedback
TICK_GAP = 1.0  # seconds at least between two coalesced gate ticks


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    loop = asyncio.get_running_loop()
    waiters: dict[str, asyncio.Event] = app[WAITERS]

    def wake(ids: list[str]) -> None:
        for d in ids:
            if d in waiters:
                waiters[d].set()

    fleet, executor = app[FLEET], app[DBEXEC]
    wakers: set[asyncio.Task[None]] = set()

    async def wake_committed(ids: list[str]) -> None:
        # Fleet notifies inside its transaction, and the held polls re-read over the reader
        # connection (dbexec.read), which sees only what is committed: wake them once a no-op
        # queued behind the notifying writer job has run, i.e. once that job has committed.
        await executor.run(lambda: None, bounded=False)
        wake(ids)

    def start_wake(ids: list[str]) -> None:
        t = asyncio.ensure_future(wake_committed(ids))
        wakers.add(t)
        t.add_done_callback(wakers.discard)

    def listener(ids: list[str]) -> None:  # may be called from a worker thread
        if any(d in waiters for d in ids):
            loop.call_soon_threadsafe(start_wake, ids)

    app[FLEET].listeners.append(listener)
    soon = asyncio.Event()

    def tick_soon() -> None:
        """After a final report's transaction, on the database thread: the gate runs at once
        when nothing else waits for the database (for a group-committed report, right after
        its batch commits and before the batch is answered), so the answer the device and the
        operator see next already has it; in a burst of reports, once after the queue ahead of it, for all
        of them (a tick reads the whole wave: ten thousand of them a minute would be the load)."""
        if executor.grouping:  # inside a group commit: after it commits, or coalesced
            if executor.pending <= executor.grouping and not executor.queued:
                executor.after_commit(fleet.tick)
            else:
                loop.call_soon_threadsafe(soon.set)
        elif executor.pending <= 1:
            fleet.tick()
        else:
            loop.call_soon_threadsafe(soon.set)

    async def coalesced() -> None:
        while True:
            await soon.wait()
            soon.clear()
            await call(app, fleet.tick, bounded=False)
            # A tick reads its whole wave (8,900 rows at 10,000 devices): in a burst of reports
            # at most one per TICK_GAP, so the gate never takes the writer thread from them.
            await asyncio.sleep(TICK_GAP)

    fleet.tick_soon = tick_soon
    # The database work runs on the executor (dbexec), never on the loop; unbounded: a
    # busy controller must still advance its rollouts and write what it saw.
    tasks = [asyncio.create_task(_every(s.flush_interval, lambda: flush_seen(app))),
             asyncio.create_task(_every(s.tick_interval,
                                        lambda: call(app, app[FLEET].tick, bounded=False))),
             asyncio.create_task(_every(COMPACT_INTERVAL,
                                        lambda: call(app, _compact, app, bounded=False))),
             asyncio.create_task(_every(0, coalesced))]  # restarted should it ever fail
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    app[FLEET].listeners.remove(listener)
    fleet.tick_soon = fleet.tick
    if soon.is_set():  # a coalesced tick was still due
        await call(app, fleet.tick, bounded=False)
    await flush_seen(app)


async def flush_seen(app: web.Application) -> None:
    """Write the poll times gathered since the last flush: one transaction, not one per poll;
    and refresh the fleet's size, from which ``shaping`` knows the steady poll rate."""
    seen: dict[str, float] = app[SEEN]
    if seen:
        batch = dict(seen)
        seen.clear()
        await call(app, app[FLEET].touch, batch, bounded=False)
    rows = await call(app, app[FLEET].db.query, "SELECT COUNT(*) FROM devices", bounded=False)
    app[SHAPER].devices = int(rows[0][0])


def _compact(app: web.Application) -> None:
    fleet = app[FLEET]
    while fleet.compact(app[SETTINGS].feedback_retention) == COMPACT_BATCH:
        pass  # a backlog (first run after an upgrade): keep going, one transaction per batch


async def _every(interval: float, fn: Callable[[], Awaitable[object]]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await fn()
        except Exception:  # a failing periodic job must not stop the server
            log.exception("periodic job failed")
