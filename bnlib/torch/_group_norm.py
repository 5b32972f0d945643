r"""Group normalization (Wu & He 2018) with a hand-derived backward pass.

The ``C`` channels of each sample are split into ``G`` groups of ``C/G`` consecutive channels; each
(sample, group) is standardized over its ``K = (C/G) * prod(spatial)`` values, then a per-channel affine
``y = gamma_c * x_hat + beta_c`` is applied. Forward is one pass ``y = scale[n, c] * x + shift[n, c]``.

Backward, with per-(sample, channel) sums over space ``s1 = sum(dy)``, ``s2 = sum(dy * (x - mu))`` and per
(sample, group) sums over the group's channels ``S1 = sum_c gamma_c s1``, ``S2 = invstd * sum_c gamma_c s2``:

.. math::
    dx = a\,dy + b\,x + c,\quad a = \gamma_c\,\text{invstd},\; b = -\text{invstd}^2 S_2 / K,\;
    c = -\text{invstd}\,S_1/K - b\mu ,\qquad d\gamma_c = \textstyle\sum_n \text{invstd}\, s_2,\;
    d\beta_c = \sum_n s_1 .

Instance normalization is the case ``G = C``. Differentiable again, ``jvp`` and ``torch.func``: see
:mod:`bnlib.torch._autodiff`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from . import _autodiff as ad
from ._common import cast_like, check_input, check_param, compute_dtype

__all__ = ["group_norm"]


def _nc_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the spatial dimensions of an (N, C, *) tensor -> (N, C), layout-aware."""
    N, C = t.shape[0], t.shape[1]
    if t.dim() == 2:
        return t
    S = _spatial(t)
    if t.is_contiguous():
        return t.view(N, C, S).sum(-1)
    last = t.movedim(1, -1)
    if last.is_contiguous():
        return last.reshape(N, S, C).sum(1)
    return t.reshape(N, C, S).sum(-1)


def _spatial(t: torch.Tensor) -> int:
    """The number of spatial positions of an (N, C, *) tensor (explicit, so that empty batches reshape)."""
    S = 1
    for s in t.shape[2:]:
        S *= s
    return S


def _nc_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(tuple(t.shape) + (1,) * (ndim - 2))


