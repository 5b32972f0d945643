r"""Reading a batch-normalized network (chapter 8): folding, first-layer templates and feature attributions.

In evaluation a batch norm is a fixed per-unit affine map, so a trained BN network *is* a plain network with
different weights. :func:`folded_first_layer` uses :func:`bnlib.torch.fold_batchnorm` to get the effective
first-layer weights ``W_eff = diag(gamma / sqrt(var + eps)) W`` -- the ones that actually map input pixels to
the first hidden units -- and :func:`raw_first_layer` the stored ``W``, whose per-unit scale is meaningless
in a BN network (batch norm undoes it).

Attributions (all in eval mode unless ``train_mode=True``; ``target`` defaults to the predicted class):

- :func:`input_gradients`: ``d logit_target / d x``;
- :func:`gradient_x_input`: ``x * d logit_target / d x``;
- :func:`integrated_gradients` (Sundararajan et al. 2017): ``(x - x0) * mean_k grad(x0 + (k+1/2)/K (x - x0))``,
  whose sum approximates ``logit(x) - logit(x0)`` (completeness; :func:`completeness_gap`).

Comparing maps: :func:`attribution_similarity` (Pearson, Spearman or top-k overlap per example),
:func:`deletion_curve` (how fast the target probability falls when the most-attributed pixels are removed) and
:func:`spatial_coherence` (how similar neighbouring pixels' attributions are: smooth maps vs speckle).

Why a BN network's first layer keeps its random initialization: :func:`first_layer_gradient_cosines` measures
the cosine between each unit's weight row and its gradient, which scale invariance makes 0, and
:func:`first_layer_movement` how far the first layer has moved from its initialization.

The networks compared: :func:`train_tuned_mlps` trains one kind of MLP (with or without batch norm) from several
seeds with one optimizer at each learning rate of a grid (packed, :mod:`bnlib.lab.packed`), picks the rate
with the best median accuracy on held-out data and returns those networks, so that two kinds are compared
with the same optimizer, each at its own best rate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks

__all__ = [
    "raw_first_layer",
    "folded_first_layer",
    "unit_scale_factors",
    "input_gradients",
    "gradient_x_input",
    "integrated_gradients",
    "completeness_gap",
    "attribution_similarity",
    "deletion_curve",
    "spatial_coherence",
    "first_layer_gradient_cosines",
    "first_layer_movement",
    "TunedMLPs",
    "train_tuned_mlps",
]


def _first_linear(model: nn.Module) -> nn.Linear:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return m
    raise ValueError("model: has no nn.Linear layer to read input weights from")


def raw_first_layer(model: nn.Module):
    """``(W, b)`` of the first ``nn.Linear`` of ``model`` as stored (copies, shape ``(units, inputs)``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    lin = _first_linear(model)
    b = lin.bias.detach().clone() if lin.bias is not None else torch.zeros(lin.out_features)
    return lin.weight.detach().clone(), b


def folded_first_layer(model: nn.Module):
    """``(W_eff, b_eff)``: the first ``nn.Linear`` of ``model`` with the batch norm that follows it folded in
    (eval-mode running statistics), via :func:`bnlib.torch.fold_batchnorm` on a copy in eval mode; ``model``
    is not changed. For a model without batch norm this is :func:`raw_first_layer`. Raises ``ValueError``
    when the batch norm after the first Linear could not be folded (the fold report says why)."""
    from .. import torch as bt

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    was = model.training
    model.eval()
    try:
        folded, report = bt.fold_batchnorm(model, warn=False, return_report=True)
    finally:
        model.train(was)
    first_name = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear)) if any(
        isinstance(m, nn.Linear) for m in model.modules()) else None
    if first_name is None:
        raise ValueError("model: has no nn.Linear layer to read input weights from")
    # a batch norm directly after the first Linear that was not folded would make W_eff wrong
    names = [n for n, _ in model.named_modules()]
    idx = names.index(first_name)
    following = dict(model.named_modules())[names[idx + 1]] if idx + 1 < len(names) else None
    bn_types = (nn.modules.batchnorm._BatchNorm, bt._BatchNorm)
    if isinstance(following, bn_types) and not any(layer == first_name for layer, _ in report.folded):
        reasons = "; ".join(f"{n}: {r}" for n, r in report.skipped)
        raise ValueError(f"model: the batch norm after {first_name!r} was not folded ({reasons})")
    return raw_first_layer(folded)


