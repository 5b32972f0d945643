r"""Batch renormalization (Ioffe 2017) with a hand-derived backward pass.

Training, per channel, with batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` and the running
``mu``, ``sigma = sqrt(running_var + eps)`` (read *before* this step's update):

.. math::
    r = \operatorname{clip}_{[1/r_{max},\,r_{max}]}(\sigma_B/\sigma),\quad
    d = \operatorname{clip}_{[-d_{max},\,d_{max}]}\big((\mu_B-\mu)/\sigma\big),\quad
    y = \gamma\,\big(\tfrac{x-\mu_B}{\sigma_B}\,r + d\big) + \beta ,

with no gradient through ``r`` and ``d`` (they are treated as constants). The backward is batch norm's with
``gamma * r`` as the effective scale for ``dx``, ``dgamma = r * sum(dy * x_hat) + d * sum(dy)`` and
``dbeta = sum(dy)``. Running statistics then follow PyTorch's convention (momentum weights the new batch,
unbiased variance stored). Evaluation normalizes with the running statistics, exactly as batch norm.
With ``r_max = 1`` and ``d_max = 0`` it *is* batch norm. ``once_differentiable``: no double backward.

:class:`RenormSchedule` (the paper's warm-up and relaxation of ``r_max`` and ``d_max`` over the training steps)
is the NumPy reference's class, shared so that both implementations follow the same schedule; the modules
``BatchRenorm1d/2d/3d`` take it as ``schedule=``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _checks
from ..numpy.batch_renorm import RenormSchedule, check_schedule
from ._batch_norm import BatchNormFunction, bn_backward, bn_train_forward, check_batch_norm_args
from ._common import cast_like, compute_dtype, save_norm_context, saved_norm_context, update_running_stats

__all__ = ["batch_renorm", "RenormSchedule", "check_schedule"]


class BatchRenormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max):
        cd = compute_dtype(x)
        rm = running_mean.to(cd)
        sigma = torch.sqrt(running_var.to(cd) + eps)
        saved = {}

        def renorm(mean, var):
            r = (torch.sqrt(var + eps) / sigma).clamp_(1.0 / r_max, r_max)
            d = ((mean - rm) / sigma).clamp_(-d_max, d_max)
            saved["r"], saved["d"] = r[0], d[0]
            return r, d

        y, mean, var = bn_train_forward(x, 1, weight, bias, eps, renorm=renorm)
        mean, var = mean[0], var[0]
        update_running_stats(running_mean, running_var, mean, var, x.numel() // max(x.shape[1], 1), momentum)
        invstd = torch.rsqrt(var + eps)
        save_norm_context(ctx, x, weight, bias, mean, invstd, saved["r"], saved["d"])
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, r, d, need_dx, need_w, need_b = saved_norm_context(ctx)
        w_eff = r if weight is None else cast_like(weight, r.dtype) * r
        dx, sum_dy, sum_dy_xhat = bn_backward(dy, x, 1, mean.view(1, -1), invstd.view(1, -1), w_eff, True,
                                              need_dx, need_w)
        dw = cast_like(r * sum_dy_xhat[0] + d * sum_dy[0], weight.dtype) if need_w else None
        db = cast_like(sum_dy[0], ctx.bias_dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None, None


def batch_renorm(input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 training: bool = False, momentum: float = 0.1, eps: float = 1e-5, r_max: float = 3.0,
                 d_max: float = 5.0, *, num_batches_tracked=None) -> torch.Tensor:
    """Batch renormalization of an ``(N, C, *)`` input (see the module docstring); ``running_mean`` and
    ``running_var`` are required (they define ``r`` and ``d`` in training, and normalize in evaluation)."""
    if running_mean is None or running_var is None:
        raise ValueError("running_mean, running_var: expected both (they define r and d in training and "
                         "normalize in evaluation), got None")
    momentum = check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                     num_batches_tracked)
    r_max, d_max = _checks.check_renorm_limits(r_max, d_max)
    if not training:
        return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, False, momentum, eps)[0]
    return BatchRenormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps, r_max,
                                     d_max)
