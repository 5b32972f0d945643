"""The NumPy MLP (bnlib.numpy.mlp): hand-written backprop against finite differences and torch, and learning."""
import numpy as np
import pytest
import torch
from torch import nn

from bnlib.lab.train import train as fit
from bnlib.numpy.mlp import MLP, softmax_cross_entropy

CONFIGS = [
    (bn, pos, act)
    for bn, pos in ((False, "before"), (True, "before"), (True, "after"))
    for act in ("sigmoid", "tanh", "relu")
]
_TORCH_ACTS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "identity": nn.Identity}


def torch_twin(model: MLP) -> nn.Sequential:
    """A plain torch.nn network with the layout of bnlib.lab.models.mlp, loaded with the NumPy model's weights."""
    dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    layers = [nn.Flatten()]
    for fan_in, fan_out in zip(model.sizes[:-2], model.sizes[1:-1]):
        layers.append(nn.Linear(fan_in, fan_out, bias=model.bias))
        block = [_TORCH_ACTS[model.activation]()]
        if model.batch_norm:
            block.insert(0, nn.BatchNorm1d(fan_out, eps=model.eps, momentum=model.momentum))
            if model.bn_position == "after":
                block.reverse()
        layers += block
    layers.append(nn.Linear(model.sizes[-2], model.sizes[-1]))
    net = nn.Sequential(*layers).to(dtype)
    net.load_state_dict(model.to_torch_state_dict(), strict=True)
    return net


def torch_grads(net: nn.Sequential, model: MLP) -> dict:
    """The torch gradients renamed to the NumPy model's parameter names."""
    named = dict(net.named_parameters())
    return {name: named[key].grad.numpy() for name, key in model.torch_names().items() if name in model.params}


