"""Host lease mappings: populated and freed with the GIL released, restores
bit-exact, and bytes that a live view still aliases never freed."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import aqua
from aqua.memory import SHM_DIR

from .conftest import wait_until

MiB = 2**20


@pytest.fixture
def client(start_daemon):
    daemon = start_daemon("--host-devices", "2x128MiB")
    with aqua.connect("mapper", 0, socket=daemon.socket) as c:
        yield c


@pytest.mark.parametrize("nbytes", [1, 4095, MiB, MiB + 3, 16 * MiB, 48 * MiB + 12345])
def test_offload_and_restore_are_bit_exact(client, nbytes):
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    back = client.offload(src).restore()
    assert torch.equal(back, src)
    assert client.leases == []


@pytest.mark.parametrize("populate", [True, False])
def test_a_lease_is_populated_only_when_asked_and_freed_on_release(client, populate):
    lease = client.lease(8 * MiB, populate=populate)
    path = os.path.join(SHM_DIR, lease._mapping.name)
    assert (os.stat(path).st_blocks * 512 >= 8 * MiB) == populate
    # Unmapping frees the pages first, with the GIL released: nothing is
    # left for munmap() (GIL held) or for the daemon's unlink to free.
    assert lease._unmap()
    assert os.stat(path).st_blocks == 0
    client._release(lease)


def test_bytes_a_live_tensor_aliases_survive_release(client):
    lease = client.lease(4 * MiB)
    t = lease.tensor()
    t.copy_(torch.arange(4 * MiB, dtype=torch.int64).to(torch.uint8))
    want = t.clone()
    lease.release()
    assert torch.equal(t, want)  # not freed under it


def test_bytes_a_buffer_slice_aliases_survive_release(client):
    lease = client.lease(MiB)
    view = lease.buffer()[100:200]
    view[:] = bytes(range(100))
    lease.release()
    assert bytes(view) == bytes(range(100))


def test_mapping_and_release_leave_other_threads_running(client):
    """A thread waking every ms is never held up for the whole populate or
    free of a big lease: the page work runs with the GIL released."""
    worst = [0.0]
    laps = [0]  # wake-ups the thread has measured
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            time.sleep(0.001)  # what is measured: how late this wakes
            worst[0] = max(worst[0], time.perf_counter() - t0 - 0.001)
            laps[0] += 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert wait_until(lambda: laps[0] > 0, 5)  # running, its start-up not counted
    worst[0] = 0.0
    t0 = time.perf_counter()
    lease = client.lease(96 * MiB)
    lease.release()
    elapsed = time.perf_counter() - t0
    after = laps[0]
    assert wait_until(lambda: laps[0] >= after + 2, 5)  # a whole wake-up since the release
    stop.set()
    thread.join()
    # Loose: a loaded machine delays wake-ups too. Work under the GIL would
    # stall the thread for about all of `elapsed`.
    assert worst[0] < max(0.05, elapsed / 2), (worst[0], elapsed)
