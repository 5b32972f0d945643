"""Batch renormalization in NumPy (Ioffe 2017).

Training corrects the batch statistics towards the running ones with two per-channel factors that are
treated as constants by the backward pass (no gradient flows through ``r`` and ``d``)::

    sigma_B = sqrt(var_B + eps)                    var_B: BIASED batch variance, per channel
    sigma   = sqrt(running_var + eps)              running statistics as they were BEFORE this batch
    r = clip(sigma_B / sigma, 1/r_max, r_max)
    d = clip((mean_B - running_mean) / sigma, -d_max, d_max)
    y = weight * ((x - mean_B) / sigma_B * r + d) + bias

then the running statistics are updated like PyTorch's batch norm (``momentum`` weights the new batch,
``running_var`` receives the UNBIASED variance, ``momentum=None`` is the cumulative average over
``num_batches_tracked``). Note the paper's moving average is over ``sigma``; bnlib keeps ``running_var`` so
that a batch-renorm layer's state is interchangeable with a ``BatchNorm`` layer's. Evaluation normalizes with
the running statistics, ``y = weight * (x - running_mean) / sigma + bias``, exactly as batch norm.

``r_max = 1, d_max = 0`` gives ``r = 1, d = 0``: plain batch norm, bit for bit (the paper's warm-up).

The paper does not clip with the final limits from the first step: it trains with ``r_max = 1, d_max = 0``
(plain batch norm) for the first 5,000 steps, then relaxes the limits linearly to ``d_max = 5`` by step
25,000 and ``r_max = 3`` by step 40,000. :class:`RenormSchedule` is that schedule (any step counts); the
modules take it as ``schedule=`` and read the step from their ``num_batches_tracked`` buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .. import _checks
from . import _common
from .batch_norm import _backward_eval, _check_dy
from .batch_norm import _forward as _bn_forward
from .batch_norm import _validate as _bn_validate
from .stats import _affine, _as_abl, _moments, _norm_grad

__all__ = ["batch_renorm", "batch_renorm_backward", "renorm_factors", "RenormSchedule"]


@dataclass(frozen=True)
class RenormSchedule:
    """Ioffe 2017's schedule of the clipping limits, as a function of the training step.

    ``step`` counts the training steps taken *before* the current one (0 for the first; the modules pass their
    ``num_batches_tracked`` before this step's increment). For ``step < warmup_steps`` the limits are
    ``(1, 0)``, plain batch norm; from ``warmup_steps`` on, ``r_max`` grows linearly from 1 to its final value,
    reached at ``r_max_steps``, and ``d_max`` from 0 to its final value, reached at ``d_max_steps``. The final
    values are the layer's ``r_max`` and ``d_max``. The paper's schedule is
    ``RenormSchedule(5_000, 40_000, 25_000)``; :meth:`ioffe2017` scales it to another run length.

    >>> RenormSchedule(5_000, 40_000, 25_000).limits(15_000, 3.0, 5.0)
    (1.5714285714285714, 2.5)
    """

    warmup_steps: int
    r_max_steps: int
    d_max_steps: int

    def __post_init__(self) -> None:
        warmup = _checks.check_int("warmup_steps", self.warmup_steps, 0)
        _checks.check_int("r_max_steps", self.r_max_steps, warmup)
        _checks.check_int("d_max_steps", self.d_max_steps, warmup)

    @classmethod
    def ioffe2017(cls, steps: int = 40_000) -> "RenormSchedule":
        """The paper's schedule (5k steps of batch norm, ``d_max`` relaxed by 25k, ``r_max`` by 40k) scaled so
        that ``r_max`` reaches its final value at ``steps``: warm-up ``steps / 8``, ``d_max`` at ``5 steps / 8``
        (rounded to whole steps)."""
        steps = _checks.check_positive_int("steps", steps)
        return cls(round(steps * 5 / 40), steps, round(steps * 25 / 40))

    @staticmethod
    def _ramp(step: int, start: int, end: int) -> float:
        if step < start:
            return 0.0
        return 1.0 if end <= start else min((step - start) / (end - start), 1.0)

    def limits(self, step: int, r_max: float = 3.0, d_max: float = 5.0) -> Tuple[float, float]:
        """``(r_max, d_max)`` in force at ``step`` (an int >= 0), relaxing towards the final ``r_max``, ``d_max``."""
        step = _checks.check_int("step", step, 0)
        r_max, d_max = _checks.check_renorm_limits(r_max, d_max)
        if step < self.warmup_steps:
            return 1.0, 0.0
        return (1.0 + (r_max - 1.0) * self._ramp(step, self.warmup_steps, self.r_max_steps),
                d_max * self._ramp(step, self.warmup_steps, self.d_max_steps))


def check_schedule(schedule):
    """``schedule`` must be ``None`` or a :class:`RenormSchedule` (a ``TypeError`` naming it otherwise)."""
    if schedule is not None and not isinstance(schedule, RenormSchedule):
        raise TypeError(f"schedule: expected None or a RenormSchedule, got {type(schedule).__name__} {schedule!r}")
    return schedule


def _validate(x, running_mean, running_var, weight, bias, training, eps, r_max, d_max, will_update):
    if running_mean is None or running_var is None:
        raise ValueError("running_mean, running_var: expected arrays of shape (C,) (batch renorm needs them), got None")
    _checks.check_renorm_limits(r_max, d_max)
    return _bn_validate(x, running_mean, running_var, weight, bias, training, eps, will_update)


def _factors(mean, var, rm, rv, eps, r_max, d_max):
    """``(r, d, invstd_B)`` as float64 ``(C,)`` arrays from batch and running statistics."""
    sigma_b = np.sqrt(var + eps)
    sigma = np.sqrt(rv.astype(np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mean - rm.astype(np.float64)) / sigma, -d_max, d_max)
    return r, d, 1.0 / sigma_b


def renorm_factors(x, running_mean, running_var, eps=1e-5, r_max=3.0, d_max=5.0):
    """The correction factors ``(r, d)`` (float64, shape ``(C,)``) batch renorm would use on ``x``."""
    x, rm, rv, _, _ = _validate(x, running_mean, running_var, None, None, True, eps, r_max, d_max, False)
    mean, var, _ = _moments(_as_abl(x, x.shape[0], x.shape[1]))
    r, d, _ = _factors(mean, var, rm, rv, float(eps), float(r_max), float(d_max))
    return r, d


def _forward(x, rm, rv, w, b, training, factor, eps, r_max, d_max):
    """Forward on validated arrays; returns ``(y, saved)`` with ``saved = (mean, shift, invstd_B, r, d)``."""
    N, C = x.shape[:2]
    if not training:
        y, _ = _bn_forward(x, rm, rv, w, b, False, factor, eps)
        return y, None
    x3 = _as_abl(x, N, C)
    n = x3.shape[0] * x3.shape[2]
    mean, var, shift = _moments(x3)
    r, d, invstd = _factors(mean, var, rm, rv, eps, r_max, d_max)
    gamma = np.ones(C) if w is None else w.astype(np.float64)
    beta = np.zeros(C) if b is None else b.astype(np.float64)
    scale = gamma * r * invstd
    offset = (beta + gamma * d) - (mean - shift.astype(np.float64)) * scale
    y3 = _affine(x3, shift, scale, offset)
    _common.update_running(rm, mean, factor)
    _common.update_running(rv, _common.unbiased(var, n), factor)
    return y3.reshape(x.shape), (mean, shift, invstd, r, d)


def _backward_train(dy, x, w, saved):
    mean, shift, invstd, r, d = saved
    N, C = x.shape[:2]
    x3 = _as_abl(x, N, C)
    dy3 = _as_abl(np.asarray(dy, dtype=x.dtype), N, C)
    gamma = np.ones(C) if w is None else w.astype(np.float64)
    dx3, sg, sgxhat = _norm_grad(dy3, x3, mean, shift, invstd, gamma * r)
    dweight = r * sgxhat + d * sg
    return dx3.reshape(x.shape), dweight.astype(x.dtype), sg.astype(x.dtype)


def batch_renorm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
                 r_max=3.0, d_max=5.0, *, num_batches_tracked=None):
    """Batch renormalization of an ``(N, C)`` / ``(N, C, *spatial)`` array (formula in the module docstring).

    ``running_mean``/``running_var`` are required and, in training, updated IN PLACE after ``r`` and ``d``
    have been computed from their previous values. ``r_max >= 1``, ``d_max >= 0``. Returns ``y``.
    """
    x, rm, rv, w, b = _validate(x, running_mean, running_var, weight, bias, training, eps, r_max, d_max,
                                bool(training))
    factor = _common.averaging_factor(momentum, num_batches_tracked, bool(training))
    y, _ = _forward(x, rm, rv, w, b, bool(training), factor, float(eps), float(r_max), float(d_max))
    return y


def batch_renorm_backward(dy, x, running_mean, running_var, weight=None, eps=1e-5, r_max=3.0, d_max=5.0, *,
                          training=True):
    """Gradients of :func:`batch_renorm`: returns ``(dx, dweight, dbias)``.

    Pass the running statistics as they were BEFORE the forward updated them (the forward computes ``r`` and
    ``d`` from those; copy them before calling :func:`batch_renorm` in training). With ``r`` and ``d``
    constants, ``y = (weight * r) * xhat + weight * d + bias`` is batch norm with ``gamma = weight * r``::

        dx      = (weight * r / sigma_B) * (dy - mean(dy) - xhat * mean(dy * xhat))
        dweight = sum(dy * (r * xhat + d)),   dbias = sum(dy)

    With ``training=False`` the gradients are batch norm's evaluation-mode ones. ``dweight``/``dbias`` are
    always returned (w.r.t. implicit 1 and 0 when ``weight=None``).
    """
    x, rm, rv, w, _ = _validate(x, running_mean, running_var, weight, None, training, eps, r_max, d_max, False)
    dy = _check_dy(dy, x)
    if not training:
        return _backward_eval(dy, x, w, rm, rv, eps)
    mean, var, shift = _moments(_as_abl(x, x.shape[0], x.shape[1]))
    r, d, invstd = _factors(mean, var, rm, rv, float(eps), float(r_max), float(d_max))
    return _backward_train(dy, x, w, (mean, shift, invstd, r, d))
