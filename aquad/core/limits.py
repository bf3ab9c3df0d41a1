"""The daemon's limits and timings, with their defaults: the one place they are set.

Config (aquad/config.py) reads them in operators' units, the arbiter and the
simulator use them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from .quotas import QuotaPolicy
from .weights import WeightPolicy


@dataclass(frozen=True)
class Limits:
    max_tenants: int = 1024
    max_leases_per_tenant: int = 4096
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    quantum_s: float = 0.1  # GPU time slice before a holder may be preempted
    grace_s: float = 1.0  # time a preempted holder has to page out and yield
    quotas: QuotaPolicy = QuotaPolicy()  # per uid and per group
    weights: WeightPolicy = WeightPolicy()  # GPU-time weights, per uid and tenant name
