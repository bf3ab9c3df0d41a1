"""The busy-poll policy on its own, with a fake clock, socket and yield."""

from __future__ import annotations

import pytest

from aquad.busypoll import BACKOFF_MAX_S, BACKOFF_MIN_S, BUSY_S, HOT_S, SPIN_S, BusyPoll


class Fake:
    """A socket that becomes ready at a given time; yields cost `slice_s`."""

    def __init__(self) -> None:
        self.now = 100.0
        self.ready_at = float("inf")
        self.slice_s = 1e-6
        self.yields = 0
        self.poll = BusyPoll(self.ready, clock=self.clock, yield_cpu=self.yield_cpu)

    def clock(self) -> float:
        return self.now

    def ready(self) -> bool:
        self.now += 0.5e-6  # a ZMQ_EVENTS query takes a little time
        return self.now >= self.ready_at

    def yield_cpu(self) -> None:
        self.yields += 1
        self.now += self.slice_s


def test_a_cold_peer_parks_at_once():
    f = Fake()
    f.poll.parked(HOT_S * 1.5)  # woke well after parking: talks once per step
    assert not f.poll.hot
    assert f.poll.poll() is False and f.yields == 0


def test_a_back_to_back_peer_is_polled_for_until_its_request_lands():
    f = Fake()
    f.poll.parked(HOT_S / 2)
    f.ready_at = f.now + 30e-6
    assert f.poll.poll() is True
    assert f.now >= f.ready_at and f.yields > 0  # yielded between polls
    assert f.poll.hot  # still polling for the next one


def test_polling_stops_after_the_window_and_the_peer_goes_cold():
    f = Fake()
    f.poll.parked(0.0)
    f.poll.backoff = 0.4  # left over from a busy spell
    start = f.now
    assert f.poll.poll() is False
    assert SPIN_S <= f.now - start < SPIN_S + 10e-6
    assert f.poll.backoff == 0.2  # a poll that went well, if idle
    assert not f.poll.hot and f.poll.poll() is False


def test_a_busy_core_turns_polling_off_with_a_doubling_backoff():
    f = Fake()
    f.slice_s = 0.75e-3  # another process holds the core for the shortest time slice
    backoffs = []
    for _ in range(12):
        f.poll.parked(0.0)
        assert f.poll.poll() is True  # look again: a request may have come meanwhile
        assert f.yields == len(backoffs) + 1  # one yield showed it
        assert not f.poll.hot  # nothing pending next time: park
        backoffs.append(f.poll.backoff)
        f.poll.parked(0.0)
        assert f.poll.poll() is False  # within the backoff: park, no polling
        assert f.yields == len(backoffs)
        f.now += f.poll.backoff  # the backoff runs out
    assert backoffs[0] == BACKOFF_MIN_S
    assert all(b == min(2 * a, BACKOFF_MAX_S) for a, b in zip(backoffs, backoffs[1:]))
    assert backoffs[-1] == BACKOFF_MAX_S


def test_good_polls_shrink_the_backoff_again():
    f = Fake()
    f.slice_s = 4e-3
    for _ in range(5):
        f.poll.parked(0.0)
        f.poll.poll()
        f.now += f.poll.backoff
    high = f.poll.backoff
    f.slice_s = 1e-6  # the other process went away
    f.poll.parked(0.0)
    f.ready_at = f.now + 10e-6
    assert f.poll.poll() is True
    assert f.poll.backoff == pytest.approx(high / 2)
    for _ in range(20):
        f.ready_at = f.now + 10e-6
        f.poll.poll()
    assert f.poll.backoff == BACKOFF_MIN_S / 2  # the next contention starts at the minimum


def test_a_tenant_on_our_core_that_sends_at_once_is_no_contention():
    f = Fake()
    f.slice_s = 30e-6  # the yield runs the tenant, which sends and blocks
    assert f.slice_s < BUSY_S
    f.poll.parked(0.0)
    f.ready_at = f.now + 2 * f.slice_s
    assert f.poll.poll() is True and f.poll.hot
    assert f.poll.backoff == BACKOFF_MIN_S / 2
