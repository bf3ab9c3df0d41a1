"""Unit tests for aquad/core/scheduler.py: the GPU time-slice scheduler.

Everything runs on a fake clock. `Sim` is a small discrete-event driver: it
plays tenants (cooperative ones yield a configurable delay after Preempt,
misbehaving ones never do), jumps time to min(next_deadline(), next tenant
event), mirrors the scheduler in an independent model and checks the safety
invariants after every call.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aquad.core.scheduler import WAIT_SAMPLES, Grant, Preempt, Revoke, Scheduler, _pct

EPS = 1e-9


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- discrete-event driver -------------------------------------------------------

Duration = float | Callable[[], float] | None


def _draw(d: Duration) -> float | None:
    return d() if callable(d) else d


@dataclass
class Spec:
    name: str
    devices: tuple[int, ...]
    weight: float = 1.0
    start: float | None = 0.0  # first want(); None: the test drives it
    yield_delay: Duration = 0.01  # after Preempt (or a callable); None: never yields
    hold: Duration = None  # work per grant before done(); None: until preempted
    idle: Duration = None  # after done() until the next want(); None: never again
    rewant: float | None = None  # after Revoke, want() again after this; None: never
    want_devices: tuple[int, ...] | None = None  # subset passed to want()


class Sim:
    def __init__(self, devices, specs, *, quantum=0.05, grace=0.5, min_quantum=None):
        self.clock = FakeClock()
        self.sched = Scheduler(devices, clock=self.clock, quantum=quantum, grace=grace,
                               min_quantum=min_quantum)
        self.quantum, self.grace = quantum, grace
        self.specs = {s.name: s for s in specs}
        for s in specs:
            self.sched.add(s.name, s.devices, s.weight)
        self._events: list = []
        self._seq = itertools.count()
        # The model, kept from the actions alone.
        self.state = {s.name: "idle" for s in specs}
        self.owner: dict[int, str | None] = {d: None for d in self.sched.devices}
        self.cur: dict[str, Grant] = {}
        self.granted_at: dict[str, float] = {}
        self.wait_start: dict[str, float] = {}
        self.asks: dict[str, tuple[int, ...]] = {s.name: s.devices for s in specs}
        # Revoked tenants not granted since: when their sit-out ends, and when
        # they were revoked.
        self.sit_out: dict[str, float] = {}
        self.revoked_at: dict[str, float] = {}
        # Records.
        self.waits: dict[str, list[float]] = defaultdict(list)
        self.held: dict[str, float] = defaultdict(float)
        self.dev_held: dict[int, dict[str, float]] = {d: defaultdict(float)
                                                       for d in self.sched.devices}
        self.turns: list[tuple[str, float, float]] = []  # (tenant, start, end)
        self.log: list[tuple[float, object]] = []  # (time, action)
        self.calls = 0
        for s in specs:
            if s.start is not None:
                self.at(s.start, lambda n=s.name: self.want(n))

    # -- scheduling of tenant events --

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    @property
    def now(self) -> float:
        return self.clock.now

    # -- calls into the scheduler (model transition first, then its actions) --

    def want(self, name: str, devices=None) -> list:
        if name not in self.state:
            return []
        spec = self.specs[name]
        devices = devices if devices is not None else spec.want_devices
        if self.state[name] == "idle":
            self.asks[name] = spec.devices if devices is None else tuple(sorted(set(devices)))
            self._start_wait(name)
        return self._apply(self.sched.want(name, devices))

    def yield_(self, name: str, slice_id: int) -> list:
        if name not in self.state:
            return []
        if self.state[name] == "holding" and self.cur[name].slice == slice_id:
            self._release(name)
            self._start_wait(name)
        elif self.state[name] == "idle":
            self._start_wait(name)
        return self._apply(self.sched.yield_(name, slice_id))

    def done(self, name: str) -> list:
        if name not in self.state:
            return []
        if self.state[name] == "holding":
            self._release(name)
        self.state[name] = "idle"
        acts = self._apply(self.sched.done(name))
        idle = _draw(self.specs[name].idle)
        if idle is not None:
            self.at(self.now + idle, lambda: self.want(name))
        return acts

    def remove(self, name: str) -> list:
        if name in self.state:
            if self.state[name] == "holding":
                self._release(name)
            del self.state[name]
        return self._apply(self.sched.remove(name))

    def tick(self) -> list:
        return self._apply(self.sched.tick())

    def _start_wait(self, name: str) -> None:
        self.state[name] = "waiting"
        self.wait_start[name] = self.now

    def _release(self, name: str) -> None:
        g = self.cur.pop(name)
        held = self.now - self.granted_at[name]
        self.held[name] += held
        for d in g.devices:
            assert self.owner[d] == name
            self.owner[d] = None
            self.dev_held[d][name] += held
        self.turns.append((name, self.granted_at[name], self.now))
        self.state[name] = "idle"

    def _apply(self, actions: list) -> list:
        self.calls += 1
        for a in actions:
            self.log.append((self.now, a))
            if isinstance(a, Grant):
                assert self.state[a.tenant] == "waiting", a
                assert a.tenant not in self.held_back(), f"{a} while it sits out"
                if a.tenant in self.revoked_at:  # never ahead of anyone who waited for it
                    t = self.revoked_at.pop(a.tenant)
                    ahead = [n for n, w in self.waiting_since().items()
                             if w <= t and n not in self.sit_out and self._shares(n, a.tenant)]
                    assert not ahead, f"{a} while {ahead} wait since before its revocation"
                self.sit_out.pop(a.tenant, None)
                self.asks[a.tenant] = a.devices
                for d in a.devices:  # mutual exclusion, straight from the actions
                    assert self.owner[d] is None, f"{a} while {self.owner[d]} holds {d}"
                    self.owner[d] = a.tenant
                self.state[a.tenant] = "holding"
                self.cur[a.tenant] = a
                self.granted_at[a.tenant] = self.now
                self.waits[a.tenant].append(self.now - self.wait_start[a.tenant])
                self._on_grant(a)
            elif isinstance(a, Preempt):
                assert self.state[a.tenant] == "holding" and self.cur[a.tenant].slice == a.slice
                assert a.grace == self.grace
                delay = _draw(self.specs[a.tenant].yield_delay)
                if delay is not None:
                    self.at(self.now + delay, lambda a=a: self.yield_(a.tenant, a.slice))
            elif isinstance(a, Revoke):
                assert self.state[a.tenant] == "holding" and self.cur[a.tenant].slice == a.slice
                # It sits out the waiting it caused during the slice.
                since = self.granted_at[a.tenant]
                self.sit_out[a.tenant] = self.now + sum(
                    self.now - max(since, w) for n, w in self.waiting_since().items()
                    if self._shares(n, a.tenant))
                self.revoked_at[a.tenant] = self.now
                self._release(a.tenant)
                rewant = self.specs[a.tenant].rewant
                if rewant is not None:
                    self.at(self.now + rewant, lambda a=a: self.want(a.tenant))
            else:  # pragma: no cover
                raise AssertionError(a)
        check_invariants(self.sched, self.state, self.owner, self.held_back())
        return actions

    def _shares(self, a: str, b: str) -> bool:
        return not set(self.asks[a]).isdisjoint(self.asks[b])

    def held_back(self) -> set[str]:
        """The model's rule: a revoked tenant is not granted before its sit-out
        ends, nor while a tenant not sitting out that began waiting by then
        still waits for one of its devices. (The sit-out's end is summed in
        the scheduler's order, so the floats agree exactly.)"""
        waiting = {n: w for n, w in self.waiting_since().items() if n not in self.sit_out}
        return {n for n, until in self.sit_out.items()
                if self.now < until
                or any(w <= until and self._shares(n, m) for m, w in waiting.items())}

    def _on_grant(self, g: Grant) -> None:
        hold = _draw(self.specs[g.tenant].hold)
        if hold is not None:
            def finish(g=g):
                if self.state.get(g.tenant) == "holding" and self.cur[g.tenant].slice == g.slice:
                    self.done(g.tenant)
            self.at(self.now + hold, finish)

    # -- time --

    def run_until(self, t_end: float, max_steps: int = 2_000_000) -> None:
        for _ in range(max_steps):
            deadline = self.sched.next_deadline()
            event = self._events[0][0] if self._events else None
            t = min((x for x in (deadline, event) if x is not None), default=None)
            if t is None or t > t_end:
                self.clock.now = max(self.now, t_end)
                return
            self.clock.now = max(self.now, t)
            if event is not None and event <= t:
                _, _, fn = heapq.heappop(self._events)
                fn()
            else:
                self.tick()
        raise AssertionError("simulation did not advance")  # pragma: no cover

    def close_books(self) -> dict[str, float]:
        """Held seconds per tenant including open turns, at the current time."""
        out = dict(self.held)
        for name, _g in self.cur.items():
            out[name] = out.get(name, 0.0) + self.now - self.granted_at[name]
        return out

    def waiting_since(self) -> dict[str, float]:
        return {n: self.wait_start[n] for n, s in self.state.items() if s == "waiting"}

    def waiting_now(self) -> dict[str, float]:
        return {n: self.now - w for n, w in self.waiting_since().items()}


def check_invariants(sched: Scheduler, state: dict[str, str], owner: dict[int, str | None],
                     held_back: set[str]):
    # The model (built from actions) and the scheduler agree.
    assert sched.holder == owner
    assert {n: r.state for n, r in sched.runners.items()} == state
    for name, r in sched.runners.items():
        mine = {d for d, h in sched.holder.items() if h == name}
        if r.state == "holding":
            assert mine == set(r.devices), f"{name} holds {mine} of {r.devices}"  # all or none
        else:
            assert not mine
    # No deadlock: nobody waits while every device is free; the head of the
    # queue is blocked by a device that is held (never by a reservation or by
    # nothing), and someone will be asked to yield. A revoked tenant sitting
    # out is not ready: it comes last, and the end of its sit-out is a deadline.
    order = grant_order(sched)
    waiters = [r for r in order if r.id not in held_back]
    assert order[len(waiters):] == [r for r in order if r.id in held_back]
    if held_back & {r.id for r in order}:
        assert sched.next_deadline() is not None
    if waiters:
        assert any(sched.holder[d] is not None for d in waiters[0].devices), \
            f"head {waiters[0].id} waits on free devices {waiters[0].devices}"
        assert any(h is not None for h in sched.holder.values())
        assert sched.next_deadline() is not None


def grant_order(sched: Scheduler) -> list:
    """Waiting runners in the order the scheduler grants them."""
    if hasattr(sched, "_queue"):
        return list(sched._queue(sched._clock()))
    return sorted((r for r in sched.runners.values() if r.state == "waiting"),
                  key=lambda r: (r.vruntime, r.seq))


def shares(held: dict[str, float], names) -> dict[str, float]:
    total = sum(held.get(n, 0.0) for n in names)
    return {n: held.get(n, 0.0) / total for n in names}


# --- 10. construction errors --------------------------------------------------------


@pytest.mark.parametrize("quantum", [0, 0.0, -0.05])
def test_nonpositive_quantum_raises(quantum):
    with pytest.raises(ValueError):
        Scheduler([0], clock=FakeClock(), quantum=quantum, grace=0.5)


def test_negative_grace_raises():
    with pytest.raises(ValueError):
        Scheduler([0], clock=FakeClock(), quantum=0.05, grace=-1)


def test_add_validates_devices_and_weight():
    s = Scheduler([0, 1], clock=FakeClock(), quantum=0.05, grace=0.5)
    with pytest.raises(ValueError, match="unknown"):
        s.add("a", [2])
    with pytest.raises(ValueError):
        s.add("a", [0, 7])
    with pytest.raises(ValueError):
        s.add("a", [])
    with pytest.raises(ValueError):
        s.add("a", [0], weight=0)
    assert s.runners == {}
    s.add("a", [1, 0, 1])
    assert s.runners["a"].home == (0, 1)


# --- 6. single tenant -------------------------------------------------------------


def test_lone_tenant_is_never_preempted():
    clock = FakeClock()
    s = Scheduler([0, 1], clock=clock, quantum=0.05, grace=0.2)
    s.add("a", [0])
    s.add("b", [1])  # another device: no competition
    (g,) = s.want("a")
    assert g == Grant("a", (0,), g.slice, 0.05)
    assert s.want("b")[0].tenant == "b"
    for t in (0.05, 0.06, 1.0, 10.0, 1e4):
        clock.now = t
        assert s.next_deadline() is None
        assert s.tick() == []
        assert s.want("a") == []  # idempotent while holding
    assert s.holder == {0: "a", 1: "b"}
    assert s.done("a") == []
    assert s.want("a")[0].tenant == "a"
    clock.now = 2e4
    assert s.tick() == [] and s.next_deadline() is None


def test_lone_cooperative_tenant_in_simulation_never_sees_preempt():
    sim = Sim([0], [Spec("a", (0,), hold=lambda: 0.3, idle=0.01)], quantum=0.05)
    sim.run_until(60)
    assert not any(isinstance(a, (Preempt, Revoke)) for _, a in sim.log)
    assert len(sim.waits["a"]) > 100 and max(sim.waits["a"]) == 0.0


# --- 1 & 2. mutual exclusion and no starvation ------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("delay", [0.0, 0.01, 0.04])
def test_equal_tenants_no_starvation(n, delay):
    q, grace = 0.05, 0.1
    sim = Sim([0], [Spec(f"t{i}", (0,), yield_delay=delay) for i in range(n)],
              quantum=q, grace=grace)
    sim.run_until(200 * q)
    bound = (n - 1) * (q + delay) + EPS  # round robin: everyone else's turn once
    assert bound <= (n - 1) * q + grace + (n - 1) * delay + EPS
    for name in sim.specs:
        assert sim.waits[name], name
        assert max(sim.waits[name]) <= bound, (name, max(sim.waits[name]))
    assert all(w <= bound for w in sim.waiting_now().values())
    assert not any(isinstance(a, Revoke) for _, a in sim.log)


def test_unequal_yield_delays_no_starvation():
    """Tenants that take longer to yield hold longer turns; fairness in time
    makes them wait for the others to catch up, but never for long."""
    q, grace = 0.05, 0.1
    delays = (0.01, 0.02, 0.03, 0.04, 0.0)
    n = len(delays)
    sim = Sim([0], [Spec(f"t{i}", (0,), yield_delay=d) for i, d in enumerate(delays)],
              quantum=q, grace=grace)
    sim.run_until(60)
    bound = 2 * (n - 1) * (q + max(delays))
    for name in sim.specs:
        assert max(sim.waits[name]) <= bound, (name, max(sim.waits[name]))
    got = shares(sim.close_books(), sim.specs)
    assert all(v == pytest.approx(1 / n, rel=0.05) for v in got.values()), got


def _noisy(k: int) -> Callable[[], float]:
    """Yield delays with a little jitter, as measured times have (all < grace)."""
    noise = [0.010, 0.0115, 0.0105, 0.011, 0.012, 0.0102]
    return itertools.cycle(noise[k:] + noise[:k]).__next__


def test_rotation_with_noisy_yields_single_device():
    q, grace = 0.05, 0.02
    sim = Sim([0], [Spec(n, (0,), yield_delay=_noisy(i)) for i, n in enumerate("abc")],
              quantum=q, grace=grace)
    sim.run_until(60)
    bound = 2 * q + grace + 0.012
    for name in sim.specs:
        assert max(sim.waits[name]) <= bound + EPS, (name, max(sim.waits[name]))
    seq = [a.tenant for _, a in sim.log if isinstance(a, Grant)]
    assert all(x != y for x, y in itertools.pairwise(seq))


def test_rotation_with_noisy_yields_is_per_device():
    """Same as above on device 0, plus an unrelated pair on device 1 (whose
    vruntimes advance at a different rate) must not change device 1's rotation."""
    q, grace = 0.05, 0.02
    groups = {0: ["a", "b", "c"], 1: ["y", "z"]}
    specs = [Spec(n, (d,), yield_delay=_noisy(i))
             for d, names in groups.items() for i, n in enumerate(names)]
    sim = Sim([0, 1], specs, quantum=q, grace=grace)
    sim.run_until(60)
    for d, names in groups.items():
        bound = (len(names) - 1) * q + grace + 0.012
        for name in names:
            assert max(sim.waits[name]) <= bound + EPS, (d, name, max(sim.waits[name]))
        seq = [a.tenant for _, a in sim.log if isinstance(a, Grant) and a.tenant in names]
        assert all(x != y for x, y in itertools.pairwise(seq)), (d, "back-to-back turns")


def test_staggered_arrivals_no_starvation():
    q, grace, delay, n = 0.05, 0.2, 0.01, 4
    specs = [Spec(f"t{i}", (0,), start=i * 0.37, yield_delay=delay) for i in range(n)]
    sim = Sim([0], specs, quantum=q, grace=grace)
    sim.run_until(30)
    for name in sim.specs:
        assert max(sim.waits[name]) <= n * (q + delay) + EPS, name


def test_mutual_exclusion_on_timeline():
    """Turns recorded from the actions never overlap on a device."""
    specs = [Spec("g", (0, 1), hold=lambda: 0.07, idle=0.02),
             Spec("a", (0,), yield_delay=0.02), Spec("b", (1,), weight=2, yield_delay=0.0),
             Spec("c", (0, 1), weight=3, yield_delay=0.03)]
    sim = Sim([0, 1], specs, quantum=0.05, grace=0.1)
    sim.run_until(40)
    for d in (0, 1):
        spans = sorted((s, e) for n, s, e in sim.turns if d in sim.specs[n].devices)
        for (_, e1), (s2, _) in itertools.pairwise(spans):
            assert s2 >= e1 - EPS
    assert all(sim.waits[n] for n in sim.specs)


# --- 3. weighted shares ------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1, 2, 3), (1, 1, 1), (1, 1), (1, 4)])
def test_weighted_shares_converge(weights):
    q = 0.05
    specs = [Spec(f"w{i}", (0,), weight=w, yield_delay=0.005) for i, w in enumerate(weights)]
    sim = Sim([0], specs, quantum=q, grace=0.2)
    sim.run_until(3000 * q)
    got = shares(sim.close_books(), sim.specs)
    for spec in specs:
        want = spec.weight / sum(weights)
        assert abs(got[spec.name] - want) <= 0.05 * want, (got, weights)
    # The scheduler's own books agree with the simulation.
    view = {t["tenant"]: t for t in sim.sched.view()[0]["tenants"]}
    for spec in specs:
        assert view[spec.name]["share"] == pytest.approx(got[spec.name], abs=1e-3)


# --- 4. idle tenants bank no credit ---------------------------------------------------


def _check_alternation(sim: Sim, t_join: float, window: float) -> None:
    q, delay = sim.quantum, sim.specs["b"].yield_delay
    turns = [(n, s, e) for n, s, e in sim.turns if s >= t_join - EPS]
    b_turns = [e - s for n, s, e in turns if n == "b"]
    assert b_turns and max(b_turns) <= q + delay + EPS
    # No monopoly: b never runs more than one turn in a row.
    seq = [n for n, _, _ in sorted(turns, key=lambda t: t[1])]
    assert all(x != y for x, y in itertools.pairwise(seq)), seq[:20]
    held = defaultdict(float)
    for n, s, e in turns:
        held[n] += min(e, t_join + window) - s if s < t_join + window else 0.0
    got = shares(held, ["a", "b"])
    assert got["b"] == pytest.approx(0.5, abs=0.05), got


def test_idle_tenant_banks_no_credit_after_many_short_turns():
    """a keeps taking short turns (done/want) while b idles; then b joins."""
    t_join, window = 100.0, 10.0
    specs = [Spec("a", (0,), hold=lambda: 0.2, idle=0.0, yield_delay=0.01),
             Spec("b", (0,), start=None, yield_delay=0.01)]
    sim = Sim([0], specs, quantum=0.05, grace=0.2)
    sim.run_until(t_join)
    # From now on a always wants (holds until preempted).
    sim.specs["a"].hold = None
    sim.at(t_join, lambda: sim.want("b"))
    sim.run_until(t_join + window)
    _check_alternation(sim, t_join, window)


def test_idle_tenant_after_previous_activity_banks_no_credit():
    """b was active early (low vruntime), idles, rejoins later."""
    specs = [Spec("a", (0,), hold=lambda: 0.2, idle=0.0, yield_delay=0.01),
             Spec("b", (0,), hold=lambda: 0.2, idle=None, yield_delay=0.01)]
    sim = Sim([0], specs, quantum=0.05, grace=0.2)
    sim.run_until(80.0)  # b did one turn long ago, then idled
    assert sum(1 for n, _, _ in sim.turns if n == "b") >= 1
    sim.specs["a"].hold = None
    sim.specs["b"].hold = None
    sim.at(80.0, lambda: sim.want("b"))
    sim.run_until(90.0)
    _check_alternation(sim, 80.0, 10.0)


def test_idle_tenant_banks_no_credit_after_one_long_solo_turn():
    """a holds one uninterrupted slice for 100 s (nobody ticks: nothing to do);
    b then wants and must not get ~100 s of catch-up (the floor must include
    the holder's progress, not just its value at the last scheduler call)."""
    t_join, window = 100.0, 10.0
    specs = [Spec("a", (0,), yield_delay=0.01), Spec("b", (0,), start=None, yield_delay=0.01)]
    sim = Sim([0], specs, quantum=0.05, grace=0.2)
    sim.run_until(t_join)
    assert sim.calls == 1  # just a's want: the daemon would not wake either
    sim.at(t_join, lambda: sim.want("b"))
    sim.run_until(t_join + window)
    _check_alternation(sim, t_join, window)


# --- 5. gang grants --------------------------------------------------------------------


def test_gang_tenant_not_starved_by_single_device_streams():
    q, grace, delay = 0.05, 0.2, 0.01
    specs = [Spec("gang", (0, 1), yield_delay=delay),
             Spec("x0", (0,), yield_delay=delay), Spec("y0", (0,), start=0.013, yield_delay=delay),
             Spec("x1", (1,), start=0.021, yield_delay=delay),
             Spec("y1", (1,), start=0.034, yield_delay=delay)]
    sim = Sim([0, 1], specs, quantum=q, grace=grace)
    sim.run_until(60)
    # Gang turns cover both devices at once.
    assert all(a.devices == (0, 1) for _, a in sim.log
               if isinstance(a, Grant) and a.tenant == "gang")
    assert len(sim.waits["gang"]) > 100
    # Once at the head, it waits at most for both sides' current turns to end,
    # behind at most the two other tenants of each device.
    bound = 3 * (q + delay) + EPS
    for name in sim.specs:
        assert max(sim.waits[name]) <= bound, (name, max(sim.waits[name]))
    held = sim.close_books()
    for d, names in ((0, ["gang", "x0", "y0"]), (1, ["gang", "x1", "y1"])):
        got = shares(held, names)
        assert min(got.values()) > 0.2, (d, got)


def test_gang_tenant_reserves_free_device():
    """The head gang waiter keeps a freed device idle for itself rather than
    letting a single-device tenant behind it take it."""
    clock = FakeClock()
    s = Scheduler([0, 1], clock=clock, quantum=0.1, grace=1.0)
    for name, devs in (("a", [0]), ("b", [1]), ("g", [0, 1]), ("c", [0])):
        s.add(name, devs)
    s.want("a")
    clock.now = 0.05
    s.want("b")
    s.want("g")
    clock.now = 0.06
    s.want("c")
    clock.now = 0.1
    assert s.tick() == [Preempt("a", s.runners["a"].slice, 1.0)]
    clock.now = 0.11
    acts = s.yield_("a", s.runners["a"].slice)
    assert acts == [] and s.holder == {0: None, 1: "b"}  # reserved for g
    assert s.next_deadline() == pytest.approx(0.15)
    clock.now = s.next_deadline()
    assert [type(a) for a in s.tick()] == [Preempt]
    clock.now = 0.16
    (g,) = s.yield_("b", s.runners["b"].slice)
    assert g.tenant == "g" and g.devices == (0, 1)


def test_gang_waiter_does_not_idle_a_device_for_long():
    q, grace, d = 0.05, 0.1, 0.01
    specs = [Spec("s", (0,), yield_delay=d),  # alone on device 0 for 5 s
             Spec("a", (1,), yield_delay=d), Spec("b", (1,), yield_delay=d),
             Spec("g", (0, 1), start=5.0, yield_delay=d)]
    sim = Sim([0, 1], specs, quantum=q, grace=grace)
    sim.run_until(15)
    # Device 0 has two contenders (s, g): s's turn comes within one other turn.
    assert max(sim.waits["s"]) <= q + grace + d + EPS, max(sim.waits["s"])
    # g waits at most for one turn on each device, plus the turns ahead of it.
    assert max(sim.waits["g"]) <= 2 * (q + d) + grace + EPS, max(sim.waits["g"])
    spans = sorted((s_, e) for n, s_, e in sim.turns if n in ("s", "g") and e > 5.0)
    gaps = [s2 - e1 for (_, e1), (s2, _) in itertools.pairwise(spans)]
    assert max(gaps) <= q + grace, max(gaps)  # no long idle stretch while s waits


@st.composite
def gang_scenarios(draw):
    n_dev = draw(st.integers(2, 4))
    devs = list(range(n_dev))
    n = draw(st.integers(2, 6))
    dur = st.sampled_from([0.005, 0.02, 0.05, 0.08, 0.2, 0.5])
    specs = []
    for i in range(n):
        home = tuple(sorted(draw(st.sets(st.sampled_from(devs), min_size=1))))
        keeps = draw(st.booleans())  # True: holds until preempted, always wants
        sub = draw(st.one_of(st.none(), st.sets(st.sampled_from(home), min_size=1)))
        holds = draw(st.lists(dur, min_size=1, max_size=4))
        idles = draw(st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.3]), min_size=1, max_size=4))
        specs.append(dict(
            name=f"t{i}", devices=home, weight=draw(st.sampled_from([1, 2, 3])),
            start=draw(st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.5])),
            yield_delay=draw(st.sampled_from([0.0, 0.005, 0.03])),
            hold=None if keeps else itertools.cycle(holds).__next__,
            idle=itertools.cycle(idles).__next__,
            want_devices=None if sub is None else tuple(sorted(sub))))
    return n_dev, specs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gang_scenarios())
