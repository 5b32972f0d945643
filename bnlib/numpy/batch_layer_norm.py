"""Batch layer normalization in NumPy (Ziaee & Cano 2022, arXiv 2209.08898).

A fixed mixture of a batch-normalized and a layer-normalized copy of the input, weighted by the inverse batch
size. bnlib implements, for ``x`` of shape ``(N, C)`` or ``(N, C, *spatial)`` with ``m`` the batch size and
``d = C`` the number of features (channels)::

    x_B = (x - mean_B[c]) / sqrt(var_B[c] + eps)    per channel over (N, *spatial); BIASED variance in
                                                    training, the running (population) statistics in eval
    x_L = (x - mean_L[n]) / sqrt(var_L[n] + eps)    per sample over (C, *spatial); BIASED variance, always
    xhat = ((1/m - 1e-4) * x_L + (1 - 1/m - 1e-4) * x_B) / sqrt(d)
    y    = weight[c] * xhat + bias[c]

with ``eps = 1e-3`` by default. The mixing constants (``1e-4``), the ``1 / sqrt(d)`` factor, ``eps = 1e-3``
(the code's ``offset``) and ``d`` = number of channels are those of the authors' code
(A2Amir/Batch-Layer-Normalization, ``helpers/bln_layer.py``); the paper's text states the method as the same
inverse-batch-size weighting of batch and feature normalization, and the text and code differ in details.
Where bnlib differs from that code, on purpose:

- Statistics axes. The code (channels-last TensorFlow) takes batch moments over axis 0 only (one statistic per
  feature *and position*) and feature moments over the channel axis only (one per sample *and position*).
  bnlib uses the usual BN/LN axes, as stated above: per channel over (N, *spatial), per sample over
  (C, *spatial). For ``(N, C)`` input the two agree.
- Population statistics. The code sums the batch moments over an epoch and divides at its end (a cumulative
  average, Bessel-corrected with the batch size, reset every epoch) and can also keep feature (layer)
  moments. bnlib keeps PyTorch-style running statistics of the batch part only (``momentum`` weights the new
  batch, ``running_var`` holds the UNBIASED variance, ``momentum=None`` is the cumulative average), updated
  in place in training; the layer part always uses the sample's own statistics.
- ``m``. The code fixes ``m`` at construction (the training batch size) and uses it at inference too. bnlib
  uses ``m = batch_size`` when given, else the batch size of the input (``x.shape[0]``). The modules
  (:class:`bnlib.numpy.BatchLayerNorm`) take a ``batch_size`` argument to reproduce the code's behaviour.

At ``m = 1`` the weights are ``1 - 1e-4`` on the layer term and ``-1e-4`` (negative) on the batch term: BLN is
then essentially layer norm divided by ``sqrt(d)``. In training, batch statistics of an ``(1, C)`` input have
one value per channel (``x_B = 0`` and no unbiased variance for the running estimate), so bnlib raises
PyTorch's ``ValueError("Expected more than 1 value per channel when training, ...")`` as batch norm does; an
``(1, C, *spatial)`` input is fine (the batch statistics run over the positions). In evaluation with
population statistics and ``m = 1`` the batch term is subtracted with weight 1e-4, harmless but not what the
layer was trained with unless ``batch_size`` is fixed. (The paper reports that BLN at batch size 1 with
population statistics diverged on CIFAR-10.)
"""
from __future__ import annotations

import numpy as np

from .. import _checks
from . import _common
from .batch_norm import _check_dy
from .batch_norm import _validate as _bn_validate
from .stats import _affine, _as_abl, _moments, _norm_grad

__all__ = ["batch_layer_norm", "batch_layer_norm_backward", "bln_weights"]

LAYER_OFFSET = 1e-4  # the code's constant in (1/m - 1e-4) and (1 - 1/m - 1e-4)


def bln_weights(m):
    """The mixing weights ``(alpha_L, alpha_B) = (1/m - 1e-4, 1 - 1/m - 1e-4)`` for batch size ``m``."""
    m = _checks.check_positive_int("batch_size", m)
    return 1.0 / m - LAYER_OFFSET, 1.0 - 1.0 / m - LAYER_OFFSET


def _batch_size(x, batch_size):
    return x.shape[0] if batch_size is None else _checks.check_positive_int("batch_size", batch_size)


def _layer_stats(x, eps):
    rows = np.ascontiguousarray(x).reshape(1, x.shape[0], -1)
    mean, var, shift = _moments(rows)
    return rows, mean, shift, 1.0 / np.sqrt(var + eps)


def _layer_hat(rows, mean, shift, invstd, weight=1.0):
    """``weight * x_L`` as an ``(1, N, C*L)`` array."""
    scale = weight * invstd
    return _affine(rows, shift, scale, -(mean - shift.astype(np.float64)) * scale)


