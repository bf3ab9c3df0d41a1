"""Runs real vLLM engines for tests/test_vllm_offload.py, in a process of
their own (vLLM binds threads and sets up process-wide state; the test
process stays clean). The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so its scheduler can be read.

    python tests/vllm_offload_driver.py SCENARIO MODEL SOCKET

prints `RESULT {json}` lines; the `killed` scenario waits for a line on
stdin between its phases (the test kills aquad there). `multiprocess` runs
vLLM's default process layout instead (as `vllm serve` does): the engine
core and its worker in processes of their own, so the worker maps the
leases from their handles.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.vllm_support import (  # noqa: E402
    ScheduledTokens,
    aqua_offload,
    generate,
    llm_kwargs,
    metric,
    prompts,
)

SMALL = 16  # KV blocks: 8 requests of 40 + 150 tokens need 48, so they preempt
LARGE = 64  # room for all of them: no preemption
MAX_TOKENS = 150
PROMPTS = prompts(8, 40)
OTHER = prompts(8, 40, seed=1)
LEASE_BYTES = "8MiB"
LEASE_CHUNK = "1MiB"  # several leases, taken as the tier fills


def say(**doc) -> None:
    print("RESULT " + json.dumps(doc), flush=True)


def offload_figures(llm) -> dict:
    return {"loaded": metric(llm, "vllm:kv_offload_load_bytes"),
            "stored": metric(llm, "vllm:kv_offload_store_bytes"),
            "host_lease_bytes": metric(llm, "vllm:aqua_lease_bytes", tier="host"),
            "up": metric(llm, "vllm:aqua_offload_up"),
            "preemptions": metric(llm, "vllm:num_preemptions")}


def tier_of(llm):
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    return connector.connector_scheduler.manager.tier


def aqua_llm(model: str, socket: str, *, short_name: bool = False, **extra):
    from vllm import LLM  # noqa: PLC0415

    return LLM(**llm_kwargs(model, SMALL, kv_transfer_config=aqua_offload(
        socket, LEASE_BYTES, short_name=short_name, aqua_lease_chunk_bytes=LEASE_CHUNK,
        aqua_tenant="vllm-test"), **extra))


def reuse_run(llm) -> dict:
    """PROMPTS under preemption, then again after reset_prefix_cache()
    (the GPU prefix cache is dropped, an offload tier is not)."""
    counted = ScheduledTokens(llm)
    tokens = generate(llm, PROMPTS, MAX_TOKENS)
    first = {"tokens": tokens, "computed": counted.total, **offload_figures(llm)}
    llm.reset_prefix_cache()
    before = counted.total
    again = generate(llm, PROMPTS, MAX_TOKENS)
    return {"first": first, "again": {"tokens": again, "computed": counted.total - before,
                                      **offload_figures(llm)}}


def stock(model: str, socket: str) -> None:
    """The reference without preemption, and stock vLLM with preemption.
    (An engine with a KV connector gets a process of its own: vLLM keeps
    the connector of an engine in process-wide state.)"""
    from vllm import LLM  # noqa: PLC0415

    ref = LLM(**llm_kwargs(model, LARGE))
    say(phase="reference", tokens=generate(ref, PROMPTS, MAX_TOKENS),
        other=generate(ref, OTHER, MAX_TOKENS), preemptions=metric(ref, "vllm:num_preemptions"))
    del ref
    say(phase="stock", **reuse_run(LLM(**llm_kwargs(model, SMALL))))


def aqua(model: str, socket: str) -> None:
    llm = aqua_llm(model, socket)
    say(phase="aqua", leases_before=len(tier_of(llm).leases), **reuse_run(llm),
        leases=len(tier_of(llm).leases))


def killed(model: str, socket: str) -> None:
    """aqua (by the plugin's short name), then aquad killed (by the test)
    while the engine runs on."""
    llm = aqua_llm(model, socket, short_name=True)
    tokens = generate(llm, OTHER, MAX_TOKENS)
    say(phase="stored", tokens=tokens, **offload_figures(llm))
    sys.stdin.readline()  # the test kills aquad here
    tier = tier_of(llm)
    # Served at once, whether or not the tier has noticed yet: a lease
    # whose daemon died stays mapped here, so a reload is still exact.
    during = generate(llm, PROMPTS, MAX_TOKENS)
    deadline = time.monotonic() + 15
    while tier.up and time.monotonic() < deadline:  # the heartbeat notices
        time.sleep(0.05)
    noticed = not tier.up
    before = offload_figures(llm)
    llm.reset_prefix_cache()
    after = generate(llm, PROMPTS, MAX_TOKENS)
    say(phase="after", during=during, after=after, noticed=noticed, before=before,
        **offload_figures(llm))


def no_aquad(model: str, socket: str) -> None:
    llm = aqua_llm(model, socket)
    say(phase="served", tokens=generate(llm, PROMPTS, MAX_TOKENS), **offload_figures(llm))


def multiprocess(model: str, socket: str) -> None:
    llm = aqua_llm(model, socket)
    say(phase="served", tokens=generate(llm, PROMPTS, MAX_TOKENS), **offload_figures(llm))


def slices(model: str, socket: str) -> None:
    """The offload tier and AquaWorker together, the worker in this (the
    engine core's) process: its turns show in vLLM's own metrics."""
    os.environ["AQUA_SOCKET"] = socket
    os.environ["AQUA_TENANT"] = "vllm-slices"
    llm = aqua_llm(model, socket, worker_cls="aqua.vllm.AquaWorker")
    tokens = generate(llm, PROMPTS, MAX_TOKENS)
    turns = llm.collective_rpc("aqua_stats")[0]
    say(phase="served", tokens=tokens, turns=turns,
        slice_turns=metric(llm, "vllm:aqua_slice_turns"),
        slice_wait_s=metric(llm, "vllm:aqua_slice_wait_seconds"),
        slice_yields=metric(llm, "vllm:aqua_slice_yields"), **offload_figures(llm))


def main() -> None:
    scenario, model, socket = sys.argv[1:4]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if scenario == "multiprocess" else "0"
    {"stock": stock, "aqua": aqua, "killed": killed, "no_aquad": no_aquad,
     "multiprocess": multiprocess, "slices": slices}[scenario](model, socket)


if __name__ == "__main__":
    main()
