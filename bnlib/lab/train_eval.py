r"""Train vs eval: running statistics, framework conventions and the pitfalls of chapter 7.

Running statistics
    In training a batch norm normalizes with the statistics of the current batch and keeps an exponential
    moving average (EMA) of them for evaluation. PyTorch and Keras write the same average with opposite
    meanings of "momentum" and different variance estimators:

    ==========  ===========================================  ==========  =====  ======================
    convention  update                                       momentum    eps    running variance
    ==========  ===========================================  ==========  =====  ======================
    pytorch     ``r = (1 - m) r + m b``                      0.1         1e-5   unbiased, n/(n-1)
    keras       ``r = m r + (1 - m) b``                      0.99        1e-3   biased (no correction)
    ==========  ===========================================  ==========  =====  ======================

    :func:`ema_update` (one update) / :func:`running_stats_trajectory` follow both on plain tensors, through
    the one implementation of the two conventions, :func:`bnlib.torch.functional.batch_norm`'s ``convention``
    (a Keras layer is ``bnlib.torch.BatchNorm1d(C, momentum=0.99, eps=1e-3, convention='keras')``).

Evaluation helpers
    :func:`predict` (eval or train mode, with the running statistics protected), :func:`accuracy`,
    :func:`prediction_flip_rate` (how much train-mode predictions depend on the rest of the batch).

Fixes
    :func:`recalibrate_bn` ("precise BN": recompute the running statistics of a trained model as an exact
    average over many batches), :func:`inference_example_weighing` (Summers & Dinneen 2020: mix each
    example's own statistics into the population statistics); batch renormalization's warm-up schedule is an
    option of the layer itself (``bnlib.torch.BatchRenorm2d(..., schedule=bnlib.torch.RenormSchedule(...))``).

Non-i.i.d. batches
    :func:`class_sorted_batches` (each batch drawn from a few classes only), :func:`iid_batches`, and
    :func:`train_on_batches`, which trains on a given list of index batches in that order (with
    :func:`bnlib.lab.train.run`, the book's one loop).

Arguments are checked with :mod:`bnlib._checks` (its one message shape, ``"<name>: expected <what>, got
<value>"``: ``TypeError`` for a wrong type, ``ValueError`` for a wrong value).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import _checks
from .._setup import generator
from .report import judge_conditions  # noqa: F401 (re-exported: chapters 6 and 7 read it from here)

__all__ = [
    "CONVENTIONS",
    "to_torch_momentum",
    "to_keras_momentum",
    "ema_update",
    "running_stats_trajectory",
    "ema_lag",
    "ema_half_life",
    "ema_noise_ratio",
    "bn_layers",
    "set_bn_momentum",
    "predict",
    "accuracy",
    "prediction_flip_rate",
    "recalibrate_bn",
    "inference_example_weighing",
    "class_sorted_batches",
    "iid_batches",
    "train_on_batches",
    "judge_conditions",
]

#: The defaults of the two frameworks (``momentum`` in each framework's own meaning).
CONVENTIONS = {
    "pytorch": {"momentum": 0.1, "eps": 1e-5, "running_var": "unbiased"},
    "keras": {"momentum": 0.99, "eps": 1e-3, "running_var": "biased"},
}


# --------------------------------------------------------------------------------------------------------
# Argument checks bnlib._checks has no rule for (same message shape and exception types)
def _check_labels(x, y) -> None:
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels to match x, got {len(y)}")


# --------------------------------------------------------------------------------------------------------
# Momentum conventions


def to_torch_momentum(keras_momentum: float) -> float:
    """PyTorch's ``momentum`` (weight of the new batch) for Keras' ``momentum`` (weight of the old average):
    ``1 - keras_momentum``. Keras' default 0.99 is PyTorch's 0.01, PyTorch's 0.1 is Keras' 0.9."""
    return 1.0 - _checks.check_real("keras_momentum", keras_momentum, 0.0, 1.0)


def to_keras_momentum(torch_momentum: float) -> float:
    """Keras' ``momentum`` for PyTorch's: ``1 - torch_momentum``."""
    return 1.0 - _checks.check_real("torch_momentum", torch_momentum, 0.0, 1.0)


def ema_update(running_mean: torch.Tensor, running_var: torch.Tensor, x: torch.Tensor, *,
               convention: str = "pytorch", momentum: Optional[float] = None):
    """One exponential-moving-average update of the running statistics by the batch ``x`` (``(N, C, *)``), as
    the framework of ``convention`` does it: a training-mode :func:`bnlib.torch.functional.batch_norm` call on
    copies of the statistics (the one implementation of both conventions), for the chapter's comparisons.

    ``momentum`` is in the convention's own meaning (default: its default). Returns new tensors
    ``(running_mean, running_var)``; the inputs are not changed.

    - pytorch: ``r = (1 - m) r + m b`` with the unbiased batch variance ``n/(n-1) var_B``;
    - keras:   ``r = m r + (1 - m) b`` with the biased batch variance ``var_B``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {tuple(CONVENTIONS)}, got {convention!r}")
    m = _checks.check_momentum(momentum)
    if m is None:
        m = CONVENTIONS[convention]["momentum"]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    rm, rv = running_mean.clone(), running_var.clone()
    with torch.no_grad():
        _bt().functional.batch_norm(x, rm, rv, training=True, momentum=m, eps=CONVENTIONS[convention]["eps"],
                                    convention="torch" if convention == "pytorch" else "keras")
    return rm, rv


