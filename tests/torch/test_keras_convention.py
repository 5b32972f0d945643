"""convention='keras': one implementation of Keras' running statistics, checked against the formula and the
NumPy twin (bnlib.numpy, convention='keras')."""
import numpy as np
import pytest
import torch

import bnlib.numpy as bnp
import bnlib.torch as bt


def _batches(k=5, n=8, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(k)]


@pytest.mark.parametrize("momentum", [0.99, 0.9, 0.5])
def test_module_follows_keras_update(momentum):
    layer = bt.BatchNorm1d(3, momentum=momentum, eps=1e-3, convention="keras").double()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for x in _batches():
        y = layer(x)
        rm = momentum * rm + (1 - momentum) * x.mean(0)
        rv = momentum * rv + (1 - momentum) * x.var(0, unbiased=False)  # biased, as Keras stores it
        ref = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3)  # normalization unchanged
        torch.testing.assert_close(y, ref)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert "convention='keras'" in repr(layer)


def test_module_matches_the_numpy_twin_and_the_functional_form():
    xs = _batches(k=3, c=4)
    ours = bt.BatchNorm1d(4, momentum=0.9, eps=1e-3, convention="keras").double()
    twin = bnp.BatchNorm1d(4, momentum=0.9, eps=1e-3, convention="keras", dtype=np.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for x in xs:
        y = ours(x)
        np.testing.assert_allclose(y.detach().numpy(), twin(x.numpy()), rtol=1e-12, atol=1e-12)
        bt.functional.batch_norm(x, rm, rv, training=True, momentum=0.9, eps=1e-3, convention="keras")
    np.testing.assert_allclose(ours.running_var.numpy(), twin.running_var, rtol=1e-12)
    torch.testing.assert_close(rm, ours.running_mean)
    torch.testing.assert_close(rv, ours.running_var)


def test_keras_backward_is_batch_norms():
    x = _batches(k=1, c=4)[0].requires_grad_(True)
    gy = torch.randn_like(x)
    keras = bt.BatchNorm1d(4, momentum=0.99, eps=1e-3, convention="keras").double()
    plain = bt.BatchNorm1d(4, momentum=0.01, eps=1e-3).double()
    (g1,) = torch.autograd.grad(keras(x), x, gy)
    (g2,) = torch.autograd.grad(plain(x), x, gy)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(keras.running_mean, plain.running_mean)  # Keras 0.99 is PyTorch's 0.01


def test_bad_convention_arguments_leave_state_untouched():
    with pytest.raises(ValueError, match="convention: expected 'torch' or 'keras'"):
        bt.BatchNorm1d(3, convention="tf")
    with pytest.raises(ValueError, match="momentum: expected a real number"):
        bt.BatchNorm1d(3, momentum=None, convention="keras")
    with pytest.raises(TypeError, match="convention"):  # the variants keep PyTorch's convention only
        bt.BatchRenorm1d(3, convention="keras")
    layer = bt.BatchNorm1d(3, momentum=0.99, convention="keras")
    layer.momentum = None
    with pytest.raises(ValueError, match="momentum"):
        layer(torch.randn(4, 3))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(3))
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="convention"):
        bt.functional.batch_norm(torch.randn(4, 3), rm, rv, training=True, convention="caffe")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
