"""GPU memory seen from the tenant: cuda_ipc leases and page-locked host leases.

A `cuda_ipc` handle is a legacy CUDA IPC handle (cudaIpcGetMemHandle) for
memory aquad allocated on one GPU. The tenant opens it with
cudaIpcOpenMemHandle on that GPU and wraps it, without a copy, as a torch
tensor on that device (cupy UnownedMemory -> ndarray -> DLPack).

Unmapping comes before `release`: freeing memory a process still maps is
undefined in CUDA, so aquad frees a lease only when told, and the client tells
it only after cudaIpcCloseMemHandle. Tensors aliasing the lease keep the
mapping open (they hold its owner object); the mapping closes, and the
release goes out, when the last of them is gone.

cupy is imported only when a GPU lease is opened: tenants of the host
backend never need it.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .errors import AquaError

log = logging.getLogger("aqua")

IPC_HANDLE_BYTES = 64
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every context


def _cupy() -> Any:
    try:
        import cupy  # noqa: PLC0415 - optional, and slow to import
    except ImportError:
        raise AquaError("this lease is GPU memory (a cuda_ipc handle from aquad's cuda "
                        "backend); opening it needs cupy: pip install 'aqua[cuda]'") from None
    if not cupy.cuda.is_available():
        raise AquaError("this lease is GPU memory, but CUDA has no usable GPU in this "
                        "process (driver, or CUDA_VISIBLE_DEVICES)")
    return cupy


class _Owner:
    """What every tensor over the mapping keeps alive; its death unmaps."""


# GPU leases this process failed to unmap. Their memory must never be freed
# while the process lives, so the client does not release them, and does not
# say bye (which frees everything): aquad's liveness checks free it after exit.
_unmap_failures = 0


def unmap_failed() -> bool:
    return _unmap_failures > 0


class _State:
    """Shared by a mapping and its finalizer (which must not hold the mapping)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.callbacks: list[Callable[[], object]] = []
        self.done = False  # the finalizer ran
        self.unmapped = False  # ... and cudaIpcCloseMemHandle succeeded


def _unmap(cupy: Any, ptr: int, device: int, state: _State) -> None:
    global _unmap_failures
    rt = cupy.cuda.runtime
    try:
        with cupy.cuda.Device(device):
            # This process's copies into or out of the lease must be done
            # before the mapping goes. Once per lease, not per copy.
            rt.deviceSynchronize()
            rt.ipcCloseMemHandle(ptr)
        unmapped = True
    except Exception as exc:  # noqa: BLE001 - runs from a finalizer
        unmapped = False
        _unmap_failures += 1
        log.error("cannot unmap a GPU lease on device %d (%s): it stays leased until this "
                  "process exits", device, exc)
    with state.lock:
        state.done, state.unmapped = True, unmapped
        callbacks, state.callbacks = state.callbacks, []
    if not unmapped:
        return  # releasing would let aquad free memory this process maps
    for callback in callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001
            log.exception("after unmapping a GPU lease")


def _local_device(rt: Any, handle: dict[str, Any]) -> int:
    """This process's CUDA ordinal for the lease's GPU, found by PCI bus id
    (aqua device ids are nvidia-smi indices, not this process's ordinals).
    A GPU this process cannot see (CUDA_VISIBLE_DEVICES) is opened through
    the current device, over peer access."""
    bus = handle.get("pci_bus_id")
    if isinstance(bus, str) and bus:
        try:
            return rt.deviceGetByPCIBusId(bus)
        except Exception:  # noqa: BLE001 - CUDARuntimeError: not visible here
            return rt.getDevice()
    return int(handle.get("device", 0))


