"""Prompt-level scheduling for a real inference engine (HuggingFace transformers).

`PromptScheduler` is the policy (fcfs baseline or fair time sharing), plain and
deterministic; `Engine` runs a causal LM under it and pages preempted KV caches
into aqua leases. The engine needs torch and transformers (`pip install
aqua[engine]`); the scheduler needs neither, so the simulator imports it alone.
"""

from typing import Any

from .scheduler import Plan, PromptScheduler, Request

__all__ = ["Engine", "LeaseKV", "Plan", "PromptScheduler", "Request"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the scheduler must not import torch.
    if name in ("Engine", "LeaseKV"):
        from . import runner  # noqa: PLC0415

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
