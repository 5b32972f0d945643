r"""Batch normalization in Triton: statistics, normalization and the hand-derived backward pass.

Written in the style of Triton's *05-layer-norm* tutorial: each kernel has the maths it implements next to
it. The package is split in three modules:

- :mod:`.kernels`: the ``@triton.jit`` kernels (and the mathematics and numerics they implement);
- :mod:`.launch`: tile shapes, grids and launch plans, and the wrappers that run them;
- :mod:`.aot`: ahead-of-time compilation for an NVIDIA architecture, without a GPU.

:mod:`bnlib.torch.triton_bn` re-exports the public functions (it is the name the rest of bnlib and the book
use). They are

- :func:`batch_norm_forward` ``(x, weight, bias, running_mean, running_var, training, momentum, eps)
  -> (y, save_mean, save_invstd)``
- :func:`batch_norm_backward` ``(dy, x, weight, save_mean, save_invstd) -> (dx, dweight, dbias)``
  (training mode: the batch statistics depend on ``x``)
- :func:`is_available` ``(x) -> bool``
- :func:`plan` / :func:`planned_bytes`: which kernels a call launches and the bytes each must move;
- :func:`compile_report`: compile every kernel ahead of time for a GPU architecture (no GPU needed).

The layout trick
================
Every supported input is viewed as a strided 3-D array ``(N, C, S)`` (``S`` = product of the spatial sizes,
1 for ``(N, C)`` input), with element ``(n, c, s)`` at offset ``n*sN + c*sC + s*sS``:

=============================  ====================  ===================
input                          strides (sN, sC, sS)  contiguous axis
=============================  ====================  ===================
``(N, C, H, W)`` NCHW          ``(C*S, S, 1)``       ``s`` (spatial)
``(N, C, H, W)`` channels_last ``(S*C, 1, C)``       ``c`` (channels)
``(N, C, L)``                  ``(C*L, L, 1)``       ``s``
``(N, C)``                     ``(C, 1, 1)``         ``c``
=============================  ====================  ===================

One set of kernels therefore serves both memory formats: a program works on a 3-D tile
``[BLOCK_N, BLOCK_C, BLOCK_S]`` and the tile shape is chosen so that the contiguous axis is the long one
(``BLOCK_C = 1``, ``BLOCK_S`` up to 2048 elements -- 4096 for 16-bit dtypes -- for NCHW; ``BLOCK_C = 64``
with a few ``s`` or ``n`` for channels-last).
Triton specializes the stride that equals 1, so loads along the contiguous axis are coalesced. The output
(``y``, ``dx``) is allocated with ``torch.empty_like(x)`` and therefore has ``x``'s strides.

Kernels and bytes
=================
``E`` = number of elements, ``b`` = bytes per element (4 for float32, 2 for float16/bfloat16). Per-channel
vectors and partial-statistics buffers are ``O(C * programs)`` and negligible.

*Split path* (any size; the reduction is spread over many programs):

==================  ========================================  ==================
kernel               does                                       bytes
==================  ========================================  ==================
``_bn_stats``        per-tile (count, mean, M2), Chan-merged   reads x: ``bE``
``_bn_finalize``     merges partials, running stats, invstd    ``O(C * P)``
``_bn_normalize``    ``y = (x - mu) * gamma*invstd + beta``    reads x, writes y: ``2bE``
forward total                                                   ``3bE`` (= 12E float32)
``_bn_bwd_reduce``   partial ``sum g``, ``sum g*xhat``          reads x, g: ``2bE``
``_bn_bwd_finalize`` dgamma, dbeta, the dx coefficients         ``O(C * P)``
``_bn_bwd_dx``       the dx formula (see :mod:`.kernels`)       reads x, g, writes dx: ``3bE``
backward total                                                  ``5bE`` (= 20E float32)
==================  ========================================  ==================

*Fused path* (when one program can hold a whole channel block, ``BLOCK_N*BLOCK_S*BLOCK_C <= 8192``, i.e.
``next_pow2(N) * next_pow2(S) <= 8192``): ``_bn_fwd_fused`` reads x once and writes y: ``2bE`` (= 8E
float32); ``_bn_bwd_fused`` reads x and g once and writes dx: ``3bE`` (= 12E float32). That is the lower
bound for a training step, reached only for small reductions (e.g. an MLP layer ``(N, C)`` with ``N <= 8192``).

Evaluation mode launches only ``_bn_normalize`` with the running statistics: ``2bE``.

``TRITON_INTERPRET=1`` runs every kernel on the CPU through Triton's interpreter (NumPy), which is how the
tests check them without a GPU. It must be set *before this package is imported*: ``triton.jit`` decides
between compiling and interpreting when the kernels are decorated (in :mod:`.kernels`).

Importing this package imports triton; :mod:`bnlib.torch` itself does not import it (it imports
:mod:`bnlib.torch.triton_bn` lazily). Without triton this package still imports, :func:`is_available` is
False and running a kernel raises ``RuntimeError``.
"""
from .aot import compile_report
from .kernels import KERNELS, is_interpreted
from .launch import (
    FUSED_MAX_TILE,
    Launch,
    Plan,
    batch_norm_backward,
    batch_norm_forward,
    is_available,
    plan,
    plan_backward,
    plan_forward,
    planned_bytes,
)

__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "is_available",
    "is_interpreted",
    "plan",
    "plan_forward",
    "plan_backward",
    "Plan",
    "Launch",
    "planned_bytes",
    "compile_report",
    "KERNELS",
    "FUSED_MAX_TILE",
]
