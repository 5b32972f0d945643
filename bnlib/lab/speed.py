r"""Experiment runners for chapter 4, "Does batch norm make training faster?".

Each function here runs one kind of measurement the chapter reports, on top of the shared training loop
:func:`bnlib.lab.train.train` (so every curve in the chapter comes from the same loop) and the shared models
of :mod:`bnlib.lab.models` (so every normalization layer comes from :mod:`bnlib.torch`):

=================================  ==========================================================================
function                           what it measures
=================================  ==========================================================================
:func:`run_article_experiment`     the article's Keras experiment (Dense(128, ReLU) -> BN -> Dense(10), Adam,
                                   10 epochs, 20% validation split), per-epoch losses as Keras reports them;
                                   :func:`run_article_experiments` the same for several seeds at once
:func:`sigmoid_mlp`                Ioffe & Szegedy's Figure 1 network (3 x 100 sigmoid), Gaussian init
:class:`SigmoidInputProbe`         the 15th/50th/85th percentiles of one sigmoid's input during training
:func:`steps_to_target`            steps until the test accuracy first reaches a target (stops there);
                                   :func:`target_run` the same read off a recorded History
:func:`lr_sweep`                   :func:`steps_to_target` over learning rates x {no BN, BN} x seeds
:func:`speedups`                   the speed-ups at each arm's best learning rate and at equal rates
:func:`init_scale_sweep`           final accuracy vs the standard deviation of the initial weights
:func:`generalization_gap`         train vs test accuracy/loss of one trained model
:func:`bn_output_noise`            one fixed example's output when it shares a batch with random others
:func:`deep_mlp`                   plain or residual ReLU MLPs of any depth, with or without BN
:func:`gradient_norms`             per-layer weight-gradient norms (at initialization: Yang et al. 2019)
:func:`depth_sweep`                trainability vs depth for several architectures
:func:`regularization_sweep`       the generalization gap of the article's network with BN / dropout / both
:func:`explorer_run`               the interactive explorer's experiment; :func:`explorer_widget` its UI;
                                   :func:`explorer_grid` the pre-computed grid of it (packed)
=================================  ==========================================================================

The seeds (and learning rates) of one setting train side by side as one network
(:class:`bnlib.lab.packed.PackedNet`, :func:`bnlib.lab.packed.train_packed`): the same runs as separate calls
of ``train``, up to float rounding, at a fraction of their cost.

Every function that builds a model takes a ``seed`` and builds the model inside ``torch.random.fork_rng``, so
results do not depend on (and do not change) the global random state.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._setup import derive_seed, generator
from .models import make_norm, mlp
from .packed import (  # noqa: F401 (evaluate_packed: re-exported)
    PackedNet,
    _packed_norm,
    _PackedLinear,
    evaluate_packed,
    train_packed,
)
from .train import History, StopTraining, evaluate, sweep, train

__all__ = [
    "init_linear_",
    "sigmoid_mlp",
    "article_model",
    "ArticleResult",
    "validation_split",
    "run_article_experiment",
    "run_article_experiments",
    "SigmoidInputProbe",
    "TargetRun",
    "steps_to_target",
    "target_run",
    "lr_sweep",
    "speedups",
    "init_scale_sweep",
    "generalization_gap",
    "regularization_sweep",
    "bn_output_noise",
    "ResidualBlock",
    "ResidualPackedNet",
    "deep_mlp",
    "gradient_norms",
    "depth_sweep",
    "explorer_run",
    "explorer_grid",
    "explorer_widget",
    "EXPLODE",
    "OUTCOMES",
    "eval_schedule",
    "Outcome",
    "outcome_of",
    "PackedRun",
    "packed_run",
    "figure1_runs",
    "percentile_drift",
    "lr_outcomes",
    "outcome_summary",
    "history_until",
]


# --------------------------------------------------------------------------------------------------------
# Models and initialization
# --------------------------------------------------------------------------------------------------------

def _linears(model: nn.Module) -> List[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def init_linear_(model: nn.Module, init="default", *, seed: int = 0) -> nn.Module:
    """Re-initialize every ``nn.Linear`` of ``model`` in place and return the model.

    ``init``: a positive float ``s`` (weights ~ N(0, s^2), biases 0: Ioffe & Szegedy's "small random
    Gaussian values"), ``'he'`` (N(0, 2/fan_in), biases 0: He et al. 2015, for ReLU), ``'glorot'``
    (U(-a, a) with a = sqrt(6/(fan_in + fan_out)), biases 0: Keras' default for Dense), or ``'default'``
    (leave PyTorch's initialization). The weights are drawn from a ``torch.Generator`` seeded with ``seed``.
    """
    if isinstance(init, str):
        if init not in ("default", "he", "glorot"):
            raise ValueError(f"init: expected a positive float, 'he', 'glorot' or 'default', got {init!r}")
    elif isinstance(init, bool) or not isinstance(init, (int, float)) or not (init > 0 and math.isfinite(init)):
        raise ValueError(f"init: expected a positive float, 'he', 'glorot' or 'default', got {init!r}")
    if init == "default":
        return model
    gen = generator(seed)
    with torch.no_grad():
        for lin in _linears(model):
            fan_out, fan_in = lin.weight.shape
            if init == "glorot":
                a = math.sqrt(6.0 / (fan_in + fan_out))
                w = (torch.rand(lin.weight.shape, generator=gen) * 2 - 1) * a
            else:
                std = math.sqrt(2.0 / fan_in) if init == "he" else float(init)
                w = torch.randn(lin.weight.shape, generator=gen) * std
            lin.weight.copy_(w.to(lin.weight))
            if lin.bias is not None:
                lin.bias.zero_()
    return model


def sigmoid_mlp(norm: str = "none", *, hidden=(100, 100, 100), init=0.05, seed: int = 0, dropout: float = 0.0,
                device=None, **norm_kwargs) -> nn.Sequential:
    """Ioffe & Szegedy's Figure 1 network: 784 -> ``hidden`` sigmoid layers -> 10 logits.

    ``norm='bn'`` puts a ``bnlib.torch.BatchNorm1d`` before every sigmoid (their eq. (6), the article's
    eq. (6)). Weights are initialized by :func:`init_linear_` with ``init`` (default N(0, 0.05^2)).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed))
        model = mlp(784, tuple(hidden), 10, activation="sigmoid", norm=norm, dropout=dropout, **norm_kwargs)
    return init_linear_(model, init, seed=seed).to(device)


def article_model(use_bn: bool, *, momentum: float = 0.01, eps: float = 1e-3, dropout: float = 0.0,
                  init="glorot", seed: int = 0, device=None) -> nn.Sequential:
    """The article's network: Flatten -> Dense(128, ReLU) -> [BatchNorm] -> Dense(10).

    The BN layer sits after the ReLU, where the article's text puts it. Its defaults are Keras':
    ``momentum=0.01`` in PyTorch's convention is Keras' ``momentum=0.99``, ``eps=1e-3``. The softmax of
    Keras' ``Dense(10, activation='softmax')`` is folded into the cross-entropy (the model returns logits).
    Weights: Glorot-uniform with zero biases, like Keras' Dense.
    """
    norm_kwargs = {"momentum": momentum, "eps": eps} if use_bn else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed))
        model = mlp(784, (128,), 10, activation="relu", norm="bn" if use_bn else "none", norm_position="after",
                    dropout=dropout, **norm_kwargs)
    return init_linear_(model, init, seed=seed).to(device)


