"""Reductions for normalization layers: naive vs stable variance, and the blocked kernels bnlib uses.

Public, for the chapters:

- :func:`naive_var` -- the one-pass textbook formula ``E[x^2] - E[x]^2``, computed in ``x``'s dtype. It
  cancels catastrophically when ``|mean| >> std`` (float32 with a 1e4 offset loses every digit).
- :func:`two_pass_var` -- ``mean((x - mean(x))^2)``: first the mean, then the squared deviations.
- :func:`welford_var` -- Welford's streaming update, one element (slice) at a time, in ``x``'s dtype.
- :func:`channel_stats` -- per-channel mean and biased variance of an ``(N, C, *)`` array, as bnlib's
  batch norm computes them (float64 results).

All three ``*_var`` functions return the *biased* (population) variance, dividing by the number of values.

How bnlib computes statistics (the private kernels below). Every normalization reduces a ``(A, B, L)`` view of
the input over axes 0 and 2, one statistic per ``b``: batch norm views ``(N, C, *spatial)`` as ``(N, C, L)``;
layer, group and instance norm view their rows as ``(1, rows, K)``. The kernels walk the array in blocks of
about ``_CHUNK`` elements, so temporaries stay in cache and never reach the size of ``x``, and use a
*corrected two-pass* algorithm:

1. ``shift = mean(x)`` (in ``x``'s dtype), from float32 pairwise sums along ``L`` accumulated in float64;
2. with ``xc = x - shift``: ``S1 = sum(xc)``, ``S2 = sum(xc^2)``; then ``mean = shift + S1/n`` and
   ``var = S2/n - (S1/n)^2`` in float64.

Step 2 is the two-pass formula; the ``S1`` term corrects the rounding of the first pass (Chan, Golub &
LeVeque 1983), so the statistics stay accurate with a large offset even in float32. Normalizing uses the same
split, ``y = (x - shift) * scale + (beta - (mean - shift) * scale)``, so the large offset is removed by an exact
float subtraction and never multiplied.
"""
from __future__ import annotations

import numpy as np

__all__ = ["naive_var", "two_pass_var", "welford_var", "channel_stats"]

# Elements per block of the blocked kernels: 128 Ki elements = 512 KiB of float32, half a 1 MiB L2 cache.
_CHUNK = 1 << 17


# ----------------------------------------------------------------------------------------------------------
# Public demonstration helpers
# ----------------------------------------------------------------------------------------------------------
def _float_array(x):
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    return x


def naive_var(x, axis=None):
    """Biased variance by the one-pass formula ``E[x^2] - E[x]^2``, in ``x``'s dtype. Numerically UNSTABLE.

    Both means are accumulated in ``x``'s dtype. When ``|E[x]|`` is large compared with the standard deviation
    the two terms are nearly equal and their difference is mostly rounding error (it can even be negative).
    Shown in the book to motivate :func:`two_pass_var`; never used by bnlib's layers.
    """
    x = _float_array(x)
    mean = x.mean(axis=axis, dtype=x.dtype)
    mean_sq = np.square(x).mean(axis=axis, dtype=x.dtype)
    return mean_sq - mean * mean


def two_pass_var(x, axis=None):
    """Biased variance by the two-pass formula ``mean((x - mean(x))^2)``, in ``x``'s dtype. Stable."""
    x = _float_array(x)
    mean = x.mean(axis=axis, dtype=x.dtype, keepdims=True)
    return np.square(x - mean).mean(axis=axis, dtype=x.dtype)


def welford_var(x, axis=None):
    """Biased variance by Welford's streaming algorithm, in ``x``'s dtype. Stable, one pass.

    Visits the reduced elements one at a time (a Python loop over them, vectorised over the other axes), with
    ``delta = x_k - mean; mean += delta / k; M2 += delta * (x_k - mean)``; returns ``M2 / n``. Slow for large
    reductions: it is here to show the algorithm, not for speed.
    """
    x = _float_array(x)
    if axis is None:
        x = x.reshape(-1, 1)
        axes = (0,)
        out_shape = ()
    else:
        axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
        out_shape = tuple(s for i, s in enumerate(x.shape) if i not in axes)
        x = np.moveaxis(x, axes, range(len(axes))).reshape(-1, *out_shape) if out_shape else x.reshape(-1, 1)
    mean = np.zeros(x.shape[1:], dtype=x.dtype)
    m2 = np.zeros(x.shape[1:], dtype=x.dtype)
    for k, xk in enumerate(x, start=1):
        delta = xk - mean
        mean += delta / x.dtype.type(k)
        m2 += delta * (xk - mean)
    var = m2 / x.dtype.type(len(x))
    return var.reshape(out_shape)


def channel_stats(x):
    """Per-channel mean and biased variance (float64) of an ``(N, C, *)`` array, over ``N`` and ``*``."""
    x = _float_array(x)
    if x.ndim < 2:
        raise ValueError(f"expected input with at least 2 dimensions (N, C, *), got {x.ndim}-D input")
    mean, var, _ = _moments(_as_abl(x, x.shape[0], x.shape[1]))
    return mean, var


# ----------------------------------------------------------------------------------------------------------
# Blocked kernels shared by the layers (private)
# ----------------------------------------------------------------------------------------------------------
def _as_abl(x, A, B):
    """A C-contiguous ``(A, B, L)`` view (a copy only if ``x`` is not C-contiguous)."""
    x = np.ascontiguousarray(x)
    return x.reshape(A, B, -1)


