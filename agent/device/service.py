"""The agent service: cycles, fleet polls, metrics and the watchdog, until SIGTERM or a reboot.

``edgeops agent`` parses its arguments and becomes ``agent.cli.serve``, which loads the
config and calls :func:`serve` (``--once`` calls :func:`run`); everything the service
decides lives here: when to cycle, when to poll the controller (and when a
long-poll may block), when the metrics textfile is rewritten, and how the watchdog is fed
and closed. The seams are arguments, so a test injects a watchdog, a fleet link or a stop
flag instead of patching private functions:

    run(up, once=False, watchdog=lambda up: Watchdog(...), stop=Stop())

Two ways to run the same loop. ``run`` does every wake-up in this process: a cycle of the
device, then a poll of the controller with the full fleet agent (requests, and for an
install cryptography and zstandard). ``serve`` (the service, ``edgeops agent`` without
``--once``) keeps this process on the standard library — the config, a stat of the
journal's files, one GET of the DDI base resource (``agent.adapters.ddi_poll``), the
long-poll and the watchdog; no device, no database — and starts a worker, ``edgeops agent
--once`` in a fresh interpreter, only for a wake-up that has work (``agent.device.worker``):
the idle service holds half the memory. The journal is the only state either way, so a
worker killed mid-install is what a killed ``run`` was. Devices whose loop needs the heavy
libraries anyway (mTLS with the TPM-sealed identity key, renewed between polls; a metrics
textfile) have ``serve`` call ``run``.

``prometheus_client`` is imported only when ``metrics_file`` is set, the telemetry thread
(``agent.device.telemetry``) only with ``[telemetry]``, and the fleet client
(requests and TLS) only when [fleet] is configured: ``open_fleet`` asks the parsed config
(agent.device.fleet_files reads no more than a fleet.toml beside agent.toml).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.core import logs
from agent.device import telemetry  # the standard library only until [telemetry] is on
from agent.device.worker import Wake
from agent.errors import DeviceBusy, DeviceError, EdgeopsError

if TYPE_CHECKING:
    from agent.adapters.watchdog import Watchdog
    from agent.core import lifecycle
    from agent.core.config import AgentConfig
    from agent.device.fleet import FleetAgent, PollOutcome
    from agent.device.push import LongPoll
    from agent.device.updater import CycleResult, Updater
    from agent.device.worker import Done, Started

log = logs.get("edgeops")

WatchdogFactory = Callable[["Updater"], "Watchdog | None"]
FleetFactory = Callable[["Updater"], "FleetLink | None"]
Say = Callable[[str], None]
Report = Callable[[Wake], None]
WakeUp = Callable[["Watchdog | None"], Wake]  # one wake-up of the loop: cycle, poll, ...
DeadlineWatchdog = Callable[[float], "Watchdog | None"]  # for a given health deadline


class HasState(Protocol):
    def state(self) -> lifecycle.State: ...


class Interrupted(BaseException):
    """Raised by SIGTERM out of a blocking wait (a BaseException: no ``except Exception`` on the
    way, in requests or urllib3, may swallow it)."""


@dataclass
class Stop:
    """Set by SIGTERM (or a caller): the loop ends after its current step, and at once out of
    an idle wait, a long-poll included (its request may be held by the controller for a minute,
    and systemd or the sim board's reboot would wait that long)."""

    requested: bool = False
    _waiting: bool = False

    def __call__(self) -> bool:
        return self.requested

    def request(self, signum: int = 0, frame: object = None) -> None:
        self.requested = True
        if self._waiting and signum:
            self._waiting = False  # a second signal must not raise out of the clean-up
            raise Interrupted

    def on_sigterm(self) -> Stop:
        signal.signal(signal.SIGTERM, self.request)
        return self

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block that SIGTERM may abandon: it holds nothing half-done (an idle wait)."""
        self._waiting = True
        try:
            yield  # a SIGTERM that came just before: the wait itself looks at the flag first
        except Interrupted:
            pass
        finally:
            self._waiting = False


@dataclass
class FleetLink:
    """The device's controller: the DDI poller and, with ``push = "longpoll"``, its wake-up."""

    agent: FleetAgent
    waker: LongPoll | None = None


def open_fleet(up: Updater) -> FleetLink | None:
    """The DDI client when [fleet] is configured (agent.toml or fleet.toml), else None."""
    from agent.device.fleet_files import find_fleet

    cfg = find_fleet(up.cfg)
    if cfg is None:
        return None
    from agent.adapters.ddi_http import DdiClient
    from agent.device.fleet import FleetAgent

    agent = FleetAgent(up, DdiClient(cfg))
    if cfg.push != "longpoll":
        return FleetLink(agent)
    from agent.device.push import LongPoll

    return FleetLink(agent, LongPoll(agent.client, wait=cfg.longpoll_wait))


def system_watchdog(cfg: AgentConfig, deadline: float, device: Path | None) -> Watchdog | None:
    """systemd's watchdog (WatchdogSec=) or ``device`` (the board file's), else none.

    A cycle may spend the whole health ``deadline`` in probes, so only a loop silent for
    longer than that plus a poll interval counts as hung."""
    from agent.adapters.watchdog import WatchdogError, from_environment

    stale = deadline + cfg.poll_interval + 30
    try:
        return from_environment(os.environ, device, stale_after=stale)
    except WatchdogError as exc:  # e.g. systemd already holds /dev/watchdog (RuntimeWatchdogSec=)
        log.warning("running without a watchdog: %s", exc.one_line())
        return None


def board_watchdog(board: str) -> Path | None:
    """The watchdog device the board file names, if any."""
    import contextlib

    from agent.adapters import boardfiles
    from agent.errors import ConfigError

    with contextlib.suppress(ConfigError):
        name = boardfiles.load(board).watchdog
        return Path(name) if name else None
    return None


def _say(line: str) -> None:
    print(line, flush=True)  # one line per event, at once: the service's log is the journal


def run(up: Updater, *, once: bool = False, watchdog: WatchdogFactory | None = None,
        fleet: FleetFactory = open_fleet, stop: Stop | None = None, say: Say = _say,
        report: Report | None = None) -> str:
    """Cycle (and poll the controller) until SIGTERM, a reboot, or after one cycle (``once``).

    Returns the journal's phase at the end. ``watchdog`` is called once, after start-up
    succeeded; without one (or with ``once``) nothing is fed. ``stop`` defaults to a flag
    set by SIGTERM. ``report`` hears how each wake-up ended (a worker tells its parent).
    """
    if stop is None:
        stop = Stop().on_sigterm()
    link = fleet(up)
    pidfile = up.register_process()
    tel = None if once else telemetry.start(up.cfg)
    try:
        if up.cfg.metrics_file is not None:
            from agent.device import metrics

            metrics.render(up)  # a missing [metrics] extra is a config error now, not later
        dog = None if once or watchdog is None else watchdog(up)

        def wake(dog: Watchdog | None) -> Wake:
            w = _wake_here(up, link, dog, say, keep_going=not once)
            if report is not None:
                report(w)
            return w

        return _loop(up.journal, wake, link.waker if link is not None else None, dog,
                     once=once, stop=stop)
    finally:
        if tel is not None:
            tel.stop()
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)


