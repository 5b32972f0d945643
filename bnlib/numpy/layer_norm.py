"""Layer normalization in NumPy (Ba, Kiros & Hinton 2016), like ``torch.nn.functional.layer_norm``.

Each sample -- each index of the leading dimensions -- is normalized over the trailing ``normalized_shape``
dims, with the BIASED variance; ``weight`` and ``bias`` have shape ``normalized_shape`` (elementwise affine)::

    xhat = (x - mean) / sqrt(var + eps),   y = weight * xhat + bias

The statistics do not depend on the other samples, so training and evaluation are the same computation and
there are no running statistics. float32/float64 in, same dtype out; NaN/inf propagate (within their row).
"""
from __future__ import annotations

import numpy as np

from .. import _checks
from . import _common
from .stats import _affine, _moments, _norm_grad

__all__ = ["layer_norm", "layer_norm_backward"]


def _validate(x, normalized_shape, weight, bias, eps):
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("expected input with at least 1 dimension, got 0-D input")
    _common.check_float("input", x.dtype)
    ns = _checks.check_normalized_shape(normalized_shape, x.shape)
    _checks.check_eps(eps)
    arrays = []
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            value = np.asarray(value)
            _checks.check_shape(name, value.shape, ns)
            _common.check_float(name, value.dtype)
        arrays.append(value)
    return x, ns, arrays[0], arrays[1]


def _rows(x, ns):
    """``x`` as a ``(1, rows, K)`` array, ``K = prod(normalized_shape)``."""
    K = int(np.prod(ns))
    return np.ascontiguousarray(x).reshape(1, -1, K)


def _normalize(x3, eps):
    mean, var, shift = _moments(x3)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = _affine(x3, shift, invstd, -(mean - shift.astype(np.float64)) * invstd)
    return xhat, mean, shift, invstd


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization over the trailing ``normalized_shape`` dims of ``x``; returns ``y`` like ``x``."""
    x, ns, w, b = _validate(x, normalized_shape, weight, bias, eps)
    y, _, _, _ = _normalize(_rows(x, ns), float(eps))
    y = y.reshape(x.shape)
    if w is not None:
        y *= w.astype(x.dtype)
    if b is not None:
        y += b.astype(x.dtype)
    return y


def layer_norm_backward(dy, x, normalized_shape, weight=None, eps=1e-5):
    """Gradients of :func:`layer_norm`: returns ``(dx, dweight, dbias)``.

    Per row (over its ``K`` normalized values), with ``g = dy * weight`` the gradient w.r.t. ``xhat``::

        dx      = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps)
        dweight = sum over rows of dy * xhat        (shape normalized_shape)
        dbias   = sum over rows of dy

    ``dweight``/``dbias`` are always returned; with ``weight=None`` they are the gradients w.r.t. an implicit
    ``weight = 1``, ``bias = 0``.
    """
    x, ns, w, _ = _validate(x, normalized_shape, weight, None, eps)
    dy = np.asarray(dy)
    _common.check_float("dy", dy.dtype)
    _checks.check_shape("dy", dy.shape, x.shape)
    x3 = _rows(x, ns)
    dy3 = np.ascontiguousarray(dy, dtype=x.dtype).reshape(x3.shape)
    xhat, mean, shift, invstd = _normalize(x3, float(eps))
    g = dy3 if w is None else dy3 * w.astype(x.dtype).reshape(-1)
    dx, _, _ = _norm_grad(g, x3, mean, shift, invstd)
    K = x3.shape[2]
    dweight = np.einsum("rk,rk->k", dy3[0], xhat[0]).reshape(ns) if K else np.zeros(ns)
    dbias = dy3[0].sum(axis=0).reshape(ns)
    return dx.reshape(x.shape), dweight.astype(x.dtype), dbias.astype(x.dtype)
