"""Simulated time and simulated site networks for the fleet simulator (``fleet_sim``).

``SimClock`` compresses time: ``scale`` simulated seconds pass per real second, so a week
offline takes minutes. The controller under test runs on the same clock (its ``Fleet``
takes a clock), so its rollout windows, ramp rates and last-seen times are in simulated
time too. Network delays are real time (a 40 ms link stays 40 ms): they are what the poll
latency measures.

``SiteProxy`` is a TCP proxy on 127.0.0.1 between one site's devices and their controller.
Each direction is a queue of (due time, bytes) so delay does not throttle a stream the way
"sleep per chunk" would: latency plus jitter per chunk (order kept), loss as connections
reset (on connect, or on a request with probability ``loss``: what a device sees of a lossy
link after TCP gave up), a download bandwidth cap shared by the whole site (a token bucket),
and scheduled partitions (simulated-time windows in which new connections are refused and
open ones are cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

CHUNK = 64 << 10


@dataclass
class SimClock:
    scale: float = 1.0  # simulated seconds per real second
    start: float = field(default_factory=time.time)  # simulated epoch of elapsed() == 0
    _m0: float = field(default_factory=time.monotonic, repr=False)

    def elapsed(self) -> float:
        """Simulated seconds since the clock started."""
        return (time.monotonic() - self._m0) * self.scale

    def now(self) -> float:
        """Simulated wall-clock time (seconds since the epoch): the controller's clock."""
        return self.start + self.elapsed()

    def real(self, sim_seconds: float) -> float:
        return max(0.0, sim_seconds) / self.scale

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(self.real(sim_seconds))


@dataclass(frozen=True)
class Link:
    latency: float = 0.0  # seconds, one way (real time)
    jitter: float = 0.0  # seconds, uniform in [0, jitter] added per chunk
    loss: float = 0.0  # probability that a connection or request is reset
    bandwidth: float = 0.0  # bytes per second to the site, shared; 0: no cap
    partitions: tuple[tuple[float, float], ...] = ()  # simulated [start, end) windows: link down

    def down(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.partitions)

    @property
    def shaped(self) -> bool:
        return bool(self.latency or self.jitter or self.loss or self.bandwidth or self.partitions)


def flapping(period: float, down_for: float, start: float, end: float) -> tuple[tuple[float, float], ...]:
    """Partitions of a flapping link: down ``down_for`` seconds out of every ``period``."""
    out, t = [], start
    while t < end:
        out.append((t, min(t + down_for, end)))
        t += period
    return tuple(out)


class Bucket:
    """A token bucket in bytes; takers go into debt and sleep it off, so the rate holds on
    average across every connection of the site."""

    def __init__(self, rate: float, burst: float = CHUNK) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0  # connections refused or cut by a partition
    reset: int = 0  # connections reset by loss
    bytes_down: int = 0  # bytes to the site


class SiteProxy:
    def __init__(self, name: str, link: Link, upstream: tuple[str, int], clock: SimClock,
                 rng: random.Random | None = None) -> None:
        self.name, self.link, self.upstream, self.clock = name, link, upstream, clock
        self.rng = rng or random.Random(name)
        self.bucket = Bucket(link.bandwidth) if link.bandwidth else None
        self.stats = ProxyStats()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = int(self._server.sockets[0].getsockname()[1])
        if self.link.partitions:
            self._watch = asyncio.create_task(self._cut_when_down())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            self._server.close()
        for t in list(self._open):
            t.cancel()
        await asyncio.gather(*self._open, return_exceptions=True)

    def down(self) -> bool:
        return self.link.down(self.clock.elapsed())

    async def _cut_when_down(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            if self.down():
                for t in list(self._open):
                    t.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.stats.connections += 1
        if self.down():
            self.stats.refused += 1
            writer.close()
            return
        if self.link.loss and self.rng.random() < self.link.loss:
            self.stats.reset += 1
            writer.transport.abort()
            return
        self._open.add(task)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._open.discard(task)
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_w, up=True), self._pipe(up_r, writer, up=False))
        except (asyncio.CancelledError, ConnectionError, OSError):
            if self.down():
                self.stats.refused += 1
        finally:
            self._open.discard(task)
            for w in (writer, up_w):
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, up: bool) -> None:
        """Copy one direction through a delay queue; the sender never waits on the delay."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        link, loop = self.link, asyncio.get_running_loop()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not up:
                    if self.bucket is not None:
                        await self.bucket.take(len(data))
                    self.stats.bytes_down += len(data)
                dst.write(data)
                await dst.drain()

        sender = asyncio.create_task(send())
        last = 0.0
        try:
            while True:
                data = await src.read(CHUNK)
                if up and data and link.loss and self.rng.random() < link.loss:
                    self.stats.reset += 1
                    raise ConnectionResetError("simulated loss")
                delay = link.latency + (self.rng.uniform(0, link.jitter) if link.jitter else 0.0)
                last = max(last, loop.time() + delay)  # jitter never reorders bytes
                queue.put_nowait((last, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
