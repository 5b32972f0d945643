r"""Fold batch norms into the preceding Linear/Conv layer for inference ("fused batch normalization").

In evaluation a batch norm is a per-channel affine map, ``y = s * z + t`` with ``s = gamma / sqrt(var + eps)``
and ``t = beta - s * mean`` (running statistics). When ``z = W x + b`` comes from a Linear or Conv layer,
``y = (s W) x + (s b + t)``: scaling the layer's output-channel weights by ``s`` and replacing its bias by
``s (b - mean) + beta`` removes the batch norm at no cost in accuracy.

Patterns detected: a batch norm (``torch.nn`` or bnlib ``BatchNorm*``, and their variants whose evaluation is
plain batch norm: ``SyncBatchNorm``, ``BatchRenorm*``, ``GhostBatchNorm*``) that is the **next child** of a
``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` inside the same ``nn.Sequential`` (at any depth of
nesting). The folded batch norm is replaced by :class:`Folded` (an identity that names the layer it went
into). Everything else is left in place and listed in the report with the reason:

- the batch norm is in training mode, or has no running statistics (it normalizes with batch statistics);
- it is not directly preceded by a foldable layer in a Sequential (e.g. ResNet blocks that call
  ``self.bn1(self.conv1(x))`` in ``forward``; a ConvTranspose; a batch norm first in its Sequential);
- the layer's output channels differ from the batch norm's ``num_features``;
- the layer or the batch norm is used at more than one place in the model (shared weights).

A Linear followed by ``BatchNorm1d`` is folded for 2-D input ``(N, features)``; the :class:`Folded` left in
place raises if it ever sees other input, because then the two layers act on different dimensions.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from torch import nn

from .modules import _BatchNorm as _BnlibBatchNorm

__all__ = ["fold_batchnorm", "FoldReport", "Folded"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.modules.batchnorm._BatchNorm, _BnlibBatchNorm)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: ``folded`` lists ``(layer_name, bn_name)`` pairs, ``skipped`` lists
    ``(bn_name, reason)``."""

    folded: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s), skipped {len(self.skipped)}"]
        lines += [f"  folded {bn} into {layer}" for layer, bn in self.folded]
        lines += [f"  skipped {bn}: {reason}" for bn, reason in self.skipped]
        return "\n".join(lines)


class Folded(nn.Identity):
    """What is left of a batch norm folded into ``into``; for a Linear fold it checks the input is 2-D."""

    def __init__(self, into: str, bn_repr: str, require_2d: bool = False) -> None:
        super().__init__()
        self.into = into
        self.bn_repr = bn_repr
        self.require_2d = require_2d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.require_2d and input.dim() != 2:
            raise ValueError(f"this {self.bn_repr} was folded into the Linear layer {self.into!r}, which is "
                             f"valid for 2-D (N, features) input only, got {input.dim()}-D input; fold a "
                             "model that sees other input shapes without it")
        return input

    def extra_repr(self) -> str:
        return f"folded into {self.into!r}: {self.bn_repr}"


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN_TYPES)


def _bn_reason(bn: nn.Module):
    if bn.training:
        return ("in training mode: it normalizes with batch statistics, which folding cannot reproduce; "
                "call model.eval() first")
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): it normalizes with batch statistics"
    return None


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight
    dt = torch.float64
    scale = bn.running_var.to(dt).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(dt)
    shift = -bn.running_mean.to(dt) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dt)
    new_w = w.to(dt) * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    old_b = layer.bias.to(dt) if layer.bias is not None else torch.zeros_like(scale)
    new_b = old_b * scale + shift
    layer.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)


def fold_batchnorm(model: nn.Module, *, warn: bool = True, return_report: bool = False):
    """Return an inference copy of ``model`` with batch norms folded into the preceding Linear/Conv
    (see the module docstring for the patterns); ``model`` itself is not changed.

    Every batch norm that is not folded is listed, with the reason, in the :class:`FoldReport` (attached to
    the copy as ``fold_report``; returned as ``(copy, report)`` with ``return_report=True``) and, when
    ``warn``, in one ``UserWarning``. Outputs of the copy equal those of ``model`` in its current mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    folded_model = copy.deepcopy(model)
    report = FoldReport()
    uses = {}
    for _, m in folded_model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    names = {id(m): n for n, m in folded_model.named_modules()}
    handled = set()

    for seq_name, seq in list(folded_model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules.keys())
        for i, key in enumerate(keys):
            bn = seq._modules[key]
            if bn is None or not _is_bn(bn) or id(bn) in handled:
                continue
            handled.add(id(bn))
            bn_name = names.get(id(bn), f"{seq_name}.{key}" if seq_name else key)
            reason = _bn_reason(bn)
            prev = seq._modules[keys[i - 1]] if i > 0 else None
            if reason is None:
                if prev is None:
                    reason = "first layer of its nn.Sequential: no preceding Linear/Conv to fold into"
                elif not isinstance(prev, _FOLDABLE):
                    reason = (f"preceded by {type(prev).__name__}, not by Linear/Conv1d/Conv2d/Conv3d")
                else:
                    out = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
                    if out != bn.num_features:
                        reason = (f"preceding {type(prev).__name__} has {out} output channels, the batch norm "
                                  f"{bn.num_features}")
                    elif uses.get(id(prev), 0) > 1 or uses.get(id(bn), 0) > 1:
                        reason = "the layer or the batch norm is used at more than one place (shared weights)"
            if reason is not None:
                report.skipped.append((bn_name, reason))
                continue
            layer_name = names.get(id(prev), keys[i - 1])
            _fold_pair(prev, bn)
            seq._modules[key] = Folded(layer_name, f"{type(bn).__name__}({bn.num_features})",
                                       require_2d=isinstance(prev, nn.Linear))
            report.folded.append((layer_name, bn_name))

    for name, m in folded_model.named_modules():  # batch norms outside any Sequential pattern
        if _is_bn(m) and id(m) not in handled:
            handled.add(id(m))
            reason = _bn_reason(m) or ("not the next child of a Linear/Conv in an nn.Sequential (e.g. called "
                                       "from a custom forward)")
            report.skipped.append((name, reason))

    if warn and report.skipped:
        warnings.warn("fold_batchnorm left batch norm(s) in place:\n" + "\n".join(
            f"  {bn}: {reason}" for bn, reason in report.skipped), UserWarning, stacklevel=2)
    folded_model.fold_report = report
    return (folded_model, report) if return_report else folded_model
