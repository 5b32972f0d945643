"""bnlib.numpy layer, group and instance norm: forward/backward against torch, finite differences, modules."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import bnlib.numpy as bnp
from tests.numpy._testutils import FAST, close, nc_shapes, numeric_grad, rand, t


@FAST
@given(shape=nc_shapes(), k=st.integers(1, 3), seed=st.integers(0, 2**32 - 1), affine=st.booleans())
@example(shape=(2, 1), k=1, seed=0, affine=True)
@example(shape=(2, 1, 3, 5), k=3, seed=1, affine=False)
def test_layer_norm_matches_torch(shape, k, seed, affine):
    rng = np.random.default_rng(seed)
    ns = shape[-min(k, len(shape)):]
    x, dy = rand(rng, shape, 2.0, 3.0), rand(rng, shape)
    w = rand(rng, ns) if affine else None
    b = rand(rng, ns) if affine else None
    y = bnp.layer_norm(x, ns, w, b)
    dx, dw, db = bnp.layer_norm_backward(dy, x, ns, w)
    xt, wt, bt = t(x, True), t(w if affine else np.ones(ns), True), t(b if affine else np.zeros(ns), True)
    yt = F.layer_norm(xt, ns, wt, bt)
    yt.backward(t(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(dw, wt.grad)
    close(db, bt.grad)


@FAST
@given(shape=nc_shapes(max_c=6), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_group_norm_matches_torch(shape, seed, data):
    rng = np.random.default_rng(seed)
    C = shape[1]
    G = data.draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    x, dy, w, b = rand(rng, shape, 2.0, -1.0), rand(rng, shape), rand(rng, C), rand(rng, C)
    y = bnp.group_norm(x, G, w, b)
    dx, dw, db = bnp.group_norm_backward(dy, x, G, w)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = F.group_norm(xt, G, wt, bt)
    yt.backward(t(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(dw, wt.grad)
    close(db, bt.grad)


@pytest.mark.parametrize("shape,G", [((2, 1), 1), ((2, 1, 3), 1), ((2, 6, 1, 1, 1), 3), ((3, 6, 5, 3), 6)])
def test_group_norm_edge_shapes_match_torch(shape, G):
    rng = np.random.default_rng(G)
    C = shape[1]
    x, dy, w, b = rand(rng, shape, 2.0, -1.0), rand(rng, shape), rand(rng, C), rand(rng, C)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = F.group_norm(xt, G, wt, bt)
    yt.backward(t(dy))
    close(bnp.group_norm(x, G, w, b), yt)
    for ours, theirs in zip(bnp.group_norm_backward(dy, x, G, w), (xt.grad, wt.grad, bt.grad)):
        close(ours, theirs)


@FAST
@given(shape=nc_shapes(min_spatial=1).filter(lambda s: np.prod(s[2:]) > 1), seed=st.integers(0, 2**32 - 1),
       use_input_stats=st.booleans(), momentum=st.sampled_from([0.1, 0.5]))
@example(shape=(2, 1, 3), seed=0, use_input_stats=True, momentum=0.1)
@example(shape=(2, 1, 1, 1, 2), seed=1, use_input_stats=False, momentum=0.5)
def test_instance_norm_matches_torch(shape, seed, use_input_stats, momentum):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x, dy, w, b = rand(rng, shape, 2.0, 1.0), rand(rng, shape), rand(rng, C), rand(rng, C)
    rm, rv = rand(rng, C), rng.random(C) + 0.5
    trm, trv = t(rm), t(rv)
    rm_before, rv_before = rm.copy(), rv.copy()
    y = bnp.instance_norm(x, rm, rv, w, b, use_input_stats, momentum)
    dx, dw, db = bnp.instance_norm_backward(dy, x, w, use_input_stats=use_input_stats, running_mean=rm_before,
                                            running_var=rv_before)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = F.instance_norm(xt, trm, trv, wt, bt, use_input_stats, momentum)
    yt.backward(t(dy))
    close(y, yt)
    close(rm, trm)
    close(rv, trv)
    close(dx, xt.grad)
    close(dw, wt.grad)
    close(db, bt.grad)


def test_finite_differences_layer_group_instance():
    rng = np.random.default_rng(0)
    x = rand(rng, (2, 4, 3), 1.5, 0.5)
    R = rand(rng, x.shape)
    w4, b4 = rand(rng, 4), rand(rng, 4)
    w3, b3 = rand(rng, 3), rand(rng, 3)
    cases = [
        (lambda: bnp.layer_norm(x, (3,), w3, b3), lambda: bnp.layer_norm_backward(R, x, (3,), w3), w3, b3),
        (lambda: bnp.group_norm(x, 2, w4, b4), lambda: bnp.group_norm_backward(R, x, 2, w4), w4, b4),
        (lambda: bnp.instance_norm(x, None, None, w4, b4), lambda: bnp.instance_norm_backward(R, x, w4), w4, b4),
    ]
    for fwd, bwd, w, b in cases:
        def loss():
            return float(np.sum(fwd() * R))
        dx, dw, db = bwd()
        np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-5, atol=1e-7)


def test_layer_norm_rows_have_zero_mean_unit_variance_with_offset_in_float32():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 300)) + 1e4).astype(np.float32)
    y = bnp.layer_norm(x, 300)
    ref = bnp.layer_norm(x.astype(np.float64), 300)
    assert y.dtype == np.float32 and np.max(np.abs(y - ref)) < 1e-3
    y = bnp.group_norm(x.reshape(8, 6, 50), 3)
    ref = bnp.group_norm(x.reshape(8, 6, 50).astype(np.float64), 3)
    assert y.dtype == np.float32 and np.max(np.abs(y - ref)) < 1e-3


def test_layer_norm_module_matches_torch():
    rng = np.random.default_rng(0)
    m = bnp.LayerNorm((4, 5), dtype=np.float64)
    tm = torch.nn.LayerNorm((4, 5), dtype=torch.float64)
    m.weight[...] = rand(rng, (4, 5))
    m.bias[...] = rand(rng, (4, 5))
    tm.load_state_dict({k: torch.tensor(v) for k, v in m.state_dict().items()})
    x, dy = rand(rng, (3, 4, 5)), rand(rng, (3, 4, 5))
    xt = t(x, True)
    yt = tm(xt)
    yt.backward(t(dy))
    close(m(x), yt)
    close(m.backward(dy), xt.grad)
    close(m.dweight, tm.weight.grad)
    close(m.dbias, tm.bias.grad)
    assert list(m.state_dict()) == ["weight", "bias"]
    assert bnp.LayerNorm(5, elementwise_affine=False).parameters() == []
    assert bnp.LayerNorm(5, bias=False).bias is None


def test_group_norm_module_matches_torch():
    rng = np.random.default_rng(1)
    m = bnp.GroupNorm(2, 6, dtype=np.float64)
    tm = torch.nn.GroupNorm(2, 6, dtype=torch.float64)
    x, dy = rand(rng, (3, 6, 4, 2)), rand(rng, (3, 6, 4, 2))
    xt = t(x, True)
    yt = tm(xt)
    yt.backward(t(dy))
    close(m(x), yt)
    close(m.backward(dy), xt.grad)
    close(m.dweight, tm.weight.grad)
    assert list(m.state_dict()) == list(tm.state_dict())


@pytest.mark.parametrize("affine,track", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("cls,shape", [("InstanceNorm1d", (3, 4, 5)), ("InstanceNorm1d", (4, 5)),
                                       ("InstanceNorm2d", (2, 4, 3, 3)), ("InstanceNorm3d", (2, 4, 2, 3, 2))])
def test_instance_norm_modules_match_torch(cls, shape, affine, track):
    rng = np.random.default_rng(2)
    m = getattr(bnp, cls)(4, affine=affine, track_running_stats=track, dtype=np.float64)
    tm = getattr(torch.nn, cls)(4, affine=affine, track_running_stats=track, dtype=torch.float64)
    assert list(m.state_dict()) == list(tm.state_dict())
    for _ in range(5):
        x = rand(rng, shape, 2.0, 1.0)
        close(m(x), tm(t(x)))
    if track:
        close(m.running_mean, tm.running_mean)
        close(m.running_var, tm.running_var)
    m.eval()
    tm.eval()
    x, dy = rand(rng, shape), rand(rng, shape)
    xt = t(x, True)
    yt = tm(xt)
    yt.backward(t(dy))
    close(m(x), yt)
    close(m.backward(dy), xt.grad)
    if affine:
        close(m.dweight, tm.weight.grad)
        close(m.dbias, tm.bias.grad)
    else:
        assert m.dweight is None and m.dbias is None
