"""GPU check: the cuda backend's data path against the raw copies it rides on.

Starts a private `aquad --backend cuda` and, from this process as the tenant
on GPU 0, pages a tensor out to a lease and back in (aqua.TensorPager:
page_out + page_in, the preemption path). Each lease kind the machine offers
is measured against the limit of the same two copies measured in the same run:

  peer GPU    lease on the best other GPU (NVLink or PCIe peer-to-peer),
              vs a raw device-to-device torch copy between the same GPUs
  own GPU     lease on GPU 0 itself (what a single GPU has),
              vs a raw device-to-device copy within GPU 0
  host tier   lease in pinned shared memory,
              vs cudaMemcpy D2H + H2D with torch's own pinned memory

and each GPU lease against the pinned-host limit too: what offloading to a
GPU gains over host DRAM. Without a GPU it says why and exits 2.

    python bench/gpu_check.py [--mib 1024] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable

from _common import aquad, write_json

from aqua.errors import AquaError

EXIT_NO_GPU = 2


def no_gpu_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "this torch build sees no CUDA GPU"
    from aquad.backends import cuda_unavailable

    return cuda_unavailable()


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def raw_copy(src_device: str, dst: str, n: int, repeats: int) -> float:
    """Seconds for one copy out and one back between `src_device` and `dst`
    ('cuda:N', or 'pinned' for torch's page-locked host memory)."""
    import torch

    a = torch.randint(0, 256, (n,), dtype=torch.uint8, device=src_device)
    b = torch.empty(n, dtype=torch.uint8, pin_memory=True) if dst == "pinned" \
        else torch.empty(n, dtype=torch.uint8, device=dst)

    def both() -> None:
        b.copy_(a, non_blocking=True)
        a.copy_(b, non_blocking=True)
        for d in {a.device, b.device}:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    both()  # warm up: peer access, contexts
    return best_of(both, repeats)


def lease_cycle(socket: str, n: int, repeats: int) -> dict:
    """Page a GPU-0 tensor out to a lease and back; where the lease went and
    the seconds for the pair."""
    import torch

    import aqua

    with aqua.connect("gpu-check", 0, socket=socket) as client:
        x = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0")
        expect = x.clone()
        pager = aqua.TensorPager(client, [x])
        pager.page_out()  # warm up: lease, mapping, pinning, peer access
        pager.page_in()
        lease = pager._entries[0].lease
        where = {"device": lease.device, "tier": lease.tier, "kind": lease.kind}
        seconds = best_of(lambda: (pager.page_out(), pager.page_in()), repeats)
        if not torch.equal(x, expect):
            raise AssertionError("bytes changed on the way through the lease")
        pager.close()
        del expect
    return dict(where, seconds=seconds)


def scenario(tmp: str, label: str, args: list[str], n: int, repeats: int) -> dict | None:
    print(f"\n$ aquad --backend cuda {' '.join(args)}")
    try:
        with aquad(tmp, "--backend", "cuda", "--log-level", "warning", *args) as socket:
            got = lease_cycle(socket, n, repeats)
    except AquaError as exc:
        print(f"  {label}: not measured ({exc})")
        return None
    print(f"  {label}: lease on device {got['device']} ({got['kind']}, tier {got['tier']})")
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="tensor size (default 1024)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    why = no_gpu_reason()
    if why:
        print(f"gpu_check: no GPU to measure: {why}", file=sys.stderr)
        return EXIT_NO_GPU
    import torch

    n = args.mib * 2**20
    ngpu = torch.cuda.device_count()
    print(f"$ {' '.join([sys.executable, *sys.argv])}")
    print(f"{ngpu} GPU(s): " + ", ".join(torch.cuda.get_device_name(i) for i in range(ngpu)))
    pinned = raw_copy("cuda:0", "pinned", n, args.repeats)
    rows, out = [], {"bytes": n, "pinned_host_gbps": 2 * n / pinned / 1e9, "leases": {}}
    with tempfile.TemporaryDirectory(prefix="aqua-gpu-") as tmp:
        runs = [("host tier", ["--gpu-reserve", "1024TiB", "--host-pinned", f"{2 * args.mib}MiB"]),
                ("own GPU", ["--gpu-reserve", "1024TiB,0=0", "--host-pinned", "0"])]
        if ngpu > 1:
            runs.insert(0, ("peer GPU", ["--host-pinned", "0"]))
        for label, daemon_args in runs:
            got = scenario(tmp, label, daemon_args, n, args.repeats)
            if got is None:
                continue
            if got["kind"] == "posix_shm":
                limit, limit_label = pinned, "pinned cudaMemcpy D2H+H2D"
            else:
                # The lease's device in aqua ids (nvidia-smi) is this process's
                # ordinal unless CUDA_VISIBLE_DEVICES reorders: good enough here.
                limit = raw_copy("cuda:0", f"cuda:{got['device']}", n, args.repeats)
                limit_label = f"raw copy cuda:0 <-> cuda:{got['device']}"
            lease_gbps = 2 * n / got["seconds"] / 1e9
            row = {"device": got["device"], "tier": got["tier"], "kind": got["kind"],
                   "lease_gbps": lease_gbps, "limit": limit_label,
                   "limit_gbps": 2 * n / limit / 1e9, "ratio": limit / got["seconds"],
                   "vs_pinned_host": pinned / got["seconds"]}
            rows.append((label, row))
            out["leases"][label] = row
    print(f"\npage out + page in of {args.mib} MiB from cuda:0 (best of {args.repeats})")
    print(f"{'':10} {'lease GB/s':>10} {'limit GB/s':>10} {'x limit':>8} {'x pinned':>9}  limit")
    for label, r in rows:
        print(f"{label:10} {r['lease_gbps']:10.1f} {r['limit_gbps']:10.1f} {r['ratio']:8.3f} "
              f"{r['vs_pinned_host']:9.2f}  {r['limit']}")
    print(f"pinned host limit: {out['pinned_host_gbps']:.1f} GB/s")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
