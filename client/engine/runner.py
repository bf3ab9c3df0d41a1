"""A small inference engine for HuggingFace causal LMs, scheduled per prompt.

Each request decodes greedily with its own KV cache (batch 1), so output is
token-for-token what an uninterrupted `generate()` gives. The PromptScheduler
decides, before every step, which requests are resident; a preempted
request's KV cache goes into an aqua lease (every layer's keys and values in
one contiguous copy, the paper's "column") and comes back bit-exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..client import Client, Lease
from ..errors import DaemonUnavailable, LimitExceeded, OutOfMemory
from ..tensors import pack, unpack
from .scheduler import Plan, PromptScheduler, Request


class LeaseKV:
    """Paged-out KV caches, one lease per request (every layer's keys and
    values back to back), reused while big enough. Caches come back on the
    device they left, bytes copied as aqua.tensors copies them."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._leases: dict[int, Lease] = {}
        self._meta: dict[int, tuple[list[tuple[torch.Size, torch.dtype]], torch.device]] = {}
        self.bytes_out = 0
        self.bytes_in = 0
        self.copies = 0  # page-outs and page-ins

    def save(self, rid: int, cache: Any) -> None:
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        total = sum(t.numel() * t.element_size() for t in tensors)
        lease = self._leases.get(rid)
        if lease is None or lease.nbytes < total:
            self.drop(rid)  # too small
            # A lease a finished request left, where the client keeps them.
            lease = self.client.lease(total, reuse=True)  # OutOfMemory, LimitExceeded: nothing held
            self._leases[rid] = lease
        self.bytes_out += pack(lease, tensors)
        self.copies += 1
        self._meta[rid] = ([(t.shape, t.dtype) for t in tensors], tensors[0].device)

    def load(self, rid: int, make_cache: Callable[[], Any]) -> Any:
        specs, device = self._meta.pop(rid)
        tensors = unpack(self._leases[rid], specs, device)
        cache = make_cache()
        for i in range(len(tensors) // 2):
            cache.update(tensors[2 * i], tensors[2 * i + 1], i)
        self.bytes_in += sum(t.numel() * t.element_size() for t in tensors)
        self.copies += 1
        return cache

    def drop(self, rid: int) -> None:
        self._meta.pop(rid, None)
        lease = self._leases.pop(rid, None)
        if lease is not None:
            lease.release(keep=True)  # the next request's, where the client keeps leases

    def close(self) -> None:
        for rid in list(self._leases):
            self.drop(rid)


@dataclass
class StepTimes:
    """A real run's costs, as the engine's clock read them."""

    # (start, end, tokens in, tokens cached before) of every model call:
    # a prefill (or a dropped cache's recompute) has none cached, a decode
    # one token in.
    forwards: list[tuple[float, float, int, int]] = field(default_factory=list)
    # (start, end, seconds in model calls, pages copied, bytes copied) of
    # every step that ran something: what is not a model call is the step's
    # own cost (planning, copies).
    steps: list[tuple[float, float, float, int, int]] = field(default_factory=list)


class Engine:
    def __init__(self, model: Any, scheduler: PromptScheduler, client: Client | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model.eval()
        self.scheduler = scheduler
        self.kv = LeaseKV(client) if client is not None else None
        self.clock = clock
        self._caches: dict[int, Any] = {}
        self._dropped: set[int] = set()  # paused with no saved cache
        self._held: dict[int, Any] = {}  # paused, cache kept here (no daemon)
        self.recomputed_tokens = 0
        self._next_id = 0
        # What a run's steps cost, kept where this is set (a StepTimes): the
        # simulator's cost model is checked against them (bench/sim_validate.py).
        self.times: StepTimes | None = None
        self._forward_s = 0.0  # this step's model calls so far

    def submit(self, prompt: list[int], max_new_tokens: int, *,
               arrival: float | None = None, tenant: str = "") -> Request:
        self._next_id += 1
        request = Request(self._next_id, list(prompt), max_new_tokens,
                          self.clock() if arrival is None else arrival, tenant)
        self.scheduler.arrive(request)
        return request

    def _new_cache(self) -> Any:
        from transformers import DynamicCache  # noqa: PLC0415

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def step(self) -> bool:
        """Plan and run one step. False when nothing was resident to run."""
        times = self.times
        if times is not None:
            t0, self._forward_s = self.clock(), 0.0
            copies0 = self.kv.copies if self.kv is not None else 0
            paged0 = self.bytes_paged
        plan: Plan = self.scheduler.plan()
        for r in plan.drop:  # preempted by recompute (vLLM's way)
            del self._caches[r.id]
            self._dropped.add(r.id)
        for r in plan.preempt:
            if self.kv is None:
                raise RuntimeError("preemption needs an aqua client to page into")
            cache = self._caches.pop(r.id)
            try:
                self.kv.save(r.id, cache)
            except DaemonUnavailable:
                # No daemon to page into (it died or stopped): the cache stays
                # in this process, whole, and comes back from here on resume.
                self.kv.drop(r.id)
                self._held[r.id] = cache
                self.scheduler.offload_full()
            except (OutOfMemory, LimitExceeded):
                # No offload memory anywhere, or none this tenant may take (a
                # quota, the lease limit): drop the cache and recompute it on
                # resume, and tell the scheduler to start no more prompts than
                # fit (the simulator showed what happens otherwise).
                self.kv.drop(r.id)
                self._dropped.add(r.id)
                self.scheduler.offload_full()
            else:
                self.scheduler.offload_ok(r)
        fresh = set()
        for r in plan.resume:
            if r.id in self._held:
                self._caches[r.id] = self._held.pop(r.id)
            elif r.id in self._dropped:
                self._dropped.discard(r.id)
                self._recompute(r)
            elif r.prefilled:
                self._caches[r.id] = self.kv.load(r.id, self._new_cache)
            else:
                self._prefill(r)
                fresh.add(r.id)
        for r in plan.run:
            if r.id not in fresh and r.state == "resident":
                self._decode(r)
        if times is not None and plan.run:
            copies = (self.kv.copies if self.kv is not None else 0) - copies0
            times.steps.append((t0, self.clock(), self._forward_s, copies,
                                self.bytes_paged - paged0))
        return bool(plan.run)

    def _emit(self, r: Request, logits: torch.Tensor) -> None:
        r.tokens.append(int(logits[0, -1].argmax()))
        r.token_times.append(self.clock())
        if r.done:
            self._caches.pop(r.id, None)
            if self.kv is not None:
                self.kv.drop(r.id)
            self.scheduler.finished(r)

    def _forward(self, r: Request, tokens: list[int], cache: Any) -> torch.Tensor:
        """Run `tokens` through the model on `cache`, which becomes r's; the logits."""
        ids = torch.tensor([tokens], device=self.model.device)
        if self.times is None:
            out = self.model(ids, past_key_values=cache, use_cache=True)
        else:
            cached, t0 = cache.get_seq_length(), self.clock()
            out = self.model(ids, past_key_values=cache, use_cache=True)
            t1 = self.clock()
            self.times.forwards.append((t0, t1, len(tokens), cached))
            self._forward_s += t1 - t0
        self._caches[r.id] = out.past_key_values
        return out.logits

    def _prefill(self, r: Request) -> None:
        logits = self._forward(r, r.prompt, self._new_cache())
        r.prefilled = True
        self._emit(r, logits)

    def _recompute(self, r: Request) -> None:
        """Rebuild a dropped cache from the prompt and the tokens so far; the
        last token stays the input of the next decode step. (Logits of a
        batched prefill can differ from incremental decoding in the last
        bits, so a recomputed request is not guaranteed bit-identical.)"""
        context = r.prompt + r.tokens[:-1]
        self._forward(r, context, self._new_cache())
        self.recomputed_tokens += len(context)

    def _decode(self, r: Request) -> None:
        self._emit(r, self._forward(r, r.tokens[-1:], self._caches[r.id]))

    @property
    def bytes_paged(self) -> int:
        return 0 if self.kv is None else self.kv.bytes_out + self.kv.bytes_in

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()
