"""Drop-in replacements for the ``torch.nn`` normalization layers, built on :mod:`bnlib.torch.functional`.

Same constructor arguments and defaults, parameter and buffer names (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``; absent ones registered as ``None``) and state-dict format as
``torch.nn``, so ``load_state_dict`` works in both directions between a bnlib module and its ``torch.nn``
twin. The hierarchy mirrors ``torch/nn/modules/batchnorm.py``:

- :class:`_NormBase` holds the parameters and buffers (``reset_parameters``, ``reset_running_stats``,
  ``extra_repr``, loading old state dicts without ``num_batches_tracked``);
- :class:`_BatchNorm` implements ``forward``: it checks the input rank (``_check_input_dim``), then every
  argument (the hook ``_validate(input, running_mean, running_var, training)``) *before*
  ``num_batches_tracked`` or the running statistics change, works out the averaging factor (``momentum``,
  or ``1 / num_batches_tracked`` when ``momentum=None``) and whether batch statistics are used, and then
  calls the **hook** ``self._functional(input, running_mean, running_var, weight, bias, training,
  factor, eps)``, which must return the output and update the running statistics in place when
  ``training`` and they are given. Subclasses change the normalization by overriding ``_functional``
  (and, if their rules differ, ``_validate``): :class:`BatchRenorm1d` (batch renormalization),
  :class:`BatchLayerNorm`, and ``SyncBatchNorm`` (:mod:`bnlib.torch.sync_batchnorm`, statistics reduced
  across processes) do exactly that; ``GhostBatchNorm*`` (:mod:`bnlib.torch.ghost`) also overrides
  ``forward``, because it counts virtual batches in ``num_batches_tracked``;
- ``BatchNorm1d/2d/3d`` only add ``_check_input_dim``.

``BatchNorm*`` take two extra keyword-only arguments, neither part of the state dict:
``backend='auto'|'torch'|'triton'`` (see :func:`bnlib.torch.functional.batch_norm`) and
``convention='torch'|'keras'``: with ``'keras'`` the running statistics follow Keras (``momentum`` weighs the
*old* average, e.g. ``BatchNorm1d(C, momentum=0.99, eps=1e-3, convention='keras')``; the running variance
is the biased one), as ``bnlib.numpy``'s modules do.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import Parameter, init

from .. import _checks
from . import functional as BF
from ._batch_norm import BACKENDS, _check_convention, apply_batch_norm, check_batch_norm_args, quick_args_ok
from ._batch_renorm import RenormSchedule, check_schedule

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "BatchLayerNorm",
]

_NDIM_LAYOUT = {
    (2, 3): "(N, C) or (N, C, L)",
    (4,): "(N, C, H, W)",
    (5,): "(N, C, D, H, W)",
}


def _check_ndim(input: Tensor, allowed) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    _checks.check_ndim(input.dim(), allowed, layout=_NDIM_LAYOUT.get(tuple(allowed), ""))


class _NormBase(nn.Module):
    """Parameters and buffers shared by batch and instance normalization (as ``torch.nn``'s ``_NormBase``)."""

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        _checks.check_positive_int("num_features", num_features)
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if self.affine:
            self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, bias={use_bias}, "
                "track_running_stats={track_running_stats}".format(**self.__dict__,
                                                                   use_bias=self.bias is not None))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # version 2 added num_batches_tracked (default 0)
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked is not None
                                   and self.num_batches_tracked.device != torch.device("meta")
                                   else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


_ONE = torch.tensor(1)  # num_batches_tracked.add_(_ONE) costs two thirds of add_(1)