def batch(n=16, d=12, classes=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


@pytest.mark.parametrize("bn,pos,act", CONFIGS)
def test_gradients_match_finite_differences(bn, pos, act):
    x, y = batch()
    model = MLP((12, 7, 6, 5), activation=act, batch_norm=bn, bn_position=pos, dtype=np.float64, seed=2)
    _, grads = model.loss_and_grads(x, y)
    rng = np.random.default_rng(0)
    h = 1e-6
    for name, p in model.params.items():
        for flat in rng.choice(p.size, size=min(p.size, 6), replace=False):
            i = np.unravel_index(flat, p.shape)
            old = p[i]
            p[i] = old + h
            up = model.loss(x, y)
            p[i] = old - h
            down = model.loss(x, y)
            p[i] = old
            numeric = (up - down) / (2 * h)
            assert abs(numeric - grads[name][i]) <= 1e-7 + 1e-5 * abs(numeric), (name, i, numeric, grads[name][i])


@pytest.mark.parametrize("bn,pos,act", CONFIGS)
def test_loss_and_gradients_match_torch(bn, pos, act):
    x, y = batch(seed=3)
    model = MLP((12, 9, 8, 5), activation=act, batch_norm=bn, bn_position=pos, dtype=np.float64, seed=4)
    loss, grads = model.loss_and_grads(x, y)
    net = torch_twin(model).train()
    tloss = nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    assert abs(loss - tloss.item()) < 1e-12
    tg = torch_grads(net, model)
    assert set(tg) == set(grads)
    for name in grads:
        np.testing.assert_allclose(grads[name], tg[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_bias_before_batch_norm_has_zero_gradient():
    """The bias of a layer that batch normalization follows cancels in the mean subtraction (chapter 3)."""
    x, y = batch(n=32, seed=5)
    model = MLP((12, 10, 10, 5), activation="sigmoid", batch_norm=True, dtype=np.float64, seed=6)
    _, grads = model.loss_and_grads(x, y)
    for l in range(model.num_hidden):
        assert np.abs(grads[f"b{l}"]).max() < 1e-15 * max(1.0, np.abs(grads[f"W{l}"]).max()) * 100
        assert np.abs(grads[f"W{l}"]).max() > 1e-4  # the weights do learn
    # and shifting it leaves the training-mode output unchanged
    before = model.forward(x)
    for l in range(model.num_hidden):
        model.params[f"b{l}"] += 3.0
    np.testing.assert_allclose(model.forward(x), before, rtol=0, atol=1e-12)


def test_eval_mode_uses_running_statistics_like_torch():
    rng = np.random.default_rng(7)
    model = MLP((12, 9, 5), activation="relu", batch_norm=True, dtype=np.float64, seed=8, momentum=0.2)
    net = torch_twin(model).train()
    for _ in range(3):  # three training forwards update the running statistics identically
        xb = rng.standard_normal((10, 12)) * 2 + 1
        model.forward(xb)
        net(torch.from_numpy(xb))
    np.testing.assert_allclose(model.buffers["running_mean0"], net[2].running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(model.buffers["running_var0"], net[2].running_var.numpy(), rtol=1e-12)
    x = rng.standard_normal((4, 12))
    model.eval()
    net.eval()
    np.testing.assert_allclose(model.forward(x), net(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="training mode"):
        model.backward(np.zeros((4, 5)))


@pytest.mark.parametrize("bn,pos", [(False, "before"), (True, "before"), (True, "after")])
def test_state_dict_loads_into_bnlib_models_mlp(bn, pos):
    """to_torch_state_dict matches the layout of bnlib.lab.models.mlp (with bnlib.torch's BatchNorm1d)."""
    from bnlib.lab import models

    model = MLP((20, 8, 7, 5), activation="tanh", batch_norm=bn, bn_position=pos, dtype=np.float64, seed=1)
    net = models.mlp(20, (8, 7), 5, activation="tanh", norm="bn" if bn else "none", norm_position=pos).double()
    net.load_state_dict(model.to_torch_state_dict(), strict=True)
    x = np.random.default_rng(2).standard_normal((6, 20))
    np.testing.assert_allclose(net(torch.from_numpy(x)).detach().numpy(), model.forward(x), rtol=1e-12, atol=1e-12)


def test_fit_matches_torch_training_step_for_step():
    """Same weights, same batches (fit draws them like bnlib.lab.train.train), same SGD: same losses."""
    from bnlib.lab.train import train

    rng = np.random.default_rng(9)
    x = rng.standard_normal((200, 12)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0)
    model = MLP((12, 16, 16, 4), activation="sigmoid", batch_norm=True, seed=10)
    net = torch_twin(model)
    hist_np = fit(model, x, y, steps=30, batch_size=20, lr=0.5, seed=11)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only cost time on a busy machine
    try:
        hist_t = train(net, torch.from_numpy(x), torch.from_numpy(y), steps=30, batch_size=20, lr=0.5, seed=11)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(hist_np.train_loss, hist_t.train_loss, rtol=1e-4, atol=1e-5)
    for name, value in model.to_torch_state_dict().items():
        np.testing.assert_allclose(value.numpy(), net.state_dict()[name].numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_tiny_training_run_learns_and_is_deterministic():
    from bnlib.data import load_digits

    data = load_digits(seed=0)
    runs = []
    for _ in range(2):
        model = MLP((64, 32, 32, 10), activation="relu", batch_norm=True, init="he", seed=0)
        runs.append(fit(model, data.x_train, data.y_train, steps=300, batch_size=32, lr=0.1,
                        x_eval=data.x_test, y_eval=data.y_test, eval_every=100, seed=0))
    first, second = runs
    assert first.train_loss == second.train_loss and first.eval_acc == second.eval_acc
    assert first.eval_acc[0] < 0.3  # chance level at step 0
    assert first.final_acc > 0.9
    assert np.mean(first.train_loss[-50:]) < 0.3 * np.mean(first.train_loss[:10])
    assert not first.diverged


def test_fit_stops_when_the_loss_diverges():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    model = MLP((12, 16, 16, 3), activation="identity", init=10.0, seed=0)
    hist = fit(model, x, y, steps=200, batch_size=16, lr=100.0)
    assert hist.diverged and len(hist.train_loss) < 200


def test_softmax_cross_entropy_is_stable_and_correct():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    loss, grad = softmax_cross_entropy(logits, np.array([0, 2]))
    assert np.isfinite(loss) and abs(loss - np.log(3) / 2) < 1e-12
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)
    with pytest.raises(ValueError, match="y"):
        softmax_cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="y"):
        softmax_cross_entropy(logits, np.array([0.0, 1.0]))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(sizes=(10,)), ValueError, "sizes"),
        (dict(activation="gelu"), ValueError, "activation"),
        (dict(bn_position="middle"), ValueError, "bn_position"),
        (dict(init="orthogonal"), ValueError, "init"),
        (dict(init=-1.0), ValueError, "init"),
        (dict(eps=-1e-5), ValueError, "eps"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(dtype=np.int32), TypeError, "dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLP(**kwargs)


def test_bad_inputs_raise_before_any_state_changes():
    model = MLP((12, 8, 3), batch_norm=True, seed=0)
    before = model.buffers["running_mean0"].copy()
    with pytest.raises(ValueError, match="x"):
        model.forward(np.zeros((4, 11), dtype=np.float32))
    with pytest.raises(TypeError, match="x"):
        model.forward(np.zeros((4, 12), dtype=np.int64))
    np.testing.assert_array_equal(model.buffers["running_mean0"], before)
    with pytest.raises(ValueError, match="steps"):
        fit(model, np.zeros((10, 12), np.float32), np.zeros(10, np.int64), steps=0, batch_size=2, lr=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, np.zeros((10, 12), np.float32), np.zeros(10, np.int64), steps=1, batch_size=11, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        fit(model, np.zeros((10, 12), np.float32), np.zeros(10, np.int64), steps=1, batch_size=2, lr=-1.0)
