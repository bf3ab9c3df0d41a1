"""Tensor-level offload, in the spirit of the paper's responsive tensor.

`offload` copies a tensor's bytes into a lease (the caller may then drop its
own copy and free that memory); `restore` brings them back bit-exactly, on
the original device or another. The copy goes straight into the mapped lease:
no staging buffer, nothing through the socket.

Any mix of tensors and leases works: CPU tensors and host leases copy
inline; a CUDA tensor copies to a GPU lease device to device (over NVLink or
PCIe peer-to-peer where the GPUs have it) and to a host lease over PCIe
(the lease page-locked first). GPU copies run on a dedicated stream per
device, after the work already queued on the device's current stream, and a
batch of them (a page-out, say) ends with one event wait per stream: no
device-wide synchronisation.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

import torch

from .errors import AquaError
from .memory import madvise_chunked

if TYPE_CHECKING:
    from .client import Client, Lease

log = logging.getLogger("aqua")


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's storage bytes as a flat uint8 view (contiguous first)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def _lease_bytes(lease: Lease, nbytes: int, other: torch.Tensor) -> torch.Tensor:
    """The lease's first `nbytes` as a uint8 tensor, for a copy with `other`."""
    if other.is_cuda:
        lease.pin()  # a host lease: page-locked so the copy runs at PCIe speed
    return lease.tensor()[:nbytes]


_MADV_DONTNEED = 4  # linux/mman.h


def _discard_pages(tensor: torch.Tensor) -> int:
    """Give the whole pages inside a host tensor's bytes back to the kernel,
    keeping the address mapped (it reads zeros until written again). Returns
    the bytes given back; 0 where nothing may be (GPU or pinned memory)."""
    if tensor.device.type != "cpu" or tensor.is_pinned():
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    # Whole pages only: the allocator's bookkeeping and any neighbour sharing
    # the first or last page keep their bytes.
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    if not madvise_chunked(first, last - first, _MADV_DONTNEED):
        # The bytes are safe in the lease either way; only the memory stays in use.
        log.warning("madvise(MADV_DONTNEED) failed: %s", ctypes.get_errno())
        return 0
    return last - first


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    """The dedicated copy stream of CUDA device `index`."""
    return torch.cuda.Stream(device=index)


class Copies:
    """One batch of byte copies (equal sizes, uint8). Use as a context manager:
    on exit every copy has landed.

    torch runs a copy on the current stream of the source's device (of the
    destination's for host -> GPU), so that device's dedicated stream is made
    current for the copy, after it waits for the work queued so far. Tensors
    stay referenced until the end: the caching allocator knows nothing of the
    side stream and must not reuse their memory while a copy reads it."""

    def __init__(self) -> None:
        self._used: dict[int, torch.cuda.Stream] = {}
        self._keep: list[torch.Tensor] = []

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not (dst.is_cuda or src.is_cuda):
            dst.copy_(src)
            return
        device = src.device if src.is_cuda else dst.device
        stream = _side_stream(torch.cuda.current_device() if device.index is None
                              else device.index)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        self._used[stream.device.index] = stream
        self._keep += (dst, src)

    def wait(self) -> None:
        for stream in self._used.values():
            done = torch.cuda.Event()
            done.record(stream)
            done.synchronize()
        self._used.clear()
        self._keep.clear()

    def __enter__(self) -> Copies:
        return self

    def __exit__(self, *exc: object) -> None:
        # Also on error: nothing may still be copying when leases are released.
        self.wait()


def pack(lease: Lease, tensors: Sequence[torch.Tensor]) -> int:
    """Copy `tensors` back to back into `lease`, as one batch; returns the
    bytes written. The lease's lock is held meanwhile: none moves under a copy."""
    offset = 0
    with lease.lock, Copies() as copy:
        for t in tensors:
            src = _bytes_of(t)
            n = src.numel()
            if n:
                copy(_lease_bytes(lease, offset + n, src)[offset:], src)
            offset += n
    return offset


