r"""Batch normalization in Triton: statistics, normalization and the hand-derived backward pass.

Written in the style of Triton's *05-layer-norm* tutorial: each kernel has the maths it implements next to
it. The public functions are

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

Mathematics
===========
Per channel ``c``, over the ``M = N*S`` values of the batch,

.. math::
    \mu = \tfrac1M\sum x,\qquad \sigma^2 = \tfrac1M\sum (x-\mu)^2,\qquad
    \hat x = (x-\mu)\,\mathrm{invstd},\quad \mathrm{invstd} = 1/\sqrt{\sigma^2+\epsilon},\qquad
    y = \gamma\hat x + \beta .

Backward, with :math:`g = \partial L/\partial y`:

.. math::
    \frac{\partial L}{\partial\beta} = \sum g,\qquad \frac{\partial L}{\partial\gamma} = \sum g\,\hat x,\qquad
    \frac{\partial L}{\partial x} = \gamma\,\mathrm{invstd}\Big(g - \tfrac1M\sum g
        - \hat x\,\tfrac1M\sum g\hat x\Big).

Numerics: statistics are accumulated in float32 whatever the input dtype (float32, float16, bfloat16). The
variance is never formed as ``E[x^2] - E[x]^2`` (catastrophic cancellation when ``|mu| >> sigma``). Each tile
computes its own ``(count, mean, M2)`` *two-pass in registers* (the tile mean first, then the centred sum of
squares of the same registers), and tiles are combined with the exact parallel formula of Chan, Golub and
LeVeque (1979):

.. math::
    n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad \bar x = \bar x_a + \delta\,n_b/n,\quad
    M_2 = M_{2,a} + M_{2,b} + \delta^2\,n_a n_b / n .

Counts are float32: exact up to 2**24 (16.7 million) values per channel; beyond that a count is rounded to
float32's 24-bit precision (relative error <= 6e-8), which perturbs the merge weights by as little.

Running statistics follow PyTorch: ``running = (1 - momentum) * running + momentum * batch`` with the
*unbiased* batch variance ``M2 / (M - 1)``; the biased one normalizes. They are updated in place by the
statistics kernel, so no extra pass over the channels is needed on the host.

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
``_bn_bwd_dx``       the dx formula above                       reads x, g, writes dx: ``3bE``
backward total                                                  ``5bE`` (= 20E float32)
==================  ========================================  ==================

*Fused path* (when one program can hold a whole channel block, ``BLOCK_N*BLOCK_S*BLOCK_C <= 8192``, i.e.
``next_pow2(N) * next_pow2(S) <= 8192``): ``_bn_fwd_fused`` reads x once and writes y: ``2bE`` (= 8E
float32); ``_bn_bwd_fused`` reads x and g once and writes dx: ``3bE`` (= 12E float32). That is the lower
bound for a training step, reached only for small reductions (e.g. an MLP layer ``(N, C)`` with ``N <= 8192``).

Evaluation mode launches only ``_bn_normalize`` with the running statistics: ``2bE``.

``TRITON_INTERPRET=1`` runs every kernel on the CPU through Triton's interpreter (NumPy), which is how the
tests check them without a GPU. It must be set *before this module is imported*: ``triton.jit`` decides
between compiling and interpreting when the kernels are decorated.
"""
import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

try:  # triton is optional: bnlib.torch works without it
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as _exc:  # pragma: no cover - exercised only where triton is missing
    _TRITON_IMPORT_ERROR = _exc

    class _NoTriton:  # lets the kernel definitions below be parsed; they are never launched
        constexpr = int

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

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

