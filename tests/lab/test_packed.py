"""Tests of bnlib.lab.packed, the one packed-seed trainer: k networks trained as one are the k separate runs of
bnlib.lab.train.train (same initial weights, same mini-batches, same optimizer), for MLPs and CNNs with every
packable normalization method, one learning rate per network, schedules, hooks, divergence and bad input."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnlib import methods
from bnlib._setup import derive_seed
from bnlib.lab import packed as P
from bnlib.lab.models import make_norm, mlp, small_cnn
from bnlib.lab.train import StopTraining, evaluate, run, steps_to_accuracy, train
from tests._numerics import assert_error_within


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the sweeps use (tiny layers on a busy machine are much slower with more)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


KWARGS = {"gn": {"groups": 4}, "ghost": {"virtual_batch_size": 2}, "brn": {"r_max": 1.5, "d_max": 0.5}}
CNN_NORMS = methods.names(dim=2)
MLP_NORMS = methods.names(dim=1)


def _images(n=48, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _vectors(n=120, d=20, seed=0):
    """Ten classes, each a fixed random pattern plus noise (learnable in a few dozen steps)."""
    patterns = torch.rand(10, d, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    return patterns[y] + 0.3 * torch.randn(n, d, generator=g), y


def _cnn(norm):
    return lambda: small_cnn(norm, (8, 16), image_size=8, **KWARGS.get(norm, {}))


def _mlp(norm, d=64, activation="relu"):
    return lambda: mlp(d, (16, 12), 10, activation=activation, norm=norm, **KWARGS.get(norm, {}))


def _seeded(build, seed):
    torch.manual_seed(derive_seed(seed))
    return build()


# ------------------------------------------------------------------------------------------ the loop
def test_run_draws_one_batch_stream_per_seed():
    """run() with a sequence of seeds draws, in row j, exactly the batches a run with seed=seeds[j] draws."""
    def record(into):
        return lambda t, idx: into.append(idx.clone()) or 0.0

    rows = []
    run(10, record(rows), steps=7, batch_size=4, seed=[3, 8])  # 2 steps per epoch: crosses 3 epochs
    assert rows[0].shape == (2, 4)
    for j, s in enumerate((3, 8)):
        alone = []
        run(10, record(alone), steps=7, batch_size=4, seed=s)
        assert all(torch.equal(a, r[j]) for a, r in zip(alone, rows))
    with pytest.raises(ValueError, match="seed"):
        run(10, record([]), steps=1, batch_size=4, seed=[])


# ------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("norm", CNN_NORMS)
def test_unpacking_gives_back_the_seeded_networks(norm):
    pack = P.PackedNet.from_seeds(_cnn(norm), (3, 11))
    assert pack.grouped == methods.get(norm).packable and pack.seeds == (3, 11)
    for j, seed in enumerate((3, 11)):
        single = _seeded(_cnn(norm), seed)
        got = pack.unpack(j).state_dict()
        assert list(got) == list(single.state_dict())
        for key, value in single.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_packing_leaves_the_global_generator_and_the_models_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    P.PackedNet.from_seeds(_cnn("bn"), (0, 1))
    torch.testing.assert_close(torch.rand(3), expected)
    models = [_seeded(_mlp("bn"), s) for s in (0, 1)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    pack = P.PackedNet(models)
    with torch.no_grad():
        next(pack.parameters()).add_(1.0)
    for m, b in zip(models, before):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in b.items())


def test_non_packable_methods_stay_separate_networks():
    """RMS norm is not packable in the registry: the pack keeps k networks (same interface)."""
    assert not methods.get("rms").packable
    pack = P.PackedNet.from_seeds(_mlp("rms"), (0, 1))
    assert not pack.grouped
    assert not P.PackedNet.from_seeds(_mlp("bn"), (0, 1), pack=False).grouped
    x, _ = _images(5)
    assert pack(x.unsqueeze(1).expand(5, 2, 8, 8)).shape == (5, 2, 10)


def _check_against_separate_runs(pack, make_single, x, y, steps, **kw):
    """Train ``pack`` and compare its network ``j`` with bnlib.lab.train.train on the single network
    ``make_single()`` built after the seed ``pack.seeds[j]`` (same initial weights, same mini-batch order).

    Grouped and separate layers sum in different orders, and that float32 rounding depends on the processor's
    kernels (ghost BN with virtual batches of two amplifies it ~4000-fold), so no constant tolerance fits every
    machine: the losses, final state and eval-mode logits of both float32 runs are judged by their error
    against the same single run in float64, the packed run's within a few times the separate run's
    (tests/_numerics.py)."""
    k = pack.k
    kw = dict(steps=steps, batch_size=4, lr=0.05, momentum=0.9, **kw)
    hists = P.train_packed(pack, x, y, **kw)
    assert len(hists) == k and all(len(h.train_loss) == steps and not h.diverged for h in hists)
    losses, accs = P.evaluate_packed(pack, x, y)
    pack.eval()
    with torch.no_grad():
        logits = pack(x.unsqueeze(1).expand(len(x), k, *x.shape[1:]))  # what evaluate_packed classifies
    xin = x[:, None] if x.dim() == 3 and isinstance(make_single()[0], nn.Conv2d) else x
    for j, seed in enumerate(pack.seeds):
        single = _seeded(make_single, seed)
        twin = copy.deepcopy(single).double()
        hist = train(single, xin, y, seed=seed, **kw)
        truth = train(twin, xin.double(), y, seed=seed, **kw)
        assert_error_within(hists[j].train_loss, hist.train_loss, truth.train_loss, what=f"network {j}: losses")
        got, ref = pack.unpack(j).state_dict(), single.state_dict()
        assert list(got) == list(ref)
        for key, value in twin.state_dict().items():
            if value.is_floating_point():
                assert_error_within(got[key], ref[key], value, what=f"network {j}: {key}")
            else:
                assert torch.equal(got[key], ref[key]), key
        single.eval(), twin.eval()
        with torch.no_grad():
            assert_error_within(logits[:, j], single(xin), twin(xin.double()), what=f"network {j}: eval logits")
        # evaluate_packed's numbers are those of these logits (a prediction may flip only where two classes tie)
        assert accs[j] == pytest.approx((logits[:, j].argmax(1) == y).double().mean().item(), abs=1e-9)
        ce = nn.functional.cross_entropy(logits[:, j], y).item()
        assert losses[j] == pytest.approx(ce, rel=1e-5)


@pytest.mark.parametrize("norm", CNN_NORMS)
def test_packed_cnn_is_the_separate_runs(norm):
    x, y = _images()
    _check_against_separate_runs(P.PackedNet.from_seeds(_cnn(norm), (2, 5)), _cnn(norm), x, y, steps=9)


@pytest.mark.parametrize("norm", MLP_NORMS)
def test_packed_mlp_is_the_separate_runs(norm):
    x, y = _images()
    x = x.reshape(len(x), -1)
    _check_against_separate_runs(P.PackedNet.from_seeds(_mlp(norm), (4, 9)), _mlp(norm), x, y, steps=7)


def test_packed_cnn_reads_images_with_a_channel_dimension():
    x, y = _images()
    a = P.PackedNet.from_seeds(_cnn("gn"), (0, 1))
    b = copy.deepcopy(a)
    ha = P.train_packed(a, x, y, steps=4, batch_size=4, lr=0.05)
    hb = P.train_packed(b, x[:, None], y, steps=4, batch_size=4, lr=0.05)
    assert [h.train_loss for h in ha] == [h.train_loss for h in hb]


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
        for layer in singles:
            layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=g))
    packed = P._packed_norm(singles, k)
    assert isinstance(packed, P._PackedBatchLayerNorm) and packed.batch_size == batch_size
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


# ------------------------------------------------------------------------------------------ the trainer
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_one_learning_rate_per_network(momentum):
    """lr[j] for network j: the same runs as separate calls of train() at those rates (SGD, +- momentum)."""
    x, y = _vectors()
    xe, ye = _vectors(60, seed=1)
    scale = 1.0 if momentum == 0 else 0.1  # momentum 0.9 multiplies the step by up to 10
    points = [(0.05 * scale, 0), (0.2 * scale, 0), (0.5 * scale, 3)]  # (lr, seed): two rates for one seed
    build = _mlp("bn", d=20, activation="sigmoid")
    pack = P.PackedNet([_seeded(build, s) for _, s in points])
    hists = P.train_packed(pack, x, y, seeds=[s for _, s in points], steps=25, batch_size=30,
                           lr=[lr for lr, _ in points], momentum=momentum, x_eval=xe, y_eval=ye, eval_every=10)
    for j, (lr, s) in enumerate(points):
        model = _seeded(build, s)
        ref = train(model, x, y, steps=25, batch_size=30, lr=lr, momentum=momentum, x_eval=xe, y_eval=ye,
                    eval_every=10, seed=s)
        assert hists[j].eval_steps == ref.eval_steps == [0, 10, 20, 25]
        assert np.allclose(hists[j].train_loss, ref.train_loss, atol=1e-4)
        assert np.allclose(hists[j].eval_loss, ref.eval_loss, atol=1e-4)
        assert np.allclose(hists[j].eval_acc, ref.eval_acc, atol=0.02)  # at most one example flips
        got = pack.unpack(j).state_dict()
        for name, value in model.state_dict().items():
            assert torch.allclose(got[name].float(), value.float(), atol=1e-4), (lr, name)


def test_schedule_with_one_learning_rate_per_network():
    """'warmup-linear' scales each network's own rate: train() with the rate set by lr_at before every step."""
    x, y = _vectors()
    steps, rates = 20, [0.3, 1.0]
    pack = P.PackedNet.from_seeds(_mlp("bn", d=20), (1, 2))
    hists = P.train_packed(pack, x, y, steps=steps, batch_size=10, lr=rates, momentum=0.5,
                           schedule="warmup-linear", warmup=0.2)
    for j, (lr, s) in enumerate(zip(rates, (1, 2))):
        model = _seeded(_mlp("bn", d=20), s)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)

        def set_lr(t, _model, opt=opt, lr=lr):
            for group in opt.param_groups:
                group["lr"] = P.lr_at(t, steps, lr, "warmup-linear", 0.2)

        ref = train(model, x, y, steps=steps, batch_size=10, lr=lr, optimizer=opt, seed=s, before_step=set_lr)
        assert np.allclose(hists[j].train_loss, ref.train_loss, atol=1e-5)
        got = pack.unpack(j).state_dict()
        for name, value in model.state_dict().items():
            assert torch.allclose(got[name].float(), value.float(), atol=1e-5), name


