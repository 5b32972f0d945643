r"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better").

In training the batch of ``N`` samples is split, in order, into virtual ("ghost") batches of
``virtual_batch_size`` samples (the last one smaller when ``N`` is not a multiple, as ``torch.split``); each
is normalized with its own mean and variance, and the running statistics are updated once per virtual batch,
in order, with PyTorch's convention. Evaluation is plain batch norm with the running statistics. With
``virtual_batch_size >= N`` it is batch norm.

The virtual batches are processed together: the input is viewed as ``(k, N/k, C, *)`` and the statistics
have shape ``(k, C)``, so forward and backward are the batch-norm passes of
:mod:`bnlib.torch._batch_norm` with ``k`` groups (hand-derived backward, ``once_differentiable``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _checks
from ._batch_norm import BatchNormFunction, bn_backward, bn_train_forward, check_batch_norm_args
from ._common import cast_like, save_norm_context, saved_norm_context, update_running_stats

__all__ = ["ghost_batch_norm", "GhostBatchNormFunction"]


class GhostBatchNormFunction(torch.autograd.Function):
    """Batch norm of ``x`` (``N = k * v``) with separate statistics for each of the ``k`` groups of ``v``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momenta, eps, k):
        y, mean, var = bn_train_forward(x, k, weight, bias, eps)
        if running_mean is not None:
            count = x.numel() // (k * x.shape[1])
            for i in range(k):
                update_running_stats(running_mean, running_var, mean[i], var[i], count, momenta[i])
        invstd = torch.rsqrt(var + eps)
        ctx.k = k
        save_norm_context(ctx, x, weight, bias, mean, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, need_dx, need_w, need_b = saved_norm_context(ctx)
        w = cast_like(weight, mean.dtype)
        dx, sum_dy, sum_dy_xhat = bn_backward(dy, x, ctx.k, mean, invstd, w, True, need_dx, need_w)
        dw = cast_like(sum_dy_xhat.sum(0), weight.dtype) if need_w else None
        db = cast_like(sum_dy.sum(0), ctx.bias_dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None


def _momenta(n: int, momentum: Optional[float], num_batches_tracked: Optional[Tensor]):
    """One momentum per virtual batch; ``momentum=None`` is the cumulative average over all virtual
    batches counted by ``num_batches_tracked`` (incremented here by ``n``)."""
    if num_batches_tracked is None:
        return [0.0 if momentum is None else momentum] * n
    start = int(num_batches_tracked)
    num_batches_tracked.add_(n)
    if momentum is None:
        return [1.0 / (start + i + 1) for i in range(n)]
    return [momentum] * n


def ghost_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                     momentum: Optional[float] = 0.1, eps: float = 1e-5, virtual_batch_size: int = 32,
                     num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """Ghost batch norm of an ``(N, C, *)`` input; arguments as :func:`bnlib.torch.functional.batch_norm`
    plus ``virtual_batch_size`` and, optionally, the ``num_batches_tracked`` counter (incremented by the
    number of virtual batches; with ``momentum=None`` it gives the cumulative average)."""
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          check_momentum=False)
    momentum = _checks.check_momentum(momentum)
    v = _checks.check_positive_int("virtual_batch_size", virtual_batch_size)
    if not training:
        return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, False,
                                       0.0 if momentum is None else momentum, eps)[0]
    N = input.shape[0]
    k, rest = divmod(N, v)
    if k == 0:
        k, v, rest = 1, N, 0
    sizes = [v] * k + ([rest] if rest else [])
    for s in sizes:  # every virtual batch needs more than one value per channel
        _checks.check_training_size((s,) + tuple(input.shape[1:]))
    if running_mean is None:
        num_batches_tracked = None
    momenta = _momenta(len(sizes), momentum, num_batches_tracked)
    if not rest:
        return GhostBatchNormFunction.apply(input, weight, bias, running_mean, running_var, momenta, eps, k)
    head = GhostBatchNormFunction.apply(input[: k * v], weight, bias, running_mean, running_var, momenta[:k],
                                        eps, k)
    tail = GhostBatchNormFunction.apply(input[k * v:], weight, bias, running_mean, running_var, momenta[k:],
                                        eps, 1)
    return torch.cat([head, tail], dim=0)
