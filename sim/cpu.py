"""The simulator calibrated to the CPU engine (bench/calibrate.py's profile).

The GPU roofline (workload.Costs) cannot express what a batch-1 engine on a
CPU core pays: a fixed cost per forward that dwarfs the bytes it reads. Here
every step costs what the profile fitted from timed steps of the real engine:

    prefill: step + per_prompt x prompts + per_token x prompt tokens
    decode:  step + per_request x batch + per_kv_token x KV tokens

and a page-out or page-in costs a fixed part plus bytes over the engine's
measured shared-memory bandwidth: the fixed part as the fit runs' own
engines timed it (copy_cost(): lease round trips and waits for the shared
cores in it), or, without a fit, the copy latency and lease round trip
timed with the machine to itself. `responsiveness_scenario`
mirrors bench/responsiveness.py (its tenants, models, arrivals, KV budgets,
slices; the engine's scheduler limits; one device each, host leases; the
machine's cores, which the tenant processes share) so the simulator
predicts what that benchmark measures. The costs are timed with the machine
to one process; while other tenants have work too, each step is as much
slower as calibration measured with that many processes at once
(Scenario.contention).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .hardware import GB, GiB, GpuSpec, ServerSpec
from .simulator import Scenario, SimTenant, contention_factor
from .workload import MODELS, Arrival

PROFILES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "bench", "profiles")
DEFAULT_PROFILE = os.path.join(PROFILES, "cpu-llama.json")


@dataclass(frozen=True)
class StepCosts:
    """One model's fitted step costs (seconds); the simulator's cost hook."""

    prefill_step_s: float
    per_prompt_s: float
    per_token_s: float
    decode_step_s: float
    per_request_s: float
    per_kv_token_s: float
    step_s: float = 0.0  # per engine step whatever it does (control: respond())

    def prefill(self, tokens: int, prompts: int = 1) -> float:
        if tokens <= 0:
            return 0.0
        return max(0.0, self.prefill_step_s + self.per_prompt_s * prompts
                   + self.per_token_s * tokens)

    def decode(self, batch: int, kv_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        return max(0.0, self.decode_step_s + self.per_request_s * batch
                   + self.per_kv_token_s * kv_tokens)

    def calls(self, phase: str, n: float, x: float) -> float:
        """What `n` model calls of `phase` cost, `x` summed over them (a
        prefill's prompt tokens, a decode's cached ones): the per-call
        terms, without the step's own."""
        if phase == "prefill":
            return self.per_prompt_s * n + self.per_token_s * x
        return self.per_request_s * n + self.per_kv_token_s * x

    def scaled(self, factor: float) -> StepCosts:
        """Compute `factor` times as dear (a busier machine: less CPU each)."""
        return StepCosts(*(factor * getattr(self, f) for f in
                           ("prefill_step_s", "per_prompt_s", "per_token_s", "decode_step_s",
                            "per_request_s", "per_kv_token_s")), step_s=self.step_s)


@dataclass(frozen=True)
class Profile:
    models: dict[str, StepCosts]  # workload.MODELS key -> costs
    kv_bytes_per_token: dict[str, int]  # as measured from the engine's caches
    lease_rtt_s: float
    respond_s: float
    copy_latency_s: float
    copy_bandwidth: float  # bytes/s
    doc: dict[str, Any]
    # How much dearer compute was in the measured runs than when it was
    # timed (the shared machine's load), fitted on the runs the profile's
    # "fit" names (bench/sim_validate.py --fit); 1 without one.
    load_factor: float = 1.0
    # Per model, its steps' slowdown with 1, 2, ... tenant processes
    # computing at once (Scenario.contention); empty for a profile timed
    # with its contention folded in.
    contention: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)

    # Per model, (prefill, decode): per number of processes computing, the
    # quantiles of a timed step's cost over the fit's (Scenario.scatter);
    # empty for a profile calibrated before they were kept.
    scatter: dict[str, tuple[tuple[tuple[float, ...], ...], ...]] = dataclasses.field(
        default_factory=dict)
    # What a page copy cost inside the runs the "fit" names (copy_cost():
    # timed by their engines, lease round trips included), which replaces
    # the copy latency and lease round trip timed alone; None without one.
    run_copy_s: float | None = None

    def step_costs(self, key: str) -> StepCosts:
        return self.models[key].scaled(self.load_factor)

    def server(self, devices: int) -> ServerSpec:
        """`devices` compute devices with no NVLink; the 'PCIe' to the host
        is the engine's measured copy into shared memory."""
        cpu = GpuSpec("cpu (calibrated)", hbm_bytes=64 * GB, hbm_bw=10 * GB, peak_flops=1e11,
                      nvlink_bw=self.copy_bandwidth, pcie_bw=self.copy_bandwidth)
        return ServerSpec(cpu, gpus=devices, nvlink_islands=(), pcie_efficiency=1.0,
                          copy_latency_s=self.copy_latency_s if self.run_copy_s is None
                          else self.run_copy_s, host_pool_bytes=8 * GiB)