def test_adam_is_the_separate_runs():
    x, y = _vectors()
    pack = P.PackedNet.from_seeds(_mlp("bn", d=20), (0, 5))
    hists = P.train_packed(pack, x, y, steps=15, batch_size=12, lr=1e-2, optimizer="adam")
    for j, s in enumerate((0, 5)):
        ref = train(_seeded(_mlp("bn", d=20), s), x, y, steps=15, batch_size=12, lr=1e-2, optimizer="adam", seed=s)
        assert np.allclose(hists[j].train_loss, ref.train_loss, atol=1e-4)


def test_lr_at():
    assert P.lr_at(7, 10, 0.3) == 0.3
    lrs = [P.lr_at(t, 20, 1.0, "warmup-linear", warmup=0.1) for t in range(1, 21)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1 / 19) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    with pytest.raises(ValueError, match="schedule"):
        P.lr_at(1, 10, 0.1, "cosine")


def test_target_stops_when_every_network_has_reached_it():
    x, y = _vectors()
    rates = [0.2, 2.0]
    pack = P.PackedNet([_seeded(_mlp("bn", d=20), 0) for _ in rates])
    hists = P.train_packed(pack, x, y, seeds=[0, 0], steps=300, batch_size=20, lr=rates, x_eval=x, y_eval=y,
                           eval_every=5, target=0.9)
    hits = [steps_to_accuracy(h, 0.9) for h in hists]
    assert None not in hits and hits[0] != hits[1] and max(hits) < 300  # the faster network runs on
    assert all(h.eval_steps[-1] == max(hits) and len(h.train_loss) == max(hits) for h in hists)
    for lr, hit in zip(rates, hits):
        ref = train(_seeded(_mlp("bn", d=20), 0), x, y, steps=max(hits), batch_size=20, lr=lr, x_eval=x, y_eval=y,
                    eval_every=5, seed=0)
        assert steps_to_accuracy(ref, 0.9) == hit


