"""Runs a request schedule on one real vLLM engine, stock or with
aqua.vllm.FairScheduler, and prints one RESULT line of JSON (per-request
token timings and tokens, engine counters). Used by tests/test_vllm_fair.py
and bench/vllm_fair.py, one process per engine.

    python tests/vllm_fair_driver.py SPEC_JSON

SPEC: {"variant": "stock"|"fair"|"stock-aqua"|"stock-cpu-offload", "model", "socket",
"blocks", "max_seqs", "max_len", "requests": [{"prompt": [ids], "max_tokens",
"tenant", "at_s" | "at_step"}], "fair": {...aqua_fair settings}, "repeats",
"lease_bytes", "warmup", "more": [[further requests]], "step_log": bool,
"profile": FILE}. `step_log` adds per step who ran, who was admitted,
resumed or preempted and the slice each admission got; `profile` writes
cProfile statistics of the first measured run to FILE. Requests arrive at
`at_s` seconds after the start or once `at_step` engine steps have run;
the engine steps in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the
scheduler's counters can be read.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.vllm_support import ScheduledTokens, aqua_offload, llm_kwargs, metric  # noqa: E402


def make_engine(spec: dict):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM  # noqa: PLC0415

    extra: dict = {}
    variant = spec["variant"]
    if variant == "fair":
        extra["kv_transfer_config"] = aqua_offload(
            spec["socket"], spec.get("lease_bytes", "256MiB"), aqua_lease_chunk_bytes="16MiB")
        extra["scheduler_cls"] = "aqua.vllm.FairScheduler"
        extra["additional_config"] = {"aqua_fair": spec.get("fair", {})}
    elif variant == "stock-aqua":
        # stock scheduler over the aqua tier: the connector's cost apart from the policy's
        extra["kv_transfer_config"] = aqua_offload(
            spec["socket"], spec.get("lease_bytes", "256MiB"), aqua_lease_chunk_bytes="16MiB")
    elif variant == "stock-cpu-offload":
        # vLLM's own CPU offloading, the same budget as the aqua tier
        extra["kv_transfer_config"] = {
            "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": 256 << 20}}
    elif variant != "stock":
        raise SystemExit(f"unknown variant {variant!r}")
    return LLM(**llm_kwargs(spec["model"], spec["blocks"], max_len=spec.get("max_len", 512),
                            max_seqs=spec.get("max_seqs", 16), **extra))


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


class StepLog:
    """Per engine step: the seconds the step took, the requests that ran,
    were admitted (with the slice FairScheduler gave them), resumed or
    preempted (by the policy or by stock vLLM for room). Wraps the
    scheduler's schedule() like ScheduledTokens does."""

    def __init__(self, llm) -> None:
        scheduler = scheduler_of(llm)
        self.rows: list[dict] = []
        schedule = scheduler.schedule

        def logged(*args, **kwargs):
            fair_before = getattr(scheduler, "fair_preemptions", 0)
            out = schedule(*args, **kwargs)
            new = [r.req_id for r in out.scheduled_new_reqs]
            resumed = sorted(out.scheduled_cached_reqs.resumed_req_ids)
            slices = {}
            if hasattr(scheduler, "slice_steps"):
                slices = {i: scheduler.slice_steps(scheduler.requests[i]) for i in new + resumed}
            self.rows.append({
                "t": time.perf_counter(), "cpu": time.process_time(),
                "ran": sorted(out.num_scheduled_tokens),
                "tokens": out.total_num_scheduled_tokens, "new": new, "resumed": resumed,
                "preempted": sorted(out.preempted_req_ids or ()), "slices": slices,
                "fair_preempted": getattr(scheduler, "fair_preemptions", 0) - fair_before,
                "vtc": dict(getattr(scheduler, "vtc", {}))})
            return out

        scheduler.schedule = logged

    def take(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


def run_once(llm, requests: list[dict], counted: ScheduledTokens,
             steps: StepLog | None = None) -> dict:
    from vllm import SamplingParams  # noqa: PLC0415
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    engine = llm.llm_engine
    scheduler = scheduler_of(llm)
    llm.reset_prefix_cache(reset_connector=True)
    base_loaded = metric(llm, "vllm:kv_offload_load_bytes")
    base_preempt = metric(llm, "vllm:num_preemptions")
    base_computed = counted.total
    base_fair = getattr(scheduler, "fair_preemptions", 0)
    base_deferred = getattr(scheduler, "deferred_preemptions", 0)
    if steps is not None:
        steps.take()
    if hasattr(scheduler, "max_backlogged_gap"):
        scheduler.max_backlogged_gap = 0.0  # per run
    pending = sorted(range(len(requests)),
                     key=lambda i: (requests[i].get("at_step", 0), requests[i].get("at_s", 0.0)))
    arrived: dict[int, float] = {}
    arrived_step: dict[int, int] = {}
    times: dict[int, list[float]] = {}
    steps_at: dict[int, list[int]] = {}
    tokens: dict[int, list[int]] = {}
    done: set[int] = set()
    start = time.perf_counter()
    step = 0
    while len(done) < len(requests):
        now = time.perf_counter() - start
        while pending and (requests[pending[0]].get("at_step", 0) <= step
                           and requests[pending[0]].get("at_s", 0.0) <= now):
            i = pending.pop(0)
            r = requests[i]
            extra = {"aqua_tenant": r["tenant"]} if r.get("tenant") else None
            params = SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True,
                                    extra_args=extra)
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=r["prompt"]), params)
            # a trace's request arrived at its time, even if a long step
            # kept the loop from adding it then
            arrived[i] = r["at_s"] if "at_s" in r else time.perf_counter() - start
            arrived_step[i] = step
            times[i], steps_at[i] = [], []
        if not engine.has_unfinished_requests():
            # idle until the next arrival (a trace has gaps)
            wait = requests[pending[0]].get("at_s", 0.0) - (time.perf_counter() - start)
            if wait > 0:
                time.sleep(wait)
            continue
        outs = engine.step()
        step += 1
        stamp = time.perf_counter() - start
        for out in outs:
            i = int(out.request_id)
            ids = list(out.outputs[0].token_ids)
            for _ in range(len(ids) - len(times[i])):
                times[i].append(stamp)
                steps_at[i].append(step)
            tokens[i] = ids
            if out.finished:
                done.add(i)
    wall = time.perf_counter() - start
    step_rows = steps.take() if steps is not None else None
    for row in step_rows or ():
        row["t"] -= start
    return {
        "wall_s": wall, "steps": step,
        "requests": [{"arrived_s": arrived[i], "arrived_step": arrived_step[i],
                      "times": times[i], "steps": steps_at[i], "tokens": tokens[i],
                      "tenant": requests[i].get("tenant", "")}
                     for i in range(len(requests))],
        "computed": counted.total - base_computed,
        "loaded_bytes": metric(llm, "vllm:kv_offload_load_bytes") - base_loaded,
        "preemptions": metric(llm, "vllm:num_preemptions") - base_preempt,
        "fair_preemptions": getattr(scheduler, "fair_preemptions", 0) - base_fair,
        "deferred_preemptions": getattr(scheduler, "deferred_preemptions", 0) - base_deferred,
        "kv_usage_after": scheduler.kv_cache_manager.usage,
        "unfinished_after": scheduler.get_num_unfinished_requests(),
        "max_backlogged_gap": getattr(scheduler, "max_backlogged_gap", None),
        "gap_bound": scheduler.service_gap_bound() if hasattr(scheduler, "service_gap_bound")
        else None,
        "scheduler": type(scheduler).__name__,
        "step_log": step_rows,
    }


def main() -> int:
    spec = json.loads(sys.argv[1])
    llm = make_engine(spec)
    counted = ScheduledTokens(llm)
    steps = StepLog(llm) if spec.get("step_log") else None
    if spec.get("warmup", True):
        run_once(llm, spec["requests"], counted)  # oneDNN builds kernels on first shapes
    reps = []
    for rep in range(spec.get("repeats", 1)):
        if rep == 0 and spec.get("profile"):
            import cProfile  # noqa: PLC0415

            profiler = cProfile.Profile()
            reps.append(profiler.runcall(run_once, llm, spec["requests"], counted, steps))
            profiler.dump_stats(spec["profile"])
        else:
            reps.append(run_once(llm, spec["requests"], counted, steps))
    # further schedules on the same engine, once each (tests share engines)
    more = [run_once(llm, requests, counted, steps) for requests in spec.get("more", [])]
    print("RESULT " + json.dumps({"variant": spec["variant"], "reps": reps, "more": more}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