def load_profile(path: str = DEFAULT_PROFILE) -> Profile:
    with open(path) as f:
        doc = json.load(f)
    return profile_from_dict(doc)


def profile_from_dict(doc: dict[str, Any]) -> Profile:
    models, kv = {}, {}
    respond = float(doc["control"]["respond_s"])
    for key, m in doc["models"].items():
        if key not in MODELS:
            raise ValueError(f"profile names model {key!r}, not in workload.MODELS")
        p, d = m["prefill"], m["decode"]
        models[key] = StepCosts(p["step_s"], p["per_prompt_s"], p["per_token_s"],
                                d["step_s"], d["per_request_s"], d["per_kv_token_s"])
        kv[key] = int(m["kv_bytes_per_token"])
    contention = {k: tuple(float(x) for x in v)
                  for k, v in doc.get("contention", {}).get("slowdown", {}).items()}
    scatter = {key: tuple(tuple(tuple(float(x) for x in q) for q in m["scatter"][phase])
                          for phase in ("prefill", "decode"))
               for key, m in doc["models"].items() if "scatter" in m}
    return Profile(models, kv, float(doc["control"]["lease_rtt_s"]), respond,
                   float(doc["copy"]["latency_s"]), float(doc["copy"]["bandwidth_bps"]), doc,
                   float(doc.get("fit", {}).get("load_factor", 1.0)),
                   contention, scatter, doc.get("fit", {}).get("copy_s"))


def copy_cost(runs: Sequence[dict]) -> tuple[float, int]:
    """What a page copy costs inside real runs, and from how many copies:
    the aqua steps' time outside model calls (their "cost_sums", timed by
    the engine) beyond what the baseline's steps, which copy nothing,
    paid there per model call, over the copies made. Lease round trips
    and the copies' waits for the cores are in it; runs measured before
    the engine timed its steps are refused."""
    sums = {"baseline": [0.0, 0.0, 0.0], "aqua": [0.0, 0.0, 0.0]}  # calls, copies, seconds
    for doc in runs:
        for mode, acc in sums.items():
            if "cost_sums" not in doc[mode]:
                raise ValueError(f"{doc.get('file', 'a run')}: no cost_sums (measured before "
                                 "the engine timed its steps)")
            for by_phase in doc[mode]["cost_sums"].values():
                for busy, (_, copies, _, seconds) in by_phase["steps"].items():
                    acc[0] += sum(by_phase[p].get(busy, [0.0])[0]
                                  for p in ("prefill", "decode"))
                    acc[1] += copies
                    acc[2] += seconds
    (base_calls, _, base_s), (calls, copies, seconds) = sums["baseline"], sums["aqua"]
    if not copies or not base_calls:
        raise ValueError("the runs made no page copies to time")
    return max(0.0, seconds - base_s / base_calls * calls) / copies, int(copies)


