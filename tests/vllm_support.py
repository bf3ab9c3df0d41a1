"""A tiny random Llama for tests and benchmarks that run real vLLM engines.

Nothing is downloaded: transformers builds the model from a config and saves
it to a local folder, which vLLM loads like any checkpoint. fp32, so greedy
decoding gives the same tokens whatever kernel or batch computed them (bf16
flips on near-ties between kernels). Load it with `skip_tokenizer_init=True`
and token-id prompts: the folder has no tokenizer.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

VOCAB = 1024


def end_process(proc: subprocess.Popen) -> None:
    """Kill `proc` if it still runs, reap it, and close our ends of its
    stdin and stdout (the test drivers' pipes: a leak fails the suite)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    proc.stdout.close()


def tiny_llama(path: str, *, layers: int = 2, hidden: int = 128, heads: int = 4,
               kv_heads: int = 2, vocab: int = VOCAB, max_len: int = 2048,
               seed: int = 0) -> str:
    """Build (once) a random fp32 Llama in `path` and return `path`."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, torch_dtype="float32", tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Random weights at init scale give near-uniform logits; a wider spread
    # makes greedy choices clear-cut, so runs compare token for token.
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0)
    model.save_pretrained(path)
    return path


def prompts(count: int, length: int, *, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    """`count` random token-id prompts of `length` tokens (ids above the
    specials), distinct from each other, the same for a given seed."""
    import random  # noqa: PLC0415

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


# --- real vLLM engines (import vllm only when called) ------------------------

BLOCK = 32  # the CPU attention backend needs a multiple of 32


def llm_kwargs(model: str, blocks: int, *, max_len: int = 256, max_seqs: int = 8,
               **extra) -> dict:
    """LLM(...) arguments for `model` on the CPU backend with a KV cache of
    exactly `blocks` blocks of BLOCK tokens (few blocks force preemptions).
    gpu_memory_utilization is CPU memory on the CPU backend: kept small, the
    KV cache is sized by the block count."""
    return dict(model=model, skip_tokenizer_init=True, dtype="float32", block_size=BLOCK,
                num_gpu_blocks_override=blocks, max_model_len=max_len, max_num_seqs=max_seqs,
                enforce_eager=True, disable_log_stats=False, seed=0,
                gpu_memory_utilization=0.05, **extra)


def aqua_offload(socket: str, lease_bytes: int | str, *, short_name: bool = False,
                 **extra) -> dict:
    """The kv_transfer_config that puts aqua leases under vLLM as its KV
    offload tier: by module path, or by the short name the installed
    plugin registers."""
    spec = ({"spec_name": "aqua"} if short_name else
            {"spec_name": "AquaOffloadingSpec", "spec_module_path": "aqua.vllm"})
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {**spec, "aqua_socket": socket,
                                          "aqua_lease_bytes": lease_bytes, **extra}}


class ScheduledTokens:
    """Counts the tokens the model computed: the scheduler's own
    `total_num_scheduled_tokens` of every step, read off an in-process engine
    (VLLM_ENABLE_V1_MULTIPROCESSING=0). A prompt recomputed after a
    preemption counts again; blocks reloaded from the offload tier do not."""

    def __init__(self, llm) -> None:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        self.total = 0
        schedule = scheduler.schedule

        def counted(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.total += out.total_num_scheduled_tokens
            return out

        scheduler.schedule = counted


def metric(llm, name: str, **labels: str) -> float:
    """Sum of a counter or gauge in the engine's Prometheus metrics."""
    return sum(m.value for m in llm.get_metrics()
               if m.name == name and getattr(m, "value", None) is not None
               and all(m.labels.get(k) == v for k, v in labels.items()))


def generate(llm, token_prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids for each prompt, ignoring EOS (fixed lengths)."""
    from vllm import SamplingParams  # noqa: PLC0415
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_prompts], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
