"""bench/core.py runs end to end and writes its documented figures (no timing
is asserted: speed is the benchmark's business, not the test suite's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "core.py"
STATUS = SCRIPT.with_name("status.py")


def test_core_bench_measures_each_layout_against_its_own_echo(tmp_path):
    out = tmp_path / "core.json"
    layouts = "split,shared,free" if len(os.sched_getaffinity(0)) >= 2 else "shared,free"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "500", "--mib", "1",
                           "--layouts", layouts, "--e2e-mib", "1,2", "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert list(doc["layouts"]) == layouts.split(",")
    for name, rows in doc["layouts"].items():
        echo = rows["echo"]
        for key in ("heartbeat", "grant", "release"):
            q = rows[key]
            assert q["n"] == 500 and q["p50_us"] > 0
            assert q["ratio_p50"] == q["p50_us"] / echo["p50_us"]
        pinned = name != "free"
        assert bool(rows["client_cpus"]) is pinned and bool(rows["server_cpus"]) is pinned
    assert doc["layouts"]["shared"]["client_cpus"] == doc["layouts"]["shared"]["server_cpus"]
    assert doc["bandwidth"]["ratio"] > 0 and doc["api"]["n"] == 100
    for key in ("decode", "encode"):
        c = doc["codec"][key]
        assert c["ratio"] == pytest.approx(c["us"] / c["msgpack_us"]) and c["us"] > 0
    assert "lease grant" in proc.stdout
    setups = doc["end_to_end"]
    assert list(setups) == ["shm", "huge", "kept"]
    assert setups["shm"]["dir"] == "/dev/shm" and setups["kept"]["keep_bytes"] > 0
    for setup in setups.values():
        assert [r["bytes"] for r in setup["rows"]] == [2**20, 2**21]
        for row in setup["rows"]:
            assert row["ratio"] == row["plain_ms"] / row["aqua_ms"]
            assert row["stall_aqua_max_ms"] >= row["stall_aqua_p50_ms"] >= 0
    bad = subprocess.run([sys.executable, str(SCRIPT), "--layouts", "sideways"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown layout" in bad.stderr


def test_status_bench_fills_and_walks_at_each_count(tmp_path):
    out = tmp_path / "status.json"
    proc = subprocess.run([sys.executable, str(STATUS), "--counts", "50,1200", "--rounds", "5",
                           "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert list(doc["counts"]) == ["50", "1200"]
    for count, row in doc["counts"].items():
        assert row["walked"] == int(count)
        assert row["summary"]["n"] == 5 and row["summary"]["bytes"] < row["first_page"]["bytes"]
