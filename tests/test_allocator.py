"""Unit tests for aquad/core/allocator.py: GranuleAllocator capacity accounting."""

from __future__ import annotations

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from aquad.core.allocator import GranuleAllocator, OutOfCapacity

G = 4096


def snapshot(a: GranuleAllocator) -> tuple[int, int, int, int]:
    return (a.capacity, a.granule, a.used, a.free)


# --- examples -------------------------------------------------------------------


def test_capacity_rounds_down_to_granules():
    a = GranuleAllocator(10 * G + 123, G)
    assert (a.capacity, a.used, a.free) == (10 * G, 0, 10 * G)
    assert GranuleAllocator(G - 1, G).capacity == 0


@pytest.mark.parametrize("granule", [0, -1, 3, 6, 4095, 4097])
def test_granule_must_be_a_power_of_two(granule):
    with pytest.raises(ValueError):
        GranuleAllocator(1 << 20, granule)


def test_negative_capacity_is_refused():
    with pytest.raises(ValueError):
        GranuleAllocator(-1, G)


def test_allocate_rounds_up_and_free_returns_it():
    a = GranuleAllocator(4 * G, G)
    assert a.allocate(1) == G
    assert a.allocate(G) == G
    assert a.allocate(G + 1) == 2 * G
    assert a.used == 4 * G and a.free == 0
    a.free_bytes(2 * G)
    a.free_bytes(G)
    a.free_bytes(G)
    assert a.used == 0


def test_fits():
    a = GranuleAllocator(2 * G, G)
    assert a.fits(1) and a.fits(2 * G)
    assert not a.fits(2 * G + 1)
    assert not a.fits(0) and not a.fits(-5)
    a.allocate(G)
    assert a.fits(G) and not a.fits(G + 1)


def test_out_of_capacity_reports_request_and_free():
    a = GranuleAllocator(2 * G, G)
    a.allocate(G)
    with pytest.raises(OutOfCapacity) as info:
        a.allocate(G + 1)
    assert (info.value.requested, info.value.free) == (G + 1, G)
    assert str(G) in str(info.value)
    assert a.used == G


@pytest.mark.parametrize("nbytes", [0, -1, -G])
def test_allocate_non_positive_raises_and_changes_nothing(nbytes):
    a = GranuleAllocator(4 * G, G)
    a.allocate(G)
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.allocate(nbytes)
    assert snapshot(a) == before


@pytest.mark.parametrize("size", [0, -G, 1, G - 1, G + 1, 3 * G])
def test_bad_free_raises_and_changes_nothing(size):
    a = GranuleAllocator(4 * G, G)
    a.allocate(2 * G)
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.free_bytes(size)
    assert snapshot(a) == before


def test_set_capacity_rounds_down_and_counts_what_must_move():
    a = GranuleAllocator(4 * G, G)
    a.allocate(2 * G)
    a.set_capacity(8 * G + 7)
    assert (a.capacity, a.free, a.over) == (8 * G, 6 * G, 0)
    a.set_capacity(G + 1)  # below what is in use: a reclaim's shortfall
    assert (a.capacity, a.free, a.over) == (G, 0, G)
    a.set_capacity(-5)
    assert (a.capacity, a.over) == (0, 2 * G)


# --- stateful -------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    charges = Bundle("charges")

    def __init__(self) -> None:
        super().__init__()
        self.a: GranuleAllocator | None = None
        self.live: list[int] = []  # charges not yet returned

    @precondition(lambda self: self.a is None)
    @rule(capacity=st.integers(0, 64 * 1024), shift=st.integers(0, 10))
    def create(self, capacity, shift):
        self.a = GranuleAllocator(capacity, 1 << shift)
        assert self.a.capacity <= capacity
        assert self.a.capacity > capacity - self.a.granule

    @precondition(lambda self: self.a is not None)
    @rule(target=charges, nbytes=st.integers(1, 20_000))
    def allocate(self, nbytes):
        a = self.a
        before = snapshot(a)
        g = a.granule
        fits = a.fits(nbytes)
        rounded = -(-nbytes // g) * g
        assert fits == (rounded <= a.free)
        try:
            charged = a.allocate(nbytes)
        except OutOfCapacity:
            assert not fits
            assert snapshot(a) == before
            return multiple()
        assert fits
        assert charged % g == 0
        assert nbytes <= charged < nbytes + g
        assert a.used == before[2] + charged
        self.live.append(charged)
        return charged

    @precondition(lambda self: self.a is not None and self.a.free > 0)
    @rule(data=st.data())
    def any_request_up_to_free_succeeds(self, data):
        # No external fragmentation: every lease is its own segment.
        nbytes = data.draw(st.integers(1, self.a.free))
        charged = self.a.allocate(nbytes)
        self.live.append(charged)

    @precondition(lambda self: self.a is not None)
    @rule(charge=consumes(charges))
    def free(self, charge):
        if charge not in self.live:
            return  # already returned by free_everything
        self.live.remove(charge)
        used = self.a.used
        self.a.free_bytes(charge)
        assert self.a.used == used - charge

    @precondition(lambda self: self.a is not None)
    @rule(size=st.integers(-10, 40_000))
    def bad_free(self, size):
        a = self.a
        assume(size <= 0 or size % a.granule or size > a.used)
        before = snapshot(a)
        with pytest.raises(ValueError):
            a.free_bytes(size)
        assert snapshot(a) == before

    @precondition(lambda self: self.a is not None)
    @rule(nbytes=st.integers(-10, 0))
    def bad_allocate(self, nbytes):
        before = snapshot(self.a)
        with pytest.raises(ValueError):
            self.a.allocate(nbytes)
        assert snapshot(self.a) == before

    @precondition(lambda self: self.a is not None)
    @rule(capacity=st.integers(-10, 80 * 1024))
    def set_capacity(self, capacity):
        # A reclaim may take capacity below what is in use: `over` is what
        # must move away, and nothing more is granted meanwhile.
        a = self.a
        used = a.used
        a.set_capacity(capacity)
        assert a.capacity == max(0, capacity - capacity % a.granule)
        assert a.used == used and a.over == max(0, used - a.capacity)

    @precondition(lambda self: self.a is not None)
    @rule()
    def free_everything(self):
        for charge in self.live:
            self.a.free_bytes(charge)
        self.live.clear()
        assert self.a.used == 0
        assert self.a.free == self.a.capacity

    @invariant()
    def accounting(self):
        a = self.a
        if a is None:
            return
        assert a.free == max(0, a.capacity - a.used)
        assert a.over == max(0, a.used - a.capacity)
        assert 0 <= a.used
        assert a.capacity % a.granule == 0
        assert a.used == sum(self.live)  # no leak, nothing double counted
        assert all(c > 0 and c % a.granule == 0 for c in self.live)

    def teardown(self):
        if self.a is not None:
            for charge in self.live:
                self.a.free_bytes(charge)
            assert self.a.used == 0


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)