def test_gang_patterns_never_deadlock_and_never_starve(scenario):
    n_dev, raw = scenario
    q, grace = 0.05, 0.1
    specs = [Spec(**kw) for kw in raw]
    sim = Sim(range(n_dev), specs, quantum=q, grace=grace)
    sim.run_until(20.0)  # invariants (exclusion, all-or-none, no deadlock) on every call
    # Liveness: every wait, finished or not, is bounded. Each turn after a wait
    # begins lasts at most q + delay; the waiter's vruntime is fixed, so the
    # others can only get ahead of it by a bounded amount of weighted time.
    max_delay = max(s.yield_delay for s in specs)
    bound = 4 * len(specs) * 3 * (q + max_delay)
    for name in sim.specs:
        assert sim.waits[name], f"{name} never granted"
        assert max(sim.waits[name]) <= bound, (name, max(sim.waits[name]), bound)
    for name, w in sim.waiting_now().items():
        assert w <= bound, (name, w)
    assert not any(isinstance(a, Revoke) for _, a in sim.log)


# --- 7. forced revocation ------------------------------------------------------------


def test_revocation_exactly_at_quantum_end_plus_grace():
    clock = FakeClock()
    q, grace = 0.1, 0.5
    s = Scheduler([0], clock=clock, quantum=q, grace=grace)
    s.add("a", [0])
    s.add("b", [0])
    (ga,) = s.want("a")
    assert ga.quantum == q
    assert s.want("b") == []
    assert s.next_deadline() == pytest.approx(q)
    clock.now = s.next_deadline()
    assert s.tick() == [Preempt("a", ga.slice, grace)]
    assert s.next_deadline() == pytest.approx(q + grace)
    clock.now = q + grace - 1e-6
    assert s.tick() == []
    assert s.holder[0] == "a"
    clock.now = s.next_deadline()
    acts = s.tick()
    # Revoke and the hand-over in the same call.
    assert [type(a) for a in acts] == [Revoke, Grant]
    assert acts[0].tenant == "a" and acts[0].slice == ga.slice and acts[0].reason
    assert acts[1].tenant == "b" and acts[1].devices == (0,)
    assert s.holder[0] == "b"
    a = s.runners["a"]
    assert (a.state, a.strikes, a.revocations) == ("idle", 1, 1)
    # Not re-queued: b is alone, nothing to do, however long.
    assert s.next_deadline() is None
    assert s.view()[0]["queue"] == []
    clock.now += 100
    assert s.tick() == []
    assert s.done("b") == []
    assert s.holder[0] is None
    # Until it asks again; then the quantum is halved.
    (g2,) = s.want("a")
    assert g2.tenant == "a" and g2.quantum == pytest.approx(q / 2)
    assert s.view()[0]["tenants"][0]["revocations"] == 1


