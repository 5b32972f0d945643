"""Checkers for gradients and optimization: the backward pass (chapter 3), scale and speed (chapter 4), internal
covariate shift and scale invariance (chapter 5)."""
from __future__ import annotations

import math

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

__all__ = ["check_batch_norm_backward", "check_scaled_output_std", "check_steps_to_target", "check_ics_measure",
           "check_angular_update"]

TOL64, TOL32 = 1e-9, 5e-4
TOL_OFFSET, TOL_FD = 2e-2, 1e-6


# ---------------------------------------------------------------------------------------------------------
# Chapter 3: the backward pass
# ---------------------------------------------------------------------------------------------------------

def _grad_parts(dy, x, gamma, eps, *, ddof=0, axes=None, sigma_eps=True):
    """Float64 pieces of the compact form: (gamma/sigma, dy, xhat, mean(dy), mean(dy * xhat), axes)."""
    axes = D.bn_axes(x.ndim) if axes is None else axes
    x64, dy64 = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    mean, var = D.moments(x64, axes, ddof)
    sigma = np.sqrt(var + eps) if sigma_eps else np.sqrt(var)
    xhat = (x64 - mean) / sigma
    g = D.per_channel(gamma, x.ndim)
    return g / sigma, dy64, xhat, dy64.mean(axis=axes, keepdims=True), (dy64 * xhat).mean(axis=axes, keepdims=True)


def _dx_candidates(dy, x, gamma, eps):
    nd, n = x.ndim, D.count(x)
    k, d, xh, m1, m2 = _grad_parts(dy, x, gamma, eps)
    s1, s2 = m1 * n, m2 * n
    out = [
        (k * d, "this is the gradient with the statistics held constant (inference mode): in training mu_B and "
                "sigma_B depend on x, which adds the mean term -mean(dy) and the variance term "
                "-xhat * mean(dy * xhat)"),
        (k * (d - s1 - xh * s2), f"you subtracted sum(dy) and xhat * sum(dy * xhat): the compact form subtracts "
                                 f"their MEANS (divide by m = {n})"),
        (k * (d - m1 + xh * m2), "the variance term has the wrong sign: dx = gamma / sigma * (dy - mean(dy) - "
                                 "xhat * mean(dy * xhat))"),
        (k * (d - m1 - xh * m2) / D.per_channel(gamma, nd), "your dx is missing the factor gamma: the gradient "
                                                            "reaching xhat is gamma * dy"),
        (lambda: (lambda kk, dd, xx, mm1, mm2: kk * (dd - mm1 - xx * mm2))(*_grad_parts(dy, x, gamma, eps, ddof=1)),
         f"you used the unbiased variance (dividing by m - 1 = {n - 1}): the forward normalized with the biased one, "
         f"and the backward must use the same sigma_B"),
        (lambda: (lambda kk, dd, xx, mm1, mm2: kk * (dd - mm1 - xx * mm2))(
            *_grad_parts(dy, x, gamma, eps, sigma_eps=False)),
         "you left eps out of sigma: the forward divided by sqrt(var + eps), so the backward uses the same"),
    ]
    if eps != 1e-5:
        out.append((lambda: (lambda kk, dd, xx, mm1, mm2: kk * (dd - mm1 - xx * mm2))(
            *_grad_parts(dy, x, gamma, 1e-5)),
            f"your function ignores its eps argument (it used 1e-5, the call passed {eps:g})"))
    if nd > 2:
        C = x.shape[1]

        def flat_reshape():
            dx2, _, _ = bnp.batch_norm_backward(np.asarray(dy, np.float64).reshape(-1, C),
                                                np.asarray(x, np.float64).reshape(-1, C), weight=gamma, eps=eps)
            return dx2.reshape(x.shape)

        out += [
            (flat_reshape, "x.reshape(-1, C) on an (N, C, H, W) array mixes channels (the channel axis is not last): "
                           "move C to the end first, x.transpose(0, 2, 3, 1).reshape(-1, C), and transpose back"),
            (lambda: (lambda kk, dd, xx, mm1, mm2: kk * (dd - mm1 - xx * mm2))(
                *_grad_parts(dy, x, gamma, eps, axes=(0,))),
             f"you took the means over the batch axis only: in an (N, C, *spatial) batch each channel's statistics, "
             f"and so the means of the backward, run over axis={D.bn_axes(nd)}"),
        ]
    return out


