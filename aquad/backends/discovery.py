"""GPU discovery: what NVML reports, and the Topology aquad leases from.

Two halves. `query_nvml()` is a thin layer over nvidia-ml-py (imported only
when called) that reads plain numbers: each GPU's name, memory and PCI bus id,
and for each pair of GPUs the NVLinks between them and whether PCIe
peer-to-peer works. `build_topology()` is a pure function of those numbers and
the operator's policy, so every rule here is tested without a GPU.

Device ids are NVML indices, the numbers nvidia-smi shows. They do not depend
on CUDA_VISIBLE_DEVICES or CUDA_DEVICE_ORDER; processes map them to their own
CUDA ordinals by PCI bus id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..core.topology import Device, Link, Tier, Topology
from .base import BackendError

GB = 1e9

# One direction, per link, by NVML's nvmlNvlinkVersion_t: 1 = NVLink 1.0 (P100),
# 2-3 = 2.x (V100), 4-5 = 3.x (A100), 6 = 4.0 (H100), 7 = 5.0 (B200).
NVLINK_GBPS = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 25.0, 6: 25.0, 7: 50.0}
NVLINK_GBPS_UNKNOWN = 25.0

# One direction, per lane, after line encoding, by PCIe generation.
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
# When NVML cannot say: a gen3 x16 slot, the slowest a data-centre GPU sits in.
PCIE_GBPS_UNKNOWN = 16 * PCIE_LANE_GBPS[3]

# NVML constants, as numbers: nvidia-ml-py has defined some as tuples by mistake.
_P2P_CAPS_READ, _P2P_CAPS_WRITE, _P2P_CAPS_NVLINK = 0, 1, 2
_P2P_STATUS_OK = 0
_NVLINK_DEVICE_SWITCH = 2


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML index: the aqua device id
    name: str
    total: int  # bytes
    free: int  # bytes, when asked
    pci_bus_id: str = ""  # normalised, see normalize_bus_id
    pcie_gbps: float = 0.0  # host link, one direction; 0 when unknown


@dataclass(frozen=True)
class PairInfo:
    """What connects GPUs a and b (either order)."""

    a: int
    b: int
    nvlinks: int = 0  # active NVLinks between them (through NVSwitch: each side's fewer)
    nvlink_gbps: float = 0.0  # per link, one direction
    nvlink_p2p: bool = False  # NVML says NVLink peer-to-peer works, count unknown
    p2p: bool = False  # peer-to-peer reads and writes work (over PCIe or NVLink)


@dataclass(frozen=True)
class Discovery:
    gpus: list[GpuInfo]
    pairs: list[PairInfo] = field(default_factory=list)


@dataclass(frozen=True)
class GpuPolicy:
    """What the operator lets aquad lease (config: gpu_reserve, gpu_headroom,
    host_pinned)."""

    reserve: int = 0  # bytes each GPU keeps for its own work
    per_gpu_reserve: Mapping[int, int] = field(default_factory=dict)
    headroom: int = 1 << 30  # bytes left below free memory
    host_pinned: int = 0  # bytes of the host-DRAM tier; 0: no host tier
    shm_dir: str = "/dev/shm"  # where that tier's segments live (aquad/shmdir.py)

    def reserve_for(self, index: int) -> int:
        return self.per_gpu_reserve.get(index, self.reserve)


def spare_capacity(gpu: GpuInfo, policy: GpuPolicy) -> int:
    """Bytes aquad may lease on one GPU: what is free, but never what the GPU
    keeps for its own work, less the headroom; never more than free."""
    free = min(max(gpu.free, 0), gpu.total)
    allowed = min(free, gpu.total - policy.reserve_for(gpu.index)) - policy.headroom
    return max(0, allowed)


def build_topology(found: Discovery, policy: GpuPolicy, *,
                   host_id: int | None = None) -> Topology:
    """Devices and links from discovered numbers. GPUs come in index order,
    then the host-DRAM tier (backend "host", id `host_id`, by default one past
    the highest GPU index) if policy.host_pinned > 0.

    Links, both directions: NVLink pairs are Tier.NVLINK at links × per-link
    bandwidth; other peer-to-peer pairs Tier.PEER at the slower host link's
    bandwidth; pairs without peer-to-peer are left out (Tier.HOST). Each GPU
    also gets a HOST-tier link to the host device at its PCIe bandwidth, so
    that within the host tier the placer prefers host DRAM (one PCIe hop) to a
    GPU without peer-to-peer (a copy staged through host memory: two)."""
    gpus = sorted(found.gpus, key=lambda g: g.index)
    if not gpus:
        raise BackendError("NVML found no GPUs")
    indices = [g.index for g in gpus]
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate GPU indices in {indices}")
    known = set(indices)
    unknown = sorted(set(policy.per_gpu_reserve) - known)
    if unknown:
        raise ConfigError(f"gpu_reserve names GPU(s) {unknown}, but aquad serves GPUs "
                          f"{indices}")
    if policy.headroom < 0 or policy.reserve < 0 or policy.host_pinned < 0 \
            or any(v < 0 for v in policy.per_gpu_reserve.values()):
        raise ConfigError("gpu_reserve, gpu_headroom and host_pinned must not be negative")

    devices = [Device(g.index, "cuda", spare_capacity(g, policy), g.name or f"gpu{g.index}")
               for g in gpus]
    if sum(d.capacity for d in devices) + policy.host_pinned == 0:
        raise ConfigError(
            "nothing to lease: gpu_reserve and gpu_headroom leave no spare memory on any "
            "GPU (free: " + ", ".join(f"GPU {g.index} {g.free >> 20} MiB" for g in gpus)
            + ") and host_pinned is 0")
    links: dict[tuple[int, int], Link] = {}
    pcie = {g.index: g.pcie_gbps or PCIE_GBPS_UNKNOWN for g in gpus}
    for pair in found.pairs:
        a, b = pair.a, pair.b
        if a == b or a not in known or b not in known:
            continue  # a GPU aquad does not serve (not visible to its CUDA)
        link = pair_link(pair, min(pcie[a], pcie[b]))
        if link is not None:
            links[a, b] = links[b, a] = link
    if policy.host_pinned > 0:
        host = max(indices) + 1 if host_id is None else host_id
        if host in known:
            raise ValueError(f"host device id {host} collides with a GPU index")
        devices.append(Device(host, "host", policy.host_pinned, "host (pinned)"))
        for g in gpus:
            links[g.index, host] = Link(Tier.HOST, pcie[g.index] * GB)
    return Topology(devices, links)


def pair_link(pair: PairInfo, pcie_gbps: float) -> Link | None:
    if pair.nvlinks > 0:
        per_link = pair.nvlink_gbps or NVLINK_GBPS_UNKNOWN
        return Link(Tier.NVLINK, pair.nvlinks * per_link * GB, nvlinks=pair.nvlinks)
    if pair.nvlink_p2p:
        return Link(Tier.NVLINK, 0.0)
    if pair.p2p:
        return Link(Tier.PEER, pcie_gbps * GB)
    return None


def normalize_bus_id(bus_id: str | bytes) -> str:
    """'00000000:3B:00.0' (NVML) and '0000:3b:00.0' (CUDA) -> '0000:3b:00.0'."""
    if isinstance(bus_id, bytes):
        bus_id = bus_id.decode("ascii", "replace")
    text = bus_id.strip().strip("\x00").lower()
    try:
        rest, function = text.rsplit(".", 1)
        parts = rest.split(":")
        if len(parts) == 2:
            parts.insert(0, "0")
        domain, bus, device = (int(p, 16) for p in parts)
        return f"{domain:04x}:{bus:02x}:{device:02x}.{int(function, 16)}"
    except ValueError:
        raise ValueError(f"not a PCI bus id: {bus_id!r}") from None


def match_ordinals(gpus: Iterable[GpuInfo], cuda_bus_ids: Iterable[str]) -> dict[int, int]:
    """NVML index -> this process's CUDA ordinal, by PCI bus id. GPUs CUDA does
    not show (CUDA_VISIBLE_DEVICES) are left out."""
    ordinal_of = {normalize_bus_id(b): i for i, b in enumerate(cuda_bus_ids)}
    return {g.index: ordinal_of[g.pci_bus_id] for g in gpus if g.pci_bus_id in ordinal_of}


# --- NVML ---------------------------------------------------------------------


@contextmanager
def _nvml() -> Iterator[Any]:
    """pynvml, initialised for the block; BackendError saying why not."""
    try:
        import pynvml  # noqa: PLC0415 - nvidia-ml-py is optional
    except ImportError:
        raise BackendError("the cuda backend needs nvidia-ml-py "
                           "(pip install 'aqua[cuda]')") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise BackendError(f"NVML cannot start ({exc}): no NVIDIA driver?") from None
    try:
        yield pynvml
    except pynvml.NVMLError as exc:
        raise BackendError(f"NVML query failed: {exc}") from None
    finally:
        pynvml.nvmlShutdown()


def nvml_gpu_count() -> tuple[int, str]:
    """(number of GPUs, "") or (0, why none can be used)."""
    try:
        with _nvml() as nv:
            count = nv.nvmlDeviceGetCount()
    except BackendError as exc:
        return 0, str(exc)
    return count, "" if count else "NVML found no GPUs"


def query_nvml() -> Discovery:
    """Read every GPU and every pair from NVML (memory as of now)."""
    with _nvml() as nv:
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
        gpus = [_gpu(nv, i, h) for i, h in enumerate(handles)]
        fabric = [_nvlinks(nv, h) for h in handles]
        pairs = [_pair(nv, handles, gpus, fabric, a, b)
                 for a in range(len(handles)) for b in range(a + 1, len(handles))]
        return Discovery(gpus, pairs)


def query_free(indices: Iterable[int]) -> dict[int, int]:
    """NVML's free memory, in bytes, of the GPUs with these indices, now."""
    with _nvml() as nv:
        return {i: int(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i)).free)
                for i in indices}


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _gpu(nv, index: int, handle) -> GpuInfo:
    mem = nv.nvmlDeviceGetMemoryInfo(handle)
    pci = nv.nvmlDeviceGetPciInfo(handle)
    try:
        gen = nv.nvmlDeviceGetMaxPcieLinkGeneration(handle)
        width = nv.nvmlDeviceGetMaxPcieLinkWidth(handle)
        pcie = PCIE_LANE_GBPS.get(gen, 0.0) * width
    except nv.NVMLError:
        pcie = 0.0
    return GpuInfo(index, _text(nv.nvmlDeviceGetName(handle)), int(mem.total), int(mem.free),
                   normalize_bus_id(_text(pci.busId)), pcie)