def test_strikes_halve_quantum_down_to_min_and_timely_yield_removes_one():
    clock = FakeClock()
    q, grace = 0.08, 0.2
    s = Scheduler([0], clock=clock, quantum=q, grace=grace)  # min_quantum q/8
    s.add("bad", [0])
    s.add("good", [0])
    s.want("good")
    s.want("bad")

    def turn_of(name):
        """Drive the clock (good yields promptly) until `name` holds; return it."""
        for _ in range(50):
            if s.runners[name].state == "holding":
                return s.runners[name]
            holder = s.holder[0]
            r = s.runners[holder]
            clock.now = s.next_deadline()
            acts = s.tick()
            if holder == "good" and any(isinstance(a, Preempt) for a in acts):
                clock.now += 0.01
                s.yield_("good", r.slice)
        raise AssertionError("no turn")

    expected = [q, q / 2, q / 4, q / 8, q / 8, q / 8]  # floor at min_quantum
    caps = [1, 2, 3, 3, 3, 3]  # strikes stop at the floor (max_strikes = 3)
    for i, quantum in enumerate(expected):
        r = turn_of("bad")
        assert r.quantum_end - r.granted_at == pytest.approx(quantum)
        assert r.strikes == min(i, 3)
        # bad ignores Preempt: revoked at quantum_end + grace.
        clock.now = s.next_deadline()
        assert s.tick() == [Preempt("bad", r.slice, grace)]
        clock.now = s.next_deadline()
        assert clock.now == pytest.approx(r.quantum_end + grace)
        acts = s.tick()
        assert isinstance(acts[0], Revoke) and acts[0].tenant == "bad"
        assert acts[1].tenant == "good"
        assert r.revocations == i + 1 and r.strikes == caps[i]
        s.want("bad")
    # Now it behaves: each timely yield removes a strike.
    strikes = s.runners["bad"].strikes
    assert strikes == s.max_strikes == 3
    for k in range(strikes):
        r = turn_of("bad")
        assert r.quantum_end - r.granted_at == pytest.approx(max(q / 8, q / 2 ** (strikes - k)))
        clock.now = s.next_deadline()
        s.tick()
        clock.now += grace / 2
        s.yield_("bad", r.slice)
        assert r.strikes == strikes - k - 1
    r = turn_of("bad")
    assert r.quantum_end - r.granted_at == pytest.approx(q)
    assert r.revocations == len(expected)


