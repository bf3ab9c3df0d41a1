"""Unit tests for aquad/core/placer.py on synthetic topologies."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquad.core.allocator import GranuleAllocator
from aquad.core.placer import Placer, tier_of
from aquad.core.topology import HOST_LINK, Device, Link, Tier, Topology

G = 2**20  # granule
GPU_CAP = 64 * G
HOST_CAP = 256 * G
HOST = 8  # id of the host-DRAM device in every topology below
NV = 300e9
NV_WIDE = 600e9
PCIE = 25e9


def place(topology, pools, nbytes: int, near: int, home=()) -> int | None:
    """One placement by a fresh Placer (the arbiter keeps one per topology)."""
    return Placer(topology)(pools, nbytes, near, home)


def gpus(n: int = 8) -> list[Device]:
    return [Device(i, "cuda", GPU_CAP, f"gpu{i}") for i in range(n)]


def host() -> Device:
    return Device(HOST, "host", HOST_CAP, "host")


def all_nvlink() -> Topology:
    links = {(a, b): Link(Tier.NVLINK, NV) for a in range(8) for b in range(8) if a != b}
    return Topology([*gpus(), host()], links)


def two_islands() -> Topology:
    """0-3 and 4-7 are NVLink islands; across islands PCIe peer-to-peer."""
    links = {}
    for a in range(8):
        for b in range(8):
            if a != b:
                same = a // 4 == b // 4
                links[a, b] = Link(Tier.NVLINK, NV) if same else Link(Tier.PEER, PCIE)
    return Topology([*gpus(), host()], links)


def pcie_only() -> Topology:
    links = {(a, b): Link(Tier.PEER, PCIE) for a in range(8) for b in range(8) if a != b}
    return Topology([*gpus(), host()], links)


def mixed() -> Topology:
    """From gpu0: 1 narrow NVLink, 2 wide NVLink, 3 PCIe peer, 4.. no P2P (host tier)."""
    links = {
        (0, 1): Link(Tier.NVLINK, NV), (0, 2): Link(Tier.NVLINK, NV_WIDE),
        (0, 3): Link(Tier.PEER, PCIE),
        (1, 0): Link(Tier.NVLINK, NV), (2, 0): Link(Tier.NVLINK, NV_WIDE),
        (3, 0): Link(Tier.PEER, PCIE),
    }
    return Topology([*gpus(), host()], links)


def pools_for(topo: Topology, used: dict[int, int] | None = None) -> dict[int, GranuleAllocator]:
    pools = {d.id: GranuleAllocator(d.capacity, G) for d in topo.devices}
    for dev, nbytes in (used or {}).items():
        pools[dev].allocate(nbytes)
    return pools


def fill(pools, dev: int, leave: int = 0) -> None:
    """Use all of `dev` but `leave` bytes."""
    if pools[dev].free > leave:
        pools[dev].allocate(pools[dev].free - leave)


# --- topology basics --------------------------------------------------------------


def test_missing_links_are_host_tier():
    topo = mixed()
    assert topo.link(0, 5) == HOST_LINK
    assert topo.link(0, HOST).tier is Tier.HOST
    assert topo.link(0, 0).tier is Tier.LOCAL  # a GPU and itself: its own memory
    assert tier_of(topo, 0, 2) is Tier.NVLINK
    assert tier_of(topo, 0, 3) is Tier.PEER
    assert Tier.NVLINK < Tier.PEER < Tier.HOST < Tier.LOCAL
    assert [t.label for t in Tier] == ["nvlink", "peer", "host", "local"]
    assert topo.device(3).name == "gpu3" and topo.device(99) is None


# --- tiers ------------------------------------------------------------------------


def test_nvlink_before_peer_before_host():
    topo = two_islands()
    # Peers in the other island and the host have far more free memory.
    pools = pools_for(topo, {1: 60 * G, 2: 60 * G, 3: 60 * G})
    assert place(topo, pools, G, near=0, home=[0]) in {1, 2, 3}
    for d in (1, 2, 3):
        fill(pools, d)
    assert place(topo, pools, G, near=0, home=[0]) in {4, 5, 6, 7}
    for d in (4, 5, 6, 7):
        fill(pools, d)
    assert place(topo, pools, G, near=0, home=[0]) == HOST
    fill(pools, HOST)
    # Only the tenant's own device is left.
    assert place(topo, pools, G, near=0, home=[0]) == 0
    fill(pools, 0)
    assert place(topo, pools, G, near=0, home=[0]) is None


def test_pcie_only_prefers_peers_to_host():
    topo = pcie_only()
    pools = pools_for(topo)
    choice = place(topo, pools, G, near=5, home=[5])
    assert choice in set(range(8)) - {5}
    assert tier_of(topo, 5, choice) is Tier.PEER


def test_all_nvlink_spreads_over_peers():
    topo = all_nvlink()
    pools = pools_for(topo)
    seen = []
    for _ in range(7):
        d = place(topo, pools, 8 * G, near=0, home=[0])
        pools[d].allocate(8 * G)
        seen.append(d)
    # Most-free-first spreads one lease per peer before doubling up; lowest id first.
    assert seen == [1, 2, 3, 4, 5, 6, 7]
    assert place(topo, pools, 8 * G, near=0, home=[0]) == 1


def test_tier_beats_free_memory():
    topo = mixed()
    pools = pools_for(topo, {2: 63 * G})  # wide NVLink peer nearly full
    assert place(topo, pools, G, near=0) == 2
    assert place(topo, pools, G + 1, near=0) == 1  # needs two granules


# --- bandwidth, home, free, id ------------------------------------------------


def test_wider_bandwidth_first_within_a_tier():
    topo = mixed()
    pools = pools_for(topo, {2: 32 * G})  # the wide link has less free memory
    assert place(topo, pools, G, near=0) == 2
    fill(pools, 2)
    assert place(topo, pools, G, near=0) == 1


def test_home_devices_last_within_a_tier():
    topo = two_islands()
    pools = pools_for(topo)
    # Home 0 and 1: gpu1 is an NVLink peer but is the tenant's own.
    assert place(topo, pools, G, near=0, home=[0, 1]) == 2
    fill(pools, 2)
    fill(pools, 3)
    # An NVLink home device still beats any non-home device of a worse tier.
    assert place(topo, pools, G, near=0, home=[0, 1]) == 1


def test_home_beats_nothing_across_tiers():
    topo = two_islands()
    pools = pools_for(topo)
    # Whole first island is home: NVLink home devices still come first.
    assert place(topo, pools, G, near=0, home=[0, 1, 2, 3]) in {1, 2, 3}


def test_home_host_device_goes_last_in_host_tier():
    topo = pcie_only()
    pools = pools_for(topo)
    for d in range(1, 8):
        fill(pools, d)
    # Own gpu0 and host both host tier; gpu0 is home so host wins.
    assert place(topo, pools, G, near=0, home=[0]) == HOST


def test_most_free_first_among_equals():
    topo = all_nvlink()
    pools = pools_for(topo, {1: 10 * G, 2: 5 * G, 3: 20 * G, 4: 10 * G, 5: 10 * G,
                             6: 10 * G, 7: 10 * G})
    assert place(topo, pools, G, near=0, home=[0]) == 2


def test_lowest_id_breaks_ties():
    topo = pcie_only()
    pools = pools_for(topo)
    assert place(topo, pools, G, near=3, home=[3]) == 0
    assert place(topo, pools, G, near=0, home=[0]) == 1


def test_only_fitting_devices_are_considered():
    topo = all_nvlink()
    pools = pools_for(topo)
    for d in range(1, 8):
        fill(pools, d, leave=2 * G)
    # No peer holds 3 granules; the host does.
    assert place(topo, pools, 3 * G, near=0, home=[0]) == HOST
    assert place(topo, pools, 2 * G, near=0, home=[0]) == 1


def test_none_when_nothing_fits():
    topo = two_islands()
    pools = pools_for(topo)
    assert place(topo, pools, HOST_CAP + 1, near=0) is None
    assert place(topo, pools, HOST_CAP, near=0) == HOST
    assert place(topo, pools, 0, near=0) is None
    for d in topo.devices:
        fill(pools, d.id)
    assert place(topo, pools, 1, near=0) is None


def test_empty_topology():
    assert place(Topology([]), {}, G, near=0) is None


@pytest.mark.parametrize("make", [all_nvlink, two_islands, pcie_only, mixed])
def test_deterministic_and_independent_of_device_order(make):
    topo = make()
    rng = random.Random(1234)
    pools = pools_for(topo, {d.id: rng.randrange(1, d.capacity // G) * G
                             for d in topo.devices})
    for near in range(8):
        for home in ([near], [near, (near + 1) % 8], []):
            for nbytes in (1, G, 5 * G, 60 * G, 200 * G):
                first = place(topo, pools, nbytes, near, home)
                assert place(topo, pools, nbytes, near, home) == first
                shuffled = Topology(rng.sample(topo.devices, len(topo.devices)), topo.links)
                assert place(shuffled, pools, nbytes, near, home) == first


def test_place_does_not_allocate():
    topo = mixed()
    pools = pools_for(topo)
    place(topo, pools, 5 * G, near=0)
    assert all(p.used == 0 for p in pools.values())


# --- property: the choice is the best fitting device in the documented order ------


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 8))
    devices = [Device(i, "cuda", draw(st.integers(0, 16)) * G) for i in range(n)]
    links = {}
    for a in range(n):
        for b in range(n):
            if a != b:
                tier = draw(st.sampled_from([None, Tier.NVLINK, Tier.PEER]))
                if tier is not None:
                    links[a, b] = Link(tier, draw(st.sampled_from([0.0, 25e9, 300e9])))
    topo = Topology(devices, links)
    pools = {d.id: GranuleAllocator(d.capacity, G) for d in devices}
    for d in devices:
        pools[d.id].used = draw(st.integers(0, pools[d.id].capacity // G)) * G
    near = draw(st.integers(0, n - 1))
    home = draw(st.sets(st.integers(0, n - 1), max_size=n))
    nbytes = draw(st.integers(1, 8 * G))
    return topo, pools, near, home, nbytes


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_choice_is_best_by_tier_home_bandwidth_free_id(scenario):
    topo, pools, near, home, nbytes = scenario
    choice = place(topo, pools, nbytes, near, home)
    fitting = [d.id for d in topo.devices if pools[d.id].fits(nbytes)]
    if not fitting:
        assert choice is None
        return
    assert choice in fitting
    c_link = topo.link(near, choice)
    for other in fitting:
        if other == choice:
            continue
        o_link = topo.link(near, other)
        assert c_link.tier <= o_link.tier
        if c_link.tier != o_link.tier:
            continue
        if (choice in home) != (other in home):
            assert other in home  # home devices come last within a tier
            continue
        assert c_link.bandwidth >= o_link.bandwidth
        if c_link.bandwidth != o_link.bandwidth:
            continue
        assert pools[choice].free >= pools[other].free
        if pools[choice].free == pools[other].free:
            assert choice < other


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_a_kept_placer_follows_the_pools_as_they_fill(scenario):
    # The arbiter keeps one Placer, whose rankings are cached: its choices
    # must stay those of a fresh one while leases fill the pools.
    topo, pools, near, home, nbytes = scenario
    kept = Placer(topo)
    for _ in range(20):
        choice = kept(pools, nbytes, near, tuple(home))
        assert choice == place(topo, pools, nbytes, near, home)
        if choice is None:
            break
        pools[choice].allocate(nbytes)


def test_the_tenants_own_gpu_is_the_last_resort():
    topo = pcie_only()
    pools = {d.id: GranuleAllocator(d.capacity, G) for d in topo.devices}
    for dev in range(1, 8):
        pools[dev].allocate(GPU_CAP)  # every peer full
    pools[HOST].allocate(HOST_CAP)  # host full too
    choice = place(topo, pools, G, near=0, home=[0])
    assert choice == 0 and tier_of(topo, 0, 0) is Tier.LOCAL
    pools[HOST].free_bytes(HOST_CAP)
    assert place(topo, pools, G, near=0, home=[0]) == HOST  # host before its own GPU
    # Host-backend devices are all host memory: no "local" tier there.
    host_only = Topology([Device(0, "host", GPU_CAP), Device(1, "host", GPU_CAP)])
    assert tier_of(host_only, 0, 0) is Tier.HOST


def test_a_kept_placer_remembers_a_bounded_number_of_rankings(monkeypatch):
    import itertools

    from aquad.core import placer as placer_mod

    monkeypatch.setattr(placer_mod, "MAX_RANKINGS", 4)
    topo = pcie_only()
    pools = pools_for(topo)
    kept = Placer(topo)
    # Tenants with every ordering of their home devices come and go.
    for home in itertools.permutations([0, 1, 2]):
        assert kept(pools, G, 0, home) == place(topo, pools, G, 0, home)
        assert len(kept._ranks) <= 4
