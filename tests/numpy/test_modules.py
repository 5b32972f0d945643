"""bnlib.numpy modules: torch.nn-shaped state, train/eval, backward, and the stats helpers."""
import numpy as np
import pytest
import torch

import bnlib.numpy as bnp
from tests.numpy._testutils import close, rand, t


@pytest.mark.parametrize("name,args", [("BatchNorm1d", (3,)), ("BatchNorm2d", (3,)), ("BatchNorm3d", (3,)),
                                       ("InstanceNorm2d", (3,)), ("LayerNorm", ((3, 4),)),
                                       ("GroupNorm", (3, 6))])
@pytest.mark.parametrize("flags", [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}])
def test_state_dict_names_match_torch(name, args, flags):
    if name in ("LayerNorm", "GroupNorm") and "track_running_stats" in flags:
        pytest.skip("no running statistics")
    if name == "LayerNorm" and "affine" in flags:
        flags = {"elementwise_affine": False}
    ours = getattr(bnp, name)(*args, **flags)
    theirs = getattr(torch.nn, name)(*args, **flags)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[key], value.numpy())
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if hasattr(theirs, attr):
            assert (getattr(ours, attr) is None) == (getattr(theirs, attr) is None)


def test_defaults_and_repr_match_torch():
    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"):
        ours, theirs = getattr(bnp, name)(5), getattr(torch.nn, name)(5)
        assert repr(ours) == repr(theirs)
        assert repr(getattr(bnp, name)(5, affine=True, bias=False)) == repr(getattr(torch.nn, name)(5, affine=True,
                                                                                                    bias=False))
        assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == \
               (theirs.eps, theirs.momentum, theirs.affine, theirs.track_running_stats)
    assert bnp.BatchNorm2d(4).weight.dtype == np.float32
    assert repr(bnp.GroupNorm(2, 4)) == repr(torch.nn.GroupNorm(2, 4))
    assert repr(bnp.LayerNorm((2, 3))) == repr(torch.nn.LayerNorm((2, 3)))


def test_train_eval_and_parameters():
    m = bnp.BatchNorm2d(3)
    assert m.training
    assert m.eval() is m and not m.training
    assert m.train() is m and m.training
    assert [p.shape for p in m.parameters()] == [(3,), (3,)]
    assert [b.shape for b in m.buffers()] == [(3,), (3,), ()]
    assert bnp.BatchNorm2d(3, affine=False).parameters() == []


def test_module_backward_matches_torch_in_train_and_eval():
    rng = np.random.default_rng(0)
    m = bnp.BatchNorm2d(3, dtype=np.float64)
    tm = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    m.weight[...] = rand(rng, 3)
    m.bias[...] = rand(rng, 3)
    tm.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in m.state_dict().items()})
    for mode in ("train", "eval", "train"):
        getattr(m, mode)()
        getattr(tm, mode)()
        x, dy = rand(rng, (4, 3, 5, 5), 2.0, 1.0), rand(rng, (4, 3, 5, 5))
        xt = t(x, True)
        tm.zero_grad()
        yt = tm(xt)
        yt.backward(t(dy))
        close(m(x), yt)
        close(m.backward(dy), xt.grad)
        close(m.dweight, tm.weight.grad)
        close(m.dbias, tm.bias.grad)
        assert set(m.grads()) == {"weight", "bias"}


def test_bias_false_like_torch():
    rng = np.random.default_rng(5)
    m = bnp.BatchNorm1d(3, bias=False, dtype=np.float64)
    tm = torch.nn.BatchNorm1d(3, bias=False, dtype=torch.float64)
    x, dy = rand(rng, (6, 3)), rand(rng, (6, 3))
    xt = t(x, True)
    yt = tm(xt)
    yt.backward(t(dy))
    close(m(x), yt)
    close(m.backward(dy), xt.grad)
    close(m.dweight, tm.weight.grad)
    assert m.dbias is None


def test_no_running_stats_uses_batch_stats_in_eval_like_torch():
    rng = np.random.default_rng(1)
    m = bnp.BatchNorm1d(3, track_running_stats=False, dtype=np.float64).eval()
    tm = torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64).eval()
    x = rand(rng, (6, 3), 3.0, 2.0)
    close(m(x), tm(t(x)))
    assert m.num_batches_tracked is None


def test_affine_false_has_no_parameter_gradients():
    rng = np.random.default_rng(2)
    m = bnp.BatchNorm1d(3, affine=False, dtype=np.float64)
    x = rand(rng, (6, 3))
    m(x)
    dx = m.backward(np.ones_like(x))
    assert m.dweight is None and m.dbias is None
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)  # a constant gradient is projected out


