r"""Chapter 11: fine-tuning a network with batch norm on a small transfer task.

The task: pretrain a small CNN with batch norm (:func:`transfer_cnn`) on the digits 0-4, then
fine-tune it on the digits 5-9 from a few examples per class in small batches, with a fresh 5-way head. What is
compared is only how the batch norm layers are treated while fine-tuning (:data:`MODES`):

- ``'train'`` -- PyTorch's default: BN layers in train mode (batch statistics, running statistics updated),
  γ and β trained;
- ``'frozen_stats'`` -- BN layers kept in eval mode: they normalize with the pretrained running statistics,
  which stay as they were; γ and β still trained (the "frozen BN" of detection and segmentation code);
- ``'frozen_affine'`` -- ``requires_grad=False`` on γ and β, the layers left in train mode: γ and β stay, but
  the layers still normalize with batch statistics and **still update their running statistics** (what
  ``requires_grad=False`` does in PyTorch);
- ``'keras'`` -- Keras' ``layer.trainable = False`` (``tf.keras`` since TensorFlow 2.0, and Keras 3): γ and β
  frozen *and* the layer run in inference mode, i.e. ``'frozen_stats'`` plus frozen γ, β.

and, separately, whether weight decay applies to γ and β (Summers & Dinneen, 2020, recommend it does not).

Freezing the mode needs care with a training loop that calls ``model.train()`` (as
:func:`bnlib.lab.train.train` does at the start and after every evaluation): :func:`apply_mode` sets the
flags, and the ``before_step`` hook :func:`bn_mode_hook` puts the frozen layers back into eval mode before
every step.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import _checks
from .._setup import derive_seed, generator
from ..torch import _BatchNorm as _BnlibBatchNorm
from .models import make_norm, mlp
from .packed import PackedNet, train_packed
from .train import History, evaluate, train

__all__ = ["deep_tanh_mlp", "transfer_cnn", "MODES", "MODE_TITLES", "bn_layers", "norm_parameters", "apply_mode",
           "bn_mode_hook", "param_groups", "select_classes", "few_shot", "replace_head", "pretrain", "finetune",
           "finetuned_accuracy", "mode_effects", "run_arms", "paired_verdict", "VERDICT_RULE", "DELTA"]

MODES = ("train", "frozen_stats", "frozen_affine", "keras")
MODE_TITLES = {
    "train": "BN in train mode (PyTorch default)",
    "frozen_stats": "BN in eval mode (frozen statistics)",
    "frozen_affine": "requires_grad=False on γ, β (train mode)",
    "keras": "Keras trainable=False (γ, β frozen, eval mode)",
}
_TORCH_BN = nn.modules.batchnorm._BatchNorm


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _check_mode(mode) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


def bn_layers(model: nn.Module) -> List[nn.Module]:
    """The batch norm layers of ``model`` (``torch.nn``'s and ``bnlib.torch``'s, with their variants)."""
    _check_model(model)
    return [m for m in model.modules() if isinstance(m, (_TORCH_BN, _BnlibBatchNorm))]


def norm_parameters(model: nn.Module) -> List[nn.Parameter]:
    """γ and β of every batch norm layer of ``model`` (those that exist)."""
    return [p for m in bn_layers(model) for p in (m.weight, m.bias) if p is not None]


def _set_bn_eval(model: nn.Module, mode: str) -> None:
    if mode in ("frozen_stats", "keras"):
        for m in bn_layers(model):
            m.eval()


def apply_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set up ``model`` for fine-tuning in ``mode`` (:data:`MODES`): ``requires_grad`` of γ and β (False for
    ``'frozen_affine'`` and ``'keras'``, True otherwise) and the BN layers' train/eval flag (eval for
    ``'frozen_stats'`` and ``'keras'``; the rest of the model is put in train mode). Returns ``model``.

    A loop that calls ``model.train()`` undoes the eval flag: pass :func:`bn_mode_hook` as its ``before_step``.
    """
    _check_model(model)
    _check_mode(mode)
    layers = bn_layers(model)
    if not layers:
        raise ValueError("model: expected a network with batch norm layers, got none")
    trainable = mode in ("train", "frozen_stats")
    for p in norm_parameters(model):
        p.requires_grad_(trainable)
    model.train()
    _set_bn_eval(model, mode)
    return model


