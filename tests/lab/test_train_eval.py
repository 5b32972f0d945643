"""Tests of bnlib.lab.train_eval: framework conventions, train/eval helpers, precise BN, example weighing, samplers."""
import numpy as np
import pytest
import torch
from torch import nn

import bnlib.torch as bt
from bnlib.lab import train_eval as P


def _mlp(norm="bn", seed=0, **kw):
    torch.manual_seed(seed)
    layer = {"bn": lambda: bt.BatchNorm1d(8, **kw), "brn": lambda: bt.BatchRenorm1d(8, **kw),
             "torch": lambda: nn.BatchNorm1d(8, **kw)}[norm]
    return nn.Sequential(nn.Linear(5, 8), layer(), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


# --- conventions ------------------------------------------------------------------------------------------
def test_momentum_conversions():
    assert P.to_torch_momentum(0.99) == pytest.approx(0.01)
    assert P.to_keras_momentum(0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="keras_momentum"):
        P.to_torch_momentum(1.5)
    with pytest.raises(TypeError, match="torch_momentum"):
        P.to_keras_momentum("0.1")


def test_pytorch_convention_matches_torch_nn():
    gen = torch.Generator().manual_seed(0)
    ref = nn.BatchNorm1d(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    for _ in range(5):
        x = torch.randn(7, 4, generator=gen) * 3 + 1
        ref(x)
        rm, rv = P.ema_update(rm, rv, x, convention="pytorch")
    torch.testing.assert_close(rm, ref.running_mean)
    torch.testing.assert_close(rv, ref.running_var)


def test_keras_convention_equals_pytorch_with_complementary_momentum_except_bessel():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 3, 2, generator=gen) for _ in range(4)]
    mt, vt = P.running_stats_trajectory(xs, convention="pytorch", momentum=1.0)
    mk, vk = P.running_stats_trajectory(xs, convention="keras", momentum=0.0)
    np.testing.assert_allclose(mt, mk, atol=1e-12)
    n = 5 * 2
    np.testing.assert_allclose(vt[1:], vk[1:] * n / (n - 1), rtol=1e-12)
    # general momentum: identical means, variance scaled by the Bessel factor after the initial 1.0 fades
    mt, _ = P.running_stats_trajectory(xs, convention="pytorch", momentum=0.3)
    mk, _ = P.running_stats_trajectory(xs, convention="keras", momentum=0.7)
    np.testing.assert_allclose(mt, mk, atol=1e-12)


