"""Tests for bnlib.torch.diagnostics: LayerStats (per-layer activation and gradient summaries) and UpdateRatio
(the update:data ratio), against manual computations on tiny models."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib.torch as bt
from bnlib.torch.diagnostics import (
    DEFAULT_LAYERS,
    LayerStats,
    UpdateRatio,
    dead_fraction,
    grad_data_ratios,
    saturation_fraction,
    update_ratio,
)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3), nn.Sigmoid())


def _batch(n=16, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


# ------------------------------------------------------------------------------------------------ forward and backward


def test_statistics_match_a_manual_forward_and_backward():
    model = _model()
    x, y = _batch()
    stats = LayerStats(model, bins=10)
    assert stats.names == ["0", "1", "2", "3", "4", "5"]
    with stats:
        _loss(model, x, y).backward()
    # the same by hand: every layer's output, its gradient via retain_grad
    outs, h = [], x
    for layer in model:
        h = layer(h)
        h.retain_grad()
        outs.append(h)
    F.cross_entropy(h, y).backward()
    for name, out in zip(stats.names, outs):
        rec = stats.records[name][0]
        o = out.detach()
        assert rec["shape"] == tuple(o.shape) and rec["step"] == 0 and rec["call"] == 0
        assert rec["mean"] == pytest.approx(o.mean().item(), rel=1e-6, abs=1e-7)
        assert rec["std"] == pytest.approx(o.std(unbiased=False).item(), rel=1e-6)
        assert rec["grad"]["mean"] == pytest.approx(out.grad.mean().item(), rel=1e-5, abs=1e-9)
        assert rec["grad"]["std"] == pytest.approx(out.grad.std(unbiased=False).item(), rel=1e-5)
        edges = stats.edges[name]
        counts, _ = np.histogram(np.clip(o.numpy(), edges[0], edges[-1]), bins=edges)
        assert np.abs(rec["hist"] - counts).sum() <= 2  # float32 bin boundaries may differ by one ulp
        assert rec["hist"].sum() == o.numel() and rec["grad"]["hist"].sum() == o.numel()
    tanh, relu, sig = (stats.records[n][0] for n in ("1", "3", "5"))
    assert tanh["saturated"] == pytest.approx((outs[1].detach().abs() > 0.97).float().mean().item())
    assert sig["saturated"] == pytest.approx(((2 * outs[5].detach() - 1).abs() > 0.97).float().mean().item())
    assert relu["dead"] == pytest.approx((outs[3].detach() == 0).all(0).float().mean().item())
    assert tanh["dead"] is None and relu["saturated"] is None and stats.records["0"][0]["saturated"] is None
    np.testing.assert_allclose(stats.edges["1"], np.linspace(-1, 1, 11))  # tanh: fixed range
    np.testing.assert_allclose(stats.edges["5"], np.linspace(0, 1, 11))   # sigmoid
    m = outs[0].detach().abs().max().item()
    np.testing.assert_allclose(stats.edges["0"], np.linspace(-m, m, 11), rtol=1e-6)  # first record's range


def test_saturation_fraction_is_exact_on_constructed_inputs():
    y = torch.tensor([-0.999, -0.98, -0.5, 0.0, 0.3, 0.96, 0.975, 0.9999])  # 4 of 8 beyond 0.97
    assert saturation_fraction(y) == 0.5
    assert saturation_fraction(y, threshold=0.99) == 0.25
    s = torch.tensor([0.001, 0.01, 0.02, 0.5, 0.98, 0.99, 0.999, 0.6])  # |2s - 1| > 0.97: s < 0.015 or s > 0.985
    assert saturation_fraction(s, "sigmoid") == 0.5
    # through the layers: inputs chosen so the outputs are exactly those values' neighbours
    model = nn.Sequential(nn.Tanh())
    with LayerStats(model, grad_enabled_only=False) as stats:
        model(torch.atanh(y.double()).float().reshape(2, 4))
    assert stats.records["0"][0]["saturated"] == 0.5
    model = nn.Sequential(nn.Sigmoid())
    with LayerStats(model, grad_enabled_only=False, saturation=0.9) as stats:
        model(torch.logit(s.double()).float().reshape(4, 2))  # |2s - 1| > 0.9: s < 0.05 or s > 0.95
    assert stats.records["0"][0]["saturated"] == 6 / 8


def test_dead_units_are_zero_for_the_whole_batch():
    x = torch.tensor([[-1.0, 2.0, -3.0, 0.5], [-2.0, -1.0, -0.1, 0.5], [-0.5, -4.0, -1.0, 0.5]])
    assert dead_fraction(torch.relu(x)) == 0.5  # units 0 and 2 never fire
    model = nn.Sequential(nn.ReLU())
    with LayerStats(model, grad_enabled_only=False) as stats:
        model(x)
    assert stats.records["0"][0]["dead"] == 0.5
    conv = torch.randn(4, 3, 5, 5).abs() + 0.1
    conv[:, 1] = -conv[:, 1]  # channel 1 dead everywhere
    conv[2, 2, 4, 4] = -1.0   # channel 2: one negative position only
    assert dead_fraction(torch.relu(conv)) == pytest.approx(1 / 3)
    seq = torch.relu(conv.permute(0, 2, 3, 1).reshape(4, 25, 3))  # (N, T, C)
    assert dead_fraction(seq, unit_dim=-1) == pytest.approx(1 / 3)


def test_histogram_counts_sum_to_the_number_of_values_and_clipping_is_counted():
    model = nn.Sequential(nn.Linear(4, 50))
    x = torch.randn(20, 4)
    with LayerStats(model, act_range=(-0.1, 0.1), grad_range=(-1e-9, 1e-9), bins=7) as stats:
        model(x).pow(2).sum().backward()
    rec = stats.records["0"][0]
    out = model(x).detach()
    assert rec["hist"].dtype == np.int64 and rec["hist"].shape == (7,) and rec["hist"].sum() == out.numel()
    assert rec["clipped"] == pytest.approx(((out < -0.1) | (out > 0.1)).float().mean().item())
    assert rec["grad"]["hist"].sum() == out.numel() and rec["grad"]["clipped"] > 0.5


def test_hooks_are_removed_after_exit_also_on_error_and_pending_gradients_are_dropped():
    model = _model()
    x, y = _batch()
    stats = LayerStats(model)
    with stats:
        assert stats.attached
        loss = _loss(model, x, y)
    assert _no_hooks(model) and not stats.attached
    loss.backward()  # after detach: the gradient hooks of that forward were removed too
    assert all("grad" not in stats.records[n][0] for n in stats.names)
    with pytest.raises(ZeroDivisionError):
        with stats:
            raise ZeroDivisionError
    assert _no_hooks(model)
    stats.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        stats.attach()
    stats.detach()
    assert _no_hooks(model)


def test_model_is_unchanged_outputs_and_gradients_identical():
    model = _model()
    reference = _model()
    x, y = _batch()
    model.eval()
    before = _state(model)
    with LayerStats(model, grad_enabled_only=False):
        out = model(x)
        _loss(model, x, y).backward()
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    reference.eval()
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    _loss(reference, x, y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_batch_norm_model_trains_the_same_with_the_stats_attached():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bt.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(6, 2, 8, 8)
    with LayerStats(model) as stats:
        model(x).sum().backward()
    twin(x).sum().backward()
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)  # running statistics included
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert stats.names == ["0", "2", "4"] and stats.records["2"][0]["dead"] is not None


def test_grad_enabled_only_every_and_step_labels():
    model = _model()
    x, y = _batch()
    stats = LayerStats(model, nn.Tanh, every=2)
    with stats:
        with torch.no_grad():
            model(x)  # an evaluation: not recorded
        for step in range(1, 6):
            stats(step, model)  # as a before_step hook
            _loss(model, x, y).backward()
    recs = stats.records["1"]
    assert [r["step"] for r in recs] == [1, 3, 5] and [r["call"] for r in recs] == [0, 2, 4]
    assert all("grad" in r for r in recs)
    rep = stats.report()["1"]
    assert rep["type"] == "Tanh" and rep["kind"] == "tanh"
    assert rep["activation"]["hist"].shape == (3, stats.bins) and rep["gradient"]["hist"].shape == (3, stats.bins)
    np.testing.assert_array_equal(rep["steps"], [1, 3, 5])
    np.testing.assert_array_equal(rep["gradient"]["steps"], [1, 3, 5])
    assert np.isnan(rep["activation"]["dead"]).all() and not np.isnan(rep["activation"]["saturated"]).any()
    all_calls = LayerStats(model, nn.Tanh, grad_enabled_only=False)
    with all_calls, torch.no_grad():
        model(x)
    assert len(all_calls.records["1"]) == 1 and "grad" not in all_calls.records["1"][0]
    with pytest.raises(ValueError, match="^model: expected the network"):
        stats(1, _model())


def test_table_report_and_layer_choice():
    model = _model()
    x, y = _batch()
    stats = LayerStats(model, ["0", model[3]], gradients=False)
    assert stats.names == ["0", "3"]
    assert LayerStats(model, lambda m: isinstance(m, nn.Sigmoid)).names == ["5"]
    assert LayerStats(model, "2").names == ["2"]
    assert LayerStats(model).names == [n for n, m in model.named_modules() if isinstance(m, DEFAULT_LAYERS)]
    with stats:
        _loss(model, x, y).backward()
        _loss(model, x, y).backward()
    rows = stats.table()
    assert [r["layer"] for r in rows] == ["0", "3"] and rows[1]["type"] == "ReLU" and rows[0]["step"] == 1
    assert rows[0]["grad_std"] is None  # gradients=False
    assert stats.table(0)[0]["step"] == 0
    with pytest.raises(IndexError, match="^record: expected an index"):
        stats.table(5)
    stats.clear()
    assert stats.table() == [] and stats.report()["0"]["activation"]["hist"].shape == (0, stats.bins)


def test_plots_draw_labelled_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = _model()
    x, y = _batch()
    stats, ratio = LayerStats(model), UpdateRatio(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stats:
        for _ in range(3):
            opt.zero_grad()
            _loss(model, x, y).backward()
            with ratio.around():
                opt.step()
    fig, axes = plt.subplots(1, 3)
    stats.plot("activation", ax=axes[0], labels={"1": "tanh layer"})
    stats.plot("gradient", record=0, ax=axes[1])
    ratio.plot(ax=axes[2])
    assert axes[0].get_xlabel() and axes[0].get_ylabel() and axes[0].get_title()
    assert "tanh layer" in [t.get_text().split(":")[0] for t in axes[0].get_legend().get_texts()]
    assert axes[2].get_ylabel().startswith("log10")
    plt.close(fig)
    with pytest.raises(ValueError, match="^which: expected"):
        stats.plot("weights")


# ------------------------------------------------------------------------------------------------ update ratios


def _train_steps(model, opt, ratio, steps=3, seed=0):
    x, y = _batch(seed=seed)
    manual = []
    for t in range(steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        _loss(model, x, y).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        with ratio.around(t):
            opt.step()
        after = dict(model.named_parameters())
        manual.append({n: ((after[n].detach().double() - before[n].double()).std(unbiased=False)
                           / before[n].double().std(unbiased=False)).item() for n in ratio.names})
        yield t, before, grads, manual[-1]


def test_update_ratio_equals_manual_computation_for_sgd_and_the_gradient_estimate():
    model = _model()
    ratio = UpdateRatio(model)
    assert ratio.names == ["0.weight", "2.weight", "4.weight"]
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t, before, grads, manual in _train_steps(model, opt, ratio):
        for n in ratio.names:
            assert ratio.ratios[n][t] == pytest.approx(manual[n], rel=1e-9)
            # plain SGD: the update is lr * grad, Karpathy's estimate is exact
            est = lr * grads[n].double().std(unbiased=False) / before[n].double().std(unbiased=False)
            assert ratio.ratios[n][t] == pytest.approx(est.item(), rel=1e-5)
    assert ratio.steps == [0, 1, 2]
    rep = ratio.report()
    np.testing.assert_allclose(rep["log10"]["0.weight"], np.log10(ratio.ratios["0.weight"]))


def test_update_ratio_for_adam_is_the_actual_update():
    model = _model()
    ratio = UpdateRatio(model, "all")
    lr = 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = True
    for t, before, grads, manual in _train_steps(model, opt, ratio):
        for n in ratio.names:
            if not math.isnan(manual[n]):
                assert ratio.ratios[n][t] == pytest.approx(manual[n], rel=1e-9)
        if first:  # Adam's first step, by hand: w -= lr * g / (|g| + eps) (bias corrections cancel)
            for n in ratio.names:
                g, w = grads[n].double(), before[n].double()
                step = lr * g / (g.abs() + 1e-8)
                expected = step.std(unbiased=False) / w.std(unbiased=False)
                assert ratio.ratios[n][t] == pytest.approx(expected.item(), rel=1e-4)
            # ... which the gradient-based estimate does not see (it scales with |g|, Adam does not)
            est = grad_data_ratios(model, lr, "all")
            assert any(abs(est[n] / ratio.ratios[n][t] - 1) > 0.5 for n in ratio.names)
            first = False


def test_update_ratio_hooks_every_and_rms_for_constant_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), bt.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    ratio = UpdateRatio(model, "all", every=2)
    gamma_std = UpdateRatio(model, ["1.weight"])
    gamma_rms = UpdateRatio(model, ["1.weight"], measure="rms")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for step in range(1, 6):  # the order of bnlib.lab.train.train's hooks
        for r in (ratio, gamma_std, gamma_rms):
            r.before_step(step, model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for r in (ratio, gamma_std, gamma_rms):
            r.callback(step, model, x, y)
    assert ratio.steps == [2, 4] and gamma_rms.steps == [1, 2, 3, 4, 5]
    assert "1.bias" in ratio.names and len(ratio.ratios["3.bias"]) == 2
    # gamma starts at ones: its std is 0, so the std ratio of step 1 is undefined; the rms ratio is not
    assert math.isnan(gamma_std.ratios["1.weight"][0]) and math.isfinite(gamma_rms.ratios["1.weight"][0])
    assert all(math.isfinite(v) for v in gamma_std.ratios["1.weight"][1:])
    d = torch.tensor([0.0, 0.1, 0.0, 0.0, -0.1])
    assert math.isnan(update_ratio(torch.ones(5), 1 + d))
    assert update_ratio(torch.ones(5), 1 + d, "rms") == pytest.approx(d.double().pow(2).mean().sqrt().item())


def test_update_ratio_leaves_the_model_alone():
    model = _model()
    before = _state(model)
    ratio = UpdateRatio(model)
    ratio.snapshot()
    ratio.measure()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ratio.ratios["0.weight"] == [0.0]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"model": "net"}, TypeError, "^model: expected a torch.nn.Module"),
    ({"layers": nn.BatchNorm2d}, ValueError, "^layers: expected at least one module of model matching BatchNorm2d"),
    ({"layers": ["nope"]}, ValueError, "^layers: expected names of model.named_modules"),
    ({"layers": [nn.Linear(2, 2)]}, ValueError, "^layers: expected submodules of model"),
    ({"layers": []}, ValueError, "^layers: expected at least one layer"),
    ({"layers": 3}, TypeError, "^layers: expected a type"),
    ({"bins": 0}, ValueError, "^bins: expected an int >= 1"),
    ({"bins": 2.5}, TypeError, "^bins: expected an int"),
    ({"act_range": (1.0, 0.0)}, ValueError, "^act_range: expected low < high"),
    ({"grad_range": (0.0, float("inf"))}, ValueError, "^grad_range: expected a real number"),
    ({"act_range": 3}, ValueError, r"^act_range: expected None or a pair"),
    ({"saturation": 1.0}, ValueError, r"^saturation: expected a real number in \(0, 1\)"),
    ({"every": 0}, ValueError, "^every: expected an int >= 1"),
    ({"gradients": 1}, TypeError, "^gradients: expected a bool"),
])
def test_layer_stats_bad_input(kwargs, exc, message):
    args = {"model": _model(), **kwargs}
    with pytest.raises(exc, match=message):
        LayerStats(args.pop("model"), **args)


def test_functions_and_update_ratio_bad_input():
    model = _model()
    with pytest.raises(TypeError, match="^y: expected a torch.Tensor"):
        saturation_fraction([0.5])
    with pytest.raises(ValueError, match="^kind: expected 'tanh' or 'sigmoid'"):
        saturation_fraction(torch.zeros(3), "relu")
    with pytest.raises(ValueError, match="^threshold: expected"):
        saturation_fraction(torch.zeros(3), threshold=0)
    with pytest.raises(ValueError, match="^unit_dim: expected an int in"):
        dead_fraction(torch.zeros(3, 4), unit_dim=2)
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        UpdateRatio(object())
    with pytest.raises(ValueError, match="^params: expected 'weights', 'all'"):
        UpdateRatio(model, "biases")
    with pytest.raises(ValueError, match="^params: expected names of model.named_parameters"):
        UpdateRatio(model, ["0.weight", "9.bias"])
    with pytest.raises(ValueError, match="^measure: expected 'std' or 'rms'"):
        UpdateRatio(model, measure="var")
    with pytest.raises(ValueError, match="^every: expected an int >= 1"):
        UpdateRatio(model, every=0)
    ratio = UpdateRatio(model)
    with pytest.raises(RuntimeError, match="^measure: expected a snapshot"):
        ratio.measure()
    with pytest.raises(TypeError, match="^step: expected an int"):
        ratio.before_step(1.5, model)
    with pytest.raises(ValueError, match="^model: expected the network"):
        ratio.callback(1, _model())
    with pytest.raises(ValueError, match="^after: expected the shape of before"):
        update_ratio(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"^lr: expected a real number in \(0, inf\)"):
        grad_data_ratios(model, -1.0)
    with pytest.raises(ValueError, match="^target: expected"):
        ratio.plot(target=0)
    assert ratio.steps == [] and _no_hooks(model)
