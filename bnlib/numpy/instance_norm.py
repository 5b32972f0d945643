"""Instance normalization in NumPy (Ulyanov et al. 2016), like ``torch.nn.functional.instance_norm``.

Each (sample, channel) is normalized over its spatial positions with the BIASED variance; ``weight`` and
``bias`` are per channel::

    xhat[n, c, ...] = (x - mean[n, c]) / sqrt(var[n, c] + eps),   y = weight[c] * xhat + bias[c]

With ``use_input_stats=True`` (the default, and what the modules use in training or when they do not track
running statistics) the statistics are the instance's own; given running statistics are then updated IN
PLACE, as PyTorch does, with the batch average of the instance statistics (unbiased variance over the ``L``
spatial positions)::

    running_mean = (1 - momentum) * running_mean + momentum * mean_n(mean[n, c])
    running_var  = (1 - momentum) * running_var  + momentum * mean_n(var[n, c] * L / (L - 1))

With ``use_input_stats=False`` the running statistics normalize, per channel, like batch norm in evaluation.
``momentum`` is a number in [0, 1] here; the modules pass 0.0 for ``momentum=None`` (PyTorch's behaviour: the
running statistics then never change). float32/float64 in, same dtype out; NaN/inf propagate.
"""
from __future__ import annotations

import numpy as np

from .. import _checks
from . import _common
from .batch_norm import _backward_eval
from .batch_norm import _forward as _bn_forward
from .group_norm import _channel_affine
from .stats import _affine, _moments, _norm_grad

__all__ = ["instance_norm", "instance_norm_backward"]

_LAYOUT = "(N, C, *spatial) with 1-3 spatial dims"


def _validate(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    x = _common.as_input(x, (3, 4, 5), _LAYOUT)
    C = x.shape[1]
    _checks.check_eps(eps)
    _checks.check_momentum(momentum, allow_none=False)
    _checks.check_running_stats(running_mean is not None, running_var is not None, use_input_stats)
    will_update = bool(use_input_stats) and running_mean is not None
    rm = _common.as_running("running_mean", running_mean, C, will_update)
    rv = _common.as_running("running_var", running_var, C, will_update)
    w = _common.as_per_channel("weight", weight, C)
    b = _common.as_per_channel("bias", bias, C)
    if use_input_stats:
        _checks.check_spatial_size(x.shape)
    return x, rm, rv, w, b


def _normalize(x, eps):
    N, C = x.shape[:2]
    x3 = np.ascontiguousarray(x).reshape(1, N * C, -1)
    mean, var, shift = _moments(x3)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = _affine(x3, shift, invstd, -(mean - shift.astype(np.float64)) * invstd)
    return x3, xhat, mean, var, shift, invstd


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """Instance normalization of an ``(N, C, *spatial)`` array; returns ``y`` like ``x``."""
    x, rm, rv, w, b = _validate(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not use_input_stats:
        y, _ = _bn_forward(x, rm, rv, w, b, False, 0.0, float(eps))
        return y
    N, C = x.shape[:2]
    x3, xhat, mean, var, _, _ = _normalize(x, float(eps))
    y = _channel_affine(xhat.reshape(N, C, -1), w, b).reshape(x.shape)
    if rm is not None:
        L = x3.shape[2]
        factor = float(momentum)
        _common.update_running(rm, mean.reshape(N, C).mean(axis=0), factor)
        _common.update_running(rv, _common.unbiased(var, L).reshape(N, C).mean(axis=0), factor)
    return y


def instance_norm_backward(dy, x, weight=None, eps=1e-5, *, use_input_stats=True, running_mean=None,
                           running_var=None):
    """Gradients of :func:`instance_norm`: returns ``(dx, dweight, dbias)``.

    With instance statistics, per (sample, channel) over its ``L`` positions and ``g = dy * weight[c]``::

        dx      = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps)
        dweight = sum over (N, *spatial) of dy * xhat,   dbias = sum over (N, *spatial) of dy

    With ``use_input_stats=False`` (pass the running statistics the forward used) the map is affine:
    ``dx = dy * weight / sqrt(running_var + eps)``. ``dweight``/``dbias`` are always returned (w.r.t. implicit
    1 and 0 when ``weight=None``).
    """
    x = _common.as_input(x, (3, 4, 5), _LAYOUT)
    dy = np.asarray(dy)
    _common.check_float("dy", dy.dtype)
    _checks.check_shape("dy", dy.shape, x.shape)
    _checks.check_eps(eps)
    N, C = x.shape[:2]
    w = _common.as_per_channel("weight", weight, C)
    if not use_input_stats:
        _checks.check_running_stats(running_mean is not None, running_var is not None, training=False)
        rm = _common.as_per_channel("running_mean", running_mean, C)
        rv = _common.as_per_channel("running_var", running_var, C)
        return _backward_eval(dy, x, w, rm, rv, eps)
    _checks.check_spatial_size(x.shape)
    dy_c = np.ascontiguousarray(dy, dtype=x.dtype).reshape(N, C, -1)
    x3, xhat, mean, _, shift, invstd = _normalize(x, float(eps))
    g = dy_c if w is None else dy_c * w.astype(x.dtype)[:, None]
    dx, _, _ = _norm_grad(g.reshape(x3.shape), x3, mean, shift, invstd)
    dweight = np.einsum("ncl,ncl->c", dy_c, xhat.reshape(N, C, -1))
    dbias = dy_c.sum(axis=2).sum(axis=0, dtype=np.float64)
    return dx.reshape(x.shape), dweight.astype(x.dtype), dbias.astype(x.dtype)
