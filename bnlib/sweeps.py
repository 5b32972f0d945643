r"""Batch-size sweeps of the normalization layers, and the axes cube (chapter 6).

Two things live here.

**What each method normalizes over.** Every normalization layer computes a mean and a variance over a set
:math:`\mathcal S_i` of the entries of an ``(N, C, H, W)`` activation (Wu & He 2018, Figure 2):

=========  ========================================  =========================================
method     statistics of the entry ``(n, c, h, w)``   bnlib layer (via ``make_norm(kind, C, 2)``)
=========  ========================================  =========================================
``bn``     all ``(n', c, h', w')``: over N, H, W      ``BatchNorm2d(C)``
``ln``     all ``(n, c', h', w')``: over C, H, W      ``GroupNorm(1, C)``
``in``     all ``(n, c, h', w')``: over H, W          ``InstanceNorm2d(C, affine=True)``
``gn``     ``(n, c', h', w')`` with ``c'`` in the     ``GroupNorm(G, C)``
           group of ``c``: over C/G, H, W
``bln``    a weighted sum of the ``bn`` and the       ``BatchLayerNorm(C)``
           ``ln`` normalizations (weights set by N)
=========  ========================================  =========================================

:func:`stats_mask` returns that set as a boolean ``(N, C, H*W)`` cube, :func:`manual_stats` computes the
statistics by a plain reduction over those axes (to check a layer against), and :func:`draw_norm_cube` /
:func:`draw_norm_cubes` draw the cube (an oblique 2-D projection with matplotlib polygons).

**The batch-size sweep.** :func:`batch_size_sweep` trains a small network -- ``small_cnn`` or ``mlp`` from
:mod:`bnlib.models` -- with each normalization method at each batch size and seed, for the *same number of
training examples* at every batch size (so ``steps = examples // batch_size``) with the learning rate scaled
linearly with the batch size (``lr = base_lr * batch_size / base_batch``, the rule Goyal et al. 2017 and Wu & He
2018 use; optionally with a warm-up and a linear decay, :func:`lr_at`), and measures the validation error in
**eval mode** (running statistics for the batch-norm family), optionally also with batch statistics.

Speed. At batch size 2 a step of a tiny network is pure per-operation overhead, so training ``k`` seeds one
after the other costs ``k`` times the overhead. :class:`PackedNet` therefore trains the ``k`` seeds of one
(method, batch size) cell *together*: the ``k`` networks sit side by side in one network whose convolutions are
grouped (``groups=k``), whose linear layers are batched matrix products and whose normalization layers have
``k * C`` channels (``GroupNorm`` with ``k * G`` groups, layer norm as ``GroupNorm(k, k * C)``, so no statistic
ever mixes two networks). Network ``j`` has the initial weights of the single network built after
``torch.manual_seed(seeds[j])`` and sees the mini-batches :func:`bnlib.experiments.train` would draw with
``seed=seeds[j]``; the summed loss gives each network exactly its own gradient, and SGD acts elementwise, so
the packed run *is* the ``k`` separate runs (``tests/test_sweeps.py`` checks this against
:func:`bnlib.experiments.train`). Batch-layer norm, whose layer statistics must not span the packed networks,
is computed from its two halves: :func:`bnlib.torch.functional.batch_norm` over all ``k * C`` channels and
:func:`bnlib.torch.functional.group_norm` with one group per network (the same statistics, ``eps`` and
running-statistics update as :class:`bnlib.torch.BatchLayerNorm`, mixed with the same weights). The cells of a
sweep can
also be spread over worker processes (``workers``; spawned in Jupyter, forked elsewhere); every cell runs
single-threaded, so the results do not depend on the number of workers or cores.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from ._setup import derive_seed, generator
from .models import NORMS, make_norm, mlp, small_cnn
from .torch import BatchLayerNorm
from .torch import functional as BF
from .torch._batch_layer_norm import bln_weights

__all__ = [
    "CUBE_METHODS",
    "STAT_AXES",
    "stats_mask",
    "manual_stats",
    "manual_normalize",
    "draw_norm_cube",
    "draw_norm_cubes",
    "PACKABLE",
    "ARCHS",
    "PackedNet",
    "train_packed",
    "evaluate_packed",
    "SweepResult",
    "batch_size_sweep",
    "time_steps",
    "linear_lr",
    "lr_at",
    "SCHEDULES",
    "norm_kwargs_for",
]

# --------------------------------------------------------------------------------------------------------
# What each method normalizes over
# --------------------------------------------------------------------------------------------------------

#: The methods drawn in the axes cube, in the order of Wu & He's Figure 2 (plus batch-layer norm).
CUBE_METHODS = ("bn", "ln", "in", "gn", "bln")

#: The axes of an (N, C, H, W) activation each method's statistics are taken over.
STAT_AXES = {
    "bn": "N, H, W",
    "ln": "C, H, W",
    "in": "H, W",
    "gn": "C/G, H, W",
    "bln": "N, H, W (weight 1 - 1/N) and C, H, W (weight 1/N)",
}


def _check_kind(kind: str, allowed=CUBE_METHODS) -> None:
    if kind not in allowed:
        raise ValueError(f"kind: expected one of {tuple(allowed)}, got {kind!r}")


def _check_groups(groups, C: int, kind: str) -> int:
    if kind != "gn":
        return 1
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or C % groups:
        raise ValueError(f"groups: expected a positive int that divides C={C}, got {groups!r}")
    return groups


def stats_mask(kind: str, shape=(6, 6, 4), *, groups: Optional[int] = None, anchor=None) -> np.ndarray:
    """Boolean ``(N, C, S)`` cube (``S = H * W``): the entries whose statistics normalize the ``anchor`` entry.

    ``anchor = (n, c)`` (default: the last sample, the first channel, which the drawing shows on its visible
    faces). For ``'bln'`` the mask is the union of the ``'bn'`` and ``'ln'`` sets; :func:`draw_norm_cube`
    shades the two parts with their weights.
    """
    _check_kind(kind)
    N, C, S = (int(v) for v in shape)
    if min(N, C, S) < 1:
        raise ValueError(f"shape: expected three positive sizes (N, C, H*W), got {shape!r}")
    groups = _check_groups(groups if groups is not None else (2 if C % 2 == 0 else 1), C, kind)
    n0, c0 = anchor if anchor is not None else (N - 1, 0)
    if not (0 <= n0 < N and 0 <= c0 < C):
        raise ValueError(f"anchor: expected (n, c) inside (N, C) = ({N}, {C}), got {anchor!r}")
    mask = np.zeros((N, C, S), dtype=bool)
    if kind in ("bn", "bln"):
        mask[:, c0, :] = True
    if kind in ("ln", "bln"):
        mask[n0, :, :] = True
    if kind == "in":
        mask[n0, c0, :] = True
    if kind == "gn":
        size = C // groups
        g = c0 // size
        mask[n0, g * size:(g + 1) * size, :] = True
    return mask


def manual_stats(x: torch.Tensor, kind: str, *, groups: Optional[int] = None):
    """Mean and biased variance of ``x`` (shape ``(N, C, *spatial)``) over the axes ``kind`` normalizes over,
    computed by a plain reduction, broadcastable against ``x``. ``kind`` in 'bn', 'ln', 'in', 'gn'."""
    _check_kind(kind, ("bn", "ln", "in", "gn"))
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise ValueError("x: expected a tensor of shape (N, C, *spatial) with at least one spatial dim")
    N, C = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    if kind == "bn":
        dims = (0,) + spatial
    elif kind == "ln":
        dims = (1,) + spatial
    elif kind == "in":
        dims = spatial
    else:
        g = _check_groups(groups, C, kind)
        xg = x.reshape(N, g, C // g, *x.shape[2:])
        dims_g = tuple(range(2, xg.dim()))
        mean = xg.mean(dims_g, keepdim=True)
        var = xg.var(dims_g, unbiased=False, keepdim=True)
        shape = (N, g, C // g) + (1,) * len(spatial)
        return (mean.expand(shape).reshape(N, C, *([1] * len(spatial))),
                var.expand(shape).reshape(N, C, *([1] * len(spatial))))
    return x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)


def manual_normalize(x: torch.Tensor, kind: str, *, groups: Optional[int] = None, eps: float = 1e-5,
                     batch_size: Optional[int] = None):
    """What the layer computes in training mode with gamma = 1, beta = 0, by plain reductions:
    ``(x - mean) / sqrt(var + eps)`` with :func:`manual_stats`; for ``'bln'`` the batch-layer-norm mix
    ``(alpha_L * x_L + alpha_B * x_B) / sqrt(C)`` with ``alpha_L = 1/m - 1e-4``, ``alpha_B = 1 - 1/m - 1e-4``
    (``m = batch_size``, default ``N``) -- the formula of :class:`bnlib.torch.BatchLayerNorm`."""
    if kind == "bln":
        N, C = x.shape[:2]
        m = N if batch_size is None else batch_size
        x_b = manual_normalize(x, "bn", eps=eps)
        x_l = manual_normalize(x, "ln", eps=eps)
        a_l, a_b = 1.0 / m - 1e-4, 1.0 - 1.0 / m - 1e-4
        return (a_l * x_l + a_b * x_b) / math.sqrt(C)
    mean, var = manual_stats(x, kind, groups=groups)
    return (x - mean) / torch.sqrt(var + eps)


def _project(n, c, s, depth=0.55, angle=math.radians(35)):
    """Oblique projection of the point (n, c, s): N to the right, C into the page (up-right), S up."""
    return n + depth * c * math.cos(angle), s + depth * c * math.sin(angle)


def draw_norm_cube(ax, kind: str, *, shape=(6, 6, 4), groups: Optional[int] = None, color: Optional[str] = None,
                   title: Optional[str] = None, anchor=None, label_axes: bool = True):
    """Draw the ``(N, C, H*W)`` activation cube on ``ax`` with the cells ``kind`` normalizes together shaded.

    The cube is drawn as its three visible faces (front: N x HW at the first channel; top: N x C at the top
    row; right: C x HW at the last sample). For ``'bln'`` (batch size ``m = N``), the batch-norm part is
    shaded with opacity ``1 - 1/m`` and the layer-norm part with ``1/m``, the weights BLN gives them.
    Returns ``ax``.
    """
    from matplotlib.patches import Polygon

    from .plotting import METHOD_COLORS

    _check_kind(kind)
    N, C, S = (int(v) for v in shape)
    color = color or METHOD_COLORS[kind]
    if kind == "bln":
        m_bn = stats_mask("bn", shape, anchor=anchor)
        m_ln = stats_mask("ln", shape, anchor=anchor)
        w_bn, w_ln = 1.0 - 1.0 / N, 1.0 / N

        def alpha(n, c, s):
            a = (w_bn if m_bn[n, c, s] else 0.0) + (w_ln if m_ln[n, c, s] else 0.0)
            return 0.15 + 0.85 * min(a, 1.0) if a > 0 else 0.0
    else:
        mask = stats_mask(kind, shape, groups=groups, anchor=anchor)

        def alpha(n, c, s):
            return 0.9 if mask[n, c, s] else 0.0

    def face(corners, a):
        pts = [_project(*p) for p in corners]
        ax.add_patch(Polygon(pts, closed=True, facecolor="white", edgecolor="none", zorder=1))
        if a > 0:
            ax.add_patch(Polygon(pts, closed=True, facecolor=color, alpha=a, edgecolor="none", zorder=2))
        ax.add_patch(Polygon(pts, closed=True, facecolor="none", edgecolor="0.35", linewidth=0.6, zorder=3))

    for n in range(N):  # front face, c = 0
        for s in range(S):
            face([(n, 0, s), (n + 1, 0, s), (n + 1, 0, s + 1), (n, 0, s + 1)], alpha(n, 0, s))
    for n in range(N):  # top face, s = S
        for c in range(C):
            face([(n, c, S), (n + 1, c, S), (n + 1, c + 1, S), (n, c + 1, S)], alpha(n, c, S - 1))
    for c in range(C):  # right face, n = N
        for s in range(S):
            face([(N, c, s), (N, c + 1, s), (N, c + 1, s + 1), (N, c, s + 1)], alpha(N - 1, c, s))
    if label_axes:
        x0, y0 = _project(N / 2, 0, 0)
        ax.text(x0, y0 - 0.45, "N (batch)", ha="center", va="top", fontsize=9)
        x1, y1 = _project(0, 0, S / 2)
        ax.text(x1 - 0.3, y1, "H, W", ha="right", va="center", fontsize=9, rotation=90)
        x2, y2 = _project(N, C / 2, 0)
        ax.text(x2 + 0.3, y2 - 0.1, "C (channels)", ha="left", va="top", fontsize=9, rotation=35)
    xs, ys = zip(*[_project(*p) for p in [(0, 0, 0), (N, 0, 0), (N, C, 0), (N, C, S), (0, C, S), (0, 0, S)]])
    ax.set_xlim(min(xs) - 1.0, max(xs) + 2.2)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 0.4)
    ax.set_aspect("equal")
    ax.axis("off")
    if title is not None:
        ax.set_title(title, fontsize=10)
    return ax


def draw_norm_cubes(kinds: Sequence[str] = CUBE_METHODS, *, shape=(6, 6, 4), groups: int = 2, titles=None,
                    figsize=None):
    """A row of :func:`draw_norm_cube` panels, one per method (the static version of the cube explorer).
    Returns the figure."""
    import matplotlib.pyplot as plt

    kinds = tuple(kinds)
    for k in kinds:
        _check_kind(k)
    fig, axes = plt.subplots(1, len(kinds), figsize=figsize or (2.6 * len(kinds), 2.9))
    axes = np.atleast_1d(axes)
    for i, (ax, k) in enumerate(zip(axes, kinds)):
        title = titles[i] if titles is not None else k
        draw_norm_cube(ax, k, shape=shape, groups=groups, title=title, label_axes=(i == 0))
    return fig


# --------------------------------------------------------------------------------------------------------
# k networks trained as one
# --------------------------------------------------------------------------------------------------------

#: Methods whose layers can be packed: their statistics never cross the channel groups of a packed network
#: (batch-layer norm's layer half is computed per network, see :class:`_PackedBatchLayerNorm`).
PACKABLE = ("none", "bn", "ghost", "brn", "ln", "gn", "in", "bln")


class _PackedBatchLayerNorm(BatchLayerNorm):
    """The batch-layer-norm layers of ``k`` networks with ``C`` channels each, as one ``BatchLayerNorm(k * C)``
    (same parameters, buffers and state-dict keys, so packing and unpacking are concatenation and slicing).

    BLN's output is ``gamma_c / sqrt(C) * (alpha_L x_L + alpha_B x_B) + beta_c``. The batch half ``x_B`` is
    per channel, so :func:`bnlib.torch.functional.batch_norm` computes it for all ``k * C`` channels at once
    (batch statistics and the running-statistics update in training, the running statistics in evaluation);
    the layer half ``x_L`` takes each sample's statistics over *its own network's* ``C`` channels, which is
    :func:`bnlib.torch.functional.group_norm` with ``k`` groups. Both use the layer's ``eps``; ``d = C``.
    One call of each instead of ``k`` calls of BLN's function: the packed cells run about as fast as batch
    norm's. ``tests/test_sweeps.py`` checks the packed runs against separate ``BatchLayerNorm`` networks."""

    def __init__(self, k: int, num_features: int, **kwargs):
        super().__init__(k * num_features, **kwargs)
        self.k, self.per_network = k, num_features

    def _functional(self, input, running_mean, running_var, weight, bias, training, momentum, eps):
        m = input.shape[0] if self.batch_size is None else self.batch_size
        a_l, a_b = bln_weights(m)
        x_b = BF.batch_norm(input, running_mean, running_var, None, None, training, momentum, eps, backend="torch")
        x_l = BF.group_norm(input, self.k, None, None, eps)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        mixed = a_b * x_b + a_l * x_l
        d = math.sqrt(self.per_network)
        out = mixed / d if weight is None else mixed * (weight / d).view(shape)
        return out if bias is None else out + bias.view(shape)


