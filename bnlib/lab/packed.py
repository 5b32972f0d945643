r"""The one packed-seed trainer: ``k`` networks of one architecture (``k`` seeds, ``k`` learning rates, ...)
trained side by side as one wider network, batch for batch the same as ``k`` separate runs of
:func:`bnlib.lab.train.train`.

Why. The book's networks are tiny, so on a CPU (and even on a GPU) a training step of one of them is mostly
per-operation overhead. ``k`` networks packed into one cost little more than one.

How. :class:`PackedNet` takes ``k`` single networks (``nn.Sequential`` of the same architecture -- the
MLPs and CNNs of :mod:`bnlib.lab.models`) and lays them side by side in one network with one layout: the
activation of the pack is the single network's with ``k`` times the features or channels, network ``j``'s
block ``j`` of them (``(B, k * C)`` after a Linear, ``(B, k * C, H, W)`` after a Conv2d). So

- a ``Conv2d`` becomes one convolution with ``groups=k`` (times its own groups),
- a ``Linear`` one batched matrix product (:class:`_PackedLinear`),
- a normalization layer one layer with ``k * C`` channels whose statistics never span two networks: the
  per-channel ones (batch norm, batch renorm, ghost BN, instance norm) are the same class with ``k * C``
  channels, ``GroupNorm(G, C)`` becomes ``GroupNorm(k * G, k * C)``, ``LayerNorm(C)`` becomes
  ``GroupNorm(k, k * C)`` and batch-layer norm :class:`_PackedBatchLayerNorm` (batch half over all
  channels, layer half per network);
- activations, pooling, dropout and ``Flatten`` act on the wide activation unchanged.

Which methods pack is the registry's word (``bnlib.methods.get(name).packable``; RMS norm does not): a network
with a layer of a method that does not pack is kept as ``k`` separate networks behind the same interface
(the same results, without the speed-up).

The input of the pack is ``(B, k, *item)`` -- network ``j`` reads ``x[:, j]``, one example of the single
network's input (``(H, W)`` or ``(c, H, W)`` images, or flat vectors) -- and its output ``(B, k, classes)``.
Because no operation mixes the networks and SGD and Adam update every parameter elementwise, training the
pack on the *sum* of the ``k`` mean losses gives each network exactly its own gradient: :func:`train_packed`
draws network ``j``'s mini-batches from ``generator(seeds[j])`` through the book's one loop
(:func:`bnlib.lab.train.run` with one batch stream per seed), so the pack *is* the ``k`` separate runs, up
to float rounding (``tests/lab/test_packed.py`` checks it). One learning rate per network (SGD) and
learning-rate schedules (:func:`lr_at`) are both supported.

>>> models = [bnlib.lab.models.mlp(norm="bn") for _ in range(3)]      # e.g. built after three seeds
>>> pack = PackedNet(models)
>>> hists = train_packed(pack, x_train, y_train, seeds=[0, 1, 2], steps=500, batch_size=60, lr=[0.1, 0.5, 1.0],
...                      x_eval=x_test, y_eval=y_test)                 # one History per network
>>> pack.unpack(2)                                                      # network 2 as a plain nn.Sequential
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks, methods
from .._setup import derive_seed
from ..torch import BatchLayerNorm, GroupNorm, LayerNorm
from ..torch import functional as BF
from ..torch._batch_layer_norm import bln_weights
from .train import History, StopTraining, as_hooks, make_optimizer, run

__all__ = ["PackedNet", "train_packed", "evaluate_packed", "SCHEDULES", "lr_at"]


# --------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------
# Packed layers
# --------------------------------------------------------------------------------------------------------

class _PackedLinear(nn.Module):
    """``k`` independent ``Linear(C, out)`` layers on an input ``(B, k * C)``; output ``(B, k * out)``.
    Weight ``(k, out, C)``, bias ``(k, out)`` (or ``None``)."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([lin.weight.detach() for lin in linears]).clone())
        self.bias = None
        if linears[0].bias is not None:
            self.bias = nn.Parameter(torch.stack([lin.bias.detach() for lin in linears]).clone())

    def forward(self, x):
        k, out, C = self.weight.shape
        y = torch.einsum("bkc,koc->bko", x.reshape(x.shape[0], k, C), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(x.shape[0], k * out)


class _PackedBatchLayerNorm(BatchLayerNorm):
    """The batch-layer-norm layers of ``k`` networks with ``C`` channels each, as one ``BatchLayerNorm(k * C)``
    (same parameters, buffers and state-dict keys, so packing and unpacking are concatenation and slicing).

    BLN's output is ``gamma_c / sqrt(C) * (alpha_L x_L + alpha_B x_B) + beta_c``. The batch half ``x_B`` is
    per channel, so :func:`bnlib.torch.functional.batch_norm` computes it for all ``k * C`` channels at once
    (batch statistics and the running-statistics update in training, the running statistics in evaluation);
    the layer half ``x_L`` takes each sample's statistics over *its own network's* ``C`` channels, which is
    :func:`bnlib.torch.functional.group_norm` with ``k`` groups. Both use the layer's ``eps``; ``d = C``.
    One call of each instead of ``k`` calls of BLN's function: the packed networks run about as fast as batch
    norm's. ``tests/lab/test_packed.py`` checks it against ``k`` separate ``BatchLayerNorm`` layers."""

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


def _cat_state(dst: nn.Module, sources: Sequence[nn.Module]) -> nn.Module:
    """Give ``dst`` the concatenation (along dim 0) of the sources' parameters and buffers, replacing its
    own (so ``dst`` takes the sources' dtype and device); 0-d tensors (counters) are the first source's.
    Returns ``dst``."""
    def names(m):
        return ({n for n, p in m._parameters.items() if p is not None},
                {n for n, b in m._buffers.items() if b is not None})

    want = names(dst)
    for src in sources:
        if names(src) != want:
            raise ValueError(f"cannot pack {type(src).__name__}: its parameters and buffers "
                             f"{sorted(set().union(*names(src)))} differ from the packed layer's "
                             f"{sorted(set().union(*want))}")
    with torch.no_grad():
        for name in want[0]:
            old = dst._parameters[name]
            dst._parameters[name] = nn.Parameter(torch.cat([s._parameters[name].detach() for s in sources]).clone(),
                                                 requires_grad=old.requires_grad)
        for name in want[1]:
            parts = [s._buffers[name] for s in sources]
            dst._buffers[name] = parts[0].clone() if parts[0].dim() == 0 else torch.cat(parts).clone()
    return dst


_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.Dropout, nn.Identity, nn.MaxPool2d,
                nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_METHOD_OF_CLASS: Optional[Dict[type, str]] = None


def _method_of(layer: nn.Module) -> Optional[str]:
    """The registry name of a normalization layer (by its class), or ``None``."""
    global _METHOD_OF_CLASS
    if _METHOD_OF_CLASS is None:
        table = {}
        for name in methods.NAMES:
            for path in methods.get(name).modules.values():
                table.setdefault(methods.resolve(path), name)
        _METHOD_OF_CLASS = table
    return _METHOD_OF_CLASS.get(type(layer))


def _packed_norm(layers: Sequence[nn.Module], k: int) -> nn.Module:
    """One normalization layer for the ``k`` layers ``layers`` (same class and settings), whose statistics
    never span two networks."""
    first = layers[0]
    if isinstance(first, BatchLayerNorm):
        packed = _PackedBatchLayerNorm(k, first.num_features, eps=first.eps, momentum=first.momentum,
                                       affine=first.affine, track_running_stats=first.track_running_stats,
                                       bias=getattr(first, "bias", None) is not None or not first.affine,
                                       batch_size=first.batch_size)
    elif isinstance(first, GroupNorm):
        packed = copy.deepcopy(first)
        packed.num_groups, packed.num_channels = k * first.num_groups, k * first.num_channels
    elif isinstance(first, LayerNorm):
        if len(first.normalized_shape) != 1:
            raise TypeError(f"cannot pack a LayerNorm over {first.normalized_shape}; expected one dimension "
                            "(pass pack=False to train the networks unpacked)")
        C = first.normalized_shape[0]
        packed = GroupNorm(k, k * C, eps=first.eps, affine=first.elementwise_affine,
                           bias=first.bias is not None or not first.elementwise_affine)
    elif hasattr(first, "num_features"):  # the per-channel layers: BN, batch renorm, ghost BN, instance norm
        packed = copy.deepcopy(first)
        packed.num_features = k * first.num_features
    else:
        raise TypeError(f"cannot pack a {type(first).__name__} layer (pass pack=False to train the networks "
                        "unpacked)")
    return _cat_state(packed, layers)


def _check_seeds(seeds, k: Optional[int] = None, name: str = "seeds") -> Tuple[int, ...]:
    try:
        if isinstance(seeds, (str, bytes)):
            raise TypeError
        seeds = tuple(seeds)
    except TypeError:
        raise ValueError(f"{name}: expected a sequence of non-negative ints, got {seeds!r}") from None
    if not seeds or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"{name}: expected a non-empty sequence of non-negative ints, got {seeds!r}")
    if k is not None and len(seeds) != k:
        raise ValueError(f"{name}: expected {k} seeds (one per network), got {len(seeds)}")
    return tuple(int(s) for s in seeds)


