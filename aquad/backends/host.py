"""Host backend: leases in POSIX shared memory, one segment per lease.

A virtual device is a capacity budget; each lease is its own file under
/dev/shm (or the tmpfs --shm-dir names: aquad/shmdir.py), created 0600 and
owned by the tenant's uid (from SO_PEERCRED), so only that user can map it.
The tenant opens it by name and maps it; its bytes never pass through the
daemon. Pages are not touched here: tmpfs allocates
them on first write, and startup checks that /dev/shm can hold the capacity
aquad promises, so a tenant does not meet SIGBUS halfway through an offload.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any

from ..core.tenants import Peer
from ..core.topology import Device, Topology
from ..shmdir import DEFAULT as SHM_DIR
from .base import BackendError

log = logging.getLogger("aquad")

SPARES = 16  # segment files kept ready for grants (see __init__)


@dataclass
class ShmSegment:
    name: str  # file name in `directory`
    nbytes: int
    directory: str = SHM_DIR

    @property
    def handle(self) -> dict[str, Any]:
        handle = {"kind": "posix_shm", "name": self.name, "nbytes": self.nbytes}
        if self.directory != SHM_DIR:  # absent means /dev/shm (protocol/README.md 4.1)
            handle["dir"] = self.directory
        return handle


def _unlink(path: str) -> bool:
    """Unlink, never raise; True if this call removed the file. A file that
    cannot go now is left for remove_stale() at the next start, and the rest
    of the work goes on."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        # Its pages stay in /dev/shm while the pool counts them free.
        log.error("cannot remove %s: %s", path, exc.strerror)
        return False


