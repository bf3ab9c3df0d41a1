"""HostBackend on its own: segment files, spares, cleanup (no daemon)."""

from __future__ import annotations

import os
import stat

from aquad.backends.host import SPARES, HostBackend
from aquad.core.tenants import Peer

ME = Peer(os.getpid(), os.getuid(), os.getgid())


def test_grants_use_spare_files_and_close_leaves_nothing(tmp_path):
    b = HostBackend(1, 2**30, prefix="aqua-0123456789-", shm_dir=str(tmp_path))
    seg = b.create(0, 12345, ME)  # no spare yet: made on demand
    assert os.stat(tmp_path / seg.name).st_size == 12345
    b.maintain()
    files = set(os.listdir(tmp_path))
    assert len(files) == 1 + SPARES
    spares = files - {seg.name}
    # Spares are sized like the last grant, and sparse: no memory used yet.
    assert all(os.stat(tmp_path / f).st_size == 12345 for f in spares)
    assert all(os.stat(tmp_path / f).st_blocks == 0 for f in spares)
    assert all(stat.S_IMODE(os.stat(tmp_path / f).st_mode) == 0o600 for f in files)
    same = b.create(0, 12345, ME)
    assert same.name in spares and os.stat(tmp_path / same.name).st_size == 12345
    second = b.create(0, 4096, ME)
    assert second.name in spares  # a spare, resized at grant time
    assert os.stat(tmp_path / second.name).st_size == 4096
    b.destroy(seg)
    b.maintain()  # unlinks the released one, refills the spares
    assert seg.name not in os.listdir(tmp_path)
    assert len(os.listdir(tmp_path)) == 2 + SPARES  # `same`, `second` and the spares
    assert b.remove_stale() == 0  # its own spares are not stale
    fds = len(os.listdir("/proc/self/fd"))
    b.close()
    assert os.listdir(tmp_path) == []
    b.maintain()  # deferred work after close makes no new spare files
    assert os.listdir(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) <= fds - SPARES