def unpack(lease: Lease, specs: Sequence[tuple[torch.Size, torch.dtype]],
           device: torch.device) -> list[torch.Tensor]:
    """New tensors on `device` with the bytes pack() wrote, back to back."""
    out = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    offset = 0
    with lease.lock, Copies() as copy:
        for t in out:
            n = t.numel() * t.element_size()
            if n:
                copy(t.view(-1).view(torch.uint8), _lease_bytes(lease, offset + n, t)[offset:])
            offset += n
    return out


class OffloadedTensor:
    """A tensor's bytes held in a lease, with what is needed to rebuild it."""

    def __init__(self, lease: Lease, dtype: torch.dtype, shape: torch.Size,
                 device: torch.device) -> None:
        self.lease = lease
        self.dtype = dtype
        self.shape = shape
        self.device = device
        self.nbytes = shape.numel() * dtype.itemsize

    def restore_into(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the bytes back into `out` (same dtype and shape, contiguous)."""
        if out.dtype != self.dtype or out.shape != self.shape or not out.is_contiguous():
            raise ValueError(f"restore_into needs a contiguous {self.dtype} tensor of shape "
                             f"{tuple(self.shape)}")
        if self.lease.released:
            raise AquaError("the lease holding this tensor was released")
        if self.nbytes:
            # Under the lease's lock: aquad may be moving it (a reclaim), and
            # the copy reads wherever the bytes are once that is done.
            with self.lease.lock, Copies() as copy:
                copy(out.reshape(-1).view(torch.uint8), _lease_bytes(self.lease, self.nbytes, out))
        return out

    def restore(self, device: torch.device | str | None = None, *,
                release: bool = True) -> torch.Tensor:
        """A new tensor with the original bytes; frees the lease unless told not to."""
        out = torch.empty(self.shape, dtype=self.dtype,
                          device=self.device if device is None else device)
        self.restore_into(out)
        if release:
            # Bytes first, then the round trip, which is best effort: a daemon
            # that died costs the lease, never the tensor (Client._release).
            # Kept for the next offload where the client keeps leases.
            self.lease.release(keep=True)
        return out

    def release(self) -> None:
        self.lease.release(keep=True)

    def __repr__(self) -> str:
        return (f"<aqua.OffloadedTensor {self.dtype} {tuple(self.shape)} from {self.device} "
                f"in {self.lease!r}>")


def offload(client: Client, tensor: torch.Tensor, near: int | None = None) -> OffloadedTensor:
    """Copy `tensor` into a lease of `client` (one it kept from an earlier
    restore where it keeps leases: see aqua.connect's keep_bytes); returns
    the handle to restore it."""
    src = _bytes_of(tensor)
    lease = client.lease(max(src.numel(), 1), near=near, reuse=True)
    try:
        pack(lease, [src])
    except BaseException:
        lease.release()
        raise
    return OffloadedTensor(lease, tensor.dtype, tensor.shape, tensor.device)


class TensorPager:
    """Ready-made preemption hooks: page a set of tensors out to leases.

    page_out() copies each registered tensor into its lease and drops the
    tensor's own storage (the Python object stays, empty); page_in() gives it
    fresh storage and copies the bytes back, bit-exactly. Leases are kept
    across preemptions and reused while big enough, so a steady engine does
    no lease round trips on the preemption path.

    With `in_place=True` each tensor keeps its storage and address instead,
    so views and raw pointers into it stay valid (an engine binds its KV cache
    into attention layers and kernels by address): page_out gives the pages of
    host tensors back to the kernel after the copy (the address stays mapped
    and reads zeros), page_in copies the bytes back into the same memory.
    Tensors must be contiguous. GPU memory stays allocated in this mode
    (freeing it under a kept address needs CUDA virtual memory management).

        pager = aqua.TensorPager(client, [k_cache, v_cache]).install()
    """

    def __init__(self, client: Client, tensors: list[torch.Tensor] = (),
                 near: int | None = None, *, empty_cache: bool = True,
                 in_place: bool = False) -> None:
        self.client = client
        self.near = near
        # Dropped GPU storage goes back to torch's caching allocator, which
        # keeps it from every other process until empty_cache(): the point
        # of paging out for a tenant sharing the GPU. False keeps the cache
        # (faster page_in) when only this process needs the room.
        self.empty_cache = empty_cache
        self.in_place = in_place
        self._entries: list[_Paged] = []
        self.paged_out = False
        self.bytes_out = 0
        self.bytes_in = 0
        self.bytes_discarded = 0  # host memory given back by in-place page-outs
        for t in tensors:
            self.register(t)

    def register(self, tensor: torch.Tensor) -> None:
        if self.paged_out:
            raise AquaError("cannot register while paged out")
        if any(e.tensor is tensor for e in self._entries):
            return
        if self.in_place and not tensor.is_contiguous():
            raise ValueError("an in-place TensorPager pages contiguous tensors only")
        self._entries.append(_Paged(tensor))

    def unregister(self, tensor: torch.Tensor) -> None:
        for e in list(self._entries):
            if e.tensor is tensor:
                if e.lease is not None:
                    e.lease.release()
                self._entries.remove(e)

    def install(self) -> TensorPager:
        self.client.on_preempt(self.page_out, self.page_in)
        return self

    def page_out(self) -> None:
        if self.paged_out:
            return
        # First every lease, then every copy: if a lease is refused (out of
        # memory), no tensor has lost its storage yet.
        for e in self._entries:
            n = e.tensor.numel() * e.tensor.element_size()
            if e.lease is None or e.lease.nbytes < n:
                if e.lease is not None:
                    e.lease.release(keep=True)
                    e.lease = None
                e.lease = self.client.lease(max(n, 1), near=self.near, reuse=True)
        # Then every copy, and only once all have landed, drop the storage.
        # The leases' locks are held meanwhile: none moves under a copy.
        with self._locked(), Copies() as copy:
            for e in self._entries:
                t = e.tensor
                e.shape, e.dtype, e.device = t.shape, t.dtype, t.device
                src = _bytes_of(t)
                e.nbytes = src.numel()
                if e.nbytes:
                    copy(_lease_bytes(e.lease, e.nbytes, src), src)
        for e in self._entries:
            t = e.tensor
            if self.in_place:
                self.bytes_discarded += _discard_pages(t)
            else:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self.bytes_out += e.nbytes
        if self.empty_cache and not self.in_place and \
                any(e.device.type == "cuda" for e in self._entries):
            torch.cuda.empty_cache()
        self.paged_out = True

    def page_in(self) -> None:
        if not self.paged_out:
            return
        # In place: back into the same memory; else into fresh storage.
        outs = [_bytes_of(e.tensor) if self.in_place else
                torch.empty(e.shape, dtype=e.dtype, device=e.device) for e in self._entries]
        with self._locked(), Copies() as copy:
            for e, out in zip(self._entries, outs):
                if e.nbytes:
                    copy(out.reshape(-1).view(torch.uint8), _lease_bytes(e.lease, e.nbytes, out))
        for e, out in zip(self._entries, outs):
            if not self.in_place:
                e.tensor.data = out
            self.bytes_in += e.nbytes
        self.paged_out = False

    def _locked(self) -> ExitStack:
        """Every lease's lock, in registration order (a move holds one at a
        time, so this order cannot deadlock with it)."""
        stack = ExitStack()
        for e in self._entries:
            if e.lease is not None:
                stack.enter_context(e.lease.lock)
        return stack

    def close(self) -> None:
        """Release the leases (paging in first if needed)."""
        self.page_in()
        for e in self._entries:
            if e.lease is not None:
                e.lease.release()
                e.lease = None


class _Paged:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.lease: Lease | None = None
        self.shape = tensor.shape
        self.dtype = tensor.dtype
        self.device = tensor.device
        self.nbytes = 0
