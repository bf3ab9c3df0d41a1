"""Where the daemon's socket lives, and the rules both sides trust it by.

Order: an explicit path, then $AQUA_SOCKET, then the default, which is
/run/aqua/aquad.sock for root and $XDG_RUNTIME_DIR/aqua/aquad.sock (or
/tmp/aqua-<uid>/aquad.sock without XDG_RUNTIME_DIR) for anyone else.

Whatever the path, aquad binds and tenants connect only where
`directory_problem` finds nothing wrong: a path nobody else can change.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Collection

ENV_SOCKET = "AQUA_SOCKET"
ROOT_SOCKET = "/run/aqua/aquad.sock"


def default_socket() -> str:
    if os.geteuid() == 0:
        return ROOT_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "aqua", "aquad.sock")
    return f"/tmp/aqua-{os.geteuid()}/aquad.sock"


def resolve_socket(path: str | None = None) -> str:
    return os.path.abspath(path or os.environ.get(ENV_SOCKET) or default_socket())


def endpoint(path: str) -> str:
    return f"ipc://{path}"


def segment_prefix(socket_path: str) -> str:
    """The name prefix of a daemon's shared-memory segments: aquad names its
    segments with it (a restarted daemon finds its own leftovers, two daemons
    never collide) and tenants map no segment without it."""
    digest = hashlib.sha256(os.path.abspath(socket_path).encode()).hexdigest()[:10]
    return f"aqua-{digest}-"


def directory_problem(directory: str, trusted: Collection[int], *,
                      holds_socket: bool = True) -> str | None:
    """Why someone outside `trusted` (uids) could change what `directory`
    holds, or None. It and every directory above it must be real directories
    (no symlinks) owned by a trusted uid and writable by their owner only,
    except that a sticky directory (like /tmp) may sit above the socket's own:
    there nobody renames or removes what is not theirs. `holds_socket=False`
    lets `directory` itself be sticky (aquad checks a parent before mkdir).
    FileNotFoundError if a part of it does not exist."""
    path = os.path.abspath(directory)
    strict = holds_socket
    while True:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            return f"{path} is a symlink (name the socket by its real path)"
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        if st.st_uid not in trusted:
            return f"{path} is owned by uid {st.st_uid} (mode {mode:04o})"
        if mode & 0o022 and (strict or not mode & stat.S_ISVTX):
            return (f"{path} is writable by group or others (mode {mode:04o}, "
                    f"owner uid {st.st_uid})")
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path, strict = parent, False
