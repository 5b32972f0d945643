"""The Triton batch-norm kernels (bnlib.torch.triton, through its facade bnlib.torch.triton_bn) against
torch.nn.functional.batch_norm + autograd.

Without a GPU the kernels run in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` must be in the environment
when the kernels (``bnlib.torch.triton.kernels``) are *imported* (``triton.jit`` decides then between
compiling and interpreting), so this module sets it before importing, and re-imports the package and
``triton_bn`` if another test imported them earlier without the variable. With a GPU the same tests run the
compiled kernels on CUDA tensors. Shapes are tiny (the interpreter runs each program in Python); the split
path is forced on them by shrinking the tile thresholds (in ``bnlib.torch.triton.launch``, where the planning
reads them). A subprocess compiles every kernel for sm_90 ahead of time (no GPU needed).
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before bnlib.torch.triton_bn (and triton.jit) run

pytest.importorskip("triton")
from bnlib.torch import triton_bn as tb  # noqa: E402
from bnlib.torch.triton import aot, kernels, launch  # noqa: E402

if not CUDA and not tb.is_interpreted() and os.environ.get("TRITON_INTERPRET") == "1":
    # imported earlier without TRITON_INTERPRET: decorate the kernels again, then rebind the modules that
    # import names from them (in dependency order: launch, aot, the package, the facade)
    for _mod in (kernels, launch, aot, sys.modules["bnlib.torch.triton"], tb):
        importlib.reload(_mod)
if not CUDA and not tb.is_interpreted():
    pytest.skip("no GPU and TRITON_INTERPRET is not '1': the Triton kernels cannot run here",
                allow_module_level=True)

DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def split_path(monkeypatch):
    """Force the multi-kernel (split) path on tiny shapes, with several tiles per program and several
    programs per channel, so the Chan merges inside a program and across programs both run."""
    monkeypatch.setattr(launch, "FUSED_MAX_TILE", 0)
    monkeypatch.setattr(launch, "SPLIT_TILE", 32)
    monkeypatch.setattr(launch, "TARGET_PROGRAMS", 10)


def _data(shape, dtype=torch.float32, channels_last=False, seed=0, loc=3.0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + loc).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    C = shape[1]
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    rm, rv = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return [t.to(DEVICE) for t in (x, dy, w, b, rm, rv)]


def _reference(x, dy, w, b, rm, rv, training, momentum=0.1, eps=1e-5):
    """torch on float32 copies: output, running stats after the call, and the three gradients."""
    xr = x.detach().float().requires_grad_(True)
    wr = None if w is None else w.detach().clone().requires_grad_(True)
    br = None if b is None else b.detach().clone().requires_grad_(True)
    rm2 = None if rm is None else rm.clone()
    rv2 = None if rv is None else rv.clone()
    y = F.batch_norm(xr, rm2, rv2, wr, br, training, momentum, eps)
    y.backward(dy.float())
    return dict(y=y.detach(), rm=rm2, rv=rv2, dx=xr.grad, dw=None if wr is None else wr.grad,
                db=None if br is None else br.grad)


def _close(a, b, tol):
    assert a.shape == b.shape
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=tol, atol=tol)


def _check_train(x, dy, w, b, rm, rv, tol=2e-5, expect=None):
    ref = _reference(x, dy, w, b, rm, rv, True)
    rm_k = None if rm is None else rm.clone()
    rv_k = None if rv is None else rv.clone()
    if expect is not None:
        assert [l.name for l in tb.plan(x).launches] == expect
    y, mean, invstd = tb.batch_norm_forward(x, w, b, rm_k, rv_k, True, 0.1, 1e-5)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    _close(y, ref["y"], tol)
    if rm is not None:
        _close(rm_k, ref["rm"], 1e-5)
        _close(rv_k, ref["rv"], 1e-5)
    dims = [0] + list(range(2, x.dim()))
    xf = x.double()
    _close(mean, xf.mean(dims), 1e-5)
    _close(invstd, torch.rsqrt(xf.var(dims, unbiased=False) + 1e-5), 1e-5)
    dx, dw, db = tb.batch_norm_backward(dy, x, w, mean, invstd)
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    _close(dx, ref["dx"], tol)
    if w is not None:
        # dgamma, dbeta are sums over the batch: compare relative to their size
        scale = float(ref["dw"].abs().max()) + 1
        _close(dw / scale, ref["dw"] / scale, 1e-5)
        _close(db / scale, ref["db"] / scale, 1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_fused_path_matches_torch(channels_last):
    x, dy, w, b, rm, rv = _data((3, 5, 6, 7), channels_last=channels_last)
    _check_train(x, dy, w, b, rm, rv, expect=["_bn_fwd_fused"])


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_split_path_matches_torch(split_path, channels_last):
    x, dy, w, b, rm, rv = _data((3, 5, 6, 7), channels_last=channels_last)
    p = tb.plan(x)
    assert [l.name for l in p.launches] == ["_bn_stats", "_bn_finalize", "_bn_normalize"]
    tiles, programs = p.launches[0].args["TILES"], p.launches[0].grid[1]
    assert tiles > 1 and programs > 1  # merges within and across programs are exercised
    _check_train(x, dy, w, b, rm, rv)


@pytest.mark.parametrize("shape", [(17, 6), (4, 3, 9)], ids=["N,C", "N,C,L"])
def test_2d_and_3d_inputs(shape, split_path):
    x, dy, w, b, rm, rv = _data(shape, seed=1)
    _check_train(x, dy, w, b, rm, rv)


def test_without_affine_or_running_stats():
    x, dy, *_ = _data((4, 3, 5, 5), seed=2)
    _check_train(x, dy, None, None, None, None)
    mean = x.mean((0, 2, 3))
    invstd = torch.rsqrt(x.var((0, 2, 3), unbiased=False) + 1e-5)
    _, dw, db = tb.batch_norm_backward(dy, x, None, mean, invstd)
    assert dw.dtype == torch.float32 and db.shape == (3,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_half_precision_accumulates_in_float32(dtype, channels_last):
    x, dy, w, b, rm, rv = _data((4, 3, 5, 6), dtype=dtype, channels_last=channels_last, seed=3)
    # the reference runs in float32 on the same (rounded) inputs; the kernels round only the outputs
    tol = 1e-2 if dtype == torch.float16 else 6e-2
    _check_train(x, dy, w, b, rm, rv, tol=tol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_eval_mode_uses_running_stats(channels_last):
    x, _, w, b, rm, rv = _data((3, 4, 5, 5), channels_last=channels_last, seed=4)
    rm0, rv0 = rm.clone(), rv.clone()
    y, mean, invstd = tb.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5)
    _close(y, F.batch_norm(x, rm0, rv0, w, b, False), 2e-5)
    assert y.stride() == x.stride()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    _close(invstd, torch.rsqrt(rv0 + 1e-5), 1e-6)


def test_large_mean_is_stable(split_path):
    """|mean| / std = 1e4: E[x^2] - E[x]^2 in float32 would lose every digit; the two-pass tiles and Chan's
    merge keep the variance to about 1e-3 relative (x itself is only stored to 1e-4 of its std)."""
    x, dy, *_ = _data((2, 3, 8, 8), loc=1e4, scale=1.0, seed=5)
    _, mean, invstd = tb.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    var64 = x.double().var((0, 2, 3), unbiased=False)
    var_k = invstd.double() ** -2 - 1e-5
    assert torch.allclose(var_k.cpu(), var64.cpu(), rtol=2e-3)
    assert torch.allclose(mean.double().cpu(), x.double().mean((0, 2, 3)).cpu(), rtol=1e-7)


def test_running_stats_follow_torch_over_steps():
    x, dy, w, b, rm, rv = _data((5, 3, 4, 4), seed=6)
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(3):
        xs = x * (step + 1) + step
        tb.batch_norm_forward(xs, w, b, rm, rv, True, 0.3, 1e-5)
        F.batch_norm(xs, rm_t, rv_t, w, b, True, 0.3, 1e-5)
    _close(rm, rm_t, 1e-5)
    _close(rv, rv_t, 1e-5)


def test_bad_input_raises_before_running_stats_change():
    x, dy, w, b, rm, rv = _data((1, 3, 1, 1))
    rm0 = rm.clone()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tb.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    assert torch.equal(rm, rm0)
    x, dy, w, b, rm, rv = _data((2, 3, 2, 2))
    with pytest.raises(ValueError, match="weight: expected shape"):
        tb.batch_norm_forward(x, w[:2], b, rm, rv, True, 0.1, 1e-5)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tb.batch_norm_forward(x.double(), w, b, rm, rv, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="both"):
        tb.batch_norm_forward(x, w, b, rm, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="expected both when training=False"):
        tb.batch_norm_forward(x, w, b, None, None, False, 0.1, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        tb.batch_norm_forward(x, w, b, rm, rv, True, 0.1, -1.0)
    with pytest.raises(ValueError, match="dy: expected"):
        tb.batch_norm_backward(dy[:1], x, w, rm, rv)
    assert torch.equal(rm, _data((2, 3, 2, 2))[4])


def test_is_available():
    x = torch.randn(2, 3, device=DEVICE)
    assert tb.is_available(x)
    assert not tb.is_available(x.double())
    assert not tb.is_available(torch.randn(3, device=DEVICE))
    assert not tb.is_available("not a tensor")


@pytest.mark.parametrize("dtype,b", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_planned_bytes(dtype, b):
    """Split path: forward 3E elements moved (12E bytes in float32), backward 5E (20E); fused: 2E and 3E."""
    big = torch.empty((32, 64, 112, 112), dtype=dtype, device="meta")
    E = big.numel()
    for training, backward, k in [(True, False, 3), (True, True, 5), (False, False, 2)]:
        got = tb.planned_bytes(big, training=training, backward=backward)
        assert k * E * b <= got <= k * E * b * 1.001, (training, backward, got / (E * b))
    small = torch.empty((64, 256), dtype=dtype, device="meta")
    E = small.numel()
    fwd = tb.plan(small)
    assert [l.name for l in fwd.launches] == ["_bn_fwd_fused"]
    assert 2 * E * b <= fwd.bytes <= 2 * E * b + 8 * 256 * 4
    bwd = tb.plan(small, backward=True)
    assert 3 * E * b <= bwd.bytes <= 3 * E * b + 8 * 256 * 4


def test_bnlib_functional_triton_backend_matches_torch_backend():
    """B1's ``batch_norm(..., backend='triton')`` goes through this module; it must agree with 'torch'."""
    BF = pytest.importorskip("bnlib.torch.functional")
    x, dy, w, b, rm, rv = _data((4, 3, 4, 4), channels_last=True, seed=7)
    outs = {}
    for backend in ("triton", "torch"):
        xr = x.clone().requires_grad_(True)
        wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        rmb, rvb = rm.clone(), rv.clone()
        y = BF.batch_norm(xr, rmb, rvb, wr, br, True, 0.1, 1e-5, backend=backend)
        y.backward(dy)
        outs[backend] = (y.detach(), xr.grad, wr.grad, br.grad, rmb, rvb)
    for a, c in zip(outs["triton"], outs["torch"]):
        _close(a, c, 2e-5)


