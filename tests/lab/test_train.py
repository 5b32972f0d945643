"""Tests for the shared training loop and the sweep/spread/plotting helpers (bnlib.lab.train, bnlib.lab.plotting)."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bnlib.lab import plotting  # noqa: E402
from bnlib.lab import train as E  # noqa: E402
from bnlib.lab.models import mlp  # noqa: E402


def _blobs(n=240, d=20, classes=3, seed=0):
    """A linearly separable toy problem: Gaussian blobs around random class centres."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=gen) * 3
    y = torch.arange(n) % classes
    x = centres[y] + torch.randn(n, d, generator=gen)
    return x, y


def _model(norm="bn", seed=0):
    torch.manual_seed(seed)
    return mlp(20, (16,), 3, activation="relu", norm=norm)


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_train_tiny_run_is_deterministic_and_learns(norm):
    x, y = _blobs()
    runs = []
    for _ in range(2):
        model = _model(norm)
        hist = E.train(model, x, y, steps=60, batch_size=20, lr=0.1, x_eval=x, y_eval=y, eval_every=20, seed=3)
        runs.append((hist, [p.detach().clone() for p in model.parameters()]))
    (h1, p1), (h2, p2) = runs
    assert h1.train_loss == h2.train_loss  # bit-for-bit the same run
    assert h1.eval_acc == h2.eval_acc and h1.eval_steps == h2.eval_steps == [0, 20, 40, 60]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert np.mean(h1.train_loss[-10:]) < 0.5 * np.mean(h1.train_loss[:5])  # it learns
    assert h1.final_acc > 0.9 and not h1.diverged


def test_train_different_seed_gives_different_batches():
    x, y = _blobs()
    a = E.train(_model(), x, y, steps=5, batch_size=20, lr=0.1, seed=0).train_loss
    b = E.train(_model(), x, y, steps=5, batch_size=20, lr=0.1, seed=1).train_loss
    assert a != b


def test_train_marks_divergence():
    x, y = _blobs()
    hist = E.train(_model("none"), x * 1e3, y, steps=50, batch_size=20, lr=1e3)
    assert hist.diverged and len(hist.train_loss) < 50


def test_sweep_order_records_and_validation():
    calls = []

    def fn(a, b):
        calls.append((a, b))
        return a * b

    records = E.sweep(fn, {"a": [1, 2], "b": [10, 20, 30]}, progress=False)
    assert calls == [(1, 10), (1, 20), (1, 30), (2, 10), (2, 20), (2, 30)]
    assert records[4] == {"a": 2, "b": 20, "result": 40}
    assert len(E.sweep(fn, {"a": (3,), "b": range(2)}, progress=True)) == 2  # tqdm bar works too
    with pytest.raises(ValueError, match="grid"):
        E.sweep(fn, {}, progress=False)
    with pytest.raises(ValueError, match=r"grid\['a'\]"):
        E.sweep(fn, {"a": [], "b": [1]}, progress=False)
    with pytest.raises(ValueError, match=r"grid\['a'\]"):
        E.sweep(fn, {"a": "xy", "b": [1]}, progress=False)
    with pytest.raises(TypeError, match="fn"):
        E.sweep(3, {"a": [1]}, progress=False)


def test_spread_counts_missing_as_infinite():
    s = E.spread([400, 300, None])
    assert (s.median, s.low, s.high, s.n, s.missing) == (400.0, 300.0, math.inf, 3, 1)
    assert str(s) == "400 [300, not reached] (n=3)"
    assert E.spread([1, 2, 3, 4]).median == 2.5
    assert math.isinf(E.spread([None, None, 5]).median)
    with pytest.raises(ValueError, match="values"):
        E.spread([])
    with pytest.raises(ValueError, match="values"):
        E.spread([1.0, float("nan")])