def unit_scale_factors(model: nn.Module) -> torch.Tensor:
    """Per-unit factor ``W_eff[j] / W[j]`` of the first layer (``gamma_j / sqrt(var_j + eps)`` for a BN
    model, ones without BN)."""
    w, _ = raw_first_layer(model)
    w_eff, _ = folded_first_layer(model)
    w64, e64 = w.double(), w_eff.double()
    return ((w64 * e64).sum(1) / (w64 * w64).sum(1)).float()


# --------------------------------------------------------------------------------------------------------
def _targets(model, x, target):
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    target = torch.as_tensor(target, dtype=torch.long, device=x.device)
    if target.dim() == 0:
        target = target.expand(len(x))
    if target.shape != (len(x),):
        raise ValueError(f"target: expected one class per example ({len(x)}), got shape {tuple(target.shape)}")
    return target


#: Input dtypes the attributions accept (gradients need floating point).
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    _checks.check_float_dtype("x", x.dtype, _FLOAT_DTYPES)


def input_gradients(model: nn.Module, x: torch.Tensor, target=None, *, train_mode: bool = False) -> torch.Tensor:
    """``d logit_target / d x`` for each example (same shape as ``x``); ``target`` defaults to the predicted
    class. In eval mode (default) each example's gradient depends on that example only. ``train_mode=True``
    computes it the way a forgotten ``model.eval()`` would -- with batch statistics, so it depends on the
    rest of ``x`` -- and restores the running statistics afterwards. The model's mode is restored."""
    _check_x(x)
    was = model.training
    snap = {n: b.detach().clone() for n, b in model.named_buffers()} if train_mode else None
    model.train(train_mode)
    try:
        target = _targets(model, x, target)
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        sel = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(sel, xg)
    finally:
        if snap is not None:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(snap[n])
        model.train(was)
    return grad.detach()


def gradient_x_input(model: nn.Module, x: torch.Tensor, target=None, **kwargs) -> torch.Tensor:
    """``x * d logit_target / d x`` (see :func:`input_gradients`)."""
    return x.detach() * input_gradients(model, x, target, **kwargs)


def integrated_gradients(model: nn.Module, x: torch.Tensor, target=None, *, baseline=None,
                         steps: int = 32) -> torch.Tensor:
    """Integrated gradients with a ``steps``-point midpoint rule along the straight line from ``baseline``
    (default: zeros, a blank image) to ``x``, in eval mode."""
    _check_x(x)
    _checks.check_positive_int("steps", steps)
    x0 = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if x0.shape != x.shape:
        x0 = x0.expand_as(x)
    was = model.training
    model.eval()
    try:
        target = _targets(model, x, target)
    finally:
        model.train(was)
    total = torch.zeros_like(x)
    for k in range(steps):
        point = x0 + (k + 0.5) / steps * (x - x0)
        total += input_gradients(model, point, target)
    return ((x - x0) * total / steps).detach()


@torch.no_grad()
def completeness_gap(model: nn.Module, x: torch.Tensor, attributions: torch.Tensor, target=None, *,
                     baseline=None) -> torch.Tensor:
    """Per example ``|sum(attributions) - (logit(x) - logit(baseline))|`` for the target class (0 for exact
    integrated gradients), in eval mode."""
    was = model.training
    model.eval()
    try:
        target = _targets(model, x, target)
        x0 = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
        diff = model(x).gather(1, target[:, None])[:, 0] - model(x0).gather(1, target[:, None])[:, 0]
    finally:
        model.train(was)
    return (attributions.reshape(len(x), -1).sum(1) - diff).abs()