def bn_mode_hook(mode: str) -> Callable[[int, nn.Module], None]:
    """A ``before_step(step, model)`` hook that puts the BN layers back into eval mode before every step
    when ``mode`` freezes their statistics (a no-op for the other modes)."""
    _check_mode(mode)

    def hook(step: int, model: nn.Module) -> None:
        _set_bn_eval(model, mode)

    return hook


def param_groups(model: nn.Module, weight_decay: float, decay_norm: bool = True) -> List[dict]:
    """Optimizer parameter groups: every trainable parameter with ``weight_decay``, except γ and β of the
    batch norm layers, which get ``weight_decay`` only when ``decay_norm``. Empty groups are left out."""
    _check_model(model)
    weight_decay = _checks.check_real("weight_decay", weight_decay, 0.0)
    if not isinstance(decay_norm, bool):
        raise TypeError(f"decay_norm: expected a bool, got {type(decay_norm).__name__} {decay_norm!r}")
    norm_ids = {id(p) for p in norm_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    rest = [p for p in trainable if id(p) not in norm_ids]
    norm = [p for p in trainable if id(p) in norm_ids]
    groups = [{"params": rest, "weight_decay": weight_decay},
              {"params": norm, "weight_decay": weight_decay if decay_norm else 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------------------
# The first half of the chapter: a deep tanh MLP to diagnose (bnlib.torch.diagnostics)


def deep_tanh_mlp(norm: str = "none", gain: float = 5 / 3, depth: int = 5, width: int = 100,
                  in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """:func:`bnlib.lab.models.mlp` with ``depth`` tanh layers of ``width`` units (``norm``: ``'none'`` or
    ``'bn'``, before each tanh), whose hidden Linear weights are drawn from ``N(0, gain^2 / fan_in)``: ``gain =
    5/3`` is the standard gain for tanh (``torch.nn.init.calculate_gain('tanh')``), a larger one saturates the
    units of a network without normalization. Uses the global generator (seed it first)."""
    gain = _checks.check_real("gain", gain, 0.0, open_low=True)
    depth = _checks.check_int("depth", depth, 1)
    width = _checks.check_int("width", width, 1)
    model = mlp(in_features, (width,) * depth, num_classes, activation="tanh", norm=norm)
    with torch.no_grad():
        for layer in list(model)[:-1]:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, gain / layer.in_features ** 0.5)
    return model


# --------------------------------------------------------------------------------------------------------
# The data: two halves of the classes, a few examples per class


def select_classes(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The examples of ``classes``, relabelled ``0 .. len(classes) - 1`` in the order given."""
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes: expected distinct class labels, got {classes!r}")
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels to match x, got {len(y)}")
    mask = torch.zeros_like(y, dtype=torch.bool)
    new = torch.full_like(y, -1)
    for k, c in enumerate(classes):
        mask |= y == c
        new[y == c] = k
    if not bool(mask.any()):
        raise ValueError(f"classes: expected labels present in y, got {classes!r}")
    return x[mask], new[mask]


def few_shot(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` examples of each class of ``y``, drawn without replacement with ``generator(seed)``,
    in class order."""
    per_class = _checks.check_int("per_class", per_class, 1)
    g = generator(seed)
    picks = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y.cpu() == c).flatten()
        if len(idx) < per_class:
            raise ValueError(f"per_class: expected at most {len(idx)} (the examples of class {c}), got {per_class}")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    idx = torch.cat(picks).to(y.device)
    return x[idx], y[idx]


def replace_head(model: nn.Sequential, num_classes: int, seed: int = 0) -> nn.Sequential:
    """A copy of ``model`` whose last layer (a Linear) is replaced by a fresh ``Linear`` with ``num_classes``
    outputs, initialized after ``torch.manual_seed(derive_seed(seed))`` (the global generator is left alone)."""
    if not isinstance(model, nn.Sequential) or not len(model) or not isinstance(model[-1], nn.Linear):
        raise TypeError("model: expected an nn.Sequential ending in an nn.Linear")
    num_classes = _checks.check_int("num_classes", num_classes, 1)
    new = copy.deepcopy(model)
    old = new[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed))
        head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new[-1] = head.to(old.weight.device, old.weight.dtype)
    return new


# --------------------------------------------------------------------------------------------------------
# The network, pretraining and fine-tuning


def transfer_cnn(num_classes: int = 5, channels=(8, 16), hidden: int = 64, image_size: int = 28) -> nn.Sequential:
    """[Conv3x3 -> BN -> ReLU -> MaxPool2] per entry of ``channels``, then Flatten -> Linear(hidden) -> BN ->
    ReLU -> Linear(num_classes). Unlike :func:`bnlib.lab.models.small_cnn` (global average pooling) it keeps
    where in the image a feature is, which digits need: about 98 % on the digits 0-4 after 300 steps."""
    num_classes = _checks.check_int("num_classes", num_classes, 1)
    hidden = _checks.check_int("hidden", hidden, 1)
    size = _checks.check_int("image_size", image_size, 2 ** len(channels))
    layers: List[nn.Module] = []
    c_in = 1
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), make_norm("bn", c, 2), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, size = c, size // 2
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, hidden, bias=False), make_norm("bn", hidden, 1),
               nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def pretrain(x: torch.Tensor, y: torch.Tensor, *, seeds: Sequence[int], num_classes: int,
             channels=(8, 16), hidden: int = 64, steps: int = 300, batch_size: int = 32, lr: float = 0.02,
             momentum: float = 0.9, x_eval=None, y_eval=None) -> Tuple[List[nn.Sequential], List[History]]:
    """Train one :func:`transfer_cnn` per seed (network ``j`` initialized and
    fed batches from ``seeds[j]``), all seeds side by side with the packed-seed trainer; returns the networks
    (unpacked, in eval mode) and their histories."""
    pack = PackedNet.from_seeds(lambda: transfer_cnn(num_classes, channels, hidden), seeds).to(x.device, x.dtype)
    hists = train_packed(pack, x, y, steps=steps, batch_size=batch_size, lr=lr, momentum=momentum,
                         x_eval=x_eval, y_eval=y_eval, eval_every=steps)
    nets = [pack.unpack(j).eval() for j in range(pack.k)]
    return nets, hists


