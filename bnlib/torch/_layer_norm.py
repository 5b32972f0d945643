r"""Layer normalization (Ba, Kiros & Hinton 2016) with a hand-derived backward pass.

Each sample is standardized over its trailing ``D`` dimensions (``normalized_shape``, ``K`` values):

.. math::
    \hat x = (x - \mu)\,\text{invstd},\qquad y = \gamma \odot \hat x + \beta ,

with elementwise ``gamma``/``beta`` of shape ``normalized_shape``. Backward, with ``g = dy * gamma`` and means
over the normalized dimensions:

.. math::
    dx = \text{invstd}\,\big(g - \overline{g} - \hat x\,\overline{g\hat x}\big),\quad
    d\gamma = \textstyle\sum_{\text{batch}} dy\,\hat x,\quad d\beta = \sum_{\text{batch}} dy .

``once_differentiable``: no double backward. Statistics in float32 for float16/bfloat16 input.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from .. import _checks
from ._common import cast_like, check_input, check_param, compute_dtype, save_norm_context, saved_norm_context

__all__ = ["layer_norm"]


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, D, weight, bias, eps):
        cd = compute_dtype(x)
        xc = x if x.dtype == cd else x.to(cd)
        dims = tuple(range(-D, 0))
        K = 1
        for s in x.shape[x.dim() - D:]:
            K *= s
        mean = xc.sum(dims, keepdim=True) / K
        buf = xc - mean
        var = torch.linalg.vector_norm(buf, dim=dims, keepdim=True).square() / K
        invstd = torch.rsqrt(var + eps)
        buf.mul_(invstd)
        if weight is not None:
            buf.mul_(cast_like(weight, cd))
        if bias is not None:
            buf.add_(cast_like(bias, cd))
        ctx.D, ctx.K = D, K
        save_norm_context(ctx, x, weight, bias, mean, invstd)
        return buf if buf.dtype == x.dtype else buf.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, need_dx, need_w, need_b = saved_norm_context(ctx, grad_slots=(0, 2, 3))
        cd = mean.dtype
        D, K = ctx.D, ctx.K
        dims = tuple(range(-D, 0))
        batch_dims = tuple(range(x.dim() - D))
        dyc = dy if dy.dtype == cd else dy.to(cd)
        xc = x if x.dtype == cd else x.to(cd)
        xhat = (xc - mean).mul_(invstd)
        dx = dw = db = None
        # sum over the batch dims; an empty tuple would sum over everything, so with no batch dims
        # (normalized_shape covers the whole input) the per-element products are the gradients themselves
        if need_w:
            prod = dyc * xhat
            dw = cast_like(prod.sum(batch_dims) if batch_dims else prod, weight.dtype)
        if need_b:
            db = cast_like(dyc.sum(batch_dims) if batch_dims else dyc, ctx.bias_dtype)
        if need_dx:
            g = dyc if weight is None else dyc * cast_like(weight, cd)
            mean_g = g.sum(dims, keepdim=True) / K
            mean_gx = (g * xhat).sum(dims, keepdim=True) / K
            # dx = invstd * (g - mean_g - xhat * mean_gx), in place on xhat
            dx = xhat.mul_(-mean_gx).add_(g).sub_(mean_g).mul_(invstd)
            dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
        return dx, None, dw, db, None


def layer_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dimensions, drop-in for
    :func:`torch.nn.functional.layer_norm` (hand-derived backward, ``once_differentiable``)."""
    check_input(input)
    ns = _checks.check_normalized_shape(normalized_shape, tuple(input.shape))
    check_param("weight", weight, input, shape=ns)
    check_param("bias", bias, input, shape=ns)
    _checks.check_eps(eps)
    return LayerNormFunction.apply(input, len(ns), weight, bias, eps)
