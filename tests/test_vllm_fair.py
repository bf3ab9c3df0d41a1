"""aqua.vllm.FairScheduler on real vLLM engines (tiny random fp32 Llama,
greedy, token-id prompts), each in a driver process (tests/vllm_fair_driver.py)
against a real aquad on the host backend. Comparisons are in engine steps,
not seconds: the machine is shared.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import Daemon

if os.environ.get("CI") != "true":  # in CI these run, never skip
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs the "
                                       "CPU build where there is no GPU)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "vllm_fair_driver.py")
LONG, LONG_OUT, LATE_AT = 8, 96, 20  # long requests, their output, the late one's step
FAIR = {"min_slice_steps": 8, "max_slice_steps": 16}
QUIET_AT = 36  # the quiet schedule's newcomer arrives 4 tokens before the others finish


def burst() -> list[dict]:
    """Eight long requests on a KV cache room for three, and a short one
    arriving once 20 steps have run."""
    rng = random.Random(3)
    longs = [{"prompt": [rng.randrange(3, 1024) for _ in range(32)], "max_tokens": LONG_OUT,
              "at_step": 0} for _ in range(LONG)]
    late = {"prompt": [rng.randrange(3, 1024) for _ in range(16)], "max_tokens": 8,
            "at_step": LATE_AT}
    return [*longs, late]


def tenants() -> list[dict]:
    """Tenant a sends three times as many requests as tenant b, at once."""
    rng = random.Random(4)
    return [{"prompt": [rng.randrange(3, 1024) for _ in range(32)], "max_tokens": 48,
             "tenant": "a" if i % 4 else "b", "at_step": 0} for i in range(32)]


def quiet() -> list[dict]:
    """An engine that keeps up: three requests fill the KV cache, and a
    newcomer that does not fit arrives when they are 5 steps from done."""
    rng = random.Random(5)
    running = [{"prompt": [rng.randrange(3, 1024) for _ in range(32)], "max_tokens": 40,
                "at_step": 0} for _ in range(3)]
    newcomer = {"prompt": [rng.randrange(3, 1024) for _ in range(96)], "max_tokens": 8,
                "at_step": QUIET_AT}
    return [*running, newcomer]


def drive(spec: dict) -> dict:
    out = subprocess.run([sys.executable, DRIVER, json.dumps(spec)], capture_output=True,
                         text=True, cwd=REPO, timeout=600,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"driver exited {out.returncode}:\n{out.stderr[-6000:]}")


def spec(variant: str, model: str, socket: str, requests: list[dict], **extra) -> dict:
    return {"variant": variant, "model": model, "socket": socket, "blocks": 12,
            "max_seqs": 8, "max_len": 256, "requests": requests, "warmup": False,
            "lease_bytes": "32MiB", **extra}


@pytest.fixture(scope="module")
def stock(model: str) -> dict:
    """The burst, then the quiet schedule."""
    doc = drive(spec("stock", model, "/nonexistent/aquad.sock", burst(), more=[quiet()]))
    return {**doc["reps"][0], "quiet": doc["more"][0]}


@pytest.fixture(scope="module")
def fair(model: str, module_daemon: Daemon) -> dict:
    """The burst, the tenant schedule and the quiet one, with tenant
    fairness on and the step log."""
    doc = drive(spec("fair", model, module_daemon.socket, burst(), step_log=True,
                     fair={**FAIR, "tenants": True}, more=[tenants(), quiet()]))
    return {"burst": doc["reps"][0], "tenants": doc["more"][0], "quiet": doc["more"][1]}


@pytest.fixture(scope="module")
def fair_blind(model: str, module_daemon: Daemon) -> dict:
    """The tenant schedule with tenant fairness off."""
    return drive(spec("fair", model, module_daemon.socket, tenants(),
                      fair={**FAIR, "tenants": False}))["reps"][0]


def test_tokens_match_stock_vllm(stock: dict, fair: dict) -> None:
    assert fair["burst"]["scheduler"] == "FairScheduler"  # the CPU backend: no async
    for mine, theirs in zip(fair["burst"]["requests"], stock["requests"], strict=True):
        assert mine["tokens"] == theirs["tokens"]
        assert len(mine["tokens"]) in (LONG_OUT, 8)


def test_late_prompt_gets_its_first_token_before_the_long_ones_finish(stock: dict,
                                                                      fair: dict) -> None:
    def first_token_and_first_finish(run: dict) -> tuple[int, int]:
        *longs, late = run["requests"]
        assert late["arrived_step"] == LATE_AT
        return late["steps"][0], min(r["steps"][-1] for r in longs)

    late_first, long_done = first_token_and_first_finish(fair["burst"])
    # (it still waits for the long requests never admitted yet: as little
    # service as it, and there first)
    assert late_first < long_done, "FairScheduler made the newcomer wait for a long request"
    stock_first, stock_done = first_token_and_first_finish(stock)
    assert stock_first > stock_done, "stock vLLM served the newcomer early (test too easy)"


def test_newcomers_go_before_preempted_requests_of_their_tenant(fair: dict) -> None:
    """A request never admitted yet is admitted before a preempted one of
    its tenant is resumed, so its first token does not wait for them."""
    run = fair["tenants"]
    first = {str(i): r["steps"][0] for i, r in enumerate(run["requests"])}
    tenant = {str(i): r["tenant"] for i, r in enumerate(run["requests"])}
    resumed_at = []
    for step, row in enumerate(run["step_log"], 1):
        for req_id in row["resumed"]:
            i = req_id.split("-")[0]
            waiting_newcomers = [j for j in first if tenant[j] == tenant[i] and first[j] > step]
            assert not waiting_newcomers, (f"step {step}: {i} resumed while newcomers "
                                           f"{waiting_newcomers} of its tenant waited")
            resumed_at.append(step)
    assert resumed_at, "nothing was preempted and resumed: the schedule tests nothing"
    assert max(first.values()) < max(resumed_at)


def test_no_preemption_when_room_frees_within_a_slice(stock: dict, fair: dict) -> None:
    """On an engine that keeps up, a newcomer waits the few steps until a
    running request finishes, as with stock vLLM, instead of paging one out."""
    mine, theirs = fair["quiet"], stock["quiet"]
    assert theirs["preemptions"] == 0
    assert mine["preemptions"] == 0 and mine["fair_preemptions"] == 0
    assert mine["deferred_preemptions"] > 0  # the newcomer did not fit at once
    *_, newcomer = mine["requests"]
    assert newcomer["arrived_step"] == QUIET_AT
    assert newcomer["steps"][0] - QUIET_AT <= FAIR["min_slice_steps"] + 1
    assert newcomer["steps"][0] == theirs["requests"][-1]["steps"][0]
    for a, b in zip(mine["requests"], theirs["requests"], strict=True):
        assert a["tokens"] == b["tokens"]


def test_preempted_requests_reload_from_the_tier(stock: dict, fair: dict) -> None:
    run = fair["burst"]
    assert run["fair_preemptions"] > 0
    assert run["loaded_bytes"] > 0
    needed = sum(len(r["prompt"]) + r["max_tokens"] - 1 for r in burst())
    assert stock["computed"] > needed  # stock recomputes its preempted requests
    assert run["computed"] - needed < (stock["computed"] - needed) / 2


def test_no_blocks_leak_and_nothing_starves(stock: dict, fair: dict) -> None:
    for run in (stock, stock["quiet"], fair["burst"], fair["tenants"], fair["quiet"]):
        assert run["kv_usage_after"] == 0.0
        assert run["unfinished_after"] == 0
        for r in run["requests"]:
            assert r["tokens"] and len(r["tokens"]) == len(r["times"])


def test_tenant_service_gap_stays_within_the_bound(fair: dict, fair_blind: dict) -> None:
    fair_run = fair["tenants"]
    bound = fair_run["gap_bound"]
    assert 0 < fair_run["max_backlogged_gap"] <= bound
    # tenant-blind time sharing serves each request alike, so the tenant
    # with more requests runs ahead: the bound is one tenant fairness keeps
    assert fair_blind["max_backlogged_gap"] > bound
    for mine, theirs in zip(fair_run["requests"], fair_blind["requests"], strict=True):
        assert mine["tokens"] == theirs["tokens"]


# --- no engine needed ------------------------------------------------------

def test_version_pin_fails_loudly_on_another_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm

    from aqua.vllm.fair import TESTED_VLLM, check_vllm_version

    assert vllm.__version__ == TESTED_VLLM, "re-test FairScheduler, then move TESTED_VLLM"
    check_vllm_version(TESTED_VLLM)
    monkeypatch.delenv("AQUA_FAIR_ANY_VLLM", raising=False)
    with pytest.raises(RuntimeError, match="tested with vLLM"):
        check_vllm_version("0.33.0")
    monkeypatch.setenv("AQUA_FAIR_ANY_VLLM", "1")
    check_vllm_version("0.33.0")


def test_async_scheduling_keeps_the_async_scheduler() -> None:
    from types import SimpleNamespace

    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from aqua.vllm import AsyncFairScheduler, FairScheduler

    def config(async_scheduling: bool) -> SimpleNamespace:
        return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))

    assert FairScheduler.variant_for(config(True)) is AsyncFairScheduler
    assert FairScheduler.variant_for(config(False)) is FairScheduler
    assert issubclass(AsyncFairScheduler, AsyncScheduler)
    assert issubclass(AsyncFairScheduler, FairScheduler)
    mro = AsyncFairScheduler.__mro__
    assert mro.index(FairScheduler) < mro.index(AsyncScheduler)  # the policy wraps async


@pytest.mark.parametrize(("raw", "message"), [
    ({"paging_fraction": 0}, "paging_fraction"),
    ({"slice": 3}, "unknown aqua_fair settings"),
    ({"min_slice_steps": 9, "max_slice_steps": 4}, "min_slice_steps"),
    ({"load_gbps": -1}, "load_gbps"),
    ("fast", "must be a dict"),
])
def test_bad_settings_fail_clearly(raw, message: str) -> None:
    from aqua.vllm.fair import FairSettings

    with pytest.raises(ValueError, match=message):
        FairSettings.from_config(raw)
