import random

import numpy as np
import pytest
import torch

import bnlib


def draw():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_setup_seeds_everything_and_returns_device(capsys):
    device = bnlib.setup(seed=3)
    first = draw()
    assert "seed: 3" in capsys.readouterr().out
    bnlib.setup(seed=3, quiet=True)
    assert draw() == first
    bnlib.setup(seed=4, quiet=True)
    assert draw() != first
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        bnlib.seed_everything(seed)


def test_lazy_submodules():
    assert bnlib.data.load_mnist is not None
    with pytest.raises(AttributeError):
        bnlib.does_not_exist