class _PackedLinear(nn.Module):
    """k independent ``Linear(C, out)`` layers applied to an input ``(B, k * C)``; output ``(B, k, out)``, or
    ``(B, k * out)`` with ``flat=True`` (the layout the next packed layer reads)."""

    def __init__(self, linears: Sequence[nn.Linear], flat: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([l.weight.detach().clone() for l in linears]))  # (k, out, C)
        self.bias = nn.Parameter(torch.stack([l.bias.detach().clone() for l in linears]))  # (k, out)
        self.flat = flat

    def forward(self, x):
        k, out, C = self.weight.shape
        y = torch.einsum("bkc,koc->bko", x.reshape(x.shape[0], k, C), self.weight) + self.bias
        return y.reshape(x.shape[0], k * out) if self.flat else y


def _cat_state(dst: nn.Module, sources: Sequence[nn.Module]) -> None:
    """Load the concatenation (along dim 0) of the sources' parameters and buffers into ``dst``; 0-d tensors
    (counters) must agree across sources and are copied."""
    states = [s.state_dict() for s in sources]
    target = dst.state_dict()
    if set(target) != set(states[0]):
        raise ValueError(f"cannot pack {type(sources[0]).__name__}: state keys {sorted(states[0])} vs "
                         f"{sorted(target)}")
    new = {}
    for key, ref in target.items():
        parts = [st[key] for st in states]
        if ref.dim() == 0:
            new[key] = parts[0].clone()
        else:
            new[key] = torch.cat(parts, 0)
        if new[key].shape != ref.shape:
            raise ValueError(f"cannot pack {key!r}: packed shape {tuple(ref.shape)}, got {tuple(new[key].shape)}")
    dst.load_state_dict(new)


