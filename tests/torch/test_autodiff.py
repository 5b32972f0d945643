"""Higher-order and forward-mode derivatives of bnlib.torch's normalizations, against torch.nn.functional.

Double backward (gradgradcheck, Hessians, a gradient penalty), forward mode (``torch.func.jvp``,
``torch.autograd.forward_ad``), ``torch.func`` (``vmap``, per-sample gradients with ``vmap(grad(...))``) and
empty batches, for batch_norm (training and evaluation), layer_norm, group_norm, instance_norm and rms_norm,
all in float64. The reference is torch's own implementation of the same function.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import bnlib.torch as bt
from bnlib.torch import _autodiff
from bnlib.torch import functional as BF

D64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _params(C, g, shape=None):
    shape = (C,) if shape is None else shape
    w = (torch.rand(shape, generator=g, dtype=D64) + 0.5).requires_grad_()
    b = torch.randn(shape, generator=g, dtype=D64).requires_grad_()
    return w, b


def _cases():
    """(id, bnlib function of (x, w, b), torch function of (x, w, b), x shape, parameter shape)."""
    rm = torch.randn(3, generator=_gen(1), dtype=D64)
    rv = torch.rand(3, generator=_gen(2), dtype=D64) + 0.5
    out = []
    for shape in [(5, 3), (4, 3, 5), (3, 3, 2, 3)]:
        nd = len(shape)
        out.append((f"batch_norm-train-{nd}d", lambda x, w, b: BF.batch_norm(x, None, None, w, b, True),
                    lambda x, w, b: F.batch_norm(x, None, None, w, b, True), shape, (3,)))
        out.append((f"batch_norm-eval-{nd}d", lambda x, w, b: BF.batch_norm(x, rm, rv, w, b, False),
                    lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False), shape, (3,)))
    out += [
        ("layer_norm-last", lambda x, w, b: BF.layer_norm(x, (5,), w, b),
         lambda x, w, b: F.layer_norm(x, (5,), w, b), (4, 3, 5), (5,)),
        ("layer_norm-two-dims", lambda x, w, b: BF.layer_norm(x, (3, 5), w, b),
         lambda x, w, b: F.layer_norm(x, (3, 5), w, b), (4, 3, 5), (3, 5)),
        ("layer_norm-whole-input", lambda x, w, b: BF.layer_norm(x, (3, 5), w, b),
         lambda x, w, b: F.layer_norm(x, (3, 5), w, b), (3, 5), (3, 5)),
        ("group_norm-2d", lambda x, w, b: BF.group_norm(x, 2, w, b),
         lambda x, w, b: F.group_norm(x, 2, w, b), (5, 4), (4,)),
        ("group_norm-4d", lambda x, w, b: BF.group_norm(x, 2, w, b),
         lambda x, w, b: F.group_norm(x, 2, w, b), (3, 4, 3, 2), (4,)),
        ("instance_norm-3d", lambda x, w, b: BF.instance_norm(x, weight=w, bias=b),
         lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (3, 4, 5), (4,)),
        ("rms_norm", lambda x, w, b: BF.rms_norm(x, (5,), w) + b,
         lambda x, w, b: F.rms_norm(x, (5,), w) + b, (4, 3, 5), (5,)),
    ]
    return out


CASES = _cases()
IDS = [c[0] for c in CASES]


def _inputs(case, seed=0):
    _, _, _, shape, pshape = case
    g = _gen(seed)
    x = torch.randn(shape, generator=g, dtype=D64).requires_grad_()
    w, b = _params(None, g, pshape)
    return x, w, b


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_and_gradgradcheck(case):
    f = case[1]
    args = _inputs(case)
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_double_backward_equals_torch(case):
    """The gradient of a function of the gradient (a gradient penalty) equals torch's."""
    _, f, ref, _, _ = case
    grads = []
    for fn in (f, ref):
        x, w, b = _inputs(case)
        y = fn(x, w, b)
        (dx,) = torch.autograd.grad((y.sin() * y).sum(), x, create_graph=True)
        penalty = (dx.square().sum(dim=tuple(range(1, x.dim()))) - 1).square().sum()
        grads.append(torch.autograd.grad(penalty, (x, w, b)))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp_equals_torch(case):
    _, f, ref, _, _ = case
    args = tuple(a.detach() for a in _inputs(case))
    g = _gen(5)
    tangents = tuple(torch.randn(a.shape, generator=g, dtype=D64) for a in args)
    y, y_dot = torch.func.jvp(f, args, tangents)
    y_ref, y_dot_ref = torch.func.jvp(ref, args, tangents)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y_dot, y_dot_ref)
    # only the input's tangent (the weight's and bias's None inside the Function)
    _, y_dot_x = torch.func.jvp(lambda x: f(x, args[1], args[2]), args[:1], tangents[:1])
    _, y_dot_x_ref = torch.func.jvp(lambda x: ref(x, args[1], args[2]), args[:1], tangents[:1])
    torch.testing.assert_close(y_dot_x, y_dot_x_ref)