def test_hooks_see_the_pack_and_may_stop_training():
    x, y = _vectors()
    pack = P.PackedNet.from_seeds(_mlp("bn", d=20), (2, 5))
    calls, befores = [], []

    def callback(step, model, xb, yb):
        assert model is pack
        calls.append((step, tuple(xb.shape), tuple(yb.shape)))
        if step == 7:
            raise StopTraining

    hists = P.train_packed(pack, x, y, steps=20, batch_size=6, lr=0.1, x_eval=x, y_eval=y, eval_every=5,
                           callback=[callback], before_step=lambda t, m: befores.append(t))
    assert calls[0] == (1, (6, 2, 20), (6, 2)) and [c[0] for c in calls] == list(range(1, 8))
    assert befores == list(range(1, 8))
    assert all(h.eval_steps == [0, 5, 7] and len(h.train_loss) == 7 for h in hists)
    with pytest.raises(TypeError, match="callback"):
        P.train_packed(pack, x, y, steps=2, batch_size=6, lr=0.1, callback="probe")


def test_a_diverged_network_stops_and_the_others_go_on():
    x, y = _vectors()
    bad, good = _seeded(_mlp("none", d=20), 0), _seeded(_mlp("none", d=20), 1)
    with torch.no_grad():
        bad[1].weight.fill_(float("nan"))
    hists = P.train_packed(P.PackedNet([bad, good]), x, y, seeds=[0, 1], steps=20, batch_size=30, lr=0.1,
                           x_eval=x, y_eval=y, eval_every=10)
    assert hists[0].diverged and len(hists[0].train_loss) == 1 and hists[0].eval_steps == [0]
    assert not hists[1].diverged and len(hists[1].train_loss) == 20 and hists[1].eval_steps == [0, 10, 20]


