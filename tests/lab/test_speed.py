"""Tests for bnlib.lab.speed, the experiment runners of chapter 4 (tiny synthetic data, a few seconds in all)."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import bnlib.torch as bt
from bnlib.lab import speed as S
from bnlib.lab.packed import PackedNet, train_packed
from bnlib.lab.train import History, evaluate, train


def _digits(n=300, seed=0):
    """A toy 'MNIST': 28x28 images of 10 classes, each class a fixed random pattern plus noise."""
    patterns = torch.rand(10, 28, 28, generator=torch.Generator().manual_seed(1234))  # shared by all splits
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = (patterns[y] + 0.3 * torch.randn(n, 28, 28, generator=gen)).clamp(0, 1)
    return x.reshape(n, -1), y


@pytest.fixture(scope="module")
def data():
    xtr, ytr = _digits(300, 0)
    xte, yte = _digits(100, 1)
    return xtr, ytr, xte, yte


# ---- models and initialization ------------------------------------------------------------------------

def test_init_linear_gaussian_he_glorot():
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 200))
    S.init_linear_(model, 0.05, seed=1)
    w = model[0].weight
    assert abs(w.std().item() - 0.05) < 0.002 and model[0].bias.abs().max().item() == 0
    S.init_linear_(model, "he")
    assert abs(model[2].weight.std().item() - math.sqrt(2 / 300)) < 0.003
    S.init_linear_(model, "glorot")
    a = math.sqrt(6 / (400 + 300))
    assert model[0].weight.abs().max().item() <= a and model[0].weight.abs().max().item() > 0.95 * a
    before = model[0].weight.clone()
    S.init_linear_(model, "default")
    assert torch.equal(before, model[0].weight)
    for bad in (0, -1.0, float("nan"), True, "xavier", None):
        with pytest.raises(ValueError, match="init"):
            S.init_linear_(model, bad)


def test_models_use_bnlib_batchnorm_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    m1 = S.sigmoid_mlp("bn", seed=4)
    after = torch.rand(1)
    assert torch.equal(expected, after)  # building a model does not consume the global RNG
    m2 = S.sigmoid_mlp("bn", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert sum(isinstance(m, bt.BatchNorm1d) for m in m1.modules()) == 3
    art = S.article_model(True)
    bns = [m for m in art.modules() if isinstance(m, bt.BatchNorm1d)]
    assert len(bns) == 1 and bns[0].momentum == 0.01 and bns[0].eps == 1e-3
    # the article's order: Linear -> ReLU -> BN -> Linear
    assert [type(m).__name__ for m in art][1:] == ["Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert not any(isinstance(m, bt.BatchNorm1d) for m in S.article_model(False).modules())


@pytest.mark.parametrize("norm,residual", [("none", False), ("bn", False), ("bn", True), ("none", True)])
def test_deep_mlp_shapes_and_depth(norm, residual):
    model = S.deep_mlp(7, width=16, norm=norm, residual=residual)
    out = model(torch.rand(5, 28, 28))
    assert out.shape == (5, 10)
    assert len(S._linears(model)) == 8  # 7 hidden layers + the classifier
    n_bn = sum(isinstance(m, bt.BatchNorm1d) for m in model.modules())
    assert n_bn == (7 if norm == "bn" else 0)
    with pytest.raises(ValueError, match="depth"):
        S.deep_mlp(0)


def test_residual_block_is_identity_plus_branch():
    block = S.ResidualBlock(8, "none")
    with torch.no_grad():
        block.linear.weight.zero_()
        block.linear.bias.zero_()
    h = torch.randn(4, 8)
    assert torch.equal(block(h), h)


# ---- section 1 ----------------------------------------------------------------------------------------

def test_validation_split_is_keras_last_fraction():
    x, y = torch.arange(10).float(), torch.arange(10)
    xf, yf, xv, yv = S.validation_split(x, y, 0.2)
    assert xf.tolist() == list(range(8)) and yv.tolist() == [8, 9]
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            S.validation_split(x, y, bad)


def test_run_article_experiment_per_epoch_and_deterministic(data):
    xtr, ytr, _, _ = data
    r1 = S.run_article_experiment(xtr, ytr, use_bn=True, epochs=3, batch_size=30)
    r2 = S.run_article_experiment(xtr, ytr, use_bn=True, epochs=3, batch_size=30)
    assert len(r1.loss) == len(r1.val_loss) == len(r1.val_accuracy) == 3
    assert r1.loss == r2.loss and r1.val_loss == r2.val_loss
    assert len(r1.history.train_loss) == 3 * (240 // 30)
    assert np.isclose(r1.loss[0], np.mean(r1.history.train_loss[:8]))
    assert r1.loss[-1] < r1.loss[0] and r1.val_accuracy[-1] > 0.5  # it learns
    with pytest.raises(ValueError, match="epochs"):
        S.run_article_experiment(xtr, ytr, use_bn=False, epochs=0)


# ---- section 2 ----------------------------------------------------------------------------------------

def test_sigmoid_input_probe_percentiles_and_no_side_effects(data):
    xtr, ytr, xte, _ = data
    model = S.sigmoid_mlp("bn", seed=0)
    probe = S.SigmoidInputProbe(xte, unit=3, every=10)
    probe.record(0, model)
    # reference: the input to the last sigmoid (everything before it), computed in training mode on a copy
    ref = copy.deepcopy(nn.Sequential(*list(model)[:-2])).train()
    with torch.no_grad():
        z = ref(xte)[:, 3]
    assert np.allclose(probe.as_array()[0], torch.quantile(z, torch.tensor([0.15, 0.5, 0.85])).numpy(), atol=1e-6)
    bn_last = [m for m in model.modules() if isinstance(m, bt.BatchNorm1d)][-1]
    assert torch.equal(bn_last.running_mean, torch.zeros(100))  # the model's running stats untouched

    train(model, xtr, ytr, steps=20, batch_size=30, lr=0.1, callback=probe)
    assert probe.steps == [0, 10, 20] and probe.as_array().shape == (3, 3)
    assert np.all(np.diff(probe.as_array(), axis=1) >= 0)  # 15th <= 50th <= 85th
    with pytest.raises(ValueError, match="Sigmoid"):
        S.SigmoidInputProbe(xte).record(0, nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))


# ---- section 3 ----------------------------------------------------------------------------------------

def test_steps_to_target_stops_at_target_and_is_deterministic(data):
    xtr, ytr, xte, yte = data
    runs = [S.steps_to_target(S.sigmoid_mlp("bn", seed=1), xtr, ytr, xte, yte, target=0.8, max_steps=400, lr=0.5,
                              batch_size=30, eval_every=10, seed=1) for _ in range(2)]
    a, b = runs
    assert a.reached and a.steps == b.steps and a.eval_acc == b.eval_acc
    assert a.eval_steps[-1] == a.steps and a.eval_acc[-1] >= 0.8 and max(a.eval_acc[:-1]) < 0.8
    never = S.steps_to_target(S.sigmoid_mlp("none", seed=1), xtr, ytr, xte, yte, target=1.0, max_steps=30,
                              lr=1e-4, batch_size=30, eval_every=10)
    assert never.steps is None and not never.reached and never.eval_steps == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="target"):
        S.steps_to_target(S.sigmoid_mlp(), xtr, ytr, xte, yte, target=1.5, max_steps=10, lr=0.1)


def _fake(norm, lr, seed, steps):
    return {"norm": norm, "lr": lr, "seed": seed, "result": S.TargetRun(steps)}


def test_speedups_best_and_equal_rates():
    recs = []
    table = {("none", 0.1): [None, None, 900], ("none", 1.0): [800, 600, 700], ("bn", 0.1): [200, 300, 250],
             ("bn", 1.0): [100, 100, 150]}
    for (norm, lr), vals in table.items():
        recs += [_fake(norm, lr, s, v) for s, v in enumerate(vals)]
    out = S.speedups(recs)
    assert out["best_lr"] == {"none": 1.0, "bn": 1.0}
    assert out["best_steps"] == {"none": 700.0, "bn": 100.0}
    assert out["speedup_at_best"] == 7.0
    assert math.isinf(out["speedup_at_equal_lr"][0.1]) and out["speedup_at_equal_lr"][1.0] == 7.0
    with pytest.raises(ValueError, match="records"):
        S._median_steps(recs, "bn", 5.0)


def test_lr_sweep_records(data):
    xtr, ytr, xte, yte = data
    recs = S.lr_sweep(xtr, ytr, xte, yte, lrs=[0.5], seeds=[0, 1], target=0.5, max_steps=100, batch_size=30,
                      eval_every=20, progress=False)
    assert [(r["norm"], r["seed"]) for r in recs] == [("none", 0), ("none", 1), ("bn", 0), ("bn", 1)]
    assert all(isinstance(r["result"], S.TargetRun) for r in recs)
    assert all(r["result"].reached for r in recs if r["norm"] == "bn")


# ---- section 4 ----------------------------------------------------------------------------------------

def test_init_scale_sweep_bn_is_insensitive_to_scale(data):
    xtr, ytr, xte, yte = data
    recs = S.init_scale_sweep(xtr, ytr, xte, yte, scales=[0.01, 1.0], steps=60, lr=0.5, batch_size=30,
                              progress=False)
    acc = {(r["norm"], r["scale"]): r["result"].final_acc for r in recs}
    assert all(isinstance(r["result"], History) for r in recs)
    assert acc[("bn", 0.01)] > 0.8 and acc[("bn", 1.0)] > 0.8
    assert acc[("none", 0.01)] < 0.5  # vanishing signal without BN


# ---- section 5 ----------------------------------------------------------------------------------------

def test_generalization_gap_matches_evaluate(data):
    xtr, ytr, xte, yte = data
    model = S.sigmoid_mlp("bn")
    gap = S.generalization_gap(model, xtr, ytr, xte, yte)
    assert gap["train_acc"] == evaluate(model, xtr, ytr)[1]
    assert np.isclose(gap["acc_gap"], gap["train_acc"] - gap["test_acc"])
    assert np.isclose(gap["loss_gap"], gap["test_loss"] - gap["train_loss"])


def test_bn_output_noise_shrinks_with_batch_size_and_is_pure(data):
    xtr, _, xte, _ = data
    model = S.sigmoid_mlp("bn", dropout=0.5, seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small = S.bn_output_noise(model, xte[0], xtr, batch_size=4, n_batches=50)
    large = S.bn_output_noise(model, xte[0], xtr, batch_size=128, n_batches=50)
    assert small.shape == (50, 10)
    assert small.std(0).mean() > 2 * large.std(0).mean()
    assert torch.equal(small, S.bn_output_noise(model, xte[0], xtr, batch_size=4, n_batches=50))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # running stats untouched
    # without BN (and with dropout off) the output does not depend on the batch at all
    plain = S.bn_output_noise(S.sigmoid_mlp("none", dropout=0.5), xte[0], xtr, batch_size=4, n_batches=5)
    assert torch.allclose(plain, plain[:1].expand_as(plain), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        S.bn_output_noise(model, xte[0], xtr, batch_size=1)


# ---- section 6 ----------------------------------------------------------------------------------------

def test_gradient_norms_one_per_linear_and_bn_explodes_at_init(data):
    xtr, ytr, _, _ = data
    x, y = xtr[:60], ytr[:60]
    g_bn = S.gradient_norms(S.deep_mlp(30, width=32, norm="bn"), x, y)
    g_res = S.gradient_norms(S.deep_mlp(30, width=32, norm="bn", residual=True), x, y)
    assert g_bn.shape == (31,) and g_res.shape == (31,)
    # Yang et al. 2019: in a plain BN network the gradient grows geometrically towards the input
    assert g_bn[0] / g_bn[-2] > 10
    assert g_res[0] / g_res[-2] < g_bn[0] / g_bn[-2]
    model = S.deep_mlp(3, width=8)
    model.eval()
    S.gradient_norms(model, x, y)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_depth_sweep_records(data):
    xtr, ytr, xte, yte = data
    recs = S.depth_sweep(xtr, ytr, xte, yte, depths=[2], arms=["plain", "residual + BN"], steps=20, width=16,
                         batch_size=30, progress=False)
    assert [(r["arm"], r["depth"]) for r in recs] == [("plain", 2), ("residual + BN", 2)]
    assert all(len(r["result"].eval_acc) == 2 for r in recs)
    with pytest.raises(ValueError, match="arms"):
        S.depth_sweep(xtr, ytr, xte, yte, depths=[2], arms=["bogus"])


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_residual_packed_net_matches_separate_networks(data, norm):
    xtr, ytr, xte, yte = data
    models = [S.deep_mlp(4, width=16, norm=norm, residual=True, seed=s) for s in (0, 1, 2)]
    packed, separate = S.ResidualPackedNet(models), PackedNet(models, pack=False)
    assert packed.grouped and not separate.grouped
    for j, model in enumerate(models):  # unpacking returns each network's initial weights
        for (name, a), b in zip(packed.unpack(j).state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name
    kw = dict(seeds=[0, 1, 2], steps=15, batch_size=30, lr=0.01, momentum=0.9, x_eval=xte, y_eval=yte, eval_every=15)
    hp, hs = train_packed(packed, xtr, ytr, **kw), train_packed(separate, xtr, ytr, **kw)
    for a, b in zip(hp, hs):  # the same runs, up to float rounding
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4, atol=1e-5)
    for j in range(3):
        for (name, a), b in zip(packed.unpack(j).state_dict().items(), separate.unpack(j).state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match="network index"):
        packed.unpack(3)


# ---- section 7 ----------------------------------------------------------------------------------------

def test_explorer_run_deterministic_and_bn_flag(data):
    xtr, ytr, xte, yte = data
    kw = dict(lr=0.5, batch_size=30, depth=2, init_scale=0.05, steps=40, eval_every=20)
    a = S.explorer_run(xtr, ytr, xte, yte, bn=True, **kw)
    b = S.explorer_run(xtr, ytr, xte, yte, bn=True, **kw)
    c = S.explorer_run(xtr, ytr, xte, yte, bn=False, **kw)
    assert a.eval_steps == [0, 20, 40] and a.eval_acc == b.eval_acc and a.train_loss == b.train_loss
    assert a.train_loss != c.train_loss
    with pytest.raises(ValueError, match="depth"):
        S.explorer_run(xtr, ytr, xte, yte, bn=True, lr=0.1, depth=0)


def test_explorer_widget_builds_and_runs(data):
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    xtr, ytr, xte, yte = data
    panel = S.explorer_widget(xtr, ytr, xte, yte, steps=10, run_now=False)
    controls = panel.children[0]
    button = controls.children[1].children[2]
    assert button.description == "Run"
    button.click()  # runs one experiment into the Output widget
    button.click()


# ---- packed training --------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,optimizer", [("none", "sgd"), ("bn", "sgd"), ("bn", "adam")])
def test_packed_training_equals_separate_runs(data, norm, optimizer):
    """Chapter 4's networks (the Figure 1 sigmoid MLP with SGD, the article's network with Adam) packed by
    bnlib.lab.packed train as separately (tests/lab/test_packed.py tests the packing itself)."""
    xtr, ytr, xte, yte = data
    seeds = [0, 3]
    lr = 0.5 if optimizer == "sgd" else 1e-3
    make = (lambda s: S.sigmoid_mlp(norm, seed=s)) if optimizer == "sgd" else (lambda s: S.article_model(True, seed=s))
    packed = PackedNet([make(s) for s in seeds])
    for j, s in enumerate(seeds):  # unpacking before training gives back the original networks
        assert all(torch.equal(a, b)
                   for a, b in zip(packed.unpack(j).state_dict().values(), make(s).state_dict().values()))
    hists = train_packed(packed, xtr, ytr, seeds=seeds, steps=25, batch_size=30, lr=lr, optimizer=optimizer,
                         x_eval=xte, y_eval=yte, eval_every=10)
    for j, s in enumerate(seeds):
        model = make(s)
        ref = train(model, xtr, ytr, steps=25, batch_size=30, lr=lr, optimizer=optimizer, x_eval=xte, y_eval=yte,
                    eval_every=10, seed=s)
        assert hists[j].eval_steps == ref.eval_steps == [0, 10, 20, 25]
        assert np.allclose(hists[j].train_loss, ref.train_loss, atol=1e-4)
        assert np.allclose(hists[j].eval_acc, ref.eval_acc, atol=0.011)  # at most one image flips
        got = packed.unpack(j).state_dict()
        # Adam divides by sqrt(v): a parameter whose gradient is rounding noise can move by up to lr per step
        atol = 1e-4 if optimizer == "sgd" else 25 * lr
        for name, value in model.state_dict().items():
            assert torch.allclose(got[name].float(), value.float(), atol=atol), name


def test_lr_sweep_packed_equals_unpacked(data):
    xtr, ytr, xte, yte = data
    kw = dict(lrs=[0.5], norms=["bn"], seeds=[0, 1], target=0.6, max_steps=200, batch_size=30, eval_every=10,
              progress=False)
    packed = S.lr_sweep(xtr, ytr, xte, yte, pack=True, **kw)
    single = S.lr_sweep(xtr, ytr, xte, yte, pack=False, **kw)
    assert [r["result"].steps for r in packed] == [r["result"].steps for r in single]
    assert all(r["result"].reached for r in packed)


def test_regularization_sweep_records(data):
    xtr, ytr, xte, yte = data
    recs = S.regularization_sweep(xtr, ytr, xte, yte, configs={"BN": (True, 0.0), "dropout": (False, 0.5)},
                                  seeds=[0, 1], steps=30, progress=False)
    assert [(r["config"], r["seed"]) for r in recs] == [("BN", 0), ("BN", 1), ("dropout", 0), ("dropout", 1)]
    assert all(set(r["result"]) >= {"acc_gap", "loss_gap"} for r in recs)
    with pytest.raises(ValueError, match="configs"):
        S.regularization_sweep(xtr, ytr, xte, yte, configs={"x": True})


def test_packed_callback_and_probe_of_one_network(data):
    xtr, ytr, xte, _ = data
    seeds = [2, 5]
    packed = PackedNet([S.sigmoid_mlp("bn", seed=s) for s in seeds])
    probe = S.SigmoidInputProbe(xte, unit=1, every=10, network=1)
    probe.record(0, packed)
    calls = []

    def callback(step, model, xb, yb):
        calls.append((step, tuple(xb.shape), tuple(yb.shape)))
        probe(step, model, xb, yb)

    train_packed(packed, xtr, ytr, seeds=seeds, steps=20, batch_size=30, lr=0.5, callback=callback)
    assert calls[0] == (1, (30, 2, 784), (30, 2)) and [c[0] for c in calls] == list(range(1, 21))
    # the same network trained alone, probed at the same steps
    alone = S.SigmoidInputProbe(xte, unit=1, every=10)
    model = S.sigmoid_mlp("bn", seed=5)
    alone.record(0, model)
    train(model, xtr, ytr, steps=20, batch_size=30, lr=0.5, seed=5, callback=alone)
    assert probe.steps == alone.steps == [0, 10, 20]
    assert np.allclose(probe.as_array(), alone.as_array(), atol=1e-4)
    with pytest.raises(ValueError, match="network"):
        S.SigmoidInputProbe(xte, network=-1)
    with pytest.raises(TypeError, match="callback"):
        train_packed(packed, xtr, ytr, seeds=seeds, steps=2, batch_size=30, lr=0.5, callback="probe")


def test_run_article_experiments_equal_single_runs(data):
    xtr, ytr, _, _ = data
    runs = S.run_article_experiments(xtr, ytr, use_bn=True, seeds=[0, 4], epochs=2, batch_size=30)
    assert len(runs) == 2
    for s, r in zip([0, 4], runs):
        ref = S.run_article_experiment(xtr, ytr, use_bn=True, epochs=2, batch_size=30, seed=s)
        assert len(r.loss) == len(r.val_loss) == len(r.val_accuracy) == 2
        assert np.allclose(r.loss, ref.loss, atol=1e-4) and np.allclose(r.val_loss, ref.val_loss, atol=1e-3)
    with pytest.raises(ValueError, match="seeds"):
        S.run_article_experiments(xtr, ytr, use_bn=False, seeds=[])
    with pytest.raises(ValueError, match="epochs"):
        S.run_article_experiments(xtr, ytr, use_bn=False, epochs=0)


def test_explorer_grid_equals_explorer_runs(data):
    xtr, ytr, xte, yte = data
    kw = dict(batch_size=30, steps=20, eval_every=10)
    recs = S.explorer_grid(xtr, ytr, xte, yte, depths=[1, 2], lrs=[0.1, 1.0], seeds=[0, 1], progress=False, **kw)
    assert [(r["depth"], r["lr"], r["bn"], r["seed"]) for r in recs][:4] == [
        (1, 0.1, False, 0), (1, 0.1, False, 1), (1, 0.1, True, 0), (1, 0.1, True, 1)]
    assert len(recs) == 2 * 2 * 2 * 2
    for r in recs[::5]:
        ref = S.explorer_run(xtr, ytr, xte, yte, bn=r["bn"], lr=r["lr"], depth=r["depth"], seed=r["seed"], **kw)
        assert r["result"].eval_steps == ref.eval_steps == [0, 10, 20]
        assert np.allclose(r["result"].train_loss, ref.train_loss, atol=1e-4)
    with pytest.raises(ValueError, match="depths"):
        S.explorer_grid(xtr, ytr, xte, yte, depths=[0], lrs=[0.1], progress=False)


def test_lr_sweep_pack_lrs_equals_packing_per_rate(data):
    xtr, ytr, xte, yte = data
    kw = dict(lrs=[0.2, 0.5], seeds=[0, 1], target=0.6, max_steps=60, batch_size=30, eval_every=10,
              progress=False)
    per_rate = S.lr_sweep(xtr, ytr, xte, yte, **kw)
    one_pack = S.lr_sweep(xtr, ytr, xte, yte, pack_lrs=["none", "bn"], **kw)
    assert [(r["norm"], r["lr"], r["seed"]) for r in one_pack] == [(r["norm"], r["lr"], r["seed"]) for r in per_rate]
    assert [r["result"].steps for r in one_pack] == [r["result"].steps for r in per_rate]
    with pytest.raises(ValueError, match="pack_lrs"):
        S.lr_sweep(xtr, ytr, xte, yte, pack_lrs=["ln"], **kw)
    with pytest.raises(ValueError, match="pack_lrs"):
        S.lr_sweep(xtr, ytr, xte, yte, pack=False, pack_lrs=["none"], **kw)


def test_target_run_reads_a_history():
    h = History(train_loss=[1.0] * 250, eval_steps=[0, 50, 100, 150, 200, 250],
                eval_acc=[0.1, 0.5, 0.95, 0.8, 0.99, 0.99])
    run = S.target_run(h, 0.9)
    assert run.steps == 100 and run.eval_steps == [0, 50, 100] and run.eval_acc == [0.1, 0.5, 0.95]
    assert S.target_run(h, 0.97).steps == 200
    assert S.target_run(h, 0.97, max_steps=150).steps is None
    assert S.target_run(h, 0.97, max_steps=150).eval_steps == [0, 50, 100, 150]
    assert S.target_run(h, 0.9, eval_every=100).steps == 100
    assert S.target_run(h, 0.97, eval_every=100).steps == 200
    bad = History(train_loss=[1.0, float("nan")], eval_steps=[0], eval_acc=[0.1], diverged=True)
    assert S.target_run(bad, 0.9).diverged and not S.target_run(h, 0.999).diverged
    with pytest.raises(ValueError, match="target"):
        S.target_run(h, 0.0)


# ---- seeds and censoring (issue 13) --------------------------------------------------------------------

def test_eval_schedule_dense_then_sparse():
    grid = S.eval_schedule(1200)
    assert grid[:3] == [0, 10, 20] and 500 in grid and 510 not in grid and 550 in grid and grid[-1] == 1200
    assert S.eval_schedule(1234)[-1] == 1234 and S.eval_schedule(300) == list(range(0, 301, 10))
    assert S.eval_schedule(600, dense=50) == list(range(0, 601, 50))
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            S.eval_schedule(bad)


def _history(steps, losses, accs, train_steps=None, diverged=False):
    n = steps[-1] if train_steps is None else train_steps
    return History([1.0] * n, list(steps), list(losses), list(accs), diverged)


def test_outcome_of_reached_slow_diverged():
    steps = list(range(0, 1001, 50))
    reached = _history(steps, [2.3] * len(steps), [0.1] * 10 + [0.92] * 11)
    o = S.outcome_of(reached, 0.9, cap=1000)
    assert (o.status, o.steps, o.bound, str(o)) == ("reached", 500, 500, "500")
    slow = _history(steps, [2.3] * len(steps), [0.5] * len(steps))
    o = S.outcome_of(slow, 0.9, cap=1000)
    assert (o.status, o.steps, o.bound, str(o)) == ("slow", None, 1000, ">1,000")
    # censoring: the same run read with a cap before its hit is slow
    assert S.outcome_of(reached, 0.9, cap=450).status == "slow"
    exploding = _history(steps, [2.3] * 4 + [9.0] * 17, [0.1] * len(steps))
    o = S.outcome_of(exploding, 0.9, cap=1000)
    assert (o.status, o.steps, o.at, str(o)) == ("diverged", None, 500, "diverged")
    # an early spike that settles is not divergence (checked from step 2 * window on)
    spike = _history(steps, [9.0] * 5 + [1.0] * 16, [0.1] * len(steps))
    assert S.outcome_of(spike, 0.9, cap=1000).status == "slow"
    nan = _history(steps[:5], [2.3, 2.3, float("nan"), 2.3, 2.3], [0.1] * 5)
    assert S.outcome_of(nan, 0.9).status == "diverged"
    nonfinite_train = _history(steps[:3], [2.3] * 3, [0.1] * 3, train_steps=70, diverged=True)
    assert S.outcome_of(nonfinite_train, 0.9, cap=1000).status == "diverged"
    with pytest.raises(ValueError, match="target"):
        S.outcome_of(slow, 1.5)


def test_outcome_summary_cells():
    def o(status, steps=None, cap=1000):
        return S.Outcome(status, steps if status == "reached" else None, cap, steps)

    assert S.outcome_summary([o("reached", 150), o("reached", 200), o("reached", 170)]) == "170 [150, 200]"
    assert S.outcome_summary([o("slow")] * 3) == "slow: >1,000"
    assert S.outcome_summary([o("diverged", 500)] * 3) == "diverged"
    assert S.outcome_summary([o("reached", 900), o("slow"), o("slow")]) == ">1,000 [900, >1,000]"
    assert S.outcome_summary([o("reached", 900), o("reached", 800), o("slow")]) == "900 [800, >1,000]"
    assert S.outcome_summary([o("reached", 900), o("diverged", 500), o("slow")]) == ">1,000 [900, >1,000], 1 diverged"
    assert S.outcome_summary([o("slow"), o("diverged", 500), o("diverged", 500)]) == "slow: >1,000, 2 diverged"
    with pytest.raises(ValueError, match="outcomes"):
        S.outcome_summary([])


def test_packed_run_evaluates_on_schedule_and_probes_each_network(data):
    xtr, ytr, xte, yte = data
    seeds = [0, 1]
    models = [S.sigmoid_mlp("bn", hidden=(16, 16), seed=s) for s in seeds]
    res = S.packed_run(models, xtr, ytr, xte, yte, seeds=seeds, lr=0.5, steps=40, eval_at=[0, 5, 17, 40],
                       batch_size=20, x_probe=xte[:50], probe_every=20)
    assert [h.eval_steps for h in res.histories] == [[0, 5, 17, 40]] * 2
    assert res.probe_steps == [0, 20, 40] and res.probes.shape == (2, 3, 3)
    assert np.all(np.diff(res.probes, axis=2) >= 0)  # 15th <= 50th <= 85th
    # each network's final evaluation is that of the unpacked network; its probe that of SigmoidInputProbe
    for j in range(2):
        net = res.pack.unpack(j)
        loss, acc = evaluate(net, xte, yte)
        assert abs(acc - res.histories[j].eval_acc[-1]) < 1e-9 and abs(loss - res.histories[j].eval_loss[-1]) < 1e-4
        probe = S.SigmoidInputProbe(xte[:50], unit=0)
        probe.record(40, net)
        np.testing.assert_allclose(probe.percentiles[0], res.probes[j, -1], rtol=1e-4, atol=1e-5)
    # probing leaves the running statistics alone
    before = {k: v.clone() for k, v in res.pack.named_buffers()}
    S._probe_pack(res.pack, xte[:50], 0, torch.tensor([0.5]))
    assert all(torch.equal(before[k], v) for k, v in res.pack.named_buffers())
    # the same as train() per seed, evaluated at the same steps
    single = train(S.sigmoid_mlp("bn", hidden=(16, 16), seed=1), xtr, ytr, steps=40, batch_size=20, lr=0.5,
                   x_eval=xte, y_eval=yte, eval_every=40, seed=1)
    assert abs(single.final_acc - res.histories[1].final_acc) < 0.02


def test_packed_run_stops_when_resolved_with_outcomes(data):
    xtr, ytr, xte, yte = data
    seeds = [0, 1]
    models = [S.sigmoid_mlp("bn", hidden=(16,), seed=s) for s in seeds]
    res = S.packed_run(models, xtr, ytr, xte, yte, seeds=seeds, lr=1.0, steps=300, eval_at=range(0, 301, 10),
                       batch_size=30, target=0.5, stop_when_resolved=True, min_steps=40)
    assert all(o.status == "reached" for o in res.outcomes)
    last = max(o.steps for o in res.outcomes)
    assert res.histories[0].eval_steps[-1] == max(last, 40) < 300  # stopped at the evaluation that resolved all
    assert len(res.histories[0].train_loss) == res.histories[0].eval_steps[-1]


def test_lr_outcomes_records_and_packs(data):
    xtr, ytr, xte, yte = data
    kw = dict(norm="bn", lrs=[0.3, 3.0], seeds=[0, 1], cap=60, target=0.99, eval_at=range(0, 61, 20))
    recs = S.lr_outcomes(xtr, ytr, xte, yte, **kw)
    assert [(r["lr"], r["seed"]) for r in recs] == [(0.3, 0), (0.3, 1), (3.0, 0), (3.0, 1)]
    assert all(isinstance(r["result"], S.Outcome) and r["result"].cap == 60 for r in recs)
    together = S.lr_outcomes(xtr, ytr, xte, yte, packs=[[0.3, 3.0]], **kw)
    for a, b in zip(recs, together):
        assert a["result"].status == b["result"].status
        assert abs(a["history"].final_acc - b["history"].final_acc) < 0.02
    with pytest.raises(ValueError, match="packs"):
        S.lr_outcomes(xtr, ytr, xte, yte, packs=[[0.3]], **kw)


def test_percentile_drift_and_history_until():
    steps = [0, 250, 500, 750, 1000]
    P = np.array([[-1.0, 0.0, 1.0], [-1, 5, 1], [-1, 0.2, 1], [-1, 0.6, 1], [-1, 0.4, 1]])
    assert S.percentile_drift(steps, P) == pytest.approx(0.4 / 2)
    with pytest.raises(ValueError, match="percentiles"):
        S.percentile_drift(steps, P[:, :2])
    with pytest.raises(ValueError, match="steps"):
        S.percentile_drift(steps, P, start=1000)
    h = History([1.0] * 400, [0, 10, 50, 100, 150, 300, 350], [2.0] * 7, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    cut = S.history_until(h, 300, every=50)
    assert cut.eval_steps == [0, 50, 100, 150, 300] and cut.eval_acc == [0.1, 0.3, 0.4, 0.5, 0.6]
    assert len(cut.train_loss) == 300 and cut.final_acc == 0.6 and not cut.diverged


def test_depth_sweep_packs_seeds_and_keeps_residual_separate(data):
    xtr, ytr, xte, yte = data
    recs = S.depth_sweep(xtr, ytr, xte, yte, depths=[3], arms=["plain + BN", "residual + BN"], steps=10, width=8,
                         seeds=[0, 1], progress=False)
    assert [(r["arm"], r["seed"]) for r in recs] == [("plain + BN", 0), ("plain + BN", 1), ("residual + BN", 0),
                                                     ("residual + BN", 1)]
    single = train(S.deep_mlp(3, width=8, norm="bn", seed=1), xtr, ytr, steps=10, batch_size=60, lr=0.02,
                   momentum=0.9, x_eval=xte, y_eval=yte, eval_every=10, seed=1)
    assert abs(single.final_acc - recs[1]["result"].final_acc) < 0.02
