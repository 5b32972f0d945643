"""Inputs the reader has not seen, and float64 truths to compare with (shared by the checkers)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ... import rng as derived_rng


def generator(seed: int, offset: int) -> np.random.Generator:
    """A NumPy generator for one checker's cases: offset ``seed`` of the book's base seed (``BNLIB_SEED``)."""
    return derived_rng(seed * 100 + offset)


def batch(g: np.random.Generator, shape: Sequence[int], dtype=np.float64, *, offset: float = 0.0,
          channel_axis: int = 1) -> np.ndarray:
    """Random values with a different mean and standard deviation per channel (plus ``offset``)."""
    shape = tuple(shape)
    C = shape[channel_axis]
    bshape = [1] * len(shape)
    bshape[channel_axis] = C
    means = g.uniform(-2.0, 2.0, C).reshape(bshape)
    stds = g.uniform(0.5, 2.0, C).reshape(bshape)
    x = offset + means + stds * g.standard_normal(shape)
    return x.astype(dtype)


def channels_last(g: np.random.Generator, shape: Sequence[int], dtype=np.float64, **kwargs) -> np.ndarray:
    """An ``(N, C, *spatial)`` array whose memory is laid out channels-last: a non-contiguous view."""
    N, C, *spatial = shape
    x = batch(g, (N, *spatial, C), dtype, channel_axis=-1, **kwargs)
    out = np.moveaxis(x, -1, 1)
    assert not out.flags.c_contiguous
    return out


def strided(g: np.random.Generator, shape: Sequence[int], dtype=np.float64, **kwargs) -> np.ndarray:
    """An array of ``shape`` that is every other column of a larger one: a non-contiguous view."""
    shape = tuple(shape)
    big = batch(g, shape[:1] + (2 * shape[1],) + shape[2:], dtype, **kwargs)
    out = big[:, ::2]
    assert not out.flags.c_contiguous
    return out


def bn_axes(ndim: int) -> tuple:
    """The axes batch norm reduces over: the batch and the spatial ones."""
    return (0,) + tuple(range(2, ndim))


def per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A ``(C,)`` array shaped to broadcast over the channel axis of an ``ndim``-D array."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def moments(x: np.ndarray, axes, ddof: int = 0):
    """Mean and variance over ``axes`` in float64, keeping the reduced axes."""
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    n = x64.size // mean.size
    var = ((x64 - mean) ** 2).sum(axis=axes, keepdims=True) / (n - ddof)
    return mean, var


def normalized(x: np.ndarray, eps: float, axes=None, *, ddof: int = 0, eps_mode: str = "inside") -> np.ndarray:
    """``(x - mean) / sqrt(var + eps)`` in float64 over ``axes`` (default: batch norm's), or a classic mistake:
    ``eps_mode`` 'outside' (``sqrt(var) + eps``) or 'none' (no eps)."""
    axes = bn_axes(x.ndim) if axes is None else axes
    mean, var = moments(x, axes, ddof)
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        if eps_mode == "inside":
            return (x64 - mean) / np.sqrt(var + eps)
        if eps_mode == "outside":
            return (x64 - mean) / (np.sqrt(var) + eps)
        return (x64 - mean) / np.sqrt(var)


def affine(xhat: np.ndarray, weight: Optional[np.ndarray], bias: Optional[np.ndarray]) -> np.ndarray:
    """``weight * xhat + bias`` per channel (``None``: 1 and 0)."""
    out = np.asarray(xhat, dtype=np.float64)
    if weight is not None:
        out = out * per_channel(weight, out.ndim)
    if bias is not None:
        out = out + per_channel(bias, out.ndim)
    return out


def count(x: np.ndarray) -> int:
    """Values per channel of an ``(N, C, *spatial)`` array: ``N * prod(spatial)``."""
    return x.size // x.shape[1]


def copy_of(a):
    return None if a is None else np.array(a, copy=True)
