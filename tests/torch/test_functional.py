"""bnlib.torch.functional against torch.nn.functional: values, gradients, running statistics, dtypes, layouts."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from bnlib.torch import functional as BF
from tests._numerics import assert_error_within

D64 = torch.float64
ATOL64 = 1e-12  # float64 against torch: rounding is ~1e-15 (~1e-13 where 1/sqrt(eps) amplifies it)


def _run(fn, x, params, dy=None):
    """Forward + backward; returns (y, grads of x and params)."""
    x = x.detach().clone().requires_grad_(True)
    ps = [None if p is None else p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *ps)
    if dy is None:
        dy = torch.randn_like(y, generator=None)
    y.backward(dy)
    return y.detach(), [x.grad] + [None if p is None else p.grad for p in ps], dy


def _compare(fn_ours, fn_ref, x, params, atol=ATOL64, rtol=0.0, fn_truth=None):
    """Output and gradients of ``fn_ours`` against ``fn_ref`` (torch) on the same input and upstream gradient.

    float64: equal within ``atol``/``rtol``. Lower precision: the float32 rounding depends on the summation
    order of this processor's kernels, so no constant tolerance fits every machine; instead bnlib's error
    against the float64 truth (``fn_truth``, default ``fn_ref``, run on float64 copies of the same inputs) must
    be within a few times torch's own error on this machine (tests/_numerics.py)."""
    torch.manual_seed(1)
    y1, g1, dy = _run(fn_ours, x, params)
    y2, g2, _ = _run(fn_ref, x, params, dy)
    assert y1.dtype == y2.dtype and y1.shape == y2.shape
    if x.dtype == D64:
        torch.testing.assert_close(y1, y2, atol=atol, rtol=rtol)
        for a, b in zip(g1, g2):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
        return
    p64 = [None if p is None else p.double() for p in params]
    y3, g3, _ = _run(fn_truth or fn_ref, x.double(), p64, dy.double())
    assert_error_within(y1, y2, y3, what="output")
    for i, (a, b, c) in enumerate(zip(g1, g2, g3)):
        if b is None:
            assert a is None
        else:
            assert_error_within(a, b, c, what=f"gradient {i} (0: input, then the parameters)")


def _compare_stats(ours, ref, truth):
    """Running statistics after the same update: as ``_compare`` (float64: within ATOL64)."""
    for a, b, c in zip(ours, ref, truth):
        if a.dtype == D64:
            torch.testing.assert_close(a, b, atol=ATOL64, rtol=0)
        else:
            assert_error_within(a, b, c, what="running statistics")


SHAPES = [(8, 3), (4, 3, 7), (4, 3, 5, 6), (2, 3, 2, 3, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_matches_torch(dtype, shape, training, affine):
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 3)
    w = torch.randn(C, generator=g, dtype=dtype) if affine else None
    b = torch.randn(C, generator=g, dtype=dtype) if affine else None
    rm0 = torch.randn(C, generator=g, dtype=dtype)
    rv0 = torch.rand(C, generator=g, dtype=dtype) + 0.5
    rm1, rv1, rm2, rv2 = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    rm3, rv3 = rm0.double(), rv0.double()  # the float64 truth's running statistics
    _compare(lambda x, w, b: BF.batch_norm(x, rm1, rv1, w, b, training, 0.3, 1e-5),
             lambda x, w, b: F.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-5), x, [w, b],
             fn_truth=lambda x, w, b: F.batch_norm(x, rm3, rv3, w, b, training, 0.3, 1e-5))
    _compare_stats((rm1, rv1), (rm2, rv2), (rm3, rv3))


def test_batch_norm_without_running_stats_and_momentum_none():
    x = torch.randn(6, 4, 3, dtype=D64)
    _compare(lambda x: BF.batch_norm(x, None, None, training=True),
             lambda x: F.batch_norm(x, None, None, training=True), x, [], 1e-12)
    rm, rv = torch.zeros(4, dtype=D64), torch.ones(4, dtype=D64)
    BF.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=1)  # cumulative: f = 1
    torch.testing.assert_close(rm, x.mean((0, 2)))
    torch.testing.assert_close(rv, x.var((0, 2), unbiased=True))