def _packed_norm(kind: str, layer: nn.Module, C: int, k: int, dim: int, norm_kwargs: dict) -> nn.Module:
    """The normalization layer of ``k`` packed networks: per-channel layers get ``k * C`` channels; layer norm
    (``GroupNorm(1, C)`` or ``LayerNorm(C)``) becomes ``GroupNorm(k, k * C)``, ``GroupNorm(G, C)`` becomes
    ``GroupNorm(k * G, k * C)`` and batch-layer norm :class:`_PackedBatchLayerNorm`, so that no statistic spans
    two networks."""
    kw = dict(norm_kwargs)
    if kind == "bln":
        return _PackedBatchLayerNorm(k, C, **kw)
    if kind == "ln":
        return make_norm("gn", k * C, dim, groups=k)
    if kind == "gn":
        kw.pop("groups", None)
        return make_norm("gn", k * C, dim, groups=k * layer.num_groups, **kw)
    return make_norm(kind, k * C, dim, **kw)


ARCHS = ("cnn", "mlp")


class PackedNet(nn.Module):
    """``k`` copies of one of the book's small networks, one per seed, trained side by side.

    ``arch='cnn'``: ``small_cnn(norm, channels, num_classes, image_size=image_size)``;
    ``arch='mlp'``: ``mlp(image_size**2, hidden, num_classes, activation='relu', norm=norm)`` (normalization
    before the ReLU). Input ``(B, k, H, W)`` (network ``j`` reads channel ``j``); output logits
    ``(B, k, num_classes)``. Network ``j`` starts from the weights the single network gets after
    ``torch.manual_seed(seeds[j])`` (the global generator is left as it was). For the methods in
    :data:`PACKABLE` the networks share every operation (grouped convolutions, batched matrix products,
    normalization layers with ``k`` times the channels, batch-layer norm from its two halves); with
    ``pack=False`` they are ``k`` separate networks. :meth:`unpack` returns network ``j`` as an ordinary single network.
    """

    def __init__(self, norm: str = "bn", seeds: Sequence[int] = (0, 1), channels=(8, 16), *, arch: str = "cnn",
                 hidden=(64, 64), image_size: int = 14, num_classes: int = 10, pack: bool = True,
                 norm_kwargs: Optional[dict] = None):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        if arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
        seeds = tuple(seeds)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise ValueError(f"seeds: expected a non-empty sequence of non-negative ints, got {seeds!r}")
        self.norm, self.seeds, self.arch = norm, seeds, arch
        self.channels, self.hidden = tuple(channels), tuple(hidden)
        self.image_size, self.num_classes = image_size, num_classes
        self.norm_kwargs = dict(norm_kwargs or {})
        self.k = len(seeds)
        with torch.random.fork_rng(devices=[]):  # the global generator's state is left as it was
            self._build(pack)

    def single(self) -> nn.Sequential:
        """A fresh single network of this architecture (drawn from the global generator)."""
        if self.arch == "cnn":
            return small_cnn(self.norm, self.channels, self.num_classes, image_size=self.image_size,
                             **self.norm_kwargs)
        return mlp(self.image_size ** 2, self.hidden, self.num_classes, activation="relu", norm=self.norm,
                   **self.norm_kwargs)

    def _build(self, pack: bool) -> None:
        singles = []
        for s in self.seeds:
            torch.manual_seed(derive_seed(s))
            singles.append(self.single())
        self.grouped = bool(pack) and self.norm in PACKABLE
        if not self.grouped:
            self.nets = nn.ModuleList(singles)
            return
        k, layers, width = self.k, [], None
        dim = 2 if self.arch == "cnn" else 1
        last = len(singles[0]) - 1
        for i, ref in enumerate(singles[0]):
            mods = [net[i] for net in singles]
            if isinstance(ref, nn.Conv2d):
                conv = nn.Conv2d(k * ref.in_channels, k * ref.out_channels, ref.kernel_size, stride=ref.stride,
                                 padding=ref.padding, bias=ref.bias is not None, groups=k)
                _cat_state(conv, mods)
                layers.append(conv)
                width = ref.out_channels
            elif isinstance(ref, nn.Linear):
                layers.append(_PackedLinear(mods, flat=i != last))
                width = ref.out_features
            elif isinstance(ref, (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)):
                layers.append(ref)
            elif width is not None:  # the normalization layer after a conv or a linear layer
                packed = _packed_norm(self.norm, ref, width, k, dim, self.norm_kwargs)
                _cat_state(packed, mods)
                layers.append(packed)
            else:
                raise ValueError(f"cannot pack layer {i} ({type(ref).__name__})")
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.k:
            raise ValueError(f"x: expected shape (B, k={self.k}, H, W), got {tuple(x.shape)}")
        if self.grouped:
            return self.body(x)
        return torch.stack([net(x[:, j: j + 1]) for j, net in enumerate(self.nets)], 1)

    def unpack(self, j: int) -> nn.Sequential:
        """Network ``j`` as a single network (a copy, in the packed model's current train/eval mode)."""
        if not isinstance(j, int) or not 0 <= j < self.k:
            raise ValueError(f"j: expected an index in [0, {self.k}), got {j!r}")
        if not self.grouped:
            import copy

            return copy.deepcopy(self.nets[j])
        with torch.random.fork_rng(devices=[]):
            net = self.single()
        net.to(next(self.parameters()).device)
        for dst, src in zip(net, self.body):
            if isinstance(src, _PackedLinear):
                dst.weight.data.copy_(src.weight[j]), dst.bias.data.copy_(src.bias[j])
                continue
            own = dst.state_dict()
            if not own:
                continue
            new = {}
            for key, t in src.state_dict().items():
                if t.dim() == 0:
                    new[key] = t.clone()
                else:
                    size = own[key].shape[0]
                    new[key] = t[j * size:(j + 1) * size].clone()
            dst.load_state_dict(new)
        net.train(self.training)
        return net


