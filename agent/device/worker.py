"""The idle service's worker: when a wake-up has work, starting it, and what it reports back.

``agent.device.service.serve`` keeps the long-running process on the standard library: it
opens neither the device nor its journal. At each wake-up ``IdleAgent`` decides whether there
is anything to do; if there is, ``Worker`` starts ``edgeops agent --once --report-fd N`` in a
fresh interpreter — the same one wake-up the in-process loop does (the device's cycle, then
the fleet agent's poll, with requests, cryptography and zstandard loaded there) — and reads
two JSON lines from the pipe N: ``{"deadline": D}`` as it starts (the health deadline of the
trial it may run, so the parent's watchdog allows for it), then how the wake-up ended,
``{"rebooted", "interval", "etag", "cycle", "reports"}``. The worker's own lines go to the
service's stdout as before; it exits when the wake-up is done.

A worker is started when:
  * the service starts (the first cycle of a boot confirms the slot, catches the TPM up, and
    the first poll reconciles a fleet action a previous run left);
  * the last worker said a cycle is still due (``lifecycle.needs_cycle``: the device lock was
    busy, say) or reports are still queued (then only once the controller answers again);
  * the journal's files changed since the last worker: a technician's command or a model
    swap ran meanwhile, and the agent catches up as its next cycle always did;
  * the base resource links a deployment, a cancel or a configData request, or redirects.
Otherwise the wake-up is over after the GET (or, without a controller, a stat of the
journal), and nothing was written.

Crash safety is the journal's, as before: the worker persists every step there, and the
parent holds no state a restart would miss (a worker killed mid-install is the SIGKILL case
of the single-process agent). A worker that fails ends the service with its exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core import logs
from agent.core.outbox import Backoff
from agent.errors import EdgeopsError, Throttled, TransportError

if TYPE_CHECKING:
    from agent.adapters.ddi_poll import BasePoll
    from agent.adapters.watchdog import Watchdog
    from agent.core.config import AgentConfig
    from agent.core.fleet_config import FleetConfig
    from agent.device.updater import Updater

log = logs.get("edgeops")

MAX_REPORT = 64 * 1024  # bytes of the worker's report line we read


@dataclass(frozen=True)
class Wake:
    """How one wake-up of the agent ended."""

    rebooted: bool
    interval: float  # seconds until the next wake-up
    etag: str | None = None  # the base resource's, for the long-poll until then


class WorkerFailed(EdgeopsError):
    """The worker ended with an error (it printed it) or was killed: the service ends too."""

    def __init__(self, code: int) -> None:
        self.code = code
        how = f"exited with {code}" if code > 0 else f"was killed by signal {-code}"
        super().__init__(f"the agent's worker {how}")


@dataclass(frozen=True)
class Done:
    """The worker's report: how its wake-up ended, and what it left for the next one."""

    wake: Wake
    cycle: bool = False  # lifecycle.needs_cycle is still true (e.g. the device lock was busy)
    reports: bool = False  # reports wait in the outbox (the controller did not take them)


Started = Callable[[float], None]  # told the health deadline as a worker starts


class Worker:
    """Runs one wake-up in ``python -m agent.cli agent --once`` for the device at ``config``."""

    def __init__(self, config: Path, *, verbose: bool = False, python: str = sys.executable) -> None:
        self.argv = [python, "-m", "agent.cli", *(["-v"] if verbose else []), "agent", "--once",
                     "--config", str(config)]

    def __call__(self, started: Started) -> Done:
        r, w = os.pipe()
        try:
            proc = subprocess.Popen([*self.argv, "--report-fd", str(w)], pass_fds=(w,),
                                    stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)  # the worker holds the only write end: EOF when it exits
        with open(r, "rb") as pipe:
            first = pipe.readline(MAX_REPORT)
            if first:
                started(_deadline(first))
            last = pipe.readline(MAX_REPORT)
        code = proc.wait()
        if code != 0:
            raise WorkerFailed(code)
        return parse_report(last)


def _deadline(line: bytes) -> float:
    try:
        return float(json.loads(line)["deadline"])
    except (ValueError, KeyError, TypeError):
        return 0.0  # the parent's own deadline then; the exit code tells what went wrong