def _dx_property_problem(dx, dy, x, gamma, eps):
    """Explain a wrong dx by the two properties every batch-norm gradient has (sums to 0, orthogonal to xhat)."""
    axes = D.bn_axes(x.ndim)
    k, d, xh, m1, m2 = _grad_parts(dy, x, gamma, eps)
    sums = dx.sum(axis=axes)
    scale = np.abs(dx).sum(axis=axes).max()
    if np.abs(sums).max() > 1e-6 * max(scale, 1e-30):
        c = int(np.abs(sums).argmax())
        return (f"your dx sums to {num(sums[c])} in channel {c}; it should sum to 0 over the batch (shifting x "
                f"shifts mu_B by the same amount, so y does not change): the mean term of the backward, "
                f"-mean(dy), is missing")
    proj = (dx * xh).sum(axis=axes)
    sigma2 = D.moments(x, axes)[1]
    predicted = (k * (eps / (sigma2 + eps)) * m2 * D.count(x)).reshape(-1)
    off = np.abs(proj - predicted)
    if off.max() > 1e-6 * max(scale * np.abs(xh).max(), 1e-30):
        c = int(off.argmax())
        return (f"your dx is not orthogonal to xhat: sum(dx * xhat) = {num(proj[c])} in channel {c}, where it should "
                f"be 0 (up to a term of relative size eps / sigma_B^2): the variance term of the backward, "
                f"-xhat * mean(dy * xhat), is missing")
    return None


def _finite_differences(dy, x, gamma, beta, eps, h=1e-6):
    """Central differences of L = sum(dy * batch_norm(x)) w.r.t. x, gamma and beta (float64)."""
    def loss(xv, gv, bv):
        return float((dy * bnp.batch_norm(xv, None, None, weight=gv, bias=bv, training=True, eps=eps)).sum())

    grads = []
    for which in range(3):
        arrays = [x.copy(), gamma.copy(), beta.copy()]
        target = arrays[which]
        grad = np.zeros_like(target)
        for idx in np.ndindex(target.shape):
            old = target[idx]
            target[idx] = old + h
            up = loss(*arrays)
            target[idx] = old - h
            down = loss(*arrays)
            target[idx] = old
            grad[idx] = (up - down) / (2 * h)
        grads.append(grad)
    return grads


