"""bnlib: batch normalization, derived and implemented.

Submodules (imported on first use, so ``import bnlib`` stays cheap):

- ``bnlib.numpy``  -- the reference: forward passes and hand-derived backward passes in NumPy.
- ``bnlib.torch``  -- drop-in ``torch.nn`` modules with hand-written autograd and Triton kernels.
- ``bnlib.data``   -- MNIST (real download, verified and cached) with an offline fallback, and the book's
  pinned data (``load_mnist("book")``; ``BNLIB_MNIST=full`` for the real 60,000/10,000).
- ``bnlib.experiments``, ``bnlib.plotting`` -- code shared by the book's chapters.
- ``bnlib.report`` -- the output policy: rounding noise as a bound in eps, spreads over seeds, glued numbers.

``bnlib.setup(seed)`` is the one call at the top of every chapter notebook; it fixes the base seed, which
``BNLIB_SEED`` replaces book-wide, and from which ``derive_seed``/``rng``/``generator`` derive every other.
"""
from __future__ import annotations

import importlib

from ._setup import base_seed, default_device, derive_seed, generator, rng, seed_everything, setup

__version__ = "0.1.0"
__all__ = [
    "setup", "seed_everything", "default_device", "base_seed", "derive_seed", "rng", "generator", "__version__",
]

_SUBMODULES = {"numpy", "torch", "data", "experiments", "plotting", "ics", "report"}


def __getattr__(name):  # PEP 562: lazy submodules
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'bnlib' has no attribute {name!r}")