class _BatchNorm(_NormBase):
    """Batch normalization over dimension 1 of an ``(N, C, *)`` input.

    Subclasses override :meth:`_functional` (the normalization) and :meth:`_check_input_dim` (the accepted
    ranks); ``forward`` handles the running-statistics bookkeeping exactly like ``torch.nn``.

    ``forward`` is the hot path of every training step, so it keeps Python work small: parameters and buffers
    are read from their dicts, and when a subclass keeps this class's ``_validate`` a cheap test of the common
    case (:func:`bnlib.torch._batch_norm.quick_args_ok`) stands in for it; only when that test fails does
    ``_validate`` run (and raise, with its message, before any state changes). When ``_functional`` is this
    class's own, the already-checked arguments go straight to the backend dispatch."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, backend: str = "auto", convention: str = "torch") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
        _check_convention(convention, momentum)
        if convention != "torch" and type(self)._functional is not _BatchNorm._functional:
            raise ValueError(f"convention: expected 'torch' for {type(self).__name__} (Keras' convention is "
                             f"plain batch norm's), got {convention!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.backend = backend
        self.convention = convention

    def _functional(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                    eps: float) -> Tensor:
        """The hook: normalize ``input`` (and update the running statistics in place when ``training`` and
        they are given). Arguments as :func:`bnlib.torch.functional.batch_norm`."""
        return BF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                             backend=self.backend)

    def _validate(self, input: Tensor, running_mean, running_var, training: bool) -> None:
        """Everything that can be wrong with the arguments, checked before any state changes."""
        _checks.check_num_channels(input.shape[1], self.num_features)
        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias, training,
                              self.momentum, self.eps, check_momentum=False)
        if training:  # eps=0 is valid with running statistics, not with batch statistics (torch's rule)
            _checks.check_training_eps(self.eps)
        _checks.check_momentum(self.momentum)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        training = self.training
        try:  # the registered parameters and buffers, read from their dicts (nn.Module.__getattr__ is slow)
            params, buffers = self._parameters, self._buffers
            weight, bias = params["weight"], params["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
            counter = buffers["num_batches_tracked"]
        except KeyError:  # one was deleted or replaced by a plain attribute: the ordinary lookup
            weight, bias, running_mean, running_var = self.weight, self.bias, self.running_mean, self.running_var
            counter = self.num_batches_tracked
        eps, momentum = self.eps, self.momentum
        # batch statistics in training, and in evaluation when there are no running statistics
        bn_training = training or (running_mean is None and running_var is None)
        # running statistics are passed when they are updated (training and tracked) or used (evaluation)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        cls = type(self)
        # the full checks (hook) unless the cheap test of the common case vouches for _BatchNorm's own
        if not (cls._validate is _BatchNorm._validate and input.shape[1] == self.num_features
                and (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0))
                and quick_args_ok(input, running_mean, running_var, weight, bias, bn_training, eps)):
            self._validate(input, running_mean, running_var, bn_training)
        keras = self.__dict__.get("convention", "torch") == "keras"
        if keras:
            _check_convention("keras", momentum)  # (momentum may have been set to None since __init__)
        factor = 0.0 if momentum is None else momentum
        if training and self.track_running_stats and counter is not None:
            counter.add_(_ONE if counter.dtype == torch.long and counter.is_cpu else 1)
            if momentum is None:  # cumulative moving average
                if (not keras and cls._functional is _BatchNorm._functional and running_mean is not None
                        and torch.compiler.is_compiling()):
                    # float(counter) would end dynamo's graph inside this forward, which then compiles it as a
                    # frame of its own, once per layer shape and mode: the recompile limit. Traced instead:
                    return _cumulative_average_traced(self, input, running_mean, running_var, weight, bias,
                                                      counter, eps)
                factor = 1.0 / float(counter)
        if cls._functional is _BatchNorm._functional:  # the arguments are checked: straight to the dispatch
            if keras:  # Keras' momentum weighs the old average; the running variance is the biased one
                return apply_batch_norm(input, running_mean, running_var, weight, bias, bn_training, 1.0 - factor,
                                        eps, self.backend, unbiased=False)
            return apply_batch_norm(input, running_mean, running_var, weight, bias, bn_training, factor, eps,
                                    self.backend)
        return self._functional(input, running_mean, running_var, weight, bias, bn_training, factor, eps)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s = s if self.backend == "auto" else s + f", backend={self.backend!r}"
        return s if self.__dict__.get("convention", "torch") == "torch" else s + f", convention={self.convention!r}"


def _cumulative_average_traced(module: _BatchNorm, input: Tensor, running_mean: Tensor, running_var: Tensor,
                               weight: Optional[Tensor], bias: Optional[Tensor], counter: Tensor,
                               eps: float) -> Tensor:
    """``momentum=None`` in training under ``torch.compile``: normalize with the batch statistics (running
    statistics not passed), then ``running += (batch - running) / num_batches_tracked`` with the weight kept a
    tensor. (Eager code reads ``float(num_batches_tracked)``, a ``Tensor.item()`` that dynamo cannot trace.)
    The same update as the functional's: unbiased batch variance, statistics in float64 for float64 input and
    in float32 otherwise, running statistics untouched by an empty batch."""
    out = apply_batch_norm(input, None, None, weight, bias, True, 0.0, eps, module.backend)
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if count > 0:
        with torch.no_grad():
            cd = torch.float64 if input.dtype == torch.float64 else torch.float32
            x = input.detach().to(cd)
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dims)
            var = x.var(dims, correction=1 if count > 1 else 0)
            w = counter.to(cd).reciprocal()
            for buf, new in ((running_mean, mean), (running_var, var)):
                old = buf.to(cd)
                buf.copy_(old + (new - old) * w)
    return out


class BatchNorm1d(_BatchNorm):
    """Batch normalization of ``(N, C)`` or ``(N, C, L)`` input; drop-in for :class:`torch.nn.BatchNorm1d`."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (2, 3))


