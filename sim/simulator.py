"""Discrete-event simulation of a scale-up server under aqua's decisions.

Virtual time only. The decisions are made by the objects aquad and the
engine run for real, driven through their public entry points:

- `aquad.core.arbiter.Arbiter` (with its Scheduler, placer, allocators and
  lease table) receives the same typed requests a tenant sends over the
  socket: hello, lease, release, turn, turn_yield, turn_done;
- `aqua.engine.PromptScheduler` plans every engine step, as in the real
  engine.

What is modelled rather than run: GPU compute (a roofline per step, see
workload.Costs) and copies (fabric.Fabric). An engine step is synchronous, as
in the engine: page out the preempted, then page in or prefill the resumed,
then decode one token for every other resident request.

Policies on the same workload:
- fcfs: vLLM's scheduler (PromptScheduler's fcfs): admission on prompt blocks
  within `vllm serve`'s default sequence and token limits for the GPU,
  newest-first preemption by recompute when blocks run out;
- reserve: admission only while a request's whole reservation (prompt + max
  new tokens) fits, no preemption: weaker than vLLM, kept for comparison;
- host_swap: fair prompt-level time sharing; preempted KV caches go to host
  DRAM over PCIe (no GPU offers spare memory), with as much offload memory as
  aqua has in all (the host pool grows by the peers' spare) and the same
  lease policy, so that aqua vs host_swap isolates the link;
- aqua: the same, with producer GPUs' spare memory leased over NVLink first
  and host DRAM as the fallback, as aquad places it;
- recompute: the same scheduling, but a preempted request's KV cache is
  dropped and recomputed by a prefill when it resumes.

A scenario may add a lender's load step (sim/reclaim.py): a producer GPU's
own model reclaims its spare memory through the Arbiter, and the engines
move their leases there as the client library does.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aqua.engine.scheduler import PromptScheduler, Request
from aqua_demo.stats import service_summary
from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m
from aqua_protocol.turns import TurnMachine
from aquad.core.arbiter import Arbiter, Limits
from aquad.core.quotas import UNLIMITED
from aquad.core.tenants import Peer

from .backend import SimBackend
from .fabric import Fabric
from .hardware import ServerSpec, vllm_limits
from .reclaim import Lender, LoadStep
from .workload import MODELS, Arrival, Costs, kv_budget_tokens

POLICIES = ("fcfs", "reserve", "host_swap", "aqua", "recompute")
BLOCK_TOKENS = 16  # KV-cache block (vLLM's default): the unit of a dirty copy


@dataclass(frozen=True)
class SimTenant:
    """An LLM served on one GPU (a consumer of offload memory)."""

    name: str
    model: str  # key of workload.MODELS
    gpu: int
    share: float = 1.0  # of the GPU's KV room, when tenants share a GPU
    # KV-cache tokens the engine may keep resident, when set by the engine
    # rather than derived from the GPU's memory (the CPU engine's budget).
    kv_budget: int | None = None


@dataclass(frozen=True)
class Scenario:
    server: ServerSpec
    tenants: tuple[SimTenant, ...]
    arrivals: tuple[Arrival, ...]
    spare: dict[int, int] = field(default_factory=dict)  # GPU -> bytes others may lease
    slice_tokens: int = 5  # the paper's CFS slice: 5 decode iterations
    quantum_s: float = Limits.quantum_s  # GPU time slice between tenants sharing a GPU
    grace_s: float = 10.0  # longer than any one engine step (a burst's prefill)
    # The paper's incremental swap-out: a resumed request keeps its lease,
    # so its next page-out copies only what changed. "all"; "none"; "host":
    # only leases in host DRAM are kept (peer HBM is scarce: a resident
    # request does not sit on it), which treats aqua's leases differently from
    # host_swap's, so it is not the default. "whole": the lease is kept, but
    # every page-out copies the whole cache (the CPU engine's LeaseKV).
    incremental: str = "all"
    # Cap on paging time as a fraction of compute (PromptScheduler stretches
    # its slices to keep it); None rotates every slice_tokens steps whatever
    # paging costs.
    max_overhead: float | None = 0.02
    # A producer GPU's own model takes its spare memory back (aqua only:
    # the other policies lease no GPU memory).
    reclaim: LoadStep | None = None
    # The cost hook: per workload.MODELS key, an object with prefill(tokens,
    # prompts), decode(batch, kv_tokens) and step_s (see workload.Costs, the
    # GPU roofline used for models it does not name, and sim/cpu.py's fitted
    # StepCosts).
    costs: Mapping[str, Any] | None = None
    # The engine's (max_num_seqs, max_batched_tokens) for fcfs; None:
    # `vllm serve`'s defaults for the GPU.
    engine_limits: tuple[int, int] | None = None
    # What a lease request costs the engine before its copy can start (a
    # round trip to aquad; 0: instantaneous, as at paper scale it is noise).
    control_latency_s: float = 0.0
    # Compute devices that are really CPU cores shared by every engine (the
    # CPU engine: one tenant process per "device", all on the same cores):
    # per workload.MODELS key, how many times slower its steps compute while
    # 1, 2, ... engines have work (measured; the first entry is 1). None:
    # every device computes on its own (GPUs).
    contention: Mapping[str, tuple[float, ...]] | None = None
    # Step-cost scatter: the CPU engine's forwards do not all cost their
    # mean (its fit misses single steps by 20-30 % RMS, and the OS
    # deschedules some). Per workload.MODELS key, (prefill, decode): per
    # number of engines with work (1, 2, ...; the last for more), quantiles
    # (0 .. 100 %, evenly spaced) of a forward's cost over its modelled
    # one, as timed; each forward draws a factor from them (inverse CDF,
    # random.Random(seed)). None: every forward costs its model, and a run
    # is deterministic.
    scatter: Mapping[str, tuple[tuple[tuple[float, ...], ...], ...]] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ValueError("a scenario needs at least one tenant")
        if self.incremental not in ("host", "all", "none", "whole"):
            raise ValueError("incremental must be host, all, none or whole")
        if self.control_latency_s < 0:
            raise ValueError("control_latency_s must be >= 0")
        for key, table in (self.contention or {}).items():
            if not table or min(table) <= 0:
                raise ValueError(f"contention for {key}: positive factors, one per busy count")
        for key, phases in (self.scatter or {}).items():
            if len(phases) != 2 or not all(phases) or any(
                    len(q) < 2 or min(q) <= 0 or list(q) != sorted(q)
                    for tables in phases for q in tables):
                raise ValueError(f"scatter for {key}: (prefill, decode), each per busy count "
                                 "at least two positive quantiles in order")
        for t in self.tenants:
            if t.model not in MODELS:
                raise ValueError(f"tenant {t.name}: unknown model {t.model!r}; "
                                 f"known: {sorted(MODELS)}")
            if not 0 <= t.gpu < self.server.gpus:
                raise ValueError(f"tenant {t.name}: no GPU {t.gpu}")
        for a in self.arrivals:
            if not 0 <= a.tenant < len(self.tenants):
                raise ValueError(f"arrival at {a.t}s names tenant {a.tenant}")


@dataclass
class Held:
    """A request's offload copy: its lease and how much of it is current."""

    lease: str
    device: int
    tier: str
    nbytes: int  # lease size
    valid: int  # tokens the copy holds
    ready_at: float = 0.0  # when copies into it (a page-out, a move) are done
    releasing: bool = False  # released when the step reading it ends


