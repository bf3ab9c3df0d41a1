"""A restarted aquad gives live tenants their leases back (host backend).

The daemon is SIGKILLed and started again on the same socket; tenants
reconnect by themselves, re-register and reclaim their leases with `adopt`
and the capability their lease reply carried.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import aqua
import aqua_protocol as p
from aqua.client import Connection
from tests.conftest import wait_until

MiB = 1 << 20


def _pattern(nbytes: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def _settled(daemon, *leases) -> None:
    """Wait for aquad to journal these leases: it writes when idle, off the
    request path, so a crash right after a grant may find it unrecorded."""
    def written() -> bool:
        with open(daemon.socket + ".journal") as f:
            text = f.read()
        return all(lease.id in text for lease in leases)

    assert wait_until(written, 5)


def test_a_restart_gives_leases_back_and_restore_is_bit_exact(daemon):
    client = aqua.connect("survivor", 0, socket=daemon.socket)
    original = _pattern(8 * MiB, 1)
    saved = client.offload(original)
    raw = client.lease(MiB)
    raw.buffer()[:4] = b"keep"
    _settled(daemon, saved.lease, raw)
    daemon.kill()
    assert wait_until(lambda: not client.connected, 2)
    daemon.restart()
    assert client.wait_connected(5)
    status = daemon.status()
    mine = {lease["id"] for lease in status["leases"] if lease["tenant"] == client.id}
    assert mine == {saved.lease.id, raw.id}  # same ids, now the new tenant's
    assert bytes(raw.buffer()[:4]) == b"keep"
    assert torch.equal(saved.restore(), original)
    raw.release()
    assert daemon.status()["leases"] == []  # the releases reached the new daemon
    assert daemon.segments() == []
    client.close()


def test_an_adopted_lease_survives_the_next_restart_too(daemon):
    # Adoption journals the lease again for its new owner: with the same
    # capability, or the second crash would lose it.
    client = aqua.connect("twice", 0, socket=daemon.socket)
    original = _pattern(2 * MiB, 3)
    saved = client.offload(original)
    for _ in range(2):
        _settled(daemon, saved.lease)
        daemon.kill()
        assert wait_until(lambda: not client.connected, 2)
        daemon.restart()
        assert client.wait_connected(5)
        assert [l["id"] for l in daemon.status()["leases"]] == [saved.lease.id]
    assert client.reconnects == 2
    assert torch.equal(saved.restore(), original)
    client.close()


def test_leases_of_dead_owners_and_unclaimed_ones_are_freed(start_daemon, tenants):
    daemon = start_daemon("--adopt-grace", "1")
    dead = tenants(daemon, """
        import aqua, torch, sys
        client = aqua.connect(tenant="dead", device=0)
        saved = client.offload(torch.ones(4 << 20, dtype=torch.uint8))
        print("offloaded", flush=True)
        sys.stdin.readline()
    """)
    assert dead.readline() == "offloaded"
    silent = aqua.connect("silent", 0, socket=daemon.socket, reconnect=False)
    kept = silent.lease(2 * MiB)
    kept.buffer()[:1] = b"x"
    _settled(daemon, kept)
    assert len(daemon.segments()) == 2
    daemon.kill()
    dead.kill()  # its owner is gone before the restart: nothing to keep
    daemon.restart()
    # Logged as recovery ends, which may be just after the socket answers.
    assert wait_until(lambda: "1 kept" in daemon.log() and "1 freed" in daemon.log(), 5), \
        daemon.log()
    # The silent tenant never reclaims its lease: freed after the grace period.
    assert wait_until(lambda: daemon.segments() == [], 5), daemon.segments()
    assert daemon.status()["leases"] == [] and daemon.status()["devices"][0]["leased_bytes"] == 0
    silent.close()


def test_adopt_takes_the_capability_and_the_owner_uid(daemon):
    client = aqua.connect("owner", 0, socket=daemon.socket, reconnect=False)
    lease = client.lease(MiB)
    assert len(lease.capability) == 32
    assert lease.capability not in str(daemon.status())  # never shown to operators
    _settled(daemon, lease)
    daemon.kill()
    daemon.restart()
    conn = Connection(daemon.socket)
    try:
        conn.request(p.Hello(tenant="claimant", devices=[0]))
        wrong = "0" * 32 if lease.capability != "0" * 32 else "1" * 32
        with pytest.raises(aqua.NoSuchLease):
            conn.request(p.Adopt(lease=lease.id, capability=wrong))
        reply = conn.request(p.Adopt(lease=lease.id, capability=lease.capability))
        assert reply.lease == lease.id and p.replies.handle_map(reply.handle) == lease.handle
        with pytest.raises(aqua.NoSuchLease):  # once only
            conn.request(p.Adopt(lease=lease.id, capability=lease.capability))
        with pytest.raises(aqua.BadRequest):
            conn.request(p.Adopt(lease=lease.id, capability="not hex"))
        conn.request(p.Release(lease=lease.id))
    finally:
        conn.close()
        client.close()


def test_a_held_turn_is_asked_for_again(daemon):
    client = aqua.connect("engine", 0, socket=daemon.socket)
    stop = threading.Event()
    steps = []

    def engine() -> None:
        with client.turn():
            while not stop.is_set():
                try:
                    client.respond()
                except aqua.DaemonGone:
                    pass  # an engine keeps computing; the client reconnects
                steps.append(1)
                time.sleep(0.005)

    thread = threading.Thread(target=engine, daemon=True)
    thread.start()
    assert wait_until(lambda: daemon.status()["slices"][0]["holder"] == client.id, 5)
    daemon.kill()
    daemon.restart()
    assert client.wait_connected(5)
    assert wait_until(lambda: daemon.status()["slices"][0]["holder"] == client.id, 5), \
        daemon.status()["slices"][0]
    stop.set()
    thread.join(5)
    client.close()
