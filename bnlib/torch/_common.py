"""Helpers shared by the hand-written normalization functions of :mod:`bnlib.torch`.

Validation rules and messages come from :mod:`bnlib._checks` (shared with :mod:`bnlib.numpy`); this module
adds the torch-only ones (devices, low-precision dtypes, parameters whose dtype differs from the input's)
and a few tensor helpers (compute dtype, broadcasting views, running-statistics updates).

Dtypes. Inputs may be float64, float32, float16 or bfloat16. Statistics are computed in float64 for float64
input and in float32 otherwise (batch norm accumulates its means in float64, see
:mod:`bnlib.torch._batch_norm`); the output has the input's dtype. Parameters (``weight``, ``bias``)
and running statistics may have the input's dtype or, for float16/bfloat16 input, float32 (mixed precision,
as with ``model.half()`` on the convolutions only).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _checks

TORCH_FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")

__all__ = [
    "compute_dtype",
    "check_input",
    "check_param",
    "channel_view",
    "update_running_stats",
    "update_running_stats_",
    "cast_like",
]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for float32/float16/bfloat16 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_input(input, name: str = "input") -> None:
    """``input`` must be a floating-point tensor (float32, float64, float16 or bfloat16)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(input).__name__}")
    _checks.check_float_dtype(name, input.dtype, allowed=TORCH_FLOAT_DTYPES)


def check_param(name: str, t: Optional[torch.Tensor], input: torch.Tensor,
                shape: Optional[Sequence[int]] = None, C: Optional[int] = None) -> None:
    """A parameter or buffer ``t`` (or ``None``) must be a tensor on ``input``'s device, with ``input``'s dtype
    (or float32 for float16/bfloat16 input), of the per-channel shape ``(C,)`` or of ``shape``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(f"{name}: expected a tensor on input's device ({input.device}), got one on "
                         f"{t.device}; move both to the same device")
    ok = {input.dtype}
    if input.dtype in (torch.float16, torch.bfloat16):
        ok.add(torch.float32)
    if t.dtype not in ok:
        want = " or ".join(sorted(_checks.dtype_name(d) for d in ok))
        raise TypeError(f"{name}: expected dtype {want} (input has dtype {_checks.dtype_name(input.dtype)}), "
                        f"got {_checks.dtype_name(t.dtype)}")
    if C is not None:
        _checks.check_per_channel(name, tuple(t.shape), C)
    elif shape is not None:
        _checks.check_shape(name, tuple(t.shape), shape)


def channel_view(t: torch.Tensor, ndim: int, axis: int = 1) -> torch.Tensor:
    """View a per-channel vector ``(C,)`` as ``(1, C, 1, ..., 1)`` with ``ndim`` dimensions."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def cast_like(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


def save_norm_context(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      *stats: torch.Tensor) -> None:
    """In an autograd ``forward``: keep what the hand-derived backward needs, i.e. ``x``, ``weight`` and the
    statistics (saved tensors) and the dtype of ``bias`` (``ctx.bias_dtype``; the bias gradient is cast to it).
    """
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, *stats)


def saved_norm_context(ctx, grad_slots: Sequence[int] = (0, 1, 2)) -> tuple:
    """In the matching ``backward``: ``(x, weight, *stats, need_dx, need_w, need_b)``, the tensors that
    :func:`save_norm_context` kept followed by whether the gradients of the input, weight and bias are
    needed (``grad_slots``: the positions of those three among ``forward``'s arguments)."""
    return tuple(ctx.saved_tensors) + tuple(ctx.needs_input_grad[i] for i in grad_slots)


@torch.no_grad()
def update_running_stats(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         batch_mean: torch.Tensor, batch_var_biased: torch.Tensor, count: int,
                         momentum: float) -> None:
    """PyTorch's convention, in place: ``running = (1 - momentum) * running + momentum * batch`` with the
    *unbiased* batch variance ``var * n / (n - 1)`` (``n`` = values per channel)."""
    update_running_stats_(running_mean, running_var, batch_mean, batch_var_biased, count, momentum)


def update_running_stats_(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                          batch_mean: torch.Tensor, batch_var_biased: torch.Tensor, count: int,
                          momentum: float) -> None:
    """:func:`update_running_stats` without its ``torch.no_grad`` context, for callers where autograd is
    already off (an autograd ``Function.forward``): ``running.lerp_(batch, momentum)``, one op per buffer."""
    if running_mean is None:
        return
    unbiased = batch_var_biased * (count / (count - 1)) if count > 1 else batch_var_biased
    for buf, new in ((running_mean, batch_mean), (running_var, unbiased)):
        if buf.dtype == new.dtype:
            buf.lerp_(new, momentum)
        else:
            buf.copy_(buf.to(new.dtype).lerp_(new, momentum))
