"""Tests for bnlib.lab.ics: activation hooks, the ICS measure, noisy batch norm, landscape probes, scale invariance."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnlib.torch as bt
from bnlib.lab import ics, models
from tests._numerics import assert_error_within


def _batch(n=32, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _mlp(norm="bn", d=20, hidden=(16, 12), classes=4, seed=0, activation="relu"):
    torch.manual_seed(seed)
    return models.mlp(d, hidden, classes, activation=activation, norm=norm)


def _closure(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- hooks


def test_recorder_shapes_mlp_and_cnn():
    model = _mlp()
    x, _ = _batch()
    mods = ics.pre_activation_modules(model)
    assert list(mods) == ["layer1", "layer2"]
    assert all(isinstance(m, bt.BatchNorm1d) for m in mods.values())
    out = ics.capture(model, x, mods)
    assert out["layer1"].shape == (32, 16) and out["layer2"].shape == (32, 12)

    torch.manual_seed(0)
    cnn = models.small_cnn("bn", channels=(4, 6))
    img = torch.randn(5, 1, 28, 28)
    out = ics.capture(cnn, img, ics.pre_activation_modules(cnn))
    assert out["layer1"].shape == (5 * 28 * 28, 4)  # one row per (sample, position), one column per channel
    assert out["layer2"].shape == (5 * 14 * 14, 6)


def test_recorder_values_match_manual_forward_and_hooks_are_removed():
    model = _mlp(norm="none")
    x, _ = _batch()
    with ics.ActivationRecorder([model[1]]) as rec:
        model(x)
    assert torch.allclose(rec.outputs["0"], model[1](model[0](x)))
    assert len(model[1]._forward_hooks) == 0


def test_pre_activation_modules_without_bn_are_the_linears():
    model = _mlp(norm="none")
    mods = ics.pre_activation_modules(model)
    assert all(isinstance(m, nn.Linear) for m in mods.values())


def test_capture_leaves_running_stats_untouched():
    model = _mlp()
    before = _state(model)
    ics.capture(model, _batch()[0], ics.pre_activation_modules(model))
    assert _same_state(before, _state(model))


def test_bn_output_moments_on_probe_batch():
    """In training mode each unit of a BN output has batch mean beta and (biased) std gamma on the probe."""
    model = _mlp()
    x, _ = _batch(n=64)
    out = ics.capture(model, x, ics.pre_activation_modules(model))["layer1"]
    assert torch.allclose(out.mean(0), torch.zeros(16), atol=1e-5)
    assert torch.allclose(out.std(0, unbiased=False), torch.ones(16), atol=1e-3)


def test_wasserstein_and_drift():
    a = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ics.wasserstein1(a, a), torch.zeros(3))
    assert torch.allclose(ics.wasserstein1(a, a + 0.7), torch.full((3,), 0.7), atol=1e-6)
    # the drift is scale-free: shifting by one standard deviation gives 1, whatever the scale
    assert torch.allclose(ics.relative_drift(5 * a, 5 * a + 5 * a.std(0)), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        ics.wasserstein1(a, a[:10])


def test_recorder_rejects_bad_input():
    with pytest.raises(TypeError, match="modules"):
        ics.ActivationRecorder(3)
    with pytest.raises(ValueError, match="at least one"):
        ics.ActivationRecorder({})
    with pytest.raises(TypeError, match="Sequential"):
        ics.pre_activation_modules(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------- ICS


def test_ics_first_layer_is_zero_and_model_restored():
    model = _mlp()
    x, y = _batch()
    before = _state(model)
    r = ics.ics(model, _closure(model, x, y), lr=0.5)
    assert r.l2[0] == 0 and r.cosine[0] == 1
    assert np.all(r.l2[1:] > 0)
    assert _same_state(before, _state(model))


def test_ics_zero_when_earlier_layers_do_not_move():
    model = _mlp()
    x, y = _batch()
    r = ics.ics(model, _closure(model, x, y), lr=0.0)
    assert np.all(r.l2 == 0) and np.allclose(r.cosine, 1)


def test_ics_zero_when_earlier_layers_are_frozen():
    """Parameters that do not train are not stepped, so the layers after them see no shift."""
    model = _mlp(norm="none")
    x, y = _batch()
    for p in model[1].parameters():
        p.requires_grad_(False)
    layers = ics.weight_layers(model)[1:]
    r = ics.ics(model, _closure(model, x, y), lr=0.5, layers=layers)
    assert r.l2[0] == 0


def test_ics_matches_manual_computation():
    """Layer 2's shift by hand. Both computations are float32, in different orders (``ics`` sums G * G' for
    the cosine where F.cosine_similarity normalizes first), so each of ``ics``'s numbers is judged by its error
    against the same computation in float64, within a few times the float32 hand computation's error
    (tests/_numerics.py) -- not by a constant tuned to one processor's rounding."""
    model = _mlp(norm="none")
    x, y = _batch()
    lr = 0.3
    layers = ics.weight_layers(model)
    r = ics.ics(model, _closure(model, x, y), lr=lr)
    assert layers[2] is model[5]

    def by_hand(model, x):
        # layer 2 by hand: step layer 0 and 1 (weights and biases), recompute dL/dW2
        params = list(model.parameters())
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        g2 = grads[4]
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in list(zip(clone.parameters(), grads))[:4]:
                p -= lr * g
        (g2p,) = torch.autograd.grad(F.cross_entropy(clone(x), y), [clone[5].weight])
        return (g2 - g2p).norm(), F.cosine_similarity(g2.flatten(), g2p.flatten(), 0), g2.norm()

    hand = by_hand(model, x)
    truth = by_hand(copy.deepcopy(model).double(), x.double())
    for name, ours, ref, exact in zip(("l2", "cosine", "grad_norm"), (r.l2[2], r.cosine[2], r.grad_norm[2]), hand,
                                      truth):
        assert_error_within(np.float32(ours), ref, exact, what=name)