def _forward(x, rm, rv, w, b, training, factor, eps, m):
    """Forward on validated arrays; returns ``(y, saved)``, ``saved`` for :func:`_backward`."""
    N, C = x.shape[:2]
    x3 = _as_abl(x, N, C)
    n = x3.shape[0] * x3.shape[2]
    a_l, a_b = bln_weights(m)
    if training:
        mean_b, var_b, shift_b = _moments(x3)
    else:
        mean_b, var_b, shift_b = rm.astype(np.float64), rv.astype(np.float64), rm.astype(x.dtype)
    invstd_b = 1.0 / np.sqrt(var_b + eps)
    rows, mean_l, shift_l, invstd_l = _layer_stats(x, eps)
    gamma = np.ones(C) if w is None else w.astype(np.float64)
    beta = np.zeros(C) if b is None else b.astype(np.float64)
    gscale = gamma / np.sqrt(C)
    # Batch part with the affine folded in: y = gscale * a_b * x_B + beta ...
    scale_b = gscale * a_b * invstd_b
    y3 = _affine(x3, shift_b, scale_b, beta - (mean_b - shift_b.astype(np.float64)) * scale_b)
    # ... plus gscale * a_l * x_L (the layer part is per sample, so the per-channel scale comes after).
    x_l = _layer_hat(rows, mean_l, shift_l, invstd_l, a_l).reshape(N, C, -1)
    x_l *= gscale.astype(x.dtype)[:, None]
    y3 += x_l
    if training and rm is not None:
        _common.update_running(rm, mean_b, factor)
        _common.update_running(rv, _common.unbiased(var_b, n), factor)
    saved = (training, mean_b, shift_b, invstd_b, mean_l, shift_l, invstd_l, m)
    return y3.reshape(x.shape), saved


def _backward(dy, x, w, saved):
    training, mean_b, shift_b, invstd_b, mean_l, shift_l, invstd_l, m = saved
    N, C = x.shape[:2]
    x3 = _as_abl(x, N, C)
    dy3 = _as_abl(np.asarray(dy, dtype=x.dtype), N, C)
    a_l, a_b = bln_weights(m)
    gamma = np.ones(C) if w is None else w.astype(np.float64)
    gscale = gamma / np.sqrt(C)
    # Batch part: batch norm's gradient with gamma' = a_b * gamma / sqrt(d) (constant statistics in eval).
    if training:
        dx3, sg, sgxhat_b = _norm_grad(dy3, x3, mean_b, shift_b, invstd_b, a_b * gscale)
    else:
        dx3 = dy3 * (a_b * gscale * invstd_b).astype(x.dtype)[:, None]
        x_b = _affine(x3, shift_b, invstd_b, -(mean_b - shift_b.astype(np.float64)) * invstd_b)
        sgxhat_b = np.einsum("ncl,ncl->c", dy3, x_b)
        sg = dy3.sum(axis=2).sum(axis=0, dtype=np.float64)
    # Layer part: layer norm's gradient of g = dy * a_l * gamma[c] / sqrt(d), per sample.
    rows = x3.reshape(1, N, -1)
    g = (dy3 * (a_l * gscale).astype(x.dtype)[:, None]).reshape(rows.shape)
    dx_l, _, _ = _norm_grad(g, rows, mean_l, shift_l, invstd_l)
    dx3 += dx_l.reshape(x3.shape)
    x_l = _layer_hat(rows, mean_l, shift_l, invstd_l).reshape(x3.shape)
    sgxhat_l = np.einsum("ncl,ncl->c", dy3, x_l)
    dweight = (a_l * sgxhat_l + a_b * sgxhat_b) / np.sqrt(C)
    return dx3.reshape(x.shape), dweight.astype(x.dtype), sg.astype(x.dtype)


def batch_layer_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-3, *, batch_size=None, num_batches_tracked=None):
    """Batch layer normalization (formula and choices in the module docstring); returns ``y`` like ``x``.

    ``running_mean``/``running_var`` (the batch part's population statistics, ``(C,)``) are updated IN PLACE
    in training when given and are required when ``training=False``. ``batch_size`` fixes ``m`` (default:
    ``x.shape[0]``). ``momentum=None`` (cumulative average) needs ``num_batches_tracked``.
    """
    will_update = bool(training) and running_mean is not None
    x, rm, rv, w, b = _bn_validate(x, running_mean, running_var, weight, bias, training, eps, will_update)
    m = _batch_size(x, batch_size)
    factor = _common.averaging_factor(momentum, num_batches_tracked, will_update)
    y, _ = _forward(x, rm, rv, w, b, bool(training), factor, float(eps), m)
    return y


def batch_layer_norm_backward(dy, x, weight=None, eps=1e-3, *, batch_size=None, training=True,
                              running_mean=None, running_var=None):
    """Gradients of :func:`batch_layer_norm`: returns ``(dx, dweight, dbias)``.

    With ``gamma' = weight[c] / sqrt(d)``, ``y = gamma' * (alpha_L x_L + alpha_B x_B) + bias``, so ``dx`` is the
    sum of layer norm's gradient (of ``alpha_L gamma' dy``, per sample) and batch norm's (of
    ``alpha_B gamma' dy``, per channel; with ``training=False`` the batch statistics are the running ones and
    constant, ``dx_B = alpha_B gamma' dy / sqrt(running_var + eps)``)::

        dweight = sum over (N, *spatial) of dy * (alpha_L x_L + alpha_B x_B) / sqrt(d),   dbias = sum(dy)

    ``dweight``/``dbias`` are always returned (w.r.t. implicit 1 and 0 when ``weight=None``).
    """
    x, rm, rv, w, _ = _bn_validate(x, running_mean, running_var, weight, None, training, eps, False)
    dy = _check_dy(dy, x)
    m = _batch_size(x, batch_size)
    N, C = x.shape[:2]
    if training:
        mean_b, var_b, shift_b = _moments(_as_abl(x, N, C))
    else:
        mean_b, var_b, shift_b = rm.astype(np.float64), rv.astype(np.float64), rm.astype(x.dtype)
    _, mean_l, shift_l, invstd_l = _layer_stats(x, float(eps))
    saved = (bool(training), mean_b, shift_b, 1.0 / np.sqrt(var_b + eps), mean_l, shift_l, invstd_l, m)
    return _backward(dy, x, w, saved)
