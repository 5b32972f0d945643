import random

import numpy as np
import pytest
import torch

import bnlib


def draw():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_setup_seeds_everything_and_returns_device(capsys, monkeypatch):
    # setup() exports the base seed as $BNLIB_SEED: monkeypatch (setenv records the variable's state before the
    # test) restores it afterwards, so the tests that run later in this process see base seed 0 again
    # (tests/lab/test_small_batches.py builds its single networks after torch.manual_seed(seed))
    monkeypatch.setenv("BNLIB_SEED", "0")
    monkeypatch.delenv("BNLIB_SEED")
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
        bnlib.does_not_exist  # noqa: B018 (the attribute access is the test)


def test_derived_seeds_are_offsets_of_the_base_seed(monkeypatch):
    monkeypatch.delenv("BNLIB_SEED", raising=False)
    assert [bnlib.derive_seed(k) for k in (0, 1, 2)] == [0, 1, 2]
    monkeypatch.setenv("BNLIB_SEED", "2")
    assert [bnlib.derive_seed(k) for k in (0, 1, 2)] == [20_000, 20_001, 20_002]
    assert bnlib.rng(1).random() == np.random.default_rng(20_001).random()
    assert torch.rand(3, generator=bnlib.generator(1)).tolist() == torch.rand(
        3, generator=torch.Generator().manual_seed(20_001)).tolist()
    with pytest.raises(ValueError, match="below 10000"):
        bnlib.derive_seed(10_000)


@pytest.mark.parametrize("text", ["-1", "one", "1.5"])
def test_bad_bnlib_seed_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("BNLIB_SEED", text)
    with pytest.raises(ValueError, match="BNLIB_SEED"):
        bnlib.derive_seed(0)


def test_bnlib_seed_from_the_environment_replaces_the_chapters_seed(monkeypatch, capsys):
    from bnlib import _setup

    monkeypatch.setattr(_setup, "_USER_SEED_TEXT", "1")
    monkeypatch.setenv("BNLIB_SEED", "1")
    bnlib.setup(seed=0)
    assert "seed: 1 (from $BNLIB_SEED)" in capsys.readouterr().out
    with_env = draw()
    monkeypatch.setattr(_setup, "_USER_SEED_TEXT", None)
    bnlib.setup(seed=0, quiet=True)
    assert draw() != with_env  # base 0 again: other draws
    bnlib.setup(seed=1, quiet=True)
    assert draw() == with_env  # the same as base seed 1 given in the chapter


def test_lab_code_draws_from_the_base_seed(monkeypatch):
    """Everything a chapter seeds with an offset moves with the base seed: here a training run's batches."""
    from bnlib.lab.models import mlp
    from bnlib.lab.train import train

    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3

    def losses():
        torch.manual_seed(0)
        model = mlp(4, (8,), 3, norm="bn")
        return train(model, x, y, steps=5, batch_size=8, lr=0.1, seed=0).train_loss

    monkeypatch.setenv("BNLIB_SEED", "0")
    base0 = losses()
    assert losses() == base0
    monkeypatch.setenv("BNLIB_SEED", "1")
    assert losses() != base0
