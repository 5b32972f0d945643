"""Tests of bnlib.sweeps: the axes cube, the packed networks (k seeds trained as one) and the sweep runner."""
import matplotlib

matplotlib.use("Agg")

import copy

import numpy as np
import pytest
import torch

from tests._numerics import assert_error_within
from bnlib import sweeps
from bnlib.experiments import evaluate, train
from bnlib.models import NORMS, make_norm, mlp, small_cnn

@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the sweep uses (tiny layers on a busy machine are much slower with more)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


KWARGS = {"gn": {"groups": 4}, "ghost": {"virtual_batch_size": 2}, "brn": {"r_max": 1.5, "d_max": 0.5}}


def _data(n=48, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


# ------------------------------------------------------------------------------------------ axes cube
@pytest.mark.parametrize("kind, count", [("bn", 6 * 4), ("ln", 6 * 4), ("in", 4), ("gn", 3 * 4),
                                         ("bln", 6 * 4 + 6 * 4 - 4)])
def test_stats_mask_sizes(kind, count):
    mask = sweeps.stats_mask(kind, (6, 6, 4), groups=2)
    assert mask.shape == (6, 6, 4) and mask.dtype == bool
    assert mask.sum() == count
    assert mask[5, 0].all()  # the anchor entry (last sample, first channel) is always in its own set


def test_stats_mask_axes():
    bn = sweeps.stats_mask("bn", (3, 4, 5), anchor=(1, 2))
    assert bn[:, 2].all() and bn.sum() == 3 * 5
    gn = sweeps.stats_mask("gn", (3, 4, 5), groups=2, anchor=(1, 3))
    assert gn[1, 2:4].all() and gn.sum() == 2 * 5


@pytest.mark.parametrize("bad", [dict(kind="xx"), dict(kind="gn", groups=4), dict(kind="gn", groups=0),
                                 dict(kind="bn", anchor=(6, 0)), dict(kind="bn", shape=(0, 2, 2))])
def test_stats_mask_rejects_bad_input(bad):
    kw = dict(shape=(6, 6, 4))
    kw.update(bad)
    kind = kw.pop("kind")
    with pytest.raises(ValueError):
        sweeps.stats_mask(kind, **kw)


@pytest.mark.parametrize("kind, groups", [("bn", None), ("ln", None), ("in", None), ("gn", 2), ("gn", 4)])
def test_layers_normalize_over_the_stated_axes(kind, groups):
    """Each bnlib layer (gamma = 1, beta = 0, training mode) equals a manual reduction over its axes; with
    per-sample and per-channel offsets and scales in the input, any other set of axes would differ."""
    g = torch.Generator().manual_seed(1)
    N, C, H, W = 4, 8, 3, 5
    x = torch.randn(N, C, H, W, generator=g) * torch.rand(N, C, 1, 1, generator=g) * 3
    x = x + torch.randn(N, 1, 1, 1, generator=g) * 2 + torch.randn(1, C, 1, 1, generator=g)
    kw = {"groups": groups} if kind == "gn" else {}
    layer = make_norm(kind, C, 2, **kw).train()
    with torch.no_grad():
        y = layer(x)
    expected = sweeps.manual_normalize(x, kind, groups=groups, eps=layer.eps)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    for other in {"bn", "ln", "in"} - {kind}:  # and it is not one of the others
        assert not torch.allclose(y, sweeps.manual_normalize(x, other, eps=layer.eps), atol=1e-2)


@pytest.mark.parametrize("batch_size", [None, 2, 64])
def test_bln_layer_matches_the_stated_formula(batch_size):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 3, 3, generator=g) * 2 + torch.randn(4, 1, 1, 1, generator=g)
    kw = {} if batch_size is None else {"batch_size": batch_size}
    layer = make_norm("bln", 6, 2, **kw).train()
    with torch.no_grad():
        y = layer(x)
    expected = sweeps.manual_normalize(x, "bln", eps=layer.eps, batch_size=batch_size)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_manual_stats_rejects_bad_input():
    with pytest.raises(ValueError):
        sweeps.manual_stats(torch.zeros(2, 3), "bn")
    with pytest.raises(ValueError):
        sweeps.manual_stats(torch.zeros(2, 4, 3, 3), "gn", groups=3)
    with pytest.raises(ValueError):
        sweeps.manual_stats(torch.zeros(2, 4, 3, 3), "bln")