# --------------------------------------------------------------------------------------------------------
def _ranks(a: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 1 (ties broken by order; fine for continuous attributions)."""
    return a.argsort(1).argsort(1).to(torch.float64)


def attribution_similarity(a: torch.Tensor, b: torch.Tensor, *, method: str = "pearson",
                           k: Optional[int] = None, absolute: bool = False) -> torch.Tensor:
    """Per-example similarity of two attribution maps of the same examples (shape ``(N, ...)``):

    - ``pearson``: correlation of the flattened maps;
    - ``spearman``: correlation of their ranks;
    - ``topk``: fraction of the ``k`` highest-scoring inputs the two maps share.

    ``absolute=True`` compares magnitudes ``|a|, |b|``.
    """
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if method not in ("pearson", "spearman", "topk"):
        raise ValueError(f"method: expected 'pearson', 'spearman' or 'topk', got {method!r}")
    a2 = a.reshape(len(a), -1).to(torch.float64)
    b2 = b.reshape(len(b), -1).to(torch.float64)
    if absolute:
        a2, b2 = a2.abs(), b2.abs()
    if method == "topk":
        d = a2.shape[1]
        if k is None:  # the default: required for 'topk'
            raise ValueError(f"k: expected an int in [1, {d}] for method='topk', got None")
        k = _checks.check_int("k", k, 1, d)  # (method='topk')
        ta = torch.zeros_like(a2, dtype=torch.bool).scatter_(1, a2.topk(k, 1).indices, True)
        tb = torch.zeros_like(b2, dtype=torch.bool).scatter_(1, b2.topk(k, 1).indices, True)
        return ((ta & tb).sum(1).to(torch.float64) / k).float()
    if method == "spearman":
        a2, b2 = _ranks(a2), _ranks(b2)
    a2 = a2 - a2.mean(1, keepdim=True)
    b2 = b2 - b2.mean(1, keepdim=True)
    denom = a2.norm(dim=1) * b2.norm(dim=1)
    return ((a2 * b2).sum(1) / denom.clamp_min(1e-30)).float()


@torch.no_grad()
def deletion_curve(model: nn.Module, x: torch.Tensor, attributions: torch.Tensor, target=None, *,
                   fractions: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.2), fill: float = 0.0) -> np.ndarray:
    """Mean probability of the target class after setting the top ``fraction`` of each example's inputs
    (ranked by attribution, highest first) to ``fill``; one value per fraction. A faithful map makes it
    fall fast. Random attributions give the baseline curve."""
    _check_x(x)
    if attributions.shape != x.shape:
        raise ValueError(f"attributions: expected shape {tuple(x.shape)}, got {tuple(attributions.shape)}")
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 <= f <= 1.0 for f in fr):
        raise ValueError(f"fractions: expected values in [0, 1], got {list(fractions)!r}")
    was = model.training
    model.eval()
    try:
        target = _targets(model, x, target)
        flat_x = x.reshape(len(x), -1)
        order = attributions.reshape(len(x), -1).argsort(1, descending=True)
        out = []
        for f in fr:
            k = int(round(f * flat_x.shape[1]))
            xd = flat_x.clone()
            if k:
                xd.scatter_(1, order[:, :k], fill)
            p = F.softmax(model(xd.reshape(x.shape)), 1).gather(1, target[:, None])
            out.append(p.mean().item())
    finally:
        model.train(was)
    return np.array(out)


def spatial_coherence(maps: torch.Tensor, shape=(28, 28), mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per example, the Pearson correlation between the attributions of horizontally and vertically adjacent
    pixels (pairs pooled), over the pairs where both pixels are in ``mask`` (e.g. ``x > 0.1``, the ink; default
    all). Near 1: smooth, stroke-like maps; near 0: pixel-level speckle."""
    h, w = shape
    if maps.numel() != len(maps) * h * w:
        raise ValueError(f"maps: expected {len(maps)} maps of {h}x{w} values, got shape {tuple(maps.shape)}")
    a = maps.reshape(len(maps), h, w).to(torch.float64)
    if mask is not None and mask.numel() != a.numel():
        raise ValueError(f"mask: expected the shape of maps, got {tuple(mask.shape)}")
    m = torch.ones_like(a, dtype=torch.bool) if mask is None else mask.reshape(a.shape).bool()
    out = []
    for i in range(len(a)):
        left, right = a[i, :, :-1], a[i, :, 1:]
        up, down = a[i, :-1, :], a[i, 1:, :]
        mh = m[i, :, :-1] & m[i, :, 1:]
        mv = m[i, :-1, :] & m[i, 1:, :]
        u = torch.cat([left[mh], up[mv]])
        v = torch.cat([right[mh], down[mv]])
        if len(u) < 3:
            out.append(float("nan"))
            continue
        u, v = u - u.mean(), v - v.mean()
        out.append(((u * v).sum() / (u.norm() * v.norm()).clamp_min(1e-30)).item())
    return torch.tensor(out)


def first_layer_gradient_cosines(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine, per unit ``j``, between the first Linear's weight row ``W_j`` and the gradient of the
    cross-entropy on ``(x, y)`` with respect to it, in training mode (the model's mode is restored, running
    statistics too). A batch norm after the layer makes the loss invariant to the scale of ``W_j``, so the
    gradient is orthogonal to it (cosine ~ 0, up to eps): SGD rotates the row and its norm grows only at
    second order, so nothing shrinks the random initial component."""
    lin = _first_linear(model)
    was = model.training
    snap = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        g = lin.weight.grad.detach().clone()
        model.zero_grad(set_to_none=True)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(snap[n])
        model.train(was)
    return F.cosine_similarity(g, lin.weight.detach(), dim=1)


def first_layer_movement(model: nn.Module, initial_weight: torch.Tensor) -> float:
    """``||W - W0|| / ||W0||`` of the first ``nn.Linear`` of ``model`` against its initial weight ``W0``."""
    w, _ = raw_first_layer(model)
    w0 = torch.as_tensor(initial_weight).to(device=w.device, dtype=w.dtype)
    if w0.shape != w.shape:
        raise ValueError(f"initial_weight: expected shape {tuple(w.shape)}, got {tuple(w0.shape)}")
    return ((w - w0).norm() / w0.norm()).item()


# --------------------------------------------------------------------------------------------------------
@dataclass
class TunedMLPs:
    """What :func:`train_tuned_mlps` returns: the chosen rate ``lr``, the held-out accuracy of every network of
    the grid (``val_acc[lr]``: one per seed, NaN for a diverged run), and, at the chosen rate, the trained
    networks ``nets[seed]`` (eval mode) with their initial first-layer weights ``init[seed]``; the networks
    of every rate are in ``all_nets[lr][seed]`` (their initial weights are ``init``: the rate does not change
    them)."""

    norm: str
    lr: float
    lrs: Tuple[float, ...]
    seeds: Tuple[int, ...]
    val_acc: Dict[float, np.ndarray] = field(repr=False)
    nets: Dict[int, nn.Module] = field(repr=False)
    init: Dict[int, torch.Tensor] = field(repr=False)
    all_nets: Dict[float, Dict[int, nn.Module]] = field(repr=False, default_factory=dict)


def train_tuned_mlps(norm: str, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                     y_val: torch.Tensor, *, seeds: Sequence[int], lrs: Sequence[float], steps: int,
                     batch_size: int, momentum: float = 0.9, tol: float = 0.0, hidden=(100, 100),
                     activation: str = "relu", progress: bool = False) -> TunedMLPs:
    """Train ``models.mlp(784, hidden, 10, activation=activation, norm=norm)`` from each seed at each rate of
    ``lrs`` with SGD (``momentum``) on ``(x_train, y_train)`` -- all ``len(seeds) * len(lrs)`` networks packed
    into one (:func:`bnlib.lab.packed.train_packed`: the same runs as :func:`bnlib.lab.train.train` with
    ``seed=s``, each with its own rate) -- and choose the rate whose networks reach the highest median accuracy
    on ``(x_val, y_val)`` (a diverged network counts as accuracy 0). Rates within ``tol`` of the best median
    count as ties (e.g. the standard error of an accuracy on the held-out set, so that the choice does not
    hinge on one digit), and the smallest of them is chosen. Returns a :class:`TunedMLPs` with the networks
    of the chosen rate."""
    from . import models
    from .packed import PackedNet, train_packed

    seeds = tuple(int(s) for s in seeds)
    lrs = tuple(float(v) for v in lrs)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, at least one, got {seeds!r}")
    if not lrs or len(set(lrs)) != len(lrs) or not all(v > 0 and np.isfinite(v) for v in lrs):
        raise ValueError(f"lrs: expected distinct positive learning rates, at least one, got {lrs!r}")
    if not (isinstance(tol, (int, float)) and 0.0 <= tol < 1.0):
        raise ValueError(f"tol: expected an accuracy difference in [0, 1), got {tol!r}")
    grid = [(lr, s) for lr in lrs for s in seeds]
    pack = PackedNet.from_seeds(lambda: models.mlp(x_train[0].numel(), tuple(hidden), 10, activation=activation,
                                                   norm=norm), [s for _, s in grid])
    init = [pack.unpack(j)[1].weight.detach().clone() for j in range(len(grid))]
    hists = train_packed(pack, x_train, y_train, steps=steps, batch_size=batch_size, lr=[lr for lr, _ in grid],
                         momentum=momentum, x_eval=x_val, y_eval=y_val, eval_every=steps, progress=progress,
                         desc=f"{norm}, {len(grid)} networks")
    acc = np.array([float("nan") if h.diverged or not h.eval_acc else h.eval_acc[-1] for h in hists])
    val_acc = {lr: acc[[j for j, (v, _) in enumerate(grid) if v == lr]] for lr in lrs}
    score = {lr: float(np.median(np.nan_to_num(a, nan=0.0))) for lr, a in val_acc.items()}
    best = max(score.values())
    chosen = min(lr for lr in lrs if score[lr] >= best - tol - 1e-12)
    all_nets = {lr: {} for lr in lrs}
    first = {}
    for j, (lr, s) in enumerate(grid):
        all_nets[lr][s] = pack.unpack(j).eval()
        first[s] = init[j]
    return TunedMLPs(norm, chosen, lrs, seeds, val_acc, all_nets[chosen], first, all_nets)
