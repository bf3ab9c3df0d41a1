"""Opening a lease's handle: the tenant maps the memory itself.

Dispatches on the handle's `kind` (`posix_shm` here, `cuda_ipc` in
cuda_memory.py), so the rest of the library never branches on the daemon's
backend. Only the handle crosses the socket; the bytes are reached through
this mapping.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable
from typing import Any, Protocol

from .errors import AquaError

SHM_DIR = "/dev/shm"
_SHM_NAME = re.compile(r"aqua-[0-9a-f]{6,32}-[0-9a-f]{8,64}")


class ShmMapping:
    """A POSIX shared-memory segment mapped read-write into this process."""

    def __init__(self, name: str, nbytes: int, *, populate: bool = True) -> None:
        if not _SHM_NAME.fullmatch(name):
            raise AquaError(f"daemon sent an invalid segment name {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = mmap.MAP_SHARED
            if populate:
                # Fault every page in now, in one batch: the offload that
                # follows then runs at memcpy speed instead of page-fault speed.
                flags |= mmap.MAP_POPULATE
            self._mm: mmap.mmap | None = mmap.mmap(fd, nbytes, flags=flags,
                                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.nbytes = nbytes
        self._unpin: Callable[[], object] | None = None
        self._pin_tried = False

    def buffer(self) -> memoryview:
        if self._mm is None:
            raise AquaError("lease memory is no longer mapped")
        return memoryview(self._mm)

    def tensor(self, dtype: Any, shape: tuple[int, ...] | None):
        import numpy as np  # noqa: PLC0415 - only where tensors are touched
        import torch  # noqa: PLC0415

        if self._mm is None:
            raise AquaError("lease memory is no longer mapped")
        shape, size = tensor_shape(self.nbytes, dtype, shape)
        # Through numpy on purpose: np.frombuffer holds a buffer export on the
        # mmap, so it cannot be unmapped under a live tensor (torch.frombuffer
        # holds none, and a closed lease would leave tensors dangling).
        flat = torch.from_numpy(np.frombuffer(self._mm, dtype=np.uint8, count=size))
        return flat.view(dtype).view(shape)

    def pin(self) -> bool:
        """Page-lock the mapping for GPU copies (once); False where no CUDA can."""
        if self._mm is None:
            raise AquaError("lease memory is no longer mapped")
        if not self._pin_tried:
            self._pin_tried = True  # a refusal is not retried on every copy
            import numpy as np  # noqa: PLC0415

            from .cuda_memory import host_register  # noqa: PLC0415

            address = np.frombuffer(self._mm, dtype=np.uint8).ctypes.data
            # Whole pages: the mapping covers them, and that is what gets locked.
            size = -(-self.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
            self._unpin = host_register(address, size)
        return self._unpin is not None

    def close(self) -> bool:
        """Unmap. Always True: once the daemon unlinks the segment, pages that
        tensors still alias are private to this process, so it may release."""
        if self._mm is None:
            return True
        if self._unpin is not None:
            # Before munmap: the driver must not keep pages of a dead range.
            try:
                self._unpin()
            except Exception:  # noqa: BLE001 - unpinned is merely slower
                pass
            self._unpin = None
        try:
            self._mm.close()
        except BufferError:
            # Tensors still alias the pages; the mapping lives until they are
            # collected. The segment is already unlinked by the daemon, so
            # nobody else can ever see these bytes.
            pass
        self._mm = None
        return True

    def on_closed(self, callback: Callable[[], object]) -> None:
        callback()


def tensor_shape(nbytes: int, dtype: Any,
                 shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], int]:
    """(shape, bytes it takes) of a `dtype` tensor over an `nbytes` lease;
    without a shape, as many items as fit."""
    import torch  # noqa: PLC0415

    itemsize = torch.empty((), dtype=dtype).element_size()
    if shape is None:
        count = nbytes // itemsize
        shape = (count,)
    else:
        shape = tuple(int(s) for s in shape)
        count = 1
        for s in shape:
            count *= s
    if count * itemsize > nbytes:
        raise ValueError(f"a {dtype} tensor of shape {shape} needs {count * itemsize} "
                         f"bytes; the lease has {nbytes}")
    return shape, count * itemsize


class Mapping(Protocol):
    """What open_handle returns, whatever the handle's kind."""

    nbytes: int

    def tensor(self, dtype: Any, shape: tuple[int, ...] | None) -> Any: ...
    def buffer(self) -> memoryview: ...
    def pin(self) -> bool: ...
    def close(self) -> bool: ...
    def on_closed(self, callback: Callable[[], object]) -> None: ...


def open_handle(handle: dict[str, Any], *, populate: bool = True) -> Mapping:
    kind = handle.get("kind")
    if kind == "posix_shm":
        return ShmMapping(str(handle.get("name")), int(handle.get("nbytes", 0)),
                          populate=populate)
    if kind == "cuda_ipc":
        from .cuda_memory import IpcMapping  # noqa: PLC0415 - cupy only where needed

        return IpcMapping(handle)
    raise AquaError(f"this client cannot open {kind!r} handles; upgrade aqua")
