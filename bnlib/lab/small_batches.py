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
:mod:`bnlib.lab.models` -- with each normalization method at each batch size and seed, for the *same number of
training examples* at every batch size (so ``steps = examples // batch_size``) with the learning rate scaled
linearly with the batch size (``lr = base_lr * batch_size / base_batch``, the rule Goyal et al. 2017 and Wu & He
2018 use; optionally with a warm-up and a linear decay, :func:`lr_at`), and measures the validation error in
**eval mode** (running statistics for the batch-norm family), optionally also with batch statistics.

Speed. At batch size 2 a step of a tiny network is pure per-operation overhead, so training ``k`` seeds one
after the other costs ``k`` times the overhead. The ``k`` seeds of one (method, batch size) cell therefore
train *together*, as one :class:`bnlib.lab.packed.PackedNet` (:func:`packed_net`): the ``k`` networks sit side
by side in one network whose convolutions are grouped, whose linear layers are batched matrix products and
whose normalization layers have ``k * C`` channels, so no statistic ever mixes two networks. Network ``j`` has
the initial weights of the single network built after ``torch.manual_seed(seeds[j])`` and sees the
mini-batches :func:`bnlib.lab.train.train` would draw with ``seed=seeds[j]``, so the packed run *is* the ``k``
separate runs (``tests/lab/test_packed.py`` and ``tests/lab/test_small_batches.py`` check this against
:func:`bnlib.lab.train.train`). A sweep is planned (:func:`plan_sweep`: its cells, each with its learning rate
and layer arguments, and its tasks) and then run (:func:`run_plan`), in this process or spread over worker
processes (``workers``; spawned in Jupyter, forked elsewhere); every cell runs single-threaded, so the results
do not depend on the number of workers or cores.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import _checks, methods
from .models import NORMS, mlp, small_cnn
from .packed import SCHEDULES, PackedNet, evaluate_packed, lr_at, train_packed
from .train import History, progress_bar

__all__ = [
    "error_se",
    "RenormKwargs",
    "CUBE_METHODS",
    "STAT_AXES",
    "stats_mask",
    "manual_stats",
    "manual_normalize",
    "draw_norm_cube",
    "draw_norm_cubes",
    "PACKABLE",
    "ARCHS",
    "single_net",
    "packed_net",
    "SweepResult",
    "SweepConfig",
    "SweepCell",
    "SweepPlan",
    "plan_sweep",
    "run_plan",
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

#: The axes of an (N, C, H, W) activation each method's statistics are taken over (from :mod:`bnlib.methods`).
STAT_AXES = {name: methods.get(name).stat_axes for name in CUBE_METHODS}


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


_ANGLE = math.radians(35)


def _project(n, c, s, depth=0.55, angle=_ANGLE):
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
# The sweep's networks (k seeds trained as one: bnlib.lab.packed)
# --------------------------------------------------------------------------------------------------------

#: Methods whose layers can be packed (``packable`` in :mod:`bnlib.methods`): their statistics never cross the
#: networks of a :class:`bnlib.lab.packed.PackedNet`.
PACKABLE = methods.names(packable=True)

ARCHS = ("cnn", "mlp")


def single_net(norm: str = "bn", channels=(8, 16), *, arch: str = "cnn", hidden=(64, 64), image_size: int = 14,
               num_classes: int = 10, norm_kwargs: Optional[dict] = None) -> nn.Sequential:
    """One network of a sweep: ``arch='cnn'``: ``small_cnn(norm, channels, num_classes, image_size=image_size)``;
    ``arch='mlp'``: ``mlp(image_size**2, hidden, num_classes, activation='relu', norm=norm)`` (normalization
    before the ReLU). Its initial weights come from the global generator."""
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    if arch == "cnn":
        return small_cnn(norm, tuple(channels), num_classes, image_size=image_size, **(norm_kwargs or {}))
    return mlp(image_size ** 2, tuple(hidden), num_classes, activation="relu", norm=norm, **(norm_kwargs or {}))


def packed_net(norm: str = "bn", seeds: Sequence[int] = (0, 1), channels=(8, 16), *, arch: str = "cnn",
               hidden=(64, 64), image_size: int = 14, num_classes: int = 10, pack: bool = True,
               norm_kwargs: Optional[dict] = None) -> PackedNet:
    """The ``len(seeds)`` networks of one sweep cell (:func:`single_net`) as one
    :class:`bnlib.lab.packed.PackedNet`: network ``j`` starts from the weights the single network gets after
    ``torch.manual_seed(derive_seed(seeds[j]))`` and trains on the batches of ``seeds[j]``. Input
    ``(B, k, H, W)``, output ``(B, k, num_classes)``. The methods in :data:`PACKABLE` share every operation;
    the others (and ``pack=False``) keep ``k`` separate networks."""
    return PackedNet.from_seeds(lambda: single_net(norm, channels, arch=arch, hidden=hidden, image_size=image_size,
                                                   num_classes=num_classes, norm_kwargs=norm_kwargs),
                                seeds, pack=pack)


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
        (:func:`bnlib.lab.report.spread`, format ``fmt``); ``-`` for the cells not run."""
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


def error_se(error, n: int):
    """The standard error of an error rate measured on ``n`` independent examples, ``sqrt(p (1 - p) / n)``
    (binomial; ``error`` a fraction or an array of them): the part of an entry's noise that comes from the
    finite validation set alone (another seed adds the training noise)."""
    n = _checks.check_positive_int("n", n)
    p = np.asarray(error, dtype=float)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"error: expected fractions in [0, 1], got {error!r}")
    return np.sqrt(p * (1.0 - p) / n)


@dataclass(frozen=True)
class RenormKwargs:
    """``norm_kwargs['brn']`` for :func:`batch_size_sweep` with Ioffe's schedule scaled to each run: called
    with the batch size, it gives the final limits and a
    :class:`bnlib.numpy.batch_renorm.RenormSchedule` whose relaxation ends at ``fraction`` of the run's
    ``examples // batch_size`` steps, in the paper's proportions (warm-up of plain batch norm for 1/8 of it,
    ``d_max`` relaxed by 5/8, ``r_max`` by the end: 5k, 25k and 40k steps in the paper). A dataclass, not a
    closure, so that it pickles to the sweep's worker processes."""

    r_max: float
    d_max: float
    examples: int
    fraction: float = 0.5

    def __post_init__(self) -> None:
        _checks.check_renorm_limits(self.r_max, self.d_max)
        _checks.check_positive_int("examples", self.examples)
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"fraction: expected a number in (0, 1], got {self.fraction!r}")

    def schedule(self, batch_size: int):
        from ..numpy.batch_renorm import RenormSchedule

        steps = self.examples // _checks.check_positive_int("batch_size", batch_size)
        return RenormSchedule.ioffe2017(max(1, round(self.fraction * steps)))

    def __call__(self, batch_size: int) -> dict:
        return {"r_max": self.r_max, "d_max": self.d_max, "schedule": self.schedule(batch_size)}