@pytest.mark.parametrize("case", CASES[:2] + CASES[6:7], ids=IDS[:2] + IDS[6:7])
def test_forward_ad_dual_tensors(case):
    """``torch.autograd.forward_ad`` (dual tensors, no torch.func) reaches the hand-derived jvp."""
    _, f, ref, _, _ = case
    x, w, b = (a.detach() for a in _inputs(case))
    t = torch.randn(x.shape, generator=_gen(3), dtype=D64)
    outs = []
    for fn in (f, ref):
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, t), w, b)
            outs.append(fwAD.unpack_dual(y).tangent)
    torch.testing.assert_close(outs[0], outs[1])


def test_jvp_is_the_hand_derived_one(monkeypatch):
    """The forward-mode derivative goes through ``project`` (the hand-derived map), not a fallback."""
    calls = []
    real = _autodiff.project
    monkeypatch.setattr(_autodiff, "project", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 3, dtype=D64)
    torch.func.jvp(lambda x: BF.batch_norm(x, None, None, None, None, True), (x,), (torch.ones_like(x),))
    assert calls


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_and_per_sample_gradients(case):
    _, f, ref, shape, _ = case
    x, w, b = (a.detach() for a in _inputs(case))
    xs = torch.randn((3,) + tuple(shape), generator=_gen(7), dtype=D64)
    torch.testing.assert_close(torch.func.vmap(lambda x: f(x, w, b))(xs),
                               torch.func.vmap(lambda x: ref(x, w, b))(xs))
    # per-sample gradients of the weight, Opacus-style: one gradient per independent input in xs

    def loss(fn):
        return lambda w, x: fn(x, w, b).square().sum()

    ours = torch.func.vmap(torch.func.grad(loss(f)), in_dims=(None, 0))(w, xs)
    theirs = torch.func.vmap(torch.func.grad(loss(ref)), in_dims=(None, 0))(w, xs)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hessian_equals_torch(case):
    _, f, ref, _, _ = case
    x, w, b = (a.detach() for a in _inputs(case))
    h = torch.func.hessian(lambda x: f(x, w, b).sin().sum())(x)
    h_ref = torch.func.hessian(lambda x: ref(x, w, b).sin().sum())(x)
    torch.testing.assert_close(h, h_ref)


def test_per_sample_gradients_of_a_model_with_functional_call():
    """Per-sample gradients of every parameter of a small model (GroupNorm and LayerNorm, and BatchNorm in
    evaluation), bnlib's modules against torch.nn's with the same parameters."""
    def model(norms):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), norms.GroupNorm(2, 4), torch.nn.ReLU(),
                                   norms.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 6),
                                   norms.LayerNorm(6)).double().eval()

    x = torch.randn(5, 2, 5, 5, generator=_gen(9), dtype=D64)
    results = []
    for norms in (bt, torch.nn):
        net = model(norms)
        net[3].running_mean.uniform_(-0.5, 0.5)
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = {k: v.detach() for k, v in net.named_buffers()}

        def loss(p, x, net=net):
            return torch.func.functional_call(net, (p, buffers), (x.unsqueeze(0),)).square().sum()

        results.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x))
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], msg=k)


