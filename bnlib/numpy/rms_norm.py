"""RMS normalization in NumPy (Zhang & Sennrich 2019), like ``torch.nn.functional.rms_norm``.

Each sample -- each index of the leading dimensions -- is divided by the root mean square of its ``K`` values in
the trailing ``normalized_shape`` dims; nothing is subtracted and there is no bias. ``weight`` (``gamma``) has
shape ``normalized_shape`` (elementwise affine)::

    rms = sqrt(mean(x^2) + eps),   xhat = x / rms,   y = weight * xhat

``eps=None`` is PyTorch's default: the machine epsilon of the computation dtype, ``np.finfo(x.dtype).eps``
(``torch.finfo(torch.float32).eps`` = 1.19e-7 for float32, 2.2e-16 for float64).

Backward. With ``invrms = 1 / rms``, ``g = dy * weight`` the gradient w.r.t. ``xhat`` and means over the ``K``
normalized values of a row: ``d(mean(x^2)) / dx_j = 2 x_j / K`` gives ``d invrms / dx_j = -invrms^3 x_j / K``, so

    dx_j = invrms * g_j + x_j * sum_k g_k x_k * (-invrms^3 / K)
         = invrms * (g_j - xhat_j * mean(g * xhat)),

the layer-norm formula without the ``- mean(g)`` term (no mean was subtracted, so none flows back), and

    dweight = sum over rows of dy * xhat        (shape normalized_shape).

The statistics do not depend on the other samples: training and evaluation are the same computation and there
are no running statistics. float32/float64 in, same dtype out; the sums of squares are accumulated in float64
(blockwise, like every bnlib statistic); NaN/inf propagate (within their row).
"""
from __future__ import annotations

import numpy as np

from .. import _checks
from . import _common
from .stats import _block_buffer, _blocks, _sum02, _view

__all__ = ["rms_norm", "rms_norm_backward"]


def _validate(x, normalized_shape, weight, eps):
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("expected input with at least 1 dimension, got 0-D input")
    _common.check_float("input", x.dtype)
    ns = _checks.check_normalized_shape(normalized_shape, x.shape)
    eps = float(np.finfo(x.dtype).eps) if eps is None else _checks.check_eps(eps)
    if weight is not None:
        weight = np.asarray(weight)
        _checks.check_shape("weight", weight.shape, ns)
        _common.check_float("weight", weight.dtype)
    return x, ns, weight, eps


def _rows(x, ns):
    """``x`` as a ``(1, rows, K)`` array, ``K = prod(normalized_shape)``."""
    K = int(np.prod(ns))
    return np.ascontiguousarray(x).reshape(1, -1, K)


def _row_dot(a3, b3):
    """``sum_k a * b`` per row of two ``(1, rows, K)`` arrays, float64 ``(rows,)``, blockwise."""
    B = a3.shape[1]
    total = np.zeros(B)
    buf = _block_buffer(a3.shape, a3.dtype)
    for ia, ib in _blocks(a3.shape):
        a = a3[ia, ib]
        total[ib] += _sum02(np.multiply(a, b3[ia, ib], out=_view(buf, a.shape)))
    return total


def _invrms(x3, eps):
    """``1 / sqrt(mean(x^2) + eps)`` per row, float64 ``(rows,)``."""
    return 1.0 / np.sqrt(_row_dot(x3, x3) / x3.shape[2] + eps)


def _scale_rows(x3, scale):
    """``x * scale[row]`` in ``x``'s dtype."""
    return x3 * np.asarray(scale, dtype=x3.dtype)[None, :, None]


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """RMS normalization over the trailing ``normalized_shape`` dims of ``x``; returns ``y`` like ``x``."""
    x, ns, w, eps = _validate(x, normalized_shape, weight, eps)
    x3 = _rows(x, ns)
    y = _scale_rows(x3, _invrms(x3, eps)).reshape(x.shape)
    if w is not None:
        y *= w.astype(x.dtype)
    return y


def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None):
    """Gradients of :func:`rms_norm`: returns ``(dx, dweight)``.

    Per row (over its ``K`` normalized values), with ``g = dy * weight`` the gradient w.r.t. ``xhat``::

        dx      = (g - xhat * mean(g * xhat)) / sqrt(mean(x^2) + eps)
        dweight = sum over rows of dy * xhat        (shape normalized_shape)

    evaluated as ``dx = a * g + b * x`` with ``a = invrms`` and ``b = -invrms^3 * sum(g * x) / K`` per row.
    ``dweight`` is always returned; with ``weight=None`` it is the gradient w.r.t. an implicit ``weight = 1``.
    """
    x, ns, w, eps = _validate(x, normalized_shape, weight, eps)
    dy = np.asarray(dy)
    _common.check_float("dy", dy.dtype)
    _checks.check_shape("dy", dy.shape, x.shape)
    x3 = _rows(x, ns)
    dy3 = np.ascontiguousarray(dy, dtype=x.dtype).reshape(x3.shape)
    K = x3.shape[2]
    invrms = _invrms(x3, eps)
    g = dy3 if w is None else dy3 * w.astype(x.dtype).reshape(-1)
    b = -invrms ** 3 * _row_dot(g, x3) / K
    dx = _scale_rows(g, invrms)
    dx += _scale_rows(x3, b)
    xhat = _scale_rows(x3, invrms)
    dweight = np.einsum("rk,rk->k", dy3[0], xhat[0]).reshape(ns)
    return dx.reshape(x.shape), dweight.astype(x.dtype)
