"""Hand a technician's verdict (mark-good / mark-bad) to a running health loop through a file.

The agent's health loop holds the device lock for up to the whole trial deadline, and a
technician's verdict must not wait for it: the command posts the verdict as
``STATE/operator-verdict`` and the loop takes it before its next probe round. Taking and
withdrawing are both one ``rename``, so exactly one side wins: either the loop acts on
the verdict or the command reports that nobody took it. A verdict names the boot it was
given in, so one left over from another boot is never applied to this trial.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from agent.adapters.fsutil import atomic_write
from agent.core.frozen import Frozen

FILE = "operator-verdict"
POLL = 0.1  # how often the posting command looks whether its verdict was taken
TAKE_POLL = 0.5  # how often the health loop looks for a verdict while it waits


class VerdictBox(Frozen):
    state_dir: Path

    @property
    def path(self) -> Path:
        return self.state_dir / FILE

    def post(self, *, good: bool, boot_id: str) -> None:
        atomic_write(self.path, json.dumps({"good": good, "boot_id": boot_id}))

    def wait_taken(self, timeout: float, *, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> bool:
        """Wait until the loop took the posted verdict; withdraw it after ``timeout`` seconds.

        False when it was withdrawn untaken; True when it was taken, even in the very
        instant the wait gave up."""
        deadline = clock() + timeout
        while self.path.exists():
            if clock() > deadline:
                try:
                    os.replace(self.path, self.path.with_suffix(".withdrawn"))
                except FileNotFoundError:
                    return True  # the loop took it in this very instant
                return False
            sleep(POLL)
        return True

    def wait(self, boot_id: str, interval: float, *,
             sleep: Callable[[float], None] = time.sleep) -> bool | None:
        """Sleep ``interval`` seconds (the health loop's pause between probe rounds), returning
        early with a verdict for boot ``boot_id`` as soon as one is posted."""
        left = interval
        while True:
            if (good := self.take(boot_id)) is not None:
                return good
            if left <= 0:
                return None
            step = min(TAKE_POLL, left)
            sleep(step)
            left -= step

    def take(self, boot_id: str) -> bool | None:
        """The verdict posted during boot ``boot_id`` (True: good), removed from the box;
        None when there is none, or it is unreadable, or it was given in another boot."""
        taken = self.path.with_suffix(".taken")
        try:
            os.replace(self.path, taken)  # atomic: either the loop takes it or the command withdraws it
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(taken.read_text())
        except (OSError, ValueError):
            return None
        finally:
            taken.unlink(missing_ok=True)
        if not isinstance(doc, dict) or doc.get("boot_id") != boot_id:
            return None  # left over from another boot: not meant for this trial
        return bool(doc.get("good"))
