"""Tests for bnlib.lab.probes: the one activation probe (forward hooks on chosen layers)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnlib.torch as bt
from bnlib.lab import models
from bnlib.lab.probes import ActivationProbe, moments, percentiles, rows
from bnlib.lab.train import StopTraining, train


def _mlp(norm="bn", seed=0, activation="sigmoid", dropout=0.0):
    torch.manual_seed(seed)
    return models.mlp(20, (16, 12), 4, activation=activation, norm=norm, dropout=dropout)


def _batch(n=32, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _StepNorm(nn.Module):
    """Called as ``norm(x, t)``, like the per-time-step norm of chapter 8."""

    def forward(self, x, t):
        return x - x.mean(0) + t


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = _StepNorm()

    def forward(self, x):  # x: (N, T, 3)
        h = x.new_zeros(x.shape[0], 3)
        for t in range(x.shape[1]):
            h = torch.tanh(self.norm(self.lin(x[:, t] + h), t))
        return h


# ---------------------------------------------------------------------------------------------- what is recorded


def test_outputs_and_inputs_match_a_manual_forward():
    model = _mlp(norm="none")  # Flatten, Linear, Sigmoid, Linear, Sigmoid, Linear
    x, _ = _batch()
    with ActivationProbe(model, nn.Linear) as out, ActivationProbe(model, nn.Sigmoid, what="input") as inp, \
            torch.no_grad():
        model(x)
    assert out.names == ["1", "3", "5"] and inp.names == ["2", "4"]
    with torch.no_grad():
        z1 = model[1](x)
        z2 = model[3](torch.sigmoid(z1))
        logits = model[5](torch.sigmoid(z2))
    for name, ref in zip(out.names, (z1, z2, logits)):
        assert len(out[name]) == 1 and torch.equal(out[name][0], ref)
    assert torch.equal(inp.last("2"), z1) and torch.equal(inp.last(model[4]), z2)
    assert _no_hooks(model)


def test_layers_by_instance_name_predicate_mapping_and_list():
    model = _mlp()
    bns = [m for m in model.modules() if isinstance(m, bt.BatchNorm1d)]
    x, _ = _batch()
    by_instance = ActivationProbe(model, bns[1])
    by_name = ActivationProbe(model, "2")
    by_pred = ActivationProbe(model, lambda m: isinstance(m, bt.BatchNorm1d))
    by_types = ActivationProbe(model, (bt.BatchNorm1d, nn.Sigmoid))
    by_map = ActivationProbe(model, {"first": bns[0], "second": bns[1]})
    by_list = ActivationProbe(model, [bns[1], "2", bns[1]])  # a module chosen twice is probed once
    assert by_instance.names == ["5"] and by_name.names == ["2"] and by_pred.names == ["2", "5"]
    assert by_types.names == ["2", "3", "5", "6"] and by_map.names == ["first", "second"]
    assert by_list.names == ["5", "2"]
    without_model = ActivationProbe(None, [bns[0], bns[1]])
    assert without_model.names == ["0", "1"]
    with by_pred, by_map, without_model, torch.no_grad():
        model(x)
    for a, b, c in ((by_pred["2"], by_map["first"], without_model["0"]),
                    (by_pred["5"], by_map["second"], without_model["1"])):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])


def test_conv_rows_and_all_calls_of_a_reused_layer():
    torch.manual_seed(0)
    cnn = models.small_cnn("bn", channels=(4, 6))
    img = torch.randn(5, 1, 28, 28)
    probe = ActivationProbe(cnn, bt.BatchNorm2d, reduce="rows")
    out = probe.capture(img)
    assert out[probe.names[0]].shape == (5 * 28 * 28, 4) and out[probe.names[1]].shape == (5 * 14 * 14, 6)

    rnn = _Recurrent()
    x = torch.randn(8, 5, 3)
    with ActivationProbe(rnn, rnn.norm, what="inputs") as probe, torch.no_grad():
        rnn(x)
    assert len(probe["norm"]) == 5 and [t for _, t in probe["norm"]] == list(range(5))
    h = torch.zeros(8, 3)
    with torch.no_grad():
        for t in range(5):
            pre = rnn.lin(x[:, t] + h)
            assert torch.equal(probe["norm"][t][0], pre)
            h = torch.tanh(rnn.norm(pre, t))


def test_records_are_copies_an_inplace_layer_cannot_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(10, 4)
    with torch.no_grad():
        ref = model[0](x)
    assert (ref < 0).any()
    with ActivationProbe(model, model[0]) as out, ActivationProbe(model, model[1], what="input") as inp, \
            ActivationProbe(model, model[0], reduce=lambda t: t.numpy()) as arr, \
            ActivationProbe(model, model[0], reduce=lambda t: t[:, :3]) as view, torch.no_grad():
        model(x)
    assert torch.equal(out.last(), ref) and torch.equal(inp.last(), ref)
    assert np.array_equal(arr.last(), ref.numpy()) and torch.equal(view.last(), ref[:, :3])


# ---------------------------------------------------------------------------------------------- hooks removed


def test_hooks_are_removed_on_exit_and_on_exceptions():
    model = _mlp()
    x, _ = _batch()
    probe = ActivationProbe(model, (bt.BatchNorm1d, nn.Sigmoid), what="input")
    with probe:
        assert not _no_hooks(model)
        with pytest.raises(RuntimeError, match="already recording"):
            probe.__enter__()
    assert _no_hooks(model)
    with pytest.raises(ZeroDivisionError):
        with probe:
            model(x)
            raise ZeroDivisionError
    assert _no_hooks(model) and len(probe["2"]) == 1

    def failing(t):
        raise KeyError("in reduce")

    bad = ActivationProbe(model, "2", reduce=failing, probe_x=x)
    with pytest.raises(KeyError, match="in reduce"):
        bad.capture()
    assert _no_hooks(model) and model.training
    with pytest.raises(RuntimeError):
        ActivationProbe(model, "2").capture(torch.randn(4, 7))  # a shape error inside the forward pass
    assert _no_hooks(model)
    model(x)  # the probe is gone: records no longer change
    assert len(probe["2"]) == 1


# ---------------------------------------------------------------------------------------------- every, reduce


def test_every_nth_call():
    model = _mlp()
    x, _ = _batch()
    with torch.no_grad():  # training mode: the BN output depends on the batch only
        outs = [model[2](model[1](x + k)) for k in range(7)]
    with ActivationProbe(model, "2", every=3) as probe, torch.no_grad():
        for k in range(7):
            model(x + k)
    assert probe.counts["2"] == 7 and len(probe["2"]) == 3  # calls 0, 3, 6
    for rec, k in zip(probe["2"], (0, 3, 6)):
        assert torch.allclose(rec, outs[k], atol=1e-6)
    probe.clear()
    assert probe["2"] == [] and probe.counts["2"] == 0 and probe.steps == []


def test_reducers():
    model = _mlp()
    x, _ = _batch(n=64)
    with ActivationProbe(model, "2") as full, ActivationProbe(model, "2", reduce="moments") as mom, \
            ActivationProbe(model, "2", reduce=percentiles((10, 50, 90))) as pct, \
            ActivationProbe(model, "2", reduce=percentiles((50,), unit=3)) as one, \
            ActivationProbe(model, "2", reduce="shape") as shape, \
            ActivationProbe(model, "2", reduce=lambda t: float(t.abs().max())) as custom, torch.no_grad():
        model(x)
    z = full.last()
    assert torch.allclose(mom.last(), torch.stack([z.mean(0), z.std(0, unbiased=False)]))
    assert torch.allclose(mom.last()[0], torch.zeros(16), atol=1e-5)  # BN output in training mode
    assert pct.last().shape == (3, 16)
    assert torch.allclose(pct.last(), torch.quantile(z, torch.tensor([0.1, 0.5, 0.9]), dim=0))
    assert torch.allclose(one.last(), torch.quantile(z[:, 3], torch.tensor([0.5])))
    assert shape.last() == (64, 16) and custom.last() == float(z.abs().max())
    assert moments(torch.ones(3, 2, 4, 4)).shape == (2, 2)
    assert rows(torch.zeros(2, 3, 5)).shape == (10, 3)
    with pytest.raises(ValueError, match="output"):
        rows(torch.zeros(5))


def test_stacked_records():
    model = _mlp()
    x, _ = _batch()
    probe = ActivationProbe(model, "2", reduce="moments")
    with probe, torch.no_grad():
        model(x)
        model(x + 1)
    assert probe.stacked().shape == (2, 2, 16)
    arrays = ActivationProbe(model, "2", reduce=lambda t: t.mean(0).numpy(), probe_x=x)
    arrays.capture()
    arrays.capture()
    assert isinstance(arrays.stacked(), np.ndarray) and arrays.stacked().shape == (2, 16)


# ---------------------------------------------------------------------------------------------- probe passes


def test_capture_modes_leave_the_model_as_it_was():
    model = _mlp(dropout=0.5)
    x, _ = _batch(n=64)
    with torch.no_grad():  # give the running statistics values that differ from the batch statistics
        model.train()(x * 3 + 1)
    before = _state(model)
    rng = torch.get_rng_state()
    bn = model[2]
    train_out = ActivationProbe(model, bn, mode="train").capture(x)["2"]
    assert torch.allclose(train_out.mean(0), torch.zeros(16), atol=1e-5)  # batch statistics
    eval_out = ActivationProbe(model, bn, mode="eval").capture(x)["2"]
    with torch.no_grad():
        ref = bn.eval()(model[1](x))
    bn.train()
    assert torch.allclose(eval_out, ref, atol=1e-6)  # running statistics
    assert all(m.training for m in model.modules())  # flags restored
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())  # running statistics restored
    assert torch.equal(torch.get_rng_state(), rng)  # dropout in a mode=None pass draws from a forked generator
    current = ActivationProbe(model, model[4], mode=None)  # model[4] is the first Dropout
    current.capture(x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (current.last() == 0).float().mean() > 0.2  # dropout was on in the model's current (training) mode
    # mode='train' switches dropout off: the dropout's output equals its input
    off = ActivationProbe(model, model[4], mode="train").capture(x)["4"]
    with torch.no_grad():
        assert torch.allclose(off, torch.sigmoid(model[2](model[1](x))), atol=1e-6)


def test_as_training_callback_does_not_disturb_the_run():
    x, y = _batch(n=120)
    plain = _mlp(dropout=0.2)
    probed = copy.deepcopy(plain)
    probe = ActivationProbe(probed, nn.Sigmoid, what="input", reduce=percentiles(), every=5, probe_x=x[:40])
    probe.record(0)
    with torch.no_grad():  # step 0 by hand: the first sigmoid's input on the probe batch, training mode
        z = copy.deepcopy(probed)[1:3](x[:40])  # a copy: this forward pass updates running statistics
    assert torch.allclose(probe["3"][0], torch.quantile(z, torch.tensor([0.15, 0.5, 0.85]), dim=0))
    torch.manual_seed(1)  # the dropout masks come from the global generator
    train(plain, x, y, steps=12, batch_size=20, lr=0.1, seed=3)
    torch.manual_seed(1)
    train(probed, x, y, steps=12, batch_size=20, lr=0.1, seed=3, callback=probe)
    assert all(torch.equal(a, b) for a, b in zip(_state(plain).values(), _state(probed).values()))
    assert probe.steps == [0, 5, 10] and probe.stacked("3").shape == (3, 3, 16)
    assert _no_hooks(probed) and torch.equal(probe.last("3"), probe["3"][-1])

    class Stop:
        def __call__(self, step, model, xb, yb):
            if step == 2:
                raise StopTraining

    early = ActivationProbe(probed, "3", every=1, probe_x=x[:40])
    train(probed, x, y, steps=10, batch_size=20, lr=0.1, callback=[early, Stop()])
    assert early.steps == [1, 2] and _no_hooks(probed)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    model = _mlp()
    x, _ = _batch()
    cases = [
        (dict(model=3, layers="2"), TypeError, r"^model: expected a torch.nn.Module or None, got int"),
        (dict(layers=3.5), TypeError, r"^layers: expected a module, .*got float"),
        (dict(layers=[]), ValueError, r"^layers: expected at least one module"),
        (dict(layers={}), ValueError, r"^layers: expected at least one module"),
        (dict(layers={"a": 3}), TypeError, r"^layers\['a'\]: expected a torch.nn.Module, got int"),
        (dict(layers=nn.Conv2d), ValueError, r"^layers: expected at least one module of model matching Conv2d, "
                                             r"got none"),
        (dict(layers="nope"), ValueError, r"^layers: .* matching 'nope', got none"),
        (dict(layers=nn.Linear(2, 2)), ValueError, r"^layers: expected modules of model, got a Linear"),
        (dict(model=None, layers=nn.Linear), ValueError, r"^model: expected the network"),
        (dict(what="in"), ValueError, r"^what: expected 'input', 'inputs' or 'output', got 'in'"),
        (dict(reduce="mean"), ValueError, r"^reduce: expected None, a callable.*got 'mean'"),
        (dict(reduce=5), TypeError, r"^reduce: expected None, a callable.*got int"),
        (dict(every=0), ValueError, r"^every: expected a positive int, got 0"),
        (dict(every=True), ValueError, r"^every: expected a positive int, got True"),
        (dict(every=2.0), ValueError, r"^every: expected a positive int, got 2.0"),
        (dict(probe_x=[1, 2]), TypeError, r"^probe_x: expected a torch.Tensor or None, got list"),
        (dict(mode="test"), ValueError, r"^mode: expected 'train', 'eval' or None, got 'test'"),
    ]
    for kwargs, error, pattern in cases:
        kwargs = {"model": model, "layers": "2", **kwargs}
        with pytest.raises(error, match=pattern):
            ActivationProbe(kwargs.pop("model"), kwargs.pop("layers"), **kwargs)
    probe = ActivationProbe(model, [model[2], model[5]])
    with pytest.raises(ValueError, match=r"^probe_x: expected a probe batch"):
        probe(0, model, x, None)
    with pytest.raises(ValueError, match=r"^x: expected a batch"):
        probe.capture()
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got ndarray"):
        probe.capture(np.zeros((3, 20)))
    with pytest.raises(ValueError, match=r"^model: expected the network this probe was built for"):
        ActivationProbe(model, "2", probe_x=x)(0, _mlp(), x, None)
    with pytest.raises(ValueError, match=r"^model: expected the network to run, got None"):
        ActivationProbe(None, [model[2]]).capture(x)
    with pytest.raises(ValueError, match=r"^key: expected a layer name"):
        probe.last()
    with pytest.raises(ValueError, match=r"^key: layer '2' has no record yet"):
        probe.last("2")
    with pytest.raises(KeyError, match="key: expected one of"):
        probe["7"]
    with pytest.raises(TypeError, match=r"^step: expected an int, got str"):
        ActivationProbe(model, "2", probe_x=x).record("0")
    with pytest.raises(ValueError, match=r"^q: expected percentages in \[0, 100\]"):
        percentiles((50, 101))
    with pytest.raises(TypeError, match=r"^unit: expected an int or None, got float"):
        percentiles(unit=1.0)
    assert _no_hooks(model)
