"""Batch renormalization and batch layer normalization against direct torch transcriptions (autograd)."""
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import bnlib.numpy as bnp
from tests.numpy._testutils import FAST, bn_axes, close, nc_shapes, numeric_grad, rand, t


def torch_renorm(x, rm, rv, w, b, eps, r_max, d_max):
    """Ioffe 2017 as stated in bnlib.numpy.batch_renorm, with r and d detached."""
    ax = list(bn_axes(x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(ax, keepdim=True)
    var = x.var(ax, unbiased=False, keepdim=True)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(rv.view(view) + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm.view(view)) / sigma).clamp(-d_max, d_max).detach()
    y = w.view(view) * ((x - mu) / sigma_b * r + d) + b.view(view)
    return y, mu.flatten().detach(), x.var(ax, unbiased=True).detach()


def torch_bln(x, rm, rv, w, b, training, eps, m):
    """Batch layer norm as stated in bnlib.numpy.batch_layer_norm."""
    ax_b = list(bn_axes(x.dim()))
    ax_l = list(range(1, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    if training:
        mu_b, var_b = x.mean(ax_b, keepdim=True), x.var(ax_b, unbiased=False, keepdim=True)
    else:
        mu_b, var_b = rm.view(view), rv.view(view)
    x_b = (x - mu_b) / torch.sqrt(var_b + eps)
    x_l = (x - x.mean(ax_l, keepdim=True)) / torch.sqrt(x.var(ax_l, unbiased=False, keepdim=True) + eps)
    xhat = ((1 / m - 1e-4) * x_l + (1 - 1 / m - 1e-4) * x_b) / np.sqrt(x.shape[1])
    return w.view(view) * xhat + b.view(view)


@FAST
@given(shape=nc_shapes(), seed=st.integers(0, 2**32 - 1), r_max=st.sampled_from([1.0, 1.5, 3.0]),
       d_max=st.sampled_from([0.0, 0.5, 5.0]), momentum=st.sampled_from([0.1, 0.5]))
@example(shape=(2, 1), seed=0, r_max=1.5, d_max=0.5, momentum=0.1)
@example(shape=(2, 1, 3, 1, 2), seed=1, r_max=3.0, d_max=5.0, momentum=0.5)
def test_batch_renorm_matches_transcription(shape, seed, r_max, d_max, momentum):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x, dy, w, b = rand(rng, shape, 2.0, 1.0), rand(rng, shape), rand(rng, C), rand(rng, C)
    rm, rv = rand(rng, C), rng.random(C) * 3 + 0.1
    rm0, rv0 = rm.copy(), rv.copy()
    y = bnp.batch_renorm(x, rm, rv, w, b, training=True, momentum=momentum, r_max=r_max, d_max=d_max)
    dx, dw, db = bnp.batch_renorm_backward(dy, x, rm0, rv0, w, r_max=r_max, d_max=d_max)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt, mu, var_unb = torch_renorm(xt, t(rm0), t(rv0), wt, bt, 1e-5, r_max, d_max)
    yt.backward(t(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(dw, wt.grad)
    close(db, bt.grad)
    close(rm, (1 - momentum) * rm0 + momentum * mu.numpy())
    close(rv, (1 - momentum) * rv0 + momentum * var_unb.numpy())
    # evaluation: plain batch norm with the running statistics
    close(bnp.batch_renorm(x, rm, rv, w, b, training=False), bnp.batch_norm(x, rm, rv, w, b, training=False))


def test_batch_renorm_with_rmax_1_dmax_0_is_batch_norm_exactly():
    rng = np.random.default_rng(0)
    for shape, dtype in [((8, 3), np.float64), ((4, 5, 6, 7), np.float32), ((3, 2, 5), np.float64)]:
        C = shape[1]
        x = rand(rng, shape, 3.0, 2.0).astype(dtype)
        w, b = rand(rng, C).astype(dtype), rand(rng, C).astype(dtype)
        rm1, rv1 = rand(rng, C).astype(dtype), (rng.random(C) + 0.5).astype(dtype)
        rm2, rv2 = rm1.copy(), rv1.copy()
        y1 = bnp.batch_renorm(x, rm1, rv1, w, b, training=True, r_max=1.0, d_max=0.0)
        y2 = bnp.batch_norm(x, rm2, rv2, w, b, training=True)
        assert np.array_equal(y1, y2)
        assert np.array_equal(rm1, rm2) and np.array_equal(rv1, rv2)
        dy = rand(rng, shape).astype(dtype)
        g1 = bnp.batch_renorm_backward(dy, x, rm2, rv2, w, r_max=1.0, d_max=0.0)
        g2 = bnp.batch_norm_backward(dy, x, w)
        for a, c in zip(g1, g2):
            np.testing.assert_allclose(a, c, rtol=1e-12 if dtype == np.float64 else 1e-5, atol=0)


def test_batch_renorm_factors_are_clipped():
    rng = np.random.default_rng(0)
    x = rand(rng, (64, 3), 10.0, 50.0)  # far from running stats (0, 1)
    r, d = bnp.renorm_factors(x, np.zeros(3), np.ones(3), r_max=2.0, d_max=1.0)
    np.testing.assert_array_equal(r, 2.0)
    np.testing.assert_array_equal(d, 1.0)


def test_batch_renorm_finite_differences_treat_r_and_d_as_constants():
    rng = np.random.default_rng(3)
    x, w, b = rand(rng, (5, 3, 2), 2.0), rand(rng, 3), rand(rng, 3)
    rm, rv = rand(rng, 3), rng.random(3) + 0.2
    R = rand(rng, x.shape)
    r, d = bnp.renorm_factors(x, rm, rv, r_max=1.5, d_max=0.3)

    def loss():  # r, d frozen at their values for x, as stop_gradient does
        mu, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
        xhat = (x - mu[:, None]) / np.sqrt(var[:, None] + 1e-5)
        return float(np.sum((w[:, None] * (xhat * r[:, None] + d[:, None]) + b[:, None]) * R))

    dx, dw, db = bnp.batch_renorm_backward(R, x, rm, rv, w, r_max=1.5, d_max=0.3)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-5, atol=1e-7)


def test_batch_renorm_module():
    rng = np.random.default_rng(4)
    m = bnp.BatchRenorm2d(3, r_max=1.5, d_max=0.5, dtype=np.float64)
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for _ in range(3):
        x = rand(rng, (4, 3, 3, 3), 2.0, 1.0)
        rm0, rv0 = m.running_mean.copy(), m.running_var.copy()
        y = m(x)
        close(y, bnp.batch_renorm(x, rm0.copy(), rv0.copy(), m.weight, m.bias, True, r_max=1.5, d_max=0.5))
        dy = rand(rng, x.shape)
        dx = m.backward(dy)
        ref = bnp.batch_renorm_backward(dy, x, rm0, rv0, m.weight, r_max=1.5, d_max=0.5)
        close(dx, ref[0])
        close(m.dweight, ref[1])
        close(m.dbias, ref[2])
    assert int(m.num_batches_tracked) == 3
    m.eval()
    x = rand(rng, (2, 3, 3, 3))
    close(m(x), bnp.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias))
    assert "r_max=1.5" in repr(m)


@FAST
@given(shape=nc_shapes(), seed=st.integers(0, 2**32 - 1), training=st.booleans(),
       batch_size=st.sampled_from([None, 1, 25]))
@example(shape=(2, 1), seed=0, training=True, batch_size=None)
@example(shape=(2, 1, 2, 3, 1), seed=1, training=False, batch_size=1)
def test_batch_layer_norm_matches_transcription(shape, seed, training, batch_size):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x, dy, w, b = rand(rng, shape, 2.0, 1.0), rand(rng, shape), rand(rng, C), rand(rng, C)
    rm, rv = rand(rng, C), rng.random(C) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    m = shape[0] if batch_size is None else batch_size
    y = bnp.batch_layer_norm(x, rm, rv, w, b, training=training, batch_size=batch_size)
    dx, dw, db = bnp.batch_layer_norm_backward(dy, x, w, batch_size=batch_size, training=training,
                                               running_mean=rm0, running_var=rv0)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = torch_bln(xt, t(rm0), t(rv0), wt, bt, training, 1e-3, m)
    yt.backward(t(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(dw, wt.grad)
    close(db, bt.grad)
    if training:  # running statistics of the batch part, torch's convention
        ax = bn_axes(len(shape))
        close(rm, 0.9 * rm0 + 0.1 * x.mean(axis=ax))
        close(rv, 0.9 * rv0 + 0.1 * x.var(axis=ax, ddof=1))
    else:
        assert np.array_equal(rm, rm0)


def test_batch_layer_norm_finite_differences():
    rng = np.random.default_rng(5)
    x, w, b = rand(rng, (3, 4, 2), 1.5), rand(rng, 4), rand(rng, 4)
    R = rand(rng, x.shape)

    def loss():
        return float(np.sum(bnp.batch_layer_norm(x, None, None, w, b, training=True) * R))

    dx, dw, db = bnp.batch_layer_norm_backward(R, x, w)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-5, atol=1e-7)


def test_batch_layer_norm_at_batch_size_one():
    rng = np.random.default_rng(6)
    assert bnp.bln_weights(1) == pytest.approx((1 - 1e-4, -1e-4))
    # dense input, training: one value per channel -> torch's error, running stats untouched
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bnp.batch_layer_norm(rand(rng, (1, 4)), rm, rv, training=True)
    assert np.array_equal(rm, np.zeros(4)) and np.array_equal(rv, np.ones(4))
    # with spatial positions it works, and is close to layer norm / sqrt(C)
    x = rand(rng, (1, 4, 6), 2.0, 1.0)
    y = bnp.batch_layer_norm(x, rm, rv, training=True)
    ln = bnp.layer_norm(x, (4, 6), eps=1e-3) / 2.0
    assert np.max(np.abs(y - ln)) < 1e-3
    assert np.isfinite(rv).all()
    # evaluation of a single sample with population statistics: finite
    m = bnp.BatchLayerNorm(4, batch_size=25)
    m(rand(rng, (25, 4)).astype(np.float32))
    m.eval()
    y = m(rand(rng, (1, 4)).astype(np.float32))
    assert np.isfinite(y).all() and y.dtype == np.float32


def test_batch_layer_norm_module():
    rng = np.random.default_rng(7)
    m = bnp.BatchLayerNorm(3, dtype=np.float64)
    assert m.eps == 1e-3
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    x, dy = rand(rng, (5, 3, 4), 2.0, 1.0), rand(rng, (5, 3, 4))
    rm0, rv0 = m.running_mean.copy(), m.running_var.copy()
    y = m(x)
    close(y, bnp.batch_layer_norm(x, rm0, rv0, m.weight, m.bias, training=True))
    close(m.running_mean, rm0)
    dx = m.backward(dy)
    ref = bnp.batch_layer_norm_backward(dy, x, m.weight)
    for a, c in zip((dx, m.dweight, m.dbias), ref):
        close(a, c)
    m.eval()
    y = m(x)
    close(y, bnp.batch_layer_norm(x, m.running_mean, m.running_var, m.weight, m.bias, training=False))
    dx = m.backward(dy)
    close(dx, bnp.batch_layer_norm_backward(dy, x, m.weight, training=False, running_mean=m.running_mean,
                                            running_var=m.running_var)[0])
