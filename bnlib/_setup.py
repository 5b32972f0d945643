"""The set-up every chapter notebook starts with: seed everything, pick the device, set the plot style."""
from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
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
    """Seed Python, NumPy and torch, apply the book's plot style and return the device to use.

    >>> device = bnlib.setup(seed=0)   # first code cell of every chapter
    """
    seed_everything(seed)
    from . import plotting

    plotting.use_book_style()
    device = default_device()
    if not quiet:
        from . import __version__

        print(f"bnlib {__version__} | device: {device.type} | seed: {seed}")
    return device