def linear_lr(base_lr: float, batch_size: int, base_batch: int = 32) -> float:
    """The linear scaling rule: ``base_lr * batch_size / base_batch``."""
    return base_lr * batch_size / base_batch


@contextlib.contextmanager
def _cpu_settings(device: torch.device, batch: int, fast_convs: bool, threads: Optional[int]):
    """Inside: on CPU, ``threads`` intra-op threads (results then do not depend on the machine's core count)
    and, for small batches (``batch <= 16`` images through a layer), oneDNN (mkldnn) off -- its fixed per-call
    cost dominates tiny convolutions."""
    if device.type != "cpu":
        yield
        return
    old_threads = torch.get_num_threads()
    old_mkldnn = torch.backends.mkldnn.enabled
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if fast_convs and batch <= 16:
            torch.backends.mkldnn.enabled = False
        yield
    finally:
        torch.backends.mkldnn.enabled = old_mkldnn
        torch.set_num_threads(old_threads)


SCHEDULES = ("constant", "warmup-linear")


def lr_at(step: int, steps: int, lr: float, schedule: str = "constant", warmup: float = 0.1) -> float:
    """The learning rate of step ``step`` (1-based) of ``steps``: ``'constant'``, or ``'warmup-linear'``: a
    linear rise over the first ``warmup`` fraction of the steps, then a linear decay to 0 at the last step."""
    if schedule == "constant":
        return lr
    if schedule != "warmup-linear":
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    w = max(1, int(round(warmup * steps)))
    if step <= w:
        return lr * step / w
    return lr * (steps - step + 1) / (steps - w + 1)


