"""bnlib.lab.models: the pluggable-normalization MLP and CNN used by the chapters."""
import pytest
import torch
from torch import nn

import bnlib.torch as bt
from bnlib import methods
from bnlib.lab import models


@pytest.mark.parametrize("kind", methods.names(dim=2))
def test_small_cnn_every_norm_trains_a_step(kind):
    torch.manual_seed(0)
    model = models.small_cnn(kind, channels=(4, 8))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    norm_layers = [m for m in model if type(m).__module__.startswith("bnlib.torch")]
    assert len(norm_layers) == (0 if kind == "none" else 2)  # every norm layer comes from bnlib.torch


def test_make_norm_maps_names_to_bnlib_layers():
    assert isinstance(models.make_norm("bn", 5, 1), bt.BatchNorm1d)
    assert isinstance(models.make_norm("bn", 5, 2), bt.BatchNorm2d)
    ln2d = models.make_norm("ln", 6, 2)
    assert isinstance(ln2d, bt.GroupNorm) and ln2d.num_groups == 1  # LN over (C, H, W)
    assert models.make_norm("gn", 16, 2, groups=4).num_groups == 4
    assert isinstance(models.make_norm("none", 3), nn.Identity)


@pytest.mark.parametrize("bad", [dict(kind="batch", num_features=4), dict(kind="bn", num_features=4, dim=3),
                                 dict(kind="in", num_features=4, dim=1)])
def test_make_norm_bad_input(bad):
    with pytest.raises(ValueError, match="kind|dim"):
        models.make_norm(**bad)


def test_mlp_layout_and_norm_position():
    before = models.mlp(784, (10, 10), norm="bn", activation="relu")
    kinds = [type(m).__name__ for m in before]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    after = models.mlp(784, (10,), norm="bn", activation="relu", norm_position="after")
    assert [type(m).__name__ for m in after] == ["Flatten", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert models.mlp(784, (10,), dropout=0.5)[3].p == 0.5
    with pytest.raises(ValueError, match="activation"):
        models.mlp(activation="gelu2")
    with pytest.raises(ValueError, match="dropout"):
        models.mlp(dropout=1.0)
    assert models.count_parameters(models.mlp(4, (3,), 2)) == 4 * 3 + 3 + 3 * 2 + 2
