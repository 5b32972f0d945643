"""The book runs without the optional Triton extra (Triton does not install on macOS or Windows): every notebook
whose code mentions Triton runs to the end, asserts included, with ``import triton`` made to fail."""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "chapters").glob("*.ipynb")
                   if any("triton" in "".join(c["source"]) for c in json.loads(p.read_text())["cells"]
                          if c["cell_type"] == "code"))
BLOCK = "import sys\nsys.modules['triton'] = None  # as if triton were not installed: `import triton` fails\n"


def test_the_chapters_that_use_triton_are_found():
    assert "09_cost_and_scale.ipynb" in {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_triton(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(BLOCK))
    from jupyter_client import KernelManager

    # a Unix socket, not TCP ports: `make test` runs the unit tests twice side by side, and two kernels started
    # at the same moment can be handed the same free ports (see conftest.py)
    km = KernelManager(kernel_name="python3", transport="ipc",
                       ip=os.path.join(tempfile.gettempdir(), f"bnbook-kernel-{uuid.uuid4().hex[:16]}"))
    client = nbclient.NotebookClient(nb, km=km, timeout=600, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [(i, o["ename"], o["evalue"][:300]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Triton kernels: not installed" in printed or path.stem != "09_cost_and_scale"
