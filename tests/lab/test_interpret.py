"""Tests of bnlib.lab.interpret: folded first-layer weights and feature attributions."""
import numpy as np
import pytest
import torch
from torch import nn

import bnlib.torch as bt
from bnlib.lab import interpret as I


def _bn_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), bt.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # non-trivial statistics and affine
        model(torch.randn(64, 4, 4) * 2 + 1)
        model[2].weight.uniform_(0.5, 2.0)
        model[2].bias.uniform_(-1, 1)
    model.eval()
    return model


def test_folded_first_layer_matches_bn_formula_and_leaves_model():
    model = _bn_mlp()
    w, b = I.raw_first_layer(model)
    we, be = I.folded_first_layer(model)
    bn = model[2]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(we, w * s[:, None])
    torch.testing.assert_close(be, (b - bn.running_mean) * s + bn.bias)
    torch.testing.assert_close(I.unit_scale_factors(model), s.detach())
    assert isinstance(model[2], bt.BatchNorm1d)  # the model itself is unchanged
    # the first hidden layer computed from W_eff equals the BN model's
    x = torch.randn(5, 4, 4)
    torch.testing.assert_close(x.flatten(1) @ we.T + be, model[2](model[1](x.flatten(1))), atol=1e-5, rtol=1e-5)


def test_folded_first_layer_without_bn_is_raw_and_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model.train()
    w, b = I.raw_first_layer(model)
    we, be = I.folded_first_layer(model)
    assert torch.equal(w, we) and torch.equal(b, be) and model.training
    with pytest.raises(ValueError, match="no nn.Linear"):
        I.raw_first_layer(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="model"):
        I.folded_first_layer("model")


def test_input_gradients_linear_model_is_weight_row():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    g = I.input_gradients(model, x, target=torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(g, model.weight.detach()[[0, 1, 2, 1]])
    gi = I.gradient_x_input(model, x, target=1)
    torch.testing.assert_close(gi, x * model.weight.detach()[1])
    with pytest.raises(ValueError, match="target"):
        I.input_gradients(model, x, target=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating"):
        I.input_gradients(model, torch.ones(2, 5, dtype=torch.long))


def test_bn_model_and_folded_model_have_identical_attributions():
    model = _bn_mlp()
    folded = bt.fold_batchnorm(model, warn=False)
    x = torch.rand(6, 4, 4)
    torch.testing.assert_close(I.input_gradients(model, x), I.input_gradients(folded, x), atol=1e-5, rtol=1e-5)


def test_integrated_gradients_completeness():
    model = _bn_mlp()
    x = torch.rand(6, 4, 4)
    ig = I.integrated_gradients(model, x, steps=128)
    gap = I.completeness_gap(model, x, ig)
    logits = model(x)
    assert gap.max() < 0.02 * logits.abs().max()
    # for a linear model IG with a zero baseline is exactly gradient x input
    lin = nn.Linear(5, 2)
    xl = torch.randn(3, 5)
    torch.testing.assert_close(I.integrated_gradients(lin, xl, target=0, steps=3),
                               I.gradient_x_input(lin, xl, target=0))
    with pytest.raises(ValueError, match="steps"):
        I.integrated_gradients(lin, xl, steps=0)


def test_train_mode_gradients_depend_on_batch_and_restore_stats():
    model = _bn_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 4, 4)
    other = torch.rand(8, 4, 4) * 3
    g1 = I.input_gradients(model, x, target=0, train_mode=True)
    g2 = I.input_gradients(model, torch.cat([x, other]), target=0, train_mode=True)[:8]
    assert not torch.allclose(g1, g2)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # eval mode: independent of the batch
    e1 = I.input_gradients(model, x, target=0)
    e2 = I.input_gradients(model, torch.cat([x, other]), target=0)[:8]
    torch.testing.assert_close(e1, e2)


def test_attribution_similarity():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 10, generator=gen)
    assert torch.allclose(I.attribution_similarity(a, a), torch.ones(5))
    assert torch.allclose(I.attribution_similarity(a, -a), -torch.ones(5))
    assert torch.allclose(I.attribution_similarity(a, 3 * a + 1, method="spearman"), torch.ones(5))
    assert torch.allclose(I.attribution_similarity(a, torch.exp(a), method="spearman"), torch.ones(5))
    assert torch.allclose(I.attribution_similarity(a, a, method="topk", k=3), torch.ones(5))
    b = a.clone()
    b[:, :] = -a  # top-3 become bottom-3
    assert I.attribution_similarity(a, b, method="topk", k=3).max() == 0
    with pytest.raises(ValueError, match="method"):
        I.attribution_similarity(a, a, method="cosine")
    with pytest.raises(ValueError, match="k: expected an int in"):
        I.attribution_similarity(a, a, method="topk")
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 10\], got 11"):
        I.attribution_similarity(a, a, method="topk", k=11)
    with pytest.raises(TypeError, match="k: "):
        I.attribution_similarity(a, a, method="topk", k=2.0)
    with pytest.raises(ValueError, match="same shape"):
        I.attribution_similarity(a, a[:, :3])


