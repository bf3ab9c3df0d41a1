"""aqua for vLLM (needs vllm installed: `pip install 'aqua[vllm]'`).

- `AquaOffloadingSpec`: aqua leases as the KV offload tier of vLLM's
  `OffloadingConnector` (spec_name "AquaOffloadingSpec", spec_module_path
  "aqua.vllm"; or spec_name "aqua" once the plugin is loaded).
- `AquaWorker`: vLLM's `worker_cls` ("aqua.vllm.AquaWorker"): the engine takes
  aqua GPU time slices and pages its whole KV cache in place at a preemption.
- `FairScheduler`: vLLM's `scheduler_cls` ("aqua.vllm.FairScheduler"):
  prompts (and optionally tenants) time-share the engine, least served
  first; preempted requests resume by reloading their KV from the tier.
- `register()`: the `vllm.general_plugins` entry point vLLM calls in each of
  its processes.

Names load on first use, so `import aqua.vllm` alone imports no vLLM.
"""

from __future__ import annotations

import importlib

SPEC_NAME = "aqua"  # short spec_name registered by the plugin


def register() -> None:
    """vLLM plugin entry point: offer the offload tier as spec_name "aqua"."""
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory  # noqa: PLC0415

    if SPEC_NAME not in OffloadingSpecFactory._registry:  # vLLM may load plugins twice
        OffloadingSpecFactory.register_spec(SPEC_NAME, "aqua.vllm.offload",
                                            "AquaOffloadingSpec")


# Public name -> the submodule that defines it, imported on first use.
_LAZY = {"AquaOffloadingSpec": "offload", "AquaOffloadingManager": "offload",
         "AquaWorker": "worker", "FairScheduler": "fair", "AsyncFairScheduler": "fair"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(name)
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["AquaOffloadingManager", "AquaOffloadingSpec", "AquaWorker", "AsyncFairScheduler",
           "FairScheduler", "SPEC_NAME", "register"]