class HostBackend:
    name = "host"

    def __init__(self, count: int, capacity: int, *, prefix: str,
                 granule: int = 64 * 1024, shm_dir: str = SHM_DIR) -> None:
        if count < 1 or capacity < granule:
            raise ValueError("host backend needs at least one device of one granule")
        self.granule = granule
        self._devices = [Device(i, "host", capacity, f"host{i}") for i in range(count)]
        self._prefix = prefix
        self._dir = shm_dir
        self._live: dict[str, ShmSegment] = {}
        self._doomed: list[str] = []
        # Files made ahead of time, kept open: a grant then costs at most an
        # ftruncate (and an fchown for another user) instead of a create in
        # the tmpfs directory, which dominated the lease round trip. More of
        # them than the daemon's MAINTAIN_EVERY, so a streak never runs out.
        self._spares: list[tuple[str, int, int]] = []  # name, open fd, size
        self._closed = False  # close() ran: make no more spare files
        self._last_size = 0
        self._to_close: list[int] = []
        self._euid = os.geteuid()

    def topology(self) -> Topology:
        # Virtual devices share the host's memory: no links between them.
        return Topology(list(self._devices))

    @property
    def spares(self) -> frozenset[str]:
        """Names of the files kept ready for grants: no lease's yet."""
        return frozenset(name for name, _, _ in self._spares)

    def remove_stale(self) -> int:
        """Delete segments a crashed predecessor on the same socket left."""
        ours = {*self._live, *self._doomed, *self.spares}
        return sum(_unlink(os.path.join(self._dir, entry)) for entry in os.listdir(self._dir)
                   if entry.startswith(self._prefix) and entry not in ours)

    def adopt(self, name: str, nbytes: int, uid: int) -> ShmSegment | None:
        """At startup, before remove_stale(): take over a predecessor's
        segment if it is still what that daemon made for `uid` (named with
        our prefix, a regular file linked once, owned by that uid, private,
        at least `nbytes`); None if anything about it is off."""
        suffix = name[len(self._prefix):]
        if not name.startswith(self._prefix) or not suffix.isalnum() or name in self._live:
            return None
        try:
            st = os.lstat(os.path.join(self._dir, name))
        except OSError:
            return None
        owner = uid if self._euid == 0 else self._euid  # as create() left it
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != owner
                or stat.S_IMODE(st.st_mode) != 0o600 or st.st_size < nbytes):
            return None
        seg = self._live[name] = ShmSegment(name, nbytes, self._dir)
        return seg

    def check_capacity(self) -> str | None:
        st = os.statvfs(self._dir)
        room = st.f_bavail * st.f_frsize
        want = sum(d.capacity for d in self._devices)
        if want > room:
            return (f"{self._dir} has {room} bytes available but the host devices "
                    f"promise {want}; shrink --host-devices or enlarge {self._dir}")
        return None

    def quarantine(self, owner: Peer) -> None:
        pass  # freeing at once is safe: see Backend.quarantine

    def check_owner(self, peer: Peer) -> str | None:
        if self._euid == 0 or peer.uid == self._euid:
            return None
        return (f"aquad runs as uid {self._euid} and cannot create memory owned by "
                f"uid {peer.uid}; run aquad as root to serve other users")

    def _new_file(self) -> tuple[str, int]:
        name = f"{self._prefix}{secrets.token_hex(12)}"
        path = os.path.join(self._dir, name)
        try:
            # Mode is exactly 0600: aquad runs with umask 077 (see main.py).
            return name, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BackendError(f"cannot create shared memory: {exc.strerror}") from None

    def create(self, device: int, nbytes: int, owner: Peer) -> ShmSegment:
        if self._spares:
            name, fd, size = self._spares.pop()
        else:
            (name, fd), size = self._new_file(), 0
        self._last_size = nbytes
        try:
            if self._euid == 0 and (owner.uid, owner.gid) != (0, 0):
                os.fchown(fd, owner.uid, owner.gid)
            if size != nbytes:
                os.ftruncate(fd, nbytes)
        except OSError as exc:
            os.close(fd)
            _unlink(os.path.join(self._dir, name))  # never handed out
            raise BackendError(f"cannot size shared memory: {exc.strerror}") from None
        self._to_close.append(fd)  # closed in maintain(), off the reply's path
        seg = ShmSegment(name, nbytes, self._dir)
        self._live[name] = seg
        return seg

    def destroy(self, segment: ShmSegment) -> None:
        # Unlinked in maintain(), after the reply is out: the accounting is
        # already back in the pool and the tenant's mapping (if any) keeps its
        # pages until unmapped either way.
        if self._live.pop(segment.name, None) is not None:
            self._doomed.append(segment.name)

    def fence(self, segment: ShmSegment) -> bool:
        """Revoke a lease whose holder did not give it up by a reclaim's
        deadline: truncate the file to nothing, so the holder's mapping,
        still there, faults (SIGBUS) on its next touch instead of writing
        into memory the pool now gives to others, and unlink it now (not in
        maintain(): the point is that it is gone at the deadline)."""
        if self._live.pop(segment.name, None) is None:
            return True
        path = os.path.join(self._dir, segment.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot truncate %s at its fence: %s", path, exc.strerror)
        _unlink(path)
        return True

    def can_lend(self, device: int, nbytes: int, unallocated: int) -> str | None:
        """None if /dev/shm has room for `nbytes` more on top of what the
        device may still hand out; else why not."""
        st = os.statvfs(self._dir)
        room = st.f_bavail * st.f_frsize
        if unallocated + nbytes > room:
            return f"{self._dir} has {room} bytes available"
        return None

    def maintain(self) -> None:
        """Deferred work: unlink destroyed segments, close granted files'
        descriptors, make spare files for the next grants."""
        self._drain()
        while len(self._spares) < SPARES and not self._closed:
            try:
                name, fd = self._new_file()
            except BackendError:
                break  # /dev/shm trouble: grants will say so themselves
            try:
                # Sized like the last grant: a tenant paging out a stream of
                # equal blocks then gets each without a syscall. The file
                # stays sparse (tmpfs allocates pages on first write).
                os.ftruncate(fd, self._last_size)
                size = self._last_size
            except OSError:
                size = 0
            self._spares.append((name, fd, size))

    def _drain(self) -> None:
        doomed, self._doomed = self._doomed, []
        for name in doomed:
            _unlink(os.path.join(self._dir, name))
        to_close, self._to_close = self._to_close, []
        for fd in to_close:
            try:
                os.close(fd)
            except OSError as exc:  # the rest must still be closed
                log.error("cannot close a segment descriptor: %s", exc.strerror)

    def close(self) -> None:
        self._closed = True  # no more spare files: nothing may be granted now
        for seg in list(self._live.values()):
            self.destroy(seg)
        for name, fd, _ in self._spares:
            self._doomed.append(name)
            self._to_close.append(fd)
        self._spares = []
        self._drain()