class BatchNorm2d(_BatchNorm):
    """Batch normalization of ``(N, C, H, W)`` input; drop-in for :class:`torch.nn.BatchNorm2d`."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (4,))


class BatchNorm3d(_BatchNorm):
    """Batch normalization of ``(N, C, D, H, W)`` input; drop-in for :class:`torch.nn.BatchNorm3d`."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (5,))


# ----------------------------------------------------------------------------------------------------------
class _BatchRenorm(_BatchNorm):
    """Batch renormalization (Ioffe 2017). Running statistics are required (``track_running_stats=True``); in
    evaluation it is batch norm with them.

    ``r_max`` and ``d_max`` are plain attributes: the final clipping limits. ``schedule`` (keyword, default
    ``None``: the limits apply from the first step, as before) is a :class:`RenormSchedule`, the paper's
    warm-up: ``r_max=1, d_max=0`` (plain batch norm) for ``schedule.warmup_steps`` training steps, then linear
    ramps to ``r_max`` (reached at ``schedule.r_max_steps``) and ``d_max`` (at ``schedule.d_max_steps``). The
    step is the ``num_batches_tracked`` buffer, so the schedule is saved and restored with the state dict and
    restarts with :meth:`reset_running_stats`; :meth:`current_limits` gives the limits of the next training
    step. (With a schedule each training forward reads the counter, ``int(num_batches_tracked)``: one device
    synchronization on CUDA.)"""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 schedule: Optional[RenormSchedule] = None) -> None:
        if not track_running_stats:
            raise ValueError("track_running_stats: expected True (batch renormalization needs running "
                             "statistics), got False")
        _checks.check_renorm_limits(r_max, d_max)
        check_schedule(schedule)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         backend="torch")
        self.r_max = r_max
        self.d_max = d_max
        self.schedule = schedule

    def current_limits(self) -> Tuple[float, float]:
        """``(r_max, d_max)`` that the next training step uses (the schedule's at ``num_batches_tracked``)."""
        r_max, d_max = _checks.check_renorm_limits(self.r_max, self.d_max)
        schedule = check_schedule(self.__dict__.get("schedule"))
        if schedule is None:
            return r_max, d_max
        return schedule.limits(int(self.num_batches_tracked), r_max, d_max)

    def _validate(self, input, running_mean, running_var, training) -> None:
        super()._validate(input, running_mean, running_var, training)
        _checks.check_renorm_limits(self.r_max, self.d_max)
        if check_schedule(self.__dict__.get("schedule")) is not None and self.num_batches_tracked is None:
            raise ValueError("schedule: needs the num_batches_tracked buffer (the step count), got None")

    def _functional(self, input, running_mean, running_var, weight, bias, training, momentum, eps):
        r_max, d_max = self.r_max, self.d_max
        schedule = self.__dict__.get("schedule")
        if training and self.training and schedule is not None:
            # forward has already counted this step: the steps taken before it are num_batches_tracked - 1
            r_max, d_max = schedule.limits(int(self.num_batches_tracked) - 1, r_max, d_max)
        return BF.batch_renorm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                               r_max=r_max, d_max=d_max)

    def extra_repr(self) -> str:
        s = _NormBase.extra_repr(self) + f", r_max={self.r_max}, d_max={self.d_max}"
        schedule = self.__dict__.get("schedule")
        return s if schedule is None else s + f", schedule={schedule}"


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization of ``(N, C)`` or ``(N, C, L)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (2, 3))


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization of ``(N, C, H, W)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (4,))