def test_late_yield_after_grace_keeps_strike():
    clock = FakeClock()
    s = Scheduler([0], clock=clock, quantum=0.1, grace=0.5)
    s.add("a", [0])
    s.add("b", [0])
    (g,) = s.want("a")
    s.want("b")
    clock.now = 0.1
    s.tick()
    clock.now = 0.7  # past the deadline, but nobody ticked: yield_ arrives first
    acts = s.yield_("a", g.slice)
    assert [type(x) for x in acts] == [Grant]
    assert s.runners["a"].strikes == 0 and s.runners["a"].revocations == 0


def test_stale_yield_after_revocation_just_queues():
    clock = FakeClock()
    s = Scheduler([0], clock=clock, quantum=0.1, grace=0.5)
    s.add("a", [0])
    s.add("b", [0])
    (ga,) = s.want("a")
    s.want("b")
    clock.now = 0.1
    s.tick()
    clock.now = 0.6
    revoke, gb = s.tick()
    assert isinstance(revoke, Revoke)
    clock.now = 0.65
    assert s.yield_("a", ga.slice) == []  # late ack: queues a, b keeps its turn
    a = s.runners["a"]
    assert a.state == "waiting" and a.strikes == 1 and a.revocations == 1
    assert s.holder[0] == "b" and s.view()[0]["queue"] == ["a"]
    # b waited all of a's 0.6 s slice, so a sits out 0.6 s: the device stays
    # free when b is done early, and a gets its turn at 1.2, with the halved
    # quantum.
    clock.now = 1.0
    assert s.done("b") == []
    assert s.next_deadline() == pytest.approx(1.2)
    clock.now = 1.2
    (g,) = s.tick()
    assert g.tenant == "a" and g.quantum == pytest.approx(0.05)
    # A stale yield while holding a newer slice changes nothing.
    assert s.yield_("a", ga.slice) == []
    assert s.holder[0] == "a" and s.runners["a"].slice == g.slice