def test_ics_small_lr_is_linear_in_lr():
    """For small steps G' - G is first order in the step, so the shift doubles when lr doubles."""
    model = _mlp(norm="none", activation="tanh")
    x, y = _batch()
    model.double()
    x = x.double()
    a = ics.ics(model, _closure(model, x, y), lr=1e-4)
    b = ics.ics(model, _closure(model, x, y), lr=2e-4)
    assert np.allclose(b.l2[1:] / a.l2[1:], 2.0, rtol=1e-2)


def test_parameter_groups_attach_bn_to_previous_layer():
    model = _mlp()
    layers = ics.weight_layers(model)
    groups = ics.parameter_groups(model, layers)
    assert len(groups) == 3
    assert [id(p) for p in groups[0]] == [id(p) for p in (model[1].weight, model[1].bias, model[2].weight,
                                                          model[2].bias)]
    with pytest.raises(ValueError, match="not"):
        ics.parameter_groups(model, [nn.Linear(2, 2)])


def test_ics_rejects_bad_input():
    model = _mlp()
    with pytest.raises(ValueError, match="lr"):
        ics.ics(model, lambda: None, lr=-1)
    with pytest.raises(TypeError, match="closure"):
        ics.ics(model, 3, lr=0.1)


# ---------------------------------------------------------------------------------------------------- noisy BN


def test_noisy_bn_noise_statistics():
    layer = ics.NoisyBatchNorm1d(2000, mean_noise=0.5, scale_noise=3.0, seed=1)
    x = torch.randn(50, 2000) * 4 + 2
    y = layer(x)
    # per unit, the output mean is the drawn shift and the std the drawn scale (BN makes it 0 and 1 first)
    assert torch.allclose(y.mean(0), layer.noise_shift, atol=1e-4)
    assert torch.allclose(y.std(0, unbiased=False), layer.noise_scale, rtol=1e-3)
    shift, scale = layer.noise_shift, layer.noise_scale
    assert shift.abs().max() <= 0.5 and abs(float(shift.mean())) < 0.03          # U(-0.5, 0.5)
    assert float(shift.std()) == pytest.approx(0.5 / math.sqrt(3), rel=0.06)
    log_s = scale.log()
    assert log_s.abs().max() <= math.log(3.0) + 1e-6                              # log-uniform in [1/3, 3]
    assert float(log_s.std()) == pytest.approx(math.log(3.0) / math.sqrt(3), rel=0.06)


