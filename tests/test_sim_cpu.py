"""The simulator calibrated to the CPU engine (aqua_sim.cpu, bench/profiles/).

No processes: the saved profile and measurements are read, the simulator
replays bench/responsiveness.py's workloads in virtual time, and what it
predicts is held to what was measured.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os

import pytest

from aqua_sim import MODELS, Arrival, Scenario, SimTenant, Simulation
from aqua_sim.cpu import (
    DEFAULT_PROFILE,
    MODE_POLICY,
    PROFILES,
    StepCosts,
    compare,
    load_profile,
    predict,
    profile_from_dict,
    responsiveness_scenario,
)

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _responsiveness():
    spec = importlib.util.spec_from_file_location("responsiveness",
                                                  os.path.join(BENCH, "responsiveness.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def profile():
    return load_profile(DEFAULT_PROFILE)


# --- a model's KV size --------------------------------------------------------

# demo/replay.py's models, from their configs: (layers, attention heads, KV
# heads, hidden size); fp32 caches.
CPU_MODELS = {"llama-small": (2, 4, 2, 64), "llama-medium": (4, 4, 2, 128),
              "llama-large": (6, 6, 2, 192)}


@pytest.mark.parametrize("key", sorted(CPU_MODELS))
def test_cpu_models_kv_bytes_are_what_transformers_caches(key):
    torch = pytest.importorskip("torch")
    from transformers import DynamicCache

    from aqua_demo.replay import MODEL_SIZES, build_model

    layers, heads, kv_heads, hidden = CPU_MODELS[key]
    head_dim = hidden // heads
    assert MODEL_SIZES[key.removeprefix("llama-")] == (hidden, layers, heads, kv_heads)
    assert MODELS[key].kv_bytes_per_token == 2 * layers * kv_heads * head_dim * 4
    assert MODELS[key].layers == layers
    # What a real prefill leaves in the engine's cache, per token.
    model = build_model(key.removeprefix("llama-"), 0)
    tokens = 37
    with torch.inference_mode():
        out = model(torch.zeros((1, tokens), dtype=torch.long),
                    past_key_values=DynamicCache(config=model.config), use_cache=True)
    cache = out.past_key_values
    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers
                 for t in (layer.keys, layer.values))
    assert nbytes == tokens * MODELS[key].kv_bytes_per_token


def test_the_profile_measured_the_same_kv_sizes(profile):
    for key, n in profile.kv_bytes_per_token.items():
        assert MODELS[key].kv_bytes_per_token == n, key


# --- the cost hook -------------------------------------------------------------


def test_a_lone_request_takes_exactly_the_fitted_step_times(profile):
    costs = StepCosts(0.001, 0.002, 1e-5, 0.0005, 0.003, 1e-6)
    prompt, new = 50, 5
    sc = Scenario(profile.server(1), (SimTenant("t", "llama-small", 0, kv_budget=400),),
                  (Arrival(1.0, prompt, new, 0),), max_overhead=None,
                  costs={"llama-small": costs}, engine_limits=(256, 8192))
    sim = Simulation(sc, "fcfs")
    sim.run()
    (req,) = sim.engines[0].requests
    t = 1.0 + 0.001 + 0.002 + 1e-5 * prompt
    expected = [t]
    for k in range(1, new):
        t += 0.0005 + 0.003 + 1e-6 * (prompt + k)
        expected.append(t)
    assert req.token_times == pytest.approx(expected, rel=1e-12)


def test_engines_with_work_share_the_cores_as_measured():
    """Scenario.contention: a step computes as many times slower as the
    table says for the number of engines with work when it starts; an idle
    engine (nothing pending) slows nobody."""
    costs = StepCosts(0.0, 0.004, 0.0, 0.0, 0.002, 0.0)
    tenants = tuple(SimTenant(f"t{i}", "llama-small", i, kv_budget=400) for i in range(3))
    server = load_profile(DEFAULT_PROFILE).server(3)

    def first_tokens(arrivals, table):
        sc = Scenario(server, tenants, tuple(arrivals), max_overhead=None,
                      costs={"llama-small": costs}, engine_limits=(256, 8192),
                      contention=None if table is None else {"llama-small": table})
        sim = Simulation(sc, "fcfs")
        sim.run()
        return [e.requests[0].token_times[0] - e.requests[0].arrival
                for e in sim.engines if e.requests]

    alone = [Arrival(1.0, 10, 1, 0)]
    apart = [Arrival(1.0, 10, 1, 0), Arrival(2.0, 10, 1, 1)]
    together = [Arrival(1.0, 10, 1, i) for i in range(3)]
    assert first_tokens(alone, (1.0, 2.0, 3.0)) == pytest.approx([0.004])
    assert first_tokens(apart, (1.0, 2.0, 3.0)) == pytest.approx([0.004, 0.004])
    # All three arrive in the same instant: the count is taken as each step
    # starts, so each sees those whose arrival came first.
    assert first_tokens(together, (1.0, 2.0, 3.0)) == pytest.approx([0.004, 0.008, 0.012])
    assert first_tokens(together, None) == pytest.approx([0.004] * 3)
    # Beyond the measured counts, proportionally more.
    assert first_tokens(together, (1.0, 1.5)) == pytest.approx([0.004, 0.006, 0.006 * 1.5])
    # A long request keeps its engine busy: the others' steps are slowed,
    # and so are its own steps once they have work too.
    sc = Scenario(server, tenants, (Arrival(1.0, 10, 20, 0), Arrival(1.01, 10, 1, 1)),
                  max_overhead=None, costs={"llama-small": costs}, engine_limits=(256, 8192),
                  contention={"llama-small": (1.0, 2.0, 3.0)})
    sim = Simulation(sc, "fcfs")
    sim.run()
    long, short = (e.requests[0] for e in sim.engines[:2])
    assert short.token_times[0] - short.arrival == pytest.approx(0.008)
    gaps = [b - a for a, b in zip(long.token_times, long.token_times[1:])]
    assert min(gaps) == pytest.approx(0.002) and max(gaps) == pytest.approx(0.004)
    with pytest.raises(ValueError, match="contention"):
        Scenario(server, tenants, (), contention={"llama-small": ()})


def _decode_gaps(scatter, seed, *, tenants=1, new=41):
    """Token gaps of tenant 0's one request (decode steps of 2 ms, one
    request per tenant arriving at once) under `scatter`."""
    costs = StepCosts(0.0, 0.004, 0.0, 0.0, 0.002, 0.0)
    ts = tuple(SimTenant(f"t{i}", "llama-small", i, kv_budget=1000) for i in range(tenants))
    sc = Scenario(load_profile(DEFAULT_PROFILE).server(tenants), ts,
                  tuple(Arrival(1.0, 10, new, i) for i in range(tenants)), max_overhead=None,
                  costs={"llama-small": costs}, engine_limits=(256, 8192),
                  scatter=None if scatter is None else {"llama-small": scatter}, seed=seed)
    sim = Simulation(sc, "fcfs")
    sim.run()
    times = sim.engines[0].requests[0].token_times
    return [b - a for a, b in zip(times, times[1:])]


def test_step_costs_scatter_as_the_quantiles_say():
    """Scenario.scatter: each forward's cost is its model's times a draw
    from the measured quantiles (inverse CDF: uniform between neighbours),
    per number of engines with work; a seed repeats its draws; without
    scatter every step costs its model, whatever the seed."""
    flat = ((1.0, 1.0),)
    uniform = ((1.0, 3.0),)  # 1-3x, mean 2x
    gaps = _decode_gaps((flat, uniform), seed=7, new=401)
    assert all(0.002 - 1e-12 <= g <= 0.006 + 1e-12 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.004, rel=0.1)
    assert len({round(g, 12) for g in gaps}) > len(gaps) // 2  # drawn, not one value
    assert _decode_gaps((flat, uniform), seed=7, new=401) == gaps
    assert _decode_gaps((flat, uniform), seed=8, new=401) != gaps
    assert _decode_gaps(None, seed=7) == pytest.approx([0.002] * 40)
    # The table for the number of engines computing: alone 1x, two at once 3x.
    by_busy = ((1.0, 1.0), (3.0, 3.0))
    assert _decode_gaps((flat, by_busy), seed=0) == pytest.approx([0.002] * 40)
    assert _decode_gaps((flat, by_busy), seed=0, tenants=2) == pytest.approx([0.006] * 40)
    server = load_profile(DEFAULT_PROFILE).server(1)
    for bad in (((1.0,),), ((2.0, 1.0),), ((0.0, 1.0),)):
        with pytest.raises(ValueError, match="scatter"):
            Scenario(server, (SimTenant("t", "llama-small", 0),), (),
                     scatter={"llama-small": (flat, bad)})


def test_predictions_average_the_draws_and_mean_costs_stay_available(profile):
    """predict(): `draws` seeded runs with scattered costs, compared by
    their mean; draws=0 is one run at the fitted mean costs (no scatter).
    A profile calibrated before scatter was kept predicts only that way."""
    resp = _responsiveness()
    tenants, _ = resp.workload_tenants({"requests": 30, "burst": 18, "max_new": 40,
                                        "concurrency": 3, "seed": 0, "trace": "conv",
                                        "time_scale": 4.0})
    mean_costs = predict(tenants, profile, draws=0)
    assert len(mean_costs) == 1
    sc = responsiveness_scenario(tenants, profile, mode="aqua")
    assert sc.scatter is None
    assert Simulation(sc, "aqua").run()["ttft_p99_s"] == mean_costs[0]["aqua"]["ttft_p99_s"]
    drawn = predict(tenants, profile, draws=4)
    p99s = [d["aqua"]["ttft_p99_s"] for d in drawn]
    assert len(set(p99s)) == 4  # each draw its own seed
    assert predict(tenants, profile, draws=4)[2]["aqua"]["ttft_p99_s"] == p99s[2]
    row = next(r for r in compare([mean_costs[0]], drawn) if r.figure == "TTFT p99 (ms), aqua")
    assert row.predicted == pytest.approx(1e3 * sum(p99s) / 4)
    assert row.draws == pytest.approx(tuple(1e3 * x for x in p99s))
    doc = json.loads(json.dumps(profile.doc))
    for m in doc["models"].values():
        del m["scatter"]
    old = profile_from_dict(doc)
    assert predict(tenants, old, draws=0)
    with pytest.raises(ValueError, match="scatter"):
        predict(tenants, old, draws=1)


def test_real_runs_model_calls_are_held_to_what_the_simulator_charges(profile):
    """call_costs(): a run's timed model calls (cost_sums) against the
    fit's per-call cost times the load factor and the contention for the
    count of tenants with work (beyond the table: proportionally more)."""
    from aqua_sim.cpu import call_costs

    costs = StepCosts(0.5, 0.002, 1e-5, 0.25, 0.001, 1e-6)  # step costs: not per call
    prof = dataclasses.replace(profile, models={"llama-small": costs}, load_factor=2.0,
                               contention={"llama-small": (1.0, 1.5)})
    # 3 prefills of 100 tokens in all alone; 10 decodes reading 500 cached
    # tokens in all with 2 busy, 4 reading 40 with 3 busy.
    sums = {"llama-small": {"prefill": {"1": [3, 100, 0, 0.03, 0]},
                            "decode": {"2": [10, 500, 0, 0.06, 0], "3": [4, 40, 0, 0.02, 0]}}}
    runs = [{"baseline": {"cost_sums": sums}}, {"baseline": {}}]  # the second: not timed
    got = call_costs(prof, runs, "baseline")
    assert list(got) == [1, 2, 3]
    assert got[1] == (3, pytest.approx(0.03), pytest.approx(2 * (3 * 0.002 + 100 * 1e-5)))
    assert got[2] == (10, pytest.approx(0.06), pytest.approx(2 * 1.5 * (10 * 0.001 + 500e-6)))
    assert got[3][2] == pytest.approx(2 * 1.5 * 1.5 * (4 * 0.001 + 40e-6))
    # One model's calls only (sim_validate prints each model's too).
    assert call_costs(prof, runs, "baseline", "llama-small") == got
    assert call_costs(prof, runs, "baseline", "llama-medium") == {}


def test_a_page_copy_costs_what_the_runs_paid_beyond_their_model_calls(profile):
    """copy_cost(): the aqua steps' time outside model calls, less what the
    baseline's steps (no copies) paid there per call, over the copies; a
    profile fitted with it charges that per copy, the lease round trip in
    it, instead of the copy latency and round trip timed alone."""
    from aqua_sim.cpu import copy_cost

    def run(base, aqua):
        return {mode: {"cost_sums": {"llama-small": {
            "prefill": {"3": [calls / 2, 0, 0, 0, 0]}, "decode": {"3": [calls / 2, 0, 0, 0, 0]},
            "steps": {"3": [calls, copies, 0, seconds]}}}}
            for mode, (calls, copies, seconds) in (("baseline", base), ("aqua", aqua))}

    # Baseline: 0.2 ms per call outside calls; aqua: 1.2 s over 1000 calls
    # and 500 copies, so (1.2 - 0.2) / 500 = 2 ms a copy.
    runs = [run((600, 0, 0.12), (600, 300, 0.72)), run((400, 0, 0.08), (400, 200, 0.48))]
    copy_s, copies = copy_cost(runs)
    assert copy_s == pytest.approx(0.002) and copies == 500
    with pytest.raises(ValueError, match="cost_sums"):
        copy_cost([*runs, {"baseline": {}, "aqua": {}}])
    with pytest.raises(ValueError, match="no page copies"):
        copy_cost([run((600, 0, 0.12), (600, 0, 0.12))])
    fitted = dataclasses.replace(profile, run_copy_s=copy_s)
    resp = _responsiveness()
    tenants, _ = resp.workload_tenants({"requests": 26, "burst": 18, "max_new": 40,
                                        "concurrency": 3, "seed": 0, "trace": None,
                                        "time_scale": 4.0})
    sc = responsiveness_scenario(tenants, fitted, mode="aqua")
    assert sc.server.copy_latency_s == 0.002 and sc.control_latency_s == 0.0
    timed = responsiveness_scenario(tenants, dataclasses.replace(profile, run_copy_s=None),
                                    mode="aqua")
    assert timed.server.copy_latency_s == profile.copy_latency_s
    assert timed.control_latency_s == profile.lease_rtt_s


def test_the_measured_means_standard_error_is_reported():
    from aqua_sim.cpu import Row

    assert Row("f", 10.0, 10.0, 0.2, runs=(10.0,)).sem == 0.0
    # stdev of (8, 12) is 2.83; over sqrt(2) runs, over the mean 10: 20 %.
    assert Row("f", 10.0, 10.0, 0.2, runs=(8.0, 12.0)).sem == pytest.approx(0.2)


def test_page_copies_cost_the_measured_latency_and_bandwidth(profile):
    from aqua_sim.fabric import Fabric

    nbytes = 1 << 20
    # The shipped profile's copies cost what its fit runs paid; timed alone,
    # the latency the calibration measured.
    assert profile.run_copy_s is not None
    for prof, latency in ((profile, profile.run_copy_s),
                          (dataclasses.replace(profile, run_copy_s=None), profile.copy_latency_s)):
        server = prof.server(2)
        end = Fabric(server).copy(0, server.host_device, nbytes, 0.0)
        assert end == pytest.approx(latency + nbytes / profile.copy_bandwidth)


def test_a_profile_naming_an_unknown_model_is_refused(profile):
    doc = json.loads(json.dumps(profile.doc))
    doc["models"]["llama-huge"] = doc["models"]["llama-small"]
    with pytest.raises(ValueError, match="llama-huge"):
        profile_from_dict(doc)


# --- the calibrated scenario reproduces the measurements --------------------------


def measurements() -> dict[str, list[dict]]:
    by_workload: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(PROFILES, "measured", "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        by_workload.setdefault(json.dumps(doc["workload"], sort_keys=True), []).append(doc)
    return by_workload


@pytest.fixture(scope="module")
def validation(profile):
    resp = _responsiveness()
    out = {}
    for key, docs in measurements().items():
        tenants, _ = resp.workload_tenants(json.loads(key))
        out[key] = (tenants, docs, compare(docs, predict(tenants, profile)))
    assert out, "no saved measurements in bench/profiles/measured/"
    return out


def label(key: str) -> str:
    w = json.loads(key)
    if w["trace"]:
        return f"{w['trace']} {w['requests']}x{w['time_scale']:g} seed {w['seed']}"
    return f"burst seed {w['seed']}"


def misses(rows_by_workload: dict[str, list]) -> set[tuple[str, str]]:
    return {(label(key), r.figure) for key, rows in rows_by_workload.items()
            for r in rows if not r.ok}


# Where the calibrated simulator misses its bound on the saved measurements
# (docs/simulator.md, "Calibrated to the CPU engine", says why). Any other
# miss fails, and so does one of these turning good: update the list (and
# the docs) with the measurements.
KNOWN_MISSES = {
    ("burst seed 1", "TTFT p50 (ms), aqua"),
    ("burst seed 2", "TTFT p50 (ms), baseline"),
    ("code 30x4 seed 0", "TTFT p99 (ms), baseline"),
    ("code 30x4 seed 0", "TTFT p99 (ms), aqua"),
    ("conv 30x4 seed 0", "TTFT p99 (ms), aqua"),
    ("conv 60x8 seed 0", "TTFT p50 (ms), baseline"),
    ("conv 60x8 seed 0", "preemptions, baseline"),
}


def test_the_calibrated_simulator_reproduces_the_measurements(validation):
    rows = {key: r for key, (_, _, r) in validation.items()}
    assert misses(rows) == KNOWN_MISSES
    # What validates, said plainly: on every workload aqua's preemptions
    # and bytes paged within 10 % and the TTFT p50 ratio inside the runs'
    # spread; on every burst every count and both ratios; on the held-out
    # seed (burst seed 2) every figure but the baseline's p50; on the
    # held-out trace that preempts all of aqua's TTFTs; on the held-out idle
    # traces both modes' p50s.
    held_out = {"burst seed 2", "code 30x4 seed 0", "conv 30x4 seed 0", "conv 60x8 seed 0"}
    assert held_out <= {label(key) for key in rows}
    for key, r in rows.items():
        by = {row.figure: row for row in r}
        figures = ["preemptions, aqua", "KV MiB paged, aqua", "TTFT p50 baseline/aqua"]
        if not json.loads(key)["trace"]:
            figures += ["preemptions, baseline", "TTFT p99 baseline/aqua"]
        if label(key) == "burst seed 2":
            figures = [f for f in by if f != "TTFT p50 (ms), baseline"]
        if label(key) == "conv 60x8 seed 0":
            figures += ["TTFT p50 (ms), aqua", "TTFT p99 (ms), aqua"]
        if label(key) in ("code 30x4 seed 0", "conv 30x4 seed 0"):
            figures += ["TTFT p50 (ms), baseline", "TTFT p50 (ms), aqua"]
        for figure in figures:
            assert by[figure].ok, (label(key), figure)
    preempting = {row.figure: row.measured for row in rows[next(
        k for k in rows if label(k) == "conv 60x8 seed 0")]}
    assert preempting["preemptions, baseline"] > 0 and preempting["preemptions, aqua"] > 0


# The copy bandwidth alone must be 100x wrong to show: the engine's copies
# are 9-400 KiB, tens of microseconds at GB/s against steps of milliseconds
# and the copies' own ~1 ms fixed cost (docs/simulator.md), so up to 30x
# it moves no compared figure out of its bound.
WRONG = ["decode twice as dear", "copy bandwidth a hundredth", "copies ten times slower",
         "KV twice as large", "load factor doubled", "no core sharing",
         "baseline admits whole reservations"]


@pytest.mark.parametrize("wrong", WRONG)
def test_a_wrong_profile_misses_more(profile, validation, wrong):
    """Each calibrated quantity matters: get one wrong and figures that
    validated leave their bounds (so the test above cannot pass with any
    profile or cost hook). "baseline admits whole reservations" is the
    baseline's admission rule wrong (strict reservation, no preemption,
    instead of vLLM's admission on prompt blocks)."""
    policy = dict(MODE_POLICY)
    if wrong == "decode twice as dear":
        models = {k: dataclasses.replace(c, per_request_s=2 * c.per_request_s)
                  for k, c in profile.models.items()}
        bad = dataclasses.replace(profile, models=models)
    elif wrong == "copies ten times slower":
        bad = dataclasses.replace(profile, copy_bandwidth=profile.copy_bandwidth / 10,
                                  copy_latency_s=10 * profile.copy_latency_s,
                                  run_copy_s=None if profile.run_copy_s is None
                                  else 10 * profile.run_copy_s)
    elif wrong == "copy bandwidth a hundredth":
        bad = dataclasses.replace(profile, copy_bandwidth=profile.copy_bandwidth / 100)
    elif wrong == "load factor doubled":
        bad = dataclasses.replace(profile, load_factor=2 * profile.load_factor)
    elif wrong == "no core sharing":
        bad = dataclasses.replace(profile, contention={})
    else:
        bad = profile
    if wrong == "baseline admits whole reservations":
        policy["baseline"] = "reserve"
    rows = {}
    with pytest.MonkeyPatch.context() as mp:
        if wrong == "KV twice as large":
            for key in profile.models:
                mp.setitem(MODELS, key, dataclasses.replace(
                    MODELS[key], kv_bytes_per_token=2 * MODELS[key].kv_bytes_per_token))
        # Workload by workload, until one misses where the profile did not
        # (each is 60 simulator runs).
        for key, (tenants, docs, _) in validation.items():
            rows[key] = compare(docs, predict(tenants, bad, policy))
            if misses(rows) - KNOWN_MISSES:
                break
    assert misses(rows) - KNOWN_MISSES