def test_draw_norm_cubes():
    import matplotlib.pyplot as plt

    fig = sweeps.draw_norm_cubes(groups=3, shape=(4, 6, 3))
    assert len(fig.axes) == 5
    assert all(len(ax.patches) > 0 for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes] == list(sweeps.CUBE_METHODS)
    plt.close(fig)
    with pytest.raises(ValueError):
        sweeps.draw_norm_cubes(["bn", "ghost"])


# ------------------------------------------------------------------------------------------ packed networks
@pytest.mark.parametrize("norm", NORMS)
def test_packed_start_equals_the_seeded_single_networks(norm):
    packed = sweeps.PackedNet(norm, (3, 11), image_size=8, norm_kwargs=KWARGS.get(norm))
    assert packed.grouped == (norm in sweeps.PACKABLE)
    for j, seed in enumerate((3, 11)):
        torch.manual_seed(seed)
        single = small_cnn(norm, (8, 16), image_size=8, **KWARGS.get(norm, {}))
        got = packed.unpack(j).state_dict()
        for key, value in single.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_packed_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sweeps.PackedNet("bn", (0, 1), image_size=8)
    torch.testing.assert_close(torch.rand(3), expected)


def _check_packed_against_separate_runs(packed, x, y, make_single, flatten, steps):
    """Train ``packed`` and compare its network ``j`` with bnlib.experiments.train on the single network
    ``make_single()`` built after ``torch.manual_seed(seeds[j])`` (same initial weights, same mini-batch order).

    Grouped and separate layers sum in different orders, and that float32 rounding depends on the processor's
    kernels (ghost BN with virtual batches of two amplifies it ~4000-fold), so no constant tolerance fits every
    machine: the losses, final state and eval-mode logits of both float32 runs are judged by their error
    against the same single run in float64, the packed run's within a few times the separate run's
    (tests/_numerics.py)."""
    k = len(packed.seeds)
    kw = dict(steps=steps, batch_size=4, lr=0.05, momentum=0.9)
    losses = sweeps.train_packed(packed, x, y, **kw)
    assert losses.shape == (steps, k) and np.isfinite(losses).all()
    errors = sweeps.evaluate_packed(packed, x, y)
    packed.eval()
    with torch.no_grad():
        logits = packed(x.unsqueeze(1).expand(-1, k, -1, -1))  # what evaluate_packed classifies
    xin = x.reshape(len(x), -1) if flatten else x[:, None]
    for j, seed in enumerate(packed.seeds):
        torch.manual_seed(seed)
        single = make_single()
        twin = copy.deepcopy(single).double()
        hist = train(single, xin, y, seed=seed, **kw)
        truth = train(twin, xin.double(), y, seed=seed, **kw)
        assert_error_within(losses[:, j], hist.train_loss, truth.train_loss, what=f"network {j}: losses")
        got, ref = packed.unpack(j).state_dict(), single.state_dict()
        assert list(got) == list(ref)
        for key, value in twin.state_dict().items():
            if value.is_floating_point():
                assert_error_within(got[key], ref[key], value, what=f"network {j}: {key}")
            else:
                assert torch.equal(got[key], ref[key]), key
        single.eval(), twin.eval()
        with torch.no_grad():
            assert_error_within(logits[:, j], single(xin), twin(xin.double()), what=f"network {j}: eval logits")
        # the eval-mode error is that of these logits (the separate run's, up to rounding: a prediction may flip
        # only where two classes tie to within it)
        assert errors[j] == pytest.approx((logits[:, j].argmax(1) != y).double().mean().item(), abs=1e-9)


@pytest.mark.parametrize("norm", NORMS)
def test_packed_training_is_the_separate_runs(norm):
    """The k packed networks end where bnlib.experiments.train takes each network alone (same seed for the
    initial weights and for the mini-batch order), and their eval-mode errors agree."""
    x, y = _data()
    kw = KWARGS.get(norm, {})
    packed = sweeps.PackedNet(norm, (2, 5), image_size=8, norm_kwargs=kw)
    _check_packed_against_separate_runs(packed, x, y, lambda: small_cnn(norm, (8, 16), image_size=8, **kw),
                                        flatten=False, steps=9)