# --------------------------------------------------------------------------------------------------------
# Section 1: the article's experiment
# --------------------------------------------------------------------------------------------------------

@dataclass
class ArticleResult:
    """Per-epoch numbers as Keras' ``History.history`` reports them."""

    loss: list  # mean training loss over the epoch's mini-batches (BN in training mode)
    val_loss: list  # validation loss at the end of the epoch (BN in inference mode)
    val_accuracy: list
    history: History  # the step-level record from bnlib.lab.train.train


def validation_split(x: torch.Tensor, y: torch.Tensor, fraction: float = 0.2):
    """Keras' ``validation_split``: the *last* ``fraction`` of the samples (not shuffled) is held out.

    Returns ``(x_fit, y_fit, x_val, y_val)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a number in (0, 1), got {fraction!r}")
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels to match x, got {len(y)}")
    n_fit = int(len(x) * (1.0 - fraction))
    if n_fit < 1 or n_fit >= len(x):
        raise ValueError(f"fraction: {fraction} leaves no data on one side of a split of {len(x)} samples")
    return x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:]


def run_article_experiment(x_train: torch.Tensor, y_train: torch.Tensor, *, use_bn: bool, epochs: int = 10,
                           batch_size: int = 32, lr: float = 1e-3, validation: float = 0.2, seed: int = 0,
                           momentum: float = 0.01, eps: float = 1e-3, progress: bool = False) -> ArticleResult:
    """``model.fit(x_train, y_train, epochs=10, validation_split=0.2)`` of the article, in PyTorch.

    Adam (lr 1e-3, Keras' default), batch size 32 (Keras' default), ``epochs`` passes over the first 80% of
    ``x_train``; the last 20% is the validation set. An epoch is ``len(fit set) // batch_size`` steps (Keras
    also runs the final partial batch; with the book's 3,200 or 48,000 fit images there is none).
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    x_fit, y_fit, x_val, y_val = validation_split(x_train, y_train, validation)
    steps_per_epoch = len(x_fit) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size: {batch_size} is larger than the {len(x_fit)} training samples")
    model = article_model(use_bn, momentum=momentum, eps=eps, seed=seed, device=x_train.device)
    hist = train(model, x_fit, y_fit, steps=epochs * steps_per_epoch, batch_size=batch_size, lr=lr,
                 optimizer="adam", x_eval=x_val, y_eval=y_val, eval_every=steps_per_epoch, seed=seed,
                 progress=progress, desc="with BN" if use_bn else "without BN")
    return _article_result(hist, epochs, steps_per_epoch)


def _article_result(hist: History, epochs: int, steps_per_epoch: int) -> ArticleResult:
    loss = np.asarray(hist.train_loss, dtype=np.float64)
    per_epoch = [float(loss[e * steps_per_epoch:(e + 1) * steps_per_epoch].mean()) for e in range(epochs)]
    return ArticleResult(per_epoch, list(hist.eval_loss[1:]), list(hist.eval_acc[1:]), hist)


def run_article_experiments(x_train: torch.Tensor, y_train: torch.Tensor, *, use_bn: bool,
                            seeds: Sequence[int] = (0, 1, 2), epochs: int = 10, batch_size: int = 32,
                            lr: float = 1e-3, validation: float = 0.2, momentum: float = 0.01,
                            eps: float = 1e-3) -> List[ArticleResult]:
    """:func:`run_article_experiment` for each of ``seeds`` (initial weights and batch order), the seeds
    trained side by side as one :class:`PackedNet`: one :class:`ArticleResult` per seed, the same runs (up to
    float rounding) as separate calls, at a fraction of their cost."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    x_fit, y_fit, x_val, y_val = validation_split(x_train, y_train, validation)
    steps_per_epoch = len(x_fit) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size: {batch_size} is larger than the {len(x_fit)} training samples")
    models = [article_model(use_bn, momentum=momentum, eps=eps, seed=s, device=x_train.device) for s in seeds]
    hists = train_packed(PackedNet(models), x_fit, y_fit, seeds=seeds, steps=epochs * steps_per_epoch,
                         batch_size=batch_size, lr=lr, optimizer="adam", x_eval=x_val, y_eval=y_val,
                         eval_every=steps_per_epoch)
    return [_article_result(h, epochs, steps_per_epoch) for h in hists]


# --------------------------------------------------------------------------------------------------------
# Section 2: Ioffe & Szegedy's Figure 1
# --------------------------------------------------------------------------------------------------------

class SigmoidInputProbe:
    """A ``callback`` for :func:`bnlib.lab.train.train`: percentiles of one sigmoid's input over training.

    Every ``every`` steps (and once by :meth:`record` at step 0, if called) the probe runs the model on the
    fixed images ``x_probe`` in training mode with dropout off (so a BN layer normalizes with the statistics of
    that probe batch, as it does during training; the model's running statistics are restored afterwards) and
    records the ``q`` percentiles of the input to unit ``unit`` of the ``layer``-th ``nn.Sigmoid`` (-1: the
    last hidden layer). Given a :class:`bnlib.lab.packed.PackedNet` (as the ``callback`` of
    :func:`train_packed`), it probes the pack's network ``network``. A thin use of
    :class:`bnlib.lab.probes.ActivationProbe`.
    """

    def __init__(self, x_probe: torch.Tensor, *, unit: int = 0, layer: int = -1, every: int = 50,
                 q: Sequence[float] = (15, 50, 85), network: int = 0):
        from .probes import percentiles

        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive int, got {every!r}")
        if len(x_probe) < 2:
            raise ValueError("x_probe: expected at least 2 images (BN needs a batch)")
        if isinstance(network, bool) or not isinstance(network, int) or network < 0:
            raise ValueError(f"network: expected a non-negative int, got {network!r}")
        self.x_probe, self.unit, self.layer, self.every, self.network = x_probe, unit, layer, every, network
        self.q = torch.tensor([float(v) / 100.0 for v in q])
        self._reduce = percentiles(q, unit=unit)
        self.steps: List[int] = []
        self.percentiles: List[np.ndarray] = []

    def record(self, step: int, model: nn.Module) -> None:
        from .probes import ActivationProbe

        net = model.unpack(self.network) if isinstance(model, PackedNet) else model  # unpack returns a copy
        sigmoids = [m for m in net.modules() if isinstance(m, nn.Sigmoid)]
        if not sigmoids:
            raise ValueError("model: has no nn.Sigmoid to probe")
        probe = ActivationProbe(net, sigmoids[self.layer], what="input", reduce=self._reduce, mode="train")
        probe.capture(self.x_probe)
        self.steps.append(int(step))
        self.percentiles.append(probe.last().numpy())

    def __call__(self, step, model, xb, yb) -> None:
        if step % self.every == 0:
            self.record(step, model)

    def as_array(self) -> np.ndarray:
        """The recorded percentiles, shape ``(len(steps), len(q))``."""
        return np.stack(self.percentiles) if self.percentiles else np.zeros((0, len(self.q)))


# --------------------------------------------------------------------------------------------------------
# Section 3: learning rates, steps to a target accuracy
# --------------------------------------------------------------------------------------------------------

@dataclass
class TargetRun:
    """What :func:`steps_to_target` measured."""

    steps: Optional[int]  # first evaluation step with accuracy >= target; None if never (or diverged)
    eval_steps: list = field(default_factory=list)
    eval_acc: list = field(default_factory=list)
    diverged: bool = False

    @property
    def reached(self) -> bool:
        return self.steps is not None


class _TargetReached(Exception):
    def __init__(self, step):
        super().__init__(step)
        self.step = step


def steps_to_target(model: nn.Module, x_train, y_train, x_eval, y_eval, *, target: float, max_steps: int,
                    lr: float, batch_size: int = 60, eval_every: int = 50, seed: int = 0,
                    optimizer: str = "sgd") -> TargetRun:
    """Train ``model`` with :func:`bnlib.lab.train.train` until its accuracy on ``(x_eval, y_eval)`` first
    reaches ``target`` (checked every ``eval_every`` steps), or for ``max_steps`` steps.

    The run stops as soon as the target is reached, so fast runs are cheap. Returns a :class:`TargetRun`.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target: expected an accuracy in (0, 1], got {target!r}")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every: expected a positive int, got {eval_every!r}")
    run = TargetRun(None)
    acc0 = evaluate(model, x_eval, y_eval)[1]
    run.eval_steps.append(0)
    run.eval_acc.append(acc0)
    if acc0 >= target:
        run.steps = 0
        return run

    def check(step, model, xb, yb):
        if step % eval_every == 0:
            acc = evaluate(model, x_eval, y_eval)[1]
            run.eval_steps.append(step)
            run.eval_acc.append(acc)
            if acc >= target:
                raise _TargetReached(step)

    try:
        hist = train(model, x_train, y_train, steps=max_steps, batch_size=batch_size, lr=lr, optimizer=optimizer,
                     seed=seed, callback=check)
    except _TargetReached as done:
        run.steps = done.step
        return run
    run.diverged = hist.diverged
    return run


