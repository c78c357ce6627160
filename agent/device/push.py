"""Wake-up channel: an HTTP long-poll on the DDI base resource, with polling as the fallback.

Why a long-poll and not MQTT or a WebSocket:
  * it works behind NAT and carrier-grade NAT because the device opens every connection,
    and through HTTP proxies and firewalls that allow only outbound HTTPS;
  * it reuses the DDI origin, TLS, and credentials (TargetToken/mTLS): no broker to run,
    no second port to open, no second set of secrets on the device;
  * it degrades to plain polling by itself: we ask with ``Prefer: wait=N`` (RFC 7240) and
    ``If-None-Match`` (the base resource's ETag). A controller that supports it holds the
    request until the device's links change (answering 200 with a new ETag) or N seconds
    pass (304). Real hawkBit ignores ``Prefer`` and answers at once — we notice the quick
    unchanged answer and simply sleep out the rest of the interval, i.e. normal polling.
The cost is one idle TCP connection per device on the controller, which an async server
handles cheaply; NAT mappings stay alive because N (60 s default) is below common timeouts.

The poller is anything with DDI's ``poll(etag=, wait=)``: the full client
(``agent.adapters.ddi_http.DdiClient``) or the idle service's standard-library one
(``agent.adapters.ddi_poll.BasePoll``), so this module imports neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from agent.core import ddi
from agent.core.fleet_config import FleetConfig
from agent.errors import TransportError

QUICK = 1.0  # an unchanged answer faster than this means the server does not hold requests


class Answer(Protocol):
    @property
    def base(self) -> ddi.BaseResource | None: ...  # None: 304, nothing new
    @property
    def etag(self) -> str | None: ...


class Poller(Protocol):
    def poll(self, *, etag: str | None = None, wait: float = 0) -> Answer: ...


def next_poll(base: ddi.BaseResource | None, cfg: FleetConfig) -> float:
    """Seconds until the next poll: the controller's ``config.polling.sleep`` (else the
    configured ``poll_interval``) within [min_sleep, max_sleep]."""
    s = base.sleep if base is not None and base.sleep is not None else cfg.poll_interval
    return min(max(s, cfg.min_sleep), cfg.max_sleep)


class LongPoll:
    def __init__(self, client: Poller, *, wait: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client, self.wait_s = client, wait
        self.clock, self.sleep = clock, sleep
        self.supported: bool | None = None  # learnt from the first answers

    def wait(self, seconds: float, etag: str | None,
             stop: Callable[[], bool] = lambda: False) -> bool:
        """Block up to ``seconds``; True when the controller signalled a change (poll now)."""
        deadline = self.clock() + seconds
        while not stop() and (left := deadline - self.clock()) > 0:
            if self.supported is False or etag is None:
                self.sleep(min(left, 1.0))
                continue
            hold = min(self.wait_s, left)
            started = self.clock()
            try:
                answer = self.client.poll(etag=etag, wait=hold)
            except TransportError:
                self.sleep(min(left, 5.0))  # the link is down: polling will notice and back off
                continue
            if answer.base is not None and answer.etag is not None and answer.etag != etag:
                return True
            if self.clock() - started < min(QUICK, hold / 2):
                self.supported = False  # an ordinary server: fall back to sleeping
            else:
                self.supported = True
        return False
