"""Capacity accounting for one device, in aligned granules.

Every lease is backed by its own segment (a POSIX shared-memory file, or its
own CUDA allocation), because a handle exposes its whole backing object: two
leases carved from one segment would let each tenant map the other's bytes.
So the allocator never hands out offsets into a shared arena; it only decides
whether a lease fits and how much it costs. Consequences worth having:
- no external fragmentation: any request up to `free` bytes succeeds;
- internal fragmentation is under one granule per lease (the round-up);
- release returns exactly what allocation took.
"""

from __future__ import annotations

from dataclasses import dataclass


class OutOfCapacity(Exception):
    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"requested {requested} bytes, {free} free")
        self.requested = requested
        self.free = free


@dataclass
class GranuleAllocator:
    capacity: int
    granule: int
    used: int = 0
    # Being reclaimed or drained (core/reclaim.py): nothing new lands here.
    closed: bool = False

    def __post_init__(self) -> None:
        if self.granule <= 0 or self.granule & (self.granule - 1):
            raise ValueError(f"granule must be a power of two, got {self.granule}")
        if self.capacity < 0:
            raise ValueError("capacity must be >= 0")
        # Capacity that is not a whole number of granules can never be leased.
        self.capacity -= self.capacity % self.granule

    @property
    def free(self) -> int:
        # Below zero while a reclaim waits for leases to move away.
        return max(0, self.capacity - self.used)

    def round_up(self, nbytes: int) -> int:
        return -(-nbytes // self.granule) * self.granule

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes and not self.closed and self.round_up(nbytes) <= self.free

    def allocate(self, nbytes: int) -> int:
        """Reserve room for `nbytes`; returns the bytes charged (granule multiple)."""
        if nbytes <= 0:
            raise ValueError("nbytes must be positive")
        size = self.round_up(nbytes)
        if size > self.free:
            raise OutOfCapacity(nbytes, self.free)
        self.used += size
        return size

    def free_bytes(self, size: int) -> None:
        """Return a charge made by allocate()."""
        if size <= 0 or size % self.granule or size > self.used:
            raise ValueError(f"cannot return {size} bytes (used {self.used})")
        self.used -= size

    def set_capacity(self, capacity: int) -> None:
        """Take capacity back even below what is in use (a reclaim): the
        excess (`over`) is what leases must move away before it is done."""
        self.capacity = max(0, capacity - capacity % self.granule)

    @property
    def over(self) -> int:
        """Bytes in use beyond capacity: what a reclaim still has to move."""
        return max(0, self.used - self.capacity)
