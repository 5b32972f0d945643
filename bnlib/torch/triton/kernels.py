r"""The Triton kernels of batch normalization, each with the maths it implements next to it.

Written in the style of Triton's *05-layer-norm* tutorial. Every kernel works on the strided ``(N, C, S)``
view of its input described in :mod:`bnlib.torch.triton` (element ``(n, c, s)`` at ``n*sN + c*sC + s*sS``);
which kernels run, with which tiles and grids, is decided in :mod:`bnlib.torch.triton.launch`.

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

``TRITON_INTERPRET=1`` must be set *before this module is imported*: ``triton.jit`` decides between compiling
and interpreting when the kernels below are decorated (:func:`is_interpreted` says which happened).
"""
from typing import Optional

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

__all__ = ["KERNELS", "is_interpreted"]


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
