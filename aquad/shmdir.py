"""Where the host backend keeps its lease segments, and with what pages.

By default /dev/shm. On most hosts that tmpfs is mounted without `huge=`,
so every 4 KiB page of a lease is allocated, zeroed and freed one at a time:
populating 2 GiB costs about 1.2 s and freeing it 0.25 s on the reference VM.
A tmpfs of aquad's own mounted `huge=within_size` hands out 2 MiB pages
instead, and the same population takes about 0.1 s, the freeing 4 ms.

`--shm-dir DIR` names such a directory; the systemd unit mounts one before
aquad starts (ExecStartPre, outside aquad's private mount namespace: a mount
made inside it would be invisible to tenants). `--shm-mount` lets a root
aquad that shares the host's mount namespace mount it itself. Whatever goes
wrong (no such directory, a mount refused, a directory others could change)
aquad falls back to /dev/shm, says so in a log line, and serves as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass

from aqua_protocol.paths import directory_problem

from . import logs

log = logging.getLogger("aquad")

DEFAULT = "/dev/shm"
# Given to the tmpfs aquad mounts: 2 MiB pages for any file of 2 MiB or more
# (`always` would also round small files up to a whole huge page).
HUGE_OPTION = "huge=within_size"
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8  # <sys/mount.h>


@dataclass(frozen=True)
class SegmentDir:
    path: str
    huge: str  # the tmpfs's huge= setting ("never" when absent); "" if not a tmpfs
    wanted: str = ""  # the directory asked for, where it could not be used
    why: str = ""  # ... and why not

    @property
    def huge_pages(self) -> bool:
        return self.huge in ("within_size", "always")


def _mount_of(path: str) -> tuple[str, str, dict]:
    """(mount point, fs type, super options) of the mount holding `path`."""
    real = os.path.realpath(path)
    best = ("", "", {})
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # id parent major:minor root mount-point options [optional...] - type source super
            point = fields[4].replace("\\040", " ")
            sep = fields.index("-")
            fstype, super_opts = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):  # later, longer mounts shadow
                opts = dict(o.partition("=")[::2] for o in super_opts.split(","))
                best = (point, fstype, opts)
    return best


def huge_setting(path: str) -> tuple[bool, str]:
    """(is `path` a mount point of its own, the tmpfs huge= setting of its
    mount: never/always/within_size/advise, or "" if it is no tmpfs)."""
    point, fstype, opts = _mount_of(path)
    own = point == os.path.realpath(path)
    if fstype != "tmpfs":
        return own, ""
    return own, opts.get("huge", "never")


def _same_namespace_as_parent() -> bool:
    """A mount aquad makes is seen by tenants only if aquad shares the mount
    namespace of whoever started it (systemd's PrivateMounts= gives a service
    one of its own, apart from systemd's)."""
    try:
        return os.readlink("/proc/self/ns/mnt") == os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError:
        return False  # cannot tell (no /proc): assume not


def mount_huge_tmpfs(path: str, size: int) -> None:
    """Mount a tmpfs with 2 MiB pages of `size` bytes at `path` (made 0755
    if missing); OSError if the kernel refuses."""
    if not _same_namespace_as_parent():
        raise OSError(errno.EXDEV, "aquad runs in a mount namespace of its own (systemd's "
                                   "PrivateMounts=), where tenants would not see the mount; "
                                   "mount it before aquad starts (see systemd/aquad.service)")
    if not os.path.isdir(path):
        os.mkdir(path, 0o700)  # the mount's root gets its own mode, below
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    data = f"{HUGE_OPTION},size={size},mode=0755".encode()
    if libc.mount(b"aqua-shm", os.fsencode(path), b"tmpfs",
                  _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, data):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _usable(path: str) -> str | None:
    """Why aquad must not keep segments in `path`, or None."""
    if not os.path.isabs(path):
        return f"{path} is not an absolute path"
    try:
        # Tenants check the same (aqua.memory): a directory that someone else
        # could write or rename would let them plant or swap segments.
        problem = directory_problem(path, {0, os.geteuid()}, holds_socket=False)
    except FileNotFoundError:
        return f"{path} does not exist"
    except PermissionError:
        return f"no permission to reach {path}"
    if problem:
        return problem
    own, huge = huge_setting(path)
    if not huge:
        # Segments on a disk would be written back to it: shared memory only.
        return f"{path} is not on a tmpfs"
    if not own and path != DEFAULT:
        # A directory on some other tmpfs (/run, where a mount was meant to
        # be but failed) has that one's size and pages: not what was asked.
        return f"{path} is not a mount point of its own (mount a tmpfs there, or --shm-mount)"
    return None


def choose(path: str, *, mount: bool, size: int) -> SegmentDir:
    """The directory to use for segments: `path` if it is usable (mounted
    first with `mount`, unless already a tmpfs mount point), else /dev/shm.
    Logs nothing: report() says what came of it once the daemon can start."""
    path = os.path.abspath(path)
    why = None
    if path != DEFAULT and mount:
        try:
            own, huge = huge_setting(path) if os.path.isdir(path) else (False, "")
            if not (own and huge):
                mount_huge_tmpfs(path, size)
        except OSError as exc:
            why = f"cannot mount a tmpfs at {path}: {exc.strerror or exc}"
    why = why or _usable(path)
    wanted = ""
    if why and path != DEFAULT:
        wanted, path = path, DEFAULT
    return SegmentDir(path, huge_setting(path)[1], wanted, why or "")


def report(chosen: SegmentDir) -> dict[str, str]:
    """Warn about a directory that could not be used; return what the
    `started` line says of the one in use (one line per start: nothing
    else at INFO, see test_watchdog)."""
    if chosen.wanted:
        logs.event(log, logging.WARNING, "shm_dir_fallback", wanted=chosen.wanted,
                   using=chosen.path, why=chosen.why)
    elif chosen.why:
        # /dev/shm itself is unusable: the capacity check says so at startup.
        log.warning("lease segments in %s: %s", chosen.path, chosen.why)
    fields = {"segments": chosen.path, "huge": chosen.huge or "not a tmpfs"}
    if chosen.huge and not chosen.huge_pages:
        fields["hint"] = (f"4 KiB pages; a tmpfs mounted {HUGE_OPTION} (--shm-dir, "
                          "--shm-mount) populates and frees leases 10-60x faster")
    return fields