def test_misbehaving_tenant_in_simulation():
    q, grace = 0.05, 0.1
    specs = [Spec("bad", (0,), yield_delay=None, rewant=0.0),
             Spec("g1", (0,), yield_delay=0.01), Spec("g2", (0,), yield_delay=0.02)]
    sim = Sim([0], specs, quantum=q, grace=grace)
    sim.run_until(30)
    revokes = [(t, a) for t, a in sim.log if isinstance(a, Revoke)]
    assert revokes and all(a.tenant == "bad" for _, a in revokes)
    assert sim.sched.runners["bad"].revocations == len(revokes)
    grants = {a.slice: (t, a) for t, a in sim.log if isinstance(a, Grant)}
    for t, a in revokes:
        tg, g = grants[a.slice]
        assert t == pytest.approx(tg + g.quantum + grace)
        # The device went to a waiter in the same call.
        i = sim.log.index((t, a))
        nxt_t, nxt = sim.log[i + 1]
        assert isinstance(nxt, Grant) and nxt_t == t and nxt.tenant != "bad"
    bad_quanta = [a.quantum for _, a in sim.log if isinstance(a, Grant) and a.tenant == "bad"]
    assert bad_quanta[:5] == pytest.approx([q, q / 2, q / 4, q / 8, q / 8])
    # Everyone else still gets served.
    for name in ("g1", "g2"):
        assert max(sim.waits[name]) <= 2 * (q + grace) + q + EPS