# --------------------------------------------------------------------------------------------------------
# The packed network
# --------------------------------------------------------------------------------------------------------

class PackedNet(nn.Module):
    """``k`` networks of one architecture side by side as one network (see the module's docstring).

    ``models``: ``k`` ``nn.Sequential`` networks with the same layers and parameter shapes (they are copied;
    the originals are left alone). Layers: ``Conv2d``, ``Linear``, ``Flatten``, activations, pooling,
    dropout and the normalization layers of :mod:`bnlib.methods`. ``seeds`` (optional): the ``k`` seeds
    :func:`train_packed` draws the networks' mini-batches from when it is given none. ``pack=False`` keeps
    the ``k`` networks separate (as does a layer of a method the registry marks not ``packable``); the
    interface and the results are the same. ``grouped`` says which it is.

    ``forward`` takes ``(B, k, *item)`` (network ``j`` reads ``x[:, j]``) and returns ``(B, k, classes)``.
    :meth:`from_seeds` builds network ``j`` after ``torch.manual_seed(derive_seed(seeds[j]))``;
    :meth:`unpack` returns network ``j`` as a plain single network.
    """

    def __init__(self, models: Sequence[nn.Sequential], *, seeds: Optional[Sequence[int]] = None,
                 pack: bool = True):
        super().__init__()
        if isinstance(models, nn.Module):
            raise ValueError("models: expected a sequence of networks, got one network")
        models = list(models)
        if not models:
            raise ValueError("models: expected at least one model")
        for m in models:
            if not isinstance(m, nn.Sequential):
                raise TypeError(f"models: expected nn.Sequential networks, got {type(m).__name__}")
        shapes = [[(type(layer).__name__, tuple(p.shape for p in layer.parameters())) for layer in m] for m in models]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("models: expected models with the same architecture and parameter shapes")
        self.k = len(models)
        self.seeds = None if seeds is None else _check_seeds(seeds, self.k)
        first = models[0]
        self._conv_input = len(first) > 0 and isinstance(first[0], nn.Conv2d)
        param = next(first.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        packable = all(methods.get(name).packable for name in
                       (_method_of(layer) for layer in first) if name is not None)
        self.grouped = bool(pack) and packable
        if not self.grouped:
            self.nets = nn.ModuleList(copy.deepcopy(m) for m in models)
            return
        self._template = copy.deepcopy(first)
        with torch.random.fork_rng(devices=[]):  # new layers draw initial weights; they are replaced at once
            layers = [self._pack_layer([m[i] for m in models]) for i in range(len(first))]
        self.body = nn.Sequential(*layers).to(device)

    def _pack_layer(self, mods: Sequence[nn.Module]) -> nn.Module:
        k, ref = self.k, mods[0]
        if isinstance(ref, nn.Conv2d):
            conv = nn.Conv2d(k * ref.in_channels, k * ref.out_channels, ref.kernel_size, stride=ref.stride,
                             padding=ref.padding, dilation=ref.dilation, groups=k * ref.groups,
                             bias=ref.bias is not None, padding_mode=ref.padding_mode)
            return _cat_state(conv, mods)
        if isinstance(ref, nn.Linear):
            return _PackedLinear(mods)
        if isinstance(ref, nn.Flatten):
            if (ref.start_dim, ref.end_dim) != (1, -1):
                raise TypeError(f"cannot pack nn.Flatten(start_dim={ref.start_dim}, end_dim={ref.end_dim}); "
                                "expected the default Flatten()")
            return nn.Flatten()
        if isinstance(ref, _ELEMENTWISE):
            return copy.deepcopy(ref)
        if _method_of(ref) is not None:
            return _packed_norm(mods, k)
        raise TypeError(f"models: cannot pack a {type(ref).__name__} layer; expected Conv2d, Linear, Flatten, "
                        "activations, pooling, dropout or normalization layers of bnlib.methods (pass pack=False "
                        "to train the networks unpacked)")

    @classmethod
    def from_seeds(cls, build: Callable[[], nn.Sequential], seeds: Sequence[int], *, pack: bool = True) -> "PackedNet":
        """The pack of ``build()`` called once per seed after ``torch.manual_seed(derive_seed(seed))``: network
        ``j`` starts from the weights the single network gets with ``seeds[j]`` (the global generator is left as
        it was), and :func:`train_packed` draws its batches from ``seeds[j]`` too."""
        if not callable(build):
            raise TypeError(f"build: expected a callable returning a network, got {type(build).__name__}")
        seeds = _check_seeds(seeds)
        models = []
        with torch.random.fork_rng(devices=[]):
            for s in seeds:
                torch.manual_seed(derive_seed(s))
                models.append(build())
        return cls(models, seeds=seeds, pack=pack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.k:
            raise ValueError(f"x: expected shape (B, k={self.k}, ...) (one example per network), "
                             f"got {tuple(x.shape)}")
        if not self.grouped:
            four = self._conv_input and x.dim() == 4  # (B, k, H, W): single-channel images
            return torch.stack([net(x[:, j: j + 1] if four else x[:, j]) for j, net in enumerate(self.nets)], 1)
        if self._conv_input:  # (B, k, H, W) or (B, k, c, H, W) -> (B, k * c, H, W)
            x = x.reshape(x.shape[0], -1, *x.shape[-2:])
        return self.body(x).reshape(x.shape[0], self.k, -1)

    @torch.no_grad()
    def unpack(self, j: int) -> nn.Sequential:
        """Network ``j`` as a plain single network (a copy, in the pack's train/eval mode, on its device)."""
        if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= j < self.k:
            raise ValueError(f"j: expected a network index in [0, {self.k}), got {j!r}")
        if not self.grouped:
            return copy.deepcopy(self.nets[j])
        param = next(self.body.parameters(), None)
        net = copy.deepcopy(self._template).to(param.device if param is not None else "cpu")
        for dst, src in zip(net, self.body):
            if isinstance(src, _PackedLinear):
                dst.weight.copy_(src.weight[j])
                if dst.bias is not None:
                    dst.bias.copy_(src.bias[j])
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


# --------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------

def _per_network_lrs(lr, k: int, optimizer: str) -> Optional[torch.Tensor]:
    """``None`` for one learning rate shared by the pack, else the ``k`` rates as a float64 tensor."""
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr: expected a positive finite number or a sequence of {k}, got {lr!r}")
        return None
    try:
        if isinstance(lr, (str, bytes)):
            raise TypeError
        lrs = [float(v) for v in lr]
    except (TypeError, ValueError):
        raise ValueError(f"lr: expected a positive number or a sequence of {k}, got {lr!r}") from None
    if len(lrs) != k or not all(v > 0 and math.isfinite(v) for v in lrs):
        raise ValueError(f"lr: expected {k} positive finite learning rates (one per network), got {lr!r}")
    if optimizer != "sgd":
        raise ValueError(f"lr: one learning rate per network needs optimizer='sgd', got {optimizer!r}")
    return torch.tensor(lrs, dtype=torch.float64)


def _check_model(model) -> None:
    if not isinstance(model, PackedNet):
        raise TypeError(f"model: expected a bnlib.lab.packed.PackedNet, got {type(model).__name__}")


def train_packed(
    model: PackedNet,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr,
    seeds: Optional[Sequence[int]] = None,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    schedule: str = "constant",
    warmup: float = 0.1,
    x_eval=None,
    y_eval=None,
    eval_every: int = 100,
    target: Optional[float] = None,
    callback=None,
    before_step=None,
    progress: bool = False,
    desc: str = "train",
) -> List[History]:
    """Train the ``k`` networks of ``model`` as :func:`bnlib.lab.train.train` would train each one with
    ``seed=seeds[j]`` (the same mini-batches, the same optimizer), in one pass per step, and return one
    :class:`~bnlib.lab.train.History` per network.

    ``x_train``: ``(n, *item)``, one example of the single network's input each (flat vectors for an MLP,
    ``(H, W)`` or ``(c, H, W)`` images for a CNN). ``seeds`` defaults to ``model.seeds``. The loop is
    :func:`bnlib.lab.train.run` with one batch stream per seed.

    ``lr``: one learning rate for every network, or (SGD only) a sequence of ``k``, network ``j`` training with
    ``lr[j]``: the pack then trains at rate 1 on the sum of ``lr[j]`` times network ``j``'s mean loss, the
    same update (SGD is linear in the gradient, with or without momentum) up to float rounding.
    ``schedule`` (:func:`lr_at`: ``'constant'``, or ``'warmup-linear'`` over a ``warmup`` fraction of the
    steps) scales the rate(s) step by step. ``optimizer``: ``'sgd'`` (with ``momentum``) or ``'adam'``.

    Evaluation on ``(x_eval, y_eval)`` at step 0, every ``eval_every`` steps and at the end. With ``target``
    (an accuracy), training stops at the first evaluation at which every network has reached it (a network's
    history then runs on past its own first hit; use :func:`bnlib.lab.train.steps_to_accuracy`). A network
    whose loss becomes non-finite is marked ``diverged``, its history stops there (no evaluation after it) and
    the others go on; once all have diverged, training stops at the next evaluation step. Hooks, as in
    :func:`~bnlib.lab.train.train`: ``before_step(step, model)`` and ``callback(step, model, xb, yb)`` (here
    the pack and its ``(B, k, ...)`` batch), each a callable or a list, each may raise
    :class:`~bnlib.lab.train.StopTraining`. ``progress`` shows a bar over the steps.
    """
    _check_model(model)
    k = model.k
    seeds = _check_seeds(model.seeds if seeds is None else seeds, k)
    callbacks, befores = as_hooks("callback", callback), as_hooks("before_step", before_step)
    lr_scale = _per_network_lrs(lr, k, optimizer)
    n = len(x_train)
    _checks.check_training_run(n, len(y_train), steps, batch_size)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Real) or not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup: expected a fraction in [0, 1), got {warmup!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every: expected a positive int, got {eval_every!r}")
    if (x_eval is None) != (y_eval is None):
        raise ValueError("x_eval, y_eval: give both or neither")
    if target is not None and (x_eval is None or not 0.0 < target <= 1.0):
        raise ValueError(f"target: expected an accuracy in (0, 1] and evaluation data, got {target!r}")
    base_lr = 1.0 if lr_scale is not None else lr
    opt = make_optimizer(model, optimizer, base_lr, momentum)
    device = x_train.device
    if lr_scale is not None:
        lr_scale = lr_scale.to(device=device, dtype=next(model.parameters()).dtype)

    hists = [History() for _ in range(k)]
    records: list = []  # one (k,) tensor of mean losses per step, read back only at evaluation steps
    alive, reached = [True] * k, [False] * k
    checked = 0

    def update_alive():
        nonlocal checked
        if len(records) > checked:
            bad = (~torch.isfinite(torch.stack(records[checked:]))).any(0).tolist()
            checked = len(records)
            for j in range(k):
                alive[j] = alive[j] and not bad[j]

    def evaluate_at(t):
        update_alive()
        if x_eval is None:
            return
        losses, accs = evaluate_packed(model, x_eval, y_eval)
        for j in range(k):
            if alive[j]:
                hists[j].eval_steps.append(t)
                hists[j].eval_loss.append(float(losses[j]))
                hists[j].eval_acc.append(float(accs[j]))
                reached[j] = reached[j] or (target is not None and accs[j] >= target)

    def finished():
        return not any(alive) or (target is not None and all(r or not a for r, a in zip(reached, alive)))

    def step(t, idx):  # idx: (k, B), row j network j's batch
        try:
            if schedule != "constant":
                for group in opt.param_groups:
                    group["lr"] = lr_at(t, steps, base_lr, schedule, warmup)
            for hook in befores:
                hook(t, model)
            idx = idx.t().to(device)  # (B, k)
            xb, yb = x_train[idx], y_train[idx]
            logits = model(xb)  # (B, k, classes)
            per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="none")
            # (k,) each network's mean loss, each reduced over its own contiguous row: the sum's order then does
            # not depend on k (a mean over dim 0 of (B, k) sums in another order for k = 2 than for k = 1)
            per = per.view(batch_size, k).t().contiguous().mean(1)
            opt.zero_grad(set_to_none=True)
            (per.sum() if lr_scale is None else (per * lr_scale).sum()).backward()
            opt.step()
            records.append(per.detach())
            for hook in callbacks:
                hook(t, model, xb, yb)
        except StopTraining:
            evaluate_at(t)
            raise
        if t % eval_every == 0 or t == steps:
            evaluate_at(t)
            if finished():
                raise StopTraining
        return 0.0  # the per-network losses are kept here; run()'s own history is not used

    model.train()
    evaluate_at(0)
    if not finished():
        run(n, step, steps=steps, batch_size=batch_size, seed=seeds, eval_every=eval_every, progress=progress,
            desc=desc)
    losses = torch.stack(records).cpu().numpy() if records else np.zeros((0, k), np.float32)
    for j, h in enumerate(hists):
        col = losses[:, j]
        bad = np.flatnonzero(~np.isfinite(col))
        if bad.size:
            h.diverged = True
            col = col[: bad[0] + 1]
        h.train_loss = col.tolist()
    return hists


@torch.no_grad()
def evaluate_packed(model: PackedNet, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
                    mode: str = "eval") -> Tuple[np.ndarray, np.ndarray]:
    """(losses, accuracies) of the ``k`` networks on the same data ``(x, y)`` (``x``: ``(n, *item)``), two
    float64 arrays ``(k,)``: mean cross-entropy and accuracy.

    ``mode='eval'`` (the default) uses running statistics; ``mode='train'`` normalizes each batch of
    ``batch_size`` with its own statistics, on a copy of the model (the original's running statistics are
    not touched). The model's train/eval mode is restored.
    """
    _check_model(model)
    if mode not in ("eval", "train"):
        raise ValueError(f"mode: expected 'eval' or 'train', got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"y: expected {len(x)} labels to match x (at least one), got {len(y)}")
    was_training = model.training
    net = copy.deepcopy(model) if mode == "train" else model
    net.train(mode == "train")
    k = model.k
    loss = torch.zeros(k, dtype=torch.float64)
    correct = torch.zeros(k, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i: i + batch_size], y[i: i + batch_size]
        logits = net(xb.unsqueeze(1).expand(len(xb), k, *xb.shape[1:]))  # (B, k, classes)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.repeat_interleave(k), reduction="none")
        loss += ce.view(len(xb), k).t().contiguous().sum(1).double().cpu()
        correct += (logits.argmax(-1) == yb[:, None]).sum(0).double().cpu()
    model.train(was_training)
    return (loss / len(x)).numpy(), (correct / len(x)).numpy()
