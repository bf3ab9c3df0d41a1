"""bench/faults.py --quick runs every attack end to end and every row passes
(its limits are loose enough for a shared 2-core machine; the full run's
figures are the benchmark's business)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "faults.py"
ATTACKS = ["routing-id squat", "fd exhaustion", "status flooders", "impostor daemon",
           "churn", "hog", "quota exhaustion"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to run attackers and tenants as other users")


def test_quick_faults_bench_passes_every_attack(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    doc = json.loads(out.read_text())
    assert doc["quick"] is True
    assert [r["attack"] for r in doc["rows"]] == ATTACKS
    for row in doc["rows"]:
        assert row["passed"], (row, proc.stdout, proc.stderr)
        assert row["trials"] >= 1 and row["crashes"] == 0 and row["check_ok"]
        assert row["samples_during"] > 0 and row["honest_errors"] == []
        assert 0 < row["rss_before_mib"] <= row["rss_peak_mib"]
        assert row["p99_during_ms"] <= row["p99_limit_ms"]
    assert proc.returncode == 0, proc.stderr
    assert "routing-id squat" in proc.stdout and "row checks:" in proc.stdout
