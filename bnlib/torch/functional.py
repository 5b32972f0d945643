"""Functional normalizations with hand-derived backward passes (drop-in for ``torch.nn.functional``).

Each function validates its arguments (rules and messages shared with :mod:`bnlib.numpy` through
:mod:`bnlib._checks`, plus device/dtype agreement between input and parameters) *before* any running
statistic changes, then applies a :class:`torch.autograd.Function` whose ``backward`` is the closed-form
gradient derived in the book (not autograd through the forward). ``batch_norm``, ``layer_norm``,
``group_norm``, ``instance_norm`` and ``rms_norm`` are differentiable twice (``create_graph=True``: the backward
in differentiable ops), have a hand-derived forward-mode derivative (``jvp``) and work under ``torch.func``
(``vmap``, ``grad``, ``jacrev``, ``hessian``, per-sample gradients): see :mod:`bnlib.torch._autodiff`.
``batch_renorm``, ``batch_layer_norm`` and ``ghost_batch_norm`` are ``once_differentiable``.

Inputs may be float64, float32, float16 or bfloat16 (statistics accumulated in float32 for the last
three, output in the input dtype), on CPU or CUDA, contiguous or channels-last.

==========================  ================================================================================
``batch_norm``              :mod:`bnlib.torch._batch_norm` (``backend='auto'|'torch'|'triton'``)
``layer_norm``              :mod:`bnlib.torch._layer_norm`
``rms_norm``                :mod:`bnlib.torch._rms_norm`
``group_norm``              :mod:`bnlib.torch._group_norm`
``instance_norm``           :mod:`bnlib.torch._instance_norm`
``batch_renorm``            :mod:`bnlib.torch._batch_renorm`
``batch_layer_norm``        :mod:`bnlib.torch._batch_layer_norm`
``ghost_batch_norm``        :mod:`bnlib.torch._ghost_batch_norm`
==========================  ================================================================================
"""
from __future__ import annotations

from ._batch_layer_norm import batch_layer_norm
from ._batch_norm import batch_norm
from ._batch_renorm import batch_renorm
from ._ghost_batch_norm import ghost_batch_norm
from ._group_norm import group_norm
from ._instance_norm import instance_norm
from ._layer_norm import layer_norm
from ._rms_norm import rms_norm

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "batch_renorm", "batch_layer_norm",
           "ghost_batch_norm", "rms_norm"]
