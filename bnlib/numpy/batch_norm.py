"""Batch normalization in NumPy: forward, hand-derived backward, and the Keras convention.

Conventions (PyTorch's, so what a reader learns here transfers to ``torch.nn.functional.batch_norm``):

- ``x`` has shape ``(N, C)`` or ``(N, C, *spatial)`` with 1-3 spatial dims; statistics are per channel ``c``
  over the ``n = N * prod(spatial)`` values of that channel.
- Training normalizes with the batch mean and the BIASED batch variance (divide by ``n``)::

      xhat = (x - mean_B) / sqrt(var_B + eps),   y = weight * xhat + bias

- Running statistics, when given, are updated IN PLACE with momentum weighting the NEW batch, and
  ``running_var`` receives the UNBIASED variance ``var_B * n / (n - 1)``::

      running_mean = (1 - momentum) * running_mean + momentum * mean_B
      running_var  = (1 - momentum) * running_var  + momentum * var_B * n / (n - 1)

  ``momentum=None`` is the cumulative average: the factor is ``1 / num_batches_tracked`` where
  ``num_batches_tracked`` counts the batches *including this one* (``torch.nn.BatchNorm*`` and bnlib's
  modules increment their counter before the call).
- Evaluation (``training=False``) normalizes with the running statistics.
- float32 and float64 in, the same dtype out. Statistics use a corrected two-pass algorithm
  (:mod:`bnlib.numpy.stats`), so a large offset in float32 costs no accuracy.
- NaN or inf in ``x`` propagate to ``y`` (and, in training, into the running statistics), as in PyTorch.
- Bad arguments raise ``ValueError``/``TypeError`` before anything is updated.

The Keras convention (:func:`keras_batch_norm`) differs only in the bookkeeping: ``momentum`` (0.99) weights
the OLD average, ``epsilon`` defaults to 1e-3, and the moving variance is the BIASED batch variance.
"""
from __future__ import annotations

import numpy as np

from .. import _checks
from . import _common
from .stats import _affine, _as_abl, _moments, _norm_grad

__all__ = ["batch_norm", "batch_norm_backward", "keras_batch_norm"]

_LAYOUT = "(N, C) or (N, C, *spatial) with 1-3 spatial dims"


_TORCH_NAMES = ("running_mean", "running_var", "weight", "bias", "eps")
_KERAS_NAMES = ("moving_mean", "moving_variance", "gamma", "beta", "epsilon")


def _validate(x, running_mean, running_var, weight, bias, training, eps, will_update, names=_TORCH_NAMES):
    """Check everything :func:`batch_norm`-like functions take; returns the arrays. Touches nothing."""
    x = _common.as_input(x, (2, 3, 4, 5), _LAYOUT)
    C = x.shape[1]
    _checks.check_eps(eps, names[4])
    _checks.check_running_stats(running_mean is not None, running_var is not None, training, names[:2])
    rm = _common.as_running(names[0], running_mean, C, will_update)
    rv = _common.as_running(names[1], running_var, C, will_update)
    w = _common.as_per_channel(names[2], weight, C)
    b = _common.as_per_channel(names[3], bias, C)
    if training:
        _checks.check_training_size(x.shape)
    return x, rm, rv, w, b


def _forward(x, rm, rv, w, b, training, factor, eps, unbiased=True):
    """Batch-norm forward on validated arrays; updates ``rm``/``rv`` in place when training and given.

    Returns ``(y, saved)`` with ``saved = (mean, shift, invstd)`` (float64 mean/invstd, shift in x's dtype),
    what :func:`_backward_train` needs.
    """
    N, C = x.shape[:2]
    x3 = _as_abl(x, N, C)
    n = x3.shape[0] * x3.shape[2]
    if training:
        mean, var, shift = _moments(x3)
    else:
        mean = rm.astype(np.float64)
        var = rv.astype(np.float64)
        shift = rm.astype(x.dtype)
    invstd = 1.0 / np.sqrt(var + eps)
    gamma = np.ones(C) if w is None else w.astype(np.float64)
    beta = np.zeros(C) if b is None else b.astype(np.float64)
    scale = gamma * invstd
    offset = beta - (mean - shift.astype(np.float64)) * scale
    y3 = _affine(x3, shift, scale, offset)
    if training and rm is not None:
        _common.update_running(rm, mean, factor)
        _common.update_running(rv, _common.unbiased(var, n) if unbiased else var, factor)
    return y3.reshape(x.shape), (mean, shift, invstd)


def _backward_train(dy, x, w, saved):
    """Training-mode gradients from the statistics saved by :func:`_forward`."""
    mean, shift, invstd = saved
    N, C = x.shape[:2]
    x3 = _as_abl(x, N, C)
    dy3 = _as_abl(np.asarray(dy, dtype=x.dtype), N, C)
    dx3, sg, sgxhat = _norm_grad(dy3, x3, mean, shift, invstd, w)
    return dx3.reshape(x.shape), sgxhat.astype(x.dtype), sg.astype(x.dtype)


