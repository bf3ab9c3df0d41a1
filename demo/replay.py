"""Replay a bursty workload against real tenant processes, baseline vs aqua.

One run starts a private aquad, then one process per tenant (each a small
Llama of its own size, seeded random weights, nothing downloaded), replays
the arrivals in real time and collects every request's token times. The two
modes share the engine code path:

- ``baseline``: vLLM's scheduling (PromptScheduler's fcfs: admission on prompt
  blocks, newest-first preemption by recompute when blocks run out), and
  tenants run side by side as the OS schedules them;
- ``aqua``: fair prompt-level time sharing, preempted KV caches paged into
  leases, and tenants take GPU turns from aquad (respond() every step).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .elastic import aquad_for_tenants, spawn, tell
from .scrape import free_port, scrape
from .stats import cost_sums, jain, service_summary, token_rate
from .trace import read_trace

MODEL_SIZES = {
    # name: (hidden, layers, heads, kv heads); decode costs ~1-6 ms on a CPU core
    "small": (64, 2, 4, 2),
    "medium": (128, 4, 4, 2),
    "large": (192, 6, 6, 2),
}
VOCAB = 1024


@dataclass
class ReplayArrival:
    t: float  # seconds after the start
    prompt_len: int
    max_new: int


@dataclass
class ReplayTenant:
    name: str
    size: str
    arrivals: list[ReplayArrival]
    kv_budget: int  # tokens of KV cache the tenant may keep resident
    slice_tokens: int = 5


SPREAD_S = 4.0  # the synthetic workload's arrivals spread over this long
MAX_PROMPT = 96  # tokens: the longest prompt of either workload


def bursty(n: int, burst: int, seed: int, *, max_new: int) -> list[ReplayArrival]:
    """`n - burst` requests spread over SPREAD_S seconds, plus `burst`
    requests arriving together a third of the way in."""
    rng = random.Random(seed)
    times = sorted(rng.uniform(0, SPREAD_S) for _ in range(n - burst))
    times += [SPREAD_S / 3 + rng.uniform(0, 0.02) for _ in range(burst)]
    return sorted((ReplayArrival(t, rng.randint(16, MAX_PROMPT), max_new) for t in times),
                  key=lambda a: a.t)


def _tenants(arrivals: list[list[ReplayArrival]], max_new: int,
             concurrency: int) -> list[ReplayTenant]:
    """One tenant per model size, whose KV budget holds about `concurrency`
    requests at their largest."""
    return [ReplayTenant(f"llama-{size}", size, each, concurrency * (MAX_PROMPT + max_new))
            for size, each in zip(MODEL_SIZES, arrivals)]


def default_tenants(requests: int = 26, burst: int = 18, seed: int = 0, *,
                    max_new: int = 40, concurrency: int = 3) -> list[ReplayTenant]:
    """The demo's workload: each tenant has `requests` requests of which
    `burst` arrive together."""
    return _tenants([bursty(requests, burst, seed + i, max_new=max_new)
                     for i in range(len(MODEL_SIZES))], max_new, concurrency)


def trace_tenants(path: str, requests: int, *, time_scale: float, seed: int = 0,
                  max_new: int = 32, concurrency: int = 3) -> list[ReplayTenant]:
    """Tenants replaying a real trace: consecutive requests dealt round-robin
    to the tenants, arrival times divided by `time_scale`, prompt lengths
    /10 and output lengths /8 (clamped to what the small models serve)."""
    n = len(MODEL_SIZES)
    arrivals: list[list[ReplayArrival]] = [[] for _ in range(n)]
    for i, (t, context, generated) in enumerate(read_trace(path, requests * n)):
        prompt = min(MAX_PROMPT, max(4, context // 10))
        new = min(max_new, max(1, generated // 8))
        arrivals[i % n].append(ReplayArrival(t / time_scale, prompt, new))
    return _tenants(arrivals, max_new, concurrency)


def build_model(size: str, seed: int):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    hidden, layers, heads, kv = MODEL_SIZES[size]
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=1024, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def tenant_main(job: dict) -> int:
    """One tenant process: replay its arrivals, print one JSON line of results."""
    import torch  # noqa: PLC0415

    import aqua  # noqa: PLC0415
    from aqua.engine import Engine, PromptScheduler  # noqa: PLC0415
    from aqua.engine.runner import StepTimes  # noqa: PLC0415

    spec = ReplayTenant(**{**job["tenant"], "arrivals": [ReplayArrival(**a) for a in
                                                      job["tenant"]["arrivals"]]})
    mode = job["mode"]
    torch.set_num_threads(1)
    model = build_model(spec.size, job["seed"])
    rng = random.Random(job["seed"] + 1)
    client = aqua.connect(spec.name, job["device"]) if mode == "aqua" else None
    policy = "fair" if mode == "aqua" else "fcfs"
    engine = Engine(model, PromptScheduler(policy, spec.kv_budget, spec.slice_tokens), client)
    engine.times = StepTimes()  # what the steps cost here (the simulator is held to it)
    pending = list(spec.arrivals)
    submitted = []

    def admit() -> None:
        now = time.monotonic()
        while pending and start + pending[0].t <= now:
            a = pending.pop(0)
            prompt = [rng.randrange(VOCAB) for _ in range(a.prompt_len)]
            submitted.append(engine.submit(prompt, a.max_new, arrival=start + a.t))

    print("ready", flush=True)
    # The start comes once every tenant is ready: a fixed start set before
    # the imports would be missed on a loaded machine, and every TTFT would
    # carry the lag (CLOCK_MONOTONIC is one clock for all processes).
    start = float(sys.stdin.readline())
    while time.monotonic() < start:
        time.sleep(0.001)
    with client.turn() if client is not None else contextlib.nullcontext():
        while pending or engine.scheduler.pending:
            admit()
            if client is not None:
                client.respond()
            if not engine.step():
                if pending:
                    time.sleep(max(0.0, min(0.005, start + pending[0].t - time.monotonic())))
    paged = engine.bytes_paged
    engine.close()
    if client is not None:
        client.close()
    print(json.dumps({
        "tenant": spec.name, "size": spec.size, "bytes_paged": paged,
        "requests": [{"arrival": r.arrival, "times": r.token_times,
                      "preemptions": r.preemptions} for r in submitted],
        "forwards": engine.times.forwards, "steps": engine.times.steps,
    }), flush=True)
    return 0


def run_mode(mode: str, tenants: list[ReplayTenant], *, seed: int,
             progress: bool = False, daemon_figures: dict | None = None) -> list[dict]:
    """Run one mode end to end; returns each tenant's result document.
    `daemon_figures`: filled with aquad's own figures, scraped from its
    metrics endpoint once the tenants are done."""
    metrics = [] if daemon_figures is None else ["--metrics", f"127.0.0.1:{free_port()}"]
    # The CPU models page host tensors: the host backend even on a GPU host.
    with aquad_for_tenants("aqua-replay-", "--host-devices", f"{max(2, len(tenants))}x512MiB",
                           "--quantum-ms", "20", "--log-level", "warning",
                           *metrics) as (_, env, procs):
        for i, spec in enumerate(tenants):
            procs.append(spawn("replay", {"mode": mode, "seed": seed + i, "device": i,
                                          "tenant": asdict(spec)}, env))
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {mode} tenant failed to start")
        start = time.monotonic() + 0.2  # all are ready: their imports are done
        for proc in procs:
            tell(proc, repr(start))
        expected = max(a.t for spec in tenants for a in spec.arrivals) + 2.0
        outputs = read_all(procs, lambda: _progress(mode, procs, start, expected)
                           if progress else None)
        results = []
        for proc, out in zip(procs, outputs):
            if proc.returncode != 0:
                raise RuntimeError(f"a {mode} tenant exited {proc.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        if daemon_figures is not None:
            url = f"http://{metrics[1]}/metrics"
            daemon_figures.update(url=url, figures=scrape(url, since=time.time()))
        return results


def read_all(procs: list[subprocess.Popen], meanwhile: Callable[[], None],
             timeout: float = 600) -> list[str]:
    """Each process's output to its end, read while they run, with
    `meanwhile()` called in the meantime (the progress bar, which waits for
    them to exit). Read as they run because a tenant's result line (its
    step times) outgrows a pipe's buffer: a tenant blocked writing it never
    exits, and a wait for its exit would never end."""
    with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
        outputs = [pool.submit(proc.communicate, timeout=timeout) for proc in procs]
        meanwhile()
        return [output.result()[0] for output in outputs]


def _progress(mode: str, procs: list[subprocess.Popen], start: float, expected: float) -> None:
    """A progress bar on stderr while the tenants replay (lines when not a tty)."""
    tty = sys.stderr.isatty()
    last_line = -10.0
    while any(p.poll() is None for p in procs):
        elapsed = max(0.0, time.monotonic() - start)
        done = sum(p.poll() is not None for p in procs)
        frac = min(1.0, elapsed / expected)
        bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
        text = (f"   {mode:8} [{bar}] {elapsed:5.1f}s  tenants done {done}/{len(procs)}")
        if tty:
            print("\r" + text, end="", file=sys.stderr, flush=True)
        elif elapsed - last_line >= 5:
            print(text, file=sys.stderr, flush=True)
            last_line = elapsed
        time.sleep(0.25)
    if tty:
        print(file=sys.stderr)


def compare(tenants: list[ReplayTenant], *, seed: int = 0, progress: bool = False,
            metrics: bool = False) -> dict:
    """Both modes on the same workload: {"baseline": ..., "aqua": ..., "wall_s"};
    with `metrics`, aqua's summary has aquad's own figures ("daemon")."""
    t0 = time.monotonic()
    out = {}
    for mode in ("baseline", "aqua"):
        # Baseline tenants never talk to aquad: only aqua's figures say anything.
        figures: dict | None = {} if metrics and mode == "aqua" else None
        out[mode] = summarize(run_mode(mode, tenants, seed=seed, progress=progress,
                                       daemon_figures=figures))
        if figures:
            out[mode]["daemon"] = figures
    out["wall_s"] = time.monotonic() - t0
    return out


def summarize(results: list[dict]) -> dict:
    reqs = [r for doc in results for r in doc["requests"]]
    # Fairness between tenants: each tenant's mean prompt rate.
    per_tenant = [sum(token_rate(r["arrival"], r["times"]) for r in doc["requests"])
                  / max(1, len(doc["requests"])) for doc in results]
    return {
        "requests": len(reqs),
        "completed": sum(1 for r in reqs if r["times"]),
        **service_summary((r["arrival"], r["times"]) for r in reqs),
        "jain_tenants": jain(per_tenant),
        "bytes_paged": sum(doc["bytes_paged"] for doc in results),
        # Each tenant's first-token times in its arrivals' order (None: no
        # token): which tenant makes a tail, and which request, for a
        # request-by-request comparison with the simulator. (Files written
        # before 2026-12-02 have them sorted, as "ttft_by_tenant_s".)
        "ttft_in_arrival_order_s": {doc["tenant"]: [r["times"][0] - r["arrival"]
                                                    if r["times"] else None
                                                    for r in doc["requests"]]
                                    for doc in results},
        "preemptions": sum(r["preemptions"] for r in reqs),
        "cost_sums": cost_sums(results),
    }