def finetune(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, *, mode: str, steps: int, batch_size: int,
             lr: float, momentum: float = 0.9, weight_decay: float = 0.0, decay_norm: bool = True, seed: int = 0,
             x_eval=None, y_eval=None, eval_every: Optional[int] = None, callback=None) -> History:
    """Fine-tune ``model`` (in place) on ``(x, y)`` in ``mode`` (:data:`MODES`, set up by :func:`apply_mode`
    and kept by :func:`bn_mode_hook`) with SGD (``momentum``; ``weight_decay`` on every trainable parameter,
    on γ and β only when ``decay_norm``) through :func:`bnlib.lab.train.train`, batches drawn with ``seed``.
    Evaluation (eval mode) on ``(x_eval, y_eval)`` at step 0 and at the end (or every ``eval_every``)."""
    apply_mode(model, mode)
    lr = _checks.check_real("lr", lr, 0.0, open_low=True)
    momentum = _checks.check_real("momentum", momentum, 0.0, 1.0, open_high=True)
    groups = param_groups(model, weight_decay, decay_norm)
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    hook = bn_mode_hook(mode)
    # train() calls model.train() first; the hook then re-freezes the BN layers before every step
    return train(model, x, y, steps=steps, batch_size=batch_size, lr=lr, optimizer=opt, x_eval=x_eval,
                 y_eval=y_eval, eval_every=eval_every or steps, seed=seed, before_step=hook, callback=callback)


def finetuned_accuracy(model: nn.Sequential, x_eval: torch.Tensor, y_eval: torch.Tensor) -> float:
    """Test accuracy in eval mode."""
    return float(evaluate(model, x_eval, y_eval)[1])