def train_packed(model: PackedNet, x_train: torch.Tensor, y_train: torch.Tensor, *, steps: int, batch_size: int,
                 lr: float, momentum: float = 0.9, schedule: str = "constant", warmup: float = 0.1,
                 on_step: Optional[Callable[[int], None]] = None):
    """Train the ``k`` networks of ``model`` with SGD, each on its own mini-batches.

    The learning rate follows ``schedule`` (:func:`lr_at`: ``'constant'``, or ``'warmup-linear'`` with a
    ``warmup`` fraction of the steps).

    ``x_train``: ``(n, H, W)`` (or ``(n, 1, H, W)``); network ``j``'s batches are the ones
    :func:`bnlib.experiments.train` draws with ``seed=model.seeds[j]`` (a fresh ``torch.randperm`` from a
    ``torch.Generator`` at the start of each epoch). The loss is the sum of the ``k`` networks' mean
    cross-entropies, so each network gets exactly its own gradient. Returns the per-step training losses as a
    NumPy array ``(steps, k)``; a network whose loss became non-finite is marked by NaN from then on.
    """
    n = len(x_train)
    _checks.check_training_run(n, len(y_train), steps, batch_size)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup: expected a fraction in [0, 1), got {warmup!r}")
    if x_train.dim() == 4:
        x_train = x_train[:, 0]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gens = [generator(s) for s in model.seeds]
    orders = [torch.randperm(n, generator=g) for g in gens]
    pos = 0
    losses = []
    model.train()
    device = x_train.device
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            orders, pos = [torch.randperm(n, generator=g) for g in gens], 0
        idx = torch.stack([o[pos: pos + batch_size] for o in orders], 1).to(device)  # (B, k)
        pos += batch_size
        if schedule != "constant":
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, schedule, warmup)
        logits = model(x_train[idx])  # (B, k, classes)
        per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_train[idx].reshape(-1), reduction="none")
        # (k,) each network's mean loss, each reduced over its own contiguous row: the sum's order then does
        # not depend on k (a mean over dim 0 of (B, k) sums in another order for k = 2 than for k = 1, and the
        # sweep's workers train a cell's seeds one per task)
        per = per.view(batch_size, model.k).t().contiguous().mean(1)
        opt.zero_grad(set_to_none=True)
        per.sum().backward()
        opt.step()
        losses.append(per.detach())
        if on_step is not None:
            on_step(step)
    out = torch.stack(losses).cpu().numpy()
    bad = ~np.isfinite(out)
    if bad.any():  # once a network has diverged, its later losses are meaningless
        out[np.maximum.accumulate(bad, axis=0)] = np.nan
    return out


