r"""RMS normalization (Zhang & Sennrich 2019) with a hand-derived backward pass.

Each sample is divided by the root mean square of its trailing ``D`` dimensions (``normalized_shape``, ``K``
values); nothing is subtracted and there is no bias:

.. math::
    \text{invrms} = \Big(\tfrac1K \textstyle\sum_k x_k^2 + \epsilon\Big)^{-1/2},\qquad
    \hat x = x\,\text{invrms},\qquad y = \gamma \odot \hat x ,

with elementwise ``gamma`` of shape ``normalized_shape``. Backward, with ``g = dy * gamma`` and means over the
normalized dimensions (layer norm's formula without its ``- mean(g)`` term: no mean was subtracted):

.. math::
    dx = \text{invrms}\,\big(g - \hat x\,\overline{g\hat x}\big),\quad
    d\gamma = \textstyle\sum_{\text{batch}} dy\,\hat x .

``eps=None`` is PyTorch's default: the machine epsilon of the computation (opmath) dtype, i.e.
``torch.finfo(torch.float32).eps`` for float32, float16 and bfloat16 input and ``torch.finfo(torch.float64).eps``
for float64 input. ``once_differentiable``: no double backward. Statistics in float32 for float16/bfloat16 input.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from .. import _checks
from ._common import cast_like, check_input, check_param, compute_dtype

__all__ = ["rms_norm"]


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, D, weight, eps):
        cd = compute_dtype(x)
        xc = x if x.dtype == cd else x.to(cd)
        dims = tuple(range(-D, 0))
        K = 1
        for s in x.shape[x.dim() - D:]:
            K *= s
        if eps is None:
            eps = torch.finfo(cd).eps
        ms = torch.linalg.vector_norm(xc, dim=dims, keepdim=True).square() / K
        invrms = torch.rsqrt(ms + eps)
        y = xc * invrms
        if weight is not None:
            y.mul_(cast_like(weight, cd))
        ctx.D, ctx.K = D, K
        ctx.save_for_backward(x, weight, invrms)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, invrms = ctx.saved_tensors
        need_dx, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        cd = invrms.dtype
        D, K = ctx.D, ctx.K
        dims = tuple(range(-D, 0))
        batch_dims = tuple(range(x.dim() - D))
        dyc = dy if dy.dtype == cd else dy.to(cd)
        xhat = (x if x.dtype == cd else x.to(cd)) * invrms
        dx = dw = None
        if need_w:
            dw = dyc * xhat
            if batch_dims:  # (an empty tuple would sum over every dimension)
                dw = dw.sum(batch_dims)
            dw = cast_like(dw, weight.dtype)
        if need_dx:
            g = dyc if weight is None else dyc * cast_like(weight, cd)
            mean_gx = (g * xhat).sum(dims, keepdim=True) / K
            # dx = invrms * (g - xhat * mean_gx), in place on xhat
            dx = xhat.mul_(-mean_gx).add_(g).mul_(invrms)
            dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
        return dx, None, dw, None


def rms_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
             weight: Optional[torch.Tensor] = None, eps: Optional[float] = None) -> torch.Tensor:
    """RMS normalization over the trailing ``normalized_shape`` dimensions, drop-in for
    :func:`torch.nn.functional.rms_norm` (hand-derived backward, ``once_differentiable``).

    ``eps=None`` uses the machine epsilon of the computation dtype, as torch does (float32's for float16,
    bfloat16 and float32 input, float64's for float64 input)."""
    check_input(input)
    ns = _checks.check_normalized_shape(normalized_shape, tuple(input.shape))
    check_param("weight", weight, input, shape=ns)
    if eps is not None:
        eps = _checks.check_eps(eps)
    return RMSNormFunction.apply(input, len(ns), weight, eps)
