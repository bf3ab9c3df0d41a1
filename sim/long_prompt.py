"""The paper's long-prompt experiment, in closed form.

One request with a long prompt decodes at batch 1 while part of its KV cache
does not fit on its GPU: that part lives elsewhere and is read back over the
link every decode step. Throughput then follows the link's bandwidth, which
is the whole point of putting it in a peer GPU's HBM instead of host DRAM.
"""

from __future__ import annotations

from .fabric import Fabric
from .hardware import ServerSpec
from .workload import MODELS, Costs


def long_prompt(server: ServerSpec, *, model: str = "opt-30b", prompt: int = 8192,
                offloaded: float = 0.5, steps: int = 16) -> dict:
    """Decode tokens/s with `offloaded` of the KV cache on a peer GPU over
    NVLink ("aqua"), in host DRAM over PCIe ("host"), or all on the GPU
    ("gpu_only", the bound). Copies go through the simulator's Fabric."""
    if not 0 <= offloaded <= 1:
        raise ValueError("offloaded must be in [0, 1]")
    spec = MODELS[model]
    costs = Costs(spec, server.gpu)
    kv = prompt * spec.kv_bytes_per_token
    remote = int(kv * offloaded)
    out: dict = {"model": spec.name, "prompt_tokens": prompt, "kv_bytes": kv,
                 "offloaded_bytes": remote}
    compute = costs.decode(1, prompt)  # weights + the whole KV streamed once
    peer = 1 if server.gpus > 1 else None  # a one-GPU server has no peer to lend
    places = {"gpu_only": None, "host": server.host_device}
    if peer is not None:
        places["aqua"] = peer
    for name, where in places.items():
        fabric = Fabric(server)
        t = 0.0
        for _ in range(steps):
            # The offloaded part crosses the link, then the step computes.
            t = fabric.copy(where, 0, remote, t) if where is not None and remote else t
            t += compute
        out[f"{name}_tok_s"] = steps / t
    if "aqua_tok_s" in out:
        out["aqua_over_host"] = out["aqua_tok_s"] / out["host_tok_s"]
    return out