def test_noisy_bn_resamples_every_training_step_but_not_in_eval_or_when_frozen():
    layer = ics.NoisyBatchNorm1d(8, seed=0)
    x = torch.randn(16, 8)
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)                 # a new distribution at each step
    with ics.frozen_state(layer):
        z1, z2 = layer(x), layer(x)
    assert torch.equal(z1, z2) and torch.allclose(z1, y2)   # frozen: reuse the current draw
    y3 = layer(x)
    ref = ics.NoisyBatchNorm1d(8, seed=0)
    ref(x), ref(x)
    assert torch.allclose(y3, ref(x))                 # measuring did not change the random sequence
    layer.eval()
    plain = bt.BatchNorm1d(8)
    plain.load_state_dict(layer.state_dict())
    plain.eval()
    assert torch.allclose(layer(x), plain(x))         # no noise at inference


def test_noisy_bn_sample_noise_and_2d():
    layer = ics.NoisyBatchNorm2d(3, mean_noise=0.0, scale_noise=1.0, sample_noise=0.5, seed=0)
    x = torch.randn(4, 3, 5, 5)
    y = layer(x)
    plain = bt.BatchNorm2d(3)
    resid = y - plain(x)
    assert float(resid.detach().std()) == pytest.approx(0.5, rel=0.2)
    with ics.frozen_state(layer):
        assert torch.equal(layer(x), layer(x))


def test_add_noise_keeps_state_and_replaces_every_bn():
    model = _mlp()
    model[2].running_mean.fill_(0.3)
    ics.add_noise(model, mean_noise=0.2)
    noisy = [m for m in model.modules() if isinstance(m, (ics.NoisyBatchNorm1d, ics.NoisyBatchNorm2d))]
    assert len(noisy) == 2 and torch.allclose(model[2].running_mean, torch.full((16,), 0.3))
    assert noisy[0].mean_noise == 0.2
    custom = nn.Sequential(nn.Linear(3, 5), bt.BatchNorm1d(5, momentum=None, bias=False).double())
    ics.add_noise(custom)
    assert isinstance(custom[1], ics.NoisyBatchNorm1d) and custom[1].bias is None
    assert custom[1].momentum is None and custom[1].weight.dtype == torch.float64
    cnn = ics.add_noise(models.small_cnn("bn", channels=(4,)))
    assert isinstance(cnn[1], ics.NoisyBatchNorm2d)
    with pytest.raises(ValueError, match="no bnlib.torch BatchNorm"):
        ics.add_noise(_mlp(norm="none"))


def test_noisy_bn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale_noise"):
        ics.NoisyBatchNorm1d(4, scale_noise=0.5)
    with pytest.raises(ValueError, match="mean_noise"):
        ics.NoisyBatchNorm1d(4, mean_noise=-1)
    with pytest.raises(TypeError, match="seed"):
        ics.NoisyBatchNorm1d(4, seed=1.5)


# ---------------------------------------------------------------------------------------------------- landscape


class _Quadratic(nn.Module):
    def __init__(self, diag, theta):
        super().__init__()
        self.A = torch.diag(torch.as_tensor(diag, dtype=torch.float64))
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64))

    def loss(self):
        return 0.5 * self.theta @ self.A @ self.theta