def responsiveness_scenario(tenants: Sequence[Any], profile: Profile, *, mode: str,
                            seed: int | None = None) -> Scenario:
    """bench/responsiveness.py's setup for `mode` ("baseline" or "aqua"):
    one tenant per aqua_demo.replay.ReplayTenant, each on its own device
    (the replay gives tenant i device i), its own KV budget and slice, the
    scheduler's defaults (no slice stretching, the engine's fcfs limits),
    whole-cache copies into a lease kept per request (LeaseKV), and every
    aqua step paying respond(). `seed`: each forward's cost scattered as
    the calibration timed it (Profile.scatter), drawn from that seed; None:
    every forward costs what the fit says."""
    if mode not in ("baseline", "aqua"):
        raise ValueError("mode is baseline or aqua")
    if seed is not None and set(profile.scatter) != set(profile.models):
        raise ValueError("the profile has no step scatter for every model (calibrated before "
                         "bench/calibrate.py kept it): predict at the mean costs (draws=0)")
    sim_tenants, arrivals = [], []
    for i, t in enumerate(tenants):
        key = f"llama-{t.size}"
        if key not in profile.models:
            raise ValueError(f"the profile has no costs for {key}")
        sim_tenants.append(SimTenant(t.name, key, i, kv_budget=t.kv_budget))
        arrivals += [Arrival(a.t, a.prompt_len, a.max_new, i) for a in t.arrivals]
    slices = {t.slice_tokens for t in tenants}
    if len(slices) != 1:
        raise ValueError("the simulator takes one slice length for all tenants")
    costs = {k: dataclasses.replace(profile.step_costs(k),
                                    step_s=profile.respond_s if mode == "aqua" else 0.0)
             for k in profile.models}
    arrivals.sort(key=lambda a: a.t)
    return Scenario(profile.server(len(sim_tenants)), tuple(sim_tenants), tuple(arrivals),
                    slice_tokens=slices.pop(), max_overhead=None, incremental="whole",
                    quantum_s=REPLAY_QUANTUM_S,
                    costs=costs, engine_limits=(256, 8192),
                    # A copy's cost from the runs has the round trip in it.
                    control_latency_s=profile.lease_rtt_s if profile.run_copy_s is None else 0.0,
                    contention=profile.contention or None,
                    scatter=None if seed is None else profile.scatter, seed=seed or 0)


MODE_POLICY = {"baseline": "fcfs", "aqua": "aqua"}
REPLAY_QUANTUM_S = 0.020  # demo/replay.py runs its aquad with --quantum-ms 20


def predict(tenants: Sequence[Any], profile: Profile, policy: dict[str, str] = MODE_POLICY,
            draws: int = 0) -> list[dict[str, dict]]:
    """The simulator's figures for both of bench/responsiveness.py's modes,
    one {mode: results} per draw: `draws` runs with scattered step costs
    (seeds 0 .. draws-1, the same in both modes), or with draws=0 one run
    at the mean costs. `policy`: the simulator's policy per mode (tests get
    one wrong)."""
    from .simulator import Simulation  # noqa: PLC0415

    seeds = list(range(draws)) if draws > 0 else [None]
    return [{mode: Simulation(responsiveness_scenario(tenants, profile, mode=mode, seed=seed),
                              policy[mode]).run()
             for mode in ("baseline", "aqua")} for seed in seeds]


def call_costs(profile: Profile, runs: Sequence[dict], mode: str,
               model: str | None = None) -> dict[int, tuple[int, float, float]]:
    """The model calls of real runs of `mode` (of `model` only, if given)
    against what the profile charges for them: per number of tenants with
    work when a call began, (calls, seconds they took, seconds the
    simulator charges: the fit's per-call cost, times the load factor and
    the contention for that count; the steps' own cost is not in it). From
    each run's "cost_sums" (every forward its engines made, timed by the
    engine); runs measured before the engine timed its calls are skipped."""
    out: dict[int, list[float]] = {}
    for doc in runs:
        for key, by_phase in doc[mode].get("cost_sums", {}).items():
            if model is not None and key != model:
                continue
            c = profile.step_costs(key)
            for phase in ("prefill", "decode"):
                for busy, (n, x_sum, _, seconds, _) in by_phase[phase].items():
                    b = int(busy)
                    slow = contention_factor(profile.contention.get(key), b)
                    acc = out.setdefault(b, [0.0, 0.0, 0.0])
                    acc[0] += n
                    acc[1] += seconds
                    acc[2] += slow * c.calls(phase, n, x_sum)
    return {b: (int(n), s, m) for b, (n, s, m) in sorted(out.items())}


