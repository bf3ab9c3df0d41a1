"""vLLM as an aqua tenant, with real vLLM engines (the CPU build works).

Part a: a burst on one vLLM whose KV cache is too small for it, so vLLM
preempts; stock vLLM (a preempted request is recomputed) against vLLM with
aqua leases as its KV offload tier (reloaded instead), both against the
limit of the same engine with room for the whole burst (no preemption).
Reported: TTFT p50/p99, output throughput, tokens the model computed and
how many of them were recomputed, tokens reloaded from leases, and whether
every variant produced the same tokens (fp32, greedy). Each variant runs in
a process of its own, on a random Llama built locally.

    .venv/bin/python bench/vllm_tenants.py --part a [--requests 32] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aqua_demo.stats import percentile  # noqa: E402
from bench._common import aquad_process, write_json  # noqa: E402
from tests.vllm_support import (  # noqa: E402
    BLOCK,
    ScheduledTokens,
    aqua_offload,
    llm_kwargs,
    metric,
    tiny_llama,
)

MODEL = dict(layers=4, hidden=512, heads=8, kv_heads=2)  # head_dim 64
# KV bytes per token: layers x (K and V) x kv_heads x head_dim x fp32
TOKEN_BYTES = MODEL["layers"] * 2 * MODEL["kv_heads"] * (MODEL["hidden"] // MODEL["heads"]) * 4


def burst(requests: int, seed: int = 7) -> tuple[list[list[int]], list[int]]:
    """Prompts of 32-160 tokens and 64-160 output tokens, all at once."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 1024) for _ in range(rng.randrange(32, 161))]
               for _ in range(requests)]
    outputs = [rng.randrange(64, 161) for _ in range(requests)]
    return prompts, outputs


def variant(name: str, model: str, socket: str, blocks: int, requests: int,
            repeats: int) -> dict:
    """One engine, one burst (in this process: the engine core in-process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams  # noqa: PLC0415
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    extra = {}
    if name == "aqua":
        extra["kv_transfer_config"] = aqua_offload(socket, "256MiB",
                                                   aqua_lease_chunk_bytes="16MiB")
    llm = LLM(**llm_kwargs(model, blocks, max_len=512, max_seqs=16, **extra))
    prompts, outputs = burst(requests)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in outputs]
    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    # The burst once to warm up (oneDNN builds kernels per shape on first
    # use, and the same burst schedules the same shapes again), then
    # `repeats` times from empty caches (the offload tier's included); the
    # repetition of median wall time is reported (a loaded machine).
    llm.generate(token_prompts, params, use_tqdm=False)
    counted = ScheduledTokens(llm)
    reps = []
    for _ in range(repeats):
        llm.reset_prefix_cache(reset_connector=True)
        base = {k: metric(llm, k) for k in ("vllm:kv_offload_load_bytes",
                                            "vllm:num_preemptions")}
        computed = counted.total
        start = time.perf_counter()
        outs = llm.generate(token_prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        ttft = sorted(o.metrics.first_token_latency for o in outs)
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        loaded = metric(llm, "vllm:kv_offload_load_bytes") - base["vllm:kv_offload_load_bytes"]
        reps.append({
            "variant": name, "blocks": blocks, "requests": requests, "wall_s": wall,
            "ttft_p50_s": percentile(ttft, 0.50), "ttft_p99_s": percentile(ttft, 0.99),
            "throughput_tok_s": generated / wall, "generated": generated,
            "computed": counted.total - computed,
            "preemptions": metric(llm, "vllm:num_preemptions") - base["vllm:num_preemptions"],
            "reloaded_tokens": loaded / TOKEN_BYTES,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
        })
    assert all(r["tokens"] == reps[0]["tokens"] for r in reps), "repetitions differ"
    return sorted(reps, key=lambda r: r["wall_s"])[len(reps) // 2]


def run_variant(name: str, model: str, socket: str, blocks: int, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--variant", name, "--model", model,
                          "--socket", socket, "--blocks", str(blocks),
                          "--requests", str(args.requests), "--repeats", str(args.repeats)],
                         capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"variant {name} failed ({out.returncode}):\n{out.stderr[-4000:]}")


def part_a(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="aqua-vllm-bench-") as tmp:
        model = tiny_llama(os.path.join(tmp, "model"), **MODEL)
        prompts, outputs = burst(args.requests)
        need = sum(-(-(len(p) + n) // BLOCK) for p, n in zip(prompts, outputs))
        small = max(need // 6, 512 // BLOCK + 1)  # a sixth of the burst's KV: vLLM preempts
        with aquad_process(tmp, "--host-devices", "2x512MiB") as daemon:
            runs = {name: run_variant(name, model, daemon.socket, blocks, args)
                    for name, blocks in (("limit", need + 16), ("stock", small),
                                         ("aqua", small))}
    limit, stock, aqua = runs["limit"], runs["stock"], runs["aqua"]
    same = stock["tokens"] == limit["tokens"] and aqua["tokens"] == limit["tokens"]
    for r in runs.values():
        r["recomputed"] = r["computed"] - limit["computed"]
        del r["tokens"]
    return {
        "part": "a", "requests": args.requests, "kv_blocks_needed": need,
        "kv_blocks_small": small, "same_tokens": same, "runs": runs,
        "ratios": {
            "ttft_p50_stock_over_aqua": stock["ttft_p50_s"] / aqua["ttft_p50_s"],
            "ttft_p99_stock_over_aqua": stock["ttft_p99_s"] / aqua["ttft_p99_s"],
            "throughput_aqua_over_stock": aqua["throughput_tok_s"] / stock["throughput_tok_s"],
            "throughput_aqua_over_limit": aqua["throughput_tok_s"] / limit["throughput_tok_s"],
            "recomputed_aqua_over_stock": (aqua["recomputed"] / stock["recomputed"]
                                           if stock["recomputed"] else float("nan")),
        },
    }


def report(doc: dict) -> None:
    runs = doc["runs"]
    print(f"part a: a burst of {doc['requests']} requests; KV cache {doc['kv_blocks_small']} "
          f"blocks of {BLOCK} tokens for a burst needing {doc['kv_blocks_needed']} "
          f"(limit: room for all); same tokens in every variant: {doc['same_tokens']}")
    print(f"{'variant':8} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>8} {'preempt':>8} "
          f"{'computed':>9} {'recomputed':>11} {'reloaded':>9}")
    for name in ("limit", "stock", "aqua"):
        r = runs[name]
        print(f"{name:8} {r['ttft_p50_s']:8.3f}s {r['ttft_p99_s']:8.3f}s "
              f"{r['throughput_tok_s']:8.1f} {r['preemptions']:8.0f} {r['computed']:9d} "
              f"{r['recomputed']:11d} {r['reloaded_tokens']:9.0f}")
    for key, value in doc["ratios"].items():
        print(f"  {key}: {value:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["a"], help="a: one vLLM, stock vs the aqua offload tier")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="measured bursts per variant")
    ap.add_argument("--quick", action="store_true", help="8 requests, 1 repeat: a smoke test")
    ap.add_argument("--json", metavar="FILE")
    # one variant in this process (what --part runs in children)
    ap.add_argument("--variant", choices=["limit", "stock", "aqua"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(variant(args.variant, args.model, args.socket,
                                              args.blocks, args.requests, args.repeats)),
              flush=True)
        return 0
    if args.quick:
        args.requests, args.repeats = 8, 1
    if args.part != "a":
        ap.error("say which part: --part a")
    doc = part_a(args)
    report(doc)
    if args.json:
        write_json(args.json, doc)
    return 0 if doc["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
