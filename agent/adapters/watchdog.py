"""Feed a watchdog only while the agent's main loop is alive, so a hung trial system gets reset.

Two feeders behind one interface:
    DevWatchdog     the Linux watchdog device (Documentation/watchdog/watchdog-api.rst):
                    any write feeds it; writing 'V' before close is the "magic close"
                    that disarms it on a clean stop (unless the driver is nowayout)
    SystemdNotify   a unit with WatchdogSec=: sd_notify(3) "WATCHDOG=1" datagrams to
                    $NOTIFY_SOCKET, at least every $WATCHDOG_USEC / 2
The main loop calls ``Watchdog.kick()`` once per healthy iteration; a background
thread feeds the dog every ``interval`` seconds but only while the last kick is
younger than ``stale_after``. A loop that hangs stops kicking, the thread stops
feeding, and the hardware (or systemd) resets the board — during a trial that
reset lands in the bootloader's fallback. Stopping without the magic close
(``stop(clean=False)``) also leaves the reset armed.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.errors import DeviceError

DEFAULT_DEVICE = Path("/dev/watchdog")


class WatchdogError(DeviceError):
    hint = "check the board file's watchdog device, or run without one"


class Feeder(Protocol):
    def feed(self) -> None: ...

    def close(self, clean: bool) -> None: ...


class DevWatchdog:
    def __init__(self, path: Path = DEFAULT_DEVICE) -> None:
        self.path = path
        try:
            # Opening arms the hardware timer: from here on somebody must feed it.
            self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise WatchdogError(f"cannot open watchdog {path}: {exc.strerror}") from None

    def feed(self) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, b"\0")
        except OSError as exc:
            raise WatchdogError(f"cannot feed watchdog {self.path}: {exc.strerror}") from None

    def close(self, clean: bool) -> None:
        if self.fd is None:
            return
        try:
            if clean:
                os.write(self.fd, b"V")  # magic close: disarm on a deliberate stop
        finally:
            os.close(self.fd)
            self.fd = None


class SystemdNotify:
    def __init__(self, address: str) -> None:
        # sd_notify(3): '@' at the start names a socket in the abstract namespace
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, state: str) -> None:
        try:
            self.sock.sendto(state.encode(), self.address)
        except OSError as exc:
            raise WatchdogError(f"sd_notify to {self.address!r} failed: {exc.strerror}",
                                hint="is the agent running as a systemd unit with WatchdogSec=?") from None

    def feed(self) -> None:
        self.send("WATCHDOG=1")

    def close(self, clean: bool) -> None:
        if clean:
            self.send("STOPPING=1")
        self.sock.close()


@dataclass
class Watchdog:
    feeder: Feeder
    interval: float = 1.0  # seconds between feeds
    stale_after: float = 30.0  # a loop silent this long counts as hung
    clock: Callable[[], float] = time.monotonic
    last_kick: float = field(init=False)
    feeds: int = field(init=False, default=0)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.last_kick = self.clock()

    def kick(self, *, grace: float = 0.0) -> None:
        """The main loop finished a healthy iteration; ``grace``: it is about to block that
        many seconds on purpose (a long-poll), which must not count as hung."""
        self.last_kick = self.clock() + max(0.0, grace)

    def healthy(self) -> bool:
        return self.clock() - self.last_kick <= self.stale_after

    def tick(self) -> bool:
        """Feed once if the loop is alive; the thread calls this every ``interval``."""
        if not self.healthy():
            return False
        self.feeder.feed()
        self.feeds += 1
        return True

    def start(self) -> None:
        self.tick()
        self._thread = threading.Thread(target=self._run, name="edgeops-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def stop(self, *, clean: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.feeder.close(clean)


def from_environment(environ: Mapping[str, str], device: Path | None, *, stale_after: float = 30.0,
                     pid: int | None = None) -> Watchdog | None:
    """systemd's watchdog when the unit asks for one, else the board's device, else none."""
    usec = environ.get("WATCHDOG_USEC")
    sock = environ.get("NOTIFY_SOCKET")
    wanted_pid = environ.get("WATCHDOG_PID")
    mine = wanted_pid is None or wanted_pid == str(pid if pid is not None else os.getpid())
    if usec and sock and mine:
        try:
            period = int(usec) / 1e6
        except ValueError:
            raise WatchdogError(f"WATCHDOG_USEC={usec!r} is not a number") from None
        return Watchdog(SystemdNotify(sock), interval=period / 2, stale_after=stale_after)
    if device is not None and device.exists():
        return Watchdog(DevWatchdog(device), interval=1.0, stale_after=stale_after)
    return None
