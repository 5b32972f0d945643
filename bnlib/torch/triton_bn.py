"""Batch normalization in Triton: the public functions of :mod:`bnlib.torch.triton`, under their original name.

The kernels, launch planning and ahead-of-time compilation live in the package :mod:`bnlib.torch.triton`
(:mod:`~bnlib.torch.triton.kernels`, :mod:`~bnlib.torch.triton.launch`, :mod:`~bnlib.torch.triton.aot`);
this module re-exports them, so that ``from bnlib.torch import triton_bn`` (bnlib's ``backend='triton'``,
the book's chapter 9, the benchmarks) keeps working. See :mod:`bnlib.torch.triton` for the layout, the
kernels and the bytes each moves.

``TRITON_INTERPRET=1`` must be set *before this module is imported* (it imports the kernels, and
``triton.jit`` decides between compiling and interpreting when they are decorated). bnlib.torch imports this
module lazily, so bnlib.torch works without triton; without triton this module still imports,
:func:`is_available` is False and running a kernel raises ``RuntimeError``.

The names here are bindings of the package's objects: the tile thresholds (``FUSED_MAX_TILE``,
``SPLIT_TILE``, ``TARGET_PROGRAMS``) are read from :mod:`bnlib.torch.triton.launch`, so patch them there.
"""
from .triton import (  # noqa: F401 (re-exported under the module's original name)
    FUSED_MAX_TILE,
    KERNELS,
    Launch,
    Plan,
    batch_norm_backward,
    batch_norm_forward,
    compile_report,
    is_available,
    is_interpreted,
    plan,
    plan_backward,
    plan_forward,
    planned_bytes,
)
from .triton.kernels import (  # noqa: F401 (the kernels by name: chapter 9 prints _chan_merge's source)
    _bn_bwd_dx_kernel,
    _bn_bwd_finalize_kernel,
    _bn_bwd_fused_kernel,
    _bn_bwd_reduce_kernel,
    _bn_finalize_kernel,
    _bn_fwd_fused_kernel,
    _bn_normalize_kernel,
    _bn_stats_kernel,
    _chan_merge,
    _tile_offsets,
)
from .triton.launch import SPLIT_TILE, SUPPORTED_DTYPES, TARGET_PROGRAMS  # noqa: F401

__all__ = [
    "batch_norm_forward", "batch_norm_backward", "is_available", "is_interpreted", "plan", "plan_forward",
    "plan_backward", "Plan", "Launch", "planned_bytes", "compile_report", "KERNELS", "FUSED_MAX_TILE",
    "SPLIT_TILE", "TARGET_PROGRAMS", "SUPPORTED_DTYPES",
]
