"""Which prompts run next: a deterministic, I/O-free prompt scheduler.

Three policies over the same requests and the same KV-cache budget:

- ``fcfs``: what vLLM's scheduler does (v1, the default configuration).
  Requests are admitted in arrival order while the KV blocks of their prompt
  fit, within `max_num_seqs` running and `max_batched_tokens` tokens per step
  (a prompt bigger than what is left of the step's tokens is admitted only
  as the step's first prefill: chunked prefill spreads it over steps, which
  this plan does not split). Every step each running request needs room for
  one more token; when the blocks run out the newest running request is
  preempted by recompute (its KV cache dropped, `Plan.drop`) and waits at the
  head of the queue; no request is admitted in a step that preempted.
- ``reserve``: strict reservation. Admitted in arrival order only while the
  whole KV cache a request can grow to (prompt + max new tokens) fits; an
  admitted request runs to completion; the rest wait. No preemption. Weaker
  than what engines ship (kept to compare with earlier figures).
- ``fair``: prompt-level time sharing in the paper's manner. Every arrived
  request is active; the resident set (whose KV cache is in memory) holds the
  requests with the fewest generated tokens (ties by arrival) that fit, so a
  newly arrived prompt displaces running ones at once and gets its first
  token quickly (while any prompt waits for its first token the set is
  re-chosen every step). Otherwise it is re-chosen every `slice_tokens` steps;
  a request that leaves it is preempted (its KV cache paged out) and is
  resumed (paged in) when it is chosen again. With `max_overhead`, the slice
  stretches so that switching (paging) costs at most that fraction of the
  time spent computing, as an OS sizes quanta against context-switch cost:
  cheap paging (NVLink) keeps slices short, dear paging (PCIe) makes them
  long instead of letting paging eat the GPU. Engines report both costs with
  `record_step()`.

The engine asks `plan()` before every step and carries the plan out.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    arrival: float
    tenant: str = ""
    tokens: list[int] = field(default_factory=list)  # generated so far
    token_times: list[float] = field(default_factory=list)
    state: str = "waiting"  # waiting | resident | paused | done
    prefilled: bool = False
    preemptions: int = 0
    reserve: int = field(init=False)  # KV tokens the request can grow to

    def __post_init__(self) -> None:
        self.reserve = len(self.prompt) + self.max_new_tokens

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens


POLICIES = ("fcfs", "reserve", "fair")
BLOCK_TOKENS = 16  # vLLM's default KV block


@dataclass
class Plan:
    preempt: list[Request]  # page out, then they are no longer resident
    resume: list[Request]  # page in (prefilled before) or prefill (new, or dropped)
    run: list[Request]  # decode one token each (resident, in this order)
    drop: list[Request] = field(default_factory=list)  # cache discarded: recompute on resume


class PromptScheduler:
    """Plans cost O(resident) between re-plans and O(active log active) at one,
    so the simulator can drive the same object through 10^4 requests."""

    def __init__(self, policy: str, kv_budget_tokens: int, slice_tokens: int = 5,
                 max_overhead: float | None = None, *, max_num_seqs: int = 256,
                 max_batched_tokens: int = 8192, block_tokens: int = BLOCK_TOKENS) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if kv_budget_tokens <= 0 or slice_tokens <= 0:
            raise ValueError("budget and slice must be positive")
        if max_overhead is not None and not 0 < max_overhead <= 1:
            raise ValueError("max_overhead must be in (0, 1]")
        if min(max_num_seqs, max_batched_tokens, block_tokens) <= 0:
            raise ValueError("max_num_seqs, max_batched_tokens and block_tokens must be positive")
        self.policy = policy
        self.budget = kv_budget_tokens
        # fcfs (vLLM's rules): the engine's limits, and its block size.
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.block_tokens = block_tokens
        self.slice_tokens = slice_tokens
        self.max_overhead = max_overhead
        self._switch_s = 0.0  # moving average of what a re-plan costs to carry out
        self._compute_s = 0.0  # moving average of a step's compute
        self.active: dict[int, Request] = {}  # not done, in submission order
        self._waiting: deque[Request] = deque()  # fcfs, reserve: not running, in order
        self._resident: list[Request] = []  # in submission order
        self._fresh: list[Request] = []  # may still lack a first token
        self._used = 0  # KV tokens reserved by resident requests
        self._steps_in_slice = 0
        self._dirty = True  # something arrived or finished: re-plan now
        self._freed = True  # a finish made room
        self._started: set[int] = set()  # admitted at least once, not done
        self._started_reserve = 0
        self.started_cap: int | None = None  # see offload_full()

    def arrive(self, request: Request) -> None:
        if request.reserve > self.budget:
            raise ValueError(f"request {request.id} needs {request.reserve} KV tokens; "
                             f"the budget is {self.budget}")
        if request.id in self.active:
            raise ValueError(f"request {request.id} is already active")
        self.active[request.id] = request
        if self.policy != "fair":
            self._waiting.append(request)
        self._fresh.append(request)
        self._dirty = True

    def finished(self, request: Request) -> None:
        if request.state == "resident":
            self._resident.remove(request)
            self._used -= request.reserve
        request.state = "done"
        self.active.pop(request.id, None)
        self._dirty = True
        self._freed = True
        if request.id in self._started:
            self._started.discard(request.id)
            self._started_reserve -= request.reserve
            if not self._started:
                self.started_cap = None  # nothing started: nothing to hold back

    def record_step(self, switch_s: float, compute_s: float) -> None:
        """What the last step cost: seconds paging (or recomputing) for its
        plan's preemptions and resumptions, and seconds computing."""
        if switch_s > 0:
            self._switch_s = switch_s if not self._switch_s else \
                0.7 * self._switch_s + 0.3 * switch_s
        if compute_s > 0:
            self._compute_s = compute_s if not self._compute_s else \
                0.9 * self._compute_s + 0.1 * compute_s

    @property
    def slice_steps(self) -> int:
        """Steps between rotations now (slice_tokens unless paging is dear)."""
        if self.max_overhead is None or self._compute_s <= 0:
            return self.slice_tokens
        need = self._switch_s / (self.max_overhead * self._compute_s)
        return max(self.slice_tokens, math.ceil(need))

    @property
    def pending(self) -> bool:
        return bool(self.active)

    def resident(self) -> list[Request]:
        return list(self._resident)

    def plan(self) -> Plan:
        return getattr(self, f"_plan_{self.policy}")()

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def _head(self) -> Request | None:
        """The first waiting request (fcfs, reserve), dropping finished ones."""
        while self._waiting and self._waiting[0].state == "done":
            self._waiting.popleft()
        return self._waiting[0] if self._waiting else None

    def _plan_fcfs(self) -> Plan:
        budget = self.budget // self.block_tokens
        running, waiting = self._resident, self._waiting
        # Room for the token this step adds to every running request's
        # cache (its context: vLLM allocates slots for computed + new
        # tokens, and the last generated token is this step's input); the
        # newest go first when there is none (vLLM preempts by recompute).
        # The oldest always runs: arrive() made sure it fits, up to the
        # rounding to whole blocks. tests/test_sim_vllm.py checks these rules
        # step for step against vLLM's own scheduler.
        need = sum(self._blocks(_context(r)) for r in running)
        drop: list[Request] = []
        while need > budget and len(running) > 1:
            victim = running.pop()
            need -= self._blocks(_context(victim))
            victim.state = "paused"
            victim.preemptions += 1
            drop.append(victim)
        for victim in drop:  # oldest first at the head of the queue
            waiting.appendleft(victim)
        resume: list[Request] = []
        tokens = self.max_batched_tokens - len(running)  # one per decode
        while not drop and len(running) < self.max_num_seqs and (r := self._head()):
            prefill = _context(r)  # the prompt, plus what it had generated if dropped
            if need + self._blocks(prefill) > budget:
                break  # head-of-line blocking, as in vLLM
            if prefill > tokens and resume:
                break  # this step's tokens are spent; it starts next step
            waiting.popleft()
            r.state = "resident"
            running.append(r)
            resume.append(r)
            need += self._blocks(prefill)
            tokens -= prefill
        return Plan([], resume, list(running), drop)

    def _plan_reserve(self) -> Plan:
        resume = []
        # Arrival order; head-of-line blocking is the point.
        while (r := self._head()) and self._used + r.reserve <= self.budget:
            self._waiting.popleft()
            r.state = "resident"
            self._used += r.reserve
            self._resident.append(r)
            resume.append(r)
        return Plan([], resume, list(self._resident))

    def _starving(self) -> list[Request]:
        """Prompts waiting, not resident, for their first token (pruning the
        list of those that may lack one as it goes)."""
        self._fresh = [r for r in self._fresh if not r.tokens and r.state != "done"]
        return [r for r in self._fresh if r.state != "resident"]

    def offload_full(self) -> None:
        """The engine could not page a request out: offload memory is used
        up. Start no more prompts than are started now (each started prompt
        needs room somewhere); see `offload_ok` for how the cap grows back.
        Without this, sustained overload would keep starting prompts and
        drop caches that must then be recomputed. Never below one budget's
        worth, so a prompt can always start when the GPU alone can hold it."""
        self.started_cap = max(self._started_reserve, self.budget)

    def offload_ok(self, request: Request) -> None:
        """A page-out found room: allow one more request's worth of started
        prompts (additive increase after offload_full's decrease, so the
        cap follows what the shared offload memory can take)."""
        if self.started_cap is not None:
            self.started_cap += request.reserve

    def _may_start(self, r: Request, started: int) -> bool:
        return (r.id in self._started or self.started_cap is None
                or started + r.reserve <= self.started_cap)

    def _plan_fair(self) -> Plan:
        # While offload memory is exhausted (started_cap set), slices do not
        # rotate: a rotation pages requests out that have nowhere to go. The
        # resident set runs on, and finishes make room, as under fcfs.
        slice_over = (self._steps_in_slice >= self.slice_steps
                      and self.started_cap is None) or not self._resident
        if not slice_over and not self._dirty and not self._starving():
            self._steps_in_slice += 1
            return Plan([], [], list(self._resident))
        self._dirty = False
        if slice_over:
            self._steps_in_slice = 1
            return self._rotate()
        # Mid-slice admission is part of the running slice: restarting it
        # here would let a prompt that cannot be admitted yet (held back by
        # the budget or by started_cap) stop rotation altogether.
        self._steps_in_slice += 1
        return self._admit()

    def _fill(self, candidates: Iterable[Request], used: int,
              started: int) -> list[Request]:
        """Greedily, fewest tokens first: every candidate that fits the budget
        (with `used` taken) and may start under the cap (`started` so far)."""
        chosen = []
        for r in sorted(candidates, key=lambda r: (len(r.tokens), r.arrival, r.id)):
            if used + r.reserve <= self.budget and self._may_start(r, started):
                chosen.append(r)
                used += r.reserve
                if r.id not in self._started:
                    started += r.reserve
        return chosen

    def _rotate(self) -> Plan:
        """End of a slice: the requests with the fewest tokens that fit."""
        chosen = self._fill(self.active.values(), 0, self._started_reserve)
        keep = {r.id for r in chosen}
        return self._apply([r for r in self._resident if r.id not in keep], chosen)

    def _admit(self) -> Plan:
        """Mid-slice (an arrival or a finish): prompts waiting for their first
        token displace the residents that generated most, the fewest needed;
        then free room goes to the rest by token count. Nobody else moves, so
        a stream of arrivals does not reshuffle the whole resident set."""
        used = self._used
        evictable = sorted((r for r in self._resident if r.tokens),
                           key=lambda r: (-len(r.tokens), -r.arrival, -r.id))
        evicted: list[Request] = []
        admitted: list[Request] = []
        starving = sorted(self._starving(), key=lambda r: (r.arrival, r.id))
        started = self._started_reserve
        for r in starving:
            if not self._may_start(r, started):
                break
            # Evict only if that makes the prompt fit; otherwise nobody moves.
            victims, freed = [], 0
            while used - freed + r.reserve > self.budget and len(victims) < len(evictable):
                victims.append(evictable[len(victims)])
                freed += victims[-1].reserve
            if used - freed + r.reserve > self.budget:
                break
            del evictable[:len(victims)]
            evicted += victims
            used -= freed
            admitted.append(r)
            used += r.reserve
            started += r.reserve
        out = {r.id for r in evicted}
        taken = {r.id for r in admitted}
        # Free room goes to the rest only when a finish made some: otherwise
        # whatever waits did not fit before and still does not.
        room = self.budget - used if self._freed else 0
        self._freed = False
        admitted += self._fill((r for r in self.active.values() if r.state != "resident"
                                and r.reserve <= room and r.id not in taken
                                and r.id not in out), used, started)
        chosen = [r for r in self._resident if r.id not in out] + admitted
        return self._apply(evicted, chosen)

    def _apply(self, preempt: list[Request], chosen: list[Request]) -> Plan:
        for r in preempt:
            r.state = "paused"
            r.preemptions += 1
        resume = [r for r in chosen if r.state != "resident"]
        for r in resume:
            r.state = "resident"
            if r.id not in self._started:
                self._started.add(r.id)
                self._started_reserve += r.reserve
        ids = {r.id for r in chosen}
        self._resident = [r for r in self.active.values() if r.id in ids]  # submission order
        self._used = sum(r.reserve for r in chosen)
        return Plan(preempt, resume, list(self._resident))


def _context(r: Request) -> int:
    """Tokens in a request's KV cache once its next token is computed from them."""
    return len(r.prompt) + len(r.tokens)
