"""The one small interface every memory backend implements.

The arbiter decides (how much, where, for whom); a backend only makes and
destroys the memory behind a lease and describes it as a handle the tenant
can open. The same handle dict goes on the wire, so the client dispatches on
its `kind` and nothing above this layer branches on the backend.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from ..core.tenants import Peer
from ..core.topology import Topology


def alive(pid: int) -> bool:
    """Whether a process with this pid exists now (it may be another's, by
    pid reuse)."""
    try:
        os.close(os.pidfd_open(pid))
        return True
    except ProcessLookupError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's live process
        return True


class BackendError(Exception):
    """Backing memory could not be made; the lease is refused, state unchanged."""


class Segment(Protocol):
    nbytes: int

    @property
    def handle(self) -> dict[str, Any]: ...


class Backend(Protocol):
    name: str
    granule: int

    def topology(self) -> Topology: ...

    def check_owner(self, peer: Peer) -> str | None:
        """None if leases can be made for this peer, else why not."""

    def create(self, device: int, nbytes: int, owner: Peer) -> Segment: ...

    def destroy(self, segment: Segment) -> None:
        """Forget a segment; freeing it may wait for maintain()."""

    def quarantine(self, owner: Peer) -> None:
        """Called before a tenant that went silent is dropped: its process may
        still live and map its leases. A backend for which freeing mapped
        memory is unsafe (cuda) keeps the memory until the process exits; the
        host backend frees at once (an unlinked file's pages stay private to
        whoever maps them)."""

    def check_capacity(self) -> str | None:
        """At startup: None if the backing store can hold what is promised."""

    # Backends whose memory outlives the daemon (host) also have
    # adopt(name, nbytes, uid) -> Segment | None, used at startup, before
    # remove_stale(), for leases the journal says are live (aquad/recovery.py).

    def remove_stale(self) -> int:
        """At startup, once the lock is held: delete what a crashed
        predecessor left; returns how many."""

    def maintain(self) -> None:
        """Deferred work (freeing destroyed segments). The daemon calls it once
        replies are out and the socket is idle, keeping syscalls off the
        request's latency path."""

    def close(self) -> None:
        """Destroy everything still alive (daemon shutdown)."""
