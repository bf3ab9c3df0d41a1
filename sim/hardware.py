"""What the simulated server is made of: GPUs, links, host memory.

Figures are published specifications, per direction, each with its source;
the efficiency factors are assumptions (named as such) for how much of a
rated link a bulk copy achieves. A server can also be read from a TOML file
(see bench/topologies/), so other machines are one file away.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from typing import Any

from aquad.backends.discovery import GB, Discovery, GpuInfo, GpuPolicy, PairInfo, build_topology
from aquad.core.topology import Link, Tier, Topology

GiB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    peak_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    nvlink_bw: float  # bytes/s per GPU per direction (through NVSwitch)
    pcie_bw: float  # bytes/s per direction, x16 to the host


GPUS: dict[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3 at 3.35 TB/s,
    # 989 TFLOPS dense BF16, NVLink 900 GB/s bidirectional (450 GB/s each way),
    # PCIe Gen5 x16 128 GB/s bidirectional (64 GB/s each way).
    "h100-sxm": GpuSpec("H100 SXM5 80GB", 80 * GB, 3.35e12, 989e12, 450 * GB, 64 * GB),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): HBM2e at 2,039 GB/s,
    # 312 TFLOPS dense BF16, NVLink 600 GB/s bidirectional (300 GB/s each way),
    # PCIe Gen4 x16 64 GB/s bidirectional (32 GB/s each way).
    "a100-sxm": GpuSpec("A100 SXM4 80GB", 80 * GB, 2.039e12, 312e12, 300 * GB, 32 * GB),
}


@dataclass(frozen=True)
class ServerSpec:
    """A scale-up server: `gpus` of one spec, NVLink islands, a host."""

    gpu: GpuSpec
    gpus: int = 8
    # Groups of GPUs joined by NVLink (all-to-all inside a group, through an
    # NVSwitch); GPUs in different groups talk through the host. One group of
    # all GPUs (the default, None) is an HGX board; () is a PCIe-only server.
    nvlink_islands: tuple[tuple[int, ...], ...] | None = None
    # Assumptions, not specifications: the paper notes achieved PCIe is
    # typically 20-40% below its rating; NVLink bulk copies come closer.
    pcie_efficiency: float = 0.7
    nvlink_efficiency: float = 0.9
    copy_latency_s: float = 10e-6  # per transfer: launch and DMA setup
    host_pool_bytes: float = 512 * GiB  # pinned host memory aquad may lease
    host_device: int = field(init=False)

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError("a server needs at least one GPU")
        if self.nvlink_islands is None:
            object.__setattr__(self, "nvlink_islands", (tuple(range(self.gpus)),))
        seen: set[int] = set()
        for island in self.nvlink_islands or ():
            for g in island:
                if not 0 <= g < self.gpus or g in seen:
                    raise ValueError(f"NVLink islands {self.nvlink_islands}: GPU {g} is "
                                     f"out of range 0..{self.gpus - 1} or listed twice")
                seen.add(g)
        for name in ("pcie_efficiency", "nvlink_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        # The host tier is the device after the GPUs, as in the cuda backend.
        object.__setattr__(self, "host_device", self.gpus)

    @property
    def pcie(self) -> float:
        return self.gpu.pcie_bw * self.pcie_efficiency

    @property
    def nvlink(self) -> float:
        return self.gpu.nvlink_bw * self.nvlink_efficiency

    def island(self, g: int) -> tuple[int, ...] | None:
        for island in self.nvlink_islands or ():
            if g in island:
                return island
        return None

    def link(self, a: int, b: int) -> Link | None:
        """The link between GPUs a and b: NVLink inside an island, PCIe
        peer-to-peer otherwise (None for a GPU and itself)."""
        if a == b:
            return None
        island = self.island(a)
        if island is not None and b in island:
            return Link(Tier.NVLINK, self.nvlink)
        return Link(Tier.PEER, self.pcie)

    def spread(self) -> list[int]:
        """GPU ids dealt round-robin across NVLink islands, so the first n of
        them are spread over the islands (consumers next to producers)."""
        groups = [list(i) for i in self.nvlink_islands or ()]
        groups += [[g] for g in range(self.gpus) if self.island(g) is None]
        return [g for turn in itertools.zip_longest(*groups) for g in turn if g is not None]

    def topology(self, spare: dict[int, int], extra_host_bytes: int = 0) -> Topology:
        """The Topology aquad's cuda backend builds for this server, by its own
        builder (discovery.build_topology), with `spare` bytes leasable per
        GPU: what NVML would report, and a reserve that leaves exactly that;
        `extra_host_bytes` more of pinned host memory than the server has."""
        total = int(self.gpu.hbm_bytes)
        gpus = [GpuInfo(g, f"gpu{g}", total, total, pcie_gbps=self.pcie / GB)
                for g in range(self.gpus)]
        links = max(1, round(self.gpu.nvlink_bw / (25 * GB)))  # 25 GB/s per NVLink
        pairs = []
        for a in range(self.gpus):
            for b in range(a + 1, self.gpus):
                if self.link(a, b).tier == Tier.NVLINK:
                    pairs.append(PairInfo(a, b, nvlinks=links,
                                          nvlink_gbps=self.nvlink / links / GB))
                else:
                    pairs.append(PairInfo(a, b, p2p=True))
        policy = GpuPolicy(per_gpu_reserve={g: total - int(spare.get(g, 0))
                                            for g in range(self.gpus)},
                           headroom=0,
                           host_pinned=int(self.host_pool_bytes) + extra_host_bytes)
        return build_topology(Discovery(gpus, pairs), policy, host_id=self.host_device)


def vllm_limits(gpu: GpuSpec) -> tuple[int, int]:
    """`vllm serve`'s default (max_num_seqs, max_num_batched_tokens) on this
    GPU, as vLLM 0.32 chooses them (engine/arg_utils.py): the larger ones on
    GPUs of 70 GiB and more that are not A100s."""
    if gpu.hbm_bytes >= 160 * GiB:
        return 1024, 16384
    if gpu.hbm_bytes >= 70 * GiB and "a100" not in gpu.name.lower():
        return 1024, 8192
    return 256, 2048


def load_server(path: str) -> ServerSpec:
    """Read a server from TOML: `gpu` (a name in GPUS or a table of GpuSpec
    fields), `gpus`, `nvlink_islands`, efficiencies, `host_pool_gib`."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    return server_from_dict(doc, where=path)


