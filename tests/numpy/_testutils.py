"""Shared helpers for the bnlib.numpy tests (unique module name: tests are collected without packages)."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

RTOL = 1e-10
ATOL = 1e-10

# Modest example counts: the whole numpy suite must stay well under a minute on 2 shared cores.
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def nc_shapes(draw, min_spatial=0, max_spatial=3, min_n=2, max_n=5, max_c=4):
    """``(N, C, *spatial)`` with odd sizes, N >= 2, C >= 1 and 0-3 spatial dims."""
    n = draw(st.integers(min_n, max_n))
    c = draw(st.integers(1, max_c))
    k = draw(st.integers(min_spatial, max_spatial))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(k))
    return (n, c) + spatial


def rand(rng, shape, scale=1.0, offset=0.0):
    return rng.standard_normal(shape) * scale + offset


def t(a, grad=False):
    """A float64 torch tensor copy of ``a``."""
    out = torch.tensor(np.asarray(a))
    return out.requires_grad_(grad)


def close(a, b, rtol=RTOL, atol=ATOL):
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def numeric_grad(f, a, eps=1e-6):
    """Central finite differences of the scalar ``f()`` w.r.t. every entry of ``a`` (modified in place)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def bn_axes(ndim):
    return (0,) + tuple(range(2, ndim))


def channel_view(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))