def test_sit_out_is_the_waiting_the_revoked_slice_caused():
    clock = FakeClock()
    q, grace = 0.1, 0.5
    s = Scheduler([0], clock=clock, quantum=q, grace=grace)
    for n in ("bad", "b", "c"):
        s.add(n, [0])
    (g,) = s.want("bad")
    clock.now = 0.02
    s.want("b")
    clock.now = 0.05
    s.want("c")
    clock.now = q
    s.tick()
    clock.now = q + grace
    revoke, gb = s.tick()
    assert isinstance(revoke, Revoke) and gb.tenant == "b"
    until = 0.6 + (0.6 - 0.02) + (0.6 - 0.05)  # b and c waited 0.58 s and 0.55 s
    assert s.runners["bad"].sit_out_until == pytest.approx(until)
    # Asking again at once, giving up and asking again, or a late yield:
    # nothing shortens it, and it queues behind c.
    assert s.want("bad") == [] and s.done("bad") == [] and s.want("bad") == []
    assert s.yield_("bad", g.slice) == []
    assert s.view()[0]["queue"] == ["c", "bad"]
    # b and c are done early: the device stays free until the sit-out ends.
    clock.now = 0.7
    assert s.done("b") == [Grant("c", (0,), gb.slice + 1, q)]
    assert s.done("c") == []
    assert s.holder[0] is None and s.next_deadline() == pytest.approx(until)
    # Its overrun (0.5 s) did not lift the floor: b comes back at its own
    # vruntime (0.02, the floor when it first asked, + 0.1 held), and takes
    # the free device at once.
    assert s.floor[0] < 0.6 - grace
    clock.now = 1.0
    (gb2,) = s.want("b")
    assert gb2.tenant == "b" and s.runners["b"].vruntime == pytest.approx(0.12)
    clock.now = until  # the sit-out is over: b is asked to yield for bad
    assert s.tick() == [Preempt("b", gb2.slice, grace)]
    clock.now = until + 0.01
    (g3,) = s.yield_("b", gb2.slice)
    assert g3.tenant == "bad" and g3.quantum == pytest.approx(q / 2)
    # bad re-enters at the floor, like a tenant back from idle: no credit for
    # the time b held during its sit-out.
    assert s.runners["bad"].vruntime == pytest.approx(s.runners["b"].vruntime)
    assert s.runners["bad"].vruntime == pytest.approx(0.12 + until + 0.01 - 1.0)


def test_tenants_sitting_out_do_not_wait_on_each_other():
    clock = FakeClock()
    s = Scheduler([0], clock=clock, quantum=0.1, grace=0.2)
    for n in ("x", "y", "z"):
        s.add(n, [0])
    s.want("x")
    s.want("y")
    s.want("z")
    for _ in range(40):  # x and y never yield; z does at once
        clock.now = s.next_deadline()
        for a in s.tick():
            if isinstance(a, Revoke):
                s.want(a.tenant)
            elif isinstance(a, Preempt) and a.tenant == "z":
                s.yield_("z", a.slice)
    assert s.runners["x"].revocations > 3 and s.runners["y"].revocations > 3
    s.remove("z")  # only the two offenders are left: one of them gets the device
    clock.now = s.next_deadline()
    s.tick()
    assert s.holder[0] in ("x", "y")


def _hog_starts(sim: Sim) -> list[float]:
    starts = sorted(a for n, a, _ in sim.turns if n == "hog")
    if sim.state["hog"] == "holding":
        starts.append(sim.granted_at["hog"])
    return starts


def _hog_share_over_cycles(sim: Sim) -> float:
    """The hog's held time over whole cycles: from its first grant to its last."""
    turns = sorted((a, b) for n, a, b in sim.turns if n == "hog")
    starts = _hog_starts(sim)
    assert len(starts) >= 4, "too few hog slices to measure"
    return sum(b - a for a, b in turns if b <= starts[-1]) / (starts[-1] - starts[0])


def _hog_bound(n: int, gap: float, sched: Scheduler) -> float:
    """The module docstring's bound: 1 / (1 + n (1 - g / m))."""
    m = sched.min_quantum + sched.grace
    return 1 / (1 + n * (1 - gap / m))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("coop,gap", [("yield", 0.0), ("done", 0.0), ("done", 0.005)])
@pytest.mark.parametrize("hog_weight", [1, 100])
def test_hog_share_is_bounded(n, coop, gap, hog_weight):
    """A hog that never yields and asks again the moment it is revoked, at the
    daemon's default quantum and grace, against n cooperative tenants that
    yield 2 ms after a preempt: ones that always want the device, and ones
    that end each turn with done() and ask again `gap` later. Before the
    sit-out it kept up to 95 % of the device (at weight 1)."""
    q, grace, delay = 0.1, 1.0, 0.002
    hold = None if coop == "yield" else itertools.cycle([0.05, 0.3, 0.15]).__next__
    specs = [Spec("hog", (0,), weight=hog_weight, yield_delay=None, rewant=0.0)]
    specs += [Spec(f"c{i}", (0,), start=0.001 * i, yield_delay=delay, hold=hold,
                   idle=None if coop == "yield" else gap) for i in range(n)]
    sim = Sim([0], specs, quantum=q, grace=grace)
    sim.run_until(40)
    bound = _hog_bound(n, gap, sim.sched)
    share = _hog_share_over_cycles(sim)
    assert share <= bound + EPS, (share, bound)
    assert share >= 0.5 * bound  # still served: the bound is not met by starving it
    for i in range(n):
        waits = sim.waits[f"c{i}"]
        assert waits
        if coop == "yield" or hog_weight == 1:
            # Within the hog's slice plus one turn each. (A weight-100 hog,
            # like any weight-100 tenant, may hold longer while they idle.)
            assert max(waits) <= q + grace + n * (q + delay) + EPS


