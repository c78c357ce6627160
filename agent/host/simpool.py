"""Simulated devices in several worker processes: each an asyncio event loop of ``SimAgent``s,
their results gathered by the parent.

One process of ten thousand devices measured itself: its own event-loop lag (the downloads it
hashes, the reports it builds) was in every poll latency, and it shared the interpreter's
one core with nothing else to spread to (docs/scale.md). ``SimPool`` splits the devices over
``workers`` processes (``multiprocessing`` spawn: nothing of the parent's state, threads or
loop is inherited), each with its own keep-alive pool of connections. The parent talks to each
worker over a pipe: ``progress`` (devices running the release with nothing left to report,
polls so far), then ``stop``, which ends the devices and sends back every poll's latency and
end time (``time.monotonic``, CLOCK_MONOTONIC: one clock for every process on the machine, so
the parent can split them by phase), each device's running version and the counters.
Real time (``SimClock(1.0)``), no network shaping: that is ``fleet_sim``'s with its proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

START_TIMEOUT = 120.0  # seconds a worker may take to import and start its devices


@dataclass(frozen=True)
class WorkerSpec:
    base_url: str
    creds: tuple[tuple[str, str], ...]  # (device id, TargetToken)
    poll_sleep: float
    release: str
    seed: int
    connections: int = 256  # keep-alive pool of this worker (and a quarter as many for polls)
    nice: int = 0  # added to the worker's niceness (the controller keeps the CPU it needs)


@dataclass
class PoolResult:
    stamps: list[float] = field(default_factory=list)  # time.monotonic() each poll ended
    latencies: list[float] = field(default_factory=list)  # seconds, same order as stamps
    running: dict[str, str | None] = field(default_factory=dict)  # device -> version it runs
    throttled: int = 0
    failed: int = 0
    bytes_in: int = 0
    downloads: int = 0

    def between(self, t0: float, t1: float) -> list[float]:
        """Latencies of the polls that ended in [t0, t1) (``time.monotonic``)."""
        return [lat for t, lat in zip(self.stamps, self.latencies, strict=True) if t0 <= t < t1]


def split(creds: Sequence[tuple[str, str]], workers: int) -> list[tuple[tuple[str, str], ...]]:
    """``workers`` slices of about equal size, every device in exactly one."""
    n = max(1, min(workers, len(creds)))
    return [tuple(creds[i::n]) for i in range(n)]


def _worker(spec: WorkerSpec, conn: Connection) -> None:
    if spec.nice:
        with contextlib.suppress(OSError):
            os.nice(spec.nice)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(spec, conn))


async def _serve(spec: WorkerSpec, conn: Connection) -> None:
    import aiohttp

    from agent.host.litedevice import SimAgent, Stats
    from agent.host.netsim import SimClock

    clock, stats, stop = SimClock(1.0), Stats(), asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=30)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=spec.connections),
                                    timeout=timeout)
    # polls on their own pool (a quarter of the connections): not queued behind downloads
    polls = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(8, spec.connections // 4)),
                                  timeout=timeout)
    agents = [SimAgent(did, token, spec.base_url, session, clock, stats, poll_sleep=spec.poll_sleep,
                       rng=random.Random(did), poll_session=polls) for did, token in spec.creds]
    rng = random.Random(spec.seed)
    tasks = [asyncio.create_task(ag.run(stop, rng.uniform(0, spec.poll_sleep))) for ag in agents]
    conn.send(("started", len(agents)))
    loop = asyncio.get_running_loop()
    try:
        while True:
            msg = await loop.run_in_executor(None, _recv, conn)
            if msg == "progress":
                done = sum(1 for ag in agents if ag.board.running == spec.release and not ag.outbox)
                conn.send(("progress", done, len(stats.latencies)))
            else:  # "stop", or the parent went away
                break
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        await polls.close()
    result = PoolResult(stats.stamps, stats.latencies, {ag.id: ag.board.running for ag in agents},
                        stats.throttled, stats.failed, stats.bytes_in, stats.downloads)
    with contextlib.suppress(OSError):
        conn.send(("result", result))


def _recv(conn: Connection) -> Any:
    try:
        return conn.recv()
    except (EOFError, OSError):
        return "stop"


class SimPool:
    """``workers`` processes running ``creds`` as simulated devices against ``base_url``."""

    def __init__(self, base_url: str, creds: Sequence[tuple[str, str]], *, workers: int,
                 poll_sleep: float, release: str = "2.0", connections: int = 1024,
                 nice: int = 0) -> None:
        parts = split(creds, workers)
        per = max(16, connections // len(parts))
        self.specs = [WorkerSpec(base_url, part, poll_sleep, release, seed=i, connections=per, nice=nice)
                      for i, part in enumerate(parts)]
        self.devices = len(creds)
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for spec in self.specs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(spec, child), daemon=True,
                            name=f"edgeops-sim-{spec.seed}")
            p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)
        for c in self._conns:
            if not c.poll(START_TIMEOUT):
                self.kill()
                raise RuntimeError("a simulator worker did not start")
            c.recv()

    def progress(self) -> tuple[int, int]:
        """(devices running the release with no report queued, polls answered so far)."""
        for c in self._conns:
            c.send("progress")
        done = polls = 0
        for c in self._conns:
            _, d, p = c.recv()
            done, polls = done + d, polls + p
        return done, polls

    def stop(self) -> PoolResult:
        for c in self._conns:
            c.send("stop")
        out = PoolResult()
        for c in self._conns:
            kind, r = c.recv()
            assert kind == "result"
            order = sorted(range(len(r.stamps)), key=r.stamps.__getitem__)
            out.stamps += [r.stamps[i] for i in order]
            out.latencies += [r.latencies[i] for i in order]
            out.running.update(r.running)
            out.throttled += r.throttled
            out.failed += r.failed
            out.bytes_in += r.bytes_in
            out.downloads += r.downloads
        for p in self._procs:
            p.join(30)
        self._procs, self._conns = [], []
        return out

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        self._procs, self._conns = [], []
