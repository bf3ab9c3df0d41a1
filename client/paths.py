"""Where the daemon's socket lives: one rule for aquad, aquactl and tenants.

Order: an explicit path, then $AQUA_SOCKET, then the default, which is
/run/aqua/aquad.sock for root and $XDG_RUNTIME_DIR/aqua/aquad.sock (or
/tmp/aqua-<uid>/aquad.sock without XDG_RUNTIME_DIR) for anyone else.
"""

from __future__ import annotations

import hashlib
import os

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
