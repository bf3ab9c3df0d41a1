"""When the daemon's clock-driven work is due: decided here, driven by the shell.

The shell (server.py) has one timer task: it sleeps until `next_deadline()`
and then calls `tick()`, and acts on what comes back (logs, the feed, events
for tenants). No sockets, no tasks, no wall clock: the clock is the
arbiter's, so tests drive this with a fake clock or trio's MockClock.

What is due, and when:
- the arbiter's own deadlines (quantum ends, grace periods, sit-outs,
  reclaim deadlines: `Arbiter.next_deadline`), at the time they name;
- heartbeat expiry and a predecessor's orphans whose grace ended, looked for
  every `reap_s` (a scan of every tenant: not per request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .adoption import Orphan
from .arbiter import Arbiter
from .tenants import Tenant


class Every:
    """A cadence on an injected clock: `due(now)` is true once per period."""

    __slots__ = ("at", "period")

    def __init__(self, period: float, now: float) -> None:
        self.period = period
        self.at = now + period  # when it is next due

    def due(self, now: float) -> bool:
        if now < self.at:
            return False
        self.at = now + self.period  # from now: a late run does not bunch up the next
        return True


@dataclass
class Expired:
    """What one tick() took away for lack of news."""

    tenants: list[Tenant] = field(default_factory=list)  # heartbeats stopped
    orphans: list[Orphan] = field(default_factory=list)  # nobody adopted them in time


class Timers:
    def __init__(self, arbiter: Arbiter, *, reap_s: float) -> None:
        self.arbiter = arbiter
        self.reap = Every(reap_s, arbiter.clock())

    def next_deadline(self) -> float:
        """Clock time of the next tick() with work (never None: reaping recurs)."""
        ours = self.arbiter.next_deadline()
        return self.reap.at if ours is None else min(ours, self.reap.at)

    def tick(self) -> Expired:
        """Do what is due now. The scheduler and reclaims only at their own
        deadlines; heartbeats and orphans at the reaping cadence."""
        arbiter = self.arbiter
        deadline = arbiter.next_deadline()
        # Read after: a deadline due now is the clock's reading inside
        # next_deadline(), which one taken before it would precede.
        now = arbiter.clock()
        if deadline is not None and deadline <= now:
            arbiter.tick()
        if not self.reap.due(now):
            return Expired()
        return Expired(arbiter.expire(), arbiter.expire_orphans())