@pytest.mark.parametrize("shape,ns", [((4, 6), (6,)), ((3, 4, 5), (5,)), ((2, 3, 4, 5), (4, 5))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, ns, dtype, affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 - 1
    w = torch.randn(ns, generator=g, dtype=dtype) if affine else None
    b = torch.randn(ns, generator=g, dtype=dtype) if affine else None
    _compare(lambda x, w, b: BF.layer_norm(x, ns, w, b), lambda x, w, b: F.layer_norm(x, ns, w, b), x, [w, b])


@pytest.mark.parametrize("G", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 5), (3, 6, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_norm_matches_torch(G, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
    w = torch.randn(6, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype)
    # groups of 2 values (shape (4, 6), G = 3) are ill-conditioned: float32 rounding shows up relatively, in
    # bnlib and torch alike (the float32 comparison is relative to torch's own error)
    if dtype == torch.float32 and x[0].numel() // G == 1:
        pytest.skip("one value per group: x_hat = 0 and the gradient is float32 rounding noise times 1/sqrt(eps)")
    _compare(lambda x, w, b: BF.group_norm(x, G, w, b), lambda x, w, b: F.group_norm(x, G, w, b), x, [w, b])
    _compare(lambda x: BF.group_norm(x, G), lambda x: F.group_norm(x, G), x, [])


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 7), (3, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_instance_norm_matches_torch(use_input_stats, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
    w = torch.randn(3, generator=g, dtype=dtype)
    b = torch.randn(3, generator=g, dtype=dtype)
    rm0, rv0 = torch.randn(3, generator=g, dtype=dtype), torch.rand(3, generator=g, dtype=dtype) + 0.5
    rm1, rv1, rm2, rv2 = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    rm3, rv3 = rm0.double(), rv0.double()
    _compare(lambda x, w, b: BF.instance_norm(x, rm1, rv1, w, b, use_input_stats, 0.2),
             lambda x, w, b: F.instance_norm(x, rm2, rv2, w, b, use_input_stats, 0.2), x, [w, b],
             fn_truth=lambda x, w, b: F.instance_norm(x, rm3, rv3, w, b, use_input_stats, 0.2))
    _compare_stats((rm1, rv1), (rm2, rv2), (rm3, rv3))
    _compare(lambda x: BF.instance_norm(x), lambda x: F.instance_norm(x), x, [])


# --- batch renormalization ---------------------------------------------------------------------------------
def _renorm_reference(x, w, b, rm, rv, eps, r_max, d_max):
    """Autograd reference with r and d detached (Ioffe 2017)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims)
    sigma_b = (x.var(dims, unbiased=False) + eps).sqrt()
    sigma = (rv + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm) / sigma).clamp(-d_max, d_max).detach()
    xhat = (x - mu.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    return xhat * w.view(shape) + b.view(shape)


@pytest.mark.parametrize("r_max,d_max", [(3.0, 5.0), (1.2, 0.1), (1.0, 0.0)])
def test_batch_renorm_matches_reference(r_max, d_max):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, generator=g, dtype=D64) * 2 + 1
    w, b = torch.randn(3, generator=g, dtype=D64), torch.randn(3, generator=g, dtype=D64)
    rm, rv = torch.randn(3, generator=g, dtype=D64), torch.rand(3, generator=g, dtype=D64) + 0.5
    rm1, rv1 = rm.clone(), rv.clone()
    _compare(lambda x, w, b: BF.batch_renorm(x, rm1, rv1, w, b, True, 0.1, 1e-5, r_max, d_max),
             lambda x, w, b: _renorm_reference(x, w, b, rm, rv, 1e-5, r_max, d_max), x, [w, b], 1e-12)
    # running statistics: torch's convention, from the batch statistics
    torch.testing.assert_close(rm1, 0.9 * rm + 0.1 * x.mean((0, 2)))
    torch.testing.assert_close(rv1, 0.9 * rv + 0.1 * x.var((0, 2), unbiased=True))


def test_batch_renorm_with_rmax1_dmax0_is_batch_norm_and_eval_uses_running_stats():
    x = torch.randn(5, 4, 3, dtype=D64)
    rm, rv = torch.randn(4, dtype=D64), torch.rand(4, dtype=D64) + 0.5
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    _compare(lambda x: BF.batch_renorm(x, rm1, rv1, training=True, r_max=1.0, d_max=0.0),
             lambda x: F.batch_norm(x, rm2, rv2, training=True), x, [], 1e-12)
    torch.testing.assert_close(rv1, rv2)
    _compare(lambda x: BF.batch_renorm(x, rm1, rv1, training=False),
             lambda x: F.batch_norm(x, rm2, rv2, training=False), x, [], 1e-12)


# --- ghost batch norm -------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,v", [(8, 4), (9, 4), (8, 8), (8, 100), (7, 2)])
def test_ghost_batch_norm_is_batch_norm_per_virtual_batch(N, v):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, 5, generator=g, dtype=D64)
    w, b = torch.randn(3, generator=g, dtype=D64), torch.randn(3, generator=g, dtype=D64)
    rm1, rv1 = torch.zeros(3, dtype=D64), torch.ones(3, dtype=D64)
    rm2, rv2 = rm1.clone(), rv1.clone()

    def ref(x, w, b):
        return torch.cat([F.batch_norm(c, rm2, rv2, w, b, True, 0.1) for c in x.split(v)])

    _compare(lambda x, w, b: BF.ghost_batch_norm(x, rm1, rv1, w, b, True, 0.1, virtual_batch_size=v),
             ref, x, [w, b], 1e-12)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)


# --- gradcheck (float64) for every function ---------------------------------------------------------------
def _gc(fn, *tensors):
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_gradcheck_all():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=D64) * 2 + 1
    w, b = torch.randn(3, generator=g, dtype=D64), torch.randn(3, generator=g, dtype=D64)
    rm, rv = torch.randn(3, generator=g, dtype=D64), torch.rand(3, generator=g, dtype=D64) + 0.5
    _gc(lambda x, w, b: BF.batch_norm(x, None, None, w, b, True), x, w, b)
    _gc(lambda x, w, b: BF.batch_norm(x, rm, rv, w, b, False), x, w, b)
    _gc(lambda x: BF.batch_norm(x, None, None, training=True), x)
    _gc(lambda x, w, b: BF.layer_norm(x, (3, 5), w.repeat(5).view(5, 3).t().contiguous(), b.repeat(5)
                                      .view(5, 3).t().contiguous()), x, w, b)
    _gc(lambda x, w, b: BF.group_norm(x, 3, w, b), x, w, b)
    _gc(lambda x, w, b: BF.group_norm(x, 1, w, b), x, w, b)
    _gc(lambda x, w, b: BF.instance_norm(x, None, None, w, b), x, w, b)
    _gc(lambda x, w, b: BF.instance_norm(x, rm, rv, w, b, use_input_stats=False), x, w, b)
    # batch renorm: r and d are constants of the backward, so check where the clips are active (then the
    # forward really does not depend on x through them) ...
    _gc(lambda x, w, b: BF.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 1.0, 0.0), x, w, b)
    _gc(lambda x, w, b: BF.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 1.05, 0.01),
        x, w, b)
    _gc(lambda x, w, b: BF.batch_layer_norm(x, rm.clone(), rv.clone(), w, b, True), x, w, b)
    _gc(lambda x, w, b: BF.batch_layer_norm(x, rm, rv, w, b, False), x, w, b)
    xg = torch.randn(8, 3, 2, generator=g, dtype=D64)
    _gc(lambda x, w, b: BF.ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=3), xg, w, b)


# --- dtypes and layouts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_dtype_and_float32_statistics(dtype):
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(8, 4, 5, 5, generator=g) * 3 + 2
    x = x32.to(dtype)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    for wdtype in (dtype, torch.float32):
        w = torch.rand(4, dtype=wdtype) + 0.5
        b = torch.randn(4, dtype=wdtype)
        rm, rv = torch.zeros(4), torch.ones(4)  # float32 running stats, as in autocast / mixed precision
        xr = x.clone().requires_grad_(True)
        wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = BF.batch_norm(xr, rm, rv, wr, br, training=True)
        assert y.dtype == dtype and rm.dtype == torch.float32
        y.float().square().sum().backward()
        assert xr.grad.dtype == dtype and wr.grad.dtype == wdtype and br.grad.dtype == wdtype
        ref = F.batch_norm(x.float(), None, None, w.float(), b.float(), True)
        torch.testing.assert_close(y.float(), ref, atol=tol * 4, rtol=tol)
        # statistics from the float32 accumulation of the low-precision values
        torch.testing.assert_close(rm, 0.1 * x.float().mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    for fn in (lambda t: BF.layer_norm(t, (5, 5)), lambda t: BF.group_norm(t, 2),
               lambda t: BF.instance_norm(t), lambda t: BF.batch_layer_norm(t, None, None, training=True),
               lambda t: BF.ghost_batch_norm(t, None, None, training=True, virtual_batch_size=4),
               lambda t: BF.batch_renorm(t, torch.zeros(4), torch.ones(4), training=True)):
        xr = x.clone().requires_grad_(True)
        y = fn(xr)
        assert y.dtype == dtype
        y.float().sum().backward()
        assert xr.grad.dtype == dtype
        torch.testing.assert_close(y.float(), fn(x.float()), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("name", ["batch_norm", "batch_norm_eval", "group_norm", "instance_norm",
                                  "batch_renorm", "ghost", "batch_layer_norm", "layer_norm"])
def test_channels_last(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 5, 6, generator=g, dtype=D64) + 1
    w, b = torch.randn(4, generator=g, dtype=D64), torch.randn(4, generator=g, dtype=D64)
    rm, rv = torch.randn(4, dtype=D64), torch.rand(4, dtype=D64) + 0.5
    fns = {
        "batch_norm": lambda x, w, b: BF.batch_norm(x, rm.clone(), rv.clone(), w, b, True),
        "batch_norm_eval": lambda x, w, b: BF.batch_norm(x, rm, rv, w, b, False),
        "group_norm": lambda x, w, b: BF.group_norm(x, 2, w, b),
        "instance_norm": lambda x, w, b: BF.instance_norm(x, None, None, w, b),
        "batch_renorm": lambda x, w, b: BF.batch_renorm(x, rm.clone(), rv.clone(), w, b, True),
        "ghost": lambda x, w, b: BF.ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=4),
        "batch_layer_norm": lambda x, w, b: BF.batch_layer_norm(x, rm.clone(), rv.clone(), w, b, True),
        "layer_norm": lambda x, w, b: BF.layer_norm(x, (5, 6), w[0] * torch.ones(5, 6, dtype=D64),
                                                    b[0] * torch.ones(5, 6, dtype=D64)),
    }
    fn = fns[name]
    xcl = x.contiguous(memory_format=torch.channels_last)
    y1, g1, dy = _run(fn, x, [w, b])
    y2, g2, _ = _run(fn, xcl, [w, b], dy.contiguous(memory_format=torch.channels_last))
    assert y2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=0)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)


def test_large_offset_is_stable_in_float32():
    """Two-pass statistics: a mean 1e4 times the spread costs no more accuracy than torch's own float32 batch
    norm loses (E[x^2]-E[x]^2 would lose every digit: errors ~100 in y, ~6 in the gradient of sum(y)).

    Errors are against the float64 batch norm of the same float32 input, next to torch's float32 error on this
    machine (the float32 rounding depends on the processor's kernels; tests/_numerics.py)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 2, 32, generator=g, dtype=D64) * 0.1 + 1000.0).float()
    dy = torch.randn(x.shape, generator=g)
    x64 = x.double()
    var64, mean64 = torch.var_mean(x64, (0, 2), correction=0, keepdim=True)
    invstd64 = (var64 + 1e-5).rsqrt()
    xhat64 = (x64 - mean64) * invstd64
    for upstream in (torch.ones_like(x), dy):
        (y, dx), (y_ref, dx_ref), (y64, dx64) = (
            _run(lambda t: fn(t, None, None, training=True), xin, [], upstream.to(xin.dtype))[:2]
            for fn, xin in ((BF.batch_norm, x), (F.batch_norm, x), (F.batch_norm, x64)))
        assert_error_within(y, y_ref, y64, what="output")
        if upstream is dy:
            # bnlib's backward computes dx = a * dy + b * x + c per channel (the mean folded into c, one pass
            # over x), b = -invstd^2 * mean(dy * x_hat): on top of torch's kind of error it rounds at the size
            # of b * x, and a mean one rounding off moves b * (x - mean) by as much (|b * x| ~ 5e3 here, an ulp
            # ~5e-4; torch, which centers x first, is ~6e-5 off)
            b = (invstd64 ** 2 * (upstream.double() * xhat64).mean((0, 2), keepdim=True)).abs().max()
            ulps, scale, what = 2.0, float(b * x.abs().max()), "input gradient"
        else:
            # the gradient of sum(y) is exactly 0; its float32 value is -invstd * x_hat * mean(x_hat), where
            # mean(x_hat) = (mean(x) - computed mean) * invstd: the floor is what a mean off by one float32 eps
            # of |x| (2 ulps at 1000) gives, max|x_hat| * |x| * invstd^2 (~0.04: the bound is ~0.07, torch's
            # error ~0.008, the one-pass variance's ~6)
            ulps, scale, what = 1.0, float(xhat64.abs().max() * x.abs().max() * invstd64.max() ** 2), \
                "input gradient of sum(y)"
        assert_error_within(dx[0], dx_ref[0], dx64[0], ulps=ulps, scale=scale, what=what)


@pytest.mark.parametrize("make", [lambda: torch.randn(3, 8, dtype=D64).t(),
                                  lambda: torch.randn(8, 5, 3, 4, dtype=D64).permute(0, 2, 1, 3),
                                  lambda: torch.randn(3, 8, 4, dtype=D64)[:, :, ::2].transpose(0, 1)])
def test_odd_strides_and_expanded_gradients(make):
    x = make()
    fns = [(lambda t: BF.batch_norm(t, None, None, training=True),
            lambda t: F.batch_norm(t, None, None, training=True)),
           (lambda t: BF.ghost_batch_norm(t, None, None, training=True, virtual_batch_size=4),
            lambda t: torch.cat([F.batch_norm(c, None, None, training=True) for c in t.split(4)])),
           (lambda t: BF.group_norm(t, 1), lambda t: F.group_norm(t, 1))]
    for ours, ref in fns:
        grads = []
        for fn in (ours, ref):
            xr = x.clone().requires_grad_(True)
            y = fn(xr)
            (y.sum() + (y * y[:1]).sum()).backward()  # an expanded (stride-0) upstream gradient in the sum
            grads.append((y.detach(), xr.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-10, rtol=0)


def test_layer_norm_over_the_whole_input_has_parameter_gradients():
    """normalized_shape covering every dim (no batch dims): dgamma and dbeta are per-element, as torch's."""
    import bnlib.torch as bt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 3, generator=g, dtype=torch.float64)
    grads = []
    for fn in (bt.functional.layer_norm, torch.nn.functional.layer_norm):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        fn(xs, (2, 3), ws, bs, 1e-5).backward(dy)
        grads.append((xs.grad, ws.grad, bs.grad))
    for ours, theirs in zip(*grads):
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)
