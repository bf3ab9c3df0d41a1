#!/usr/bin/env python3
"""The paper-style comparison, simulated: 8 GPUs, NVLink vs PCIe, one command.

    python bench/paper_sim.py                      # H100 x8, bursts, 10,000 requests
    python bench/paper_sim.py --gpu a100-sxm       # the paper's first version
    python bench/paper_sim.py --workload trace --time-scale 4
    python bench/paper_sim.py --json sim.json --plot sim.png
    python bench/paper_sim.py --policies aqua --reclaim-at 90 --reclaim-gib 40

Policies (sim/simulator.py): fcfs (admission control, no preemption),
host_swap (fair time sharing, paging to host DRAM over PCIe), aqua (the same,
paging into producer GPUs' spare HBM over NVLink first), recompute (the same,
dropping and recomputing). The decisions are aquad's own Arbiter, Scheduler,
placer and allocators and the engine's PromptScheduler, in virtual time.

--reclaim-at T adds a lender's load step (sim/reclaim.py): at T a producer
GPU's own model reclaims its spare memory (--reclaim-gib, default all of
it) with a deadline; aqua runs again with it and a table says what the
reclaim cost the borrowers against the run without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from aqua_demo.trace import read_trace  # noqa: E402
from aqua_sim import GPUS, MODELS, POLICIES, ServerSpec, load_server  # noqa: E402
from aqua_sim.long_prompt import long_prompt  # noqa: E402
from aqua_sim.reclaim import LoadStep, reclaim_cost, reclaim_table  # noqa: E402
from aqua_sim.report import long_prompt_table, plot, table  # noqa: E402
from aqua_sim.scenarios import paper_scenario  # noqa: E402
from aqua_sim.simulator import Simulation  # noqa: E402

TRACES = os.path.join(HERE, "traces")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100-sxm")
    ap.add_argument("--topology", metavar="FILE", help="server TOML (overrides --gpu)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--workload", choices=("burst", "trace"), default="burst")
    ap.add_argument("--trace", choices=("conv", "code"), default="conv",
                    help="Azure 2023 trace: arrivals (trace) or lengths (burst)")
    ap.add_argument("--time-scale", type=float, default=4.0,
                    help="trace: divide arrival times by this")
    ap.add_argument("--rate", type=float, default=12.0, help="burst: background req/s")
    ap.add_argument("--burst-size", type=int, default=200)
    ap.add_argument("--burst-every", type=float, default=60.0, help="seconds")
    ap.add_argument("--lengths", metavar="PROMPT,OUTPUT",
                    help="burst: fixed request lengths instead of the trace's")
    ap.add_argument("--consumers", type=int, default=4, help="GPUs serving the LLM")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama-2-13b")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--slice", type=int, default=5, help="decode steps per CFS slice")
    ap.add_argument("--max-overhead", default="0.02",
                    help="paging time cap as a fraction of compute, or 'none'")
    ap.add_argument("--incremental", choices=("host", "all", "none"), default="all",
                    help="which leases a resumed request keeps, so its next page-out "
                         "copies only new blocks")
    ap.add_argument("--reclaim-at", type=float, metavar="T",
                    help="a producer GPU's own model takes its spare memory back at T s "
                         "(aqua policy; the run is repeated with it)")
    ap.add_argument("--reclaim-gib", type=float, metavar="N",
                    help="GiB it takes back (default: all it lends)")
    ap.add_argument("--reclaim-gpu", type=int, metavar="G",
                    help="the producer GPU (default: the one lending most at T)")
    ap.add_argument("--reclaim-deadline", type=float, default=2.0, metavar="S",
                    help="seconds the borrowers have to move (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--plot", metavar="FILE.png")
    args = ap.parse_args(argv)

    policies = tuple(p for p in args.policies.split(",") if p)
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        ap.error(f"unknown policies {bad}; known: {', '.join(POLICIES)}")
    max_overhead = None if args.max_overhead == "none" else float(args.max_overhead)
    step = None
    if args.reclaim_at is not None:
        if "aqua" not in policies:
            ap.error("--reclaim-at needs the aqua policy (the others lease no GPU memory)")
        try:
            step = LoadStep(args.reclaim_at, None if args.reclaim_gib is None
                            else int(args.reclaim_gib * 2**30), args.reclaim_gpu,
                            args.reclaim_deadline)
        except ValueError as exc:
            ap.error(str(exc))
    server = load_server(args.topology) if args.topology else ServerSpec(GPUS[args.gpu])
    rows = read_trace(os.path.join(TRACES, f"azure-llm-2023-{args.trace}.csv"))
    if args.workload == "trace":
        scenario = paper_scenario(server, rows, requests=args.requests,
                                  consumers=args.consumers, model=args.model,
                                  time_scale=args.time_scale)
        load = f"Azure {args.trace} trace, arrivals / {args.time_scale:g}"
    else:
        lengths = f"lengths from the Azure {args.trace} trace"
        if args.lengths:
            try:
                prompt, output = (int(x) for x in args.lengths.split(","))
            except ValueError:
                ap.error("--lengths takes PROMPT,OUTPUT token counts, e.g. 256,512")
            rows = [(0.0, prompt, output)]
            lengths = f"{prompt}-token prompts, {output}-token outputs"
        scenario = paper_scenario(server, rows, requests=args.requests,
                                  consumers=args.consumers, model=args.model,
                                  burst=(args.rate, args.burst_size, args.burst_every),
                                  seed=args.seed)
        load = (f"{args.rate:g} req/s + bursts of {args.burst_size} every "
                f"{args.burst_every:g} s, {lengths}")
    from dataclasses import replace  # noqa: PLC0415

    scenario = replace(scenario, slice_tokens=args.slice, max_overhead=max_overhead,
                       incremental=args.incremental)
    if step is not None and step.gpu is not None and step.gpu not in scenario.spare:
        ap.error(f"--reclaim-gpu {step.gpu} lends nothing; producer GPUs: "
                 f"{sorted(scenario.spare)}")

    print("$ python bench/paper_sim.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    spare = sorted(set(scenario.spare.values()))
    print(f"server: {server.gpus} x {server.gpu.name}, NVLink {server.nvlink / 1e9:.0f} GB/s, "
          f"PCIe {server.pcie / 1e9:.0f} GB/s (achieved, per direction); "
          f"host pool {server.host_pool_bytes / 2**30:.0f} GiB")
    consumers = [t.gpu for t in scenario.tenants]
    print(f"tenants: {args.model} on GPUs {consumers}; GPUs {sorted(scenario.spare)} lend "
          f"{[round(s / 1e9) for s in spare]} GB spare each; {args.requests} requests: {load}")
    t0 = time.perf_counter()
    results, sims = {}, {}
    for policy in policies:
        sims[policy] = Simulation(scenario, policy)
        results[policy] = sims[policy].run()
        r = results[policy]
        print(f"  {policy}: simulated {r['makespan_s']:.0f} s in {r['wall_s']:.1f} s",
              file=sys.stderr)
    wall = time.perf_counter() - t0
    print()
    print(table(results))
    if "fcfs" in results:
        for p in ("host_swap", "aqua", "recompute"):
            if p in results and results[p]["ttft_p99_s"]:
                gain = results["fcfs"]["ttft_p99_s"] / results[p]["ttft_p99_s"]
                print(f"TTFT p99: {p} {gain:.1f}x "
                      f"better than fcfs", end="; ")
        print()
    if "host_swap" in results and "aqua" in results:
        h, a = results["host_swap"], results["aqua"]
        print(f"paging stall: host_swap {h['paging_stall_s']:.1f} s, "
              f"aqua {a['paging_stall_s']:.1f} s"
              + (f" ({h['paging_stall_s'] / a['paging_stall_s']:.1f}x less)"
                 if a["paging_stall_s"] else ""))
    reclaim = None
    if step is not None:
        reclaim = reclaim_cost(scenario, step, plain=sims["aqua"])
        print()
        print(reclaim_table(reclaim["cost"]))
    lp = long_prompt(server)
    print()
    print(long_prompt_table(lp))
    print(f"\n{len(policies)} policies x {args.requests} requests on {server.gpus} GPUs "
          f"in {wall:.1f} s wall")

    if args.json:
        doc = {p: {k: v for k, v in r.items() if k not in ("ttft_s", "tbt_s")}
               for p, r in results.items()}
        doc["wall_s"] = wall
        doc["long_prompt"] = lp
        if reclaim is not None:
            doc["reclaim"] = reclaim["cost"]
            doc["aqua_with_reclaim"] = {k: v for k, v in reclaim["with"].items()
                                        if k not in ("ttft_s", "tbt_s")}
        doc["setup"] = {"argv": argv if argv is not None else sys.argv[1:],
                        "gpu": server.gpu.name, "gpus": server.gpus, "load": load}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=lambda v: None if isinstance(v, float)
                      and math.isnan(v) else v)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, f"{server.gpus} x {server.gpu.name}, {args.model}: {load}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
