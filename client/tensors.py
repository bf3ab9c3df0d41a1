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
