"""Execute chapter notebooks in place, top to bottom in one fresh kernel, storing outputs and widget state.

    .venv/bin/python scripts/run_notebook.py chapters/01_batch_statistics.ipynb [more.ipynb ...]

The stored outputs are what the website shows and what nbval compares against, so always (re-)run a
notebook with this script after editing it. Widget state is embedded in the notebook metadata so the
static site can render the widgets without a kernel. Prints the wall time of each notebook.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

# The book's stored outputs are made from the offline MNIST subset so they reproduce anywhere (and under nbval,
# which `make test` runs with the same setting). Override with BNLIB_OFFLINE=0.
os.environ.setdefault("BNLIB_OFFLINE", "1")
# No progress bars in stored outputs: they belong to live sessions and would stay frozen on the website.
os.environ.setdefault("BNLIB_PROGRESS", "0")


def run(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, path)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"notebooks: expected existing .ipynb files, got {str(path)!r}")
        elapsed = run(path, args.timeout)
        print(f"{path}: executed in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