def running_stats_trajectory(batches: Iterable[torch.Tensor], *, convention: str = "pytorch",
                             momentum: Optional[float] = None, num_features: Optional[int] = None):
    """Running mean and variance after each batch, starting from PyTorch's and Keras' initial values
    (mean 0, variance 1). Returns NumPy arrays ``(means, variances)`` of shape ``(T + 1, C)``."""
    means, variances = [], []
    rm = rv = None
    for x in batches:
        if rm is None:
            c = x.shape[1] if num_features is None else num_features
            rm = torch.zeros(c, dtype=torch.float64)
            rv = torch.ones(c, dtype=torch.float64)
            means.append(rm.numpy().copy())
            variances.append(rv.numpy().copy())
        rm, rv = ema_update(rm, rv, x.to(torch.float64), convention=convention, momentum=momentum)
        means.append(rm.numpy().copy())
        variances.append(rv.numpy().copy())
    if rm is None:
        raise ValueError("batches: expected at least one batch, got none")
    return np.stack(means), np.stack(variances)


def ema_lag(torch_momentum: float, fraction: float = 0.9) -> int:
    """Steps an EMA with PyTorch momentum ``alpha`` needs to cover ``fraction`` of a step change:
    the smallest k with ``1 - (1 - alpha)^k >= fraction``."""
    a = _checks.check_real("torch_momentum", torch_momentum, 0.0, 1.0, open_low=True)
    f = _checks.check_real("fraction", fraction, 0.0, 1.0, open_low=True, open_high=True)
    if a == 1.0:
        return 1
    return max(1, math.ceil(math.log(1 - f) / math.log(1 - a) - 1e-12))


def ema_half_life(torch_momentum: float) -> float:
    """Number of steps after which a batch's weight in the EMA has halved: ``ln 2 / -ln(1 - alpha)``."""
    a = _checks.check_real("torch_momentum", torch_momentum, 0.0, 1.0, open_low=True, open_high=True)
    return math.log(2) / -math.log(1 - a)


def ema_noise_ratio(torch_momentum: float) -> float:
    """Standard deviation of the EMA of i.i.d. batch statistics over their own standard deviation, in the
    steady state: ``sqrt(alpha / (2 - alpha))`` (0.23 for PyTorch's 0.1, 0.071 for Keras' 0.99)."""
    a = _checks.check_real("torch_momentum", torch_momentum, 0.0, 1.0, open_low=True)
    return math.sqrt(a / (2 - a))


# --------------------------------------------------------------------------------------------------------
def _bt():
    from .. import torch as bt

    return bt


# --------------------------------------------------------------------------------------------------------
def _bn_types():
    types = [nn.modules.batchnorm._BatchNorm]
    try:
        types.append(_bt()._BatchNorm)
    except ImportError:  # pragma: no cover - bnlib.torch always ships with bnlib
        pass
    return tuple(types)


