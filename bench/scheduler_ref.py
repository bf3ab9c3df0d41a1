"""The scheduler as it was before its per-event cost became O(log n): every
call scans every tenant. Kept as the oracle for tests/test_scheduler_equiv.py
and the baseline of bench/scale.py, outside the daemon's packages (the daemon
uses aquad.core.scheduler.Scheduler); the policy it implements is stated in
that module's docstring.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

from aquad.core.scheduler import _EPS, Action, Grant, Preempt, Revoke, Runner, _pct


class ReferenceScheduler:
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
        # Per device, per present tenant: seconds held there (for the time-share
        # view); what departed tenants held is one sum per device, so memory
        # and view() cost follow the tenants present, not all that ever came.
        self.device_time: dict[int, dict[str, float]] = {d: {} for d in self.devices}
        self.departed_time: dict[int, float] = {d: 0.0 for d in self.devices}

    # --- tenant lifecycle -----------------------------------------------------

    def add(self, tenant: str, devices: Iterable[int], weight: float = 1.0) -> None:
        devices = tuple(sorted(set(devices)))
        unknown = [d for d in devices if d not in self.holder]
        if unknown or not devices:
            raise ValueError(f"unknown devices {unknown}")
        if weight <= 0:
            raise ValueError("weight must be positive")
        self.runners[tenant] = Runner(tenant, devices, weight, devices)

    def remove(self, tenant: str) -> list[Action]:
        """The tenant is gone (left or died): whatever it held is free at once."""
        runner = self.runners.pop(tenant, None)
        if runner is None:
            return []
        if runner.state == "holding":
            self._release(runner)
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
        blocked = self._blocked(now)
        eligible = {r.id: self._eligible_at(r, now, blocked)
                    for r in self.runners.values() if r.state == "waiting"}
        # A sit-out that ends while its devices stand free needs a tick of its own.
        times = [t for t in blocked.values() if t < math.inf]
        for runner in self.runners.values():
            if runner.state != "holding":
                continue
            if runner.preempt_deadline is not None:
                times.append(runner.preempt_deadline)
                continue
            # Preempt at the quantum's end, or once a waiter becomes eligible.
            when = min((at for rid, at in eligible.items()
                        if not set(self.runners[rid].devices).isdisjoint(runner.devices)),
                       default=math.inf)
            if when < math.inf:
                times.append(max(runner.quantum_end, when))
        return min(times, default=None)

    # --- internals ------------------------------------------------------------

    def _quantum_for(self, runner: Runner) -> float:
        return max(self.min_quantum, math.ldexp(self.quantum, -runner.strikes))

    def _enqueue(self, runner: Runner, *, rejoin: bool = True) -> None:
        now = self._clock()
        if rejoin:
            # Back from idle: no banked credit. A holder yielding to a
            # preemption was never idle and keeps its vruntime.
            self._rejoin(runner, now)
        runner.state = "waiting"
        runner.seq = next(self._seq)
        runner.waiting_since = self._clock()

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

    def _waiting_devices(self, now: float) -> set[int]:
        """Devices that an eligible waiter wants."""
        blocked = self._blocked(now)
        out: set[int] = set()
        for runner in self.runners.values():
            if runner.state == "waiting" and self._eligible_at(runner, now, blocked) <= now:
                out.update(runner.devices)
        return out

    def _blocked(self, now: float) -> dict[str, float]:
        """Revoked tenants that may not be granted now, each with the earliest
        time it may be (inf: not before the tenants it waits behind are
        granted, which only a scheduler call can do). A revoked tenant is not
        granted before its sit-out ends, nor while a tenant that began
        waiting by then still waits for one of its devices. Tenants sitting
        out themselves do not hold others back: two would wait on each other
        for ever."""
        first: dict[int, float] = {}  # per device, since when its longest such waiter waits
        revoked = []
        for r in self.runners.values():
            if r.state != "waiting":
                continue
            if r.sit_out_until is not None:
                revoked.append(r)
                continue
            for d in r.devices:
                first[d] = min(first.get(d, r.waiting_since), r.waiting_since)
        blocked: dict[str, float] = {}
        for r in revoked:
            until = r.sit_out_until
            assert until is not None  # set when it was revoked
            if any(first.get(d, math.inf) <= until for d in r.devices):
                blocked[r.id] = math.inf
            elif now < until:
                blocked[r.id] = until
        return blocked

    def _caused_wait(self, runner: Runner, now: float) -> float:
        """Seconds that the tenants now waiting for `runner`'s devices have
        waited during its current slice, summed: the length of its sit-out."""
        return sum(now - max(runner.granted_at, r.waiting_since)
                   for r in self.runners.values()
                   if r.state == "waiting" and not set(r.devices).isdisjoint(runner.devices))

    def _eligible_at(self, waiter: Runner, now: float, blocked: dict[str, float]) -> float:
        """When `waiter` is within one quantum of the least vruntime on one of
        its devices and not blocked (now, if it already is; inf if only other
        waiters, whose vruntimes do not move, can change that). Blocked
        tenants are left out of the comparison, as idle ones are."""
        start = blocked.get(waiter.id, now)
        if start == math.inf:
            return start
        target = waiter.vruntime - self.quantum - _EPS
        best = math.inf
        for d in waiter.devices:
            at = start
            for r in self.runners.values():
                if (r is waiter or r.state == "idle" or d not in r.devices
                        or r.id in blocked):
                    continue
                v = self._running_vruntime(r, start)
                if v >= target:
                    continue
                if r.state != "holding":
                    at = math.inf
                    break
                at = max(at, start + (target - v) * r.weight + _EPS)
            best = min(best, at)
        return best

    def _schedule(self) -> list[Action]:
        now = self._clock()
        actions: list[Action] = []
        # 1. Revoke holders whose grace ran out.
        for runner in self.runners.values():
            if (runner.state == "holding" and runner.preempt_deadline is not None
                    and now >= runner.preempt_deadline):
                slice_id = runner.slice
                runner.sit_out_until = now + self._caused_wait(runner, now)
                self._release(runner)
                runner.strikes = min(runner.strikes + 1, self.max_strikes)
                runner.revocations += 1
                actions.append(Revoke(runner.id, slice_id,
                                      f"did not yield within {self.grace:g} s"))
        # 2. Grant in fair order, reserving devices for whoever cannot start yet.
        waiting = self._queue(now)
        blocked = self._blocked(now)
        reserved: set[int] = set()
        for runner in waiting:
            if runner.id in blocked:
                continue  # reserves nothing: it comes after every other waiter
            if any(d in reserved or self.holder[d] is not None for d in runner.devices):
                reserved.update(runner.devices)
                continue
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
        # 3. Ask holders past their quantum to yield if someone eligible waits
        #    for them (a waiter that ran ahead would not be granted anyway:
        #    preempting for it would only page the holder out and back in).
        waiting_devices = self._waiting_devices(now)
        for runner in self.runners.values():
            if (runner.state == "holding" and runner.preempt_deadline is None
                    and now >= runner.quantum_end
                    and waiting_devices.intersection(runner.devices)):
                runner.preempt_deadline = now + self.grace
                actions.append(Preempt(runner.id, runner.slice, self.grace))
        # 4. Advance each device's floor for tenants that re-enter later.
        for d in self.devices:
            self._advance_floor(d, now)
        return actions

    def _queue(self, now: float) -> list[Runner]:
        """Waiting tenants in grant order. Those within one quantum of the
        least vruntime are eligible and go first-come first-served, so
        equal-weight tenants rotate strictly (noise in measured times cannot
        reorder them); tenants further ahead wait, by vruntime, until the
        others catch up: that is what turns weights into shares."""
        waiting = [r for r in self.runners.values() if r.state == "waiting"]
        if not waiting:
            return []
        # Eligibility is per device: vruntimes on different devices grow on
        # different scales, and a gang tenant is compared on each of its own.
        blocked = self._blocked(now)
        least: dict[int, float] = {}
        for r in self.runners.values():
            if r.state != "idle" and r.id not in blocked:
                v = self._running_vruntime(r, now)
                for d in r.devices:
                    least[d] = min(least.get(d, v), v)

        def key(r: Runner) -> tuple[Any, ...]:
            if r.id in blocked:
                return (2, r.seq, 0.0)  # last, whatever its vruntime
            eligible = r.vruntime <= max(least[d] for d in r.devices) + self.quantum + _EPS
            return (0, r.seq, 0.0) if eligible else (1, 0, r.vruntime)

        return sorted(waiting, key=key)

    def _advance_floor(self, device: int, now: float) -> float:
        """Least vruntime among tenants active on `device`; never decreases.
        A revoked tenant counts only once it is granted again: else its
        overrun would raise the floor that the others come back at."""
        active = [self._running_vruntime(r, now) for r in self.runners.values()
                  if r.state != "idle" and r.sit_out_until is None and device in r.devices]
        if active:
            self.floor[device] = max(self.floor[device], min(active))
        return self.floor[device]

    # --- visibility -----------------------------------------------------------

    def view(self) -> list[dict[str, Any]]:
        """Per device: holder, queue, quantum, time shares, waits, revocations."""
        now = self._clock()
        out = []
        queue = self._queue(now)
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
                waits = sorted(r.waits)
                tenants.append({
                    "tenant": r.id, "state": r.state, "weight": r.weight,
                    "share": round(times.get(r.id, 0.0) / total, 4) if total else 0.0,
                    "held_s": round(times.get(r.id, 0.0), 4), "grants": r.grants,
                    "wait_p50_ms": round(_pct(waits, 0.50) * 1e3, 3),
                    "wait_p99_ms": round(_pct(waits, 0.99) * 1e3, 3),
                    "revocations": r.revocations, "strikes": r.strikes,
                    "quantum_ms": round(self._quantum_for(r) * 1e3, 3),
                })
            out.append({
                "device": d, "holder": holder,
                "queue": [r.id for r in queue if d in r.devices],
                "quantum_ms": round(self.quantum * 1e3, 3),
                "grace_ms": round(self.grace * 1e3, 3),
                "tenants": tenants,
            })
        return out