def check_batch_norm_backward(fn, *, spatial: bool = False, seed: int = 0, quiet: bool = False):
    """Check ``fn(dy, x, gamma, eps) -> (dx, dgamma, dbeta)``: the training-mode backward of batch norm in its
    compact form (equation (eq-bn-backward)), against :func:`bnlib.numpy.batch_norm_backward` and central
    differences. ``spatial=True`` adds ``(N, C, H, W)`` inputs."""
    g = D.generator(seed, 7)

    def small_var():
        x = D.batch(g, (12, 3))
        x[:, 1] = 2.0 + 1e-2 * g.standard_normal(12)   # sigma_B^2 about 1e-4: eps = 1e-3 matters
        return x

    def case(shape, dtype=np.float64, kind="plain", offset=0.0):
        if kind == "strided":
            x = D.strided(g, shape, dtype)
            dy = D.strided(g, shape, dtype)
        elif kind == "channels_last":
            x = D.channels_last(g, shape, dtype)
            dy = D.channels_last(g, shape, dtype)
        else:
            x = D.batch(g, shape, dtype, offset=offset)
            dy = g.standard_normal(shape).astype(dtype)
        return x, dy, g.uniform(0.5, 2.0, shape[1]).astype(dtype)

    specs = [
        ("(N, C) = (6, 3), float64", *case((6, 3)), 1e-5, TOL64),
        ("FD", *case((4, 3)), 1e-5, TOL_FD),
        ("a batch of 2, (N, C) = (2, 3), float64", *case((2, 3)), 1e-5, TOL64),
        ("(N, C) = (17, 5), float32", *case((17, 5), np.float32), 1e-5, TOL32),
        ("non-contiguous dy and x (every other column of larger arrays), (N, C) = (9, 4)",
         *case((9, 4), kind="strided"), 1e-5, TOL64),
        ("eps = 1e-3 with a channel whose sigma_B^2 is about 1e-4", small_var(), g.standard_normal((12, 3)),
         g.uniform(0.5, 2.0, 3), 1e-3, TOL64),
        ("float32 with mean 1e4 and standard deviation about 1, (256, 3)", *case((256, 3), np.float32,
                                                                                offset=1e4), 1e-5, TOL_OFFSET),
    ]
    if spatial:
        specs += [
            ("(N, C, H, W) = (2, 3, 4, 5), float64", *case((2, 3, 4, 5)), 1e-5, TOL64),
            ("a batch of one image, (1, 2, 3, 5), float64", *case((1, 2, 3, 5)), 1e-5, TOL64),
            ("non-contiguous (channels-last) dy and x, (N, C, H, W) = (2, 3, 4, 5)",
             *case((2, 3, 4, 5), kind="channels_last"), 1e-5, TOL64),
            ("FD", *case((2, 2, 2, 3)), 1e-5, TOL_FD),
        ]

    def make(x, dy, gamma, eps, tol, fd):
        def run(f):
            before_x, before_dy = x.copy(), dy.copy()
            dx, dgamma, dbeta = unpack(call(f, dy, x, gamma, eps), 3, "(dx, dgamma, dbeta)")
            check_unchanged("x", before_x, x, "work on copies: the forward's input must stay as it was")
            check_unchanged("dy", before_dy, dy, "work on copies: the upstream gradient must stay as it was")
            dx, dgamma, dbeta = as_array(dx, "dx"), as_array(dgamma, "dgamma"), as_array(dbeta, "dbeta")
            C = x.shape[1]
            reduce_hint = [(tuple(x.shape), "sum over the batch (and spatial) axes: one value per channel"),
                           ((1, C) + (1,) * (x.ndim - 2), "return shape (C,), without the kept axes")]
            check_shape("your dx", dx, x.shape)
            check_shape("your dgamma", dgamma, (C,), reduce_hint)
            check_shape("your dbeta", dbeta, (C,), reduce_hint)
            x64, dy64, g64 = x.astype(np.float64), dy.astype(np.float64), gamma.astype(np.float64)
            if fd:
                beta = np.zeros(C)
                fdx, fdg, fdb = _finite_differences(dy64, x64, g64, beta, eps)
                for what, got, ref in [("dx", dx, fdx), ("dgamma", dgamma, fdg), ("dbeta", dbeta, fdb)]:
                    if not close(got, ref, tol):
                        raise Problem(f"your {what} disagrees with central differences of L = sum(dy * y) by "
                                      f"{num(rel_error(got, ref))} of its size (h = 1e-6, float64): "
                                      + mismatch(what, got, ref))
                return
            ref_dx, ref_dg, ref_db = bnp.batch_norm_backward(dy64, x64, weight=g64, eps=eps)
            n = D.count(x)
            axes = D.bn_axes(x.ndim)
            if not close(dx, ref_dx, tol):
                hint = first_match(dx, _dx_candidates(dy, x, g64, eps), tol)
                if hint is None:
                    hint = _dx_property_problem(dx, dy64, x64, g64, eps)
                if hint is None and tol == TOL_OFFSET:
                    hint = (f"on float32 values with mean 1e4 your dx is off by {num(100 * rel_error(dx, ref_dx))} % "
                            "of its size: compute the variance as the mean of (x - mean)^2, not E[x^2] - E[x]^2 "
                            "(chapter 1)")
                raise Problem(hint or mismatch("your dx", dx, ref_dx))
            _, _, xh, _, _ = _grad_parts(dy, x, g64, eps)
            if not close(dgamma, ref_dg, tol):
                hint = first_match(dgamma, [
                    (ref_db, "dgamma and dbeta are swapped: dgamma = sum(dy * xhat), dbeta = sum(dy)"),
                    ((dy64 * x64).sum(axis=axes), "dgamma uses x: the scale multiplies xhat, so dgamma = "
                                                  "sum(dy * xhat)"),
                    (ref_dg / n, f"dgamma is a mean: the gradient SUMS over the batch (divide by nothing; m = {n})"),
                    (ref_dg * g64, "dgamma has an extra factor gamma: dgamma = sum(dy * xhat)"),
                ], tol)
                raise Problem(hint or mismatch("your dgamma", dgamma, ref_dg))
            if not close(dbeta, ref_db, tol):
                hint = first_match(dbeta, [
                    (ref_dg, "dgamma and dbeta are swapped: dgamma = sum(dy * xhat), dbeta = sum(dy)"),
                    (ref_db / n, f"dbeta is a mean: the gradient SUMS over the batch (m = {n})"),
                    (ref_db * g64, "dbeta has an extra factor gamma: dbeta = sum(dy)"),
                ], tol)
                raise Problem(hint or mismatch("your dbeta", dbeta, ref_db))
        return run

    cases = []
    for label, x, dy, gamma, eps, tol in specs:
        fd = label == "FD"
        if fd:
            label = f"finite differences of L = sum(dy * y), {tuple(x.shape)}, float64, h = 1e-6"
        cases.append(Case(label, make(x, dy, gamma, eps, tol, fd)))
    return run_cases(fn, cases, quiet=quiet)