@st.composite
def hog_scenarios(draw):
    n = draw(st.integers(1, 3))
    gap = draw(st.sampled_from([0.0, 0.0, 0.004, 0.01]))
    coops = []
    for i in range(n):
        hold = draw(st.one_of(st.none(), st.lists(st.sampled_from([0.01, 0.05, 0.2, 0.6]),
                                                  min_size=1, max_size=3)))
        coops.append(dict(
            name=f"c{i}", devices=(0,), weight=draw(st.sampled_from([0.5, 1, 3])),
            start=draw(st.sampled_from([0.0, 0.03, 0.2])),
            yield_delay=draw(st.sampled_from([0.0, 0.002, 0.02, 0.09])),
            hold=None if hold is None else itertools.cycle(hold).__next__,
            idle=None if hold is None else draw(st.sampled_from(sorted({0.0, gap})))))
    hog = dict(name="hog", devices=(0,), weight=draw(st.sampled_from([0.5, 1, 4, 100])),
               start=draw(st.sampled_from([0.0, 0.05])), yield_delay=None,
               rewant=draw(st.sampled_from([0.0, 0.0, 0.01])))
    return gap, [hog, *coops]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hog_scenarios())
# Found by the search: cycles of 22 s, which a 30 s run could not measure.
@example((0.0, [dict(name="hog", devices=(0,), weight=100, start=0.0, yield_delay=None,
                     rewant=0.0),
                dict(name="c0", devices=(0,), weight=0.5, start=0.03, yield_delay=0.09,
                     hold=itertools.cycle([0.2, 0.01, 0.05]).__next__, idle=0.0)]))
def test_hog_share_is_bounded_whatever_the_others_do(scenario):
    """Random cooperative tenants (weights, yield delays, turns that end by
    done() and ask again within `gap`) against a hog of random weight: the
    driver checks on every grant that the hog is never ahead of a tenant
    that waited since before its revocation; its share over whole cycles
    stays within the bound."""
    gap, raw = scenario
    q, grace = 0.05, 0.1
    sim = Sim([0], [Spec(**kw) for kw in raw], quantum=q, grace=grace)
    # Long enough for four hog slices. A weight-100 hog against a tenant of
    # weight 0.5 that turns for 0.2 s holds for about 11 s before the other
    # is due (its vruntime grows 200 times slower), is revoked, and sits out
    # as long as it made the other wait: cycles of about 22 s.
    end = 30.0
    sim.run_until(end)
    while len(_hog_starts(sim)) < 4 and end < 300:
        end += 30
        sim.run_until(end)
    n = len(raw) - 1
    share = _hog_share_over_cycles(sim)
    assert share <= _hog_bound(n, gap, sim.sched) + EPS, share
    for name in sim.specs:
        assert sim.waits[name], f"{name} never granted"


# --- 8. remove() and done() -----------------------------------------------------------


def test_remove_holder_frees_devices_and_grants_next():
    clock = FakeClock()
    s = Scheduler([0, 1], clock=clock, quantum=0.1, grace=0.5)
    s.add("g", [0, 1])
    s.add("a", [0])
    s.add("b", [1])
    s.want("g")
    s.want("a")
    s.want("b")
    clock.now = 0.03
    acts = s.remove("g")
    assert {(a.tenant, a.devices) for a in acts} == {("a", (0,)), ("b", (1,))}
    assert all(isinstance(a, Grant) for a in acts)
    assert s.holder == {0: "a", 1: "b"} and "g" not in s.runners
    assert all("g" not in per for per in s.device_time.values())
    assert s.departed_time == {0: pytest.approx(0.03), 1: pytest.approx(0.03)}
    assert s.remove("g") == [] and s.remove("nobody") == []
    # Removing a waiter needs no grants.
    s.add("c", [0])
    s.want("c")
    assert s.remove("c") == []
    assert s.next_deadline() is None


def _structure_sizes(s: Scheduler) -> dict[str, int]:
    """Sizes of everything the scheduler keeps, tenant by tenant or device by device."""
    return {"runners": len(s.runners), "holder": len(s.holder), "floor": len(s.floor),
            "device_time": sum(len(per) for per in s.device_time.values()) + len(s.device_time),
            "departed_time": len(s.departed_time)}


def test_remove_forgets_everything_about_the_tenant():
    clock = FakeClock()
    s = Scheduler([0, 1], clock=clock, quantum=0.1, grace=0.5)
    s.add("stay", [0])
    s.add("gone", [0, 1])
    s.want("gone")
    s.want("stay")
    clock.now = 0.1
    (p,) = s.tick()
    clock.now = 0.15
    s.yield_("gone", p.slice)  # held both devices for 0.15 s, now waits
    clock.now = 0.4
    s.remove("gone")
    assert "gone" not in s.runners
    assert all("gone" not in per for per in s.device_time.values())
    assert "gone" not in s.holder.values()
    assert all(v["tenant"] != "gone" for d in s.view() for v in d["tenants"])
    # Its time stays in each device's denominator, as one sum per device.
    assert s.departed_time == {0: pytest.approx(0.15), 1: pytest.approx(0.15)}
    (row,) = s.view()[0]["tenants"]
    assert row["held_s"] == pytest.approx(0.25) and row["share"] == pytest.approx(0.25 / 0.4)


def test_tenants_coming_and_going_leave_the_structures_the_same_size():
    """10k hello/turn/bye cycles against a resident tenant: the scheduler's
    structures and view() do not grow with the tenants that have left."""
    import tracemalloc

    clock = FakeClock()
    s = Scheduler([0, 1], clock=clock, quantum=0.01, grace=0.05)
    s.add("resident", [0, 1])
    s.want("resident")

    def cycle(i: int) -> None:
        name = f"t{i}"
        s.add(name, [i % 2])
        s.want(name)
        clock.now += 0.01
        for a in s.tick():
            if isinstance(a, Preempt):
                s.yield_(a.tenant, a.slice)
        clock.now += 0.002
        s.done(name)
        s.remove(name)

    for i in range(100):  # warm up free lists and dict sizes
        cycle(i)
    sizes = _structure_sizes(s)
    view_rows = sum(len(d["tenants"]) for d in s.view())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(100, 10_100):
        cycle(i)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert _structure_sizes(s) == sizes
    assert sum(len(d["tenants"]) for d in s.view()) == view_rows
    assert grown < 64 << 10, grown  # before the fix: ~1 MB for 10k tenants
    assert sum(s.departed_time.values()) > 0


