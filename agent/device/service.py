"""The agent service: cycles, fleet polls, metrics and the watchdog, until SIGTERM or a reboot.

``edgeops agent`` parses its arguments, opens the device and calls :func:`run`; everything
the service decides lives here: when to cycle, when to poll the controller (and when a
long-poll may block), when the metrics textfile is rewritten, and how the watchdog is fed
and closed. The seams are arguments, so a test injects a watchdog, a fleet link or a stop
flag instead of patching private functions:

    run(up, once=False, watchdog=lambda up: Watchdog(...), stop=Stop())

``prometheus_client`` is imported only when ``metrics_file`` is set, and the fleet client
(requests and TLS) only when [fleet] is configured: ``open_fleet`` asks the parsed config
(agent.device.fleet_files reads no more than a fleet.toml beside agent.toml).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.core import lifecycle
from agent.errors import DeviceBusy, DeviceError, EdgeopsError

if TYPE_CHECKING:
    from agent.adapters.watchdog import Watchdog
    from agent.device.fleet import FleetAgent
    from agent.device.push import LongPoll
    from agent.device.updater import CycleResult, Updater

log = logging.getLogger("edgeops")

WatchdogFactory = Callable[["Updater"], "Watchdog | None"]
FleetFactory = Callable[["Updater"], "FleetLink | None"]
Say = Callable[[str], None]


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


def system_watchdog(up: Updater, device: Path | None) -> Watchdog | None:
    """systemd's watchdog (WatchdogSec=) or ``device`` (the board file's), else none.

    A cycle may spend the whole health deadline in probes, so only a loop silent for
    longer than that plus a poll interval counts as hung."""
    from agent.adapters.watchdog import WatchdogError, from_environment

    stale = up.policy().deadline + up.cfg.poll_interval + 30
    try:
        return from_environment(os.environ, device, stale_after=stale)
    except WatchdogError as exc:  # e.g. systemd already holds /dev/watchdog (RuntimeWatchdogSec=)
        log.warning("running without a watchdog: %s", exc.one_line())
        return None


def _say(line: str) -> None:
    print(line, flush=True)  # one line per event, at once: the service's log is the journal


def run(up: Updater, *, once: bool = False, watchdog: WatchdogFactory | None = None,
        fleet: FleetFactory = open_fleet, stop: Stop | None = None, say: Say = _say) -> str:
    """Cycle (and poll the controller) until SIGTERM, a reboot, or after one cycle (``once``).

    Returns the journal's phase at the end. ``watchdog`` is called once, after start-up
    succeeded; without one (or with ``once``) nothing is fed. ``stop`` defaults to a flag
    set by SIGTERM.
    """
    if stop is None:
        stop = Stop().on_sigterm()
    link = fleet(up)
    pidfile = up.register_process()
    try:
        if up.cfg.metrics_file is not None:
            from agent.device import metrics

            metrics.render(up)  # a missing [metrics] extra is a config error now, not later
        dog = None if once or watchdog is None else watchdog(up)
        return _loop(up, link, dog, once=once, stop=stop, say=say)
    finally:
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)


def _loop(up: Updater, link: FleetLink | None, dog: Watchdog | None, *, once: bool, stop: Stop,
          say: Say) -> str:
    if dog is not None:
        dog.start()
    clean = False
    try:
        while True:
            result = _cycle(up, keep_going=not once)
            if dog is not None:
                dog.kick()
            for m in result.messages:
                say(m)
            rebooted, interval = result.rebooted, up.cfg.poll_interval
            if link is not None and not rebooted:
                # After the cycle, so a finished trial is reported in this same wake-up.
                rebooted, interval = _poll(link, say)
            _write_metrics(up, link)
            if once or rebooted or stop():
                break
            _idle(link, dog, interval, stop)
        phase = str(up.journal.state().phase)
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
            dog.stop(clean=clean or not _in_trial(up))


def _cycle(up: Updater, *, keep_going: bool = False) -> CycleResult:
    """One cycle of the device: note the boot, finish what a previous boot left, run a trial.

    ``keep_going`` (the service, not ``--once``): a device error such as a full disk is said
    and retried next cycle, because exiting would only restart into the same error."""
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


def _poll(link: FleetLink, say: Say) -> tuple[bool, float]:
    """One poll of the controller: (rebooted, seconds until the next one)."""
    out = link.agent.poll_once()
    for m in out.messages:
        say(m)
    return out.rebooted, out.sleep


def _idle(link: FleetLink | None, dog: Watchdog | None, seconds: float, stop: Stop) -> None:
    if link is not None and link.waker is not None:
        # Long-poll: the controller can wake us at once; polling is the fallback.
        if dog is not None:
            dog.kick(grace=seconds)  # blocking here on purpose is not a hang
        with stop.interruptible():
            link.waker.wait(seconds, link.agent.etag, stop=stop)
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


def _in_trial(up: Updater) -> bool:
    try:
        return up.journal.state().phase in (lifecycle.Phase.TRIAL_PENDING, lifecycle.Phase.TESTING,
                                            lifecycle.Phase.COMMITTING)
    except Exception:  # the journal itself may be what broke: stay armed, the safe side
        return True
