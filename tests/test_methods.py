"""bnlib.methods: every registry entry resolves, builds, and its flags agree with what its module does."""
from __future__ import annotations

import matplotlib.colors
import pytest
import torch
from torch import nn

from bnlib import methods

ENTRIES = [(name, dim) for name, m in methods.REGISTRY.items() for dim in sorted(m.modules)]


@pytest.mark.parametrize("name", methods.NAMES)
def test_every_path_resolves(name):
    m = methods.get(name)
    fwd, bwd, fn = m.functions()
    assert (fwd is None) == (m.numpy_forward is None) and (bwd is None) == (m.numpy_backward is None)
    assert fn is None or callable(fn)
    for dim in m.modules:
        assert issubclass(m.module_class(dim), nn.Module)
    assert matplotlib.colors.is_color_like(m.color)


def _input(dim, n=6, c=8):
    return torch.randn(n, c, dtype=torch.float64) if dim == 1 else torch.randn(n, c, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("name, dim", ENTRIES)
def test_flags_agree_with_the_module(name, dim):
    """``running_stats``: the layer keeps a running mean; ``batch_dependent``: in training mode one example's
    output changes when another example of its batch changes."""
    torch.manual_seed(0)
    m = methods.get(name)
    layer = m.make(8, dim, **({"groups": 2} if name == "gn" else {})).double().train()
    assert (getattr(layer, "running_mean", None) is not None) == m.running_stats
    x = _input(dim)
    y0 = layer(x)[0]
    x2 = x.clone()
    x2[1:] = 3.0 * x2[1:] + 1.0
    y1 = layer(x2)[0]
    assert (not torch.allclose(y0, y1)) == m.batch_dependent
    assert layer(x).shape == x.shape


def test_colours_are_distinct_and_names_unique():
    colours = [m.color.lower() for m in methods.REGISTRY.values()]
    assert len(set(colours)) == len(colours)
    assert len(set(methods.NAMES)) == len(methods.NAMES)


def test_names_filters():
    assert methods.names(dim=2, running_stats=True) == ("bn", "ghost", "brn", "bln")
    assert "rms" in methods.names(dim=1) and "rms" not in methods.names(dim=2)
    assert "in" not in methods.names(dim=1)
    with pytest.raises(TypeError, match="colour"):
        methods.names(colour="red")


@pytest.mark.parametrize("bad, match", [(dict(name="batch"), "kind"), (dict(name="bn", dim=3), "dim"),
                                        (dict(name="in", dim=1), "dim"), (dict(name="rms", dim=2), "dim")])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        methods.make(num_features=4, **bad)


def test_make_passes_keyword_arguments():
    assert methods.make("gn", 16, 2, groups=4).num_groups == 4
    assert methods.make("bn", 5, 1, momentum=0.3).momentum == 0.3
    assert methods.make("ln", 6, 2).num_groups == 1  # layer norm of a conv activation: GroupNorm(1, C)
