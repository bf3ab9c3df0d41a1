"""vLLM tenants with bursty load: aqua GPU time slices vs a static split.

N vLLM engines (a random tiny Llama built here, fp32, greedy, nothing
downloaded) each replay bursts of requests, staggered so that one tenant's
burst mostly falls in the others' quiet time. Two ways to share the device,
in the same run:

- static: the device split once and for all. On this CPU host the device is
  the cores: engine i runs on core i % cores only (process affinity and
  vLLM's OpenMP binding), so a burst never gets more than its share, however
  idle the others are. (The GPU analogue is an MPS or MIG partition.)
- slices: every engine may use every core, and aquad hands the whole device
  to one engine at a time (`worker_cls="aqua.vllm.AquaWorker"`): a waiting
  engine pages its KV cache out to leases, an idle one gives its turn back.

Figures: TTFT p50/p99 per tenant (from each request's arrival, so waiting
for a slice counts), output tokens per second over the whole replay, and
the ratio slices / static of each, which is the result: each mode is the
other's limit.

What a 2-core CPU can and cannot show: the compute split is real (cores),
but KV memory is not the constraint here (host RAM), so the static split
gives each engine the same KV cache as with slices; on a GPU the split would
also halve each engine's KV memory, which this cannot show. Paging is a copy
within host RAM (about a millisecond per MiB), far cheaper than any PCIe or
NVLink move; other work on the machine adds noise to both modes alike.

    python bench/vllm_slices.py [--tenants 2] [--bursts 3] [--period 4] [--burst-size 6]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ENGINE_MARK = "@bench-engine "


# --- one engine process -------------------------------------------------------


def build_model(path: str) -> None:
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    # Big enough that a burst's prefill is compute-bound and two cores help.
    config = LlamaConfig(vocab_size=1000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=4,
                         head_dim=64, max_position_embeddings=1024)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)


def engine(args: argparse.Namespace) -> None:
    """Replay this tenant's arrivals against its own engine; report per request."""
    import random  # noqa: PLC0415

    from vllm import LLM, SamplingParams  # noqa: PLC0415
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", block_size=32,
              max_model_len=512, num_gpu_blocks_override=256, enforce_eager=True,
              gpu_memory_utilization=0.1, seed=0,
              worker_cls="aqua.vllm.AquaWorker" if args.aqua else "auto")
    eng = llm.llm_engine
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    rng = random.Random(args.index)
    arrivals = []  # (offset_s, request id, prompt)
    for b in range(args.bursts):
        at = b * args.period + args.index * args.period / args.tenants
        for r in range(args.burst_size):
            prompt = [rng.randrange(1, 1000) for _ in range(args.prompt_len)]
            arrivals.append((at, f"{args.index}-{b}-{r}", prompt))
    # Warm up (first-step costs, the first turn) before the clock starts.
    llm.generate([TokensPrompt(prompt_token_ids=arrivals[0][2])], params, use_tqdm=False)
    print(ENGINE_MARK + json.dumps({"ready": os.getpid()}), flush=True)
    t0 = float(sys.stdin.readline())  # CLOCK_MONOTONIC is one clock for the host

    first: dict[str, float] = {}
    done: dict[str, float] = {}
    tokens = 0
    i = 0
    while i < len(arrivals) or eng.has_unfinished_requests():
        now = time.monotonic()
        while i < len(arrivals) and t0 + arrivals[i][0] <= now:
            _, rid, prompt = arrivals[i]
            eng.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
            i += 1
        if not eng.has_unfinished_requests():
            time.sleep(max(0.0, t0 + arrivals[i][0] - time.monotonic()))  # quiet time
            continue
        for out in eng.step():
            if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                first[out.request_id] = time.monotonic()
            if out.finished:
                done[out.request_id] = time.monotonic()
                tokens += len(out.outputs[0].token_ids)
    offsets = {rid: at for at, rid, _ in arrivals}
    result = {
        "ttft_s": [first[rid] - (t0 + offsets[rid]) for rid in offsets],
        "tokens": tokens,
        "end": max(done.values()),
        "stats": llm.collective_rpc("aqua_stats")[0] if args.aqua else {},
    }
    print(ENGINE_MARK + json.dumps(result), flush=True)


