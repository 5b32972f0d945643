"""Swap the ``torch.nn`` normalization layers of a model for bnlib's (or back), keeping their state.

``convert(model)`` replaces every ``torch.nn`` ``BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm`` and
``InstanceNorm1d/2d/3d`` (exact types; subclasses such as the lazy variants are left alone) by its bnlib twin.
The new module takes over the old one's attributes *by reference*: the same ``Parameter`` and buffer tensors
(so an optimizer built before the conversion keeps working), the same training flag, hooks, device and
dtype. ``convert(model, to="torch")`` does the reverse. ``torch.nn.SyncBatchNorm`` maps to
``bnlib.torch.SyncBatchNorm`` when that module is importable.

The model is modified in place and returned; when ``model`` itself is a normalization layer the returned
object is the replacement, so always use the return value (as with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from . import modules as M

__all__ = ["convert"]

_TORCH_TO_BNLIB = {
    nn.BatchNorm1d: M.BatchNorm1d,
    nn.BatchNorm2d: M.BatchNorm2d,
    nn.BatchNorm3d: M.BatchNorm3d,
    nn.LayerNorm: M.LayerNorm,
    nn.GroupNorm: M.GroupNorm,
    nn.InstanceNorm1d: M.InstanceNorm1d,
    nn.InstanceNorm2d: M.InstanceNorm2d,
    nn.InstanceNorm3d: M.InstanceNorm3d,
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _TORCH_TO_BNLIB[nn.RMSNorm] = M.RMSNorm


def _mapping(to: str) -> Dict[type, type]:
    mapping = dict(_TORCH_TO_BNLIB)
    try:
        from .sync_batchnorm import SyncBatchNorm  # optional, written separately
        mapping[nn.SyncBatchNorm] = SyncBatchNorm
    except Exception:
        pass
    if to == "bnlib":
        return mapping
    if to == "torch":
        return {v: k for k, v in mapping.items()}
    raise ValueError(f"to: expected 'bnlib' or 'torch', got {to!r}")


def _swap(module: nn.Module, cls: type, to: str, backend: Optional[str]) -> nn.Module:
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key, value in state.items():  # fresh containers, same tensors/hooks
        if isinstance(value, dict):
            state[key] = type(value)(value) if not hasattr(value, "copy") else value.copy()
    new.__dict__.update(state)
    if to == "bnlib" and isinstance(new, M._BatchNorm):
        new.__dict__.setdefault("backend", backend or "auto")
        if backend is not None:
            new.backend = backend
        if cls.__name__ == "SyncBatchNorm":  # attributes bnlib's SyncBatchNorm sets in __init__
            new.__dict__.setdefault("process_group", None)
            new.__dict__.setdefault("_warned_no_group", False)
    if to == "torch":
        for key in ("backend", "_warned_no_group"):
            new.__dict__.pop(key, None)
    return new


def convert(model: nn.Module, *, to: str = "bnlib", backend: Optional[str] = None) -> nn.Module:
    """Replace the normalization layers of ``model`` (see the module docstring); returns the model.

    Args:
        model: any ``nn.Module``.
        to: ``"bnlib"`` (``torch.nn`` -> bnlib, the default) or ``"torch"`` (bnlib -> ``torch.nn``).
        backend: for bnlib batch norms, ``'auto'`` (default), ``'torch'`` or ``'triton'``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    mapping = _mapping(to)
    return _convert(model, mapping, to, backend, {})


def _convert(module, mapping, to, backend, memo):
    if id(module) in memo:  # shared submodules stay shared
        return memo[id(module)]
    cls = mapping.get(type(module))
    if cls is not None:
        new = _swap(module, cls, to, backend)
        memo[id(module)] = new
        return new
    memo[id(module)] = module
    for name, child in list(module._modules.items()):  # every slot, also repeated (shared) children
        if child is None:
            continue
        new_child = _convert(child, mapping, to, backend, memo)
        if new_child is not child:
            module._modules[name] = new_child
    return module