def test_the_scenario_mirrors_the_benchmarks_setup(profile):
    resp = _responsiveness()
    tenants, _ = resp.workload_tenants({"requests": 26, "burst": 18, "max_new": 40,
                                        "concurrency": 3, "seed": 0, "trace": None,
                                        "time_scale": 4.0})
    for mode, policy in (("baseline", "fcfs"), ("aqua", "fair")):
        sc = responsiveness_scenario(tenants, profile, mode=mode)
        sim = Simulation(sc, {"baseline": "fcfs", "aqua": "aqua"}[mode])
        for engine, t in zip(sim.engines, tenants):
            assert engine.sched.policy == policy
            assert engine.sched.budget == t.kv_budget
            assert engine.sched.slice_tokens == t.slice_tokens
            assert engine.sched.max_overhead is None  # the replay's engines do not stretch
            fitted = profile.step_costs(engine.spec.model)
            assert engine.costs.decode(3, 300) == pytest.approx(fitted.decode(3, 300))
            assert engine.costs.step_s == (profile.respond_s if mode == "aqua" else 0.0)
        assert sc.quantum_s == 0.020  # the replay's aquad: --quantum-ms 20
        assert sorted((a.t, a.prompt, a.max_new) for a in sc.arrivals) == sorted(
            (a.t, a.prompt_len, a.max_new) for t in tenants for a in t.arrivals)
    with pytest.raises(ValueError, match="baseline or aqua"):
        responsiveness_scenario(tenants, profile, mode="fcfs")


