"""What `pip install .` ships: every module of the three source trees, under
the names tenants import, and no bare `client` or `protocol` package."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
TREES = {"client": "aqua", "protocol": "aqua/protocol", "aquad": "aquad"}


def test_the_wheel_holds_every_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("aqua-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"{TREES[tree]}/{path.relative_to(ROOT / tree).as_posix()}"
            for tree in TREES for path in (ROOT / tree).rglob("*.py")}
    assert want - names == set()
    assert not any(n.startswith(("client/", "protocol/")) for n in names)
