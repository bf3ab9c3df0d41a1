"""Prompt-level scheduling for a real inference engine (HuggingFace transformers).

`PromptScheduler` is the policy (fcfs baseline or fair time sharing), plain and
deterministic; `Engine` runs a causal LM under it and pages preempted KV caches
into aqua leases. Needs torch and transformers (`pip install aqua[engine]`).
"""

from .runner import Engine, LeaseKV
from .scheduler import Plan, PromptScheduler, Request

__all__ = ["Engine", "LeaseKV", "Plan", "PromptScheduler", "Request"]
