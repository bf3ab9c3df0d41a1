"""One vLLM engine as a tenant process, for tests/test_vllm_worker.py and
bench/vllm_slices.py.

    python tests/vllm_worker_tenant.py MODEL_DIR --seeds 1,2 [--stock] [--hold]

Builds `vllm.LLM` with `worker_cls="aqua.vllm.AquaWorker"` (the platform's
own worker with --stock), prints `{"ready": pid}` and waits for a line on
stdin (so several tenants start computing together), generates greedily
each prompt set in turn,
then prints one JSON line (each after MARK): the tokens, the worker's turn counters and, when
the engine was preempted, what the restore checks found. With --hold it
then waits for stdin to close before exiting (the test may kill -9 it).

The restore check wraps the worker's pager hooks: before each page-out it
hashes every KV storage and notes its address; after the page-in it hashes
again. It reads the engine's real cache; nothing in the data path is
replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker runs here


MARK = "@aqua-tenant "  # vLLM logs to stdout too: our lines carry this


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def prompts(seed: int, n: int, length: int) -> list[list[int]]:
    import random  # noqa: PLC0415

    rng = random.Random(seed)
    return [[rng.randrange(1, 1000) for _ in range(length)] for _ in range(n)]


def _digest(t) -> str:
    return hashlib.blake2b(t.numpy().data, digest_size=16).hexdigest()


class RestoreCheck:
    """Hashes the KV cache around each preemption of the worker's pager."""

    def __init__(self, keeper) -> None:
        self.keeper = keeper
        self.pager = keeper.pager
        self.checked = self.mismatches = self.moved = self.zeroed = 0
        self._before: list[tuple[int, str]] = []
        keeper.client.on_preempt(self.page_out, self.page_in)

    def page_out(self) -> None:
        tensors = self.keeper._paged
        self._before = [(t.data_ptr(), _digest(t)) for t in tensors]
        self.pager.page_out()
        # The pages really went: what the engine would read now is zeros.
        self.zeroed += sum(1 for t in tensors if not t[t.numel() // 2:].any())

    def page_in(self) -> None:
        self.pager.page_in()
        for t, (ptr, digest) in zip(self.keeper._paged, self._before):
            self.checked += 1
            self.moved += t.data_ptr() != ptr
            self.mismatches += _digest(t) != digest

    def as_dict(self) -> dict[str, int]:
        return {"checked": self.checked, "mismatches": self.mismatches, "moved": self.moved,
                "zeroed": self.zeroed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seeds", default="1", help="prompt sets, generated one after another")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--blocks", type=int, default=64, help="KV cache blocks (of 32 tokens)")
    ap.add_argument("--stock", action="store_true", help="vLLM's own worker, no aqua")
    ap.add_argument("--hold", action="store_true", help="stay alive until stdin closes")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams  # noqa: PLC0415
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", block_size=32,
              max_model_len=256, num_gpu_blocks_override=args.blocks, enforce_eager=True,
              gpu_memory_utilization=0.1,  # on CPU: the share of RAM it checks is free
              worker_cls="auto" if args.stock else "aqua.vllm.AquaWorker", seed=0)
    check = None
    if not args.stock:
        worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
        if worker._aqua.enabled:
            check = RestoreCheck(worker._aqua)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    batches = {seed: [TokensPrompt(prompt_token_ids=p)
                      for p in prompts(seed, args.prompts, args.prompt_len)] for seed in seeds}
    emit({"ready": os.getpid()})
    sys.stdin.readline()

    started = time.monotonic()
    tokens = {}
    for seed, batch in batches.items():
        outs = llm.generate(batch, params, use_tqdm=False)
        tokens[seed] = [list(o.outputs[0].token_ids) for o in outs]
    result = {
        "tokens": tokens,
        "elapsed_s": time.monotonic() - started,
        "stats": llm.collective_rpc("aqua_stats")[0] if not args.stock else {},
        "restore": check.as_dict() if check else None,
    }
    emit(result)
    if args.hold:
        sys.stdin.read()


if __name__ == "__main__":
    main()
