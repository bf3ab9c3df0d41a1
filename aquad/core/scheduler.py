"""GPU time slices: who may compute on which device, and for how long.

A deterministic object with an injected clock; the daemon and the simulator
drive the same code. Policy:

- Fair share by virtual runtime (CFS-like): a holder's vruntime grows by
  held time / weight. Waiting tenants within one quantum of the least
  vruntime are served first-come first-served (strict rotation among
  equals, so a waiter is granted within (n-1) quanta + grace); one that ran
  further ahead waits until the others catch up, which turns weights into
  time shares. A tenant that was idle re-enters at the floor of its devices
  (the least vruntime among active tenants there), so idling banks no credit.
- Gang grants: a tenant spanning several devices gets all of them or none.
  When the head of the queue cannot start, the devices it needs are reserved
  (no tenant behind it may take them), so it cannot be starved by a stream
  of smaller tenants; grants are all-or-nothing, so nothing holds a device
  while waiting for another and there is no deadlock.
- Preemption: once a holder's quantum is over and someone waits for one of
  its devices, it is asked to yield; nobody else is granted until it does or
  its grace period runs out. A lone tenant is never asked (no needless paging).
- Revocation: a holder that does not yield within grace loses the slice
  anyway. It gets a strike; each strike halves its next quanta (down to a
  floor) and each timely yield removes one. A revoked tenant is not queued
  again until it asks.

Cost: every call is O(D·G·log n) for n waiting tenants, D devices and G
distinct device sets among the waiters (one for single-device tenants), with
exceptions that only revocations bring: a revocation sums the wait it caused
(O(n)); a revoked tenant returning to the comparison (or a tenant joining
where only such tenants wait) may lower a device's least vruntime, and the
groups there then recompute eligibility (O(n)); revoked tenants still
waiting are checked on every call (O(revoked)).
view() orders the queue once (O(n log n)). The decisions are exactly those of
bench/scheduler_ref.py (the former scan-everyone implementation, kept as the
test oracle and benchmark baseline): the same comparisons on the same
floating-point values.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

WAIT_SAMPLES = 1024  # per tenant, for wait-time percentiles
_EPS = 1e-9  # vruntime slack so float rounding cannot flip an eligibility test


@dataclass(frozen=True)
class Grant:
    tenant: str
    devices: tuple[int, ...]
    slice: int
    quantum: float  # seconds the tenant may hold before it can be preempted


@dataclass(frozen=True)
class Preempt:
    tenant: str
    slice: int
    grace: float  # seconds to yield before revocation


@dataclass(frozen=True)
class Revoke:
    tenant: str
    slice: int
    reason: str


Action = Grant | Preempt | Revoke


@dataclass
class Runner:
    id: str
    home: tuple[int, ...]  # every device the tenant may ask for
    weight: float
    devices: tuple[int, ...] = ()  # what the current or next turn covers
    vruntime: float = 0.0
    state: str = "idle"  # idle | waiting | holding
    seq: int = 0  # arrival order among waiters
    waiting_since: float = 0.0
    slice: int = 0
    granted_at: float = 0.0
    quantum_end: float = 0.0
    preempt_deadline: float | None = None
    strikes: int = 0
    revocations: int = 0
    # Set when a slice is revoked, cleared at the next grant (the sit-out).
    sit_out_until: float | None = None
    held: float = 0.0  # total seconds holding
    grants: int = 0
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))
    order: int = 0  # registration order: breaks ties in vruntime
    ticket: int = 0  # changes on entering or leaving a queue: marks stale heap entries
    pooled: bool = False  # waiting and compared for eligibility (not sitting out)
    eligible: bool = False  # within one quantum of its devices' least vruntime


# --- the structures behind O(log n) ------------------------------------------
#
# Waiters that take part in the fair comparison ("pooled": every waiter but a
# revoked one still sitting out) are grouped by their exact device tuple. All
# members of a group compare against the same devices, so within a group:
# - eligibility (vruntime within one quantum of the least on one of its
#   devices) holds for a prefix by vruntime, and
# - the grant order (eligible by arrival, then the rest by vruntime) is a
#   per-group order whose head is the group's first tenant in the global one.
# A grant pass therefore looks only at group heads, at most once per device.
# Heaps use lazy deletion: an entry is live while its ticket matches the
# runner's, which changes whenever the runner enters or leaves a pool.


def _live(entry: tuple[Any, ...]) -> bool:
    return bool(entry[-2] == entry[-1].ticket)


Entry = tuple[Any, ...]  # (sort key..., ticket, runner)


def _top(heap: list[Any], live: Callable[[Entry], bool] = _live) -> Entry | None:
    while heap and not live(heap[0]):
        heapq.heappop(heap)
    return heap[0] if heap else None


def _push(heap: list[Any], entry: Entry, members: int,
          live: Callable[[Entry], bool] = _live) -> None:
    heapq.heappush(heap, entry)
    # Dead entries deep in a heap surface only when all above them go; drop
    # them in one pass once they outnumber the live ones (amortized O(1)).
    if len(heap) > 2 * members + 16:
        heap[:] = [e for e in heap if live(e)]
        heapq.heapify(heap)


def _is_eligible(entry: tuple[Any, ...]) -> bool:
    return _live(entry) and entry[-1].eligible


def _is_ahead(entry: tuple[Any, ...]) -> bool:
    return _live(entry) and not entry[-1].eligible


@dataclass
class _Group:
    """Pooled waiters that want exactly `devices`."""
    devices: tuple[int, ...]
    members: int = 0
    by_vruntime: list[Any] = field(default_factory=list)  # (vruntime, order, ticket, runner)
    eligible: list[Any] = field(default_factory=list)  # (seq, ticket, runner)
    # (vruntime, order, ticket, runner): not eligible yet
    ahead: list[Any] = field(default_factory=list)
    threshold: float = -math.inf  # eligibility bound at the last promotion

    def least(self) -> Runner:
        # A group is dropped when its last member leaves: never empty here.
        entry = _top(self.by_vruntime)
        assert entry is not None, "an empty group"
        runner: Runner = entry[-1]
        return runner

    def head(self) -> tuple[tuple[Any, ...], Runner] | None:
        """The member first in grant order, with its sort key."""
        entry = _top(self.eligible, _is_eligible)
        if entry is not None:
            return (0, entry[0], 0), entry[-1]
        entry = _top(self.ahead, _is_ahead)
        if entry is not None:
            return (1, entry[0], entry[1]), entry[-1]
        return None

    def add(self, runner: Runner) -> None:
        self.members += 1
        runner.eligible = False
        item = (runner.vruntime, runner.order, runner.ticket, runner)
        _push(self.by_vruntime, item, self.members)
        _push(self.ahead, item, self.members, _is_ahead)

    def promote(self, bound: float) -> None:
        """Mark eligible every member with vruntime <= bound. Bounds only
        rise while no revoked tenant returns to the comparison; when one
        falls, eligibility is recomputed from scratch (O(members))."""
        if bound < self.threshold:
            self._reset()
        self.threshold = bound
        while (entry := _top(self.ahead, _is_ahead)) is not None and entry[0] <= bound:
            heapq.heappop(self.ahead)
            runner = entry[-1]
            runner.eligible = True
            _push(self.eligible, (runner.seq, runner.ticket, runner), self.members, _is_eligible)

    def _reset(self) -> None:
        members = self.live()
        self.by_vruntime, self.eligible, self.ahead = [], [], []
        self.members = 0
        for runner in members:
            self.add(runner)

    def live(self) -> list[Runner]:
        return [e[-1] for e in self.by_vruntime if _live(e)]


class Scheduler:
    def __init__(self, devices: Iterable[int], *, clock: Callable[[], float],
                 quantum: float, grace: float,
                 min_quantum: float | None = None) -> None:
        # No defaults here: the daemon's are Limits' (aquad/core/arbiter.py).
        if quantum <= 0 or grace < 0:
            raise ValueError("quantum must be > 0 and grace >= 0")
        self.devices = tuple(devices)
        self.quantum = quantum
        self.grace = grace
        self.min_quantum = quantum / 8 if min_quantum is None else min_quantum
        # Strikes beyond this no longer shorten the quantum; capping them keeps
        # "each timely yield restores one step" true (and 2**strikes finite).
        self.max_strikes = max(0, math.ceil(math.log2(quantum / self.min_quantum)))
        self._clock = clock
        self.runners: dict[str, Runner] = {}
        self.holder: dict[int, str | None] = {d: None for d in self.devices}
        self.floor: dict[int, float] = {d: 0.0 for d in self.devices}
        self._seq = itertools.count(1)
        self._slices = itertools.count(1)
        self._orders = itertools.count(1)  # registration order: ties in vruntime
        # Per device, per present tenant: seconds held there (for the time-share
        # view); what departed tenants held is one sum per device, so memory
        # and view() cost follow the tenants present, not all that ever came.
        self.device_time: dict[int, dict[str, float]] = {d: {} for d in self.devices}
        self.departed_time: dict[int, float] = {d: 0.0 for d in self.devices}
        self._groups: dict[tuple[int, ...], _Group] = {}
        self._groups_on: dict[int, set[tuple[int, ...]]] = {d: set() for d in self.devices}
        # Per device, waiters that are not sitting out: by arrival (whom a
        # revoked tenant waits behind) and by vruntime (the floor).
        self._first: dict[int, list[Any]] = {d: [] for d in self.devices}
        self._lowest: dict[int, list[Any]] = {d: [] for d in self.devices}
        self._normal: dict[int, int] = {d: 0 for d in self.devices}  # live entries there
        self._revoked: dict[str, Runner] = {}  # waiting, and sitting out

    # --- tenant lifecycle -----------------------------------------------------

    def add(self, tenant: str, devices: Iterable[int], weight: float = 1.0) -> None:
        devices = tuple(sorted(set(devices)))
        unknown = [d for d in devices if d not in self.holder]
        if unknown or not devices:
            raise ValueError(f"unknown devices {unknown}")
        if weight <= 0:
            raise ValueError("weight must be positive")
        old = self.runners.get(tenant)
        if old is not None and old.state == "waiting":
            self._dequeue(old)
        # A re-registered id keeps its place in the registration order, as
        # the dict keeps its key's place.
        order = old.order if old is not None else next(self._orders)
        self.runners[tenant] = Runner(tenant, devices, weight, devices, order=order)

    def remove(self, tenant: str) -> list[Action]:
        """The tenant is gone (left or died): whatever it held is free at once."""
        runner = self.runners.pop(tenant, None)
        if runner is None:
            return []
        if runner.state == "holding":
            self._release(runner)
        elif runner.state == "waiting":
            self._dequeue(runner)
        for d in self.devices:
            self.departed_time[d] += self.device_time[d].pop(tenant, 0.0)
        return self._schedule()

    # --- requests from tenants ------------------------------------------------

    def want(self, tenant: str, devices: Iterable[int] | None = None) -> list[Action]:
        """The tenant wants `devices` (default: all it registered). Idempotent
        while waiting or holding; the device set only changes from idle."""
        runner = self.runners[tenant]
        if runner.state == "idle":
            runner.devices = runner.home if devices is None else tuple(sorted(set(devices)))
            self._enqueue(runner)
        return self._schedule()

    def done(self, tenant: str) -> list[Action]:
        """The tenant gives its slice back and wants nothing more for now."""
        runner = self.runners[tenant]
        if runner.state == "holding":
            self._timely(runner)
            self._release(runner)
        elif runner.state == "waiting":
            self._dequeue(runner)
        runner.state = "idle"
        return self._schedule()

    def yield_(self, tenant: str, slice_id: int) -> list[Action]:
        """Acknowledge a preemption (pages are out) and queue for the next
        turn. A stale slice id (revoked meanwhile) just queues the tenant."""
        runner = self.runners[tenant]
        if runner.state == "holding" and runner.slice == slice_id:
            self._timely(runner)
            self._release(runner)
            self._enqueue(runner, rejoin=False)
        elif runner.state == "idle":
            self._enqueue(runner)
        return self._schedule()

    # --- time -----------------------------------------------------------------

    def tick(self) -> list[Action]:
        """Apply what the clock says: preempt expired quanta, revoke overdue."""
        return self._schedule()

    def next_deadline(self) -> float | None:
        """When tick() next has something to do (None: nothing until a request)."""
        now = self._clock()
        blocked = self._sync_revoked(now)
        # A sit-out that ends while its devices stand free needs a tick of its own.
        times = [t for t in blocked.values() if t < math.inf]
        # Per pooled group, when its least-vruntime member (the first of the
        # group to become eligible) does; revoked tenants at their sit-out's end.
        eligible = [(g.devices, self._eligible_at(g.least(), now)) for g in self._groups.values()]
        eligible += [(self._revoked[rid].devices, self._eligible_at(self._revoked[rid], at))
                     for rid, at in blocked.items() if at < math.inf]
        for runner in self._holders():
            if runner.preempt_deadline is not None:
                times.append(runner.preempt_deadline)
                continue
            # Preempt at the quantum's end, or once a waiter becomes eligible.
            when = min((at for devices, at in eligible
                        if not set(devices).isdisjoint(runner.devices)), default=math.inf)
            if when < math.inf:
                times.append(max(runner.quantum_end, when))
        return min(times, default=None)

    # --- internals: queue membership ----------------------------------------------

    def _enqueue(self, runner: Runner, *, rejoin: bool = True) -> None:
        now = self._clock()
        if rejoin:
            # Back from idle: no banked credit. A holder yielding to a
            # preemption was never idle and keeps its vruntime.
            self._rejoin(runner, now)
        runner.state = "waiting"
        runner.seq = next(self._seq)
        runner.waiting_since = self._clock()
        runner.ticket += 1
        if runner.sit_out_until is not None:
            self._revoked[runner.id] = runner  # pooled once its sit-out allows
            return
        self._pool(runner)
        for d in runner.devices:
            self._normal[d] += 1
            _push(self._first[d], (runner.waiting_since, runner.seq, runner.ticket, runner),
                  self._normal[d])
            _push(self._lowest[d], (runner.vruntime, runner.order, runner.ticket, runner),
                  self._normal[d])

    def _dequeue(self, runner: Runner) -> None:
        """A waiter leaves the queue (granted, cancelled or gone)."""
        if runner.pooled:
            self._unpool(runner)
        runner.ticket += 1
        if self._revoked.pop(runner.id, None) is None:
            for d in runner.devices:
                self._normal[d] -= 1
                # Drop dead entries from the tops now, so that departed
                # tenants are not kept alive by the heaps.
                _top(self._first[d])
                _top(self._lowest[d])

    def _pool(self, runner: Runner) -> None:
        group = self._groups.get(runner.devices)
        if group is None:
            group = self._groups[runner.devices] = _Group(runner.devices)
            for d in runner.devices:
                self._groups_on[d].add(runner.devices)
        runner.pooled = True
        group.add(runner)

    def _unpool(self, runner: Runner) -> None:
        runner.pooled = False
        runner.ticket += 1
        group = self._groups[runner.devices]
        group.members -= 1
        if group.members == 0:
            del self._groups[runner.devices]
            for d in runner.devices:
                self._groups_on[d].discard(runner.devices)

    def _sync_revoked(self, now: float) -> dict[str, float]:
        """Revoked tenants that may not be granted now, each with the earliest
        time it may be (inf: not before the tenants it waits behind are
        granted, which only a scheduler call can do). A revoked tenant is not
        granted before its sit-out ends, nor while a tenant that began
        waiting by then still waits for one of its devices. Tenants sitting
        out themselves do not hold others back: two would wait on each other
        for ever. The others are pooled: they take part in the comparison.
        Costs O(revoked waiters), which each revocation bounds."""
        blocked: dict[str, float] = {}
        for runner in list(self._revoked.values()):
            until = runner.sit_out_until
            assert until is not None  # set when it was revoked
            if any(self._first_since(d) <= until for d in runner.devices):
                blocked[runner.id] = math.inf
            elif now < until:
                blocked[runner.id] = until
            if (runner.id in blocked) == runner.pooled:
                if runner.pooled:
                    self._unpool(runner)
                else:
                    runner.ticket += 1
                    self._pool(runner)
        return blocked

    def _first_since(self, device: int) -> float:
        entry = _top(self._first[device])
        return math.inf if entry is None else float(entry[0])

    # --- internals: vruntimes -----------------------------------------------------

    def _quantum_for(self, runner: Runner) -> float:
        return max(self.min_quantum, math.ldexp(self.quantum, -runner.strikes))

    def _rejoin(self, runner: Runner, now: float) -> None:
        """Re-enter no earlier than the devices' floor, which includes the
        holders' progress so far (as CFS's min_vruntime does)."""
        floor = max(self._advance_floor(d, now) for d in runner.devices)
        runner.vruntime = max(runner.vruntime, floor)

    def _timely(self, runner: Runner) -> None:
        if runner.preempt_deadline is not None and self._clock() <= runner.preempt_deadline:
            runner.strikes = max(0, runner.strikes - 1)

    def _release(self, runner: Runner) -> None:
        held = max(0.0, self._clock() - runner.granted_at)
        runner.vruntime += held / runner.weight
        runner.held += held
        for d in runner.devices:
            self.holder[d] = None
            per = self.device_time[d]
            per[runner.id] = per.get(runner.id, 0.0) + held
        runner.state = "idle"
        runner.preempt_deadline = None

    def _running_vruntime(self, runner: Runner, now: float) -> float:
        if runner.state == "holding":
            return runner.vruntime + (now - runner.granted_at) / runner.weight
        return runner.vruntime

    def _holders(self) -> list[Runner]:
        """Holders in registration order (the order actions are reported in)."""
        ids = {h for h in self.holder.values() if h is not None}
        return sorted((self.runners[h] for h in ids), key=lambda r: r.order)

    def _holder_vruntime(self, device: int, now: float) -> float | None:
        holder = self.holder[device]
        return None if holder is None else self._running_vruntime(self.runners[holder], now)

    def _least_waiting(self, device: int) -> float:
        """Least vruntime among pooled waiters for `device`."""
        return min((self._groups[g].least().vruntime for g in self._groups_on[device]),
                   default=math.inf)

    def _least(self, device: int, now: float) -> float:
        """Least vruntime among the holder and the pooled waiters of `device`."""
        held = self._holder_vruntime(device, now)
        waiting = self._least_waiting(device)
        return waiting if held is None else min(held, waiting)

    def _caused_wait(self, runner: Runner, now: float) -> float:
        """Seconds that the tenants now waiting for `runner`'s devices have
        waited during its current slice, summed: the length of its sit-out.
        O(n), once per revocation; summed in registration order, as before."""
        return sum(now - max(runner.granted_at, r.waiting_since)
                   for r in self.runners.values()
                   if r.state == "waiting" and not set(r.devices).isdisjoint(runner.devices))

    def _eligible_at(self, waiter: Runner, start: float) -> float:
        """When `waiter` (pooled, or revoked with its sit-out ending at
        `start`) is within one quantum of the least vruntime on one of its
        devices (inf if only other waiters, whose vruntimes do not move, can
        change that). Pooled waiters whose vruntime is at least the waiter's
        cannot hold it back, so the least pooled one per device suffices."""
        target = waiter.vruntime - self.quantum - _EPS
        best = math.inf
        for d in waiter.devices:
            if self._least_waiting(d) < target:
                continue  # inf on this device
            at = start
            holder = self.holder[d]
            if holder is not None:
                held = self._running_vruntime(self.runners[holder], start)
                if held < target:
                    at = max(at, start + (target - held) * self.runners[holder].weight + _EPS)
            best = min(best, at)
        return best

    # --- internals: one scheduling pass -------------------------------------------

    def _schedule(self) -> list[Action]:
        now = self._clock()
        actions = self._revoke_overdue(now)
        self._sync_revoked(now)
        self._promote(now)
        self._grant(now, actions)
        self._sync_revoked(now)
        self._preempt(now, actions)
        # Advance each device's floor for tenants that re-enter later.
        for d in self.devices:
            self._advance_floor(d, now)
        return actions

    def _revoke_overdue(self, now: float) -> list[Action]:
        """Revoke holders whose grace ran out."""
        actions: list[Action] = []
        for runner in self._holders():
            if runner.preempt_deadline is not None and now >= runner.preempt_deadline:
                slice_id = runner.slice
                runner.sit_out_until = now + self._caused_wait(runner, now)
                self._release(runner)
                runner.strikes = min(runner.strikes + 1, self.max_strikes)
                runner.revocations += 1
                actions.append(Revoke(runner.id, slice_id,
                                      f"did not yield within {self.grace:g} s"))
        return actions

    def _promote(self, now: float) -> None:
        """Refresh each group's eligible prefix against the devices' least
        vruntimes now. Eligibility is per device: vruntimes on different
        devices grow on different scales, and a gang tenant is compared on
        each of its own."""
        least = {d: self._least(d, now) for d in self.devices if self._groups_on[d]}
        for group in self._groups.values():
            group.promote(max(least[d] for d in group.devices) + self.quantum + _EPS)

    def _grant(self, now: float, actions: list[Action]) -> None:
        """Grant in fair order, reserving devices for whoever cannot start
        yet. Only the first waiter (in grant order) that touches a device
        still free and unreserved can change anything, and it takes or
        reserves at least one: at most one step per device."""
        free = {d for d in self.devices if self.holder[d] is None}
        while free:
            heads = [h for g in {g for d in free for g in self._groups_on[d]}
                     if (h := self._groups[g].head()) is not None]
            if not heads:
                return
            _, runner = min(heads, key=lambda h: h[0])
            if not free.issuperset(runner.devices):
                free.difference_update(runner.devices)  # reserved
                continue
            free.difference_update(runner.devices)
            self._start(runner, now, actions)

    def _start(self, runner: Runner, now: float, actions: list[Action]) -> None:
        self._dequeue(runner)
        if runner.sit_out_until is not None:
            # Sitting out banks no credit, as idling does not: the others
            # held the device meanwhile, and vruntime would pay that back.
            self._rejoin(runner, now)
            runner.sit_out_until = None
        quantum = self._quantum_for(runner)
        runner.state = "holding"
        runner.slice = next(self._slices)
        runner.granted_at = now
        runner.grants += 1
        runner.waits.append(now - runner.waiting_since)
        runner.quantum_end = now + quantum
        for d in runner.devices:
            self.holder[d] = runner.id
        actions.append(Grant(runner.id, runner.devices, runner.slice, quantum))

    def _preempt(self, now: float, actions: list[Action]) -> None:
        """Ask holders past their quantum to yield if someone eligible waits
        for them (a waiter that ran ahead would not be granted anyway:
        preempting for it would only page the holder out and back in)."""
        due = [r for r in self._holders()
               if r.preempt_deadline is None and now >= r.quantum_end]
        if not due:
            return
        wanted: set[int] = set()
        for group in self._groups.values():
            if self._eligible_at(group.least(), now) <= now:
                wanted.update(group.devices)
        for runner in due:
            if wanted.intersection(runner.devices):
                runner.preempt_deadline = now + self.grace
                actions.append(Preempt(runner.id, runner.slice, self.grace))

    def _advance_floor(self, device: int, now: float) -> float:
        """Least vruntime among tenants active on `device`; never decreases.
        A revoked tenant counts only once it is granted again: else its
        overrun would raise the floor that the others come back at."""
        entry = _top(self._lowest[device])
        active = [v for v in (self._holder_vruntime(device, now),
                              None if entry is None else entry[0]) if v is not None]
        if active:
            self.floor[device] = max(self.floor[device], min(active))
        return self.floor[device]

    def _queue(self, now: float) -> list[Runner]:
        """Waiting tenants in grant order. Those within one quantum of the
        least vruntime are eligible and go first-come first-served, so
        equal-weight tenants rotate strictly (noise in measured times cannot
        reorder them); tenants further ahead wait, by vruntime, until the
        others catch up: that is what turns weights into shares. Revoked
        tenants still sitting out come last. O(n log n): for view() only."""
        blocked = self._sync_revoked(now)
        self._promote(now)
        pooled = [r for g in self._groups.values() for r in g.live()]
        first = sorted((r for r in pooled if r.eligible), key=lambda r: r.seq)
        ahead = sorted((r for r in pooled if not r.eligible), key=lambda r: (r.vruntime, r.order))
        last = sorted((self._revoked[rid] for rid in blocked), key=lambda r: r.seq)
        return first + ahead + last

    # --- visibility -----------------------------------------------------------

    def view(self) -> list[dict[str, Any]]:
        """Per device: holder, queue, quantum, time shares, waits, revocations.
        The queue is ordered once and wait percentiles sorted once per tenant,
        not once per device."""
        now = self._clock()
        queue = self._queue(now)
        stats = {r.id: self._tenant_stats(r) for r in self.runners.values()}
        out = []
        for d in self.devices:
            times = dict(self.device_time[d])
            holder = self.holder[d]
            if holder is not None:
                r = self.runners[holder]
                times[holder] = times.get(holder, 0.0) + (now - r.granted_at)
            total = sum(times.values()) + self.departed_time[d]
            tenants = []
            for r in self.runners.values():
                if d not in r.home:
                    continue
                held = times.get(r.id, 0.0)
                tenants.append({
                    "tenant": r.id, "state": r.state, "weight": r.weight,
                    "share": round(held / total, 4) if total else 0.0,
                    "held_s": round(held, 4), **stats[r.id],
                })
            out.append({
                "device": d, "holder": holder,
                "queue": [r.id for r in queue if d in r.devices],
                "quantum_ms": round(self.quantum * 1e3, 3),
                "grace_ms": round(self.grace * 1e3, 3),
                "tenants": tenants,
            })
        return out

    def _tenant_stats(self, r: Runner) -> dict[str, Any]:
        waits = sorted(r.waits)
        return {
            "grants": r.grants,
            "wait_p50_ms": round(_pct(waits, 0.50) * 1e3, 3),
            "wait_p99_ms": round(_pct(waits, 0.99) * 1e3, 3),
            "revocations": r.revocations, "strikes": r.strikes,
            "quantum_ms": round(self._quantum_for(r) * 1e3, 3),
        }


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