def bn_layers(model: nn.Module):
    """``[(name, module)]`` of the batch norms in ``model`` that keep running statistics (torch.nn's,
    bnlib's -- including batch renorm, ghost, batch-layer norm and Keras-convention layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    types = _bn_types()
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, types) and getattr(m, "running_mean", None) is not None]


def set_bn_momentum(model: nn.Module, momentum: Optional[float]) -> None:
    """Set the (PyTorch-convention) ``momentum`` of every batch norm in ``model`` (``None``: cumulative)."""
    _checks.check_momentum(momentum)
    for _, m in bn_layers(model):
        m.momentum = momentum


def _buffers_snapshot(model: nn.Module):
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _restore_buffers(model: nn.Module, snap) -> None:
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in snap:
                b.copy_(snap[n])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000, train_mode: bool = False,
            order: Optional[torch.Tensor] = None, keep_running_stats: bool = True) -> torch.Tensor:
    """Predicted classes of ``model`` for ``x``, computed in batches of ``batch_size`` taken in ``order``
    (default: as given) and returned in the order of ``x``.

    ``train_mode=True`` evaluates the way a forgotten ``model.eval()`` does: every batch norm normalizes
    with the statistics of the batch the example happens to be in. With ``keep_running_stats`` (default)
    the running statistics are restored afterwards, so the measurement has no side effect; pass ``False``
    to see the side effect. The model's mode is restored in every case.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    n = len(x)
    if order is None:
        order = torch.arange(n)
    else:
        order = torch.as_tensor(order, dtype=torch.long)
        if order.shape != (n,) or not torch.equal(torch.sort(order.cpu()).values, torch.arange(n)):
            raise ValueError(f"order: expected a permutation of range({n})")
    was_training = model.training
    snap = _buffers_snapshot(model) if (train_mode and keep_running_stats) else None
    model.train(train_mode)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    try:
        order = order.to(x.device)
        for i in range(0, n, batch_size):
            idx = order[i: i + batch_size]
            out[idx] = model(x[idx]).argmax(1)
    finally:
        if snap is not None:
            _restore_buffers(model, snap)
        model.train(was_training)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> float:
    """Fraction of ``x`` that :func:`predict` (same keyword arguments) classifies as ``y``."""
    _check_labels(x, y)
    return (predict(model, x, **kwargs) == y).float().mean().item()


def prediction_flip_rate(model: nn.Module, x: torch.Tensor, *, batch_size: int, repeats: int = 5,
                         seed: int = 0) -> float:
    """In train mode, the fraction of examples whose predicted class is not the same in ``repeats``
    random batchings (each example lands among different companions). 0 in eval mode by construction."""
    _checks.check_int("repeats", repeats, 2)
    gen = generator(seed)
    preds = torch.stack([predict(model, x, batch_size=batch_size, train_mode=True,
                                 order=torch.randperm(len(x), generator=gen)) for _ in range(repeats)])
    return (preds != preds[0]).any(0).float().mean().item()


