"""`AquaOffloadingSpec`: aqua leases as vLLM's KV offload tier.

Plugged into vLLM's `OffloadingConnector`:

    kv_transfer_config={"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {
                            "spec_name": "AquaOffloadingSpec", "spec_module_path": "aqua.vllm",
                            "aqua_socket": "/run/aqua/aquad.sock", "aqua_lease_bytes": "4GiB"}}

vLLM v1 preempts by recompute: a preempted request's KV blocks are freed,
and its resume looks them up through the connector before computing them
again. Offloaded blocks live in aqua leases, so a resume reloads them from
wherever aquad placed them (a peer GPU over NVLink first, host memory last)
instead of recomputing them.

The chunk bookkeeping is vLLM's own `CPUOffloadingManager` (LRU eviction,
reference counts, events); this module backs its chunks with leases taken
as the cache fills and turns the tier off, with one log line, when aquad is
not there or goes away (vLLM then serves on, recomputing).

Pinned against vllm 0.32.0, whose offloading API is experimental.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from typing_extensions import override
from vllm.v1.kv_offload.base import (
    LookupResult,
    OffloadingCounterMetadata,
    OffloadingGaugeMetadata,
    OffloadingManager,
    OffloadingMetricMetadata,
    OffloadingSpec,
    OffloadingWorker,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
)
from vllm.v1.kv_offload.config import OffloadingConfig
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager
from vllm.v1.kv_offload.cpu.policies.base import ChunkStatus
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

from .copies import AquaLoadStoreSpec, AquaOffloadingWorker
from .tier import LeaseTier, TierSettings
from .worker_turns import current_stats

# aqua's figures in vLLM's Prometheus output (next to vLLM's own
# vllm:kv_offload_store_bytes / vllm:kv_offload_load_bytes counters, which
# count the bytes this tier's worker copied).
LEASE_BYTES = "vllm:aqua_lease_bytes"
CAPACITY_BYTES = "vllm:aqua_offload_capacity_bytes"
TIER_UP = "vllm:aqua_offload_up"
# GPU time slices of this engine (aqua.vllm.AquaWorker), where its worker runs
# in the engine-core process with the scheduler (one device: vLLM's
# in-process executor); SliceStats field -> counter.
SLICE_COUNTERS = {
    "turns": ("vllm:aqua_slice_turns", "Turns the engine took from aquad (from idle)."),
    "waits": ("vllm:aqua_slice_waits", "Turn and yield requests that queued behind "
                                       "another tenant."),
    "wait_s": ("vllm:aqua_slice_wait_seconds", "Seconds engine steps waited for a slice, "
                                               "paging included."),
    "yields": ("vllm:aqua_slice_yields", "Preemptions answered: KV cache paged out, slice "
                                         "given up, paged back in."),
    "revocations": ("vllm:aqua_slice_revocations", "Slices aquad took back because the "
                                                   "engine yielded late."),
}


class AquaOffloadingManager(CPUOffloadingManager):
    """vLLM's CPU offloading bookkeeping over chunks that live in aqua
    leases: its pool starts empty and grows a lease at a time."""

    def __init__(self, tier: LeaseTier, **kwargs: Any) -> None:
        # The policy is sized for the most the tier may grow to.
        super().__init__(num_chunks=max(tier.max_chunks, 1), **kwargs)
        self.tier = tier
        self._num_chunks = tier.chunks  # what is leased so far
        self._slices_reported: dict[str, float] = {}  # SliceStats as last exported

    @override
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if not self.tier.up:
            return LookupResult.MISS
        return super().lookup(key, req_context)

    @override
    def prepare_store(self, keys: Collection[OffloadKey],
                      req_context: ReqContext) -> PrepareStoreOutput | None:
        if not self.tier.up:
            return None
        keys = list(keys)
        # Lease more chunks while the keys not stored yet do not fit.
        new = sum(1 for key in keys if self._policy.get(key) is None)
        while self._get_num_free_chunks() < new and self.tier.grow():
            self._num_chunks = self.tier.chunks
        return super().prepare_store(keys, req_context)

    @override
    def _get_load_store_spec(self, keys: Iterable[OffloadKey],
                             chunks: Iterable[ChunkStatus]) -> AquaLoadStoreSpec:
        ids = [chunk.chunk_id for chunk in chunks]
        return AquaLoadStoreSpec(ids, self.tier.chunks_per_lease, self.tier.handles(ids))

    @override
    def get_stats(self):
        stats = super().get_stats()
        leased = self.tier.bytes_by_tier()
        for tier in ("nvlink", "peer", "host", "local"):
            stats.set_gauge(LEASE_BYTES, leased.get(tier, 0), (tier,))
        stats.set_gauge(CAPACITY_BYTES, self.tier.max_chunks * self.tier.chunk_bytes)
        stats.set_gauge(TIER_UP, 1 if self.tier.up else 0)
        slices = current_stats()  # the worker's slice counters, if it runs here
        for field, (name, _) in SLICE_COUNTERS.items():
            now = 0.0 if slices is None else float(getattr(slices, field))
            delta = now - self._slices_reported.get(field, 0.0)
            if delta > 0:  # what grew since the last call
                stats.increase_counter(name, delta)
                self._slices_reported[field] = now
        return stats

    @override
    def shutdown(self) -> None:
        self.tier.close()


class AquaOffloadingSpec(OffloadingSpec):
    """kv_connector_extra_config keys: `aqua_socket` (default: $AQUA_SOCKET,
    then the standard path), `aqua_lease_bytes` (bytes or '4GiB') or
    `aqua_lease_fraction` (of aquad's free memory at start; 0.25 if neither),
    `aqua_lease_chunk_bytes` (bytes per lease, default 64MiB), `aqua_tenant`,
    `aqua_device` (the home device aquad places leases near, default 0).
    `offload_prompt_only` defaults to false here: decode blocks are what a
    preempted request would otherwise recompute."""

    @classmethod
    @override
    def build_metric_definitions(cls, extra_config: dict[str, Any]
                                 ) -> dict[str, OffloadingMetricMetadata]:
        return {
            **CPUOffloadingSpec.build_metric_definitions(extra_config),
            LEASE_BYTES: OffloadingGaugeMetadata(
                documentation="Bytes of aqua leases holding offloaded KV blocks, by the "
                              "tier aquad placed them on (nvlink, peer, host, local).",
                labelnames=("tier",)),
            CAPACITY_BYTES: OffloadingGaugeMetadata(
                documentation="Most bytes the aqua KV offload tier may lease (its budget, "
                              "lowered when aquad ran out of memory)."),
            TIER_UP: OffloadingGaugeMetadata(
                documentation="1 while the aqua KV offload tier is in use, 0 once aquad "
                              "was unreachable (vLLM recomputes preempted requests)."),
            **{name: OffloadingCounterMetadata(documentation=doc)
               for name, doc in SLICE_COUNTERS.values()},
        }

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        self.offload_prompt_only = bool(self.extra_config.get("offload_prompt_only", False))
        # Checked here, on both sides, so a bad value fails the engine at start.
        self.settings = TierSettings.from_extra(self.extra_config)
        self.chunk_bytes = config.worker_kv_bytes_per_block * self.blocks_per_chunk
        self._manager: AquaOffloadingManager | None = None
        self._worker: AquaOffloadingWorker | None = None

    @override
    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            tier = LeaseTier(self.settings, self.chunk_bytes)
            self._manager = AquaOffloadingManager(
                tier, cache_policy=self.extra_config.get("eviction_policy", "lru"),
                enable_events=self.kv_events_config.enable_kv_cache_events)
        return self._manager

    @override
    def get_worker(self, kv_caches) -> OffloadingWorker:
        if self._worker is None:
            self._worker = AquaOffloadingWorker(kv_caches, self.blocks_per_chunk,
                                                self.chunk_bytes, self.settings.socket)
        return self._worker


__all__ = ["AquaLoadStoreSpec", "AquaOffloadingManager", "AquaOffloadingSpec"]
