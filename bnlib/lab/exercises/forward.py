"""Checkers for the forward pass of batch norm: statistics (chapter 1), scale and shift (chapter 2), running
statistics and inference (chapter 7)."""
from __future__ import annotations

from typing import List

import numpy as np

from ... import numpy as bnp
from . import _data as D
from ._core import (
    Case,
    Problem,
    as_array,
    call,
    check_shape,
    check_unchanged,
    close,
    first_match,
    mismatch,
    num,
    rel_error,
    run_cases,
    unpack,
)

__all__ = ["check_batch_stats", "check_standardize", "check_identity_params", "check_batch_norm_train",
           "check_batch_norm_forward", "check_population_stats"]

TOL64, TOL32 = 1e-9, 1e-4
#: float32 with a mean 1e4 standard deviations away from 0: every stable algorithm stays far below this, the
#: cancelling E[x^2] - E[x]^2 far above it.
TOL_OFFSET = 2e-2
OFFSET = 1e4


def _tol(x) -> float:
    return TOL64 if np.asarray(x).dtype == np.float64 else TOL32


def _stat_shape_hints(x):
    N, C, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    hints = [((N,), "one value per example: you reduced over axis 1 (the features of each example); the "
                    "statistics run over the batch axis, axis 0"),
             ((), "a single number: you reduced over the whole array; batch norm keeps one statistic per channel"),
             ((1, C) + (1,) * len(spatial), "the reduced axes are still there (keepdims=True): return shape (C,)")]
    if spatial:
        hints += [((C,) + spatial, "one statistic per channel AND position: the statistics of an (N, C, *spatial) "
                                   f"batch pool the batch and the spatial axes, axis={D.bn_axes(x.ndim)}"),
                  ((N, C), "you reduced over the spatial axes only: include the batch axis, "
                           f"axis={D.bn_axes(x.ndim)}")]
    return hints


def _output_shape_hints(x):
    return [(tuple(x.shape[:2]), "the output must have the input's shape; did you return the statistics?")]


def _check_dtype(y, x, what="the output"):
    x_dtype = np.asarray(x).dtype
    y_dtype = getattr(y, "dtype", None)
    if y_dtype is not None and np.dtype(str(y_dtype).replace("torch.", "")) != x_dtype:
        raise Problem(f"{what} is {y_dtype} for a {x_dtype} input: keep the input's dtype (as PyTorch does); a "
                      "float64 constant or intermediate promotes float32 arrays")


def _offset_problem(what, got, expected):
    err = rel_error(got, expected)
    return (f"on float32 values with mean 1e4 and standard deviation about 1, {what} is off by {num(100 * err)} % "
            "of its size: the one-pass formula E[x^2] - E[x]^2 cancels catastrophically there (chapter 1, "
            "'Numerical stability'); subtract the mean first and average (x - mean)^2")


# ---------------------------------------------------------------------------------------------------------
# Chapter 1: the batch statistics
# ---------------------------------------------------------------------------------------------------------