def serve(cfg: AgentConfig, *, watchdog: DeadlineWatchdog | None = None, stop: Stop | None = None,
          say: Say = _say, worker: Callable[[Started], Done] | None = None) -> str:
    """The service (``edgeops agent``): the loop of ``run`` with each wake-up that has work
    done by a worker process, while this one stays on the standard library and opens neither
    the device nor its journal; ``run`` itself where the loop needs the heavy libraries
    anyway (see the module docstring). ``watchdog`` is called with the health deadline."""
    from agent.device.fleet_files import find_fleet

    fleet = find_fleet(cfg)
    if cfg.metrics_file is not None or (fleet is not None and fleet.identity):
        return _run_device(cfg, watchdog=watchdog, stop=stop, say=say)
    from agent.device.worker import IdleAgent
    from agent.device.worker import Worker as WorkerProcess

    if stop is None:
        stop = Stop().on_sigterm()
    poll = waker = None
    if fleet is not None:
        from agent.adapters.ddi_poll import BasePoll

        poll = BasePoll(fleet)
        if fleet.push == "longpoll":
            from agent.device.push import LongPoll

            waker = LongPoll(poll, wait=fleet.longpoll_wait)
    idle = IdleAgent(cfg, fleet, poll, worker or WorkerProcess(
        cfg.path, verbose=log.isEnabledFor(logs.DEBUG)))
    pidfile = _register(cfg)
    tel = telemetry.start(cfg)
    try:
        # The bundle of a running trial may allow more time; each worker says so as it starts.
        dog = None if watchdog is None else watchdog(cfg.health_policy.deadline)
        return _loop(_JournalAtExit(cfg.journal_path), idle, waker, dog, once=False, stop=stop)
    finally:
        if tel is not None:
            tel.stop()
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)
        if poll is not None:
            poll.close()


def _run_device(cfg: AgentConfig, *, watchdog: DeadlineWatchdog | None, stop: Stop | None,
                say: Say) -> str:
    """``run`` on the device ``cfg`` describes (the loop in this one process)."""
    from agent.device.updater import Updater, open_device

    def dog(up: Updater) -> Watchdog | None:
        return watchdog(up.policy().deadline) if watchdog is not None else None

    dev = open_device(cfg)
    try:
        return run(Updater(dev), watchdog=dog, stop=stop, say=say)
    finally:
        dev.close()


