"""Group normalization in NumPy (Wu & He 2018), like ``torch.nn.functional.group_norm``.

The ``C`` channels of each sample are split into ``num_groups`` groups of ``C / num_groups`` consecutive
channels; each (sample, group) is normalized over its channels and spatial positions with the BIASED
variance, then a per-channel affine map is applied::

    xhat[n, c, ...] = (x - mean[n, g(c)]) / sqrt(var[n, g(c)] + eps),   y = weight[c] * xhat + bias[c]

``num_groups = 1`` is layer norm over ``(C, *spatial)`` with per-channel affine; ``num_groups = C`` is
instance norm. No running statistics. float32/float64 in, same dtype out; NaN/inf propagate within a group.
"""
from __future__ import annotations

import numpy as np

from .. import _checks
from . import _common
from .stats import _affine, _moments, _norm_grad

__all__ = ["group_norm", "group_norm_backward"]


def _validate(x, num_groups, weight, bias, eps):
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected input with at least 2 dimensions (N, C, *), got {x.ndim}-D input")
    _common.check_float("input", x.dtype)
    C = x.shape[1]
    _checks.check_num_groups(num_groups, C)
    _checks.check_eps(eps)
    w = _common.as_per_channel("weight", weight, C)
    b = _common.as_per_channel("bias", bias, C)
    return x, w, b


def _normalize(x, G, eps):
    N, C = x.shape[:2]
    x3 = np.ascontiguousarray(x).reshape(1, N * G, -1)
    mean, var, shift = _moments(x3)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = _affine(x3, shift, invstd, -(mean - shift.astype(np.float64)) * invstd)
    return x3, xhat, mean, shift, invstd


def _channel_affine(y, w, b):
    """``y[n, c, ...] = y * w[c] + b[c]`` in place on an ``(N, C, L)`` view."""
    if w is not None:
        y *= w.astype(y.dtype)[:, None]
    if b is not None:
        y += b.astype(y.dtype)[:, None]
    return y


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalization of an ``(N, C, *)`` array; returns ``y`` like ``x``."""
    x, w, b = _validate(x, num_groups, weight, bias, eps)
    N, C = x.shape[:2]
    _, xhat, _, _, _ = _normalize(x, num_groups, float(eps))
    y = _channel_affine(xhat.reshape(N, C, -1), w, b)
    return y.reshape(x.shape)


def group_norm_backward(dy, x, num_groups, weight=None, eps=1e-5):
    """Gradients of :func:`group_norm`: returns ``(dx, dweight, dbias)``.

    Per (sample, group) over its ``m = (C / G) * prod(spatial)`` values, with ``g = dy * weight[c]``::

        dx      = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps)
        dweight = sum over (N, *spatial) of dy * xhat,   dbias = sum over (N, *spatial) of dy

    ``dweight``/``dbias`` are always returned (w.r.t. implicit 1 and 0 when ``weight=None``).
    """
    x, w, _ = _validate(x, num_groups, weight, None, eps)
    dy = np.asarray(dy)
    _common.check_float("dy", dy.dtype)
    _checks.check_shape("dy", dy.shape, x.shape)
    N, C = x.shape[:2]
    dy_c = np.ascontiguousarray(dy, dtype=x.dtype).reshape(N, C, -1)
    x3, xhat, mean, shift, invstd = _normalize(x, num_groups, float(eps))
    g = dy_c if w is None else dy_c * w.astype(x.dtype)[:, None]
    dx, _, _ = _norm_grad(g.reshape(x3.shape), x3, mean, shift, invstd)
    xhat_c = xhat.reshape(N, C, -1)
    dweight = np.einsum("ncl,ncl->c", dy_c, xhat_c)
    dbias = dy_c.sum(axis=2).sum(axis=0, dtype=np.float64)
    return dx.reshape(x.shape), dweight.astype(x.dtype), dbias.astype(x.dtype)