def target_run(history: History, target: float, *, eval_every: Optional[int] = None,
               max_steps: Optional[int] = None) -> TargetRun:
    """The :class:`TargetRun` of a run recorded in ``history`` (e.g. by :func:`train_packed`): its first
    evaluation step at which the accuracy reached ``target``, counting only evaluations at multiples of
    ``eval_every`` (if given) and at most ``max_steps`` (if given), i.e. what :func:`steps_to_target` with
    that ``max_steps`` would have reported for the same run."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target: expected an accuracy in (0, 1], got {target!r}")
    steps, accs = list(history.eval_steps), list(history.eval_acc)
    if max_steps is not None:
        keep = sum(t <= max_steps for t in steps)
        steps, accs = steps[:keep], accs[:keep]
    hit = next((t for t, a in zip(steps, accs) if a >= target and (eval_every is None or t % eval_every == 0)), None)
    n = len(steps) if hit is None else steps.index(hit) + 1
    diverged = history.diverged and hit is None and (max_steps is None or len(history.train_loss) <= max_steps)
    return TargetRun(hit, steps[:n], accs[:n], diverged)


def lr_sweep(x_train, y_train, x_eval, y_eval, *, lrs: Sequence[float], norms: Sequence[str] = ("none", "bn"),
             seeds: Sequence[int] = (0, 1, 2), target: float = 0.9, max_steps: int = 2000, batch_size: int = 60,
             eval_every: int = 50, init=0.05, hidden=(100, 100, 100), pack: bool = True,
             pack_lrs: Sequence[str] = (), progress: bool = True) -> List[dict]:
    """Steps to ``target`` test accuracy for the Figure 1 network (:func:`sigmoid_mlp`) with plain SGD, at
    every (norm, lr, seed). Each record is ``{'norm', 'lr', 'seed', 'result': TargetRun}``; the model's
    initial weights and its mini-batch order both come from ``seed``.

    ``pack=True`` trains the seeds of one (norm, lr) together as a :class:`PackedNet` (the same runs, about
    ``len(seeds)`` times cheaper on a CPU), until every seed has reached the target or ``max_steps``;
    ``pack=False`` runs :func:`steps_to_target` once per seed. The norms in ``pack_lrs`` train all their
    learning rates and seeds as one pack (one learning rate per network), until every network has reached the
    target or ``max_steps``: cheaper where most runs go to ``max_steps`` anyway, dearer where they stop early."""
    seeds, lrs = list(seeds), list(lrs)
    pack_lrs = list(pack_lrs)
    if any(norm not in norms for norm in pack_lrs):
        raise ValueError(f"pack_lrs: expected names from norms={tuple(norms)}, got {tuple(pack_lrs)}")
    if pack_lrs and not pack:
        raise ValueError("pack_lrs: needs pack=True")

    def packed(norm, rates):
        points = [(lr, s) for lr in rates for s in seeds]
        models = [sigmoid_mlp(norm, hidden=hidden, init=init, seed=s, device=x_train.device) for _, s in points]
        hists = train_packed(PackedNet(models), x_train, y_train, seeds=[s for _, s in points], steps=max_steps,
                             batch_size=batch_size, lr=rates[0] if len(rates) == 1 else [lr for lr, _ in points],
                             x_eval=x_eval, y_eval=y_eval, eval_every=eval_every, target=target)
        return {point: target_run(h, target, eval_every=eval_every) for point, h in zip(points, hists)}

    cache: Dict[str, dict] = {}

    def one(norm, lr):
        if norm in pack_lrs:
            if norm not in cache:
                cache[norm] = packed(norm, lrs)
            return [cache[norm][(lr, s)] for s in seeds]
        if not pack:
            models = [sigmoid_mlp(norm, hidden=hidden, init=init, seed=s, device=x_train.device) for s in seeds]
            return [steps_to_target(m, x_train, y_train, x_eval, y_eval, target=target, max_steps=max_steps,
                                    lr=lr, batch_size=batch_size, eval_every=eval_every, seed=s)
                    for m, s in zip(models, seeds)]
        runs = packed(norm, [lr])
        return [runs[(lr, s)] for s in seeds]

    groups = sweep(one, {"norm": list(norms), "lr": lrs}, progress=progress, desc="learning-rate sweep")
    return [{"norm": g["norm"], "lr": g["lr"], "seed": s, "result": run}
            for g in groups for s, run in zip(seeds, g["result"])]


def _median_steps(records, norm, lr) -> float:
    vals = [r["result"].steps for r in records if r["norm"] == norm and r["lr"] == lr]
    if not vals:
        raise ValueError(f"records: no runs for norm={norm!r}, lr={lr!r}")
    return float(np.median([math.inf if v is None else v for v in vals]))


def speedups(records: List[dict], *, base: str = "none", other: str = "bn") -> dict:
    """Summarize an :func:`lr_sweep`: the median steps (over seeds; ``inf`` = target not reached) of each arm
    at each learning rate, each arm's best learning rate (fewest median steps; the smaller rate on a tie),
    the speed-up ``base_best / other_best`` at the best rates and ``base / other`` at each equal rate."""
    lrs = sorted({r["lr"] for r in records})
    med = {arm: {lr: _median_steps(records, arm, lr) for lr in lrs} for arm in (base, other)}
    best = {arm: min(lrs, key=lambda lr: (med[arm][lr], lr)) for arm in (base, other)}
    at_best = med[base][best[base]] / med[other][best[other]]
    equal = {lr: med[base][lr] / med[other][lr] if math.isfinite(med[other][lr]) else math.nan for lr in lrs}
    return {"lrs": lrs, "median_steps": med, "best_lr": best,
            "best_steps": {arm: med[arm][best[arm]] for arm in (base, other)},
            "speedup_at_best": at_best, "speedup_at_equal_lr": equal}


# --------------------------------------------------------------------------------------------------------
# Section 4: initialization scale
# --------------------------------------------------------------------------------------------------------

def init_scale_sweep(x_train, y_train, x_eval, y_eval, *, scales: Sequence[float],
                     norms: Sequence[str] = ("none", "bn"), seeds: Sequence[int] = (0,), steps: int = 500,
                     lr: float = 0.5, batch_size: int = 60, hidden=(100, 100, 100),
                     progress: bool = True, **norm_kwargs) -> List[dict]:
    """Train the Figure 1 network from weights ~ N(0, scale^2) for ``steps`` SGD steps at every
    (norm, scale, seed); each record's ``result`` is the :class:`~bnlib.lab.train.History` (its
    ``final_acc`` is the accuracy on ``(x_eval, y_eval)`` at the end). All (scale, seed) networks of one
    norm share the optimizer settings, so they are trained together as one :class:`PackedNet`.
    ``norm_kwargs`` (e.g. ``eps``) go to the normalization layers."""
    seeds, scales = list(seeds), list(scales)
    points = [(scale, s) for scale in scales for s in seeds]

    def one(norm):
        kw = norm_kwargs if norm != "none" else {}
        models = [sigmoid_mlp(norm, hidden=hidden, init=scale, seed=s, device=x_train.device, **kw)
                  for scale, s in points]
        return train_packed(PackedNet(models), x_train, y_train, seeds=[s for _, s in points], steps=steps,
                            batch_size=batch_size, lr=lr, x_eval=x_eval, y_eval=y_eval, eval_every=steps)

    groups = sweep(one, {"norm": list(norms)}, progress=progress, desc="initialization sweep")
    return [{"norm": g["norm"], "scale": scale, "seed": s, "result": h}
            for g in groups for (scale, s), h in zip(points, g["result"])]


# --------------------------------------------------------------------------------------------------------
# Section 5: regularization
# --------------------------------------------------------------------------------------------------------

def generalization_gap(model: nn.Module, x_train, y_train, x_test, y_test) -> dict:
    """Loss and accuracy of ``model`` (eval mode) on the training and the test data, and the gaps
    ``acc_gap = train_acc - test_acc`` and ``loss_gap = test_loss - train_loss``."""
    train_loss, train_acc = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    return {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
            "acc_gap": train_acc - test_acc, "loss_gap": test_loss - train_loss}


def regularization_sweep(x_train, y_train, x_test, y_test, *, configs: Dict[str, tuple],
                         seeds: Sequence[int] = (0, 1, 2), steps: int = 1000, batch_size: int = 32, lr: float = 1e-3,
                         progress: bool = True) -> List[dict]:
    """Train the article's network (:func:`article_model`) with Adam in each configuration
    ``name -> (use_bn, dropout)`` and seed, and measure its :func:`generalization_gap` on
    ``(x_train, y_train)`` vs ``(x_test, y_test)``. The seeds of a configuration are trained together as a
    :class:`PackedNet`. Records: ``{'config', 'seed', 'result': dict}``."""
    seeds = list(seeds)
    for name, cfg in configs.items():
        if not (isinstance(cfg, tuple) and len(cfg) == 2):
            raise ValueError(f"configs[{name!r}]: expected a (use_bn, dropout) pair, got {cfg!r}")

    def one(config):
        use_bn, p = configs[config]
        models = [article_model(use_bn, dropout=p, seed=s, device=x_train.device) for s in seeds]
        packed = PackedNet(models)
        train_packed(packed, x_train, y_train, seeds=seeds, steps=steps, batch_size=batch_size, lr=lr,
                     optimizer="adam")
        return [generalization_gap(packed.unpack(j), x_train, y_train, x_test, y_test) for j in range(len(seeds))]

    groups = sweep(one, {"config": list(configs)}, progress=progress, desc="regularization")
    return [{"config": g["config"], "seed": s, "result": r} for g in groups for s, r in zip(seeds, g["result"])]


@torch.no_grad()
def bn_output_noise(model: nn.Module, x_example: torch.Tensor, x_pool: torch.Tensor, *, batch_size: int,
                    n_batches: int = 200, seed: int = 0) -> torch.Tensor:
    """The output of ``model`` for one fixed example when it is normalized together with ``batch_size - 1``
    other examples drawn at random from ``x_pool`` (``n_batches`` different batches).

    The model runs in training mode (batch statistics) on a copy, so its running statistics are untouched;
    dropout layers are switched off so that the only noise is the batch's. Returns ``(n_batches, outputs)``.
    """
    if not isinstance(batch_size, int) or not 2 <= batch_size <= len(x_pool) + 1:
        raise ValueError(f"batch_size: expected an int in [2, {len(x_pool) + 1}], got {batch_size!r}")
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches: expected a positive int, got {n_batches!r}")
    net = copy.deepcopy(model).train()
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    gen = generator(seed)
    x_example = x_example.reshape(1, *x_pool.shape[1:])
    outs = []
    for _ in range(n_batches):
        idx = torch.randperm(len(x_pool), generator=gen)[: batch_size - 1].to(x_pool.device)
        outs.append(net(torch.cat([x_example, x_pool[idx]]))[0])
    return torch.stack(outs).cpu()


# --------------------------------------------------------------------------------------------------------
# Section 6: depth
# --------------------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """``h + Linear(ReLU(norm(h)))``: the pre-activation residual block of He et al. (2016), for vectors."""

    def __init__(self, width: int, norm: str = "bn"):
        super().__init__()
        self.norm = make_norm(norm, width, 1)
        self.act = nn.ReLU()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return h + self.linear(self.act(self.norm(h)))


class _PackedResidualBlock(nn.Module):
    """The :class:`ResidualBlock` s of ``k`` networks as one block on ``(B, k * width)``: their norms packed
    (per-channel statistics never span two networks), one ReLU, their linears packed."""

    def __init__(self, blocks: Sequence[ResidualBlock], k: int):
        super().__init__()
        ref = blocks[0]
        self.norm = nn.Identity() if isinstance(ref.norm, nn.Identity) else _packed_norm([b.norm for b in blocks], k)
        self.act = nn.ReLU()
        self.linear = _PackedLinear([b.linear for b in blocks])

    def forward(self, h):
        return h + self.linear(self.act(self.norm(h)))


@torch.no_grad()
def _unpack_layer(dst: nn.Module, src: nn.Module, j: int) -> None:
    """Copy network ``j``'s slice of the packed layer ``src`` into the single layer ``dst``."""
    if isinstance(src, _PackedLinear):
        dst.weight.copy_(src.weight[j])
        if dst.bias is not None:
            dst.bias.copy_(src.bias[j])
        return
    if isinstance(src, _PackedResidualBlock):
        _unpack_layer(dst.norm, src.norm, j)
        _unpack_layer(dst.linear, src.linear, j)
        return
    own = dst.state_dict()
    if own:
        dst.load_state_dict({key: t.clone() if t.dim() == 0 else
                             t[j * own[key].shape[0]:(j + 1) * own[key].shape[0]].clone()
                             for key, t in src.state_dict().items()})