# --------------------------------------------------------------------------------------------------------
def _iter_batches(data, batch_size: int, num_batches: Optional[int], seed: int, device):
    if isinstance(data, torch.Tensor):
        n = len(data)
        if batch_size > n:
            raise ValueError(f"batch_size: expected at most the {n} examples of data, got {batch_size}")
        gen = generator(seed)
        per_epoch = n // batch_size
        total = per_epoch if num_batches is None else num_batches
        done = 0
        while done < total:
            perm = torch.randperm(n, generator=gen).to(data.device)
            for i in range(min(per_epoch, total - done)):
                yield data[perm[i * batch_size: (i + 1) * batch_size]]
                done += 1
        return
    for k, item in enumerate(data):
        if num_batches is not None and k >= num_batches:
            return
        xb = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(xb, torch.Tensor):
            raise TypeError(f"data: expected batches of tensors (or (x, y) pairs), got {type(xb).__name__}")
        yield xb if device is None else xb.to(device)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, *, batch_size: int = 256, num_batches: Optional[int] = None,
                   seed: int = 0, device=None) -> nn.Module:
    """"Precise BN": replace every batch norm's running statistics by the exact average over batches of
    ``data``, computed with the model's current weights.

    ``data`` is a tensor of inputs (shuffled with ``seed`` into batches of ``batch_size``; ``num_batches``
    of them, default one epoch without the incomplete last batch) or an iterable of batches (tensors or
    ``(x, y)`` pairs, e.g. a DataLoader; ``num_batches`` caps how many are used). Every batch norm is reset
    and run with ``momentum=None`` (PyTorch's cumulative average) in train mode while every other module
    (dropout, ...) stays in eval mode; momenta and modes are restored afterwards. The mean of the per-batch
    means is the population mean; the mean of the per-batch unbiased variances is an unbiased estimate of
    the within-batch variance. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    if num_batches is not None:
        _checks.check_positive_int("num_batches", num_batches)
    if isinstance(data, torch.Tensor):
        if len(data) < batch_size:
            raise ValueError(f"batch_size: expected at most the {len(data)} examples of data, got {batch_size}")
    elif not hasattr(data, "__iter__"):
        raise TypeError(f"data: expected a tensor or an iterable of batches, got {type(data).__name__}")
    layers = [m for _, m in bn_layers(model)]
    if not layers:
        raise ValueError("model: has no batch norm layer with running statistics to recalibrate")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    snap = _buffers_snapshot(model)
    ok = False
    try:
        model.eval()
        for m in layers:
            if getattr(m, "convention", "torch") != "torch":
                raise TypeError("model: recalibrate_bn supports PyTorch-convention batch norms only, found a "
                                f"{type(m).__name__} with convention={m.convention!r}")
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        for xb in _iter_batches(data, batch_size, num_batches, seed, device):
            model(xb)
            seen += 1
        if seen == 0:
            raise ValueError("data: yielded no batch")
        ok = True
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
        if not ok:
            _restore_buffers(model, snap)
    return model


# --------------------------------------------------------------------------------------------------------
def _plain_bn_types():
    bt = _bt()
    return (nn.modules.batchnorm._BatchNorm, bt._BatchNorm)


def _example_weighing_hook(alpha: float):
    def hook(module, inputs, output):
        if module.training:
            return None
        x = inputs[0]
        dims = list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        rm = module.running_mean.reshape(shape)
        rv = module.running_var.reshape(shape)
        if dims:
            mu_i = x.mean(dims, keepdim=True)
            var_i = x.var(dims, unbiased=False, keepdim=True)
        else:  # one value per example and channel: its own mean, zero spread
            mu_i, var_i = x, torch.zeros_like(x)
        mu = alpha * mu_i + (1 - alpha) * rm
        var = alpha * var_i + (1 - alpha) * rv + alpha * (1 - alpha) * (mu_i - rm) ** 2
        y = (x - mu) * torch.rsqrt(var + module.eps)
        if module.weight is not None:
            y = y * module.weight.reshape(shape)
        if module.bias is not None:
            y = y + module.bias.reshape(shape)
        return y

    return hook


@contextlib.contextmanager
def inference_example_weighing(model: nn.Module, alpha: float):
    r"""Inside the ``with`` block, every batch norm of ``model`` in eval mode normalizes each example with a
    mixture of its own statistics (weight ``alpha``) and the running ones (weight ``1 - alpha``):

    .. math::
        \mu = \alpha\mu_i + (1-\alpha)\mu_{pop}, \quad
        \sigma^2 = \alpha\sigma_i^2 + (1-\alpha)\sigma_{pop}^2 + \alpha(1-\alpha)(\mu_i - \mu_{pop})^2,

    the mean and variance of a batch in which the example has weight ``alpha`` and the population the rest
    -- as in training, where an example is ``1/B`` of its batch (Summers & Dinneen 2020, "inference example
    weighing"; ``alpha = 1/B`` mimics a training batch of size B). ``mu_i, sigma_i^2`` are over the spatial
    positions of the example (for ``(N, C)`` input: the value itself and 0). ``alpha = 0`` is plain
    inference. Layers in train mode are untouched.
    """
    alpha = _checks.check_real("alpha", alpha, 0.0, 1.0)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    types = _plain_bn_types()
    handles = [m.register_forward_hook(_example_weighing_hook(alpha))
               for _, m in bn_layers(model) if isinstance(m, types)]
    if not handles:
        raise ValueError("model: has no batch norm layer with running statistics")
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------
def class_sorted_batches(y: torch.Tensor, batch_size: int, *, num_batches: int, classes_per_batch: int = 1,
                         seed: int = 0):
    """``num_batches`` index batches, each drawn from ``classes_per_batch`` random classes only, with
    ``batch_size / classes_per_batch`` examples of each (a non-i.i.d. sampler: what a data set stored sorted
    by class gives without shuffling). Examples of a class are used in a fresh random order, cycling."""
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    y = torch.as_tensor(y).cpu()
    classes = torch.unique(y)
    _checks.check_int("classes_per_batch", classes_per_batch, 1, len(classes))
    if batch_size % classes_per_batch:
        raise ValueError(f"batch_size: expected a multiple of classes_per_batch={classes_per_batch}, got "
                         f"{batch_size}")
    _checks.check_positive_int("num_batches", num_batches)
    per_class = batch_size // classes_per_batch
    gen = generator(seed)
    pools = {int(c): torch.nonzero(y == c).flatten() for c in classes}
    for c, pool in pools.items():
        if len(pool) < per_class:
            raise ValueError(f"batch_size: class {c} has {len(pool)} examples, fewer than the {per_class} a "
                             "batch needs")
    orders = {c: p[torch.randperm(len(p), generator=gen)] for c, p in pools.items()}
    pos = {c: 0 for c in pools}
    batches = []
    for _ in range(num_batches):
        chosen = classes[torch.randperm(len(classes), generator=gen)[:classes_per_batch]]
        parts = []
        for c in chosen.tolist():
            if pos[c] + per_class > len(orders[c]):
                orders[c] = pools[c][torch.randperm(len(pools[c]), generator=gen)]
                pos[c] = 0
            parts.append(orders[c][pos[c]: pos[c] + per_class])
            pos[c] += per_class
        batches.append(torch.cat(parts))
    return batches


def iid_batches(n: int, batch_size: int, *, num_batches: int, seed: int = 0):
    """``num_batches`` index batches of ``batch_size`` from a fresh random permutation of ``range(n)`` each
    epoch (what :func:`bnlib.lab.train.train` samples)."""
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    _checks.check_int("n", n, batch_size)
    _checks.check_positive_int("num_batches", num_batches)
    gen = generator(seed)
    order, pos, out = torch.randperm(n, generator=gen), 0, []
    for _ in range(num_batches):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        out.append(order[pos: pos + batch_size])
        pos += batch_size
    return out


def train_on_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: Sequence[torch.Tensor], *,
                     lr: float, optimizer: str = "sgd", momentum: float = 0.0,
                     callback: Optional[Callable] = None, progress: bool = False, desc: str = "train"):
    """Train ``model`` with cross-entropy, one optimizer step per index batch in ``batches`` (in that order).

    ``callback(step, model)`` runs *before* step ``step`` (1-based), e.g. to record a layer's state:
    :func:`bnlib.lab.train.train`'s ``before_step`` hook (a callable or a list of them; one may
    raise :class:`bnlib.lab.train.StopTraining`). Returns the list of training losses; training stops after
    a non-finite loss.

    It is :func:`bnlib.lab.train.train` with a ``sampler`` that gives batch ``step - 1`` of ``batches`` instead
    of the loop's own shuffled batches.
    """
    from .train import as_hooks, train

    callback = as_hooks("callback", callback)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_labels(x, y)
    if len(batches) == 0:
        raise ValueError("batches: expected at least one index batch, got none")
    batch = max(len(b) for b in batches)  # (only checked against len(x): the sampler gives each step's batch)
    hist = train(model, x, y, steps=len(batches), batch_size=min(batch, len(x)), lr=lr, optimizer=optimizer,
                 momentum=momentum, before_step=callback, sampler=lambda t: batches[t - 1], progress=progress,
                 desc=desc)
    return hist.train_loss