def test_deletion_curve():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    x = torch.ones(3, 4)
    attr = I.gradient_x_input(lin, x, target=0)
    curve = I.deletion_curve(lin, x, attr, target=0, fractions=(0.0, 0.25, 1.0))
    assert curve[0] > 0.99 and curve[1] == pytest.approx(0.5) and curve[2] == pytest.approx(0.5)
    assert np.all(np.diff(curve) <= 1e-7)
    with pytest.raises(ValueError, match="fractions"):
        I.deletion_curve(lin, x, attr, fractions=(1.5,))
    with pytest.raises(ValueError, match="attributions"):
        I.deletion_curve(lin, x, attr[:, :2])


def test_spatial_coherence():
    smooth = torch.linspace(0, 1, 28).repeat(28, 1)[None].expand(2, 28, 28) + torch.linspace(0, 1, 28)[:, None]
    assert (I.spatial_coherence(smooth) > 0.9).all()
    gen = torch.Generator().manual_seed(0)
    speckle = torch.randn(2, 28, 28, generator=gen)
    assert (I.spatial_coherence(speckle).abs() < 0.15).all()
    mask = torch.zeros(2, 28, 28, dtype=torch.bool)
    assert torch.isnan(I.spatial_coherence(speckle, mask=mask)).all()
    with pytest.raises(ValueError, match="mask"):
        I.spatial_coherence(speckle, mask=torch.ones(2, 27, 27))


def test_first_layer_gradient_cosines_zero_with_bn():
    model = _bn_mlp()
    x, y = torch.rand(32, 4, 4), torch.randint(0, 3, (32,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cos = I.first_layer_gradient_cosines(model, x, y)
    assert cos.abs().max() < 1e-3 and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    assert I.first_layer_gradient_cosines(plain, x, y).abs().max() > 0.01


def test_first_layer_movement():
    model = _bn_mlp()
    w0 = model[1].weight.detach().clone()
    assert I.first_layer_movement(model, w0) == 0.0
    with torch.no_grad():
        model[1].weight.mul_(3.0)
    assert I.first_layer_movement(model, w0) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="initial_weight"):
        I.first_layer_movement(model, w0[:, :3])


def test_train_tuned_mlps_picks_the_best_median_rate_and_matches_single_runs():
    from bnlib import seed_everything
    from bnlib.lab import models
    from bnlib.lab.train import train

    g = torch.Generator().manual_seed(0)
    x = torch.rand(120, 12, generator=g)
    y = (x[:, :10].argmax(1)).long()
    res = I.train_tuned_mlps("bn", x[:90], y[:90], x[90:], y[90:], seeds=(0, 1), lrs=(0.001, 0.3), steps=30,
                             batch_size=15, hidden=(8,))
    assert set(res.nets) == {0, 1} and set(res.val_acc) == {0.001, 0.3} and res.val_acc[0.3].shape == (2,)
    med = {lr: np.median(a) for lr, a in res.val_acc.items()}
    assert med[res.lr] == max(med.values())
    # network of seed 1 at the chosen rate = a single run of train() from seed 1
    seed_everything(1)
    single = models.mlp(12, (8,), 10, activation="relu", norm="bn")
    torch.testing.assert_close(res.init[1], single[1].weight.detach())
    train(single, x[:90], y[:90], steps=30, batch_size=15, lr=res.lr, momentum=0.9, seed=1)
    torch.testing.assert_close(res.nets[1][1].weight, single[1].weight, atol=1e-5, rtol=1e-4)
    assert not res.nets[1].training
    assert set(res.all_nets) == {0.001, 0.3} and res.all_nets[res.lr][1] is res.nets[1]
    wide = I.train_tuned_mlps("bn", x[:90], y[:90], x[90:], y[90:], seeds=(0, 1), lrs=(0.001, 0.3), steps=30,
                              batch_size=15, hidden=(8,), tol=0.99)
    assert wide.lr == 0.001                                        # every rate ties: the smallest
    with pytest.raises(ValueError, match="tol"):
        I.train_tuned_mlps("bn", x, y, x, y, seeds=(0,), lrs=(0.1,), steps=2, batch_size=10, tol=-0.1)
    with pytest.raises(ValueError, match="lrs"):
        I.train_tuned_mlps("bn", x, y, x, y, seeds=(0,), lrs=(0.1, 0.1), steps=2, batch_size=10)
    with pytest.raises(ValueError, match="seeds"):
        I.train_tuned_mlps("bn", x, y, x, y, seeds=(), lrs=(0.1,), steps=2, batch_size=10)
