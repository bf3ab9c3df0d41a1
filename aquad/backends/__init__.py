"""Memory backends behind one interface (see base.py)."""

from __future__ import annotations

from .base import Backend, BackendError
from .host import HostBackend, segment_prefix


def make_backend(kind: str, *, socket_path: str, host_devices: tuple[int, int]) -> Backend:
    # `auto` means host until the cuda backend exists; then it will mean cuda
    # wherever GPUs are present.
    if kind == "cuda":
        raise BackendError("the cuda backend is not part of this build yet; "
                           "use --backend host")
    count, capacity = host_devices
    return HostBackend(count, capacity, prefix=segment_prefix(socket_path))


__all__ = ["Backend", "BackendError", "HostBackend", "make_backend"]