def test_landscape_on_quadratic_eigendirection():
    """Along an eigenvector with eigenvalue lam the gradient changes by lam * distance: beta = lam exactly."""
    q = _Quadratic([3.0, 1.0], [1.0, 0.0])
    etas = [0.05, 0.1, 0.2]
    r = ics.landscape_probe(q, q.loss, etas)
    assert r.beta_smoothness == pytest.approx(3.0, rel=1e-9)
    assert r.grad_norm == pytest.approx(3.0)
    assert np.allclose(r.losses, [0.5 * 3 * (1 - 3 * e) ** 2 for e in etas])
    assert r.loss_range == pytest.approx(1.5 - 0.5 * 3 * 0.4 ** 2)
    assert r.grad_predictiveness == pytest.approx(3 * 0.2 * 3)
    assert torch.equal(q.theta.detach(), torch.tensor([1.0, 0.0], dtype=torch.float64))


@given(st.floats(0.1, 10), st.floats(0.1, 10), st.floats(-2, 2), st.floats(-2, 2))
def test_landscape_beta_between_eigenvalues(a, b, t1, t2):
    """On any quadratic the effective beta-smoothness is ||A g|| / ||g||, between the eigenvalues."""
    if abs(t1) + abs(t2) < 1e-3:
        return
    q = _Quadratic([a, b], [t1, t2])
    r = ics.landscape_probe(q, q.loss, [0.01, 0.1])
    g = torch.tensor([a * t1, b * t2], dtype=torch.float64)
    expected = float((torch.tensor([a, b], dtype=torch.float64) * g).norm() / g.norm())
    assert r.beta_smoothness == pytest.approx(expected, rel=1e-7)
    assert min(a, b) - 1e-9 <= r.beta_smoothness <= max(a, b) + 1e-9


def test_landscape_leaves_model_unchanged_and_validates():
    model = _mlp()
    x, y = _batch()
    before = _state(model)
    r = ics.landscape_probe(model, _closure(model, x, y), [0.1, 0.5])
    assert _same_state(before, _state(model)) and r.losses.shape == (2,)
    with pytest.raises(ValueError, match="step_sizes"):
        ics.landscape_probe(model, _closure(model, x, y), [0.1, -1])


