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
for float64 input. Differentiable again, ``jvp`` and ``torch.func``: :mod:`bnlib.torch._autodiff`. Statistics in
float32 for float16/bfloat16 input.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _checks
from . import _autodiff as ad
from ._common import cast_like, check_input, check_param, compute_dtype

__all__ = ["rms_norm"]


class RMSNormFunction(torch.autograd.Function):
    """One autograd node; ``forward`` returns ``(y, invrms)`` (non-differentiable, kept for the backward).
    ``eps`` is resolved (``None``: the machine epsilon) before the call. Double backward, ``torch.func`` and
    ``jvp``: see :mod:`bnlib.torch._autodiff` (no centring: ``P(u) = invrms * (u - xhat * mean(xhat * u))``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, D, weight, eps):
        cd = compute_dtype(x)
        xc = x if x.dtype == cd else x.to(cd)
        dims = tuple(range(-D, 0))
        K = 1
        for s in x.shape[x.dim() - D:]:
            K *= s
        ms = torch.linalg.vector_norm(xc, dim=dims, keepdim=True).square() / K
        invrms = torch.rsqrt(ms + eps)
        y = xc * invrms
        if weight is not None:
            y.mul_(cast_like(weight, cd))
        return (y if y.dtype == x.dtype else y.to(x.dtype)), invrms

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, D, weight, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.D, ctx.eps = D, eps
        ctx.save_for_backward(x, weight, output[1])
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, invrms = ctx.saved_tensors
        need_dx, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        cd = invrms.dtype
        D = ctx.D
        dims = tuple(range(-D, 0))
        batch_dims = tuple(range(x.dim() - D))
        dyc = dy if dy.dtype == cd else dy.to(cd)
        if ad.higher_order():  # differentiable again (create_graph=True) and usable under torch.func
            xhat, invrms = ad.standardize(ad.cast(x, cd), dims, ctx.eps, center=False)
            w = ad.cast(weight, cd)
            dx = None
            if need_dx:
                dx = ad.cast(ad.project(dyc if w is None else dyc * w, xhat, invrms, dims, center=False), x.dtype)
            dw, _ = ad.affine_grads(dyc, xhat, batch_dims, need_w, False)
            return dx, None, ad.cast(dw, None if weight is None else weight.dtype), None
        K = 1
        for s in x.shape[x.dim() - D:]:
            K *= s
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

    @staticmethod
    def jvp(ctx, x_dot, _, w_dot, __):
        x, weight = ctx.saved_tensors
        cd = compute_dtype(x)
        dims = tuple(range(-ctx.D, 0))
        xhat, invrms = ad.standardize(ad.cast(x, cd), dims, ctx.eps, center=False)
        xhat_dot = None if x_dot is None else ad.project(ad.cast(x_dot, cd), xhat, invrms, dims, center=False)
        y_dot = ad.affine_tangent(xhat_dot, xhat, ad.cast(weight, cd), ad.cast(w_dot, cd), None)
        return ad.cast(y_dot, x.dtype), None


_RMSNormFunctionCompiled = ad.compile_twin(RMSNormFunction)


def rms_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
             weight: Optional[torch.Tensor] = None, eps: Optional[float] = None) -> torch.Tensor:
    """RMS normalization over the trailing ``normalized_shape`` dimensions, drop-in for
    :func:`torch.nn.functional.rms_norm` (hand-derived backward and forward-mode derivative).

    ``eps=None`` uses the machine epsilon of the computation dtype, as torch does (float32's for float16,
    bfloat16 and float32 input, float64's for float64 input)."""
    check_input(input)
    ns = _checks.check_normalized_shape(normalized_shape, tuple(input.shape))
    check_param("weight", weight, input, shape=ns)
    if eps is not None:
        eps = _checks.check_eps(eps)
    if eps is None:
        eps = torch.finfo(compute_dtype(input)).eps
    return ad.apply(RMSNormFunction, _RMSNormFunctionCompiled, input, len(ns), weight, eps)[0]
