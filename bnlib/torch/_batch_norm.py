r"""Batch normalization with a hand-derived backward pass (Ioffe & Szegedy 2015).

Forward, per channel :math:`c` over the :math:`M = N \cdot \prod(\text{spatial})` values of the batch:

.. math::
    \mu = \tfrac1M \textstyle\sum x,\quad \sigma^2 = \tfrac1M \sum (x-\mu)^2,\quad
    \hat x = (x-\mu)/\sqrt{\sigma^2+\epsilon},\quad y = \gamma \hat x + \beta .

Backward, with the per-channel sums ``S1 = sum(dy)`` and ``S2 = sum(dy * (x - mu))``:

.. math::
    \frac{\partial L}{\partial\beta} = S_1,\quad \frac{\partial L}{\partial\gamma} = S_2\,\text{invstd},\quad
    \frac{\partial L}{\partial x} = \gamma\,\text{invstd}\,\Big(dy - \frac{S_1}{M}
        - (x-\mu)\,\frac{S_2}{M(\sigma^2+\epsilon)}\Big) .

In evaluation mode (running statistics) ``dx = gamma * invstd * dy`` only.

Precision. Every per-element quantity is computed from the *centred* values ``x - mu`` (``y = (x - mu) *
scale + beta`` with ``scale = gamma * invstd``, and ``dx`` above), never as ``a * x + c`` with a per-channel
``c`` that cancels ``a * x``: that form rounds at the size of ``|x| * invstd``, which for data far from 0
(``x = 1e3 + randn``) is much larger than the result. ``x - mu`` is exact when ``x`` is near ``mu``
(Sterbenz), so what remains is the rounding of ``mu`` itself, kept to about half a unit in the last place
(torch's CPU kernel gets that far for contiguous input, not always for channels-last or 2-d input): small
inputs accumulate the mean of float32 data in float64; large ones take shifted sums about the mean of the
first chunk (see :func:`_moments_large`). The float32 errors of the output and of all three gradients are
then at most those of torch's own kernel, up to the rounding of the last few operations
(``tests/torch/test_precision.py``).

Speed. Two paths, the same formulas:

- small inputs (at most ``SMALL_NUMEL`` values): one tensor op per step, about 12 ops forward (running
  statistics included) and 8 backward; the forward saves ``x - mu`` for the backward (one tensor of the
  input's size besides ``y``; these inputs are small);
- large inputs: the passes run over chunks of about ``CHUNK_NUMEL`` values along the batch axis, so that
  ``x - mu`` and its products stay in the processor's cache between the ops that use them (two reads of
  ``x`` and one write of ``y`` forward; two reads of ``x`` and ``dy`` and one write of ``dx`` backward), and
  only ``x`` and the per-channel statistics are saved (peak memory as torch's: ``y``, then ``dx``).

Running statistics follow PyTorch's convention (``running = (1 - momentum) * running + momentum * batch``,
unbiased variance stored, biased variance used to normalize). Argument checks run on every call: a cheap
test of the common case first (:func:`quick_args_ok`), the full checks (with their messages) when it fails.

Higher order. A plain ``backward()`` takes the fast paths above. A backward that must itself be differentiable
(``create_graph=True``: gradient penalties, Hessian-vector products) or that runs under ``torch.func``
(``vmap``, ``grad``, per-sample gradients) is the same closed form in differentiable ops, the statistics
recomputed from ``x`` (:func:`bn_backward_plain`); ``jvp`` (forward mode) is hand-derived too. The derivation,
and why the backward and the forward-mode derivative are the same map, is in :mod:`bnlib.torch._autodiff`.

The same core (:func:`bn_train_forward`, :func:`bn_backward`) serves ghost batch norm (``k`` virtual batches,
each with its own statistics), batch renormalization and batch layer normalization.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple

import torch

from .. import _checks
from . import _autodiff as ad
from ._autodiff import higher_order, transforms_active
from ._common import (
    cast_like,
    channel_view,
    check_input,
    check_param,
    compute_dtype,
    save_norm_context,
    saved_norm_context,
    update_running_stats_,
)

__all__ = ["batch_norm", "BACKENDS", "VERIFIED_TRITON_ARCHS", "VerifiedArch"]

BACKENDS = ("auto", "torch", "triton")

#: Inputs with at most this many values take the small path (one op per step, ``x - mu`` saved); larger ones
#: the chunked path. Around this size the two cost about the same on a 2-core AMD EPYC (1 and 2 threads).
SMALL_NUMEL = 1 << 16
#: Values per chunk on the chunked path (4 MiB of float32). Smaller chunks keep more in cache but make more
#: (multi-threaded) ops; measured on a 2-core AMD EPYC (1 MiB L2 per core), 4 MiB was the fastest.
CHUNK_NUMEL = 1 << 20


# ----------------------------------------------------------------------------------------------------------
# Layout: x of shape (N, C, *spatial) is used as is (k = 1) or as the grouped view (k, N // k, C, *spatial)
# (k batch groups, ghost batch norm). Statistics are reduced with keepdim=True, so they broadcast against it
# (except on BatchNormFunction's small path for 2-d input, where (C,) statistics broadcast as they are).
# ----------------------------------------------------------------------------------------------------------
_RDIMS = {}
for _nd in range(2, 6):
    _RDIMS[_nd, False] = (0,) + tuple(range(2, _nd))
    _RDIMS[_nd, True] = (1,) + tuple(range(3, _nd + 1))
del _nd


def _grouped(x: torch.Tensor, k: int):
    """``(t, dims)``: ``x`` and the dims to reduce (0, 2, 3, ...) when ``k == 1``, else the grouped view
    ``(k, N // k, C, *spatial)`` and (1, 3, 4, ...)."""
    if k == 1:
        return x, _RDIMS[x.dim(), False]
    return x.view((k, x.shape[0] // k) + tuple(x.shape[1:])), _RDIMS[x.dim(), True]


def _pview(t: Optional[torch.Tensor], nd: int, grouped: bool) -> Optional[torch.Tensor]:
    """Per-channel values, ``(C,)`` or ``(k, C)``, as a view broadcasting against an ``nd``-dim ``t``."""
    if t is None:
        return None
    C = t.shape[-1]
    if grouped:
        lead = t.shape[0] if t.dim() == 2 else 1
        return t.reshape((lead, 1, C) + (1,) * (nd - 3))
    return t.reshape((1, C) + (1,) * (nd - 2))


_CONSTS: dict = {}


def _const(value: float, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a cached 0-d CPU tensor of ``dtype``. An op with it costs about half one with a Python float
    (no scalar tensor is made per call) when ``dtype`` is the other operand's; it works on any device."""
    if torch.compiler.is_compiling():  # a constant of the graph (dynamo would guard on the cache's contents)
        return torch.tensor(value, dtype=dtype)
    key = (value, dtype)
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 512:
            _CONSTS.clear()
        t = _CONSTS[key] = torch.tensor(value, dtype=dtype)
    return t


def _moments_small(t: torch.Tensor, dims, M: int, keepdim: bool):
    """``(mean, q, t - mean)`` with ``q = sum((t - mean)^2)`` (reduced over ``dims``), one op per step. The
    mean of float32 data is accumulated in float64 and rounded once (so ``t - mean`` is off by at most half
    an ulp of the mean). ``M >= 1`` values per statistic."""
    if t.dtype == torch.float64:
        mean = t.sum(dims, keepdim=keepdim).mul_(_const(1.0 / M, torch.float64))
    else:
        mean = t.sum(dims, keepdim=keepdim, dtype=torch.float64).mul_(_const(1.0 / M, torch.float64)).float()
    xmu = t - mean
    return mean, (xmu * xmu).sum(dims, keepdim=keepdim), xmu


def _affine(xmu: torch.Tensor, scale: torch.Tensor, shift: Optional[torch.Tensor], inplace: bool = False):
    """``xmu * scale + shift`` (per-channel ``scale``, ``shift``): one ``addcmul`` when the channels are the
    innermost axis ((N, C), channels-last), else a multiply and an add, which is twice as fast there (torch's
    addcmul does not vectorize two operands broadcast along the inner axis)."""
    if shift is None:
        return xmu.mul_(scale) if inplace else xmu * scale
    if xmu.dim() == 2 or xmu.stride(-1) != 1:
        return torch.addcmul(shift, xmu, scale)
    return (xmu.mul_(scale) if inplace else xmu * scale).add_(shift)


def _chunks(t: torch.Tensor, dim: int):
    """``(start, length)`` pieces of ``t`` along ``dim`` of about ``CHUNK_NUMEL`` values each."""
    L = t.shape[dim]
    per = max(1, (CHUNK_NUMEL * L) // max(t.numel(), 1))
    return [(i, min(per, L - i)) for i in range(0, L, per)]


def _sum_parts(parts, dim: int, wide: bool = False) -> torch.Tensor:
    """The sum of per-chunk partial sums (float64 when ``wide``)."""
    if len(parts) == 1:
        return parts[0].to(torch.float64) if wide else parts[0]
    return torch.cat(parts, dim).sum(dim, keepdim=True, dtype=torch.float64 if wide else None)


class _Centred:
    """``t - shift`` for one chunk: written into the same chunk of ``out`` when that is given and has the
    result's dtype, else into one reused chunk-sized temporary. Passes that only reduce ``t - shift`` give the
    future output as ``out`` only when there is a single chunk (the temporary would be as large as the output;
    its fresh pages cost as much to touch as to compute): with several chunks a temporary that stays in the
    cache is cheaper than writing the output twice."""

    __slots__ = ("out", "cdim", "buf")

    def __init__(self, out: Optional[torch.Tensor], cdim: int, dtype: torch.dtype):
        self.out = out if (out is not None and out.dtype == dtype) else None
        self.cdim = cdim
        self.buf = None

    def __call__(self, c: torch.Tensor, shift: torch.Tensor, i: int, n: int) -> torch.Tensor:
        cdim = self.cdim
        if self.out is not None:
            return torch.sub(c, shift, out=self.out.narrow(cdim, i, n))
        buf = self.buf
        if buf is None or buf.shape[cdim] < n:
            self.buf = buf = torch.sub(c, shift)
            return buf
        return torch.sub(c, shift, out=buf if buf.shape[cdim] == n else buf.narrow(cdim, 0, n))


def _shifted_sums(t: torch.Tensor, dims, cdim: int, pieces, shift: torch.Tensor, centred: _Centred):
    """Per-statistic ``(sum(d), sum(d^2), sum(t))`` with ``d = t - shift``, reduced over ``dims`` (keepdim), one
    chunk at a time (the chunk of ``t`` is in cache for ``d`` anyway); ``sum(d)`` and ``sum(t)`` are float64
    (float32 within a chunk)."""
    p1, p2, p0 = [], [], []
    for i, n in pieces:
        c = t.narrow(cdim, i, n)
        p0.append(c.sum(dims, keepdim=True, dtype=shift.dtype))
        d = centred(c, shift, i, n)
        p1.append(d.sum(dims, keepdim=True))
        p2.append(d.square_().sum(dims, keepdim=True))
    return _sum_parts(p1, cdim, True), _sum_parts(p2, cdim), _sum_parts(p0, cdim, True)


def _moments_large(t: torch.Tensor, dims, M: int, cd: torch.dtype, out: Optional[torch.Tensor] = None):
    """``(m0, corr, mean, var)`` (keepdim), reading ``t`` once (twice at worst), using ``out`` (the future
    output, same shape) as scratch space when there is one chunk. Shifted sums: with ``d = t - m0``,
    ``corr = sum(d) / M`` and ``var = sum(d^2) / M - corr^2``, whose rounding error is ``eps * (var + corr^2)``:
    as small as the two-pass algorithm's when the shift ``m0`` is within a fraction of a standard deviation of
    the mean. On CPU ``m0`` is the mean of the first chunk (then in cache), and when it is not that close
    (``corr^2 > var / 4``: a first chunk unlike the rest) the sums are taken again about ``m0 + corr``; on
    other devices (where that test would wait for the device) ``m0`` is the float32 mean, one more read.

    The mean: ``m0 + corr`` when the data sit far from 0 (``|m0| > 8 sd``), where ``d = t - m0`` is exact
    (Sterbenz) and so is ``corr`` but for its float32 sums; else ``sum(t) / M``, where rounding ``t - m0``
    would bias ``corr`` by up to ``|m0|`` ulps while ``sum(t)`` is as accurate as the data's spread allows."""
    cdim = dims[0]
    if t.numel() == 0:
        m0 = t.sum(dims, keepdim=True, dtype=cd)
        return m0, m0.clone(), m0.clone(), m0.clone()
    pieces = _chunks(t, cdim)
    if t.is_cpu and len(pieces) > 1:
        i, n = pieces[0]
        first = t.narrow(cdim, i, n)
        m0 = first.sum(dims, keepdim=True, dtype=cd).div_(max(first.numel() * M // t.numel(), 1))
    else:
        m0 = t.sum(dims, keepdim=True, dtype=cd).div_(M)
    centred = _Centred(out if len(pieces) == 1 else None, cdim, cd)
    for attempt in range(2):
        s1, s2, s0 = _shifted_sums(t, dims, cdim, pieces, m0, centred)
        corr = s1.div_(M).to(cd)
        c2 = corr * corr
        var = s2.div_(M).sub_(c2)
        if attempt or not t.is_cpu or len(pieces) == 1 or not bool((c2 > 0.25 * var).any()):
            break
        m0 = m0 + corr  # the first chunk's mean was far from the batch mean: again, about the estimate
    var.clamp_(min=0)
    far = m0.abs() > 8.0 * var.sqrt()
    mean = torch.where(far, (m0.to(torch.float64) + s1).to(cd), s0.div_(M).to(cd))
    return m0, corr, mean, var


def _scale_shift_into(d: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """``out = d * scale + shift`` (per-channel ``scale``, ``shift``; ``d`` may be ``out``), in the fastest form
    for the layout (see :func:`_affine`); a ``d`` of another dtype than ``out`` (a float32 temporary for
    float16 output) is finished in its own precision and rounded once."""
    if d.dtype != out.dtype:
        out.copy_(_affine(d, scale, shift, inplace=True))
    elif d.dim() == 2 or d.stride(-1) != 1:
        torch.addcmul(shift, d, scale, out=out)
    else:
        torch.mul(d, scale, out=out).add_(shift)


def _affine_large(t: torch.Tensor, dims, m0: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """``out = (t - m0) * scale + shift``, by chunks (``t - m0`` stays in cache between the two ops)."""
    cdim = dims[0]
    centred = _Centred(out, cdim, scale.dtype)
    for i, n in _chunks(t, cdim):
        _scale_shift_into(centred(t.narrow(cdim, i, n), m0, i, n), scale, shift, out.narrow(cdim, i, n))
    return out


def _backward_sums_large(dy: torch.Tensor, t: torch.Tensor, dims, mean: torch.Tensor, cd: torch.dtype,
                         need_s2: bool, out: Optional[torch.Tensor] = None):
    """``(S1, S2)`` = per-channel ``sum(dy)`` and ``sum(dy * (t - mean))`` (keepdim; ``S2`` None unless
    ``need_s2``), by chunks: one read of ``dy`` and ``t``, with ``out`` (``dx``'s buffer, or None) as scratch."""
    cdim = dims[0]
    if t.numel() == 0:
        s1 = dy.sum(dims, keepdim=True, dtype=cd)
        return s1, (s1.clone() if need_s2 else None)
    p1, p2 = [], []
    pieces = _chunks(t, cdim)
    centred = _Centred(out if len(pieces) == 1 else None, cdim, cd)
    for i, n in pieces:
        g = dy.narrow(cdim, i, n)
        p1.append(g.sum(dims, keepdim=True, dtype=cd))
        if need_s2:
            p2.append(centred(t.narrow(cdim, i, n), mean, i, n).mul_(g).sum(dims, keepdim=True))
    return _sum_parts(p1, cdim, True).to(cd), (_sum_parts(p2, cdim) if need_s2 else None)


def _dx_large(dy: torch.Tensor, t: torch.Tensor, dims, mean: torch.Tensor, c2: torch.Tensor, s1m: torch.Tensor,
              scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = scale * (dy - s1m - (t - mean) * c2)``, by chunks."""
    cdim = dims[0]
    shift = s1m * scale
    shift.neg_()
    centred = _Centred(out, cdim, scale.dtype)
    for i, n in _chunks(t, cdim):
        d = centred(t.narrow(cdim, i, n), mean, i, n)
        torch.addcmul(dy.narrow(cdim, i, n), d, c2, value=-1.0, out=d)   # dy - (x - mean) * c2
        _scale_shift_into(d, scale, shift, out.narrow(cdim, i, n))       # (...) * scale - s1m * scale
    return out


def _dx_small(dyc: torch.Tensor, xmu: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, v: torch.Tensor,
              scale: torch.Tensor, M: int) -> torch.Tensor:
    """``dx = scale * (dy - S1 / M - (x - mean) * S2 / (M v))`` with ``v = var + eps``, one op per step."""
    t = torch.sub(dyc, s1, alpha=1.0 / M)
    return t.addcmul_(xmu, s2 / v, value=-1.0 / M).mul_(scale)


def bn_train_forward(x: torch.Tensor, k: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float, renorm=None):
    """Normalize ``x`` with the statistics of each of its ``k`` batch groups.

    Returns ``(y, mean, var)`` with ``mean`` and the biased ``var`` of shape ``(k, C)`` in the compute
    dtype. ``renorm`` (batch renormalization): a callable ``(mean, var) -> (r, d)`` giving per-channel
    corrections (shape ``(k, C)`` or ``(C,)``), and then ``y = gamma * (x_hat * r + d) + beta``."""
    cd = compute_dtype(x)
    C = x.shape[1]
    grouped = k > 1
    t, dims = _grouped(x, k)
    nd = t.dim()
    M = x.numel() // (k * C) if x.numel() else 0
    small = 0 < x.numel() <= SMALL_NUMEL
    if small:
        mean, q, xmu = _moments_small(t if t.dtype == cd else t.to(cd), dims, M, True)
        var = q.mul_(_const(1.0 / M, cd))
    else:
        y = torch.empty_like(t, dtype=x.dtype)
        m0, corr, mean, var = _moments_large(t, dims, M, cd, y)
    invstd = torch.rsqrt(var + eps)
    w = _pview(cast_like(weight, cd), nd, grouped)
    shift = _pview(cast_like(bias, cd), nd, grouped)
    scale = invstd if w is None else invstd * w
    if renorm is not None:
        r, d = renorm(mean.reshape(k, C), var.reshape(k, C))
        r, d = _pview(r, nd, grouped), _pview(d, nd, grouped)
        scale = scale * r
        dd = d if w is None else d * w
        shift = dd if shift is None else shift + dd
    if small:
        y = _affine(xmu, scale, shift, inplace=True).reshape(x.shape)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
    else:
        shift = (corr * scale).neg_() if shift is None else torch.addcmul(shift, corr, scale, value=-1.0)
        y = _affine_large(t, dims, m0, scale, shift, y).view(x.shape)
    return y, mean.reshape(k, C), var.reshape(k, C)


def bn_eval_forward(x: torch.Tensor, weight, bias, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """``y = scale * x + shift`` with per-channel ``scale = gamma * invstd``, ``shift = beta - mean * scale``
    (the running statistics are constants here; this is torch's formula for evaluation too)."""
    cd = mean.dtype
    scale = invstd if weight is None else invstd * cast_like(weight, cd)
    shift = -mean * scale
    if bias is not None:
        shift = shift + cast_like(bias, cd)
    y = torch.addcmul(channel_view(shift, x.dim()), x, channel_view(scale, x.dim()))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def bn_backward(dy: torch.Tensor, x: torch.Tensor, k: int, mean: torch.Tensor, invstd: torch.Tensor,
                w_eff: Optional[torch.Tensor], training: bool, need_dx: bool, need_sum_dy_xhat: bool):
    """Hand-derived backward of ``y = w_eff * (x - mean) * invstd + const`` per batch group and channel.

    ``mean``, ``invstd``: shape (k, C) (compute dtype); ``w_eff``: (C,), (k, C) or None. In training mode the
    statistics depend on ``x``; in evaluation mode they are constants. Returns
    ``(dx or None, sum_dy (k, C), sum_dy_xhat (k, C) or None)``. Computed from the centred ``x - mean``."""
    cd = mean.dtype
    C = x.shape[1]
    grouped = k > 1
    t, dims = _grouped(x, k)
    g, _ = _grouped(dy, k)
    nd = t.dim()
    M = max(x.numel() // (k * C), 1) if x.numel() else 1
    mean_v, invstd_v = _pview(mean, nd, grouped), _pview(invstd, nd, grouped)
    scale = invstd_v if w_eff is None else invstd_v * _pview(w_eff, nd, grouped)
    need_s2 = need_sum_dy_xhat or (training and need_dx)
    dx = None
    if 0 < x.numel() <= SMALL_NUMEL:
        gc = g if g.dtype == cd else g.to(cd)
        xmu = (t if t.dtype == cd else t.to(cd)) - mean_v
        s1 = gc.sum(dims, keepdim=True)
        s2 = (gc * xmu).sum(dims, keepdim=True) if need_s2 else None
        if need_dx:
            if training:
                dx = _dx_small(gc, xmu, s1, s2, (invstd_v * invstd_v).reciprocal_(), scale, M)
            else:
                dx = gc * scale
    else:
        out = torch.empty_like(t, dtype=x.dtype) if (need_dx and training) else None
        s1, s2 = _backward_sums_large(g, t, dims, mean_v, cd, need_s2, out)
        if need_dx:
            if training:
                c2 = s2 * (invstd_v * invstd_v / M)
                dx = _dx_large(g, t, dims, mean_v, c2, s1 / M, scale, out)
            else:
                dx = g * scale
    if dx is not None:
        dx = dx.reshape(x.shape)
        dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
    sum_dy_xhat = None if s2 is None or not need_sum_dy_xhat else (s2 * invstd_v).reshape(k, C)
    return dx, s1.reshape(k, C), sum_dy_xhat


def _bn_layout(x: torch.Tensor, training: bool):
    """``(small, kd, dims, M)`` for an input: the small path (training, at most ``SMALL_NUMEL`` values, or any
    size inside a ``torch.func`` transform, where the chunked path's ``out=`` ops and data-dependent branch are
    not allowed), whether statistics keep their dims (input with spatial dims), the reduced dims, and the
    number of values per channel."""
    nd = x.dim()
    numel = x.numel()
    C = x.shape[1]
    small = training and 0 < numel and (numel <= SMALL_NUMEL or transforms_active())
    return small, nd > 2, _RDIMS[nd, False], numel // C if numel else 0


def _bn_xhat(xc: torch.Tensor, training: bool, eps: float, mean, invstd, dims, shape):
    """``(xhat, invstd)`` in differentiable ops: from the batch (training; the statistics recomputed from ``x``)
    or from the constant running statistics ``mean``, ``invstd`` (evaluation)."""
    if training:
        return ad.standardize(xc, dims, eps)
    mean, invstd = mean.view(shape), invstd.view(shape)
    return (xc - mean) * invstd, invstd


def bn_backward_plain(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], training: bool,
                      eps: float, mean: Optional[torch.Tensor], invstd: Optional[torch.Tensor], need_dx: bool,
                      need_w: bool, need_b: bool):
    """``(dx, dweight, dbias)`` of batch norm in differentiable ops (see :mod:`bnlib.torch._autodiff`): in
    training the statistics are recomputed from ``x``, so the result can be differentiated again; in evaluation
    ``mean``, ``invstd`` (per channel, broadcasting) are the constant running statistics."""
    cd = compute_dtype(x)
    nd = x.dim()
    dims = _RDIMS[nd, False]
    shape = (1, x.shape[1]) + (1,) * (nd - 2)
    xc, dyc, w = ad.cast(x, cd), ad.cast(dy, cd), ad.cast(weight, cd)
    w = None if w is None else w.view(shape)
    xhat, invstd = _bn_xhat(xc, training, eps, mean, invstd, dims, shape)
    dx = None
    if need_dx:
        g = dyc if w is None else dyc * w
        dx = ad.cast(ad.project(g, xhat, invstd, dims) if training else g * invstd, x.dtype)
    dw, db = ad.affine_grads(dyc, xhat, dims, need_w, need_b)
    return dx, dw, db


def bn_jvp(x: torch.Tensor, weight, training: bool, eps: float, mean, invstd, x_dot, w_dot, b_dot):
    """The forward-mode derivative of batch norm: ``ydot = gamma * P(xdot) + gammadot * xhat + betadot``, with
    ``P(u) = invstd * (u - mean(u) - xhat * mean(xhat * u))`` in training and ``invstd * u`` in evaluation."""
    cd = compute_dtype(x)
    nd = x.dim()
    dims = _RDIMS[nd, False]
    shape = (1, x.shape[1]) + (1,) * (nd - 2)

    def per_channel(t):
        return None if t is None else ad.cast(t, cd).view(shape)

    xhat, invstd = _bn_xhat(ad.cast(x, cd), training, eps, mean, invstd, dims, shape)
    xhat_dot = None
    if x_dot is not None:
        u = ad.cast(x_dot, cd)
        xhat_dot = ad.project(u, xhat, invstd, dims) if training else u * invstd
    y_dot = ad.affine_tangent(xhat_dot, xhat, per_channel(weight), per_channel(w_dot), per_channel(b_dot))
    return ad.cast(y_dot, x.dtype)


class BatchNormFunction(torch.autograd.Function):
    """Batch norm as one autograd node: forward computes the statistics (training) or uses the running ones
    (evaluation) and updates the running statistics in training; backward is the closed form above.

    ``forward`` returns ``(y, *saved)``: besides the output, what the backward needs (marked
    non-differentiable): small inputs in training, ``x - mean`` and the per-channel ``invstd``, ``var + eps``
    and ``scale``; otherwise the per-channel ``mean``, ``invstd`` and ``scale``. Per-channel values have shape
    ``(1, C, 1, ...)``, except on the small path for 2-d input: ``(C,)`` (they broadcast as they are). The
    separate ``setup_context`` and ``generate_vmap_rule`` make it usable under ``torch.func`` (``vmap``,
    ``grad``, ``jvp``); ``jvp`` is the hand-derived forward-mode derivative and a backward that must itself be
    differentiable (``create_graph=True``, ``torch.func``) is :func:`bn_backward_plain`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, unbiased=True):
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        nd = x.dim()
        C = x.shape[1]
        small, kd, dims, M = _bn_layout(x, training)
        w = None if weight is None else (weight if weight.dtype == cd else weight.to(cd))
        b = None if bias is None else (bias if bias.dtype == cd else bias.to(cd))
        if kd:
            shape = (1, C) + (1,) * (nd - 2)
            w = None if w is None else w.view(shape)
            b = None if b is None else b.view(shape)
        if small:
            mean, q, xmu = _moments_small(x if x.dtype == cd else x.to(cd), dims, M, kd)
            v = torch.addcmul(_const(eps, cd), q, _const(1.0 / M, cd))  # var + eps = q / M + eps
            invstd = v.rsqrt()
            scale = invstd if w is None else invstd * w
            y = _affine(xmu, scale, b)
            saved = (xmu, invstd, v, scale)
            if running_mean is not None:  # var = q / M; unbiased q / (M - 1) (Keras' convention: biased)
                var = q.mul_(_const(1.0 / (M - 1 if unbiased else M), cd)) if M > 1 else q
                if kd:
                    mean, var = mean.view(C), var.view(C)
                if running_mean.dtype == running_var.dtype == mean.dtype and not transforms_active():
                    torch._foreach_lerp_((running_mean, running_var), (mean, var), momentum)
                else:
                    update_running_stats_(running_mean, running_var, mean, var, 1, momentum)
        elif training:
            y = torch.empty_like(x)
            m0, corr, mean, var = _moments_large(x, dims, M, cd, y)
            invstd = (var + eps).rsqrt_()
            scale = invstd if w is None else invstd * w
            shift = (corr * scale).neg_() if b is None else torch.addcmul(b, corr, scale, value=-1.0)
            y = _affine_large(x, dims, m0, scale, shift, y)
            saved = (mean, invstd, scale)
            if running_mean is not None and M > 0:  # an empty batch leaves them as they are (as torch does)
                update_running_stats_(running_mean, running_var, mean.view(C), var.view(C), M if unbiased else 1,
                                      momentum)
        else:
            shape = (1, C) + (1,) * (nd - 2)
            mean = running_mean.to(cd).view(shape)
            invstd = (running_var.to(cd) + eps).rsqrt().view(shape)
            scale = invstd if w is None else invstd * w
            shift = (mean * scale).neg() if b is None else torch.addcmul(b, mean, scale, value=-1.0)
            y = torch.addcmul(shift, x, scale)
            saved = (mean, invstd, scale)
        return (y if y.dtype == x.dtype else y.to(x.dtype),) + saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _, _, training, _, eps = inputs[:8]
        saved = output[1:]
        ctx.mark_non_differentiable(*saved)
        small, kd, dims, M = _bn_layout(x, training)
        ctx.meta = (small, training, kd, dims, max(M, 1), x.dtype, None if weight is None else weight.dtype,
                    None if bias is None else bias.dtype, eps, len(saved))
        ctx.save_for_backward(x, weight, *saved)
        ctx.save_for_forward(x, weight, *saved)

    @staticmethod
    def backward(ctx, dy, *_):
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]
        small, training, kd, dims, M, x_dtype, w_dtype, b_dtype, eps, _ = ctx.meta
        dx = dw = db = None
        if higher_order():
            x, weight, *saved = ctx.saved_tensors
            mean, invstd = (None, None) if training else saved[:2]
            dx, dw, db = bn_backward_plain(dy, x, weight, training, eps, mean, invstd, need_dx, need_w, need_b)
            return (dx, ad.cast(dw, w_dtype), ad.cast(db, b_dtype)) + (None,) * 6
        if small:
            _, _, xmu, invstd, v, scale = ctx.saved_tensors
            dyc = dy if dy.dtype == xmu.dtype else dy.to(xmu.dtype)
            s1 = dyc.sum(dims, keepdim=kd)
            s2 = (dyc * xmu).sum(dims, keepdim=kd) if (need_dx or need_w) else None
            if need_dx:
                dx = _dx_small(dyc, xmu, s1, s2, v, scale, M)
        else:  # per-channel values have shape (1, C, 1, ...) here
            x, _, mean, invstd, scale = ctx.saved_tensors
            out = torch.empty_like(x) if (need_dx and training) else None
            s1, s2 = _backward_sums_large(dy, x, dims, mean, mean.dtype, need_w or (training and need_dx), out)
            if need_dx:
                if training:
                    dx = _dx_large(dy, x, dims, mean, s2 * (invstd * invstd / M), s1 / M, scale, out)
                else:
                    dx = dy * scale
        if need_dx and dx.dtype != x_dtype:
            dx = dx.to(x_dtype)
        if need_w:
            dw = s2 * invstd
            dw = dw.view(-1) if dw.dim() > 1 else dw
            dw = dw if dw.dtype == w_dtype else dw.to(w_dtype)
        if need_b:
            db = s1.view(-1) if s1.dim() > 1 else s1
            db = db if db.dtype == b_dtype else db.to(b_dtype)
        return dx, dw, db, None, None, None, None, None, None  # (trailing Nones beyond the inputs are allowed)

    @staticmethod
    def jvp(ctx, x_dot, w_dot, b_dot, *_):
        small, training, kd, dims, M, x_dtype, w_dtype, b_dtype, eps, n_saved = ctx.meta
        x, weight, *saved = ctx.saved_tensors
        mean, invstd = (None, None) if training else saved[:2]
        return (bn_jvp(x, weight, training, eps, mean, invstd, x_dot, w_dot, b_dot),) + (None,) * n_saved


_BatchNormFunctionCompiled = ad.compile_twin(BatchNormFunction)


# ----------------------------------------------------------------------------------------------------------
# Triton backend (bnlib.torch.triton_bn, imported lazily so that bnlib.torch works without triton)
# ----------------------------------------------------------------------------------------------------------
def _triton_module():
    try:
        from . import triton_bn  # noqa: WPS433 (lazy on purpose)
    except Exception:  # triton missing or the module not importable
        return None
    return triton_bn


class VerifiedArch(NamedTuple):
    """One GPU architecture on which the Triton kernels were run and checked (see
    :data:`VERIFIED_TRITON_ARCHS`)."""

    capability: Tuple[int, int]  #: ``torch.cuda.get_device_capability()``, e.g. ``(9, 0)`` for sm_90
    device: str  #: ``torch.cuda.get_device_name()`` of the GPU it was checked on
    date: str  #: ``YYYY-MM-DD`` of the run
    verified: str  #: what was checked (tests, benchmarks, shapes, dtypes)


#: The GPU architectures on which :mod:`bnlib.torch.triton_bn` was run on a real GPU and checked against
#: torch; ``backend='auto'`` uses the Triton kernels only on these (see :func:`batch_norm`). Add an entry only
#: after such a run, with what it checked. Empty: the kernels have so far only run in Triton's CPU interpreter
#: (``TRITON_INTERPRET=1``) and been compiled ahead of time (``triton_bn.compile_report``); no GPU run was made.
VERIFIED_TRITON_ARCHS: Tuple[VerifiedArch, ...] = ()

_WARNED_ARCHS: set = set()  # the capabilities for which 'auto' already said it falls back (once per process)


def _cuda_capability(x: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` compute capability of ``x``'s CUDA device, or ``None`` when ``x`` is not on CUDA."""
    if not x.is_cuda:
        return None
    return tuple(torch.cuda.get_device_capability(x.device))


def _triton_verified(capability: Tuple[int, int]) -> bool:
    return any(tuple(arch.capability) == tuple(capability) for arch in VERIFIED_TRITON_ARCHS)


def _warn_unverified(capability: Tuple[int, int]) -> None:
    capability = tuple(capability)
    if capability in _WARNED_ARCHS:
        return
    _WARNED_ARCHS.add(capability)
    major, minor = capability
    verified = ", ".join(f"sm_{a.capability[0]}{a.capability[1]}" for a in VERIFIED_TRITON_ARCHS) or "none"
    warnings.warn(f"bnlib.torch batch_norm, backend='auto': the Triton kernels are unverified on this GPU "
                  f"architecture (sm_{major}{minor}, compute capability {major}.{minor}; verified: {verified}, "
                  "see bnlib.torch.VERIFIED_TRITON_ARCHS), so the torch-ops path is used. Pass backend='triton' "
                  "to force the Triton kernels. (Said once per architecture.)", RuntimeWarning, stacklevel=4)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    capability = _cuda_capability(x)
    if (backend == "auto" and capability is None) or transforms_active():  # torch.func: the torch-ops path
        return False
    mod = _triton_module()
    available = mod is not None and bool(mod.is_available(x))
    if backend == "triton" and not available:
        raise RuntimeError("backend='triton' is not available for this input: the Triton kernels need triton, "
                           "a float32/float16/bfloat16 input and a CUDA device (or TRITON_INTERPRET=1); got a "
                           f"{str(x.dtype).replace('torch.', '')} tensor on {x.device} with bnlib.torch.triton_bn "
                           f"{'importable' if mod else 'not importable'}. Use backend='torch' or 'auto'.")
    if backend == "auto" and available and not _triton_verified(capability):
        _warn_unverified(capability)
        return False
    return available


class _TritonBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        mod = _triton_module()
        y, save_mean, save_invstd = mod.batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                           training, momentum, eps)
        if not training:  # the statistics are the (constant) running ones
            cd = compute_dtype(x)
            save_mean = running_mean.to(cd)
            save_invstd = torch.rsqrt(running_var.to(cd) + eps)
        ctx.training, ctx.eps = training, eps
        save_norm_context(ctx, x, weight, bias, save_mean, save_invstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, need_dx, need_w, need_b = saved_norm_context(ctx)
        if higher_order():  # create_graph=True: the closed form in differentiable ops
            dx, dw, db = bn_backward_plain(dy, x, weight, ctx.training, ctx.eps, mean, invstd, need_dx, need_w,
                                           need_b)
            return dx, cast_like(dw, None if weight is None else weight.dtype), cast_like(db, ctx.bias_dtype), \
                None, None, None, None, None
        if ctx.training:
            mod = _triton_module()
            dx, dw, db = mod.batch_norm_backward(dy, x, weight, mean, invstd)
        else:
            w = cast_like(weight, mean.dtype)
            dx, sum_dy, sum_dy_xhat = bn_backward(dy, x, 1, mean.view(1, -1).float(),
                                                  invstd.view(1, -1).float(), w, False, need_dx, need_w)
            dw = sum_dy_xhat[0] if need_w else None
            db = sum_dy[0]
        dw = cast_like(dw, weight.dtype) if (need_w and dw is not None) else None
        db = cast_like(db, ctx.bias_dtype) if (need_b and db is not None) else None
        return (dx if need_dx else None), dw, db, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
_LAYOUT = "(N, C) or (N, C, *spatial) with 1-3 spatial dims"


def _as_count(num_batches_tracked):
    """``num_batches_tracked`` (an int or a 0-d integer tensor) as a Python int, or ``None`` otherwise."""
    count = num_batches_tracked
    if isinstance(count, torch.Tensor):
        if count.dim() != 0 or count.dtype.is_floating_point or count.dtype.is_complex:
            return None
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int):
        return None
    return count


def averaging_factor(momentum, num_batches_tracked, needed: bool) -> float:
    """The weight of the new batch in the running averages (same rule and messages as :mod:`bnlib.numpy`,
    see :func:`bnlib._checks.averaging_factor`): ``momentum`` in [0, 1], or ``None`` for the cumulative
    average ``1 / num_batches_tracked`` (batches seen *including this one*)."""
    return _checks.averaging_factor(momentum, num_batches_tracked, needed, _as_count)


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked=None, *, check_momentum: bool = True):
    """Validate everything ``batch_norm`` (and its variants) needs, touching nothing; returns the averaging
    factor (see :func:`averaging_factor`)."""
    check_input(input)
    _checks.check_ndim(input.dim(), (2, 3, 4, 5), "input", _LAYOUT)
    C = input.shape[1]
    _checks.check_eps(eps)
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__} {training!r}")
    _checks.check_running_stats(running_mean is not None, running_var is not None, training)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        check_param(name, t, input, C=C)
    if training:
        _checks.check_training_eps(eps)
        _checks.check_training_size(tuple(input.shape))
    if not check_momentum:
        return 0.0
    return averaging_factor(momentum, num_batches_tracked, training and running_mean is not None)


_INF = float("inf")
# the dtypes a parameter or running statistic may have, per input dtype (see bnlib.torch._common)
_PARAM_DTYPES = {torch.float32: (torch.float32,), torch.float64: (torch.float64,),
                 torch.float16: (torch.float16, torch.float32), torch.bfloat16: (torch.bfloat16, torch.float32)}


def quick_args_ok(input: torch.Tensor, running_mean, running_var, weight, bias, training, eps) -> bool:
    """A cheap test of the common case: True only when :func:`check_batch_norm_args` would accept these
    arguments (``momentum`` aside; ``input`` must be a tensor). False means "not sure": the caller then runs
    the full checks, which raise with their message (or pass, for the rarer valid cases this test leaves out:
    an ``eps`` that is an int, an empty batch, ...). Costs about 2 microseconds instead of 20."""
    ok = _PARAM_DTYPES.get(input.dtype)
    if ok is None or type(eps) is not float or not 0.0 < eps < _INF or type(training) is not bool:
        return False
    shape = input.shape
    if not 2 <= len(shape) <= 5:
        return False
    C = shape[1]
    device = input.device
    for t in (running_mean, running_var, weight, bias):
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype in ok and t.shape == (C,)
                                  and t.device == device):
            return False
    if (running_mean is None) != (running_var is None):
        return False
    if training:
        return input.numel() > C  # more than one value per channel (and not empty)
    return running_mean is not None


def apply_batch_norm(input, running_mean, running_var, weight, bias, training: bool, momentum: float,
                     eps: float, backend: str = "auto", unbiased: bool = True) -> torch.Tensor:
    """:func:`batch_norm` after the argument checks (the caller made them; ``momentum`` is the averaging
    factor, the weight of the new batch; ``unbiased=False`` stores the biased variance, Keras' convention):
    the backend dispatch and the autograd function."""
    if not unbiased:
        if backend == "triton":
            raise ValueError("convention: expected 'torch' with backend='triton' (the Triton kernels store the "
                             "unbiased variance), got 'keras'")
        return ad.apply(BatchNormFunction, _BatchNormFunctionCompiled, input, weight, bias, running_mean,
                        running_var, training, momentum, eps, False)[0]
    if backend != "torch" and _use_triton(input, backend):
        return _TritonBatchNormFunction.apply(input, weight, bias, running_mean, running_var, training,
                                              momentum, eps)
    return ad.apply(BatchNormFunction, _BatchNormFunctionCompiled, input, weight, bias, running_mean, running_var,
                    training, momentum, eps, True)[0]


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
               backend: str = "auto", *, num_batches_tracked=None, convention: str = "torch") -> torch.Tensor:
    r"""Batch normalization, drop-in for :func:`torch.nn.functional.batch_norm`.

    Args:
        input: ``(N, C, *)``, float32/float64/float16/bfloat16, contiguous or channels-last.
        running_mean, running_var: ``(C,)`` buffers or ``None``. In training they are updated in place
            (``running = (1 - momentum) * running + momentum * batch``, unbiased variance); in evaluation they
            normalize the input.
        weight, bias: ``(C,)`` or ``None`` (gamma = 1, beta = 0).
        training: use batch statistics (and update the running ones) when True.
        momentum: weight of the new batch in the running averages, in [0, 1]; ``None`` for the cumulative
            average, which needs ``num_batches_tracked`` (batches seen including this one; not incremented).
        eps: added to the variance, > 0.
        backend: ``'torch'`` (the hand-written torch-ops path here), ``'triton'`` (:mod:`bnlib.torch.triton_bn`,
            forced whatever the GPU; needs CUDA or ``TRITON_INTERPRET=1``, else RuntimeError) or ``'auto'``:
            the Triton kernels for a CUDA tensor only when triton imports, the dtype is supported and the
            device's compute capability is in :data:`VERIFIED_TRITON_ARCHS` (so far empty: no GPU run of the
            kernels has been made); otherwise the torch-ops path, with a ``RuntimeWarning`` once per
            architecture when a CUDA tensor falls back for want of verification. CPU tensors: torch-ops path.

    ``convention='keras'`` keeps the running statistics as Keras does: ``momentum`` is the weight of the *old*
    average (Keras' default 0.99 is PyTorch's 0.01; ``None`` is not allowed) and the running variance stores
    the *biased* batch variance. The normalization itself is the same. (The NumPy twin:
    :func:`bnlib.numpy.keras_batch_norm` and ``bnlib.numpy.BatchNorm*d(..., convention='keras')``.)

    The backward pass is the hand-derived closed form (see the module docstring), differentiable again
    (``create_graph=True``), with a hand-derived ``jvp`` and usable under ``torch.func``. float16/bfloat16 input
    is computed in float32 (means accumulated in float64), output in the input dtype. Bad input raises before
    running statistics change.
    """
    if convention != "torch":
        _check_convention(convention, momentum)
        factor = check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return apply_batch_norm(input, running_mean, running_var, weight, bias, training, 1.0 - factor, eps,
                                backend, unbiased=False)
    if (isinstance(input, torch.Tensor) and type(momentum) is float and 0.0 <= momentum <= 1.0
            and quick_args_ok(input, running_mean, running_var, weight, bias, training, eps)):
        factor = momentum
    else:
        factor = check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                       num_batches_tracked)
    return apply_batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps, backend)


CONVENTIONS = ("torch", "keras")


def _check_convention(convention, momentum) -> None:
    """``convention`` is 'torch' or 'keras'; Keras' momentum is a number (Keras has no cumulative average)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected 'torch' or 'keras', got {convention!r}")
    if convention == "keras" and momentum is None:
        raise ValueError("momentum: expected a real number in [0, 1] with convention='keras' (the weight of the "
                         "old average; Keras has no cumulative average), got None")
