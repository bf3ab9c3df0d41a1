"""bench/scale.py --quick runs end to end and writes its figures (no timing
is asserted: speed is the benchmark's business, not the test suite's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "scale.py"


def test_scale_bench_quick_reports_every_figure_per_size(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["sizes"] == [10, 100]
    for part, keys in (("scheduler", {"handover_s", "next_deadline_s"}),
                       ("reference", {"handover_s", "next_deadline_s"}),
                       ("aquad", {"handover_p50_s", "heartbeat_behind_handover_p50_s",
                                  "fill_s", "fill_per_turn_s", "sigterm_s"})):
        rows = doc[part]["rows"]
        assert list(rows) == ["10", "100"]
        for row in rows.values():
            assert set(row) == keys and all(v > 0 for v in row.values())
        assert doc[part]["ratio"]["10"] == {k: 1.0 for k in keys}
    assert "through aquad" in proc.stdout
