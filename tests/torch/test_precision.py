"""Float32 precision of bnlib.torch's batch norm against torch's own kernel, both judged by a float64 truth.

For each input, three runs of training-mode batch norm (affine, running statistics): bnlib in float32, torch's
native kernel (``torch.nn.functional.batch_norm``) in float32, and torch in float64 on the same float32-rounded
inputs (the truth). For the output ``y`` and the gradients ``dx``, ``dgamma`` and ``dbeta``::

    max|bnlib - truth|  <=  2 * max|torch - truth|  +  4 ulps(float32) * max|truth|

The floor. Without it the bound is ``2 x`` an error that may by chance be almost zero: torch accumulates
``dbeta`` in double and its mean is often correctly rounded, so its error on a quantity can be a fraction of
an ulp while ours, equally good in expectation, is one or two ulps. Four float32 ulps of the largest value
is the rounding of a handful of operations on the result itself, nothing more: an algorithmic loss of
precision is larger and still fails. The last test shows it: the backward bnlib used before (a float32 mean
and the uncentered ``dx = a * dy + b * x + c``, which rounds at the size of ``|x| * invstd``) misses this
bound on data far from zero (``x = 1e3 + randn``).

Shapes cover both code paths of ``bnlib.torch._batch_norm`` (up to ``SMALL_NUMEL`` values: one op per step;
above: chunked passes, also with many small chunks), 1-d and 2-d inputs, contiguous and channels-last, and
offsets 0 and 1e3.
"""
import pytest
import torch
import torch.nn.functional as F

from bnlib.torch import _batch_norm
from bnlib.torch import functional as BF
from tests._numerics import assert_error_within

FACTOR = 2.0
ULPS = 4.0
EPS = 1e-5

SHAPES = [  # (shape, channels_last, chunk size or None for the default)
    ((16, 5), False, None),
    ((8, 5, 7), False, None),
    ((32, 16, 8, 8), False, None),
    ((32, 16, 8, 8), True, None),
    ((4096, 24), False, None),            # chunked path (98304 values)
    ((64, 8, 16, 16), False, None),       # chunked path, one chunk
    ((64, 8, 16, 16), True, None),
    ((64, 8, 16, 16), False, 1 << 14),    # chunked path, eight chunks
    ((64, 8, 16, 16), True, 1 << 14),
]
IDS = [f"{'x'.join(map(str, s))}{'-cl' if cl else ''}{'-chunks' if ch else ''}" for s, cl, ch in SHAPES]


def _inputs(shape, channels_last, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) + offset  # float32: the three runs see the same rounded values
    dy = torch.randn(shape, generator=g)
    C = shape[1]
    w = torch.rand(C, generator=g) + 0.5
    b = torch.randn(C, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x, dy, w, b


def _run(fn, x, dy, w, b, dtype):
    """``(y, dx, dgamma, dbeta)`` of one training step of ``fn`` in ``dtype``."""
    x = x.detach().to(dtype, copy=True).requires_grad_(True)  # fresh leaves: no gradient shared between runs
    w = w.detach().to(dtype, copy=True).requires_grad_(True)
    b = b.detach().to(dtype, copy=True).requires_grad_(True)
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    y = fn(x, rm, rv, w, b, True, 0.1, EPS)
    y.backward(dy.to(dtype))
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["offset0", "offset1e3"])
@pytest.mark.parametrize("shape,channels_last,chunk", SHAPES, ids=IDS)
def test_float32_error_at_most_twice_torchs(shape, channels_last, chunk, offset, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(_batch_norm, "CHUNK_NUMEL", chunk)
    for seed in range(3):
        x, dy, w, b = _inputs(shape, channels_last, offset, seed)
        truth = _run(F.batch_norm, x, dy, w, b, torch.float64)
        ref = _run(F.batch_norm, x, dy, w, b, torch.float32)
        ours = _run(BF.batch_norm, x, dy, w, b, torch.float32)
        for name, o, r, t in zip(("y", "dx", "dgamma", "dbeta"), ours, ref, truth):
            assert o.dtype == torch.float32
            assert_error_within(o, r, t, factor=FACTOR, ulps=ULPS, what=f"{name} (seed {seed})")


def _old_backward(x, dy, w):
    """``(dx, dgamma)`` as bnlib computed them before (float32): mean by a float32 sum, then
    ``dx = a * dy + b * x + c`` with per-channel ``a, b, c`` (uncentered)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    M = x.numel() // x.shape[1]
    mean = x.sum(dims) / M
    xmu = x - mean.view(shape)
    invstd = torch.rsqrt((xmu * xmu).sum(dims) / M + EPS)
    a = w * invstd
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * xmu).sum(dims) * invstd
    bb = -a * invstd * sum_dy_xhat / M
    c = -a * sum_dy / M - bb * mean
    return a.view(shape) * dy + bb.view(shape) * x + c.view(shape), sum_dy_xhat


def test_the_bound_catches_the_old_backward():
    """The bound is not vacuous: the old float32 backward (float32 mean, uncentered ``dx``) exceeds it at a 1e3
    offset (by up to 4x on the machine this was written on; asserted: for at least one of five inputs),
    while bnlib's passes on every one of them."""
    failures = 0
    for seed in range(5):
        x, dy, w, b = _inputs((32, 16, 8, 8), False, 1e3, seed)
        truth = _run(F.batch_norm, x, dy, w, b, torch.float64)
        ref = _run(F.batch_norm, x, dy, w, b, torch.float32)
        ours = _run(BF.batch_norm, x, dy, w, b, torch.float32)
        for i, old in zip((1, 2), _old_backward(x, dy, w)):
            assert_error_within(ours[i], ref[i], truth[i], factor=FACTOR, ulps=ULPS, what=f"bnlib, seed {seed}")
            try:
                assert_error_within(old, ref[i], truth[i], factor=FACTOR, ulps=ULPS)
            except AssertionError:
                failures += 1
    assert failures > 0
