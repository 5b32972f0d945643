"""Checkers for chapter 10 (normalization in modern networks): RMS norm, the normalization of most recent
transformers (Zhang & Sennrich 2019), over the last axis with a per-feature weight and no bias."""
from __future__ import annotations

import numpy as np

from ... import numpy as bnp
from . import _data as D
from ._core import Case, Problem, as_array, call, check_shape, check_unchanged, close, first_match, mismatch, run_cases

__all__ = ["check_rms_norm"]

TOL64, TOL32 = 1e-9, 1e-4


def _rms(x, eps, axes, *, weight=None, center=False, eps_mode="inside", root=True):
    """RMS-normalized ``x`` (float64): the reference or a classic mistake."""
    x64 = np.asarray(x, dtype=np.float64)
    if center:                                            # layer norm without bias
        x64 = x64 - x64.mean(axis=axes, keepdims=True)
    ms = (x64 ** 2).mean(axis=axes, keepdims=True)
    if not root:
        out = x64 / (ms + eps)
    elif eps_mode == "outside":
        out = x64 / (np.sqrt(ms) + eps)
    else:
        out = x64 / np.sqrt(ms + eps)
    return out if weight is None else out * weight


def check_rms_norm(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(x, weight, eps) -> y``: RMS normalization over the LAST axis (each token's features divided by
    their root mean square ``sqrt(mean(x^2) + eps)``, no mean subtracted), times a per-feature ``weight`` (or none
    when ``weight`` is None), as ``torch.nn.functional.rms_norm(x, (C,), weight, eps)``, against
    :func:`bnlib.numpy.rms_norm` in float64."""
    g = D.generator(seed, 21)

    def tokens(shape, dtype=np.float64, offset=0.0, scale=1.0):
        x = g.standard_normal(shape) * g.uniform(0.5, 2.0, shape[:-1] + (1,)) + g.uniform(-1, 1, shape[:-1] + (1,))
        return (scale * x + offset).astype(dtype)

    def tiny_row():
        x = tokens((4, 6))
        x[2] = 0.02 * g.standard_normal(6)                 # mean(x^2) about 4e-4: eps = 1e-3 matters here
        return x

    specs = [
        ("(N, C) = (5, 8), float64", tokens((5, 8)), True, 1e-5, TOL64),
        ("(B, T, C) = (2, 5, 6), float32: a batch of token sequences", tokens((2, 5, 6), np.float32), True, 1e-6,
         TOL32),
        ("a single token, (1, 7)", tokens((1, 7)), True, 1e-5, TOL64),
        ("weight=None, (4, 6)", tokens((4, 6)), False, 1e-5, TOL64),
        ("a non-contiguous view (every other feature of a larger array), (6, 5)", tokens((6, 10))[:, ::2], True,
         1e-5, TOL64),
        ("eps = 1e-3 with a token of tiny values, (4, 6)", tiny_row(), True, 1e-3, TOL64),
        ("tokens whose features have a mean far from zero, (3, 2, 8)", tokens((3, 2, 8), offset=4.0), True, 1e-5,
         TOL64),
    ]

    def make(x, has_weight, eps, tol):
        C = x.shape[-1]
        w = g.uniform(0.5, 2.0, C).astype(x.dtype) if has_weight else None

        def run(f):
            before = x.copy()
            y = call(f, x, w, eps, hints=[(
                "could not be broadcast", "(x ** 2).mean(axis=-1) has shape (N,), and an array of that shape "
                                          "broadcasts against the LAST axis: keep the reduced axis, "
                                          "mean(axis=-1, keepdims=True)")])
            check_unchanged("x", before, x, "work on a copy: the caller's activations must stay as they were")
            y_arr = as_array(y, "your output")
            check_shape("your output", y_arr, x.shape)
            y_dtype = getattr(y, "dtype", None)
            if y_dtype is not None and str(y_dtype).replace("torch.", "") != str(x.dtype):
                raise Problem(f"the output is {y_dtype} for a {x.dtype} input: keep the input's dtype")
            w64 = None if w is None else w.astype(np.float64)
            ref = bnp.rms_norm(x.astype(np.float64), (C,), w64, eps)
            if close(y_arr, ref, tol):
                return
            last = (x.ndim - 1,)
            candidates = [
                (lambda: _rms(x, eps, last, weight=w64, center=True),
                 "you subtracted the mean: that is layer norm. RMS norm divides x itself by sqrt(mean(x^2) + eps), "
                 "with no centring (which is what makes it cheaper)"),
                (lambda: _rms(x, eps, (0,), weight=w64) if x.shape[0] > 1 else None,
                 "your output for one token depends on the other examples of the batch: you took the mean of x^2 "
                 "over the batch axis (axis=0, as batch norm does). RMS norm normalizes each token over its own "
                 "features: axis=-1"),
                (lambda: _rms(x, eps, tuple(range(x.ndim - 1)), weight=w64) if x.ndim > 2 else None,
                 "you took the mean of x^2 over the batch and time axes (as batch norm does): RMS norm normalizes "
                 "each token over its own features, axis=-1"),
                (lambda: _rms(x, eps, tuple(range(1, x.ndim)), weight=w64) if x.ndim > 2 else None,
                 "you normalized each sequence over all its tokens: RMS norm normalizes each token's features on "
                 "their own, axis=-1"),
                (lambda: _rms(x, eps, last, weight=w64, eps_mode="outside"),
                 "you divided by sqrt(mean(x^2)) + eps: eps goes inside the square root, sqrt(mean(x^2) + eps)"),
                (lambda: _rms(x, eps, last, weight=w64, root=False),
                 "you divided by mean(x^2) + eps, the mean SQUARE: take its square root, sqrt(mean(x^2) + eps)"),
                (lambda: _rms(x, eps, last) if w is not None else None,
                 "your output has no scale: y = weight * x / sqrt(mean(x^2) + eps)"),
            ]
            candidates += [(lambda e=e: _rms(x, e, last, weight=w64) if e != eps else None,
                            f"your function ignores its eps argument (it used {e:g}, the call passed {eps:g})")
                           for e in (1e-5, 1e-6, 1e-8, 0.0)]
            hint = first_match(y_arr, candidates, tol)
            raise Problem(hint or mismatch("your output", y_arr, ref))
        return run

    return run_cases(fn, [Case(label, make(x, hw, eps, tol)) for label, x, hw, eps, tol in specs], quiet=quiet)
