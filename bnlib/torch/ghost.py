"""Ghost batch normalization modules (drop-in for ``torch.nn.BatchNorm1d``/``2d``); the functional form and
its hand-derived backward are in :mod:`bnlib.torch._ghost_batch_norm` (``bnlib.torch.functional.ghost_batch_norm``).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _checks
from ._ghost_batch_norm import ghost_batch_norm
from .modules import _BatchNorm, _check_ndim, _NormBase

__all__ = ["ghost_batch_norm", "GhostBatchNorm1d", "GhostBatchNorm2d"]


class _GhostBatchNorm(_BatchNorm):
    """Ghost batch norm module: :class:`bnlib.torch.modules._BatchNorm` whose ``_functional`` hook splits
    the batch into virtual batches (keyword-only ``virtual_batch_size``, default 32). Parameters, buffers
    and state dict are those of ``torch.nn.BatchNorm*``; ``num_batches_tracked`` counts virtual batches."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, virtual_batch_size: int = 32) -> None:
        _checks.check_positive_int("virtual_batch_size", virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         backend="torch")
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        _checks.check_num_channels(input.shape[1], self.num_features)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        nbt = self.num_batches_tracked if (self.training and self.track_running_stats) else None
        return ghost_batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                self.momentum, self.eps, self.virtual_batch_size, num_batches_tracked=nbt)

    def extra_repr(self) -> str:
        return _NormBase.extra_repr(self) + f", virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm of ``(N, C)`` or ``(N, C, L)`` input (drop-in for :class:`torch.nn.BatchNorm1d`)."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (2, 3))


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm of ``(N, C, H, W)`` input (drop-in for :class:`torch.nn.BatchNorm2d`)."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (4,))