def server_from_dict(doc: dict[str, Any], *, where: str = "server") -> ServerSpec:
    known = {"gpu", "gpus", "nvlink_islands", "pcie_efficiency", "nvlink_efficiency",
             "copy_latency_s", "host_pool_gib"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    gpu = doc.get("gpu", "h100-sxm")
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise ValueError(f"{where}: unknown gpu {gpu!r}; known: {sorted(GPUS)}")
        spec = GPUS[gpu]
    elif isinstance(gpu, dict):
        try:
            spec = GpuSpec(**{"name": "custom", **gpu})
        except TypeError as exc:
            raise ValueError(f"{where}: gpu table: {exc}") from None
    else:
        raise ValueError(f"{where}: gpu must be a name or a table")
    kwargs: dict[str, Any] = {"gpu": spec}
    if "gpus" in doc:
        kwargs["gpus"] = int(doc["gpus"])
    if "nvlink_islands" in doc:
        kwargs["nvlink_islands"] = tuple(tuple(int(g) for g in i) for i in doc["nvlink_islands"])
    for key in ("pcie_efficiency", "nvlink_efficiency", "copy_latency_s"):
        if key in doc:
            kwargs[key] = float(doc[key])
    if "host_pool_gib" in doc:
        kwargs["host_pool_bytes"] = float(doc["host_pool_gib"]) * GiB
    return ServerSpec(**kwargs)