def test_ema_update_rejects_bad_input():
    with pytest.raises(ValueError, match="convention"):
        P.ema_update(torch.zeros(2), torch.ones(2), torch.randn(3, 2), convention="jax")
    with pytest.raises(ValueError, match="more than 1 value"):
        P.ema_update(torch.zeros(2), torch.ones(2), torch.randn(1, 2))
    with pytest.raises(ValueError, match="running_mean"):
        P.ema_update(torch.zeros(3), torch.ones(3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="batches"):
        P.running_stats_trajectory([])


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_ema_lag_and_half_life(alpha):
    k = P.ema_lag(alpha, 0.9)
    assert 1 - (1 - alpha) ** k >= 0.9 > 1 - (1 - alpha) ** (k - 1)
    h = P.ema_half_life(alpha)
    assert (1 - alpha) ** h == pytest.approx(0.5)


def test_ema_noise_ratio_matches_simulation():
    rng = np.random.default_rng(0)
    alpha, r = 0.1, 0.0
    values = []
    for t, b in enumerate(rng.standard_normal(40000)):
        r = (1 - alpha) * r + alpha * b
        if t > 200:
            values.append(r)
    assert np.std(values) == pytest.approx(P.ema_noise_ratio(alpha), rel=0.05)


def test_ema_update_is_the_library_convention():
    """ema_update runs bnlib.torch's batch norm (one implementation of both conventions) on copies."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    rm0, rv0 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm, rv = P.ema_update(rm0, rv0, x, convention="keras", momentum=0.9)
    torch.testing.assert_close(rm, 0.1 * x.mean(0))
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.var(0, unbiased=False))
    rm, rv = P.ema_update(rm0, rv0, x, convention="pytorch", momentum=0.1)
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.var(0, unbiased=True))
    assert torch.equal(rm0, torch.zeros(3, dtype=torch.float64))  # the inputs are not changed
    with pytest.raises(ValueError, match="convention"):
        P.ema_update(rm0, rv0, x, convention="tf")
    layer = bt.BatchNorm1d(3, momentum=0.9, convention="keras").double()
    layer(x)
    with pytest.raises(TypeError, match="convention='keras'"):
        P.recalibrate_bn(torch.nn.Sequential(layer), x, batch_size=3)


# --- predict / flip rate ----------------------------------------------------------------------------------
def test_predict_train_mode_restores_state_and_order():
    model = _mlp()
    model[3].p = 0.0  # dropout would also make train-mode predictions random
    x = torch.randn(40, 5)
    model(x)  # some running statistics
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perm = torch.randperm(40)
    p1 = P.predict(model, x, batch_size=10, train_mode=True, order=perm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training
    # order only changes the batching: with one batch it does not matter
    torch.testing.assert_close(P.predict(model, x, batch_size=40, train_mode=True, order=perm),
                               P.predict(model, x, batch_size=40, train_mode=True))
    # eval predictions do not depend on the batching
    assert torch.equal(P.predict(model, x, batch_size=3), P.predict(model, x, batch_size=40))
    assert p1.shape == (40,)
    # without keep_running_stats the side effect shows
    P.predict(model, x, batch_size=10, train_mode=True, keep_running_stats=False)
    assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])


def test_predict_bad_input():
    model = _mlp()
    with pytest.raises(ValueError, match="order"):
        P.predict(model, torch.randn(4, 5), order=torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="batch_size"):
        P.predict(model, torch.randn(4, 5), batch_size=0)
    with pytest.raises(ValueError, match="y"):
        P.accuracy(model, torch.randn(4, 5), torch.zeros(3, dtype=torch.long))


def test_prediction_flip_rate_zero_without_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    assert P.prediction_flip_rate(model, torch.randn(30, 5), batch_size=4) == 0.0
    with pytest.raises(ValueError, match="repeats"):
        P.prediction_flip_rate(model, torch.randn(30, 5), batch_size=4, repeats=1)


# --- recalibration -------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["bn", "torch", "brn"])
def test_recalibrate_bn_gives_exact_average(norm):
    model = _mlp(norm)
    x = torch.randn(64, 5) * 2 + 1
    model.train()
    model(torch.randn(16, 5))  # stale statistics
    model.eval()
    P.recalibrate_bn(model, x, batch_size=16)
    bn = model[1]
    h = model[0](x).detach()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    batches = [h[perm[i * 16:(i + 1) * 16]] for i in range(4)]
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    assert bn.momentum == 0.1 and not model.training and not bn.training


def test_recalibrate_bn_keeps_dropout_in_eval_and_accepts_loaders():
    model = _mlp()
    model.train()
    x = torch.randn(32, 5)
    loader = [(x[:16], None), (x[16:], None)]
    P.recalibrate_bn(model, loader)
    assert model.training and model[3].training  # modes restored
    h = model[0](x).detach()
    torch.testing.assert_close(model[1].running_mean, (h[:16].mean(0) + h[16:].mean(0)) / 2)
    # num_batches caps an iterable
    P.recalibrate_bn(model, loader, num_batches=1)
    torch.testing.assert_close(model[1].running_mean, h[:16].mean(0))


def test_recalibrate_bn_bad_input_leaves_state():
    model = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batch_size"):
        P.recalibrate_bn(model, torch.randn(4, 5), batch_size=8)
    with pytest.raises(ValueError, match="num_batches"):
        P.recalibrate_bn(model, torch.randn(4, 5), batch_size=2, num_batches=0)
    with pytest.raises(TypeError, match="data"):
        P.recalibrate_bn(model, 3)
    with pytest.raises(ValueError, match="no batch norm"):
        P.recalibrate_bn(nn.Linear(5, 3), torch.randn(4, 5), batch_size=2)
    with pytest.raises(RuntimeError):  # the model fails mid-way: statistics restored
        P.recalibrate_bn(model, [torch.randn(4, 5), torch.randn(4, 7)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# --- example weighing ----------------------------------------------------------------------------------
def test_example_weighing_alpha_zero_is_plain_inference_and_hooks_removed():
    model = _mlp()
    model(torch.randn(32, 5))
    model.eval()
    x = torch.randn(10, 5)
    ref = model(x)
    with P.inference_example_weighing(model, 0.0):
        torch.testing.assert_close(model(x), ref)
    with P.inference_example_weighing(model, 0.5):
        assert not torch.allclose(model(x), ref)
    torch.testing.assert_close(model(x), ref)  # hook removed


def test_example_weighing_is_batch_of_example_plus_population():
    """alpha = 1/B equals normalizing with a batch that holds the example once and a population sample
    B-1 times, when the population is a two-point distribution with the running mean/variance."""
    gen = torch.Generator().manual_seed(3)
    bn = bt.BatchNorm2d(2, eps=1e-5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.3]))
        bn.weight.copy_(torch.tensor([1.5, 0.7]))
        bn.bias.copy_(torch.tensor([0.1, 0.2]))
    bn.eval()
    x = torch.randn(3, 2, 4, 4, generator=gen)
    alpha = 0.25
    with P.inference_example_weighing(bn, alpha):
        y = bn(x)
    for i in range(3):
        xi = x[i]
        mu_i, var_i = xi.mean((1, 2)), xi.var((1, 2), unbiased=False)
        mu = alpha * mu_i + (1 - alpha) * bn.running_mean
        second = alpha * (var_i + mu_i ** 2) + (1 - alpha) * (bn.running_var + bn.running_mean ** 2)
        var = second - mu ** 2
        exp = (xi - mu[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * bn.weight[:, None, None] \
            + bn.bias[:, None, None]
        torch.testing.assert_close(y[i], exp, atol=1e-5, rtol=1e-5)


def test_example_weighing_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        with P.inference_example_weighing(_mlp(), 1.5):
            pass
    with pytest.raises(ValueError, match="no batch norm"):
        with P.inference_example_weighing(nn.Linear(2, 2), 0.1):
            pass


# --- samplers and training -----------------------------------------------------------------------------
def test_class_sorted_batches():
    y = torch.arange(10).repeat_interleave(20)
    batches = P.class_sorted_batches(y, 12, num_batches=30, classes_per_batch=2, seed=0)
    assert len(batches) == 30
    for b in batches:
        labels = y[b]
        assert len(b) == 12 and len(torch.unique(labels)) == 2
        assert sorted(torch.bincount(labels, minlength=10)[torch.unique(labels)].tolist()) == [6, 6]
        assert len(torch.unique(b)) == 12
    again = P.class_sorted_batches(y, 12, num_batches=30, classes_per_batch=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="multiple"):
        P.class_sorted_batches(y, 11, num_batches=3, classes_per_batch=2)
    with pytest.raises(ValueError, match="classes_per_batch"):
        P.class_sorted_batches(y, 12, num_batches=3, classes_per_batch=11)
    with pytest.raises(ValueError, match="fewer"):
        P.class_sorted_batches(y, 30, num_batches=3)


def test_iid_batches_cover_epoch():
    batches = P.iid_batches(20, 5, num_batches=4, seed=0)
    assert sorted(torch.cat(batches).tolist()) == list(range(20))
    with pytest.raises(ValueError, match="n"):
        P.iid_batches(3, 5, num_batches=1)


def test_train_on_batches_with_a_renorm_schedule():
    """The batch renorm layer follows its own warm-up schedule (bnlib.torch.RenormSchedule) step by step while
    train_on_batches runs the callback before each step."""
    torch.manual_seed(0)
    x = torch.randn(60, 5)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(5, 8), bt.BatchRenorm1d(8, schedule=bt.RenormSchedule(2, 6, 6)), nn.ReLU(),
                          nn.Linear(8, 2))
    seen = []

    def cb(step, m):
        seen.append(m[1].current_limits())

    losses = P.train_on_batches(model, x, y, P.iid_batches(60, 20, num_batches=8), lr=0.1, callback=cb)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert seen[0] == (1.0, 0.0) and seen[1] == (1.0, 0.0)
    assert seen[4] == pytest.approx((2.0, 2.5)) and seen[-1] == pytest.approx((3.0, 5.0))


def test_train_on_batches_takes_batches_in_order_and_stops():
    """train_on_batches runs on bnlib.lab.train.run but trains on the given batches, in the given order: the
    same losses as a hand-written loop over them."""
    from bnlib.lab.train import StopTraining

    torch.manual_seed(0)
    x = torch.randn(40, 5)
    y = (x[:, 0] > 0).long()
    batches = [torch.arange(i, i + 10) for i in (30, 0, 20, 10, 5)]

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 8), bt.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    ref = net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    expected = []
    for idx in batches:
        loss = nn.functional.cross_entropy(ref(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(loss.item())
    model = net()
    assert P.train_on_batches(model, x, y, batches, lr=0.1, momentum=0.9) == expected
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k

    def stop_at_3(step, m):
        if step == 3:
            raise StopTraining

    assert len(P.train_on_batches(net(), x, y, batches, lr=0.1, callback=[stop_at_3])) == 2
    assert len(P.train_on_batches(net(), x, y, batches, lr=1e30)) < len(batches)  # diverged: stops
    with pytest.raises(TypeError, match="callback"):
        P.train_on_batches(net(), x, y, batches, lr=0.1, callback=3)
    with pytest.raises(TypeError, match="model"):
        P.train_on_batches(lambda v: v, x, y, batches, lr=0.1)
    with pytest.raises(ValueError, match="batches"):
        P.train_on_batches(net(), x, y, [], lr=0.1)
    with pytest.raises(ValueError, match="y: expected 40 labels"):
        P.train_on_batches(net(), x, y[:-1], batches, lr=0.1)


def test_argument_checks_share_exception_types_and_message_shape():
    """Bad types raise TypeError, bad values ValueError; messages name the argument (bnlib._checks' rules)."""
    with pytest.raises(ValueError, match=r"momentum: .*\[0, 1\], got 1.5"):
        P.ema_update(torch.zeros(2), torch.ones(2), torch.randn(3, 2), momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        P.set_bn_momentum(_mlp(), -0.1)
    with pytest.raises(TypeError, match="batch_size"):
        P.predict(_mlp(), torch.randn(4, 5), batch_size=2.0)
    with pytest.raises(ValueError, match=r"fraction: expected a real number in \(0, 1\), got 1.0"):
        P.ema_lag(0.1, 1.0)
    with pytest.raises(TypeError, match="repeats: expected an int >= 2, got float"):
        P.prediction_flip_rate(_mlp(), torch.randn(8, 5), batch_size=4, repeats=2.0)
    with pytest.raises(ValueError, match=r"classes_per_batch: expected an int in \[1, 10\], got 11"):
        P.class_sorted_batches(torch.arange(10).repeat(3), 11, num_batches=1, classes_per_batch=11)
    with pytest.raises(ValueError, match="r_max"):
        bt.BatchRenorm1d(4, r_max=0.5, schedule=bt.RenormSchedule(0, 1, 1))


def test_judge_conditions():
    from bnlib.lab.train_eval import judge_conditions

    both = judge_conditions("c", {"a": [3.0, 3.2, 3.1], "b": [2.0, 2.5, 2.2]}, margin=1.0)
    assert both.verdict == "confirmed" and both.effects == (2.0, 2.5, 2.2) and not both.partial
    part = judge_conditions("c", {"a": [0.1, -0.2, 0.0], "b": [2.0, 2.5, 2.2]}, margin=1.0)
    assert part.verdict == "qualified" and part.partial == "b" and part.effects == (2.0, 2.5, 2.2)
    none = judge_conditions("c", {"a": [0.1, -0.2, 0.0], "b": [2.0, -2.5, 2.2]}, margin=1.0)
    assert none.verdict == "not supported" and none.effects == (0.1, -2.5, 0.0)
    with pytest.raises(ValueError, match="effects"):
        judge_conditions("c", {"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0]}, margin=0.0)
    with pytest.raises(ValueError, match="effects"):
        judge_conditions("c", {}, margin=0.0)
