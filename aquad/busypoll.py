"""When the socket task polls for the next request instead of parking.

When a tenant issues requests back to back (paging many tensors, lease after
lease), its next request lands some tens of microseconds after our reply,
and parking in epoll, then waking through trio, costs about as much again.
So once a request came within HOT_S of parking, the task polls ZMQ_EVENTS
for up to SPIN_S before it parks, yielding the CPU between polls (a tenant
sharing our core must not wait for the poll to end). A tenant that talks
once per engine step (milliseconds) never triggers it, so an idle or
lightly used host burns nothing.

Polling pays only on a core nobody else keeps busy. When a yield loses the
CPU for a whole time slice (over BUSY_S; a tenant on our core that is about
to send gives it back within microseconds), each request would wait out such
a slice behind the other process, while a parked daemon is woken ahead of
it. So then the task only parks, for a back-off that doubles while the core
stays busy (up to BACKOFF_MAX_S) and halves with each poll that goes well.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

SPIN_S = 100e-6
HOT_S = 250e-6
BUSY_S = 0.5e-3  # under the scheduler's shortest time slice (0.75 ms)
BACKOFF_MIN_S = 10e-3
BACKOFF_MAX_S = 1.0


class BusyPoll:
    """The policy, with the socket's readiness test, the clock and the yield
    injected (the tests drive it with fakes)."""

    def __init__(self, ready: Callable[[], bool], *,
                 clock: Callable[[], float] = time.perf_counter,
                 yield_cpu: Callable[[], object] = os.sched_yield) -> None:
        self._ready = ready
        self._clock = clock
        self._yield = yield_cpu
        self.hot = False  # the last wake came right after a park: a back-to-back peer
        self.backoff = BACKOFF_MIN_S / 2  # the next contention doubles it
        self._resume = 0.0  # no polling before this time (the core was busy)

    def parked(self, seconds: float) -> None:
        """The task slept `seconds` before a wake-up."""
        self.hot = seconds < HOT_S

    def poll(self) -> bool:
        """Called with nothing pending, before parking. True: look at the
        socket again (a request came, or may have during a long yield);
        False: park."""
        clock, ready, yield_cpu = self._clock, self._ready, self._yield
        if not self.hot or clock() < self._resume:
            return False
        until = clock() + SPIN_S
        while True:
            if ready():
                self.backoff = max(self.backoff / 2, BACKOFF_MIN_S / 2)
                return True
            before = clock()
            if before >= until:
                self.backoff = max(self.backoff / 2, BACKOFF_MIN_S / 2)
                self.hot = False
                return False
            yield_cpu()
            if clock() - before > BUSY_S:
                self.backoff = min(2 * self.backoff, BACKOFF_MAX_S)
                self._resume = clock() + self.backoff
                self.hot = False
                return True
