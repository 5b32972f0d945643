"""The training loop, evaluation and metrics the chapters share.

One loop serves every experiment in the book so that differences between runs come from the model, never from
the loop. It is deliberately plain: seeded mini-batch sampling (a fresh permutation each epoch), an optimizer
step per batch, periodic evaluation, and an optional ``callback`` for measurements taken during training.

>>> data = bnlib.data.load_mnist()
>>> xtr, ytr, xte, yte = to_tensors(data, device)
>>> hist = train(bnlib.models.mlp(norm="bn"), xtr, ytr, steps=500, batch_size=60, lr=0.5,
...              x_eval=xte, y_eval=yte, eval_every=50, device=device)
>>> steps_to_accuracy(hist, 0.9)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from ._setup import generator

__all__ = ["History", "to_tensors", "make_optimizer", "evaluate", "train", "steps_to_accuracy"]


@dataclass
class History:
    """What :func:`train` measured: the loss of every training step and the periodic evaluations."""

    train_loss: list = field(default_factory=list)  # one entry per step
    eval_steps: list = field(default_factory=list)  # steps at which the model was evaluated
    eval_loss: list = field(default_factory=list)
    eval_acc: list = field(default_factory=list)
    diverged: bool = False  # True when the training loss became NaN/inf (training stops there)

    @property
    def final_acc(self) -> float:
        return self.eval_acc[-1] if self.eval_acc else float("nan")

    def smoothed_train_loss(self, window: int = 50) -> np.ndarray:
        """Moving average of the training loss (valid part only)."""
        loss = np.asarray(self.train_loss, dtype=np.float64)
        if len(loss) < window:
            return loss
        return np.convolve(loss, np.ones(window) / window, mode="valid")


def to_tensors(dataset, device=None, *, flatten: bool = False, channel_dim: bool = True):
    """(x_train, y_train, x_test, y_test) as tensors on ``device``; images get a channel dim (N, 1, H, W)
    unless ``flatten`` (N, H*W) or ``channel_dim=False``."""
    out = []
    for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)):
        x = torch.as_tensor(x, dtype=torch.float32)
        if flatten:
            x = x.reshape(len(x), -1)
        elif channel_dim:
            x = x.unsqueeze(1)
        out += [x.to(device), torch.as_tensor(y, dtype=torch.int64).to(device)]
    return tuple(out)


def make_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.1, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """'sgd' (with optional momentum) or 'adam'."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"name: expected 'sgd' or 'adam', got {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000):
    """(mean cross-entropy, accuracy) of ``model`` in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i: i + batch_size])
        total_loss += F.cross_entropy(logits, y[i: i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i: i + batch_size]).sum().item()
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


def train(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    optimizer: str | torch.optim.Optimizer = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    x_eval: Optional[torch.Tensor] = None,
    y_eval: Optional[torch.Tensor] = None,
    eval_every: int = 100,
    seed: int = 0,
    callback: Optional[Callable] = None,
    progress: bool = False,
    desc: str = "train",
) -> History:
    """Train ``model`` with cross-entropy for ``steps`` mini-batch steps and return the :class:`History`.

    Batches are drawn without replacement from a permutation of the training set, re-shuffled every epoch by a
    ``torch.Generator`` seeded with ``seed`` (so a run is reproducible). ``callback(step, model, xb, yb)`` is
    called after each optimizer step. Evaluation (on ``x_eval``/``y_eval``) happens at step 0, every
    ``eval_every`` steps and at the end. Training stops early, with ``history.diverged = True``, if the loss
    becomes NaN or infinite.
    """
    _checks.check_training_run(len(x_train), len(y_train), steps, batch_size)
    if (x_eval is None) != (y_eval is None):
        raise ValueError("x_eval, y_eval: give both or neither")
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(
        model, optimizer, lr, momentum, weight_decay)
    gen = generator(seed)
    hist = History()
    n = len(x_train)

    def _eval(step):
        if x_eval is not None:
            loss, acc = evaluate(model, x_eval, y_eval)
            hist.eval_steps.append(step)
            hist.eval_loss.append(loss)
            hist.eval_acc.append(acc)

    model.train()
    _eval(0)
    order, pos = torch.randperm(n, generator=gen), 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False, mininterval=1.0)  # redraws are front-end messages
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos: pos + batch_size].to(x_train.device)
        pos += batch_size
        xb, yb = x_train[idx], y_train[idx]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        hist.train_loss.append(value)
        if callback is not None:
            callback(step, model, xb, yb)
        if bar is not None:
            bar.update(1)
        if not math.isfinite(value):
            hist.diverged = True
            break
        if step % eval_every == 0 or step == steps:
            _eval(step)
    if bar is not None:
        bar.close()
    return hist


def steps_to_accuracy(history: History, target: float) -> Optional[int]:
    """The first evaluation step at which the accuracy reached ``target`` (None if it never did)."""
    for step, acc in zip(history.eval_steps, history.eval_acc):
        if acc >= target:
            return step
    return None


# --------------------------------------------------------------------------------------------------------
# Sweeps and seed spreads (added for chapter 4; reusable by any chapter)
# --------------------------------------------------------------------------------------------------------

def sweep(fn: Callable, grid: dict, *, progress: bool = True, desc: str = "sweep") -> list:
    """Call ``fn(**point)`` at every point of the Cartesian product of ``grid`` (name -> list of values).

    Points are visited in ``itertools.product`` order (the last name varies fastest). Returns one record per
    point, ``{**point, 'result': fn(**point)}``. ``progress`` shows a ``tqdm.auto`` bar over the points.

    >>> sweep(lambda a, b: a * b, {"a": [1, 2], "b": [10, 20]}, progress=False)[-1]
    {'a': 2, 'b': 20, 'result': 40}
    """
    import itertools

    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid: expected a non-empty dict of name -> list of values, got {grid!r}")
    values = []
    for name, options in grid.items():
        if isinstance(options, (str, bytes)) or not hasattr(options, "__iter__"):
            raise ValueError(f"grid[{name!r}]: expected a list of values, got {options!r}")
        options = list(options)
        if not options:
            raise ValueError(f"grid[{name!r}]: expected at least one value, got an empty list")
        values.append(options)
    names = list(grid)
    points = [dict(zip(names, combo)) for combo in itertools.product(*values)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), desc=desc, leave=False, mininterval=1.0)
    records = []
    try:
        for point in points:
            records.append({**point, "result": fn(**point)})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records


@dataclass(frozen=True)
class Spread:
    """The spread of one measurement over seeds: median, min, max, and how many runs gave no value."""

    median: float
    low: float
    high: float
    n: int
    missing: int  # runs that gave None (e.g. never reached the target); counted as +inf above

    def __str__(self) -> str:
        def fmt(v):
            return "not reached" if math.isinf(v) else f"{v:g}"

        return f"{fmt(self.median)} [{fmt(self.low)}, {fmt(self.high)}] (n={self.n})"


def spread(values) -> Spread:
    """Median, minimum and maximum of ``values`` over seeds; ``None`` (a run that never got a value, such as
    :func:`steps_to_accuracy` of a run that missed its target) counts as ``+inf``.

    >>> str(spread([400, 300, None]))
    '400 [300, not reached] (n=3)'
    """
    values = list(values)
    if not values:
        raise ValueError("values: expected at least one value")
    arr = []
    for v in values:
        if v is None:
            arr.append(math.inf)
        elif isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or math.isnan(v):
            raise ValueError(f"values: expected numbers or None, got {v!r}")
        else:
            arr.append(float(v))
    arr = np.sort(np.asarray(arr))
    k = len(arr)
    median = float(arr[k // 2]) if k % 2 else float(0.5 * (arr[k // 2 - 1] + arr[k // 2]))
    return Spread(median, float(arr[0]), float(arr[-1]), k, sum(v is None for v in values))


__all__ += ["sweep", "Spread", "spread"]