def check_batch_stats(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x) -> (mean, var)``: one mean and one BIASED variance per channel of an ``(N, C)`` or
    ``(N, C, *spatial)`` array (equations (1)-(2)), against :func:`bnlib.numpy.channel_stats`."""
    g = D.generator(seed, 1)
    inputs = [
        ("(N, C) = (7, 3), float64", D.batch(g, (7, 3)), TOL64),
        ("a batch of 2, (N, C) = (2, 4), float64", D.batch(g, (2, 4)), TOL64),
        ("(N, C, H, W) = (3, 2, 4, 5), float32", D.batch(g, (3, 2, 4, 5), np.float32), TOL32),
        ("(N, C, L) = (4, 3, 6), float32 (a 1-D convolution's layout)", D.batch(g, (4, 3, 6), np.float32), TOL32),
        ("a batch of one image, (1, 3, 5, 7), float32", D.batch(g, (1, 3, 5, 7), np.float32), TOL32),
        ("a non-contiguous view (every other column of a larger array), (9, 4)", D.strided(g, (9, 4)), TOL64),
        ("float32 with mean 1e4 and standard deviation about 1, (256, 3)",
         D.batch(g, (256, 3), np.float32, offset=OFFSET), TOL_OFFSET),
    ]

    def make(x, tol):
        def run(f):
            before = x.copy()
            mean, var = unpack(call(f, x), 2, "(mean, var)")
            check_unchanged("x", before, x, "compute the statistics without modifying the batch")
            mean, var = as_array(mean, "mean"), as_array(var, "var")
            ref_mean, ref_var = bnp.channel_stats(x)
            n = D.count(x)
            check_shape("your mean", mean, ref_mean.shape, _stat_shape_hints(x))
            check_shape("your var", var, ref_var.shape, _stat_shape_hints(x))
            mean_tol = tol if tol != TOL_OFFSET else TOL32
            if not close(mean, ref_mean, mean_tol):
                hint = first_match(mean, [(ref_var, "you returned (var, mean): return (mean, var)")], mean_tol)
                raise Problem(hint or mismatch("your mean", mean, ref_mean))
            if not close(var, ref_var, tol):
                hint = first_match(var, [
                    (ref_var * n / (n - 1), f"your variance is the UNBIASED one (it divides by m - 1 = {n - 1}): "
                                            f"equation (2) divides by m = {n}, as training-mode batch norm does "
                                            "(np.var's default ddof=0). The unbiased one is what PyTorch stores "
                                            "in running_var, not what it normalizes with"),
                    (np.sqrt(ref_var), "you returned the standard deviation: equation (2) is the variance, "
                                       "sigma_B^2"),
                    (ref_var * n, f"your variance is m = {n} times too large: divide the sum of squares by m"),
                ], tol)
                if hint is None and tol == TOL_OFFSET:
                    hint = _offset_problem("your variance", var, ref_var)
                raise Problem(hint or mismatch("your var", var, ref_var))
        return run

    return run_cases(fn, [Case(label, make(x, tol)) for label, x, tol in inputs], quiet=quiet)


def _xhat_candidates(x, eps, default_eps=1e-5):
    """Normalized outputs that classic mistakes produce, with the message that explains each."""
    n = D.count(x)
    candidates = [
        (lambda: D.normalized(x, eps, ddof=1),
         f"you normalized with the UNBIASED variance (dividing by m - 1 = {n - 1}): training-mode batch norm "
         f"divides by m = {n}, equation (2)"),
        (lambda: D.normalized(x, eps, eps_mode="outside"),
         "you divided by sqrt(var) + eps: equation (3) puts eps INSIDE the square root, sqrt(var + eps)"),
        (lambda: D.normalized(x, eps, eps_mode="none"),
         "you left out eps: equation (3) divides by sqrt(var + eps) (it matters most for channels whose batch "
         "variance is comparable to eps, and a constant channel gives 0/0 without it)"),
    ]
    if eps != default_eps:
        candidates.append((lambda: D.normalized(x, default_eps),
                           f"your function ignores its eps argument: it used {default_eps:g} where the call passed "
                           f"eps = {eps:g}"))
    if x.ndim > 2:
        candidates.append((lambda: D.normalized(x, eps, axes=(0,)),
                           "you normalized every position (h, w) separately over the batch: the statistics of an "
                           f"(N, C, *spatial) batch pool the batch and the spatial axes, axis={D.bn_axes(x.ndim)}"))
    candidates += [
        (lambda: D.normalized(x, eps, axes=tuple(range(1, x.ndim))),
         "you normalized each EXAMPLE over its features (axis 1): that is layer norm; batch norm normalizes each "
         "feature over the batch (axis 0)"),
        (lambda: D.normalized(x, eps, axes=tuple(range(x.ndim))),
         "you used one mean and one variance for the whole array: batch norm has one pair per channel"),
    ]
    return candidates


def _constant_channel_problem(y, x):
    """The message for NaN output in a channel that is constant over the batch (eps left out)."""
    y = np.asarray(y, dtype=np.float64)
    _, var = D.moments(x, D.bn_axes(x.ndim))
    constant = var.reshape(-1) == 0
    bad = ~np.isfinite(y)
    if bad.any() and constant.any():
        c = int(np.flatnonzero(constant)[0])
        return (f"your output has NaN/inf in channel {c}, which is constant in this batch (sigma_B^2 = 0): without "
                "eps, (x - mean) / sqrt(var) is 0/0 there. Put eps inside the square root, sqrt(var + eps)")
    return None


def _near_constant_batch(g, dtype=np.float64):
    """(8, 3): an ordinary channel, a constant one and one whose variance (1e-6) is below eps."""
    x = D.batch(g, (8, 3), dtype)
    x[:, 1] = 0.5
    x[:, 2] = 0.25 + 1e-3 * g.standard_normal(8)
    return x.astype(dtype)


def check_standardize(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x, eps) -> xhat``: equation (3), training mode, no scale and shift, for ``(N, C)`` and
    ``(N, C, *spatial)`` arrays, against :func:`bnlib.numpy.batch_norm` (``training=True``)."""
    g = D.generator(seed, 2)
    inputs = [
        ("(N, C) = (6, 3), float64", D.batch(g, (6, 3)), 1e-5, TOL64),
        ("a batch of 2, (N, C) = (2, 3), float32", D.batch(g, (2, 3), np.float32), 1e-5, TOL32),
        ("a constant channel and one with sigma_B^2 = 1e-6, (8, 3), float64", _near_constant_batch(g), 1e-5, TOL64),
        ("(N, C, H, W) = (3, 2, 4, 5), float32", D.batch(g, (3, 2, 4, 5), np.float32), 1e-5, TOL32),
        ("eps = 1e-3 (not the default), with the channels above", _near_constant_batch(g), 1e-3, TOL64),
        ("a non-contiguous (channels-last) view, (N, C, H, W) = (2, 3, 4, 5)", D.channels_last(g, (2, 3, 4, 5)),
         1e-5, TOL64),
        ("float32 with mean 1e4 and standard deviation about 1, (256, 2)",
         D.batch(g, (256, 2), np.float32, offset=OFFSET), 1e-5, TOL_OFFSET),
    ]

    def make(x, eps, tol):
        def run(f):
            before = x.copy()
            y = call(f, x, eps)
            check_unchanged("x", before, x, "work on a copy (x = x - mean, not x -= mean): the caller's batch must "
                                            "stay as it was")
            y_arr = as_array(y, "your output")
            check_shape("your output", y_arr, x.shape, _output_shape_hints(x))
            _check_dtype(y, x)
            ref = bnp.batch_norm(x.astype(np.float64), None, None, training=True, eps=eps)
            if close(y_arr, ref, tol):
                return
            hint = _constant_channel_problem(y_arr, x) or first_match(y_arr, _xhat_candidates(x, eps), tol)
            if hint is None and tol == TOL_OFFSET:
                hint = _offset_problem("your output", y_arr, ref)
            raise Problem(hint or mismatch("your output", y_arr, ref))
        return run

    return run_cases(fn, [Case(label, make(x, eps, tol)) for label, x, eps, tol in inputs], quiet=quiet)


