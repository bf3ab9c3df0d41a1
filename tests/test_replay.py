"""The replay's measurements of itself: the engine's step times, what they
sum to per number of busy tenants, and reading tenants' results."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from aqua_demo.replay import read_all
from aqua_demo.stats import cost_sums


def _tenant(size, requests, forwards=(), steps=()):
    return {"tenant": f"llama-{size}", "size": size, "bytes_paged": 0,
            "requests": [{"arrival": a, "times": list(ts), "preemptions": 0}
                         for a, ts in requests],
            "forwards": [list(f) for f in forwards], "steps": [list(s) for s in steps]}


def test_cost_sums_count_the_tenants_with_work_and_split_the_phases():
    # Tenant a has work over [0, 2] and [5, 6]; b over [1, 3] (two requests
    # that overlap, so one span); c never has a token (no work counted).
    a = _tenant("small", [(0.0, [0.5, 2.0]), (5.0, [6.0])],
                forwards=[(0.0, 0.5, 30, 0),    # prefill alone: 1 busy
                          (1.5, 2.0, 1, 30),    # decode with b: 2 busy
                          (5.1, 5.35, 7, 0)],   # prefill alone again
                steps=[(0.0, 0.6, 0.5, 0, 0), (1.5, 2.1, 0.5, 2, 4096), (5.1, 5.4, 0.25, 0, 0)])
    b = _tenant("medium", [(1.0, [1.2, 2.5]), (1.1, [3.0])],
                forwards=[(1.0, 1.2, 10, 0), (2.2, 2.5, 1, 10), (2.6, 3.0, 1, 11)],
                steps=[(1.0, 1.25, 0.2, 0, 0)])
    c = _tenant("large", [(4.0, [])])
    sums = cost_sums([a, b, c])
    small, medium = sums["llama-small"], sums["llama-medium"]
    # [n, sum x, sum x^2, sum y, sum xy]; x: tokens in for a prefill,
    # tokens cached for a decode.
    assert small["prefill"] == {"1": pytest.approx([2, 37, 30 * 30 + 7 * 7, 0.75,
                                                    30 * 0.5 + 7 * 0.25])}
    assert small["decode"] == {"2": pytest.approx([1, 30, 900, 0.5, 15])}
    assert medium["prefill"] == {"2": pytest.approx([1, 10, 100, 0.2, 2])}
    # Decodes at 2.2 (a's span ends at 2.0: b alone) and 2.6.
    assert medium["decode"] == {"1": pytest.approx([2, 21, 100 + 121, 0.7, 3 + 4.4])}
    # Steps: [n, pages, bytes, seconds outside model calls].
    assert small["steps"] == {"1": pytest.approx([2, 0, 0, 0.1 + 0.05]),
                              "2": pytest.approx([1, 2, 4096, 0.1])}
    # Work arriving at an idle engine (a at 0 and 5, b at 1; b's second
    # request joins work it has): [n, seconds until its first step, that
    # step's first call's seconds, its tokens].
    assert small["idle_arrivals"] == {"1": pytest.approx([2, 0.1, 0.5 + 0.25, 37])}
    assert medium["idle_arrivals"] == {"2": pytest.approx([1, 0.0, 0.2, 10])}
    assert sums["llama-large"] == {"prefill": {}, "decode": {}, "steps": {},
                                   "idle_arrivals": {}}


def test_the_engine_times_every_model_call_and_step():
    pytest.importorskip("torch")
    from aqua.engine import Engine, PromptScheduler
    from aqua.engine.runner import StepTimes
    from aqua_demo.replay import build_model

    engine = Engine(build_model("small", 0), PromptScheduler("fcfs", 1000, 5))
    engine.times = StepTimes()
    engine.submit(list(range(20)), 4)
    engine.submit(list(range(7)), 3)
    while engine.step():
        pass
    forwards, steps = engine.times.forwards, engine.times.steps
    # Two prefills (nothing cached), then one decode per later token, each
    # reading what its request has cached so far.
    assert [(n, cached) for _, _, n, cached in forwards] == [
        (20, 0), (7, 0), (1, 20), (1, 7), (1, 21), (1, 8), (1, 22)]
    assert all(t0 <= t1 for t0, t1, *_ in forwards)
    assert len(steps) == 4  # tokens 1 (both prefills), 2, 3, 4
    for (t0, t1, model_s, copies, nbytes), calls in zip(steps, ([0, 1], [2, 3], [4, 5], [6])):
        assert model_s == pytest.approx(sum(forwards[i][1] - forwards[i][0] for i in calls))
        assert t1 - t0 >= model_s and (copies, nbytes) == (0, 0)


def test_results_bigger_than_a_pipe_are_read_while_the_tenants_run():
    """A tenant blocked writing a result line longer than the pipe holds
    never exits: a progress bar that waits for the exits must not keep the
    outputs from being read (the replay hung this way once its tenants
    reported their step times)."""
    size = 1 << 20
    procs = [subprocess.Popen([sys.executable, "-c", f"print('{i}' * {size})"],
                              stdout=subprocess.PIPE, text=True) for i in range(3)]

    def wait_for_exits() -> None:
        deadline = time.monotonic() + 20
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise AssertionError("tenants blocked writing their results")
            time.sleep(0.01)

    outputs = read_all(procs, wait_for_exits)
    assert [out.strip() for out in outputs] == [str(i) * size for i in range(3)]