#: Largest tile (elements) one program holds in registers on the fused path.
FUSED_MAX_TILE = 8192
#: Elements per tile on the split path (float32; doubled for 16-bit dtypes).
SPLIT_TILE = 2048
#: Work items are packed so that about this many programs run per (channel block) grid column in total.
TARGET_PROGRAMS = 1024
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ==========================================================================================================
# Kernels
# ==========================================================================================================
@triton.jit
def _tile_offsets(n0, s0, c, N, C, S, sN, sC, sS,
                  BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, USE_INT64: tl.constexpr):
    """Offsets and mask of the tile ``[BLOCK_N, BLOCK_C, BLOCK_S]`` starting at ``(n0, c, s0)``.

    ``c`` is the vector of this program's channels (``BLOCK_C`` of them). Element ``(n, c, s)`` lives at
    ``n*sN + c*sC + s*sS``; out-of-range rows, channels or positions are masked off."""
    n = n0 + tl.arange(0, BLOCK_N)
    s = s0 + tl.arange(0, BLOCK_S)
    if USE_INT64:  # more than 2**31 elements: 32-bit offsets would overflow
        n = n.to(tl.int64)
        s = s.to(tl.int64)
    offs = n[:, None, None] * sN + c[None, :, None] * sC + s[None, None, :] * sS
    mask = (n[:, None, None] < N) & (c[None, :, None] < C) & (s[None, None, :] < S)
    return offs, mask


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan, Golub & LeVeque's exact merge of two (count, mean, M2) summaries (per channel):
    ``n = n_a + n_b``, ``delta = mean_b - mean_a``, ``mean = mean_a + delta * n_b / n``,
    ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``. An empty side (count 0) leaves the other unchanged."""
    n = n_a + n_b
    safe_n = tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe_n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe_n)
    return n, mean, m2


@triton.jit
def _bn_stats_kernel(X, PCNT, PMEAN, PM2,
                     N, C, S, sN, sC, sS, SB, W, TILES,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                     USE_INT64: tl.constexpr):
    """Forward, pass 1: per-channel partial statistics (count, mean, M2).

    Grid ``(channel blocks, programs along the batch)``. The batch of one channel block is cut into
    ``W`` work items (tiles of ``BLOCK_N`` rows by ``BLOCK_S`` positions; item ``w`` covers rows from
    ``(w // SB) * BLOCK_N`` and positions from ``(w % SB) * BLOCK_S``); program ``pid_w`` takes ``TILES``
    consecutive items. For each tile it computes the tile's mean, then the centred sum of squares of the same
    registers (two-pass within the tile: no cancellation), and folds the tile into its running summary with
    :func:`_chan_merge`. It writes one (count, mean, M2) per channel to row ``pid_w`` of the partial buffers.
    Reads ``x`` once: ``E * itemsize`` bytes in total."""
    pid_c = tl.program_id(0)
    pid_w = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, TILES):
        w = pid_w * TILES + t
        n0 = (w // SB) * BLOCK_N
        s0 = (w % SB) * BLOCK_S
        offs, mask = _tile_offsets(n0, s0, c, N, C, S, sN, sC, sS, BLOCK_N, BLOCK_S, USE_INT64)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        rows = tl.maximum(tl.minimum(N - n0, BLOCK_N), 0)          # 0 for items past the end
        cols = tl.maximum(tl.minimum(S - s0, BLOCK_S), 0)
        cnt = (rows * cols).to(tl.float32)
        t_mean = tl.sum(tl.sum(x, axis=2), axis=0) / tl.maximum(cnt, 1.0)
        d = tl.where(mask, x - t_mean[None, :, None], 0.0)
        t_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
        acc_n, acc_mean, acc_m2 = _chan_merge(acc_n, acc_mean, acc_m2, cnt, t_mean, t_m2)
    cmask = c < C
    tl.store(PCNT + pid_w * C + c, acc_n, mask=cmask)
    tl.store(PMEAN + pid_w * C + c, acc_mean, mask=cmask)
    tl.store(PM2 + pid_w * C + c, acc_m2, mask=cmask)


@triton.jit
def _bn_finalize_kernel(PCNT, PMEAN, PM2, P, C, WEIGHT, BIAS, RMEAN, RVAR,
                        MEAN, INVSTD, SCALE, SHIFT, momentum, eps,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward, pass 2 (per channel, tiny): merge the ``P`` partial summaries, update the running statistics.

    ``BLOCK_P`` partials at a time are combined exactly (the k-way form of Chan's formula:
    ``n = sum n_i``, ``mean = sum n_i mean_i / n``, ``M2 = sum M2_i + sum n_i (mean_i - mean)**2``) and folded
    into the accumulator with :func:`_chan_merge`. Then ``var = M2 / M`` (biased), ``invstd = 1/sqrt(var+eps)``,
    ``running_mean <- (1-momentum) running_mean + momentum mean`` and
    ``running_var <- (1-momentum) running_var + momentum M2/(M-1)`` (in place, in the buffers' dtype).
    Writes ``mean``, ``invstd`` (saved for backward) and ``scale = gamma * invstd``, ``shift = beta`` for
    the normalization pass."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p[:, None] < P) & cmask[None, :]
        idx = p[:, None] * C + c[None, :]
        cnt = tl.load(PCNT + idx, mask=m, other=0.0)
        mean = tl.load(PMEAN + idx, mask=m, other=0.0)
        m2 = tl.load(PM2 + idx, mask=m, other=0.0)
        b_n = tl.sum(cnt, axis=0)
        b_mean = tl.sum(cnt * mean, axis=0) / tl.maximum(b_n, 1.0)
        dm = tl.where(m, mean - b_mean[None, :], 0.0)
        b_m2 = tl.sum(m2, axis=0) + tl.sum(cnt * dm * dm, axis=0)
        acc_n, acc_mean, acc_m2 = _chan_merge(acc_n, acc_mean, acc_m2, b_n, b_mean, b_m2)
    var = acc_m2 / tl.maximum(acc_n, 1.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + c, acc_mean, mask=cmask)
    tl.store(INVSTD + c, invstd, mask=cmask)
    if HAS_WEIGHT:
        gamma = tl.load(WEIGHT + c, mask=cmask, other=1.0).to(tl.float32)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        beta = tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    tl.store(SCALE + c, gamma * invstd, mask=cmask)
    tl.store(SHIFT + c, beta, mask=cmask)
    if HAS_RUNNING:
        rm = tl.load(RMEAN + c, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(RVAR + c, mask=cmask, other=0.0).to(tl.float32)
        unbiased = acc_m2 / tl.maximum(acc_n - 1.0, 1.0)
        rm = (1.0 - momentum) * rm + momentum * acc_mean
        rv = (1.0 - momentum) * rv + momentum * unbiased
        tl.store(RMEAN + c, rm.to(RMEAN.dtype.element_ty), mask=cmask)
        tl.store(RVAR + c, rv.to(RVAR.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_normalize_kernel(X, Y, MEAN, SCALE, SHIFT,
                         N, C, S, sN, sC, sS, SB, W, TILES,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                         USE_INT64: tl.constexpr):
    """Forward, pass 3: ``y = (x - mean) * scale + shift`` with ``scale = gamma*invstd``, ``shift = beta``.

    Same grid and work items as :func:`_bn_stats_kernel`. Subtracting the mean before scaling (rather than
    ``x*scale + (beta - mean*scale)``) keeps full relative precision when ``|mean| >> std``; the kernel is
    memory-bound, so the extra subtraction is free. Reads x, writes y: ``2 * E * itemsize`` bytes.
    Evaluation mode uses this kernel alone, with ``mean = running_mean`` and
    ``scale = gamma / sqrt(running_var + eps)``."""
    pid_c = tl.program_id(0)
    pid_w = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)[None, :, None]
    scale = tl.load(SCALE + c, mask=cmask, other=0.0)[None, :, None]
    shift = tl.load(SHIFT + c, mask=cmask, other=0.0)[None, :, None]
    for t in range(0, TILES):
        w = pid_w * TILES + t
        n0 = (w // SB) * BLOCK_N
        s0 = (w % SB) * BLOCK_S
        offs, mask = _tile_offsets(n0, s0, c, N, C, S, sN, sC, sS, BLOCK_N, BLOCK_S, USE_INT64)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * scale + shift
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bn_fwd_fused_kernel(X, Y, WEIGHT, BIAS, RMEAN, RVAR, MEAN, INVSTD,
                         N, C, S, sN, sC, sS, momentum, eps,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                         USE_INT64: tl.constexpr):
    """Forward in one pass when a program can hold all ``M = N*S`` values of ``BLOCK_C`` channels.

    The tile ``[BLOCK_N >= N, BLOCK_C, BLOCK_S >= S]`` stays in registers: mean, centred M2 (exact two-pass),
    running-statistics update and ``y = (x - mean) * invstd * gamma + beta``. Reads x once and writes y:
    ``2 * E * itemsize`` bytes (8E for float32), the minimum for a forward pass."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    offs, mask = _tile_offsets(0, 0, c, N, C, S, sN, sC, sS, BLOCK_N, BLOCK_S, USE_INT64)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    m = N * S * 1.0
    mean = tl.sum(tl.sum(x, axis=2), axis=0) / m
    d = tl.where(mask, x - mean[None, :, None], 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
    invstd = 1.0 / tl.sqrt(m2 / m + eps)
    if HAS_WEIGHT:
        gamma = tl.load(WEIGHT + c, mask=cmask, other=1.0).to(tl.float32)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        beta = tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    y = d * (gamma * invstd)[None, :, None] + beta[None, :, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + c, mean, mask=cmask)
    tl.store(INVSTD + c, invstd, mask=cmask)
    if HAS_RUNNING:
        rm = tl.load(RMEAN + c, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(RVAR + c, mask=cmask, other=0.0).to(tl.float32)
        rm = (1.0 - momentum) * rm + momentum * mean
        rv = (1.0 - momentum) * rv + momentum * (m2 / tl.maximum(m - 1.0, 1.0))
        tl.store(RMEAN + c, rm.to(RMEAN.dtype.element_ty), mask=cmask)
        tl.store(RVAR + c, rv.to(RVAR.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_bwd_reduce_kernel(X, DY, MEAN, INVSTD, PSUM_DY, PSUM_DYX,
                          N, C, S, sN, sC, sS, SB, W, TILES,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                          USE_INT64: tl.constexpr):
    """Backward, pass 1: per-program partial sums ``sum g`` and ``sum g * xhat``, ``xhat = (x-mean)*invstd``.

    Same grid and work items as :func:`_bn_stats_kernel`. Masked elements load ``g = 0`` and so add nothing
    to either sum. Plain float32 sums (each program sums at most ``TILES`` tiles; the partials are summed
    again in :func:`_bn_bwd_finalize_kernel`, a two-level tree). Reads x and g: ``2 * E * itemsize``."""
    pid_c = tl.program_id(0)
    pid_w = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)[None, :, None]
    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)[None, :, None]
    acc_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, TILES):
        w = pid_w * TILES + t
        n0 = (w // SB) * BLOCK_N
        s0 = (w % SB) * BLOCK_S
        offs, mask = _tile_offsets(n0, s0, c, N, C, S, sN, sC, sS, BLOCK_N, BLOCK_S, USE_INT64)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * invstd
        acc_dy += tl.sum(tl.sum(g, axis=2), axis=0)
        acc_dyx += tl.sum(tl.sum(g * xhat, axis=2), axis=0)
    tl.store(PSUM_DY + pid_w * C + c, acc_dy, mask=cmask)
    tl.store(PSUM_DYX + pid_w * C + c, acc_dyx, mask=cmask)


@triton.jit
def _bn_bwd_finalize_kernel(PSUM_DY, PSUM_DYX, P, C, M, WEIGHT, INVSTD, DWEIGHT, DBIAS, COEF, K1, K2,
                            HAS_WEIGHT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward, pass 2 (per channel, tiny): sum the partials; ``dbeta = sum g``, ``dgamma = sum g xhat``,
    and the coefficients of ``dx = coef * (g - k1 - xhat * k2)``: ``coef = gamma * invstd``,
    ``k1 = sum g / M``, ``k2 = sum g xhat / M``."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p[:, None] < P) & cmask[None, :]
        idx = p[:, None] * C + c[None, :]
        s1 += tl.sum(tl.load(PSUM_DY + idx, mask=m, other=0.0), axis=0)
        s2 += tl.sum(tl.load(PSUM_DYX + idx, mask=m, other=0.0), axis=0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
    if HAS_WEIGHT:
        gamma = tl.load(WEIGHT + c, mask=cmask, other=1.0).to(tl.float32)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
    mf = M * 1.0
    tl.store(DBIAS + c, s1, mask=cmask)
    tl.store(DWEIGHT + c, s2, mask=cmask)
    tl.store(COEF + c, gamma * invstd, mask=cmask)
    tl.store(K1 + c, s1 / mf, mask=cmask)
    tl.store(K2 + c, s2 / mf, mask=cmask)


@triton.jit
def _bn_bwd_dx_kernel(X, DY, DX, MEAN, INVSTD, COEF, K1, K2,
                      N, C, S, sN, sC, sS, SB, W, TILES,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                      USE_INT64: tl.constexpr):
    """Backward, pass 3: ``dx = gamma*invstd * (g - sum(g)/M - xhat * sum(g*xhat)/M)``.

    Reads x and g again and writes dx: ``3 * E * itemsize`` bytes (12E for float32)."""
    pid_c = tl.program_id(0)
    pid_w = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)[None, :, None]
    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)[None, :, None]
    coef = tl.load(COEF + c, mask=cmask, other=0.0)[None, :, None]
    k1 = tl.load(K1 + c, mask=cmask, other=0.0)[None, :, None]
    k2 = tl.load(K2 + c, mask=cmask, other=0.0)[None, :, None]
    for t in range(0, TILES):
        w = pid_w * TILES + t
        n0 = (w // SB) * BLOCK_N
        s0 = (w % SB) * BLOCK_S
        offs, mask = _tile_offsets(n0, s0, c, N, C, S, sN, sC, sS, BLOCK_N, BLOCK_S, USE_INT64)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * invstd
        dx = coef * (g - k1 - xhat * k2)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_fused_kernel(X, DY, DX, WEIGHT, MEAN, INVSTD, DWEIGHT, DBIAS,
                         N, C, S, sN, sC, sS,
                         HAS_WEIGHT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                         USE_INT64: tl.constexpr):
    """Backward in one pass when a program holds all ``M`` values of its channels: both sums and dx from
    the same registers. Reads x and g once, writes dx: ``3 * E * itemsize`` (12E for float32)."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    offs, mask = _tile_offsets(0, 0, c, N, C, S, sN, sC, sS, BLOCK_N, BLOCK_S, USE_INT64)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
    xhat = tl.where(mask, (x - mean[None, :, None]) * invstd[None, :, None], 0.0)
    s1 = tl.sum(tl.sum(g, axis=2), axis=0)
    s2 = tl.sum(tl.sum(g * xhat, axis=2), axis=0)
    if HAS_WEIGHT:
        gamma = tl.load(WEIGHT + c, mask=cmask, other=1.0).to(tl.float32)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
    m = N * S * 1.0
    coef = (gamma * invstd)[None, :, None]
    dx = coef * (g - (s1 / m)[None, :, None] - xhat * (s2 / m)[None, :, None])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DBIAS + c, s1, mask=cmask)
    tl.store(DWEIGHT + c, s2, mask=cmask)


#: name -> kernel, for :func:`compile_report` and the book's chapter (``inspect.getsource(KERNELS[name].fn)``).
KERNELS = {
    "_bn_stats": _bn_stats_kernel,
    "_bn_finalize": _bn_finalize_kernel,
    "_bn_normalize": _bn_normalize_kernel,
    "_bn_fwd_fused": _bn_fwd_fused_kernel,
    "_bn_bwd_reduce": _bn_bwd_reduce_kernel,
    "_bn_bwd_finalize": _bn_bwd_finalize_kernel,
    "_bn_bwd_dx": _bn_bwd_dx_kernel,
    "_bn_bwd_fused": _bn_bwd_fused_kernel,
}


# ==========================================================================================================
# Host side: layout, tiles, launch plans
# ==========================================================================================================
def is_interpreted() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set when
    the module was imported)."""
    if _TRITON_IMPORT_ERROR is not None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(_bn_stats_kernel, InterpretedFunction)


def is_available(x) -> bool:
    """Whether :func:`batch_norm_forward` can run on ``x``.

    True when triton imports and ``x`` is a float32/float16/bfloat16 tensor with at least 2 dimensions that
    is either on a CUDA device (compiled kernels) or, when the kernels are interpreted (``TRITON_INTERPRET=1``
    was set before this module was imported), on any device. float64 is not supported (the kernels accumulate
    in float32) and returns False, so callers fall back to their own path."""
    if _TRITON_IMPORT_ERROR is not None or not isinstance(x, torch.Tensor):
        return False
    if x.dtype not in SUPPORTED_DTYPES or x.dim() < 2:
        return False
    if is_interpreted():
        return os.environ.get("TRITON_INTERPRET", "0") == "1" or x.device.type == "cpu"
    return x.is_cuda


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _as_ncs(x: torch.Tensor):
    """``x`` (dense, possibly after a copy) and its ``(N, C, S)`` view: ``(x, N, C, S, (sN, sC, sS))``."""
    N, C = int(x.shape[0]), int(x.shape[1])
    S = int(math.prod(x.shape[2:]))
    if not x.is_contiguous():
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if fmt is not None and x.is_contiguous(memory_format=fmt):
            return x, N, C, S, (S * C, 1, C)
        x = x.contiguous()
    return x, N, C, S, (C * S, S, 1)


@dataclass
class _Tiles:
    block_n: int
    block_c: int
    block_s: int
    num_warps: int
    fused: bool


def _choose_tiles(N: int, C: int, S: int, strides, itemsize: int) -> _Tiles:
    """Tile shape: the contiguous axis long, about ``SPLIT_TILE`` elements (2x for 16-bit), or the whole
    reduction of a few channels when it fits (``FUSED_MAX_TILE``)."""
    channels_fast = strides[1] == 1 and C > 1
    rr = _next_pow2(N) * _next_pow2(S)
    if rr <= FUSED_MAX_TILE:
        # a program holds whole channels; keep BLOCK_C small so that many programs share the GPU
        cap = 8 if channels_fast else 1
        block_c = max(1, min(_next_pow2(C), FUSED_MAX_TILE // rr, cap))
        tile = rr * block_c
        return _Tiles(_next_pow2(N), block_c, _next_pow2(S), 4 if tile <= 2048 else 8, True)
    tile = SPLIT_TILE * (2 if itemsize <= 2 else 1)
    if channels_fast:
        block_c = min(_next_pow2(C), 64)
    else:
        block_c = 1
    block_s = min(_next_pow2(S), max(1, tile // block_c))
    block_n = min(_next_pow2(N), max(1, tile // (block_c * block_s)))
    return _Tiles(block_n, block_c, block_s, 4, False)


@dataclass
class Launch:
    """One kernel launch of a plan: the kernel's name, its grid, arguments, compile-time constants, warps
    and the bytes it must move (reads + writes of ``x``-sized tensors; per-channel vectors counted too)."""

    name: str
    grid: Tuple[int, ...]
    args: Dict[str, object]
    constexprs: Dict[str, object]
    num_warps: int
    bytes: int
    note: str = ""

    def run(self) -> None:
        KERNELS[self.name][self.grid](**self.args, **self.constexprs, num_warps=self.num_warps)


@dataclass
class Plan:
    """The launches of one forward or backward call and the tensors they produce."""

    launches: List[Launch]
    outputs: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    def run(self) -> None:
        x = next((v for v in self.launches[0].args.values() if isinstance(v, torch.Tensor)), None)
        on_gpu = x is not None and x.is_cuda
        with torch.cuda.device(x.device) if on_gpu else contextlib.nullcontext():  # launch on x's GPU
            for launch in self.launches:
                launch.run()


def _work_split(N, S, tiles: _Tiles, channel_blocks: int):
    SB = _cdiv(S, tiles.block_s)
    W = _cdiv(N, tiles.block_n) * SB
    per_col = max(1, TARGET_PROGRAMS // max(1, channel_blocks))
    TILES = max(1, _cdiv(W, per_col))
    P = _cdiv(W, TILES)
    return SB, W, TILES, P


def _vec_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _check_common(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got "
                        f"{str(x.dtype).replace('torch.', '')}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (N, C, *), got {x.dim()}-D input")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def _check_vec(name, t, x, C):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {str(t.dtype).replace('torch.', '')}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def plan_forward(x, weight=None, bias=None, running_mean=None, running_var=None, training=True,
                 momentum=0.1, eps=1e-5) -> Plan:
    """Validate the arguments and return the launches :func:`batch_norm_forward` would run (nothing runs).

    The plan's ``outputs`` hold the (uninitialized) ``y``, ``save_mean`` and ``save_invstd``."""
    _check_common(x)
    C = int(x.shape[1])
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(name, t, x, C)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    has_running = running_mean is not None
    if training and has_running and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        raise TypeError(f"momentum must be a real number when running statistics are updated, got {momentum!r}")
    if not training and not has_running:
        raise ValueError("running_mean and running_var are required when training=False")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")

    xd, N, C, S, strides = _as_ncs(x)
    if training and N * S <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(x.shape)}")
    E, b = xd.numel(), xd.element_size()
    use_int64 = E >= 2**31 - 1
    tiles = _choose_tiles(N, C, S, strides, b)
    dev = xd.device
    y = torch.empty_like(xd)
    mean = torch.empty(C, device=dev, dtype=torch.float32)
    invstd = torch.empty(C, device=dev, dtype=torch.float32)
    dummy = mean  # stands in for absent optional pointers (never read: the HAS_* flags are False)
    w = weight.contiguous() if weight is not None else None
    bb = bias.contiguous() if bias is not None else None
    shape_args = dict(N=N, C=C, S=S, sN=strides[0], sC=strides[1], sS=strides[2])
    outputs = {"y": y, "save_mean": mean, "save_invstd": invstd}
    vec = _vec_bytes(w) + _vec_bytes(bb)
    run_bytes = 2 * (_vec_bytes(running_mean) + _vec_bytes(running_var))

    if not training:
        # per-channel constants on the host side (C values, negligible), then one streaming pass
        with torch.no_grad():
            mean.copy_(running_mean.float())
            invstd.copy_(torch.rsqrt(running_var.float() + eps))
            scale = invstd * (w.float() if w is not None else 1.0)
            shift = bb.float().contiguous() if bb is not None else torch.zeros_like(mean)
        cb = _cdiv(C, tiles.block_c)
        SB, W, TILES, P = _work_split(N, S, tiles, cb)
        return Plan([Launch("_bn_normalize", (cb, P),
                            dict(X=xd, Y=y, MEAN=mean, SCALE=scale, SHIFT=shift, **shape_args, SB=SB, W=W,
                                 TILES=TILES),
                            dict(BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
                                 USE_INT64=use_int64),
                            tiles.num_warps, 2 * E * b + 3 * C * 4, "eval: y = (x - rm) * w/sqrt(rv+eps) + b")],
                    outputs)

    flags = dict(HAS_WEIGHT=w is not None, HAS_BIAS=bb is not None, HAS_RUNNING=has_running)
    opt = dict(WEIGHT=w if w is not None else dummy, BIAS=bb if bb is not None else dummy,
               RMEAN=running_mean if has_running else dummy, RVAR=running_var if has_running else dummy)
    mom = float(momentum) if has_running else 0.0
    if tiles.fused:
        cb = _cdiv(C, tiles.block_c)
        return Plan([Launch("_bn_fwd_fused", (cb,),
                            dict(X=xd, Y=y, **opt, MEAN=mean, INVSTD=invstd, **shape_args,
                                 momentum=mom, eps=float(eps)),
                            dict(**flags, BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c,
                                 BLOCK_S=tiles.block_s, USE_INT64=use_int64),
                            tiles.num_warps, 2 * E * b + vec + run_bytes + 2 * C * 4,
                            "one pass: a program holds whole channels")], outputs)

    cb = _cdiv(C, tiles.block_c)
    SB, W, TILES, P = _work_split(N, S, tiles, cb)
    pcnt = torch.empty((P, C), device=dev, dtype=torch.float32)
    pmean = torch.empty((P, C), device=dev, dtype=torch.float32)
    pm2 = torch.empty((P, C), device=dev, dtype=torch.float32)
    scale = torch.empty(C, device=dev, dtype=torch.float32)
    shift = torch.empty(C, device=dev, dtype=torch.float32)
    blocks = dict(BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, USE_INT64=use_int64)
    fin_c = min(_next_pow2(C), 32)
    fin_p = min(_next_pow2(P), 64)
    launches = [
        Launch("_bn_stats", (cb, P),
               dict(X=xd, PCNT=pcnt, PMEAN=pmean, PM2=pm2, **shape_args, SB=SB, W=W, TILES=TILES),
               blocks, tiles.num_warps, E * b + 3 * P * C * 4, "per-tile (count, mean, M2), Chan-merged"),
        Launch("_bn_finalize", (_cdiv(C, fin_c),),
               dict(PCNT=pcnt, PMEAN=pmean, PM2=pm2, P=P, C=C, **opt, MEAN=mean, INVSTD=invstd, SCALE=scale,
                    SHIFT=shift, momentum=mom, eps=float(eps)),
               dict(**flags, BLOCK_P=fin_p, BLOCK_C=fin_c), 4,
               3 * P * C * 4 + vec + run_bytes + 4 * C * 4, "merge partials, running stats, invstd"),
        Launch("_bn_normalize", (cb, P),
               dict(X=xd, Y=y, MEAN=mean, SCALE=scale, SHIFT=shift, **shape_args, SB=SB, W=W, TILES=TILES),
               blocks, tiles.num_warps, 2 * E * b + 3 * C * 4, "y = (x - mean) * scale + shift"),
    ]
    return Plan(launches, outputs)


def plan_backward(dy, x, weight, save_mean, save_invstd) -> Plan:
    """Validate the arguments and return the launches :func:`batch_norm_backward` would run.

    The plan's ``outputs`` hold ``dx``, ``dweight`` and ``dbias`` (float32; cast by the caller)."""
    _check_common(x)
    _check_common(dy, "dy")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.device != x.device:
        raise ValueError(f"dy is on {dy.device} but x is on {x.device}")
    C = int(x.shape[1])
    _check_vec("weight", weight, x, C)
    for name, t in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if t is None:
            raise ValueError(f"{name} is required (the batch statistics returned by batch_norm_forward)")
        _check_vec(name, t, x, C)
    xd, N, C, S, strides = _as_ncs(x)
    if dy.stride() != xd.stride() or dy.dtype != xd.dtype:
        dy = torch.empty_like(xd).copy_(dy)  # same strides and dtype as x
    E, b = xd.numel(), xd.element_size()
    use_int64 = E >= 2**31 - 1
    tiles = _choose_tiles(N, C, S, strides, b)
    dev = xd.device
    dx = torch.empty_like(xd)
    mean = save_mean.float().contiguous()
    invstd = save_invstd.float().contiguous()
    dweight = torch.empty(C, device=dev, dtype=torch.float32)
    dbias = torch.empty(C, device=dev, dtype=torch.float32)
    w = weight.contiguous() if weight is not None else None
    shape_args = dict(N=N, C=C, S=S, sN=strides[0], sC=strides[1], sS=strides[2])
    outputs = {"dx": dx, "dweight": dweight, "dbias": dbias}
    if tiles.fused:
        cb = _cdiv(C, tiles.block_c)
        return Plan([Launch("_bn_bwd_fused", (cb,),
                            dict(X=xd, DY=dy, DX=dx, WEIGHT=w if w is not None else mean, MEAN=mean,
                                 INVSTD=invstd, DWEIGHT=dweight, DBIAS=dbias, **shape_args),
                            dict(HAS_WEIGHT=w is not None, BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c,
                                 BLOCK_S=tiles.block_s, USE_INT64=use_int64),
                            tiles.num_warps, 3 * E * b + 5 * C * 4, "one pass: both sums and dx")], outputs)
    cb = _cdiv(C, tiles.block_c)
    SB, W, TILES, P = _work_split(N, S, tiles, cb)
    p1 = torch.empty((P, C), device=dev, dtype=torch.float32)
    p2 = torch.empty((P, C), device=dev, dtype=torch.float32)
    coef = torch.empty(C, device=dev, dtype=torch.float32)
    k1 = torch.empty(C, device=dev, dtype=torch.float32)
    k2 = torch.empty(C, device=dev, dtype=torch.float32)
    blocks = dict(BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, USE_INT64=use_int64)
    fin_c = min(_next_pow2(C), 32)
    fin_p = min(_next_pow2(P), 64)
    launches = [
        Launch("_bn_bwd_reduce", (cb, P),
               dict(X=xd, DY=dy, MEAN=mean, INVSTD=invstd, PSUM_DY=p1, PSUM_DYX=p2, **shape_args, SB=SB, W=W,
                    TILES=TILES),
               blocks, tiles.num_warps, 2 * E * b + 2 * P * C * 4, "partial sum g, sum g*xhat"),
        Launch("_bn_bwd_finalize", (_cdiv(C, fin_c),),
               dict(PSUM_DY=p1, PSUM_DYX=p2, P=P, C=C, M=N * S, WEIGHT=w if w is not None else mean,
                    INVSTD=invstd, DWEIGHT=dweight, DBIAS=dbias, COEF=coef, K1=k1, K2=k2),
               dict(HAS_WEIGHT=w is not None, BLOCK_P=fin_p, BLOCK_C=fin_c), 4,
               2 * P * C * 4 + 7 * C * 4, "dgamma, dbeta, dx coefficients"),
        Launch("_bn_bwd_dx", (cb, P),
               dict(X=xd, DY=dy, DX=dx, MEAN=mean, INVSTD=invstd, COEF=coef, K1=k1, K2=k2, **shape_args, SB=SB,
                    W=W, TILES=TILES),
               blocks, tiles.num_warps, 3 * E * b + 5 * C * 4, "dx = coef (g - k1 - xhat k2)"),
    ]
    return Plan(launches, outputs)


def plan(x, training=True, backward=False, weight=None, bias=None, running_mean=None, running_var=None):
    """The launches for input ``x`` (forward, or backward with ``backward=True``), for inspection.

    Uses dummy per-channel tensors where needed; nothing runs and no tensor is modified."""
    C = int(x.shape[1])
    if not training and running_mean is None:
        running_mean = torch.zeros(C, device=x.device)
        running_var = torch.ones(C, device=x.device)
    if backward:
        stats = torch.zeros(C, device=x.device)
        return plan_backward(torch.empty_like(x), x, weight, stats, stats + 1)
    return plan_forward(x, weight, bias, running_mean, running_var, training, 0.1, 1e-5)


def planned_bytes(x, training=True, backward=False) -> int:
    """Bytes the planned kernels must move for ``x`` (each tensor access counted once, no cache reuse)."""
    return plan(x, training=training, backward=backward).bytes


# ==========================================================================================================
# Public API
# ==========================================================================================================
def _require_runnable(x):
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if not x.is_cuda and not is_interpreted():
        raise RuntimeError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
                           "bnlib.torch.triton_bn is imported (CPU interpreter)")


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """Batch-norm forward with the Triton kernels.

    Args:
        x: ``(N, C, *)`` float32/float16/bfloat16, NCHW-contiguous or channels-last (other strides are copied
            to contiguous first).
        weight, bias: ``(C,)`` or None (gamma = 1, beta = 0); any float dtype (read as float32).
        running_mean, running_var: ``(C,)`` contiguous buffers or None. In training they are updated in place
            (``momentum`` weights the new batch; the unbiased variance is stored); in evaluation they normalize.
        training: batch statistics (True) or running statistics (False).
        momentum, eps: as in :func:`torch.nn.functional.batch_norm`.

    Returns:
        ``(y, save_mean, save_invstd)``: ``y`` has ``x``'s shape, dtype and memory format; ``save_mean`` and
        ``save_invstd`` are float32 ``(C,)`` (in evaluation: the running mean and ``1/sqrt(running_var+eps)``).
    """
    p = plan_forward(x, weight, bias, running_mean, running_var, training, momentum, eps)
    _require_runnable(x)
    p.run()
    return p.outputs["y"], p.outputs["save_mean"], p.outputs["save_invstd"]


def batch_norm_backward(dy, x, weight, save_mean, save_invstd):
    """Training-mode backward: ``(dx, dweight, dbias)`` from ``dy``, ``x`` and the saved batch statistics.

    ``dx`` has ``x``'s dtype and memory format; ``dweight``/``dbias`` have ``weight``'s dtype (float32 when
    ``weight`` is None). ``dy`` in another memory format is copied to ``x``'s first."""
    p = plan_backward(dy, x, weight, save_mean, save_invstd)
    _require_runnable(x)
    p.run()
    out_dtype = weight.dtype if weight is not None else torch.float32
    return p.outputs["dx"], p.outputs["dweight"].to(out_dtype), p.outputs["dbias"].to(out_dtype)


# ==========================================================================================================
# Ahead-of-time compilation (no GPU needed): proves the kernels compile, reports registers and spills
# ==========================================================================================================
def _signature(launch: Launch):
    """Signature, constexprs and attributes exactly as ``triton.jit`` specializes them at launch time
    (ints equal to 1 become constants; ints and pointers divisible by 16 get ``tt.divisibility``)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = KERNELS[launch.name]
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            sig[name] = "constexpr"
            constexprs[name] = launch.constexprs[name]
            continue
        v = launch.args[name]
        if isinstance(v, torch.Tensor):  # meta tensors have no address: torch allocations are 16-aligned
            kind, attr = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[v.dtype], "D"
        else:
            kind, attr = native_specialize_impl(BaseBackend, v, False, True, True)
        if kind == "constexpr":
            sig[name] = "constexpr"
            constexprs[name] = attr
            continue
        sig[name] = kind
        if attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers, stack and local (spill) bytes of a cubin, read with the ``cuobjdump`` Triton ships."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def compile_report(arch: int = 90, shapes=None, dtypes=(torch.float32, torch.bfloat16), layouts=("NCHW", "NHWC"),
                   once_per_kernel: bool = False):
    """Compile every kernel the plans use for ``shapes`` x ``dtypes`` x (NCHW, channels-last) x
    (train forward, eval forward, backward) for NVIDIA ``sm_<arch>``, without a GPU (Triton ships ``ptxas``),
    specialized as ``triton.jit`` would specialize them on a GPU.

    ``layouts`` applies to 4-D shapes (2-D and 3-D shapes are always contiguous); ``once_per_kernel`` compiles
    each kernel only for its first configuration (a quick check that all of them compile).

    Needs compiled (not interpreted) kernels: run it in a process where ``TRITON_INTERPRET`` is unset.
    Returns a list of dicts: kernel, dtype, layout, shape, blocks, num_warps, registers per thread, spill
    (local) bytes, and ``vector_loads`` -- the widest global load in the PTX (``v4`` = 128-bit for float32).
    """
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if is_interpreted():
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset when bnlib.torch.triton_bn is imported")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    shapes = shapes or [(32, 64, 112, 112), (256, 256, 14, 14), (64, 256)]
    target = GPUTarget("cuda", arch, 32)
    seen, rows = set(), []
    for shape in shapes:
        for dtype in dtypes:
            for layout in (layouts if len(shape) == 4 else ("NCHW",)):
                # only sizes, strides and dtypes matter: "meta" tensors allocate nothing
                x = torch.empty_strided(shape, _strides(shape, layout), dtype=dtype, device="meta")
                w = torch.ones(shape[1], device="meta")
                rm, rv = torch.zeros(shape[1], device="meta"), torch.ones(shape[1], device="meta")
                plans = [plan_forward(x, w, w, rm, rv, True, 0.1, 1e-5),
                         plan_forward(x, w, w, rm, rv, False, 0.1, 1e-5),
                         plan_backward(x, x, w, rm, rv)]
                for p in plans:
                    for launch in p.launches:
                        sig, constexprs, attrs = _signature(launch)
                        key = (launch.name, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
                               tuple(sorted(attrs)), launch.num_warps)
                        if key in seen or (once_per_kernel and launch.name in seen):
                            continue
                        seen.update([key, launch.name])
                        src = ASTSource(fn=KERNELS[launch.name], signature=sig, constexprs=constexprs,
                                        attrs=attrs)
                        compiled = triton.compile(src, target=target, options={"num_warps": launch.num_warps})
                        ptx = compiled.asm.get("ptx", "")
                        width = max([w for w in (4, 2) if f"ld.global.v{w}" in ptx] or
                                    [1 if "ld.global" in ptx else 0])
                        usage = _resource_usage(compiled.asm["cubin"]) if "cubin" in compiled.asm else {}
                        rows.append(dict(kernel=launch.name, dtype=str(dtype).replace("torch.", ""),
                                         layout=layout, shape=tuple(shape), num_warps=launch.num_warps,
                                         blocks={k: v for k, v in launch.constexprs.items()
                                                 if k.startswith("BLOCK")},
                                         registers=usage.get("reg"), spill_bytes=usage.get("local"),
                                         vector_loads=width))
    return rows


def _strides(shape, layout):
    """Strides of a dense tensor of ``shape`` in ``layout`` ('NCHW' = contiguous, 'NHWC' = channels-last)."""
    if layout == "NHWC":
        N, C, H, W = shape
        return (H * W * C, 1, W * C, C)
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))