class ResidualPackedNet(PackedNet):
    """:class:`~bnlib.lab.packed.PackedNet` that also packs :class:`ResidualBlock` s (the networks of
    :func:`deep_mlp` with ``residual=True``): the same runs as ``k`` separate networks, up to float rounding,
    in one pass per step. ``tests/lab/test_speed.py`` checks it against the unpacked networks."""

    def _pack_layer(self, mods: Sequence[nn.Module]) -> nn.Module:
        if isinstance(mods[0], ResidualBlock):
            return _PackedResidualBlock(mods, self.k)
        return super()._pack_layer(mods)

    @torch.no_grad()
    def unpack(self, j: int) -> nn.Sequential:
        if not self.grouped:
            return super().unpack(j)
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < self.k:
            raise ValueError(f"j: expected a network index in [0, {self.k}), got {j!r}")
        param = next(self.body.parameters(), None)
        net = copy.deepcopy(self._template).to(param.device if param is not None else "cpu")
        for dst, src in zip(net, self.body):
            _unpack_layer(dst, src, j)
        net.train(self.training)
        return net


def deep_mlp(depth: int, *, width: int = 64, norm: str = "none", residual: bool = False, init="he",
             seed: int = 0, device=None) -> nn.Sequential:
    """A ReLU MLP with ``depth`` hidden layers of ``width`` units: 784 -> ``depth`` x ``width`` -> 10.

    Plain: ``Linear -> norm -> ReLU`` per layer. Residual (``residual=True``): a first ``Linear`` to the width,
    then ``depth - 1`` :class:`ResidualBlock` s, then ``norm -> ReLU`` before the classifier. Weights are
    He-initialized (:func:`init_linear_`), so a plain ReLU network keeps its activations' scale with depth.
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth: expected a positive int, got {depth!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width: expected a positive int, got {width!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed))
        if not residual:
            model = mlp(784, (width,) * depth, 10, activation="relu", norm=norm)
        else:
            layers = [nn.Flatten(), nn.Linear(784, width)]
            layers += [ResidualBlock(width, norm) for _ in range(depth - 1)]
            layers += [make_norm(norm, width, 1), nn.ReLU(), nn.Linear(width, 10)]
            model = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
    return init_linear_(model, init, seed=seed).to(device)


def gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The Frobenius norm of d(loss)/d(weight) of every ``nn.Linear`` in ``model``, input side first, for
    one cross-entropy backward pass on the batch ``(x, y)`` in training mode (gradients are not kept)."""
    was_training = model.training
    model.train()
    linears = _linears(model)
    weights = [lin.weight for lin in linears]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, weights)
    model.train(was_training)
    return np.array([g.norm().item() for g in grads])


