"""Quotas: the most one uid, or the members of one group together, may hold.

Three resources are limited: tenants (registered connections), leases, and
bytes (leases' charged sizes, granule-rounded as the devices count them).
The arbiter asks `refusal()` before it registers a tenant or grants a lease,
and calls `charge()` when it does and again, negated, when the tenant or
lease goes. Use is kept as counters per uid and per group, so a request costs
O(1) however many leases there are.

Who is who comes from the kernel (SO_PEERCRED at `hello`): the uid, and the
primary gid of the tenant's process for group quotas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .tenants import Peer


@dataclass(frozen=True)
class Share:
    """A percentage of a daemon-wide total: the capacity of all devices for
    bytes, `max_tenants` for tenants."""

    percent: float

    def of(self, total: int) -> int:
        # Rounded up, so a share of a small total is never zero.
        return math.ceil(total * self.percent / 100)


@dataclass(frozen=True)
class Quota:
    """Limits of one config table; None is no limit (a group's table limits
    only what it names; UNLIMITED below limits nothing)."""

    bytes: int | Share | None = None
    leases: int | None = None
    tenants: int | Share | None = None
    name: str = ""  # the config table it comes from, for messages and status


# Defaults, for every uid the config does not name. Half the capacity and a
# quarter of the tenant slots: one user, however greedy, leaves the other half
# of the memory and three quarters of the slots to everyone else, and a single
# user still gets enough for real work. Leases have no daemon-wide total to
# take a share of; each costs the daemon a record and a shared-memory file and
# adds a row to every `status`, so a uid may hold four tenants' worth of
# `max_leases_per_tenant` (4 x 4096): far more than paging needs, few enough
# to bound what one user makes the daemon keep.
DEFAULT_QUOTA = Quota(bytes=Share(50), leases=16_384, tenants=Share(25), name="quota.default")


@dataclass(frozen=True)
class QuotaPolicy:
    default: Quota = DEFAULT_QUOTA  # every uid not in `uids`
    uids: Mapping[int, Quota] = field(default_factory=dict)
    groups: Mapping[int, Quota] = field(default_factory=dict)  # by gid


# No limits at all: the simulator (one operator's server) and tests of other things.
UNLIMITED = QuotaPolicy(default=Quota(name="unlimited"))


@dataclass(slots=True)
class Usage:
    tenants: int = 0
    leases: int = 0
    bytes: int = 0

    def add(self, tenants: int, leases: int, nbytes: int) -> None:
        self.tenants += tenants
        self.leases += leases
        self.bytes += nbytes
        assert self.tenants >= 0 and self.leases >= 0 and self.bytes >= 0, self

    def __bool__(self) -> bool:
        return bool(self.tenants or self.leases or self.bytes)


@dataclass(frozen=True)
class Bound:
    """A quota resolved against this daemon's totals."""

    name: str
    tenants: int | None
    leases: int | None
    bytes: int | None


@dataclass(frozen=True)
class Refusal:
    """Why a request would go over a quota."""

    quota: str  # config table, e.g. "quota.uid.1000"
    holder: str  # "uid 1000" or "group 1001"
    resource: str  # "tenants", "leases" or "bytes"
    limit: int
    used: int
    requested: int

    @property
    def message(self) -> str:
        return (f"{self.quota} allows {self.holder} {self.limit} {self.resource}; "
                f"{self.holder} holds {self.used} and this request needs {self.requested} more")

    @property
    def details(self) -> dict[str, Any]:
        return {"quota": self.quota, "resource": self.resource, "limit": self.limit,
                "used": self.used, "requested": self.requested}


def _resolve(quota: Quota, capacity: int, max_tenants: int) -> Bound:
    def amount(limit: int | Share | None, total: int) -> int | None:
        return limit.of(total) if isinstance(limit, Share) else limit

    return Bound(quota.name, amount(quota.tenants, max_tenants), quota.leases,
                 amount(quota.bytes, capacity))


def _over(bound: Bound, use: Usage, tenants: int, leases: int,
          nbytes: int) -> tuple[str, int, int, int] | None:
    """(resource, limit, used, requested) of the first limit this would pass."""
    # Spelled out, not looped: this runs on every hello and lease.
    if tenants and bound.tenants is not None and use.tenants + tenants > bound.tenants:
        return "tenants", bound.tenants, use.tenants, tenants
    if leases and bound.leases is not None and use.leases + leases > bound.leases:
        return "leases", bound.leases, use.leases, leases
    if nbytes and bound.bytes is not None and use.bytes + nbytes > bound.bytes:
        return "bytes", bound.bytes, use.bytes, nbytes
    return None


_NOTHING = Usage()  # read only: the use of whoever holds nothing


class Quotas:
    def __init__(self, policy: QuotaPolicy, *, capacity: int, max_tenants: int) -> None:
        self._default = _resolve(policy.default, capacity, max_tenants)
        self._uids = {uid: _resolve(q, capacity, max_tenants) for uid, q in policy.uids.items()}
        self._groups = {gid: _resolve(q, capacity, max_tenants)
                        for gid, q in policy.groups.items()}
        self._by_uid: dict[int, Usage] = {}  # uids holding anything
        self._by_gid = {gid: Usage() for gid in self._groups}  # groups with a quota

    def refusal(self, peer: Peer, *, tenants: int = 0, leases: int = 0,
                nbytes: int = 0) -> Refusal | None:
        """What the first quota this would exceed says, or None if it fits
        the uid's quota and its group's."""
        bound = self._uids.get(peer.uid, self._default)
        over = _over(bound, self._by_uid.get(peer.uid, _NOTHING), tenants, leases, nbytes)
        if over is not None:
            return Refusal(bound.name, f"uid {peer.uid}", *over)
        group = self._by_gid.get(peer.gid)
        if group is not None:
            bound = self._groups[peer.gid]
            over = _over(bound, group, tenants, leases, nbytes)
            if over is not None:
                return Refusal(bound.name, f"group {peer.gid}", *over)
        return None

    def charge(self, peer: Peer, *, tenants: int = 0, leases: int = 0,
               nbytes: int = 0) -> None:
        """Count a grant against the peer's uid and group; negative amounts
        give it back."""
        use = self._by_uid.get(peer.uid)
        if use is None:
            use = self._by_uid[peer.uid] = Usage()
        use.add(tenants, leases, nbytes)
        if not use:
            del self._by_uid[peer.uid]  # keeps status to uids that hold something
        group = self._by_gid.get(peer.gid)
        if group is not None:
            group.add(tenants, leases, nbytes)

    def view(self) -> dict[str, Any]:
        """The `quotas` object of `status` (docs/status-schema.md)."""
        uids = sorted(self._by_uid.keys() | self._uids.keys())
        return {
            "default": _limits(self._default),
            "uids": [{"uid": uid, **_row(self._uids.get(uid, self._default),
                                         self._by_uid.get(uid, _NOTHING))} for uid in uids],
            "groups": [{"gid": gid, **_row(self._groups[gid], self._by_gid[gid])}
                       for gid in sorted(self._groups)],
        }


def _limits(bound: Bound) -> dict[str, Any]:
    return {"tenants": bound.tenants, "leases": bound.leases, "bytes": bound.bytes}


def _row(bound: Bound, use: Usage) -> dict[str, Any]:
    return {"quota": bound.name, "limit": _limits(bound), "used": asdict(use)}
