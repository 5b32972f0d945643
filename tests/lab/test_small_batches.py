"""Tests of bnlib.lab.small_batches: the axes cube, the sweep's networks and the sweep (plan and runners). The packed
trainer itself (k seeds trained as one, for every method) is tested in tests/lab/test_packed.py."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from bnlib import methods
from bnlib.lab import packed, small_batches
from bnlib.lab.models import make_norm, mlp, small_cnn
from bnlib.lab.train import History, evaluate, train

NORMS = methods.names(dim=2)  # the methods a CNN can use

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
    mask = small_batches.stats_mask(kind, (6, 6, 4), groups=2)
    assert mask.shape == (6, 6, 4) and mask.dtype == bool
    assert mask.sum() == count
    assert mask[5, 0].all()  # the anchor entry (last sample, first channel) is always in its own set


def test_stats_mask_axes():
    bn = small_batches.stats_mask("bn", (3, 4, 5), anchor=(1, 2))
    assert bn[:, 2].all() and bn.sum() == 3 * 5
    gn = small_batches.stats_mask("gn", (3, 4, 5), groups=2, anchor=(1, 3))
    assert gn[1, 2:4].all() and gn.sum() == 2 * 5


@pytest.mark.parametrize("bad", [dict(kind="xx"), dict(kind="gn", groups=4), dict(kind="gn", groups=0),
                                 dict(kind="bn", anchor=(6, 0)), dict(kind="bn", shape=(0, 2, 2))])
def test_stats_mask_rejects_bad_input(bad):
    kw = dict(shape=(6, 6, 4))
    kw.update(bad)
    kind = kw.pop("kind")
    with pytest.raises(ValueError):
        small_batches.stats_mask(kind, **kw)


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
    expected = small_batches.manual_normalize(x, kind, groups=groups, eps=layer.eps)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    for other in {"bn", "ln", "in"} - {kind}:  # and it is not one of the others
        assert not torch.allclose(y, small_batches.manual_normalize(x, other, eps=layer.eps), atol=1e-2)


@pytest.mark.parametrize("batch_size", [None, 2, 64])
def test_bln_layer_matches_the_stated_formula(batch_size):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 3, 3, generator=g) * 2 + torch.randn(4, 1, 1, 1, generator=g)
    kw = {} if batch_size is None else {"batch_size": batch_size}
    layer = make_norm("bln", 6, 2, **kw).train()
    with torch.no_grad():
        y = layer(x)
    expected = small_batches.manual_normalize(x, "bln", eps=layer.eps, batch_size=batch_size)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_manual_stats_rejects_bad_input():
    with pytest.raises(ValueError):
        small_batches.manual_stats(torch.zeros(2, 3), "bn")
    with pytest.raises(ValueError):
        small_batches.manual_stats(torch.zeros(2, 4, 3, 3), "gn", groups=3)
    with pytest.raises(ValueError):
        small_batches.manual_stats(torch.zeros(2, 4, 3, 3), "bln")


def test_draw_norm_cubes():
    import matplotlib.pyplot as plt

    fig = small_batches.draw_norm_cubes(groups=3, shape=(4, 6, 3))
    assert len(fig.axes) == 5
    assert all(len(ax.patches) > 0 for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes] == list(small_batches.CUBE_METHODS)
    plt.close(fig)
    with pytest.raises(ValueError):
        small_batches.draw_norm_cubes(["bn", "ghost"])


# ------------------------------------------------------------------------------------------ the sweep's networks
@pytest.mark.parametrize("norm", NORMS)
def test_packed_net_starts_from_the_seeded_single_networks(norm):
    net = small_batches.packed_net(norm, (3, 11), image_size=8, norm_kwargs=KWARGS.get(norm))
    assert isinstance(net, packed.PackedNet) and net.seeds == (3, 11)
    assert net.grouped == (norm in small_batches.PACKABLE)
    for j, seed in enumerate((3, 11)):
        torch.manual_seed(seed)
        single = small_cnn(norm, (8, 16), image_size=8, **KWARGS.get(norm, {}))
        got = net.unpack(j).state_dict()
        for key, value in single.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_packed_net_mlp_and_the_global_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    net = small_batches.packed_net("ln", (4, 9), arch="mlp", hidden=(16, 12), image_size=8)
    torch.testing.assert_close(torch.rand(3), expected)  # the global generator is left alone
    torch.manual_seed(9)
    single = mlp(64, (16, 12), 10, activation="relu", norm="ln")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(net.unpack(1).state_dict()[key], value, rtol=0, atol=0)
    assert small_batches.single_net("ln", arch="mlp", hidden=(16, 12), image_size=8).state_dict().keys() == \
        single.state_dict().keys()


def test_packed_net_rejects_bad_input():
    with pytest.raises(ValueError, match="norm"):
        small_batches.packed_net("xx", (0,))
    with pytest.raises(ValueError, match="seeds"):
        small_batches.packed_net("bn", ())
    with pytest.raises(ValueError, match="seeds"):
        small_batches.packed_net("bn", (0, -1))
    with pytest.raises(ValueError):  # instance norm needs feature maps
        small_batches.packed_net("in", (0,), arch="mlp", image_size=8)
    with pytest.raises(ValueError, match="arch"):
        small_batches.packed_net("bn", (0,), arch="rnn")


# ------------------------------------------------------------------------------------------ the sweep
def test_schedules_are_the_packed_trainers():
    assert small_batches.lr_at is packed.lr_at and small_batches.SCHEDULES == packed.SCHEDULES


def test_norm_kwargs_for():
    assert small_batches.norm_kwargs_for(None, 4) == {}
    assert small_batches.norm_kwargs_for({"groups": 2}, 4) == {"groups": 2}
    assert small_batches.norm_kwargs_for(lambda b: {"batch_size": b}, 8) == {"batch_size": 8}
    with pytest.raises(ValueError):
        small_batches.norm_kwargs_for(lambda b: None, 8)


def test_linear_lr():
    assert small_batches.linear_lr(0.1, 2, 32) == pytest.approx(0.00625)
    assert small_batches.linear_lr(0.1, 64) == pytest.approx(0.2)


def test_sweep_shapes_and_workers_do_not_change_results():
    x, y = _data(64)
    xv, yv = _data(40, seed=1)
    kw = dict(methods=("bn", "gn", "bln"), batch_sizes=(2, 8), seeds=(0, 1), examples=16, base_lr=0.1,
              norm_kwargs={"gn": {"groups": 4}}, train_mode_eval=("bn",), progress=False)
    one = small_batches.batch_size_sweep(x, y, xv, yv, **kw)
    assert one.errors.shape == (3, 2, 2) and one.seconds.shape == (3, 2)
    assert np.all((one.errors >= 0) & (one.errors <= 1))
    assert not one.diverged.any()
    assert np.isfinite(one.train_mode_errors[0]).all() and np.isnan(one.train_mode_errors[1:]).all()
    assert one.config["examples"] == 16 and one.config["lr_rule"] == "linear"
    two = small_batches.batch_size_sweep(x, y, xv, yv, workers=2, **kw)
    np.testing.assert_array_equal(one.errors, two.errors)
    pool = small_batches._POOL[0]
    three = small_batches.batch_size_sweep(x, y, xv, yv, workers=2, **kw)  # the next sweep reuses the pool
    assert small_batches._POOL[0] is pool and small_batches._POOL[3] == small_batches._start_method()
    np.testing.assert_array_equal(one.errors, three.errors)
    np.testing.assert_allclose(one.final_loss, two.final_loss, rtol=0, atol=0)



def test_worker_start_method(monkeypatch):
    """Workers are spawned inside a Jupyter kernel (a forked kernel shares its ZeroMQ sockets), forked in scripts."""
    import multiprocessing as mp
    import sys

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert small_batches._start_method() == ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert small_batches._start_method() == "spawn"


def test_workers_leave_interrupts_to_the_parent():
    """A worker ignores SIGINT (a Jupyter kernel's interrupt or shutdown reaches its whole process group)."""
    import signal

    old, old_progress = signal.getsignal(signal.SIGINT), small_batches._PROGRESS
    try:
        small_batches._init_worker(None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
        small_batches._PROGRESS = old_progress


def test_spawned_workers_give_the_same_results(monkeypatch):
    import sys

    x, y = _data(32)
    xv, yv = _data(20, seed=1)
    kw = dict(methods=("bn", "ln"), batch_sizes=(4,), seeds=(0,), examples=8, progress=False)
    one = small_batches.batch_size_sweep(x, y, xv, yv, **kw)
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    two = small_batches.batch_size_sweep(x, y, xv, yv, workers=2, **kw)
    np.testing.assert_array_equal(one.errors, two.errors)
    pool = small_batches._POOL[0]
    three = small_batches.batch_size_sweep(x, y, xv, yv, workers=2, **kw)  # the next sweep reuses the pool
    assert small_batches._POOL[0] is pool and small_batches._POOL[3] == small_batches._start_method()
    np.testing.assert_array_equal(one.errors, three.errors)


def test_sweep_cell_is_the_single_run():
    """One cell of the sweep is the run experiments.train makes with the same settings."""
    x, y = _data(64)
    xv, yv = _data(40, seed=1)
    res = small_batches.batch_size_sweep(x, y, xv, yv, methods=("bn",), batch_sizes=(4,), seeds=(7,), examples=32,
                                  base_lr=0.2, base_batch=8, progress=False)
    torch.manual_seed(7)
    single = small_cnn("bn", (8, 16), image_size=8)
    train(single, x[:, None], y, steps=8, batch_size=4, lr=0.1, momentum=0.9, seed=7)
    _, acc = evaluate(single, xv[:, None], yv)
    assert res.error("bn", 4)[0] == pytest.approx(1 - acc, abs=1e-9)


def test_sweep_only_runs_the_listed_cells():
    x, y = _data(64)
    res = small_batches.batch_size_sweep(x, y, x, y, methods=("bn", "ghost"), batch_sizes=(2, 8), seeds=(0,),
                                         examples=16, only={"ghost": (8,)},
                                         norm_kwargs={"ghost": {"virtual_batch_size": 4}}, arch="mlp", hidden=(8,),
                                         progress=False)
    assert res.ran("bn") == (2, 8) and res.ran("ghost") == (8,)
    assert np.isnan(res.error("ghost", 2)).all() and np.isfinite(res.error("ghost", 8)).all()
    assert "| ghost | - |" in res.table()
    three = small_batches.SweepResult(("bn",), (2,), (0, 1, 2), np.array([[[0.1, 0.5, 0.2]]]),
                                      np.zeros((1, 1, 3), bool), np.zeros((1, 1, 3)), np.zeros((1, 1)))
    assert three.median("bn")[0] == pytest.approx(0.2) and "| bn | 20 [10, 50] |" in three.table(fmt=".0f")
    assert res.config["arch"] == "mlp" and res.config["hidden"] == (8,)
    with pytest.raises(ValueError):
        small_batches.batch_size_sweep(x, y, x, y, methods=("bn",), batch_sizes=(2,), examples=4, only={"bn": (4,)},
                                progress=False)
    with pytest.raises(ValueError):
        small_batches.batch_size_sweep(x, y, x, y, methods=("in",), batch_sizes=(2,), examples=4, arch="mlp",
                                progress=False)


def test_sweep_result_summaries():
    errors = np.array([[[0.30, 0.34], [0.20, 0.22]], [[0.25, 0.25], [0.24, 0.26]]])
    res = small_batches.SweepResult(("bn", "gn"), (2, 32), (0, 1), errors, np.zeros_like(errors, bool),
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
        small_batches.batch_size_sweep(x, y, x, y, **kw)


def test_plan_sweep_cells_and_tasks():
    """The plan: one cell per method x batch size (those `only` allows), each with its linearly scaled learning
    rate and layer arguments; cells whose seeds are not packed become one task per seed with workers."""
    kw = dict(methods=("bn", "rms"), batch_sizes=(2, 8), seeds=(0, 1), examples=16, base_lr=0.1, base_batch=8,
              arch="mlp", hidden=(8,), norm_kwargs={"bn": lambda b: {"momentum": 1 / b}}, train_mode_eval=("bn",),
              only={"rms": (8,)})
    plan = small_batches.plan_sweep(**kw)
    assert plan.config == small_batches.SweepConfig(examples=16, arch="mlp", hidden=(8,))
    assert sorted(plan.cells) == [(0, 0), (0, 1), (1, 1)] and plan.workers == 1
    cell = plan.cells[0, 0]
    assert (cell.method, cell.batch_size, cell.seeds, cell.train_mode_eval) == ("bn", 2, (0, 1), True)
    assert cell.lr == pytest.approx(0.1 * 2 / 8) and cell.norm_kwargs == {"momentum": 0.5}
    assert cell.steps(plan.config) == 8 and cell.packed(plan.config)
    assert not plan.cells[1, 1].packed(plan.config)  # RMS norm is not packable: k separate networks
    assert plan.tasks == list(plan.cells.values()) and plan.total_steps == 8 + 2 + 2
    split = small_batches.plan_sweep(workers=2, **kw)
    assert [(t.key, t.seeds, t.part) for t in split.tasks if t.method == "rms"] == [((1, 1), (0,), 0),
                                                                                   ((1, 1), (1,), 1)]
    assert small_batches.plan_sweep(workers=2, device="cuda", **kw).workers == 1  # worker processes: CPU only
    unpacked = small_batches.plan_sweep(workers=2, pack=False, **kw)
    assert len(unpacked.tasks) == 2 * len(unpacked.cells)


@pytest.mark.parametrize("bad", [dict(seeds=()), dict(seeds=(-1,)), dict(warmup=1.0), dict(momentum=1.5),
                                 dict(base_batch=0), dict(threads=0), dict(n_train=4)])
def test_plan_sweep_rejects_bad_input(bad):
    kw = dict(methods=("bn",), batch_sizes=(2, 8), seeds=(0,), examples=16)
    kw.update(bad)
    name = next(iter(bad)) if "n_train" not in bad else "batch_sizes"
    with pytest.raises(ValueError, match=f"{name}: expected|{name}: the largest"):
        small_batches.plan_sweep(**kw)


def test_run_cell_with_a_config():
    x, y = _data(64)
    xv, yv = _data(40, seed=1)
    config = small_batches.SweepConfig(examples=16, arch="mlp", hidden=(8,), schedule="warmup-linear")
    cell = small_batches.SweepCell((0, 0), "bn", 4, (0, 1), 0.05, {}, train_mode_eval=True)
    ticks = []
    out = small_batches._run_cell(cell, config, (x, y, xv, yv), on_step=ticks.append)
    assert ticks == [1, 2, 3, 4]
    assert out["errors"].shape == out["train_mode_errors"].shape == out["final_loss"].shape == (2,)
    assert not out["diverged"].any() and out["seconds"] > 0
    # the error of network 1 is what evaluate() gives the same network trained alone
    torch.manual_seed(1)
    single = mlp(64, (8,), 10, activation="relu", norm="bn")
    opt = torch.optim.SGD(single.parameters(), lr=0.05, momentum=0.9)

    def schedule(t, _model):
        for group in opt.param_groups:
            group["lr"] = small_batches.lr_at(t, 4, 0.05, "warmup-linear", 0.1)

    train(single, x, y, steps=4, batch_size=4, lr=0.05, optimizer=opt, seed=1, before_step=schedule)
    assert out["errors"][1] == pytest.approx(1 - evaluate(single, xv, yv)[1], abs=1e-9)


def test_loss_matrix_marks_diverged_networks():
    hists = [History(train_loss=[1.0, 0.5, 0.25]), History(train_loss=[2.0, float("inf")], diverged=True)]
    m = small_batches._loss_matrix(hists, 3)
    assert m.dtype == np.float32 and m.shape == (3, 2)
    np.testing.assert_array_equal(m[:, 0], [1.0, 0.5, 0.25])
    assert m[0, 1] == 2.0 and np.isnan(m[1:, 1]).all()


def test_time_steps_is_positive():
    assert 0 < small_batches.time_steps("gn", 2, steps=3, image_size=8, norm_kwargs={"groups": 4}) < 5


def test_error_se_and_renorm_kwargs():
    import pickle

    from bnlib.lab.small_batches import RenormKwargs, error_se
    from bnlib.numpy.batch_renorm import RenormSchedule

    assert error_se(0.02, 500) == pytest.approx((0.02 * 0.98 / 500) ** 0.5)
    np.testing.assert_allclose(error_se(np.array([0.0, 0.5]), 100), [0.0, 0.05])
    with pytest.raises(ValueError, match="error"):
        error_se(1.5, 10)
    with pytest.raises(ValueError, match="n"):
        error_se(0.1, 0)
    k = RenormKwargs(1.5, 0.5, 4096)
    assert k(2) == {"r_max": 1.5, "d_max": 0.5, "schedule": RenormSchedule(128, 1024, 640)}
    assert k(64)["schedule"] == RenormSchedule(4, 32, 20)
    assert pickle.loads(pickle.dumps(k)) == k
    with pytest.raises(ValueError, match="fraction"):
        RenormKwargs(1.5, 0.5, 4096, fraction=0.0)
    with pytest.raises(ValueError, match="r_max"):
        RenormKwargs(0.5, 0.5, 4096)
