"""The tenant-side turn machine on its own: no socket, no daemon.

The client library and the simulator both drive `aqua_protocol.turns`; these
tests pin the ordering rules (everything by slice id) that both rely on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqua_protocol import Turn, TurnDone, TurnYield
from aqua_protocol.replies import Grant, Preempt, Revoked, TurnState
from aqua_protocol.turns import Phase, TurnMachine


def grant(slice_id: int, devices: tuple[int, ...] = (0,)) -> TurnState:
    return TurnState("granted", list(devices), slice_id, 0.1)


def grant_event(slice_id: int, devices: tuple[int, ...] = (0,)) -> Grant:
    return Grant(slice_id, list(devices), 0.1)


QUEUED = TurnState("queued", [0])


def test_a_granted_reply_holds_the_slice_and_done_leaves():
    now = [5.0]
    t = TurnMachine(clock=lambda: now[0])
    assert t.begin([0]) == Turn(devices=[0]) and t.phase is Phase.WAITING
    assert t.on_reply(grant(3)) and t.holding and t.slice == 3 and t.granted_at == 5.0
    assert not t.must_yield
    assert t.done() == TurnDone() and t.phase is Phase.IDLE


def test_a_second_begin_inside_a_turn_is_refused():
    t = TurnMachine()
    t.begin()
    with pytest.raises(RuntimeError):
        t.begin()


def test_a_queued_reply_waits_for_the_grant_event():
    t = TurnMachine()
    t.begin()
    assert not t.on_reply(QUEUED) and t.phase is Phase.WAITING
    assert t.on_event(grant_event(1)) == "granted" and t.holding


def test_a_preempt_read_before_its_grant_still_counts():
    # The preempt for slice 2 overtakes the grant of slice 2 on the wire.
    t = TurnMachine()
    t.begin()
    t.on_reply(QUEUED)
    assert t.on_event(Preempt(2, 0.1)) is None
    t.on_event(grant_event(2))
    assert t.preempted and t.must_yield
    assert t.yield_() == TurnYield(slice=2) and t.phase is Phase.WAITING and t.yields == 1


def test_a_preempt_of_an_older_slice_asks_nothing_of_the_current_one():
    t = TurnMachine()
    t.begin()
    t.on_reply(grant(5))
    t.on_event(Preempt(4, 0.1))
    assert not t.must_yield


def test_a_stale_grant_is_ignored_once_a_later_reply_granted():
    t = TurnMachine()
    t.begin()
    t.on_reply(grant(7))
    t.yield_()
    assert t.on_reply(grant(8)) and t.slice == 8
    t.yield_()
    assert t.on_event(grant_event(8)) is None and not t.holding  # already used


def test_a_revocation_drops_the_slice_and_asks_for_a_yield():
    t = TurnMachine()
    t.begin()
    t.on_reply(grant(4))
    assert t.on_event(Revoked(4, "overdue")) == "revoked"
    assert not t.holding and t.revoked and t.must_yield and t.revocations == 1
    assert t.yield_() == TurnYield(slice=4)  # a stale yield queues us again


def test_a_revocation_of_an_older_slice_changes_nothing():
    t = TurnMachine()
    t.begin()
    t.on_reply(grant(9))
    assert t.on_event(Revoked(8)) is None and t.holding and not t.revoked


def test_a_grant_read_after_its_revocation_is_not_held():
    t = TurnMachine()
    t.begin()
    t.on_reply(QUEUED)
    t.on_event(Revoked(3))
    assert t.on_event(grant_event(3)) is None and not t.holding
    assert t.on_event(grant_event(4)) == "granted"


def test_a_restarted_daemon_renumbers_and_requeues_the_turn():
    t = TurnMachine()
    t.begin([1])
    t.on_reply(grant(40, (1,)))
    t.restarted(QUEUED)
    assert (t.slice, t.asked, t.revoked_slice) == (0, 0, 0)
    assert t.requeued and t.must_yield and not t.holding
    assert t.yield_() is None  # queued already: nothing to send, wait for the grant
    assert t.on_event(grant_event(1, (1,))) == "granted" and not t.must_yield


def test_a_restarted_daemon_that_grants_at_once_needs_no_yield():
    t = TurnMachine()
    t.begin()
    t.on_reply(grant(12))
    t.restarted(grant(1))
    assert t.holding and t.slice == 1 and not t.must_yield


def test_outside_a_turn_a_restart_only_forgets():
    t = TurnMachine()
    t.restarted(None)
    assert t.phase is Phase.IDLE and not t.requeued


EVENTS = st.lists(st.tuples(st.sampled_from(["grant", "preempt", "revoked"]),
                            st.integers(1, 6)), max_size=30)


@given(EVENTS)
def test_whatever_the_order_the_machine_never_holds_a_slice_it_was_told_is_gone(events):
    t = TurnMachine()
    t.begin()
    t.on_reply(QUEUED)
    gone: set[int] = set()
    for name, slice_id in events:
        before = t.slice
        if name == "revoked":
            gone.add(slice_id)
        t.on_event({"grant": grant_event, "preempt": lambda s: Preempt(s, 0.1),
                    "revoked": Revoked}[name](slice_id))
        assert t.slice >= before  # slice ids only move forward
        if t.holding:
            assert t.slice not in gone
        if t.must_yield and t.active:
            t.yield_()
            assert not t.holding
