"""The worker side of the aqua KV offload tier: KV blocks copied between
vLLM's KV cache and aqua leases.

Layout of one lease of n chunks, each chunk `blocks_per_chunk` KV blocks:
one region per KV cache tensor, in tensor order, region t holding
n * blocks_per_chunk rows of that tensor's page size. So a chunk's blocks of
one tensor are rows of one plain 2-D view, and a job's copies are one
indexed copy per (lease, tensor) on the CPU, or one batched copy call per
job on a GPU.

CPU KV caches (vLLM's CPU backend) copy synchronously inside submit_*: the
CPU model runner does nothing concurrently with the connector's calls. CUDA
KV caches copy on a side stream that waits for the compute stream, with
vLLM's batched pointer copy (cuMemcpyBatchAsync), one event per job; host
leases are page-locked first. The CUDA path has not run on GPU hardware yet.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

from aqua_protocol.paths import segment_prefix

from ..memory import open_handle
from .tier import LIVE_LEASES


class AquaLoadStoreSpec(BlockIDsLoadStoreSpec):
    """Offload chunk ids, with the handles of the leases holding them (the
    worker maps a lease the first time a spec names it)."""

    def __init__(self, chunk_ids: list[int], chunks_per_lease: int,
                 leases: dict[int, tuple[str, dict[str, Any]]]) -> None:
        super().__init__(chunk_ids)
        self.chunks_per_lease = chunks_per_lease
        self.leases = leases


# One run of page copies of a job: (KV tensor index, that tensor's view of
# the lease, KV block ids, the matching rows of the view).
_Pages = list[tuple[int, torch.Tensor, np.ndarray, np.ndarray]]


class AquaOffloadingWorker(OffloadingWorker):
    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int,
                 chunk_bytes: int, socket: str) -> None:
        self.blocks_per_chunk = blocks_per_chunk
        tensors = [t.tensor for t in kv_caches.tensors]
        if any(t.dim() != 2 or t.stride(1) != 1 or t.stride(0) != t.shape[1] for t in tensors):
            raise ValueError("aqua's KV offload tier needs one contiguous page per KV "
                             "block and tensor (packed layouts are not supported)")
        # bytes per KV block, per tensor
        self.pages = [t.shape[1] * t.element_size() for t in tensors]
        # CPU copies move whole words: torch's index_copy_ on int8 moves a
        # byte per element, about 100x slower than on int64 for the same
        # bytes (bench/README.md, vllm_fair.py section).
        self.word = _widest_word(self.pages, [t.data_ptr() for t in tensors])
        self.kv = [t.view(torch.int8).view(self.word) for t in tensors]
        if blocks_per_chunk * sum(self.pages) != chunk_bytes:
            raise ValueError(f"KV pages add up to {blocks_per_chunk * sum(self.pages)} bytes per "
                             f"offload chunk, the scheduler sized chunks at {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.group_tensors = [sorted({ref.tensor_idx for ref in refs})
                              for refs in kv_caches.group_data_refs]
        self.cuda = self.kv[0].is_cuda
        self._prefix = segment_prefix(socket)
        self._views: dict[int, list[torch.Tensor]] = {}  # lease index -> view per tensor
        self._mappings: list[Any] = []  # our own mappings, kept open while we run
        self._done: list[TransferResult] = []
        self._cuda = _CudaJobs() if self.cuda else None

    # --- leases ---------------------------------------------------------------

    def _map(self, spec: AquaLoadStoreSpec) -> None:
        for index, (lease_id, handle) in spec.leases.items():
            if index in self._views:
                continue
            lease = LIVE_LEASES.get(lease_id)
            if lease is not None:
                memory = lease  # the scheduler's mapping, in this process
                whole = lease.tensor(torch.int8)
            else:
                memory = open_handle(handle, prefix=self._prefix, populate=True)
                self._mappings.append(memory)
                whole = memory.tensor(torch.int8, None)
            if self.cuda and whole.device.type == "cpu":
                memory.pin()  # page-locked: copies run at PCIe speed
            chunks = whole.numel() // self.chunk_bytes
            views, offset = [], 0
            for page in self.pages:
                rows = chunks * self.blocks_per_chunk
                views.append(whole[offset:offset + rows * page].view(rows, page).view(self.word))
                offset += rows * page
            self._views[index] = views

    def _pages(self, gpu: GPULoadStoreSpec, spec: AquaLoadStoreSpec) -> tuple[_Pages, int]:
        """Match each KV block of the job with its chunk and sub-block row:
        the job's runs of page copies, and its bytes. A group's first block
        may start inside a chunk (block_indices)."""
        bpc, cpl = self.blocks_per_chunk, spec.chunks_per_lease
        pages: _Pages = []
        nbytes = 0
        block_at = chunk_at = 0
        chunk_ids = spec.block_ids.astype(np.int64)
        for group, (size, first) in enumerate(zip(gpu.group_sizes, gpu.block_indices)):
            if size == 0:
                continue
            blocks = gpu.block_ids[block_at:block_at + size].astype(np.int64)
            logical = first % bpc + np.arange(size, dtype=np.int64)
            count = -(-(first % bpc + size) // bpc)
            chunks = chunk_ids[chunk_at:chunk_at + count][logical // bpc]
            leases = chunks // cpl
            rows = (chunks % cpl) * bpc + logical % bpc
            for index in np.unique(leases):
                mask = leases == index
                views = self._views[int(index)]
                pages += [(t, views[t], blocks[mask], rows[mask])
                          for t in self.group_tensors[group]]
            nbytes += size * sum(self.pages[t] for t in self.group_tensors[group])
            block_at += size
            chunk_at += count
        return pages, nbytes

    # --- OffloadingWorker -----------------------------------------------------

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: AquaLoadStoreSpec) -> bool:
        return self._transfer(job_id, src_spec, dst_spec, store=True)

    def submit_load(self, job_id: int, src_spec: AquaLoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        return self._transfer(job_id, dst_spec, src_spec, store=False)

    def _transfer(self, job_id: int, gpu: GPULoadStoreSpec, spec: AquaLoadStoreSpec, *,
                  store: bool) -> bool:
        self._map(spec)
        pages, nbytes = self._pages(gpu, spec)
        if self._cuda is not None:
            self._cuda.submit(job_id, self._pointers(pages, store), nbytes, store)
            return True
        start = time.perf_counter()
        for t, view, blocks, rows in pages:
            b, r = torch.from_numpy(blocks), torch.from_numpy(rows)
            if store:
                view.index_copy_(0, r, self.kv[t].index_select(0, b))
            else:
                self.kv[t].index_copy_(0, b, view.index_select(0, r))
        self._done.append(TransferResult(job_id, True, nbytes, time.perf_counter() - start))
        return True

    def _pointers(self, pages: _Pages, store: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, destination, size) of every page copy in the job."""
        src, dst, sizes = [], [], []
        for t, view, blocks, rows in pages:
            page = self.pages[t]
            kv = self.kv[t].data_ptr() + blocks * page
            lease = view.data_ptr() + rows * page
            src.append(kv if store else lease)
            dst.append(lease if store else kv)
            sizes.append(np.full(len(blocks), page, dtype=np.int64))
        if not sizes:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, empty
        return (np.concatenate(src).astype(np.int64), np.concatenate(dst).astype(np.int64),
                np.concatenate(sizes))

    def get_finished(self) -> list[TransferResult]:
        if self._cuda is not None:
            return self._cuda.finished()
        done, self._done = self._done, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        if self._cuda is not None:
            self._cuda.wait(job_ids)

    def shutdown(self) -> None:
        if self._cuda is not None:
            self._cuda.wait(None)
        self._views.clear()
        for mapping in self._mappings:
            mapping.close()
        self._mappings.clear()


