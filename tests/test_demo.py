"""The README's main job, end to end with a tiny configuration."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    plot, moves = tmp_path / "ttft.png", tmp_path / "reclaim.png"
    out = subprocess.run([sys.executable, "-m", "aqua_demo.main", "--layers", "2", "--layer-mib",
                          "2", "--host-devices", "2x32MiB", "--requests", "6", "--burst", "4",
                          "--plot", str(plot), "--elastic-leases", "2",
                          "--elastic-lease-mib", "2", "--elastic-plot", str(moves)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    assert len(re.findall(r"\] restored .*: bit-exact", text)) == 2
    assert "aquactl status, while the tenants hold their leases" in text
    assert "LEASE" in text and "llama-2-7b" in text and "mistral-7b" in text
    assert "segments left behind: 0" in text and "demo passed" in text
    # Part 3: the borrowers' 4 leases sat on the lender's device 0 and all
    # moved to device 2; nothing fenced, every check bit-exact.
    assert text.count("into leases on device(s) [0]") == 2
    rows = re.findall(r"^borrower-[ab] +L\S+ +2\.0 MiB +dev 0 +2 +host", text, re.M)
    assert len(rows) == 4
    assert "moved 4 leases (8.0 MiB), released 0, fenced = 0" in text
    assert "borrowers' bytes through the move: bit-exact" in text and "elastic done" in text
    assert moves.stat().st_size > 10_000 and moves.read_bytes()[:4] == b"\x89PNG"
    # Part 2: both modes served every request; the table and the plot are there.
    assert "TTFT p99 (ms)" in text and "throughput (tokens/s)" in text
    assert "burst done" in text
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    # The demo says where aquad's metrics are, and its figures read the same there:
    # two tenants holding two 2 MiB leases each.
    assert re.search(r"Prometheus metrics: http://127\.0\.0\.1:\d+/metrics", text)
    assert re.search(r"leases held now +4 +\(aquad_leases\)", text)
    assert re.search(r"MiB granted +8 +\(aquad_lease_granted_bytes_total\)", text)
    aqua = text[text.index("== aqua: aquad's figures"):]
    grants = re.search(r"GPU-time slices granted +(\d+)", aqua)
    assert grants and int(grants.group(1)) > 0  # aqua mode takes turns


def test_a_byte_that_differs_after_a_move_fails_the_demo(tmp_path):
    out = subprocess.run([sys.executable, "-m", "aqua_demo.main", "--part", "elastic",
                          "--elastic-leases", "1", "--elastic-lease-mib", "1",
                          "--elastic-plot", str(tmp_path / "r.png"), "--elastic-corrupt"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "MISMATCH in" in out.stdout and "elastic FAILED" in out.stdout
