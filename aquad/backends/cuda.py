"""CUDA backend: each lease is its own cudaMalloc, exported as a legacy IPC handle.

Why each lease is its own allocation: an IPC handle maps the whole allocation
it was taken from. Two leases carved from one allocation (as cupy's or torch's
memory pools carve arrays from one chunk) would give each tenant the other's
bytes. So allocations go straight to cudaMalloc, in 2 MiB granules, never
through a pool.

Why legacy IPC (cudaIpcGetMemHandle) rather than CUDA VMM with a file
descriptor passed over SCM_RIGHTS: the handle is 64 bytes of plain data, so it
travels in the existing msgpack reply over ZeroMQ (which cannot carry file
descriptors), and tenants open it with one call that every CUDA version and
binding has. What VMM would add (memory the exporter can unmap, per-uid access
through the fd) legacy IPC lacks; docs/architecture.md says what follows.

Lifetime: freeing memory a tenant still has mapped is undefined. The tenant
unmaps (cudaIpcCloseMemHandle) before it sends `release` or `bye`; a dead
tenant's mappings went with its process; a tenant dropped for silence may
still live, so its memory is held until its process exits. Freeing runs in
maintain(), off the request path, after the memory is zeroed: the next lease
cudaMalloc hands out may reuse it.

Leases on the host tier are POSIX shared memory from a HostBackend, which
tenants page-lock (cudaHostRegister) so GPU copies run at PCIe speed.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import ConfigError
from ..core.tenants import Peer
from ..core.topology import Topology
from .base import BackendError, alive
from .discovery import Discovery, GpuPolicy, build_topology, match_ordinals, query_free, query_nvml
from .host import HostBackend, ShmSegment

log = logging.getLogger("aquad")

GRANULE = 2 * 2**20  # cudaMalloc's own large-allocation granularity


class Runtime(Protocol):
    """The slice of cupy.cuda.runtime used here (a fake in tests)."""

    def getDeviceCount(self) -> int: ...
    def getDevice(self) -> int: ...
    def setDevice(self, device: int) -> None: ...
    def deviceGetPCIBusId(self, device: int) -> str: ...
    def malloc(self, size: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def memset(self, ptr: int, value: int, size: int) -> None: ...
    def deviceSynchronize(self) -> None: ...
    def ipcGetMemHandle(self, ptr: int) -> bytes: ...


@dataclass
class CudaSegment:
    device: int  # aqua device id (NVML index)
    ordinal: int  # CUDA ordinal in the daemon
    bus_id: str
    ptr: int
    size: int  # allocated: nbytes rounded up to the granule
    nbytes: int  # what the tenant may touch
    ipc: bytes
    owner_pid: int
    quarantined: bool = False  # its owner was dropped while possibly alive

    @property
    def handle(self) -> dict[str, Any]:
        return {"kind": "cuda_ipc", "device": self.device, "pci_bus_id": self.bus_id,
                "handle": self.ipc, "nbytes": self.nbytes}


@contextmanager
def on_device(rt: Runtime, ordinal: int) -> Iterator[None]:
    prev = rt.getDevice()
    if prev != ordinal:
        rt.setDevice(ordinal)
    try:
        yield
    finally:
        if prev != ordinal:
            rt.setDevice(prev)


class CudaBackend:
    name = "cuda"
    granule = GRANULE

    def __init__(self, topology: Topology, gpus: dict[int, tuple[int, str]], *,
                 runtime: Runtime, host: HostBackend | None = None, headroom: int = 0) -> None:
        """`gpus`: aqua device id -> (CUDA ordinal here, PCI bus id).
        `headroom`: bytes kept below each GPU's free memory (the watcher's
        margin too)."""
        self.headroom = headroom
        self._free_memory = query_free  # indices -> NVML free bytes (tests put a fake)
        self._topology = topology
        self._gpus = gpus
        self._rt = runtime
        self._host = host
        hosts = [d.id for d in topology.devices if d.backend == "host"]
        if (host is None) != (not hosts):
            raise ValueError("a host-tier device needs a HostBackend, and only then")
        self._host_id = hosts[0] if hosts else None
        self._live: dict[int, CudaSegment] = {}  # by pointer
        self._doomed: list[CudaSegment] = []
        self._held: list[CudaSegment] = []  # owner may still map them
        self._watched: dict[int, int | None] = {}  # pid -> pidfd (None: gone or unknown)

    @classmethod
    def discover(cls, policy: GpuPolicy, *, prefix: str, runtime: Runtime,
                 found: Discovery | None = None) -> CudaBackend:
        """`runtime`: cupy.cuda.runtime, once backends.cuda_unavailable() said
        CUDA can run here."""
        if 0 < policy.host_pinned < GRANULE:
            raise ConfigError(f"host_pinned must be 0 or at least {GRANULE >> 20}MiB")
        try:
            bus_ids = [runtime.deviceGetPCIBusId(i) for i in range(runtime.getDeviceCount())]
            # Contexts first: each takes GPU memory, and capacity is what is
            # free after them. Also keeps context creation off the first lease.
            for ordinal in range(len(bus_ids)):
                with on_device(runtime, ordinal):
                    runtime.free(0)
        except Exception as exc:  # CUDARuntimeError
            raise BackendError(f"CUDA cannot start on this machine's GPUs: {exc}") from None
        found = query_nvml() if found is None else found
        ordinals = match_ordinals(found.gpus, bus_ids)
        if not ordinals:
            raise BackendError("NVML and CUDA share no GPU (PCI bus ids differ; check "
                               "CUDA_VISIBLE_DEVICES)")
        served = Discovery([g for g in found.gpus if g.index in ordinals], found.pairs)
        # The host tier's id sits past every GPU NVML knows, served or not, so
        # it is the same whatever CUDA_VISIBLE_DEVICES hides.
        topology = build_topology(served, policy,
                                  host_id=max(g.index for g in found.gpus) + 1)
        host = HostBackend(1, policy.host_pinned, prefix=prefix, granule=GRANULE,
                           shm_dir=policy.shm_dir) \
            if policy.host_pinned else None
        gpus = {g.index: (ordinals[g.index], g.pci_bus_id) for g in served.gpus}
        return cls(topology, gpus, runtime=runtime, host=host, headroom=policy.headroom)

    # --- Backend --------------------------------------------------------------

    def topology(self) -> Topology:
        return self._topology

    def check_owner(self, peer: Peer) -> str | None:
        # IPC handles are not tied to a uid; host-tier files are.
        return self._host.check_owner(peer) if self._host else None

    def check_capacity(self) -> str | None:
        problem = self._host.check_capacity() if self._host else None
        if problem is None:
            return None
        return (f"the pinned host tier does not fit: {problem.split(';')[0]}; lower "
                f"--host-pinned (0 turns the host tier off) or enlarge /dev/shm")

    def remove_stale(self) -> int:
        return self._host.remove_stale() if self._host else 0

    def create(self, device: int, nbytes: int, owner: Peer) -> CudaSegment | ShmSegment:
        if device == self._host_id:
            return self._host.create(0, nbytes, owner)
        if device not in self._gpus:
            raise BackendError(f"no GPU {device} in this backend")
        ordinal, bus_id = self._gpus[device]
        size = -(-nbytes // GRANULE) * GRANULE
        with on_device(self._rt, ordinal):
            try:
                ptr = self._rt.malloc(size)
            except Exception as exc:  # cupy raises CUDARuntimeError, a RuntimeError
                raise BackendError(f"cannot allocate {size} bytes on GPU {device}: "
                                   f"{exc}") from None
            try:
                ipc = bytes(self._rt.ipcGetMemHandle(ptr))
            except Exception as exc:
                self._free(CudaSegment(device, ordinal, bus_id, ptr, size, nbytes, b"", 0))
                raise BackendError(f"cannot export GPU {device} memory: {exc}") from None
        seg = CudaSegment(device, ordinal, bus_id, ptr, size, nbytes, ipc, owner.pid)
        self._live[ptr] = seg
        return seg

    def destroy(self, segment: CudaSegment | ShmSegment) -> None:
        if isinstance(segment, ShmSegment):
            self._host.destroy(segment)
            return
        if self._live.pop(segment.ptr, None) is None:
            return
        if segment.quarantined:
            self._held.append(segment)
        else:
            self._doomed.append(segment)

    def fence(self, segment: CudaSegment | ShmSegment) -> bool:
        """A reclaim's deadline passed with this lease still in place. Host
        tier: revoked as on the host backend. GPU memory cannot be: legacy
        IPC has no revocation and freeing it under a mapping is undefined,
        so it stays allocated, charged and unusable by anyone (False) until
        its holder releases it or exits."""
        if isinstance(segment, ShmSegment):
            return self._host.fence(segment)
        return False

    def gpu_free(self) -> dict[int, int]:
        """NVML's free memory of each served GPU, now (the reclaim watcher)."""
        return self._free_memory(sorted(self._gpus))

    def can_lend(self, device: int, nbytes: int, unallocated: int) -> str | None:
        """None if the GPU has `nbytes` free beyond what aquad may still
        allocate there and the headroom; else why not."""
        if device == self._host_id:
            return self._host.can_lend(0, nbytes, unallocated)
        free = self.gpu_free().get(device, 0)
        if free < unallocated + nbytes + self.headroom:
            return (f"GPU {device} has {free} bytes free; aquad may still allocate "
                    f"{unallocated} there and keeps {self.headroom} headroom")
        return None

    def quarantine(self, owner: Peer) -> None:
        """The owner is being dropped while its process may live on with its
        mappings: what is destroyed of its leases from now on is freed only
        once that process has exited."""
        # Only the segments it holds now: if the same process registers
        # again and releases its new leases properly, those are freed at once.
        held = [seg for seg in self._live.values() if seg.owner_pid == owner.pid]
        for seg in held:
            seg.quarantined = True
        if not held or owner.pid in self._watched:
            return
        try:
            self._watched[owner.pid] = os.pidfd_open(owner.pid)
        except (OSError, AttributeError):
            # Gone already, or no pidfd: fall back to probing the pid.
            self._watched[owner.pid] = None

    def maintain(self) -> None:
        """Deferred work: zero and free destroyed allocations. Never raises: the
        daemon's socket loop calls it."""
        doomed, self._doomed = self._doomed, []
        for seg in doomed:
            self._free(seg)
        if self._watched:
            gone = {pid for pid in self._watched if self._exited(pid)}
            keep = []
            for seg in self._held:
                if seg.owner_pid in gone:
                    self._free(seg)
                else:
                    keep.append(seg)
            self._held = keep
            waiting = {s.owner_pid for s in keep}
            for pid in [p for p in self._watched if p not in waiting]:
                fd = self._watched.pop(pid)
                if fd is not None:
                    os.close(fd)
        if self._host:
            self._host.maintain()

    def close(self) -> None:
        for seg in [*self._live.values(), *self._doomed, *self._held]:
            self._free(seg)
        self._live.clear()
        self._doomed, self._held = [], []
        for fd in self._watched.values():
            if fd is not None:
                os.close(fd)
        self._watched.clear()
        if self._host:
            self._host.close()

    # --- helpers --------------------------------------------------------------

    def _free(self, seg: CudaSegment) -> None:
        try:
            with on_device(self._rt, seg.ordinal):
                # Zeroed first: cudaMalloc may hand these pages to the next
                # lease, another tenant's. The memset is asynchronous, and
                # cudaFree's implicit wait is not documented: wait for it.
                self._rt.memset(seg.ptr, 0, seg.size)
                self._rt.deviceSynchronize()
                self._rt.free(seg.ptr)
        except Exception as exc:
            log.error("cannot free %d bytes on GPU %d: %s", seg.size, seg.device, exc)

    def _exited(self, pid: int) -> bool:
        fd = self._watched.get(pid)
        if fd is None:
            return not alive(pid)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
