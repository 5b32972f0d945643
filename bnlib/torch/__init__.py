"""bnlib.torch: drop-in ``torch.nn`` normalization layers with hand-derived autograd.

Modules (same constructor arguments, parameter/buffer names and state dicts as ``torch.nn``):
``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm1d``,
``InstanceNorm2d``, ``InstanceNorm3d``; and the variants ``BatchRenorm1d``, ``BatchRenorm2d``, ``BatchRenorm3d``
(with an optional warm-up ``RenormSchedule``), ``BatchLayerNorm``, ``GhostBatchNorm1d``, ``GhostBatchNorm2d``.

Functions: :mod:`bnlib.torch.functional` (``batch_norm``, ``layer_norm``, ``rms_norm``, ``group_norm``,
``instance_norm``, ``batch_renorm``, ``batch_layer_norm``, ``ghost_batch_norm``).

Tools: :func:`convert` (swap a model's ``torch.nn`` norm layers for bnlib's, keeping their state) and
:func:`fold_batchnorm` (an inference copy with batch norms folded into the preceding Linear/Conv).
Diagnostics (:mod:`bnlib.torch.diagnostics`): :class:`LayerStats` (per-layer activation and gradient
statistics) and :class:`UpdateRatio` (the update:data ratio of each parameter tensor).

GPU: ``VERIFIED_TRITON_ARCHS`` lists the GPU architectures on which the Triton batch-norm kernels were run
and checked; ``backend='auto'`` uses them only there (see :func:`bnlib.torch.functional.batch_norm`).

Subclassing: :class:`bnlib.torch.modules._BatchNorm` calls the hook ``_functional(input, running_mean,
running_var, weight, bias, training, momentum, eps)``; override it to change how a batch is normalized
(``SyncBatchNorm`` in :mod:`bnlib.torch.sync_batchnorm` does).
"""
from __future__ import annotations

from . import functional
from ._batch_norm import VERIFIED_TRITON_ARCHS, VerifiedArch
from ._batch_renorm import RenormSchedule
from .convert import convert
from .diagnostics import LayerStats, UpdateRatio, grad_data_ratios, update_ratio
from .fold import FoldReport, fold_batchnorm
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, ghost_batch_norm
from .modules import (
    BatchLayerNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
    _BatchNorm,  # noqa: F401 (the base classes, for isinstance checks: bnlib.torch._BatchNorm)
    _NormBase,  # noqa: F401
)

__all__ = [
    "functional",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LayerNorm", "RMSNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule", "BatchLayerNorm",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "ghost_batch_norm",
    "convert", "fold_batchnorm", "FoldReport",
    "LayerStats", "UpdateRatio", "update_ratio", "grad_data_ratios",
    "VERIFIED_TRITON_ARCHS", "VerifiedArch",
]


def __getattr__(name):  # SyncBatchNorm lives in its own module (written separately), imported on first use
    if name in ("SyncBatchNorm", "convert_sync_batchnorm"):
        from . import sync_batchnorm
        return getattr(sync_batchnorm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
