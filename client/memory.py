"""Opening a lease's handle: the tenant maps the memory itself.

Dispatches on the handle's `kind` (`posix_shm` here, `cuda_ipc` in
cuda_memory.py), so the rest of the library never branches on the daemon's
backend. Only the handle crosses the socket; the bytes are reached through
this mapping.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import stat
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .errors import AquaError, UntrustedDaemon

SHM_DIR = "/dev/shm"
_SEGMENT_SUFFIX = re.compile(r"[0-9a-f]{8,64}")  # after the daemon's prefix

# Page work on a mapping is done by madvise through ctypes, which drops the
# GIL for the call: MAP_POPULATE and munmap() of a populated mapping run
# inside the mmap module with the GIL held, and stopped every other thread
# (the heartbeat's included) for 0.6 s per GiB mapped and 0.1 s per GiB
# unmapped. Values from <linux/mman.h>; Python 3.11's mmap lacks the first.
MADV_REMOVE = 9  # free the pages of a shared mapping (a hole punched in the file)
MADV_POPULATE_WRITE = 23  # fault pages in writable, as a write would (Linux 5.14+)
# Each call holds the process's mmap lock, which any thread that maps memory
# (an allocator growing) waits for: chunks keep that wait to a few ms.
PAGE_CHUNK = 16 * 2**20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def madvise_chunked(address: int, nbytes: int, advice: int) -> bool:
    """madvise(advice) over [address, address + nbytes), PAGE_CHUNK at a
    time, the GIL released; False if the kernel refuses the advice."""
    for offset in range(0, nbytes, PAGE_CHUNK):
        if _libc.madvise(address + offset, min(PAGE_CHUNK, nbytes - offset), advice):
            return False
    return True


_trusted_dirs: set[str] = set()  # segment directories that passed _check_directory


def _check_directory(directory: str) -> None:
    """Refuse a segment directory that anyone outside the trusted uids could
    write or rename (they could plant a file there, or swap the directory);
    /dev/shm passes (root's, sticky). Once passed, it stays trusted: only
    its trusted owner could change that."""
    if directory in _trusted_dirs:
        return
    from aqua_protocol.paths import directory_problem  # noqa: PLC0415

    from .client import trusted_uids  # noqa: PLC0415 - client.py imports this module

    if not os.path.isabs(directory) or os.path.normpath(directory) != directory:
        raise UntrustedDaemon(f"daemon sent segment directory {directory!r}, not a plain "
                              f"absolute path")
    try:
        problem = directory_problem(directory, trusted_uids(), holds_socket=False)
    except (FileNotFoundError, PermissionError) as exc:
        problem = f"cannot inspect it ({exc.strerror})"
    if problem:
        raise UntrustedDaemon(f"refusing segments in {directory}: {problem}")
    _trusted_dirs.add(directory)


def _open_segment(name: str, nbytes: int, prefix: str, directory: str = SHM_DIR) -> int:
    """A read-write descriptor of the segment `name` in `directory`, once it
    is what aquad makes for this user: named with the daemon's prefix
    (aqua_protocol.paths), a regular file linked once, owned by this uid with
    mode 0600, holding at least `nbytes`, in a directory only trusted uids
    control. Anything else is refused: no aquad hands it out."""
    if not (name.startswith(prefix) and _SEGMENT_SUFFIX.fullmatch(name[len(prefix):])):
        raise UntrustedDaemon(f"daemon sent {name!r}, not a segment of this daemon "
                              f"(named {prefix}<hex>)")
    _check_directory(directory)
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedDaemon(f"refusing {path}: it is a symlink, and a lease's segment "
                                  f"never is") from None
        raise
    problem = _segment_problem(os.fstat(fd), nbytes)
    if problem:
        os.close(fd)
        raise UntrustedDaemon(f"refusing {path}: {problem}")
    return fd


def _segment_problem(st: os.stat_result, nbytes: int) -> str | None:
    mode, uid = stat.S_IMODE(st.st_mode), os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_nlink != 1:
        # aquad's files have one name; a second one means some other file
        # (maybe one of this user's own) was linked in under it.
        return f"it has {st.st_nlink} links; a lease's segment has one"
    if st.st_uid != uid or mode != 0o600:
        return (f"it is owned by uid {st.st_uid} with mode {mode:04o}; a lease's segment is "
                f"owned by you (uid {uid}) with mode 0600")
    if st.st_size < nbytes:
        return f"it holds {st.st_size} bytes, fewer than the lease's {nbytes}"
    return None


class LocalMapping:
    """A lease's bytes in this process's own memory: where a lease goes when
    aquad reclaims its memory and has no room elsewhere (kind `local`). Its
    views go through a numpy array of the whole memory (`_array`), as
    ShmMapping's do."""

    def __init__(self, nbytes: int) -> None:
        import numpy as np  # noqa: PLC0415

        self.nbytes = nbytes
        self._memory = np.empty(nbytes, dtype=np.uint8)

    def _array(self):
        return self._memory

    def buffer(self) -> memoryview:
        # Through the array: slices of the memoryview keep it alive.
        return memoryview(self._array())

    def tensor(self, dtype: Any, shape: tuple[int, ...] | None):
        import torch  # noqa: PLC0415 - only where tensors are touched

        if dtype is torch.uint8 and shape is None:
            return torch.from_numpy(self._array())  # every copy's case: no reshaping
        shape, size = tensor_shape(self.nbytes, dtype, shape)
        return torch.from_numpy(self._array()[:size]).view(dtype).view(shape)

    def pin(self) -> bool:
        return False

    def close(self) -> bool:
        return True  # numpy frees it with the last view

    def on_closed(self, callback: Callable[[], object]) -> None:
        callback()


class ShmMapping(LocalMapping):
    """A POSIX shared-memory segment mapped read-write into this process.

    Every view of the memory (tensor(), buffer()) goes through a numpy array
    of the whole mapping, tracked weakly: while one is alive something may
    read the bytes, and when none is, close() may free the pages first."""

    def __init__(self, name: str, nbytes: int, *, prefix: str, populate: bool = True,
                 directory: str = SHM_DIR) -> None:
        import numpy as np  # noqa: PLC0415

        fd = _open_segment(name, nbytes, prefix, directory)
        try:
            self._mm: mmap.mmap | None = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED,
                                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.name = name
        self.nbytes = nbytes
        self._address = np.frombuffer(self._mm, dtype=np.uint8).ctypes.data
        self._views = 0  # numpy arrays over the mapping still alive
        self._unpin: Callable[[], object] | None = None
        self._pin_tried = False
        if populate:
            # Fault every page in now, in batches, with the GIL released: the
            # copy that follows then runs at memcpy speed, where faulting page
            # by page during the copy is 4x slower. An old kernel refuses the
            # advice; the copy then faults the pages in itself.
            madvise_chunked(self._address, nbytes, MADV_POPULATE_WRITE)

    def _array(self):
        """A numpy array over the whole mapping, counted as a live view.
        Through numpy on purpose: np.frombuffer holds a buffer export on the
        mmap, so it cannot be unmapped under a live tensor (torch.frombuffer
        holds none, and a closed lease would leave tensors dangling)."""
        import numpy as np  # noqa: PLC0415

        if self._mm is None:
            raise AquaError("lease memory is no longer mapped")
        array = np.frombuffer(self._mm, dtype=np.uint8)
        self._views += 1
        weakref.finalize(array, self._view_gone)
        return array

    def _view_gone(self) -> None:
        self._views -= 1

    @property
    def aliased(self) -> bool:
        """Some array, tensor or buffer over the mapping is still alive."""
        return self._views > 0

    def pin(self) -> bool:
        """Page-lock the mapping for GPU copies (once); False where no CUDA can."""
        if self._mm is None:
            raise AquaError("lease memory is no longer mapped")
        if not self._pin_tried:
            self._pin_tried = True  # a refusal is not retried on every copy
            from .cuda_memory import host_register  # noqa: PLC0415

            # Whole pages: the mapping covers them, and that is what gets locked.
            size = -(-self.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
            self._unpin = host_register(self._address, size)
        return self._unpin is not None

    def close(self) -> bool:
        """Unmap. Always True: once the daemon unlinks the segment, pages that
        tensors still alias are private to this process, so it may release."""
        if self._mm is None:
            return True
        if self._unpin is not None:
            # Before munmap: the driver must not keep pages of a dead range.
            with contextlib.suppress(Exception):  # unpinned is merely slower
                self._unpin()
            self._unpin = None
        if not self._views:
            # Nothing can read the bytes any more: free the pages here, in
            # chunks with the GIL released, so that munmap() (GIL held) has no
            # pages left to drop and the daemon's unlink none to free.
            madvise_chunked(self._address, self.nbytes, MADV_REMOVE)
        # Refused while tensors still alias the pages: the mapping lives until
        # they are collected. The segment is already unlinked by the daemon,
        # so nobody else can ever see these bytes.
        with contextlib.suppress(BufferError):
            self._mm.close()
        self._mm = None
        return True


def copy_between(dst: Mapping, src: Mapping, nbytes: int) -> None:
    """Copy the first `nbytes` of one mapping into another (a lease moving).
    Host memory on both sides: a plain memcpy, no torch. GPU memory on
    either: torch copies it (peer-to-peer or over PCIe) and waits."""
    if not nbytes:
        return
    if isinstance(dst, LocalMapping) and isinstance(src, LocalMapping):  # ShmMapping too
        to, of = dst.buffer(), src.buffer()
        try:
            to[:nbytes] = of[:nbytes]
        finally:
            to.release()
            of.release()
        return
    import torch  # noqa: PLC0415

    from .tensors import Copies  # noqa: PLC0415

    with Copies() as copy:
        copy(dst.tensor(torch.uint8, (nbytes,)), src.tensor(torch.uint8, (nbytes,)))


def tensor_shape(nbytes: int, dtype: Any,
                 shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], int]:
    """(shape, bytes it takes) of a `dtype` tensor over an `nbytes` lease;
    without a shape, as many items as fit."""
    itemsize = dtype.itemsize
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


def open_handle(handle: dict[str, Any], *, prefix: str, populate: bool = True) -> Mapping:
    """Map the memory behind `handle`, from the daemon whose segments are
    named with `prefix` (aqua_protocol.paths.segment_prefix of its socket)."""
    kind = handle.get("kind")
    if kind == "posix_shm":
        return ShmMapping(str(handle.get("name")), int(handle.get("nbytes", 0)),
                          prefix=prefix, populate=populate,
                          directory=str(handle.get("dir", SHM_DIR)))
    if kind == "cuda_ipc":
        from .cuda_memory import IpcMapping  # noqa: PLC0415 - cupy only where needed

        return IpcMapping(handle)
    raise AquaError(f"this client cannot open {kind!r} handles; upgrade aqua")