def gn_stats(xc: torch.Tensor, G: int, eps: float):
    """Per (sample, group) mean and biased variance, shape (N, G), by two passes."""
    N = xc.shape[0]
    K = (xc.shape[1] // G) * _spatial(xc)
    xg = xc.reshape(N, G, K)
    mean = xg.sum(-1) / max(K, 1)
    var = torch.linalg.vector_norm(xg - mean.unsqueeze(-1), dim=-1).square() / max(K, 1)
    return mean, var


def gn_forward(x, G, weight, bias, eps):
    """Returns ``(y, mean (N, G), var (N, G))``."""
    cd = compute_dtype(x)
    xc = x if x.dtype == cd else x.to(cd)
    C = x.shape[1]
    mean, var = gn_stats(xc, G, eps)
    invstd = torch.rsqrt(var + eps)
    rep = C // G
    scale = invstd.repeat_interleave(rep, dim=1)                      # (N, C)
    if weight is not None:
        scale = scale * cast_like(weight, cd)
    shift = -mean.repeat_interleave(rep, dim=1) * scale
    if bias is not None:
        shift = shift + cast_like(bias, cd)
    y = torch.addcmul(_nc_view(shift, x.dim()), xc, _nc_view(scale, x.dim()))
    return (y if y.dtype == x.dtype else y.to(x.dtype)), mean, var


def gn_backward(dy, x, G, mean, invstd, weight, need_dx, need_w, need_b):
    cd = mean.dtype
    dyc = dy if dy.dtype == cd else dy.to(cd)
    xc = x if x.dtype == cd else x.to(cd)
    N, C = x.shape[0], x.shape[1]
    nd = x.dim()
    rep = C // G
    K = x.numel() // (N * G) if x.numel() else 1
    mean_nc = mean.repeat_interleave(rep, dim=1)
    invstd_nc = invstd.repeat_interleave(rep, dim=1)
    s1 = _nc_sum(dyc)                                                 # (N, C)
    buf = torch.sub(xc, _nc_view(mean_nc, nd)).mul_(dyc)              # dy * (x - mu), becomes dx
    s2 = _nc_sum(buf)
    dw = cast_like((s2 * invstd_nc).sum(0), weight.dtype) if need_w else None
    db = s1.sum(0) if need_b else None
    dx = None
    if need_dx:
        w = None if weight is None else cast_like(weight, cd)
        gs1 = s1 if w is None else s1 * w
        gs2 = s2 if w is None else s2 * w
        S1 = gs1.view(N, G, rep).sum(-1)
        S2 = gs2.view(N, G, rep).sum(-1) * invstd
        b = -invstd * invstd * S2 / K                                  # (N, G)
        c = -invstd * S1 / K - b * mean
        a = invstd_nc if w is None else invstd_nc * w                  # (N, C)
        torch.addcmul(_nc_view(c.repeat_interleave(rep, dim=1), nd), xc,
                      _nc_view(b.repeat_interleave(rep, dim=1), nd), out=buf)
        buf.addcmul_(dyc, _nc_view(a, nd))
        dx = buf if buf.dtype == x.dtype else buf.to(x.dtype)
    return dx, dw, db


def gn_plain(x: torch.Tensor, G: int, eps: float):
    """``(xhat_g, invstd)``: the standardized input in the grouped layout ``(N, G, K)`` and ``(N, G, 1)``,
    differentiable (:mod:`bnlib.torch._autodiff`)."""
    xc = ad.cast(x, compute_dtype(x))
    return ad.standardize(xc.reshape(x.shape[0], G, (x.shape[1] // G) * _spatial(x)), (-1,), eps)


def gn_backward_plain(dy, x, G, weight, bias_dtype, eps, need_dx, need_w, need_b):
    """``(dx, dweight, dbias)`` in differentiable ops: ``dx = P(gamma * dy)`` per (sample, group)."""
    cd = compute_dtype(x)
    xhat_g, invstd = gn_plain(x, G, eps)
    xhat = xhat_g.reshape(x.shape)
    dyc = ad.cast(dy, cd)
    w = None if weight is None else ad.cast(weight, cd).reshape((1, -1) + (1,) * (x.dim() - 2))
    dx = None
    if need_dx:
        g = (dyc if w is None else dyc * w).reshape(xhat_g.shape)
        dx = ad.cast(ad.project(g, xhat_g, invstd, (-1,)).reshape(x.shape), x.dtype)
    dw, db = ad.affine_grads(dyc, xhat, (0,) + tuple(range(2, x.dim())), need_w, need_b)
    return dx, ad.cast(dw, None if weight is None else weight.dtype), ad.cast(db, bias_dtype)


def gn_jvp(x, G, weight, eps, x_dot, w_dot, b_dot):
    """Forward-mode derivative: ``ydot = gamma * P(xdot) + gammadot * xhat + betadot``."""
    cd = compute_dtype(x)
    xhat_g, invstd = gn_plain(x, G, eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)

    def per_channel(t):
        return None if t is None else ad.cast(t, cd).reshape(shape)

    xhat_dot = None
    if x_dot is not None:
        u = ad.cast(x_dot, cd).reshape(xhat_g.shape)
        xhat_dot = ad.project(u, xhat_g, invstd, (-1,)).reshape(x.shape)
    y_dot = ad.affine_tangent(xhat_dot, xhat_g.reshape(x.shape), per_channel(weight), per_channel(w_dot),
                              per_channel(b_dot))
    return ad.cast(y_dot, x.dtype)


class GroupNormFunction(torch.autograd.Function):
    """One autograd node; ``forward`` returns ``(y, mean, invstd)`` (per (sample, group), non-differentiable).
    Double backward, ``torch.func`` and ``jvp``: see :mod:`bnlib.torch._autodiff`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, G, weight, bias, eps):
        y, mean, var = gn_forward(x, G, weight, bias, eps)
        return y, mean, torch.rsqrt(var + eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, G, weight, bias, eps = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.G, ctx.eps = G, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, *output[1:])
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, mean, invstd = ctx.saved_tensors
        need_dx, need_w, need_b = (ctx.needs_input_grad[i] for i in (0, 2, 3))
        if ad.higher_order():
            dx, dw, db = gn_backward_plain(dy, x, ctx.G, weight, ctx.bias_dtype, ctx.eps, need_dx, need_w, need_b)
            return dx, None, dw, db, None
        dx, dw, db = gn_backward(dy, x, ctx.G, mean, invstd, weight, need_dx, need_w, need_b)
        return dx, None, dw, cast_like(db, ctx.bias_dtype) if need_b else None, None

    @staticmethod
    def jvp(ctx, x_dot, _, w_dot, b_dot, __):
        x, weight = ctx.saved_tensors
        return gn_jvp(x, ctx.G, weight, ctx.eps, x_dot, w_dot, b_dot), None, None


_GroupNormFunctionCompiled = ad.compile_twin(GroupNormFunction)


def check_group_norm_args(input, num_groups, weight, bias, eps):
    check_input(input)
    _checks.check_min_ndim(input.dim(), 2, layout="(N, C, *)")
    C = input.shape[1]
    G = _checks.check_num_groups(num_groups, C)
    check_param("weight", weight, input, C=C)
    check_param("bias", bias, input, C=C)
    _checks.check_eps(eps)
    return G


def group_norm(input: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Group normalization of an ``(N, C, *)`` input, drop-in for :func:`torch.nn.functional.group_norm`
    (hand-derived backward and forward-mode derivative)."""
    G = check_group_norm_args(input, num_groups, weight, bias, eps)
    return ad.apply(GroupNormFunction, _GroupNormFunctionCompiled, input, G, weight, bias, eps)[0]