#: The architectures of the depth experiment: name -> (norm, residual).
DEPTH_ARMS = {"plain": ("none", False), "plain + BN": ("bn", False), "residual + BN": ("bn", True),
              "residual": ("none", True)}


def depth_sweep(x_train, y_train, x_eval, y_eval, *, depths: Sequence[int],
                arms: Sequence[str] = ("plain", "plain + BN", "residual + BN"),
                steps: int = 300, lr: float = 0.02, momentum: float = 0.9, batch_size: int = 60, width: int = 64,
                seeds: Sequence[int] = (0,), progress: bool = True) -> List[dict]:
    """Train :func:`deep_mlp` (He init, SGD with momentum) for ``steps`` steps at every (arm, depth, seed);
    each record's ``result`` is the :class:`~bnlib.lab.train.History`. ``arms`` are keys of
    :data:`DEPTH_ARMS`. The seeds of one (arm, depth) train side by side (:func:`train_packed`)."""
    for arm in arms:
        if arm not in DEPTH_ARMS:
            raise ValueError(f"arms: expected names from {tuple(DEPTH_ARMS)}, got {arm!r}")

    seeds = list(seeds)

    def one(arm, depth):
        norm, residual = DEPTH_ARMS[arm]
        models = [deep_mlp(depth, width=width, norm=norm, residual=residual, seed=s, device=x_train.device)
                  for s in seeds]
        # the seeds of one (arm, depth) train side by side (residual blocks: ResidualPackedNet)
        return train_packed(ResidualPackedNet(models), x_train, y_train, seeds=seeds, steps=steps,
                            batch_size=batch_size, lr=lr, momentum=momentum, x_eval=x_eval, y_eval=y_eval,
                            eval_every=steps)

    groups = sweep(one, {"arm": list(arms), "depth": list(depths)}, progress=progress, desc="depth sweep")
    return [{"arm": g["arm"], "depth": g["depth"], "seed": s, "result": h}
            for g in groups for s, h in zip(seeds, g["result"])]


# --------------------------------------------------------------------------------------------------------
# Section 7: the interactive explorer
# --------------------------------------------------------------------------------------------------------

