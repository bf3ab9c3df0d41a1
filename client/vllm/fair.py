"""`FairScheduler`: the AQUA time-sharing policy as vLLM's `scheduler_cls`.

    LLM(..., scheduler_cls="aqua.vllm.FairScheduler",
        additional_config={"aqua_fair": {"paging_fraction": 0.1, "tenants": True}},
        kv_transfer_config=<the aqua offload tier, aqua.vllm.AquaOffloadingSpec>)

Stock vLLM runs requests first come, first served: a burst larger than the
KV cache waits behind the requests admitted first until they finish, and a
request preempted for room is recomputed. FairScheduler time-shares the
engine instead:

- Requests are served least attained service first: the fewest output
  tokens served (a new prompt has none, so it is admitted at once). A
  request never admitted goes before the admitted ones of its tenant, and
  then a request queued for more than `max_wait_steps` steps, so a
  preempted request is not kept out by newcomers for long.
- A running request keeps its place for a slice of `slice_steps` engine
  steps after it was (re)admitted, and then until its KV is at most a
  quarter block past a block boundary (only full blocks are offloaded).
  The slice is long enough that paging the request's KV out and back in
  costs at most `paging_fraction` of the compute of the slice:
  slice_steps = ceil(2 x kv_bytes / load_bandwidth / (paging_fraction x
  step_seconds)), step_seconds measured as the engine runs, clamped to
  [min_slice_steps, max_slice_steps].
- When a waiting request with less service needs room (a KV block count or
  a running slot), the most-served running requests whose slice is over are
  preempted, unless running requests that reach max_tokens within
  min_slice_steps steps free that room (the newcomer waits for them, as
  with stock vLLM). Their full KV blocks were already stored by the offload
  connector (aqua leases with `AquaOffloadingSpec`), so they resume by a
  reload; only the partly filled last block is computed again.
- Optional tenant fairness (`tenants`: true): a request's tenant is
  `SamplingParams(extra_args={"aqua_tenant": NAME})` (the one per-request
  field vLLM carries unchanged to its scheduler; absent: tenant ""). Each
  tenant has a virtual token counter (VTC: input tokens x `input_weight` +
  output tokens x `output_weight`), lifted to the least active tenant's
  counter when the tenant comes back from idle, and tenants with the lower
  counter go first, for admission and against preemption (a tenant's
  newcomers with one prompt of credit). While two tenants
  both have requests waiting, their counters stay within
  `service_gap_bound()` of each other.

The mechanism is vLLM's own: this class orders `running` and `waiting` and
preempts through `_preempt_request` before the stock `schedule()` step
runs, so chunked prefill, the connector and async scheduling behave as in
stock vLLM. `scheduler_cls="aqua.vllm.FairScheduler"` gives the
`AsyncScheduler` variant where vLLM enabled async scheduling (GPU) and the
`Scheduler` one where it did not (the CPU backend turns it off).

vLLM marks the scheduler interface experimental: this module is pinned to
the vLLM it was tested with (`TESTED_VLLM`) and refuses any other at engine
start unless AQUA_FAIR_ANY_VLLM=1.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, fields
from typing import Any

import vllm
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

TESTED_VLLM = "0.32.0"
CONFIG_KEY = "aqua_fair"  # the key of vllm_config.additional_config
TENANT_ARG = "aqua_tenant"  # the SamplingParams.extra_args key naming a tenant


@dataclass(frozen=True)
class FairSettings:
    """additional_config["aqua_fair"] keys (all optional)."""

    paging_fraction: float = 0.1  # most paging time per slice, of its compute time
    load_gbps: float = 8.0  # assumed KV reload (and store) bandwidth, GB/s
    min_slice_steps: int = 8
    max_slice_steps: int = 256
    max_wait_steps: int = 64  # a request queued longer goes first (within its tenant)
    tenants: bool = False  # VTC tenant fairness
    input_weight: float = 1.0  # VTC weights (the VTC paper's defaults)
    output_weight: float = 2.0

    @classmethod
    def from_config(cls, raw: Any) -> FairSettings:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"additional_config[{CONFIG_KEY!r}] must be a dict, got {raw!r}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(raw) - set(known)
        if unknown:
            raise ValueError(f"unknown {CONFIG_KEY} settings: {sorted(unknown)} "
                             f"(known: {sorted(known)})")
        settings = cls(**raw)
        if not 0 < settings.paging_fraction <= 1:
            raise ValueError(f"{CONFIG_KEY}.paging_fraction must be in (0, 1]")
        if settings.load_gbps <= 0:
            raise ValueError(f"{CONFIG_KEY}.load_gbps must be > 0")
        if not 1 <= settings.min_slice_steps <= settings.max_slice_steps:
            raise ValueError(f"{CONFIG_KEY}: need 1 <= min_slice_steps <= max_slice_steps")
        if settings.max_wait_steps < 1:
            raise ValueError(f"{CONFIG_KEY}.max_wait_steps must be >= 1")
        if settings.input_weight < 0 or settings.output_weight <= 0:
            raise ValueError(f"{CONFIG_KEY}: weights must be >= 0 (output > 0)")
        return settings


def check_vllm_version(version: str = vllm.__version__) -> None:
    """The scheduler reaches into vLLM internals that change between
    releases: fail loudly on an untested vLLM rather than misbehave."""
    if version != TESTED_VLLM and os.environ.get("AQUA_FAIR_ANY_VLLM") != "1":
        raise RuntimeError(
            f"aqua.vllm.FairScheduler was tested with vLLM {TESTED_VLLM}, not {version}: "
            "its scheduler internals may differ (set AQUA_FAIR_ANY_VLLM=1 to try anyway)")


def tenant_of(request: Request) -> str:
    extra = request.sampling_params.extra_args if request.sampling_params else None
    return str(extra.get(TENANT_ARG, "")) if extra else ""


_SCHEDULABLE = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class FairScheduler(Scheduler):
    """See the module docstring. Constructing `FairScheduler` gives an
    `AsyncFairScheduler` when vLLM enabled async scheduling."""

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is FairScheduler:
            cls = cls.variant_for(kwargs.get("vllm_config") or args[0])
        return super().__new__(cls)

    @staticmethod
    def variant_for(vllm_config: Any) -> type[FairScheduler]:
        return (AsyncFairScheduler if vllm_config.scheduler_config.async_scheduling
                else FairScheduler)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)
        if self.policy != SchedulingPolicy.FCFS:
            raise ValueError("aqua.vllm.FairScheduler orders requests itself: "
                             "leave scheduling_policy at 'fcfs'")
        self.fair = FairSettings.from_config(
            (self.vllm_config.additional_config or {}).get(CONFIG_KEY))
        spec_bytes = sum(group.kv_cache_spec.page_size_bytes * len(group.layer_names)
                         for group in self.kv_cache_config.kv_cache_groups)
        self.kv_bytes_per_token = spec_bytes / self.block_size
        self.served: dict[str, int] = {}  # request id -> output tokens served
        self.high_water: dict[str, int] = {}  # request id -> most tokens ever computed
        self.admitted_at: dict[str, int] = {}  # request id -> step of its last admission
        self.queued_at: dict[str, int] = {}  # request id -> step it was first seen waiting
        self.vtc: dict[str, float] = {}  # tenant -> virtual token counter
        self.step_seconds = 0.0  # EWMA of the time between busy steps
        self._last_step_at: float | None = None
        self.fair_preemptions = 0  # preemptions this policy made (stock's are counted apart)
        self.deferred_preemptions = 0  # steps a preemption waited for room freed soon
        self.max_backlogged_gap = 0.0  # largest VTC gap seen between waiting tenants

    # --- the policy --------------------------------------------------------

    def slice_steps(self, request: Request) -> int:
        """Steps a (re)admitted request runs before it may be preempted."""
        f = self.fair
        if self.step_seconds <= 0:
            return f.min_slice_steps
        paging_s = 2 * self.kv_bytes_per_token * request.num_tokens / (f.load_gbps * 1e9)
        steps = math.ceil(paging_s / (f.paging_fraction * self.step_seconds))
        return max(f.min_slice_steps, min(f.max_slice_steps, steps))

    def first_token_credit(self) -> float:
        """How far a tenant's counter may be ahead of another's and its new
        requests still be admitted before the other's waiting ones: one
        whole prompt's worth."""
        return self.fair.input_weight * self.max_model_len if self.fair.tenants else 0.0

    def service_gap_bound(self) -> float:
        """The most two backlogged tenants' counters drift apart: the
        newcomers' credit (first_token_credit), one admission (a whole
        prompt) and a full batch running out its longest slices (up to a
        block more, to end on a block boundary) before the lagging tenant's
        next admission."""
        f = self.fair
        return (self.first_token_credit() + f.input_weight * self.max_model_len
                + f.output_weight * self.max_num_running_reqs
                * (f.max_slice_steps + self.block_size))

    def _key(self, request: Request) -> tuple[float, int, int, float]:
        """Least first: the tenant's counter (with `tenants`), then requests
        never admitted (a newcomer's first token waits for one slice, not
        for the preempted requests it would otherwise queue behind), then
        requests queued longer than max_wait_steps (least attained service
        alone would keep a preempted request waiting while newcomers catch
        up), then output tokens served, then arrival."""
        req_id = request.request_id
        tenant = self.vtc.get(tenant_of(request), 0.0) if self.fair.tenants else 0.0
        if req_id not in self.admitted_at:
            rank = 0
            # A newcomer's tenant gets one whole prompt of credit: its first
            # token does not wait for every other tenant to catch up with a
            # counter a little ahead (service_gap_bound counts the credit).
            tenant -= self.first_token_credit()
        else:
            queued = self.queued_at.get(req_id)
            patient = queued is None or self.current_step - queued <= self.fair.max_wait_steps
            rank = 2 if patient else 1
        return (tenant, rank, self.served.get(req_id, 0), request.arrival_time)

    def _preemptible(self, request: Request) -> bool:
        """Its slice is over, and it is at most a quarter block past a block
        boundary: the connector stores full blocks only, so the tokens of a
        partly filled last block are computed again at resume."""
        ran = self.current_step - self.admitted_at.get(request.request_id, 0)
        tail = request.num_computed_tokens % self.block_size
        return (request.status == RequestStatus.RUNNING
                and ran >= self.slice_steps(request)
                and tail <= self.block_size // 4
                and self._request_blocks_can_be_freed(request))

    def _victim_for(self, waiting: Request) -> Request | None:
        """The most-served preemptible running request with more service
        than `waiting` (`running` is sorted least served first)."""
        key = self._key(waiting)
        for request in reversed(self.running):
            if self._key(request) <= key:
                return None
            if self._preemptible(request):
                return request
        return None

    def _blocks_needed(self, request: Request) -> int:
        return -(-(request.num_tokens + 1) // self.block_size)

    def _finishing_soon(self) -> tuple[int, int]:
        """(KV blocks, running slots) that running requests free within
        min_slice_steps steps by reaching max_tokens (a stop token only
        frees them sooner): a waiting request that fits in them waits that
        long, as it would for a preempted request's slice, without the
        preemption's store and reload."""
        horizon = self.fair.min_slice_steps
        blocks = slots = 0
        for request in self.running:
            if request.max_tokens - request.num_output_tokens <= horizon:
                blocks += -(-request.num_computed_tokens // self.block_size)
                slots += 1
        return blocks, slots

    def _time_share(self) -> None:
        """Order the queues least served first and preempt the most-served
        running requests whose slice is over for waiting requests with less
        service that would not fit otherwise."""
        self.running.sort(key=self._key)  # stock preempts running[-1] for room
        for request in self.waiting:
            self.queued_at.setdefault(request.request_id, self.current_step)
        ordered = self._sort_waiting()
        if self._preempt_for(ordered):
            # _preempt_request puts a victim at the head of `waiting`: left
            # there, stock would resume it at once, ahead of the request it
            # made room for.
            self._sort_waiting()

    def _sort_waiting(self) -> list[Request]:
        ordered = sorted(self.waiting, key=self._key)
        self.waiting.clear()
        self.waiting.extend(ordered)
        return ordered

    def _preempt_for(self, ordered: list[Request]) -> bool:
        """Preempt for the waiting requests, least key first, that would not
        fit; True if any request was preempted."""
        preempted = False
        if self.kv_holding_waiting:
            return preempted  # stock admits those first; leave their step alone
        free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        # Decode growth of the running batch comes out of the same pool.
        free -= sum(1 for r in self.running if r.num_tokens % self.block_size == 0)
        slots = self.max_num_active_reqs - len(self.running)
        soon_blocks, soon_slots = self._finishing_soon()
        now = time.monotonic()
        for waiting in ordered:
            if waiting.status not in _SCHEDULABLE or waiting.num_stale_output_tokens:
                continue
            need = self._blocks_needed(waiting)
            if need > self.kv_cache_manager.block_pool.num_gpu_blocks - 1:
                return preempted
            if (need > free or slots <= 0) and (need <= free + soon_blocks
                                                 and slots + soon_slots > 0):
                self.deferred_preemptions += 1
                return preempted  # room comes within a slice: wait for it, as stock would
            while need > free or slots <= 0:
                victim = self._victim_for(waiting)
                if victim is None:
                    return preempted  # waiting requests behind this one have no less service
                self.running.remove(victim)
                self._preempt_request(victim, now, drop_stale_output=self.requires_kv_delivery)
                self.fair_preemptions += 1
                preempted = True
                free = self.kv_cache_manager.block_pool.get_num_free_blocks()
                slots += 1
            free -= need
            slots -= 1
        return preempted

    # --- vLLM hooks ---------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if self.fair.tenants:
            tenant = tenant_of(request)
            active = self._active_tenants()
            if tenant not in active:
                # VTC: a tenant back from idle starts level with the least
                # served active tenant, not with the credit it left behind.
                floor = min((self.vtc.get(t, 0.0) for t in active), default=0.0)
                self.vtc[tenant] = max(self.vtc.get(tenant, 0.0), floor)
        super().add_request(request)

    def schedule(self, *args: Any, **kwargs: Any):
        now = time.monotonic()
        if self._last_step_at is not None:
            gap = now - self._last_step_at
            self.step_seconds = gap if self.step_seconds <= 0 else (
                0.8 * self.step_seconds + 0.2 * gap)
        self._forget_finished()
        self._track_backlog()
        self._time_share()
        output = super().schedule(*args, **kwargs)
        self._last_step_at = time.monotonic() if output.total_num_scheduled_tokens else None
        return output

    def _update_after_schedule(self, scheduler_output: Any) -> None:
        newly_admitted = {r.req_id for r in scheduler_output.scheduled_new_reqs}
        newly_admitted |= scheduler_output.scheduled_cached_reqs.resumed_req_ids
        super()._update_after_schedule(scheduler_output)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests[req_id]
            if req_id in newly_admitted:
                self.admitted_at[req_id] = self.current_step
                self.queued_at.pop(req_id, None)
            before = self.high_water.get(req_id, 0)
            after = request.num_computed_tokens
            if after <= before:
                continue  # recomputing what was computed before: no new service
            self.high_water[req_id] = after
            prompt = request.num_prompt_tokens
            new_input = max(0, min(after, prompt) - before)
            new_output = (after - before) - new_input
            self.served[req_id] = self.served.get(req_id, 0) + new_output
            tenant = tenant_of(request)
            self.vtc[tenant] = (self.vtc.get(tenant, 0.0) + self.fair.input_weight * new_input
                                + self.fair.output_weight * new_output)

    # --- bookkeeping --------------------------------------------------------

    def _active_tenants(self) -> set[str]:
        return {tenant_of(r) for r in self.requests.values() if not r.is_finished()}

    def _track_backlog(self) -> None:
        waiting = {tenant_of(r) for r in self.waiting}
        if len(waiting) > 1:
            counters = [self.vtc.get(t, 0.0) for t in waiting]
            self.max_backlogged_gap = max(self.max_backlogged_gap,
                                          max(counters) - min(counters))

    def _forget_finished(self) -> None:
        for table in (self.served, self.high_water, self.admitted_at, self.queued_at):
            for req_id in [k for k in table if k not in self.requests]:
                del table[req_id]


class AsyncFairScheduler(FairScheduler, AsyncScheduler):
    """FairScheduler over vLLM's AsyncScheduler (MRO: the policy, then the
    async step bookkeeping, then the stock scheduler)."""


__all__ = ["AsyncFairScheduler", "FairScheduler", "FairSettings", "TENANT_ARG",
           "TESTED_VLLM", "check_vllm_version"]
