"""Startup after a crash: keep the host leases whose owners may reclaim them.

Runs once the socket lock is held, in place of deleting every segment the
predecessor left. Each lease the journal says was live is kept as an
orphan for the grace period if its segment is still what aquad made (see
HostBackend.adopt) and its owner process still lives; the rest, and every
file the journal does not name (spares, grants it had not yet written),
are freed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .backends.base import alive
from .core.arbiter import Arbiter
from .journal import Journal

log = logging.getLogger("aquad")


@dataclass(frozen=True)
class Recovered:
    kept: int  # orphans awaiting their owners
    freed: int  # journaled leases that could not be kept
    stale: int  # files removed that no journal record named


def recover(arbiter: Arbiter, journal: Journal | None, grace_s: float) -> Recovered:
    backend = arbiter.backend
    kept, freed = [], 0
    for grant in (journal.load() if journal is not None else {}).values():
        # A reused pid can make a dead owner look alive: that only keeps its
        # lease until the grace period ends, since adopting it takes the capability.
        segment = backend.adopt(grant.segment, grant.nbytes, grant.uid) \
            if alive(grant.pid) else None
        if segment is not None and arbiter.keep_orphan(grant, segment, grace_s):
            kept.append(grant)
            continue
        if segment is not None:
            backend.destroy(segment)  # no room for it on this daemon's devices
        freed += 1
    if journal is not None:
        journal.start(kept)
    stale = backend.remove_stale()
    backend.maintain()  # unlinks what was destroyed above
    return Recovered(len(kept), freed, stale)