def _prepare(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"x: expected single-channel images (n, H, W) or (n, 1, H, W), got {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"x: expected images (n, H, W) or (n, 1, H, W), got {tuple(x.shape)}")
    return x


@dataclass(frozen=True)
class SweepConfig:
    """The settings every cell of a batch-size sweep shares: what training one cell needs besides its
    :class:`SweepCell` (method, batch size, seeds, learning rate, layer arguments) and the data."""

    examples: int                    # training examples each run sees: steps = examples // batch_size
    momentum: float = 0.9            # SGD momentum
    schedule: str = "constant"       # learning-rate schedule (bnlib.lab.packed.lr_at)
    warmup: float = 0.1              # warm-up fraction of 'warmup-linear'
    arch: str = "cnn"                # 'cnn' or 'mlp' (single_net)
    channels: tuple = (8, 16)        # the CNN's channels
    hidden: tuple = (64, 64)         # the MLP's hidden widths
    pack: bool = True                # train the seeds of a packable method as one PackedNet
    fast_convs: bool = True          # oneDNN off for small CPU batches (_cpu_settings)
    threads: Optional[int] = 1       # intra-op threads of a CPU cell (None: leave torch's setting)


@dataclass(frozen=True)
class SweepCell:
    """One (method, batch size) cell of a sweep -- or, when its seeds run as separate tasks, one seed of it
    (``part``: that seed's index among the sweep's seeds)."""

    key: tuple                       # (method index, batch-size index) in the SweepResult's arrays
    method: str
    batch_size: int
    seeds: tuple
    lr: float                        # the (peak) learning rate: linear_lr(base_lr, batch_size, base_batch)
    norm_kwargs: dict                # the normalization layers' arguments at this batch size
    train_mode_eval: bool = False    # also measure the error with batch statistics
    part: Optional[int] = None

    def steps(self, config: SweepConfig) -> int:
        return config.examples // self.batch_size

    def packed(self, config: SweepConfig) -> bool:
        """Whether the cell's seeds train as one packed network."""
        return config.pack and self.method in PACKABLE

    def cost(self, config: SweepConfig) -> int:
        """Steps of one network, times the networks that do not share them (to order tasks by)."""
        return self.steps(config) * (1 if self.packed(config) else len(self.seeds))


@dataclass
class SweepPlan:
    """What a batch-size sweep runs (:func:`plan_sweep`): the grid, the shared :class:`SweepConfig`, every
    cell, and the tasks -- the cells themselves, or, for cells whose seeds are not packed when the tasks go to
    worker processes, one task per seed (the same computation, better balanced across the workers)."""

    methods: tuple
    batch_sizes: tuple
    seeds: tuple
    config: SweepConfig
    cells: Dict[tuple, SweepCell]    # (method index, batch-size index) -> the cell with all its seeds
    tasks: List[SweepCell]
    workers: int                     # worker processes; 1 runs the tasks in this process
    base_lr: float
    base_batch: int
    only: Dict[str, tuple] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        """The training steps of all tasks (what the progress bar counts)."""
        return sum(t.steps(self.config) for t in self.tasks)


def plan_sweep(
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
    norm_kwargs: Optional[Dict[str, object]] = None,
    train_mode_eval: Sequence[str] = (),
    only: Optional[Dict[str, Sequence[int]]] = None,
    pack: bool = True,
    workers: int = 1,
    threads: Optional[int] = 1,
    fast_convs: bool = True,
    n_train: Optional[int] = None,
    device=None,
) -> SweepPlan:
    """Check the arguments of :func:`batch_size_sweep` (the same names and meanings) and decide what it runs:
    one :class:`SweepCell` per method x batch size (those ``only`` allows) with its learning rate and layer
    arguments, and the tasks. ``n_train`` (the number of training images) bounds the batch sizes; ``device``
    (default CPU) decides whether ``workers > 1`` processes are used (CPU only)."""
    methods, batch_sizes, seeds = tuple(methods), tuple(batch_sizes), tuple(seeds)
    for m in methods:
        if m not in NORMS:
            raise ValueError(f"methods: expected names from {NORMS}, got {m!r}")
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected distinct method names, got {methods!r}")
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes: expected positive ints, got {batch_sizes!r}")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds: expected a non-empty sequence of non-negative ints, got {seeds!r}")
    if not isinstance(examples, int) or examples < 1 or any(examples % b for b in batch_sizes):
        raise ValueError(f"examples: expected a positive int divisible by every batch size {batch_sizes}, "
                         f"got {examples!r}")
    if not (isinstance(base_lr, (int, float)) and base_lr > 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr: expected a positive finite number, got {base_lr!r}")
    _checks.check_positive_int("base_batch", base_batch)
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(warmup, (int, float)) and 0.0 <= warmup < 1.0):
        raise ValueError(f"warmup: expected a fraction in [0, 1), got {warmup!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    if arch == "mlp" and "in" in methods:
        raise ValueError("methods: 'in' (instance norm) needs feature maps; it is not defined for arch='mlp'")
    workers = _checks.check_positive_int("workers", workers)
    if threads is not None:
        _checks.check_positive_int("threads", threads)
    if n_train is not None and max(batch_sizes) > n_train:
        raise ValueError(f"batch_sizes: the largest ({max(batch_sizes)}) exceeds the {n_train} training images")
    only = {m: tuple(v) for m, v in (only or {}).items()}
    for m, v in only.items():
        if m not in methods or not set(v) <= set(batch_sizes):
            raise ValueError(f"only: expected method -> subset of {batch_sizes} for methods in {methods}, "
                             f"got {m!r}: {v!r}")
    norm_kwargs = dict(norm_kwargs or {})
    train_mode_eval = tuple(train_mode_eval)
    config = SweepConfig(examples=examples, momentum=momentum, schedule=schedule, warmup=warmup, arch=arch,
                         channels=tuple(channels), hidden=tuple(hidden), pack=bool(pack), fast_convs=fast_convs,
                         threads=threads)
    cells = {}
    for mi, method in enumerate(methods):
        for bi, bs in enumerate(batch_sizes):
            if method in only and bs not in only[method]:
                continue
            cells[mi, bi] = SweepCell((mi, bi), method, bs, seeds, linear_lr(base_lr, bs, base_batch),
                                      norm_kwargs_for(norm_kwargs.get(method), bs), method in train_mode_eval)
    device = torch.device(device) if device is not None else torch.device("cpu")
    workers = workers if device.type == "cpu" else 1
    tasks = []
    for cell in cells.values():
        if workers > 1 and len(seeds) > 1 and not cell.packed(config):
            tasks += [dataclasses.replace(cell, seeds=(s,), part=j) for j, s in enumerate(seeds)]
        else:
            tasks.append(cell)
    return SweepPlan(methods, batch_sizes, seeds, config, cells, tasks, workers, base_lr, base_batch, only)


def _loss_matrix(hists: Sequence[History], steps: int) -> np.ndarray:
    """The training losses of ``train_packed``'s histories as a float32 array ``(steps, k)``; NaN from a
    network's first non-finite loss on (and for steps not run)."""
    out = np.full((steps, len(hists)), np.nan, dtype=np.float32)
    for j, h in enumerate(hists):
        col = np.asarray(h.train_loss, dtype=np.float32)
        if h.diverged and len(col):
            col[-1] = np.nan
        out[:len(col), j] = col
    return out


def _errors(model: PackedNet, x, y, **kwargs) -> np.ndarray:
    """The error rate of each network (``evaluate_packed``), from the count of misclassified images."""
    _, acc = evaluate_packed(model, x, y, **kwargs)
    return (len(x) - np.rint(acc * len(x))) / len(x)


def _run_cell(cell: SweepCell, config: SweepConfig, data: tuple, on_step: Optional[Callable[[int], None]] = None
              ) -> dict:
    """Train and evaluate the ``len(cell.seeds)`` networks of one cell (``data``: the prepared
    ``(x_train, y_train, x_val, y_val)``); ``on_step(step)`` after each training step."""
    xtr, ytr, xva, yva = data
    device = xtr.device
    bs, seeds, steps = cell.batch_size, cell.seeds, cell.steps(config)
    start = time.perf_counter()
    with _cpu_settings(device, bs * (len(seeds) if config.pack else 1), config.fast_convs, config.threads):
        model = packed_net(cell.method, seeds, config.channels, arch=config.arch, hidden=config.hidden,
                           image_size=xtr.shape[-1], pack=config.pack, norm_kwargs=cell.norm_kwargs).to(device)
        hists = train_packed(model, xtr, ytr, steps=steps, batch_size=bs, lr=cell.lr, momentum=config.momentum,
                             schedule=config.schedule, warmup=config.warmup, eval_every=steps,
                             callback=None if on_step is None else (lambda t, *_: on_step(t)))
        losses = _loss_matrix(hists, steps)
        out = {"errors": _errors(model, xva, yva)}
        if cell.train_mode_eval:
            out["train_mode_errors"] = _errors(model, xva, yva, batch_size=bs, mode="train")
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


def _worker_cell(task: tuple) -> dict:
    """A worker process's task: ``(cell, config, data)``, run by :func:`_run_cell` (progress to the shared
    counter)."""
    cell, config, data = task
    counter = _PROGRESS

    def on_step(step):
        if step % 10 == 0:
            with counter.get_lock():
                counter.value += 10

    out = _run_cell(cell, config, data, on_step=on_step if counter is not None else None)
    if counter is not None:
        with counter.get_lock():
            counter.value += cell.steps(config) % 10
    return out


def _run_serial(plan: SweepPlan, data: tuple, store: Callable, bar=None) -> None:
    """Run the plan's tasks one after the other in this process; ``store(task, out)`` each result."""
    tick = (lambda _s: bar.update(1)) if bar is not None else None
    for task in plan.tasks:
        if bar is not None:
            bar.set_postfix_str(f"{task.method} batch {task.batch_size}")
        store(task, _run_cell(task, plan.config, data, on_step=tick))


def _run_pool(plan: SweepPlan, data: tuple, store: Callable, bar=None) -> None:
    """Run the plan's tasks in ``plan.workers`` worker processes (the kept pool), the longest first so that
    the workers finish together; ``store(task, out)`` each result as it comes in."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pool, counter = _worker_pool(plan.workers)
    with counter.get_lock():
        counter.value = 0
    total = plan.total_steps
    order = sorted(plan.tasks, key=lambda t: -t.cost(plan.config))
    futures = {pool.submit(_worker_cell, (task, plan.config, data)): task for task in order}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            for f in done:
                store(futures[f], f.result())
            if bar is not None and counter.value > bar.n:
                bar.update(min(counter.value, total) - bar.n)
    finally:  # interrupted or failed: do not leave queued cells running for the next sweep
        for f in futures:
            f.cancel()
    if bar is not None and bar.n < total:
        bar.update(total - bar.n)


def run_plan(plan: SweepPlan, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
             y_val: torch.Tensor, *, progress: bool = True, desc: str = "sweep") -> SweepResult:
    """Run a :class:`SweepPlan` on prepared data (images ``(n, H, W)`` on the sweep's device) -- in this
    process, or in worker processes when ``plan.workers > 1`` -- and collect the :class:`SweepResult`."""
    seeds = plan.seeds
    data = (x_train, y_train, x_val, y_val)
    shape = (len(plan.methods), len(plan.batch_sizes), len(seeds))
    errors, diverged, final_loss = np.full(shape, np.nan), np.zeros(shape, bool), np.full(shape, np.nan)
    tm_errors = np.full(shape, np.nan)
    seconds = np.zeros(shape[:2])
    parts: dict = {}

    def store(task: SweepCell, out: dict) -> None:
        if task.part is not None:  # one seed of a split cell: stored once all its seeds are in, in seed order
            parts.setdefault(task.key, {})[task.part] = out
            if len(parts[task.key]) < len(seeds):
                return
            done = parts.pop(task.key)
            out = {k: np.concatenate([np.atleast_1d(done[i][k]) for i in range(len(seeds))])
                   for k in done[0] if k != "seconds"}
            out["seconds"] = sum(done[i]["seconds"] for i in range(len(seeds)))
        mi, bi = task.key
        errors[mi, bi], diverged[mi, bi], final_loss[mi, bi] = out["errors"], out["diverged"], out["final_loss"]
        seconds[mi, bi] = out["seconds"]
        if "train_mode_errors" in out:
            tm_errors[mi, bi] = out["train_mode_errors"]

    bar = progress_bar(plan.total_steps, desc, unit="step", leave=True, mininterval=2.0) if progress else None
    try:
        (_run_pool if plan.workers > 1 else _run_serial)(plan, data, store, bar)
    finally:
        if bar is not None:
            bar.close()
    cfg = plan.config
    config = dict(examples=cfg.examples, base_lr=plan.base_lr, base_batch=plan.base_batch, momentum=cfg.momentum,
                  schedule=cfg.schedule, warmup=cfg.warmup, arch=cfg.arch,
                  channels=cfg.channels if cfg.arch == "cnn" else None,
                  hidden=cfg.hidden if cfg.arch == "mlp" else None,
                  norm_kwargs={m: {b: plan.cells[mi, bi].norm_kwargs for bi, b in enumerate(plan.batch_sizes)
                                   if (mi, bi) in plan.cells} for mi, m in enumerate(plan.methods)},
                  only=plan.only,
                  image_size=int(x_train.shape[-1]),
                  n_train=len(x_train), n_val=len(x_val), optimizer="sgd", lr_rule="linear",
                  device=str(x_train.device))
    any_tm = any(c.train_mode_eval for c in plan.cells.values())
    return SweepResult(plan.methods, plan.batch_sizes, seeds, errors, diverged, final_loss, seconds, config,
                       tm_errors if any_tm else None)


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
    'ghost': {'virtual_batch_size': 4}}``), or is a function of the batch size that returns them (e.g.
    ``{'bln': lambda b: {'batch_size': b}}``). For the methods in ``train_mode_eval``
    the error is also measured with batch statistics of validation batches of the training batch size
    (``SweepResult.train_mode_errors``, NaN elsewhere). ``only[method]`` restricts a method to some of the
    batch sizes (its other cells are NaN). One tqdm bar counts the training steps of the sweep.

    Speed: the seeds of a cell are trained together (:class:`bnlib.lab.packed.PackedNet`, unless
    ``pack=False``); on CPU each cell runs with ``threads`` intra-op threads (default 1: tiny layers gain
    nothing from more, and the results then do not depend on the machine), and with ``workers > 1`` (CPU
    only) the cells are spread over that many processes (spawned inside Jupyter, forked elsewhere; the pool is
    kept for the next sweep). The results do not depend on ``workers``.

    The sweep is :func:`plan_sweep` (what runs) followed by :func:`run_plan` (running it).
    """
    device = torch.device(device) if device is not None else x_train.device
    xtr, xva = _prepare(x_train).to(device), _prepare(x_val).to(device)
    ytr, yva = y_train.to(device), y_val.to(device)
    if len(ytr) != len(xtr) or len(yva) != len(xva):
        raise ValueError("y_train, y_val: expected one label per image")
    plan = plan_sweep(methods=methods, batch_sizes=batch_sizes, seeds=seeds, examples=examples, base_lr=base_lr,
                      base_batch=base_batch, momentum=momentum, schedule=schedule, warmup=warmup, arch=arch,
                      channels=channels, hidden=hidden, norm_kwargs=norm_kwargs, train_mode_eval=train_mode_eval,
                      only=only, pack=pack, workers=workers, threads=threads, fast_convs=fast_convs,
                      n_train=len(xtr), device=device)
    return run_plan(plan, xtr, ytr, xva, yva, progress=progress, desc=desc)


def time_steps(method: str, batch_size: int, *, seeds: Sequence[int] = (0, 1), steps: int = 30, arch: str = "cnn",
               channels=(8, 16), hidden=(64, 64), image_size: int = 14, norm_kwargs: Optional[dict] = None,
               pack: bool = True, fast_convs: bool = True, threads: Optional[int] = 1, device=None) -> float:
    """Seconds per training step of a packed run (``len(seeds)`` networks), measured over ``steps`` steps on
    random data after a short warm-up: the number to size a sweep with."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = max(4 * batch_size, 64)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, image_size, image_size, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    model = packed_net(method, seeds, channels, arch=arch, hidden=hidden, image_size=image_size, pack=pack,
                       norm_kwargs=norm_kwargs).to(device)
    with _cpu_settings(device, batch_size * (len(seeds) if pack else 1), fast_convs, threads):
        train_packed(model, x, y, steps=5, batch_size=batch_size, lr=0.01, momentum=0.9)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_packed(model, x, y, steps=steps, batch_size=batch_size, lr=0.01, momentum=0.9)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps
