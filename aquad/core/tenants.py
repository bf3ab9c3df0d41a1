"""Tenant registry: who is connected, as the kernel vouches for them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Peer:
    """Credentials of a connection, from SO_PEERCRED (never from the message)."""

    pid: int
    uid: int
    gid: int


@dataclass
class Tenant:
    id: str
    name: str
    conn: bytes  # ZeroMQ routing id of its connection
    peer: Peer
    devices: tuple[int, ...]
    weight: float
    registered_at: float
    last_seen: float
    leases: set[str] = field(default_factory=set)
    # Done reclaiming a predecessor's leases (its first request but `adopt`).
    adopted: bool = False


class TenantRegistry:
    def __init__(self) -> None:
        self._by_id: dict[str, Tenant] = {}
        self._by_conn: dict[bytes, Tenant] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Tenant]:
        return iter(list(self._by_id.values()))

    def get(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id)

    def by_conn(self, conn: bytes) -> Tenant | None:
        return self._by_conn.get(conn)

    def add(self, name: str, conn: bytes, peer: Peer, devices: tuple[int, ...],
            weight: float, now: float) -> Tenant:
        # Short sequential ids: operators read and type them. They grant
        # nothing; a tenant is its connection, checked against its peer pid.
        tenant = Tenant(f"t{self._next}", name, conn, peer, devices, weight, now, now)
        self._next += 1
        self._by_id[tenant.id] = tenant
        self._by_conn[conn] = tenant
        return tenant

    def remove(self, tenant_id: str) -> Tenant | None:
        tenant = self._by_id.pop(tenant_id, None)
        if tenant is not None:
            self._by_conn.pop(tenant.conn, None)
        return tenant

    def stale(self, now: float, timeout: float) -> list[Tenant]:
        return [t for t in self._by_id.values() if now - t.last_seen > timeout]