def _widest_word(pages: list[int], addresses: list[int]) -> torch.dtype:
    """The widest integer type that tiles every KV page and starts at
    every tensor's address (lease regions start at multiples of pages)."""
    for word in (torch.int64, torch.int32, torch.int16):
        size = word.itemsize
        if all(p % size == 0 for p in pages) and all(a % size == 0 for a in addresses):
            return word
    return torch.int8


class _CudaJobs:
    """Jobs on one side stream, in order, each ending with its own event."""

    def __init__(self) -> None:
        from vllm import _custom_ops as ops  # noqa: PLC0415 - CUDA builds only

        self._copy = ops.swap_blocks_batch
        self.stream = torch.cuda.Stream()
        self.jobs: deque[tuple[int, torch.cuda.Event, torch.cuda.Event, int, tuple]] = deque()

    def submit(self, job_id: int, ptrs: tuple[np.ndarray, np.ndarray, np.ndarray],
               nbytes: int, store: bool) -> None:
        # Stores read what the model just wrote; loads must not overtake work
        # already queued on their destination blocks: wait for compute first.
        self.stream.wait_stream(torch.cuda.current_stream())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        src, dst, sizes = (torch.from_numpy(a).pin_memory() for a in ptrs)
        with torch.cuda.stream(self.stream):
            start.record()
            if sizes.numel():
                # Loads read leases no stream writes meanwhile: let the DMA
                # engine prefetch out of order.
                self._copy(src, dst, sizes, is_src_access_order_any=not store)
            end.record()
        # The descriptor tensors live until the job is done.
        self.jobs.append((job_id, start, end, nbytes, (src, dst, sizes)))

    def finished(self) -> list[TransferResult]:
        out = []
        while self.jobs and self.jobs[0][2].query():
            job_id, start, end, nbytes, _ = self.jobs.popleft()
            out.append(TransferResult(job_id, True, nbytes, start.elapsed_time(end) * 1e-3))
        return out

    def wait(self, job_ids: set[int] | None) -> None:
        for job_id, _, end, _, _ in list(self.jobs):
            if job_ids is None or job_id in job_ids:
                end.synchronize()
