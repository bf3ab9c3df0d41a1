"""Opening a lease's handle: the tenant maps the memory itself.

Dispatches on the handle's `kind`, so the rest of the library never branches
on the daemon's backend. Only the handle crosses the socket; the bytes are
reached through this mapping.
"""

from __future__ import annotations

import mmap
import os
import re
from typing import Any

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

    def buffer(self) -> memoryview:
        if self._mm is None:
            raise AquaError("lease memory is no longer mapped")
        return memoryview(self._mm)

    def tensor(self, dtype: Any, shape: tuple[int, ...] | None):
        import numpy as np  # noqa: PLC0415 - only where tensors are touched
        import torch  # noqa: PLC0415

        if self._mm is None:
            raise AquaError("lease memory is no longer mapped")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if shape is None:
            count = self.nbytes // itemsize
            shape = (count,)
        else:
            shape = tuple(int(s) for s in shape)
            count = 1
            for s in shape:
                count *= s
        if count * itemsize > self.nbytes:
            raise ValueError(f"a {dtype} tensor of shape {shape} needs {count * itemsize} "
                             f"bytes; the lease has {self.nbytes}")
        # Through numpy on purpose: np.frombuffer holds a buffer export on the
        # mmap, so it cannot be unmapped under a live tensor (torch.frombuffer
        # holds none, and a closed lease would leave tensors dangling).
        flat = torch.from_numpy(np.frombuffer(self._mm, dtype=np.uint8,
                                              count=count * itemsize))
        return flat.view(dtype).view(shape)

    def close(self) -> None:
        if self._mm is None:
            return
        try:
            self._mm.close()
        except BufferError:
            # Tensors still alias the pages; the mapping lives until they are
            # collected. The segment is already unlinked by the daemon, so
            # nobody else can ever see these bytes.
            pass
        self._mm = None


def open_handle(handle: dict[str, Any], *, populate: bool = True) -> ShmMapping:
    kind = handle.get("kind")
    if kind == "posix_shm":
        return ShmMapping(str(handle.get("name")), int(handle.get("nbytes", 0)),
                          populate=populate)
    raise AquaError(f"this client cannot open {kind!r} handles; upgrade aqua")
