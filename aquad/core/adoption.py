"""Leases that outlive a daemon: what a restarted aquad keeps for their owners.

A host lease is a file in /dev/shm, so it survives the daemon that granted
it. The journal (aquad/journal.py) records each grant with a capability, a
random secret that only the owner got (in the lease reply); a restarted
daemon keeps the leases of owners still alive as orphans for a grace
period, and the owner, reconnected, reclaims each with `adopt`, proving it
with the capability. Orphans nobody reclaims in time are freed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JournaledLease:
    """A live lease as the journal records it."""

    lease: str
    segment: str  # the backend's name for its memory (a /dev/shm file)
    nbytes: int
    device: int
    uid: int
    gid: int
    pid: int
    capability: str
    tenant: str  # its owner's name: one process may register several tenants


@dataclass
class Orphan:
    """A predecessor's lease awaiting its owner; its pool is charged."""

    grant: JournaledLease
    segment: Any
    charged: int
    deadline: float


class RandomTokens:
    """Random tokens, by default 128-bit hex (the capabilities). Drawn and
    encoded BATCH at a time: a getrandom call costs more than the rest of a
    grant's bookkeeping."""

    BATCH = 256
    BYTES = 16  # random bytes per token

    def __init__(self) -> None:
        self._text = ""
        self._at = 0

    def encode(self, raw: bytes) -> str:
        return raw.hex()

    def __call__(self) -> str:
        if self._at >= len(self._text):
            self._text = self.encode(os.urandom(self.BYTES * self.BATCH))
            self._at = 0
        start = self._at
        self._at += len(self._text) // self.BATCH
        return self._text[start:self._at]