def test_evaluate_packed_is_evaluate_of_each_network():
    x, y = _images()
    pack = P.PackedNet.from_seeds(_cnn("bn"), (0, 1))
    P.train_packed(pack, x, y, steps=3, batch_size=4, lr=0.05)
    losses, accs = P.evaluate_packed(pack, x, y, batch_size=7)
    assert losses.shape == accs.shape == (2,)
    for j in range(2):
        loss, acc = evaluate(pack.unpack(j), x[:, None], y)
        assert losses[j] == pytest.approx(loss, rel=1e-5) and accs[j] == pytest.approx(acc)


def test_evaluate_packed_train_mode_does_not_touch_running_stats():
    x, y = _images()
    pack = P.PackedNet.from_seeds(_cnn("bn"), (0, 1))
    P.train_packed(pack, x, y, steps=3, batch_size=4, lr=0.05)
    before = {k: v.clone() for k, v in pack.state_dict().items()}
    pack.eval()
    _, acc = P.evaluate_packed(pack, x, y, batch_size=2, mode="train")
    assert acc.shape == (2,) and not pack.training
    for k, v in pack.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ bad input
def test_packed_net_rejects_bad_input():
    with pytest.raises(ValueError, match="architecture"):
        P.PackedNet([_seeded(_mlp("bn"), 0), _seeded(_mlp("none"), 0)])
    with pytest.raises(ValueError, match="at least one"):
        P.PackedNet([])
    with pytest.raises(ValueError, match="models"):
        P.PackedNet(_seeded(_mlp("bn"), 0))
    with pytest.raises(TypeError, match="LSTM"):
        P.PackedNet([nn.Sequential(nn.LSTM(3, 4))])
    assert not P.PackedNet([nn.Sequential(nn.LSTM(3, 4))], pack=False).grouped
    with pytest.raises(ValueError, match="seeds"):
        P.PackedNet.from_seeds(_mlp("bn"), ())
    with pytest.raises(ValueError, match="seeds"):
        P.PackedNet.from_seeds(_mlp("bn"), (0, -1))
    with pytest.raises(ValueError, match="seeds"):
        P.PackedNet([_seeded(_mlp("bn"), 0)], seeds=(0, 1))
    pack = P.PackedNet.from_seeds(_cnn("bn"), (0, 1))
    with pytest.raises(ValueError, match="k=2"):
        pack(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="j: expected"):
        pack.unpack(2)


@pytest.mark.parametrize("bad, match", [
    (dict(seeds=[0]), "seeds"), (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(lr=0.0), "lr"), (dict(lr=[0.1]), "lr"), (dict(lr=[0.1, float("nan")]), "lr"), (dict(lr="fast"), "lr"),
    (dict(lr=[1e-3, 1e-2], optimizer="adam"), "sgd"), (dict(schedule="cosine"), "schedule"),
    (dict(warmup=1.0), "warmup"), (dict(eval_every=0), "eval_every"), (dict(x_eval=torch.zeros(3, 64)), "x_eval"),
    (dict(target=0.5), "target"), (dict(optimizer="rmsprop"), "name"),
])
def test_train_packed_rejects_bad_input(bad, match):
    x, y = _images()
    x = x.reshape(len(x), -1)
    kw = dict(steps=2, batch_size=4, lr=0.1)
    kw.update(bad)
    pack = P.PackedNet([_seeded(_mlp("bn"), s) for s in (0, 1)])  # no seeds of its own
    with pytest.raises(ValueError, match=match):
        P.train_packed(pack, x, y, **({"seeds": [0, 1]} | kw))


def test_train_packed_needs_seeds_and_a_pack():
    x, y = _images()
    x = x.reshape(len(x), -1)
    with pytest.raises(ValueError, match="seeds"):  # neither given nor the pack's own
        P.train_packed(P.PackedNet([_seeded(_mlp("bn"), 0)]), x, y, steps=1, batch_size=4, lr=0.1)
    with pytest.raises(TypeError, match="PackedNet"):
        P.train_packed(_seeded(_mlp("bn"), 0), x, y, steps=1, batch_size=4, lr=0.1, seeds=[0])
    pack = P.PackedNet.from_seeds(_mlp("bn"), (0, 1))
    with pytest.raises(ValueError, match="y_train"):
        P.train_packed(pack, x, y[:-1], steps=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="mode"):
        P.evaluate_packed(pack, x, y, mode="test")