@pytest.mark.parametrize("training", [True, False])
def test_triton_backend_double_backward_matches_torch(training):
    """``create_graph=True`` through the Triton backend: the backward in differentiable ops (the statistics
    recomputed from x), so a gradient penalty's gradient matches torch's."""
    BF = pytest.importorskip("bnlib.torch.functional")
    x, dy, w, b, rm, rv = _data((6, 3, 4), seed=3)
    grads = []
    for fn, kw in ((BF.batch_norm, {"backend": "triton"}), (F.batch_norm, {})):
        xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = fn(xr, rm.clone(), rv.clone(), wr, br, training, **kw)
        (dx,) = torch.autograd.grad((y * dy).sum(), xr, create_graph=True)
        grads.append(torch.autograd.grad(dx.square().sum(), (xr, wr, br), materialize_grads=True))
    for a, c in zip(*grads):
        _close(a, c, 2e-4)


def test_kernels_compile_for_sm90_without_a_gpu():
    """Every kernel compiles to a cubin for sm_90 (Triton ships ptxas): catches what the interpreter cannot
    (types of loop-carried values, constexpr misuse). Runs in a subprocess without TRITON_INTERPRET."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    code = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("ignore")
        from bnlib.torch import triton_bn as tb
        rows = tb.compile_report(90, shapes=[(64, 32), (4, 4, 64, 64)], dtypes=(torch.float32,),
                                 layouts=("NHWC",), once_per_kernel=True)
        names = sorted({r["kernel"] for r in rows})
        assert names == sorted(tb.KERNELS), names
        assert all(r["spill_bytes"] in (0, None) for r in rows), rows
        print("compiled", len(rows))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 8" in proc.stdout
