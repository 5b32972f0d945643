r"""Instance normalization (Ulyanov et al. 2016): group normalization with one channel per group.

Each (sample, channel) is standardized over its spatial positions. With ``use_input_stats=False`` the
running statistics normalize the input per channel (the evaluation branch of batch norm). In training
with running statistics, they are updated with the batch average of the per-instance mean and unbiased
variance (PyTorch's convention). The backward is :func:`bnlib.torch._group_norm.gn_backward` with ``G = C``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from . import _autodiff as ad
from ._batch_norm import apply_batch_norm
from ._common import cast_like, check_input, check_param, update_running_stats
from ._group_norm import gn_backward, gn_backward_plain, gn_forward, gn_jvp

__all__ = ["instance_norm"]


class InstanceNormFunction(torch.autograd.Function):
    """Group norm with ``G = C``, plus the running statistics; ``forward`` returns ``(y, mean, invstd)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps):
        N, C = x.shape[0], x.shape[1]
        y, mean, var = gn_forward(x, C, weight, bias, eps)
        if running_mean is not None and N > 0:  # an empty batch leaves them as they are (as torch does)
            spatial = x.numel() // (N * C)
            # batch average of the per-instance mean and (unbiased, applied inside) variance
            update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0), spatial, momentum)
        return y, mean, torch.rsqrt(var + eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _, _, _, eps = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, *output[1:])
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, mean, invstd = ctx.saved_tensors
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]
        C = x.shape[1]
        if ad.higher_order():
            dx, dw, db = gn_backward_plain(dy, x, C, weight, ctx.bias_dtype, ctx.eps, need_dx, need_w, need_b)
        else:
            dx, dw, db = gn_backward(dy, x, C, mean, invstd, weight, need_dx, need_w, need_b)
            db = cast_like(db, ctx.bias_dtype) if need_b else None
        return dx, dw, db, None, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, w_dot, b_dot, *_):
        x, weight = ctx.saved_tensors
        return gn_jvp(x, x.shape[1], weight, ctx.eps, x_dot, w_dot, b_dot), None, None


_InstanceNormFunctionCompiled = ad.compile_twin(InstanceNormFunction)


def instance_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                  running_var: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, use_input_stats: bool = True, momentum: float = 0.1,
                  eps: float = 1e-5) -> torch.Tensor:
    """Instance normalization of an ``(N, C, *)`` input, drop-in for
    :func:`torch.nn.functional.instance_norm` (hand-derived backward and forward-mode derivative)."""
    check_input(input)
    _checks.check_min_ndim(input.dim(), 2, layout="(N, C, *)")
    C = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_param(name, t, input, C=C)
    _checks.check_running_stats(running_mean is not None, running_var is not None)
    _checks.check_eps(eps)
    momentum = _checks.check_momentum(momentum, allow_none=False)
    if use_input_stats:
        _checks.check_spatial_size(tuple(input.shape))
        return ad.apply(InstanceNormFunction, _InstanceNormFunctionCompiled, input, weight, bias, running_mean,
                        running_var, momentum, eps)[0]
    if running_mean is None:
        raise _checks.RunningStatsError("running_mean, running_var: expected both when use_input_stats=False, "
                                        "got None")
    return apply_batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, "torch")
