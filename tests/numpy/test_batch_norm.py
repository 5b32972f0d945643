"""bnlib.numpy batch norm: forward/backward against torch, running statistics, properties, stability."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import bnlib.numpy as bnp
from tests._numerics import assert_error_within
from tests.numpy._testutils import FAST, bn_axes, channel_view, close, nc_shapes, numeric_grad, rand, t


@FAST
@given(shape=nc_shapes(), seed=st.integers(0, 2**32 - 1), affine=st.booleans(),
       momentum=st.sampled_from([0.1, 0.5, 1.0, 0.0]))
@example(shape=(2, 1), seed=0, affine=True, momentum=0.1)
@example(shape=(2, 1, 3, 1, 5), seed=1, affine=False, momentum=0.5)
@example(shape=(3, 5, 7, 1), seed=2, affine=True, momentum=0.1)
def test_training_forward_backward_match_torch(shape, seed, affine, momentum):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rand(rng, shape, 3.0, 2.0)
    dy = rand(rng, shape)
    w = rand(rng, C) if affine else None
    b = rand(rng, C) if affine else None
    rm, rv = rand(rng, C), rng.random(C) + 0.5
    trm, trv = t(rm), t(rv)

    y = bnp.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum)
    dx, dw, db = bnp.batch_norm_backward(dy, x, w)

    xt = t(x, True)
    wt = t(w if affine else np.ones(C), True)
    bt = t(b if affine else np.zeros(C), True)
    yt = F.batch_norm(xt, trm, trv, wt, bt, training=True, momentum=momentum)
    yt.backward(t(dy))
    close(y, yt)
    close(rm, trm)
    close(rv, trv)
    close(dx, xt.grad)
    close(dw, wt.grad)  # without weight: gradient w.r.t. the implicit gamma = 1
    close(db, bt.grad)


@FAST
@given(shape=nc_shapes(), seed=st.integers(0, 2**32 - 1))
@example(shape=(2, 1, 1, 1, 1), seed=0)
def test_eval_forward_backward_match_torch(shape, seed):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x, dy, w, b = rand(rng, shape, 2.0, 1.0), rand(rng, shape), rand(rng, C), rand(rng, C)
    rm, rv = rand(rng, C), rng.random(C) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y = bnp.batch_norm(x, rm, rv, w, b, training=False)
    dx, dw, db = bnp.batch_norm_backward(dy, x, w, training=False, running_mean=rm, running_var=rv)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = F.batch_norm(xt, t(rm), t(rv), wt, bt, training=False)
    yt.backward(t(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(dw, wt.grad)
    close(db, bt.grad)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)


def test_training_without_running_stats_matches_torch():
    rng = np.random.default_rng(1)
    x = rand(rng, (5, 3, 7))
    close(bnp.batch_norm(x, None, None, training=True), F.batch_norm(t(x), None, None, training=True))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_finite_differences(dims):
    rng = np.random.default_rng(dims)
    shape = (3, 2) + (2,) * (dims - 1) if dims > 1 else (4, 3)
    x, w, b = rand(rng, shape, 1.5, 0.5), rand(rng, shape[1]), rand(rng, shape[1])
    R = rand(rng, shape)

    def loss():
        return float(np.sum(bnp.batch_norm(x, None, None, w, b, training=True) * R))

    dx, dw, db = bnp.batch_norm_backward(R, x, w)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-5, atol=1e-7)


@FAST
@given(shape=nc_shapes(), seed=st.integers(0, 2**32 - 1))
def test_output_has_zero_mean_unit_variance(shape, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, 5.0, -3.0)
    y = bnp.batch_norm(x, None, None, training=True, eps=1e-12)
    ax = bn_axes(len(shape))
    np.testing.assert_allclose(y.mean(axis=ax), 0.0, atol=1e-12)
    var = x.var(axis=ax)
    # unit variance up to the eps term (and exactly 0 for a constant channel)
    np.testing.assert_allclose(y.var(axis=ax), np.where(var > 0, 1.0, 0.0), rtol=1e-8, atol=1e-8)


@FAST
@given(shape=nc_shapes(), seed=st.integers(0, 2**32 - 1))
def test_invariant_to_per_channel_positive_affine_maps(shape, seed):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rand(rng, shape)
    a = rng.uniform(0.5, 3.0, C)
    c = rng.uniform(-5.0, 5.0, C)
    y1 = bnp.batch_norm(x, None, None, training=True, eps=1e-12)
    y2 = bnp.batch_norm(x * channel_view(a, len(shape)) + channel_view(c, len(shape)), None, None,
                        training=True, eps=1e-12)
    np.testing.assert_allclose(y1, y2, rtol=1e-7, atol=1e-7)


@FAST
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.01, 100.0))
def test_bn_of_xw_is_invariant_to_scaling_w(seed, scale):
    rng = np.random.default_rng(seed)
    x, W = rand(rng, (16, 5)), rand(rng, (5, 4))
    y1 = bnp.batch_norm(x @ W, None, None, training=True, eps=1e-14)
    y2 = bnp.batch_norm(x @ (W * scale), None, None, training=True, eps=1e-14)
    np.testing.assert_allclose(y1, y2, rtol=1e-7, atol=1e-7)
    # and so is the gradient w.r.t. the layer's output direction, scaled by 1/scale
    dy = rand(rng, (16, 4))
    g1 = bnp.batch_norm_backward(dy, x @ W, eps=1e-14)[0]
    g2 = bnp.batch_norm_backward(dy, x @ (W * scale), eps=1e-14)[0]
    np.testing.assert_allclose(g1, g2 * scale, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (4, 3, 5)),
                                       ("BatchNorm2d", (4, 3, 5, 3)), ("BatchNorm3d", (2, 3, 2, 3, 2))])
def test_running_stats_identical_to_torch_over_20_steps(cls, shape, momentum):
    rng = np.random.default_rng(0)
    m = getattr(bnp, cls)(3, momentum=momentum, dtype=np.float64)
    tm = getattr(torch.nn, cls)(3, momentum=momentum, dtype=torch.float64)
    for step in range(20):
        x = rand(rng, shape, 1.0 + step % 3, step % 5 - 2.0)
        close(m(x), tm(t(x)))
    close(m.running_mean, tm.running_mean)
    close(m.running_var, tm.running_var)
    assert int(m.num_batches_tracked) == int(tm.num_batches_tracked) == 20
    m.eval()
    tm.eval()
    x = rand(rng, shape)
    close(m(x), tm(t(x)))


def test_functional_momentum_none_needs_count():
    rng = np.random.default_rng(0)
    rm, rv = np.zeros(2), np.ones(2)
    x1, x2 = rand(rng, (5, 2)), rand(rng, (5, 2))
    bnp.batch_norm(x1, rm, rv, training=True, momentum=None, num_batches_tracked=1)
    bnp.batch_norm(x2, rm, rv, training=True, momentum=None, num_batches_tracked=2)
    np.testing.assert_allclose(rm, (x1.mean(0) + x2.mean(0)) / 2, rtol=1e-12)
    np.testing.assert_allclose(rv, (x1.var(0, ddof=1) + x2.var(0, ddof=1)) / 2, rtol=1e-12)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bnp.batch_norm(x2, rm, rv, training=True, momentum=None)


def test_keras_convention_matches_its_formula():
    rng = np.random.default_rng(0)
    C = 3
    mm, mv = rand(rng, C), rng.random(C) + 0.5
    gamma, beta = rand(rng, C), rand(rng, C)
    for _step in range(5):
        x = rand(rng, (8, C, 4), 2.0, 1.0)
        mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))  # biased
        exp_y = gamma[:, None] * (x - mean[:, None]) / np.sqrt(var[:, None] + 1e-3) + beta[:, None]
        exp_mm = 0.99 * mm + 0.01 * mean
        exp_mv = 0.99 * mv + 0.01 * var
        y = bnp.keras_batch_norm(x, mm, mv, gamma, beta, training=True)
        np.testing.assert_allclose(y, exp_y, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(mm, exp_mm, rtol=1e-12)
        np.testing.assert_allclose(mv, exp_mv, rtol=1e-12)
    x = rand(rng, (4, C, 4))
    np.testing.assert_allclose(bnp.keras_batch_norm(x, mm, mv, gamma, beta, training=False),
                               gamma[:, None] * (x - mm[:, None]) / np.sqrt(mv[:, None] + 1e-3) + beta[:, None],
                               rtol=1e-10, atol=1e-10)


def test_keras_convention_module():
    rng = np.random.default_rng(1)
    m = bnp.BatchNorm1d.from_keras(4, dtype=np.float64)
    assert (m.momentum, m.eps, m.convention) == (0.99, 1e-3, "keras")
    mm, mv = np.zeros(4), np.ones(4)
    for _ in range(3):
        x = rand(rng, (10, 4), 3.0, 2.0)
        m(x)
        mm = 0.99 * mm + 0.01 * x.mean(0)
        mv = 0.99 * mv + 0.01 * x.var(0)
    np.testing.assert_allclose(m.running_mean, mm, rtol=1e-12)
    np.testing.assert_allclose(m.running_var, mv, rtol=1e-12)
    m2 = bnp.BatchNorm1d(4, eps=1e-3, momentum=0.99, convention="keras")
    assert m2.convention == "keras" and "keras" in repr(m2)
    with pytest.raises(ValueError, match="convention"):
        bnp.BatchNorm1d(4, convention="tf")


@pytest.mark.parametrize("training", [True, False])
def test_float32_with_1e4_offset_matches_float64(training):
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((32, 8, 6, 6)) + 1e4
    x32 = x64.astype(np.float32)
    ref_in = x32.astype(np.float64)  # the same numbers, computed in float64
    rm = ref_in.mean(axis=(0, 2, 3))
    rv = ref_in.var(axis=(0, 2, 3))
    y32 = bnp.batch_norm(x32, rm.astype(np.float32), rv.astype(np.float32), training=training)
    y64 = bnp.batch_norm(ref_in, rm.copy(), rv.copy(), training=training)
    assert y32.dtype == np.float32
    assert np.max(np.abs(y32 - y64)) < 1e-3
    # the gradient too
    dy = rng.standard_normal(x32.shape)
    dx32 = bnp.batch_norm_backward(dy.astype(np.float32), x32)[0]
    dx64 = bnp.batch_norm_backward(dy, ref_in)[0]
    assert dx32.dtype == np.float32
    assert np.max(np.abs(dx32 - dx64)) < 1e-3


def test_float32_in_float32_out_and_close_to_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4, 9, 9), dtype=np.float32)
    w = rng.standard_normal(4).astype(np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    y = bnp.batch_norm(x, None, None, w, None, training=True)
    dx, dw, db = bnp.batch_norm_backward(dy, x, w)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == np.float32
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = F.batch_norm(xt, None, None, wt, None, training=True)
    yt.backward(torch.tensor(dy))
    # float32 rounding depends on the processor's summation order: judge both against the float64 result on the
    # same inputs, bnlib within a few times torch's float32 error (tests/_numerics.py)
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    y64 = bnp.batch_norm(x64, None, None, w64, None, training=True)
    dx64, dw64, db64 = bnp.batch_norm_backward(dy64, x64, w64)
    assert_error_within(y, yt.detach().numpy(), y64, what="output")
    assert_error_within(dx, xt.grad.numpy(), dx64, what="input gradient")
    assert_error_within(dw, wt.grad.numpy(), dw64, what="weight gradient")


def test_non_contiguous_input():
    rng = np.random.default_rng(0)
    x = rand(rng, (4, 5, 6, 3)).transpose(0, 3, 1, 2)  # (4, 3, 5, 6), channels-last memory
    close(bnp.batch_norm(x, None, None, training=True), F.batch_norm(t(x), None, None, training=True))


def test_nan_and_inf_propagate():
    rng = np.random.default_rng(0)
    x = rand(rng, (4, 3, 5))
    x[1, 0, 2] = np.nan
    x[2, 2, 1] = np.inf
    rm, rv = np.zeros(3), np.ones(3)
    with np.errstate(invalid="ignore"):
        y = bnp.batch_norm(x, rm, rv, training=True)
        dx = bnp.batch_norm_backward(np.ones_like(x), x)[0]
    assert np.isnan(y[:, 0]).all() and np.isnan(y[:, 2]).all()  # the poisoned channels
    assert np.isfinite(y[:, 1]).all()  # the clean one is untouched
    assert np.isnan(rm[0]) and np.isfinite(rm[1])
    assert np.isnan(dx[:, 0]).all() and np.isfinite(dx[:, 1]).all()
    ye = bnp.batch_norm(x, np.zeros(3), np.ones(3), training=False)  # eval: only the bad elements
    assert np.isnan(ye[1, 0, 2]) and np.isinf(ye[2, 2, 1]) and np.isfinite(ye[0]).all()
