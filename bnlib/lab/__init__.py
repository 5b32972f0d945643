"""bnlib.lab: the book's laboratory -- the code behind the chapters' experiments, built on the library.

The library (``bnlib.numpy``, ``bnlib.torch``, ``bnlib.data``, ``bnlib.methods``) never imports this package
(``tests/test_layout.py`` checks it); the lab imports the library and nothing imports the lab but the book.

Shared by every chapter:

- :mod:`bnlib.lab.train` -- the one training loop (torch modules and the NumPy MLP), with hooks for what a
  chapter measures; evaluation; sweeps over a grid; spreads over seeds.
- :mod:`bnlib.lab.packed` -- the one packed-seed trainer: ``k`` seeds of one network trained as one wider
  network, batch for batch the same as ``k`` separate runs.
- :mod:`bnlib.lab.probes` -- the one activation probe (forward hooks on chosen layers).
- :mod:`bnlib.lab.models` -- the chapters' networks, built from the registry :mod:`bnlib.methods`.
- :mod:`bnlib.lab.plotting`, :mod:`bnlib.lab.report` -- the book's plot style and its output policy.

One module per chapter: :mod:`~bnlib.lab.speed` (4, training speed), :mod:`~bnlib.lab.ics` (5, internal
covariate shift), :mod:`~bnlib.lab.small_batches` (6, small batches and the alternatives),
:mod:`~bnlib.lab.train_eval` (7, train vs eval), :mod:`~bnlib.lab.sequences` and
:mod:`~bnlib.lab.interpret` (8), :mod:`~bnlib.lab.cost` (9, cost and scale).
"""
from __future__ import annotations

import importlib

from .. import setup as _core_setup

__all__ = ["setup"]

_SUBMODULES = {"train", "packed", "probes", "models", "plotting", "report", "speed", "ics", "small_batches",
               "train_eval", "sequences", "interpret", "cost"}


def setup(seed: int = 0, *, quiet: bool = False):
    """The first call of every chapter: :func:`bnlib.setup` (base seed, device) plus the book's plot style.

    >>> device = bnlib.lab.setup(seed=0)
    """
    device = _core_setup(seed, quiet=quiet)
    from . import plotting

    plotting.use_book_style()
    return device


def __getattr__(name):  # PEP 562: lazy submodules
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'bnlib.lab' has no attribute {name!r}")