def explorer_run(x_train, y_train, x_eval, y_eval, *, bn: bool, lr: float, batch_size: int = 60, depth: int = 3,
                 init_scale: float = 0.05, steps: int = 300, eval_every: int = 25, seed: int = 0,
                 progress: bool = False) -> History:
    """The explorer's experiment: the Figure 1 network with ``depth`` sigmoid layers of 100 units, weights
    ~ N(0, ``init_scale``^2), with or without BN, trained by SGD for ``steps`` steps; returns the History."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth: expected a positive int, got {depth!r}")
    model = sigmoid_mlp("bn" if bn else "none", hidden=(100,) * depth, init=init_scale, seed=seed,
                        device=x_train.device)
    return train(model, x_train, y_train, steps=steps, batch_size=batch_size, lr=lr, x_eval=x_eval,
                 y_eval=y_eval, eval_every=eval_every, seed=seed, progress=progress,
                 desc=f"{'BN' if bn else 'no BN'}, lr {lr:g}")


def explorer_grid(x_train, y_train, x_eval, y_eval, *, depths: Sequence[int], lrs: Sequence[float],
                  seeds: Sequence[int] = (0, 1, 2), bns: Sequence[bool] = (False, True), batch_size: int = 60,
                  init_scale: float = 0.05, steps: int = 300, eval_every: int = 25,
                  progress: bool = True) -> List[dict]:
    """:func:`explorer_run` at every (depth, lr, bn, seed): records ``{'depth', 'lr', 'bn', 'seed', 'result'}``
    (``result`` the :class:`~bnlib.lab.train.History`), in that order. The networks of one (depth, bn) share
    their architecture, so all their learning rates and seeds train side by side as one :class:`PackedNet`
    (one learning rate per network, :func:`train_packed`): the same runs as separate calls, up to float
    rounding."""
    lrs, seeds = [float(lr) for lr in lrs], list(seeds)
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depths: expected positive ints, got {depth!r}")
    points = [(lr, s) for lr in lrs for s in seeds]

    def one(depth, bn):
        models = [sigmoid_mlp("bn" if bn else "none", hidden=(100,) * depth, init=init_scale, seed=s,
                              device=x_train.device) for _, s in points]
        return train_packed(PackedNet(models), x_train, y_train, seeds=[s for _, s in points], steps=steps,
                            batch_size=batch_size, lr=[lr for lr, _ in points], x_eval=x_eval, y_eval=y_eval,
                            eval_every=eval_every)

    groups = sweep(one, {"depth": list(depths), "bn": list(bns)}, progress=progress, desc="explorer grid")
    by_key = {(g["depth"], g["bn"]): g["result"] for g in groups}
    return [{"depth": depth, "lr": lr, "bn": bn, "seed": s, "result": by_key[(depth, bn)][points.index((lr, s))]}
            for depth in depths for lr in lrs for bn in bns for s in seeds]


def _explorer_label(bn, lr, batch_size, depth, init_scale) -> str:
    return f"{'BN' if bn else 'no BN'}, lr {lr:.3g}, batch {batch_size}, depth {depth}, init {init_scale:.0e}"


def explorer_widget(x_train, y_train, x_eval, y_eval, *, steps: int = 300, keep: int = 4, run_now: bool = True):
    """An ipywidgets panel that re-runs :func:`explorer_run` on demand (the *Run* button) and plots the test
    accuracy of the last ``keep`` runs, the newest in colour. ``run_now`` runs the default settings once, so
    the stored notebook (and the static website) shows a result. Returns the ``ipywidgets.VBox``."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    from .plotting import METHOD_COLORS

    style = {"description_width": "120px"}
    bn = W.ToggleButtons(options=[("BN on", True), ("BN off", False)], value=True, description="batch norm",
                         style=style)
    lr = W.FloatLogSlider(value=0.5, base=10, min=-3, max=1, step=0.25, description="learning rate",
                          style=style, readout_format=".3g")
    batch = W.Dropdown(options=[4, 8, 16, 32, 60, 128, 256], value=60, description="batch size", style=style)
    depth = W.Dropdown(options=[1, 2, 3, 5, 8], value=3, description="sigmoid layers", style=style)
    init = W.FloatLogSlider(value=0.05, base=10, min=-4, max=0, step=0.5, description="init std",
                            style=style, readout_format=".0e")
    button = W.Button(description="Run", button_style="primary", icon="play")
    out = W.Output()
    runs: list = []

    def draw():
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for i, (label, hist, on) in enumerate(runs):
            newest = i == len(runs) - 1
            ax.plot(hist.eval_steps, hist.eval_acc, label=label, lw=2 if newest else 1,
                    alpha=1.0 if newest else 0.45, color=METHOD_COLORS["bn" if on else "none"],
                    linestyle="-" if on else "--")
        ax.set(title="Explorer: test accuracy during training", xlabel="training step",
               ylabel="test accuracy", ylim=(0, 1))
        ax.legend(fontsize=8, loc="lower right")
        plt.show()

    def run(_=None):
        settings = dict(bn=bn.value, lr=float(lr.value), batch_size=int(batch.value), depth=int(depth.value),
                        init_scale=float(init.value))
        with out:
            out.clear_output(wait=True)
            hist = explorer_run(x_train, y_train, x_eval, y_eval, steps=steps, progress=True, **settings)
            runs.append((_explorer_label(**settings) + ("  (diverged)" if hist.diverged else ""), hist,
                         settings["bn"]))
            del runs[:-keep]
            draw()

    button.on_click(run)
    panel = W.VBox([W.HBox([W.VBox([bn, lr, batch]), W.VBox([depth, init, button])]), out])
    if run_now:
        run()
    return panel


# --------------------------------------------------------------------------------------------------------
# Seeds and censoring (issue 13): packed runs on an evaluation schedule, outcomes of a run towards a target
# --------------------------------------------------------------------------------------------------------

#: A loss that counts as exploding: twice the cross-entropy of a uniform guess over 10 classes (ln 10).
EXPLODE = 2.0 * math.log(10.0)

OUTCOMES = ("reached", "slow", "diverged")