# --- the comparison -----------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def read_mark(proc: subprocess.Popen) -> dict:
    for line in proc.stdout:
        at = line.find(ENGINE_MARK)
        if at >= 0:
            return json.loads(line[at + len(ENGINE_MARK):])
    raise SystemExit(f"engine {proc.pid} exited with {proc.wait()}")


def run_mode(mode: str, args: argparse.Namespace, model: str, tmp: str) -> dict:
    sys.path.insert(0, os.path.dirname(__file__))
    from _common import aquad_process  # noqa: PLC0415

    cores = sorted(os.sched_getaffinity(0))
    with aquad_process(tmp, "--host-devices", "2x256MiB", "--quantum-ms",
                       str(args.quantum_ms), "--grace-ms", "5000",
                       name=f"{mode}.sock") as daemon:
        procs = []
        for i in range(args.tenants):
            mine = [cores[i % len(cores)]] if mode == "static" else cores
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                   "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine)),
                   # An engine waiting for its slice must not spin on the cores.
                   "OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0",
                   "AQUA_SOCKET": daemon.socket, "AQUA_TENANT": f"vllm-{i}"}
            cmd = [sys.executable, __file__, "--engine", "--model", model, "--index", str(i),
                   *sys.argv[1:]]
            if mode == "slices":
                cmd.append("--aqua")
            procs.append(subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, env=env, preexec_fn=lambda mine=mine: os.sched_setaffinity(0, mine)))
        for p in procs:
            read_mark(p)
        t0 = time.monotonic() + 0.5
        for p in procs:
            p.stdin.write(f"{t0}\n")
            p.stdin.flush()
        results = [read_mark(p) for p in procs]
        for p in procs:
            p.stdin.close()
            p.wait()
    end = max(r["end"] for r in results)
    return {
        "ttft_p50_ms": [percentile(r["ttft_s"], 0.50) * 1e3 for r in results],
        "ttft_p99_ms": [percentile(r["ttft_s"], 0.99) * 1e3 for r in results],
        "tokens_per_s": sum(r["tokens"] for r in results) / (end - t0),
        "stats": [r["stats"] for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tenants", type=int, default=2)
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--burst-size", type=int, default=6)
    ap.add_argument("--period", type=float, default=4.0, help="seconds between a tenant's bursts")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--quantum-ms", type=int, default=100)
    ap.add_argument("--json")
    ap.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--aqua", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        engine(args)
        return

    with tempfile.TemporaryDirectory(prefix="aqua-vllm-bench-") as tmp:
        model = os.path.join(tmp, "tiny-llama")
        build_model(model)
        load = os.getloadavg()[0]
        figures = {mode: run_mode(mode, args, model, tmp) for mode in ("static", "slices")}
        figures["loadavg_1m"] = [load, os.getloadavg()[0]]

    st, sl = figures["static"], figures["slices"]
    print(f"{args.tenants} vLLM tenants, {args.bursts} bursts x {args.burst_size} requests "
          f"each ({args.prompt_len} prompt + {args.max_tokens} output tokens), "
          f"quantum {args.quantum_ms} ms, {len(os.sched_getaffinity(0))} cores, load average "
          f"{figures['loadavg_1m'][0]:.1f} -> {figures['loadavg_1m'][1]:.1f}")
    print(f"{'':24}{'static split':>14}{'aqua slices':>14}{'ratio':>8}")
    for i in range(args.tenants):
        for key, label in (("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms")):
            a, b = st[key][i], sl[key][i]
            print(f"{f'tenant {i} {label}':24}{a:14.1f}{b:14.1f}{b / a:8.2f}")
    a, b = st["tokens_per_s"], sl["tokens_per_s"]
    print(f"{'throughput tok/s':24}{a:14.1f}{b:14.1f}{b / a:8.2f}")
    for i, s in enumerate(sl["stats"]):
        print(f"tenant {i} slices: {s.get('turns')} turns, {s.get('yields')} yields, "
              f"{s.get('waits')} waits ({s.get('wait_s', 0):.2f} s), "
              f"{s.get('revocations')} revocations, {s.get('bytes_out', 0) >> 20} MiB paged out")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **figures}, f, indent=2)


if __name__ == "__main__":
    main()
