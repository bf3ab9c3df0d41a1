"""Memory backends behind one interface (see base.py)."""

from __future__ import annotations

import logging

from .base import Backend, BackendError
from .host import HostBackend, segment_prefix

log = logging.getLogger("aquad")


def gpus_present() -> bool:
    """True when CUDA devices are usable. cupy is optional: no cupy, no GPUs."""
    try:
        import cupy  # noqa: PLC0415 - optional, and heavy: only when asked
    except ImportError:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def make_backend(kind: str, *, socket_path: str, host_devices: tuple[int, int]) -> Backend:
    if kind == "auto":
        kind = "cuda" if gpus_present() else "host"
        if kind == "cuda":
            log.warning("GPUs found but this build has no cuda backend yet; using host")
            kind = "host"
    if kind == "cuda":
        raise BackendError("the cuda backend is not part of this build yet; "
                           "use --backend host")
    count, capacity = host_devices
    return HostBackend(count, capacity, prefix=segment_prefix(socket_path))


__all__ = ["Backend", "BackendError", "HostBackend", "make_backend", "gpus_present"]
