"""GPU discovery turned into a Topology: synthetic NVML answers, no GPU needed."""

from __future__ import annotations

import types

import pytest

from aquad.backends import discovery as disc
from aquad.backends.base import BackendError
from aquad.backends.discovery import (
    GB,
    Discovery,
    GpuInfo,
    GpuPolicy,
    PairInfo,
    build_topology,
    match_ordinals,
    normalize_bus_id,
    spare_capacity,
)
from aquad.config import ConfigError
from aquad.core.allocator import GranuleAllocator
from aquad.core.placer import Placer
from aquad.core.topology import Tier

GiB = 2**30
H100 = 80 * GiB
PCIE5 = 16 * disc.PCIE_LANE_GBPS[5]


def place(topology, pools, nbytes: int, near: int, home=()) -> int | None:
    """One placement by a fresh Placer (the arbiter keeps one per topology)."""
    return Placer(topology)(pools, nbytes, near, home)


def gpus(n: int = 8, *, total: int = H100, free: int = 79 * GiB) -> list[GpuInfo]:
    return [GpuInfo(i, "NVIDIA H100 80GB HBM3", total, free, f"0000:{0x18 + i:02x}:00.0",
                    PCIE5) for i in range(n)]


def pairs(n: int, nvlinks=lambda a, b: 0, p2p=lambda a, b: False) -> list[PairInfo]:
    return [PairInfo(a, b, nvlinks=nvlinks(a, b), nvlink_gbps=25.0 if nvlinks(a, b) else 0,
                     p2p=p2p(a, b)) for a in range(n) for b in range(a + 1, n)]


POLICY = GpuPolicy(reserve=0, headroom=GiB, host_pinned=64 * GiB)


def test_eight_gpus_fully_nvlinked():
    topo = build_topology(Discovery(gpus(), pairs(8, lambda a, b: 18, lambda a, b: True)),
                          POLICY)
    assert [d.id for d in topo.devices] == list(range(9))
    assert [d.backend for d in topo.devices] == ["cuda"] * 8 + ["host"]
    host = topo.devices[-1]
    assert host.capacity == 64 * GiB and host.name == "host (pinned)"
    for a in range(8):
        for b in range(8):
            if a != b:
                link = topo.link(a, b)
                assert (link.tier, link.nvlinks, link.bandwidth) == (Tier.NVLINK, 18, 450 * GB)
    assert all(d.capacity == 78 * GiB for d in topo.devices[:8])


def test_two_islands_peer_across():
    same = lambda a, b: 12 if a // 4 == b // 4 else 0  # noqa: E731
    topo = build_topology(Discovery(gpus(), pairs(8, same, lambda a, b: True)), POLICY)
    assert topo.link(0, 3).tier == Tier.NVLINK and topo.link(3, 0).nvlinks == 12
    assert topo.link(0, 4).tier == Tier.PEER
    assert topo.link(0, 4).bandwidth == pytest.approx(PCIE5 * GB)
    assert topo.link(5, 1) == topo.link(1, 5)


def test_pcie_only_with_and_without_peer_to_peer():
    # GPUs 0-3 share a switch (P2P works); 4-7 sit behind another root port.
    p2p = lambda a, b: a // 4 == b // 4  # noqa: E731
    topo = build_topology(Discovery(gpus(), pairs(8, p2p=p2p)), POLICY)
    assert topo.link(0, 1).tier == Tier.PEER
    assert (0, 5) not in topo.links and topo.link(0, 5).tier == Tier.HOST
    # Within the host tier, host DRAM (one PCIe hop) beats a non-P2P GPU.
    assert topo.link(0, 8).tier == Tier.HOST and topo.link(0, 8).bandwidth > 0


