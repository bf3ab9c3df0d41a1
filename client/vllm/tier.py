"""The scheduler side of the aqua KV offload tier: leases taken from aquad
as vLLM's offload cache fills, and the tier's health.

vLLM's offloading manager runs in the scheduler (engine core) process and
decides which offload chunk holds which KV block; this object owns the aqua
client there, so the process that decides is the one that knows whether the
memory exists. The worker maps the leases from their handles (see
copies.py); only handles cross between them.

No vLLM import here: the bookkeeping is plain Python and testable as such.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aqua_protocol.paths import resolve_socket

from ..client import Client, Lease, connect
from ..errors import AquaError, DaemonUnavailable, LimitExceeded, OutOfMemory

log = logging.getLogger("aqua.vllm")

DEFAULT_LEASE_CHUNK = 64 << 20  # bytes per lease: the tier grows by this much
DEFAULT_FRACTION = 0.25  # of the daemon's free memory, when no size is given

_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")

# Leases of this process by id, so a worker in the same process as the
# scheduler (vLLM's in-process executor) uses the scheduler's mapping rather
# than mapping the memory a second time (a CUDA IPC handle opens once per
# process).
LIVE_LEASES: dict[str, Lease] = {}


def parse_bytes(value: Any, what: str) -> int:
    """A positive byte count: an int, or a string like '512MiB' or '2GiB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    else:
        match = _SIZE.fullmatch(str(value))
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"{what}: cannot read {value!r}; give bytes as an integer or "
                             f"with a binary unit, e.g. 512MiB or 2GiB")
        count = int(match.group(1)) * _UNITS[match.group(2)]
    if count <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return count


@dataclass(frozen=True)
class TierSettings:
    """What `kv_connector_extra_config` says about the aqua tier."""

    socket: str
    tenant: str
    device: int
    lease_bytes: int | None  # the tier's size in bytes, or
    fraction: float | None  # that share of aquad's free memory at start
    chunk_bytes: int  # bytes per lease

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> TierSettings:
        size, fraction = extra.get("aqua_lease_bytes"), extra.get("aqua_lease_fraction")
        if size is not None and fraction is not None:
            raise ValueError("give aqua_lease_bytes or aqua_lease_fraction, not both")
        if fraction is not None:
            fraction = float(fraction)
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"aqua_lease_fraction must be in (0, 1], got {fraction}")
        elif size is None:
            fraction = DEFAULT_FRACTION
        device = extra.get("aqua_device", 0)
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ValueError(f"aqua_device must be a device id (int >= 0), got {device!r}")
        return cls(
            socket=resolve_socket(extra.get("aqua_socket")),
            tenant=str(extra.get("aqua_tenant") or "vllm"),
            device=device,
            lease_bytes=None if size is None else parse_bytes(size, "aqua_lease_bytes"),
            fraction=fraction,
            chunk_bytes=parse_bytes(extra.get("aqua_lease_chunk_bytes", DEFAULT_LEASE_CHUNK),
                                    "aqua_lease_chunk_bytes"))


class LeaseTier:
    """Offload chunks of `chunk_bytes` each, in leases of `chunks_per_lease`
    chunks: chunk c lives in lease c // chunks_per_lease. Grows one lease at
    a time up to `max_chunks`; `up` is False once aquad is unreachable."""

    def __init__(self, settings: TierSettings, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.chunks_per_lease = max(1, settings.chunk_bytes // chunk_bytes)
        self.leases: list[Lease] = []
        self.chunks = 0  # chunks backed by leases
        self.max_chunks = 0
        self._down: str | None = None
        self._full_logged = False
        self._lock = threading.Lock()
        self.client: Client | None = None
        try:
            self.client = connect(settings.tenant, settings.device, socket=settings.socket,
                                  reconnect=False)
        except AquaError as exc:
            self._go_down(str(exc))
            return
        budget = settings.lease_bytes
        if budget is None:
            free = sum(d.free_bytes for d in self.client.daemon_devices)
            budget = int(free * settings.fraction)
        self.max_chunks = budget // chunk_bytes
        log.info("aqua KV offload tier: up to %d chunks of %d bytes (%d MiB) from aquad at %s",
                 self.max_chunks, chunk_bytes, self.max_chunks * chunk_bytes >> 20,
                 settings.socket)

    @property
    def up(self) -> bool:
        """The tier can be used. Turns False, once and for good, when aquad
        goes away: what the leases held can no longer be relied on (GPU
        leases die with the daemon), so vLLM recomputes from then on."""
        if self._down is None and self.client is not None and not self.client.connected:
            self._go_down(self.client._conn.gone or "lost the connection to aquad")
        return self._down is None

    def _go_down(self, reason: str) -> None:
        with self._lock:
            if self._down is not None:
                return
            self._down = reason
        log.warning("aqua KV offload tier is off (%s); vLLM keeps serving and recomputes "
                    "preempted requests instead of reloading them", reason)

    def grow(self) -> bool:
        """Back the next chunks with one more lease; False when no more can
        be had (budget reached, aquad out of memory or gone)."""
        if not self.up or self.chunks >= self.max_chunks:
            return False
        count = min(self.chunks_per_lease, self.max_chunks - self.chunks)
        try:
            lease = self.client.lease(count * self.chunk_bytes, populate=False)
        except (OutOfMemory, LimitExceeded) as exc:
            # The tier stays the size it has; eviction makes room from now on.
            self.max_chunks = self.chunks
            if not self._full_logged:
                self._full_logged = True
                log.warning("aqua KV offload tier stays at %d MiB: %s",
                            self.chunks * self.chunk_bytes >> 20, exc)
            return False
        except DaemonUnavailable as exc:
            self._go_down(str(exc))
            return False
        self.leases.append(lease)
        LIVE_LEASES[lease.id] = lease
        self.chunks += count
        return True

    def handles(self, chunk_ids: Iterable[int]) -> dict[int, tuple[str, dict[str, Any]]]:
        """lease index -> (lease id, handle) for the leases holding `chunk_ids`:
        what a worker needs to map them."""
        cpl = self.chunks_per_lease
        out: dict[int, tuple[str, dict[str, Any]]] = {}
        for index in {int(c) // cpl for c in chunk_ids}:
            lease = self.leases[index]
            out[index] = (lease.id, lease.handle)
        return out

    def bytes_by_tier(self) -> dict[str, int]:
        """Leased bytes by placement tier (nvlink, peer, host, local)."""
        out: dict[str, int] = {}
        for lease in self.leases:
            out[lease.tier] = out.get(lease.tier, 0) + lease.nbytes
        return out

    def close(self) -> None:
        for lease in self.leases:
            LIVE_LEASES.pop(lease.id, None)
        if self.client is not None:
            self.client.close()
            self.client = None
