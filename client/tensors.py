"""Tensor-level offload, in the spirit of the paper's responsive tensor.

`offload` copies a tensor's bytes into a lease (the caller may then drop its
own copy and free that memory); `restore` brings them back bit-exactly, on
the original device or another. The copy goes straight into the mapped lease:
no staging buffer, nothing through the socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import AquaError

if TYPE_CHECKING:
    from .client import Client, Lease


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's storage bytes as a flat uint8 view (contiguous first)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


class OffloadedTensor:
    """A tensor's bytes held in a lease, with what is needed to rebuild it."""

    def __init__(self, lease: Lease, dtype: torch.dtype, shape: torch.Size,
                 device: torch.device) -> None:
        self.lease = lease
        self.dtype = dtype
        self.shape = shape
        self.device = device
        self.nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()

    def restore_into(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the bytes back into `out` (same dtype and shape, contiguous)."""
        if out.dtype != self.dtype or out.shape != self.shape or not out.is_contiguous():
            raise ValueError(f"restore_into needs a contiguous {self.dtype} tensor of shape "
                             f"{tuple(self.shape)}")
        if self.lease.released:
            raise AquaError("the lease holding this tensor was released")
        if self.nbytes:
            out.reshape(-1).view(torch.uint8).copy_(self.lease.tensor()[: self.nbytes])
        return out

    def restore(self, device: torch.device | str | None = None, *,
                release: bool = True) -> torch.Tensor:
        """A new tensor with the original bytes; frees the lease unless told not to."""
        out = torch.empty(self.shape, dtype=self.dtype,
                          device=self.device if device is None else device)
        self.restore_into(out)
        if release:
            self.lease.release()
        return out

    def release(self) -> None:
        self.lease.release()

    def __repr__(self) -> str:
        return (f"<aqua.OffloadedTensor {self.dtype} {tuple(self.shape)} from {self.device} "
                f"in {self.lease!r}>")


def offload(client: Client, tensor: torch.Tensor, near: int | None = None) -> OffloadedTensor:
    """Copy `tensor` into a fresh lease of `client`; returns the handle to restore it."""
    src = _bytes_of(tensor)
    lease = client.lease(max(src.numel(), 1), near=near)
    try:
        if src.numel():
            lease.tensor()[: src.numel()].copy_(src)
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

        pager = aqua.TensorPager(client, [k_cache, v_cache]).install()
    """

    def __init__(self, client: Client, tensors: list[torch.Tensor] = (),
                 near: int | None = None) -> None:
        self.client = client
        self.near = near
        self._entries: list[_Paged] = []
        self.paged_out = False
        self.bytes_out = 0
        self.bytes_in = 0
        for t in tensors:
            self.register(t)

    def register(self, tensor: torch.Tensor) -> None:
        if self.paged_out:
            raise AquaError("cannot register while paged out")
        if any(e.tensor is tensor for e in self._entries):
            return
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
                    e.lease.release()
                    e.lease = None
                e.lease = self.client.lease(max(n, 1), near=self.near)
        for e in self._entries:
            t = e.tensor
            e.shape, e.dtype, e.device = t.shape, t.dtype, t.device
            src = _bytes_of(t)
            e.nbytes = src.numel()
            if e.nbytes:
                e.lease.tensor()[: e.nbytes].copy_(src)
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self.bytes_out += e.nbytes
        self.paged_out = True

    def page_in(self) -> None:
        if not self.paged_out:
            return
        for e in self._entries:
            fresh = torch.empty(e.shape, dtype=e.dtype, device=e.device)
            if e.nbytes:
                fresh.reshape(-1).view(torch.uint8).copy_(e.lease.tensor()[: e.nbytes])
            e.tensor.data = fresh
            self.bytes_in += e.nbytes
        self.paged_out = False

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
