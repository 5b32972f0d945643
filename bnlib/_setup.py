"""The set-up every chapter notebook starts with: seed everything, pick the device, set the plot style.

Seeds. ``bnlib.setup(seed)`` fixes the *base seed* of a chapter; the environment variable ``BNLIB_SEED``, when
set, replaces it for the whole book (``BNLIB_SEED=1 make notebooks-seeds`` re-runs every chapter with other
random numbers, to check that its claims do not depend on one draw). Every other seed a chapter or the lab
code uses is an offset ``k`` (0, 1, 2, ... for the seeds of a multi-seed experiment) turned into a generator
seed by :func:`derive_seed`: ``k + 10_000 * base``. With base 0 that is ``k`` itself. The train/test splits of
the data sets are not derived: the book pins its data (``bnlib.data.load_mnist('book')``).
"""
from __future__ import annotations

import os
import random

import numpy as np

SEED_ENV = "BNLIB_SEED"
SEED_STRIDE = 10_000
# $BNLIB_SEED as the user set it before bnlib was imported; setup() writes the variable itself afterwards
# (so that worker processes inherit the base seed), and must not mistake its own value for the user's.
_USER_SEED_TEXT = os.environ.get(SEED_ENV, "").strip() or None


def _check_seed(seed, name: str = "seed") -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {seed!r}")
    return int(seed)


def _parse_seed_env(text: str | None) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"{SEED_ENV}: expected a non-negative integer, got {text!r}")
    return int(text)


def base_seed() -> int:
    """The book's base seed: ``$BNLIB_SEED`` if set (``bnlib.setup`` sets it), else 0."""
    return _parse_seed_env(os.environ.get(SEED_ENV, "").strip())


def derive_seed(seed: int) -> int:
    """The generator seed for offset ``seed`` under the current base seed: ``seed + 10_000 * base_seed()``."""
    seed = _check_seed(seed)
    if seed >= SEED_STRIDE:
        raise ValueError(f"seed: expected an int below {SEED_STRIDE} (seeds of different base seeds must not overlap), "
                         f"got {seed}")
    return seed + SEED_STRIDE * base_seed()


def rng(seed: int = 0) -> np.random.Generator:
    """``np.random.default_rng(derive_seed(seed))``."""
    return np.random.default_rng(derive_seed(seed))


def generator(seed: int = 0):
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed)``."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed))


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA) with ``derive_seed(seed)``."""
    seed = derive_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # NumPy-only use of bnlib
        return
    torch.manual_seed(seed)  # also seeds every CUDA device


def default_device():
    """``torch.device('cuda')`` when a CUDA GPU is visible, else ``torch.device('cpu')``."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(seed: int = 0, *, quiet: bool = False):
    """Fix the base seed (``$BNLIB_SEED`` wins over ``seed``), seed Python, NumPy and torch and return the
    device to use. (The book's notebooks call :func:`bnlib.lab.setup`, which also applies the plot style.)

    >>> device = bnlib.setup(seed=0)
    """
    seed = _check_seed(seed)
    from_env = _USER_SEED_TEXT is not None
    base = _parse_seed_env(_USER_SEED_TEXT) if from_env else seed
    os.environ[SEED_ENV] = str(base)  # derive_seed reads it; worker processes (sweeps) inherit it
    seed_everything(0)
    device = default_device()
    if not quiet:
        from . import __version__

        source = f" (from ${SEED_ENV})" if from_env and base != seed else ""
        print(f"bnlib {__version__} | device: {device.type} | seed: {base}{source}")
    return device
