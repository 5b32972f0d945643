"""bnlib.torch modules as drop-in replacements for torch.nn: state dicts, training sequences, eval, variants."""
import copy

import pytest
import torch
from torch import nn

import bnlib.torch as bt
from tests._numerics import assert_error_within, assert_states_within

# (bnlib class, torch class, constructor args, kwargs, input shape)
TWINS = [
    (bt.BatchNorm1d, nn.BatchNorm1d, (5,), {}, (16, 5)),
    (bt.BatchNorm1d, nn.BatchNorm1d, (5,), {"momentum": None}, (8, 5, 7)),
    (bt.BatchNorm2d, nn.BatchNorm2d, (4,), {}, (8, 4, 6, 5)),
    (bt.BatchNorm2d, nn.BatchNorm2d, (4,), {"affine": False, "momentum": 0.3}, (8, 4, 6, 5)),
    (bt.BatchNorm2d, nn.BatchNorm2d, (4,), {"track_running_stats": False}, (8, 4, 6, 5)),
    (bt.BatchNorm2d, nn.BatchNorm2d, (4,), {"bias": False}, (8, 4, 3, 3)),
    (bt.BatchNorm3d, nn.BatchNorm3d, (3,), {}, (4, 3, 3, 4, 5)),
    (bt.LayerNorm, nn.LayerNorm, ((6, 5),), {}, (8, 4, 6, 5)),
    (bt.LayerNorm, nn.LayerNorm, (5,), {"elementwise_affine": False}, (8, 5)),
    (bt.LayerNorm, nn.LayerNorm, (5,), {"bias": False}, (8, 3, 5)),
    (bt.GroupNorm, nn.GroupNorm, (2, 4), {}, (8, 4, 6, 5)),
    (bt.GroupNorm, nn.GroupNorm, (1, 4), {"affine": False}, (8, 4, 6)),
    (bt.InstanceNorm1d, nn.InstanceNorm1d, (4,), {}, (8, 4, 7)),
    (bt.InstanceNorm2d, nn.InstanceNorm2d, (4,), {"affine": True, "track_running_stats": True}, (8, 4, 6, 5)),
    (bt.InstanceNorm3d, nn.InstanceNorm3d, (3,), {"affine": True}, (2, 3, 3, 4, 5)),
]
IDS = [f"{t[0].__name__}-{i}" for i, t in enumerate(TWINS)]


def _perturb(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("ours_cls,torch_cls,args,kwargs,shape", TWINS, ids=IDS)
def test_training_sequence_then_eval_matches_torch(ours_cls, torch_cls, args, kwargs, shape):
    """20 SGD steps in training mode, then eval: outputs, gradients and buffers of the float32 modules are as
    close to a float64 twin (torch's, same start, same batches) as torch's float32 module is: within a few
    times its error (float32 rounding depends on the processor's summation order; tests/_numerics.py)."""
    gen = torch.Generator().manual_seed(0)
    ref = torch_cls(*args, **kwargs)
    _perturb(ref, gen)
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(ref.state_dict())
    truth = copy.deepcopy(ref).double()
    models = (ours, ref, truth)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) if list(m.parameters()) else None for m in models]
    for step in range(20):
        x = torch.randn(shape, generator=gen) * 2 + 0.5 * step
        target = torch.randn(shape, generator=gen)
        outs = []
        for m, opt in zip(models, opts):
            dtype = torch.float64 if m is truth else torch.float32
            xr = x.to(dtype).clone().requires_grad_(True)
            y = m(xr)
            loss = ((y - target.to(dtype)) ** 2).mean()
            if opt:
                opt.zero_grad()
            loss.backward()
            outs.append((y.detach(), xr.grad))
            if opt:
                opt.step()
        assert_error_within(*(o[0] for o in outs), what=f"step {step} output")
        assert_error_within(*(o[1] for o in outs), what=f"step {step} input gradient")
    assert_states_within(*models)
    for m in models:
        m.eval()
    x = torch.randn(shape, generator=gen) + 3
    assert_error_within(ours(x), ref(x), truth(x.double()), what="eval output")


@pytest.mark.parametrize("ours_cls,torch_cls,args,kwargs,shape", TWINS, ids=IDS)
def test_state_dict_round_trip_both_ways(ours_cls, torch_cls, args, kwargs, shape):
    gen = torch.Generator().manual_seed(1)
    ref = torch_cls(*args, **kwargs)
    _perturb(ref, gen)
    ref(torch.randn(shape, generator=gen))  # move running stats, num_batches_tracked
    ours = ours_cls(*args, **kwargs)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert hasattr(ours, name) == hasattr(ref, name)
        if hasattr(ref, name):
            assert (getattr(ours, name) is None) == (getattr(ref, name) is None)
    ours.load_state_dict(ref.state_dict())          # torch -> bnlib
    back = torch_cls(*args, **kwargs)
    back.load_state_dict(ours.state_dict())         # bnlib -> torch
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert repr(ours) == repr(ref)


def test_old_state_dict_without_num_batches_tracked_loads():
    ours = bt.BatchNorm2d(3)
    sd = nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    ours.load_state_dict(sd)
    assert int(ours.num_batches_tracked) == 0


def test_modules_build_on_device_and_dtype():
    m = bt.BatchNorm2d(3, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long
    y = m(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_instance_norm_unbatched_input_and_mismatch_rules():
    ours, ref = bt.InstanceNorm2d(3), nn.InstanceNorm2d(3)
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.warns(UserWarning):
        ours(torch.randn(2, 4, 5, 4))  # num_features unused when affine=False: warning, as torch
    with pytest.raises(ValueError, match="num_features"):
        bt.InstanceNorm2d(3, affine=True)(torch.randn(2, 4, 5, 4))


def test_half_precision_module():
    m = bt.BatchNorm2d(4).to(torch.bfloat16)
    x = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and m.running_mean.dtype == torch.bfloat16


# --- variants -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,torch_cls,shape", [(bt.GhostBatchNorm1d, nn.BatchNorm1d, (8, 3)),
                                                 (bt.GhostBatchNorm2d, nn.BatchNorm2d, (8, 3, 4, 4))])
@pytest.mark.parametrize("v", [8, 32])
def test_ghost_equals_batch_norm_when_virtual_batch_covers_the_batch(cls, torch_cls, shape, v):
    gen = torch.Generator().manual_seed(0)
    ours, ref = cls(3, virtual_batch_size=v), torch_cls(3)
    _perturb(ref, gen)
    ours.load_state_dict(ref.state_dict())
    for _ in range(5):
        x = torch.randn(shape, generator=gen)
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5
    ours.eval(), ref.eval()
    x = torch.randn(shape, generator=gen)
    torch.testing.assert_close(ours(x), ref(x))


def test_ghost_splits_batch_and_counts_virtual_batches():
    gen = torch.Generator().manual_seed(0)
    ours, ref = bt.GhostBatchNorm2d(3, virtual_batch_size=4, momentum=None), nn.BatchNorm2d(3, momentum=None)
    for _ in range(3):
        x = torch.randn(12, 3, 2, 2, generator=gen)
        torch.testing.assert_close(ours(x), torch.cat([ref(c) for c in x.split(4)]))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 9


def test_batch_renorm_module_schedule_and_plain_bn_limit():
    gen = torch.Generator().manual_seed(0)
    ours, ref = bt.BatchRenorm2d(3, r_max=1.0, d_max=0.0), nn.BatchNorm2d(3)
    for _ in range(4):
        x = torch.randn(8, 3, 4, 4, generator=gen) * 3 + 1
        torch.testing.assert_close(ours(x), ref(x))
    ours.r_max, ours.d_max = 3.0, 5.0  # relaxed on a schedule: different from BN now
    x = torch.randn(8, 3, 4, 4, generator=gen) * 3 + 1
    assert not torch.allclose(ours(x), ref(x), atol=1e-3)
    ours.eval(), ref.eval()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match="track_running_stats"):
        bt.BatchRenorm1d(3, track_running_stats=False)


def test_batch_layer_norm_module_matches_numpy_reference():
    np = pytest.importorskip("numpy")
    from bnlib.numpy import modules as nm
    gen = torch.Generator().manual_seed(0)
    ours = bt.BatchLayerNorm(4, dtype=torch.float64)
    ref = nm.BatchLayerNorm(4, dtype=np.float64)
    for _ in range(3):
        x = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)
        np.testing.assert_allclose(ours(x).detach().numpy(), ref.forward(x.numpy()), atol=1e-10)
    np.testing.assert_allclose(ours.running_var.numpy(), ref.running_var, atol=1e-12)
    ours.eval()
    ref.training = False
    x = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(ours(x).detach().numpy(), ref.forward(x.numpy()), atol=1e-10)


def test_modules_deepcopy_and_repr():
    for m in (bt.GhostBatchNorm2d(3, virtual_batch_size=4), bt.BatchRenorm1d(2), bt.BatchLayerNorm(2),
              bt.BatchNorm2d(3, backend="torch")):
        c = copy.deepcopy(m)
        assert repr(c) == repr(m)
    assert "virtual_batch_size=4" in repr(bt.GhostBatchNorm2d(3, virtual_batch_size=4))
    assert "r_max=3.0" in repr(bt.BatchRenorm2d(3))
    assert "backend='torch'" in repr(bt.BatchNorm2d(3, backend="torch"))