def test_landscape_at_matched_step_length():
    """With distances d the probe moves to theta - d g / ||g||: the same points whatever the gradient's size."""
    q = _Quadratic([3.0, 1.0], [1.0, 2.0])
    dists = [0.05, 0.1, 0.4]
    r = ics.landscape_probe(q, q.loss, distances=dists)
    g = np.array([3.0, 2.0])
    assert np.allclose(r.distance, dists) and np.allclose(r.step_sizes, np.array(dists) / np.linalg.norm(g))
    theta = np.array([1.0, 2.0])
    ends = [theta - d * g / np.linalg.norm(g) for d in dists]
    assert np.allclose(r.losses, [0.5 * (3 * e[0] ** 2 + e[1] ** 2) for e in ends])
    expected_beta = np.linalg.norm(np.array([3.0, 1.0]) * g) / np.linalg.norm(g)   # ||A g|| / ||g||
    assert r.beta_smoothness == pytest.approx(expected_beta, rel=1e-9)

    class Scaled(_Quadratic):   # the same landscape, ten times steeper: eta-probes would move 10x further
        def loss(self):
            return 10 * super().loss()

    s = Scaled([3.0, 1.0], [1.0, 2.0])
    r10 = ics.landscape_probe(s, s.loss, distances=dists)
    assert np.allclose(r10.losses, 10 * r.losses) and np.allclose(r10.grad_change, 10 * r.grad_change)
    assert np.allclose(r10.distance, r.distance)
    assert torch.equal(q.theta.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly one"):
        ics.landscape_probe(q, q.loss)
    with pytest.raises(ValueError, match="exactly one"):
        ics.landscape_probe(q, q.loss, [0.1], distances=[0.1])
    with pytest.raises(ValueError, match="distances"):
        ics.landscape_probe(q, q.loss, distances=[0.1, 0.0])


def test_landscape_at_matched_step_length_with_zero_gradient():
    q = _Quadratic([3.0, 1.0], [0.0, 0.0])   # at the minimum: nowhere to go
    r = ics.landscape_probe(q, q.loss, distances=[0.1, 0.2])
    assert r.grad_norm == 0 and np.all(r.distance == 0) and r.beta_smoothness == 0 and r.loss_range == 0


# ---------------------------------------------------------------------------------------------------- scale invariance


def _exact_bn_mlp():
    """A BN MLP in float64 with eps ~ 0, so that scale invariance holds to rounding error."""
    model = _mlp().double()
    for m in model.modules():
        if isinstance(m, bt.BatchNorm1d):
            m.eps = 1e-30
    return model


def test_linear_bn_is_scale_invariant():
    model = _exact_bn_mlp()
    x, y = _batch()
    x = x.double()
    r = ics.scale_invariance(model, model[1], _closure(model, x, y), scales=(0.5, 2.0, 10.0), x=x)
    assert np.all(r["loss_change"] < 1e-12) and np.all(r["output_change"] < 1e-12)
    assert np.allclose(r["grad_ratio"], 1.0, rtol=1e-9)          # gradient scales as 1/c
    assert abs(r["radial"]) < 1e-12                              # gradient orthogonal to the weight


def test_eps_breaks_scale_invariance_only_slightly():
    """With the default eps = 1e-5 the invariance holds up to terms of order eps / Var[Wx]."""
    model = _mlp().double()
    x, y = _batch()
    x = x.double()
    r = ics.scale_invariance(model, model[1], _closure(model, x, y), scales=(0.5, 2.0, 10.0), x=x)
    assert np.all(r["loss_change"] < 1e-4) and np.allclose(r["grad_ratio"], 1.0, rtol=1e-3)
    r = ics.scale_invariance(model, model[1], _closure(model, x, y), scales=(1e-3,), x=x)
    assert r["loss_change"][0] > 1e-3   # shrink W until Var[Wx] ~ eps and the invariance is gone


def test_without_bn_scale_matters():
    model = _mlp(norm="none").double()
    x, y = _batch()
    x = x.double()
    r = ics.scale_invariance(model, model[1], _closure(model, x, y), scales=(2.0,), x=x)
    assert r["loss_change"][0] > 1e-3 and abs(r["radial"]) > 1e-3


def test_sgd_on_scale_invariant_weight_grows_its_norm_by_lr2_g2():
    """||w - lr g||^2 = ||w||^2 + lr^2 ||g||^2 when g is orthogonal to w."""
    model = _exact_bn_mlp()
    x, y = _batch()
    x = x.double()
    w = model[1].weight.detach()
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), [model[1].weight])
    new = w - 0.5 * g
    assert float(new.norm() ** 2) == pytest.approx(float(w.norm() ** 2 + 0.25 * g.norm() ** 2), rel=1e-10)
    assert ics.angular_update(w, new) == pytest.approx(math.atan(0.5 * float(g.norm() / w.norm())), rel=1e-8)


def test_effective_lr_and_angle_helpers():
    assert ics.effective_lr(0.1, 2.0) == pytest.approx(0.025)
    assert ics.angular_update(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])) == pytest.approx(math.pi / 2)
    assert ics.weight_norm(nn.Linear(3, 4)) > 0
    with pytest.raises(ValueError, match="weight_norm_value"):
        ics.effective_lr(0.1, 0.0)
    with pytest.raises(ValueError, match="shapes"):
        ics.angular_update(torch.ones(2), torch.ones(3))


# ---------------------------------------------------------------------------------------------------- callback