# ---------------------------------------------------------------------------------------------------------
# Chapter 2: scale and shift
# ---------------------------------------------------------------------------------------------------------

def check_identity_params(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x, eps) -> (gamma, beta)``: the per-channel scale and shift with which training-mode batch norm
    gives back its input, ``bnlib.numpy.batch_norm(x, None, None, gamma, beta, training=True, eps=eps) == x``."""
    g = D.generator(seed, 3)

    def small_var(dtype=np.float64):
        x = D.batch(g, (16, 3), dtype)
        x[:, 1] = (3.0 + 3e-3 * g.standard_normal(16)).astype(dtype)   # sigma_B^2 about 1e-5, like eps
        return x

    inputs = [
        ("(N, C) = (16, 3) with a channel whose sigma_B^2 is about eps, float64", small_var(), 1e-5, TOL64),
        ("(N, C, H, W) = (3, 2, 4, 5), float32", D.batch(g, (3, 2, 4, 5), np.float32), 1e-5, TOL32),
        ("a batch of 2, (N, C) = (2, 5), float64", D.batch(g, (2, 5)), 1e-5, TOL64),
        ("eps = 1e-3, (N, C) = (16, 3), float64", small_var(), 1e-3, TOL64),
        ("a non-contiguous (channels-last) view, (N, C, H, W) = (2, 3, 4, 5)", D.channels_last(g, (2, 3, 4, 5)),
         1e-5, TOL64),
    ]

    def make(x, eps, tol):
        def run(f):
            gamma, beta = unpack(call(f, x, eps), 2, "(gamma, beta)")
            gamma, beta = as_array(gamma, "gamma"), as_array(beta, "beta")
            mean, var = bnp.channel_stats(x)
            n = D.count(x)
            check_shape("your gamma", gamma, mean.shape, _stat_shape_hints(x))
            check_shape("your beta", beta, mean.shape, _stat_shape_hints(x))
            y = bnp.batch_norm(x.astype(np.float64), None, None, weight=gamma, bias=beta, training=True, eps=eps)
            if close(y, x, tol):
                return
            ref_gamma = np.sqrt(var + eps)
            hint = first_match(np.concatenate([gamma, beta]), [
                (np.concatenate([mean, ref_gamma]), "you swapped them: gamma scales (the standard deviation "
                                                    "sqrt(var + eps)), beta shifts (the mean)"),
                (np.concatenate([np.sqrt(var), mean]), "gamma = sigma_B leaves out eps: the normalization divided "
                                                       "by sqrt(sigma_B^2 + eps), so gamma must multiply by the "
                                                       "same; it matters where sigma_B^2 is comparable to eps"),
                (np.concatenate([var + eps, mean]), "your gamma is the variance: it must be the standard "
                                                    "deviation sqrt(var + eps)"),
                (np.concatenate([np.sqrt(var * n / (n - 1) + eps), mean]),
                 "your gamma uses the unbiased variance; the normalization divided by the biased one"),
                (np.concatenate([ref_gamma, -mean]), "beta has the wrong sign: y = gamma * xhat + beta adds beta "
                                                     "back, so beta = +mean"),
                (lambda: np.concatenate([np.sqrt(var + 1e-5), mean]) if eps != 1e-5 else None,
                 f"your function ignores its eps argument (it used 1e-5, the call passed {eps:g})"),
            ], tol)
            raise Problem(hint or mismatch("batch_norm(x, gamma, beta) - x", y, x.astype(np.float64)))
        return run

    return run_cases(fn, [Case(label, make(x, eps, tol)) for label, x, eps, tol in inputs], quiet=quiet)


def _affine_candidates(x, eps, w, b):
    xhat = D.normalized(x, eps)
    nd = x.ndim
    out = [
        (lambda: xhat * w + b if nd > 2 else None,
         "gamma and beta multiplied the LAST axis: arrays of shape (C,) broadcast against the last axis, so for "
         "an (N, C, *spatial) input reshape them to (1, C, 1, 1) (e.g. gamma.reshape(1, -1, *[1] * (x.ndim - 2)))"),
        (lambda: D.affine(xhat, b, w), "you swapped gamma and beta: y = gamma * xhat + beta"),
        (lambda: D.per_channel(w, nd) * (xhat + D.per_channel(b, nd)),
         "you added beta before scaling, gamma * (xhat + beta): equation (4) is gamma * xhat + beta"),
        (lambda: xhat, "your output is xhat: apply the scale and shift, y = gamma * xhat + beta"),
    ]
    return out + [(lambda c=c: D.affine(c(), w, b), m) for c, m in _xhat_candidates(x, eps)]


def check_batch_norm_train(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x, gamma, beta, eps) -> y``: training-mode batch norm with scale and shift (equations (1)-(4))
    for ``(N, C)`` and ``(N, C, *spatial)`` arrays, against :func:`bnlib.numpy.batch_norm`."""
    g = D.generator(seed, 4)

    def params(C, dtype):
        return g.uniform(0.5, 2.0, C).astype(dtype), g.normal(0.0, 1.0, C).astype(dtype)

    inputs = []
    for label, x, eps, tol in [
        ("(N, C) = (6, 3), float64", D.batch(g, (6, 3)), 1e-5, TOL64),
        ("(N, C, H, W) = (2, 3, 4, 5), float32", D.batch(g, (2, 3, 4, 5), np.float32), 1e-5, TOL32),
        ("(N, C, L) = (3, 4, 4), float64 (L = C: a wrong broadcast raises no error here)", D.batch(g, (3, 4, 4)),
         1e-5, TOL64),
        ("a batch of 2, (N, C) = (2, 3), float64", D.batch(g, (2, 3)), 1e-5, TOL64),
        ("a constant channel and one with sigma_B^2 = 1e-6, eps = 1e-3", _near_constant_batch(g), 1e-3, TOL64),
        ("a non-contiguous (channels-last) view, (N, C, H, W) = (2, 3, 4, 5)", D.channels_last(g, (2, 3, 4, 5)),
         1e-5, TOL64),
        ("float32 with mean 1e4 and standard deviation about 1, (256, 2)",
         D.batch(g, (256, 2), np.float32, offset=OFFSET), 1e-5, TOL_OFFSET),
    ]:
        inputs.append((label, x, *params(x.shape[1], x.dtype), eps, tol))

    def make(x, w, b, eps, tol):
        def run(f):
            before = x.copy()
            y = call(f, x, w, b, eps)
            check_unchanged("x", before, x, "work on a copy: the caller's batch must stay as it was")
            y_arr = as_array(y, "your output")
            check_shape("your output", y_arr, x.shape, _output_shape_hints(x))
            _check_dtype(y, x)
            ref = bnp.batch_norm(x.astype(np.float64), None, None, weight=w.astype(np.float64),
                                 bias=b.astype(np.float64), training=True, eps=eps)
            if close(y_arr, ref, tol):
                return
            hint = _constant_channel_problem(y_arr, x) or first_match(y_arr, _affine_candidates(x, eps, w, b), tol)
            if hint is None and tol == TOL_OFFSET:
                hint = _offset_problem("your output", y_arr, ref)
            raise Problem(hint or mismatch("your output", y_arr, ref))
        return run

    return run_cases(fn, [Case(label, make(x, w, b, eps, tol)) for label, x, w, b, eps, tol in inputs], quiet=quiet)


