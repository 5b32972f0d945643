"""The training loop, evaluation and metrics the chapters share.

One loop (:func:`run`) serves every experiment in the book -- torch modules, the NumPy MLP of chapter 3 and,
through :mod:`bnlib.lab.packed`, ``k`` seeds trained side by side -- so that differences between runs come from
the model, never from the loop. It is deliberately plain: seeded mini-batch sampling (a fresh permutation each
epoch), one step per batch, periodic evaluation, and hooks (``before_step``, ``callback``) for what a chapter
measures during training.

>>> data = bnlib.data.load_mnist()
>>> xtr, ytr, xte, yte = to_tensors(data, device)
>>> hist = train(bnlib.lab.models.mlp(norm="bn"), xtr, ytr, steps=500, batch_size=60, lr=0.5,
...              x_eval=xte, y_eval=yte, eval_every=50, device=device)
>>> steps_to_accuracy(hist, 0.9)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .._setup import generator

__all__ = ["History", "StopTraining", "as_hooks", "run", "to_tensors", "make_optimizer", "evaluate", "train",
           "steps_to_accuracy", "progress_bar"]


def progress_bar(total: int, desc: str, **kwargs):
    """A ``tqdm.auto`` bar over ``total`` units, or ``None`` when ``BNLIB_PROGRESS=0`` is in the environment.

    Progress bars belong to live sessions: the book's stored outputs are made (``scripts/run_notebook.py``) and
    checked (nbval) with ``BNLIB_PROGRESS=0``, so no frozen bar is left on the website. The lab's loops call this
    one function. A redraw at most every ``mininterval`` seconds (default 1): in Jupyter each redraw is a
    message to the front end."""
    import os

    if os.environ.get("BNLIB_PROGRESS", "1").strip() == "0":
        return None
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(total=total, desc=desc, **kwargs)


@dataclass(repr=False)
class History:
    """What :func:`train` measured: the loss of every training step and the periodic evaluations. Its repr is
    one line (steps, last loss, evaluations, final accuracy), not the thousands of numbers it holds."""

    train_loss: list = field(default_factory=list)  # one entry per step
    eval_steps: list = field(default_factory=list)  # steps at which the model was evaluated
    eval_loss: list = field(default_factory=list)
    eval_acc: list = field(default_factory=list)
    diverged: bool = False  # True when the training loss became NaN/inf (training stops there)

    @property
    def final_acc(self) -> float:
        return self.eval_acc[-1] if self.eval_acc else float("nan")

    def __repr__(self) -> str:
        parts = [f"{len(self.train_loss)} steps"]
        if self.train_loss:
            parts.append(f"last training loss {float(self.train_loss[-1]):.3g}")
        if self.eval_steps:
            parts.append(f"{len(self.eval_steps)} evaluations (steps {self.eval_steps[0]}-{self.eval_steps[-1]}), "
                         f"final accuracy {float(self.final_acc):.3g}")
        if self.diverged:
            parts.append("diverged")
        return f"History({', '.join(parts)})"

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


class StopTraining(Exception):
    """Raised by a hook to end a run early (e.g. once a target accuracy is reached); :func:`run` catches it,
    evaluates at that step and returns the history so far."""


def as_hooks(name: str, hooks) -> tuple:
    """``hooks`` (None, a callable or a list of callables) as a tuple; ``name`` is the argument's name in errors."""
    if hooks is None:
        return ()
    hooks = tuple(hooks) if isinstance(hooks, (list, tuple)) else (hooks,)
    for h in hooks:
        if not callable(h):
            raise TypeError(f"{name}: expected a callable or a list of callables, got {type(h).__name__}")
    return hooks


