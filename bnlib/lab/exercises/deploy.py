"""Checkers for batch norm after training: recalibrating the running statistics (chapter 7), folding batch norm
into the layer before it (chapters 8 and 9), and merging statistics across devices for SyncBatchNorm
(chapter 9)."""
from __future__ import annotations

import copy
import functools

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
    run_cases,
    unpack,
)

__all__ = ["check_recalibrate", "check_fold_linear", "check_fold_conv_bn", "check_merge_stats"]


# ---------------------------------------------------------------------------------------------------------
# Chapter 7: recalibrating the running statistics ("precise BN")
# ---------------------------------------------------------------------------------------------------------

def _bn_modules(model):
    import torch.nn as nn

    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _recalibrated(model, batches, *, reset=True, momentum="cumulative", mode=True):
    """A recalibrated copy of ``model`` (the reference), or what a classic mistake leaves."""
    import torch

    model = copy.deepcopy(model)
    bns = _bn_modules(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        if reset:
            m.reset_running_stats()
        if momentum != "unchanged":
            m.momentum = None if momentum == "cumulative" else momentum
    model.train(mode)
    with torch.no_grad():
        for xb in batches:
            model(xb)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return [(m.running_mean.clone(), m.running_var.clone()) for m in bns]


def check_recalibrate(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(model, batches) -> None``: recompute the running statistics of every batch-norm layer of
    ``model`` (a ``torch.nn`` model, given in eval mode) as the exact average over ``batches`` of the statistics
    training-mode forward passes produce (``reset_running_stats()`` and ``momentum=None``, the cumulative
    average), without changing any weight, then restore each layer's momentum and the model's mode."""
    import torch
    from torch import nn

    from ... import generator

    def build(k):
        gen = generator(seed * 100 + 15 + k)
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4), nn.BatchNorm1d(4),
                              nn.ReLU(), nn.Linear(4, 3))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            for bn in _bn_modules(model):                   # stale statistics from an earlier training run
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                bn.num_batches_tracked.fill_(100)
        batches = [torch.randn(8, 6, generator=gen) * 2 + 1 for _ in range(6)]
        return model.eval(), batches

    specs = [("an MLP with two BatchNorm1d layers in eval mode, 6 batches of 8", 0, None),
             ("the same, layers with momentum 0.01 (restore it afterwards)", 1, 0.01),
             ("a single batch", 2, "single")]

    def make(k, variant):
        def run(f):
            model, batches = build(k)
            if variant == "single":
                batches = batches[:1]
            elif variant is not None:
                for bn in _bn_modules(model):
                    bn.momentum = variant
            original = copy.deepcopy(model)
            ref = _recalibrated(original, batches)
            out = call(f, model, list(batches))
            if out is not None and out is not model:
                raise Problem("your function returned something: recalibrate the model you were given in place and "
                              "return None (the caller keeps using its model)")
            for (name, p), (_, p0) in zip(model.named_parameters(), original.named_parameters()):
                if not torch.equal(p.detach(), p0.detach()):
                    raise Problem(f"the weights changed ({name}): recalibration only runs forward passes, no "
                                  "backward pass and no optimizer step")
            bns, bns0 = _bn_modules(model), _bn_modules(original)
            got = [(m.running_mean.detach().double(), m.running_var.detach().double()) for m in bns]
            for i, ((gm, gv), (rm, rv)) in enumerate(zip(got, ref)):
                if close(gm.numpy(), rm.double().numpy(), 1e-5) and close(gv.numpy(), rv.double().numpy(), 1e-5):
                    continue
                stale = (bns0[i].running_mean.double(), bns0[i].running_var.double())
                mistakes = [
                    (stale, "the running statistics did not change: run the batches through the model in TRAINING "
                            "mode (model.train()); in eval mode batch norm does not update them"),
                    ((torch.zeros_like(stale[0]), torch.ones_like(stale[1])),
                     "the running statistics are at their reset values (mean 0, variance 1): the batches went "
                     "through the model in eval mode, where batch norm does not update them; run them in TRAINING "
                     "mode (model.train())"),
                    (_recalibrated(original, batches, reset=False, momentum="unchanged")[i],
                     "your statistics are still an exponential moving average (the layer's momentum, starting "
                     "from the old values): reset them (m.reset_running_stats()) and set m.momentum = None for "
                     "the exact average over the batches"),
                    (_recalibrated(original, batches, reset=True, momentum="unchanged")[i],
                     "you reset the statistics but kept the momentum: with momentum set, batch norm keeps an "
                     "exponential moving average; m.momentum = None makes it the exact average"),
                    (_recalibrated(original, batches, reset=False)[i],
                     "you set momentum = None without resetting: the cumulative average then continues from "
                     "num_batches_tracked = 100 and mostly keeps the old statistics; call m.reset_running_stats() "
                     "first"),
                    (_recalibrated(original, batches[-1:], momentum=1.0)[i],
                     "your statistics are those of the last batch only: average over all the batches "
                     "(momentum = None)"),
                ]
                for (cm, cv), message in mistakes:
                    if close(gm.numpy(), cm.double().numpy(), 1e-5) and close(gv.numpy(), cv.double().numpy(), 1e-5):
                        raise Problem(f"batch-norm layer {i}: {message}")
                raise Problem(f"batch-norm layer {i}: " + mismatch("running_var", gv.numpy(), rv.double().numpy()))
            if model.training:
                raise Problem("your function left the model in training mode: it came in eval mode, so put it back "
                              "(model.eval()), or the next evaluation normalizes with batch statistics")
            for i, (m, m0) in enumerate(zip(bns, bns0)):
                if m.momentum != m0.momentum:
                    raise Problem(f"batch-norm layer {i} has momentum {m.momentum} after your function, "
                                  f"{m0.momentum} before: restore it, or later training keeps a cumulative "
                                  "average instead of the moving one")
        return run

    return run_cases(fn, [Case(label, make(k, v)) for label, k, v in specs], quiet=quiet)


# ---------------------------------------------------------------------------------------------------------
# Chapters 8 and 9: folding batch norm into the layer before it
# ---------------------------------------------------------------------------------------------------------

def _fold_candidates_weight(W, scale, gamma, rv, eps, shape_out):
    """Wrong folded weights, with their messages (``W`` float64, ``scale = gamma / sqrt(rv + eps)``)."""
    extra = (1,) * (W.ndim - 1)
    col = (1, -1) + (1,) * (W.ndim - 2)
    return [
        (lambda: W * scale.reshape(col) if W.shape[1] == scale.size else None,
         "you scaled the INPUT axis (axis 1): batch norm scales each OUTPUT unit/channel, so multiply W's rows, "
         "W * scale[:, None] (for a conv weight, scale[:, None, None, None])"),
        (W / scale.reshape((-1,) + extra), "you divided by the scale: folded W = W * gamma / sqrt(running_var + eps)"),
        (W * gamma.reshape((-1,) + extra), "you multiplied by gamma only: also divide by sqrt(running_var + eps)"),
        (W * (gamma / (rv + eps)).reshape((-1,) + extra), "you divided by the variance: divide by the standard "
                                                          "deviation sqrt(running_var + eps)"),
        (W * (gamma / np.sqrt(rv)).reshape((-1,) + extra), "you left out eps: the scale is gamma / "
                                                           "sqrt(running_var + eps)"),
    ]


def _fold_candidates_bias(b, scale, beta, rm, gamma, rv):
    b0 = np.zeros_like(rm) if b is None else b
    out = [
        (beta + b0 * scale, "your bias forgets the running mean: b' = beta + (b - running_mean) * scale"),
        (beta - rm * scale, "your bias ignores the layer's own bias b: b' = beta + (b - running_mean) * scale"),
        (beta + (b0 - rm), "the bias term is not scaled: b' = beta + (b - running_mean) * scale"),
        ((b0 - rm) * scale, "your bias forgets beta: b' = beta + (b - running_mean) * scale"),
        (beta + (rm - b0) * scale, "the sign of (b - running_mean) is reversed"),
        (beta + (b0 - rm) * gamma / np.sqrt(rv), "you left out eps in the bias's scale"),
    ]
    if b is None:
        out.insert(0, (beta + b0, "your bias misses the mean term: b' = beta - running_mean * scale when the layer "
                                  "has no bias"))
    return out


def check_fold_linear(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(W, b, gamma, beta, running_mean, running_var, eps) -> (W_folded, b_folded)``: a ``Linear``
    layer (``W`` of shape ``(out, in)``, ``b`` of shape ``(out,)`` or ``None``) followed by an eval-mode
    ``BatchNorm1d``, folded into one affine map: ``x @ W_folded.T + b_folded == batch_norm(x @ W.T + b)``."""
    g = D.generator(seed, 16)

    def layer(out, inp, dtype=np.float64, bias=True, tiny_var=False):
        W = g.standard_normal((out, inp)).astype(dtype)
        b = g.standard_normal(out).astype(dtype) if bias else None
        gamma, beta = g.uniform(0.5, 2.0, out).astype(dtype), g.normal(0, 1, out).astype(dtype)
        rm, rv = g.normal(0, 1, out).astype(dtype), g.uniform(0.5, 2.0, out).astype(dtype)
        if tiny_var:
            rv[0] = 1e-6
        return W, b, gamma, beta, rm, rv

    specs = [
        ("(out, in) = (4, 6), float64", layer(4, 6), 1e-5, 1e-9),
        ("no bias (b = None), (3, 5)", layer(3, 5, bias=False), 1e-5, 1e-9),
        ("a square layer, (5, 5): a transposed scale raises no error here", layer(5, 5), 1e-5, 1e-9),
        ("a unit with running_var = 1e-6, where eps matters, (4, 6)", layer(4, 6, tiny_var=True), 1e-5, 1e-9),
        ("eps = 1e-3, (4, 6)", layer(4, 6), 1e-3, 1e-9),
        ("float32, (3, 7)", layer(3, 7, np.float32), 1e-5, 1e-5),
    ]

    def make(params, eps, tol):
        W, b, gamma, beta, rm, rv = params

        def run(f):
            saved = [None if a is None else a.copy() for a in params]
            Wf, bf = unpack(call(f, W, b, gamma, beta, rm, rv, eps, hints=[
                ("could not be broadcast", "the scale has one entry per OUTPUT unit, i.e. per ROW of W (out, in): "
                                           "W * scale[:, None]"),
                ("NoneType", "b is None when the Linear layer has no bias: use 0 in its place")]),
                2, "(W_folded, b_folded)")
            for what, before, after in zip(("W", "b", "gamma", "beta", "running_mean", "running_var"), saved, params):
                if before is not None:
                    check_unchanged(what, before, after, "build new arrays; the original layers must stay as they "
                                                         "were")
            Wf, bf = as_array(Wf, "W_folded"), as_array(bf, "b_folded")
            out_f = W.shape[0]
            check_shape("your W_folded", Wf, W.shape, [(W.shape[::-1], "transposed: keep W's (out, in) layout")])
            check_shape("your b_folded", bf, (out_f,))
            W64, g64, be64, rm64, rv64 = (a.astype(np.float64) for a in (W, gamma, beta, rm, rv))
            b64 = None if b is None else b.astype(np.float64)
            scale = g64 / np.sqrt(rv64 + eps)
            ref_W = W64 * scale[:, None]
            ref_b = be64 + ((0.0 if b64 is None else b64) - rm64) * scale
            # the reference checked once more against bnlib's eval-mode batch norm on a random input
            x = g.standard_normal((5, W.shape[1]))
            z = x @ W64.T + (0.0 if b64 is None else b64)
            truth = bnp.batch_norm(z, rm64, rv64, g64, be64, training=False, eps=eps)
            assert close(x @ ref_W.T + ref_b, truth, 1e-9)
            if not close(Wf, ref_W, tol):
                hint = first_match(Wf, _fold_candidates_weight(W64, scale, g64, rv64, eps, W.shape), tol)
                if hint is None and eps != 1e-5 and close(Wf, W64 * (g64 / np.sqrt(rv64 + 1e-5))[:, None], tol):
                    hint = f"your function ignores its eps argument (it used 1e-5, the call passed {eps:g})"
                raise Problem(hint or mismatch("your W_folded", Wf, ref_W))
            if not close(bf, ref_b, tol):
                hint = first_match(bf, _fold_candidates_bias(b64, scale, be64, rm64, g64, rv64), tol)
                raise Problem(hint or mismatch("your b_folded", bf, ref_b))
        return run

    return run_cases(fn, [Case(label, make(p, eps, tol)) for label, p, eps, tol in specs], quiet=quiet)


def check_fold_conv_bn(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(conv, bn) -> conv_folded``: a ``torch.nn.Conv2d`` followed by a ``torch.nn.BatchNorm2d``, folded
    into one new ``Conv2d`` that computes the same as ``bn.eval()(conv(x))``, leaving ``conv`` and ``bn``
    unchanged. Stride, padding, dilation and groups must carry over."""
    import torch
    from torch import nn

    from ... import generator

    gen = generator(seed * 100 + 17)

    def pair(c_in, c_out, k=3, *, bias=True, stride=1, padding=0, dilation=1, groups=1, eps=1e-5, affine=True,
             dtype=torch.float32, tiny_var=False):
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                         bias=bias).to(dtype)
        bn = nn.BatchNorm2d(c_out, eps=eps, affine=affine).to(dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=dtype) * 0.3)
            if bias:
                conv.bias.copy_(torch.randn(c_out, generator=gen, dtype=dtype))
            if affine:
                bn.weight.copy_(torch.rand(c_out, generator=gen, dtype=dtype) * 1.5 + 0.5)
                bn.bias.copy_(torch.randn(c_out, generator=gen, dtype=dtype))
            bn.running_mean.copy_(torch.randn(c_out, generator=gen, dtype=dtype))
            bn.running_var.copy_(torch.rand(c_out, generator=gen, dtype=dtype) * 1.5 + 0.5)
            if tiny_var:
                bn.running_var[0] = 1e-6
        x = torch.randn(2, c_in, 9, 11, generator=gen, dtype=dtype)
        return conv, bn.train(), x

    specs = [
        ("Conv2d(3, 4, 3) with bias, float32", pair(3, 4), 1e-5),
        ("a conv without bias (bias=False, the usual case before BN), Conv2d(3, 5, 3)", pair(3, 5, bias=False), 1e-5),
        ("stride 2, padding 1, dilation 2, Conv2d(4, 6, 3)", pair(4, 6, stride=2, padding=1, dilation=2), 1e-5),
        ("a channel with running_var = 1e-6, where eps matters", pair(3, 4, tiny_var=True, dtype=torch.float64), 1e-9),
        ("BatchNorm2d(eps=1e-3)", pair(3, 4, eps=1e-3, dtype=torch.float64), 1e-9),
        ("a depthwise conv (groups = channels), Conv2d(4, 4, 3, groups=4)", pair(4, 4, groups=4, padding=1), 1e-5),
        ("BatchNorm2d(affine=False): weight and bias are None", pair(3, 4, affine=False), 1e-5),
        ("float64, Conv2d(5, 3, 1) (a 1x1 conv)", pair(5, 3, k=1, dtype=torch.float64), 1e-9),
    ]

    def make(conv, bn, x, tol):
        def run(f):
            conv0, bn0 = copy.deepcopy(conv), copy.deepcopy(bn)
            modes = (conv.training, bn.training)
            with torch.no_grad():
                ref = copy.deepcopy(bn).eval()(conv0(x))
            folded = call(f, conv, bn, hints=[(
                "must match the size of tensor", "the scale has one entry per OUTPUT channel, dim 0 of the conv "
                                                 "weight (out, in / groups, kh, kw): weight * scale.reshape(-1, 1, 1, "
                                                 "1)"), (
                "NoneType", "bn.weight and bn.bias are None when the BatchNorm has affine=False (and conv.bias is "
                            "None for a conv without bias): use 1 and 0 in their place")])
            for (name, t), t0 in zip(list(conv.state_dict().items()) + list(bn.state_dict().items()),
                                     list(conv0.state_dict().values()) + list(bn0.state_dict().values())):
                if not torch.equal(t, t0):
                    raise Problem(f"your function changed the original layers ({name}): build a new conv (copy.deepcopy"
                                  "(conv) or nn.Conv2d(...)) and write the folded weights into it")
            if (conv.training, bn.training) != modes:
                raise Problem("your function changed the mode of the original layers: leave them as they were")
            if not isinstance(folded, nn.Module):
                raise Problem(f"expected a torch.nn.Conv2d, got {type(folded).__name__}")
            try:
                with torch.no_grad():
                    out = folded(x)
            except Exception as exc:
                raise Problem(f"calling your folded conv raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                              "\nlikely cause: its in/out channels or groups differ from the original conv's") from None
            if tuple(out.shape) != tuple(ref.shape):
                raise Problem(f"your folded conv's output has shape {tuple(out.shape)}, expected {tuple(ref.shape)}: "
                              "copy stride, padding, dilation and groups from the original conv")
            if out.dtype != ref.dtype:
                raise Problem(f"your folded conv computes in {out.dtype}, the original in {ref.dtype}: keep the dtype")
            if close(out.double().numpy(), ref.double().numpy(), tol):
                return
            W = conv.weight.detach().double().numpy()
            gamma = (bn.weight.detach().double().numpy() if bn.weight is not None else np.ones(bn.num_features))
            beta = (bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros(bn.num_features))
            rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
            b = None if conv.bias is None else conv.bias.detach().double().numpy()
            scale = gamma / np.sqrt(rv + bn.eps)
            Wf = getattr(folded, "weight", None)
            if Wf is not None and tuple(Wf.shape) == W.shape:
                Wf = Wf.detach().double().numpy()
                ref_W = W * scale[:, None, None, None]
                if not close(Wf, ref_W, tol):
                    hint = first_match(Wf, _fold_candidates_weight(W, scale, gamma, rv, bn.eps, W.shape), tol)
                    raise Problem(hint or mismatch("your folded weight", Wf, ref_W))
                bf = getattr(folded, "bias", None)
                if bf is None:
                    raise Problem("your folded conv has no bias: folding always needs one, b' = beta + (b - "
                                  "running_mean) * scale (create the conv with bias=True)")
                bf = bf.detach().double().numpy()
                ref_b = beta + ((0.0 if b is None else b) - rm) * scale
                if not close(bf, ref_b, tol):
                    hint = first_match(bf, _fold_candidates_bias(b, scale, beta, rm, gamma, rv), tol)
                    raise Problem(hint or mismatch("your folded bias", bf, ref_b))
            raise Problem(mismatch("your folded conv's output", out.double().numpy(), ref.double().numpy()))
        return run

    return run_cases(fn, [Case(label, make(c, b, x, tol)) for label, (c, b, x), tol in specs], quiet=quiet)


# ---------------------------------------------------------------------------------------------------------
# Chapter 9: merging (count, mean, M2) across ranks
# ---------------------------------------------------------------------------------------------------------

def _stats_of(x):
    mean, var = bnp.channel_stats(np.asarray(x, dtype=np.float64))
    n = D.count(x)
    return n, mean, var * n


def check_merge_stats(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(a, b) -> (count, mean, M2)``: the exact merge of two ranks' per-channel statistics (``count``
    values, their ``mean`` and ``M2``, the sum of squared deviations from the mean), as SyncBatchNorm combines
    the ranks of a batch (Chan, Golub & LeVeque): the result must equal the statistics of the two ranks' data
    together."""
    g = D.generator(seed, 18)

    def ranks(sizes, C=3, spread=1.0):
        parts = [D.batch(g, (s, C)) + spread * g.standard_normal(C) for s in sizes]
        return parts

    specs = [
        ("two ranks of 8 values per channel", ranks([8, 8]), "pair"),
        ("unequal counts, 3 and 13", ranks([3, 13]), "pair"),
        ("ranks whose means differ by about 100 standard deviations, 5 and 7", ranks([5, 7], spread=100.0), "pair"),
        ("a rank with a single value (count 1, M2 = 0), 1 and 6", ranks([1, 6]), "pair"),
        ("an empty rank (count 0) merged with a full one", ranks([0, 5]), "pair"),
        ("eight ranks of 2 values each, merged pairwise (functools.reduce)", ranks([2] * 8), "reduce"),
    ]

    def as_stats(x):
        if len(x) == 0:
            C = x.shape[1]
            return 0, np.zeros(C), np.zeros(C)
        return _stats_of(x)

    def make(parts, mode):
        def run(f):
            stats = [as_stats(p) for p in parts]
            copies = [(n, m.copy(), s.copy()) for n, m, s in stats]
            if mode == "pair":
                out = unpack(call(f, stats[0], stats[1]), 3, "(count, mean, M2)")
            else:
                def step(a, b):
                    return unpack(call(f, a, b), 3, "(count, mean, M2)")
                out = functools.reduce(step, stats)
            for (_, m0, s0), (_, m1, s1) in zip(copies, stats):
                check_unchanged("mean", m0, m1, "return new arrays; the ranks' statistics must stay as they were")
                check_unchanged("M2", s0, s1, "return new arrays; the ranks' statistics must stay as they were")
            count, mean, M2 = out
            count = as_array(count, "count")
            mean, M2 = as_array(mean, "mean"), as_array(M2, "M2")
            whole = np.concatenate([p for p in parts if len(p)])
            ref_n, ref_mean, ref_M2 = _stats_of(whole)
            C = whole.shape[1]
            if not (count.shape == () and float(count) == ref_n):
                raise Problem(f"your count is {count.tolist()}, expected {ref_n}: the merged count is the sum of the "
                              f"two counts")
            check_shape("your mean", mean, (C,))
            check_shape("your M2", M2, (C,))
            (na, ma, sa), (nb, mb, sb) = (stats[0], stats[1]) if mode == "pair" else (stats[0], stats[0])
            if not np.all(np.isfinite(mean)) or not np.all(np.isfinite(M2)):
                raise Problem("your result has NaN/inf" + (": merging with an empty rank (count 0) must give the "
                                                           "other rank's statistics; guard the division by a count "
                                                           "of 0" if min(na, nb) == 0 else ""))
            tol = 1e-9
            if not close(mean, ref_mean, tol):
                hint = None
                if mode == "pair":
                    hint = first_match(mean, [
                        ((ma + mb) / 2, f"you averaged the two means: weight them by their counts ({na} and {nb}), "
                                        "mean = mean_a + delta * n_b / n"),
                        (ma + (mb - ma) * na / (na + nb), "the weights are swapped: mean = mean_a + delta * n_b / n "
                                                          "(the larger rank pulls the mean its way)"),
                    ], tol)
                raise Problem(hint or mismatch("your mean", mean, ref_mean))
            if close(M2, ref_M2, tol):
                return
            hint = None
            if mode == "pair" and na and nb:
                n, delta = na + nb, mb - ma
                hint = first_match(M2, [
                    (sa + sb, "M2 = M2_a + M2_b misses the spread BETWEEN the ranks: add delta^2 * n_a * n_b / n, "
                              "with delta = mean_b - mean_a"),
                    (sa + sb + delta ** 2 * na * nb, "the between-rank term is delta^2 * n_a * n_b / n: you forgot "
                                                     "to divide by n"),
                    (sa + sb + delta ** 2 * nb / n, "the between-rank term is delta^2 * n_a * n_b / n: a factor n_a "
                                                    "is missing"),
                    (sa + sb + delta ** 2 * na * nb / n ** 2, "the between-rank term is delta^2 * n_a * n_b / n "
                                                              "(divide by n once)"),
                    (ref_M2 / n, "that is the variance: return M2, the SUM of squared deviations (variance * n)"),
                    ((sa + sb) / 2 + delta ** 2 * na * nb / n, "M2 values are sums: add M2_a and M2_b, do not "
                                                               "average them"),
                ], tol)
            if hint is None and mode == "reduce":
                hint = (f"merged over eight ranks your M2 is off by {num(abs(M2 - ref_M2).max())} (the pairwise "
                        "merges passed, so check that your function works on its own output: the count it returns "
                        "must be a number and mean/M2 arrays of shape (C,))")
            raise Problem(hint or mismatch("your M2", M2, ref_M2))
        return run

    return run_cases(fn, [Case(label, make(parts, mode)) for label, parts, mode in specs], quiet=quiet)