def test_done_by_waiter_leaves_queue():
    clock = FakeClock()
    s = Scheduler([0], clock=clock, quantum=0.1, grace=0.5)
    for n in "abc":
        s.add(n, [0])
    (ga,) = s.want("a")
    s.want("b")
    s.want("c")
    assert s.view()[0]["queue"] == ["b", "c"]
    assert s.done("b") == []
    assert s.runners["b"].state == "idle"
    assert s.view()[0]["queue"] == ["c"]
    clock.now = 0.1
    s.tick()
    clock.now = 0.11
    (g,) = s.yield_("a", ga.slice)
    assert g.tenant == "c"
    assert s.done("c") == [Grant("a", (0,), g.slice + 1, 0.1)]
    assert s.done("a") == [] and s.holder[0] is None
    # A lone waiter that gives up: no deadline left.
    s.want("a")
    s.want("b")
    assert s.next_deadline() is not None
    s.done("b")
    assert s.next_deadline() is None


def test_remove_in_simulation_keeps_invariants():
    specs = [Spec(f"t{i}", (i % 2,) if i < 4 else (0, 1), yield_delay=0.01) for i in range(6)]
    sim = Sim([0, 1], specs, quantum=0.05, grace=0.1)
    for i, t in enumerate((1.0, 2.0, 3.03, 4.5)):
        sim.at(t, lambda i=i: sim.remove(f"t{i}"))
    sim.run_until(8)
    assert set(sim.sched.runners) == {"t4", "t5"}
    late = [a.tenant for t, a in sim.log if isinstance(a, Grant) and t > 5]
    assert set(late) == {"t4", "t5"}


# --- 9. view() ------------------------------------------------------------------------


def test_view_consistent_with_simulation():
    q, grace = 0.05, 0.2
    specs = [Spec("g", (0, 1), weight=2, yield_delay=0.01),
             Spec("a", (0,), yield_delay=0.02),
             Spec("b", (1,), hold=lambda: 0.03, idle=0.05, yield_delay=0.0),
             Spec("bad", (1,), yield_delay=None, rewant=0.1)]
    sim = Sim([0, 1], specs, quantum=q, grace=grace)
    sim.run_until(20.013)
    view = sim.sched.view()
    assert [v["device"] for v in view] == [0, 1]
    held = sim.close_books()
    queue = grant_order(sim.sched)
    for v in view:
        d = v["device"]
        assert v["holder"] == sim.owner[d]
        assert v["queue"] == [r.id for r in queue if d in r.devices]
        assert set(v["queue"]) == {n for n, s in sim.state.items()
                                   if s == "waiting" and d in sim.specs[n].devices}
        assert v["quantum_ms"] == q * 1e3 and v["grace_ms"] == grace * 1e3
        rows = {t["tenant"]: t for t in v["tenants"]}
        assert set(rows) == {n for n, s in sim.specs.items() if d in s.devices}
        assert sum(t["share"] for t in rows.values()) == pytest.approx(1.0, abs=1e-3)
        dev_total = sum(sim.dev_held[d].values()) + sum(
            sim.now - sim.granted_at[n] for n, g in sim.cur.items() if d in g.devices)
        for name, row in rows.items():
            r = sim.sched.runners[name]
            assert row["state"] == sim.state[name] and row["weight"] == r.weight
            assert row["held_s"] == pytest.approx(held.get(name, 0.0), abs=1e-3)
            assert row["share"] == pytest.approx(held.get(name, 0.0) / dev_total, abs=1e-3)
            assert row["grants"] == len(sim.waits[name])
            waits = sorted(sim.waits[name][-WAIT_SAMPLES:])
            assert row["wait_p50_ms"] == pytest.approx(_pct(waits, 0.5) * 1e3, abs=1e-3)
            assert row["wait_p99_ms"] == pytest.approx(_pct(waits, 0.99) * 1e3, abs=1e-3)
            assert 0 <= row["wait_p50_ms"] <= row["wait_p99_ms"]
            revs = sum(1 for _, a in sim.log if isinstance(a, Revoke) and a.tenant == name)
            assert row["revocations"] == revs
            assert row["strikes"] == r.strikes
            assert row["quantum_ms"] == pytest.approx(
                max(q / 8, q / 2 ** r.strikes) * 1e3, abs=1e-3)
    rows1 = {t["tenant"]: t for t in view[1]["tenants"]}
    assert rows1["bad"]["revocations"] > 0
    assert rows1["g"]["wait_p99_ms"] > 0 and rows1["b"]["grants"] > 0


def test_view_empty_and_fresh():
    clock = FakeClock()
    s = Scheduler([3], clock=clock, quantum=0.02, grace=0.1)
    (v,) = s.view()
    assert v == {"device": 3, "holder": None, "queue": [], "quantum_ms": 20.0,
                 "grace_ms": 100.0, "tenants": []}
    s.add("a", [3])
    row = s.view()[0]["tenants"][0]
    assert row["share"] == 0.0 and row["grants"] == 0
    assert row["wait_p50_ms"] == 0.0 and row["wait_p99_ms"] == 0.0
    s.want("a")
    clock.now = 1.5
    row = s.view()[0]["tenants"][0]
    assert row["share"] == 1.0 and row["held_s"] == 1.5 and row["state"] == "holding"
    assert not math.isnan(row["share"])


def test_no_preemption_for_a_waiter_that_is_not_eligible():
    """A heavy tenant is not paged out for a light one that ran ahead: it is
    preempted only once the waiter is within a quantum of it (review finding)."""
    clock = FakeClock()
    q = 0.05
    s = Scheduler([0], clock=clock, quantum=q, grace=1.0)
    s.add("light", [0], weight=1)
    s.add("heavy", [0], weight=8)
    s.want("light")
    clock.now = 0.5  # light ran alone for a while: far ahead in vruntime
    regrants = 0

    def react(actions):
        nonlocal regrants
        for a in actions:
            if isinstance(a, Preempt):  # cooperative: yield a millisecond later
                clock.now += 0.001
                acts = s.yield_(a.tenant, a.slice)
                regrants += [g.tenant for g in acts if isinstance(g, Grant)] == [a.tenant]
                react(acts)

    react(s.want("heavy"))
    for _ in range(400):
        deadline = s.next_deadline()
        assert deadline is not None and deadline > clock.now - 1e-9
        clock.now = deadline
        react(s.tick())
    assert regrants == 0
    shares = {n: r.held for n, r in s.runners.items()}
    assert shares["heavy"] > shares["light"]


def test_strikes_are_capped_however_often_a_tenant_is_revoked():
    clock = FakeClock()
    s = Scheduler([0], clock=clock, quantum=0.01, grace=0.0)
    s.add("bad", [0])
    s.add("other", [0])
    for _ in range(3000):  # far past 2**1024 if strikes were unbounded
        s.want("bad")
        s.want("other")
        clock.now = s.next_deadline() or clock.now
        s.tick()
        clock.now = s.next_deadline() or clock.now
        s.tick()
        if s.runners["other"].state == "holding":
            s.done("other")
    assert s.runners["bad"].strikes <= s.max_strikes
    assert s.runners["bad"].revocations > 100
    s.view()  # still renders