# ---------------------------------------------------------------------------------------------------------
# Chapter 7: running statistics and inference
# ---------------------------------------------------------------------------------------------------------

def _running_problem(name, got, old, batch_stat, momentum, tol, n=None, N=None):
    """The likely mistake behind a wrong ``running_mean``/``running_var`` after one training step."""
    if np.array_equal(got, old):
        return (f"{name} is unchanged after a training-mode call: update it IN PLACE (e.g. {name} *= 1 - momentum; "
                f"{name} += momentum * new), as F.batch_norm updates the buffers you pass; assigning a new array "
                f"to the name inside your function does not change the caller's array")
    m = momentum
    candidates = []
    if name == "running_var":
        biased = batch_stat * (n - 1) / n
        candidates += [
            ((1 - m) * old + m * biased, f"running_var holds the biased variance; PyTorch stores the unbiased one, "
                                         f"var_B * n / (n - 1) (here n = {n})"),
            (lambda: (1 - m) * old + m * biased * N / (N - 1) if N != n else None,
             f"your Bessel factor counts the N = {N} examples; the variance of a channel is over n = N * H * W "
             f"= {n} values, so the factor is n / (n - 1)"),
            (m * old + (1 - m) * biased, "momentum weights the OLD average in your update (Keras' convention) and "
                                         "the variance is the biased one (Keras' too): in PyTorch momentum is the "
                                         "weight of the NEW batch and running_var is unbiased"),
            ((1 - m) * old + m * np.sqrt(biased), "running_var received the standard deviation: it averages "
                                                  "variances"),
        ]
    candidates += [
        (m * old + (1 - m) * batch_stat, f"momentum weights the OLD average in your update (Keras' convention): in "
                                         f"PyTorch {name} = (1 - momentum) * {name} + momentum * new"),
        (batch_stat, f"{name} equals this batch's statistic: blend it with the old value, "
                     f"(1 - momentum) * {name} + momentum * new"),
        ((1 - 0.1) * old + 0.1 * batch_stat if m != 0.1 else None,
         f"your function ignores its momentum argument (it used 0.1, the call passed {m:g})"),
    ]
    for c, message in candidates:
        if c is None:
            continue
        try:
            c = c() if callable(c) else c
        except ZeroDivisionError:
            continue
        if c is not None and close(got, c, tol):
            return message
    if name == "running_var" and not np.all(np.isfinite(got)) and N == 1:
        return (f"running_var is NaN/inf for a batch of one image: the Bessel factor must count all n = N * H * W "
                f"= {n} values of a channel, not N = 1")
    return None


