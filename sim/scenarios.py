"""Ready-made scenarios; bench/paper_sim.py builds on these."""

from __future__ import annotations

from .hardware import GB, ServerSpec
from .simulator import Scenario, SimTenant
from .workload import MODELS, Arrival, bursty, from_trace


def paper_scenario(server: ServerSpec, rows: list[tuple[float, int, int]], *,
                   requests: int, consumers: int = 4, model: str = "llama-2-13b",
                   producer_footprint: float = 20 * GB, time_scale: float | None = None,
                   burst: tuple[float, int, float] | None = None,
                   seed: int = 0) -> Scenario:
    """The paper's setting: `consumers` GPUs each serve an LLM under
    bursty load; the other GPUs serve models with a smaller footprint
    (vision, audio: `producer_footprint`) whose spare HBM aqua leases out.

    Arrivals replay the trace `rows` compressed by `time_scale`, or, with
    `burst` = (rate/s, burst size, seconds between bursts), a Poisson stream
    with periodic bursts whose lengths come from the trace.
    """
    if not 1 <= consumers <= server.gpus:
        raise ValueError(f"consumers must be 1..{server.gpus}")
    spec = MODELS[model]
    order = server.spread()  # consumers spread over NVLink islands
    tenants = tuple(SimTenant(f"{model}@gpu{g}", model, g) for g in sorted(order[:consumers]))
    # A producer GPU's spare HBM: what its own model does not need at its peak
    # useful batch (what the paper's profiler measures), less 4 GB of headroom.
    spare = {g: max(0, int(server.gpu.hbm_bytes - producer_footprint - 4 * GB))
             for g in order[consumers:]}
    arrivals: list[Arrival]
    if burst is not None:
        rate, size, every = burst
        arrivals = bursty(rows, requests=requests, tenants=consumers,
                          max_context=spec.max_context, rate=rate, burst_size=size,
                          burst_every=every, seed=seed)
    else:
        arrivals = from_trace(rows, requests=requests, tenants=consumers,
                              max_context=spec.max_context, time_scale=time_scale or 1.0)
    return Scenario(server, tenants, tuple(arrivals), spare)
