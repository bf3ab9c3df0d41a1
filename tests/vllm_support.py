"""A tiny random Llama for tests and benchmarks that run real vLLM engines.

Nothing is downloaded: transformers builds the model from a config and saves
it to a local folder, which vLLM loads like any checkpoint. fp32, so greedy
decoding gives the same tokens whatever kernel or batch computed them (bf16
flips on near-ties between kernels). Load it with `skip_tokenizer_init=True`
and token-id prompts: the folder has no tokenizer.
"""

from __future__ import annotations

import os

VOCAB = 1024


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
