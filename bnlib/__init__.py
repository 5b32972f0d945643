"""bnlib: batch normalization, derived and implemented.

Submodules (imported on first use, so ``import bnlib`` stays cheap):

- ``bnlib.numpy``  -- the reference: forward passes and hand-derived backward passes in NumPy.
- ``bnlib.torch``  -- drop-in ``torch.nn`` modules with hand-written autograd and Triton kernels.
- ``bnlib.data``   -- MNIST (real download, verified and cached) with an offline fallback, and the book's
  pinned data (``load_mnist("book")``; ``BNLIB_MNIST=full`` for the real 60,000/10,000).
- ``bnlib.methods`` -- the registry of normalization methods: the one place a method is listed.

The library above never imports the book's lab:

- ``bnlib.lab`` -- the chapters' experiments (training loop, packed-seed trainer, activation probe, models,
  plotting, the output policy's report helpers, one module per chapter).

``bnlib.setup(seed)`` fixes the base seed, which ``BNLIB_SEED`` replaces book-wide, and from which
``derive_seed``/``rng``/``generator`` derive every other (``bnlib.lab.setup`` also applies the book's plot
style; it is the first call of every chapter notebook).
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from ._checks import RunningStatsError, ShapeError
from ._setup import base_seed, default_device, derive_seed, generator, rng, seed_everything, setup

try:  # one source for the version: pyproject.toml (installed metadata)
    __version__ = _dist_version("bnlib")
except PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0+unknown"
__all__ = [
    "setup", "seed_everything", "default_device", "base_seed", "derive_seed", "rng", "generator", "__version__",
    "ShapeError", "RunningStatsError",
]

_SUBMODULES = {"numpy", "torch", "data", "methods"}


def __getattr__(name):  # PEP 562: lazy submodules
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'bnlib' has no attribute {name!r}")