def _check_dy(dy, x):
    dy = np.asarray(dy)
    _common.check_float("dy", dy.dtype)
    _checks.check_shape("dy", dy.shape, x.shape)
    return dy


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
               *, num_batches_tracked=None):
    """Batch normalization, like ``torch.nn.functional.batch_norm``.

    Args:
        x: ``(N, C)`` or ``(N, C, *spatial)`` float32/float64 array (1-3 spatial dims).
        running_mean, running_var: ``(C,)`` arrays or both ``None``. Updated IN PLACE when ``training``;
            ``running_var`` holds the UNBIASED variance. Required when ``training=False``.
        weight, bias: ``(C,)`` arrays (gamma, beta) or ``None`` (1 and 0).
        training: normalize with batch statistics (and update the running ones) instead of running ones.
        momentum: weight of the new batch in the running averages, in [0, 1]; ``None`` for the cumulative
            average, which needs ``num_batches_tracked`` (batches seen including this one).
        eps: added to the variance inside the square root, > 0.

    Returns:
        ``y``, same shape and dtype as ``x``.
    """
    will_update = bool(training) and running_mean is not None
    x, rm, rv, w, b = _validate(x, running_mean, running_var, weight, bias, training, eps, will_update)
    factor = _common.averaging_factor(momentum, num_batches_tracked, will_update)
    y, _ = _forward(x, rm, rv, w, b, bool(training), factor, float(eps))
    return y


def batch_norm_backward(dy, x, weight=None, eps=1e-5, *, training=True, running_mean=None, running_var=None):
    """Gradients of :func:`batch_norm` w.r.t. ``x``, ``weight`` and ``bias``: returns ``(dx, dweight, dbias)``.

    Training mode (default) -- the statistics depend on ``x``, which gives the compact closed form, per
    channel over its ``n`` values, with ``xhat = (x - mean_B) / sigma_B`` and ``sigma_B = sqrt(var_B + eps)``::

        dx      = (gamma / sigma_B) * (dy - mean(dy) - xhat * mean(dy * xhat))
        dweight = sum(dy * xhat)
        dbias   = sum(dy)

    The batch statistics are recomputed from ``x`` (the forward's input), so the function is self-contained;
    the modules reuse the statistics of their forward instead.

    Evaluation mode (``training=False``, with the running statistics the forward used): the statistics are
    constants, ``dx = dy * gamma / sqrt(running_var + eps)`` and ``xhat`` uses the running statistics.

    ``dweight`` and ``dbias`` are always returned, as arrays of shape ``(C,)`` in ``x``'s dtype: with
    ``weight=None`` they are the gradients w.r.t. an implicit ``gamma = 1`` and ``beta = 0`` (handy for
    measuring them; ignore them when the layer has no affine parameters).
    """
    x = _common.as_input(x, (2, 3, 4, 5), _LAYOUT)
    dy = _check_dy(dy, x)
    C = x.shape[1]
    _checks.check_eps(eps)
    w = _common.as_per_channel("weight", weight, C)
    if training:
        _checks.check_training_size(x.shape)
        x3 = _as_abl(x, x.shape[0], C)
        mean, var, shift = _moments(x3)
        return _backward_train(dy, x, w, (mean, shift, 1.0 / np.sqrt(var + eps)))
    _checks.check_running_stats(running_mean is not None, running_var is not None, training=False)
    rm = _common.as_per_channel("running_mean", running_mean, C)
    rv = _common.as_per_channel("running_var", running_var, C)
    return _backward_eval(dy, x, w, rm, rv, eps)


def _backward_eval(dy, x, w, rm, rv, eps):
    """Evaluation-mode gradients: the normalization is a fixed per-channel affine map."""
    N, C = x.shape[:2]
    x3 = _as_abl(x, N, C)
    dy3 = _as_abl(np.asarray(dy, dtype=x.dtype), N, C)
    invstd = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
    gamma = np.ones(C) if w is None else w.astype(np.float64)
    dx3 = dy3 * (gamma * invstd).astype(x.dtype)[:, None]
    xhat = (x3 - rm.astype(x.dtype)[:, None]) * invstd.astype(x.dtype)[:, None]
    dweight = (dy3 * xhat).sum(axis=2).sum(axis=0, dtype=np.float64)
    dbias = dy3.sum(axis=2).sum(axis=0, dtype=np.float64)
    return dx3.reshape(x.shape), dweight.astype(x.dtype), dbias.astype(x.dtype)


def keras_batch_norm(x, moving_mean, moving_variance, gamma=None, beta=None, training=False, momentum=0.99,
                     epsilon=1e-3):
    """Batch normalization with the Keras (``keras.layers.BatchNormalization``) bookkeeping.

    Same normalization as :func:`batch_norm` (biased batch variance in training, moving statistics in
    inference; channels on axis 1 here, NCHW, where Keras defaults to the last axis). The differences::

        moving_mean     = momentum * moving_mean     + (1 - momentum) * mean_B       # momentum = 0.99: OLD
        moving_variance = momentum * moving_variance + (1 - momentum) * var_B        # BIASED, no n/(n-1)

    and ``epsilon`` defaults to 1e-3. ``momentum`` must be a number in [0, 1] (no cumulative average).
    Keras computes ``var_B`` as ``E[x^2] - E[x]^2``; bnlib computes the same quantity stably.
    """
    will_update = bool(training) and moving_mean is not None
    _checks.check_momentum(momentum, allow_none=False)
    x, rm, rv, w, b = _validate(x, moving_mean, moving_variance, gamma, beta, training, epsilon, will_update,
                                _KERAS_NAMES)
    y, _ = _forward(x, rm, rv, w, b, bool(training), 1.0 - float(momentum), float(epsilon), unbiased=False)
    return y
