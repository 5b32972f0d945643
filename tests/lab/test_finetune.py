"""Tests for bnlib.lab.finetune (chapter 11): the freezing modes do what they say, the data helpers, the verdict
rule, and the diagnostics of bnlib.torch used as hooks of the book's training loop."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnlib
from bnlib.lab import finetune as ft
from bnlib.lab.train import train
from bnlib.torch.diagnostics import LayerStats, UpdateRatio


def _data(n=40, seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % classes


def _net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return ft.transfer_cnn(5, channels=(4, 8), hidden=16, **kwargs)


def _bn_state(model):
    out = {}
    for i, m in enumerate(ft.bn_layers(model)):
        out[i] = {k: getattr(m, k).detach().clone() for k in ("running_mean", "running_var", "weight", "bias")}
    return out


def _changed(before, after, keys):
    return any(not torch.equal(before[i][k], after[i][k]) for i in before for k in keys)


# ------------------------------------------------------------------------------------------------ the modes


@pytest.mark.parametrize("mode, stats_move, affine_moves", [
    ("train", True, True),
    ("frozen_stats", False, True),
    ("frozen_affine", True, False),   # requires_grad=False: the running statistics still move in PyTorch
    ("keras", False, False),
])
def test_modes_freeze_what_they_say_through_the_training_loop(mode, stats_move, affine_moves):
    net = _net()
    x, y = _data()
    before = _bn_state(net)
    # evaluations every step call model.train() afterwards: the hook must freeze the layers again
    hist = ft.finetune(net, x, y, mode=mode, steps=4, batch_size=8, lr=0.05, weight_decay=0.01, x_eval=x, y_eval=y,
                       eval_every=1)
    after = _bn_state(net)
    assert len(hist.eval_steps) == 5
    assert _changed(before, after, ("running_mean", "running_var")) == stats_move
    assert _changed(before, after, ("weight", "bias")) == affine_moves
    for p in ft.norm_parameters(net):
        assert p.requires_grad == (mode in ("train", "frozen_stats"))
    assert not net[0].weight.equal(_net()[0].weight)  # the convolutions always train


def test_mode_effects_reports_the_four_modes_and_leaves_the_model_alone():
    net = _net()
    x, y = _data()
    state = copy.deepcopy(net.state_dict())
    effects = {m: ft.mode_effects(net, x, y, m) for m in ft.MODES}
    assert effects["train"] == {"batch_statistics": True, "running_stats_changed": True, "affine_changed": True,
                                "weights_changed": True}
    assert effects["frozen_stats"]["batch_statistics"] is False and not effects["frozen_stats"]["running_stats_changed"]
    assert effects["frozen_affine"]["batch_statistics"] and effects["frozen_affine"]["running_stats_changed"]
    assert not effects["frozen_affine"]["affine_changed"]
    assert effects["keras"] == {"batch_statistics": False, "running_stats_changed": False, "affine_changed": False,
                                "weights_changed": True}
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in net.parameters())


def test_apply_mode_works_on_torch_batch_norm_and_the_hook_refreezes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 26 * 26, 2))
    assert len(ft.bn_layers(net)) == 1 and len(ft.norm_parameters(net)) == 2
    ft.apply_mode(net, "keras")
    assert net.training and not net[1].training and not net[1].weight.requires_grad
    net.train()
    ft.bn_mode_hook("keras")(1, net)
    assert not net[1].training and net[0].training
    ft.apply_mode(net, "train")
    assert net[1].training and net[1].weight.requires_grad
    ft.bn_mode_hook("train")(1, net)
    assert net[1].training


def test_param_groups_decay_norm_parameters_only_when_asked():
    net = _net()
    norm_ids = {id(p) for p in ft.norm_parameters(net)}
    groups = ft.param_groups(net, 0.1, decay_norm=False)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == norm_ids
    assert ft.param_groups(net, 0.1)[1]["weight_decay"] == 0.1
    # the effect: with zero gradients, one SGD step shrinks exactly the decayed parameters
    for decay_norm in (True, False):
        net = _net()
        opt = torch.optim.SGD(ft.param_groups(net, 0.5, decay_norm=decay_norm), lr=0.1)
        gamma = ft.bn_layers(net)[0].weight
        before = gamma.detach().clone()
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        torch.testing.assert_close(gamma.detach(), before * (0.95 if decay_norm else 1.0))
    ft.apply_mode(net, "keras")  # frozen gamma, beta: not in any group
    assert all(id(p) not in norm_ids for g in ft.param_groups(net, 0.1) for p in g["params"])


def test_bad_input():
    net = _net()
    x, y = _data()
    with pytest.raises(ValueError, match="^mode: expected one of"):
        ft.apply_mode(net, "frozen")
    with pytest.raises(ValueError, match="^model: expected a network with batch norm layers"):
        ft.apply_mode(nn.Sequential(nn.Linear(2, 2)), "train")
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        ft.bn_layers("net")
    with pytest.raises(ValueError, match="^weight_decay: expected"):
        ft.param_groups(net, -1.0)
    with pytest.raises(TypeError, match="^decay_norm: expected a bool"):
        ft.param_groups(net, 0.1, decay_norm="no")
    with pytest.raises(ValueError, match="^lr: expected"):
        ft.finetune(net, x, y, mode="train", steps=1, batch_size=4, lr=0.0)
    with pytest.raises(ValueError, match="^per_class: expected at most 8"):
        ft.few_shot(x, y, 9)
    with pytest.raises(ValueError, match="^classes: expected distinct"):
        ft.select_classes(x, y, [1, 1])
    with pytest.raises(TypeError, match="^model: expected an nn.Sequential ending in an nn.Linear"):
        ft.replace_head(nn.Sequential(nn.ReLU()), 3)
    with pytest.raises(ValueError, match="^a, b: expected two 1-D sequences"):
        ft.paired_verdict([0.5, 0.6], [0.5, 0.6])
    with pytest.raises(ValueError, match="^delta: expected"):
        ft.paired_verdict([0.5] * 3, [0.5] * 3, delta=0)
    with pytest.raises(ValueError, match="^gain: expected"):
        ft.deep_tanh_mlp(gain=-1.0)
    with pytest.raises(ValueError, match="^seeds: expected one seed per network"):
        ft.run_arms([net], {"a": {"mode": "train"}}, lambda s: (x, y), seeds=(0, 1), num_classes=5, x_eval=x,
                    y_eval=y, steps=1, batch_size=4, lr=0.1)


# ------------------------------------------------------------------------------------------------ data, models


def test_select_classes_and_few_shot():
    x = torch.arange(30.0).reshape(30, 1)
    y = torch.arange(30) % 10
    xs, ys = ft.select_classes(x, y, [7, 5])
    assert ys.tolist() == [1, 0] * 3 and (xs[ys == 0].flatten() % 10 == 7).all()
    xf, yf = ft.few_shot(xs, ys, 2, seed=3)
    assert yf.tolist() == [0, 0, 1, 1] and set(xf.flatten().tolist()) <= set(xs.flatten().tolist())
    again, _ = ft.few_shot(xs, ys, 2, seed=3)
    assert torch.equal(xf, again)
    draws = {tuple(ft.few_shot(xs, ys, 2, seed=s)[0].flatten().tolist()) for s in range(6)}
    assert len(draws) > 1


def test_replace_head_and_networks():
    net = _net()
    new = ft.replace_head(net, 3, seed=1)
    assert new[-1].out_features == 3 and net[-1].out_features == 5
    assert torch.equal(new[0].weight, net[0].weight) and new[0].weight is not net[0].weight
    assert torch.equal(ft.replace_head(net, 3, seed=1)[-1].weight, new[-1].weight)
    assert not torch.equal(ft.replace_head(net, 3, seed=2)[-1].weight, new[-1].weight)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 5)
    torch.manual_seed(0)
    mlp = ft.deep_tanh_mlp("none", gain=3.0, depth=3, width=400)
    hidden = [m for m in mlp if isinstance(m, nn.Linear)][:-1]
    assert len(hidden) == 3 and sum(isinstance(m, nn.Tanh) for m in mlp) == 3
    assert hidden[1].weight.std().item() == pytest.approx(3.0 / 400 ** 0.5, rel=0.02)
    assert sum(isinstance(m, bnlib.torch.BatchNorm1d) for m in ft.deep_tanh_mlp("bn", depth=2)) == 2


def test_pretrain_and_run_arms_tiny():
    x, y = _data(60)
    nets, hists = ft.pretrain(x, y, seeds=(0, 1), num_classes=5, channels=(2, 4), hidden=8, steps=3, batch_size=10)
    assert len(nets) == 2 and len(hists) == 2 and not nets[0].training
    assert not torch.equal(nets[0][0].weight, nets[1][0].weight)
    res = ft.run_arms(nets, {"a": {"mode": "train"}, "b": {"mode": "keras"}}, lambda s: ft.few_shot(x, y, 2, s),
                      seeds=(0, 1), num_classes=5, x_eval=x, y_eval=y, steps=2, batch_size=4, lr=0.01)
    assert set(res) == {"a", "b"} and res["a"].shape == (2,) and ((res["a"] >= 0) & (res["a"] <= 1)).all()
    assert nets[0][-1].out_features == 5  # the pretrained networks are not touched


def test_paired_verdict_rule():
    base = np.array([0.80, 0.82, 0.84, 0.86, 0.88])
    assert ft.paired_verdict(base + 0.02, base)[0] == "confirmed"
    assert ft.paired_verdict(base + np.array([0.05, 0.04, 0.03, 0.02, -0.01]), base)[0] == "qualified"
    assert ft.paired_verdict(base + 0.007, base)[0] == "qualified"          # a gain, but below delta
    assert ft.paired_verdict(base + 0.004, base)[0] == "refuted"            # below delta / 2
    assert ft.paired_verdict(base - 0.05, base)[0] == "refuted"
    verdict, d = ft.paired_verdict(base, base + 0.01)
    assert verdict == "refuted" and np.allclose(d, -0.01)


# ------------------------------------------------------------------------------------------------ diagnostics as hooks


def test_diagnostics_as_hooks_of_the_training_loop():
    torch.manual_seed(0)
    model = ft.deep_tanh_mlp("none", gain=3.0, depth=2, width=16, in_features=12, num_classes=3)
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    stats, ratio = LayerStats(model, nn.Tanh), UpdateRatio(model, every=2)
    with stats:
        hist = train(model, x, y, steps=6, batch_size=16, lr=0.1, x_eval=x, y_eval=y, eval_every=2,
                     before_step=[stats, ratio.before_step], callback=ratio.callback)
    assert len(hist.eval_steps) == 4  # the evaluations ran under no_grad: not recorded
    rep = stats.report()
    for name in stats.names:
        np.testing.assert_array_equal(rep[name]["steps"], np.arange(1, 7))
        np.testing.assert_array_equal(rep[name]["gradient"]["steps"], np.arange(1, 7))
    assert ratio.steps == [2, 4, 6] and all(np.isfinite(v).all() for v in ratio.report()["ratio"].values())