def eval_schedule(steps: int, *, dense: int = 10, dense_until: int = 500, every: int = 50) -> List[int]:
    """The steps at which a run is evaluated: 0, every ``dense`` steps up to ``dense_until``, then every
    ``every`` steps, and the last step. Early on, where the fast runs cross their target, a step count read off
    this grid is exact to ``dense`` steps; later to ``every``."""
    for name, v in (("steps", steps), ("dense", dense), ("dense_until", dense_until), ("every", every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "dense_until" else 1):
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    grid = set(range(0, min(dense_until, steps) + 1, dense))
    grid |= set(range(dense_until - dense_until % every, steps + 1, every)) - set(range(0, dense_until))
    grid.add(steps)
    return sorted(t for t in grid if 0 <= t <= steps)


@dataclass
class Outcome:
    """Where a run towards a target accuracy ended (:func:`outcome_of`).

    ``status``: ``'reached'`` (``steps`` is the first evaluation step at or above the target), ``'diverged'``
    (its loss became non-finite or exploded: above :data:`EXPLODE` at every evaluation over ``window`` steps;
    ``at`` is the step it was declared), or ``'slow'`` (neither, within ``cap`` steps: the step count is
    censored, known only to exceed ``cap``). ``steps`` is ``None`` unless reached, so :func:`speedups` and
    :func:`bnlib.lab.train.spread` count the others as not reached."""

    status: str
    steps: Optional[int]
    cap: int
    at: Optional[int] = None

    @property
    def bound(self) -> int:
        """The step count if reached, else ``cap`` (a lower bound of it for a slow run)."""
        return self.steps if self.steps is not None else self.cap

    def __str__(self) -> str:
        if self.status == "reached":
            return f"{self.steps:,}"
        return f">{self.cap:,}" if self.status == "slow" else "diverged"


def _status(steps, losses, accs, *, target, explode, window):
    """``(status, step)`` of a run from its evaluations so far; ``(None, None)`` while it is unresolved."""
    for i, (t, loss, acc) in enumerate(zip(steps, losses, accs)):
        if target is not None and math.isfinite(loss) and acc >= target:
            return "reached", t
        if not math.isfinite(loss):
            return "diverged", t
        if t >= 2 * window:
            recent = [v for s, v in zip(steps[: i + 1], losses[: i + 1]) if s > t - window]
            if recent and all(not v <= explode for v in recent):
                return "diverged", t
    return None, None


def outcome_of(history: History, target: float, *, cap: Optional[int] = None, explode: float = EXPLODE,
               window: int = 250) -> Outcome:
    """The :class:`Outcome` of a recorded run (its evaluations, at most ``cap`` steps, default: all): reached
    ``target`` at its first evaluation at or above it; diverged when its evaluation loss became non-finite
    (or its training loss did), or stayed above ``explode`` at every evaluation of the last ``window`` steps
    (checked from step ``2 * window`` on); else slow (not reached within ``cap``)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target: expected an accuracy in (0, 1], got {target!r}")
    steps, losses, accs = list(history.eval_steps), list(history.eval_loss), list(history.eval_acc)
    if cap is None:
        cap = max(steps[-1] if steps else 0, len(history.train_loss))
    keep = sum(t <= cap for t in steps)
    status, at = _status(steps[:keep], losses[:keep], accs[:keep], target=target, explode=explode, window=window)
    if status is None and history.diverged and len(history.train_loss) <= cap:
        status, at = "diverged", len(history.train_loss)
    if status is None:
        return Outcome("slow", None, int(cap))
    return Outcome(status, at if status == "reached" else None, int(cap), at)


@dataclass
class PackedRun:
    """What :func:`packed_run` measured, one entry per network of the pack."""

    histories: List[History]  # evaluations on the schedule, training losses of every step
    pack: PackedNet
    probe_steps: List[int] = field(default_factory=list)
    probes: Optional[np.ndarray] = None  # (networks, probe steps, percentiles)
    outcomes: Optional[List[Outcome]] = None


def _last_sigmoid(pack: PackedNet) -> nn.Module:
    mods = [m for m in (pack.body if pack.grouped else pack.nets[0]).modules() if isinstance(m, nn.Sigmoid)]
    if not mods:
        raise ValueError("models: have no nn.Sigmoid to probe")
    return mods[-1]


@torch.no_grad()
def _probe_pack(pack: PackedNet, x_probe: torch.Tensor, unit: int, q: torch.Tensor) -> np.ndarray:
    """``(k, len(q))``: the ``q`` quantiles over ``x_probe`` of the input of unit ``unit`` of the last sigmoid of
    every network, in training mode (BN normalizes with the probe batch's statistics; running statistics are
    restored)."""
    if not pack.grouped:
        out = []
        for j in range(pack.k):
            probe = SigmoidInputProbe(x_probe, unit=unit, q=[float(v) * 100 for v in q], network=j)
            probe.record(0, pack)
            out.append(probe.percentiles[0])
        return np.stack(out)
    saved = {name: b.clone() for name, b in pack.named_buffers()}
    captured = {}
    handle = _last_sigmoid(pack).register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    was_training = pack.training
    try:
        pack.train()
        pack(x_probe.unsqueeze(1).expand(len(x_probe), pack.k, *x_probe.shape[1:]))
    finally:
        handle.remove()
        pack.train(was_training)
        for name, b in pack.named_buffers():
            b.copy_(saved[name])
    x = captured["x"].reshape(len(x_probe), pack.k, -1)[:, :, unit].cpu()  # (B, k)
    return torch.quantile(x.double(), q.double(), dim=0).t().numpy()


def packed_run(models: Sequence[nn.Sequential], x_train, y_train, x_eval, y_eval, *, seeds: Sequence[int], lr,
               steps: int, eval_at: Optional[Sequence[int]] = None, batch_size: int = 60,
               optimizer: str = "sgd", momentum: float = 0.0, target: Optional[float] = None,
               stop_when_resolved: bool = False, min_steps: int = 0, explode: float = EXPLODE, window: int = 250,
               x_probe: Optional[torch.Tensor] = None, probe_every: int = 50, unit: int = 0,
               q: Sequence[float] = (15, 50, 85), pack: bool = True) -> PackedRun:
    """Train ``models`` (network ``j`` from ``seeds[j]``'s batches, learning rate ``lr`` or ``lr[j]``) side by
    side as one :class:`PackedNet` with :func:`train_packed`, evaluating every network on ``(x_eval, y_eval)``
    at the steps ``eval_at`` (default :func:`eval_schedule`) and, with ``x_probe``, recording the ``q``
    percentiles of the input of unit ``unit`` of each network's last sigmoid every ``probe_every`` steps.

    With ``target``, each network's :class:`Outcome` (:func:`outcome_of` with ``cap=steps``) is returned too, and
    ``stop_when_resolved`` ends training at the first evaluation (at or after ``min_steps``) at which every
    network has reached the target or diverged: the same outcomes, without training the decided runs on."""
    models = list(models)
    k = len(models)
    schedule = sorted({int(t) for t in (eval_schedule(steps) if eval_at is None else eval_at) if 0 <= t <= steps}
                      | {0, steps})
    at = set(schedule)
    packed = PackedNet(models, seeds=seeds, pack=pack)
    ev_steps, ev_loss, ev_acc = [], [], []
    probe_steps, probe_vals = [], []
    qt = torch.tensor([float(v) / 100.0 for v in q])

    def measure(t):
        losses, accs = evaluate_packed(packed, x_eval, y_eval)
        ev_steps.append(t)
        ev_loss.append(losses)
        ev_acc.append(accs)

    def probe(t):
        probe_steps.append(t)
        probe_vals.append(_probe_pack(packed, x_probe, unit, qt))

    def resolved() -> bool:
        L, A = np.array(ev_loss), np.array(ev_acc)
        return all(_status(ev_steps, list(L[:, j]), list(A[:, j]), target=target, explode=explode,
                           window=window)[0] is not None for j in range(k))

    def callback(t, model, xb, yb):
        if x_probe is not None and t % probe_every == 0:
            probe(t)
        if t in at:
            measure(t)
            if stop_when_resolved and target is not None and t >= min_steps and t < steps and resolved():
                raise StopTraining

    measure(0)
    if x_probe is not None:
        probe(0)
    hists = train_packed(packed, x_train, y_train, seeds=list(seeds), steps=steps, batch_size=batch_size, lr=lr,
                         optimizer=optimizer, momentum=momentum, callback=callback)
    L, A = np.array(ev_loss), np.array(ev_acc)
    for j, h in enumerate(hists):
        h.eval_steps = list(ev_steps)
        h.eval_loss = [float(v) for v in L[:, j]]
        h.eval_acc = [float(v) for v in A[:, j]]
    result = PackedRun(hists, packed, probe_steps,
                       np.stack(probe_vals, 1) if probe_vals else None)
    if target is not None:
        result.outcomes = [outcome_of(h, target, cap=steps, explode=explode, window=window) for h in hists]
    return result


def figure1_runs(x_train, y_train, x_eval, y_eval, *, norm: str, seeds: Sequence[int], steps: int = 2500,
                 lr: float = 1.0, batch_size: int = 60, init=0.05, eval_at: Optional[Sequence[int]] = None,
                 x_probe: Optional[torch.Tensor] = None, probe_every: int = 50, unit: int = 0) -> PackedRun:
    """Ioffe & Szegedy's Figure 1 for several seeds: :func:`sigmoid_mlp` (``norm``, weights ~ N(0, init^2))
    from each seed, trained side by side by :func:`packed_run` (SGD, ``lr``, batch ``batch_size``), evaluated
    on the schedule ``eval_at`` (default :func:`eval_schedule`), the input of unit ``unit`` of each network's
    last sigmoid probed on ``x_probe`` every ``probe_every`` steps."""
    models = [sigmoid_mlp(norm, init=init, seed=s, device=x_train.device) for s in seeds]
    return packed_run(models, x_train, y_train, x_eval, y_eval, seeds=seeds, lr=lr, steps=steps, eval_at=eval_at,
                      batch_size=batch_size, x_probe=x_probe, probe_every=probe_every, unit=unit)


def percentile_drift(steps: Sequence[int], percentiles: np.ndarray, *, start: int = 500) -> float:
    """How far the median of a probed input wanders after step ``start``: (max - min) of the 50th percentile
    over the probes at steps >= ``start``, in units of the mean 15-85 spread. ``percentiles``: ``(steps, 3)``
    (15th, 50th, 85th)."""
    P, t = np.asarray(percentiles, dtype=float), np.asarray(steps)
    if P.ndim != 2 or P.shape[1] != 3 or len(P) != len(t):
        raise ValueError(f"percentiles: expected shape ({len(t)}, 3), got {P.shape}")
    P = P[t >= start]
    if len(P) < 2:
        raise ValueError(f"steps: expected at least two probes at or after step {start}")
    return float((P[:, 1].max() - P[:, 1].min()) / np.mean(P[:, 2] - P[:, 0]))


def lr_outcomes(x_train, y_train, x_eval, y_eval, *, norm: str, lrs: Sequence[float], seeds: Sequence[int],
                cap: int, target: float = 0.9, packs: Optional[Sequence[Sequence[float]]] = None,
                eval_at: Optional[Sequence[int]] = None, batch_size: int = 60, init=0.05,
                explode: float = EXPLODE, window: int = 250, min_steps: int = 0) -> List[dict]:
    """The :class:`Outcome` of the Figure 1 network (``norm``) towards ``target`` at every (lr, seed), within
    ``cap`` SGD steps: records ``{'norm', 'lr', 'seed', 'result': Outcome, 'history': History}`` in (lr, seed)
    order. ``packs`` groups the learning rates that train side by side (default: one pack per rate); a pack
    stops once each of its networks has reached the target or diverged, so a group of rates that all resolve
    early is cheap, and slow runs (censored at ``cap``) are best packed together. ``min_steps``: no pack stops
    before it (so the runs can be shown up to it, e.g. in the explorer)."""
    lrs, seeds = [float(v) for v in lrs], list(seeds)
    packs = [[float(v) for v in p] for p in (packs if packs is not None else [[lr] for lr in lrs])]
    if sorted(v for p in packs for v in p) != sorted(lrs):
        raise ValueError(f"packs: expected a partition of lrs={lrs}, got {packs}")
    found = {}
    for rates in packs:
        points = [(lr, s) for lr in rates for s in seeds]
        models = [sigmoid_mlp(norm, init=init, seed=s, device=x_train.device) for _, s in points]
        res = packed_run(models, x_train, y_train, x_eval, y_eval, seeds=[s for _, s in points],
                         lr=[lr for lr, _ in points] if len(rates) > 1 else rates[0], steps=cap, eval_at=eval_at,
                         batch_size=batch_size, target=target, stop_when_resolved=True, explode=explode,
                         window=window, min_steps=min_steps)
        for point, h, o in zip(points, res.histories, res.outcomes):
            found[point] = (o, h)
    return [{"norm": norm, "lr": lr, "seed": s, "result": found[(lr, s)][0], "history": found[(lr, s)][1]}
            for lr in lrs for s in seeds]


def outcome_summary(outcomes: Sequence[Outcome]) -> str:
    """One table cell for the runs of one setting: ``'150 [130, 170]'`` (median [min, max] of the step counts,
    a slow run counted as ``>cap``), ``'slow: >2,500'``, ``'diverged'``, or a mix such as
    ``'1,900 [1,700, >2,500]'`` and ``'2 diverged, 1 slow'``."""
    outcomes = list(outcomes)
    if not outcomes:
        raise ValueError("outcomes: expected at least one")
    n_div = sum(o.status == "diverged" for o in outcomes)
    rest = [o for o in outcomes if o.status != "diverged"]
    if not rest:
        return "diverged" if n_div == len(outcomes) else f"{n_div} diverged"
    if all(o.status == "slow" for o in rest):
        cell = f"slow: >{rest[0].cap:,}"
    else:
        vals = sorted(float(o.steps) if o.status == "reached" else math.inf for o in rest)
        mid = len(vals) // 2
        med = vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])

        def show(v):
            return f">{rest[0].cap:,}" if math.isinf(v) else f"{v:,.0f}"

        cell = f"{show(med)} [{show(vals[0])}, {show(vals[-1])}]"
    return cell + (f", {n_div} diverged" if n_div else "")


def history_until(history: History, steps: int, *, every: Optional[int] = None) -> History:
    """A copy of ``history`` cut at step ``steps``: its first ``steps`` training losses and its evaluations at
    steps <= ``steps`` (only those at multiples of ``every``, if given), e.g. to show a longer run on the
    300-step grid of the explorer."""
    keep = [i for i, t in enumerate(history.eval_steps) if t <= steps and (every is None or t % every == 0)]
    return History(list(history.train_loss[:steps]), [history.eval_steps[i] for i in keep],
                   [history.eval_loss[i] for i in keep], [history.eval_acc[i] for i in keep],
                   history.diverged and len(history.train_loss) <= steps)