# ---------------------------------------------------------------------------------------------------------
# Chapter 4: scale and speed
# ---------------------------------------------------------------------------------------------------------

def _bn_output_std(var: float, a: float, eps: float, m: int = 64) -> float:
    """The standard deviation of training-mode batch norm's output (gamma = 1) on ``a * z``, where ``z`` has batch
    variance ``var`` exactly, measured with :func:`bnlib.numpy.batch_norm` (float64)."""
    z = np.sin(np.arange(1, m + 1) * 1.3)        # any non-constant values
    z = (z - z.mean()) / z.std() * math.sqrt(var)
    y = bnp.batch_norm((a * z)[:, None], None, None, training=True, eps=eps)
    return float(y.std())


def check_scaled_output_std(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(var, a, eps) -> std``: the standard deviation of batch norm's output (gamma = 1, beta = 0) for a
    feature with batch variance ``var`` when the weights feeding it are scaled by ``a`` (NumPy broadcasting over
    ``var`` and ``a``), against batch norm run on such a feature."""
    g = D.generator(seed, 8)
    scales = np.array([1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0])
    specs = [
        ("var = 1, a from 1e-4 to 10, eps = 1e-5", 1.0, scales, 1e-5),
        ("var = 0.04, the same scales", 0.04, scales, 1e-5),
        ("eps = 1e-3", 1.0, scales, 1e-3),
        ("arrays of var and a of the same shape (5,)", g.uniform(0.01, 4.0, 5), g.uniform(1e-3, 2.0, 5), 1e-5),
        ("a single number for each (a = 0.003, var = 2)", 2.0, 0.003, 1e-5),
    ]

    def make(var, a, eps):
        def run(f):
            got = as_array(call(f, var, a, eps), "your std")
            shape = np.broadcast(np.asarray(var), np.asarray(a)).shape
            pairs = np.broadcast_arrays(np.asarray(var, float), np.asarray(a, float))
            ref = np.vectorize(lambda v, s: _bn_output_std(v, s, eps))(*pairs).reshape(shape)
            check_shape("your std", got, shape)
            if close(got, ref, 1e-6):
                return
            v, s = pairs
            hint = first_match(got, [
                (np.ones(shape), "your std is 1 for every scale: that is batch norm without eps (or with eps "
                                 "scaled along with the weights). eps is a constant: at small a, a^2 * var becomes "
                                 "comparable to eps and the output shrinks, std = a sqrt(var) / sqrt(a^2 var + eps)"),
                (np.sqrt(s * v / (s * v + eps)), "the scale enters the variance squared: scaling the weights by a "
                                                 "scales the batch variance by a^2, std = sqrt(a^2 var / (a^2 var "
                                                 "+ eps))"),
                (s * s * v / (s * s * v + eps), "that is the VARIANCE of the output: take its square root"),
                (np.sqrt((s * s * v + eps) / (s * s * v)), "your ratio is upside down: std = sqrt(a^2 var / "
                                                           "(a^2 var + eps)) is at most 1"),
                (lambda: np.sqrt(s * s * v / (s * s * v + 1e-5)) if eps != 1e-5 else None,
                 f"your function ignores its eps argument (it used 1e-5, the call passed {eps:g})"),
            ], 1e-6)
            raise Problem(hint or mismatch("your std", got, ref))
        return run

    return run_cases(fn, [Case(label, make(v, a, eps)) for label, v, a, eps in specs], quiet=quiet)


def check_steps_to_target(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(eval_steps, eval_acc, target) -> step or None``: the first evaluation step at which the accuracy
    reached ``target`` (``>=``), None if it never did (:func:`bnlib.lab.train.steps_to_accuracy`)."""
    from ..train import History, steps_to_accuracy

    specs = [
        ("evaluations every 100 steps, the target reached at step 300",
         [0, 100, 200, 300, 400, 500], [0.1, 0.52, 0.81, 0.91, 0.93, 0.95], 0.9),
        ("an uneven evaluation grid (0, 50, 100, 200, 400, 800)",
         [0, 50, 100, 200, 400, 800], [0.1, 0.4, 0.7, 0.88, 0.92, 0.96], 0.9),
        ("an accuracy exactly equal to the target", [0, 100, 200, 300], [0.1, 0.75, 0.9, 0.95], 0.9),
        ("the target reached, lost and reached again", [0, 100, 200, 300, 400], [0.2, 0.91, 0.85, 0.92, 0.95], 0.9),
        ("a target never reached", [0, 100, 200, 300], [0.1, 0.5, 0.7, 0.8], 0.9),
        ("a target reached at the first evaluation (step 0)", [0, 100, 200], [0.95, 0.96, 0.97], 0.9),
    ]

    def make(steps, accs, target):
        def run(f):
            got = call(f, list(steps), list(accs), target)
            hist = History()
            hist.eval_steps, hist.eval_acc = list(steps), list(accs)
            ref = steps_to_accuracy(hist, target)
            if ref is None:
                if got is None:
                    return
                raise Problem(f"the target is never reached here, and your function returned {got!r}: return None "
                              f"(a number would read as a step count, and the step count is part of a result)")
            if got is None:
                raise Problem(f"your function returned None, but the accuracy reaches {target} at step {ref}")
            if isinstance(got, bool) or not isinstance(got, (int, np.integer, float, np.floating)):
                raise Problem(f"expected a step number (an int), got {type(got).__name__} {got!r}")
            if got == ref:
                return
            index = steps.index(ref)
            above = [s for s, a in zip(steps, accs) if a > target]
            reached = [s for s, a in zip(steps, accs) if a >= target]
            if got == index:
                raise Problem(f"you returned {got}, the POSITION in the list: return the step number at that "
                              f"position, eval_steps[{index}] = {ref}")
            if above and got == above[0]:
                raise Problem(f"you returned {got}: an accuracy equal to the target ({target}) counts as reached "
                              f"(>=, not >), so the answer is step {ref}")
            if got == reached[-1] or (len(reached) > 1 and got in reached[1:]):
                raise Problem(f"you returned {got}: the FIRST step at which the accuracy reached {target} is {ref} "
                              f"(a later dip does not undo that)")
            if index > 0 and got == steps[index - 1]:
                raise Problem(f"you returned {got}, the evaluation BEFORE the target was reached: the answer is "
                              f"step {ref}")
            raise Problem(f"you returned {got!r}; the accuracy first reaches {target} at step {ref}")
        return run

    return run_cases(fn, [Case(label, make(s, a, t)) for label, s, a, t in specs], quiet=quiet)


# ---------------------------------------------------------------------------------------------------------
# Chapter 5: internal covariate shift and scale invariance
# ---------------------------------------------------------------------------------------------------------

def check_ics_measure(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(G, G_after) -> (l2, cosine)``: Santurkar et al.'s internal covariate shift of a layer, the l2
    distance ``||G - G'||`` between its weight gradient before and after the earlier layers' update (the
    matrices flattened: the Frobenius norm) and the cosine of the angle between them (as
    :func:`bnlib.lab.ics.ics` computes them)."""
    g = D.generator(seed, 9)
    G = g.standard_normal((5, 4))
    specs = [
        ("two random (5, 4) gradients, float64", G, G + 0.5 * g.standard_normal((5, 4))),
        ("a gradient and 3 times itself", G, 3 * G),
        ("opposite gradients", G, -0.5 * G),
        ("(3, 7) gradients, float32", g.standard_normal((3, 7)).astype(np.float32),
         g.standard_normal((3, 7)).astype(np.float32)),
        ("gradients of a wide layer, (2, 50)", g.standard_normal((2, 50)), g.standard_normal((2, 50))),
    ]

    def make(a, b):
        def run(f):
            before_a, before_b = a.copy(), b.copy()
            l2, cos = unpack(call(f, a, b), 2, "(l2, cosine)")
            check_unchanged("G", before_a, a, "compute on copies")
            check_unchanged("G_after", before_b, b, "compute on copies")
            l2, cos = as_array(l2, "l2"), as_array(cos, "cosine")
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            ref_l2 = float(np.linalg.norm(a64 - b64))
            ref_cos = float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))
            tol = 1e-5 if a.dtype == np.float32 else 1e-9
            rows = a.shape[0]
            for what, got in (("l2", l2), ("cosine", cos)):
                if got.shape == (rows,):
                    raise Problem(f"your {what} has one value per row, shape {got.shape}: flatten the matrices "
                                  "first (torch.nn.functional.cosine_similarity and norms with axis=1 work row by "
                                  "row); the measure is over the whole gradient")
                check_shape(f"your {what}", got, ())
            A, B = a.astype(np.float64), b.astype(np.float64)
            if not close(l2, ref_l2, tol):
                hint = first_match(l2, [
                    (ref_l2 ** 2, "that is the SQUARED distance: take the square root, ||G - G'||"),
                    (np.linalg.norm(A - B, 2), "np.linalg.norm(M, 2) of a MATRIX is its largest singular value: "
                                               "the l2 distance of the flattened gradients is the Frobenius norm, "
                                               "np.linalg.norm(M) or np.linalg.norm(M.ravel())"),
                    (ref_l2 / np.linalg.norm(a64), "that is the RELATIVE change ||G - G'|| / ||G||: the measure is "
                                                   "the distance itself (the chapter divides by ||G|| separately)"),
                    (np.abs(a64 - b64).sum(), "that is the l1 distance (sum of |G - G'|): the measure is the "
                                              "Euclidean one, sqrt(sum((G - G')^2))"),
                ], tol)
                raise Problem(hint or mismatch("your l2", l2, np.float64(ref_l2)))
            if not close(cos, ref_cos, tol, scale=1.0):
                row_cos = ((A * B).sum(1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))).mean()
                hint = first_match(cos, [
                    (a64 @ b64, "that is the dot product: divide by both norms, <G, G'> / (||G|| ||G'||)"),
                    (row_cos, "that is the mean of the rows' cosines: the cosine of the whole (flattened) "
                              "gradients is not the average of its rows'"),
                    (math.degrees(math.acos(max(-1.0, min(1.0, ref_cos)))),
                     "that is the angle in degrees: return the cosine itself"),
                    (math.acos(max(-1.0, min(1.0, ref_cos))), "that is the angle (radians): return its cosine"),
                ], tol, scale=1.0)
                raise Problem(hint or mismatch("your cosine", cos, np.float64(ref_cos), scale=1.0))
        return run

    return run_cases(fn, [Case(label, make(a, b)) for label, a, b in specs], quiet=quiet)


def check_angular_update(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(w_old, w_new) -> angle``: the angle in radians between two weight tensors, flattened, as
    :func:`bnlib.lab.ics.angular_update` computes it (the direction of a scale-invariant weight is what matters)."""
    g = D.generator(seed, 10)
    u, v = g.standard_normal((4, 5)), g.standard_normal((4, 5))
    v = v - (u * v).sum() / (u * u).sum() * u                  # orthogonal to u
    v *= np.linalg.norm(u) / np.linalg.norm(v)
    theta = math.radians(30.0)
    ones = np.ones((3, 6))
    specs = [
        ("two random (4, 5) weights, float64", u, g.standard_normal((4, 5)), 1e-9),
        ("a rotation by 30 degrees in a plane", u, math.cos(theta) * u + math.sin(theta) * v, 1e-9),
        ("orthogonal weights", u, 2.0 * v, 1e-9),
        ("opposite weights", u, -0.3 * u, 1e-7),
        ("the same direction, rescaled (w_new = 2 w_old), all ones, (3, 6): rounding can push the cosine "
         "above 1", ones, 2.0 * ones, 1e-7),
        ("the same, float32", ones.astype(np.float32), (2.0 * ones).astype(np.float32), 1e-3),
    ]

    def make(a, b, tol):
        def run(f):
            before_a, before_b = a.copy(), b.copy()
            got = as_array(call(f, a, b, hints=[("not aligned", "np.dot of two matrices is a matrix product: "
                                                               "flatten both weights first, w.ravel()")]),
                           "your angle")
            check_unchanged("w_old", before_a, a, "compute on copies")
            check_unchanged("w_new", before_b, b, "compute on copies")
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            c = float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))
            ref = math.acos(max(-1.0, min(1.0, c)))
            if got.shape == (a.shape[0],) or got.shape == (a.shape[0], a.shape[0]):
                raise Problem(f"your angle has shape {got.shape}: flatten both weights first (w.ravel()); the "
                              "angle is between the whole tensors, not row by row")
            check_shape("your angle", got, ())
            if not np.isfinite(got):
                raise Problem("your angle is NaN: for (almost) parallel weights rounding puts the cosine just above "
                              "1 (here it computes to 1 + 2e-16 or so) and arccos is undefined there; clip the "
                              "cosine to [-1, 1] first (np.clip(c, -1, 1))")
            if abs(float(got) - ref) <= tol * max(1.0, ref):
                return
            hint = first_match(got, [
                (math.degrees(ref), "that is the angle in DEGREES: return radians (math.acos gives radians)"),
                (c, "that is the cosine: the angle is arccos of it"),
                (math.acos(max(-1.0, min(1.0, float(a64 @ b64)))) if abs(a64 @ b64) <= 1 else None,
                 "you took arccos of the dot product: divide it by both norms first"),
            ], tol, scale=max(1.0, ref))
            raise Problem(hint or f"your angle is {num(float(got))} rad, expected {num(ref)} rad")
        return run

    return run_cases(fn, [Case(label, make(a, b, tol)) for label, a, b, tol in specs], quiet=quiet)