@dataclass
class _Fabric:
    """One GPU's active NVLinks: counted per remote GPU bus id, or to NVSwitches."""

    to_gpu: dict[str, int] = field(default_factory=dict)
    to_switch: int = 0
    gbps: float = 0.0  # per link


def _nvlinks(nv, handle) -> _Fabric:
    fab = _Fabric()
    for link in range(nv.NVML_NVLINK_MAX_LINKS):
        try:
            if nv.nvmlDeviceGetNvLinkState(handle, link) != nv.NVML_FEATURE_ENABLED:
                continue
        except nv.NVMLError:
            continue  # no such link on this GPU, or NVLink not supported at all
        try:
            fab.gbps = NVLINK_GBPS.get(nv.nvmlDeviceGetNvLinkVersion(handle, link),
                                       NVLINK_GBPS_UNKNOWN)
        except nv.NVMLError:
            fab.gbps = fab.gbps or NVLINK_GBPS_UNKNOWN
        try:
            kind = nv.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)
        except (nv.NVMLError, AttributeError):
            kind = None
        if kind == _NVLINK_DEVICE_SWITCH:
            fab.to_switch += 1
            continue
        try:
            remote = nv.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)
            bus = normalize_bus_id(_text(remote.busId))
        except (nv.NVMLError, ValueError):
            continue
        fab.to_gpu[bus] = fab.to_gpu.get(bus, 0) + 1
    return fab