def test_mixed_topology_places_like_the_paper():
    """gpu0: NV2 to 1, NV4 to 2, PCIe P2P to 3, nothing to 4."""
    found = Discovery(gpus(5), [
        PairInfo(0, 1, nvlinks=2, nvlink_gbps=25), PairInfo(0, 2, nvlinks=4, nvlink_gbps=25),
        PairInfo(0, 3, p2p=True), PairInfo(0, 4)])
    topo = build_topology(found, POLICY)
    assert topo.link(0, 2).bandwidth == 2 * topo.link(0, 1).bandwidth
    pools = {d.id: GranuleAllocator(d.capacity, 2 << 20) for d in topo.devices}
    order = []
    while (dev := place(topo, pools, 40 * GiB, near=0, home=[0])) is not None:
        order.append(dev)
        pools[dev].allocate(40 * GiB)
    # NVLink (wider first), then the PCIe peer, then host DRAM before the
    # GPU without peer-to-peer, and the tenant's own GPU last.
    assert order == [2, 1, 3, 5, 4, 0]


def test_nvlink_without_a_link_count_is_still_nvlink():
    topo = build_topology(Discovery(gpus(2), [PairInfo(0, 1, nvlink_p2p=True, p2p=True)]),
                          POLICY)
    assert topo.link(0, 1).tier == Tier.NVLINK and topo.link(0, 1).nvlinks == 0


def test_single_gpu_has_no_gpu_links():
    topo = build_topology(Discovery(gpus(1)), POLICY)
    assert [(d.id, d.backend) for d in topo.devices] == [(0, "cuda"), (1, "host")]
    assert set(topo.links) == {(0, 1)}


def test_no_host_tier_when_host_pinned_is_zero():
    topo = build_topology(Discovery(gpus(2)), GpuPolicy(headroom=GiB, host_pinned=0))
    assert [d.backend for d in topo.devices] == ["cuda", "cuda"] and topo.links == {}


def test_host_id_can_be_pinned_past_hidden_gpus():
    # GPUs 1 and 3 are all this process's CUDA sees; NVML knows 0..3.
    served = Discovery([g for g in gpus(4) if g.index in (1, 3)], pairs(4, p2p=lambda a, b: 1))
    topo = build_topology(served, POLICY, host_id=4)
    assert [d.id for d in topo.devices] == [1, 3, 4]
    assert topo.link(1, 3).tier == Tier.PEER and (0, 1) not in topo.links


@pytest.mark.parametrize("total, free, reserve, headroom, want", [
    (80, 79, 0, 1, 78),     # all that is free, less the headroom
    (80, 79, 40, 1, 39),    # the reserve caps it below free
    (80, 30, 40, 1, 29),    # free caps it below total - reserve
    (80, 79, 80, 1, 0),     # everything reserved
    (80, 0.5, 0, 1, 0),     # less free than the headroom
    (80, 79, 0, 0, 79),     # no headroom: never more than free
    (80, 90, 0, 0, 80),     # NVML's free above total is clamped
])
def test_reserve_and_headroom_arithmetic(total, free, reserve, headroom, want):
    gpu = GpuInfo(0, "g", int(total * GiB), int(free * GiB))
    cap = spare_capacity(gpu, GpuPolicy(reserve=int(reserve * GiB), headroom=int(headroom * GiB)))
    assert cap == int(want * GiB)
    assert cap <= max(0, gpu.free)


def test_per_gpu_reserve_overrides_the_default():
    policy = GpuPolicy(reserve=8 * GiB, per_gpu_reserve={1: 60 * GiB}, headroom=GiB)
    topo = build_topology(Discovery(gpus(3)), policy)
    assert [d.capacity for d in topo.devices[:3]] == [71 * GiB, 19 * GiB, 71 * GiB]


def test_bad_config_is_refused_clearly():
    with pytest.raises(ConfigError, match=r"gpu_reserve names GPU\(s\) \[9\]"):
        build_topology(Discovery(gpus(8)), GpuPolicy(per_gpu_reserve={9: GiB}))
    with pytest.raises(ConfigError, match="nothing to lease"):
        build_topology(Discovery(gpus(2)), GpuPolicy(reserve=H100, host_pinned=0))
    with pytest.raises(ConfigError, match="negative"):
        build_topology(Discovery(gpus(2)), GpuPolicy(headroom=-1))
    with pytest.raises(BackendError, match="no GPUs"):
        build_topology(Discovery([]), POLICY)
    with pytest.raises(ValueError, match="duplicate"):
        build_topology(Discovery(gpus(2) + gpus(1)), POLICY)
    with pytest.raises(ValueError, match="collides"):
        build_topology(Discovery(gpus(2)), POLICY, host_id=1)


