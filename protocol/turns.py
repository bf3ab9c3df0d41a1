"""A tenant's side of GPU time slices, as a state machine without I/O.

The daemon numbers every slice it grants. Replies and events about slices can
reach a tenant in either order (a `preempt` may be read before the `grant` it
refers to, a `revoked` after the tenant asked again), so everything here is
decided by slice id, never by arrival order. The same machine runs in
`aqua.Client` (fed by the socket) and in the simulator (fed by the arbiter in
virtual time); it sends nothing itself: its methods return the request to send.

    idle --begin()--> waiting --grant--> holding --preempt--> holding, must_yield
      ^                  ^                  |                        |
      |                  +--- yield_() -----+------------------------+
      +------ done() from any phase          revoked: waiting, must_yield
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from enum import StrEnum

from .messages import Turn, TurnDone, TurnYield
from .replies import Event, Grant, Preempt, Revoked, TurnState


class Phase(StrEnum):
    IDLE = "idle"  # outside a turn
    WAITING = "waiting"  # asked for a slice, none held
    HOLDING = "holding"  # holds the current slice


class TurnMachine:
    """What a tenant holds and what it owes the daemon."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.phase = Phase.IDLE
        self.slice = 0  # the last slice granted to us
        self.devices: list[int] = []
        self.wanted: list[int] | None = None  # the devices begin() asked for
        self.asked = 0  # highest slice id the daemon asked us to yield
        self.revoked_slice = 0  # highest slice id the daemon revoked
        self.requeued = False  # asked again of a restarted daemon, not yet granted
        self.yields = 0
        self.waits = 0  # turn and yield requests that queued (no grant in the reply)
        self.revocations = 0
        self.granted_at = 0.0  # clock() of the last grant seen
        self.yielded_at = 0.0  # ... and of the last yield sent

    # --- what the tenant does -------------------------------------------------

    @property
    def active(self) -> bool:
        """Inside a turn (between begin() and done())."""
        return self.phase is not Phase.IDLE

    @property
    def holding(self) -> bool:
        return self.phase is Phase.HOLDING

    def begin(self, devices: Iterable[int] | None = None) -> Turn:
        """Enter a turn; send the returned request, then feed on_reply()."""
        if self.active:
            raise RuntimeError("already inside a turn")
        # Waiting before the request goes out: the grant may be read by
        # another thread before the reply is.
        self.phase = Phase.WAITING
        self.wanted = None if devices is None else list(devices)
        return Turn(devices=self.wanted)

    def on_reply(self, reply: TurnState) -> bool:
        """The reply to a turn or yield request; True when it granted a slice."""
        if reply.slice is not None and reply.granted:
            self._hold(reply.slice, reply.devices)
            return True
        self.waits += 1
        return False

    @property
    def preempted(self) -> bool:
        """The daemon wants the current slice back."""
        return self.holding and self.asked == self.slice

    @property
    def revoked(self) -> bool:
        """The current slice was taken away without a yield."""
        return self.phase is Phase.WAITING and self.revoked_slice == self.slice != 0

    @property
    def must_yield(self) -> bool:
        """respond() has work: page out, give the slice up, wait for the next."""
        return self.preempted or self.revoked or self.requeued

    def yield_(self) -> TurnYield | None:
        """Give the slice up (after paging out). The request to send, or None
        when a restarted daemon has us queued already; then wait for a grant."""
        requeued, self.requeued = self.requeued, False
        self.phase = Phase.WAITING
        self.yields += 1
        self.yielded_at = self._clock()
        return None if requeued else TurnYield(slice=self.slice)

    def done(self) -> TurnDone:
        """Leave the turn; send the returned request."""
        self.phase = Phase.IDLE
        self.requeued = False
        return TurnDone()

    # --- what the daemon says -------------------------------------------------

    def on_event(self, event: Event) -> str | None:
        """Apply a pushed event. Returns "granted" or "revoked" when the
        event changed what the tenant holds, else None."""
        if isinstance(event, Grant):
            # A grant older than what we hold was overtaken by a later reply;
            # one already revoked was read after its revocation.
            if self.phase is Phase.WAITING and event.slice > max(self.slice, self.revoked_slice):
                self._hold(event.slice, event.devices)
                return "granted"
        elif isinstance(event, Preempt):
            # Remembered even when the grant it names is not read yet.
            self.asked = max(self.asked, event.slice)
        elif isinstance(event, Revoked):
            self.revoked_slice = max(self.revoked_slice, event.slice)
            if self.holding and event.slice == self.slice:
                self.phase = Phase.WAITING
                self.revocations += 1
                return "revoked"
        return None

    def restarted(self, reply: TurnState | None) -> None:
        """A new daemon numbers slices afresh. `reply`: its answer to the turn
        asked again (None: not asked, no turn was active)."""
        self.slice = self.asked = self.revoked_slice = 0
        if reply is None or not self.active:
            return
        if not self.on_reply(reply):
            self.phase = Phase.WAITING
            self.requeued = True

    def _hold(self, slice_id: int, devices: list[int]) -> None:
        self.granted_at = self._clock()
        self.slice = slice_id
        self.devices = list(devices)
        self.requeued = False
        self.phase = Phase.HOLDING
