"""What `pip install .` ships, and what importing each part loads.

Every module of the source trees ships under its import name (no bare
`client`, `protocol`, `demo` or `sim` package), and the import graph is the
design's: the protocol imports neither side, the daemon never loads the
tenant library, the tenant library loads neither the daemon nor the tools."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TREES = {"client": "aqua", "protocol": "aqua_protocol", "aquad": "aquad", "demo": "aqua_demo",
         "sim": "aqua_sim"}


def test_the_wheel_holds_every_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("aqua-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"{TREES[tree]}/{path.relative_to(ROOT / tree).as_posix()}"
            for tree in TREES for path in (ROOT / tree).rglob("*.py")}
    assert want - names == set()
    assert not any(n.startswith(("client/", "protocol/", "demo/", "sim/")) for n in names)


def _loaded_by(module: str) -> set[str]:
    # A fresh interpreter: what `import module` pulls in, by top-level name.
    code = (f"import sys, {module}; "
            "print(' '.join(sorted({m.split('.')[0] if not m.startswith('aqua.') else m "
            "for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(("module", "forbidden"), [
    ("aqua_protocol", {"aqua", "aquad", "aqua_demo", "aqua_sim", "zmq", "torch", "trio"}),
    ("aquad.core.arbiter", {"aqua", "aqua_demo", "aqua_sim", "zmq", "torch", "trio"}),
    ("aquad.main", {"aqua", "aqua_demo", "aqua_sim", "zmq", "torch"}),
    ("aquad.metrics", {"aqua", "aqua_demo", "aqua_sim", "zmq", "torch"}),
    ("aqua", {"aquad", "aqua_demo", "aqua_sim", "torch", "trio"}),
    ("aqua.engine", {"aquad", "aqua_demo", "aqua_sim", "torch"}),
    # The in-process daemon for tests loads the daemon's core, by design.
    ("aqua.inprocess", {"aqua_demo", "aqua_sim", "torch", "trio"}),
])
def test_the_import_graph_is_the_designs(module, forbidden):
    assert _loaded_by(module) & forbidden == set()


def test_only_the_in_process_testing_module_of_the_tenant_library_imports_the_daemon():
    """The tenant library talks to aquad over the protocol alone; the one
    exception is aqua.inprocess, which runs the arbiter in the test's own
    process (its docstring says what for) and which `import aqua` never loads."""
    importers = set()
    for path in (ROOT / "client").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "aquad" or n.startswith("aquad.") for n in names):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"client/inprocess.py"}