def test_step_timeline_sums_each_window_of_a_run_against_the_fit(profile, monkeypatch):
    """bench/step_timeline.py: the engines' timed calls and steps, summed by
    model and window of the run (before the burst, its first 150 ms, to
    500 ms, after), each call beside what the alone fit says it costs."""
    monkeypatch.syspath_prepend(BENCH)
    timeline = importlib.import_module("step_timeline")
    assert timeline.burst_start([0.1, 0.9, 2.0, 2.01, 2.05, 3.0], burst=3) == 2.0
    with pytest.raises(ValueError, match="no 4 arrivals"):
        timeline.burst_start([0.1, 0.9, 2.0, 2.01, 2.05, 3.0], burst=4)
    burst_t, start = 1.0, 100.0  # the tenant's clock reads 100 s at the run's start
    doc = {"size": "small", "start": start,
           "forwards": [(start + 0.5, start + 0.503, 20, 0),  # a prefill before the burst
                        (start + 1.01, start + 1.012, 1, 40),  # decodes in its first 150 ms
                        (start + 1.02, start + 1.023, 1, 41),
                        (start + 1.3, start + 1.301, 1, 50)],  # one at 300 ms
           "steps": [(start + 0.5, start + 0.504, 0.003, 0, 0),  # 1 ms outside the call
                     (start + 1.009, start + 1.016, 0.002, 2, 4096),  # 2 copies, 5 ms
                     (start + 2.0, start + 2.001, 0.0, 0, 0)]}
    got = timeline.tally(profile, [[doc]], burst_t)
    fit = profile.models["llama-small"]
    before = got["llama-small", "before the burst"]
    assert before["P"] == pytest.approx([1, 0.003, fit.per_prompt_s + 20 * fit.per_token_s])
    assert before["plain"] == pytest.approx([1, 0.001])
    first = got["llama-small", "burst, first 150 ms"]
    assert first["d"] == pytest.approx(
        [2, 0.005, 2 * fit.per_request_s + 81 * fit.per_kv_token_s])
    assert first["copying"] == pytest.approx([1, 2, 0.005])
    assert got["llama-small", "burst, 150-500 ms"]["d"][0] == 1
    assert got["llama-small", "after"]["plain"] == pytest.approx([1, 0.001])