def other_work(doc: dict) -> float | None:
    """The share of the machine's CPU that went to other work (niced
    processes, the hypervisor's steal) during a bench/responsiveness.py run
    (its "cpu_ticks"); None where not recorded (runs before it was). Other
    work also fills what the run leaves idle, so an idle workload shows
    more of it without being slowed by it."""
    ticks = doc.get("cpu_ticks")
    if not ticks or not sum(ticks.values()):
        return None
    return (ticks.get("nice", 0) + ticks.get("steal", 0)) / sum(ticks.values())


# What is compared, and within what: counts do not depend on the machine's
# load, so they are held to 10 %; times to 20 %.
TIME_BOUND, COUNT_BOUND = 0.20, 0.10
FIGURES = (
    ("TTFT p50 (ms), baseline", "baseline", "ttft_p50_s", 1e3, TIME_BOUND),
    ("TTFT p99 (ms), baseline", "baseline", "ttft_p99_s", 1e3, TIME_BOUND),
    ("TTFT p50 (ms), aqua", "aqua", "ttft_p50_s", 1e3, TIME_BOUND),
    ("TTFT p99 (ms), aqua", "aqua", "ttft_p99_s", 1e3, TIME_BOUND),
    ("preemptions, baseline", "baseline", "preemptions", 1, COUNT_BOUND),
    ("preemptions, aqua", "aqua", "preemptions", 1, COUNT_BOUND),
    ("KV MiB paged, aqua", "aqua", "bytes_paged", 2**-20, COUNT_BOUND),
)


@dataclass(frozen=True)
class Row:
    figure: str
    measured: float
    predicted: float
    bound: float | None  # relative; None: judged against the spread instead
    spread: tuple[float, float] | None = None  # measured min, max over repeats
    runs: tuple[float, ...] = ()  # each repeat's measured value
    draws: tuple[float, ...] = ()  # each simulator draw's value

    @property
    def sem(self) -> float:
        """The measured mean's standard error, relative to it (0 for one
        run): how far another set of as many repeats could put the mean."""
        if len(self.runs) < 2 or self.measured == 0:
            return 0.0
        return statistics.stdev(self.runs) / math.sqrt(len(self.runs)) / abs(self.measured)

    @property
    def run_spread(self) -> float:
        """How far the repeats differ: (max - min) / mean; 0 for one run.
        Where it exceeds the bound, no prediction could meet the bound on
        every run: the measurement is the limit, not the model."""
        if len(self.runs) < 2 or self.measured == 0:
            return 0.0
        return (max(self.runs) - min(self.runs)) / abs(self.measured)

    @property
    def error(self) -> float:
        if self.measured == 0:
            return 0.0 if self.predicted == 0 else float("inf")
        return (self.predicted - self.measured) / self.measured

    @property
    def ok(self) -> bool:
        if self.spread is not None:
            lo, hi = self.spread
            if hi > lo:  # repeats: the prediction must fall inside their spread
                return lo <= self.predicted <= hi
        # One run, or repeats that agree: a zero stays zero, else the bound.
        if self.measured == 0:
            return self.predicted == 0
        return abs(self.error) <= (self.bound if self.bound is not None else TIME_BOUND)


def ratio(doc: dict, key: str) -> float:
    return doc["baseline"][key] / doc["aqua"][key] if doc["aqua"][key] else float("inf")


def compare(measured: Sequence[dict], predicted: Sequence[dict]) -> list[Row]:
    """Rows for one workload: `measured` are its repeats (bench/responsiveness.py
    JSON), `predicted` the simulator's draws (predict()); each figure is
    the mean over either, the baseline/aqua TTFT ratios are judged against
    the repeats' spread."""
    rows = []
    for name, mode, key, scale, bound in FIGURES:
        values = [scale * doc[mode][key] for doc in measured]
        sims = [scale * doc[mode][key] for doc in predicted]
        rows.append(Row(name, statistics.fmean(values), statistics.fmean(sims), bound,
                        runs=tuple(values), draws=tuple(sims)))
    for q in ("p50", "p99"):
        key = f"ttft_{q}_s"
        values = [ratio(doc, key) for doc in measured]
        sims = [ratio(doc, key) for doc in predicted]
        rows.append(Row(f"TTFT {q} baseline/aqua", statistics.fmean(values),
                        statistics.fmean(sims), None, (min(values), max(values)),
                        runs=tuple(values), draws=tuple(sims)))
    return rows
