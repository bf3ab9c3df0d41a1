"""Calibrate the simulator to the CPU engine: time it, fit a cost profile.

Three kinds of cost, each measured on this machine with the real code:

- **compute**: `aqua.engine.Engine.step()` on the replay's models (demo/replay.py
  MODEL_SIZES), steps of random shapes; per model a least-squares fit of
  prefill steps to `step + per_prompt x prompts + per_token x prompt tokens`
  and of decode steps to `step + per_request x batch + per_kv_token x KV
  tokens` (the engine decodes each request at batch 1, so a step is a sum of
  per-request forwards). Each model is timed alone, one process at a time
  (what a step costs with the machine to itself); then in pairs and all
  three at once, as bench/responsiveness.py runs its tenants, to measure
  how much dearer sharing the cores makes a step with 2 and 3 processes
  computing. The simulator applies that slowdown to the engines that have
  work at the time (Scenario.contention) rather than folding one
  contention level into every step: an idle trace runs each tenant alone,
  a burst runs all three.
- **control**: a lease/release round trip to a real aquad, and `respond()`
  holding a turn (what every aqua step pays);
- **copies**: the engine's own page-out and page-in (`LeaseKV.save` / `load`,
  a real KV cache into a lease's shared memory and back), fitted to
  `latency + bytes / bandwidth`.
- **scatter**: steps do not all cost their mean. Per model, phase and number
  of processes computing, quantiles of each timed step's cost over what the
  fit (times the slowdown, with others computing) says it costs, every step
  counted, descheduled ones too: the simulator resamples them
  (Scenario.scatter) where it runs with a seed.

    python bench/calibrate.py [--seconds 15] [--out bench/profiles/cpu-llama.json]

The profile (JSON) names the command, date, machine and load average;
`aqua_sim.cpu` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "profiles", "cpu-llama.json")
BIG = 32 << 20  # bytes of the copy that measures bandwidth


def _lstsq(rows: list[list[float]], ys: list[float], trim: float = 0.1) -> list[float]:
    """Least squares, refitted without the `trim` fraction of samples the
    first fit misses most (relatively): on a shared machine a few steps are
    descheduled, and one such step would pull the whole fit."""
    import numpy as np  # noqa: PLC0415

    a, y = np.array(rows, dtype=float), np.array(ys, dtype=float)
    coef = _nonnegative(a, y)
    if trim and len(y) >= 20:
        miss = np.abs(a @ coef - y) / y
        keep = miss <= np.quantile(miss, 1 - trim)
        coef = _nonnegative(a[keep], y[keep])
    return [float(c) for c in coef]


def _nonnegative(a, y):
    """Least squares with every coefficient >= 0 (no cost is negative; noise
    on a loaded machine can make a free fit say so): drop the most negative
    term and refit until none is."""
    import numpy as np  # noqa: PLC0415

    free = list(range(a.shape[1]))
    while True:
        coef = np.zeros(a.shape[1])
        sol, *_ = np.linalg.lstsq(a[:, free], y, rcond=None)
        coef[free] = sol
        if (sol >= 0).all() or len(free) == 1:
            return np.maximum(coef, 0.0)
        free.pop(int(np.argmin(sol)))


def _rel_rms(rows: list[list[float]], ys: list[float], coef: list[float]) -> float:
    err = [(sum(c * x for c, x in zip(coef, row)) - y) / y for row, y in zip(rows, ys)]
    return (sum(e * e for e in err) / len(err)) ** 0.5


def time_model(size: str, seconds: float, seed: int,
               ready: Callable[[], None] | None = None) -> dict:
    """Time Engine.step() on one model for `seconds`: random batches of
    prompts (4-96 tokens, as the replay draws them), each prefilled in one
    step, then decoded for a random number of steps. `ready`: called once
    the model is built, returning when the timing is to start."""
    import torch  # noqa: PLC0415

    from aqua.engine import Engine, PromptScheduler  # noqa: PLC0415
    from aqua_demo.replay import VOCAB, build_model  # noqa: PLC0415

    torch.set_num_threads(1)  # as each replay tenant runs
    model = build_model(size, seed)
    rng = random.Random(seed)
    prefill: list[tuple[int, int, float]] = []  # (prompts, tokens, seconds)
    decode: list[tuple[int, int, float]] = []  # (batch, kv tokens, seconds)
    kv_per_token = 0
    if ready is not None:
        ready()
    end = time.monotonic() + seconds
    first = True
    while time.monotonic() < end:
        engine = Engine(model, PromptScheduler("fcfs", 1 << 20, 5))
        # Half the steps prefill one prompt: with k prompts of similar length
        # the prompt count and the token count rise together, and a fit over
        # them alone cannot tell a per-prompt cost from a per-token one. 4-96
        # tokens: the burst draws 16-96, the traces' prompts /10 give 4-96.
        k = 1 if rng.random() < 0.5 else rng.randint(2, 6)
        reqs = [engine.submit([rng.randrange(VOCAB) for _ in range(rng.randint(4, 96))], 41)
                for _ in range(k)]
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if not first:  # the very first forward pays one-off allocations
            prefill.append((k, sum(len(r.prompt) for r in reqs), dt))
        first = False
        if not kv_per_token:
            cache = engine._caches[reqs[0].id]
            nbytes = sum(t.numel() * t.element_size() for layer in cache.layers
                         for t in (layer.keys, layer.values))
            kv_per_token = nbytes // len(reqs[0].prompt)
        for _ in range(rng.randint(2, 39)):
            # KV tokens each decode reads: prompt + tokens so far (the cache
            # holds all but the last, which is this step's input).
            kv = sum(len(r.prompt) + len(r.tokens) for r in reqs)
            t0 = time.perf_counter()
            engine.step()
            decode.append((k, kv, time.perf_counter() - t0))
        engine.close()
    return {"size": size, "prefill": prefill, "decode": decode, "kv_bytes_per_token": kv_per_token}


def fit_model(samples: dict) -> dict:
    pre, dec = samples["prefill"], samples["decode"]
    prow, py = [[1.0, k, n] for k, n, _ in pre], [t for *_, t in pre]
    drow, dy = [[1.0, k, n] for k, n, _ in dec], [t for *_, t in dec]
    p, d = _lstsq(prow, py), _lstsq(drow, dy)
    return {
        "kv_bytes_per_token": samples["kv_bytes_per_token"],
        "prefill": {"step_s": p[0], "per_prompt_s": p[1], "per_token_s": p[2],
                    "samples": len(pre), "rel_rms": _rel_rms(prow, py, p)},
        "decode": {"step_s": d[0], "per_request_s": d[1], "per_kv_token_s": d[2],
                   "samples": len(dec), "rel_rms": _rel_rms(drow, dy, d)},
    }


def time_control_and_copies(seed: int, rounds: int = 200) -> dict:
    """Against a private aquad, as the replay runs one: lease round trips,
    respond() in a turn, and the engine's page-out/page-in of real caches."""
    import torch  # noqa: PLC0415

    import aqua  # noqa: PLC0415
    from aqua.engine import Engine, PromptScheduler  # noqa: PLC0415
    from aqua.engine.runner import LeaseKV  # noqa: PLC0415
    from aqua.tensors import pack  # noqa: PLC0415
    from aqua.testing import PrivateDaemon  # noqa: PLC0415
    from aqua_demo.replay import VOCAB, build_model  # noqa: PLC0415

    torch.set_num_threads(1)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="aqua-calibrate-") as tmp:
        socket = os.path.join(tmp, "aquad.sock")
        daemon = PrivateDaemon(socket, ["--host-devices", "3x512MiB", "--quantum-ms", "20",
                                        "--log-level", "warning"])
        daemon.start()
        try:
            client = aqua.connect("calibrate", 0, socket=socket)
            try:
                lease_s = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    lease = client.lease(rng.choice((64, 256, 512)) * 1024)
                    lease.release()
                    lease_s.append(time.perf_counter() - t0)
                respond_s = []
                with client.turn():
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        client.respond()
                        respond_s.append(time.perf_counter() - t0)
                copies = []  # (direction, bytes, seconds)
                kv = LeaseKV(client)
                for size in ("small", "medium", "large"):
                    model = build_model(size, seed)
                    engine = Engine(model, PromptScheduler("fcfs", 1 << 20, 5))
                    for i in range(rounds // 4):
                        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(16, 136))]
                        r = engine.submit(prompt, 2)
                        engine.step()
                        cache = engine._caches[r.id]
                        n = sum(t.numel() * t.element_size() for layer in cache.layers
                                for t in (layer.keys, layer.values))
                        rid = 1000 * i + len(copies)
                        t0 = time.perf_counter()
                        kv.save(rid, cache)
                        t1 = time.perf_counter()
                        kv.load(rid, engine._new_cache)
                        t2 = time.perf_counter()
                        kv.drop(rid)
                        copies += [("out", n, t1 - t0), ("in", n, t2 - t1)]
                        engine.step()  # finishes the request
                    engine.close()
                kv.close()
                big = []
                lease = client.lease(BIG)
                buf = torch.ones(BIG, dtype=torch.uint8)
                for _ in range(7):
                    t0 = time.perf_counter()
                    pack(lease, [buf])
                    big.append(time.perf_counter() - t0)
                lease.release()
            finally:
                client.close()
        finally:
            daemon.stop()
    # The engine's copies are small (9-400 KiB): their time is mostly fixed
    # cost, and the slope of a fit over them is noise on a loaded machine.
    # The bandwidth comes from a 32 MiB copy instead; the latency is what
    # the engine's own copies take beyond it (median).
    big_s = sorted(big)
    per_byte = big_s[len(big_s) // 2] / BIG
    extra = sorted(t - n * per_byte for _, n, t in copies)
    lat = max(0.0, extra[len(extra) // 2])
    rows = [[1.0, n] for _, n, _ in copies]
    ys = [t for *_, t in copies]
    lease_s.sort()
    respond_s.sort()
    return {
        "control": {"lease_rtt_s": lease_s[len(lease_s) // 2],
                    "lease_rtt_p90_s": lease_s[int(0.9 * len(lease_s))],
                    "respond_s": respond_s[len(respond_s) // 2], "rounds": rounds},
        "copy": {"latency_s": lat, "bandwidth_bps": 1.0 / per_byte if per_byte > 0 else 0.0,
                 "samples": len(copies), "rel_rms": _rel_rms(rows, ys, [lat, per_byte]),
                 "bandwidth_copy_bytes": BIG, "bandwidth_copy_s": big_s,
                 "bytes_range": [min(n for _, n, _ in copies), max(n for _, n, _ in copies)]},
    }


def _time_children(sizes: list[str], seconds: float, seed: int) -> dict[str, dict]:
    """time_model() for each of `sizes`, one process each, all at once: the
    timing starts in all of them at the same instant, once every one has
    built its model (the imports take seconds, and differently long: started
    unaligned, processes meant to compute together overlapped for only part
    of their timing)."""
    procs = [subprocess.Popen([sys.executable, __file__, "--child", size, str(seconds),
                               str(seed + i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
             for i, size in enumerate(sizes)]
    for size, proc in zip(sizes, procs):
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"timing {size} failed to start")
    start = time.monotonic() + 0.1  # CLOCK_MONOTONIC: one clock for all processes
    for proc in procs:
        proc.stdin.write(f"{start!r}\n")
        proc.stdin.flush()
    samples = {}
    for size, proc in zip(sizes, procs):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"timing {size} exited {proc.returncode}")
        samples[size] = json.loads(out.strip().splitlines()[-1])
    return samples


def _slowdown(fit: dict, decode: list) -> float:
    """Measured decode time over what the fit (alone) predicts for the same
    steps, in total: the mean slowdown, which is what a request's time sums."""
    d = fit["decode"]
    predicted = sum(d["step_s"] + d["per_request_s"] * k + d["per_kv_token_s"] * n
                    for k, n, _ in decode)
    return sum(t for *_, t in decode) / predicted if predicted > 0 else float("nan")


QUANTILES = 41  # points of each scatter distribution kept (0, 2.5, ..., 100 %)


TERMS = {"prefill": ("step_s", "per_prompt_s", "per_token_s"),
         "decode": ("step_s", "per_request_s", "per_kv_token_s")}


def _scatter(fit: dict, phase: str, steps: list, slowdown: float) -> list[float]:
    """Quantiles of measured over predicted cost (the fit for `phase`,
    times `slowdown`) over `steps` ((count, tokens, seconds) each)."""
    import numpy as np  # noqa: PLC0415

    step, per, third = (fit[phase][t] for t in TERMS[phase])
    ratios = [t / (slowdown * (step + per * k + third * n)) for k, n, t in steps]
    return [float(x) for x in np.quantile(ratios, np.linspace(0, 1, QUANTILES))]


def child_main(size: str, seconds: float, seed: int) -> int:
    def ready() -> None:  # then wait for the start all the processes share
        print("ready", flush=True)
        start = float(sys.stdin.readline())
        time.sleep(max(0.0, start - time.monotonic()))

    print(json.dumps(time_model(size, seconds, seed, ready)), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="timing per model alone (half that all at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "SECONDS", "SEED"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child[0], float(args.child[1]), int(args.child[2]))
    from responsiveness import cpu_ticks  # noqa: PLC0415 (bench/, beside this script)

    load_before = os.getloadavg()
    ticks_before = cpu_ticks()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    sizes = ("small", "medium", "large")
    # Each model alone: the costs. Then in pairs and all three at once, as
    # the replay's tenants run: how much sharing the cores slows a step.
    solo: dict[str, dict] = {}
    for i, size in enumerate(sizes):
        solo.update(_time_children([size], args.seconds, args.seed + i))
    models = {f"llama-{size}": fit_model(solo[size]) for size in sizes}
    pairs: dict[str, dict] = {size: {"prefill": [], "decode": []} for size in sizes}
    for i in range(len(sizes)):
        pair = [sizes[i], sizes[(i + 1) % len(sizes)]]
        for size, got in _time_children(pair, args.seconds / 3, args.seed + 10 + i).items():
            for phase in ("prefill", "decode"):
                pairs[size][phase] += got[phase]
    together = _time_children(list(sizes), args.seconds / 2, args.seed + 20)
    slowdown = {f"llama-{size}": [1.0, _slowdown(models[f"llama-{size}"], pairs[size]["decode"]),
                                  _slowdown(models[f"llama-{size}"], together[size]["decode"])]
                for size in sizes}
    for size in sizes:
        fit, slow = models[f"llama-{size}"], slowdown[f"llama-{size}"]
        runs = (solo[size], pairs[size], together[size])  # 1, 2, 3 processes computing
        fit["scatter"] = {}
        for phase in ("prefill", "decode"):
            tables = []
            for i, got in enumerate(runs):
                # A short timing may catch no prefill with others computing:
                # the table for fewer processes stands in.
                tables.append(_scatter(fit, phase, got[phase], slow[i]) if got[phase]
                              else tables[-1])
            fit["scatter"][phase] = tables
    rest = time_control_and_copies(args.seed)
    profile = {
        "command": "python bench/calibrate.py " + " ".join(sys.argv[1:]),
        "date": started,
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "cpu_ticks": {k: v - ticks_before.get(k, 0)
                                  for k, v in cpu_ticks().items()}},
        "timing": {"alone": "one process at a time", "threads_per_process": 1,
                   "seconds_per_model": args.seconds},
        "models": models,
        # Per model, its decode steps' time with 1, 2 and 3 processes
        # computing at once over what its fit (alone) predicts (in total): the
        # simulator's Scenario.contention.
        "contention": {"slowdown": slowdown, "cores": os.cpu_count(),
                       "seconds": {"pairs": args.seconds / 3, "three": args.seconds / 2}},
        **rest,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=2)
        f.write("\n")
    for name, m in models.items():
        p, d = m["prefill"], m["decode"]
        print(f"{name:13} prefill {p['step_s'] * 1e3:6.2f} ms + {p['per_prompt_s'] * 1e3:5.2f} ms"
              f"/prompt + {p['per_token_s'] * 1e6:5.1f} us/token (rms {p['rel_rms']:.0%});"
              f" decode {d['step_s'] * 1e3:5.2f} ms + {d['per_request_s'] * 1e3:5.2f} ms/req"
              f" + {d['per_kv_token_s'] * 1e9:5.1f} ns/KV token (rms {d['rel_rms']:.0%});"
              f" KV {m['kv_bytes_per_token']} B/token")
    print("decode steps with 2 and 3 processes at once, over the fit alone: "
          + ", ".join(f"{k} {v[1]:.2f}x, {v[2]:.2f}x" for k, v in slowdown.items()))
    c, k = rest["control"], rest["copy"]
    print(f"lease round trip {c['lease_rtt_s'] * 1e6:.0f} us, "
          f"respond() {c['respond_s'] * 1e6:.1f} us;"
          f" page copies {k['latency_s'] * 1e6:.0f} us + {k['bandwidth_bps'] / 1e9:.2f} GB/s"
          f" (rms {k['rel_rms']:.0%})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
