"""Repository-wide pytest hooks: nbval's output comparison made numeric (``tools/nbval_numeric.py``), and
per-notebook run times for nbval runs (printed at the end of `make test`)."""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path

from tools import nbval_numeric

nbval_numeric.install()

# Progress bars belong to live sessions: the stored outputs are made without them (scripts/run_notebook.py), so
# the notebooks nbval runs here draw none either (bnlib.lab.train.progress_bar).
os.environ.setdefault("BNLIB_PROGRESS", "0")


def _kernels_over_unix_sockets() -> None:
    """nbval's kernels talk over Unix sockets instead of TCP ports.

    `make test` runs two nbval sessions side by side (one per numeric configuration); with TCP, two kernels
    started at the same moment can be handed the same free ports, and one session then waits forever.
    """
    try:
        import nbval.kernel
    except ImportError:
        return
    base = nbval.kernel.KernelManager

    class IpcKernelManager(base):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            # An absolute socket path: the kernel runs in the notebook's folder, the client in pytest's.
            kwargs.setdefault("ip", os.path.join(tempfile.gettempdir(), f"bnbook-kernel-{uuid.uuid4().hex[:16]}"))
            super().__init__(**kwargs)

    if not issubclass(base, IpcKernelManager) and base.__name__ != "IpcKernelManager":
        nbval.kernel.KernelManager = IpcKernelManager


_kernels_over_unix_sockets()

_NOTEBOOK_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _NOTEBOOK_SECONDS[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _NOTEBOOK_SECONDS:
        return
    terminalreporter.write_sep("-", "notebook run times under nbval (budget: 300 s each)")
    for path, seconds in sorted(_NOTEBOOK_SECONDS.items()):
        flag = "" if seconds <= 300 else "  OVER BUDGET"
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}{flag}")
    config = os.environ.get("BNLIB_NUMERIC_CONFIG", "default")
    out = Path(__file__).parent / "_build" / f"notebook_times-{config}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(sorted(_NOTEBOOK_SECONDS.items())), indent=2) + "\n")