def test_pairs_with_unknown_gpus_are_ignored():
    topo = build_topology(Discovery(gpus(2), [PairInfo(0, 7, nvlinks=4), PairInfo(1, 1, p2p=1)]),
                          GpuPolicy(host_pinned=0))
    assert topo.links == {}


def test_bus_ids_normalise_and_match_cuda_ordinals():
    assert normalize_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
    assert normalize_bus_id(b"0000:3b:00.0\x00") == "0000:3b:00.0"
    assert normalize_bus_id("3b:00.1") == "0000:3b:00.1"
    with pytest.raises(ValueError):
        normalize_bus_id("GPU-1234")
    found = gpus(4)
    # CUDA_VISIBLE_DEVICES=2,0 and fastest-first order: ordinals differ from NVML.
    cuda = ["0000:1A:00.0", "0000:18:00.0"]
    assert match_ordinals(found, cuda) == {2: 0, 0: 1}


# --- the NVML layer, against a fake pynvml ----------------------------------------------------


class FakeNvml(types.SimpleNamespace):
    """Four GPUs: 0-1 joined by 4 direct NVLinks, 2-3 on an NVSwitch with 18
    links each, PCIe peer-to-peer only within {0, 1} and {2, 3}."""

    class NVMLError(Exception):
        pass

    NVML_NVLINK_MAX_LINKS = 36
    NVML_FEATURE_ENABLED = 1

    def __init__(self) -> None:
        super().__init__()
        self.bus = [f"00000000:{0x18 + i:02X}:00.0" for i in range(4)]
        self.links = {0: [("gpu", 1)] * 4, 1: [("gpu", 0)] * 4,
                      2: [("switch", None)] * 18, 3: [("switch", None)] * 18}

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 4
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return b"NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=H100, free=H100 - (h + 1) * GiB, used=0)

    def nvmlDeviceGetPciInfo(self, h):
        return types.SimpleNamespace(busId=self.bus[h].encode())

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h): return 4
    def nvmlDeviceGetMaxPcieLinkWidth(self, h): return 16

    def _link(self, h, link):
        if link >= len(self.links[h]):
            raise self.NVMLError("Invalid Argument")
        return self.links[h][link]

    def nvmlDeviceGetNvLinkState(self, h, link):
        self._link(h, link)
        return 1

    def nvmlDeviceGetNvLinkVersion(self, h, link): return 4  # NVLink 3.0

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        return 2 if self._link(h, link)[0] == "switch" else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return types.SimpleNamespace(busId=self.bus[self._link(h, link)[1]].encode())

    def nvmlDeviceGetP2PStatus(self, h1, h2, index):
        if index == 2:  # NVLink
            return 0 if {h1, h2} in ({0, 1}, {2, 3}) else 5
        return 0 if h1 // 2 == h2 // 2 else 5


def test_query_nvml_reads_links_counts_and_switches(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    found = disc.query_nvml()
    assert [g.index for g in found.gpus] == [0, 1, 2, 3]
    assert found.gpus[1].free == H100 - 2 * GiB
    assert found.gpus[0].pci_bus_id == "0000:18:00.0"
    assert found.gpus[0].pcie_gbps == pytest.approx(16 * 1.969)
    by_pair = {(p.a, p.b): p for p in found.pairs}
    assert by_pair[0, 1].nvlinks == 4 and by_pair[2, 3].nvlinks == 18
    assert by_pair[0, 2].nvlinks == 0 and not by_pair[0, 2].p2p
    topo = build_topology(found, POLICY)
    assert topo.link(2, 3).nvlinks == 18 and topo.link(2, 3).bandwidth == 450 * GB
    assert topo.link(0, 1).bandwidth == 100 * GB
    assert topo.link(1, 2).tier == Tier.HOST
    assert disc.nvml_gpu_count() == (4, "")


def test_without_nvml_the_reason_is_clear(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    count, why = disc.nvml_gpu_count()
    assert count == 0 and "nvidia-ml-py" in why
    with pytest.raises(BackendError, match="nvidia-ml-py"):
        disc.query_nvml()