def _p2p(nv, h1, h2, index: int) -> bool:
    try:
        return nv.nvmlDeviceGetP2PStatus(h1, h2, index) == _P2P_STATUS_OK
    except nv.NVMLError:
        return False


def _pair(nv, handles, gpus: list[GpuInfo], fabric: list[_Fabric], a: int, b: int) -> PairInfo:
    fa, fb = fabric[a], fabric[b]
    direct = fa.to_gpu.get(gpus[b].pci_bus_id, 0)
    # Behind NVSwitches every GPU reaches every other with all its links;
    # nvidia-smi shows that as NV<links> for each pair.
    switched = min(fa.to_switch, fb.to_switch)
    nvlink_p2p = _p2p(nv, handles[a], handles[b], _P2P_CAPS_NVLINK)
    if switched and not nvlink_p2p:
        switched = 0  # two separate fabrics
    p2p = _p2p(nv, handles[a], handles[b], _P2P_CAPS_READ) and \
        _p2p(nv, handles[a], handles[b], _P2P_CAPS_WRITE)
    return PairInfo(a, b, nvlinks=direct + switched,
                    nvlink_gbps=max(fa.gbps, fb.gbps) if direct + switched else 0.0,
                    nvlink_p2p=nvlink_p2p, p2p=p2p)