def test_plot_curves_labels_bands_and_method_colours():
    fig, ax = plt.subplots()
    plotting.plot_curves(ax, [
        {"x": [1, 2, 3], "y": [1, 2, 3], "label": "with BN", "color": "bn", "low": [0, 1, 2], "high": [2, 3, 4]},
        {"x": [1, 2, 3], "y": [3, 2, 1], "label": "without BN", "color": "none", "linestyle": "--"},
    ], title="t", xlabel="step", ylabel="accuracy", logx=True)
    assert ax.get_title() == "t" and ax.get_xlabel() == "step" and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["with BN", "without BN"]
    assert matplotlib.colors.to_hex(ax.lines[0].get_color()) == plotting.METHOD_COLORS["bn"].lower()
    assert len(ax.collections) == 1  # one band
    with pytest.raises(ValueError, match="title"):
        plotting.plot_curves(ax, [], title="", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="missing keys"):
        plotting.plot_curves(ax, [{"x": [1]}], title="t", xlabel="x", ylabel="y")
    plt.close(fig)


@pytest.mark.parametrize("kwargs,name,error", [(dict(steps=0), "steps", ValueError),
                                               (dict(steps=2.0), "steps", TypeError),
                                               (dict(batch_size=0), "batch_size", ValueError),
                                               (dict(batch_size=11), "batch_size", ValueError),
                                               (dict(n_labels=9), "y_train", ValueError)])
def test_check_training_run_names_the_argument(kwargs, name, error):
    """A wrong type raises TypeError, a wrong value ValueError; both name the argument."""
    from bnlib import _checks

    args = dict(n_train=10, n_labels=10, steps=5, batch_size=4)
    _checks.check_training_run(**args)  # valid: no error
    args.update(kwargs)
    with pytest.raises(error, match=rf"^{name}: expected"):
        _checks.check_training_run(**args)


def test_run_sampler_gives_the_batches_and_stop_training_ends_the_run():
    seen = []

    def step(t, idx):
        seen.append(idx.tolist())
        if t == 3:
            raise E.StopTraining
        return 1.0

    hist = E.run(10, step, steps=5, batch_size=2, sampler=lambda t: torch.tensor([t, t + 1]),
                 evaluate_fn=lambda: (0.5, 0.25))
    assert seen == [[1, 2], [2, 3], [3, 4]]
    assert hist.train_loss == [1.0, 1.0] and hist.eval_steps == [0, 3]
    with pytest.raises(TypeError, match="sampler"):
        E.run(10, step, steps=1, batch_size=2, sampler=3)
    with pytest.raises(ValueError, match="eval_every"):
        E.run(10, step, steps=1, batch_size=2, eval_every=0)


def test_train_clips_gradients_and_checks_its_hooks():
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    norms = []

    def record(step, model, xb, yb):
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())

    E.train(torch.nn.Linear(4, 2), x * 100, y, steps=5, batch_size=8, lr=1e-3, clip_grad_norm=0.5,
            callback=record)
    assert max(norms) <= 0.5 + 1e-5
    with pytest.raises(TypeError, match="before_step"):
        E.train(torch.nn.Linear(4, 2), x, y, steps=1, batch_size=8, lr=0.1, before_step="no")
    with pytest.raises(ValueError, match="clip_grad_norm"):
        E.train(torch.nn.Linear(4, 2), x, y, steps=1, batch_size=8, lr=0.1, clip_grad_norm=-1.0)
    with pytest.raises(TypeError, match="model"):
        E.train("not a model", x, y, steps=1, batch_size=8, lr=0.1)


def test_history_repr_is_one_line():
    from bnlib.lab.train import History

    h = History(train_loss=[0.5] * 5000, eval_steps=list(range(0, 5001, 50)), eval_loss=[0.1] * 101,
                eval_acc=[0.9] * 101)
    text = repr(h)
    assert "\n" not in text and len(text) < 200
    assert text == ("History(5000 steps, last training loss 0.5, 101 evaluations (steps 0-5000), "
                    "final accuracy 0.9)")


def test_progress_bar_off_with_bnlib_progress_0(monkeypatch):
    from bnlib.lab.train import progress_bar

    monkeypatch.setenv("BNLIB_PROGRESS", "0")
    assert progress_bar(10, "x") is None
    monkeypatch.setenv("BNLIB_PROGRESS", "1")
    bar = progress_bar(10, "x", disable=True)
    assert bar is not None
    bar.close()