class IpcMapping:
    """A cuda_ipc lease mapped into this process."""

    def __init__(self, handle: dict[str, Any]) -> None:
        raw = handle.get("handle")
        nbytes = handle.get("nbytes")
        if not isinstance(raw, bytes) or len(raw) != IPC_HANDLE_BYTES \
                or not isinstance(nbytes, int) or nbytes <= 0:
            raise AquaError("daemon sent an invalid cuda_ipc handle")
        cupy = _cupy()
        rt = cupy.cuda.runtime
        self.nbytes = nbytes
        self.device = _local_device(rt, handle)
        try:
            with cupy.cuda.Device(self.device):
                # Lazy peer access: needed only when the GPU is not visible
                # here and the mapping goes through the current device.
                self._ptr = rt.ipcOpenMemHandle(raw, rt.cudaIpcMemLazyEnablePeerAccess)
        except Exception as exc:  # noqa: BLE001 - CUDARuntimeError
            raise AquaError(f"cannot map GPU lease (aqua device {handle.get('device')}, "
                            f"CUDA device {self.device} here): {exc}") from None
        self._cupy = cupy
        self._owner: _Owner | None = _Owner()
        self._state = _State()
        self._finalizer = weakref.finalize(self._owner, _unmap, cupy, self._ptr, self.device,
                                           self._state)

    def array(self, nbytes: int | None = None) -> Any:
        """The first `nbytes` (default: all) as a cupy uint8 array on the
        lease's device; it keeps the mapping alive."""
        if self._owner is None:
            raise AquaError("lease memory is no longer mapped")
        size = self.nbytes if nbytes is None else nbytes
        if not 0 <= size <= self.nbytes:
            raise ValueError(f"the lease has {self.nbytes} bytes, not {size}")
        cp = self._cupy
        mem = cp.cuda.UnownedMemory(self._ptr, self.nbytes, self._owner, self.device)
        return cp.ndarray((size,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))

    def tensor(self, dtype: Any, shape: tuple[int, ...] | None):
        import torch  # noqa: PLC0415

        from .memory import tensor_shape  # noqa: PLC0415

        shape, size = tensor_shape(self.nbytes, dtype, shape)
        # The DLPack capsule keeps the cupy array, hence the owner, alive as
        # long as any view of this tensor lives.
        return torch.from_dlpack(self.array(size)).view(dtype).view(shape)

    def buffer(self) -> memoryview:
        raise AquaError("a GPU lease has no host buffer; use lease.tensor()")

    def pin(self) -> bool:
        return False  # device memory: nothing to page-lock

    def close(self) -> bool:
        """Drop this mapping's own reference. True if it is unmapped now; False
        if tensors still alias it (it unmaps when the last one goes) or if
        unmapping failed (then it must never be released)."""
        self._owner = None
        with self._state.lock:
            return self._state.unmapped

    def on_closed(self, callback: Callable[[], object]) -> None:
        """Run `callback` once the memory is unmapped (at once if it is);
        never, if unmapping fails."""
        with self._state.lock:
            if not self._state.done:
                self._state.callbacks.append(callback)
                return
            unmapped = self._state.unmapped
        if unmapped:
            callback()


def host_register(address: int, nbytes: int) -> Callable[[], None] | None:
    """Page-lock host memory so GPU copies run at PCIe speed and asynchronously.
    Returns the matching unregister, or None where no CUDA runtime can (the
    copies still work, through the driver's staging buffers).

    cupy first: its runtime calls clear CUDA's sticky "last error" when they
    fail. A failed cudaHostRegister through torch's runtime would leave that
    error for torch's next kernel-launch check to raise, so torch's is used
    only where it can also clear the error afterwards."""
    try:
        cupy = _cupy()
    except AquaError:
        cupy = None
    if cupy is not None:
        try:
            cupy.cuda.runtime.hostRegister(address, nbytes, HOST_REGISTER_PORTABLE)
        except Exception as exc:  # noqa: BLE001 - refused: copies go unpinned
            log.debug("cannot page-lock %d bytes: %s", nbytes, exc)
            return None
        return lambda: cupy.cuda.runtime.hostUnregister(address)
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    cudart = torch.cuda.cudart()
    if not hasattr(cudart, "cudaGetLastError"):
        return None
    err = cudart.cudaHostRegister(address, nbytes, HOST_REGISTER_PORTABLE)
    if err != cudart.cudaError.success:
        cudart.cudaGetLastError()  # clear it, or torch's next launch check raises it
        log.debug("cudaHostRegister of %d bytes failed (%s)", nbytes, err)
        return None
    return lambda: cudart.cudaHostUnregister(address)