def test_batch_norm_train_vmap_over_independent_batches_large_input():
    """Under vmap the chunked large-input path (data-dependent branch, ``out=`` ops) is not taken."""
    xs = torch.randn(2, 8, 4, 64, 65, generator=_gen(4), dtype=torch.float32) * 3 + 1
    assert xs[0].numel() > bt._batch_norm.SMALL_NUMEL
    ours = torch.func.vmap(lambda x: BF.batch_norm(x, None, None, None, None, True))(xs)
    theirs = torch.func.vmap(lambda x: F.batch_norm(x, None, None, None, None, True))(xs)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"])
def test_empty_batch(name):
    """An empty batch (N = 0) gives an empty output and zero parameter gradients, as torch does; the running
    statistics are left as they are."""
    x = torch.randn(0, 4, 3, dtype=D64, requires_grad=True)
    w = torch.rand(4 if name not in ("layer_norm", "rms_norm") else 3, dtype=D64, requires_grad=True)
    b = torch.rand_like(w, requires_grad=True)
    rm, rv = torch.rand(4, dtype=D64), torch.rand(4, dtype=D64) + 1
    before = (rm.clone(), rv.clone())
    call = {
        "batch_norm": lambda m: m.batch_norm(x, rm, rv, w, b, True),
        "group_norm": lambda m: m.group_norm(x, 2, w, b),
        "instance_norm": lambda m: m.instance_norm(x, rm, rv, w, b, True),
        "layer_norm": lambda m: m.layer_norm(x, (3,), w, b),
        "rms_norm": lambda m: m.rms_norm(x, (3,), w) + b,
    }[name]
    y = call(BF)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_empty_batch_modules_train_and_eval():
    for m in (bt.BatchNorm2d(3), bt.GroupNorm(3, 3), bt.InstanceNorm2d(3, affine=True, track_running_stats=True)):
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        for training in (True, False):
            m.train(training)
            y = m(x)
            assert y.shape == x.shape
            y.sum().backward()


def test_layer_norm_module_over_the_whole_input():
    """``normalized_shape == input.shape`` (an unbatched input): forward and backward as torch.nn's."""
    x = torch.randn(3, 5, generator=_gen(2), dtype=D64, requires_grad=True)
    ours, theirs = bt.LayerNorm((3, 5)).double(), torch.nn.LayerNorm((3, 5)).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    g = torch.randn(3, 5, generator=_gen(3), dtype=D64)
    grads = []
    for m in (ours, theirs):
        x.grad = None
        m(x).backward(g)
        grads.append((x.grad.clone(), m.weight.grad.clone(), m.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_plain_backward_is_not_used_for_a_plain_backward(monkeypatch):
    """A first-order ``backward()`` keeps the fast hand-written path; only ``create_graph=True`` (or a
    torch.func transform) takes the differentiable one."""
    calls = []
    real = bt._batch_norm.bn_backward_plain
    monkeypatch.setattr(bt._batch_norm, "bn_backward_plain", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(6, 3, requires_grad=True)
    BF.batch_norm(x, None, None, None, None, True).square().sum().backward()
    assert not calls
    y = BF.batch_norm(x, None, None, None, None, True).square().sum()
    torch.autograd.grad(y, x, create_graph=True)
    assert calls == [1]


def test_compile_fullgraph_with_the_jvp_functions():
    """dynamo refuses a Function with a custom ``jvp``; while compiling, bnlib calls the twin without it, so
    ``torch.compile(fullgraph=True)`` still traces every norm, forward and backward."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bt.BatchNorm2d(4), bt.GroupNorm(2, 4),
                              bt.InstanceNorm2d(4, affine=True), torch.nn.Flatten(), torch.nn.Linear(144, 5),
                              bt.LayerNorm(5), bt.RMSNorm(5)).eval()
    x = torch.randn(4, 3, 8, 8, generator=_gen(1), requires_grad=True)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    xr = x.detach().requires_grad_()
    y_ref = net(xr)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), xr)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