class SimEngine:
    """One tenant's serving engine, as a state machine in virtual time."""

    def __init__(self, sim: Simulation, index: int, spec: SimTenant) -> None:
        self.sim = sim
        self.spec = spec
        self.gpu = spec.gpu
        model = MODELS[spec.model]
        self.kv_bytes = model.kv_bytes_per_token
        hook = (sim.scenario.costs or {}).get(spec.model)
        self.costs = hook if hook is not None else Costs(model, sim.server.gpu)
        # Every model on this GPU keeps its weights there; the KV room left is
        # split by share.
        others = sum(MODELS[t.model].weight_bytes for t in sim.scenario.tenants
                     if t.gpu == spec.gpu and t is not spec)
        budget = spec.kv_budget or kv_budget_tokens(model, sim.server.gpu, share=spec.share,
                                                    other_weights=others)
        seqs, tokens = sim.scenario.engine_limits or vllm_limits(sim.server.gpu)
        self.sched = PromptScheduler(
            sim.policy if sim.policy in ("fcfs", "reserve") else "fair", budget,
            sim.scenario.slice_tokens, sim.scenario.max_overhead,
            max_num_seqs=seqs, max_batched_tokens=tokens, block_tokens=BLOCK_TOKENS)
        self.conn = f"engine-{index}".encode()
        self.peer = Peer(pid=100_000 + index, uid=0, gid=0)
        self._ids = itertools.count(1)
        self.call(m.Hello(tenant=spec.name, devices=[spec.gpu]))
        # The client library's own turn machine, on the virtual clock.
        self.turns = TurnMachine(clock=lambda: sim.now)
        self.requests: list[Request] = []
        self.leases: dict[int, Held] = {}  # request -> its offload copy
        self.dropped: set[int] = set()  # paused requests whose KV must be recomputed
        self.recomputed_tokens = 0
        self.lease_failures = 0
        self.paging_stall_s = 0.0  # step time spent waiting for copies
        # Elastic memory: every live lease by id (also those a step releases
        # at its end), moves in flight by the old lease's id, and what the
        # reclaims cost this engine.
        self.by_lease: dict[str, tuple[int, Held]] = {}
        self.inflight: dict[str, tuple[int, Held]] = {}
        self.fenced_ids: set[str] = set()
        self.moves: list[dict] = []
        self.fenced = 0
        self.move_drops = 0
        self.steps = 0
        self._last_tier = ""  # tier of the last lease aquad placed for us

    def call(self, op: m.Op) -> dict:
        return self.sim.arbiter.handle(self.conn, self.peer, m.Request(next(self._ids), op)).result

    def ask(self, op: m.Op) -> Any:
        """call(), the result as the struct a client reads (the turn machine's input)."""
        return m.as_result(type(op), self.call(op))

    # --- events ---------------------------------------------------------------

    def arrive(self, arrival: Arrival) -> None:
        req = Request(len(self.requests), range(arrival.prompt), arrival.max_new,
                      arrival.t, self.spec.name)
        self.sched.arrive(req)
        self.requests.append(req)
        if not self.turns.active:
            self._want_turn()

    def on_event(self, name: str, data: dict) -> None:
        if name == "reclaim":
            self._move_leases(data["leases"])
        elif name == "fenced":
            self._fenced(data["leases"])
        # A revocation does not cut the step in flight short (a step cannot
        # be); _after_step sees it.
        elif self.turns.on_event(m.as_event(name, data)) == "granted":
            self._run_or_finish()

    # --- elastic memory: a lender takes its memory back ------------------------

    def _hold(self, rid: int, held: Held) -> None:
        self.leases[rid] = held
        self.by_lease[held.lease] = (rid, held)

    def _let_go(self, held: Held) -> None:
        """Release a lease now (a move in flight releases the old one itself;
        a fenced one is gone already)."""
        if self.by_lease.pop(held.lease, None) is not None:
            self.call(m.Release(lease=held.lease))

    def _move_leases(self, ids: list[str]) -> None:
        """What the client library does on a notice: for each lease, a
        replacement (`move`), a copy of what it holds, then the old lease
        released once the copy is done."""
        now = self.sim.now
        for lease_id in ids:
            rid, held = self.by_lease.get(lease_id, (-1, None))
            if held is None or held.releasing:
                continue  # gone already, or freed when the step reading it ends
            try:
                reply = self.call(m.Move(lease=lease_id))
            except ProtocolError as exc:
                if exc.code != ErrorCode.OUT_OF_MEMORY:
                    raise
                # No room anywhere: a GPU engine has no memory of its own to
                # spare, so the copy is dropped (recomputed on resume).
                self.move_drops += 1
                self._lose(rid, held)
                self._let_go(held)
                continue
            nbytes = held.valid * self.kv_bytes  # the engine copies what is current
            fabric = self.sim.fabric
            busy = sum(fabric.busy_s.values())
            end = fabric.copy(held.device, reply["device"], nbytes, max(now, held.ready_at))
            self.moves.append({"from": held.device, "to": reply["device"], "tier": reply["tier"],
                               "nbytes": nbytes, "lease_bytes": held.nbytes, "notice": now,
                               "end": end, "copy_s": sum(fabric.busy_s.values()) - busy})
            del self.by_lease[lease_id]
            held.lease, held.device, held.tier = reply["lease"], reply["device"], reply["tier"]
            held.ready_at = end
            self.by_lease[held.lease] = (rid, held)
            self.inflight[lease_id] = (rid, held)
            self.sim.at(end, self._moved, lease_id)

    def _moved(self, old_id: str) -> None:
        self.inflight.pop(old_id, None)
        if old_id not in self.fenced_ids:
            self.call(m.Release(lease=old_id))

    def _fenced(self, ids: list[str]) -> None:
        """aquad fenced leases at the deadline: their bytes are gone, and a
        move still copying out of one has copied nothing usable."""
        for lease_id in ids:
            self.fenced_ids.add(lease_id)
            self.fenced += 1
            moving = self.inflight.get(lease_id)
            if moving is not None:
                rid, held = moving
                if held.lease in self.by_lease and not held.releasing:
                    self._lose(rid, held)
                    self._let_go(held)  # the half-filled replacement
                continue
            rid, held = self.by_lease.pop(lease_id, (-1, None))
            if held is not None:
                self._lose(rid, held)

    def _lose(self, rid: int, held: Held) -> None:
        """The offload copy of request `rid` is gone: a paused request
        recomputes its cache on resume; a resident one still has it."""
        if self.leases.get(rid) is held:
            del self.leases[rid]
        req = self.requests[rid]
        if req.state != "resident" and not req.done:
            self.dropped.add(rid)

    # --- turns ----------------------------------------------------------------

    def _want_turn(self) -> None:
        if self.turns.on_reply(self.ask(self.turns.begin())):
            self._start_step()

    def _run_or_finish(self) -> None:
        """Holding a slice: step if there is work, else give the slice back."""
        if self.sched.pending:
            self._start_step()
        else:
            self.call(self.turns.done())

    def _after_step(self) -> None:
        # Preempted or revoked with work left: yield (for a revoked slice
        # that queues us again). With nothing left, done serves as the yield.
        if self.turns.must_yield and self.sched.pending:
            request = self.turns.yield_()
            if request is not None and self.turns.on_reply(self.ask(request)):
                self._start_step()
        else:
            self._run_or_finish()

    # --- one engine step -----------------------------------------------------

    def _context(self, r: Request) -> int:
        return len(r.prompt) + len(r.tokens)

    def _start_step(self) -> None:
        self.steps += 1
        sim, now = self.sim, self.sim.now
        plan = self.sched.plan()
        self.dropped.update(r.id for r in plan.drop)  # preempted by recompute
        if not plan.run:
            raise RuntimeError(f"{self.spec.name}: pending requests but nothing to run")
        fabric = sim.fabric
        begin = now + self.costs.step_s  # what every step pays first
        out_end = begin
        for r in plan.preempt:
            out_end = max(out_end, self._page_out(r, begin))
        in_end, prefill, fresh, releases = out_end, 0, [], []
        recomputed = n_recomputed = 0
        for r in plan.resume:
            held = self.leases.get(r.id)  # a dropped cache has no lease
            if held is not None:
                ctx = self._context(r)
                in_end = max(in_end, fabric.copy(held.device, self.gpu, ctx * self.kv_bytes,
                                                 max(out_end, held.ready_at)))
                if self._keeps(held.tier):
                    held.valid = ctx
                else:
                    del self.leases[r.id]
                    held.releasing = True
                    releases.append(held)  # freed once the copy is done
            else:
                # A new prompt, or one whose cache was dropped: prefill it.
                # Either way the prefill yields the request's next token.
                if r.id in self.dropped:
                    self.dropped.discard(r.id)
                    recomputed += self._context(r)
                    n_recomputed += 1
                prefill += self._context(r)
                fresh.append(r)
        self.paging_stall_s += in_end - now
        self.recomputed_tokens += recomputed
        pre_slow = dec_slow = 1.0
        scenario = self.sim.scenario
        if scenario.contention or scenario.scatter:  # the CPU engine: count who computes
            busy = sum(1 for e in self.sim.engines if e.sched.pending)
            slow = self._slowdown(busy)
            pre_slow, dec_slow = slow * self._scatter(0, busy), slow * self._scatter(1, busy)
        recompute_s = pre_slow * self.costs.prefill(recomputed, n_recomputed)
        prefill_end = in_end + pre_slow * self.costs.prefill(prefill, len(fresh))
        fresh_ids = {r.id for r in fresh}
        decode = [r for r in plan.run if r.id not in fresh_ids]
        kv_tokens = sum(self._context(r) for r in decode)
        decode_end = prefill_end + dec_slow * self.costs.decode(len(decode), kv_tokens)
        # Switching costs what the step waited for copies, or what it spent
        # recomputing dropped caches.
        self.sched.record_step(in_end - now + recompute_s, decode_end - in_end - recompute_s)
        # A batched prefill emits each prompt's first token as its part is
        # done (the way chunked prefill does), not all at the batch's end.
        firsts, done_tokens = [], 0
        for i, r in enumerate(fresh):
            done_tokens += self._context(r)
            firsts.append(in_end + pre_slow * self.costs.prefill(done_tokens, i + 1))
        sim.at(decode_end, self._step_done, (fresh, firsts, decode, decode_end, releases))

    def _scatter(self, phase: int, busy: int) -> float:
        """This forward's cost over its model (phase 0: prefill, 1: decode)
        with `busy` engines computing: drawn from the measured quantiles
        (Scenario.scatter), for both phases every step whether or not the
        phase runs, so the stream of draws does not depend on the plan; 1
        without scatter."""
        phases = (self.sim.scenario.scatter or {}).get(self.spec.model)
        if not phases:
            return 1.0
        tables = phases[phase]
        q = tables[min(busy, len(tables)) - 1]
        u = self.sim.rng.random() * (len(q) - 1)
        i = int(u)
        return q[i] + (u - i) * (q[min(i + 1, len(q) - 1)] - q[i])

    def _slowdown(self, busy: int) -> float:
        """How much slower this step computes: with the engines that have
        work (an engine with nothing pending sleeps, as the replay's tenants
        do) sharing the cores, as measured (Scenario.contention); beyond the
        measured counts, proportionally more. Sampled when a step starts: a
        step is short against how long the set of busy engines lasts."""
        return contention_factor((self.sim.scenario.contention or {}).get(self.spec.model),
                                 busy)

    def _keeps(self, tier: str) -> bool:
        """Does a resumed request keep a lease on this tier (incremental
        swap-out)?"""
        mode = self.sim.scenario.incremental
        return mode in ("all", "whole") or (mode == "host" and tier == "host")

    def _page_out(self, r: Request, now: float) -> float:
        if self.sim.policy == "recompute":
            self.dropped.add(r.id)
            return now
        ctx = self._context(r)
        nbytes = ctx * self.kv_bytes
        held = self.leases.get(r.id)
        if held is not None and nbytes <= held.nbytes:
            # Incremental swap-out: the copy from the last page-out is still
            # valid; send only the blocks written since, plus the last
            # (partly filled, so dirty) one.
            start = held.valid - held.valid % BLOCK_TOKENS
            if self.sim.scenario.incremental == "whole":
                start = 0
            held.valid = ctx
            held.ready_at = self.sim.fabric.copy(self.gpu, held.device,
                                                 (ctx - start) * self.kv_bytes,
                                                 max(now, held.ready_at))
            return held.ready_at
        if held is not None or self._keeps(self._last_tier):
            # A lease that will be kept is sized for all the request can
            # grow to, so it never moves again. Where the last lease landed
            # predicts where this one will.
            nbytes = r.reserve * self.kv_bytes
        if held is not None:  # outgrown: start over in a bigger lease
            del self.leases[r.id]
            self._let_go(held)
        now += self.sim.scenario.control_latency_s  # the lease's round trip
        try:
            reply = self.call(m.Lease(nbytes=nbytes, near=self.gpu))
        except ProtocolError as exc:
            if exc.code != ErrorCode.OUT_OF_MEMORY:
                raise
            # Nowhere to put it: drop the cache, as an engine out of swap
            # space does, and recompute it on resume.
            self.lease_failures += 1
            self.dropped.add(r.id)
            self.sched.offload_full()
            return now
        self._last_tier = reply["tier"]
        held = Held(reply["lease"], reply["device"], reply["tier"], nbytes, ctx)
        self._hold(r.id, held)
        self.sched.offload_ok(r)
        self.sim.note_leased()
        held.ready_at = self.sim.fabric.copy(self.gpu, reply["device"], ctx * self.kv_bytes, now)
        return held.ready_at

    def _step_done(self, args: tuple) -> None:
        fresh, firsts, decode, decode_end, releases = args
        for held in releases:
            self._let_go(held)
        for r, t in zip(fresh, firsts):
            r.prefilled = True
            self._emit(r, t)
        for r in decode:
            if r.state == "resident":
                self._emit(r, decode_end)
        self._after_step()

    def _emit(self, r: Request, t: float) -> None:
        r.tokens.append(0)
        r.token_times.append(t)
        if r.done:
            self.sched.finished(r)
            held = self.leases.pop(r.id, None)
            if held is not None:
                self._let_go(held)


