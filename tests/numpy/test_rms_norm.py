"""bnlib.numpy RMS norm: forward/backward against torch (float64), finite differences, properties, module,
bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import bnlib.numpy as bnp
from tests._numerics import assert_error_within
from tests.numpy._testutils import FAST, close, nc_shapes, numeric_grad, rand, t


@FAST
@given(shape=nc_shapes(min_n=1), k=st.integers(1, 3), seed=st.integers(0, 2**32 - 1), affine=st.booleans(),
       eps=st.sampled_from([None, 1e-5, 0.5]))
@example(shape=(2, 1), k=1, seed=0, affine=True, eps=None)
@example(shape=(2, 1, 3, 5), k=3, seed=1, affine=False, eps=1e-5)
def test_rms_norm_matches_torch(shape, k, seed, affine, eps):
    rng = np.random.default_rng(seed)
    ns = shape[-min(k, len(shape)):]
    x, dy = rand(rng, shape, 2.0, 1.0), rand(rng, shape)
    w = rand(rng, ns) if affine else None
    y = bnp.rms_norm(x, ns, w, eps)
    dx, dw = bnp.rms_norm_backward(dy, x, ns, w, eps)
    xt, wt = t(x, True), t(w if affine else np.ones(ns), True)
    yt = F.rms_norm(xt, ns, wt, eps)
    yt.backward(t(dy))
    assert y.shape == x.shape and dx.shape == x.shape and dw.shape == ns
    close(y, yt)
    close(dx, xt.grad)
    close(dw, wt.grad)


def test_finite_differences():
    rng = np.random.default_rng(0)
    x = rand(rng, (2, 4, 3), 1.5, 0.5)
    R = rand(rng, x.shape)
    for ns, eps in (((3,), None), ((4, 3), 1e-3), ((3,), 0.7)):
        w = rand(rng, ns)

        def loss():
            return float(np.sum(bnp.rms_norm(x, ns, w, eps) * R))
        dx, dw = bnp.rms_norm_backward(R, x, ns, w, eps)
        np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-5, atol=1e-7)


def test_backward_without_weight_is_gradient_for_unit_weight():
    rng = np.random.default_rng(1)
    x, dy = rand(rng, (5, 6)), rand(rng, (5, 6))
    dx0, dw0 = bnp.rms_norm_backward(dy, x, 6)
    dx1, dw1 = bnp.rms_norm_backward(dy, x, 6, np.ones(6))
    close(dx0, dx1)
    close(dw0, dw1)
    close(bnp.rms_norm(x, 6), bnp.rms_norm(x, 6, np.ones(6)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eps_none_is_machine_epsilon_like_torch(dtype):
    """Rows so small that eps dominates mean(x^2): the output depends on the default eps, and matches torch's."""
    rng = np.random.default_rng(2)
    x = (rand(rng, (4, 8)) * np.sqrt(np.finfo(dtype).eps)).astype(dtype)
    eps = float(np.finfo(dtype).eps)
    y = bnp.rms_norm(x, 8)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, bnp.rms_norm(x, 8, eps=eps))
    assert np.abs(y - bnp.rms_norm(x, 8, eps=10 * eps)).max() > 0.1  # eps really matters here
    x64 = x.astype(np.float64)
    truth = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps)
    assert_error_within(y, F.rms_norm(torch.from_numpy(x), (8,)), truth, what="eps=None")
    dx, _ = bnp.rms_norm_backward(np.ones_like(x), x, 8)
    np.testing.assert_array_equal(dx, bnp.rms_norm_backward(np.ones_like(x), x, 8, eps=eps)[0])


def test_float32_within_torchs_own_error():
    rng = np.random.default_rng(3)
    x, dy, w = rand(rng, (16, 7, 33), 3.0, 2.0), rand(rng, (16, 7, 33)), rand(rng, (7, 33))
    x32, dy32, w32 = x.astype(np.float32), dy.astype(np.float32), w.astype(np.float32)
    ns = (7, 33)
    y = bnp.rms_norm(x32, ns, w32)
    dx, dw = bnp.rms_norm_backward(dy32, x32, ns, w32)
    assert y.dtype == dx.dtype == dw.dtype == np.float32
    xt, wt = torch.from_numpy(x32).requires_grad_(), torch.from_numpy(w32).requires_grad_()
    yt = F.rms_norm(xt, ns, wt)
    yt.backward(torch.from_numpy(dy32))
    x64, w64 = t(x32.astype(np.float64), True), t(w32.astype(np.float64), True)
    y64 = F.rms_norm(x64, ns, w64, float(np.finfo(np.float32).eps))  # the same eps as the float32 runs
    y64.backward(t(dy32.astype(np.float64)))
    assert_error_within(y, yt, y64, what="output")
    assert_error_within(dx, xt.grad, x64.grad, what="dx")
    assert_error_within(dw, wt.grad, w64.grad, what="dweight")


