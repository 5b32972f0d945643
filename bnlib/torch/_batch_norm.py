r"""Batch normalization with a hand-derived backward pass (Ioffe & Szegedy 2015).

Forward, per channel :math:`c` over the :math:`M = N \cdot \prod(\text{spatial})` values of the batch:

.. math::
    \mu = \tfrac1M \textstyle\sum x,\quad \sigma^2 = \tfrac1M \sum (x-\mu)^2,\quad
    \hat x = (x-\mu)/\sqrt{\sigma^2+\epsilon},\quad y = \gamma \hat x + \beta .

It is computed as one affine pass ``y = scale * x + shift`` with per-channel ``scale = gamma * invstd`` and
``shift = beta - mu * scale`` (statistics by two passes: the mean, then the centred sum of squares, which is
stable when ``|mu| >> sigma``). Backward, with the per-channel sums ``S1 = sum(dy)`` and
``S2 = sum(dy * (x - mu))``:

.. math::
    \frac{\partial L}{\partial\beta} = S_1,\quad \frac{\partial L}{\partial\gamma} = S_2\,\text{invstd},\quad
    \frac{\partial L}{\partial x} = a\,dy + b\,x + c,\quad a = \gamma\,\text{invstd},\;
    b = -a\,\text{invstd}^2 S_2/M,\; c = -a S_1/M - b\mu .

In evaluation mode (running statistics) ``dx = a * dy`` only. Only ``x`` and the per-channel mean and
inverse standard deviation are saved for backward. Running statistics follow PyTorch's convention
(``running = (1 - momentum) * running + momentum * batch``, unbiased variance stored, biased variance used to
normalize).

The backward is ``once_differentiable``: double backward (gradients of gradients) is not supported.

The same core (:func:`bn_train_forward`, :func:`bn_backward`) serves ghost batch norm (``k`` virtual batches,
each with its own statistics) and batch renormalization.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .. import _checks
from ._common import (cast_like, channel_view, check_input, check_param, compute_dtype, save_norm_context,
                      saved_norm_context, update_running_stats)

__all__ = ["batch_norm", "BACKENDS", "VERIFIED_TRITON_ARCHS", "VerifiedArch"]

BACKENDS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------------------------------------
# layout-aware per-channel reductions: x has shape (N, C, *spatial); the batch is split into k equal groups
# (k = 1 for batch norm, k = number of virtual batches for ghost batch norm); results have shape (k, C).
# ----------------------------------------------------------------------------------------------------------
def _channel_reduce(t: torch.Tensor, k: int, squares: bool) -> torch.Tensor:
    N, C = t.shape[0], t.shape[1]
    if t.dim() == 2:
        src, dims = t.reshape(k, N // k, C), (1,)
    elif t.is_contiguous():
        # reduce the contiguous spatial axis first, then the (small) batch axis; row sums as a
        # matrix-vector product with ones (BLAS), about twice as fast as sum(-1) on CPU
        if squares:
            part = torch.linalg.vector_norm(t.view(k, N // k, C, -1), dim=-1).square()
        else:
            rows = t.view(N * C, -1)
            part = torch.mv(rows, torch.ones(rows.shape[1], dtype=t.dtype, device=t.device))
        return part.view(k, N // k, C).sum(1)
    else:
        last = t.movedim(1, -1)  # channels-last tensors are contiguous in this view
        src, dims = last.reshape(k, -1, C), (1,)
    if squares:
        return torch.linalg.vector_norm(src, dim=dims).square()
    return src.sum(dims)


def _group_view(t: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, *S) -> (k, N // k, C, *S) (a view)."""
    return t.view((k, t.shape[0] // k) + tuple(t.shape[1:]))


def _stat_view(s: torch.Tensor, ndim: int) -> torch.Tensor:
    """(k, C) -> (k, 1, C, 1, ..., 1) broadcasting against the grouped view of an ndim-D input."""
    return s.reshape((s.shape[0], 1, s.shape[1]) + (1,) * (ndim - 2))


def bn_train_forward(x: torch.Tensor, k: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float, renorm=None):
    """Normalize ``x`` with the statistics of each of its ``k`` batch groups.

    Returns ``(y, mean, var)`` with ``mean`` and the biased ``var`` of shape ``(k, C)`` in the compute
    dtype. ``renorm`` (batch renormalization): a callable ``(mean, var) -> (r, d)`` giving per-channel
    corrections, and then ``y = gamma * (x_hat * r + d) + beta``."""
    cd = compute_dtype(x)
    xc = x if x.dtype == cd else x.to(cd)
    C = x.shape[1]
    M = x.numel() // (k * C) if x.numel() else 1
    mean = _channel_reduce(xc, k, squares=False) / M
    buf = torch.sub(_group_view(xc, k), _stat_view(mean, x.dim()))          # x - mean (becomes y)
    inner = x.dim() > 2 and x.is_contiguous()
    if inner:  # a fast norm along the contiguous spatial axis, buf stays x - mean
        var = _channel_reduce(buf.view(x.shape), k, squares=True) / M
    else:      # channels-last / (N, C): reductions run over an outer axis, where squaring in place is faster
        var = _channel_reduce(buf.square_().view(x.shape), k, squares=False) / M
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * cast_like(weight, cd)
    shift = None if bias is None else cast_like(bias, cd).expand_as(scale)
    if renorm is not None:
        r, d = renorm(mean, var)
        scale = scale * r
        dd = d if weight is None else d * cast_like(weight, cd)
        shift = dd.expand_as(scale) if shift is None else shift + dd
    if inner:  # y = (x - mean) * scale + shift, in place
        if shift is None:
            buf.mul_(_stat_view(scale, x.dim()))
        else:
            torch.addcmul(_stat_view(shift, x.dim()), buf, _stat_view(scale, x.dim()), out=buf)
    else:      # y = x * scale + (shift - mean * scale), into buf
        shift = -mean * scale if shift is None else shift - mean * scale
        torch.addcmul(_stat_view(shift, x.dim()), _group_view(xc, k), _stat_view(scale, x.dim()), out=buf)
    y = buf.view(x.shape)
    return (y if y.dtype == x.dtype else y.to(x.dtype)), mean, var


def bn_eval_forward(x: torch.Tensor, weight, bias, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """``y = scale * x + shift`` with per-channel ``scale = gamma * invstd``, ``shift = beta - mean * scale``."""
    cd = mean.dtype
    scale = invstd if weight is None else invstd * cast_like(weight, cd)
    shift = -mean * scale
    if bias is not None:
        shift = shift + cast_like(bias, cd)
    y = torch.addcmul(channel_view(shift, x.dim()), x, channel_view(scale, x.dim()))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def bn_backward(dy: torch.Tensor, x: torch.Tensor, k: int, mean: torch.Tensor, invstd: torch.Tensor,
                w_eff: Optional[torch.Tensor], training: bool, need_dx: bool, need_sum_dy_xhat: bool):
    """Hand-derived backward of ``y = w_eff * (x - mean) * invstd + const`` per batch group and channel.

    ``mean``, ``invstd``: shape (k, C) (compute dtype); ``w_eff``: (C,), (k, C) or None. In training mode the
    statistics depend on ``x``; in evaluation mode they are constants. Returns
    ``(dx or None, sum_dy (k, C), sum_dy_xhat (k, C) or None)``."""
    cd = mean.dtype
    dyc = dy if dy.dtype == cd else dy.to(cd)
    xc = x if x.dtype == cd else x.to(cd)
    nd = x.dim()
    C = x.shape[1]
    M = x.numel() // (k * C) if x.numel() else 1
    sum_dy = _channel_reduce(dyc, k, squares=False)
    a = invstd if w_eff is None else invstd * w_eff
    if not training:
        sum_dy_xhat = None
        if need_sum_dy_xhat:
            buf = torch.sub(_group_view(xc, k), _stat_view(mean, nd)).mul_(_group_view(dyc, k))
            sum_dy_xhat = _channel_reduce(buf.view(x.shape), k, squares=False) * invstd
        dx = None
        if need_dx:
            dx = torch.mul(_group_view(dyc, k), _stat_view(a, nd)).view(x.shape)
            dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
        return dx, sum_dy, sum_dy_xhat
    buf = torch.sub(_group_view(xc, k), _stat_view(mean, nd))               # x - mean (becomes dx)
    buf.mul_(_group_view(dyc, k))
    sum_dy_xmu = _channel_reduce(buf.view(x.shape), k, squares=False)
    sum_dy_xhat = sum_dy_xmu * invstd
    dx = None
    if need_dx:
        b = -a * invstd * sum_dy_xhat / M
        c = -a * sum_dy / M - b * mean
        torch.addcmul(_stat_view(c, nd), _group_view(xc, k), _stat_view(b, nd), out=buf)
        buf.addcmul_(_group_view(dyc, k), _stat_view(a, nd))
        dx = buf.view(x.shape)
        dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
    return dx, sum_dy, sum_dy_xhat


class BatchNormFunction(torch.autograd.Function):
    """Batch norm as one autograd node: forward computes the statistics (training) or uses the running ones
    (evaluation), updates the running statistics in training, and saves only ``x`` and the per-channel
    ``mean``/``invstd``; backward is :func:`bn_backward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        C = x.shape[1]
        if training:
            y, mean, var = bn_train_forward(x, 1, weight, bias, eps)
            mean, var = mean[0], var[0]
            if running_mean is not None:
                update_running_stats(running_mean, running_var, mean, var, x.numel() // max(C, 1), momentum)
            invstd = torch.rsqrt(var + eps)
        else:
            cd = compute_dtype(x)
            mean = running_mean.to(cd)
            invstd = torch.rsqrt(running_var.to(cd) + eps)
            y = bn_eval_forward(x, weight, bias, mean, invstd)
        ctx.training = training
        save_norm_context(ctx, x, weight, bias, mean, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, need_dx, need_w, need_b = saved_norm_context(ctx)
        w = cast_like(weight, mean.dtype)
        dx, sum_dy, sum_dy_xhat = bn_backward(dy, x, 1, mean.view(1, -1), invstd.view(1, -1), w,
                                              ctx.training, need_dx, need_w)
        dw = cast_like(sum_dy_xhat[0], weight.dtype) if need_w else None
        db = cast_like(sum_dy[0], ctx.bias_dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Triton backend (bnlib.torch.triton_bn, imported lazily so that bnlib.torch works without triton)
# ----------------------------------------------------------------------------------------------------------
def _triton_module():
    try:
        from . import triton_bn  # noqa: WPS433 (lazy on purpose)
    except Exception:  # triton missing or the module not importable
        return None
    return triton_bn


class VerifiedArch(NamedTuple):
    """One GPU architecture on which the Triton kernels were run and checked (see
    :data:`VERIFIED_TRITON_ARCHS`)."""

    capability: Tuple[int, int]  #: ``torch.cuda.get_device_capability()``, e.g. ``(9, 0)`` for sm_90
    device: str  #: ``torch.cuda.get_device_name()`` of the GPU it was checked on
    date: str  #: ``YYYY-MM-DD`` of the run
    verified: str  #: what was checked (tests, benchmarks, shapes, dtypes)


#: The GPU architectures on which :mod:`bnlib.torch.triton_bn` was run on a real GPU and checked against
#: torch; ``backend='auto'`` uses the Triton kernels only on these (see :func:`batch_norm`). Add an entry only
#: after such a run, with what it checked. Empty: the kernels have so far only run in Triton's CPU interpreter
#: (``TRITON_INTERPRET=1``) and been compiled ahead of time (``triton_bn.compile_report``); no GPU run was made.
VERIFIED_TRITON_ARCHS: Tuple[VerifiedArch, ...] = ()

_WARNED_ARCHS: set = set()  # the capabilities for which 'auto' already said it falls back (once per process)


def _cuda_capability(x: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` compute capability of ``x``'s CUDA device, or ``None`` when ``x`` is not on CUDA."""
    if not x.is_cuda:
        return None
    return tuple(torch.cuda.get_device_capability(x.device))


def _triton_verified(capability: Tuple[int, int]) -> bool:
    return any(tuple(arch.capability) == tuple(capability) for arch in VERIFIED_TRITON_ARCHS)


def _warn_unverified(capability: Tuple[int, int]) -> None:
    capability = tuple(capability)
    if capability in _WARNED_ARCHS:
        return
    _WARNED_ARCHS.add(capability)
    major, minor = capability
    verified = ", ".join(f"sm_{a.capability[0]}{a.capability[1]}" for a in VERIFIED_TRITON_ARCHS) or "none"
    warnings.warn(f"bnlib.torch batch_norm, backend='auto': the Triton kernels are unverified on this GPU "
                  f"architecture (sm_{major}{minor}, compute capability {major}.{minor}; verified: {verified}, "
                  "see bnlib.torch.VERIFIED_TRITON_ARCHS), so the torch-ops path is used. Pass backend='triton' "
                  "to force the Triton kernels. (Said once per architecture.)", RuntimeWarning, stacklevel=4)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    capability = _cuda_capability(x)
    if backend == "auto" and capability is None:
        return False
    mod = _triton_module()
    available = mod is not None and bool(mod.is_available(x))
    if backend == "triton" and not available:
        raise RuntimeError("backend='triton' is not available for this input: the Triton kernels need triton, "
                           "a float32/float16/bfloat16 input and a CUDA device (or TRITON_INTERPRET=1); got a "
                           f"{str(x.dtype).replace('torch.', '')} tensor on {x.device} with bnlib.torch.triton_bn "
                           f"{'importable' if mod else 'not importable'}. Use backend='torch' or 'auto'.")
    if backend == "auto" and available and not _triton_verified(capability):
        _warn_unverified(capability)
        return False
    return available


class _TritonBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        mod = _triton_module()
        y, save_mean, save_invstd = mod.batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                           training, momentum, eps)
        if not training:  # the statistics are the (constant) running ones
            cd = compute_dtype(x)
            save_mean = running_mean.to(cd)
            save_invstd = torch.rsqrt(running_var.to(cd) + eps)
        ctx.training = training
        save_norm_context(ctx, x, weight, bias, save_mean, save_invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, need_dx, need_w, need_b = saved_norm_context(ctx)
        if ctx.training:
            mod = _triton_module()
            dx, dw, db = mod.batch_norm_backward(dy, x, weight, mean, invstd)
        else:
            w = cast_like(weight, mean.dtype)
            dx, sum_dy, sum_dy_xhat = bn_backward(dy, x, 1, mean.view(1, -1).float(),
                                                  invstd.view(1, -1).float(), w, False, need_dx, need_w)
            dw = sum_dy_xhat[0] if need_w else None
            db = sum_dy[0]
        dw = cast_like(dw, weight.dtype) if (need_w and dw is not None) else None
        db = cast_like(db, ctx.bias_dtype) if (need_b and db is not None) else None
        return (dx if need_dx else None), dw, db, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
_LAYOUT = "(N, C) or (N, C, *spatial) with 1-3 spatial dims"


def _as_count(num_batches_tracked):
    """``num_batches_tracked`` (an int or a 0-d integer tensor) as a Python int, or ``None`` otherwise."""
    count = num_batches_tracked
    if isinstance(count, torch.Tensor):
        if count.dim() != 0 or count.dtype.is_floating_point or count.dtype.is_complex:
            return None
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int):
        return None
    return count


def averaging_factor(momentum, num_batches_tracked, needed: bool) -> float:
    """The weight of the new batch in the running averages (same rule and messages as :mod:`bnlib.numpy`,
    see :func:`bnlib._checks.averaging_factor`): ``momentum`` in [0, 1], or ``None`` for the cumulative
    average ``1 / num_batches_tracked`` (batches seen *including this one*)."""
    return _checks.averaging_factor(momentum, num_batches_tracked, needed, _as_count)


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked=None, *, check_momentum: bool = True):
    """Validate everything ``batch_norm`` (and its variants) needs, touching nothing; returns the averaging
    factor (see :func:`averaging_factor`)."""
    check_input(input)
    _checks.check_ndim(input.dim(), (2, 3, 4, 5), "input", _LAYOUT)
    C = input.shape[1]
    _checks.check_eps(eps)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__} {training!r}")
    _checks.check_running_stats(running_mean is not None, running_var is not None, training)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        check_param(name, t, input, C=C)
    if training:
        _checks.check_training_size(tuple(input.shape))
    if not check_momentum:
        return 0.0
    return averaging_factor(momentum, num_batches_tracked, training and running_mean is not None)


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
               backend: str = "auto", *, num_batches_tracked=None) -> torch.Tensor:
    r"""Batch normalization, drop-in for :func:`torch.nn.functional.batch_norm`.

    Args:
        input: ``(N, C, *)``, float32/float64/float16/bfloat16, contiguous or channels-last.
        running_mean, running_var: ``(C,)`` buffers or ``None``. In training they are updated in place
            (``running = (1 - momentum) * running + momentum * batch``, unbiased variance); in evaluation they
            normalize the input.
        weight, bias: ``(C,)`` or ``None`` (gamma = 1, beta = 0).
        training: use batch statistics (and update the running ones) when True.
        momentum: weight of the new batch in the running averages, in [0, 1]; ``None`` for the cumulative
            average, which needs ``num_batches_tracked`` (batches seen including this one; not incremented).
        eps: added to the variance, > 0.
        backend: ``'torch'`` (the hand-written torch-ops path here), ``'triton'`` (:mod:`bnlib.torch.triton_bn`,
            forced whatever the GPU; needs CUDA or ``TRITON_INTERPRET=1``, else RuntimeError) or ``'auto'``:
            the Triton kernels for a CUDA tensor only when triton imports, the dtype is supported and the
            device's compute capability is in :data:`VERIFIED_TRITON_ARCHS` (so far empty: no GPU run of the
            kernels has been made); otherwise the torch-ops path, with a ``RuntimeWarning`` once per
            architecture when a CUDA tensor falls back for want of verification. CPU tensors: torch-ops path.

    The backward pass is the hand-derived closed form (see the module docstring); it is
    ``once_differentiable`` (no double backward). Statistics are accumulated in float32 for
    float16/bfloat16 input, output in the input dtype. Bad input raises before running statistics change.
    """
    momentum = check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                     num_batches_tracked)
    if _use_triton(input, backend):
        return _TritonBatchNormFunction.apply(input, weight, bias, running_mean, running_var, training,
                                              momentum, eps)
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum, eps)