def test_microscope_records_and_does_not_change_training():
    from bnlib.lab import train as ex

    x, y = _batch(n=120, seed=3)

    def run(with_scope):
        model = ics.add_noise(_mlp(seed=1), seed=5)
        scope = ics.Microscope(lr=0.2, probe_x=x[:40], act_every=2, ics_every=3, landscape_every=5,
                               norm_every=1, step_sizes=[0.1, 0.2], distances=[0.01, 0.02])
        if with_scope:
            scope.start(model)
        hist = ex.train(model, x, y, steps=10, batch_size=20, lr=0.2, callback=scope if with_scope else None)
        return hist, scope.record, model

    h1, rec, m1 = run(True)
    h2, _, m2 = run(False)
    assert h1.train_loss == h2.train_loss          # measuring changed nothing about the run
    assert _same_state(_state(m1), _state(m2))
    assert rec.act_steps == [0, 2, 4, 6, 8, 10] and rec.stacked("layer1").shape == (6, 40, 16)
    assert rec.drift("layer2").shape == (5, 12)
    assert rec.ics_steps == [3, 6, 9] and rec.ics_l2[0].shape == (3,)
    assert rec.land_steps == [5, 10] and len(rec.norm_steps) == 11
    assert len(rec.matched) == 2 and np.allclose(rec.matched[0].distance, [0.01, 0.02])
    assert rec.angles[0].tolist() == [0, 0, 0] and np.all(np.array(rec.angles[1:]) > 0)
    assert np.all(np.isnan(rec.grad_norms[0])) and np.all(np.array(rec.grad_norms[1:]) > 0)


def test_deep_linear():
    net = ics.deep_linear(20, depth=4, width=8, out_features=3, norm="bn")
    assert len(ics.weight_layers(net)) == 5
    assert sum(isinstance(m, bt.BatchNorm1d) for m in net) == 4
    plain = ics.deep_linear(200, depth=6, width=200, out_features=200)
    x = torch.randn(500, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ratio = float(plain(x).var() / x.var())
    assert 0.3 < ratio < 3   # variance-preserving init: no exponential decay over 7 layers
    with pytest.raises(ValueError, match="norm"):
        ics.deep_linear(norm="ln")


def test_microscope_validates():
    with pytest.raises(ValueError, match="probe_x"):
        ics.Microscope(lr=0.1, act_every=5)
    with pytest.raises(ValueError, match="ics_every"):
        ics.Microscope(lr=0.1, ics_every=-1)
    with pytest.raises(ValueError, match="distances"):
        ics.Microscope(lr=0.1, landscape_every=5, distances=[0.1, -0.1])


def test_rolling_median():
    assert ics.rolling_median([1, 100, 3, 4, 5], 3).tolist() == [50.5, 3, 4, 4, 4.5]
    assert ics.rolling_median(np.ones((4, 2)), 5).shape == (4, 2)
    with pytest.raises(ValueError, match="window"):
        ics.rolling_median([1, 2], 0)


def test_steps_to_sustained_accuracy_ignores_a_lucky_evaluation():
    from bnlib.lab.train import History, steps_to_accuracy

    h = History(eval_steps=list(range(0, 101, 10)),
                eval_acc=[0.1, 0.5, 0.95, 0.6, 0.8, 0.9, 0.92, 0.91, 0.93, 0.95, 0.96])
    assert steps_to_accuracy(h, 0.9) == 20                      # one lucky evaluation
    # windows of 30 steps: (s-30, s] holds the evaluations at s-20, s-10 and s
    assert ics.steps_to_sustained_accuracy(h, 0.9, window=30) == 70   # mean(0.9, 0.92, 0.91) = 0.91
    assert ics.steps_to_sustained_accuracy(h, 0.9, window=1) == 20    # a window of one evaluation: the plain rule
    assert ics.steps_to_sustained_accuracy(h, 0.99, window=30) is None
    assert ics.steps_to_sustained_accuracy(History(), 0.9) is None
    with pytest.raises(ValueError, match="target"):
        ics.steps_to_sustained_accuracy(h, 1.5)
    with pytest.raises(ValueError, match="window"):
        ics.steps_to_sustained_accuracy(h, 0.9, window=0)
    with pytest.raises(ValueError, match="history"):
        ics.steps_to_sustained_accuracy(object(), 0.9)
