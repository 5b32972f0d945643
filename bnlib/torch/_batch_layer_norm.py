r"""Batch layer normalization (Ziaee & Cano 2022) with a hand-derived backward pass.

The same formula as the NumPy reference :mod:`bnlib.numpy.batch_layer_norm` (see it for the choices made
where the paper's text and its code differ). For ``x`` of shape ``(N, C, *spatial)``, ``m`` the batch size
(``batch_size`` when given, else ``N``) and ``d = C``:

.. math::
    x_B = \frac{x - \mu_B[c]}{\sqrt{\sigma^2_B[c] + \epsilon}},\quad
    x_L = \frac{x - \mu_L[n]}{\sqrt{\sigma^2_L[n] + \epsilon}},\quad
    \hat x = \frac{\alpha_L x_L + \alpha_B x_B}{\sqrt d},\quad y = \gamma_c \hat x + \beta_c ,

with :math:`\alpha_L = 1/m - 10^{-4}`, :math:`\alpha_B = 1 - 1/m - 10^{-4}`, ``eps = 1e-3``; ``x_B`` uses
the batch statistics per channel over ``(N, *spatial)`` in training (biased variance; running statistics
updated PyTorch-style) and the running ones in evaluation; ``x_L`` uses each sample's statistics over
``(C, *spatial)``, always.

Backward: with ``g = dy * gamma_c / sqrt(d)``, ``dx`` is batch norm's gradient of ``alpha_B g`` (per channel;
statistics constant in evaluation) plus layer norm's gradient of ``alpha_L g`` (per sample);
``dgamma = sum dy * (alpha_L x_L + alpha_B x_B) / sqrt(d)``, ``dbeta = sum dy``. ``once_differentiable``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _checks
from ._batch_norm import bn_backward, bn_train_forward, check_batch_norm_args
from ._common import cast_like, channel_view, compute_dtype, save_norm_context, saved_norm_context, update_running_stats

__all__ = ["batch_layer_norm", "bln_weights"]

LAYER_OFFSET = 1e-4


def bln_weights(m: int):
    """``(alpha_L, alpha_B) = (1/m - 1e-4, 1 - 1/m - 1e-4)`` for batch size ``m``."""
    m = _checks.check_positive_int("batch_size", m)
    return 1.0 / m - LAYER_OFFSET, 1.0 - 1.0 / m - LAYER_OFFSET


def _layer_stats(xc: torch.Tensor, eps: float):
    """Per-sample mean and invstd over all non-batch dims, shape (N,) (two passes)."""
    rows = xc.reshape(xc.shape[0], -1)
    K = rows.shape[1]
    mean = rows.sum(1) / K
    var = torch.linalg.vector_norm(rows - mean[:, None], dim=1).square() / K
    return mean, torch.rsqrt(var + eps)


def _sample_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (ndim - 1))


class BatchLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, m):
        cd = compute_dtype(x)
        xc = x if x.dtype == cd else x.to(cd)
        C = x.shape[1]
        nd = x.dim()
        a_l, a_b = bln_weights(m)
        gamma = torch.ones(C, dtype=cd, device=x.device) if weight is None else cast_like(weight, cd)
        gscale = gamma / math.sqrt(C)
        # batch part, with the affine folded in: a_b * gscale * x_B + beta
        if training:
            yb, mean_b, var_b = bn_train_forward(xc, 1, a_b * gscale, bias, eps)
            mean_b, var_b = mean_b[0], var_b[0]
            if running_mean is not None:
                update_running_stats(running_mean, running_var, mean_b, var_b, x.numel() // C, momentum)
            invstd_b = torch.rsqrt(var_b + eps)
        else:
            mean_b = running_mean.to(cd)
            invstd_b = torch.rsqrt(running_var.to(cd) + eps)
            scale = a_b * gscale * invstd_b
            shift = -mean_b * scale
            if bias is not None:
                shift = shift + cast_like(bias, cd)
            yb = torch.addcmul(channel_view(shift, nd), xc, channel_view(scale, nd))
        # layer part: a_l * gscale[c] * x_L, added in place
        mean_l, invstd_l = _layer_stats(xc, eps)
        xl = torch.sub(xc, _sample_view(mean_l, nd)).mul_(_sample_view(invstd_l * a_l, nd))
        yb.addcmul_(xl, channel_view(gscale, nd))
        ctx.training, ctx.a_l, ctx.a_b = training, a_l, a_b
        save_norm_context(ctx, x, weight, bias, mean_b, invstd_b, mean_l, invstd_l)
        return yb if yb.dtype == x.dtype else yb.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean_b, invstd_b, mean_l, invstd_l, need_dx, need_w, need_b = saved_norm_context(ctx)
        cd = mean_b.dtype
        N, C = x.shape[0], x.shape[1]
        nd = x.dim()
        a_l, a_b = ctx.a_l, ctx.a_b
        gamma = torch.ones(C, dtype=cd, device=x.device) if weight is None else cast_like(weight, cd)
        gscale = gamma / math.sqrt(C)
        dyc = dy if dy.dtype == cd else dy.to(cd)
        xc = x if x.dtype == cd else x.to(cd)
        # batch part: batch norm's backward with gamma' = a_b * gscale
        dx, sum_dy, sum_dy_xb = bn_backward(dyc, xc, 1, mean_b.view(1, -1), invstd_b.view(1, -1),
                                            a_b * gscale, ctx.training, need_dx, need_w)
        # layer part: layer norm's backward of g = dy * a_l * gscale[c], per sample over (C, *spatial)
        xl = torch.sub(xc, _sample_view(mean_l, nd)).mul_(_sample_view(invstd_l, nd))    # x_L
        dw = None
        if need_w:
            sum_dy_xl = (dyc * xl).sum([0] + list(range(2, nd)))
            dw = cast_like((a_l * sum_dy_xl + a_b * sum_dy_xb[0]) / math.sqrt(C), weight.dtype)
        if need_dx:
            g = dyc * channel_view(a_l * gscale, nd)
            K = x.numel() // N
            dims = list(range(1, nd))
            mean_g = g.sum(dims) / K
            mean_gx = (g * xl).sum(dims) / K
            # dx_L = invstd_l * (g - mean(g) - x_L * mean(g x_L)), accumulated into dx
            dx_l = xl.mul_(_sample_view(-mean_gx, nd)).add_(g).sub_(_sample_view(mean_g, nd))
            dx_l.mul_(_sample_view(invstd_l, nd))
            dx = (dx.to(cd) + dx_l)
            dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
        db = cast_like(sum_dy[0], ctx.bias_dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None, None


def batch_layer_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                     running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, training: bool = False,
                     momentum: Optional[float] = 0.1, eps: float = 1e-3, *, batch_size: Optional[int] = None,
                     num_batches_tracked=None) -> torch.Tensor:
    """Batch layer normalization (formula in the module docstring; the same as :mod:`bnlib.numpy`).

    ``running_mean``/``running_var`` (the batch part's population statistics, ``(C,)``) are updated in place
    in training when given and required when ``training=False``. ``batch_size`` fixes ``m`` (default: the
    input's batch size). ``momentum=None`` (cumulative average) needs ``num_batches_tracked``."""
    factor = check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                   num_batches_tracked)
    m = input.shape[0] if batch_size is None else _checks.check_positive_int("batch_size", batch_size)
    return BatchLayerNormFunction.apply(input, weight, bias, running_mean, running_var, training, factor, eps, m)
