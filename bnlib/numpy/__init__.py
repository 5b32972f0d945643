"""bnlib.numpy -- the NumPy reference: forward passes and hand-derived backward passes.

Functions mirror ``torch.nn.functional`` (same argument names, order and defaults), so what a reader learns
here transfers to PyTorch; each has a ``*_backward`` twin that takes the forward's inputs (not an opaque cache)
and returns ``(dx, dweight, dbias)``:

=====================================  ========================================================================
``batch_norm``                         ``(x, running_mean, running_var, weight=None, bias=None, training=False,
                                       momentum=0.1, eps=1e-5, *, num_batches_tracked=None)``
``batch_norm_backward``                ``(dy, x, weight=None, eps=1e-5, *, training=True, running_mean=None,
                                       running_var=None)``
``keras_batch_norm``                   ``(x, moving_mean, moving_variance, gamma=None, beta=None, training=False,
                                       momentum=0.99, epsilon=1e-3)`` -- Keras's bookkeeping
``layer_norm`` / ``_backward``         ``(x, normalized_shape, weight=None, bias=None, eps=1e-5)`` /
                                       ``(dy, x, normalized_shape, weight=None, eps=1e-5)``
``rms_norm`` / ``_backward``           ``(x, normalized_shape, weight=None, eps=None)`` /
                                       ``(dy, x, normalized_shape, weight=None, eps=None)`` (Zhang & Sennrich
                                       2019; returns ``(dx, dweight)``: no bias)
``group_norm`` / ``_backward``         ``(x, num_groups, weight=None, bias=None, eps=1e-5)`` /
                                       ``(dy, x, num_groups, weight=None, eps=1e-5)``
``instance_norm`` / ``_backward``      ``(x, running_mean=None, running_var=None, weight=None, bias=None,
                                       use_input_stats=True, momentum=0.1, eps=1e-5)``
``batch_renorm`` / ``_backward``       ``(x, running_mean, running_var, weight=None, bias=None, training=False,
                                       momentum=0.1, eps=1e-5, r_max=3.0, d_max=5.0)`` (Ioffe 2017)
``batch_layer_norm`` / ``_backward``   ``(x, running_mean, running_var, weight=None, bias=None, training=False,
                                       momentum=0.1, eps=1e-3, *, batch_size=None)`` (Ziaee & Cano 2022)
=====================================  ========================================================================

Modules shaped like ``torch.nn`` (``train()``/``eval()``, ``weight``/``bias``/``running_mean``/``running_var``/
``num_batches_tracked``, ``state_dict()``, ``__call__`` and ``backward(dy)`` storing ``dweight``/``dbias``):
``BatchNorm1d/2d/3d`` (with an opt-in Keras convention), ``LayerNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``,
``BatchRenorm1d/2d/3d``, ``BatchLayerNorm``, ``RMSNorm``.

Variance helpers for the chapters: ``naive_var`` (``E[x^2] - E[x]^2``, unstable), ``two_pass_var``,
``welford_var``, ``channel_stats``.

Conventions everywhere: normalize with the BIASED variance; running variances hold the UNBIASED one
(PyTorch); ``momentum`` weights the new batch; float32/float64 in, same dtype out; statistics by a corrected
two-pass algorithm; NaN/inf propagate; bad arguments raise ``ValueError``/``TypeError`` naming the argument
before any running statistic is touched (see :mod:`bnlib._checks`).
"""
from .batch_layer_norm import batch_layer_norm, batch_layer_norm_backward, bln_weights
from .batch_norm import batch_norm, batch_norm_backward, keras_batch_norm
from .batch_renorm import RenormSchedule, batch_renorm, batch_renorm_backward, renorm_factors
from .group_norm import group_norm, group_norm_backward
from .instance_norm import instance_norm, instance_norm_backward
from .layer_norm import layer_norm, layer_norm_backward
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
    Module,
    RMSNorm,
)
from .rms_norm import rms_norm, rms_norm_backward
from .stats import channel_stats, naive_var, two_pass_var, welford_var

__all__ = [
    "batch_norm", "batch_norm_backward", "keras_batch_norm",
    "layer_norm", "layer_norm_backward",
    "rms_norm", "rms_norm_backward",
    "group_norm", "group_norm_backward",
    "instance_norm", "instance_norm_backward",
    "batch_renorm", "batch_renorm_backward", "renorm_factors",
    "batch_layer_norm", "batch_layer_norm_backward", "bln_weights",
    "naive_var", "two_pass_var", "welford_var", "channel_stats",
    "Module", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchLayerNorm",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule", "RMSNorm",
]
