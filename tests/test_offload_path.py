"""The offload path's speed-ups and the faults they must not let through:
leases kept for reuse (stale handles, stale mappings, other tenants, a
reclaim, close, the bound) and segments in a huge-page tmpfs of aquad's own
(a mount that fails, a directory nobody should trust, one aquad mounts)."""

from __future__ import annotations

import ctypes
import os
import secrets
import stat
import tempfile

import pytest
import torch

import aqua
from aqua import AquaError, UntrustedDaemon
from aqua.memory import open_handle
from aqua_protocol.paths import segment_prefix
from aquad.shmdir import huge_setting

from .conftest import wait_until
from .test_reclaim import drain

MiB = 2**20


def _pattern(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _mine(daemon, client) -> list[dict]:
    return [lease for lease in daemon.status()["leases"] if lease["tenant"] == client.id]


@pytest.fixture
def keeper(daemon):
    with aqua.connect("keeper", 0, socket=daemon.socket, keep_bytes=8 * MiB) as client:
        yield client


# --- leases kept for reuse ----------------------------------------------------

def test_a_kept_lease_serves_the_next_offload_and_its_old_handles_are_refused(daemon, keeper):
    first = keeper.offload(_pattern(2 * MiB, 1))
    old = first.lease
    assert torch.equal(first.restore(), _pattern(2 * MiB, 1))
    assert keeper.kept_bytes == 2 * MiB and len(_mine(daemon, keeper)) == 1  # still aquad's
    second = keeper.offload(_pattern(2 * MiB, 2))
    assert second.lease.id == old.id and second.lease is not old  # same memory, new handle
    assert keeper.kept_bytes == 0
    # Whoever kept the finished handles cannot reach the new bytes through them.
    with pytest.raises(AquaError, match="released"):
        first.restore()
    with pytest.raises(AquaError, match="released"):
        old.tensor()
    old.release()  # a no-op: it must not free what `second` now holds
    assert torch.equal(second.restore(), _pattern(2 * MiB, 2))
    # Bigger than twice the request, or too small: not reused.
    small = keeper.offload(torch.zeros(MiB // 4, dtype=torch.uint8))
    assert small.lease.id != old.id
    small.release()


def test_a_lease_still_aliased_is_released_not_kept(daemon, keeper):
    lease = keeper.lease(MiB)
    stale = lease.tensor()  # a view that outlives the lease
    stale.fill_(7)
    lease.release(keep=True)
    assert keeper.kept_bytes == 0 and _mine(daemon, keeper) == []
    fresh = keeper.lease(MiB, reuse=True)
    assert fresh.id != lease.id
    fresh.buffer()[:4] = b"new!"
    stale[:4] = 9  # the old mapping is this process's alone now
    assert bytes(fresh.buffer()[:4]) == b"new!" and int(stale[0]) == 9
    fresh.release()


def test_kept_leases_stay_with_their_client_and_released_ones_come_back_zeroed(daemon, keeper):
    keeper.offload(_pattern(2 * MiB, 3)).restore()
    kept_id = _mine(daemon, keeper)[0]["id"]
    released = keeper.lease(2 * MiB)
    released.buffer()[:] = b"\xa5" * (2 * MiB)
    released_name = released.handle["name"]
    released.release()  # not kept: the other one filled what this client keeps
    with aqua.connect("other", 0, socket=daemon.socket, keep_bytes=8 * MiB) as other:
        for _ in range(3):
            saved = other.offload(torch.zeros(2 * MiB, dtype=torch.uint8))
            assert saved.lease.id != kept_id and saved.lease.handle["name"] != released_name
            assert not any(saved.lease.buffer())  # never anyone's old bytes
            saved.restore()
    assert [lease["id"] for lease in _mine(daemon, keeper)] == [kept_id]


def test_a_reclaim_releases_a_kept_lease_instead_of_moving_it(daemon, keeper):
    keeper.offload(_pattern(2 * MiB, 4)).restore()
    (kept,) = _mine(daemon, keeper)
    report = drain(daemon, kept["device"])
    assert report["state"] == "done" and report["fenced_count"] == 0
    assert wait_until(lambda: keeper.kept_bytes == 0, 5)
    assert keeper.moves == 0 and keeper.evictions == 0 and _mine(daemon, keeper) == []
    back = keeper.offload(_pattern(2 * MiB, 5))  # a fresh lease, on the other device
    assert back.lease.device != kept["device"]
    assert torch.equal(back.restore(), _pattern(2 * MiB, 5))


def test_the_bound_and_close_give_kept_leases_back(daemon):
    client = aqua.connect("bounded", 0, socket=daemon.socket, keep_bytes=5 * MiB)
    saved = [client.offload(_pattern(2 * MiB, i)) for i in range(3)]
    for s in saved:
        s.restore()
    assert client.kept_bytes == 4 * MiB and len(_mine(daemon, client)) == 2  # 3 x 2 > 5
    client.close()
    assert daemon.status()["leases"] == [] and daemon.segments() == []


def test_without_keep_bytes_nothing_is_kept(daemon):
    with aqua.connect("plain", 0, socket=daemon.socket) as client:
        client.offload(_pattern(MiB, 6)).restore()
        assert client.kept_bytes == 0 and _mine(daemon, client) == []


def test_the_engine_kv_store_reuses_a_finished_requests_lease(daemon, keeper):
    from aqua.engine.runner import LeaseKV

    class Layer:
        def __init__(self, seed: int) -> None:
            self.keys, self.values = _pattern(MiB, seed), _pattern(MiB, seed + 1)

    class Cache:
        def __init__(self, seed: int) -> None:
            self.layers = [Layer(seed)]

    kv = LeaseKV(keeper)
    kv.save(1, Cache(10))
    first = kv._leases[1].id
    kv.drop(1)  # request 1 finished
    kv.save(2, Cache(20))
    assert kv._leases[2].id == first
    kv.close()


# --- the segment directory ----------------------------------------------------

def _offload_works(daemon) -> str:
    with aqua.connect("dir", 0, socket=daemon.socket) as client:
        saved = client.offload(_pattern(4 * MiB, 7))
        where = saved.lease.handle.get("dir", "/dev/shm")
        assert torch.equal(saved.restore(), _pattern(4 * MiB, 7))
    return where


def test_a_mount_that_fails_falls_back_to_dev_shm(start_daemon, sockdir):
    target = os.path.join(sockdir, "not-a-directory")
    open(target, "w").close()
    daemon = start_daemon("--shm-dir", target, "--shm-mount")
    assert _offload_works(daemon) == "/dev/shm"
    log = daemon.log()
    assert "shm_dir_fallback" in log and f"cannot mount a tmpfs at {target}" in log


@pytest.mark.parametrize("layout", ["others-write", "not-tmpfs", "not-a-mount", "missing"])
def test_a_directory_aquad_must_not_use_falls_back_to_dev_shm(start_daemon, sockdir, layout):
    if layout == "others-write":
        target = tempfile.mkdtemp(prefix="aqua-test-open-", dir="/dev/shm")
        os.chmod(target, 0o777)  # anyone could plant or swap segments here
        why = "writable by group or others"
    elif layout == "not-tmpfs":
        target = os.path.join(sockdir, "disk")
        os.mkdir(target, 0o755)
        if huge_setting(target)[1]:
            pytest.skip(f"{sockdir} is on a tmpfs here")
        why = "is not on a tmpfs"
    elif layout == "not-a-mount":
        target = tempfile.mkdtemp(prefix="aqua-test-dir-", dir="/dev/shm")
        os.chmod(target, 0o755)  # trusted, on a tmpfs, but that tmpfs is /dev/shm's
        why = "not a mount point of its own"
    else:
        target, why = os.path.join(sockdir, "nowhere"), "does not exist"
    try:
        daemon = start_daemon("--shm-dir", target)
        assert _offload_works(daemon) == "/dev/shm"
        assert "shm_dir_fallback" in daemon.log() and why in daemon.log()
    finally:
        if target.startswith("/dev/shm/"):
            os.rmdir(target)


def _umount(path: str) -> None:
    ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(path), 2)  # MNT_DETACH


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_aquad_mounts_a_huge_page_tmpfs_and_leases_live_there(start_daemon, sockdir):
    target = os.path.join(sockdir, "segments")
    daemon = start_daemon("--shm-dir", target, "--shm-mount")
    try:
        if "shm_dir_fallback" in daemon.log():
            pytest.skip(f"this kernel or sandbox refuses the mount: {daemon.log()}")
        assert huge_setting(target) == (True, "within_size")
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
        assert _offload_works(daemon) == target
        with aqua.connect("huge", 0, socket=daemon.socket) as client:
            lease = client.lease(16 * MiB)
            assert os.path.exists(os.path.join(target, lease.handle["name"]))
            lease.release()
        daemon.stop()
        assert daemon.files() == []
        # A second aquad finds the mount in place and uses it as it is.
        daemon.restart()
        assert _offload_works(daemon) == target
        daemon.stop()
    finally:
        daemon.stop()
        _umount(target)


def test_a_client_refuses_a_segment_directory_it_cannot_trust(daemon):
    prefix = segment_prefix(daemon.socket)
    name = f"{prefix}{secrets.token_hex(12)}"
    open_dir = tempfile.mkdtemp(prefix="aqua-test-open-", dir="/dev/shm")
    os.chmod(open_dir, 0o777)
    try:
        path = os.path.join(open_dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, MiB)
        os.close(fd)
        for where, why in ((open_dir, "writable by group or others"),
                           ("relative/dir", "not a plain absolute path"),
                           (open_dir + "/../" + os.path.basename(open_dir), "plain absolute")):
            handle = {"kind": "posix_shm", "name": name, "nbytes": MiB, "dir": where}
            with pytest.raises(UntrustedDaemon, match=why):
                open_handle(handle, prefix=prefix)
        os.unlink(path)
    finally:
        os.rmdir(open_dir)


def test_kept_leases_give_way_to_a_lease_that_needs_their_room(daemon):
    # The default quota lets a uid hold half of 2 x 64 MiB.
    with aqua.connect("crowded", 0, socket=daemon.socket, keep_bytes=64 * MiB) as client:
        client.offload(torch.zeros(40 * MiB, dtype=torch.uint8)).restore()
        assert client.kept_bytes == 40 * MiB
        big = client.lease(50 * MiB)  # 40 + 50 > 64: the kept one goes first
        assert client.kept_bytes == 0 and [l["id"] for l in _mine(daemon, client)] == [big.id]
        big.release()
