"""``config.polling.sleep`` shaping: the sleep each device is told, so that polls stay spread.

hawkBit's base resource tells a device how long to sleep before its next poll
(``config.polling.sleep``, https://eclipse.dev/hawkbit/apis/ddi_api/). Two things make devices
poll together: they were started together (a site's power came back), or they were all cut
off together and retry as the link returns. Two answers here:

* each device's sleep is spread by a fixed share of its own (``spread``, from a hash of its
  controllerId: the same device always gets the same sleep, so its ETag holds and a 304 stays
  a 304), so a synchronised batch drifts apart after one round;
* when the poll rate over the last ``window`` seconds exceeds ``surge`` times the steady rate
  (the fleet's size over the configured sleep), every device is told a longer sleep — twice,
  then four times — until the rate falls back. Stretches are few and coarse so ETags change
  rarely.

Pure but for the counts it is fed: ``seen(now)`` per poll, ``devices`` from ``tasks``.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field

STRETCHES = (1, 2, 4)


@dataclass
class PollShaper:
    sleep: int  # seconds: Settings.poll_sleep
    spread: float = 0.1  # each device's sleep is within +-spread of it
    window: float = 10.0  # seconds over which the poll rate is measured
    surge: float = 1.5  # the rate, in multiples of the steady one, above which sleeps stretch
    devices: int = 0  # registered devices (tasks.flush_seen refreshes it)
    _times: collections.deque[float] = field(default_factory=collections.deque, repr=False)
    stretch: int = 1

    def seen(self, now: float) -> None:
        self._times.append(now)
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()

    def rate(self, now: float) -> float:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()
        return len(self._times) / self.window

    @property
    def steady(self) -> float:
        """Polls per second when every device polls once per configured sleep."""
        return self.devices / self.sleep if self.sleep > 0 else 0.0

    def sleep_for(self, device_id: str, now: float) -> int:
        if self.steady > 0:
            ratio = self.rate(now) / self.steady
            if ratio > self.surge * self.stretch:  # up one step at a time
                self.stretch = next((s for s in STRETCHES if s > self.stretch), self.stretch)
            elif self.stretch > 1 and ratio * 2 < self.surge:  # down once half the sleep would do
                self.stretch //= 2
        h = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big") / 2**32
        return max(1, round(self.sleep * self.stretch * (1 + self.spread * (2 * h - 1))))
