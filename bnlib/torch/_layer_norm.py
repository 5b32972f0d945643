r"""Layer normalization (Ba, Kiros & Hinton 2016) with a hand-derived backward pass.

Each sample is standardized over its trailing ``D`` dimensions (``normalized_shape``, ``K`` values):

.. math::
    \hat x = (x - \mu)\,\text{invstd},\qquad y = \gamma \odot \hat x + \beta ,

with elementwise ``gamma``/``beta`` of shape ``normalized_shape``. Backward, with ``g = dy * gamma`` and means
over the normalized dimensions:

.. math::
    dx = \text{invstd}\,\big(g - \overline{g} - \hat x\,\overline{g\hat x}\big),\quad
    d\gamma = \textstyle\sum_{\text{batch}} dy\,\hat x,\quad d\beta = \sum_{\text{batch}} dy .

Differentiable again, ``jvp`` and ``torch.func``: :mod:`bnlib.torch._autodiff`. Statistics in float32 for
float16/bfloat16 input.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _checks
from . import _autodiff as ad
from ._common import cast_like, check_input, check_param, compute_dtype

__all__ = ["layer_norm"]


def _ln_dims(x: torch.Tensor, D: int):
    """``(dims, batch_dims, K)``: the normalized (trailing ``D``) dims, the others, values per sample."""
    K = 1
    for s in x.shape[x.dim() - D:]:
        K *= s
    return tuple(range(-D, 0)), tuple(range(x.dim() - D)), K


def _ln_plain(x, D, weight, eps):
    """``(xhat, invstd, w)`` in the compute dtype, differentiable (:mod:`bnlib.torch._autodiff`)."""
    cd = compute_dtype(x)
    xhat, invstd = ad.standardize(ad.cast(x, cd), tuple(range(-D, 0)), eps)
    return xhat, invstd, ad.cast(weight, cd)


class LayerNormFunction(torch.autograd.Function):
    """One autograd node; ``forward`` returns ``(y, mean, invstd)`` (the statistics non-differentiable, kept for
    the backward). Double backward, ``torch.func`` and ``jvp``: see :mod:`bnlib.torch._autodiff`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, D, weight, bias, eps):
        cd = compute_dtype(x)
        xc = x if x.dtype == cd else x.to(cd)
        dims, _, K = _ln_dims(x, D)
        mean = xc.sum(dims, keepdim=True) / max(K, 1)
        buf = xc - mean
        var = torch.linalg.vector_norm(buf, dim=dims, keepdim=True).square() / max(K, 1)
        invstd = torch.rsqrt(var + eps)
        buf.mul_(invstd)
        if weight is not None:
            buf.mul_(cast_like(weight, cd))
        if bias is not None:
            buf.add_(cast_like(bias, cd))
        return (buf if buf.dtype == x.dtype else buf.to(x.dtype)), mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, D, weight, bias, eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.D, ctx.eps = D, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, mean, invstd = ctx.saved_tensors
        need_dx, need_w, need_b = (ctx.needs_input_grad[i] for i in (0, 2, 3))
        cd = mean.dtype
        D = ctx.D
        dims, batch_dims, K = _ln_dims(x, D)
        dyc = dy if dy.dtype == cd else dy.to(cd)
        if ad.higher_order():  # differentiable again (create_graph=True) and usable under torch.func
            xhat, invstd, w = _ln_plain(x, D, weight, ctx.eps)
            dx = None
            if need_dx:
                dx = ad.cast(ad.project(dyc if w is None else dyc * w, xhat, invstd, dims), x.dtype)
            dw, db = ad.affine_grads(dyc, xhat, batch_dims, need_w, need_b)
            return dx, None, ad.cast(dw, None if weight is None else weight.dtype), ad.cast(db, ctx.bias_dtype), None
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
            mean_g = g.sum(dims, keepdim=True) / max(K, 1)
            mean_gx = (g * xhat).sum(dims, keepdim=True) / max(K, 1)
            # dx = invstd * (g - mean_g - xhat * mean_gx), in place on xhat
            dx = xhat.mul_(-mean_gx).add_(g).sub_(mean_g).mul_(invstd)
            dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
        return dx, None, dw, db, None

    @staticmethod
    def jvp(ctx, x_dot, _, w_dot, b_dot, __):
        x, weight = ctx.saved_tensors
        cd = compute_dtype(x)
        xhat, invstd, w = _ln_plain(x, ctx.D, weight, ctx.eps)
        xhat_dot = None if x_dot is None else ad.project(ad.cast(x_dot, cd), xhat, invstd, tuple(range(-ctx.D, 0)))
        y_dot = ad.affine_tangent(xhat_dot, xhat, w, ad.cast(w_dot, cd), ad.cast(b_dot, cd))
        return ad.cast(y_dot, x.dtype), None, None


_LayerNormFunctionCompiled = ad.compile_twin(LayerNormFunction)


def layer_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dimensions, drop-in for
    :func:`torch.nn.functional.layer_norm` (hand-derived backward and forward-mode derivative)."""
    check_input(input)
    ns = _checks.check_normalized_shape(normalized_shape, tuple(input.shape))
    check_param("weight", weight, input, shape=ns)
    check_param("bias", bias, input, shape=ns)
    _checks.check_eps(eps)
    return ad.apply(LayerNormFunction, _LayerNormFunctionCompiled, input, len(ns), weight, bias, eps)[0]
