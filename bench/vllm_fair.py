"""aqua.vllm.FairScheduler + the aqua KV tier against stock vLLM, real
engines (the CPU build works), same arrivals, same KV room.

Part a: a chat-shaped burst (short prompts, long outputs) of many requests
at once, on a KV cache a sixth of what the burst needs.
Part b: the Azure 2023 conversation trace (bench/traces, CC BY 4.0; Patel et
al., "Splitwise", ISCA 2024): its first requests' inter-arrival times,
sped up, prompt and output lengths scaled down to the tiny model.

Variants, one process each, on the same random fp32 Llama: `stock` (vLLM's
default scheduler, preemption by recompute: what vLLM does unless told
otherwise), `stock-cpu` (optional, --cpu-offload: stock scheduler with vLLM's
own CPU offloading at the aqua tier's budget) and `fair` (FairScheduler, the
aqua tier as the offload connector). Reported per variant, median and
spread (min-max) over --repeats runs: TTFT p50/p99, time between tokens
p99, output throughput, Jain's index over requests (of normalised service:
output tokens / time in the system) and over tenants, tokens computed,
recomputed (computed beyond prompt + output) and reloaded from the tier.

    .venv/bin/python bench/vllm_fair.py --part a|b [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aqua_demo.stats import jain, percentile, service_summary, token_rate  # noqa: E402
from bench._common import aquad_process, write_json  # noqa: E402
from bench.vllm_tenants import MODEL, TOKEN_BYTES  # noqa: E402
from demo.trace import read_trace  # noqa: E402
from tests.vllm_support import BLOCK, tiny_llama  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(os.path.dirname(HERE), "tests", "vllm_fair_driver.py")
TRACE = os.path.join(HERE, "traces", "azure-llm-2023-conv.csv")
TENANTS = ("alice", "bob", "carol", "dave")


def chat_burst(count: int, seed: int = 11) -> list[dict]:
    """Prompts of 16-64 tokens, 128-256 output tokens, all at once."""
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(3, 1024) for _ in range(rng.randrange(16, 65))],
             "max_tokens": rng.randrange(128, 257), "tenant": TENANTS[i % len(TENANTS)],
             "at_s": 0.0} for i in range(count)]


def azure_conv(count: int, speedup: float, seed: int = 11) -> list[dict]:
    """The trace's first `count` requests: arrivals `speedup` times faster,
    prompts / 8 (16-256 tokens), outputs / 2 (8-192 tokens)."""
    rng = random.Random(seed)
    rows = read_trace(TRACE, count)
    return [{"prompt": [rng.randrange(3, 1024) for _ in range(min(256, max(16, ctx // 8)))],
             "max_tokens": min(192, max(8, gen // 2)), "tenant": TENANTS[i % len(TENANTS)],
             "at_s": t / speedup} for i, (t, ctx, gen) in enumerate(rows)]


def blocks_for(requests: list[dict]) -> int:
    return sum(-(-(len(r["prompt"]) + r["max_tokens"]) // BLOCK) for r in requests)


def run_variant(spec: dict) -> dict:
    out = subprocess.run([sys.executable, DRIVER, json.dumps(spec)], capture_output=True,
                         text=True, timeout=3000)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"variant {spec['variant']} failed ({out.returncode}):\n"
                     f"{out.stderr[-4000:]}")


def figures(rep: dict, requests: list[dict]) -> dict:
    rows = rep["requests"]
    service = service_summary((r["arrived_s"], r["times"]) for r in rows)
    # TTFT in engine steps: independent of machine load
    ttft_steps = sorted(r["steps"][0] - r["arrived_step"] for r in rows)
    # normalised service of a request: output tokens per second in the system
    rates = [token_rate(r["arrived_s"], r["times"]) for r in rows]
    by_tenant: dict[str, list[float]] = {}
    for r, rate in zip(rows, rates):
        by_tenant.setdefault(r["tenant"], []).append(rate)
    needed = sum(len(q["prompt"]) + q["max_tokens"] - 1 for q in requests)
    return {
        **{key: service[key] for key in ("ttft_p50_s", "ttft_p99_s", "tbt_p99_s")},
        "ttft_p50_steps": percentile(ttft_steps, 0.50),
        "ttft_p99_steps": percentile(ttft_steps, 0.99),
        "throughput_tok_s": service["tokens"] / rep["wall_s"],
        "jain_requests": jain(rates),
        "jain_tenants": jain([statistics.fmean(v) for v in by_tenant.values()]),
        "computed": rep["computed"], "recomputed": rep["computed"] - needed,
        "reloaded_tokens": rep["loaded_bytes"] / TOKEN_BYTES,
        "preemptions": rep["preemptions"], "wall_s": rep["wall_s"], "steps": rep["steps"],
        "ms_per_step": 1000 * rep["wall_s"] / rep["steps"],
    }


def summarise(reps: list[dict]) -> dict:
    return {key: {"median": statistics.median(r[key] for r in reps),
                  "min": min(r[key] for r in reps), "max": max(r[key] for r in reps)}
            for key in reps[0]}


def run(args: argparse.Namespace) -> dict:
    if args.part == "a":
        requests = chat_burst(args.requests)
        what = f"chat-shaped burst of {args.requests} requests"
    else:
        requests = azure_conv(args.requests, args.speedup)
        what = (f"Azure 2023 conversation trace, first {args.requests} requests, "
                f"{args.speedup:g}x faster, prompts /8, outputs /2")
    need = blocks_for(requests)
    blocks = max(need // args.kv_divisor, 512 // BLOCK + 1)
    variants = ["stock", "fair"] + (["stock-cpu-offload"] if args.cpu_offload else [])
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="aqua-vllm-fair-") as tmp:
        model = tiny_llama(os.path.join(tmp, "model"), **MODEL)
        with aquad_process(tmp, "--host-devices", "2x512MiB") as daemon:
            raw, loads = {}, {}
            for v in variants:
                # the machine is shared: each variant's load average, to
                # tell a slow run from a slow policy (steps are load-free)
                before = os.getloadavg()[0]
                raw[v] = run_variant({"variant": v, "model": model, "socket": daemon.socket,
                                      "blocks": blocks, "max_seqs": 16, "max_len": 512,
                                      "requests": requests, "repeats": args.repeats,
                                      "fair": {"tenants": args.tenants}})
                loads[v] = (before, os.getloadavg()[0])
    tokens = {v: [r["tokens"] for r in raw[v]["reps"][0]["requests"]] for v in variants}
    doc = {
        "part": args.part, "what": what, "requests": len(requests), "kv_blocks_needed": need,
        "kv_blocks": blocks, "repeats": args.repeats, "tenants": args.tenants,
        "loadavg_before": load, "loadavg_after": os.getloadavg(), "loadavg": loads,
        "same_tokens": all(tokens[v] == tokens["stock"] for v in variants),
        "leaks": {v: [r["kv_usage_after"] for r in raw[v]["reps"]] for v in variants},
        "scheduler": {v: raw[v]["reps"][0]["scheduler"] for v in variants},
        "runs": {v: summarise([figures(r, requests) for r in raw[v]["reps"]])
                 for v in variants},
    }
    def ratio(num: str, den: str, key: str, floor: float | None = None) -> float:
        below = doc["runs"][den][key]["median"]
        return doc["runs"][num][key]["median"] / (below if floor is None else max(floor, below))

    doc["ratios"] = {
        "ttft_p50_stock_over_fair": ratio("stock", "fair", "ttft_p50_s"),
        "ttft_p99_stock_over_fair": ratio("stock", "fair", "ttft_p99_s"),
        "tbt_p99_fair_over_stock": ratio("fair", "stock", "tbt_p99_s"),
        "throughput_fair_over_stock": ratio("fair", "stock", "throughput_tok_s"),
        "ttft_p99_steps_stock_over_fair": ratio("stock", "fair", "ttft_p99_steps", floor=1.0),
        "ms_per_step_fair_over_stock": ratio("fair", "stock", "ms_per_step"),
    }
    return doc


def report(doc: dict) -> None:
    print(f"part {doc['part']}: {doc['what']}; KV cache {doc['kv_blocks']} blocks of {BLOCK} "
          f"tokens for {doc['kv_blocks_needed']} needed; {doc['repeats']} repeats; "
          f"same tokens: {doc['same_tokens']}; KV usage after: {doc['leaks']}; "
          f"load average {doc['loadavg_before'][0]:.1f} -> {doc['loadavg_after'][0]:.1f}")
    cols = [("ttft_p50_s", "TTFT p50", 3), ("ttft_p99_s", "TTFT p99", 3),
            ("tbt_p99_s", "TBT p99", 3), ("throughput_tok_s", "tok/s", 1),
            ("jain_requests", "Jain req", 3), ("jain_tenants", "Jain ten", 3),
            ("recomputed", "recomp", 0), ("reloaded_tokens", "reloaded", 0),
            ("preemptions", "preempt", 0), ("steps", "steps", 0),
            ("ttft_p50_steps", "TTFT p50 st", 0), ("ttft_p99_steps", "TTFT p99 st", 0),
            ("ms_per_step", "ms/step", 1)]
    print(f"{'variant':18}" + "".join(f"{name:>22}" for _, name, _ in cols))
    for v, figs in doc["runs"].items():
        cells = [f"{figs[k]['median']:.{d}f} [{figs[k]['min']:.{d}f}-{figs[k]['max']:.{d}f}]"
                 for k, _, d in cols]
        before, after = doc["loadavg"][v]
        print(f"{v:18}" + "".join(f"{c:>22}" for c in cells)
              + f"   load {before:.1f} -> {after:.1f}")
    for key, value in doc["ratios"].items():
        print(f"  {key}: {value:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["a", "b"], required=True)
    ap.add_argument("--requests", type=int, help="default: 48 (a), 64 (b)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speedup", type=float, default=2.0, help="part b: arrivals faster")
    ap.add_argument("--kv-divisor", type=int, default=6, help="KV room = need / this")
    ap.add_argument("--tenants", action="store_true", help="FairScheduler's VTC tenants on")
    ap.add_argument("--cpu-offload", action="store_true",
                    help="also stock vLLM with its own CPU offloading")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.requests is None:
        args.requests = 48 if args.part == "a" else 64
    doc = run(args)
    report(doc)
    if args.json:
        write_json(args.json, doc)
    return 0 if doc["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