# --- properties -------------------------------------------------------------------------------------------
rows = st.tuples(st.integers(1, 6), st.integers(1, 9))


@FAST
@given(shape=rows, seed=st.integers(0, 2**32 - 1), log_a=st.floats(-3, 3), eps=st.sampled_from([1e-8, 1e-2, 1.0]))
def test_scale_invariance(shape, seed, log_a, eps):
    """y(a x) = y(x) for a > 0 up to the effect of eps: exactly (in real arithmetic) when eps scales with a^2,
    and within the relative change of mean(x^2) + eps, ~ eps / mean(x^2), with the fixed default eps."""
    rng = np.random.default_rng(seed)
    x, w, dy = rand(rng, shape), rand(rng, shape[-1]), rand(rng, shape)
    x /= np.sqrt(np.mean(x**2, axis=-1, keepdims=True))  # rows of rms 1: mean(x^2) = 1
    a = float(10.0**log_a)
    n = shape[-1]
    y = bnp.rms_norm(x, n, w, eps)
    close(bnp.rms_norm(a * x, n, w, eps * a * a), y, rtol=1e-12, atol=1e-12)
    # dy/dx scales as 1/a (rounding relative to g = dy * w: dx cancels to ~eps/(1 + eps) g for one value per row)
    dx, dw = bnp.rms_norm_backward(dy, a * x, n, w, eps * a * a)
    dx0, dw0 = bnp.rms_norm_backward(dy, x, n, w, eps)
    close(a * dx, dx0, rtol=1e-10, atol=1e-13 * float(np.abs(dy * w).max()))
    close(dw, dw0, rtol=1e-10, atol=1e-12)
    # default eps (2.2e-16 for float64): y(a x) - y(x) is the eps effect, |y| * eps * |1 - 1/a^2| / 2 at most
    e = float(np.finfo(np.float64).eps)
    y_default = bnp.rms_norm(x, n, w)
    bound = np.abs(y_default) * e * abs(1.0 - 1.0 / a**2) + 1e-14 * np.abs(y_default).max()
    assert np.all(np.abs(bnp.rms_norm(a * x, n, w) - y_default) <= bound)


@FAST
@given(shape=rows, seed=st.integers(0, 2**32 - 1), eps=st.sampled_from([1e-12, 1e-5, 0.1, 10.0]))
def test_unit_rms_and_gradient_orthogonal_to_x(shape, seed, eps):
    """Without weight each row has mean(y^2) = ms / (ms + eps) (1 as eps -> 0); the input gradient has no
    component along x itself but eps / (ms + eps) of it: x . dx = invrms * (g . x) * eps / (ms + eps)."""
    rng = np.random.default_rng(seed)
    x, dy, w = rand(rng, shape, 1.0, 0.5), rand(rng, shape), rand(rng, shape[-1])
    ms = np.mean(x**2, axis=-1)
    y = bnp.rms_norm(x, shape[-1], eps=eps)
    close(np.mean(y**2, axis=-1), ms / (ms + eps), rtol=1e-12, atol=1e-14)
    assert np.all(np.sign(y) == np.sign(x))
    dx, _ = bnp.rms_norm_backward(dy, x, shape[-1], w, eps)
    gx = np.sum(dy * w * x, axis=-1)
    expected = gx * eps / (ms + eps) / np.sqrt(ms + eps)
    # rounding: relative to the terms that cancel, invrms * sum |g x| (float64 eps = 2.2e-16)
    scale = np.sum(np.abs(dy * w * x), axis=-1) / np.sqrt(ms + eps)
    assert np.all(np.abs(np.sum(dx * x, axis=-1) - expected) <= 1e-13 * scale)


def test_nan_stays_in_its_row_and_empty_batch():
    x = np.ones((3, 4))
    x[1, 2] = np.nan
    y = bnp.rms_norm(x, 4)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
    assert bnp.rms_norm(np.zeros((0, 4)), 4).shape == (0, 4)
    dx, dw = bnp.rms_norm_backward(np.zeros((0, 4)), np.zeros((0, 4)), 4, np.ones(4))
    assert dx.shape == (0, 4) and np.array_equal(dw, np.zeros(4))
    close(bnp.rms_norm(np.zeros((2, 3)), 3), np.zeros((2, 3)))  # x = 0: y = 0, no division by zero