def _register(cfg: AgentConfig) -> Path | None:
    """Tell the sim board that this process runs (its firmware signals it on a reboot), as
    ``Updater.register_process`` does for the worker; real boards track no processes."""
    if cfg.runtime != "sim":
        return None
    from agent.adapters.simboard import SimRuntime

    return SimRuntime(cfg).register_process()


class _JournalAtExit:
    """The journal's state for the service's last line and its watchdog, read only when
    asked: the idle service holds no database open (sqlite3 alone is 2 MiB resident)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def state(self) -> lifecycle.State:
        from agent.adapters.journal import Journal

        journal = Journal(self.path)
        try:
            return journal.state()
        finally:
            journal.close()


def _loop(journal: HasState, wake: WakeUp, waker: LongPoll | None, dog: Watchdog | None, *,
          once: bool, stop: Stop) -> str:
    if dog is not None:
        dog.start()
    clean = False
    try:
        while True:
            w = wake(dog)
            if dog is not None:
                dog.kick()
            if once or w.rebooted or stop():
                break
            _idle(waker, w.etag, dog, w.interval, stop)
            if stop():
                break  # out of the idle wait at once: no wake-up after SIGTERM
        phase = str(journal.state().phase)
        clean = True
        return phase
    except KeyboardInterrupt:
        clean = True  # Ctrl-C on the console is as deliberate as SIGTERM
        raise
    finally:
        if dog is not None:
            # Magic close on a deliberate stop, and on a crash outside a trial (a healthy
            # committed system is not reset for the agent's sake); a crash during a trial
            # leaves the hardware timer armed, so a hung trial system is reset.
            dog.stop(clean=clean or not _in_trial(journal))


def _wake_here(up: Updater, link: FleetLink | None, dog: Watchdog | None, say: Say, *,
               keep_going: bool = False) -> Wake:
    """One wake-up in this process: the device's cycle, then the controller's poll."""
    result = _cycle(up, keep_going=keep_going)
    if dog is not None:
        dog.kick()
    for m in result.messages:
        say(m)
    w = Wake(result.rebooted, up.cfg.poll_interval)
    if link is not None and not result.rebooted:
        # After the cycle, so a finished trial is reported in this same wake-up.
        out = _poll(link, say)
        w = Wake(out.rebooted, out.sleep, link.agent.etag)
    _write_metrics(up, link)
    return w


def _cycle(up: Updater, *, keep_going: bool = False) -> CycleResult:
    """One cycle of the device: note the boot, finish what a previous boot left, run a trial.

    ``keep_going`` (a long-lived loop, not ``--once``): a device error such as a full disk is
    said and retried next cycle, because exiting would only restart into the same error."""
    from agent.device.updater import CycleResult

    up.messages.clear()
    try:
        return up.cycle()
    except DeviceBusy:
        # an install or a technician's command holds the lock: not a fault of ours
        return CycleResult(str(up.journal.state().phase), ["device busy; next cycle later"])
    except DeviceError as exc:
        if not keep_going:
            raise
        return CycleResult(str(up.journal.state().phase),
                           [f"device error, next cycle later: {exc.one_line()}"])


def _poll(link: FleetLink, say: Say) -> PollOutcome:
    """One poll of the controller; its messages said."""
    out = link.agent.poll_once()
    for m in out.messages:
        say(m)
    return out


def _idle(waker: LongPoll | None, etag: str | None, dog: Watchdog | None, seconds: float,
          stop: Stop) -> None:
    if waker is not None:
        # Long-poll: the controller can wake us at once; polling is the fallback.
        if dog is not None:
            dog.kick(grace=seconds)  # blocking here on purpose is not a hang
        with stop.interruptible():
            waker.wait(seconds, etag, stop=stop)
        return
    # A blocking sleep costs no CPU; SIGTERM ends it within a second.
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(1.0, deadline - time.monotonic()))
        if dog is not None:
            dog.kick()


def _write_metrics(up: Updater, link: FleetLink | None) -> None:
    if up.cfg.metrics_file is None:
        return
    from agent.device import metrics

    try:
        metrics.write(up, up.cfg.metrics_file, link_up=link.agent.link_up if link is not None else None)
    except (OSError, EdgeopsError) as exc:  # metrics are for people watching: never a reason
        log.warning("cannot write %s: %s", up.cfg.metrics_file, exc)


def _in_trial(journal: HasState) -> bool:
    from agent.core import lifecycle

    try:
        return journal.state().phase in (lifecycle.Phase.TRIAL_PENDING, lifecycle.Phase.TESTING,
                                         lifecycle.Phase.COMMITTING)
    except Exception:  # the journal itself may be what broke: stay armed, the safe side
        return True