class Simulation:
    def __init__(self, scenario: Scenario, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.scenario = scenario
        self.server = scenario.server
        self.policy = policy
        self.now = 0.0
        self.rng = random.Random(scenario.seed)  # step-cost scatter's draws
        spare = scenario.spare if policy == "aqua" else {}
        # host_swap gets what aqua leases from peers as host memory instead.
        extra_host = sum(scenario.spare.values()) if policy == "host_swap" else 0
        self.arbiter = Arbiter(
            SimBackend(self.server.topology(spare, extra_host)), clock=lambda: self.now,
            limits=Limits(max_tenants=len(scenario.tenants) + 1, max_leases_per_tenant=1 << 30,
                          heartbeat_timeout_s=math.inf, quantum_s=scenario.quantum_s,
                          grace_s=scenario.grace_s,
                          # One operator's server: its engines share one uid.
                          quotas=UNLIMITED))
        self.fabric = Fabric(self.server, clock=lambda: self.now)
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self._tick_at: float | None = None
        self.peak_leased: dict[int, int] = {d: 0 for d in self.arbiter.pools}
        self.engines = [SimEngine(self, i, t) for i, t in enumerate(scenario.tenants)]
        self._by_conn: dict[bytes, Any] = {e.conn: e for e in self.engines}
        self.lender: Lender | None = None
        if scenario.reclaim is not None and policy == "aqua" and scenario.spare:
            self.lender = Lender(self, scenario.reclaim, len(self.engines))
            self._by_conn[self.lender.conn] = self.lender
        for a in scenario.arrivals:
            self.at(a.t, self.engines[a.tenant].arrive, a)

    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, arg))

    def note_leased(self) -> None:
        for d, pool in self.arbiter.pools.items():
            if pool.used > self.peak_leased[d]:
                self.peak_leased[d] = pool.used

    def _tick(self, _: Any) -> None:
        self._tick_at = None
        self.arbiter.tick()

    def _dispatch(self) -> None:
        # Events the arbiter produced (grants, preemptions) go to their
        # engines at once: in virtual time delivery is instantaneous.
        while events := self.arbiter.take_events():
            for conn, name, data in events:
                self._by_conn[conn].on_event(name, data)
        deadline = self.arbiter.next_deadline()
        if deadline is not None and (self._tick_at is None or deadline < self._tick_at):
            self._tick_at = max(deadline, self.now)
            self.at(self._tick_at, self._tick)

    def run(self) -> dict:
        t0 = time.perf_counter()
        heap = self._heap
        while heap:
            t, _, fn, arg = heapq.heappop(heap)
            self.now = t
            fn(arg)
            self._dispatch()
        result = self.results()
        result["wall_s"] = time.perf_counter() - t0
        return result

    def results(self) -> dict:
        reqs = [r for e in self.engines for r in e.requests]
        host = self.server.host_device
        by_tier: dict[str, int] = {}
        for (src, dst), n in self.fabric.bytes.items():
            tier = self.fabric.tier(src, dst)
            by_tier[tier] = by_tier.get(tier, 0) + n
        return {
            "policy": self.policy,
            "requests": len(reqs),
            "completed": sum(1 for r in reqs if r.done),
            **service_summary((r.arrival, r.token_times) for r in reqs),
            "preemptions": sum(r.preemptions for r in reqs),
            "bytes_paged": sum(self.fabric.bytes.values()),
            "bytes_by_tier": by_tier,
            "bytes_by_link": {f"{_dev(s, host)}->{_dev(d, host)}": n
                              for (s, d), n in sorted(self.fabric.bytes.items())},
            "copy_busy_s_by_tier": dict(self.fabric.busy_s),
            "paging_stall_s": sum(e.paging_stall_s for e in self.engines),
            "recomputed_tokens": sum(e.recomputed_tokens for e in self.engines),
            "lease_failures": sum(e.lease_failures for e in self.engines),
            "peak_leased_bytes": {_dev(d, host): n for d, n in self.peak_leased.items() if n},
            "steps": sum(e.steps for e in self.engines),
            "reclaim": self._reclaim_results(),
        }

    def _reclaim_results(self) -> dict | None:
        """What the lender's load step took and what moving cost (None
        without one)."""
        lender = self.lender
        if lender is None or lender.reply is None:
            return None
        report = lender.report or {}
        moves = [mv for e in self.engines for mv in e.moves]
        copied: dict[str, int] = {}
        for mv in moves:
            tier = self.fabric.tier(mv["from"], mv["to"])
            copied[tier] = copied.get(tier, 0) + mv["nbytes"]
        notified = lender.reply["leases"]
        return {
            "at_s": lender.step.at_s, "gpu": lender.gpu, "deadline_s": lender.step.deadline_s,
            "requested_bytes": lender.reply["requested_bytes"],
            "taken_bytes": lender.reply["taken_bytes"],
            "leases_notified": len(notified),
            "bytes_notified": sum(x["nbytes"] for x in notified),
            "state": report.get("state", "pending"),
            "moved_count": report.get("moved_count", 0),
            "moved_bytes": report.get("moved_bytes", 0),
            "released_count": report.get("released_count", 0),
            "fenced_count": report.get("fenced_count", 0),
            "elapsed_s": report.get("elapsed_s", math.nan),
            "moves": len(moves),
            "copied_bytes": sum(mv["nbytes"] for mv in moves),
            "copied_by_tier": copied,
            "copy_s": sum(mv["copy_s"] for mv in moves),  # link time the copies took
            "moves_done_s": max((mv["end"] for mv in moves), default=lender.step.at_s)
            - lender.step.at_s,
            "fenced_seen": sum(e.fenced for e in self.engines),
            "dropped": sum(e.move_drops for e in self.engines),
        }


def contention_factor(table: tuple[float, ...] | None, busy: int) -> float:
    """A model's slowdown with `busy` engines computing, from its measured
    table (Scenario.contention: one factor per count from 1); beyond the
    measured counts, proportionally more; 1 without a table."""
    if not table:
        return 1.0
    n = len(table)
    return table[min(busy, n) - 1] * max(1.0, busy / n)


def _dev(d: int, host: int) -> str:
    return "host" if d == host else f"gpu{d}"
