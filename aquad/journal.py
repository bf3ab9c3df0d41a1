"""The lease journal: what a restarted aquad needs to re-adopt host leases.

`<socket>.journal`, next to the socket and its lock, in the directory
rundir.py has checked. Append-only lines, one record each:

    <crc32 of the JSON, 8 hex digits> <JSON>\\n

a grant ({"g": lease id, "seg", "n", "d", "uid", "gid", "pid", "cap", "t"}) or a
free ({"f": lease id}). Records are buffered and written in maintain(), off
the request path; one write() per batch, with O_APPEND, so a daemon that is
killed leaves whole records behind, at most missing the last batch (those
leases are freed at the next start, never misattributed). No fsync: the
journal outlives aquad, not the machine (and neither do tmpfs segments). A
torn or corrupt line ends the journal: it and anything after are ignored.
At startup the journal is read, then rewritten with the leases kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib

from .core.adoption import JournaledLease
from .rundir import open_own

log = logging.getLogger("aquad")


_KEYS = {"lease": "g", "segment": "seg", "nbytes": "n", "device": "d", "uid": "uid",
         "gid": "gid", "pid": "pid", "capability": "cap", "tenant": "t"}


def _line(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _parse(line: bytes) -> dict | None:
    """A record, or None for a torn or corrupt line."""
    crc, _, body = line.partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def replay(data: bytes) -> dict[str, JournaledLease]:
    """The leases live at the end of a journal's bytes, in grant order."""
    live: dict[str, JournaledLease] = {}
    for line in data.split(b"\n")[:-1]:  # the last piece has no newline: torn or empty
        record = _parse(line)
        if record is None:
            log.warning("lease journal: ignoring a corrupt record and all after it")
            break
        try:
            if "f" in record:
                live.pop(record["f"], None)
            else:
                grant = JournaledLease(**{name: record[key] for name, key in _KEYS.items()})
                live[grant.lease] = grant
        except (KeyError, TypeError):
            log.warning("lease journal: ignoring a malformed record and all after it")
            break
    return live


class Journal:
    def __init__(self, socket_path: str) -> None:
        self.path = socket_path + ".journal"
        self._fd: int | None = None
        # Records as objects: encoded in flush(), never before a reply.
        self._pending: list[JournaledLease | str] = []

    # --- startup (the lock is held) ----------------------------------------

    def load(self) -> dict[str, JournaledLease]:
        """The predecessor's live leases (empty if it left no journal)."""
        try:
            fd = open_own(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, "rb") as f:
            return replay(f.read())

    def start(self, kept: list[JournaledLease]) -> None:
        """Compact: the journal becomes the kept leases, then is appended to.
        Written beside it and renamed over it, so a crash here leaves the old
        journal or the new one, never half of either."""
        tmp = self.path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, b"".join(_line(self._grant_record(g)) for g in kept))
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._fd = open_own(self.path, os.O_WRONLY | os.O_APPEND)

    # --- serving -------------------------------------------------------------

    def granted(self, grant: JournaledLease) -> None:
        self._pending.append(grant)

    def freed(self, lease_id: str) -> None:
        self._pending.append(lease_id)

    def flush(self) -> None:
        """Write what is buffered: one write, off the request path."""
        if not self._pending or self._fd is None:
            return
        pending, self._pending = self._pending, []
        data = b"".join(_line({"f": r}) if isinstance(r, str) else _line(self._grant_record(r))
                        for r in pending)
        try:
            os.write(self._fd, data)
        except OSError as exc:
            # Leases still work; a crash now would free them instead of
            # keeping them for their owners.
            log.error("cannot write the lease journal %s: %s", self.path, exc.strerror)

    def close(self) -> None:
        """Every lease was freed (shutdown): nothing to adopt next time."""
        self._pending = []
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    # --- helpers -------------------------------------------------------------

    @staticmethod
    def _grant_record(grant: JournaledLease) -> dict:
        # Not dataclasses.asdict: its deep copy cost more than the rest of a grant.
        return {key: getattr(grant, name) for name, key in _KEYS.items()}