def test_repeatability_says_what_even_the_first_sets_mean_would_score(monkeypatch, tmp_path,
                                                                    capsys):
    """bench/repeatability.py: two sets of the same workload, figure by
    figure; the first set's mean judged as a prediction of the second by
    sim_validate's rule (the second's mean is the measured one; a ratio
    must fall inside the second's spread), and whether any one prediction
    could pass against both."""
    monkeypatch.syspath_prepend(BENCH)
    rep = importlib.import_module("repeatability")

    def run(p50: float, p99: float, pre: int, base_p99: float | None = None) -> dict:
        mode = {"ttft_p50_s": p50, "ttft_p99_s": p99, "preemptions": pre, "bytes_paged": 0}
        return {"baseline": dict(mode, ttft_p50_s=10 * p50,
                                 ttft_p99_s=10 * p99 if base_p99 is None else base_p99),
                "aqua": mode}

    first = [run(1.0, 1.0, 100, 10.0), run(1.2, 1.0, 100, 10.0)]
    second = [run(1.7, 1.24, 95, 11 * 1.24), run(1.9, 1.24, 95, 13 * 1.24)]
    rows = {r.figure: r for r in rep.compare_sets(first, second)}
    p50 = rows["TTFT p50 (ms), aqua"]  # 1.1 s, then 1.8 s: 1.64x
    assert p50.means == pytest.approx((1100, 1800))
    assert not p50.predicts and not p50.fits
    assert p50.apart_se == pytest.approx(700 / math.hypot(100, 100))  # s.e. 100 ms each
    # 1.0 s against 1.24 s: within 20 % of the second (the measured) mean,
    # though the second is not within 20 % of the first.
    p99 = rows["TTFT p99 (ms), aqua"]
    assert p99.predicts and p99.fits and p99.apart_se == math.inf
    pre = rows["preemptions, aqua"]  # 100, then 95: within 10 %
    assert pre.predicts and pre.apart_se == -math.inf
    assert rows["KV MiB paged, aqua"].predicts  # both zero
    # A ratio is judged against the second set's spread: 10 is outside 11-13
    # (within 20 % of their mean though), and the first set's agreeing 10
    # accepts 8-12, which meets 11-13.
    ratio = rows["TTFT p99 baseline/aqua"]
    assert ratio.means == pytest.approx((10, 12))
    assert not ratio.predicts and ratio.fits
    # The bound's edge: 1.5x apart is the widest one value can straddle at 20 %.
    assert rep.one_value_fits(1.0, 1.49, 0.2) and not rep.one_value_fits(1.0, 1.51, 0.2)
    assert rep.one_value_fits(0.0, 0.0, 0.2) and not rep.one_value_fits(0.0, 1.0, 0.2)
    # The script end to end, on files as responsiveness.py writes them.
    paths = {"first": [], "second": []}
    for which, docs in (("first", first), ("second", second)):
        for i, doc in enumerate(docs):
            path = tmp_path / f"{which}-{i}.json"
            path.write_text(json.dumps({**doc, "workload": {"seed": 0, "trace": None,
                                                           "requests": 26, "burst": 18},
                                        "date": f"2026-12-02T0{i}:00:00+00:00"}))
            paths[which].append(str(path))
    monkeypatch.setattr("sys.argv", ["repeatability.py", "--first", *paths["first"],
                                     "--second", *paths["second"]])
    assert rep.main() == 0
    out = capsys.readouterr().out
    assert "2 runs (2026-12-02 00:00 to 01:00 UTC)" in out
    assert "| TTFT p50 (ms), aqua | 1100.00 (9%) | 1800.00 (6%) | 1.64 | +4.9 | **no** (20%) | " \
           "**no** |" in out
    assert "| KV MiB paged, aqua | 0 | 0 | - | - | yes | yes |" in out
    assert out.rstrip().endswith("4 of 9 figures: the first set's mean, taken as the prediction, "
                                 "fails against the second set; 2: no one prediction could "
                                 "pass against both")
