"""Repository-wide pytest hooks: per-notebook run times for nbval runs (printed at the end of `make test`)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

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
    out = Path(__file__).parent / "_build" / "notebook_times.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(sorted(_NOTEBOOK_SECONDS.items())), indent=2) + "\n")