def run(
    n: int,
    step: Callable[[int, torch.Tensor], float],
    *,
    steps: int,
    batch_size: int,
    seed: int | Sequence[int] = 0,
    evaluate_fn: Optional[Callable[[], tuple]] = None,
    eval_every: int = 100,
    sampler: Optional[Callable[[int], torch.Tensor]] = None,
    progress: bool = False,
    desc: str = "train",
) -> History:
    """The book's one training loop, independent of what is trained.

    ``step(step_number, indices)`` trains on the examples ``indices`` (a 1-D ``torch.int64`` tensor of
    ``batch_size`` positions in ``range(n)``) and returns the loss. Batches are drawn without replacement
    from a permutation, re-drawn every epoch, by a ``torch.Generator`` seeded with ``seed``, so runs are
    reproducible and a NumPy model and its torch twin see the same batches. ``evaluate_fn()`` returns
    ``(loss, accuracy)``; it runs at step 0, every ``eval_every`` steps, at the end, and at a step where a
    hook raised :class:`StopTraining`. The run stops with ``history.diverged = True`` once the loss is NaN/inf.

    ``seed`` may also be a sequence of ``k`` seeds: ``k`` independent batch streams, for ``k`` networks
    trained side by side (:mod:`bnlib.lab.packed`). ``indices`` is then a ``(k, batch_size)`` tensor whose
    row ``j`` is the batch a run with ``seed=seed[j]`` draws at that step.

    ``sampler(step_number)``, when given, returns each step's indices instead (e.g. fixed, class-sorted
    batches); ``seed`` is then unused.
    """
    if sampler is not None and not callable(sampler):
        raise TypeError(f"sampler: expected a callable or None, got {type(sampler).__name__}")
    _checks.check_training_run(n, n, steps, batch_size)
    if not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 1:
        raise ValueError(f"eval_every: expected a positive int, got {eval_every!r}")
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):  # one stream (generator checks seed)
        gen = generator(seed)

        def permutation():
            return torch.randperm(n, generator=gen)
    else:
        gens = [generator(s) for s in seed]
        if not gens:
            raise ValueError(f"seed: expected an int or a non-empty sequence of ints, got {seed!r}")

        def permutation():  # (k, n): one permutation per stream
            return torch.stack([torch.randperm(n, generator=g) for g in gens])
    hist = History()

    def _eval(at):
        if evaluate_fn is not None:
            loss, acc = evaluate_fn()
            hist.eval_steps.append(at)
            hist.eval_loss.append(loss)
            hist.eval_acc.append(acc)

    _eval(0)
    order, pos = (None, 0) if sampler is not None else (permutation(), 0)
    bar = progress_bar(steps, desc) if progress else None
    try:
        for t in range(1, steps + 1):
            if sampler is not None:
                idx = sampler(t)
            else:
                if pos + batch_size > n:
                    order, pos = permutation(), 0
                idx = order[..., pos: pos + batch_size]
                pos += batch_size
            try:
                value = float(step(t, idx))
            except StopTraining:
                _eval(t)
                break
            hist.train_loss.append(value)
            if bar is not None:
                bar.update(1)
            if not math.isfinite(value):
                hist.diverged = True
                break
            if t % eval_every == 0 or t == steps:
                _eval(t)
    finally:
        if bar is not None:
            bar.close()
    return hist