# --- module -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ns,eps", [((4, 5), None), (5, 1e-6)])
def test_module_matches_torch(ns, eps):
    rng = np.random.default_rng(0)
    m = bnp.RMSNorm(ns, eps=eps, dtype=np.float64)
    tm = torch.nn.RMSNorm(ns, eps=eps, dtype=torch.float64)
    assert list(m.state_dict()) == list(tm.state_dict()) == ["weight"]
    assert repr(m) == repr(tm)
    m.weight[...] = rand(rng, m.weight.shape)
    tm.load_state_dict({k: torch.tensor(v) for k, v in m.state_dict().items()})
    x, dy = rand(rng, (3, 4, 5)), rand(rng, (3, 4, 5))
    xt = t(x, True)
    yt = tm(xt)
    yt.backward(t(dy))
    close(m(x), yt)
    close(m.backward(dy), xt.grad)
    close(m.dweight, tm.weight.grad)
    assert m.dbias is None and m.grads().keys() == {"weight"}
    m.reset_parameters()
    assert np.array_equal(m.weight, np.ones(m.weight.shape))


def test_module_without_affine():
    m = bnp.RMSNorm((2, 3), elementwise_affine=False)
    assert m.parameters() == [] and m.weight is None and list(m.state_dict()) == []
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    y = m(x)
    assert y.dtype == np.float32
    m.backward(np.ones_like(x))
    assert m.dweight is None and m.dbias is None
    assert repr(m) == repr(torch.nn.RMSNorm((2, 3), elementwise_affine=False))


# --- bad input --------------------------------------------------------------------------------------------
X = np.ones((3, 5))

BAD = [
    (lambda: bnp.rms_norm(X, (4,)), ValueError, r"normalized_shape: expected \[4\] to match the trailing dimensions"),
    (lambda: bnp.rms_norm(X, ()), ValueError, r"normalized_shape: expected a non-empty"),
    (lambda: bnp.rms_norm(X, 2.5), TypeError, r"normalized_shape: expected an int or a sequence"),
    (lambda: bnp.rms_norm(X, 5, np.ones(4)), ValueError, r"weight: expected shape \(5,\), got shape \(4,\)"),
    (lambda: bnp.rms_norm(X, 5, np.ones(5, dtype=int)), TypeError, r"weight: expected a floating-point dtype"),
    (lambda: bnp.rms_norm(X.astype(np.complex64), 5), TypeError, r"input: expected .*complex64"),
    (lambda: bnp.rms_norm(X.astype(int), 5), TypeError, r"input: expected a floating-point dtype"),
    (lambda: bnp.rms_norm(np.float64(1.0), 1), ValueError, r"at least 1 dimension"),
    (lambda: bnp.rms_norm(X, 5, eps=-1.0), ValueError, r"eps: expected a positive finite number"),
    (lambda: bnp.rms_norm(X, 5, eps=float("inf")), ValueError, r"eps: expected a positive finite number or 0"),
    (lambda: bnp.rms_norm(X, 5, eps=float("nan")), ValueError, r"eps: expected"),
    (lambda: bnp.rms_norm(X, 5, eps=True), TypeError, r"eps: expected a positive real number"),
    (lambda: bnp.rms_norm(X, 5, eps="1e-5"), TypeError, r"eps: expected a positive real number"),
    (lambda: bnp.rms_norm_backward(np.ones((3, 4)), X, 5), ValueError, r"dy: expected shape \(3, 5\)"),
    (lambda: bnp.rms_norm_backward(X.astype(int), X, 5), TypeError, r"dy: expected a floating-point dtype"),
    (lambda: bnp.RMSNorm(0), ValueError, r"normalized_shape: expected a non-empty sequence of positive ints"),
    (lambda: bnp.RMSNorm("abc"), ValueError, r"normalized_shape"),
    (lambda: bnp.RMSNorm(None), TypeError, r"normalized_shape: expected an int or a sequence"),
    (lambda: bnp.RMSNorm(5, eps=-1e-5), ValueError, r"eps: expected"),
    (lambda: bnp.RMSNorm(5, dtype=np.int32), TypeError, r"dtype: expected a floating-point dtype"),
    (lambda: bnp.RMSNorm(5)(np.ones((3, 4), np.float32)), ValueError, r"normalized_shape: expected \[5\] to match"),
]


@pytest.mark.parametrize("fn,exc,pattern", BAD, ids=[f"case{i}" for i in range(len(BAD))])
def test_bad_input_raises_naming_the_argument(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_module_error_leaves_state_untouched():
    m = bnp.RMSNorm(5)
    m.weight[...] = np.arange(5)
    x = np.ones((2, 5), np.float32)
    m(x)
    m.backward(np.ones_like(x))
    before = (m.weight.copy(), m.dweight.copy())
    with pytest.raises(ValueError, match="normalized_shape"):
        m(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="dy: expected shape"):
        m.backward(np.ones((2, 4), np.float32))
    assert np.array_equal(m.weight, before[0]) and np.array_equal(m.dweight, before[1])