def test_load_state_dict_from_torch_checks_before_copying():
    tm = torch.nn.BatchNorm2d(3)
    tm.running_mean += 1.0
    m = bnp.BatchNorm2d(3)
    m.load_state_dict(tm.state_dict())
    np.testing.assert_array_equal(m.running_mean, 1.0)
    bad = dict(tm.state_dict())
    bad["running_var"] = torch.ones(4)
    with pytest.raises(ValueError, match="running_var: expected shape"):
        m.load_state_dict(bad)
    np.testing.assert_array_equal(m.running_mean, 1.0)
    with pytest.raises(KeyError, match="missing keys"):
        m.load_state_dict({"weight": np.ones(3)})
    m.reset_parameters()
    np.testing.assert_array_equal(m.running_mean, 0.0)
    assert int(m.num_batches_tracked) == 0


def test_instance_norm_momentum_none_freezes_running_stats_like_torch():
    rng = np.random.default_rng(3)
    m = bnp.InstanceNorm1d(2, momentum=None, track_running_stats=True, dtype=np.float64)
    tm = torch.nn.InstanceNorm1d(2, momentum=None, track_running_stats=True, dtype=torch.float64)
    x = rand(rng, (3, 2, 5), 2.0, 1.0)
    close(m(x), tm(t(x)))
    close(m.running_mean, tm.running_mean)
    np.testing.assert_array_equal(m.running_mean, 0.0)


def test_float32_module_float64_input_gives_float64():
    rng = np.random.default_rng(4)
    m = bnp.BatchNorm1d(3)
    x = rand(rng, (5, 3))
    assert m(x).dtype == np.float64 and m.running_mean.dtype == np.float32
    assert m.backward(x).dtype == np.float64


def test_naive_variance_is_unstable_and_the_stable_ones_are_not():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) + 1e4).astype(np.float32)
    exact = np.var(x.astype(np.float64))
    assert abs(float(bnp.naive_var(x)) - exact) > 0.1  # catastrophic cancellation in float32
    assert abs(float(bnp.two_pass_var(x)) - exact) < 1e-3
    assert abs(float(bnp.welford_var(x)) - exact) < 1e-3
    assert bnp.naive_var(x).dtype == np.float32
    # the same along an axis
    x2 = (rng.standard_normal((200, 3)) * [1, 2, 3] + 1e4).astype(np.float32)
    exact2 = x2.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(bnp.two_pass_var(x2, axis=0), exact2, rtol=1e-3)
    np.testing.assert_allclose(bnp.welford_var(x2, axis=0), exact2, rtol=1e-3)
    x64 = rng.standard_normal((4, 5, 6))
    for axis in (None, 1, (0, 2)):
        np.testing.assert_allclose(bnp.welford_var(x64, axis=axis), x64.var(axis=axis), rtol=1e-12)
        np.testing.assert_allclose(bnp.naive_var(x64, axis=axis), x64.var(axis=axis), rtol=1e-8)


def test_channel_stats():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 3, 4, 4)) + 1e4).astype(np.float32)
    mean, var = bnp.channel_stats(x)
    ref = x.astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(var, ref.var(axis=(0, 2, 3)), rtol=1e-5)


def test_benchmark_quick_smoke_run(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_numpy.py"
    spec = importlib.util.spec_from_file_location("bench_numpy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--quick", "--repeats", "2", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert "ratio to torch" in out and "bnlib module" in out
    assert results["max_abs_dx_error"] < 1e-4


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
def test_blocked_kernels_with_small_blocks(monkeypatch, chunk):
    """Force many blocks (rows split across blocks, blocks smaller than a row) and compare with one block."""
    from bnlib.numpy import stats
    rng = np.random.default_rng(chunk)
    x, dy = rand(rng, (5, 4, 3, 3), 2.0, 1.0), rand(rng, (5, 4, 3, 3))
    w, b = rand(rng, 4), rand(rng, 4)
    calls = [
        lambda: bnp.batch_norm(x, None, None, w, b, training=True),
        lambda: bnp.batch_norm_backward(dy, x, w),
        lambda: bnp.layer_norm(x, (4, 3, 3)),
        lambda: bnp.layer_norm_backward(dy, x, (3, 3)),
        lambda: bnp.group_norm_backward(dy, x, 2, w),
        lambda: bnp.batch_layer_norm_backward(dy, x, w),
    ]
    expected = [c() for c in calls]
    monkeypatch.setattr(stats, "_CHUNK", chunk)
    for c, e in zip(calls, expected):
        got = c()
        for g, ee in zip(got if isinstance(got, tuple) else (got,), e if isinstance(e, tuple) else (e,)):
            np.testing.assert_allclose(g, ee, rtol=1e-10, atol=1e-12)
