"""GPU-time weights: set by the operator, never raised by a tenant.

A tenant's weight is its uid's (or the default), lowered by its name's entry
if that is lower: names are chosen by tenants, so a name may rank one user's
models against each other but never lift a tenant above its uid. A tenant may
ask for less than that in `hello`, never more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WeightPolicy:
    default: float = 1.0  # every uid not in `uids`
    uids: Mapping[int, float] = field(default_factory=dict)
    tenants: Mapping[str, float] = field(default_factory=dict)  # by tenant name

    def cap(self, uid: int, name: str) -> float:
        """The most a tenant called `name`, run by `uid`, may have."""
        weight = self.uids.get(uid, self.default)
        return min(weight, self.tenants.get(name, weight))

    def grant(self, uid: int, name: str, asked: float | None) -> float:
        """The weight a `hello` gets: the cap, or what it asked for if lower."""
        cap = self.cap(uid, name)
        return cap if asked is None else min(asked, cap)
