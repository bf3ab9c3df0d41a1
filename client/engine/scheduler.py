"""Which prompts run next: a deterministic, I/O-free prompt scheduler.

Two policies over the same requests and the same KV-cache budget:

- ``fcfs``: what batching engines do under a burst. Requests are admitted in
  arrival order while their whole KV cache (prompt + max new tokens) fits;
  an admitted request runs to completion; the rest wait. No preemption.
- ``fair``: prompt-level time sharing in the paper's manner. Every arrived
  request is active; the resident set (whose KV cache is in memory) holds the
  requests with the fewest generated tokens (ties by arrival) that fit, so a
  newly arrived prompt displaces running ones at once and gets its first
  token quickly (while any prompt waits for its first token the set is
  re-chosen every step). Otherwise it is re-chosen every `slice_tokens` steps;
  a request that leaves it is preempted (its KV cache paged out) and is
  resumed (paged in) when it is chosen again.

The engine asks `plan()` before every step and carries the plan out.
"""

from __future__ import annotations

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

    @property
    def reserve(self) -> int:
        """KV tokens the request can grow to."""
        return len(self.prompt) + self.max_new_tokens

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None


@dataclass
class Plan:
    preempt: list[Request]  # page out, then they are no longer resident
    resume: list[Request]  # page in (prefilled before) or prefill (new)
    run: list[Request]  # decode one token each (resident, in this order)


class PromptScheduler:
    def __init__(self, policy: str, kv_budget_tokens: int, slice_tokens: int = 5) -> None:
        if policy not in ("fcfs", "fair"):
            raise ValueError(f"policy must be fcfs or fair, got {policy!r}")
        if kv_budget_tokens <= 0 or slice_tokens <= 0:
            raise ValueError("budget and slice must be positive")
        self.policy = policy
        self.budget = kv_budget_tokens
        self.slice_tokens = slice_tokens
        self.requests: list[Request] = []
        self._steps_in_slice = 0
        self._dirty = True  # something arrived or finished: re-plan now

    def arrive(self, request: Request) -> None:
        if request.reserve > self.budget:
            raise ValueError(f"request {request.id} needs {request.reserve} KV tokens; "
                             f"the budget is {self.budget}")
        self.requests.append(request)
        self._dirty = True

    def finished(self, request: Request) -> None:
        request.state = "done"
        self._dirty = True

    @property
    def pending(self) -> bool:
        return any(r.state != "done" for r in self.requests)

    def resident(self) -> list[Request]:
        return [r for r in self.requests if r.state == "resident"]

    def plan(self) -> Plan:
        if self.policy == "fcfs":
            return self._plan_fcfs()
        return self._plan_fair()

    def _plan_fcfs(self) -> Plan:
        resume = []
        used = sum(r.reserve for r in self.resident())
        for r in self.requests:  # arrival order; head-of-line blocking is the point
            if r.state != "waiting":
                continue
            if used + r.reserve > self.budget:
                break
            r.state = "resident"
            used += r.reserve
            resume.append(r)
        return Plan([], resume, self.resident())

    def _plan_fair(self) -> Plan:
        resident = self.resident()
        # Prompts still waiting for their first token cut every slice short:
        # a burst is prefilled at once, which is where responsiveness comes from.
        starving = any(r.state in ("waiting", "paused") and not r.tokens for r in self.requests)
        if (not self._dirty and not starving and self._steps_in_slice < self.slice_tokens
                and resident):
            self._steps_in_slice += 1
            return Plan([], [], resident)
        self._dirty = False
        self._steps_in_slice = 1
        active = sorted((r for r in self.requests if r.state != "done"),
                        key=lambda r: (len(r.tokens), r.arrival, r.id))
        chosen, used = [], 0
        for r in active:
            if used + r.reserve <= self.budget:
                chosen.append(r)
                used += r.reserve
        keep = {r.id for r in chosen}
        preempt = [r for r in resident if r.id not in keep]
        for r in preempt:
            r.state = "paused"
            r.preemptions += 1
        resume = [r for r in chosen if r.state != "resident"]
        for r in resume:
            r.state = "resident"
        return Plan(preempt, resume, self.resident())
