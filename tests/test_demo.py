"""The README's main job, end to end with a tiny configuration."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end():
    out = subprocess.run([sys.executable, "-m", "aqua.demo", "--layers", "2", "--layer-mib",
                          "2", "--host-devices", "2x32MiB"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert text.count("bit-exact") == 2
    assert "aquactl status, while the tenants hold their leases" in text
    assert "LEASE" in text and "llama-2-7b" in text and "mistral-7b" in text
    assert "segments left behind: 0" in text and "demo passed" in text
