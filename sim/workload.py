"""Models, their roofline costs, and the requests that arrive for them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .hardware import GB, GpuSpec


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params: float
    layers: int
    kv_bytes_per_token: int  # keys + values, all layers, fp16
    max_context: int
    bytes_per_param: int = 2  # fp16

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param


# Architectures from the models' published configs (layers, hidden size, KV
# heads); KV bytes per token = 2 (K and V) x layers x KV heads x head dim x 2.
MODELS: dict[str, ModelSpec] = {
    "llama-2-7b": ModelSpec("Llama-2-7B", 6.74e9, 32, 2 * 32 * 4096 * 2, 4096),
    "llama-2-13b": ModelSpec("Llama-2-13B", 13.0e9, 40, 2 * 40 * 5120 * 2, 4096),
    "mistral-7b": ModelSpec("Mistral-7B", 7.24e9, 32, 2 * 32 * 1024 * 2, 32768),
    "opt-30b": ModelSpec("OPT-30B", 30.0e9, 48, 2 * 48 * 7168 * 2, 2048),
    # The CPU engine's models (aqua_demo.replay.MODEL_SIZES: hidden 64/128/192,
    # 2/4/6 layers, head dim 16/32/32, 2 KV heads, fp32), which
    # bench/responsiveness.py serves; their costs come from a calibrated
    # profile (sim/cpu.py), not the roofline.
    "llama-small": ModelSpec("llama-small (CPU)", 205_120, 2, 2 * 2 * 2 * 16 * 4, 1024, 4),
    "llama-medium": ModelSpec("llama-medium (CPU)", 853_120, 4, 2 * 4 * 2 * 32 * 4, 1024, 4),
    "llama-large": ModelSpec("llama-large (CPU)", 2_312_640, 6, 2 * 6 * 2 * 32 * 4, 1024, 4),
}


@dataclass(frozen=True)
class Costs:
    """The simulator's cost hook, by default; sim/cpu.py's StepCosts is the
    other (fitted to a timed engine). A simple roofline for one model on one GPU.

    Decode streams the weights and every resident KV byte from HBM once per
    step (memory-bound at the batch sizes that matter) unless its FLOPs take
    longer; prefill is compute-bound. Attention FLOPs are left out (small next
    to the weights' at these context lengths). The efficiencies are
    assumptions: how much of peak bandwidth and FLOP/s kernels achieve.
    """

    model: ModelSpec
    gpu: GpuSpec
    hbm_efficiency: float = 0.8
    flops_efficiency: float = 0.6

    def decode(self, batch: int, kv_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        kv = kv_tokens * self.model.kv_bytes_per_token
        return max(self._stream(self.model.weight_bytes + kv), self._compute(batch))

    step_s = 0.0  # a GPU step's fixed cost is in its kernels' bytes and FLOPs

    def prefill(self, tokens: int, prompts: int = 1) -> float:
        """`tokens` prompt tokens (of `prompts` prompts: the roofline does
        not care how they split)."""
        if tokens <= 0:
            return 0.0
        return max(self._stream(self.model.weight_bytes), self._compute(tokens))

    def _stream(self, nbytes: float) -> float:
        """Seconds to read `nbytes` from HBM."""
        return nbytes / (self.gpu.hbm_bw * self.hbm_efficiency)

    def _compute(self, tokens: int) -> float:
        """Seconds of dense matmul FLOPs for `tokens` tokens."""
        return 2 * self.model.params * tokens / (self.gpu.peak_flops * self.flops_efficiency)


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds from the start
    prompt: int  # tokens
    max_new: int  # tokens to generate
    tenant: int  # index into the scenario's LLM tenants


def fit(prompt: int, new: int, max_context: int) -> tuple[int, int]:
    """Clamp a trace request to what the model serves: at least one token of
    each, the prompt truncated so prompt + output fits the context window."""
    new = max(1, min(new, max_context // 2))
    return max(1, min(prompt, max_context - new)), new


def from_trace(rows: list[tuple[float, int, int]], *, requests: int, tenants: int,
               max_context: int, time_scale: float = 1.0) -> list[Arrival]:
    """The first `requests` rows, arrival times divided by `time_scale`,
    dealt round-robin to the tenants."""
    if requests > len(rows):
        raise ValueError(f"the trace holds {len(rows)} requests; {requests} asked")
    out = []
    for i, (t, ctx, gen) in enumerate(rows[:requests]):
        prompt, new = fit(ctx, gen, max_context)
        out.append(Arrival(t / time_scale, prompt, new, i % tenants))
    return out


def bursty(rows: list[tuple[float, int, int]], *, requests: int, tenants: int,
           max_context: int, rate: float, burst_size: int, burst_every: float,
           seed: int = 0) -> list[Arrival]:
    """Poisson arrivals at `rate` per second, plus `burst_size` requests
    landing within 100 ms every `burst_every` seconds; lengths drawn from the
    trace's requests, so their distribution is real."""
    rng = random.Random(seed)
    out: list[Arrival] = []

    def draw(at: float, spread: float = 0.0) -> Arrival:
        # The draws in this order, so a seed gives the same workload as ever.
        _, ctx, gen = rng.choice(rows)
        prompt, new = fit(ctx, gen, max_context)
        if spread:
            at += rng.uniform(0, spread)
        return Arrival(at, prompt, new, rng.randrange(tenants))

    t, next_burst = 0.0, burst_every
    while len(out) < requests:
        t += rng.expovariate(rate) if rate > 0 else burst_every
        while next_burst <= t and len(out) < requests:
            for _ in range(min(burst_size, requests - len(out))):
                out.append(draw(next_burst, 0.1))
            next_burst += burst_every
        if len(out) < requests and rate > 0:
            out.append(draw(t))
    out.sort(key=lambda a: a.t)
    return out


def kv_budget_tokens(model: ModelSpec, gpu: GpuSpec, *, share: float = 1.0,
                     activation_bytes: float = 6 * GB, other_weights: float = 0.0) -> int:
    """KV-cache tokens a model keeps on its GPU: what is left of HBM after
    its weights, the weights of models sharing the GPU (`other_weights`) and
    activations/workspace, times the tenant's share of the GPU."""
    room = (gpu.hbm_bytes - model.weight_bytes - other_weights - activation_bytes) * share
    if room <= 0:
        raise ValueError(f"{model.name} does not fit on a {gpu.name} share of {share}")
    return int(room // model.kv_bytes_per_token)