def mode_effects(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, mode: str, *, steps: int = 3,
                 batch_size: int = 8, lr: float = 0.01, seed: int = 0) -> Dict[str, bool]:
    """What fine-tuning a copy of ``model`` for ``steps`` steps in ``mode`` does to its batch norm layers:
    ``batch_statistics`` (the BN layers ran in train mode, normalizing with the batch's statistics),
    ``running_stats_changed``, ``affine_changed`` (γ or β) and ``weights_changed`` (the other parameters).
    ``model`` itself is left as it was."""
    _check_mode(mode)
    net = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    layers = bn_layers(net)
    if not layers:
        raise ValueError("model: expected a network with batch norm layers, got none")
    flags: List[bool] = []
    handles = [m.register_forward_pre_hook(lambda mod, inputs: flags.append(mod.training)) for m in layers]
    try:
        finetune(net, x, y, mode=mode, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    finally:
        for h in handles:
            h.remove()
    names = {id(m): n for n, m in net.named_modules()}
    bn_prefixes = [names[id(m)] + "." for m in layers]
    after = net.state_dict()

    def changed(pred) -> bool:
        return any(not torch.equal(before[k], after[k]) for k in before if pred(k))

    def in_bn(k: str) -> bool:
        return any(k.startswith(p) for p in bn_prefixes)

    return {
        "batch_statistics": bool(flags) and all(flags),
        "running_stats_changed": changed(lambda k: in_bn(k) and k.rsplit(".", 1)[-1] in ("running_mean",
                                                                                           "running_var")),
        "affine_changed": changed(lambda k: in_bn(k) and k.rsplit(".", 1)[-1] in ("weight", "bias")),
        "weights_changed": changed(lambda k: not in_bn(k)),
    }


# --------------------------------------------------------------------------------------------------------
# Verdicts over seeds

#: The margin of a useful gain in test accuracy (1 point: 5 of the 500 test digits 5-9 of the book's data).
DELTA = 0.01

#: The rule that turns paired differences over seeds into a verdict (printed by the chapter).
VERDICT_RULE = ("claim 'A beats B': per seed d = accuracy(A) - accuracy(B), both fine-tuned from the same "
                "pretrained network, examples, head and batches; confirmed if median(d) >= delta and d > 0 in every "
                "seed; refuted if median(d) < delta / 2 (no gain of the claimed size, or a loss); qualified otherwise "
                "(delta = 1 point of accuracy)")


def paired_verdict(a, b, delta: float = DELTA) -> Tuple[str, np.ndarray]:
    """The verdict of :data:`VERDICT_RULE` on the claim "A beats B" from per-seed accuracies ``a`` and ``b``
    (the same seeds in the same order), and the differences ``a - b``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 3:
        raise ValueError(f"a, b: expected two 1-D sequences of the same length >= 3 (one value per seed), got "
                         f"shapes {a.shape} and {b.shape}")
    delta = _checks.check_real("delta", delta, 0.0, open_low=True)
    d = a - b
    med = float(np.median(d))
    if med >= delta and bool(np.all(d > 0)):
        return "confirmed", d
    if med < delta / 2:
        return "refuted", d
    return "qualified", d


def run_arms(nets: Sequence[nn.Sequential], arms: Dict[str, dict], data_for_seed: Callable[[int], tuple], *,
             seeds: Sequence[int], num_classes: int, x_eval: torch.Tensor, y_eval: torch.Tensor,
             **finetune_kwargs) -> Dict[str, np.ndarray]:
    """Fine-tune a fresh copy of ``nets[j]`` (with a new head of ``num_classes`` outputs from ``seeds[j]``) in
    every arm (``name -> keyword arguments of`` :func:`finetune`, e.g. ``{'mode': 'keras'}``) on
    ``data_for_seed(seeds[j])`` with batches from ``seeds[j]``; returns ``{arm: accuracies over seeds}``.

    A loop over seeds rather than the packed-seed trainer (which :func:`pretrain` uses): the arms need optimizer
    groups with their own weight decay, and at the batch sizes of fine-tuning (2 to 10) a pack measured no
    faster per run on the book's 2-core machine."""
    if len(nets) != len(seeds):
        raise ValueError(f"seeds: expected one seed per network ({len(nets)}), got {len(seeds)}")
    out = {name: [] for name in arms}
    for net, seed in zip(nets, seeds):
        x, y = data_for_seed(seed)
        start = replace_head(net, num_classes, seed)
        for name, kwargs in arms.items():
            model = copy.deepcopy(start)
            finetune(model, x, y, seed=seed, **{**finetune_kwargs, **kwargs})
            out[name].append(finetuned_accuracy(model, x_eval, y_eval))
    return {name: np.asarray(v) for name, v in out.items()}
