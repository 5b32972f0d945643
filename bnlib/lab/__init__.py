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
- :mod:`bnlib.lab.explorer` -- explorers that respond in the browser with no kernel (every combination of the
  controls precomputed when the notebook runs).
- :mod:`bnlib.lab.exercises` -- the chapters' exercises: checkers that run a reader's function on unseen inputs
  and say what is wrong and why.
- :mod:`bnlib.lab.book` -- the numbers the chapters store (glued values, outputs), read by the synthesis pages.

One module per chapter: :mod:`~bnlib.lab.speed` (4, training speed), :mod:`~bnlib.lab.ics` (5, internal
covariate shift), :mod:`~bnlib.lab.small_batches` (6, small batches and the alternatives),
:mod:`~bnlib.lab.train_eval` (7, train vs eval), :mod:`~bnlib.lab.sequences` and
:mod:`~bnlib.lab.interpret` (8), :mod:`~bnlib.lab.cost` (9, cost and scale), :mod:`~bnlib.lab.modern` (10,
normalization in modern networks), :mod:`~bnlib.lab.finetune` (11, fine-tuning with batch norm).
"""
from __future__ import annotations

import importlib

from .. import setup as _core_setup

__all__ = ["setup"]

_SUBMODULES = {"train", "packed", "probes", "models", "plotting", "report", "speed", "ics", "small_batches",
               "train_eval", "sequences", "interpret", "cost", "explorer", "exercises", "book", "modern",
               "finetune"}


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