def check_batch_norm_forward(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x, running_mean, running_var, weight, bias, training, momentum, eps) -> y``: batch norm as
    ``torch.nn.functional.batch_norm`` computes it, in NumPy, against :func:`bnlib.numpy.batch_norm`.

    Training normalizes with the batch's statistics (biased variance) and updates ``running_mean`` and
    ``running_var`` IN PLACE with ``momentum`` weighting the new batch and the UNBIASED variance; evaluation
    (``training=False``) normalizes with the running statistics and leaves them alone. ``weight``/``bias`` may
    be ``None`` (1 and 0)."""
    g = D.generator(seed, 5)

    def state(C, dtype):
        return (g.normal(0.0, 1.0, C).astype(dtype), g.uniform(0.5, 2.0, C).astype(dtype),
                g.uniform(0.5, 2.0, C).astype(dtype), g.normal(0.0, 1.0, C).astype(dtype))

    specs = [
        ("training, (N, C) = (7, 3), float64, momentum 0.1", D.batch(g, (7, 3)), True, 0.1, 1e-5, True, TOL64),
        ("training, (N, C, H, W) = (2, 3, 4, 5), float32", D.batch(g, (2, 3, 4, 5), np.float32), True, 0.1, 1e-5,
         True, TOL32),
        ("eval mode (training=False), (N, C) = (5, 3), float64", D.batch(g, (5, 3)), False, 0.1, 1e-5, True, TOL64),
        ("training with momentum 0.3 and eps 1e-3", D.batch(g, (6, 4)), True, 0.3, 1e-3, True, TOL64),
        ("weight=None and bias=None (no affine parameters), training then eval", D.batch(g, (6, 3)), "both", 0.1,
         1e-5, False, TOL64),
        ("a batch of 2, (N, C) = (2, 4), float64", D.batch(g, (2, 4)), True, 0.1, 1e-5, True, TOL64),
        ("a batch of one image, (1, 2, 3, 5), float64", D.batch(g, (1, 2, 3, 5)), True, 0.1, 1e-5, True, TOL64),
        ("a non-contiguous (channels-last) view, (N, C, H, W) = (2, 3, 4, 5), training then eval",
         D.channels_last(g, (2, 3, 4, 5)), "both", 0.1, 1e-5, True, TOL64),
        ("float32 with mean 1e4 and standard deviation about 1, (256, 2), training",
         D.batch(g, (256, 2), np.float32, offset=OFFSET), True, 0.1, 1e-5, True, TOL_OFFSET),
    ]

    def one_call(f, x, rm, rv, w, b, training, momentum, eps, tol):
        """Call ``f`` once on copies of the state and check y and the running statistics."""
        rm_in, rv_in = rm.copy(), rv.copy()
        ref_rm, ref_rv = rm.astype(np.float64), rv.astype(np.float64)
        w64 = None if w is None else w.astype(np.float64)
        b64 = None if b is None else b.astype(np.float64)
        ref = bnp.batch_norm(x.astype(np.float64), ref_rm, ref_rv, w64, b64, training, momentum, eps)
        before = x.copy()
        y = call(f, x, rm_in, rv_in, w, b, training, momentum, eps)
        check_unchanged("x", before, x, "work on a copy: the caller's batch must stay as it was")
        if isinstance(y, tuple):
            raise Problem("your function returned a tuple: return only y, as F.batch_norm does; the running "
                          "statistics are updated in place")
        y_arr = as_array(y, "your output")
        check_shape("your output", y_arr, x.shape, _output_shape_hints(x))
        _check_dtype(y, x)
        n, N = D.count(x), x.shape[0]
        mean_b, var_b = bnp.channel_stats(x)
        unbiased = var_b * n / (n - 1)
        stat_tol = TOL32 if tol == TOL_OFFSET else tol
        if not training:
            if not (np.array_equal(rm_in, rm) and np.array_equal(rv_in, rv)):
                raise Problem("the running statistics changed in eval mode (training=False): in evaluation they "
                              "are read, never written")
        else:
            if not close(rm_in, ref_rm, stat_tol):
                raise Problem(_running_problem("running_mean", rm_in.astype(np.float64), rm.astype(np.float64),
                                               mean_b, momentum, stat_tol)
                              or mismatch("running_mean", rm_in, ref_rm))
            if not close(rv_in, ref_rv, stat_tol):
                raise Problem(_running_problem("running_var", rv_in.astype(np.float64), rv.astype(np.float64),
                                               unbiased, momentum, stat_tol, n=n, N=N)
                              or mismatch("running_var", rv_in, ref_rv))
        if close(y_arr, ref, tol):
            return rm_in, rv_in
        nd = x.ndim
        rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)
        if training:
            candidates = [
                (lambda: D.affine((x - D.per_channel(rm64, nd)) / np.sqrt(D.per_channel(rv64, nd) + eps), w, b),
                 "in training mode normalize with the BATCH's mean and variance; the running statistics are for "
                 "evaluation"),
                (lambda: D.affine((x - D.per_channel(ref_rm, nd)) / np.sqrt(D.per_channel(ref_rv, nd) + eps), w, b),
                 "in training mode normalize with the BATCH's mean and variance, not with the running statistics "
                 "you just updated"),
            ] + [(lambda c=c: D.affine(c(), w, b), m) for c, m in _xhat_candidates(x, eps)]
        else:
            candidates = [
                (lambda: D.affine(D.normalized(x, eps), w, b),
                 "in eval mode (training=False) normalize with running_mean and running_var, not with the "
                 "batch's own statistics: that is what makes an example's output independent of its batch"),
                (lambda: D.affine((x - D.per_channel(rm64, nd)) / (D.per_channel(rv64, nd) + eps), w, b),
                 "divide by sqrt(running_var + eps): running_var is a variance, not a standard deviation"),
                (lambda: D.affine((x - D.per_channel(rm64, nd)) / np.sqrt(D.per_channel(rv64, nd) * (n - 1) / n
                                                                         + eps), w, b),
                 "use running_var as it is: it is already the (unbiased) variance to normalize with in evaluation"),
            ]
        hint = _constant_channel_problem(y_arr, x) if training else None
        hint = hint or first_match(y_arr, candidates, tol)
        if hint is None and tol == TOL_OFFSET:
            hint = _offset_problem("your output", y_arr, ref)
        raise Problem(hint or mismatch(f"your output ({'training' if training else 'eval'} mode)", y_arr, ref))

    def make(x, training, momentum, eps, with_affine, tol):
        C = x.shape[1]
        rm, rv, w, b = state(C, x.dtype)
        if not with_affine:
            w = b = None

        def run(f):
            modes = [True, False] if training == "both" else [training]
            r_mean, r_var = rm, rv
            for mode in modes:
                r_mean, r_var = one_call(f, x, r_mean, r_var, w, b, mode, momentum, eps, tol)
        return run

    cases: List[Case] = [Case(label, make(x, tr, mom, eps, aff, tol)) for label, x, tr, mom, eps, aff, tol in specs]

    def sequence(f):
        """Three training batches, then eval: the running statistics must follow PyTorch step by step."""
        C = 3
        rm, rv, w, b = np.zeros(C), np.ones(C), np.ones(C), np.zeros(C)
        for _ in range(3):
            x = D.batch(g, (5, C))
            rm, rv = one_call(f, x, rm, rv, w, b, True, 0.1, 1e-5, TOL64)
        one_call(f, D.batch(g, (4, C)), rm, rv, w, b, False, 0.1, 1e-5, TOL64)

    cases.append(Case("three training steps from running_mean = 0, running_var = 1, then eval", sequence))
    return run_cases(fn, cases, quiet=quiet)


def check_population_stats(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(batches) -> (mean, var)``: the inference statistics of Ioffe & Szegedy's Algorithm 2 from a list
    of training batches of ``m`` values per channel each: ``E[x] = mean of the batch means`` and
    ``Var[x] = m / (m - 1) * mean of the (biased) batch variances``."""
    g = D.generator(seed, 6)

    def batches(k, shape, dtype=np.float64, offset=0.0):
        base = D.batch(g, (k * shape[0],) + tuple(shape[1:]), dtype, offset=offset)
        return [base[i * shape[0]:(i + 1) * shape[0]] for i in range(k)]

    specs = [
        ("10 batches of (N, C) = (8, 3), float64", batches(10, (8, 3)), TOL64),
        ("20 batches of 2, (N, C) = (2, 4), float64", batches(20, (2, 4)), TOL64),
        ("5 batches of (N, C, H, W) = (2, 3, 4, 5), float32: m counts N * H * W values",
         batches(5, (2, 3, 4, 5), np.float32), TOL32),
        ("one batch of (16, 3)", batches(1, (16, 3)), TOL64),
        ("8 batches of (64, 2), float32 with mean 1e4", batches(8, (64, 2), np.float32, OFFSET), TOL_OFFSET),
    ]

    def make(bs, tol):
        def run(f):
            copies = [b.copy() for b in bs]
            mean, var = unpack(call(f, list(bs)), 2, "(mean, var)")
            for before, after in zip(copies, bs):
                check_unchanged("batches", before, after, "compute the statistics without modifying the batches")
            mean, var = as_array(mean, "mean"), as_array(var, "var")
            stats = [bnp.channel_stats(b) for b in bs]
            means, variances = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
            m, N, k = D.count(bs[0]), bs[0].shape[0], len(bs)
            ref_mean, ref_var = means.mean(axis=0), m / (m - 1) * variances.mean(axis=0)
            check_shape("your mean", mean, ref_mean.shape, _stat_shape_hints(bs[0]))
            check_shape("your var", var, ref_var.shape, _stat_shape_hints(bs[0]))
            mean_tol = TOL32 if tol == TOL_OFFSET else tol
            if not close(mean, ref_mean, mean_tol):
                raise Problem(mismatch("your mean", mean, ref_mean))
            if close(var, ref_var, tol):
                return
            pooled = np.concatenate([b.astype(np.float64) for b in bs])
            _, pooled_var = bnp.channel_stats(pooled)
            n_all = D.count(pooled)
            hint = first_match(var, [
                (variances.mean(axis=0), f"your variance is the average of the BIASED batch variances: Algorithm 2 "
                                         f"multiplies it by m / (m - 1) (here m = {m}), the unbiased estimate"),
                (pooled_var, "you pooled all values into one array and took its variance: that adds the spread of "
                             "the batch means to the variance; Algorithm 2 averages the per-batch variances "
                             "(the statistics training actually normalized with), times m / (m - 1)"),
                (pooled_var * n_all / (n_all - 1), "you pooled all values into one array (unbiased variance): that "
                                                   "adds the spread of the batch means; Algorithm 2 averages the "
                                                   "per-batch variances, times m / (m - 1)"),
                (means.var(axis=0), "that is the variance of the batch MEANS: Algorithm 2 averages the batch "
                                    "VARIANCES"),
                (lambda: (N / (N - 1)) * variances.mean(axis=0) if N != m else None,
                 f"your factor counts the N = {N} examples of a batch; each channel's variance is over "
                 f"m = N * H * W = {m} values, so the factor is m / (m - 1)"),
                (lambda: (k / (k - 1)) * variances.mean(axis=0) if k > 1 else None,
                 f"your factor uses the number of batches (k = {k}); it is m / (m - 1) with m the values per "
                 f"channel in ONE batch ({m})"),
                (np.sqrt(variances).mean(axis=0) ** 2 * m / (m - 1),
                 "you averaged standard deviations and squared the result: average the variances"),
            ], tol)
            raise Problem(hint or mismatch("your var", var, ref_var))
        return run

    return run_cases(fn, [Case(label, make(bs, tol)) for label, bs, tol in specs], quiet=quiet)