def parse_report(line: bytes) -> Done:
    try:
        doc = json.loads(line)
        etag = doc.get("etag")
        wake = Wake(bool(doc["rebooted"]), float(doc["interval"]),
                    etag if isinstance(etag, str) else None)
        return Done(wake, bool(doc.get("cycle")), bool(doc.get("reports")))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise WorkerFailed(1) from None  # exited 0 without saying how: treat as a failure


class Reporter:
    """The worker's side of the pipe ``fd`` (inherited from the parent)."""

    def __init__(self, fd: int, up: Updater) -> None:
        self.fd, self.up = fd, up

    def started(self) -> None:
        self._write({"deadline": self.up.policy().deadline})

    def __call__(self, w: Wake) -> None:
        from agent.core import lifecycle  # the worker has it loaded: the parent never gets here

        doc: dict[str, Any] = {"rebooted": w.rebooted, "interval": w.interval, "etag": w.etag}
        if not w.rebooted:
            journal, rt = self.up.journal, self.up.dev.runtime
            doc["cycle"] = lifecycle.needs_cycle(journal.state(), rt.booted_slot(), rt.boot_id())
            doc["reports"] = journal.pending_count() > 0
        self._write(doc)

    def _write(self, doc: dict[str, Any]) -> None:
        os.write(self.fd, json.dumps(doc).encode() + b"\n")


class IdleAgent:
    """The service's wake-up on the standard library: decide, and start a worker for work."""

    def __init__(self, cfg: AgentConfig, fleet: FleetConfig | None, poll: BasePoll | None,
                 worker: Callable[[Started], Done]) -> None:
        self.cfg, self.fleet, self.poll, self.worker = cfg, fleet, poll, worker
        self.etag: str | None = None
        self.left: Done | None = None  # the last worker's report; None before the first
        self.seen = journal_mark(cfg.journal_path)
        # as FleetAgent's: a controller that cannot be reached is asked again sooner than later
        self.backoff = Backoff(base=2.0, cap=max(fleet.poll_interval if fleet else 0, 2.0))
        self.last_reason: str | None = None  # why the last worker was started (tests, -v)

    def __call__(self, dog: Watchdog | None = None) -> Wake:
        reason, wake = self.due()
        self.last_reason = reason
        if reason is None:
            return wake
        log.debug("starting a worker: %s", reason)
        base = self.cfg.health_policy.deadline

        def started(deadline: float) -> None:
            # The loop is silent while the worker works, as it is during an in-process cycle;
            # a trial's bundle may allow more than the device's own deadline.
            if dog is not None:
                dog.kick(grace=max(0.0, deadline - base))

        self.left = done = self.worker(started)
        self.seen = journal_mark(self.cfg.journal_path)  # the worker's own writes are known
        if done.wake.etag is not None:
            self.etag = done.wake.etag
        return done.wake

    def due(self) -> tuple[str | None, Wake]:
        """(why a worker is needed, or None; how this wake-up ends without one)."""
        left = self.left
        if left is None:
            return "start", Wake(False, 0.0)
        if left.cycle:
            return "cycle", Wake(False, 0.0)
        if journal_mark(self.cfg.journal_path) != self.seen:
            return "journal", Wake(False, 0.0)
        if self.fleet is None or self.poll is None:
            return None, Wake(False, self.cfg.poll_interval)
        from agent.adapters.ddi_poll import Redirected
        from agent.device.push import next_poll

        try:
            answer = self.poll.poll()
        except Redirected:
            return "redirect", Wake(False, 0.0)
        except TransportError as exc:
            # The worker would fail the same way; it runs once the controller answers again.
            delay = self.backoff.next_delay()
            if isinstance(exc, Throttled):  # 429: no sooner than the controller said
                delay = max(delay, exc.retry_after)
            return None, Wake(False, delay, self.etag)
        self.backoff.reset()
        self.etag = answer.etag
        base = answer.base
        wake = Wake(False, next_poll(base, self.fleet), self.etag)
        if base is not None and (base.deployment or base.cancel or base.config_data):
            return "controller", wake
        if left.reports:
            return "reports", wake
        return None, wake


def journal_mark(path: Path) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when anyone commits to the SQLite journal at ``path``: its file and its
    write-ahead log, by inode, size and mtime (a stat each, no database opened)."""
    out: list[tuple[int, int, int] | None] = []
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


__all__ = ["Done", "IdleAgent", "Reporter", "Wake", "Worker", "WorkerFailed", "journal_mark",
           "parse_report"]