class BatchRenorm3d(_BatchRenorm):
    """Batch renormalization of ``(N, C, D, H, W)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (5,))


# ----------------------------------------------------------------------------------------------------------
class _InstanceNorm(_NormBase):
    """Instance normalization, as ``torch.nn``'s ``_InstanceNorm`` (affine and running statistics off by
    default; unbatched input accepted)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def _get_no_batch_dim(self) -> int:
        raise NotImplementedError

    def _handle_no_batch_input(self, input: Tensor) -> Tensor:
        return self._apply_instance_norm(input.unsqueeze(0)).squeeze(0)

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return BF.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training or not self.track_running_stats,
                                self.momentum if self.momentum is not None else 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        # version 1 removed running_mean/running_var when track_running_stats=False (the default)
        if version is None and not self.track_running_stats:
            keys = [prefix + n for n in ("running_mean", "running_var") if prefix + n in state_dict]
            if keys:
                error_msgs.append("Unexpected running stats buffer(s) {names} for {klass} with "
                                  "track_running_stats=False.".format(names=" and ".join(f'"{k}"' for k in keys),
                                                                      klass=self.__class__.__name__))
                for key in keys:
                    state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match num_features "
                                 f"({self.num_features}), but got: {input.size(feature_dim)}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. You can silence "
                          "this warning by not passing in num_features, which is not used because "
                          "affine=False", stacklevel=2)
        if input.dim() == self._get_no_batch_dim():
            return self._handle_no_batch_input(input)
        return self._apply_instance_norm(input)


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization of ``(N, C, L)`` or ``(C, L)`` input; drop-in for :class:`torch.nn.InstanceNorm1d`."""

    def _get_no_batch_dim(self) -> int:
        return 2

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (2, 3))


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization of ``(N, C, H, W)`` or ``(C, H, W)`` input; drop-in for
    :class:`torch.nn.InstanceNorm2d`."""

    def _get_no_batch_dim(self) -> int:
        return 3

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (3, 4))


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization of ``(N, C, D, H, W)`` or ``(C, D, H, W)`` input; drop-in for
    :class:`torch.nn.InstanceNorm3d`."""

    def _get_no_batch_dim(self) -> int:
        return 4

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (4, 5))


# ----------------------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """Layer normalization over the trailing ``normalized_shape`` dims; drop-in for :class:`torch.nn.LayerNorm`."""

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        _checks.check_eps(eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if self.elementwise_affine:
            self.weight = Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
            if bias:
                self.bias = Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return BF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return ("{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, "
                "bias={use_bias}".format(**self.__dict__, use_bias=self.bias is not None))


class GroupNorm(nn.Module):
    """Group normalization of ``(N, C, *)`` input; drop-in for :class:`torch.nn.GroupNorm`."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        _checks.check_positive_int("num_channels", num_channels)
        _checks.check_num_groups(num_groups, num_channels)
        _checks.check_eps(eps)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if self.affine:
            self.weight = Parameter(torch.empty(num_channels, **factory_kwargs))
            if bias:
                self.bias = Parameter(torch.empty(num_channels, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return BF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return ("{num_groups}, {num_channels}, eps={eps}, affine={affine}, "
                "bias={use_bias}".format(**self.__dict__, use_bias=self.bias is not None))


# ----------------------------------------------------------------------------------------------------------
class BatchLayerNorm(_BatchNorm):
    """Batch layer normalization (Ziaee & Cano 2022) of ``(N, C, *)`` input (2-5 dims); formula and choices
    in :mod:`bnlib.torch._batch_layer_norm` (the same as :class:`bnlib.numpy.BatchLayerNorm`).

    ``eps`` defaults to 1e-3 as in the authors' code. Running statistics are the batch part's, PyTorch-style
    (same buffers and state dict as ``BatchNorm*``). ``batch_size`` (keyword-only) fixes ``m`` in the mixing
    weights (the authors' code uses the training batch size, also at inference); ``None`` uses each input's
    own batch size."""

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, batch_size: Optional[int] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         backend="torch")
        self.batch_size = None if batch_size is None else _checks.check_positive_int("batch_size", batch_size)

    def _check_input_dim(self, input: Tensor) -> None:
        _check_ndim(input, (2, 3, 4, 5))

    def _functional(self, input, running_mean, running_var, weight, bias, training, momentum, eps):
        return BF.batch_layer_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                   batch_size=self.batch_size)

    def extra_repr(self) -> str:
        return _NormBase.extra_repr(self) + f", batch_size={self.batch_size}"


# ----------------------------------------------------------------------------------------------------------
def _as_shape(normalized_shape) -> tuple:
    """``normalized_shape`` as a tuple when it is iterable (itself otherwise, for the check to reject)."""
    try:
        return tuple(normalized_shape)
    except TypeError:
        return normalized_shape


class RMSNorm(nn.Module):
    """RMS normalization (Zhang & Sennrich 2019) over the trailing ``normalized_shape`` dims; drop-in for
    :class:`torch.nn.RMSNorm` (same arguments and defaults, one parameter ``weight``, same state dict and
    ``repr``). ``eps=None`` uses the machine epsilon of the computation dtype, as torch does; formula and
    backward in :mod:`bnlib.torch._rms_norm`."""

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        ns = _as_shape(normalized_shape)
        self.normalized_shape = _checks.check_normalized_shape(ns, ns)  # positive ints, else naming it
        if eps is not None:
            _checks.check_eps(eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if self.elementwise_affine:
            self.weight = Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return BF.rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(**self.__dict__)


__all__.append("RMSNorm")
