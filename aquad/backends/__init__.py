"""Memory backends behind one interface (see base.py)."""

from __future__ import annotations

import importlib.util
import logging

from aqua_protocol.paths import segment_prefix

from .base import Backend, BackendError
from .discovery import GpuPolicy, nvml_gpu_count
from .host import HostBackend

log = logging.getLogger("aquad")


def cuda_unavailable() -> str | None:
    """None when the cuda backend can run here, else why not. Cheap checks
    first: NVML answers fast without a driver, cupy takes a while to import."""
    count, why = nvml_gpu_count()
    if not count:
        return why
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install 'aqua[cuda]')"
    try:
        import cupy  # noqa: PLC0415

        usable = cupy.cuda.is_available()
    except Exception as exc:  # noqa: BLE001 - a broken cupy install, say
        return f"cupy cannot start ({type(exc).__name__}: {exc})"
    if not usable:
        return "NVML sees GPUs but CUDA cannot use them (driver or CUDA_VISIBLE_DEVICES)"
    return None


def make_backend(kind: str, *, socket_path: str, host_devices: tuple[int, int],
                 gpu: GpuPolicy | None = None, shm_dir: str = "/dev/shm") -> Backend:
    """`auto`: cuda where cupy, CUDA and NVML all find GPUs, else host."""
    prefix = segment_prefix(socket_path)
    if kind in ("auto", "cuda"):
        why = cuda_unavailable()
        if why is None:
            import cupy  # noqa: PLC0415 - imported already by cuda_unavailable()

            from .cuda import CudaBackend  # noqa: PLC0415 - imports nothing heavy itself

            return CudaBackend.discover(gpu or GpuPolicy(), prefix=prefix,
                                        runtime=cupy.cuda.runtime)
        if kind == "cuda":
            raise BackendError(f"--backend cuda cannot start: {why}; "
                               f"use --backend host (or auto) on a machine without GPUs")
        log.info("no GPU backend (%s): using the host backend", why)
    count, capacity = host_devices
    return HostBackend(count, capacity, prefix=prefix, shm_dir=shm_dir)