def train(
    model,
    x_train,
    y_train,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    optimizer: str | torch.optim.Optimizer = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    x_eval=None,
    y_eval=None,
    eval_every: int = 100,
    seed: int = 0,
    callback=None,
    before_step=None,
    loss_fn: Optional[Callable] = None,
    clip_grad_norm: Optional[float] = None,
    sampler: Optional[Callable[[int], torch.Tensor]] = None,
    progress: bool = False,
    desc: str = "train",
    blas_threads: Optional[int] = 1,
) -> History:
    """Train ``model`` with cross-entropy for ``steps`` mini-batch steps (:func:`run`) and return the
    :class:`History`.

    ``model`` is a ``torch.nn.Module`` (trained by ``optimizer``: 'sgd', 'adam' or an optimizer instance) or
    a NumPy :class:`bnlib.numpy.mlp.MLP` (trained by plain SGD with its hand-written backward; only
    ``optimizer='sgd'`` without momentum or weight decay applies). Hooks: ``before_step(step, model)`` runs
    before each step (e.g. to set a schedule), ``callback(step, model, xb, yb)`` after each optimizer step;
    each may be a callable or a list of them, and may raise :class:`StopTraining`. ``loss_fn(model, xb, yb)``
    replaces the cross-entropy of a torch model (e.g. for a sequence model's per-token loss);
    ``clip_grad_norm`` clips the gradients' total norm between backward and the optimizer step; ``sampler``
    replaces the shuffled batches (see :func:`run`).

    ``blas_threads`` caps NumPy's BLAS thread pool while a NumPy model trains (via ``threadpoolctl`` when it is
    installed; ``None`` leaves it alone): the matrices of a small MLP are too small for threads to pay off,
    and on a busy machine spinning BLAS threads made training about ten times slower in our measurements.
    """
    from ..numpy.mlp import MLP

    callbacks, befores = as_hooks("callback", callback), as_hooks("before_step", before_step)
    if (x_eval is None) != (y_eval is None):
        raise ValueError("x_eval, y_eval: give both or neither")
    if clip_grad_norm is not None:
        clip_grad_norm = _checks.check_eps(clip_grad_norm, "clip_grad_norm")
    if isinstance(model, MLP):
        if clip_grad_norm is not None or sampler is not None:
            raise ValueError("clip_grad_norm, sampler: not available for a NumPy MLP, got "
                             f"clip_grad_norm={clip_grad_norm!r}, sampler={sampler!r}")
        return _train_numpy(model, x_train, y_train, steps=steps, batch_size=batch_size, lr=lr,
                            optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, x_eval=x_eval,
                            y_eval=y_eval, eval_every=eval_every, seed=seed, callbacks=callbacks,
                            befores=befores, progress=progress, desc=desc, blas_threads=blas_threads,
                            loss_fn=loss_fn)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module or a bnlib.numpy.mlp.MLP, got {type(model).__name__}")
    _checks.check_training_run(len(x_train), len(y_train), steps, batch_size)
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(
        model, optimizer, lr, momentum, weight_decay)
    loss_fn = loss_fn or (lambda m, xb, yb: F.cross_entropy(m(xb), yb))

    def step(t, idx):
        for hook in befores:
            hook(t, model)
        idx = idx.to(x_train.device)
        xb, yb = x_train[idx], y_train[idx]
        loss = loss_fn(model, xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        opt.step()
        value = loss.item()
        for hook in callbacks:
            hook(t, model, xb, yb)
        return value

    model.train()
    evaluate_fn = None if x_eval is None else (lambda: evaluate(model, x_eval, y_eval))
    return run(len(x_train), step, steps=steps, batch_size=batch_size, seed=seed, evaluate_fn=evaluate_fn,
               eval_every=eval_every, sampler=sampler, progress=progress, desc=desc)


def _train_numpy(model, x_train, y_train, *, steps, batch_size, lr, optimizer, momentum, weight_decay, x_eval,
                 y_eval, eval_every, seed, callbacks, befores, progress, desc, blas_threads, loss_fn):
    if optimizer != "sgd" or momentum or weight_decay or loss_fn is not None:
        raise ValueError("optimizer: a NumPy MLP trains with plain SGD only (optimizer='sgd', momentum=0, "
                         f"weight_decay=0, no loss_fn), got optimizer={optimizer!r}, momentum={momentum!r}, "
                         f"weight_decay={weight_decay!r}")
    x_train = model._as_input(x_train)
    y_train = np.asarray(y_train)
    _checks.check_training_run(len(x_train), len(y_train), steps, batch_size)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    if blas_threads is not None and not (isinstance(blas_threads, int) and blas_threads >= 1):
        raise ValueError(f"blas_threads: expected None or a positive int, got {blas_threads!r}")

    def step(t, idx):
        for hook in befores:
            hook(t, model)
        idx = idx.numpy()
        xb, yb = x_train[idx], y_train[idx]
        value, grads = model.loss_and_grads(xb, yb)
        if math.isfinite(value):  # a diverged step leaves the weights as they were
            model.sgd_step(grads, lr)
            for hook in callbacks:
                hook(t, model, xb, yb)
        return value

    model.train()
    evaluate_fn = None if x_eval is None else (lambda: model.evaluate(x_eval, y_eval))
    with _blas_limit(blas_threads), np.errstate(over="ignore", invalid="ignore"):
        return run(len(x_train), step, steps=steps, batch_size=batch_size, seed=seed, evaluate_fn=evaluate_fn,
                   eval_every=eval_every, progress=progress, desc=desc)


def _blas_limit(threads: Optional[int]):
    """A context manager limiting the BLAS threads (a no-op without ``threadpoolctl`` or for ``None``)."""
    from contextlib import nullcontext

    if threads is None:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: scikit-learn brings it
        return nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


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
    bar = progress_bar(len(points), desc) if progress else None
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