def _blocks(shape, chunk=None):
    """Yield ``(a_slice, b_slice)`` tiling an ``(A, B, L)`` array into blocks of about ``chunk`` elements."""
    chunk = _CHUNK if chunk is None else chunk
    A, B, L = shape
    row = B * L
    if row <= chunk:
        step = max(1, chunk // max(row, 1))
        for a0 in range(0, A, step):
            yield slice(a0, min(A, a0 + step)), slice(0, B)
    else:
        step = max(1, chunk // max(L, 1))
        for a0 in range(A):
            for b0 in range(0, B, step):
                yield slice(a0, a0 + 1), slice(b0, min(B, b0 + step))


def _block_buffer(shape, dtype, chunk=None):
    """Scratch space for the largest block :func:`_blocks` yields."""
    chunk = _CHUNK if chunk is None else chunk
    A, B, L = shape
    row = B * L
    size = min(A, max(1, chunk // max(row, 1))) * row if row <= chunk else min(B, max(1, chunk // max(L, 1))) * L
    return np.empty(max(size, 1), dtype=dtype)


def _view(buf, shape):
    return buf[: int(np.prod(shape))].reshape(shape)


def _sum02(block):
    """Sum of an ``(a, b, L)`` block over axes 0 and 2 as float64 ``(b,)``: pairwise along L, then float64."""
    if block.shape[2] == 1:
        return block[:, :, 0].sum(axis=0, dtype=np.float64)
    return block.sum(axis=2).sum(axis=0, dtype=np.float64)


def _moments(x3):
    """Mean and biased variance over axes 0 and 2 of a C-contiguous ``(A, B, L)`` array.

    Returns ``(mean, var, shift)``: ``mean`` and ``var`` float64 of shape ``(B,)``, ``shift`` the first-pass
    mean in ``x3``'s dtype (normalize as ``(x - shift) * scale + offset``, see the module docstring).
    """
    A, B, L = x3.shape
    n = A * L
    total = np.zeros(B)
    for ia, ib in _blocks(x3.shape):
        total[ib] += _sum02(x3[ia, ib])
    shift = (total / n).astype(x3.dtype)
    s1 = np.zeros(B)
    s2 = np.zeros(B)
    buf = _block_buffer(x3.shape, x3.dtype)
    shift_col = shift[:, None]
    for ia, ib in _blocks(x3.shape):
        block = x3[ia, ib]
        xc = np.subtract(block, shift_col[ib], out=_view(buf, block.shape))
        s1[ib] += _sum02(xc)
        np.multiply(xc, xc, out=xc)
        s2[ib] += _sum02(xc)
    d = s1 / n
    mean = shift + d
    var = np.maximum(s2 / n - d * d, 0.0)  # NaN stays NaN
    return mean, var, shift


def _affine(x3, shift, scale, offset, out=None):
    """``out = (x - shift[b]) * scale[b] + offset[b]`` over an ``(A, B, L)`` array, blockwise, in x's dtype."""
    dt = x3.dtype
    if out is None:
        out = np.empty_like(x3)
    shift_col = np.asarray(shift, dtype=dt)[:, None]
    scale_col = np.asarray(scale, dtype=dt)[:, None]
    offset_col = np.asarray(offset, dtype=dt)[:, None]
    for ia, ib in _blocks(x3.shape):
        o = out[ia, ib]
        np.subtract(x3[ia, ib], shift_col[ib], out=o)
        o *= scale_col[ib]
        o += offset_col[ib]
    return out


def _grad_sums(g3, x3, shift):
    """``(sum(g), sum(g * (x - shift)))`` over axes 0 and 2, float64 ``(B,)`` each."""
    B = x3.shape[1]
    sg = np.zeros(B)
    sgxc = np.zeros(B)
    buf = _block_buffer(x3.shape, x3.dtype)
    shift_col = np.asarray(shift, dtype=x3.dtype)[:, None]
    for ia, ib in _blocks(x3.shape):
        gb = g3[ia, ib]
        t = np.subtract(x3[ia, ib], shift_col[ib], out=_view(buf, gb.shape))
        t *= gb
        sgxc[ib] += _sum02(t)
        sg[ib] += _sum02(gb)
    return sg, sgxc


def _norm_grad(g3, x3, mean, shift, invstd, gamma=None):
    """Gradient through ``xhat = (x - mean) * invstd`` with statistics over axes 0 and 2 of ``(A, B, L)``.

    ``g3`` is the gradient w.r.t. ``gamma[b] * xhat`` (so ``dy`` itself for batch norm; ``gamma`` per ``b``, or
    ``None`` for 1). Returns ``(dx, sum_g, sum_g_xhat)``; the compact closed form, per ``b`` over ``n = A*L``::

        dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))

    rewritten as ``dx = a*g + b*(x - shift) + c`` with per-``b`` coefficients, evaluated blockwise.
    """
    A, B, L = x3.shape
    n = A * L
    dt = x3.dtype
    sg, sgxc = _grad_sums(g3, x3, shift)
    d = mean - shift.astype(np.float64)
    sgxhat = invstd * (sgxc - d * sg)
    gam = 1.0 if gamma is None else np.asarray(gamma, dtype=np.float64)
    a = gam * invstd
    k = sgxhat / n
    b = -a * invstd * k
    c = a * (k * invstd * d - sg / n)
    a = np.broadcast_to(a, (B,))
    dx = np.empty_like(x3)
    buf = _block_buffer(x3.shape, dt)
    shift_col = shift.astype(dt)[:, None]
    a_col, b_col, c_col = (np.asarray(v, dtype=dt)[:, None] for v in (a, b, c))
    for ia, ib in _blocks(x3.shape):
        o = dx[ia, ib]
        np.subtract(x3[ia, ib], shift_col[ib], out=o)
        o *= b_col[ib]
        t = np.multiply(g3[ia, ib], a_col[ib], out=_view(buf, o.shape))
        o += t
        o += c_col[ib]
    return dx, sg, sgxhat