@torch.no_grad()
def evaluate_packed(model: PackedNet, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
                    mode: str = "eval") -> np.ndarray:
    """Error rate of each of the ``k`` networks on ``(x, y)`` (all networks see all images): an array ``(k,)``.

    ``mode='eval'`` (the default) uses running statistics; ``mode='train'`` normalizes each test batch of
    ``batch_size`` with its own statistics, on a copy of the model (the original's running statistics are
    not touched). The model's train/eval mode is restored.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode: expected 'eval' or 'train', got {mode!r}")
    if x.dim() == 4:
        x = x[:, 0]
    was_training = model.training
    net = model
    if mode == "train":
        import copy

        net = copy.deepcopy(model)
    net.train(mode == "train")
    wrong = torch.zeros(model.k, dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size]
        logits = net(xb.unsqueeze(1).expand(-1, model.k, -1, -1))
        wrong += (logits.argmax(-1) != y[i: i + batch_size, None]).sum(0)
    model.train(was_training)
    return wrong.cpu().numpy() / len(x)


# --------------------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Validation errors of a batch-size sweep: ``errors[m, b, s]`` for method ``methods[m]``, batch size
    ``batch_sizes[b]`` and seed ``seeds[s]`` (eval mode, running statistics; NaN for cells not run);
    ``diverged`` likewise; ``seconds[m, b]`` the wall time of the (method, batch size) cell (all seeds);
    ``config`` the settings."""

    methods: tuple
    batch_sizes: tuple
    seeds: tuple
    errors: np.ndarray
    diverged: np.ndarray
    final_loss: np.ndarray
    seconds: np.ndarray
    config: dict = field(default_factory=dict)
    train_mode_errors: Optional[np.ndarray] = None

    def _m(self, method: str) -> int:
        if method not in self.methods:
            raise ValueError(f"method: expected one of {self.methods}, got {method!r}")
        return self.methods.index(method)

    def _b(self, batch_size: int) -> int:
        if batch_size not in self.batch_sizes:
            raise ValueError(f"batch_size: expected one of {self.batch_sizes}, got {batch_size!r}")
        return self.batch_sizes.index(batch_size)

    def error(self, method: str, batch_size: Optional[int] = None) -> np.ndarray:
        """Errors over seeds at one batch size, or ``(batch sizes, seeds)`` for all of them."""
        e = self.errors[self._m(method)]
        return e if batch_size is None else e[self._b(batch_size)]

    def ran(self, method: str) -> tuple:
        """The batch sizes at which ``method`` was run."""
        e = self.errors[self._m(method)]
        return tuple(b for b, row in zip(self.batch_sizes, e) if not np.isnan(row).all())

    def mean(self, method: str) -> np.ndarray:
        """Mean error over seeds, one value per batch size (NaN where not run)."""
        return self.errors[self._m(method)].mean(-1)

    def median(self, method: str) -> np.ndarray:
        """Median error over seeds, one value per batch size (NaN where not run)."""
        return np.median(self.errors[self._m(method)], -1)

    def spread(self, method: str) -> np.ndarray:
        """Range (max - min) of the error over seeds, one value per batch size."""
        e = self.errors[self._m(method)]
        return e.max(-1) - e.min(-1)

    def variation(self, method: str) -> float:
        """How much the mean error changes across batch sizes: max - min of :meth:`mean` (cells run)."""
        m = self.mean(method)
        return float(np.nanmax(m) - np.nanmin(m))

    def table(self, names: Optional[Dict[str, str]] = None, percent: bool = True, fmt: str = ".1f") -> str:
        """A Markdown table: one row per method, one column per batch size, ``median [min, max]`` over seeds
        (:func:`bnlib.report.spread`, format ``fmt``); ``-`` for the cells not run."""
        from .report import spread

        scale = 100.0 if percent else 1.0
        head = "| method | " + " | ".join(f"batch {b}" for b in self.batch_sizes) + " |"
        rows = [head, "|" + " --- |" * (len(self.batch_sizes) + 1)]
        for m in self.methods:
            e = self.error(m) * scale
            cells = ["-" if np.isnan(row).all() else spread(row, fmt) for row in e]
            rows.append(f"| {(names or {}).get(m, m)} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def norm_kwargs_for(spec, batch_size: int) -> dict:
    """The layer keyword arguments an entry of ``batch_size_sweep``'s ``norm_kwargs`` gives at ``batch_size``
    (a dict, or a function of the batch size returning one; ``None`` gives ``{}``)."""
    if spec is None:
        return {}
    out = spec(batch_size) if callable(spec) else spec
    if not isinstance(out, dict):
        raise ValueError(f"norm_kwargs: expected a dict (or a function of the batch size returning one), got {out!r}")
    return dict(out)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"x: expected single-channel images (n, H, W) or (n, 1, H, W), got {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"x: expected images (n, H, W) or (n, 1, H, W), got {tuple(x.shape)}")
    return x


def _run_cell(method, bs, seeds, xtr, ytr, xva, yva, examples, lr, momentum, schedule, warmup, arch, channels,
              hidden, norm_kwargs, pack, train_mode_eval, fast_convs, threads, on_step=None) -> dict:
    """Train and evaluate the ``len(seeds)`` networks of one (method, batch size) cell of a sweep."""
    device = xtr.device
    start = time.perf_counter()
    with _cpu_settings(device, bs * (len(seeds) if pack else 1), fast_convs, threads):
        model = PackedNet(method, seeds, channels, arch=arch, hidden=hidden, image_size=xtr.shape[-1], pack=pack,
                          norm_kwargs=norm_kwargs).to(device)
        losses = train_packed(model, xtr, ytr, steps=examples // bs, batch_size=bs, lr=lr, momentum=momentum,
                              schedule=schedule, warmup=warmup, on_step=on_step)
        out = {"errors": evaluate_packed(model, xva, yva)}
        if train_mode_eval:
            out["train_mode_errors"] = evaluate_packed(model, xva, yva, batch_size=bs, mode="train")
    out["diverged"] = np.isnan(losses[-1])
    tail = losses[-max(1, len(losses) // 10):]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (diverged networks) give NaN
        out["final_loss"] = np.nanmean(tail, 0)
    out["seconds"] = time.perf_counter() - start
    return out


_PROGRESS = None  # a shared step counter in worker processes


def _start_method() -> str:
    """How worker processes start: spawned inside a Jupyter kernel (a fork would inherit the kernel's ZeroMQ
    sockets and threads), forked elsewhere when the platform can (a spawned worker re-imports a script's
    ``__main__``, which would need an ``if __name__ == "__main__":`` guard)."""
    import multiprocessing as mp
    import sys

    if "ipykernel" in sys.modules or "fork" not in mp.get_all_start_methods():
        return "spawn"
    return "fork"


_POOL = None  # (executor, step counter, workers, start method), kept for the next sweep of this process


@atexit.register
def _shutdown_pool() -> None:
    """Stop the kept worker pool (at exit, while the modules the executor needs still exist)."""
    global _POOL
    if _POOL is not None:
        _POOL[0].shutdown(wait=True, cancel_futures=True)
        _POOL = None


def _worker_pool(workers: int):
    """A process pool of ``workers`` processes and its shared step counter, created on first use and reused by
    later sweeps (a spawned worker takes seconds to import torch and bnlib)."""
    global _POOL
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = _start_method()
    if _POOL is not None and (_POOL[2:] != (workers, method) or getattr(_POOL[0], "_broken", False)):
        _POOL[0].shutdown(cancel_futures=True)
        _POOL = None
    if _POOL is None:
        ctx = mp.get_context(method)
        counter = ctx.Value("q", 0)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(counter,))
        _POOL = (pool, counter, workers, method)
    return _POOL[0], _POOL[1]


def _init_worker(counter):
    """Set up a worker process: the shared step counter, and Ctrl-C left to the parent. A Jupyter kernel that
    is interrupted or shut down sends SIGINT to its process group; an idle worker would die of it with a
    traceback on the terminal, a busy one would break the kept pool. The parent stops the workers (the
    pool's shutdown, or the end of the parent, which closes their queues)."""
    import signal

    global _PROGRESS
    _PROGRESS = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_cell(kwargs):
    counter = _PROGRESS

    def on_step(step):
        if step % 10 == 0:
            with counter.get_lock():
                counter.value += 10

    out = _run_cell(**kwargs, on_step=on_step if counter is not None else None)
    if counter is not None:
        with counter.get_lock():
            counter.value += (kwargs["examples"] // kwargs["bs"]) % 10
    return out


def batch_size_sweep(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    methods: Sequence[str] = NORMS,
    batch_sizes: Sequence[int] = (2, 4, 8, 16, 32, 64),
    seeds: Sequence[int] = (0, 1),
    examples: int = 8192,
    base_lr: float = 0.1,
    base_batch: int = 32,
    momentum: float = 0.9,
    schedule: str = "constant",
    warmup: float = 0.1,
    arch: str = "cnn",
    channels=(8, 16),
    hidden=(64, 64),
    norm_kwargs: Optional[Dict[str, dict]] = None,
    train_mode_eval: Sequence[str] = (),
    only: Optional[Dict[str, Sequence[int]]] = None,
    pack: bool = True,
    workers: int = 1,
    threads: Optional[int] = 1,
    fast_convs: bool = True,
    device=None,
    progress: bool = True,
    desc: str = "sweep",
) -> SweepResult:
    """Train the network ``arch`` (``'cnn'``: ``small_cnn(method, channels)``; ``'mlp'``: ``mlp(H*W, hidden,
    activation='relu', norm=method)``) for every method x batch size x seed and measure the validation error in
    eval mode.

    Every run sees the same number of training ``examples`` (``steps = examples // batch_size``; ``examples``
    must be a multiple of every batch size) with SGD (``momentum``) at the linearly scaled learning rate
    ``base_lr * batch_size / base_batch`` (the peak of ``schedule``, see :func:`lr_at`).
    ``norm_kwargs[method]`` goes to the normalization layers (e.g. ``{'gn': {'groups': 4},
    'ghost': {'virtual_batch_size': 4}}``), or is a function of the batch size that returns them (e.g. ``{'bln': lambda b: {'batch_size': b}}``). For the methods in ``train_mode_eval``
    the error is also measured with batch statistics of validation batches of the training batch size
    (``SweepResult.train_mode_errors``, NaN elsewhere). ``only[method]`` restricts a method to some of the
    batch sizes (its other cells are NaN). One tqdm bar counts the training steps of the sweep.

    Speed: the seeds of a cell are trained together (:class:`PackedNet`, unless ``pack=False``); on CPU each
    cell runs with ``threads`` intra-op threads (default 1: tiny layers gain nothing from more, and the
    results then do not depend on the machine), and with ``workers > 1`` (CPU only) the cells are spread
    over that many processes (spawned inside Jupyter, forked elsewhere; the pool is kept for the next sweep).
    The results do not depend on ``workers``.
    """
    methods, batch_sizes, seeds = tuple(methods), tuple(batch_sizes), tuple(seeds)
    for m in methods:
        if m not in NORMS:
            raise ValueError(f"methods: expected names from {NORMS}, got {m!r}")
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected distinct method names, got {methods!r}")
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes: expected positive ints, got {batch_sizes!r}")
    if not isinstance(examples, int) or examples < 1 or any(examples % b for b in batch_sizes):
        raise ValueError(f"examples: expected a positive int divisible by every batch size {batch_sizes}, "
                         f"got {examples!r}")
    if not (isinstance(base_lr, (int, float)) and base_lr > 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr: expected a positive finite number, got {base_lr!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    if arch == "mlp" and "in" in methods:
        raise ValueError("methods: 'in' (instance norm) needs feature maps; it is not defined for arch='mlp'")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive int, got {workers!r}")
    norm_kwargs = dict(norm_kwargs or {})
    device = torch.device(device) if device is not None else x_train.device
    xtr, xva = _prepare(x_train).to(device), _prepare(x_val).to(device)
    ytr, yva = y_train.to(device), y_val.to(device)
    if len(ytr) != len(xtr) or len(yva) != len(xva):
        raise ValueError("y_train, y_val: expected one label per image")
    if max(batch_sizes) > len(xtr):
        raise ValueError(f"batch_sizes: the largest ({max(batch_sizes)}) exceeds the {len(xtr)} training images")
    shape = (len(methods), len(batch_sizes), len(seeds))
    errors, diverged, final_loss = np.full(shape, np.nan), np.zeros(shape, bool), np.full(shape, np.nan)
    tm_errors = np.full(shape, np.nan)
    seconds = np.zeros(shape[:2])
    only = {m: tuple(v) for m, v in (only or {}).items()}
    for m, v in only.items():
        if m not in methods or not set(v) <= set(batch_sizes):
            raise ValueError(f"only: expected method -> subset of {batch_sizes} for methods in {methods}, "
                             f"got {m!r}: {v!r}")
    cells = {}
    for mi, method in enumerate(methods):
        for bi, bs in enumerate(batch_sizes):
            if method in only and bs not in only[method]:
                continue
            cells[mi, bi] = dict(method=method, bs=bs, seeds=seeds, xtr=xtr, ytr=ytr, xva=xva, yva=yva,
                                 examples=examples, lr=linear_lr(base_lr, bs, base_batch), momentum=momentum,
                                 schedule=schedule, warmup=warmup, arch=arch,
                                 channels=tuple(channels), hidden=tuple(hidden),
                                 norm_kwargs=norm_kwargs_for(norm_kwargs.get(method), bs), pack=pack,
                                 train_mode_eval=method in train_mode_eval, fast_convs=fast_convs,
                                 threads=threads)
    parallel = workers > 1 and device.type == "cpu"
    # A cell whose seeds are not packed into one network (pack=False) runs as one task per seed when
    # the cells are spread over processes: the same computation, better balanced across the workers.
    tasks = []
    for key, cell in cells.items():
        if parallel and len(seeds) > 1 and not (pack and cell["method"] in PACKABLE):
            tasks += [(key, j, {**cell, "seeds": (s,)}) for j, s in enumerate(seeds)]
        else:
            tasks.append((key, None, cell))
    total = sum(examples // cell["bs"] for _, _, cell in tasks)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # a redraw at most every 2 s: in Jupyter each redraw is a message to the front end
        bar = tqdm(total=total, desc=desc, unit="step", mininterval=2.0)

    parts = {}

    def store(key, j, out):
        if j is not None:  # one seed of a split cell: stored once all its seeds are in, in seed order
            parts.setdefault(key, {})[j] = out
            if len(parts[key]) < len(seeds):
                return
            done = parts.pop(key)
            out = {k: np.concatenate([np.atleast_1d(done[i][k]) for i in range(len(seeds))])
                   for k in done[0] if k != "seconds"}
            out["seconds"] = sum(done[i]["seconds"] for i in range(len(seeds)))
        mi, bi = key
        errors[mi, bi], diverged[mi, bi], final_loss[mi, bi] = out["errors"], out["diverged"], out["final_loss"]
        seconds[mi, bi] = out["seconds"]
        if "train_mode_errors" in out:
            tm_errors[mi, bi] = out["train_mode_errors"]

    try:
        if not parallel:
            tick = (lambda _s: bar.update(1)) if bar is not None else None
            for key, j, cell in tasks:
                if bar is not None:
                    bar.set_postfix_str(f"{cell['method']} batch {cell['bs']}")
                store(key, j, _run_cell(**cell, on_step=tick))
        else:
            from concurrent.futures import FIRST_COMPLETED, wait

            pool, counter = _worker_pool(workers)
            with counter.get_lock():
                counter.value = 0
            # the longest tasks first (most steps; unpacked cells cost about k times more), so the workers
            # finish together
            order = sorted(tasks, key=lambda t: -(examples // t[2]["bs"])
                           * (1 if pack and t[2]["method"] in PACKABLE else len(t[2]["seeds"])))
            futures = {pool.submit(_worker_cell, cell): (key, j) for key, j, cell in order}
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
                    for f in done:
                        store(*futures[f], f.result())
                    if bar is not None and counter.value > bar.n:
                        bar.update(min(counter.value, total) - bar.n)
            finally:  # interrupted or failed: do not leave queued cells running for the next sweep
                for f in futures:
                    f.cancel()
            if bar is not None and bar.n < total:
                bar.update(total - bar.n)
    finally:
        if bar is not None:
            bar.close()
    config = dict(examples=examples, base_lr=base_lr, base_batch=base_batch, momentum=momentum,
                  schedule=schedule, warmup=warmup, arch=arch,
                  channels=tuple(channels) if arch == "cnn" else None,
                  hidden=tuple(hidden) if arch == "mlp" else None,
                  norm_kwargs={m: {b: cells[mi, bi]["norm_kwargs"] for bi, b in enumerate(batch_sizes)
                                   if (mi, bi) in cells} for mi, m in enumerate(methods)},
                  only=only,
                  image_size=int(xtr.shape[-1]),
                  n_train=len(xtr), n_val=len(xva), optimizer="sgd", lr_rule="linear", device=str(device))
    return SweepResult(methods, batch_sizes, seeds, errors, diverged, final_loss, seconds, config,
                       tm_errors if train_mode_eval else None)


def time_steps(method: str, batch_size: int, *, seeds: Sequence[int] = (0, 1), steps: int = 30, arch: str = "cnn",
               channels=(8, 16), hidden=(64, 64), image_size: int = 14, norm_kwargs: Optional[dict] = None, pack: bool = True, fast_convs: bool = True,
               threads: Optional[int] = 1, device=None) -> float:
    """Seconds per training step of a packed run (``len(seeds)`` networks), measured over ``steps`` steps on
    random data after a short warm-up: the number to size a sweep with."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = max(4 * batch_size, 64)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, image_size, image_size, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    model = PackedNet(method, seeds, channels, arch=arch, hidden=hidden, image_size=image_size, pack=pack,
                      norm_kwargs=norm_kwargs).to(device)
    with _cpu_settings(device, batch_size * (len(seeds) if pack else 1), fast_convs, threads):
        train_packed(model, x, y, steps=5, batch_size=batch_size, lr=0.01)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_packed(model, x, y, steps=steps, batch_size=batch_size, lr=0.01)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps
