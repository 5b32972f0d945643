"""bnlib.torch RMS norm (functional and module) against torch.nn.functional.rms_norm / torch.nn.RMSNorm:
gradcheck, float32 errors within a few times torch's own, the eps=None default, state dicts, half precision,
bad input."""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

import bnlib.numpy as bnp
import bnlib.torch as bt
from bnlib.torch import functional as BF
from tests._numerics import assert_error_within, assert_states_within

D64 = torch.float64
ATOL64 = 1e-12


def _run(fn, x, w, dy):
    """Forward + backward; returns (y, dx, dweight or None)."""
    x = x.detach().clone().requires_grad_(True)
    w = None if w is None else w.detach().clone().requires_grad_(True)
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, None if w is None else w.grad


CASES = [((4, 6), (6,)), ((3, 4, 5), (5,)), ((2, 3, 4, 5), (4, 5)), ((2, 3, 4), (2, 3, 4)), ((1, 7), 7)]


@pytest.mark.parametrize("shape,ns", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_functional_matches_torch_float64(shape, ns, affine, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=D64) * 3 - 1
    w = torch.randn(ns, generator=g, dtype=D64) if affine else None
    dy = torch.randn(shape, generator=g, dtype=D64)
    ours = _run(lambda x, w: BF.rms_norm(x, ns, w, eps), x, w, dy)
    ref = _run(lambda x, w: F.rms_norm(x, ns if isinstance(ns, tuple) else (ns,), w, eps), x, w, dy)
    for a, b in zip(ours, ref):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=ATOL64, rtol=0)
    # and the NumPy reference
    y_np = bnp.rms_norm(x.numpy(), ns, None if w is None else w.numpy(), eps)
    dx_np, dw_np = bnp.rms_norm_backward(dy.numpy(), x.numpy(), ns, None if w is None else w.numpy(), eps)
    torch.testing.assert_close(ours[0], torch.from_numpy(y_np), atol=ATOL64, rtol=0)
    torch.testing.assert_close(ours[1], torch.from_numpy(dx_np), atol=ATOL64, rtol=0)
    if affine:
        torch.testing.assert_close(ours[2], torch.from_numpy(dw_np), atol=ATOL64, rtol=0)


@pytest.mark.parametrize("shape,ns", CASES[:3])
def test_functional_float32_within_torchs_own_error(shape, ns):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3 + 2
    w = torch.randn(ns, generator=g)
    dy = torch.randn(shape, generator=g)
    eps32 = torch.finfo(torch.float32).eps
    ours = _run(lambda x, w: BF.rms_norm(x, ns, w), x, w, dy)
    ref = _run(lambda x, w: F.rms_norm(x, ns, w), x, w, dy)
    truth = _run(lambda x, w: F.rms_norm(x, ns, w, eps32), x.double(), w.double(), dy.double())
    assert ours[0].dtype == ours[1].dtype == ours[2].dtype == torch.float32
    for name, a, b, c in zip(("output", "dx", "dweight"), ours, ref, truth):
        assert_error_within(a, b, c, what=name)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=D64) * 2 + 1
    w = torch.randn(3, 5, generator=g, dtype=D64)
    w5 = torch.randn(5, generator=g, dtype=D64)

    def gc(fn, *tensors):
        inputs = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
        assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5)

    gc(lambda x, w: BF.rms_norm(x, (3, 5), w), x, w)
    gc(lambda x, w: BF.rms_norm(x, 5, w, 1e-5), x, w5)
    gc(lambda x: BF.rms_norm(x, (4, 3, 5)), x)
    gc(lambda x, w: BF.rms_norm(x, 5, w, 0.5), x * 0.3, w5)  # eps comparable to mean(x^2)
    x4 = torch.randn(2, 3, 4, 5, generator=g, dtype=D64).contiguous(memory_format=torch.channels_last)
    gc(lambda x, w: BF.rms_norm(x, 5, w), x4, w5)  # channels-last input


def test_backward_is_hand_derived_and_differentiable_again():
    x = torch.randn(3, 5, dtype=D64, requires_grad=True)
    y = BF.rms_norm(x, 5)
    assert type(y.grad_fn).__name__.startswith("RMSNormFunction")
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sin().sum(), x)
    xr = x.detach().requires_grad_()
    (dx_ref,) = torch.autograd.grad(torch.nn.functional.rms_norm(xr, (5,)).square().sum(), xr, create_graph=True)
    (ddx_ref,) = torch.autograd.grad(dx_ref.sin().sum(), xr)
    torch.testing.assert_close(ddx, ddx_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_eps_none_matches_torch_default(dtype):
    """torch's default eps is the machine epsilon of the computation (opmath) dtype: float32's for float32,
    float16 and bfloat16, float64's for float64. Rows with mean(x^2) ~ eps make the output depend on it."""
    cd = D64 if dtype == D64 else torch.float32
    e = torch.finfo(cd).eps
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 8, generator=g, dtype=D64) * e**0.5).to(dtype)
    x64 = x.double()
    truth = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + e)
    ours, ref = BF.rms_norm(x, 8), F.rms_norm(x, (8,))
    assert ours.dtype == ref.dtype == dtype
    assert (F.rms_norm(x64, (8,), eps=10 * e) - truth).abs().max() > 0.1  # eps matters on this input
    assert_error_within(ours, ref, truth, what=f"eps=None, {dtype}")
    assert torch.equal(ours, BF.rms_norm(x, 8, eps=e))
    m, tm = bt.RMSNorm(8), nn.RMSNorm(8)
    assert m.eps is None and tm.eps is None
    assert_error_within(m(x.float()), tm(x.float()), truth, what="module eps=None")


def _perturb(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


TWINS = [((6, 5), {}, (8, 4, 6, 5)), (5, {"eps": 1e-6}, (16, 5)), (5, {"elementwise_affine": False}, (8, 3, 5)),
         ([4], {"eps": 0.1}, (8, 4))]


@pytest.mark.parametrize("args,kwargs,shape", TWINS)
def test_module_training_sequence_matches_torch(args, kwargs, shape):
    """20 SGD steps: outputs, input gradients and weights of the float32 modules within a few times torch's
    float32 error of a float64 twin (tests/_numerics.py)."""
    gen = torch.Generator().manual_seed(0)
    ref = nn.RMSNorm(args, **kwargs)
    _perturb(ref, gen)
    ours = bt.RMSNorm(args, **kwargs)
    ours.load_state_dict(ref.state_dict())
    # the float64 truth with float32's default eps: the float32 modules' eps=None means float32's epsilon
    truth = copy.deepcopy(ref).double()
    if truth.eps is None:
        truth.eps = torch.finfo(torch.float32).eps
    models = (ours, ref, truth)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) if list(m.parameters()) else None for m in models]
    for step in range(20):
        x = torch.randn(shape, generator=gen) * 2 + 0.5 * step
        target = torch.randn(shape, generator=gen)
        outs = []
        for m, opt in zip(models, opts):
            dtype = D64 if m is truth else torch.float32
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
        m.eval()  # nothing changes: no running statistics
    x = torch.randn(shape, generator=gen) + 3
    assert_error_within(ours(x), ref(x), truth(x.double()), what="eval output")


@pytest.mark.parametrize("args,kwargs,shape", TWINS)
def test_state_dict_round_trip_both_ways(args, kwargs, shape):
    gen = torch.Generator().manual_seed(1)
    ref = nn.RMSNorm(args, **kwargs)
    _perturb(ref, gen)
    ours = bt.RMSNorm(args, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.buffers()) == [] and (ours.weight is None) == (ref.weight is None)
    assert ours.normalized_shape == ref.normalized_shape and ours.eps == ref.eps
    assert ours.elementwise_affine == ref.elementwise_affine
    assert repr(ours) == repr(ref)
    ours.load_state_dict(ref.state_dict())          # torch -> bnlib
    back = nn.RMSNorm(args, **kwargs)
    back.load_state_dict(ours.state_dict())         # bnlib -> torch
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    if ours.weight is not None:
        ours.reset_parameters()
        assert torch.equal(ours.weight, torch.ones_like(ours.weight))


def test_module_device_dtype_and_without_affine():
    m = bt.RMSNorm((2, 3), device="cpu", dtype=D64)
    assert m.weight.dtype == D64 and m.weight.shape == (2, 3)
    assert m(torch.randn(4, 2, 3, dtype=D64)).dtype == D64
    m = bt.RMSNorm(3, elementwise_affine=False)
    assert list(m.parameters()) == [] and m.weight is None
    x = torch.randn(4, 3, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None
    assert isinstance(bt.RMSNorm(np.int64(3)).normalized_shape[0], int)
    assert bt.RMSNorm(torch.Size([2, 3])).normalized_shape == (2, 3)
    assert "RMSNorm" in bt.__all__ and "rms_norm" in BF.__all__


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's, for the float32 weight
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wdtype", ["same", "float32"])
def test_half_precision_input(dtype, wdtype):
    """float16/bfloat16 input: statistics in float32, output and input gradient in the input dtype, weight
    gradient in the weight's dtype (float32 weights as in mixed precision). The error against a float64 truth
    of the same rounded inputs is within a few times torch's own."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 4, 16, generator=g) * 3 + 1).to(dtype)
    w = (torch.rand(4, 16, generator=g) + 0.5).to(dtype if wdtype == "same" else torch.float32)
    dy = torch.randn(8, 4, 16, generator=g).to(dtype)
    ours = _run(lambda x, w: BF.rms_norm(x, (4, 16), w), x, w, dy)
    ref = _run(lambda x, w: F.rms_norm(x, (4, 16), w), x, w, dy)
    truth = _run(lambda x, w: F.rms_norm(x, (4, 16), w, torch.finfo(torch.float32).eps), x.double(), w.double(),
                 dy.double())
    assert ours[0].dtype == ref[0].dtype == dtype
    assert ours[1].dtype == dtype and ours[2].dtype == w.dtype
    for name, a, b, c in zip(("output", "dx", "dweight"), ours, ref, truth):
        # the floor is counted in ulps of each result's own dtype (dweight: the weight's)
        assert_error_within(a, b, c, what=name)
    # the module with float32 weights on half input, as model.half() on the other layers leaves it
    m = bt.RMSNorm((4, 16))
    assert m(x).dtype == dtype


# --- bad input --------------------------------------------------------------------------------------------
def _message(fn, *args, **kwargs):
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    return type(info.value), str(info.value)


X = torch.ones(3, 5)
BAD = [
    ((X, (4,)), ValueError, r"normalized_shape: expected \[4\] to match the trailing dimensions"),
    ((X, ()), ValueError, r"normalized_shape: expected a non-empty"),
    ((X, 2.5), TypeError, r"normalized_shape: expected an int or a sequence"),
    ((X, 5, torch.ones(4)), ValueError, r"weight: expected shape \(5,\), got shape \(4,\)"),
    ((X, 5, None, -1.0), ValueError, r"eps: expected a positive finite number"),
    ((X, 5, None, True), TypeError, r"eps: expected a positive real number"),
]


@pytest.mark.parametrize("args,exc,pattern", BAD, ids=[f"case{i}" for i in range(len(BAD))])
def test_bad_input_same_message_as_numpy(args, exc, pattern):
    t_err = _message(BF.rms_norm, *args)
    assert issubclass(t_err[0], exc) and re.search(pattern, t_err[1]), t_err
    np_args = tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in args)
    assert _message(bnp.rms_norm, *np_args) == t_err


def test_torch_only_errors_name_the_argument():
    with pytest.raises(TypeError, match="input: expected a torch.Tensor"):
        BF.rms_norm(np.ones((2, 3)), 3)
    with pytest.raises(TypeError, match=r"input: expected a floating-point dtype \(float32, float64, float16 or "
                                        r"bfloat16\), got int64"):
        BF.rms_norm(torch.ones(2, 3, dtype=torch.long), 3)
    with pytest.raises(TypeError, match=r"weight: expected dtype float32 \(input has dtype float32\), got float64"):
        BF.rms_norm(torch.ones(2, 3), 3, torch.ones(3, dtype=D64))
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor or None"):
        BF.rms_norm(torch.ones(2, 3), 3, np.ones(3))
    with pytest.raises(ValueError, match=r"weight: expected a tensor on input\'s device \(cpu\), got one on meta"):
        BF.rms_norm(torch.ones(2, 3), 3, torch.ones(3, device="meta"))
    for bad, exc, pattern in ((0, ValueError, "normalized_shape"), (None, TypeError, "normalized_shape"),
                              ((2, -1), ValueError, "normalized_shape")):
        with pytest.raises(exc, match=pattern):
            bt.RMSNorm(bad)
    with pytest.raises(ValueError, match="eps: expected"):
        bt.RMSNorm(4, eps=-1e-6)


def test_module_error_leaves_state_untouched():
    m = bt.RMSNorm(5, dtype=D64)
    with torch.no_grad():
        m.weight.copy_(torch.arange(5.0))
    m(torch.randn(2, 5, dtype=D64)).sum().backward()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    grad = m.weight.grad.clone()
    with pytest.raises(ValueError, match=r"normalized_shape: expected \[5\] to match"):
        m(torch.randn(2, 4, dtype=D64))
    with pytest.raises(TypeError, match=r"weight: expected dtype float32 \(input has dtype float32\), got float64"):
        m(torch.randn(2, 5))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(m.weight.grad, grad)
