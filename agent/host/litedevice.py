"""One lightweight simulated device for the fleet simulator: the agent's decisions over a board
that keeps only slot *state* and content hashes.

What is the agent's own here: the install/boot life cycle is ``agent.core.lifecycle.step``
(every event and action, the trial boot, commit and revert, the trial-boot cap), the DDI
documents are parsed by ``agent.core.ddi``, the artifact is chosen by
``agent.device.fleet.pick_bundle``, reports queue in order with idempotency keys as
``agent.core.outbox`` has them (``Report``; final reports keyed ``<device>:<action>:closed``,
as ``FleetAgent._final``), polls back off with ``agent.core.outbox.Backoff`` (full jitter,
capped at the poll interval) and honour ``config.polling.sleep`` and 429 ``Retry-After``.
What is the simulator's: the I/O is asyncio (aiohttp), not requests, so ten thousand of these
fit in one process; the "slot" is a record (version, SHA-256 of the bytes downloaded, state)
rather than an image; the health verdict comes from the scenario (a share of devices fail
the bad release). The same report sequence as the real agent reaches the controller:
proceeding, downloaded, closed/success only after the commit, closed/failure after a revert.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agent.core import ddi, lifecycle
from agent.core.outbox import Backoff, Report, retry_after
from agent.device.fleet import pick_bundle
from agent.errors import EdgeopsError, Throttled, TransportError
from agent.host.netsim import SimClock

TRIAL_SECONDS = 30.0  # simulated seconds a reboot and the trial's health checks take
MAX_ATTEMPTS = 3  # downloads of one action before it is reported failed


@dataclass
class Slot:
    state: str = "empty"  # as the journal's slot records: good | bad | trial | empty | written
    version: str | None = None
    sha256: str | None = None  # of the bytes written (here: downloaded and hashed)


@dataclass
class LiteBoard:
    """Two slots and a bootloader: primary, a one-shot trial flag, slots marked bad."""

    version: str
    slots: dict[str, Slot] = field(default_factory=dict)
    primary: str = "A"
    trial: str | None = None
    bad: set[str] = field(default_factory=set)
    booted: str = "A"
    boots: int = 0
    state: lifecycle.State = field(default_factory=lifecycle.State)
    history: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = {"A": Slot("good", self.version, hashlib.sha256(self.version.encode()).hexdigest()),
                          "B": Slot()}

    @property
    def boot_id(self) -> str:
        return f"boot{self.boots}"

    @property
    def running(self) -> str | None:
        return self.slots[self.booted].version

    @property
    def other(self) -> str:
        return "B" if self.booted == "A" else "A"

    def reboot(self) -> None:
        self.boots += 1
        if self.trial is not None and self.trial not in self.bad:
            self.booted, self.trial = self.trial, None
        else:
            self.booted = self.primary

    def drive(self, event: lifecycle.Event, verdict: Callable[[], lifecycle.Event]) -> None:
        """Feed one event and everything that follows from it, performing the actions."""
        pending: list[lifecycle.Event] = [event]
        while pending:
            t = lifecycle.step(self.state, pending.pop(0))
            self.state = t.state
            for r in t.records:
                if isinstance(r, lifecycle.SlotRecord):
                    s = self.slots[r.slot]
                    s.state, s.version = r.state, r.version if r.version is not None else s.version
                    if r.state == "empty":
                        s.sha256 = None
                elif isinstance(r, lifecycle.History):
                    self.history.append(f"{r.event} {r.slot} {r.version} {r.detail}".strip())
            reboot = False
            for a in t.actions:
                if isinstance(a, lifecycle.BootMarkBad):
                    self.bad.add(a.slot)
                    self.trial = None if self.trial == a.slot else self.trial
                elif isinstance(a, lifecycle.BootSetTrial):
                    self.trial = a.slot
                    self.bad.discard(a.slot)
                elif isinstance(a, lifecycle.BootCommit):
                    self.primary = a.slot
                elif isinstance(a, lifecycle.RunHealth):
                    pending.append(verdict())
                elif isinstance(a, lifecycle.Reboot):
                    reboot = True
            if t.then is not None:
                pending.append(t.then)
            if reboot:
                self.reboot()
                pending.append(lifecycle.Booted(self.booted, self.boot_id))


@dataclass
class Stats:
    """What every device of one run shares: poll latencies and counts, for the report."""

    latencies: list[float] = field(default_factory=list)  # seconds, answered polls
    stamps: list[float] = field(default_factory=list)  # time.monotonic() each answered poll ended
    poll_times: list[float] = field(default_factory=list)  # simulated seconds of each answered poll
    throttled: int = 0
    failed: int = 0
    bytes_in: int = 0
    downloads: int = 0


class SimAgent:
    def __init__(self, device_id: str, token: str, base_url: str, session: aiohttp.ClientSession,
                 clock: SimClock, stats: Stats, *, version: str = "1.0", poll_sleep: float = 60.0,
                 fails: Callable[[str], bool] = lambda version: False, tenant: str = "DEFAULT",
                 rng: random.Random | None = None, trial_seconds: float = TRIAL_SECONDS,
                 poll_session: aiohttp.ClientSession | None = None) -> None:
        self.trial_seconds = trial_seconds
        # Polls may have their own connection pool: a real device polls on its own connection,
        # so a poll's latency must not include waiting for a pooled connection held by another
        # device's download (simpool gives each worker one pool for polls, one for the rest).
        self.poll_session = poll_session or session
        self.id, self.session, self.clock, self.stats = device_id, session, clock, stats
        self.root = f"{base_url}/{tenant}/controller/v1/{device_id}"
        self.headers = {"Authorization": f"TargetToken {token}"}
        self.board = LiteBoard(version)
        self.poll_sleep, self.fails = poll_sleep, fails
        self.rng = rng or random.Random(device_id)
        self.backoff = Backoff(base=2.0, cap=max(poll_sleep, 2.0), rng=self.rng)
        self.outbox: list[Report] = []
        self.closed: set[str] = set()  # actions whose final report is queued or sent
        self.received: list[str] = []  # action ids whose artifact this device downloaded
        self.attempts: dict[str, int] = {}
        self.etag: str | None = None
        self.base: ddi.BaseResource | None = None  # the last full answer (a 304 repeats it)
        self.last_sleep = poll_sleep
        self.finished_at: dict[str, float] = {}  # action id -> simulated time of its final report
        self.downloads: list[tuple[float, float]] = []  # simulated (start, end) of each download
        self.busy = False

    # --- HTTP ------------------------------------------------------------------------------
    async def _req(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
                   session: aiohttp.ClientSession | None = None) -> tuple[int, bytes, dict[str, str]]:
        try:
            async with (session or self.session).request(method, url, json=body,
                                            headers={**self.headers, **(headers or {})}) as r:
                data = await r.read()
                status, hdrs = r.status, {k.lower(): v for k, v in r.headers.items()}
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"{method} {url.split('?')[0]}: {type(exc).__name__}") from None
        self.stats.bytes_in += len(data)
        delay = retry_after(hdrs.get("retry-after"))
        if status == 429 or (status == 503 and delay is not None):
            raise Throttled(f"{method} answered {status}", retry_after=delay or 0.0)
        if status >= 400 and status != 409:
            raise TransportError(f"{method} {url.split('?')[0]} answered HTTP {status}")
        return status, data, hdrs

    def _queue(self, path: str, body: dict[str, Any], key: str | None = None, method: str = "POST") -> None:
        key = key or f"{self.id}:{len(self.outbox)}:{time.time_ns()}"
        self.outbox.append(Report(method, path, body, key))

    def _feedback(self, aid: str, execution: ddi.Execution, finished: ddi.Finished, detail: str,
                  kind: str = "deploymentBase", key: str | None = None) -> None:
        fb = ddi.Feedback(execution, finished, (detail,), None, ddi.ddi_time(self.clock.now()), {"id": aid})
        self._queue(f"{kind}/{aid}/feedback", fb.body(), key)

    async def flush(self) -> None:
        """Deliver queued reports in order; stop at the first that cannot go (kept for later)."""
        while self.outbox:
            rep = self.outbox[0]
            await self._req(rep.method, f"{self.root}/{rep.path}", rep.body, {"Idempotency-Key": rep.key})
            self.outbox.pop(0)

    # --- the loop --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, first_delay: float = 0.0) -> None:
        await self.clock.sleep(first_delay)
        while not stop.is_set():
            delay = await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.clock.real(delay))

    async def step(self) -> float:
        """One poll and what it asks for; returns the simulated seconds to sleep."""
        try:
            await self.flush()
            base = await self._poll()
        except Throttled as exc:
            self.stats.throttled += 1
            return max(self.backoff.next_delay(), exc.retry_after)
        except TransportError:
            self.stats.failed += 1
            return self.backoff.next_delay()
        self.backoff.reset()
        if base is None:  # 304: nothing changed, but unfinished work (a failed download) stays
            base = self.base
            if base is None or (base.deployment is None and base.cancel is None):
                return self.last_sleep
        self.base = base
        self.last_sleep = base.sleep if base.sleep is not None else self.poll_sleep
        try:
            if base.config_data is not None:
                self._queue("configData", ddi.config_data_body({"edgeops.version": self.board.running or ""}),
                            method="PUT")
            if base.cancel is not None:
                await self._cancel(base.cancel)
            elif base.deployment is not None:
                await self._deploy(base.deployment)
            await self.flush()
        except TransportError:
            self.stats.failed += 1  # the next poll retries; queued reports wait
        except EdgeopsError:
            self.stats.failed += 1
        return self.last_sleep

    async def _poll(self) -> ddi.BaseResource | None:
        t0 = time.perf_counter()
        status, data, hdrs = await self._req("GET", self.root, headers={"If-None-Match": self.etag}
                                             if self.etag else None, session=self.poll_session)
        self.stats.latencies.append(time.perf_counter() - t0)
        self.stats.stamps.append(time.monotonic())  # CLOCK_MONOTONIC: one clock for all processes
        self.stats.poll_times.append(self.clock.elapsed())
        if status == 304:
            return None
        self.etag = hdrs.get("etag")
        return ddi.parse_base(data)

    async def _cancel(self, href: str) -> None:
        _, data, _ = await self._req("GET", href)
        cancel = ddi.parse_cancel(data)
        self._feedback(cancel.action_id, "closed", "success", "canceled before installing", "cancelAction")

    async def _deploy(self, href: str) -> None:
        aid = ddi.action_id_from_href(href)
        if aid in self.closed:
            return  # the final report is on its way: never install twice
        _, data, _ = await self._req("GET", href)
        dep = ddi.parse_deployment(data)
        art = pick_bundle(dep)
        version = dep.chunks[0].version
        self.attempts[aid] = self.attempts.get(aid, 0) + 1
        self.busy = True
        try:
            self._feedback(aid, "proceeding", "none",
                           f"downloading {art.filename}, attempt {self.attempts[aid]}")
            await self.flush()
            try:
                digest = await self._download(art)
            except TransportError:
                if self.attempts[aid] >= MAX_ATTEMPTS:
                    self._final(aid, "failure", f"download failed {MAX_ATTEMPTS} times")
                raise
            self.received.append(aid)
            target = self.board.other
            self.board.drive(lifecycle.Install(target, self.board.booted, version, 0, self.board.boot_id),
                             self._verdict)
            if art.sha256 is not None and digest != art.sha256:
                self.board.drive(lifecycle.WriteFailed("SHA-256 mismatch"), self._verdict)
                self._final(aid, "failure", "install refused: the artifact does not match its SHA-256")
                return
            self.board.slots[target].sha256 = digest
            self.board.drive(lifecycle.WriteDone(), self._verdict)
            self._feedback(aid, "downloaded", "none", f"{version} written to slot {target}; trial boot next")
            await self.flush()
            await self.clock.sleep(self.trial_seconds)  # the reboot and the health checks
            self.board.drive(lifecycle.RebootIntoTrial(f"trial boot for fleet action {aid}"), self._verdict)
            ok = (self.board.booted == target and self.board.slots[target].state == "good"
                  and self.board.running == version)
            self._final(aid, "success" if ok else "failure",
                        f"{version} committed by health checks on slot {target}" if ok
                        else f"{version} did not pass its trial; running slot {self.board.booted}")
        finally:
            self.busy = False

    def _final(self, aid: str, finished: ddi.Finished, detail: str) -> None:
        self.closed.add(aid)
        self.finished_at[aid] = self.clock.elapsed()
        self._feedback(aid, "closed", finished, detail, key=f"{self.id}:{aid}:closed")

    def _verdict(self) -> lifecycle.Event:
        version = self.board.state.version or ""
        if self.fails(version):
            return lifecycle.HealthFailed(f"simulated: {version} fails this device's health checks")
        return lifecycle.HealthPassed("simulated health checks passed")

    async def _download(self, art: ddi.Artifact) -> str:
        h, n, start = hashlib.sha256(), 0, self.clock.elapsed()
        try:
            async with self.session.get(art.url, headers=self.headers) as r:
                if r.status == 429:
                    raise Throttled("artifact answered 429", retry_after=retry_after(
                        r.headers.get("Retry-After")) or 0.0)
                if r.status != 200:
                    raise TransportError(f"artifact answered HTTP {r.status}")
                async for block in r.content.iter_chunked(1 << 16):
                    n += len(block)
                    if n > art.size:
                        raise TransportError("artifact longer than declared")
                    h.update(block)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"artifact: {type(exc).__name__}") from None
        if n != art.size:
            raise TransportError(f"artifact cut short at {n} of {art.size} bytes")
        self.stats.bytes_in += n
        self.stats.downloads += 1
        self.downloads.append((start, self.clock.elapsed()))
        return h.hexdigest()

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "running": self.board.running, "booted": self.board.booted,
                "phase": str(self.board.state.phase), "received": list(self.received),
                "pending_reports": len(self.outbox), "downloads": list(self.downloads),
                "slots": {k: {"state": s.state, "version": s.version} for k, s in self.board.slots.items()}}


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)