@pytest.mark.parametrize("shape, batch_size", [((4, 6, 3, 3), None), ((4, 6, 3, 3), 2), ((3, 6), 8)])
def test_packed_batch_layer_norm_is_k_separate_layers(shape, batch_size):
    """The packed BLN layer (batch half over all k*C channels, layer half per network) gives each network the
    output, input gradient, parameter gradients and running statistics of its own BatchLayerNorm(C)."""
    k, C = 3, shape[1]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape[0], k * C, *shape[2:], generator=g) * 2 + 1
    dy = torch.randn(x.shape, generator=g)
    kw = {} if batch_size is None else {"batch_size": batch_size}
    singles = [make_norm("bln", C, len(shape) - 2 or 1, **kw) for _ in range(k)]
    with torch.no_grad():
        for j, layer in enumerate(singles):
            layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=g))
    packed = sweeps._PackedBatchLayerNorm(k, C, **kw)
    sweeps._cat_state(packed, singles)
    for training in (True, False):
        packed.train(training), [s.train(training) for s in singles]
        xp = x.clone().requires_grad_(True)
        yp = packed(xp)
        (yp * dy).sum().backward()
        for j, layer in enumerate(singles):
            part = slice(j * C, (j + 1) * C)
            xs = x[:, part].clone().requires_grad_(True)
            ys = layer(xs)
            (ys * dy[:, part]).sum().backward()
            torch.testing.assert_close(yp[:, part], ys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(xp.grad[:, part], xs.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(packed.weight.grad[part], layer.weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(packed.bias.grad[part], layer.bias.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(packed.running_mean[part], layer.running_mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(packed.running_var[part], layer.running_var, rtol=1e-6, atol=1e-6)
            layer.zero_grad()
        packed.zero_grad()
    assert int(packed.num_batches_tracked) == int(singles[0].num_batches_tracked) == 1


MLP_NORMS = tuple(n for n in NORMS if n != "in")


@pytest.mark.parametrize("norm", MLP_NORMS)
def test_packed_mlp_training_is_the_separate_runs(norm):
    x, y = _data()
    kw = KWARGS.get(norm, {})
    packed = sweeps.PackedNet(norm, (4, 9), arch="mlp", hidden=(16, 12), image_size=8, norm_kwargs=kw)
    assert packed.grouped == (norm in sweeps.PACKABLE)
    _check_packed_against_separate_runs(packed, x, y, lambda: mlp(64, (16, 12), 10, activation="relu", norm=norm, **kw),
                                        flatten=True, steps=7)


def test_packed_mlp_rejects_instance_norm():
    with pytest.raises(ValueError):
        sweeps.PackedNet("in", (0,), arch="mlp", image_size=8)
    with pytest.raises(ValueError):
        sweeps.PackedNet("bn", (0,), arch="rnn")


def test_evaluate_packed_train_mode_does_not_touch_running_stats():
    x, y = _data()
    packed = sweeps.PackedNet("bn", (0, 1), image_size=8)
    sweeps.train_packed(packed, x, y, steps=3, batch_size=4, lr=0.05)
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    packed.eval()
    err = sweeps.evaluate_packed(packed, x, y, batch_size=2, mode="train")
    assert err.shape == (2,) and not packed.training
    for k, v in packed.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError):
        sweeps.evaluate_packed(packed, x, y, mode="test")


def test_packed_rejects_bad_input():
    with pytest.raises(ValueError):
        sweeps.PackedNet("xx", (0,))
    with pytest.raises(ValueError):
        sweeps.PackedNet("bn", ())
    with pytest.raises(ValueError):
        sweeps.PackedNet("bn", (0, -1))
    packed = sweeps.PackedNet("bn", (0, 1), image_size=8)
    with pytest.raises(ValueError):
        packed(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError):
        packed.unpack(2)
    x, y = _data()
    with pytest.raises(ValueError):
        sweeps.train_packed(packed, x, y, steps=0, batch_size=4, lr=0.1)
    with pytest.raises(ValueError):
        sweeps.train_packed(packed, x, y[:-1], steps=1, batch_size=4, lr=0.1)


# ------------------------------------------------------------------------------------------ the sweep
def test_lr_at():
    assert sweeps.lr_at(7, 10, 0.3) == 0.3
    lrs = [sweeps.lr_at(t, 20, 1.0, "warmup-linear", warmup=0.1) for t in range(1, 21)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1 / 19) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    with pytest.raises(ValueError):
        sweeps.lr_at(1, 10, 0.1, "cosine")
    x, y = _data()
    packed = sweeps.PackedNet("gn", (0,), image_size=8, norm_kwargs={"groups": 4})
    losses = sweeps.train_packed(packed, x, y, steps=5, batch_size=4, lr=0.1, schedule="warmup-linear")
    assert losses.shape == (5, 1)
    with pytest.raises(ValueError):
        sweeps.train_packed(packed, x, y, steps=5, batch_size=4, lr=0.1, schedule="cosine")
    with pytest.raises(ValueError):
        sweeps.train_packed(packed, x, y, steps=5, batch_size=4, lr=0.1, warmup=1.0)


def test_norm_kwargs_for():
    assert sweeps.norm_kwargs_for(None, 4) == {}
    assert sweeps.norm_kwargs_for({"groups": 2}, 4) == {"groups": 2}
    assert sweeps.norm_kwargs_for(lambda b: {"batch_size": b}, 8) == {"batch_size": 8}
    with pytest.raises(ValueError):
        sweeps.norm_kwargs_for(lambda b: None, 8)


def test_linear_lr():
    assert sweeps.linear_lr(0.1, 2, 32) == pytest.approx(0.00625)
    assert sweeps.linear_lr(0.1, 64) == pytest.approx(0.2)


def test_sweep_shapes_and_workers_do_not_change_results():
    x, y = _data(64)
    xv, yv = _data(40, seed=1)
    kw = dict(methods=("bn", "gn", "bln"), batch_sizes=(2, 8), seeds=(0, 1), examples=16, base_lr=0.1,
              norm_kwargs={"gn": {"groups": 4}}, train_mode_eval=("bn",), progress=False)
    one = sweeps.batch_size_sweep(x, y, xv, yv, **kw)
    assert one.errors.shape == (3, 2, 2) and one.seconds.shape == (3, 2)
    assert np.all((one.errors >= 0) & (one.errors <= 1))
    assert not one.diverged.any()
    assert np.isfinite(one.train_mode_errors[0]).all() and np.isnan(one.train_mode_errors[1:]).all()
    assert one.config["examples"] == 16 and one.config["lr_rule"] == "linear"
    two = sweeps.batch_size_sweep(x, y, xv, yv, workers=2, **kw)
    np.testing.assert_array_equal(one.errors, two.errors)
    pool = sweeps._POOL[0]
    three = sweeps.batch_size_sweep(x, y, xv, yv, workers=2, **kw)  # the next sweep reuses the pool
    assert sweeps._POOL[0] is pool and sweeps._POOL[3] == sweeps._start_method()
    np.testing.assert_array_equal(one.errors, three.errors)
    np.testing.assert_allclose(one.final_loss, two.final_loss, rtol=0, atol=0)



def test_worker_start_method(monkeypatch):
    """Workers are spawned inside a Jupyter kernel (a forked kernel shares its ZeroMQ sockets), forked in scripts."""
    import multiprocessing as mp
    import sys

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert sweeps._start_method() == ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert sweeps._start_method() == "spawn"


def test_workers_leave_interrupts_to_the_parent():
    """A worker ignores SIGINT (a Jupyter kernel's interrupt or shutdown reaches its whole process group)."""
    import signal

    old, old_progress = signal.getsignal(signal.SIGINT), sweeps._PROGRESS
    try:
        sweeps._init_worker(None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
        sweeps._PROGRESS = old_progress


def test_spawned_workers_give_the_same_results(monkeypatch):
    import sys

    x, y = _data(32)
    xv, yv = _data(20, seed=1)
    kw = dict(methods=("bn", "ln"), batch_sizes=(4,), seeds=(0,), examples=8, progress=False)
    one = sweeps.batch_size_sweep(x, y, xv, yv, **kw)
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    two = sweeps.batch_size_sweep(x, y, xv, yv, workers=2, **kw)
    np.testing.assert_array_equal(one.errors, two.errors)
    pool = sweeps._POOL[0]
    three = sweeps.batch_size_sweep(x, y, xv, yv, workers=2, **kw)  # the next sweep reuses the pool
    assert sweeps._POOL[0] is pool and sweeps._POOL[3] == sweeps._start_method()
    np.testing.assert_array_equal(one.errors, three.errors)


def test_sweep_cell_is_the_single_run():
    """One cell of the sweep is the run experiments.train makes with the same settings."""
    x, y = _data(64)
    xv, yv = _data(40, seed=1)
    res = sweeps.batch_size_sweep(x, y, xv, yv, methods=("bn",), batch_sizes=(4,), seeds=(7,), examples=32,
                                  base_lr=0.2, base_batch=8, progress=False)
    torch.manual_seed(7)
    single = small_cnn("bn", (8, 16), image_size=8)
    train(single, x[:, None], y, steps=8, batch_size=4, lr=0.1, momentum=0.9, seed=7)
    _, acc = evaluate(single, xv[:, None], yv)
    assert res.error("bn", 4)[0] == pytest.approx(1 - acc, abs=1e-9)


def test_sweep_only_runs_the_listed_cells():
    x, y = _data(64)
    res = sweeps.batch_size_sweep(x, y, x, y, methods=("bn", "ghost"), batch_sizes=(2, 8), seeds=(0,), examples=16,
                                  only={"ghost": (8,)}, norm_kwargs={"ghost": {"virtual_batch_size": 4}},
                                  arch="mlp", hidden=(8,), progress=False)
    assert res.ran("bn") == (2, 8) and res.ran("ghost") == (8,)
    assert np.isnan(res.error("ghost", 2)).all() and np.isfinite(res.error("ghost", 8)).all()
    assert "| ghost | - |" in res.table()
    three = sweeps.SweepResult(("bn",), (2,), (0, 1, 2), np.array([[[0.1, 0.5, 0.2]]]), np.zeros((1, 1, 3), bool),
                               np.zeros((1, 1, 3)), np.zeros((1, 1)))
    assert three.median("bn")[0] == pytest.approx(0.2) and "| bn | 20 [10, 50] |" in three.table(fmt=".0f")
    assert res.config["arch"] == "mlp" and res.config["hidden"] == (8,)
    with pytest.raises(ValueError):
        sweeps.batch_size_sweep(x, y, x, y, methods=("bn",), batch_sizes=(2,), examples=4, only={"bn": (4,)},
                                progress=False)
    with pytest.raises(ValueError):
        sweeps.batch_size_sweep(x, y, x, y, methods=("in",), batch_sizes=(2,), examples=4, arch="mlp",
                                progress=False)


def test_sweep_result_summaries():
    errors = np.array([[[0.30, 0.34], [0.20, 0.22]], [[0.25, 0.25], [0.24, 0.26]]])
    res = sweeps.SweepResult(("bn", "gn"), (2, 32), (0, 1), errors, np.zeros_like(errors, bool),
                             np.zeros_like(errors), np.zeros((2, 2)))
    np.testing.assert_allclose(res.mean("bn"), [0.32, 0.21])
    np.testing.assert_allclose(res.median("bn"), [0.32, 0.21])
    np.testing.assert_allclose(res.spread("bn"), [0.04, 0.02])
    assert res.variation("bn") == pytest.approx(0.11) and res.variation("gn") == pytest.approx(0.0)
    np.testing.assert_allclose(res.error("gn", 32), [0.24, 0.26])
    table = res.table({"bn": "BN"})
    assert "| BN | 32.0 [30.0, 34.0] | 21.0 [20.0, 22.0] |" in table and "batch 32" in table
    with pytest.raises(ValueError):
        res.mean("ln")
    with pytest.raises(ValueError):
        res.error("bn", 4)


@pytest.mark.parametrize("bad", [dict(methods=("xx",)), dict(methods=("bn", "bn")), dict(batch_sizes=(0,)),
                                 dict(examples=10), dict(base_lr=-1.0), dict(workers=0), dict(schedule="step"),
                                 dict(norm_kwargs={"bn": lambda b: 3}),
                                 dict(batch_sizes=(128,), examples=128)])
def test_sweep_rejects_bad_input(bad):
    x, y = _data(64)
    kw = dict(methods=("bn",), batch_sizes=(2, 4), seeds=(0,), examples=8, progress=False)
    kw.update(bad)
    with pytest.raises(ValueError):
        sweeps.batch_size_sweep(x, y, x, y, **kw)


def test_time_steps_is_positive():
    assert 0 < sweeps.time_steps("gn", 2, steps=3, image_size=8, norm_kwargs={"groups": 4}) < 5