# --- eps=0, exception classes ------------------------------------------------------------------------------
@pytest.mark.parametrize("ours_cls,torch_cls,args,shape", [
    (bt.LayerNorm, nn.LayerNorm, (5,), (4, 3, 5)),
    (bt.GroupNorm, nn.GroupNorm, (2, 4), (4, 4, 5)),
    (bt.InstanceNorm1d, nn.InstanceNorm1d, (4,), (4, 4, 5)),
    (bt.RMSNorm, nn.RMSNorm, (5,), (4, 3, 5)),
    (bt.BatchNorm1d, nn.BatchNorm1d, (4,), (8, 4)),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_eps_zero_is_accepted_as_torch_does(ours_cls, torch_cls, args, shape):
    ours, ref = ours_cls(*args, eps=0.0), torch_cls(*args, eps=0.0)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if ours_cls is bt.BatchNorm1d:  # batch statistics need eps > 0: torch raises in training, and so does bnlib
        for m in (ours, ref):
            with pytest.raises(ValueError, match="eps"):
                m(x)
        assert int(ours.num_batches_tracked) == 0 and torch.equal(ours.running_mean, torch.zeros(4))
        ours.eval()
        ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    for bad in (-1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps: expected"):
            ours_cls(*args, eps=bad)


def test_shape_errors_are_value_and_runtime_errors():
    import bnlib
    from bnlib.torch import functional as BF
    x = torch.randn(4, 3, 5)
    cases = [
        (lambda: BF.batch_norm(x, torch.zeros(4), torch.ones(4)), bnlib.ShapeError),        # torch: RuntimeError
        (lambda: BF.batch_norm(x, None, None, torch.ones(4), training=True), bnlib.ShapeError),
        (lambda: BF.batch_norm(x, None, None), bnlib.RunningStatsError),                  # eval without stats
        (lambda: BF.group_norm(x, 2), bnlib.ShapeError),
        (lambda: BF.layer_norm(x, (4,)), bnlib.ShapeError),
        (lambda: bt.BatchNorm1d(4)(x), bnlib.ShapeError),
        (lambda: bt.GroupNorm(2, 3), bnlib.ShapeError),                                   # torch: ValueError
    ]
    for make, cls in cases:
        for caught in (ValueError, RuntimeError, cls):
            with pytest.raises(caught):
                make()


# --- torch.compile ----------------------------------------------------------------------------------------
def _bn_layers(lib, momentum):
    """Five (Linear, BatchNorm1d) pairs of different widths, for ``(6, 2)`` input."""
    layers, width = [], 2
    for _ in range(5):
        layers += [nn.Linear(width, width + 1), lib.BatchNorm1d(width + 1, momentum=momentum)]
        width += 1
    return layers


def _mixed_layers(lib):
    """Five blocks of a Conv1d and the other normalizations, of different widths, for ``(6, 2, 8)`` input."""
    layers, width = [], 2
    for _ in range(5):
        layers += [nn.Conv1d(width, width + 2, 3, padding=1), lib.GroupNorm(2, width + 2),
                   lib.InstanceNorm1d(width + 2, affine=True, track_running_stats=True), lib.LayerNorm(8),
                   lib.RMSNorm(8)]
        width += 2
    return layers


def _compile_and_toggle(layers, input_shape):
    """The model compiled (dynamo only, backend 'eager') and run in training and evaluation twice each, with a
    recompile limit of 4 an error (dynamo's default is 8; a layer compiled as a frame of its own recompiles for
    each of the five widths, and again in each mode); every output and the final state are checked against the
    same model run eagerly. Returns the number of frames dynamo compiled."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = nn.Sequential(*layers).double()  # (float64: the two paths' roundings stay far below assert_close's)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(input_shape, dtype=torch.float64)
    try:
        with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            for _ in range(2):
                for training in (True, False):
                    model.train(training)
                    eager.train(training)
                    torch.testing.assert_close(compiled(x), eager(x))
        for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, msg=k)
        return counters["frames"]["ok"]
    finally:
        torch._dynamo.reset()


def test_compile_does_not_recompile_per_layer_or_mode():
    """torch.compile of a model with many BatchNorm layers, switched between train() and eval(): dynamo
    compiles the model once per mode, as for torch.nn's layers, and never reaches its recompile limit (it
    used to with momentum=None: reading float(num_batches_tracked) is a graph break inside bnlib's forward,
    which dynamo then compiled as a frame of its own, once per layer width and mode)."""
    reference = _compile_and_toggle(_bn_layers(nn, 0.1), (6, 2))  # torch.nn: one frame per mode
    for momentum in (0.1, None):
        frames = _compile_and_toggle(_bn_layers(bt, momentum), (6, 2))
        assert frames <= reference, (momentum, frames, reference)


def test_compile_other_normalizations_does_not_recompile_per_layer_or_mode():
    reference = _compile_and_toggle(_mixed_layers(nn), (6, 2, 8))
    frames = _compile_and_toggle(_mixed_layers(bt), (6, 2, 8))
    assert frames <= reference, (frames, reference)
