"""Checkers for the alternatives to batch norm: group norm and batch renorm (chapter 6), layer norm and
per-time-step statistics of variable-length sequences (chapter 8)."""
from __future__ import annotations

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
    rel_error,
    run_cases,
    unpack,
)

__all__ = ["check_group_norm", "check_layer_norm", "check_renorm_factors", "check_masked_stats"]

TOL64, TOL32, TOL_OFFSET = 1e-9, 1e-4, 2e-2


def _check_dtype(y, x):
    y_dtype = getattr(y, "dtype", None)
    if y_dtype is not None and str(y_dtype).replace("torch.", "") != str(np.asarray(x).dtype):
        raise Problem(f"the output is {y_dtype} for a {np.asarray(x).dtype} input: keep the input's dtype")


def _batch_dependence_message(kind):
    return (f"your output for one example depends on the other examples of the batch: you computed the statistics "
            f"over the batch axis (that is batch norm). {kind} normalizes each example on its own")


# ---------------------------------------------------------------------------------------------------------
# Chapter 6: group norm, by reshaping and calling batch norm
# ---------------------------------------------------------------------------------------------------------

def _gn(x, G, eps, *, ddof=0, layout="blocks", over_batch=False):
    """Group-normalized ``x`` (float64, no affine): the reference or a classic mistake."""
    N, C = x.shape[:2]
    x64 = np.asarray(x, dtype=np.float64)
    if layout == "blocks":          # group g = channels g*C/G ... (g+1)*C/G - 1: the definition
        xr = x64.reshape(N, G, -1)
    else:                           # interleaved: channel c in group c % G
        xr = np.moveaxis(x64.reshape((N, C // G, G) + x.shape[2:]), 2, 1).reshape(N, G, -1)
    axes = (0, 2) if over_batch else (2,)
    mean, var = D.moments(xr, axes, ddof)
    out = (xr - mean) / np.sqrt(var + eps)
    if layout != "blocks":
        out = np.moveaxis(out.reshape((N, G, C // G) + x.shape[2:]), 1, 2)
    return out.reshape(x.shape)


def check_group_norm(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x, num_groups, weight, bias, eps) -> y``: group normalization of an ``(N, C, *)`` array (each
    example's channels split into ``num_groups`` groups of consecutive channels, each normalized over its
    channels and positions, then a per-channel scale and shift), against :func:`bnlib.numpy.group_norm`."""
    g = D.generator(seed, 11)

    def params(C, dtype):
        return g.uniform(0.5, 2.0, C).astype(dtype), g.normal(0.0, 1.0, C).astype(dtype)

    def per_example_offset():
        x = D.batch(g, (3, 4, 2, 3), np.float32)
        return (x + np.array([1e4, -1e4, 3e3], np.float32).reshape(3, 1, 1, 1)).astype(np.float32)

    def near_constant():
        x = D.batch(g, (2, 4, 3))
        x[0, :2] = 1.5 + 1e-3 * g.standard_normal((2, 3))       # group 0 of example 0: sigma^2 about 1e-6
        return x

    specs = [
        ("(N, C, H, W) = (2, 6, 3, 5), 3 groups, float64", D.batch(g, (2, 6, 3, 5)), 3, True, 1e-5, TOL64),
        ("(N, C, L) = (3, 4, 5), 2 groups, float32", D.batch(g, (3, 4, 5), np.float32), 2, True, 1e-5, TOL32),
        ("1 group (layer norm over C, H, W), (2, 4, 3, 3)", D.batch(g, (2, 4, 3, 3)), 1, True, 1e-5, TOL64),
        ("C groups (instance norm), (2, 3, 4, 5)", D.batch(g, (2, 3, 4, 5)), 3, True, 1e-5, TOL64),
        ("a batch of one image, (1, 6, 2, 3), 2 groups", D.batch(g, (1, 6, 2, 3)), 2, True, 1e-5, TOL64),
        ("weight=None and bias=None, (2, 4, 3), 2 groups", D.batch(g, (2, 4, 3)), 2, False, 1e-5, TOL64),
        ("a non-contiguous (channels-last) view, (2, 6, 3, 5), 3 groups", D.channels_last(g, (2, 6, 3, 5)), 3, True,
         1e-5, TOL64),
        ("eps = 1e-3 with a nearly constant group, (2, 4, 3), 2 groups", near_constant(), 2, True, 1e-3, TOL64),
        ("float32 with a different offset (up to 1e4) per example, (3, 4, 2, 3), 2 groups", per_example_offset(), 2,
         True, 1e-5, TOL_OFFSET),
    ]

    def make(x, G, affine, eps, tol):
        w, b = params(x.shape[1], x.dtype) if affine else (None, None)

        def run(f):
            before = x.copy()
            y = call(f, x, G, w, b, eps, hints=[(
                "could not be broadcast", "weight and bias have one entry per CHANNEL (C,), not per group: apply "
                                          "them after reshaping back to (N, C, *), as weight.reshape(1, C, 1, ...)")])
            check_unchanged("x", before, x, "work on a copy: the caller's batch must stay as it was")
            y_arr = as_array(y, "your output")
            check_shape("your output", y_arr, x.shape)
            _check_dtype(y, x)
            w64 = None if w is None else w.astype(np.float64)
            b64 = None if b is None else b.astype(np.float64)
            ref = bnp.group_norm(x.astype(np.float64), G, w64, b64, eps)
            if close(y_arr, ref, tol):
                return
            N, C = x.shape[:2]
            candidates = [
                (lambda: D.affine(_gn(x, G, eps, over_batch=True), w64, b64) if N > 1 else None,
                 _batch_dependence_message("Group norm") + ": reshape to (1, N * G, -1) so that each (example, group) "
                 "pair is one 'channel' of batch norm"),
                (lambda: D.affine(bnp.batch_norm(x.astype(np.float64).reshape(N * G, -1), None, None, training=True,
                                                 eps=eps).reshape(x.shape), w64, b64),
                 "batch_norm on an (N * G, L) array normalizes each COLUMN (position) over the rows: put the "
                 "(example, group) pairs on the channel axis instead, x.reshape(1, N * G, -1)"),
                (lambda: D.affine(_gn(x, G, eps, layout="interleaved"), w64, b64) if 1 < G < C else None,
                 "your groups interleave the channels (channel c in group c % G): a group is C / G CONSECUTIVE "
                 "channels, which x.reshape(N, G, -1) gives directly"),
                (lambda: D.affine(_gn(x, G, eps, ddof=1), w64, b64),
                 "you normalized with the unbiased variance: group norm divides by the number of values in the "
                 "group (biased), like batch norm in training"),
                (lambda: _gn(x, G, eps) if w is not None else None,
                 "your output has no scale and shift: apply weight and bias per channel after normalizing"),
                (lambda: D.affine(_gn(x, G, 1e-5), w64, b64) if eps != 1e-5 else None,
                 f"your function ignores its eps argument (it used 1e-5, the call passed {eps:g})"),
                (lambda: D.affine(_gn(x, 1, eps), w64, b64) if G > 1 else None,
                 "you normalized each example as a whole (one group): use num_groups groups"),
            ]
            hint = first_match(y_arr, candidates, tol)
            if hint is None and tol == TOL_OFFSET:
                hint = (f"with a large offset per example your output is off by {100 * rel_error(y_arr, ref):.0f} % "
                        "of its size: compute the variance as the mean of (x - mean)^2 (chapter 1)")
            raise Problem(hint or mismatch("your output", y_arr, ref))
        return run

    return run_cases(fn, [Case(label, make(x, G, aff, eps, tol)) for label, x, G, aff, eps, tol in specs],
                     quiet=quiet)


# ---------------------------------------------------------------------------------------------------------
# Chapter 6: batch renormalization's correction factors
# ---------------------------------------------------------------------------------------------------------

def check_renorm_factors(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x, running_mean, running_var, eps, r_max, d_max) -> (r, d)``: batch renormalization's
    per-channel corrections (Ioffe 2017), ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mean_B - running_mean) / sigma, -d_max, d_max)`` with ``sigma_B = sqrt(var_B + eps)`` (biased)
    and ``sigma = sqrt(running_var + eps)``, against :func:`bnlib.numpy.renorm_factors`."""
    g = D.generator(seed, 12)

    def spread(shape, dtype=np.float64):
        """A batch and running statistics that put r and d inside and outside their clipping ranges."""
        x = D.batch(g, shape, dtype)
        mean, var = bnp.channel_stats(x)
        C = shape[1]
        ratios = np.resize([1.2, 0.15, 6.0, 0.8, 1.0], C)            # sigma_B / sigma
        shifts = np.resize([0.3, -8.0, 2.0, 9.0, -0.6], C)           # (mean_B - running_mean) / sigma
        rv = (var + 1e-5) / ratios ** 2 - 1e-5
        rm = mean - shifts * np.sqrt(rv + 1e-5)
        return x, rm.astype(dtype), rv.astype(dtype)

    specs = [
        ("(N, C) = (8, 5), float64, r_max = 3, d_max = 5 (some factors clipped)", *spread((8, 5)), 1e-5, 3.0, 5.0,
         TOL64),
        ("r_max = 1.5, d_max = 0.5", *spread((8, 5)), 1e-5, 1.5, 0.5, TOL64),
        ("r_max = 1, d_max = 0 (the warm-up: plain batch norm)", *spread((6, 4)), 1e-5, 1.0, 0.0, TOL64),
        ("(N, C, H, W) = (2, 3, 4, 5), float32", *spread((2, 3, 4, 5), np.float32), 1e-5, 3.0, 5.0, TOL32),
        ("a batch of 2, (2, 5)", *spread((2, 5)), 1e-5, 3.0, 5.0, TOL64),
        ("eps = 1e-3", *spread((8, 5)), 1e-3, 3.0, 5.0, TOL64),
    ]

    def make(x, rm, rv, eps, r_max, d_max, tol):
        def run(f):
            saved = (x.copy(), rm.copy(), rv.copy())
            r, d = unpack(call(f, x, rm, rv, eps, r_max, d_max), 2, "(r, d)")
            for what, before, after in zip(("x", "running_mean", "running_var"), saved, (x, rm, rv)):
                check_unchanged(what, before, after, "computing the factors changes nothing: the running "
                                                     "statistics are updated by the layer afterwards")
            r, d = as_array(r, "r"), as_array(d, "d")
            C = x.shape[1]
            check_shape("your r", r, (C,))
            check_shape("your d", d, (C,))
            ref_r, ref_d = bnp.renorm_factors(x.astype(np.float64), rm.astype(np.float64), rv.astype(np.float64),
                                              eps, r_max, d_max)
            mean, var = bnp.channel_stats(x)
            n = D.count(x)
            rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)
            sigma_b, sigma = np.sqrt(var + eps), np.sqrt(rv64 + eps)
            raw_r, raw_d = sigma_b / sigma, (mean - rm64) / sigma
            if not close(r, ref_r, tol):
                hint = first_match(r, [
                    (np.clip(sigma / sigma_b, 1 / r_max, r_max), "r is upside down: r = sigma_B / sigma (it turns "
                                                                 "the batch's normalization into the running one)"),
                    (raw_r, f"r is not clipped: r = clip(sigma_B / sigma, 1/r_max, r_max) (here r_max = {r_max:g})"),
                    (np.clip(raw_r, 0, r_max), "r is clipped to [0, r_max]: the lower limit is 1/r_max"),
                    (np.clip(raw_r, -r_max, r_max), "r is clipped to [-r_max, r_max]: the range is [1/r_max, r_max]"),
                    (np.clip(np.sqrt(var) / np.sqrt(rv64), 1 / r_max, r_max),
                     "you left eps out of the standard deviations: sigma_B = sqrt(var_B + eps), sigma = "
                     "sqrt(running_var + eps)"),
                    (np.clip(np.sqrt(var * n / (n - 1) + eps) / sigma, 1 / r_max, r_max),
                     "sigma_B uses the unbiased variance: the batch is normalized with the biased one, and r "
                     "corrects exactly that normalization"),
                    (np.clip(var / rv64, 1 / r_max, r_max), "r compares variances: it is a ratio of standard "
                                                            "deviations, sigma_B / sigma"),
                ], tol)
                raise Problem(hint or mismatch("your r", r, ref_r))
            if not close(d, ref_d, tol, scale=max(np.abs(ref_d).max(), 1.0)):
                hint = first_match(d, [
                    (-ref_d, "d has the wrong sign: d = (mean_B - running_mean) / sigma"),
                    (raw_d, f"d is not clipped: d = clip(..., -d_max, d_max) (here d_max = {d_max:g})"),
                    (np.clip(mean - rm64, -d_max, d_max), "d is not divided by sigma: it is measured in running "
                                                          "standard deviations, (mean_B - running_mean) / sigma"),
                    (np.clip((mean - rm64) / sigma_b, -d_max, d_max), "d divides by the BATCH's sigma_B: it divides "
                                                                      "by the running sigma"),
                    (np.clip(raw_d, -r_max, r_max), "d is clipped with r_max: its limit is d_max"),
                    (np.clip((mean - rm64) / np.sqrt(rv64), -d_max, d_max),
                     "you left eps out of sigma = sqrt(running_var + eps)"),
                ], tol, scale=max(np.abs(ref_d).max(), 1.0))
                raise Problem(hint or mismatch("your d", d, ref_d, scale=max(np.abs(ref_d).max(), 1.0)))
        return run

    return run_cases(fn, [Case(label, make(x, rm, rv, eps, r_max, d_max, tol))
                          for label, x, rm, rv, eps, r_max, d_max, tol in specs], quiet=quiet)


# ---------------------------------------------------------------------------------------------------------
# Chapter 8: layer norm, and per-step statistics of variable-length sequences
# ---------------------------------------------------------------------------------------------------------

def check_layer_norm(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(h, weight, bias, eps) -> y``: layer normalization over the LAST axis (each example, or each
    example at each time step, normalized over its features) with a per-feature scale and shift, as
    ``torch.nn.functional.layer_norm(h, (H,), weight, bias, eps)``, against :func:`bnlib.numpy.layer_norm`."""
    g = D.generator(seed, 13)

    def rows(shape, dtype=np.float64, offset=None):
        x = g.standard_normal(shape) * g.uniform(0.5, 2.0, shape[:-1] + (1,)) + g.uniform(-2, 2, shape[:-1] + (1,))
        if offset is not None:
            x = x + offset
        return x.astype(dtype)

    def near_constant():
        x = rows((4, 6))
        x[1] = 0.7 + 1e-3 * g.standard_normal(6)
        return x

    specs = [
        ("(N, H) = (5, 7), float64", rows((5, 7)), True, 1e-5, TOL64),
        ("(N, T, H) = (3, 4, 6), float32: a sequence batch", rows((3, 4, 6), np.float32), True, 1e-5, TOL32),
        ("a batch of one example, (1, 5)", rows((1, 5)), True, 1e-5, TOL64),
        ("weight=None and bias=None, (4, 6)", rows((4, 6)), False, 1e-5, TOL64),
        ("a non-contiguous view (every other feature of a larger array), (6, 5)", rows((6, 10))[:, ::2], True, 1e-5,
         TOL64),
        ("eps = 1e-3 with a nearly constant example, (4, 6)", near_constant(), True, 1e-3, TOL64),
        ("float32, a different offset (up to 1e4) per example, (3, 8)",
         rows((3, 8), np.float32, np.array([[1e4], [-1e4], [3e3]])), True, 1e-5, TOL_OFFSET),
    ]

    def make(h, affine, eps, tol):
        H = h.shape[-1]
        w = g.uniform(0.5, 2.0, H).astype(h.dtype) if affine else None
        b = g.normal(0.0, 1.0, H).astype(h.dtype) if affine else None

        def run(f):
            before = h.copy()
            y = call(f, h, w, b, eps, hints=[(
                "could not be broadcast", "h.mean(axis=-1) has shape (N,), and an array of that shape broadcasts "
                                          "against the LAST axis: keep the reduced axis, h.mean(axis=-1, "
                                          "keepdims=True)")])
            check_unchanged("h", before, h, "work on a copy: the caller's activations must stay as they were")
            y_arr = as_array(y, "your output")
            check_shape("your output", y_arr, h.shape)
            _check_dtype(y, h)
            w64 = None if w is None else w.astype(np.float64)
            b64 = None if b is None else b.astype(np.float64)
            ref = bnp.layer_norm(h.astype(np.float64), (H,), w64, b64, eps)
            if close(y_arr, ref, tol):
                return

            def ln(axes, ddof=0, e=eps):
                out = D.normalized(h, e, axes=axes, ddof=ddof)
                return out if w is None else out * w64 + b64

            candidates = [
                (lambda: ln((0,)) if h.shape[0] > 1 else None, _batch_dependence_message("Layer norm") +
                 " over its features: reduce over axis=-1"),
                (lambda: ln(tuple(range(h.ndim - 1))) if h.ndim > 2 else None, _batch_dependence_message("Layer norm")
                 + " (and each time step on its own): reduce over axis=-1"),
                (lambda: ln(tuple(range(1, h.ndim))) if h.ndim > 2 else None,
                 "you normalized each sequence over all its time steps: layer norm normalizes each step's features "
                 "on their own, axis=-1"),
                (lambda: ln((h.ndim - 1,), ddof=1), "you used the unbiased variance: layer norm divides by the "
                                                    "number of features (biased)"),
                (lambda: D.normalized(h, eps, axes=(h.ndim - 1,)) if w is not None else None,
                 "your output has no scale and shift: y = weight * xhat + bias"),
                (lambda: ln((h.ndim - 1,), e=1e-5) if eps != 1e-5 else None,
                 f"your function ignores its eps argument (it used 1e-5, the call passed {eps:g})"),
                (lambda: ((h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + eps)) * (1 if w is None else w)
                 + (0 if b is None else b), "you divided by std + eps: eps goes inside the square root, "
                                            "sqrt(var + eps)"),
            ]
            hint = first_match(y_arr, candidates, tol)
            if hint is None and tol == TOL_OFFSET:
                hint = (f"with a large offset per example your output is off by {100 * rel_error(y_arr, ref):.0f} % "
                        "of its size: compute the variance as the mean of (h - mean)^2 (chapter 1)")
            raise Problem(hint or mismatch("your output", y_arr, ref))
        return run

    return run_cases(fn, [Case(label, make(h, aff, eps, tol)) for label, h, aff, eps, tol in specs], quiet=quiet)


def _masked_reference(x, lengths, *, ddof=0, valid=None):
    N, T, C = x.shape
    lengths = np.asarray(lengths)
    means, variances = np.zeros((T, C)), np.zeros((T, C))
    for t in range(T):
        mask = lengths > t if valid is None else valid(lengths, t)
        vals = np.asarray(x, dtype=np.float64)[mask, t, :]
        means[t] = vals.mean(axis=0)
        variances[t] = ((vals - means[t]) ** 2).sum(axis=0) / (len(vals) - ddof)
    return means, variances


def check_masked_stats(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x, lengths) -> (mean, var)``: per-time-step batch statistics of a padded batch of sequences
    ``x`` of shape ``(N, T, C)`` (sequence ``i`` is valid at steps ``0 .. lengths[i] - 1``, padding after it):
    at each step ``t`` the mean and the biased variance of each feature over the sequences still running at ``t``,
    shape ``(T, C)`` each."""
    g = D.generator(seed, 14)

    def padded(N, T, C, lengths, pad=0.0, dtype=np.float64):
        x = (g.normal(1.0, 2.0, (N, T, C))).astype(dtype)
        for i, L in enumerate(lengths):
            x[i, L:] = pad
        return x, lengths

    specs = [
        ("(N, T, C) = (5, 6, 3), lengths (6, 4, 4, 2, 1), float64: at the last steps one sequence is left",
         *padded(5, 6, 3, np.array([6, 4, 4, 2, 1]))),
        ("all sequences of full length, (4, 5, 2)", *padded(4, 5, 2, np.array([5, 5, 5, 5]))),
        ("unsorted lengths given as a Python list, (5, 6, 2)", *padded(5, 6, 2, [3, 6, 1, 6, 2])),
        ("padding filled with -1 (a pad value), (4, 5, 3)", *padded(4, 5, 3, np.array([5, 3, 2, 1]), pad=-1.0)),
        ("float32, (6, 7, 3)", *padded(6, 7, 3, np.array([7, 7, 5, 4, 2, 1]), dtype=np.float32)),
    ]

    def make(x, lengths):
        def run(f):
            before = x.copy()
            mean, var = unpack(call(f, x, lengths), 2, "(mean, var)")
            check_unchanged("x", before, x, "compute the statistics without modifying the batch")
            mean, var = as_array(mean, "mean"), as_array(var, "var")
            N, T, C = x.shape
            hints = [((C, T), "transposed: return one row per time step, shape (T, C)"),
                     ((C,), "one value per feature: compute the statistics at EACH time step, shape (T, C)"),
                     ((T,), "one value per step: keep the features, shape (T, C)")]
            check_shape("your mean", mean, (T, C), hints)
            check_shape("your var", var, (T, C), hints)
            tol = TOL32 if x.dtype == np.float32 else TOL64
            ref_mean, ref_var = _masked_reference(x, lengths)
            lens = np.asarray(lengths)
            x64 = x.astype(np.float64)
            counts = np.array([(lens > t).sum() for t in range(T)])
            partial = int(np.argmax(counts < N)) if (counts < N).any() else None
            if not close(mean, ref_mean, tol):
                hint = first_match(mean, [
                    (x64.mean(axis=0), f"your mean includes the padding (averaging zeros in is the same as dividing "
                                       f"the valid values' sum by N = {N}): at step {partial} only "
                                       f"{counts[partial] if partial is not None else N} of {N} sequences are "
                                       f"running; divide by their count (a mask lengths > t)"),
                    (lambda: np.nan_to_num(_masked_reference(x, lengths, valid=lambda L, t: L >= t)[0]),
                     "your mask is off by one: a sequence of length L is valid at steps 0 .. L - 1 (lengths > t)"),
                    ((x64 * (lens[:, None] > np.arange(T))[:, :, None]).sum(axis=0) / N,
                     f"you summed the valid values but divided by N = {N}: divide by the number of sequences still "
                     "running at that step"),
                ], tol)
                raise Problem(hint or mismatch("your mean", mean, ref_mean))
            if not close(var, ref_var, tol):
                with np.errstate(all="ignore"):
                    unbiased = _masked_reference(x, lengths, ddof=1)[1]
                hint = first_match(var, [
                    (x64.var(axis=0), "your variance includes the padding: use only the sequences running at each "
                                      "step"),
                    (lambda: np.nan_to_num(unbiased, nan=0.0, posinf=0.0),
                     "you used the unbiased variance (dividing by count - 1): batch norm's statistics divide by the "
                     "count (and a step with one running sequence then has variance 0, not 0/0)"),
                ], tol)
                if hint is None and not np.all(np.isfinite(var)):
                    hint = ("your variance has NaN/inf: at a step where only one sequence is running the (unbiased) "
                            "variance is 0/0; the biased variance is 0 there")
                raise Problem(hint or mismatch("your var", var, ref_var))
        return run

    return run_cases(fn, [Case(label, make(x, lengths)) for label, x, lengths in specs], quiet=quiet)
