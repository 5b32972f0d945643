"""backend='torch'|'triton'|'auto' dispatch of bnlib.torch.functional.batch_norm."""
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

from bnlib.torch import _batch_norm
from bnlib.torch import functional as BF
from bnlib.torch import modules as bnlib_modules


def _stub(available=True):
    calls = []

    def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
        calls.append("forward")
        y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        invstd = torch.rsqrt(x.var(dims, unbiased=False) + eps)
        return y, mean, invstd

    def batch_norm_backward(dy, x, weight, save_mean, save_invstd):
        calls.append("backward")
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            w = None if weight is None else weight.detach().requires_grad_(True)
            y = torch.nn.functional.batch_norm(xr, None, None, w, None, True)
            grads = torch.autograd.grad(y, [xr] + ([w] if w is not None else []), dy)
        dx = grads[0]
        dw = grads[1] if w is not None else (dy * (x - save_mean.view(1, -1, *[1] * (x.dim() - 2)))).sum()
        return dx, dw, dy.sum([0] + list(range(2, x.dim())))

    mod = types.SimpleNamespace(is_available=lambda x: available, batch_norm_forward=batch_norm_forward,
                                batch_norm_backward=batch_norm_backward)
    return mod, calls


def test_dispatch_with_stub(monkeypatch):
    mod, calls = _stub()
    monkeypatch.setattr(_batch_norm, "_triton_module", lambda: mod)
    x = torch.randn(6, 3, 4, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    BF.batch_norm(x, None, None, w, None, True, backend="auto").sum().backward()
    assert calls == []  # auto on CPU: the hand-written torch path
    BF.batch_norm(x, None, None, w, None, True, backend="torch").sum().backward()
    assert calls == []
    y = BF.batch_norm(x, None, None, w, None, True, backend="triton")
    (y * torch.arange(4.0)).sum().backward()
    assert calls == ["forward", "backward"]
    rm, rv = torch.zeros(3), torch.ones(3)
    x.grad = None
    BF.batch_norm(x, rm, rv, w, None, False, backend="triton").sum().backward()  # eval: torch backward
    assert calls == ["forward", "backward", "forward"]
    torch.testing.assert_close(x.grad, (w / torch.sqrt(rv + 1e-5)).view(1, 3, 1).expand(6, 3, 4).detach())


def test_triton_backend_unavailable_raises(monkeypatch):
    mod, _ = _stub(available=False)
    monkeypatch.setattr(_batch_norm, "_triton_module", lambda: mod)
    rm = torch.zeros(3)
    with pytest.raises(RuntimeError, match="backend='triton' is not available"):
        BF.batch_norm(torch.randn(4, 3), rm, torch.ones(3), training=True, backend="triton")
    assert torch.equal(rm, torch.zeros(3))
    monkeypatch.setattr(_batch_norm, "_triton_module", lambda: None)  # triton not importable
    y = BF.batch_norm(torch.randn(4, 3), None, None, training=True, backend="auto")
    assert y.shape == (4, 3)


_INTERPRETED = textwrap.dedent("""
    import torch
    from bnlib.torch.functional import batch_norm
    from bnlib.torch import triton_bn
    assert triton_bn.is_available(torch.randn(2, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g) + 1
    w, b = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    for training in (True, False):
        for cl in (False, True):
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            outs = []
            for backend in ("torch", "triton"):
                xr = xx.clone().requires_grad_(True)
                wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
                rm, rv = torch.zeros(3), torch.ones(3)
                y = batch_norm(xr, rm, rv, wr, br, training, 0.1, 1e-5, backend=backend)
                y.backward(torch.cos(y.detach()))
                outs.append((y.detach(), xr.grad, wr.grad, br.grad, rm, rv))
            for a, c in zip(*outs):
                torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    print("ok")
""")


def test_triton_backend_matches_torch_backend_interpreted():
    """The real kernels (bnlib.torch.triton_bn) in Triton's CPU interpreter, in a fresh process."""
    pytest.importorskip("triton")
    if _batch_norm._triton_module() is None:
        pytest.skip("bnlib.torch.triton_bn not importable")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------------------------------------
# backend='auto' on CUDA: Triton only on the architectures in VERIFIED_TRITON_ARCHS. CUDA is simulated by
# patching _cuda_capability (the one function the dispatch asks "on CUDA, which architecture?"), and the two
# implementations are replaced by spies, so these run on a CPU-only machine.
# ----------------------------------------------------------------------------------------------------------
def _spy_paths(monkeypatch, capability):
    mod, triton_calls = _stub()
    monkeypatch.setattr(_batch_norm, "_triton_module", lambda: mod)
    monkeypatch.setattr(_batch_norm, "_cuda_capability", lambda x: capability)
    monkeypatch.setattr(_batch_norm, "_WARNED_ARCHS", set())
    torch_calls = []
    real_apply = _batch_norm.ad.apply

    def spy(cls, *a):
        if cls is _batch_norm.BatchNormFunction:
            torch_calls.append("torch")
        return real_apply(cls, *a)

    monkeypatch.setattr(_batch_norm.ad, "apply", spy)
    return triton_calls, torch_calls


def _run(backend):
    x = torch.randn(6, 3, 4)
    return BF.batch_norm(x, torch.zeros(3), torch.ones(3), torch.rand(3), None, True, backend=backend)


def test_verified_list_is_empty_and_well_formed():
    assert _batch_norm.VERIFIED_TRITON_ARCHS == ()  # no GPU run has been made: do not add an entry without one
    import bnlib.torch
    assert bnlib.torch.VERIFIED_TRITON_ARCHS is _batch_norm.VERIFIED_TRITON_ARCHS
    for arch in _batch_norm.VERIFIED_TRITON_ARCHS:
        assert isinstance(arch, _batch_norm.VerifiedArch)
        assert len(arch.capability) == 2 and all(isinstance(v, int) for v in arch.capability)
        assert arch.device and arch.verified and len(arch.date) == 10


def test_auto_unverified_arch_uses_torch_path_and_warns_once(monkeypatch):
    triton_calls, torch_calls = _spy_paths(monkeypatch, (8, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the once-only must come from bnlib, not from Python's filter
        _run("auto")
        _run("auto")
        m = bnlib_modules.BatchNorm1d(3)  # the modules go through the same dispatch
        m(torch.randn(6, 3, 4))
    assert triton_calls == [] and torch_calls == ["torch"] * 3
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "sm_86" in msgs[0] and "8.6" in msgs[0] and "unverified" in msgs[0]
    assert "backend='triton'" in msgs[0]
    # another unverified architecture is named once too
    monkeypatch.setattr(_batch_norm, "_cuda_capability", lambda x: (9, 0))
    with pytest.warns(RuntimeWarning, match="sm_90"):
        _run("auto")
    assert triton_calls == [] and torch_calls == ["torch"] * 4


def test_auto_verified_arch_uses_triton_path(monkeypatch):
    triton_calls, torch_calls = _spy_paths(monkeypatch, (9, 0))
    arch = _batch_norm.VerifiedArch((9, 0), "simulated GPU", "2000-01-01", "test only")
    monkeypatch.setattr(_batch_norm, "VERIFIED_TRITON_ARCHS", (arch,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on a verified architecture
        _run("auto")
    assert triton_calls == ["forward"] and torch_calls == []
    # a different architecture is still unverified
    monkeypatch.setattr(_batch_norm, "_cuda_capability", lambda x: (8, 0))
    with pytest.warns(RuntimeWarning, match=r"sm_80.*verified: sm_90"):
        _run("auto")
    assert triton_calls == ["forward"] and torch_calls == ["torch"]


@pytest.mark.parametrize("capability", [(8, 6), (9, 0), None])
def test_triton_forced_regardless_of_arch(monkeypatch, capability):
    triton_calls, torch_calls = _spy_paths(monkeypatch, capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run("triton")
    assert triton_calls == ["forward"] and torch_calls == []
    _run("torch")
    assert triton_calls == ["forward"] and torch_calls == ["torch"]


def test_auto_on_cpu_unchanged(monkeypatch):
    triton_calls, torch_calls = _spy_paths(monkeypatch, None)  # not a CUDA tensor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run("auto")
    assert triton_calls == [] and torch_calls == ["torch"]


def test_cuda_capability_of_cpu_tensor_is_none():
    assert _batch_norm._cuda_capability(torch.randn(2, 3)) is None
