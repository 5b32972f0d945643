r"""Instance normalization (Ulyanov et al. 2016): group normalization with one channel per group.

Each (sample, channel) is standardized over its spatial positions. With ``use_input_stats=False`` the
running statistics normalize the input per channel (the evaluation branch of batch norm). In training
with running statistics, they are updated with the batch average of the per-instance mean and unbiased
variance (PyTorch's convention). The backward is :func:`bnlib.torch._group_norm.gn_backward` with ``G = C``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _checks
from ._batch_norm import BatchNormFunction
from ._common import cast_like, check_input, check_param, save_norm_context, saved_norm_context, update_running_stats
from ._group_norm import gn_backward, gn_forward

__all__ = ["instance_norm"]


class InstanceNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        N, C = x.shape[0], x.shape[1]
        y, mean, var = gn_forward(x, C, weight, bias, eps)
        if running_mean is not None:
            spatial = x.numel() // (N * C)
            # batch average of the per-instance mean and (unbiased, applied inside) variance
            update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0), spatial, momentum)
        invstd = torch.rsqrt(var + eps)
        save_norm_context(ctx, x, weight, bias, mean, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, need_dx, need_w, need_b = saved_norm_context(ctx)
        dx, dw, db = gn_backward(dy, x, x.shape[1], mean, invstd, weight, need_dx, need_w, need_b)
        return dx, dw, cast_like(db, ctx.bias_dtype) if need_b else None, None, None, None, None


def instance_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                  running_var: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, use_input_stats: bool = True, momentum: float = 0.1,
                  eps: float = 1e-5) -> torch.Tensor:
    """Instance normalization of an ``(N, C, *)`` input, drop-in for
    :func:`torch.nn.functional.instance_norm` (hand-derived backward, ``once_differentiable``)."""
    check_input(input)
    if input.dim() < 2:
        raise ValueError(f"expected input with at least 2 dimensions (N, C, *), got {input.dim()}-D input")
    C = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_param(name, t, input, C=C)
    _checks.check_running_stats(running_mean is not None, running_var is not None)
    _checks.check_eps(eps)
    momentum = _checks.check_momentum(momentum, allow_none=False)
    if use_input_stats:
        _checks.check_spatial_size(tuple(input.shape))
        return InstanceNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps)
    if running_mean is None:
        raise ValueError("running_mean, running_var: expected both when use_input_stats=False, got None")
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, False, momentum, eps)
