"""bnlib.torch agrees with the NumPy reference (bnlib.numpy) in float64: outputs, gradients, running stats."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bnlib.numpy as bnp
from bnlib.torch import functional as BF

D64 = torch.float64


def _setup(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=D64) * 1.5 + 0.7
    w = torch.rand(C, generator=g, dtype=D64) + 0.5
    b = torch.randn(C, generator=g, dtype=D64)
    rm = torch.randn(C, generator=g, dtype=D64)
    rv = torch.rand(C, generator=g, dtype=D64) + 0.5
    dy = torch.randn(shape, generator=g, dtype=D64)
    return x, w, b, rm, rv, dy


def _torch_grads(fn, x, w, b, dy):
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = fn(xr, wr, br)
    y.backward(dy)
    return y.detach().numpy(), xr.grad.numpy(), wr.grad.numpy(), br.grad.numpy()


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 2)])
def test_batch_norm_family(training, shape):
    x, w, b, rm, rv, dy = _setup(shape)
    cases = [
        ("batch_norm", BF.batch_norm, bnp.batch_norm, {},
         lambda: bnp.batch_norm_backward(dy.numpy(), x.numpy(), w.numpy(), 1e-5, training=training,
                                         running_mean=rm.numpy(), running_var=rv.numpy())),
        ("batch_layer_norm", BF.batch_layer_norm, bnp.batch_layer_norm, {"eps": 1e-3},
         lambda: bnp.batch_layer_norm_backward(dy.numpy(), x.numpy(), w.numpy(), 1e-3, training=training,
                                               running_mean=rm.numpy(), running_var=rv.numpy())),
    ]
    if training:
        cases.append(("batch_renorm", BF.batch_renorm, bnp.batch_renorm, {"r_max": 1.1, "d_max": 0.2},
                      lambda: bnp.batch_renorm_backward(dy.numpy(), x.numpy(), rm.numpy(), rv.numpy(), w.numpy(),
                                                        1e-5, 1.1, 0.2)))
    for _name, tfn, nfn, kw, nback in cases:
        rm_t, rv_t = rm.clone(), rv.clone()
        rm_n, rv_n = rm.numpy().copy(), rv.numpy().copy()
        y_t, dx_t, dw_t, db_t = _torch_grads(lambda xx, ww, bb: tfn(xx, rm_t, rv_t, ww, bb, training, 0.2, **kw),
                                             x, w, b, dy)
        y_n = nfn(x.numpy(), rm_n, rv_n, w.numpy(), b.numpy(), training, 0.2, **kw)
        _close(y_t, y_n)
        _close(rm_t.numpy(), rm_n)
        _close(rv_t.numpy(), rv_n)
        dx_n, dw_n, db_n = nback()
        _close(dx_t, dx_n), _close(dw_t, dw_n), _close(db_t, db_n)


def test_layer_group_instance_norm():
    x, w, b, rm, rv, dy = _setup((4, 6, 5))
    y, dx, dw, db = _torch_grads(lambda xx, ww, bb: BF.group_norm(xx, 3, ww, bb), x, w, b, dy)
    _close(y, bnp.group_norm(x.numpy(), 3, w.numpy(), b.numpy()))
    for a, c in zip((dx, dw, db), bnp.group_norm_backward(dy.numpy(), x.numpy(), 3, w.numpy())):
        _close(a, c)
    y, dx, dw, db = _torch_grads(lambda xx, ww, bb: BF.instance_norm(xx, None, None, ww, bb), x, w, b, dy)
    _close(y, bnp.instance_norm(x.numpy(), None, None, w.numpy(), b.numpy()))
    for a, c in zip((dx, dw, db), bnp.instance_norm_backward(dy.numpy(), x.numpy(), w.numpy())):
        _close(a, c)
    w5, b5 = torch.rand(5, dtype=D64) + 0.5, torch.randn(5, dtype=D64)
    y, dx, dw, db = _torch_grads(lambda xx, ww, bb: BF.layer_norm(xx, (5,), ww, bb), x, w5, b5, dy)
    _close(y, bnp.layer_norm(x.numpy(), (5,), w5.numpy(), b5.numpy()))
    for a, c in zip((dx, dw, db), bnp.layer_norm_backward(dy.numpy(), x.numpy(), (5,), w5.numpy())):
        _close(a, c)


@given(N=st.integers(2, 6), C=st.integers(1, 4), S=st.lists(st.integers(1, 4), max_size=2),
       offset=st.floats(-50, 50), scale=st.floats(0.01, 100), seed=st.integers(0, 2**16))
def test_batch_norm_property_vs_torch(N, C, S, offset, scale, seed):
    """Any (N, C, *S) float64 input: bnlib.torch batch norm = torch.nn.functional.batch_norm."""
    g = torch.Generator().manual_seed(seed)
    shape = (N, C, *S)
    x = torch.randn(shape, generator=g, dtype=D64) * scale + offset
    dy = torch.randn(shape, generator=g, dtype=D64)
    out = []
    for fn in (BF.batch_norm, torch.nn.functional.batch_norm):
        xr = x.clone().requires_grad_(True)
        rm, rv = torch.zeros(C, dtype=D64), torch.ones(C, dtype=D64)
        y = fn(xr, rm, rv, None, None, True, 0.1, 1e-5)
        y.backward(dy)
        out.append((y.detach(), xr.grad, rm, rv))
    for a, c in zip(*out):
        torch.testing.assert_close(a, c, rtol=1e-7, atol=1e-9 * max(1.0, abs(offset) + scale))
